"""Multi-process scenarios for tests/test_distributed*.py (gloo, CPU, 127.0.0.1 only).

Run as ``python tests/distributed_worker.py SCENARIO OUTDIR [ARGS...]`` by :func:`launch`
(one process per rank, ``file://`` rendezvous) or by ``torchrun`` (env:// rendezvous). Each rank
writes what the test checks to ``OUTDIR/<scenario>-rank<r>.pt``; the tests compare it with a
single-process run computed in the test process by the same code (:func:`train_single`).

The model is a two-layer MLP whose weights have 4800 and 4200 elements (quantised under the
default ``min_quantized_size``) and whose biases stay float32. Its 120 and 35 rows give FSDP2
shards that are uneven (35 rows: 18 + 17 on 2 ranks, 9 + 9 + 9 + 8 on 4) and whose boundaries
do not fall on quantisation block boundaries (blocks of 256 and 128 elements).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

IN, HIDDEN, OUT = 40, 120, 35
BATCH = 8  # global batch, split evenly over 1, 2 or 4 ranks
STATE_DTYPES = (None, "float32", "bfloat16", "int8", "int4")
COMPILED_DTYPES = ("float32", "bfloat16", "int8", "int4")  # FSDP2 with backend="compiled"
HPARAMS = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1}
RESUME_STEP = 3  # the checkpoint tests save after this many steps

if "ADAMKIT_TEST_KERNEL_WIDTH" in os.environ:  # the suite's kernel width (tests/conftest.py)
    from adamkit.execution import plan

    plan.MIXED_WIDTH = plan.SMALL_WIDTH = int(os.environ["ADAMKIT_TEST_KERNEL_WIDTH"])


# ---------------------------------------------------------------------------------------------
# the model, the data and one training step (shared with the single-process reference)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))


def batch(step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of the global batch of ``step`` (a pure function of the step)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, IN, generator=g)
    y = torch.randn(BATCH, OUT, generator=g)
    rows = BATCH // world
    return x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows]


def train_step(model: nn.Module, opt, step: int, rank: int = 0, world: int = 1) -> None:
    x, y = batch(step, rank, world)
    opt.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def make_adamkit(params, state_dtype, **extra):
    import adamkit

    return adamkit.AdamW(params, **HPARAMS, state_dtype=state_dtype, seed=7, **extra)


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective), or ``t``, detached on the CPU."""
    from adamkit.storage.shards import is_dtensor

    return (t.full_tensor() if is_dtensor(t) else t).detach().clone()


def snapshot(model: nn.Module, opt) -> dict[str, dict[str, torch.Tensor]]:
    """Full params and decoded fp32 moments by param name (collective under FSDP2)."""
    params = dict(model.named_parameters())
    names = {id(p): n.removeprefix("module.") for n, p in params.items()}
    out: dict[str, dict[str, torch.Tensor]] = {"param": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for p in params.values():
        name = names[id(p)]
        out["param"][name] = full(p)
        decoded = opt.decoded_state(p) if hasattr(opt, "decoded_state") else opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in decoded:
                out[key][name] = full(decoded[key]).float()
    return out


def train_single(state_dtype, steps: int, **extra) -> dict[str, dict[str, torch.Tensor]]:
    model = make_model()
    opt = make_adamkit(model.parameters(), state_dtype, **extra)
    for s in range(steps):
        train_step(model, opt, s)
    return snapshot(model, opt)


def train_single_partitioned(state_dtype, steps: int, partitions: list[list[int]]) -> dict:
    """One process, one adamkit optimizer per ZeRO-1 partition (``partitions[r]``: the param
    indices rank r's optimizer holds, in its order): the random streams of stochastic rounding
    are keyed as ZeRO-1's ranks key them."""
    model = make_model()
    params = list(model.parameters())
    opts = [make_adamkit([params[i] for i in part], state_dtype) for part in partitions]
    for s in range(steps):
        x, y = batch(s)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        for opt in opts:
            opt.step()
    out: dict[str, dict[str, torch.Tensor]] = {"param": {}, "exp_avg": {}, "exp_avg_sq": {}}
    names = [n for n, _ in model.named_parameters()]
    for opt, part in zip(opts, partitions):
        for i in part:
            out["param"][names[i]] = params[i].detach().clone()
            decoded = opt.decoded_state(params[i])
            for key in ("exp_avg", "exp_avg_sq"):
                out[key][names[i]] = decoded[key].float()
    return out


# ---------------------------------------------------------------------------------------------
# process groups and the launcher


def init() -> tuple[int, int]:
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    method = os.environ.get("ADAMKIT_INIT", "env://")
    dist.init_process_group("gloo", init_method=method, rank=rank, world_size=world)
    return rank, world


def fsdp2(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int | None = None, world: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        GLOO_SOCKET_IFNAME="lo",
        MASTER_ADDR="127.0.0.1",
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")]),
    )
    if rank is not None:
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    return env


def launch(world: int, scenario: str, outdir: Path, *args: str, timeout: float = 90) -> list:
    """Run ``scenario`` on ``world`` processes; return each rank's results (rank order).

    Every process is killed if the group has not finished after ``timeout`` seconds, so a
    hang fails the test instead of stalling it.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rendezvous = tempfile.mktemp(prefix="adamkit-rdzv-", dir=outdir)
    procs, logs = [], []
    for rank in range(world):
        env = worker_env(rank, world)
        env["ADAMKIT_INIT"] = "file://" + rendezvous
        log = open(outdir / f"{scenario}-rank{rank}.log", "w")  # noqa: SIM115
        logs.append(log)
        cmd = [sys.executable, __file__, scenario, str(outdir), *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if any(codes):
        text = "\n".join(
            f"--- rank {r} (exit {c}) ---\n"
            + (outdir / f"{scenario}-rank{r}.log").read_text()[-3000:]
            for r, c in enumerate(codes)
        )
        raise RuntimeError(f"{scenario} on {world} ranks failed:\n{text}")
    return [torch.load(outdir / f"{scenario}-rank{r}.pt") for r in range(world)]


# ---------------------------------------------------------------------------------------------
# scenarios


def parse_dtype(text: str) -> str | None:
    return None if text == "None" else text


def column_problem(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 6 x 40 param and its gradient at ``step`` (for column-sharded DTensors)."""
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(6, 40, generator=g), torch.randn(6, 40, generator=g) * 1e-3


def train_columns(param: torch.Tensor, state_dtype, steps: int, grad_of=lambda g: g):
    """``steps`` steps; AMSGrad is switched on after the third (the running max starts from
    v, a path of its own)."""
    opt = make_adamkit([param], state_dtype, min_quantized_size=0)
    for s in range(steps):
        param.grad = grad_of(column_problem(s)[1])
        opt.param_groups[0]["amsgrad"] = s >= 3
        opt.step()
    return opt


def sharded_columns(rank: int, world: int, steps: int = 5) -> dict:
    """bf16 and int8 state on a DTensor sharded along dim 1 (a tensor-parallel layout, whose
    local shard is not a contiguous range of the full tensor); full values after ``steps``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for state_dtype in ("bfloat16", "int8"):
        start = column_problem(-1)[0]
        param = nn.Parameter(distribute_tensor(start, mesh, [Shard(1)]))
        opt = train_columns(
            param, state_dtype, steps, lambda g: distribute_tensor(g, mesh, [Shard(1)])
        )
        decoded = opt.decoded_state(param)
        out[state_dtype] = {
            key: full(param if key == "param" else decoded[key])
            for key in ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        }
    return out


def run_ddp(state_dtype, n: int, rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model())
    opt = make_adamkit(model.parameters(), state_dtype)
    for s in range(n):
        train_step(model, opt, s, rank, world)
    return snapshot(model, opt)


def make_zero(model: nn.Module, state_dtype):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    import adamkit

    return ZeroRedundancyOptimizer(
        model.parameters(),
        optimizer_class=adamkit.AdamW,
        **HPARAMS,
        state_dtype=state_dtype,
        seed=7,
    )


def run_zero(state_dtype, n: int, rank: int, world: int, outdir: Path, reload: bool) -> dict:
    """ZeRO-1 over DDP. The snapshot holds this rank's moments only, and ``partition``: the
    indices of the params this rank's adamkit optimizer holds, in its order. With ``reload``,
    the consolidated state is saved by rank 0, loaded into a fresh ZeRO optimizer on every
    rank, and both optimizers take 3 more steps: ``reload_same`` says whether they agree."""
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model())
    zero = make_zero(model, state_dtype)
    for s in range(n):
        train_step(model, zero, s, rank, world)
    snap = snapshot(model, zero.optim)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    snap["partition"] = [index[id(p)] for g in zero.optim.param_groups for p in g["params"]]
    if not reload:
        return snap
    zero.consolidate_state_dict(to=0)
    # through a file: on rank 0 the consolidated dict shares tensors with ``zero``'s state
    if rank == 0:
        torch.save(zero.state_dict(), outdir / f"zero1-{state_dtype}.pt")
    dist.barrier()
    consolidated = torch.load(outdir / f"zero1-{state_dtype}.pt")
    model2 = DistributedDataParallel(make_model())
    zero2 = make_zero(model2, state_dtype)
    with torch.no_grad():
        for p2, p in zip(model2.parameters(), model.parameters()):
            p2.copy_(p)
    zero2.load_state_dict(consolidated)
    for s in range(n, n + 3):
        train_step(model, zero, s, rank, world)
        train_step(model2, zero2, s, rank, world)
    snap["reload_same"] = all(
        torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters())
    )
    snap["reload_keys"] = sorted({k for st in zero2.optim.state.values() for k in st})
    return snap


def run_fsdp2(
    state_dtype, n: int, rank: int, world: int, torch_adamw: bool = False, backend="eager"
) -> dict:
    model = fsdp2(make_model())
    if torch_adamw:
        opt = torch.optim.AdamW(model.parameters(), **HPARAMS)
    else:
        opt = make_adamkit(model.parameters(), state_dtype, backend=backend)
    for s in range(n):
        train_step(model, opt, s, rank, world)
    snap = snapshot(model, opt)
    if backend == "compiled":  # which params the compiled kernels stepped
        plans = opt._executor._plans.values()
        snap["uncompiled"] = sum(len(p.eager) + len(p.failed) for p in plans)
        snap["compiled"] = sum(len({i for c in p.calls for i in c.members}) for p in plans)
    snap["state_types"] = sorted(
        {f"{k}:{type(v).__name__}" for st in opt.state.values() for k, v in st.items()}
    )
    return snap


def scenario_parity(outdir: Path, steps: str, state_dtypes: str = "all") -> None:
    """DDP, ZeRO-1 and FSDP2 with adamkit.AdamW (``state_dtypes``: comma-separated, or all),
    and FSDP2 with torch.optim.AdamW, ``steps`` steps each from the same init on the same
    global batches. With all state_dtypes, also the ZeRO-1 reload and column-sharded
    DTensors."""
    rank, world = init()
    n = int(steps)
    everything = state_dtypes == "all"
    dtypes = STATE_DTYPES if everything else [parse_dtype(x) for x in state_dtypes.split(",")]
    results = {"tp": sharded_columns(rank, world)} if everything else {}
    t0 = time.perf_counter()
    for state_dtype in dtypes:
        results["ddp", state_dtype] = run_ddp(state_dtype, n, rank, world)
        results["zero1", state_dtype] = run_zero(state_dtype, n, rank, world, outdir, everything)
        results["fsdp2", state_dtype] = run_fsdp2(state_dtype, n, rank, world)
        print(f"{state_dtype}: {time.perf_counter() - t0:.1f}s", flush=True)
    results["fsdp2-torch", None] = run_fsdp2(None, n, rank, world, torch_adamw=True)
    torch.save(results, outdir / f"parity-rank{rank}.pt")
    dist.destroy_process_group()


def step_forced_fsdp2(state_dtype, n: int, rank: int, world: int) -> dict:
    """One FSDP2 model per backend, stepped side by side; after every step the compiled side's
    params and stored state are overwritten with the eager side's, so that each step starts
    both kernels from the same bits. Per step: the largest relative param difference and,
    for stored tensors, the share of entries that differ and the largest difference (codes
    in levels). One-step parity, free of the drift in which a single rounding decision made
    the other way (an fp32 ulp apart) grows over later steps."""
    from adamkit.storage.shards import local

    sides = {}
    for backend in ("eager", "compiled"):
        model = fsdp2(make_model())
        sides[backend] = model, make_adamkit(model.parameters(), state_dtype, backend=backend)
    worst = {"param": 0.0, "share": 0.0, "levels": 0.0}
    for s in range(n):
        for model, opt in sides.values():
            train_step(model, opt, s, rank, world)
        (me, oe), (mc, oc) = sides["eager"], sides["compiled"]
        for pe, pc in zip(me.parameters(), mc.parameters()):
            a, b = local(pe).detach(), local(pc).detach()
            worst["param"] = max(worst["param"], rel(b, a))
            local(pc).detach().copy_(a)
        for pe, pc in zip(me.parameters(), mc.parameters()):
            se, sc = oe.state[pe], oc.state[pc]
            for key, value in se.items():
                if not isinstance(value, torch.Tensor) or key == "step":
                    continue
                a, b = local(value), local(sc[key])
                diff = (a.float() - b.float()).abs()
                if a.dtype != torch.uint8:  # a moment or a scale: relative to its largest
                    diff = diff / a.float().abs().max().clamp_min(1e-30)
                worst["share"] = max(worst["share"], (diff > 2e-6).float().mean().item())
                worst["levels"] = max(worst["levels"], diff.max().item())
                b.copy_(a)
    plans = oc._executor._plans.values()
    worst["uncompiled"] = sum(len(p.eager) + len(p.failed) for p in plans)
    worst["compiled"] = sum(len({i for c in p.calls for i in c.members}) for p in plans)
    return worst


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def scenario_fsdp2_compiled(outdir: Path, steps: str) -> None:
    """FSDP2 with backend="compiled" and with the eager backend, for each of COMPILED_DTYPES.
    Each rank compiles its kernels on the first step (from inductor's disk cache when the
    single-process tests compiled them before)."""
    rank, world = init()
    n = int(steps)
    results = {}
    for state_dtype in COMPILED_DTYPES:
        results["eager", state_dtype] = run_fsdp2(state_dtype, n, rank, world)
        results["compiled", state_dtype] = run_fsdp2(
            state_dtype, n, rank, world, backend="compiled"
        )
        results["forced", state_dtype] = step_forced_fsdp2(state_dtype, n, rank, world)
    torch.save(results, outdir / f"fsdp2_compiled-rank{rank}.pt")
    dist.destroy_process_group()


def local_state(model: nn.Module, opt) -> dict[tuple[str, str], torch.Tensor]:
    """This rank's stored state, tensor by tensor (codes, scales, local moment shards)."""
    from adamkit.storage.shards import local

    names = {id(p): n for n, p in model.named_parameters()}
    return {
        (names[id(p)], k): local(v).clone()
        for p, st in opt.state.items()
        for k, v in st.items()
        if isinstance(v, torch.Tensor)
    }


def save_checkpoint(model: nn.Module, opt, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def load_checkpoint(model: nn.Module, opt, path: Path, partial: bool = False) -> None:
    """``partial``: keys of the template missing from the checkpoint keep their values (torch's
    param groups hold keys, e.g. ``foreach``, that adamkit's do not)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    planner = DefaultLoadPlanner(allow_partial_load=partial)
    dcp.load(state, checkpoint_id=str(path), planner=planner)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def fresh_fsdp2(state_dtype):
    """An FSDP2 model with other initial values than :func:`make_model` (so that a load that
    did nothing is caught) and a fresh optimizer."""
    model = make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-0.5).add_(0.25)
    model = fsdp2(model)
    return model, make_adamkit(model.parameters(), state_dtype)


def save_resume_round_trip(
    model, opt, fresh, step, state_dtype, path: Path, after: int, rank: int, world: int
) -> dict:
    """Train RESUME_STEP steps with ``step``, save a DCP checkpoint to ``path``, train
    ``after`` more (uninterrupted); load into ``fresh(state_dtype)`` and train the same steps
    (resumed). Results keyed (what, state_dtype)."""
    out = {}
    for s in range(RESUME_STEP):
        step(model, opt, s, rank, world)
    save_checkpoint(model, opt, path)
    saved_local = local_state(model, opt)
    out["saved", state_dtype] = snapshot(model, opt)
    for s in range(RESUME_STEP, RESUME_STEP + after):
        step(model, opt, s, rank, world)
    out["uninterrupted", state_dtype] = snapshot(model, opt)
    model, opt = fresh(state_dtype)
    load_checkpoint(model, opt, path)
    loaded_local = local_state(model, opt)
    out["same-local-state", state_dtype] = sorted(saved_local) == sorted(loaded_local) and all(
        torch.equal(saved_local[k], loaded_local[k]) for k in saved_local
    )
    out["local-keys", state_dtype] = sorted({k for _, k in saved_local})
    for s in range(RESUME_STEP, RESUME_STEP + after):
        step(model, opt, s, rank, world)
    out["resumed", state_dtype] = snapshot(model, opt)
    return out


def round_trips(state_dtypes, make, fresh, step, outdir: Path, prefix: str, after: int) -> dict:
    """:func:`save_resume_round_trip` for each state dtype, on FSDP2 models from ``make``
    (checkpoints in ``outdir / f"{prefix}-{state_dtype}"``)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for state_dtype in state_dtypes:
        model = fsdp2(make())
        opt = make_adamkit(model.parameters(), state_dtype)
        path = outdir / f"{prefix}-{state_dtype}"
        results.update(
            save_resume_round_trip(model, opt, fresh, step, state_dtype, path, after, rank, world)
        )
    return results


def scenario_dcp_save(outdir: Path, after: str) -> None:
    """Per state_dtype: train RESUME_STEP steps, save a DCP checkpoint, train ``after`` more;
    then load the checkpoint into a fresh model and optimizer and train the same steps."""
    rank, _ = init()
    results = round_trips(
        STATE_DTYPES, make_model, fresh_fsdp2, train_step, outdir, "ckpt", int(after)
    )
    torch.save(results, outdir / f"dcp-save-rank{rank}.pt")
    dist.destroy_process_group()


def load_unsharded_export(state_dtype) -> dict:
    """A one-process run's ``export_state_dict`` (torch's layout, full tensors) loaded with
    ``load_state_dict`` into a sharded optimizer: each rank keeps its shard. Returns the
    sharded optimizer's moments (gathered) and the exported ones."""
    import adamkit

    single = make_model()
    single_opt = make_adamkit(single.parameters(), state_dtype)
    for s in range(RESUME_STEP):
        train_step(single, single_opt, s)
    exported = adamkit.export_state_dict(single_opt)
    model, opt = fresh_fsdp2(state_dtype)
    opt.load_state_dict(exported)
    got = snapshot(model, opt)
    names = [n for n, _ in single.named_parameters()]
    want = {
        key: {n: exported["state"][i][key] for i, n in enumerate(names)}
        for key in ("exp_avg", "exp_avg_sq")
    }
    return {"got": {k: got[k] for k in want}, "want": want}


def load_unsharded_codes(state_dtype) -> dict:
    """A one-process run's own ``state_dict`` (codes and scales of the whole tensors) loaded
    with ``load_state_dict`` into a sharded optimizer whose shards start inside blocks: each
    rank decodes the blocks that cover its rows and encodes them in its own blocks. Returns
    the sharded optimizer's moments (gathered), the one-process run's, and the local keys."""
    single = make_model()
    single_opt = make_adamkit(single.parameters(), state_dtype)
    for s in range(RESUME_STEP):
        train_step(single, single_opt, s)
    model, opt = fresh_fsdp2(state_dtype)
    opt.load_state_dict(single_opt.state_dict())
    got, want = snapshot(model, opt), snapshot(single, single_opt)
    keys = sorted({k for _, k in local_state(model, opt)})
    return {"got": {k: got[k] for k in MOMENT_NAMES}, "want": {k: want[k] for k in MOMENT_NAMES},
            "keys": keys}  # fmt: skip


MOMENT_NAMES = ("exp_avg", "exp_avg_sq")


def scenario_dcp_load(outdir: Path, ckpt_root: str, after: str) -> None:
    """Load the checkpoints of :func:`scenario_dcp_save` on this world size (resharding) and
    train the ``after`` steps that followed them."""
    rank, world = init()
    results = {}
    for state_dtype in STATE_DTYPES:
        model, opt = fresh_fsdp2(state_dtype)
        load_checkpoint(model, opt, Path(ckpt_root) / f"ckpt-{state_dtype}")
        results["loaded", state_dtype] = snapshot(model, opt)
        results["local-keys", state_dtype] = sorted({k for _, k in local_state(model, opt)})
        for s in range(RESUME_STEP, RESUME_STEP + int(after)):
            train_step(model, opt, s, rank, world)
        results["trained", state_dtype] = snapshot(model, opt)
        results["full-load", state_dtype] = load_unsharded_export(state_dtype)
        if state_dtype in ("int8", "int4"):
            results["full-codes-load", state_dtype] = load_unsharded_codes(state_dtype)
        if state_dtype in (None, "int8"):  # the checkpoint is torch's layout
            model = fsdp2(make_model())
            opt = torch.optim.AdamW(model.parameters(), **HPARAMS)
            load_checkpoint(model, opt, Path(ckpt_root) / f"ckpt-{state_dtype}", partial=True)
            results["torch-adamw", state_dtype] = snapshot(model, opt)
    torch.save(results, outdir / f"dcp-load-rank{rank}.pt")
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# compact checkpoints: a model whose first weight is checkpointed as codes and scales

WIDE_IN, WIDE_HIDDEN, WIDE_OUT = 256, 64, 70
COMPACT_DTYPES = ("int8", "int4")


def make_wide_model() -> nn.Module:
    """``0.weight`` is 64 x 256: a row is one whole block (256, int8 and int4), so its
    block-wise moments are checkpointed compact on any number of ranks. ``2.weight`` is 70 x
    64 (4480 elements, quantised): its rows split blocks, so it is checkpointed decoded."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(WIDE_IN, WIDE_HIDDEN), nn.Tanh(), nn.Linear(WIDE_HIDDEN, WIDE_OUT)
    )


def wide_step(model: nn.Module, opt, step: int, rank: int = 0, world: int = 1) -> None:
    g = torch.Generator().manual_seed(2000 + step)
    x, y = torch.randn(BATCH, WIDE_IN, generator=g), torch.randn(BATCH, WIDE_OUT, generator=g)
    rows = BATCH // world
    opt.zero_grad(set_to_none=True)
    sl = slice(rank * rows, (rank + 1) * rows)
    nn.functional.mse_loss(model(x[sl]), y[sl]).backward()
    opt.step()


def fresh_wide(state_dtype):
    model = make_wide_model()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-0.5).add_(0.25)
    model = fsdp2(model)
    return model, make_adamkit(model.parameters(), state_dtype)


def train_wide_single(state_dtype, steps: int) -> dict:
    model = make_wide_model()
    opt = make_adamkit(model.parameters(), state_dtype)
    for s in range(steps):
        wide_step(model, opt, s)
    return snapshot(model, opt)


def scenario_dcp_compact_save(outdir: Path, after: str) -> None:
    """The wide model, int8 and int4 state: train RESUME_STEP steps, save, train ``after``
    more; load into a fresh model and optimizer and train the same steps. Then two
    checkpoints in the decoded form (``wide-torch``, ``wide-int8-decoded``)."""
    rank, world = init()
    results = round_trips(
        COMPACT_DTYPES, make_wide_model, fresh_wide, wide_step, outdir, "wide", int(after)
    )
    # checkpoints in the decoded form: of torch.optim.AdamW, and of an adamkit int8 optimizer
    # that presents everything decoded (as adamkit did before the compact form)
    import adamkit.distributed

    for name in ("torch", "int8-decoded"):
        model = fsdp2(make_wide_model())
        if name == "torch":
            opt = torch.optim.AdamW(model.parameters(), **HPARAMS)
        else:
            opt = make_adamkit(model.parameters(), "int8")
        for s in range(RESUME_STEP):
            wide_step(model, opt, s, rank, world)
        compact_layout = adamkit.distributed.compact_layout
        adamkit.distributed.compact_layout = lambda param, codec: None
        try:
            save_checkpoint(model, opt, outdir / f"wide-{name}")
        finally:
            adamkit.distributed.compact_layout = compact_layout
        results["saved", name] = snapshot(model, opt)
    torch.save(results, outdir / f"dcp-compact-save-rank{rank}.pt")
    dist.destroy_process_group()


def load_with_planner(model: nn.Module, opt, path: Path, partial: bool = False) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from adamkit.distributed import LoadPlanner

    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path), planner=LoadPlanner(allow_partial_load=partial))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def scenario_dcp_compact_load(outdir: Path, ckpt_root: str, after: str) -> None:
    """Load the checkpoints of :func:`scenario_dcp_compact_save` on this world size and train
    the ``after`` steps that followed; then load the decoded-form checkpoints into int8
    optimizers (DCP's default planner finds no codes in them, ``adamkit.distributed.
    LoadPlanner`` loads the floats and the optimizer encodes them)."""
    from torch.distributed.checkpoint.api import CheckpointException

    rank, world = init()
    root, results = Path(ckpt_root), {}
    for state_dtype in COMPACT_DTYPES:
        model, opt = fresh_wide(state_dtype)
        load_checkpoint(model, opt, root / f"wide-{state_dtype}")
        results["loaded", state_dtype] = snapshot(model, opt)
        results["local-keys", state_dtype] = sorted({k for _, k in local_state(model, opt)})
        for s in range(RESUME_STEP, RESUME_STEP + int(after)):
            wide_step(model, opt, s, rank, world)
        results["trained", state_dtype] = snapshot(model, opt)
    for name in ("int8-decoded", "torch"):  # the template asks for codes, the file has floats
        model, opt = fresh_wide("int8")
        partial = name == "torch"  # adamkit's group keys (state_dtype, ...) are not in it
        try:
            load_checkpoint(model, opt, root / f"wide-{name}", partial=partial)
            results["default-planner", name] = snapshot(model, opt)
        except CheckpointException as error:  # a BaseException: every rank raises it
            results["default-planner", name] = str(error)
        model, opt = fresh_wide("int8")
        load_with_planner(model, opt, root / f"wide-{name}", partial=partial)
        results["planner", name] = snapshot(model, opt)
        results["planner-keys", name] = sorted({k for _, k in local_state(model, opt)})
    torch.save(results, outdir / f"dcp-compact-load-rank{rank}.pt")
    dist.destroy_process_group()


def main() -> None:
    scenario, outdir, *args = sys.argv[1:]
    globals()[f"scenario_{scenario.replace('-', '_')}"](Path(outdir), *args)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
    _ = shutil  # kept for scenarios that clean up checkpoint directories
    # torch 2.13 + gloo sometimes aborts in interpreter teardown after all work is done
    # ("terminate called without an active exception"): results are on disk, leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
