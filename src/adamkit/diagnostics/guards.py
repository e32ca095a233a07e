"""``SpikeGuard``: skip the optimizer step when the gradient norm or the loss spikes.

OLMo's rule (REFERENCE.md section 5): a step is skipped when its total grad norm, or its loss,
exceeds the rolling mean + ``threshold`` standard deviations of the last ``window`` values,
once ``warmup`` values are known. A non-finite grad norm or loss is always skipped and never
enters the statistics; finite values enter them whether they spiked or not (as OLMo does).

A skipped step changes nothing: the guard's step pre-hook sets every ``p.grad`` to None for
the duration of ``step()`` and its post-hook puts them back, and Adam/AdamW (adamkit's and
torch's) leave a param without a gradient untouched: no moment update, no weight decay, no
step count.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from adamkit.diagnostics.signals import RollingStats, loss_value
from adamkit.hparams import check_optimizer

logger = logging.getLogger("adamkit")


def total_grad_norm(grads: list[Tensor]) -> float:
    """||(g_1, ..., g_n)||_2 computed in float32 (float64 when a grad is float64); one sync."""
    if not grads:
        return 0.0
    device = grads[0].device
    dtype = (
        torch.float64
        if any(g.dtype in (torch.float64, torch.complex128) for g in grads)
        else (torch.float32)
    )
    norms = [torch.linalg.vector_norm(g.detach(), dtype=dtype).to(device) for g in grads]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


class SpikeGuard:
    """Skip optimizer steps whose grad norm or loss spikes, OLMo-style.

    Args:
        optimizer: any ``torch.optim.Optimizer`` that skips params without a gradient (Adam,
            AdamW, SGD...).
        window: number of past values behind the rolling mean and std (OLMo: 128).
        threshold: skip when a value exceeds mean + ``threshold`` x std (OLMo: 6).
        warmup: values needed before anything is judged a spike (OLMo: 64). Non-finite
            values are skipped from the first step.
        watch: which series to judge, a subset of ``("grad_norm", "loss")``.

    Call :meth:`observe` with the loss *before* ``optimizer.step()`` (after ``backward()``) for
    the loss to be judged with its own step. ``skipped_steps`` counts skips, ``skips`` lists
    them as ``(step, what, value, bound)``. Closures are not supported: the guard judges the
    gradients already in ``p.grad`` when ``step()`` is called.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        window: int = 128,
        threshold: float = 6.0,
        warmup: int = 64,
        watch: tuple[str, ...] = ("grad_norm", "loss"),
    ) -> None:
        check_optimizer(optimizer)
        unknown = set(watch) - {"grad_norm", "loss"}
        if unknown:
            raise ValueError(f"Invalid watch={watch!r}: expected 'grad_norm' and/or 'loss'")
        if not threshold > 0:
            raise ValueError(f"Invalid threshold={threshold!r}: must be > 0")
        self.optimizer = optimizer
        self.threshold = float(threshold)
        self.watch = tuple(watch)
        self.grad_norms = RollingStats(window, warmup)
        self.losses = RollingStats(window, warmup)
        self.skipped_steps = 0
        self.skips: list[tuple[int, str, float, float]] = []
        self.last_grad_norm: float | None = None
        self.last_skipped = False
        self._steps = 0
        self._pending_loss: list[float | Tensor] = []
        self._stash: list[tuple[Tensor, Tensor]] | None = None
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]

    def observe(self, *, loss: float | Tensor) -> None:
        """The loss of the coming step (several calls before one step are averaged)."""
        self._pending_loss.append(loss_value(loss))

    def remove(self) -> None:
        """Detach from the optimizer."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _judge(self, what: str, value: float, stats: RollingStats) -> tuple | None:
        if not math.isfinite(value):
            return (self._steps, what, value, math.nan)
        bound = stats.bound(self.threshold)
        stats.add(value)
        return (self._steps, what, value, bound) if value > bound else None

    def _pre_hook(self, opt: Optimizer, args: tuple, kwargs: dict) -> None:
        if (len(args) > 1 and args[1] is not None) or kwargs.get("closure") is not None:
            raise RuntimeError(
                "SpikeGuard judges the gradients in p.grad before step(); it cannot guard a "
                "step whose closure computes them. Call backward() yourself, then step()."
            )
        self._steps += 1
        self._stash = None
        self.last_skipped = False
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        reasons = []
        if "grad_norm" in self.watch and params:
            self.last_grad_norm = total_grad_norm([p.grad for p in params])
            reasons.append(self._judge("grad_norm", self.last_grad_norm, self.grad_norms))
        pending, self._pending_loss = self._pending_loss, []
        if "loss" in self.watch and pending:
            vals = [float(x) for x in pending]
            reasons.append(self._judge("loss", sum(vals) / len(vals), self.losses))
        reasons = [r for r in reasons if r is not None]
        if not reasons or not params:
            return
        self.skipped_steps += 1
        self.last_skipped = True
        self.skips.extend(reasons)
        self._stash = [(p, p.grad) for p in params]
        for p in params:
            p.grad = None
        step, what, value, bound = reasons[0]
        logger.warning(
            "adamkit SpikeGuard skipped step %d: %s %.4g %s",
            step,
            what.replace("_", " "),
            value,
            "is not finite"
            if not math.isfinite(value)
            else f"> rolling mean + {self.threshold:g} sigma ({bound:.4g})",
        )

    def _post_hook(self, opt: Optimizer, args: tuple, kwargs: Any) -> None:
        if self._stash is not None:
            for p, g in self._stash:
                p.grad = g
            self._stash = None
