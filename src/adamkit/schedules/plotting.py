"""``plot``: a PNG of a schedule's multiplier, for docs and for checking a config by eye."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path

from adamkit.schedules._checks import check_steps, fail


def plot(schedule: Callable[[int], float], steps: int, path: str | os.PathLike) -> Path:
    """Write a PNG of ``schedule(s)`` for ``s = 0 .. steps - 1`` to ``path``; return the path.

    Uses matplotlib's Agg canvas directly (imported here, so adamkit does not need matplotlib
    otherwise; it comes with the ``bench`` extra) and leaves pyplot's global state alone.
    """
    steps = check_steps("steps", steps)
    if steps < 1:
        raise fail("steps", steps, "must be >= 1")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "adamkit.schedules.plot needs matplotlib: pip install 'adamkit[bench]'"
        ) from e

    xs = list(range(steps))
    ys = [float(schedule(s)) for s in xs]
    fig = Figure(figsize=(7.0, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(xs, ys, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("lr multiplier")
    ax.set_title(textwrap.shorten(repr(schedule), width=110), fontsize=8)
    ax.set_xlim(0, max(1, steps - 1))
    ax.set_ylim(bottom=0.0, top=max(1.0, max(ys)) * 1.05)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path
