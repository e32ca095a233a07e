"""adamkit vs torch.optim, every param and state tensor, every step, for the whole registry."""

from __future__ import annotations

import pytest
import torch
from registry import REGISTRY, TOLERANCE, Config, relative_error, run_parity

STEPS = 25


@pytest.mark.parametrize("cfg", REGISTRY, ids=str)
def test_matches_torch_every_step(cfg: Config) -> None:
    tol = TOLERANCE[cfg.dtype]
    worst = 0.0

    def compare(step: int, what: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
        nonlocal worst
        assert ours.dtype == theirs.dtype, (step, what, ours.dtype, theirs.dtype)
        assert ours.shape == theirs.shape
        err = relative_error(ours, theirs)
        worst = max(worst, err)
        assert err <= tol, f"{cfg.name}: step {step} {what}: relative error {err:.3g} > {tol}"

    run_parity(cfg, STEPS, compare)
    if not cfg.complex:
        # On real dtypes the eager path reproduces torch's CPU kernels bit for bit (complex
        # params differ in the last bit: torch decays them with complex arithmetic).
        assert worst == 0.0, f"{cfg.name}: worst relative error {worst:.3g}"


def test_adam_decoupled_equals_adamw() -> None:
    import adamkit

    cfg = REGISTRY[2]

    def compare(step, what, ours, theirs):
        assert torch.equal(ours, theirs), (step, what)

    run_parity(
        cfg,
        10,
        compare,
        reference=lambda ps: adamkit.Adam(ps, **cfg.kwargs, decoupled_weight_decay=True),
    )
