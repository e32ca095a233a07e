"""What the papers claim, checked against a ``compare`` run, with the numbers as evidence.

Every claim is always reported: ``{"claim", "source", "reproduced", "status", "evidence"}`` with
``status`` one of ``"reproduced"``, ``"not reproduced"`` or ``"not run"`` (its task or one of
its optimizers was not selected, or the suite was interrupted before it); ``reproduced`` is True
only for ``"reproduced"``. The rules are deliberately simple and written out in each function.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from adamkit.bench.optimizers import OPTIMIZERS
from adamkit.bench.tasks import DECOUPLING_GRID, TASKS

Row = dict[str, Any]
Rows = list[Row]
Names = tuple[str, ...]
Grid = dict[str, Any] | None


def _claim(claim: str, source: str, status: str, evidence: str) -> dict[str, Any]:
    return {
        "claim": claim,
        "source": source,
        "reproduced": status == "reproduced",
        "status": status,
        "evidence": evidence,
    }


def _g(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _pm(stat: dict[str, float | None]) -> str:
    if stat["mean"] is None:
        return "n/a"
    if stat.get("n", 2) == 1:
        return f"{stat['mean']:.3g}"
    return f"{stat['mean']:.3g} ± {stat['std']:.1g}"


def _find(rows: list[Row], task: str, optimizer: str, schedule: str | None = None) -> Row | None:
    for r in rows:
        if r["task"] == task and r["optimizer"] == optimizer:
            if schedule is None or r["schedule"] == schedule:
                return r
    return None


def _missing(
    tasks: Iterable[str], optimizers: Iterable[str], task: str, needed: Iterable[str]
) -> str | None:
    """Why a claim could not be checked, or None when its task and optimizers were selected."""
    if task not in tasks:
        return f"{task} was not run (select it with --tasks {task})"
    absent = [o for o in needed if o not in optimizers]
    if absent:
        return f"{', '.join(absent)} not selected (--optimizers)"
    return None


def _train_tuned(runs: list[dict[str, Any]], task: str, optimizer: str) -> dict | None:
    """The seed-0 sweep run with the lowest final training objective (the smallest lr on ties);
    None when no sweep run of this optimizer finished."""
    ok = [
        r
        for r in runs
        if r["task"] == task
        and r["optimizer"] == optimizer
        and r["phase"] == "sweep"
        and r["status"] == "ok"
    ]
    if not ok:
        return None
    return min(ok, key=lambda r: (r["final"]["train_loss"], r["hyperparameters"]["lr"]))


def _ran(runs: list[dict[str, Any]], task: str, optimizer: str) -> bool:
    return any(r["task"] == task and r["optimizer"] == optimizer for r in runs)


def _steps(run: dict | None) -> float:
    if run is None or run["steps_to_target"] is None:
        return math.inf
    return float(run["steps_to_target"])


def _loss(run: dict | None) -> float:
    return math.inf if run is None else run["final"]["train_loss"]


def _at(run: dict | None) -> str:
    return "every lr failed" if run is None else f"lr {run['hyperparameters']['lr']:g}"


TUNED = (
    "Each optimizer at the lr of its sweep with the lowest final training loss (seed 0), "
    "as the paper compares tuned training-cost curves"
)


def claim_logreg(tasks: Names, optimizers: Names, rows: Rows, runs: Rows, grid: Grid) -> Row:
    """Adam reaches the task's target training loss in no more steps than SGD-Nesterov, each
    at its training-loss-tuned lr; when neither reaches it, the lower final loss wins."""
    text = "Adam converges at least as fast as SGD with Nesterov momentum on logistic regression"
    source = "Kingma & Ba 2015, Sec. 6.1, Fig. 1"
    task = "digits-logreg"
    why = _missing(tasks, optimizers, task, ("adam", "sgd-nesterov"))
    if why is None and not (_ran(runs, task, "adam") and _ran(runs, task, "sgd-nesterov")):
        why = "the suite stopped before these runs"
    if why:
        return _claim(text, source, "not run", why)
    adam, nesterov = _train_tuned(runs, task, "adam"), _train_tuned(runs, task, "sgd-nesterov")
    a_steps, n_steps = _steps(adam), _steps(nesterov)
    if math.isinf(a_steps) and math.isinf(n_steps):
        ok = adam is not None and _loss(adam) <= _loss(nesterov)
        rule = "neither reached the target, so the final training losses were compared"
    else:
        ok = a_steps <= n_steps
        rule = "steps to target compared"

    def shown(x: float) -> str:
        return "not reached" if math.isinf(x) else f"{x:.0f}"

    evidence = (
        f"{TUNED}: steps to training loss <= {TASKS[task].target_loss:g}: "
        f"Adam {shown(a_steps)} ({_at(adam)}), SGD-Nesterov {shown(n_steps)} ({_at(nesterov)}); "
        f"final training loss {_g(_loss(adam))} vs {_g(_loss(nesterov))}; {rule}"
    )
    return _claim(text, source, "reproduced" if ok else "not reproduced", evidence)


def claim_mlp(tasks: Names, optimizers: Names, rows: Rows, runs: Rows, grid: Grid) -> Row:
    """Adam's final training objective (eval mode), at its training-loss-tuned lr, is below
    every non-Adam optimizer's (SGD, momentum, Nesterov, RMSprop, Adagrad, full-batch GD)."""
    text = "Adam converges best (lowest training loss) on the multilayer network with dropout"
    source = "Kingma & Ba 2015, Sec. 6.2, Fig. 2a"
    task = "digits-mlp"
    baselines = [o for o in optimizers if not OPTIMIZERS[o].adam_family]
    why = _missing(tasks, optimizers, task, ("adam",))
    if why is None and not baselines:
        why = "no non-Adam optimizer selected to compare with"
    ran = [o for o in baselines if _ran(runs, task, o)]
    if why is None and not (_ran(runs, task, "adam") and ran):
        why = "the suite stopped before these runs"
    if why:
        return _claim(text, source, "not run", why)
    adam = _train_tuned(runs, task, "adam")
    others = {o: _train_tuned(runs, task, o) for o in ran}
    ok = adam is not None and all(_loss(adam) < _loss(r) for r in others.values())
    ranked = sorted(others.items(), key=lambda kv: _loss(kv[1]))
    evidence = (
        f"{TUNED}: final training loss (eval mode) Adam {_g(_loss(adam))} ({_at(adam)}); "
        + ", ".join(f"{o} {_g(_loss(r))} ({_at(r)})" for o, r in ranked)
    )
    return _claim(text, source, "reproduced" if ok else "not reproduced", evidence)


def claim_counterexample(
    tasks: Names, optimizers: Names, rows: Rows, runs: Rows, grid: Grid
) -> Row:
    """At every swept lr Adam ends at x > 0 and AMSGrad at x < 0, and at one lr at least they
    reach the ends: Adam x >= 0.9, AMSGrad x <= -0.9."""
    text = "On the online counterexample Adam goes to the worst point x = +1, AMSGrad to x = -1"
    source = "Reddi, Kale & Kumar 2018, Sec. 3 (Theorem 1)"
    task = "amsgrad-counterexample"
    why = _missing(tasks, optimizers, task, ("adam", "amsgrad"))

    def final_x(optimizer: str) -> dict[float, float | None]:
        return {
            r["hyperparameters"]["lr"]: (r["final"] or {}).get("val_metric")
            for r in runs
            if r["task"] == task and r["optimizer"] == optimizer and r["phase"] == "sweep"
        }

    adam, ams = final_x("adam"), final_x("amsgrad")
    lrs = sorted(set(adam) & set(ams))
    if why or not lrs:
        return _claim(text, source, "not run", why or "the suite stopped before these runs")
    pairs = [(lr, adam[lr], ams[lr]) for lr in lrs]
    signs = all(a is not None and m is not None and a > 0 > m for _, a, m in pairs)
    ends = any(a is not None and m is not None and a >= 0.9 and m <= -0.9 for _, a, m in pairs)
    steps = next(r["steps"] for r in runs if r["task"] == task)
    evidence = f"Final x after {steps} steps, betas (0, 0.1), x clamped to [-1, 1]: " + "; ".join(
        f"lr {lr:g}: Adam {_signed(a)}, AMSGrad {_signed(m)}" for lr, a, m in pairs
    )
    return _claim(text, source, "reproduced" if signs and ends else "not reproduced", evidence)


def _signed(x: float | None) -> str:
    return "failed" if x is None else f"{x:+.3f}"


def _spread(best: list[float | None]) -> float | None:
    """log10(max / min) of the best weight decays over the lrs (decades)."""
    values = [b for b in best if b is not None]
    if not values:
        return None
    return math.log10(max(values) / min(values))


def claim_decoupling(tasks: Names, optimizers: Names, rows: Rows, runs: Rows, grid: Grid) -> Row:
    """AdamW's best weight decay (lowest val loss per lr) moves by at most one grid step across
    the lrs, and by less than Adam + L2's."""
    text = (
        "Decoupled weight decay: AdamW's best weight decay stays put as the lr changes, "
        "Adam + L2's moves"
    )
    source = "Loshchilov & Hutter 2019, Sec. 4.1, Fig. 2"
    name = DECOUPLING_GRID.name
    if name not in tasks:
        return _claim(text, source, "not run", f"{name} is opt-in (add it with --tasks {name})")
    if not grid or "adamw" not in grid or "adam-l2" not in grid:
        return _claim(text, source, "not run", "the suite stopped before the grid finished")
    w, l2 = grid["adamw"], grid["adam-l2"]
    wds = w["weight_decays"]
    step = min(math.log10(b / a) for a, b in zip(wds, wds[1:])) if len(wds) > 1 else 0.0
    s_w, s_l2 = _spread(w["best_weight_decay"]), _spread(l2["best_weight_decay"])
    ok = s_w is not None and s_l2 is not None and s_w <= step + 1e-9 and s_w < s_l2

    def best(g: dict[str, Any]) -> str:
        return ", ".join(f"lr {lr:g} -> {_g(b)}" for lr, b in zip(g["lrs"], g["best_weight_decay"]))

    evidence = (
        f"Best wd per lr (val loss): AdamW (paper's decay) {best(w)}, spread {_g(s_w)} decades; "
        f"Adam + L2 {best(l2)}, spread {_g(s_l2)} decades"
    )
    if "adamw-torch" in grid:
        t = grid["adamw-torch"]
        evidence += f"; for reference, AdamW with torch's lr x wd: {best(t)}"
        evidence += f", spread {_g(_spread(t['best_weight_decay']))} decades"
    if not (w["complete"] and l2["complete"]):
        evidence += " (grid incomplete: some cells failed or did not run)"
    return _claim(text, source, "reproduced" if ok else "not reproduced", evidence)


def claim_schedule(tasks: Names, optimizers: Names, rows: Rows, runs: Rows, grid: Grid) -> Row:
    """The test bits/char of AdamW (else Adam) on warmup + cosine, mean over seeds at its best
    lr, is lower than on a constant lr at its own best lr."""
    text = "Warmup + cosine decay beats a constant lr on the transformer"
    source = "Goyal et al. 2017 (warmup), Loshchilov & Hutter 2017 (cosine); the LLM recipe"
    task = "char-transformer"
    opt = "adamw" if "adamw" in optimizers else "adam"
    why = _missing(tasks, optimizers, task, (opt,))
    cosine = _find(rows, task, opt, "warmup_cosine")
    const = _find(rows, task, opt, "constant")
    if why or cosine is None or const is None:
        return _claim(text, source, "not run", why or "the suite stopped before these runs")

    def bpc(r: Row) -> float:
        m = r["test_metric"]["mean"]
        return math.inf if r["status"] != "ok" or m is None else m

    ok = bpc(cosine) < bpc(const)
    evidence = (
        f"{opt}: test bits/char (mean ± std over seeds, each schedule at its own val-picked lr): "
        f"warmup + cosine {_pm(cosine['test_metric'])} (lr {_g(cosine['best_lr'])}) vs "
        f"constant {_pm(const['test_metric'])} (lr {_g(const['best_lr'])})"
    )
    spread = max(cosine["test_metric"]["std"] or 0.0, const["test_metric"]["std"] or 0.0)
    if ok and bpc(const) - bpc(cosine) < spread:
        evidence += f"; the gap is within the seed-to-seed spread ({spread:.2g})"
    sweep = {
        (r["schedule"], r["hyperparameters"]["lr"]): (r["final"] or {}).get("val_loss")
        for r in runs
        if r["task"] == task and r["optimizer"] == opt and r["phase"] == "sweep"
    }
    lrs = sorted({lr for _, lr in sweep})
    per_lr = [
        f"lr {lr:g}: {_g(sweep.get(('warmup_cosine', lr)))} vs {_g(sweep.get(('constant', lr)))}"
        for lr in lrs
    ]
    if per_lr:
        evidence += "; val loss per lr (seed 0), cosine vs constant: " + ", ".join(per_lr)
    return _claim(text, source, "reproduced" if ok else "not reproduced", evidence)


CLAIMS = (claim_logreg, claim_mlp, claim_counterexample, claim_decoupling, claim_schedule)


def evaluate_claims(
    tasks: Iterable[str],
    optimizers: Iterable[str],
    rows: list[Row],
    runs: list[dict[str, Any]],
    grid: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """Every claim of :data:`CLAIMS`, in order, checked on these results."""
    tasks, optimizers = tuple(tasks), tuple(optimizers)
    return [check(tasks, optimizers, rows, runs, grid) for check in CLAIMS]
