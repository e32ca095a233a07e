"""A rank killed mid-run: torchrun restarts the group from the last distributed checkpoint and
the run ends with exactly the parameters of a run that was never interrupted.

Both runs are ``examples/fsdp2_train.py`` (FSDP2, adamkit.AdamW with int8 moments, a
``torch.distributed.checkpoint`` every 3 steps, written to ``step-N.tmp`` and renamed once every
rank has written) under ``torchrun --nproc-per-node 2`` on gloo. In the faulty run rank 1 calls
``os._exit(1)`` while checkpoint 9 is being written; torchrun (``--max-restarts 1``) restarts
both ranks, which resume from step 6, the last complete checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import distributed_worker as W
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fsdp2_train.py"
STEPS, EVERY, CRASH_AT = 12, 3, 9


def torchrun(
    ckpt_dir: Path, launcher_args: tuple = (), example_args: tuple = (), timeout: float = 150
) -> str:
    """Run the example on 2 ranks under torchrun; its output (the whole group is killed if it
    has not finished after ``timeout`` seconds)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{W.free_port()}",
        "--local-addr", "127.0.0.1", *launcher_args, str(EXAMPLE),
        "--steps", str(STEPS), "--every", str(EVERY), "--ckpt-dir", str(ckpt_dir),
        "--save-final", str(ckpt_dir / "final.pt"), *example_args,
    ]  # fmt: skip
    # torchrun's c10d rendezvous shares its store with the workers and does not prefix their
    # keys by restart: a restarted gloo group can read its predecessor's addresses. With the
    # store not shared, rank 0 hosts a fresh store for every attempt.
    env = {**W.worker_env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"torchrun did not finish in {timeout} s:\n{out[-4000:]}") from None
    (ckpt_dir / "torchrun.log").write_text(out)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, str, Path, str]:
    clean = tmp_path_factory.mktemp("uninterrupted")
    clean_log = torchrun(clean)
    faulty = tmp_path_factory.mktemp("faulty")
    faulty_log = torchrun(faulty, ("--max-restarts", "1"), ("--crash-at", str(CRASH_AT)))
    return clean, clean_log, faulty, faulty_log


def checkpoint_tensors(path: Path, tmp: Path) -> dict[str, torch.Tensor]:
    tmp.mkdir(exist_ok=True)
    out = tmp / (path.name + ".pt")
    dcp_to_torch_save(path, out)
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", torch.load(out))
    return flat


def test_killed_rank_restarts_from_checkpoint_and_ends_bitwise_equal(runs) -> None:
    clean, clean_log, faulty, faulty_log = runs
    assert "simulated crash" not in clean_log and "resumed from" not in clean_log
    assert f"simulated crash while writing checkpoint {CRASH_AT}" in faulty_log
    assert f"resumed from {faulty / 'step-6'}" in faulty_log  # not from the unfinished 9
    want, got = torch.load(clean / "final.pt"), torch.load(faulty / "final.pt")
    assert set(want) == set(got) and len(want) == 6
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_checkpoints_written_before_the_fault_are_intact(runs, tmp_path) -> None:
    clean, _, faulty, _ = runs
    names = sorted(p.name for p in faulty.iterdir() if p.is_dir())
    assert names == ["step-12", "step-3", "step-6", "step-9"]  # no step-9.tmp left over
    for step in (3, 6, 9, 12):
        want = checkpoint_tensors(clean / f"step-{step}", tmp_path / "clean")
        got = checkpoint_tensors(faulty / f"step-{step}", tmp_path / "faulty")
        assert set(got) == set(want) and any("exp_avg" in k for k in want)
        for key in want:
            assert torch.equal(got[key], want[key]), (step, key)
