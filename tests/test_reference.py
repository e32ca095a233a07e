"""adamkit (float64) against the float64 NumPy oracle written from the papers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import ReferenceAdam
from registry import relative_error

import adamkit

CASES = {
    "adam": (adamkit.Adam, {}, {"decay": "none"}),
    "adam+L2": (adamkit.Adam, {"weight_decay": 0.1}, {"decay": "l2", "weight_decay": 0.1}),
    "amsgrad": (adamkit.Adam, {"amsgrad": True}, {"amsgrad": True}),
    "maximize": (adamkit.Adam, {"maximize": True}, {"maximize": True}),
    "adamw lr": (
        adamkit.AdamW,
        {"weight_decay": 0.1, "weight_decay_scaling": "lr"},
        {"decay": "decoupled", "weight_decay": 0.1, "scaling": "lr"},
    ),
    "adamw lr_ratio": (
        adamkit.AdamW,
        {"weight_decay": 0.1, "weight_decay_scaling": "lr_ratio"},
        {"decay": "decoupled", "weight_decay": 0.1, "scaling": "lr_ratio"},
    ),
    "adamw none": (
        adamkit.AdamW,
        {"weight_decay": 0.01, "weight_decay_scaling": "none"},
        {"decay": "decoupled", "weight_decay": 0.01, "scaling": "none"},
    ),
    "adamw amsgrad": (
        adamkit.AdamW,
        {"weight_decay": 0.1, "amsgrad": True},
        {"decay": "decoupled", "weight_decay": 0.1, "amsgrad": True},
    ),
}


def _schedule(step: int) -> float:
    """A changing lr multiplier, so that the three decay scalings really differ."""
    return 0.5 + 0.5 * np.cos(step / 7.0)


@pytest.mark.parametrize("name", list(CASES))
def test_against_float64_reference(name: str) -> None:
    cls, ours_kwargs, ref_kwargs = CASES[name]
    lr0 = 0.05
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal((6, 9))
    p = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    opt = cls([p], lr=lr0, **ours_kwargs)
    ref = ReferenceAdam(p0, lr=lr0, **ref_kwargs)
    for step in range(1, 41):
        lr = lr0 * _schedule(step)
        opt.param_groups[0]["lr"] = lr
        g = rng.standard_normal(p0.shape) * (1 + step % 5)
        p.grad = torch.tensor(g)
        opt.step()
        expected = ref.step(g, lr=lr)
        err = relative_error(p, torch.tensor(expected))
        assert err <= 1e-12, f"{name} step {step}: {err:.3g}"
    np.testing.assert_allclose(opt.state[p]["exp_avg"].numpy(), ref.m, rtol=1e-12, atol=1e-15)


def test_lr_ratio_uses_scheduler_initial_lr() -> None:
    """With 'initial_lr' set by a scheduler, lr_ratio decays by (lr / initial_lr) * wd."""
    p = torch.ones(4, dtype=torch.float64, requires_grad=True)
    opt = adamkit.AdamW([p], lr=0.02, weight_decay=0.5, weight_decay_scaling="lr_ratio")
    opt.param_groups[0]["initial_lr"] = 0.08
    p.grad = torch.zeros_like(p)  # zero grad: m = v = 0, so only the decay moves p
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((4,), 1 - (0.02 / 0.08) * 0.5).double())


@pytest.mark.parametrize(
    ("scaling", "factor"), [("lr", 1 - 0.02 * 0.5), ("lr_ratio", 1 - 0.5), ("none", 1 - 0.5)]
)
def test_decay_scalings_by_hand(scaling: str, factor: float) -> None:
    p = torch.full((3,), 2.0, dtype=torch.float64, requires_grad=True)
    opt = adamkit.AdamW([p], lr=0.02, weight_decay=0.5, weight_decay_scaling=scaling)
    p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 2.0 * factor, dtype=torch.float64))
