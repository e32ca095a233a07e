"""``Scheduler``: drives a torch optimizer's group lrs from stateless schedules."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

Schedule = Callable[[int], float]

# Attributes that are code, not state: never saved, never overwritten by load_state_dict.
_NOT_STATE = ("optimizer", "schedules")


def _as_float(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


class Scheduler(LRScheduler):
    """Set each group's lr to ``group['initial_lr'] * schedule(step)``.

    ``schedule`` is one callable ``step -> multiplier`` for every group, or a list with one per
    param group. ``step`` counts ``scheduler.step()`` calls: after construction it is 0, so the
    first ``optimizer.step()`` runs at ``schedule(0) * initial_lr``, and the i-th (0-based)
    optimizer step runs at ``schedule(i) * initial_lr`` when ``scheduler.step()`` follows each
    ``optimizer.step()`` (the convention of torch's schedulers, optax and transformers).
    ``initial_lr`` is set by :class:`~torch.optim.lr_scheduler.LRScheduler` to the group's lr at
    construction (kept if a group already has one); adamkit's ``weight_decay_scaling="lr_ratio"``
    reads it, so the decay follows the schedule multiplier.

    The product is computed in double precision and written into the group; a 0-d tensor lr is
    updated in place with ``fill_`` (the tensor object never changes, so a compiled step that
    reads it does not recompile).

    The state is the step count: ``state_dict()`` holds no schedule (a lambda would not
    pickle), so rebuild the scheduler with the same schedule and then ``load_state_dict``,
    which sets the group lrs at once: the next ``optimizer.step()`` runs at the restored lr.
    Load the optimizer's state first (``optimizer.load_state_dict`` replaces the groups).

    Example::

        opt = adamkit.AdamW(model.parameters(), lr=3e-4)
        sched = adamkit.Scheduler(opt, adamkit.schedules.warmup_cosine(100, 10_000))
        for batch in data:
            loss(batch).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
    """

    def __init__(self, optimizer: Optimizer, schedule: Schedule | Sequence[Schedule]) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        n_groups = len(optimizer.param_groups)
        if isinstance(schedule, (list, tuple)):
            if len(schedule) != n_groups:
                raise ValueError(
                    f"Invalid schedule: a list of {len(schedule)} schedules for "
                    f"{n_groups} param groups (expected one per group)"
                )
            schedules = list(schedule)
        else:
            schedules = [schedule] * n_groups
        for i, s in enumerate(schedules):
            if not callable(s):
                raise TypeError(f"Invalid schedule for param group {i}: {s!r} is not callable")
        self.schedules: list[Schedule] = schedules
        super().__init__(optimizer)  # sets initial_lr, step 0, and the first lrs

    def lr_at(self, step: int) -> list[float]:
        """The lr of each group at ``step``: ``initial_lr * schedule(step)``."""
        return [
            _as_float(group["initial_lr"]) * float(schedule(step))
            for group, schedule in zip(self.optimizer.param_groups, self.schedules, strict=True)
        ]

    def get_lr(self) -> list[float]:
        """The lrs at the current step (``last_epoch``); ``LRScheduler.step`` writes them,
        filling tensor lrs in place."""
        return self.lr_at(self.last_epoch)

    def state_dict(self) -> dict[str, Any]:
        """The step count and torch's bookkeeping; no schedule and no optimizer."""
        return {k: v for k, v in self.__dict__.items() if k not in _NOT_STATE}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step count and set every group's lr for that step now."""
        self.__dict__.update({k: v for k, v in state_dict.items() if k not in _NOT_STATE})
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = [
            g["lr"].clone() if isinstance(g["lr"], Tensor) else g["lr"]
            for g in self.optimizer.param_groups
        ]
