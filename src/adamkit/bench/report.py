"""Reports of a ``compare`` run: ``report.md``, a self-contained ``report.html`` (plots embedded
as base64 data URIs) and the rich table printed at the end. Everything is drawn from the
``results.json`` data, so a report can be rebuilt from a saved (or partial) results file with
:func:`write_reports`.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from adamkit.bench.plots import write_plots

Results = dict[str, Any]

COLUMNS = (
    "optimizer",
    "lr",
    "train loss",
    "held-out",
    "steps to target",
    "s to target",
    "alerts",
    "failed",
)


# -------------------------------------------------------------------------------------------
# cells


def _pm(stat: dict[str, float | None], percent: bool = False) -> str:
    mean, std = stat["mean"], stat["std"]
    if mean is None:
        return "-"
    one = stat.get("n", 2) == 1  # one seed: no spread to show
    if percent:
        return f"{100 * mean:.1f}%" if one else f"{100 * mean:.1f} ± {100 * std:.1f}%"
    return f"{mean:.3g}" if one else f"{mean:.3g} ± {std:.1g}"


def row_cells(row: dict[str, Any], task_info: dict[str, Any]) -> list[str]:
    """The table cells of one summary row (see :data:`COLUMNS`)."""
    name = row["optimizer"]
    if row["schedule"] != task_info["schedule"]:
        name += f" ({row['schedule']} lr)"
    n = len(row["seeds"])
    if row["status"] != "ok":
        return [name, "-", "FAILED", "-", "-", "-", "-", f"{row['failed']}/{row['runs']}"]
    metric = task_info["metric"]
    held = _pm(row["test_metric"], percent=metric == "accuracy")
    steps = row["steps_to_target"]
    if row["reached_target"]:
        reached = f"{steps['mean']:.0f} ({row['reached_target']}/{n})"
        secs = f"{row['seconds_to_target']['mean']:.3f}"
    else:
        reached, secs = f"- (0/{n})", "-"
    if not row["monitored"]:
        alerts = "n/a"
    elif row["alerts"]["count"] == 0:
        alerts = "0"
    else:
        alerts = ", ".join(f"{k} x{v}" for k, v in row["alerts"]["by_name"].items())
    failed = f"{row['failed']}/{row['runs']}" if row["failed"] else "0"
    return [
        name,
        f"{row['best_lr']:g}",
        _pm(row["train_loss"]),
        held,
        reached,
        secs,
        alerts,
        failed,
    ]


def metric_label(task_info: dict[str, Any]) -> str:
    arrow = "higher" if task_info["higher_is_better"] else "lower"
    return f"test {task_info['metric'].replace('_', ' ')} ({arrow} is better)"


def _status_line(data: Results) -> str:
    m = data["machine"]
    state = (
        "finished"
        if data["finished"]
        else ("INTERRUPTED: partial results" if data["interrupted"] else "running")
    )
    load = m.get("load_average_at_start")
    load_text = f", load average at start {load[0]:.2f}" if load else ""
    wall = m.get("suite_seconds")
    wall_text = f"; the runs took {wall:.0f} s" if wall is not None else ""
    quick = " (--quick)" if data["config"]["quick"] else ""
    return (
        f"{state}{quick}{wall_text}. adamkit {m.get('adamkit')}, torch {m.get('torch')}, "
        f"Python {m.get('python')}, {m.get('platform')}, {m.get('cpu_count')} CPUs, "
        f"{m.get('torch_threads')} torch thread(s) on {m.get('device')}{load_text}; "
        f"started {data['started']}"
    )


def _failures(data: Results) -> list[str]:
    return [
        f"{r['task']} / {r['optimizer']} ({r['schedule']}) lr={r['hyperparameters'].get('lr')} "
        f"seed={r['seed']}: {r['error']}"
        for r in data["runs"]
        if r["status"] != "ok"
    ]


def _claim_line(claim: dict[str, Any]) -> tuple[str, str]:
    box = {"reproduced": "[x]", "not reproduced": "[ ]", "not run": "[ ]"}[claim["status"]]
    verdict = {
        "reproduced": "reproduced",
        "not reproduced": "NOT reproduced",
        "not run": "not run",
    }[claim["status"]]
    return box, verdict


def _plots_for(task: str, plots: list[str]) -> list[str]:
    return [p for p in plots if p.startswith(task + "-") or p == f"{task}.png"]


# -------------------------------------------------------------------------------------------
# markdown


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return out


def render_markdown(data: Results) -> str:
    lines = ["# adamkit compare", "", _status_line(data), "", "## Budget", ""]
    lines += [f"- {b}" for b in data["budget"]]
    lines += [
        "",
        "Each row: the lr with the lowest val loss in the sweep (seed 0), then mean ± std over "
        "the seeds at that lr. train loss = final training objective in eval mode; steps / "
        "seconds to target = first logged step whose training objective is at or below the "
        "task's target (training seconds, evaluation excluded), averaged over the seeds that "
        "reached it; alerts = adamkit.Monitor alerts over those runs; failed = failed runs "
        "out of all runs of the row.",
    ]
    plots = data.get("plots", [])
    for task, info in data["tasks"].items():
        lines += [
            "",
            f"## {task}",
            "",
            f"{info['summary']} ({info['source']}). "
            f"{info['steps']} steps, lr schedule {info['schedule']}.",
        ]
        if task == "decoupling-grid":
            grid = data.get("grid") or {}
            for variant, g in grid.items():
                lines += [
                    "",
                    f"{variant}: best weight decay per lr (val loss): "
                    + ", ".join(
                        f"{lr:g} -> {b if b is None else f'{b:g}'}"
                        for lr, b in zip(g["lrs"], g["best_weight_decay"])
                    ),
                ]
        else:
            rows = [r for r in data["summary"] if r["task"] == task]
            header = list(COLUMNS)
            header[3] = metric_label(info)
            header[4] = f"steps to loss <= {info['target_loss']:g}"
            lines += [""] + _md_table(header, [row_cells(r, info) for r in rows])
        for p in _plots_for(task, plots):
            lines += ["", f"![{p}]({p})"]
    failures = _failures(data)
    lines += ["", "## Failed runs", ""]
    lines += [f"- {f}" for f in failures] if failures else ["None."]
    lines += ["", "## Claims", ""]
    for claim in data["claims"]:
        box, verdict = _claim_line(claim)
        lines.append(
            f"- {box} **{claim['claim']}** ({claim['source']}): {verdict}. {claim['evidence']}"
        )
    lines += [
        "",
        "A claim is checked with the rule written in adamkit.bench.claims and reported whatever "
        "the outcome; 'not run' means its task or optimizers were not selected.",
    ]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------
# html

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 70rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
img { max-width: 100%; margin: 0.5rem 0; }
.yes { color: #1a7f37; font-weight: bold; } .no { color: #cf222e; font-weight: bold; }
.skip { color: #777; font-weight: bold; } .meta { color: #555; font-size: 0.9rem; }
"""


def _img(path: Path) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{encoded}">'


def render_html(data: Results, out: Path) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>adamkit compare</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>adamkit compare</h1>",
        f'<p class="meta">{e(_status_line(data))}</p>',
        "<h2>Budget</h2><ul>",
        *(f"<li>{e(b)}</li>" for b in data["budget"]),
        "</ul>",
    ]
    plots = data.get("plots", [])
    for task, info in data["tasks"].items():
        parts.append(
            f"<h2>{e(task)}</h2><p>{e(info['summary'])} ({e(info['source'])}). "
            f"{info['steps']} steps, lr schedule {e(info['schedule'])}.</p>"
        )
        if task != "decoupling-grid":
            header = list(COLUMNS)
            header[3] = metric_label(info)
            header[4] = f"steps to loss <= {info['target_loss']:g}"
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
            for r in data["summary"]:
                if r["task"] == task:
                    cells = row_cells(r, info)
                    parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
            parts.append("</table>")
        for p in _plots_for(task, plots):
            if (out / p).exists():
                parts.append(_img(out / p))
    failures = _failures(data)
    parts.append("<h2>Failed runs</h2>")
    parts.append(
        "<ul>" + "".join(f"<li>{e(f)}</li>" for f in failures) + "</ul>"
        if failures
        else "<p>None.</p>"
    )
    parts.append("<h2>Claims</h2><ul>")
    for claim in data["claims"]:
        _, verdict = _claim_line(claim)
        cls = {"reproduced": "yes", "not reproduced": "no"}.get(claim["status"], "skip")
        parts.append(
            f'<li><span class="{cls}">{e(verdict)}</span>: <b>{e(claim["claim"])}</b> '
            f"({e(claim['source'])}). {e(claim['evidence'])}</li>"
        )
    parts.append("</ul></body></html>")
    return "\n".join(parts) + "\n"


# -------------------------------------------------------------------------------------------
# rich


def summary_table(data: Results) -> Any:
    """A ``rich.table.Table`` of every summary row, grouped by task."""
    from rich.table import Table

    table = Table(title="adamkit compare" + (" (partial)" if not data["finished"] else ""))
    table.add_column("task", no_wrap=True)
    for c in COLUMNS:
        table.add_column(c, justify="left" if c == "optimizer" else "right", no_wrap=True)
    for task, info in data["tasks"].items():
        rows = [r for r in data["summary"] if r["task"] == task]
        arrow = "↑" if info["higher_is_better"] else "↓"
        labels = [task, f"[dim]test {info['metric'].replace('_', ' ')} {arrow}[/dim]"]
        if "target_loss" in info:
            labels.append(f"[dim]target: loss ≤ {info['target_loss']:g}[/dim]")
        for i, r in enumerate(rows):
            cells = row_cells(r, info)
            if cells[2] == "FAILED":
                cells = [f"[red]{c}[/red]" for c in cells]
            table.add_row(
                labels[i] if i < len(labels) else "", *cells, end_section=i == len(rows) - 1
            )
    return table


def write_reports(data: Results, out: Path) -> list[str]:
    """Write the plots, ``report.md`` and ``report.html`` into ``out``; return the plot names.

    ``data`` is the content of ``results.json``; its ``plots`` entry is set to the names.
    """
    out = Path(out)
    data["plots"] = [p.name for p in write_plots(data, out)]
    (out / "report.md").write_text(render_markdown(data), encoding="utf-8")
    (out / "report.html").write_text(render_html(data, out), encoding="utf-8")
    return data["plots"]
