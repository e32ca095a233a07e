"""``adamkit bench`` (adamkit.bench.throughput): arguments, lean-state rows, optional anchors.

Tiny layouts, the eager backend and one timed round: these check what the benchmark reports,
never how fast anything is.
"""

from __future__ import annotations

import json
import re
import sys
import types

import pytest
import torch

from adamkit.bench import anchors
from adamkit.bench import throughput as T

TINY = ["--params", "8192", "--tensors", "2", "--repeats", "1", "--warmup", "0"]


def run_bench(tmp_path, capsys, *args: str) -> tuple[dict, str]:
    path = tmp_path / "bench.json"
    assert T.main([*TINY, "--backends", "eager,torch-fused", *args, "--json", str(path)]) == 0
    text = path.read_text()
    assert "NaN" not in text  # strict JSON: rows without timings carry null
    return json.loads(text), capsys.readouterr().out


def rows_by_candidate(payload: dict) -> dict[str, dict]:
    return {r["candidate"]: r for r in payload["results"]}


def test_rounds_vary_who_steps_after_whom():
    order = T.rounds(4, 60)
    assert len(order) == 60 and T.rounds(4, 60) == order  # seeded
    assert all(sorted(r) == [0, 1, 2, 3] for r in order)  # each candidate once a round
    # over the rounds (read as one sequence of steps) every candidate steps right after each
    # of the others, and takes each place in a round
    steps = [k for r in order for k in r]
    follows = {(a, b) for a, b in zip(steps, steps[1:])}
    assert {(a, b) for a in range(4) for b in range(4) if a != b} <= follows
    assert all({r[place] for r in order} == {0, 1, 2, 3} for place in range(4))
    assert T.rounds(1, 3) == [[0], [0], [0]]


def test_parser_accepts_state_dtypes_and_anchors():
    args = T.parser().parse_args(["--state-dtype", "bfloat16, int8,int4", "--anchors", "bnb"])
    assert args.state_dtype == ("bfloat16", "int8", "int4")
    assert args.anchors == ("bnb-adamw8bit",)
    defaults = T.parser().parse_args([])
    assert defaults.state_dtype == () and defaults.anchors is None
    assert T.parser().parse_args(["--anchors", "none"]).anchors == ()
    torchao = T.parser().parse_args(["--anchors", "torchao"]).anchors
    assert torchao == ("torchao-adamw8bit", "torchao-adamw4bit")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--state-dtype", "int8,int3"],
            r"argument --state-dtype: unknown state dtype 'int3'; "
            r"choose from float32, bfloat16, int8, int4",
        ),
        (["--state-dtype", "fp8"], r"argument --state-dtype: unknown state dtype 'fp8'"),
        (["--anchors", "apex"], r"argument --anchors: unknown anchor 'apex'; choose from bnb"),
        (["--repeats", "0"], r"argument --repeats: expected an integer >= 1, got '0'"),
        (["--warmup", "-1"], r"argument --warmup: expected an integer >= 0, got '-1'"),
        (["--auto-steps", "x"], r"argument --auto-steps: expected an integer >= 0, got 'x'"),
        (["--params", "0"], r"argument --params: expected an integer >= 1, got '0'"),
        (["--tensors", "-3"], r"argument --tensors: expected an integer >= 1, got '-3'"),
    ],
)
def test_parser_rejects_unknown_values(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        T.parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layouts", "big,huge"], r"--layouts 'big,huge': unknown layout 'huge'"),
        (["--layouts", "custom"], r"the custom layout needs --params and --tensors"),
        (["--json", "{missing}/out.json"], r"cannot write --json '.*missing/out\.json'"),
        (["--json", "{tmp}"], r"cannot write --json"),
        (["--monitor", "--json", "{missing}/m.json"], r"cannot write --json"),
    ],
)
def test_bad_layouts_and_json_paths_stop_before_any_timing(tmp_path, capsys, argv, message):
    """Status 2 and one line naming the value, before a layout is built or a step timed."""
    argv = [a.format(missing=tmp_path / "missing", tmp=tmp_path) for a in argv]
    assert T.main(argv) == 2
    out, err = capsys.readouterr()
    assert re.search(message, err), err
    assert "params in" not in out  # no layout ran


def test_state_dtype_needs_an_adamkit_backend(capsys):
    assert T.main([*TINY, "--backends", "torch-fused", "--state-dtype", "int8"]) == 2
    assert "--state-dtype needs an adamkit backend" in capsys.readouterr().err


def test_expand_candidates_adds_a_row_per_backend_and_state_dtype():
    names = T.expand_candidates(
        ["adamkit-compiled", "adamkit-eager", "torch-fused"], ("int8", "int4"), ("bnb-adamw8bit",)
    )
    assert names == [
        "adamkit-compiled",
        "adamkit-compiled:int8",
        "adamkit-compiled:int4",
        "adamkit-eager",
        "adamkit-eager:int8",
        "adamkit-eager:int4",
        "torch-fused",
        "bnb-adamw8bit",
    ]
    assert T.split_candidate("adamkit-auto:bfloat16") == ("adamkit-auto", "bfloat16")
    assert T.split_candidate("torch-fused") == ("torch-fused", None)


def test_state_dtype_rows_report_bytes_and_formats(tmp_path, capsys):
    payload, out = run_bench(tmp_path, capsys, "--state-dtype", "bfloat16,int8,int4")
    assert payload["state_dtypes"] == ["bfloat16", "int8", "int4"]
    rows = rows_by_candidate(payload)
    assert list(rows) == [
        "adamkit-eager",
        "adamkit-eager:bfloat16",
        "adamkit-eager:int8",
        "adamkit-eager:int4",
        "torch-fused",
        "bnb-adamw8bit",  # int8 asked for: the bitsandbytes anchor, run or skipped
    ]
    expected_bytes = {
        "adamkit-eager": (7.9, 8.1),
        "adamkit-eager:bfloat16": (3.9, 4.1),
        "adamkit-eager:int8": (2.0, 2.1),
        "adamkit-eager:int4": (1.0, 1.1),
        "torch-fused": (7.9, 8.1),
    }
    for name, (low, high) in expected_bytes.items():
        row = rows[name]
        assert low <= row["state_bytes_per_param"] <= high, (name, row)
        assert row["formats"] == {row["state"]: 2}, row  # both 4096-element tensors
        assert row["gparams_per_s"] > 0 and len(row["step_s"]) == 1
        assert row["ratios"]["torch-fused"] > 0
    assert rows["adamkit-eager:int4"]["state"] == "int4"
    assert "state: every tensor of every adamkit bfloat16, int8, int4 row" in out
    assert "int8 2/2" in out and "int4 2/2" in out


def test_tensors_under_min_quantized_size_are_reported(tmp_path, capsys):
    small = ["--params", "200", "--tensors", "2"]  # tensors of 100 elements stay in fp32
    payload, out = run_bench(tmp_path, capsys, *small, "--state-dtype", "int8", "--anchors", "none")
    row = rows_by_candidate(payload)["adamkit-eager:int8"]
    assert row["formats"] == {"float32": 2}
    assert "min_quantized_size" in row["note"]
    assert any("adamkit-eager asked for int8, got 2 float32" in n for n in payload["notes"])
    assert "int8 0/2" in out


def test_bnb_anchor_is_skipped_cleanly_when_absent(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    payload, out = run_bench(tmp_path, capsys, "--state-dtype", "int8")
    assert payload["anchors"] == ["bnb-adamw8bit"]
    row = rows_by_candidate(payload)["bnb-adamw8bit"]
    assert row["skipped"].startswith("bitsandbytes.optim does not import")
    assert row["step_s"] == [] and row["median_s"] is None and row["gparams_per_s"] is None
    assert "bnb" not in rows_by_candidate(payload)["adamkit-eager:int8"]["ratios"]
    assert "note: custom: bitsandbytes AdamW8bit skipped, bitsandbytes.optim does not" in out
    assert any("bitsandbytes AdamW8bit skipped" in n for n in payload["notes"])


class _FakeAdamW8bit(torch.optim.Optimizer):
    """Stands in for bitsandbytes' AdamW8bit: uint8 codes in ``state1``, no arithmetic."""

    def __init__(self, params, **kw):
        super().__init__(params, kw)

    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["state1"] = torch.zeros(p.numel(), dtype=torch.uint8)
                    state["absmax1"] = torch.zeros(p.numel() // 256)


def fake_bnb(monkeypatch, cls) -> None:
    module = types.ModuleType("bitsandbytes.optim")
    module.AdamW8bit = cls
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", module)


def test_int8_rows_show_their_ratio_to_the_bnb_anchor(tmp_path, capsys, monkeypatch):
    fake_bnb(monkeypatch, _FakeAdamW8bit)
    payload, out = run_bench(tmp_path, capsys, "--state-dtype", "int8,int4")
    rows = rows_by_candidate(payload)
    anchor = rows["bnb-adamw8bit"]
    assert anchor["label"] == "bitsandbytes AdamW8bit" and anchor["formats"] == {"8-bit": 2}
    assert anchor["state_bytes_per_param"] == pytest.approx(1 + 4 / 256)
    assert rows["adamkit-eager:int8"]["ratios"]["bnb-adamw8bit"] > 0
    assert "bnb-adamw8bit" not in rows["adamkit-eager:int4"]["ratios"]  # 4 bits: no anchor
    assert "bnb-adamw8bit" not in rows["adamkit-eager"]["ratios"]
    assert "bitsandbytes AdamW8bit" in out and "x bnb" in out


def test_an_anchor_that_fails_on_the_device_is_skipped(tmp_path, capsys, monkeypatch):
    class Broken(_FakeAdamW8bit):
        def step(self):
            raise RuntimeError("no CPU kernel")

    fake_bnb(monkeypatch, Broken)
    payload, out = run_bench(tmp_path, capsys, "--anchors", "bnb")
    row = rows_by_candidate(payload)["bnb-adamw8bit"]
    assert row["skipped"] == "fails on cpu: RuntimeError: no CPU kernel"
    assert "bitsandbytes AdamW8bit skipped, fails on cpu" in out


def test_anchor_state_formats_flag_unquantised_tensors():
    p = torch.zeros(300, requires_grad=True)
    opt = _FakeAdamW8bit([p])
    opt.state[p]["state1"] = torch.zeros(300)  # kept in fp32, as bitsandbytes does < 4096
    assert anchors.state_formats("bnb-adamw8bit", opt) == {"float32": 1}
    assert anchors.state_bytes(opt) == 1200


def test_gpu_check_runs_its_cpu_side_and_refuses_unknown_states(tmp_path, capsys):
    """benchmarks/gpu_check.sh's CPU side: the parity of compiled against eager for every
    config (small sizes, two steps), the copy bandwidth and the JSON report; an unknown lean
    state is refused before anything runs."""
    from adamkit.bench import gpu_check

    path = tmp_path / "gpu_check.json"
    argv = ["--device", "cpu", "--steps", "2", "--skip-throughput", "--json", str(path)]
    assert gpu_check.main(argv) == 0
    report = json.loads(path.read_text())
    assert report["ok"] and report["device"] == "cpu"
    assert len(report["parity"]) >= 8  # every config of the issue
    assert all(p["worst_relative_error"] <= p["tolerance"] for p in report["parity"])
    assert report["bandwidth"]["bytes_per_s"] > 0
    assert gpu_check.main(["--device", "cpu", "--state-dtype", "int3"]) == 2
    assert "unknown --state-dtype 'int3'" in capsys.readouterr().err
