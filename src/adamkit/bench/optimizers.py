"""The optimizers ``adamkit compare`` runs, by CLI name, and their lr sweeps.

Every optimizer gets the same sweep: the lrs of the ladder ``..., 1e-3, 3e-3, 1e-2, 3e-2, ...``
(two rungs a decade) at :data:`LR_RUNGS` (:data:`QUICK_LR_RUNGS` with ``--quick``) rungs from its
family's middle lr for the task (``Task.base_lr``): with the defaults, base / 10, base / 3, base
and 3 x base. Other hyperparameters are the libraries' defaults, except:

- AdamW keeps torch's default ``weight_decay=1e-2`` (per-step decay ``lr * wd``);
  ``adamw-lr-ratio`` (Loshchilov & Hutter's Algorithm 2: per-step decay ``wd`` times the schedule
  multiplier) gets ``wd = 1e-2 * base lr``, so that both AdamWs decay alike at the middle of the
  sweep and differ away from it;
- momentum is 0.9 for ``sgd-momentum`` and ``sgd-nesterov``;
- a task may override the Adam family's betas (the AMSGrad counterexample needs ``(0, 0.1)``);
- ``gd`` is plain SGD on the whole training set every step (full-batch gradient descent); it runs
  only on tasks with a full-batch form.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

import adamkit
from adamkit.bench.tasks import Task

LR_RUNGS = (-2, -1, 0, 1)
QUICK_LR_RUNGS = (-1, 0, 1)
ADAMW_WEIGHT_DECAY = 1e-2


def _nice(x: float) -> float:
    """Round to 3 significant digits (1e-2 * 3e-3 prints as 3e-05, not 2.9999999999999997e-05)."""
    return float(f"{x:.3g}")


def ladder(rung: int) -> float:
    """The lr ladder: rung 2k is 10^k, rung 2k + 1 is 3 x 10^k (rung -4 is 0.01, -3 is 0.03)."""
    decade, half = divmod(rung, 2)
    return _nice((3.0 if half else 1.0) * 10.0**decade)


def lr_sweep(base_lr: float, quick: bool) -> list[float]:
    """The lrs tried for one optimizer on one task, smallest first."""
    rung = round(2 * math.log10(base_lr))
    return [ladder(rung + r) for r in (QUICK_LR_RUNGS if quick else LR_RUNGS)]


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one optimizer: ``make(params, lr, task) -> (optimizer, hyperparameters)``.

    ``family`` selects the task's middle lr; ``adam_family`` marks adamkit's optimizers (they take
    the task's betas override); ``full_batch`` marks full-batch gradient descent.
    """

    name: str
    label: str
    family: str
    make: Callable[[list[Tensor], float, Task], tuple[Optimizer, dict[str, Any]]]
    adam_family: bool = False
    full_batch: bool = False


def _adam(amsgrad: bool = False, decoupled: str | None = None) -> Callable:
    def make(params: list[Tensor], lr: float, task: Task) -> tuple[Optimizer, dict[str, Any]]:
        hp: dict[str, Any] = {"lr": lr, "betas": list(task.adam_betas or (0.9, 0.999))}
        if amsgrad:
            hp["amsgrad"] = True
        if decoupled is None:
            opt = adamkit.Adam(params, lr=lr, betas=tuple(hp["betas"]), amsgrad=amsgrad)
            return opt, hp
        wd = ADAMW_WEIGHT_DECAY
        if decoupled == "lr_ratio":
            wd = _nice(ADAMW_WEIGHT_DECAY * task.base_lr["adam"])
        hp.update(weight_decay=wd, weight_decay_scaling=decoupled)
        opt = adamkit.AdamW(
            params,
            lr=lr,
            betas=tuple(hp["betas"]),
            weight_decay=wd,
            weight_decay_scaling=decoupled,
        )
        return opt, hp

    return make


def _torch(cls: type[Optimizer], **kwargs: Any) -> Callable:
    def make(params: list[Tensor], lr: float, task: Task) -> tuple[Optimizer, dict[str, Any]]:
        return cls(params, lr=lr, **kwargs), {"lr": lr, **kwargs}

    return make


OPTIMIZERS: dict[str, OptimizerSpec] = {
    s.name: s
    for s in (
        OptimizerSpec("adam", "adamkit.Adam", "adam", _adam(), adam_family=True),
        OptimizerSpec(
            "adamw",
            "adamkit.AdamW (decay lr x wd)",
            "adam",
            _adam(decoupled="lr"),
            adam_family=True,
        ),
        OptimizerSpec(
            "adamw-lr-ratio",
            "adamkit.AdamW (decay wd x schedule)",
            "adam",
            _adam(decoupled="lr_ratio"),
            adam_family=True,
        ),
        OptimizerSpec(
            "amsgrad",
            "adamkit.Adam(amsgrad=True)",
            "adam",
            _adam(amsgrad=True),
            adam_family=True,
        ),
        OptimizerSpec("sgd", "torch SGD", "sgd", _torch(torch.optim.SGD)),
        OptimizerSpec(
            "sgd-momentum",
            "torch SGD, momentum 0.9",
            "momentum",
            _torch(torch.optim.SGD, momentum=0.9),
        ),
        OptimizerSpec(
            "sgd-nesterov",
            "torch SGD, Nesterov 0.9",
            "momentum",
            _torch(torch.optim.SGD, momentum=0.9, nesterov=True),
        ),
        OptimizerSpec("rmsprop", "torch RMSprop", "rmsprop", _torch(torch.optim.RMSprop)),
        OptimizerSpec("adagrad", "torch Adagrad", "adagrad", _torch(torch.optim.Adagrad)),
        OptimizerSpec(
            "gd", "full-batch gradient descent", "sgd", _torch(torch.optim.SGD), full_batch=True
        ),
    )
}

DEFAULT_OPTIMIZERS: tuple[str, ...] = tuple(OPTIMIZERS)


def applies(spec: OptimizerSpec, task: Task) -> bool:
    """Whether ``spec`` runs on ``task`` (full-batch descent needs a full-batch form)."""
    return task.full_batch or not spec.full_batch


def make_grid_optimizer(
    variant: str, params: list[Tensor], lr: float, weight_decay: float
) -> tuple[Optimizer, dict[str, Any]]:
    """The optimizers of the decoupling grid (see :class:`adamkit.bench.tasks.GridVariant`)."""
    hp: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if variant == "adam-l2":
        return adamkit.Adam(params, lr=lr, weight_decay=weight_decay), hp
    scaling = {"adamw": "lr_ratio", "adamw-torch": "lr"}[variant]
    hp["weight_decay_scaling"] = scaling
    opt = adamkit.AdamW(params, lr=lr, weight_decay=weight_decay, weight_decay_scaling=scaling)
    return opt, hp
