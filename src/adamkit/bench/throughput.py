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
interleaved within a round so that load from other processes hits all of them alike. Reported:
the median step time as Gparam/s (1e9 params per second), its ratio to torch fused and to torch
foreach, the first-step time, and the kernels compiled while the candidate ran (count and
seconds). A JSON file keeps everything, with the machine and the command.

Each adamkit candidate starts without the kernels compiled in this process (so each shows its
own compile), but inductor's on-disk cache persists: the first compile of a machine is cold,
later ones (the second candidate, the next run) are warm starts. ``adamkit-auto`` is warmed up
until its policy has switched to the compiled kernels (at most ``--auto-steps`` steps); the
step at which it switched is reported.

Timings are of a shared machine: rerun when the ratios look noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import adamkit
from adamkit.execution.compiled import compile_stats, reset_kernels

LAYOUTS = {
    "big": (50_000_000, 33),
    "many": (2000 * 64 * 256, 2000),
}
TORCH_CANDIDATES = ("torch-forloop", "torch-foreach", "torch-fused")
ADAMKIT_CANDIDATES = ("adamkit-eager", "adamkit-auto", "adamkit-compiled")
CANDIDATES = ADAMKIT_CANDIDATES + TORCH_CANDIDATES
DEFAULT_CANDIDATES = ("adamkit-compiled", "adamkit-auto", "adamkit-eager") + TORCH_CANDIDATES


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


def _make_optimizer(name: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    kw = {"lr": 1e-3, "weight_decay": 1e-2}
    if name.startswith("adamkit-"):
        return adamkit.AdamW(params, backend=name.removeprefix("adamkit-"), **kw)
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


@dataclass
class Result:
    candidate: str
    layout: str
    numel: int
    tensors: int
    step_s: list[float] = field(default_factory=list)
    first_step_s: float = 0.0
    compiles: int = 0
    compile_s: float = 0.0
    graphs: int = 0
    switched_at: int | None = None
    note: str = ""

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s) if self.step_s else float("nan")

    @property
    def gparams(self) -> float:
        return self.numel / self.median_s / 1e9


class _Candidate:
    def __init__(self, name: str, shapes: list, grads: list[torch.Tensor], device: str):
        gen = torch.Generator().manual_seed(0)
        self.params = [
            torch.randn(s, generator=gen).to(device).requires_grad_(True) for s in shapes
        ]
        for p, g in zip(self.params, grads):
            p.grad = g
        self.name = name
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

    def note(self, switched_at: int | None) -> str:
        if self.name != "adamkit-auto":
            return ""
        if switched_at is not None:
            return f"compiled from step {switched_at}"
        return "uncompiled" if not self.compiling else "compiled"


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
    """Time ``candidates`` on one layout; see the module docstring for the protocol."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    gen = torch.Generator().manual_seed(1)
    grads = [(torch.randn(s, generator=gen) * 1e-2).to(device) for s in shapes]
    numel = sum(g.numel() for g in grads)
    runs: list[tuple[_Candidate, Result]] = []
    for name in candidates:
        if name.startswith("adamkit-"):
            reset_kernels()  # each candidate compiles for itself (inductor's disk cache stays)
        before = (compile_stats().compiles, compile_stats().seconds, _dynamo_graphs())
        cand = _Candidate(name, shapes, grads, device)
        result = Result(name, layout, numel, len(shapes))
        result.first_step_s = cand.step(sync)
        for _ in range(warmup):
            cand.step(sync)
        if name == "adamkit-auto":
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
        runs.append((cand, result))
        log(f"  {layout}: {name} ready (first step {result.first_step_s:.2f} s)")
    for _ in range(repeats):
        for cand, result in runs:
            result.step_s.append(cand.step(sync))
    for cand, result in runs:
        result.note = cand.note(result.switched_at)
    return [result for _, result in runs]


def _ratio(result: Result, results: list[Result], name: str) -> float | None:
    ref = next((r for r in results if r.candidate == name), None)
    return None if ref is None else ref.median_s / result.median_s


def table_rows(results: list[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        fused = _ratio(r, results, "torch-fused")
        foreach = _ratio(r, results, "torch-foreach")
        rows.append(
            [
                r.layout,
                r.candidate,
                f"{r.gparams:.3f}",
                "-" if fused is None else f"{fused:.2f}x",
                "-" if foreach is None else f"{foreach:.2f}x",
                f"{r.median_s * 1e3:.1f}",
                f"{r.first_step_s:.2f}",
                f"{r.compiles} ({r.compile_s:.1f} s)" if r.compiles else "0",
                r.note,
            ]
        )
    return rows


HEADER = [
    "layout",
    "optimizer",
    "Gparam/s",
    "vs fused",
    "vs foreach",
    "step ms",
    "first step s",
    "compiles",
    "note",
]


def render(rows: list[list[str]], title: str) -> str:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return _plain(rows, title)
    table = Table(title=title)
    for name in HEADER:
        table.add_column(
            name, justify="left" if name in ("layout", "optimizer", "note") else "right"
        )
    for row in rows:
        table.add_row(*row)
    console = Console(width=160, record=True, force_terminal=False)
    with console.capture() as capture:
        console.print(table)
    return capture.get()


def _plain(rows: list[list[str]], title: str) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(HEADER, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


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
    ap.add_argument("--params", type=int, help="params of the custom layout")
    ap.add_argument("--tensors", type=int, help="tensors of the custom layout")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    ap.add_argument(
        "--auto-steps", type=int, default=200, help="most steps to wait for auto to compile"
    )
    ap.add_argument(
        "--backends",
        default=",".join(DEFAULT_CANDIDATES),
        help=f"comma list of {', '.join(CANDIDATES)} (adamkit-* may be given as eager, ...)",
    )
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument(
        "--monitor",
        action="store_true",
        help="instead: the cost of adamkit.Monitor every step and every 10 steps, per backend",
    )
    return ap


def monitor_overhead(args: argparse.Namespace) -> int:
    """Print what a Monitor sampling every step / every 10 steps adds to a step, per backend."""
    from adamkit.diagnostics.overhead import measure, transformer_like_params
    from adamkit.optim import AdamW

    rows = {}
    for backend in ("eager", "compiled"):
        params = transformer_like_params(device=args.device)
        result = measure(
            lambda ps, backend=backend: AdamW(ps, lr=1e-4, backend=backend),
            params,
            every=(1, 10),
            steps=20,
            repeats=args.repeats,
        )
        rows[backend] = result
        mon = result["monitored"]
        print(
            f"monitor overhead, backend={backend}: {result['params'] / 1e6:.1f}M params in "
            f"{result['tensors']} tensors, plain step {result['plain_s'] * 1e3:.2f} ms; "
            f"every step +{mon[1]['overhead']:.1%} (hooks {mon[1]['hook_overhead']:.1%}), "
            f"every 10 steps +{mon[10]['overhead']:.1%} (hooks {mon[10]['hook_overhead']:.1%})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=str)
    return 0


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
    if args.monitor:
        return monitor_overhead(args)
    if args.params or args.tensors:
        layouts = ["custom"] if args.layouts == "big,many" else args.layouts.split(",")
    else:
        layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    candidates = _candidates(args.backends)
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
    if args.json:
        payload = {
            "command": "adamkit bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": info,
            "device": args.device,
            "results": [
                {**asdict(r), "median_s": r.median_s, "gparams_per_s": r.gparams} for r in results
            ],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
