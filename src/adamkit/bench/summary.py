"""Summaries of the runs of ``adamkit compare``: one row per (task, optimizer, schedule) and the
decoupling grid's matrices. Pure functions of the run records."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any


def _stats(values: list[float]) -> dict[str, float | None]:
    """Mean, sample standard deviation (0 for one value) and count of the values not None."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def best_lr(sweep: list[dict[str, Any]]) -> float | None:
    """The lr of the finished sweep run with the lowest val loss (the smallest lr on ties)."""
    ok = [r for r in sweep if r["status"] == "ok"]
    if not ok:
        return None
    best = min(ok, key=lambda r: (r["final"]["val_loss"], r["hyperparameters"]["lr"]))
    return best["hyperparameters"]["lr"]


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, optimizer, schedule): the runs at the picked lr, aggregated."""
    order: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        if r["phase"] in ("sweep", "seed"):
            order.setdefault((r["task"], r["optimizer"], r["schedule"]), []).append(r)
    rows = []
    for (task_name, opt_name, schedule), job_runs in order.items():
        sweep = [r for r in job_runs if r["phase"] == "sweep"]
        lr = best_lr(sweep)
        chosen = [
            r
            for r in job_runs
            if r["status"] == "ok"
            and lr is not None
            and r["hyperparameters"]["lr"] == lr
            and (r["phase"] == "seed" or r["seed"] == 0)
        ]
        failed = [r for r in job_runs if r["status"] != "ok"]
        reached = [r for r in chosen if r["steps_to_target"] is not None]
        alerts: Counter[str] = Counter()
        for r in chosen:
            alerts.update(r["alerts"].get("by_name", {}))
        rows.append(
            {
                "task": task_name,
                "optimizer": opt_name,
                "schedule": schedule,
                "best_lr": lr,
                "seeds": sorted(r["seed"] for r in chosen),
                "train_loss": _stats([r["final"]["train_loss"] for r in chosen]),
                "val_loss": _stats([r["final"]["val_loss"] for r in chosen]),
                "test_metric": _stats([r["final"]["test_metric"] for r in chosen]),
                "steps_to_target": _stats([r["steps_to_target"] for r in reached]),
                "seconds_to_target": _stats([r["seconds_to_target"] for r in reached]),
                "reached_target": len(reached),
                "seconds": _stats([r["seconds"] for r in chosen]),
                "alerts": {"count": sum(alerts.values()), "by_name": dict(sorted(alerts.items()))},
                "monitored": any(r["alerts"].get("monitor") for r in chosen),
                "runs": len(job_runs),
                "failed": len(failed),
                "errors": sorted({r["error"] for r in failed if r["error"]}),
                "status": "failed" if lr is None else "ok",
            }
        )
    return rows


def summarise_grid(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per variant: lrs, weight decays, the val-loss matrix (lr x wd, None where a run failed)
    and, per lr, the weight decay with the lowest val loss."""
    grid_runs = [r for r in runs if r["phase"] == "grid"]
    if not grid_runs:
        return None
    out: dict[str, Any] = {}
    for variant in dict.fromkeys(r["optimizer"] for r in grid_runs):
        vr = [r for r in grid_runs if r["optimizer"] == variant]
        lrs = sorted({r["hyperparameters"]["lr"] for r in vr})
        wds = sorted({r["hyperparameters"]["weight_decay"] for r in vr})
        cell = {(r["hyperparameters"]["lr"], r["hyperparameters"]["weight_decay"]): r for r in vr}
        matrix = [
            [
                cell[(lr, wd)]["final"]["val_loss"]
                if (lr, wd) in cell and cell[(lr, wd)]["status"] == "ok"
                else None
                for wd in wds
            ]
            for lr in lrs
        ]
        best = []
        for row in matrix:
            ok = [(v, wd) for v, wd in zip(row, wds) if v is not None]
            best.append(min(ok)[1] if ok else None)
        out[variant] = {
            "lrs": lrs,
            "weight_decays": wds,
            "val_loss": matrix,
            "best_weight_decay": best,
            "complete": len(cell) == len(lrs) * len(wds),
        }
    return out
