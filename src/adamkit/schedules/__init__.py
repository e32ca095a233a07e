r"""Learning-rate schedules: pure callables ``step -> multiplier`` of each group's base lr.

A schedule is a small frozen dataclass: validated when built (``ValueError`` naming the
argument and the value), hashable, comparable, with a repr that reads as its arguments, and
stateless, so resuming a run needs only the step count. :class:`Scheduler` applies one to a
torch optimizer: ``lr = group['initial_lr'] * schedule(step)``.

Step convention: ``step`` is 0-based and counts optimizer steps already taken, so the i-th
(0-based) ``optimizer.step()`` runs at ``schedule(i)`` (as torch's schedulers, transformers'
``LambdaLR`` schedules and optax's ``count``). A negative or non-integer step is a
``ValueError``.

- ``warmup_cosine(W, T, *, min_ratio=0.0, start_ratio=None)``: linear warmup to 1, cosine to
  ``min_ratio`` at ``T``, flat afterwards.
- ``warmup_linear(W, T, *, min_ratio=0.0, start_ratio=None)``: the same with a linear decay.
- ``constant(*, warmup_steps=0, start_ratio=None)``: warmup, then 1.
- ``wsd(W, T, decay_steps, *, decay_shape="linear" | "cosine" | "1-sqrt", min_ratio=0.0,
  start_ratio=None)``: warmup, 1, decay over the last ``decay_steps`` before ``T``.
- ``inverse_sqrt(W, *, timescale=None, start_ratio=None)``: warmup, then
  ``1 / sqrt((s + tau - W) / tau)``.
- ``join(schedules, boundaries)``: splice schedules; each piece counts from its own start.
- ``plot(schedule, steps, path)``: a PNG of the first ``steps`` multipliers.

Warmup: for ``s < W`` the multiplier is ``(s + 1) / W`` with ``start_ratio=None`` (the first
step is never spent at lr 0) and ``r + (1 - r) * s / W`` with ``start_ratio=r``. The peak 1 is
reached at ``s = W``.

Other libraries, argument for argument:

- transformers ``get_cosine_schedule_with_warmup(opt, W, T)`` (``num_cycles=0.5``) equals
  ``warmup_cosine(W, T, start_ratio=0.0)`` at every step ``s <= T``; its min-lr variant
  ``get_cosine_with_min_lr_schedule_with_warmup(..., min_lr_rate=r)`` equals
  ``warmup_cosine(W, T, min_ratio=r, start_ratio=0.0)``. Past ``T`` transformers' cosine rises
  again; ours stays at ``min_ratio``.
- optax ``warmup_cosine_decay_schedule(init_value, peak_value, warmup_steps, decay_steps,
  end_value)`` (whose ``decay_steps`` is the TOTAL length, warmup included) is base lr
  ``peak_value`` times ``warmup_cosine(warmup_steps, decay_steps,
  start_ratio=init_value / peak_value, min_ratio=end_value / peak_value)``, for
  ``decay_steps > warmup_steps > 0`` and ``0 <= init_value, end_value <= peak_value``.
- torch ``CosineAnnealingLR`` rises again after ``T_max``; ``LinearLR`` cannot start at exactly
  0 (``start_ratio=0.0`` can); ``join`` replaces ``SequentialLR`` and resumes from the step
  count alone.
"""

from adamkit.schedules.curves import (
    DECAY_SHAPES,
    Constant,
    InverseSqrt,
    WarmupCosine,
    WarmupLinear,
    WarmupStableDecay,
    constant,
    inverse_sqrt,
    warmup_cosine,
    warmup_linear,
    wsd,
)
from adamkit.schedules.join import Join, join
from adamkit.schedules.plotting import plot
from adamkit.schedules.scheduler import Scheduler

__all__ = [
    "DECAY_SHAPES",
    "Constant",
    "InverseSqrt",
    "Join",
    "Scheduler",
    "WarmupCosine",
    "WarmupLinear",
    "WarmupStableDecay",
    "constant",
    "inverse_sqrt",
    "join",
    "plot",
    "warmup_cosine",
    "warmup_linear",
    "wsd",
]
