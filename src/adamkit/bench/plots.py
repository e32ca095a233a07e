"""The PNG plots of a ``compare`` run, drawn from ``results.json`` data alone.

matplotlib's Agg canvas is used directly (no pyplot, no global state). Each optimizer keeps
its colour across plots.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from adamkit.bench.optimizers import OPTIMIZERS

Results = dict[str, Any]

_PALETTE = (
    "#1f77b4", "#d62728", "#ff7f0e", "#9467bd", "#7f7f7f",
    "#2ca02c", "#17becf", "#8c564b", "#e377c2", "#bcbd22",
)  # fmt: skip


def colour(optimizer: str) -> str:
    names = list(OPTIMIZERS)
    i = names.index(optimizer) if optimizer in names else hash(optimizer) % len(_PALETTE)
    return _PALETTE[i % len(_PALETTE)]


def _figure(width: float = 7.0, height: float = 4.2) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _chosen_runs(data: Results, row: dict[str, Any]) -> list[dict[str, Any]]:
    """The finished runs behind a summary row (the picked lr, every seed)."""
    return [
        r
        for r in data["runs"]
        if r["task"] == row["task"]
        and r["optimizer"] == row["optimizer"]
        and r["schedule"] == row["schedule"]
        and r["status"] == "ok"
        and r["hyperparameters"].get("lr") == row["best_lr"]
        and r["seed"] in row["seeds"]
    ]


def _row_label(row: dict[str, Any], task_schedule: str) -> str:
    label = row["optimizer"]
    if row["schedule"] != task_schedule:
        label += f" ({row['schedule']} lr)"
    return label


def plot_curves(data: Results, task: str, path: Path) -> Path | None:
    """Training objective (the counterexample: x) against step, mean over seeds at the picked
    lr, one line per optimizer."""
    rows = [r for r in data["summary"] if r["task"] == task and r["status"] == "ok"]
    if not rows:
        return None
    info = data["tasks"][task]
    key = "x" if task == "amsgrad-counterexample" else "train_loss"
    fig = _figure()
    ax = fig.add_subplot()
    positive = True
    for row in rows:
        runs = _chosen_runs(data, row)
        curves = [r["curve"] for r in runs if r["curve"].get(key)]
        if not curves:
            continue
        n = min(len(c[key]) for c in curves)
        steps = curves[0]["step"][:n]
        mean = np.mean([c[key][:n] for c in curves], axis=0)
        positive = positive and bool(np.all(mean > 0))
        style = "--" if row["schedule"] != info["schedule"] else "-"
        ax.plot(
            steps,
            mean,
            style,
            color=colour(row["optimizer"]),
            linewidth=1.4,
            label=f"{_row_label(row, info['schedule'])}, lr {row['best_lr']:g}",
        )
    if key == "train_loss" and positive:
        ax.set_yscale("log")
    if key == "train_loss":
        ax.axhline(
            info["target_loss"],
            color="black",
            linewidth=0.8,
            linestyle=":",
            label=f"target {info['target_loss']:g}",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("x" if key == "x" else "training objective")
    ax.set_title(f"{task}: mean over seeds at the lr picked on val", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_lr_sweep(data: Results, task: str, path: Path) -> Path | None:
    """Held-out (val) loss against lr for every optimizer (seed 0); failed lrs are left out."""
    sweep = [r for r in data["runs"] if r["task"] == task and r["phase"] == "sweep"]
    if not sweep:
        return None
    info = data["tasks"][task]
    fig = _figure()
    ax = fig.add_subplot()
    keys = dict.fromkeys((r["optimizer"], r["schedule"]) for r in sweep)
    for optimizer, schedule in keys:
        runs = [r for r in sweep if r["optimizer"] == optimizer and r["schedule"] == schedule]
        ok = sorted(
            (r["hyperparameters"]["lr"], r["final"]["val_loss"])
            for r in runs
            if r["status"] == "ok"
        )
        if not ok:
            continue
        lrs, losses = zip(*ok)
        style = "--o" if schedule != info["schedule"] else "-o"
        label = optimizer + (f" ({schedule} lr)" if schedule != info["schedule"] else "")
        ax.plot(
            lrs, losses, style, color=colour(optimizer), markersize=3, linewidth=1.2, label=label
        )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("held-out loss (val split)")
    ax.set_title(f"{task}: lr sweep (seed 0)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_rosenbrock(data: Results, path: Path) -> Path | None:
    """Every optimizer's path (seed 0, picked lr) over the contour map of Rosenbrock."""
    from adamkit.bench.tasks import ROSENBROCK_START

    rows = [r for r in data["summary"] if r["task"] == "rosenbrock" and r["status"] == "ok"]
    if not rows:
        return None
    fig = _figure(7.0, 5.6)
    ax = fig.add_subplot()
    xs, ys = np.meshgrid(np.linspace(-2.0, 2.0, 300), np.linspace(-1.0, 3.0, 300))
    zs = (1 - xs) ** 2 + 100 * (ys - xs**2) ** 2
    ax.contour(xs, ys, zs, levels=np.logspace(-1, 3.5, 16), colors="#b0b0b0", linewidths=0.6)
    for row in rows:
        runs = _chosen_runs(data, row)
        if not runs or "x" not in runs[0]["curve"]:
            continue
        c = runs[0]["curve"]
        px = np.clip(c["x"], -2.0, 2.0)
        py = np.clip(c["y"], -1.0, 3.0)
        ax.plot(
            px,
            py,
            color=colour(row["optimizer"]),
            linewidth=1.2,
            label=f"{row['optimizer']}, lr {row['best_lr']:g}",
        )
        ax.plot(px[-1:], py[-1:], "o", color=colour(row["optimizer"]), markersize=3)
    ax.plot(*ROSENBROCK_START, "ks", markersize=5, label="start")
    ax.plot(1.0, 1.0, "k*", markersize=10, label="minimum (1, 1)")
    ax.set_xlim(-2.0, 2.0)
    ax.set_ylim(-1.0, 3.0)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    steps = data["tasks"]["rosenbrock"]["steps"]
    ax.set_title(f"Rosenbrock: {steps} steps from (-1.2, 1), lr picked per optimizer", fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    return _save(fig, path)


def plot_grid(data: Results, path: Path) -> Path | None:
    """Heat maps of val loss over lr x weight decay, one per variant; dots mark the best wd per
    lr (Loshchilov & Hutter's Fig. 2 in miniature)."""
    grid = data.get("grid")
    if not grid:
        return None
    fig = _figure(4.2 * len(grid), 3.8)
    labels = {
        "adamw": "AdamW: decay wd x schedule (paper)",
        "adam-l2": "Adam + L2",
        "adamw-torch": "AdamW: decay lr x wd (torch)",
    }
    values = [v for g in grid.values() for row in g["val_loss"] for v in row if v is not None]
    if not values:
        return None
    vmin, vmax = min(values), min(max(values), 2 * min(values) + 0.5)
    for i, (variant, g) in enumerate(grid.items()):
        ax = fig.add_subplot(1, len(grid), i + 1)
        m = np.array([[np.nan if v is None else v for v in row] for row in g["val_loss"]])
        im = ax.imshow(m, origin="lower", cmap="viridis_r", vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(
            range(len(g["weight_decays"])),
            [f"{w:g}" for w in g["weight_decays"]],
            fontsize=7,
            rotation=45,
        )
        ax.set_yticks(range(len(g["lrs"])), [f"{lr:g}" for lr in g["lrs"]], fontsize=7)
        for y, best in enumerate(g["best_weight_decay"]):
            if best is not None:
                ax.plot(g["weight_decays"].index(best), y, "o", color="red", markersize=5)
        ax.set_xlabel("weight decay")
        ax.set_ylabel("learning rate")
        ax.set_title(labels.get(variant, variant), fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8, label="val loss")
    return _save(fig, path)


def write_plots(data: Results, out: Path) -> list[Path]:
    """Every plot this run's data allows; returns the paths written."""
    jobs: list[tuple[Callable[[], Path | None], str]] = []
    for task in data["tasks"]:
        if task == "decoupling-grid":
            jobs.append((lambda: plot_grid(data, out / "decoupling-grid.png"), task))
            continue
        jobs.append((lambda t=task: plot_curves(data, t, out / f"{t}-curves.png"), task))
        jobs.append((lambda t=task: plot_lr_sweep(data, t, out / f"{t}-lr-sweep.png"), task))
        if task == "rosenbrock":
            jobs.append((lambda: plot_rosenbrock(data, out / "rosenbrock-trajectories.png"), task))
    paths = []
    for make, _ in jobs:
        path = make()
        if path is not None:
            paths.append(path)
    return paths
