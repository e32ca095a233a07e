"""The Monitor under FSDP2 (DTensor params, sharded state) on 2 and 4 gloo ranks on the CPU.

Every signal of a sharded run equals the unsharded run's, up to fp32 rounding: exact sums
(norms) are all-reduced over the shards, the sample is taken by global element index and
gathered (adamkit.diagnostics.sharded), and non-finite counts are added up over the ranks. The
last step puts an inf into one gradient entry (on one rank only) so that the non-finite counts
are measured. Run as a script, this file is the worker of one rank.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import adamkit
from adamkit.diagnostics import Monitor

STEPS, BATCH = 4, 8
EPS = 3e-3  # large enough that some entries are eps-dominated and some are not
INF_AT = (100, 4)  # "0.weight" entry set to inf in the last step's gradient (a sampled one)
WORLDS = (2, 4)
TOLERANCE = 1e-5  # relative, fp32 rounding (reduce-scattered gradients); 3e-7 measured


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 120), nn.Tanh(), nn.Linear(120, 35))


def poison_(weight: nn.Parameter) -> None:
    """Set the gradient entry ``INF_AT`` of the full tensor to inf, on whichever rank holds it
    (FSDP2 shards rows)."""
    from adamkit.storage.shards import is_dtensor, shard_start

    grad = weight.grad
    start = shard_start(weight) if is_dtensor(weight) else 0
    local = grad.to_local() if is_dtensor(grad) else grad
    row = INF_AT[0] - start // weight.shape[1]
    if 0 <= row < local.shape[0]:
        local[row, INF_AT[1]] = float("inf")


def train(model: nn.Module, rank: int = 0, world: int = 1) -> list[dict]:
    opt = adamkit.AdamW(model.parameters(), lr=1e-2, eps=EPS)
    monitor = Monitor(opt, names=model, alerts=False)
    rows = BATCH // world
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(BATCH, 40, generator=g), torch.randn(BATCH, 35, generator=g)
        opt.zero_grad(set_to_none=True)
        sl = slice(rank * rows, (rank + 1) * rows)
        loss = nn.functional.mse_loss(model(x[sl]), y[sl])
        loss.backward()
        if step == STEPS - 1:
            poison_(model[0].weight)
        monitor.observe(loss=loss)
        opt.step()
    for record in monitor.history():
        record.pop("time")
        record.pop("loss"), record.pop("loss_mean"), record.pop("loss_std")  # this rank's loss
    return monitor.history()


def worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    history = train(model, rank, world)
    Path(out, f"rank{rank}.json").write_text(json.dumps(history))
    dist.destroy_process_group()


def launch(world: int, out: Path) -> list[list[dict]]:
    init = "file://" + tempfile.mktemp(prefix="rdzv-", dir=out)
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), str(world), init, str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-3000:] for x in logs)
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def single() -> list[dict]:
    return train(make_model())


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"{w}ranks")
def ranks(request, tmp_path_factory) -> list[list[dict]]:
    return launch(request.param, tmp_path_factory.mktemp(f"fsdp2-{request.param}"))


def scopes(record: dict) -> dict[str, dict]:
    """Every set of signals in a record: overall, each group, each tensor."""
    out = {"overall": record["overall"]}
    out.update({f"group{g['group']}": g for g in record["groups"]})
    out.update({f"tensor {name}": t for name, t in record["tensors"].items()})
    return out


def differences(got: dict, want: dict) -> dict[str, float]:
    """Relative difference of every signal of ``got`` from ``want`` (records of one step);
    integers, None and NaN must match exactly (inf where they do not)."""
    out = {}
    assert scopes(got).keys() == scopes(want).keys()
    for where, signals in scopes(want).items():
        other = scopes(got)[where]
        assert other.keys() == signals.keys(), where
        for key, w in signals.items():
            g = other[key]
            label = f"{where}: {key}"
            if isinstance(w, float) and isinstance(g, float):
                if math.isnan(w) or math.isnan(g):
                    out[label] = 0.0 if math.isnan(w) and math.isnan(g) else math.inf
                else:
                    out[label] = abs(g - w) / max(abs(w), 1e-30)
            else:
                out[label] = 0.0 if g == w else math.inf
    return out


def test_sharded_signals_equal_the_unsharded_run(single, ranks) -> None:
    """Every signal of every record (norms, rms, ratios, fractions, lag, eff-lr percentiles,
    moment norms, non-finite counts) on every rank, within fp32 rounding."""
    for history in ranks:
        assert len(history) == len(single) == STEPS
        for step, (got, want) in enumerate(zip(history, single)):
            assert got["step"] == want["step"] == step + 1
            diff = differences(got, want)
            worst = max(diff, key=diff.get)
            assert diff[worst] <= TOLERANCE, (step, worst, diff[worst])
    # the ranks agree to the bit: one global sample, the same all-reduced sums
    assert all(history == ranks[0] for history in ranks)


def test_the_comparison_covers_every_signal(single) -> None:
    """The records compared above hold every signal, with fractions strictly between 0 and 1
    (a sample of the wrong entries would move them) and non-zero non-finite counts."""
    clean, poisoned = single[-2]["tensors"]["0.weight"], single[-1]["tensors"]["0.weight"]
    for key in (
        "grad_norm",
        "grad_rms",
        "update_rms",
        "log10_update_to_weight",
        "second_moment_lag",
        "eff_lr_p5",
        "eff_lr_p50",
        "eff_lr_p95",
        "exp_avg_norm",
        "exp_avg_sq_norm",
    ):
        assert isinstance(clean[key], float) and math.isfinite(clean[key]), key
    for key in ("eps_dominated_frac", "large_update_frac"):
        assert 0.05 < clean[key] < 0.95, (key, clean[key])
    assert clean["eff_lr_p5"] < clean["eff_lr_p50"] < clean["eff_lr_p95"]
    assert clean["numel"] > 512  # sampled, not exact
    counts = [poisoned[k] for k in ("grad_nonfinite", "state_nonfinite", "param_nonfinite")]
    assert counts == [1, 2, 1]  # the gradient entry; m and v; the param it made NaN
    assert single[-1]["overall"]["grad_nonfinite"] == 1


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
    # torch 2.13 + gloo sometimes aborts in interpreter teardown after all work is done
    # ("terminate called without an active exception"): the record is on disk, leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
