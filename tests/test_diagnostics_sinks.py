"""Sinks (JSONL, CSV, TensorBoard), the crash-tolerant reader, the report and the overhead probe."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
from torch import nn

import adamkit
from adamkit.diagnostics import CSVSink, JSONLSink, Monitor, TensorBoardSink, read_jsonl, report
from adamkit.diagnostics.overhead import measure


def monitored_run(sinks, steps=12, every=2, nan_at=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = adamkit.AdamW(model.parameters(), lr=1e-2)
    monitor = Monitor(opt, names=model, every=every, sinks=sinks)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if step == nan_at:
            model[2].bias.grad[0] = math.nan
        monitor.observe(loss=loss)
        opt.step()
    monitor.close()
    return monitor


def test_jsonl_round_trip_one_write_per_record(tmp_path, monkeypatch) -> None:
    path = tmp_path / "run.jsonl"
    writes = []
    real_write = os.write

    def spy(fd, data):
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    monitor = monitored_run([JSONLSink(path)], nan_at=10)
    monkeypatch.undo()
    records = read_jsonl(path)
    assert len(records) == len(writes) == 6
    assert all(w.endswith(b"\n") and w.count(b"\n") == 1 for w in writes)  # a whole line each
    assert records == json.loads(json.dumps(monitor.history()))  # what the monitor kept
    # non-finite values survive as NaN tokens; the alert is in the record of its step
    rec10 = records[4]
    assert rec10["step"] == 10 and math.isnan(rec10["tensors"]["2.bias"]["grad_norm"])
    assert [a["name"] for a in rec10["alerts"]] == ["nonfinite"]


def test_read_jsonl_reports_a_truncated_last_line(tmp_path) -> None:
    path = tmp_path / "run.jsonl"
    monitored_run([JSONLSink(path)])
    full = path.read_bytes()
    path.write_bytes(full + full.splitlines(keepends=True)[0][:57])  # died mid-record
    with pytest.warns(RuntimeWarning, match="truncated last line"):
        records = read_jsonl(path)
    assert len(records) == 6
    path.write_bytes(full.rstrip(b"\n"))  # a complete last record without its newline is fine
    assert len(read_jsonl(path)) == 6
    lines = full.splitlines(keepends=True)
    path.write_bytes(lines[0] + b'{"step": 4, "lo\n' + lines[2])
    with pytest.raises(ValueError, match=r"run.jsonl:2: not a JSON record"):
        read_jsonl(path)


def test_jsonl_append_and_closed_sink(tmp_path) -> None:
    path = tmp_path / "a" / "run.jsonl"  # parent folders are made
    sink = JSONLSink(path)
    sink.write({"step": 1})
    sink.close()
    sink = JSONLSink(path, append=True)
    sink.write({"step": 2, "x": torch.tensor(1.5)})
    sink.close()
    assert read_jsonl(path) == [{"step": 1}, {"step": 2, "x": 1.5}]
    with pytest.raises(ValueError, match="closed"):
        sink.write({"step": 3})
    JSONLSink(path).close()  # truncates by default
    assert read_jsonl(path) == []


def test_csv_sink(tmp_path) -> None:
    path = tmp_path / "run.csv"
    monitor = monitored_run([CSVSink(path, tensors=True)])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    hist = monitor.history()
    assert len(rows) == len(hist) == 6
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12]
    for row, rec in zip(rows, hist):
        assert float(row["overall.update_rms"]) == pytest.approx(rec["overall"]["update_rms"])
        assert float(row["group0.grad_norm"]) == pytest.approx(rec["groups"][0]["grad_norm"])
        assert float(row["tensor.0.weight.eps_dominated_frac"]) == pytest.approx(
            rec["tensors"]["0.weight"]["eps_dominated_frac"]
        )
        assert float(row["loss"]) == pytest.approx(rec["loss"])


def test_tensorboard_sink_writes_readable_events(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = monitored_run([TensorBoardSink(tmp_path / "tb", tensors=True)])
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "overall/update_rms", "group0/grad_norm", "tensor/0.weight/grad_norm"} <= tags
    events = acc.Scalars("overall/update_rms")
    assert [e.step for e in events] == [2, 4, 6, 8, 10, 12]
    want = [r["overall"]["update_rms"] for r in monitor.history()]
    assert [e.value for e in events] == pytest.approx(want, rel=1e-6)


def test_tensorboard_missing_gives_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoardSink(tmp_path)


def test_report_prints_a_table_and_writes_a_png(tmp_path, capsys) -> None:
    path = tmp_path / "run.jsonl"
    monitored_run([JSONLSink(path)], nan_at=10)
    complete = read_jsonl(path)
    with open(path, "ab") as f:
        f.write(b'{"step": 14, "tr')  # a crash mid-line
    assert report.main([str(path)]) == 0
    out, err = capsys.readouterr()
    assert "truncated last line" in err
    assert "update_rms" in out and "nonfinite" in out and "6 records" in out
    png = tmp_path / "run.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out_png = tmp_path / "fig.png"
    assert report.main([str(path), "--out", str(out_png)]) == 0 and out_png.exists()
    assert report.main([str(tmp_path / "missing.jsonl")]) == 2
    # first, last, min, max over the run
    values = [r["overall"]["update_rms"] for r in complete]
    rows = dict(report.summarize(complete))
    assert rows["update_rms"] == [values[0], values[-1], min(values), max(values)]
    first, last, lo, hi = rows["grad_nonfinite"]
    assert first == lo == 0 and last == hi > 0  # the NaN of step 10 spread


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"step": 1, "overall": {\n', r"bad\.jsonl:1: not a JSON record"),
        (b"\xff\xfe\n", r"bad\.jsonl:1: not a JSON record"),
        (b'{"step": 1}\n[1, 2]\n', r"record 2 is a JSON list, not a Monitor record"),
        (b'{"foo": 1}\n', r"record 1 has no int 'step' \(step=None\)"),
        (b'{"step": "3"}\n', r"record 1 has no int 'step' \(step='3'\)"),
        (b'{"step": 3, "alerts": [{"x": 1}]}\n', r"record 1 \(step 3\) has alerts without"),
    ],
)
def test_report_names_what_is_wrong_with_a_file_it_cannot_read(
    tmp_path, capsys, content, message
) -> None:
    """A file that is not a Monitor's log ends the command with status 2 and one line that
    names the record, not a traceback; the PNG is not written."""
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    assert report.main([str(path)]) == 2
    out, err = capsys.readouterr()
    assert re.search(message, err) and err.startswith("adamkit report: ")
    assert "Traceback" not in err and not (tmp_path / "bad.png").exists()


def test_overhead_probe_measures_each_sampling_period() -> None:
    params = [nn.Parameter(torch.randn(64, 64)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    result = measure(params=params, every=(1, 5), steps=5, repeats=2, warmup=1)
    assert result["params"] == 3 * 64 * 64 and result["tensors"] == 3
    assert set(result["monitored"]) == {1, 5} and result["plain_s"] > 0
    plain = np.array(result["plain_runs_s"])
    assert len(plain) == 2 and result["plain_s"] == plain.min()
    for entry in result["monitored"].values():
        runs, hooks = np.array(entry["runs_s"]), np.array(entry["hook_runs_s"])
        assert entry["step_s"] == runs.min() and (0 < hooks).all() and (hooks < runs).all()
        # each monitored run against the plain run of its own repeat, the median of those
        assert entry["overhead"] == pytest.approx(np.median(runs / plain) - 1)
        assert entry["hook_overhead"] == pytest.approx(np.median(hooks / plain))
        assert entry["hook_s"] == pytest.approx(np.median(hooks))
    # sampling every 5th step spends less time in the hooks than sampling every step
    assert result["monitored"][5]["hook_s"] < result["monitored"][1]["hook_s"]
    # the probe removes its monitors: the optimizer has no hooks left
    opt = adamkit.AdamW(params)
    measure(lambda ps: opt, params=params, every=(2,), steps=2, repeats=1, warmup=1)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_overhead_probe_times_a_default_monitor_with_its_alerts_unlogged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from adamkit.diagnostics.alerts import AlertEngine

    calls = []
    evaluate = AlertEngine.evaluate

    def counted(self, *args, **kwargs):
        out = evaluate(self, *args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(AlertEngine, "evaluate", counted)
    params = [nn.Parameter(torch.randn(32, 32)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p)
    params[0].grad[3, 4] = float("nan")  # a "nonfinite" alert at the first sampled step
    logger = logging.getLogger("adamkit")
    level = logger.level
    with caplog.at_level(logging.WARNING, logger="adamkit"):
        measure(params=params, every=(1,), steps=4, repeats=1, warmup=1)
        # (the level caplog set is back once measure returns)
        assert logger.level == logging.WARNING
    fired = [a for out in calls for a in out]
    assert calls and {a.name for a in fired} == {"nonfinite"}  # judged, and one fired
    assert not [r for r in caplog.records if r.name == "adamkit"]  # but none was logged
    assert logger.level == level
    calls.clear()
    measure(
        params=params, every=(1,), steps=2, repeats=1, warmup=1, monitor_kwargs={"alerts": False}
    )
    assert not calls
