r"""``adamkit compare``: every optimizer on every task, lr swept, seeds repeated, claims checked.

For each task and optimizer (and, on the transformer, each schedule of the ablation):

1. sweep: one run per lr of the sweep (:func:`adamkit.bench.optimizers.lr_sweep`) on seed 0;
2. pick the lr with the lowest held-out (val split) loss among the runs that finished;
3. seeds: run seeds 1 .. n-1 at that lr. The row reports mean +- std over all seeds at the picked
   lr: final training objective, test-split metric, steps and seconds to the task's target.

A run is deterministic for a given seed on CPU (model init, minibatch order and dropout are
seeded; the data splits are fixed). A run that raises or whose training objective becomes
non-finite is recorded as failed with the reason, and the suite goes on. ``results.json`` is
rewritten atomically after every run, so an interrupted suite (Ctrl-C) leaves every finished run
readable; the report is then written from what finished and the command exits with 130.

One run is :func:`adamkit.bench.run.run_one`; the rows are :mod:`adamkit.bench.summary`; the
claims :mod:`adamkit.bench.claims`; the reports :mod:`adamkit.bench.report`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import adamkit
from adamkit.bench.claims import evaluate_claims
from adamkit.bench.optimizers import (
    DEFAULT_OPTIMIZERS,
    LR_RUNGS,
    OPTIMIZERS,
    QUICK_LR_RUNGS,
    OptimizerSpec,
    applies,
    lr_sweep,
    make_grid_optimizer,
)
from adamkit.bench.run import json_safe, run_one
from adamkit.bench.summary import best_lr, summarise, summarise_grid
from adamkit.bench.tasks import DECOUPLING_GRID, DEFAULT_TASKS, TASKS, Budget, Task

SCHEMA = "adamkit-compare/1"
RESULTS_FILE = "results.json"
DEFAULT_SEEDS = 3
QUICK_SEEDS = 2


@dataclass(frozen=True)
class CompareConfig:
    """What to run. ``seeds=None`` means 3 (2 with ``quick``); ``steps`` overrides every task's
    step budget; ``threads`` sets torch's intra-op threads on CPU for the duration (small models
    run fastest on one)."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    optimizers: tuple[str, ...] = DEFAULT_OPTIMIZERS
    seeds: int | None = None
    steps: int | None = None
    quick: bool = False
    device: str = "cpu"
    out: Path = Path("adamkit-compare")
    threads: int | None = 1

    @property
    def n_seeds(self) -> int:
        if self.seeds is not None:
            return self.seeds
        return QUICK_SEEDS if self.quick else DEFAULT_SEEDS

    def budget(self, task: Task) -> Budget:
        b = task.budget(self.quick)
        if self.steps is None:
            return b
        return Budget(self.steps, max(1, min(b.eval_every, self.steps)))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        d["seeds"] = self.n_seeds
        return d


# -------------------------------------------------------------------------------------------
# the plan: one job per (task, optimizer, schedule)


@dataclass
class Job:
    task: Task
    spec: OptimizerSpec
    schedule: str
    lrs: list[float]
    seeds: list[int]

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.task.name, self.spec.name, self.schedule)

    @property
    def n_runs(self) -> int:
        return len(self.lrs) + len(self.seeds) - 1


def plan(config: CompareConfig) -> list[Job]:
    """Every job of the suite, in run order (the decoupling grid is planned separately)."""
    jobs = []
    for task_name in config.tasks:
        if task_name not in TASKS:
            continue
        task = TASKS[task_name]
        seeds = list(range(config.n_seeds if task.stochastic else 1))
        for opt_name in config.optimizers:
            spec = OPTIMIZERS[opt_name]
            if not applies(spec, task):
                continue
            lrs = lr_sweep(task.base_lr[spec.family], config.quick)
            jobs.append(Job(task, spec, task.schedule, lrs, seeds))
            if opt_name in ("adam", "adamw"):
                for schedule in task.ablation:
                    jobs.append(Job(task, spec, schedule, lrs, seeds))
    return jobs


def grid_cells(config: CompareConfig) -> list[tuple[str, float, float]]:
    """(variant, lr, weight decay) of every cell of the decoupling grid, if it was asked for."""
    if DECOUPLING_GRID.name not in config.tasks:
        return []
    grid = DECOUPLING_GRID
    variants = grid.quick_variants if config.quick else grid.variants
    lrs = grid.quick_lrs if config.quick else grid.lrs
    return [(v.name, lr, wd) for v in variants for lr in lrs for wd in v.weight_decays]


def describe_budget(config: CompareConfig, jobs: list[Job]) -> list[str]:
    """Human-readable lines: runs and optimizer steps, per task and in total."""
    rungs = QUICK_LR_RUNGS if config.quick else LR_RUNGS
    shown = {-2: "base/10", -1: "base/3", 0: "base", 1: "3 x base", 2: "10 x base"}
    lines = [
        f"lr sweep: the same {len(rungs)} lrs per optimizer ("
        + ", ".join(shown.get(r, f"rung {r:+d}") for r in rungs)
        + " on the 1-3-10 ladder, base set per task and optimizer family); lr picked on the "
        f"val split with seed 0, then {config.n_seeds} seed(s) at the picked lr "
        "(1 on deterministic tasks)"
    ]
    total_runs = total_steps = 0
    for task_name in config.tasks:
        if task_name in TASKS:
            task_jobs = [j for j in jobs if j.task.name == task_name]
            runs = sum(j.n_runs for j in task_jobs)
            steps = runs * config.budget(TASKS[task_name]).steps
            skipped = [o for o in config.optimizers if not applies(OPTIMIZERS[o], TASKS[task_name])]
            note = f" (skips {', '.join(skipped)}: no full batch)" if skipped else ""
            lines.append(
                f"{task_name}: {len(task_jobs)} optimizer/schedule rows, {runs} runs x "
                f"{config.budget(TASKS[task_name]).steps} steps{note}"
            )
        elif task_name == DECOUPLING_GRID.name:
            cells = grid_cells(config)
            runs, steps = len(cells), len(cells) * DECOUPLING_GRID.budget(config.quick).steps
            if config.steps is not None:
                steps = len(cells) * config.steps
            lines.append(f"{task_name}: {runs} cells (lr x weight decay, 1 seed) on digits-mlp")
        else:  # pragma: no cover - names are validated by the CLI
            continue
        total_runs += runs
        total_steps += steps
    lines.append(f"total: {total_runs} runs, {total_steps:,} optimizer steps")
    return lines


# -------------------------------------------------------------------------------------------
# results.json


def machine_info(config: CompareConfig) -> dict[str, Any]:
    try:
        load = list(os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        load = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "adamkit": adamkit.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": config.device,
        "load_average_at_start": load,
    }


def task_info(config: CompareConfig) -> dict[str, Any]:
    info = {}
    for name in config.tasks:
        if name in TASKS:
            t = TASKS[name]
            info[name] = {
                "summary": t.summary,
                "source": t.source,
                "metric": t.metric,
                "higher_is_better": t.higher_is_better,
                "target_loss": t.target_loss,
                "steps": config.budget(t).steps,
                "schedule": t.schedule,
                "seeds": config.n_seeds if t.stochastic else 1,
            }
        elif name == DECOUPLING_GRID.name:
            g = DECOUPLING_GRID
            info[name] = {
                "summary": f"lr x weight decay grid on {g.base_task}, val loss per cell",
                "source": g.source,
                "metric": "val_loss",
                "higher_is_better": False,
                "steps": config.steps or g.budget(config.quick).steps,
                "schedule": "constant",
                "seeds": 1,
            }
    return info


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file next to ``path``, then rename over it (atomic on POSIX)."""
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)  # C encoder: fast
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


@dataclass
class Results:
    """Everything ``results.json`` holds; ``save()`` recomputes the summaries and claims."""

    config: CompareConfig
    budget: list[str]
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    runs: list[dict[str, Any]] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    finished: bool = False
    interrupted: bool = False
    plots: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        summary = summarise(self.runs)
        grid = summarise_grid(self.runs)
        return {
            "schema": SCHEMA,
            "started": self.started,
            "finished": self.finished,
            "interrupted": self.interrupted,
            "config": self.config.to_json(),
            "machine": self.machine,
            "budget": self.budget,
            "tasks": task_info(self.config),
            "runs": self.runs,  # each made JSON-safe when it was added
            "summary": json_safe(summary),
            "grid": json_safe(grid),
            "claims": evaluate_claims(
                self.config.tasks, self.config.optimizers, summary, self.runs, grid
            ),
            "plots": self.plots,
        }

    def add(self, record: dict[str, Any]) -> None:
        """Append a finished run (NaN and infinities become None) and save."""
        self.runs.append(json_safe(record))
        self.save()

    def save(self) -> dict[str, Any]:
        data = self.to_json()
        write_json_atomic(self.config.out / RESULTS_FILE, data)
        return data


# -------------------------------------------------------------------------------------------
# the suite


def _job_run(job: Job, config: CompareConfig, lr: float, seed: int, phase: str) -> dict:
    task, spec = job.task, job.spec
    record = run_one(
        task,
        spec.name,
        lambda params: spec.make(params, lr, task),
        lr_schedule=job.schedule,
        seed=seed,
        budget=config.budget(task),
        quick=config.quick,
        device=config.device,
        full_batch=spec.full_batch,
        phase=phase,
    )
    record["hyperparameters"].setdefault("lr", lr)  # also when the run failed before building
    return record


def iterate_runs(config: CompareConfig, jobs: list[Job]) -> Iterator[tuple[str, dict | None, int]]:
    """Yield ``(description, record, skipped)`` after every run, in order: each job's sweep,
    then its seeds at the picked lr, then the grid. ``record`` is None when a job's remaining
    runs are skipped (every sweep run failed); ``skipped`` counts them."""
    for job in jobs:
        label = f"{job.task.name} / {job.spec.name}"
        if job.schedule != job.task.schedule:
            label += f" ({job.schedule} lr)"
        sweep = []
        for lr in job.lrs:
            record = _job_run(job, config, lr, job.seeds[0], "sweep")
            sweep.append(record)
            yield f"{label} lr={lr:g}", record, 0
        lr = best_lr(sweep)
        if lr is None:
            yield f"{label}: every lr failed", None, len(job.seeds) - 1
            continue
        for seed in job.seeds[1:]:
            yield f"{label} lr={lr:g} seed={seed}", _job_run(job, config, lr, seed, "seed"), 0

    grid = DECOUPLING_GRID
    base = TASKS[grid.base_task]
    budget = grid.budget(config.quick)
    if config.steps is not None:
        budget = Budget(config.steps, config.steps)
    for variant, lr, wd in grid_cells(config):
        record = run_one(
            base,
            variant,
            lambda params, v=variant, lr=lr, wd=wd: make_grid_optimizer(v, params, lr, wd),
            lr_schedule="constant",
            seed=grid.seed,
            budget=budget,
            quick=config.quick,
            device=config.device,
            phase="grid",
        )
        record["task"] = grid.name
        record["hyperparameters"] = {
            "lr": lr,
            "weight_decay": wd,
            **record["hyperparameters"],
            "base_task": grid.base_task,
        }
        yield f"{grid.name} / {variant} lr={lr:g} wd={wd:g}", record, 0


def run_compare(config: CompareConfig, console: Any = None) -> int:
    """Run the suite, write ``results.json`` after every run and the reports at the end.

    Returns the exit status: 0, or 130 when interrupted (the partial results and reports are
    written first). ``console`` is a ``rich.console.Console`` (a new one when None).
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from adamkit.bench.report import summary_table, write_reports

    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file or a pipe: room for the whole table
            console = Console(width=160)
    config.out.mkdir(parents=True, exist_ok=True)
    jobs = plan(config)
    budget = describe_budget(config, jobs)
    console.print("[bold]adamkit compare[/bold]" + (" --quick" if config.quick else ""))
    for line in budget:
        console.print(f"  budget: {line}")

    old_threads = torch.get_num_threads()
    if config.threads is not None and config.device == "cpu":
        torch.set_num_threads(config.threads)
    # The Monitor logs each alert as a warning on the "adamkit" logger; here the alerts are
    # counted into the table and the report instead of interrupting the progress bar.
    adamkit_logger = logging.getLogger("adamkit")
    old_level = adamkit_logger.level
    adamkit_logger.setLevel(logging.ERROR)
    results = Results(config, budget, machine=machine_info(config))
    results.save()
    total = sum(j.n_runs for j in jobs) + len(grid_cells(config))
    status = 0
    wall_start = time.perf_counter()
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        ) as progress:
            bar = progress.add_task("starting", total=total)
            try:
                for description, record, skipped in iterate_runs(config, jobs):
                    if record is not None:
                        results.add(record)
                        if record["status"] != "ok":
                            console.print(f"  [red]failed[/red] {description}: {record['error']}")
                    progress.update(bar, advance=1 + skipped, description=description)
                results.finished = True
            except KeyboardInterrupt:
                results.interrupted = True
                status = 130
                console.print("[yellow]interrupted: writing the partial results[/yellow]")
    except KeyboardInterrupt:  # pragma: no cover - Ctrl-C while the progress bar closes
        results.interrupted = True
        status = 130
    finally:
        torch.set_num_threads(old_threads)
        adamkit_logger.setLevel(old_level)
    results.machine["suite_seconds"] = round(time.perf_counter() - wall_start, 3)
    try:
        results.machine["load_average_at_end"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    data = results.save()
    results.plots = write_reports(data, config.out)
    data = results.save()
    console.print(summary_table(data))
    for claim in data["claims"]:
        mark = {"reproduced": "[green]yes[/green]", "not reproduced": "[red]NO[/red]"}.get(
            claim["status"], "[dim]not run[/dim]"
        )
        console.print(f"  {mark}  {claim['claim']}: {claim['evidence']}")
    console.print(f"wrote {config.out}/ (report.md, report.html, results.json, plots)")
    return status
