r"""The schedules: frozen dataclasses mapping a 0-based step to a multiplier of the base lr.

Every schedule starts with the same linear warmup over ``warmup_steps`` steps (``s`` is the
0-based step, ``W = warmup_steps``)::

    start_ratio=None:  m(s) = (s + 1) / W                    for s < W  (never 0: no wasted step)
    start_ratio=r:     m(s) = r + (1 - r) * s / W            for s < W  (r=0: transformers' warmup)

and reaches the peak 1 at ``s = W``. A decay phase that starts at step ``s0`` and lasts ``L``
steps has progress ``p = min(1, (s - s0) / max(1, L))``: the multiplier is 1 at ``s0`` and
``min_ratio`` from ``s0 + L`` on, and none of the schedules rises again. (A phase of length 0
still takes one step, as transformers' ``max(1, T - W)`` does.) A decay ``f(p)`` from 1 to 0 is
mapped onto ``[min_ratio, 1]`` as ``f * (1 - min_ratio) + min_ratio``: transformers' min-lr
form, written in the same order so that the floats agree bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass

from adamkit.schedules._checks import (
    check_optional_ratio,
    check_positive,
    check_ratio,
    check_step,
    check_steps,
    fail,
)

DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


def warmup_multiplier(step: int, warmup_steps: int, start_ratio: float | None) -> float:
    """The warmup multiplier at ``step < warmup_steps`` (see the module docstring)."""
    if start_ratio is None:
        return (step + 1) / warmup_steps
    return start_ratio + (1.0 - start_ratio) * step / warmup_steps


def decay_shape_value(shape: str, progress: float) -> float:
    """A decay from 1 (progress 0) to 0 (progress 1) of the given shape."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - math.sqrt(progress)  # "1-sqrt"


def decay_multiplier(shape: str, step: int, start: int, length: int, min_ratio: float) -> float:
    """The multiplier at ``step >= start`` of a decay phase from 1 at ``start`` to ``min_ratio``
    at ``start + max(1, length)``, flat afterwards."""
    progress = min(1.0, (step - start) / max(1, length))
    return decay_shape_value(shape, progress) * (1.0 - min_ratio) + min_ratio


def _check_warmup_within(warmup_steps: int, total_steps: int) -> None:
    if warmup_steps > total_steps:
        raise fail("warmup_steps", warmup_steps, f"must be <= total_steps={total_steps}")


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # normalise a field of a frozen dataclass


@dataclass(frozen=True)
class _WarmupThenDecay:
    """Linear warmup to 1 over ``warmup_steps``, then a decay of ``_shape`` to ``min_ratio`` at
    ``total_steps``, flat afterwards. Subclasses name the shape."""

    _shape = ""  # a decay shape of ``decay_multiplier`` (class attribute, not a field)

    warmup_steps: int
    total_steps: int
    _: KW_ONLY
    min_ratio: float = 0.0
    start_ratio: float | None = None

    def __post_init__(self) -> None:
        _set(self, "warmup_steps", check_steps("warmup_steps", self.warmup_steps))
        _set(self, "total_steps", check_steps("total_steps", self.total_steps))
        _check_warmup_within(self.warmup_steps, self.total_steps)
        _set(self, "min_ratio", check_ratio("min_ratio", self.min_ratio))
        _set(self, "start_ratio", check_optional_ratio("start_ratio", self.start_ratio))

    def __call__(self, step: int) -> float:
        s, w, t = check_step(step), self.warmup_steps, self.total_steps
        if s < w:
            return warmup_multiplier(s, w, self.start_ratio)
        return decay_multiplier(self._shape, s, w, t - w, self.min_ratio)


@dataclass(frozen=True)
class WarmupCosine(_WarmupThenDecay):
    """Linear warmup to 1, cosine from 1 at ``warmup_steps`` to ``min_ratio`` at ``total_steps``.

    For ``s >= W``: ``p = min(1, (s - W) / max(1, T - W))``,
    ``m(s) = f * (1 - min_ratio) + min_ratio`` with ``f = 0.5 * (1 + cos(pi * p))``. Flat at
    ``min_ratio`` from ``total_steps`` on. With ``start_ratio=0.0`` this is transformers'
    ``get_cosine_schedule_with_warmup`` (and its ``min_lr_rate`` variant) at every step up to
    ``total_steps``. With ``T == W`` the decay takes the one step after the peak (as there).
    """

    _shape = "cosine"


@dataclass(frozen=True)
class WarmupLinear(_WarmupThenDecay):
    """Linear warmup to 1, linear from 1 at ``warmup_steps`` to ``min_ratio`` at ``total_steps``.

    For ``s >= W``: ``p = min(1, (s - W) / max(1, T - W))``,
    ``m(s) = (1 - p) * (1 - min_ratio) + min_ratio``. With ``start_ratio=0.0`` and
    ``min_ratio=0`` this is transformers' ``get_linear_schedule_with_warmup`` up to the last bit
    (transformers writes ``(T - s) / (T - W)``) for ``T > W``.
    """

    _shape = "linear"


@dataclass(frozen=True)
class Constant:
    """Linear warmup to 1 over ``warmup_steps`` steps, then 1 for ever."""

    _: KW_ONLY
    warmup_steps: int = 0
    start_ratio: float | None = None

    def __post_init__(self) -> None:
        _set(self, "warmup_steps", check_steps("warmup_steps", self.warmup_steps))
        _set(self, "start_ratio", check_optional_ratio("start_ratio", self.start_ratio))

    def __call__(self, step: int) -> float:
        s = check_step(step)
        if s < self.warmup_steps:
            return warmup_multiplier(s, self.warmup_steps, self.start_ratio)
        return 1.0


@dataclass(frozen=True)
class WarmupStableDecay:
    """Warmup-stable-decay: warmup to 1, hold 1, decay over the last ``decay_steps`` steps.

    With ``D = decay_steps`` the decay starts at ``s0 = T - D``: for ``W <= s < s0`` the
    multiplier is 1; for ``s >= s0``, ``p = min(1, (s - s0) / max(1, D))`` and
    ``m(s) = f(p) * (1 - min_ratio) + min_ratio`` with ``f = 1 - p`` (linear),
    ``0.5 * (1 + cos(pi * p))`` (cosine) or ``1 - sqrt(p)`` (1-sqrt). So step ``s0`` is still
    at 1 and step ``T`` is the first at ``min_ratio`` (with ``D = 0``: step ``T + 1``).
    """

    warmup_steps: int
    total_steps: int
    decay_steps: int
    _: KW_ONLY
    decay_shape: str = "linear"
    min_ratio: float = 0.0
    start_ratio: float | None = None

    def __post_init__(self) -> None:
        _set(self, "warmup_steps", check_steps("warmup_steps", self.warmup_steps))
        _set(self, "total_steps", check_steps("total_steps", self.total_steps))
        _set(self, "decay_steps", check_steps("decay_steps", self.decay_steps))
        _check_warmup_within(self.warmup_steps, self.total_steps)
        room = self.total_steps - self.warmup_steps
        if self.decay_steps > room:
            raise fail(
                "decay_steps", self.decay_steps, f"must be <= total_steps - warmup_steps = {room}"
            )
        if self.decay_shape not in DECAY_SHAPES:
            raise fail("decay_shape", self.decay_shape, f"expected one of {DECAY_SHAPES}")
        _set(self, "min_ratio", check_ratio("min_ratio", self.min_ratio))
        _set(self, "start_ratio", check_optional_ratio("start_ratio", self.start_ratio))

    def __call__(self, step: int) -> float:
        s, w, t = check_step(step), self.warmup_steps, self.total_steps
        if s < w:
            return warmup_multiplier(s, w, self.start_ratio)
        decay_start = t - self.decay_steps
        if s < decay_start:
            return 1.0
        return decay_multiplier(self.decay_shape, s, decay_start, self.decay_steps, self.min_ratio)


@dataclass(frozen=True)
class InverseSqrt:
    """Linear warmup to 1, then ``1 / sqrt((s + tau - W) / tau)``: 1 at ``s = W``, never 0.

    ``tau = timescale``, defaulting to ``W`` (1 when ``W`` is 0; transformers defaults to
    10000 there). The step convention: ``s`` is 0-based, warmup covers ``s < W`` and the peak 1
    is reached at ``s = W`` exactly, where the decay formula also gives 1, so the curve is
    continuous at the boundary. With ``start_ratio=0.0`` and an explicit ``timescale`` this is
    transformers' ``get_inverse_sqrt_schedule``.
    """

    warmup_steps: int
    _: KW_ONLY
    timescale: int | float | None = None
    start_ratio: float | None = None

    def __post_init__(self) -> None:
        _set(self, "warmup_steps", check_steps("warmup_steps", self.warmup_steps))
        if self.timescale is not None:
            _set(self, "timescale", check_positive("timescale", self.timescale))
        _set(self, "start_ratio", check_optional_ratio("start_ratio", self.start_ratio))

    @property
    def tau(self) -> int | float:
        """The timescale in use: ``timescale``, else ``warmup_steps``, else 1."""
        if self.timescale is not None:
            return self.timescale
        return self.warmup_steps or 1

    def __call__(self, step: int) -> float:
        s, w, tau = check_step(step), self.warmup_steps, self.tau
        if s < w:
            return warmup_multiplier(s, w, self.start_ratio)
        shift = tau - w
        return 1.0 / math.sqrt((s + shift) / tau)


# ---------------------------------------------------------------------------------------------
# the public constructors (the names of the contract; each returns one of the classes above)


def warmup_cosine(
    warmup_steps: int,
    total_steps: int,
    *,
    min_ratio: float = 0.0,
    start_ratio: float | None = None,
) -> WarmupCosine:
    """Linear warmup, then cosine to ``min_ratio`` at ``total_steps``; see :class:`WarmupCosine`."""
    return WarmupCosine(warmup_steps, total_steps, min_ratio=min_ratio, start_ratio=start_ratio)


def warmup_linear(
    warmup_steps: int,
    total_steps: int,
    *,
    min_ratio: float = 0.0,
    start_ratio: float | None = None,
) -> WarmupLinear:
    """Linear warmup, then linear to ``min_ratio`` at ``total_steps``; see :class:`WarmupLinear`."""
    return WarmupLinear(warmup_steps, total_steps, min_ratio=min_ratio, start_ratio=start_ratio)


def constant(*, warmup_steps: int = 0, start_ratio: float | None = None) -> Constant:
    """Optional linear warmup, then 1; see :class:`Constant`."""
    return Constant(warmup_steps=warmup_steps, start_ratio=start_ratio)


def wsd(
    warmup_steps: int,
    total_steps: int,
    decay_steps: int,
    *,
    decay_shape: str = "linear",
    min_ratio: float = 0.0,
    start_ratio: float | None = None,
) -> WarmupStableDecay:
    """Warmup, hold 1, decay over the last ``decay_steps``; see :class:`WarmupStableDecay`."""
    return WarmupStableDecay(
        warmup_steps,
        total_steps,
        decay_steps,
        decay_shape=decay_shape,
        min_ratio=min_ratio,
        start_ratio=start_ratio,
    )


def inverse_sqrt(
    warmup_steps: int, *, timescale: float | None = None, start_ratio: float | None = None
) -> InverseSqrt:
    """Linear warmup, then ``1 / sqrt((s + tau - W) / tau)``; see :class:`InverseSqrt`."""
    return InverseSqrt(warmup_steps, timescale=timescale, start_ratio=start_ratio)
