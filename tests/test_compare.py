"""``adamkit compare`` end to end: output files and their schema, determinism, failed runs,
Ctrl-C, the Monitor's alert summary, the claims and the CLI."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import types
from html import escape as html_escape
from pathlib import Path

import pytest
import torch

import adamkit
from adamkit import cli
from adamkit.bench import compare as C
from adamkit.bench.claims import evaluate_claims
from adamkit.bench.optimizers import OPTIMIZERS, OptimizerSpec
from adamkit.bench.tasks import DEFAULT_TASKS, TASKS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_KEYS = {
    "task", "optimizer", "schedule", "phase", "seed", "hyperparameters", "steps", "status",
    "error", "curve", "final", "steps_to_target", "seconds_to_target", "seconds",
    "wall_seconds", "alerts",
}  # fmt: skip
FINAL_KEYS = {"train_loss", "val_loss", "val_metric", "test_loss", "test_metric"}
CLAIM_KEYS = {"claim", "source", "reproduced", "status", "evidence"}


def _compare(tmp_path: Path, *args: str) -> tuple[int, dict]:
    """Run ``adamkit compare`` in-process into tmp_path; return the status and results.json."""
    status = cli.main(["compare", "--out", str(tmp_path), *args])
    return status, json.loads((tmp_path / "results.json").read_text())


def _check_schema(data: dict, out: Path) -> None:
    assert data["schema"] == "adamkit-compare/1"
    for key in ("config", "machine", "budget", "tasks", "runs", "summary", "claims", "plots"):
        assert key in data
    for run in data["runs"]:
        assert RUN_KEYS <= set(run), RUN_KEYS - set(run)
        assert run["status"] in ("ok", "failed")
        assert "lr" in run["hyperparameters"]
        curve = run["curve"]
        assert len(curve["step"]) == len(curve["train_loss"]) == len(curve["seconds"])
        assert {"monitor", "count", "by_name"} <= set(run["alerts"])
        if run["status"] == "ok":
            assert set(run["final"]) == FINAL_KEYS
            assert curve["step"][0] == 0 and curve["step"][-1] == run["steps"]
            assert run["seconds"] > 0 and run["wall_seconds"] >= run["seconds"]
            assert run["error"] is None
        else:
            assert run["final"] is None and run["error"]
    assert len(data["claims"]) == 5
    for claim in data["claims"]:
        assert set(claim) == CLAIM_KEYS
        assert isinstance(claim["reproduced"], bool)
        assert claim["reproduced"] == (claim["status"] == "reproduced")
        assert claim["status"] in ("reproduced", "not reproduced", "not run")
        assert isinstance(claim["evidence"], str) and claim["evidence"]
    for name in data["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    claims_at = md.index("## Claims")
    assert claims_at > md.index("## Failed runs")  # the report ends with the checklist
    for claim in data["claims"]:
        assert claim["claim"] in md[claims_at:]
        assert claim["evidence"] in md[claims_at:]
        assert html_escape(claim["claim"]) in html
    sources = re.findall(r'src="([^"]*)"', html)
    assert len(sources) == len(data["plots"])
    assert all(s.startswith("data:image/png;base64,") for s in sources)  # self-contained
    assert "href=" not in html and "<link" not in html
    assert not list(out.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# the whole --quick suite, once, as a user runs it


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``adamkit compare --quick`` in-process (the console output captured), shared below."""
    out = tmp_path_factory.mktemp("quick")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = cli.main(["compare", "--quick", "--out", str(out)])
    return status, stdout.getvalue(), out, json.loads((out / "results.json").read_text())


def test_python_dash_m_adamkit_runs_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "adamkit", "--version"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"adamkit {adamkit.__version__}"


def test_quick_suite_writes_every_output(quick_run):
    status, stdout, out, data = quick_run
    assert status == 0, stdout[-2000:]
    _check_schema(data, out)
    assert data["finished"] and not data["interrupted"]
    assert tuple(data["tasks"]) == DEFAULT_TASKS
    expected_plots = (
        {f"{t}-curves.png" for t in DEFAULT_TASKS}
        | {f"{t}-lr-sweep.png" for t in DEFAULT_TASKS}
        | {"rosenbrock-trajectories.png"}
    )
    assert set(data["plots"]) == expected_plots
    # one row per task x optimizer (gd only where a full batch exists), plus the ablation
    rows = {(r["task"], r["optimizer"], r["schedule"]) for r in data["summary"]}
    for task in DEFAULT_TASKS:
        for opt in OPTIMIZERS:
            wanted = opt != "gd" or TASKS[task].full_batch
            assert ((task, opt, TASKS[task].schedule) in rows) == wanted
    assert ("char-transformer", "adamw", "constant") in rows
    # the budget is printed, the rich table and the claims too
    assert "budget: total:" in stdout and "optimizer steps" in stdout
    assert "adamkit compare" in stdout and "steps to target" in stdout
    # 3 lrs per optimizer, 2 seeds on stochastic tasks, 1 on deterministic ones
    sweep = [r for r in data["runs"] if r["task"] == "digits-logreg" and r["optimizer"] == "sgd"]
    assert sorted(r["seed"] for r in sweep) == [0, 0, 0, 1]
    assert len({r["hyperparameters"]["lr"] for r in sweep}) == 3
    rosen = [r for r in data["runs"] if r["task"] == "rosenbrock" and r["optimizer"] == "adam"]
    assert [r["seed"] for r in rosen] == [0, 0, 0]


def test_quick_suite_reproduces_the_deterministic_counterexample(quick_run):
    *_, data = quick_run
    claim = next(c for c in data["claims"] if "counterexample" in c["claim"])
    assert claim["reproduced"], claim["evidence"]
    ends = {
        r["optimizer"]: r["final"]["val_metric"]
        for r in data["runs"]
        if r["task"] == "amsgrad-counterexample" and r["hyperparameters"]["lr"] == 0.03
    }
    assert ends["adam"] > 0.9 and ends["amsgrad"] < -0.9
    assert next(c for c in data["claims"] if "weight decay" in c["claim"])["status"] == "not run"


def test_quick_suite_picks_the_lr_with_the_lowest_val_loss(quick_run):
    *_, data = quick_run
    for row in data["summary"]:
        sweep = [
            r for r in data["runs"]
            if (r["task"], r["optimizer"], r["schedule"], r["phase"])
            == (row["task"], row["optimizer"], row["schedule"], "sweep") and r["status"] == "ok"
        ]  # fmt: skip
        if sweep:
            best = min(sweep, key=lambda r: r["final"]["val_loss"])
            assert row["best_lr"] == best["hyperparameters"]["lr"]


# ---------------------------------------------------------------------------------------------
# small suites


FAST = ("--tasks", "rosenbrock,digits-logreg", "--steps", "12", "--seeds", "2")


def test_runs_are_deterministic_for_a_seed(tmp_path):
    _, a = _compare(tmp_path / "a", *FAST, "--optimizers", "adam,sgd-momentum")
    _, b = _compare(tmp_path / "b", *FAST, "--optimizers", "adam,sgd-momentum")
    assert len(a["runs"]) == len(b["runs"]) == 2 * (4 + 1) + 2 * 4
    for ra, rb in zip(a["runs"], b["runs"], strict=True):
        assert ra["curve"]["train_loss"] == rb["curve"]["train_loss"]
        assert ra["final"] == rb["final"]
    seeds = [r for r in a["runs"] if r["task"] == "digits-logreg" and r["optimizer"] == "adam"]
    assert seeds[-1]["seed"] == 1 and seeds[-1]["final"] != seeds[0]["final"]


def _boom(params, lr, task):
    raise RuntimeError("boom: this optimizer cannot be built")


def _explode(params, lr, task):
    return torch.optim.SGD(params, lr=1e6), {"lr": lr, "note": "lr x 1e6"}


def test_failed_runs_are_reported_and_do_not_stop_the_suite(tmp_path, monkeypatch):
    monkeypatch.setitem(OPTIMIZERS, "boom", OptimizerSpec("boom", "raises", "sgd", _boom))
    monkeypatch.setitem(OPTIMIZERS, "nan", OptimizerSpec("nan", "diverges", "sgd", _explode))
    status, data = _compare(tmp_path, *FAST, "--optimizers", "boom,nan,adam")
    assert status == 0 and data["finished"]
    _check_schema(data, tmp_path)
    by_opt = {}
    for r in data["runs"]:
        by_opt.setdefault(r["optimizer"], []).append(r)
    # every lr of the sweep ran and failed, the seeds were skipped
    assert len(by_opt["boom"]) == 4 + 4 and all(r["status"] == "failed" for r in by_opt["boom"])
    assert "RuntimeError: boom" in by_opt["boom"][0]["error"]
    assert "traceback" in by_opt["boom"][0]
    assert all(r["status"] == "failed" for r in by_opt["nan"])
    assert any("not finite" in r["error"] or "nan" in r["error"] for r in by_opt["nan"])
    assert all(r["status"] == "ok" for r in by_opt["adam"])
    rows = {(r["task"], r["optimizer"]): r for r in data["summary"]}
    assert rows[("rosenbrock", "boom")]["status"] == "failed"
    assert rows[("rosenbrock", "boom")]["failed"] == 4
    assert rows[("rosenbrock", "adam")]["status"] == "ok"
    md = (tmp_path / "report.md").read_text()
    assert "FAILED" in md and "boom: this optimizer cannot be built" in md


def test_ctrl_c_leaves_readable_partial_results(tmp_path, monkeypatch):
    real_run_one = C.run_one
    calls = {"n": 0}

    def interrupt_on_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_run_one(*args, **kwargs)

    monkeypatch.setattr(C, "run_one", interrupt_on_fourth)
    status, data = _compare(tmp_path, *FAST, "--optimizers", "adam,sgd")
    assert status == 130
    assert data["interrupted"] and not data["finished"]
    assert len(data["runs"]) == 3
    _check_schema(data, tmp_path)
    assert "INTERRUPTED" in (tmp_path / "report.md").read_text()


def test_results_are_rewritten_after_every_run(tmp_path, monkeypatch):
    seen = []
    real_run_one = C.run_one

    def spy(*args, **kwargs):
        path = tmp_path / "results.json"
        seen.append(len(json.loads(path.read_text())["runs"]))
        return real_run_one(*args, **kwargs)

    monkeypatch.setattr(C, "run_one", spy)
    _compare(tmp_path, "--tasks", "rosenbrock", "--steps", "5", "--optimizers", "adam,sgd")
    assert seen == list(range(len(seen))) and len(seen) == 8


class _FakeAlert:
    def __init__(self, name: str, step: int) -> None:
        self.name, self.step = name, step


class _FakeMonitor:
    """Raises one 'loss_spike' alert on every 5th observed loss."""

    def __init__(self, optimizer, *, names, every, sinks, alerts):
        assert isinstance(optimizer, torch.optim.Optimizer) and alerts is True
        assert all(isinstance(n, str) for n, _ in names)
        self.alerts, self.seen, self.closed = [], 0, False

    def observe(self, *, loss):
        self.seen += 1
        if self.seen % 5 == 0:
            self.alerts.append(_FakeAlert("loss_spike", self.seen))

    def close(self):
        self.closed = True


def test_alert_summary_comes_from_the_monitor(tmp_path, monkeypatch):
    monkeypatch.setattr(adamkit, "Monitor", _FakeMonitor, raising=False)
    _, data = _compare(tmp_path, "--tasks", "rosenbrock", "--steps", "12",
                       "--optimizers", "adam,rmsprop")  # fmt: skip
    for r in data["runs"]:
        assert r["alerts"] == {
            "monitor": True, "count": 2, "by_name": {"loss_spike": 2},
            "first_step": {"loss_spike": 5},
        }  # fmt: skip
    row = data["summary"][0]
    assert row["monitored"] and row["alerts"] == {"count": 2, "by_name": {"loss_spike": 2}}
    assert "loss_spike x2" in (tmp_path / "report.md").read_text()


def test_a_monitor_that_raises_does_not_fail_the_run(tmp_path, monkeypatch):
    # code that looks, to the traceback, as if it lived in adamkit/diagnostics
    namespace: dict = {}
    fake_file = os.path.join(os.sep, "x", "adamkit", "diagnostics", "fake.py")
    exec(compile("def hook(*args):\n    raise ValueError('bad signal')\n", fake_file, "exec"),
         namespace)  # fmt: skip

    class RaisingMonitor(_FakeMonitor):
        def __init__(self, optimizer, **kwargs):
            super().__init__(optimizer, **kwargs)
            self.handle = optimizer.register_step_post_hook(namespace["hook"])

        def close(self):
            self.handle.remove()

    monkeypatch.setattr(adamkit, "Monitor", RaisingMonitor, raising=False)
    _, data = _compare(tmp_path, "--tasks", "rosenbrock", "--steps", "5", "--optimizers", "adam")
    for r in data["runs"]:
        assert r["status"] == "ok"
        assert r["alerts"]["monitor"] is False
        assert "the Monitor raised ValueError: bad signal" in r["alerts"]["note"]


def test_without_a_monitor_the_summary_says_so(tmp_path, monkeypatch):
    monkeypatch.delattr(adamkit, "Monitor", raising=False)
    _, data = _compare(tmp_path, "--tasks", "rosenbrock", "--steps", "5", "--optimizers", "adam")
    alerts = data["runs"][0]["alerts"]
    assert alerts["monitor"] is False and alerts["count"] == 0 and "not available" in alerts["note"]
    assert "| n/a |" in (tmp_path / "report.md").read_text()


def test_the_real_monitor_attaches_to_every_optimizer(tmp_path, monkeypatch):
    import adamkit.diagnostics as diagnostics

    monkeypatch.setattr(adamkit, "Monitor", diagnostics.Monitor, raising=False)
    _, data = _compare(tmp_path, "--tasks", "digits-logreg", "--steps", "20", "--seeds", "1")
    assert {r["optimizer"] for r in data["runs"]} == set(OPTIMIZERS)
    for r in data["runs"]:
        assert r["status"] == "ok", r["error"]
        assert r["alerts"]["monitor"] is True, r["alerts"]


def test_decoupling_grid_is_opt_in_and_reported(tmp_path):
    status, data = _compare(
        tmp_path, "--quick", "--tasks", "decoupling-grid", "--steps", "10", "--optimizers", "adam"
    )
    assert status == 0
    grid = data["grid"]
    assert set(grid) == {"adamw", "adam-l2"}
    for g in grid.values():
        assert len(g["val_loss"]) == len(g["lrs"]) == 3
        assert all(len(row) == len(g["weight_decays"]) == 3 for row in g["val_loss"])
        assert len(g["best_weight_decay"]) == 3 and g["complete"]
    claim = next(c for c in data["claims"] if "weight decay" in c["claim"])
    assert claim["status"] in ("reproduced", "not reproduced")
    assert "spread" in claim["evidence"]
    assert "decoupling-grid.png" in data["plots"]
    _check_schema(data, tmp_path)


# ---------------------------------------------------------------------------------------------
# the claims are checked, never hidden


def _runs_counterexample(adam_x: float, ams_x: float) -> list[dict]:
    return [
        {"task": "amsgrad-counterexample", "optimizer": opt, "phase": "sweep", "steps": 600,
         "hyperparameters": {"lr": 0.03}, "status": "ok", "final": {"val_metric": x}}
        for opt, x in (("adam", adam_x), ("amsgrad", ams_x))
    ]  # fmt: skip


def test_claims_report_failures_and_missing_tasks():
    tasks, opts = ("amsgrad-counterexample",), tuple(OPTIMIZERS)
    good = evaluate_claims(tasks, opts, [], _runs_counterexample(1.0, -0.99), None)
    bad = evaluate_claims(tasks, opts, [], _runs_counterexample(-0.5, -0.99), None)
    assert [c["status"] for c in good] == ["not run", "not run", "reproduced", "not run", "not run"]
    assert bad[2]["status"] == "not reproduced" and bad[2]["reproduced"] is False
    assert "Adam -0.500" in bad[2]["evidence"]
    assert "was not run" in good[0]["evidence"] and "opt-in" in good[3]["evidence"]
    without = evaluate_claims(tasks, ("adam",), [], _runs_counterexample(1.0, -1.0), None)
    assert without[2]["status"] == "not run" and "amsgrad" in without[2]["evidence"]


# ---------------------------------------------------------------------------------------------
# the CLI


def test_cli_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", "--tasks", "mnist"])
    assert e.value.code == 2
    assert "unknown task mnist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["compare", "--optimizers", "lion"])
    with pytest.raises(SystemExit):
        cli.main(["compare", "--seeds", "0"])
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["--help"]) == 0
    assert "compare" in capsys.readouterr().out


def test_cli_refuses_a_device_or_folder_it_cannot_use_before_any_run(tmp_path, capsys):
    """A device torch cannot put a tensor on, or an --out that cannot be a folder, ends the
    command at once with status 2 and a line naming the value (no run, no report)."""
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", "--device", "nonsense", "--out", str(tmp_path / "a")])
    assert e.value.code == 2 and "not a torch device: 'nonsense'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            cli.main(["compare", "--device", "cuda", "--out", str(tmp_path / "b")])
        assert e.value.code == 2 and "'cuda' is not available here" in capsys.readouterr().err
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    assert cli.main(["compare", "--quick", "--out", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert f"cannot use --out {str(a_file)!r}" in err
    assert a_file.read_text() == "not a folder"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_delegates_bench_and_report(monkeypatch, capsys):
    got = {}
    for command, module in (("bench", "adamkit.bench.throughput"),
                            ("report", "adamkit.diagnostics.report")):  # fmt: skip
        fake = types.ModuleType(module)
        fake.main = lambda argv, c=command: got.setdefault(c, argv) and 0
        monkeypatch.setitem(sys.modules, module, fake)
        assert cli.main([command, "--x", "1"]) == 0
        assert got[command] == ["--x", "1"]
    monkeypatch.setitem(sys.modules, "adamkit.bench.throughput", None)  # import fails
    assert cli.main(["bench"]) == 2
    assert "adamkit bench: not available" in capsys.readouterr().err


def test_compare_config_defaults():
    assert C.CompareConfig().n_seeds == 3 and C.CompareConfig(quick=True).n_seeds == 2
    cfg = C.CompareConfig(tasks=("rosenbrock",), steps=7)
    assert cfg.budget(TASKS["rosenbrock"]).steps == 7
    jobs = C.plan(C.CompareConfig(tasks=("char-transformer",), optimizers=("adamw", "gd")))
    assert [(j.spec.name, j.schedule) for j in jobs] == [
        ("adamw", "warmup_cosine"),
        ("adamw", "constant"),
    ]
