"""One run of ``adamkit compare``: seed, build, train with the Monitor attached, evaluate.

:func:`run_one` returns a JSON-ready record and never raises except ``KeyboardInterrupt``: an
exception or a non-finite training objective makes the run ``"failed"`` with the reason. The
curve logs the training objective at step 0 and every ``eval_every`` steps with the training
seconds so far (forward, backward, optimizer and scheduler steps; evaluation excluded).
"""

from __future__ import annotations

import math
import os
import random
import time
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer

import adamkit
from adamkit.bench.tasks import Budget, Problem, Task

# The Monitor samples every 100th step: a sampled step costs far more than a plain one, and the
# seconds to target of every optimizer include it, so it must stay a small part of each run.
MONITOR_EVERY = 100


class Diverged(RuntimeError):
    """The training objective became NaN or infinite."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class AlertSummary:
    """``adamkit.Monitor`` on one run's optimizer, when adamkit has one, and its alert summary.

    ``observe(loss)`` feeds the step's loss (between backward and step); ``close()`` detaches
    the Monitor and returns ``{"monitor": bool, "count": n, "by_name": {name: n},
    "first_step": {name: step}}``, with a ``"note"`` saying why when no Monitor was attached.
    """

    def __init__(self, optimizer: Optimizer, named_params: list[tuple[str, torch.Tensor]]):
        self.monitor: Any = None
        self.note: str | None = None
        monitor_cls = getattr(adamkit, "Monitor", None)
        if monitor_cls is None:
            self.note = "adamkit.Monitor is not available in this version"
            return
        try:
            self.monitor = monitor_cls(
                optimizer, names=named_params, every=MONITOR_EVERY, sinks=(), alerts=True
            )
        except Exception as e:  # the run goes on unmonitored, and says so
            self.note = f"Monitor could not be attached: {type(e).__name__}: {e}"

    def observe(self, loss: torch.Tensor) -> None:
        if self.monitor is not None:
            self.monitor.observe(loss=loss.detach())

    def close(self) -> dict[str, Any]:
        if self.monitor is None:
            return {
                "monitor": False,
                "count": 0,
                "by_name": {},
                "first_step": {},
                "note": self.note,
            }
        self.monitor.close()
        alerts = list(self.monitor.alerts)
        by_name = Counter(str(a.name) for a in alerts)
        first: dict[str, int] = {}
        for a in alerts:
            first.setdefault(str(a.name), int(getattr(a, "step", -1)))
        return {
            "monitor": True,
            "count": len(alerts),
            "by_name": dict(sorted(by_name.items())),
            "first_step": dict(sorted(first.items())),
        }


def _make_scheduler(optimizer: Optimizer, schedule: str, steps: int) -> Any:
    if schedule == "constant":
        return None
    if schedule == "warmup_cosine":
        warmup = max(1, steps // 10)
        curve = adamkit.schedules.warmup_cosine(warmup, steps, min_ratio=0.1)
        return adamkit.Scheduler(optimizer, curve)
    raise ValueError(f"unknown schedule {schedule!r}")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _short(x: float) -> float:
    """7 significant digits: curves stay exact enough and results.json stays small."""
    return float(f"{x:.7g}")


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def train(
    problem: Problem,
    optimizer: Optimizer,
    scheduler: Any,
    budget: Budget,
    device: str,
    monitor: AlertSummary | None = None,
) -> tuple[dict[str, list[float]], float]:
    """Run ``budget.steps`` steps; return the curve and the training seconds.

    The curve logs, at step 0 and every ``eval_every`` steps, the training objective, the
    training seconds so far and the problem's probe values. Raises :class:`Diverged` when the
    objective is not finite (the curve so far is attached as ``error.curve``).
    """
    curve: dict[str, list[float]] = {"step": [], "train_loss": [], "seconds": []}

    def log(step: int, seconds: float) -> None:
        objective = problem.objective()
        curve["step"].append(step)
        curve["train_loss"].append(_short(objective))
        curve["seconds"].append(round(seconds, 6))
        if problem.probe is not None:
            for k, v in problem.probe().items():
                curve.setdefault(k, []).append(_short(v))
        if not math.isfinite(objective):
            error = Diverged(f"training objective is {objective} at step {step}")
            error.curve = curve  # type: ignore[attr-defined]
            raise error

    seconds = 0.0
    log(0, seconds)
    for step in range(budget.steps):
        _sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = problem.loss(step)
        loss.backward()
        if monitor is not None:
            monitor.observe(loss)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if problem.project_ is not None:
            problem.project_()
        _sync(device)
        seconds += time.perf_counter() - start
        if (step + 1) % budget.eval_every == 0 or step + 1 == budget.steps:
            log(step + 1, seconds)
    return curve, seconds


def to_target(curve: dict[str, list[float]], target: float) -> tuple[int | None, float | None]:
    """Steps and training seconds at the first logged point with objective <= ``target``."""
    for step, loss, seconds in zip(curve["step"], curve["train_loss"], curve["seconds"]):
        if loss <= target:
            return step, seconds
    return None, None


def run_one(
    task: Task,
    spec_name: str,
    make: Callable[[list[torch.Tensor]], tuple[Optimizer, dict[str, Any]]],
    *,
    lr_schedule: str,
    seed: int,
    budget: Budget,
    quick: bool = False,
    device: str = "cpu",
    full_batch: bool = False,
    phase: str = "sweep",
    monitored: bool = True,
) -> dict[str, Any]:
    """One seeded run; never raises except KeyboardInterrupt. Returns the run's record.

    When the exception that ended a run came from the Monitor (adamkit.diagnostics), the run
    is repeated without it, so that a diagnostics bug is not reported as an optimizer failure;
    the alert summary then says so in its ``note``.
    """
    wall_start = time.perf_counter()
    record: dict[str, Any] = {
        "task": task.name,
        "optimizer": spec_name,
        "schedule": lr_schedule,
        "phase": phase,
        "seed": seed,
        "hyperparameters": {},
        "steps": budget.steps,
        "status": "ok",
        "error": None,
        "curve": {"step": [], "train_loss": [], "seconds": []},
        "final": None,
        "steps_to_target": None,
        "seconds_to_target": None,
        "seconds": None,
        "wall_seconds": None,
        "alerts": {"monitor": False, "count": 0, "by_name": {}, "note": "not attached"},
    }
    monitor: AlertSummary | None = None
    try:
        seed_everything(seed)
        problem = task.build(seed, full_batch=full_batch, quick=quick, device=device)
        optimizer, hyperparameters = make([p for _, p in problem.params])
        record["hyperparameters"] = hyperparameters
        scheduler = _make_scheduler(optimizer, lr_schedule, budget.steps)
        monitor = AlertSummary(optimizer, problem.params) if monitored else None
        curve, seconds = train(problem, optimizer, scheduler, budget, device, monitor)
        record["curve"], record["seconds"] = curve, round(seconds, 6)
        val, test = problem.heldout("val"), problem.heldout("test")
        record["final"] = {
            "train_loss": curve["train_loss"][-1],
            "val_loss": _finite_or_none(val["loss"]),
            "val_metric": _finite_or_none(val[task.metric]),
            "test_loss": _finite_or_none(test["loss"]),
            "test_metric": _finite_or_none(test[task.metric]),
        }
        if record["final"]["val_loss"] is None:
            raise Diverged("held-out loss is not finite")
        record["steps_to_target"], record["seconds_to_target"] = to_target(curve, task.target_loss)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a failed run is a result, not a crash
        if monitor is not None and monitor.monitor is not None and _raised_in_monitor(e):
            monitor.close()
            retry = run_one(
                task,
                spec_name,
                make,
                lr_schedule=lr_schedule,
                seed=seed,
                budget=budget,
                quick=quick,
                device=device,
                full_batch=full_batch,
                phase=phase,
                monitored=False,
            )
            retry["alerts"]["note"] = (
                f"the Monitor raised {type(e).__name__}: {e}; the run was repeated without it"
            )
            return retry
        record["status"] = "failed"
        record["error"] = str(e) if isinstance(e, Diverged) else f"{type(e).__name__}: {e}"
        if isinstance(e, Diverged) and hasattr(e, "curve"):
            record["curve"] = json_safe(e.curve)
        if not isinstance(e, Diverged):
            record["traceback"] = traceback.format_exc(limit=6)
        record["final"] = None
    finally:
        if monitor is not None:
            try:
                record["alerts"] = monitor.close()
            except Exception as e:  # the summary must never lose the run
                record["alerts"] = {"monitor": False, "count": 0, "by_name": {}, "note": str(e)}
        record["wall_seconds"] = round(time.perf_counter() - wall_start, 6)
    return record


def _raised_in_monitor(error: BaseException) -> bool:
    """Whether the innermost adamkit frame of the traceback is in adamkit.diagnostics."""
    frames = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(error.__traceback__)]
    ours = [f for f in frames if f"{os.sep}adamkit{os.sep}" in f]
    return bool(ours) and f"{os.sep}diagnostics{os.sep}" in ours[-1]


def json_safe(x: Any) -> Any:
    """NaN and infinities become None (JSON has no NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x
