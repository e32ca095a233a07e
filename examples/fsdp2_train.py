"""FSDP2 + adamkit.AdamW + distributed checkpoints, on CPUs (gloo): restartable training.

    torchrun --nproc-per-node 2 examples/fsdp2_train.py
    torchrun --nproc-per-node 2 --max-restarts 1 examples/fsdp2_train.py --crash-at 9

Each rank holds a shard of every weight (``fully_shard``) and adamkit steps the local shards
with int8 moments. Every ``--every`` steps the run writes a ``torch.distributed.checkpoint``
to ``--ckpt-dir`` (into ``step-N.tmp``, renamed to ``step-N`` once every rank has written its
part), and at start it resumes from the newest complete checkpoint. ``--crash-at N`` makes rank
1 exit abruptly while checkpoint N is being written, on the first attempt only: torchrun
restarts the group, which resumes from the last complete checkpoint and ends with exactly the
parameters of an uninterrupted run. The data is a pure function of the step (a fixed teacher
network's outputs on fresh inputs), so a resumed run sees the batches the uninterrupted run saw.
Run it again and it resumes from its last checkpoint; delete ``--ckpt-dir`` to start over. With
``--max-restarts``, set ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (docs/distributed.md says why).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import adamkit

DIM, HIDDEN, CLASSES, BATCH = 64, 256, 10, 32  # BATCH: the global batch


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
        nn.Linear(HIDDEN, CLASSES),
    )  # fmt: skip


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the global batch of ``step``: inputs and a teacher's labels."""
    teacher = torch.Generator().manual_seed(1234)
    w = torch.randn(DIM, CLASSES, generator=teacher)
    x = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(step))
    y = (x @ w).argmax(dim=1)
    rows = BATCH // world
    return x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows]


def latest_checkpoint(ckpt_dir: Path) -> tuple[int, Path | None]:
    """The newest complete checkpoint (``step-N``; ``step-N.tmp`` is an unfinished write)."""
    done = sorted(ckpt_dir.glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    return (int(done[-1].name.split("-")[1]), done[-1]) if done else (0, None)


def save(model: nn.Module, opt, ckpt_dir: Path, step: int, crash: bool) -> None:
    """Write checkpoint ``step`` atomically: every rank writes into ``step-N.tmp``; once all
    have, rank 0 renames it to ``step-N``. A crash in between leaves only the ``.tmp``."""
    rank = dist.get_rank()
    tmp, final = ckpt_dir / f"step-{step}.tmp", ckpt_dir / f"step-{step}"
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)  # left by a crashed attempt
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    if crash and rank == 1:
        print(f"rank 1: simulated crash while writing checkpoint {step}", flush=True)
        os._exit(1)
    dist.barrier()
    if rank == 0:
        tmp.rename(final)
    dist.barrier()


def load(model: nn.Module, opt, path: Path) -> None:
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    parser.add_argument("--ckpt-dir", type=Path, default=Path("checkpoints/fsdp2_train"))
    parser.add_argument("--state-dtype", default="int8", help="float32, bfloat16, int8, int4")
    parser.add_argument("--crash-at", type=int, default=0, help="crash once, in checkpoint N")
    parser.add_argument("--save-final", type=Path, help="write the final full params here")
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = adamkit.AdamW(
        model.parameters(), lr=3e-3, weight_decay=0.01, state_dtype=args.state_dtype
    )

    args.ckpt_dir.mkdir(parents=True, exist_ok=True)
    start, path = latest_checkpoint(args.ckpt_dir)
    if path is not None:
        load(model, opt, path)
        if rank == 0:
            print(f"resumed from {path}", flush=True)
    for step in range(start, args.steps):
        x, y = batch(step, rank, world)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        done = step + 1
        if rank == 0 and (done % 10 == 0 or done == args.steps):
            print(f"step {done:4d}  loss {loss.item():.4f}", flush=True)
        if done % args.every == 0:
            save(model, opt, args.ckpt_dir, done, crash=first_attempt and done == args.crash_at)

    params = {name: p.full_tensor() for name, p in model.named_parameters()}
    if rank == 0:
        print(adamkit.memory_report(opt).__str__().splitlines()[0], "(rank 0's shards)")
        if args.save_final is not None:
            torch.save(params, args.save_final)
    dist.barrier()  # nobody tears the group down while another rank still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Everything is written and the group is torn down. On torch 2.13 + gloo, C++ destructors
    # that run after the interpreter has finished sometimes abort a restarted worker ("terminate
    # called without an active exception", about 1 run in 10 here), which torchrun reports as
    # a failure; leave without running them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
