"""``adamkit report RUN.jsonl``: a summary table of a monitored run and a PNG of its signals.

::

    adamkit report run.jsonl                 # table on stdout, run.png next to run.jsonl
    adamkit report run.jsonl --out fig.png   # choose the figure's path
    adamkit report run.jsonl --no-plot       # the table only

The table shows, for the overall signals, the first, last, min and max over the run, then the
alerts (step, name, tensor, value). The figure has one panel per main signal over steps, with
the steps of alerts marked. Needs ``rich`` and ``matplotlib`` (``pip install adamkit[bench]``).
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adamkit.diagnostics.sinks import read_jsonl

SUMMARY_SIGNALS = (
    "grad_norm",
    "update_rms",
    "log10_update_to_weight",
    "eps_dominated_frac",
    "large_update_frac",
    "second_moment_lag",
    "eff_lr_p50",
    "exp_avg_norm",
    "grad_nonfinite",
    "state_nonfinite",
)

# (title, [(record path, label)], log scale)
PANELS: tuple[tuple[str, tuple[tuple[str, str], ...], bool], ...] = (
    ("loss", (("loss", "loss"), ("loss_mean", "rolling mean")), False),
    ("grad norm", (("overall.grad_norm", "grad norm"),), True),
    ("update rms  rms(m_hat/(sqrt(v_hat)+eps))", (("overall.update_rms", "update rms"),), False),
    ("log10 update / weight", (("overall.log10_update_to_weight", "overall"),), False),
    (
        "fractions",
        (
            ("overall.eps_dominated_frac", "sqrt(v_hat) < eps"),
            ("overall.large_update_frac", "|u| > 0.5"),
        ),
        False,
    ),
    ("second-moment lag  sum g^2 / sum v_hat", (("overall.second_moment_lag", "lag"),), True),
    (
        "effective lr  lr/(sqrt(v_hat)+eps)",
        (
            ("overall.eff_lr_p5", "p5"),
            ("overall.eff_lr_p50", "p50"),
            ("overall.eff_lr_p95", "p95"),
        ),
        True,
    ),
)


def _get(record: dict[str, Any], path: str) -> float | None:
    value: Any = record
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def summarize(records: Sequence[dict[str, Any]]) -> list[tuple[str, list[float | None]]]:
    """(signal, [first, last, min, max]) for ``loss`` and each of :data:`SUMMARY_SIGNALS`."""
    rows = []
    for path in ("loss", *(f"overall.{s}" for s in SUMMARY_SIGNALS)):
        values = [_get(r, path) for r in records]
        finite = [v for v in values if v is not None and math.isfinite(v)]
        present = [v for v in values if v is not None]
        if not present:
            continue
        rows.append(
            (
                path.removeprefix("overall."),
                [
                    present[0],
                    present[-1],
                    min(finite) if finite else None,
                    max(finite) if finite else None,
                ],
            )
        )
    return rows


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, int) or (math.isfinite(x) and x == int(x) and abs(x) < 1e9):
        return str(int(x))
    return f"{x:.4g}"


def print_summary(records: Sequence[dict[str, Any]], path: str, console: Any = None) -> None:
    """The rich tables: overall signals and the alerts."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    steps = [r["step"] for r in records]
    title = f"{path}: {len(records)} records, steps {steps[0]}-{steps[-1]}" if records else path
    table = Table(title=title)
    for column in ("signal", "first", "last", "min", "max"):
        table.add_column(column, justify="left" if column == "signal" else "right")
    for name, values in summarize(records):
        table.add_row(name, *(_fmt(v) for v in values))
    console.print(table)
    alerts = [a for r in records for a in r.get("alerts", [])]
    if not alerts:
        console.print("no alerts")
        return
    at = Table(title=f"{len(alerts)} alerts")
    for column in ("step", "alert", "tensor", "value", "threshold", "message"):
        at.add_column(column, overflow="fold")
    for a in alerts:
        at.add_row(
            str(a["step"]),
            a["name"],
            a.get("tensor") or "-",
            _fmt(a.get("value")),
            _fmt(a.get("threshold")),
            a.get("message", ""),
        )
    console.print(at)


def plot(records: Sequence[dict[str, Any]], out: str | Path) -> Path:
    """A PNG with one panel per entry of :data:`PANELS`; alert steps as dotted red lines."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    alert_steps = sorted({a["step"] for r in records for a in r.get("alerts", [])})
    cols = 2
    rows = math.ceil(len(PANELS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.8 * rows), squeeze=False)
    for ax, (title, series, log) in zip(axes.flat, PANELS):
        drew = False
        for path, label in series:
            pts = [(s, _get(r, path)) for s, r in zip(steps, records)]
            pts = [(s, v) for s, v in pts if v is not None and math.isfinite(v)]
            if log:
                pts = [(s, v) for s, v in pts if v > 0]
            if pts:
                ax.plot(*zip(*pts), label=label, linewidth=1)
                drew = True
        for s in alert_steps:
            ax.axvline(s, color="red", linestyle=":", linewidth=0.8)
        if log and drew:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if drew and len(series) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(PANELS) :]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def not_a_record(records: Sequence[Any]) -> str | None:
    """What makes the first of ``records`` that a Monitor did not write unreadable here (an
    object with an int ``step``, ``alerts`` a list of objects with a ``step`` and a ``name``
    where present), or None when all are readable."""
    for number, r in enumerate(records, start=1):
        if not isinstance(r, dict):
            return f"record {number} is a JSON {type(r).__name__}, not a Monitor record"
        step = r.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            return f"record {number} has no int 'step' (step={step!r}): not a Monitor record"
        alerts = r.get("alerts", [])
        if not isinstance(alerts, list) or not all(
            isinstance(a, dict) and "step" in a and "name" in a for a in alerts
        ):
            return f"record {number} (step {step}) has alerts without 'step' and 'name'"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``adamkit report``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="adamkit report", description="Summarise a run monitored with adamkit.Monitor."
    )
    parser.add_argument("run", help="the JSON Lines file a JSONLSink wrote")
    parser.add_argument("--out", help="path of the PNG (default: RUN with .png)")
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    path = Path(args.run)
    if not path.is_file():
        print(f"adamkit report: no such file: {path}", file=sys.stderr)
        return 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            records = read_jsonl(path)
        except ValueError as e:  # a line that is not JSON (read_jsonl names it)
            print(f"adamkit report: {e}", file=sys.stderr)
            return 2
    for w in caught:
        print(f"adamkit report: warning: {w.message}", file=sys.stderr)
    if not records:
        print(f"adamkit report: {path} holds no records", file=sys.stderr)
        return 1
    problem = not_a_record(records)
    if problem is not None:
        print(f"adamkit report: {path}: {problem}", file=sys.stderr)
        return 2
    print_summary(records, str(path))
    if not args.no_plot:
        out = plot(records, args.out or path.with_suffix(".png"))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
