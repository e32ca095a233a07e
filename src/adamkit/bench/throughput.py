"""Optimizer-step throughput: adamkit's backends against torch's AdamW, side by side.

``python -m adamkit.bench.throughput`` (``adamkit bench``) measures, in one process and on the
same gradients, ``optimizer.step()`` of adamkit.AdamW with each backend and of
``torch.optim.AdamW`` as for-loop, foreach and fused, on the layouts of REFERENCE.md section 4:

- ``big``: 50M params in 33 tensors;
- ``many``: 32.8M params in 2000 tensors of 64x256;
- ``custom``: ``--params N --tensors K`` (K tensors of N/K elements).

Each candidate gets its own params and state (the grads are shared: Adam only reads them). The
first step is timed on its own (it holds the compile of the compiled backend); then every
candidate runs ``--warmup`` steps and ``--repeats`` rounds of one step each, the candidates
interleaved within a round so that load from other processes hits all of them alike, their
order drawn afresh each round (:func:`rounds`) so that none always follows the same one.
Reported:
the median step time as Gparam/s (1e9 params per second), its ratio to torch fused and to torch
foreach, the first-step time, and the kernels compiled while the candidate ran (count and
seconds). A JSON file keeps everything, with the machine and the command.

Each adamkit candidate starts without the kernels compiled in this process (so each shows its
own compile), but inductor's on-disk cache persists: the first compile of a machine is cold,
later ones (the second candidate, the next run) are warm starts. ``adamkit-auto`` is warmed up
until its policy has switched to the compiled kernels (at most ``--auto-steps`` steps); the
step at which it switched is reported.

Lean optimizer state (``--state-dtype bfloat16,int8,int4``): each adamkit backend runs once
more per state dtype, in the same interleaved rounds. Every row shows its state bytes per
param (``adamkit.memory_report``; for third-party optimizers the state tensors as allocated)
and how many of the layout's tensors are really stored in the requested format: adamkit keeps
tensors under ``min_quantized_size`` (default 4096 elements) in fp32 and says so, and so do the
anchors, silently. With int8 in the list, bitsandbytes' AdamW8bit is timed as an optional
anchor (``--anchors``; torchao's 8- and 4-bit AdamW on request), and the int8/int4 rows show
their ratio to it. An anchor that does not import or run here is skipped with a note.

Timings are of a shared machine: rerun when the ratios look noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import adamkit
from adamkit.bench import anchors
from adamkit.bench.throughput_results import (
    Result,
    format_notes,
    ratios,
    render,
    skip_notes,
    table_rows,
)
from adamkit.cli import at_least
from adamkit.execution.compiled import compile_stats, reset_kernels
from adamkit.storage.select import STATE_DTYPES as _ALL_STATE_DTYPES

LAYOUTS = {
    "big": (50_000_000, 33),
    "many": (2000 * 64 * 256, 2000),
}
TORCH_CANDIDATES = ("torch-forloop", "torch-foreach", "torch-fused")
ADAMKIT_CANDIDATES = ("adamkit-eager", "adamkit-auto", "adamkit-compiled")
CANDIDATES = ADAMKIT_CANDIDATES + TORCH_CANDIDATES
DEFAULT_CANDIDATES = ("adamkit-compiled", "adamkit-auto", "adamkit-eager") + TORCH_CANDIDATES
STATE_DTYPES = tuple(d for d in _ALL_STATE_DTYPES if d is not None)
"""``--state-dtype`` values; an adamkit candidate with one is named ``adamkit-compiled:int8``."""


def layout_shapes(name: str, params: int | None = None, tensors: int | None = None) -> list:
    """Tensor shapes of a layout (``custom``: ``tensors`` tensors of ``params // tensors``)."""
    if name == "many":
        return [(64, 256)] * 2000
    if name == "big":
        total, count = LAYOUTS["big"]
        return [(total // count,)] * count
    if name == "custom":
        if not params or not tensors:
            raise ValueError("the custom layout needs --params and --tensors")
        return [(max(1, params // tensors),)] * tensors
    raise ValueError(f"unknown layout {name!r}")


def expand_candidates(
    names: Sequence[str], state_dtypes: Sequence[str] = (), anchor_names: Sequence[str] = ()
) -> list[str]:
    """``names`` with each adamkit backend followed by its ``:state_dtype`` variants, then the
    anchors (keys of :data:`anchors.ANCHORS`)."""
    out: list[str] = []
    for name in names:
        out.append(name)
        if name.startswith("adamkit-"):
            out += [f"{name}:{dtype}" for dtype in state_dtypes]
    return out + [a for a in anchor_names if a not in out]


def split_candidate(candidate: str) -> tuple[str, str | None]:
    """``"adamkit-compiled:int8"`` -> ``("adamkit-compiled", "int8")``."""
    name, _, state_dtype = candidate.partition(":")
    return name, state_dtype or None


def _make_optimizer(candidate: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    kw = {"lr": 1e-3, "weight_decay": 1e-2}
    name, state_dtype = split_candidate(candidate)
    if name.startswith("adamkit-"):
        backend = name.removeprefix("adamkit-")
        return adamkit.AdamW(params, backend=backend, state_dtype=state_dtype, **kw)
    if name in anchors.ANCHORS:
        return anchors.make_optimizer(name, params, **kw)
    if name == "torch-forloop":
        return torch.optim.AdamW(params, foreach=False, **kw)
    if name == "torch-foreach":
        return torch.optim.AdamW(params, foreach=True, **kw)
    if name == "torch-fused":
        return torch.optim.AdamW(params, fused=True, **kw)
    raise ValueError(f"unknown candidate {name!r}")


def _dynamo_graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - counters are an internal detail
        return 0


class _Candidate:
    def __init__(self, name: str, shapes: list, grads: list[torch.Tensor], device: str):
        gen = torch.Generator().manual_seed(0)
        self.params = [
            torch.randn(s, generator=gen).to(device).requires_grad_(True) for s in shapes
        ]
        for p, g in zip(self.params, grads):
            p.grad = g
        self.name = name
        self.backend, self.state_dtype = split_candidate(name)
        self.opt = _make_optimizer(name, self.params)

    def step(self, sync: Callable[[], None]) -> float:
        sync()
        start = time.perf_counter()
        self.opt.step()
        sync()
        return time.perf_counter() - start

    @property
    def compiling(self) -> bool:
        executor = getattr(self.opt, "_executor", None)
        return executor is not None and executor.compiling

    def describe(self, result: Result) -> None:
        """Fill in the row's name, state format and bytes, and its note."""
        anchor = anchors.ANCHORS.get(self.backend)
        numel = sum(p.numel() for p in self.params)
        notes = []
        if anchor is not None:
            result.label = anchor.label
            result.state = anchors.quantised_format(self.backend)
            result.formats = dict(anchors.state_formats(self.backend, self.opt))
            result.state_bytes_per_param = anchors.state_bytes(self.opt) / numel
        else:
            result.state = self.state_dtype or "float32"
            report = adamkit.memory_report(self.opt)
            result.state_bytes_per_param = report.bytes_per_param
            if self.backend.startswith("adamkit-"):
                result.formats = dict(Counter(t.format for t in report.tensors))
                notes += sorted({t.reason for t in report.tensors if t.format != result.state})
            else:
                kinds = (str(s["exp_avg"].dtype) for s in self.opt.state.values())
                result.formats = dict(Counter(k.removeprefix("torch.") for k in kinds))
        if self.backend == "adamkit-auto":
            at = result.switched_at
            notes.insert(0, f"compiled from step {at}" if at else "uncompiled")
        uncompiled = self._uncompiled()
        if uncompiled and self.compiling:
            notes.append(f"{uncompiled}/{len(self.params)} tensors uncompiled")
        if anchor is not None and not result.fully_quantised:
            kept = len(self.params) - result.formats.get(result.state, 0)
            notes.append(f"kept {kept}/{len(self.params)} in fp32: not a low-bit reference")
        result.note = "; ".join(notes)

    def _uncompiled(self) -> int:
        """Params the compiled executor stepped uncompiled (0 if it cannot tell)."""
        plans = getattr(getattr(self.opt, "_executor", None), "_plans", None) or {}
        return sum(
            len(getattr(p, "eager", ())) + len(getattr(p, "failed", ())) for p in plans.values()
        )


def _prepare(
    name: str, layout: str, shapes: list, grads: list, device: str, sync, warmup: int, auto_steps
) -> tuple[_Candidate | None, Result]:
    """Build a candidate, time its first step and warm it up (auto: until it compiles)."""
    result = Result(name, layout, sum(g.numel() for g in grads), len(shapes))
    if name.startswith("adamkit-"):
        reset_kernels()  # each candidate compiles for itself (inductor's disk cache stays)
    before = (compile_stats().compiles, compile_stats().seconds, _dynamo_graphs())
    try:
        cand = _Candidate(name, shapes, grads, device)
        result.first_step_s = cand.step(sync)
    except Exception as e:  # noqa: BLE001 - an optional anchor may fail in many ways
        if name not in anchors.ANCHORS:
            raise
        result.label = anchors.ANCHORS[name].label
        if isinstance(e, anchors.Unavailable):
            result.skipped = str(e)
        else:
            result.skipped = f"fails on {device}: {type(e).__name__}: {e}"
        return None, result
    for _ in range(warmup):
        cand.step(sync)
    if cand.backend == "adamkit-auto":
        steps = 1 + warmup
        while not cand.compiling and steps < auto_steps:
            cand.step(sync)
            steps += 1
        if cand.compiling:
            result.switched_at = steps + 1  # the next step compiles and runs compiled
            for _ in range(warmup):
                cand.step(sync)
    stats = compile_stats()
    result.compiles = stats.compiles - before[0]
    result.compile_s = stats.seconds - before[1]
    result.graphs = _dynamo_graphs() - before[2]
    return cand, result


def run_layout(
    layout: str,
    shapes: list,
    candidates: Sequence[str],
    *,
    device: str = "cpu",
    warmup: int = 3,
    repeats: int = 7,
    auto_steps: int = 200,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Time ``candidates`` on one layout; see the module docstring for the protocol.

    An anchor that cannot run comes back with ``skipped`` set and no timings."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    gen = torch.Generator().manual_seed(1)
    grads = [(torch.randn(s, generator=gen) * 1e-2).to(device) for s in shapes]
    runs: list[tuple[_Candidate, Result]] = []
    results: list[Result] = []
    for name in candidates:
        cand, result = _prepare(name, layout, shapes, grads, device, sync, warmup, auto_steps)
        results.append(result)
        if cand is None:
            log(f"  {layout}: {name} skipped ({result.skipped})")
            continue
        runs.append((cand, result))
        log(f"  {layout}: {name} ready (first step {result.first_step_s:.2f} s)")
    for order in rounds(len(runs), repeats):
        for k in order:
            cand, result = runs[k]
            result.step_s.append(cand.step(sync))
    for cand, result in runs:
        cand.describe(result)
    return results


def rounds(candidates: int, repeats: int, seed: int = 0) -> list[list[int]]:
    """The order of the candidates in each timed round: every candidate once a round, in an
    order drawn afresh each round (seeded: the same for the same arguments).

    A step's time depends on the step before it: on this project's VM an int4 step on 50M
    params read about 0.8 ms (3%) slower right after torch's fused step than right after
    another adamkit step (docs/benchmarks.md, session 21). A fixed order, rotated or not,
    gives each candidate the same predecessor every round and tilts its ratio."""
    draw = random.Random(seed)
    return [draw.sample(range(candidates), candidates) for _ in range(repeats)]


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "adamkit": adamkit.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="adamkit bench", description="optimizer-step throughput, adamkit vs torch AdamW"
    )
    ap.add_argument("--layouts", default="big,many", help="comma list of big, many, custom")
    ap.add_argument("--params", type=at_least(1), help="params of the custom layout")
    ap.add_argument("--tensors", type=at_least(1), help="tensors of the custom layout")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--repeats", type=at_least(1), default=7, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=at_least(0), default=3, help="untimed steps after the first")
    ap.add_argument(
        "--auto-steps",
        type=at_least(0),
        default=200,
        help="most steps to wait for auto to compile",
    )
    ap.add_argument(
        "--backends",
        default=",".join(DEFAULT_CANDIDATES),
        help=f"comma list of {', '.join(CANDIDATES)} (adamkit-* may be given as eager, ...)",
    )
    ap.add_argument(
        "--state-dtype",
        type=_state_dtypes,
        default=(),
        metavar="LIST",
        help=f"comma list of {', '.join(STATE_DTYPES)}: a row per adamkit backend and state "
        "dtype, besides the default (moments in the param's dtype)",
    )
    ap.add_argument(
        "--anchors",
        type=_anchor_names,
        default=None,
        metavar="LIST",
        help=f"optional low-bit anchors, comma list of {', '.join(anchors.PACKAGES)} or none "
        "(default: bnb when --state-dtype has int8); skipped with a note where they cannot run",
    )
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument(
        "--monitor",
        action="store_true",
        help="instead: the cost of adamkit.Monitor every step and every 10 steps, per backend",
    )
    return ap


def _monitored_adamw(params: list, backend: str):
    """AdamW for the Monitor's overhead: with the compiled kernels' norms from the first
    sampled step (``fused_signals=True``), the steady state of a run long enough for "auto"
    to have compiled them."""
    from adamkit.optim import AdamW

    opt = AdamW(params, lr=1e-4, backend=backend)
    opt.fused_signals = True
    return opt


def monitor_overhead(args: argparse.Namespace) -> int:
    """Print what a Monitor sampling every step / every 10 steps adds to a step, per backend,
    on the default transformer-shaped params; then, compiled, on the same 35 tensors four
    times wider (67M params): a sampled step's cost is per tensor (a sample of each and a
    record row), the step's is per parameter."""
    from adamkit.diagnostics.monitor import EXACT_MODES
    from adamkit.diagnostics.overhead import measure, transformer_like_params

    runs = [(backend, exact, {}) for backend in ("eager", "compiled") for exact in EXACT_MODES]
    runs.append(("compiled", "all", {"width": 1024, "vocab": 16384}))
    rows = {}
    for backend, exact, shape in runs:  # exact: what a sampled step reads in full
        params = transformer_like_params(device=args.device, **shape)
        result = measure(
            lambda ps, backend=backend: _monitored_adamw(ps, backend),
            params,
            every=(1, 10),
            steps=20,
            repeats=args.repeats,
            monitor_kwargs={"exact": exact},
        )
        wide = ", width=1024" if shape else ""
        rows[f"{backend}/exact={exact}{wide}"] = result
        mon = result["monitored"]
        # a sampled step (every step): the hooks' host time and the rest (the signal kernels)
        hooks_ms = mon[1]["hook_s"] * 1e3
        rest_ms = (mon[1]["overhead"] - mon[1]["hook_overhead"]) * result["plain_s"] * 1e3
        print(
            f"monitor overhead, backend={backend}, exact={exact}{wide}: "
            f"{result['params'] / 1e6:.1f}M params in {result['tensors']} tensors, plain "
            f"step {result['plain_s'] * 1e3:.2f} ms; every step {mon[1]['overhead']:+.1%} "
            f"(hooks {mon[1]['hook_overhead']:.1%}), every 10 steps "
            f"{mon[10]['overhead']:+.1%} (hooks {mon[10]['hook_overhead']:.1%}); a sampled "
            f"step: hooks {hooks_ms:.2f} ms, the rest of the step {rest_ms:+.2f} ms"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=str)
    return 0


def _comma_list(value: str, known: Sequence[str], what: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(map(repr, unknown))}; choose from {', '.join(known)}"
        )
    return names


def _state_dtypes(value: str) -> tuple[str, ...]:
    return _comma_list(value, STATE_DTYPES, "state dtype")


def _anchor_names(value: str) -> tuple[str, ...]:
    names = _comma_list(value, (*anchors.PACKAGES, "none"), "anchor")
    return tuple(a for name in names if name != "none" for a in anchors.PACKAGES[name])


def _candidates(value: str) -> list[str]:
    names = []
    for name in (n.strip() for n in value.split(",") if n.strip()):
        if name in ("eager", "auto", "compiled"):
            name = f"adamkit-{name}"
        if name not in CANDIDATES:
            raise SystemExit(f"adamkit bench: unknown backend {name!r}; choose from {CANDIDATES}")
        names.append(name)
    return names


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("adamkit bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.json:  # where the results go must take them, before minutes of timing
        target = Path(args.json)
        if target.is_dir() or not os.access(target.parent, os.W_OK):
            print(f"adamkit bench: cannot write --json {args.json!r}", file=sys.stderr)
            return 2
    if args.monitor:
        return monitor_overhead(args)
    if args.params or args.tensors:
        layouts = ["custom"] if args.layouts == "big,many" else args.layouts.split(",")
    else:
        layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    for name in layouts:  # every layout is checked before the first one runs
        try:
            layout_shapes(name, args.params, args.tensors)
        except ValueError as e:
            print(f"adamkit bench: --layouts {args.layouts!r}: {e}", file=sys.stderr)
            return 2
    anchor_names = args.anchors
    if anchor_names is None:  # default: bitsandbytes next to adamkit's int8 rows
        anchor_names = anchors.PACKAGES["bnb"] if "int8" in args.state_dtype else ()
    backends = _candidates(args.backends)
    if args.state_dtype and not any(b.startswith("adamkit-") for b in backends):
        print(
            "adamkit bench: --state-dtype needs an adamkit backend in --backends", file=sys.stderr
        )
        return 2
    candidates = expand_candidates(backends, args.state_dtype, anchor_names)
    results: list[Result] = []
    for layout in layouts:
        shapes = layout_shapes(layout, args.params, args.tensors)
        numel = sum(int(torch.Size(s).numel()) for s in shapes)
        print(f"{layout}: {numel / 1e6:.1f}M params in {len(shapes)} tensors on {args.device}")
        results += run_layout(
            layout,
            shapes,
            candidates,
            device=args.device,
            warmup=args.warmup,
            repeats=args.repeats,
            auto_steps=args.auto_steps,
            log=lambda msg: print(msg, flush=True),
        )
    info = machine()
    rows = []
    for layout in layouts:
        rows += table_rows([r for r in results if r.layout == layout])
    title = (
        f"AdamW step throughput ({info['cpu']}, {info['torch_threads']} threads, torch "
        f"{info['torch']}, median of {args.repeats})"
    )
    print(render(rows, title))
    notes = format_notes(results) + skip_notes(results)
    for line in notes:
        print(line)
    if args.json:
        payload = {
            "command": "adamkit bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": info,
            "device": args.device,
            "state_dtypes": list(args.state_dtype),
            "anchors": list(anchor_names),
            "notes": notes,
            "results": [
                {
                    **asdict(r),
                    "median_s": r.median_s if r.step_s else None,
                    "gparams_per_s": r.gparams if r.step_s else None,
                    "ratios": ratios(r, results),
                }
                for r in results
            ],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
