"""Validation of Adam hyperparameters.

Every check raises ``ValueError`` naming the argument and the offending value, both at
construction and in ``add_param_group``. The messages keep torch's wording ("Invalid learning
rate", "Invalid epsilon value", ...) so that code matching torch's messages keeps working.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from adamkit.rule import WEIGHT_DECAY_SCALINGS


def check_optimizer(optimizer: object) -> None:
    """Refuse, with ``TypeError``, an argument that should be a ``torch.optim.Optimizer``."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        return float(value.detach().reshape(()).item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}={value!r}: expected a number")
    return float(value)


def _check(ok: bool, what: str, name: str, value: Any, rule: str) -> None:
    if not ok:
        shown = value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
        raise ValueError(f"Invalid {what}: {name}={shown!r} ({rule})")


def validate_lr(lr: Any) -> None:
    v = _as_float("lr", lr)
    _check(math.isfinite(v) and v >= 0.0, "learning rate", "lr", lr, "must be finite and >= 0")


def validate_eps(eps: Any) -> None:
    v = _as_float("eps", eps)
    _check(math.isfinite(v) and v >= 0.0, "epsilon value", "eps", eps, "must be finite and >= 0")


def validate_betas(betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas={betas!r}: expected a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        v = _as_float(f"betas[{i}]", b)
        _check(
            0.0 <= v < 1.0, f"beta parameter at index {i}", f"betas[{i}]", b, "must be in [0, 1)"
        )


def validate_weight_decay(weight_decay: Any) -> None:
    v = _as_float("weight_decay", weight_decay)
    _check(
        math.isfinite(v) and v >= 0.0,
        "weight_decay value",
        "weight_decay",
        weight_decay,
        "must be finite and >= 0",
    )


def validate_weight_decay_scaling(scaling: Any) -> None:
    if scaling not in WEIGHT_DECAY_SCALINGS:
        raise ValueError(
            f"Invalid weight_decay_scaling={scaling!r}: expected one of {WEIGHT_DECAY_SCALINGS}"
        )


def validate_group(group: dict) -> None:
    """Check every hyperparameter of a param group (or the defaults)."""
    validate_lr(group["lr"])
    validate_eps(group["eps"])
    validate_betas(group["betas"])
    validate_weight_decay(group["weight_decay"])
    validate_weight_decay_scaling(group["weight_decay_scaling"])
    for flag in ("amsgrad", "maximize", "decoupled_weight_decay"):
        if not isinstance(group[flag], bool):
            raise ValueError(f"Invalid {flag}={group[flag]!r}: expected a bool")


def scalar_dtype() -> torch.dtype:
    """dtype of the 'step' counter, as torch.optim chooses it (float64 under a float64 default)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
