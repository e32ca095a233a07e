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


KERNEL_WIDTH = int(os.environ.setdefault("ADAMKIT_TEST_KERNEL_WIDTH", "2"))
"""Tensors per mixed and per small kernel in the tests (adamkit's own: ``plan.MIXED_WIDTH =
plan.SMALL_WIDTH = 8``). A kernel runs the same code for every slot, and its compile time
grows with the slots: at 2 the compiled tests take about a quarter of the time they take at 8.
The value goes to the distributed workers through the environment;
``ADAMKIT_TEST_KERNEL_WIDTH=8`` runs the whole suite at adamkit's widths.
``test_compiled.py::test_kernels_of_adamkits_widths_match_eager`` always runs them, and so do
the benchmarks."""


def _narrow_kernels() -> None:
    from adamkit.execution import plan

    plan.MIXED_WIDTH = plan.SMALL_WIDTH = KERNEL_WIDTH


_narrow_kernels()
