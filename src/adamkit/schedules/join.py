"""``join``: splice schedules end to end, each piece counting steps from its own start."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral

from adamkit.schedules._checks import check_step, fail

Schedule = Callable[[int], float]


@dataclass(frozen=True)
class Join:
    """Piece ``i`` runs on ``boundaries[i-1] <= s < boundaries[i]`` (from 0 for the first, for
    ever for the last) and is called with ``s - boundaries[i-1]``, as optax's
    ``join_schedules``. ``boundaries`` are non-negative and strictly increasing, one fewer
    than ``schedules``; a boundary at 0 means the first piece is never used."""

    schedules: tuple[Schedule, ...]
    boundaries: tuple[int, ...]

    def __post_init__(self) -> None:
        schedules, boundaries = self.schedules, self.boundaries
        if isinstance(schedules, (str, bytes)) or not isinstance(schedules, Sequence):
            raise fail("schedules", schedules, "expected a sequence of schedules")
        if len(schedules) == 0:
            raise fail("schedules", schedules, "expected at least one schedule")
        for i, schedule in enumerate(schedules):
            if not callable(schedule):
                raise fail(f"schedules[{i}]", schedule, "expected a callable step -> multiplier")
        if isinstance(boundaries, (str, bytes)) or not isinstance(boundaries, Sequence):
            raise fail("boundaries", boundaries, "expected a sequence of steps")
        if len(boundaries) != len(schedules) - 1:
            raise fail(
                "boundaries",
                boundaries,
                f"expected len(schedules) - 1 = {len(schedules) - 1} entries",
            )
        for b in boundaries:
            if isinstance(b, bool) or not isinstance(b, Integral):
                raise fail("boundaries", boundaries, "entries must be integers")
            if b < 0:
                raise fail("boundaries", boundaries, "entries must be >= 0")
        if any(a >= b for a, b in zip(boundaries[:-1], boundaries[1:], strict=True)):
            raise fail("boundaries", boundaries, "must be strictly increasing")
        object.__setattr__(self, "schedules", tuple(schedules))
        object.__setattr__(self, "boundaries", tuple(int(b) for b in boundaries))

    def __call__(self, step: int) -> float:
        s = check_step(step)
        start, piece = 0, 0
        for boundary in self.boundaries:
            if s < boundary:
                break
            start, piece = boundary, piece + 1
        return self.schedules[piece](s - start)


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Join:
    """Splice ``schedules`` at ``boundaries``; see :class:`Join`."""
    return Join(schedules, boundaries)
