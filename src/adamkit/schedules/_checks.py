"""Argument checks shared by the schedules.

Every check raises ``ValueError`` naming the argument and the offending value, in the form
``"Invalid warmup_steps=-1: must be >= 0"``, and returns the value normalised (``int`` steps,
``float`` ratios) so that equal schedules compare and print equal.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any


def fail(name: str, value: Any, rule: str) -> ValueError:
    """The error every check raises: ``Invalid <name>=<value>: <rule>``."""
    return ValueError(f"Invalid {name}={value!r}: {rule}")


def check_steps(name: str, value: Any) -> int:
    """A step count: an integer (not a bool) >= 0."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise fail(name, value, "must be an integer")
    if value < 0:
        raise fail(name, value, "must be >= 0")
    return int(value)


def check_ratio(name: str, value: Any) -> float:
    """A fraction of the base lr: a real number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise fail(name, value, "must be a number in [0, 1]")
    if not 0.0 <= float(value) <= 1.0:  # also refuses nan
        raise fail(name, value, "must be in [0, 1]")
    return float(value)


def check_optional_ratio(name: str, value: Any) -> float | None:
    return None if value is None else check_ratio(name, value)


def check_positive(name: str, value: Any) -> int | float:
    """A finite real number > 0 (an ``int`` stays an ``int``)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise fail(name, value, "must be a number > 0")
    if not (math.isfinite(float(value)) and float(value) > 0.0):
        raise fail(name, value, "must be finite and > 0")
    return int(value) if isinstance(value, Integral) else float(value)


def check_step(step: Any) -> int:
    """The argument of a schedule call: a 0-based step count, an integer >= 0."""
    return check_steps("step", step)
