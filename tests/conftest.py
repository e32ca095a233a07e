"""Shared test settings: hypothesis runs derandomised in CI so that a red CI is reproducible;
test files that compile kernels forget them when done (``forget_compiled_kernels``)."""

import os

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="module")
def forget_compiled_kernels():
    """backend="auto" switches at once to kernels this process already compiled; later test
    files expect auto's uncompiled path (bitwise torch's), so a file that compiles kernels
    forgets them when done (``pytestmark = pytest.mark.usefixtures(...)``)."""
    yield
    from adamkit.execution import kernels

    kernels.reset_kernels()
