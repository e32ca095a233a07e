"""One command that checks the compiled backend on a GPU: parity, throughput, copy bandwidth.

``benchmarks/gpu_check.sh`` runs ``python -m adamkit.bench.gpu_check``. On a machine with CUDA
it does, in one process and in well under five minutes:

1. **parity**: adamkit.AdamW/Adam with ``backend="compiled"`` against ``backend="eager"`` on the
   device, 50 steps, for every config of the issue (defaults, lr=1e-2, weight_decay=0.1,
   wd+maximize, amsgrad, Adam with L2, two groups, grad None on some steps, bf16 params), the
   largest relative error (max |compiled - eager| / max |eager| per tensor) of any step;
2. **throughput**: adamkit compiled and auto against torch AdamW fused and foreach on the
   device, on the two layouts of REFERENCE.md (50M params in 33 tensors; 2000 tensors of
   64x256), via :mod:`adamkit.bench.throughput`;
3. **bandwidth**: a device-to-device copy of 1 GiB, timed in the same run, as bytes read plus
   written per second; with 28 B per fp32 param it gives the floor in Gparam/s the Adam step
   could reach;
4. **lean state**: adamkit compiled with ``--state-dtype`` states (default int8) next to
   bitsandbytes' AdamW8bit where it installs and runs on the device (issue 5: int8 >= 1.0x
   bitsandbytes on GPU), in the same throughput runs: the table's "vs low-bit" column.

Without CUDA (or with ``--device cpu``) the same code runs on CPU tensors with small sizes: the
argument handling and the parity check are exercised everywhere. Results go to stdout and to
``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

import adamkit
from adamkit.bench import anchors, throughput
from adamkit.execution.compiled import compile_stats

PARITY_TOLERANCE = 2e-6
BF16_TOLERANCE = 2.0**-7  # one bf16 ulp of the largest element: rounding of fp32 results that
# differ in the last bit (FMA contraction) can land one bf16 ulp apart

CONFIGS: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    # name, class, kwargs, extras (dtype, groups, grad_none_every)
    ("defaults", "AdamW", {}, {}),
    ("lr=1e-2", "AdamW", {"lr": 1e-2}, {}),
    ("weight_decay=0.1", "AdamW", {"lr": 1e-2, "weight_decay": 0.1}, {}),
    ("wd+maximize", "AdamW", {"lr": 1e-2, "weight_decay": 0.1, "maximize": True}, {}),
    ("amsgrad", "AdamW", {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.05}, {}),
    ("adam+L2", "Adam", {"lr": 1e-2, "weight_decay": 0.1}, {}),
    (
        "two groups",
        "AdamW",
        {"lr": 1e-2},
        {"groups": {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.3}},
    ),
    ("grad None", "AdamW", {"lr": 1e-2, "weight_decay": 0.1}, {"grad_none_every": 3}),
    ("bf16", "AdamW", {"lr": 1e-2, "weight_decay": 0.1}, {"dtype": torch.bfloat16}),
]

PARITY_SHAPES = [(7, 5), (13,), (64, 80), (3000,), (33, 129), (2,), (5, 4, 3)]


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item() if b.numel() else 0.0
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def parity(device: str, steps: int = 50) -> list[dict[str, Any]]:
    """Compiled vs eager on ``device``: the worst relative error of each config."""
    out = []
    for name, cls_name, kwargs, extra in CONFIGS:
        dtype = extra.get("dtype", torch.float32)
        gen = torch.Generator().manual_seed(0)
        base = [torch.randn(s, generator=gen) for s in PARITY_SHAPES]
        runs = {}
        for backend in ("compiled", "eager"):
            params = [b.to(device, dtype, copy=True).requires_grad_() for b in base]
            groups: list[dict[str, Any]] = [{"params": params}]
            if "groups" in extra:
                half = len(params) // 2
                groups = [{"params": params[:half]}, {"params": params[half:], **extra["groups"]}]
            opt = getattr(adamkit, cls_name)(groups, backend=backend, **kwargs)
            runs[backend] = (params, opt)
        worst = 0.0
        for step in range(1, steps + 1):
            gen = torch.Generator().manual_seed(1000 + step)
            grads = [torch.randn(s, generator=gen) for s in PARITY_SHAPES]
            every = extra.get("grad_none_every", 0)
            for i, g in enumerate(grads):
                skip = every and i == 1 and step % every == 0
                for params, _ in runs.values():
                    params[i].grad = None if skip else g.to(device, dtype)
            for _, opt in runs.values():
                opt.step()
            (ours, opt_c), (ref, opt_e) = runs["compiled"], runs["eager"]
            for p, q in zip(ours, ref):
                worst = max(worst, _relative_error(p, q))
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    if key in opt_e.state.get(q, {}):
                        worst = max(
                            worst, _relative_error(opt_c.state[p][key], opt_e.state[q][key])
                        )
        tol = BF16_TOLERANCE if dtype == torch.bfloat16 else PARITY_TOLERANCE
        out.append({"config": name, "worst_relative_error": worst, "tolerance": tol})
        status = "ok" if worst <= tol else "FAIL"
        print(f"  parity {name:18s} worst {worst:.3g} (tolerance {tol:.3g}) {status}", flush=True)
    return out


def copy_bandwidth(device: str, nbytes: int, repeats: int = 10) -> dict[str, float]:
    """Bytes read + written per second by ``dst.copy_(src)`` on ``device`` (median)."""
    n = nbytes // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    times = sorted(times[2:])
    seconds = times[len(times) // 2]
    rate = 2 * n * 4 / seconds
    return {
        "bytes": 2 * n * 4,
        "seconds": seconds,
        "bytes_per_s": rate,
        "adam_fp32_floor": rate / 28,
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--steps", type=int, default=50, help="parity steps per config")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds of the throughput run")
    ap.add_argument("--small", action="store_true", help="small layouts (default on CPU)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument(
        "--state-dtype",
        default="int8",
        help="comma list of lean states also timed compiled (default int8; none: skip)",
    )
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available", file=sys.stderr)
        return 2
    lean = tuple(d.strip() for d in args.state_dtype.split(",") if d.strip() not in ("", "none"))
    unknown = [d for d in lean if d not in throughput.STATE_DTYPES]
    if unknown:
        print(
            f"gpu_check: unknown --state-dtype {', '.join(map(repr, unknown))}; choose from "
            f"{', '.join(throughput.STATE_DTYPES)} or none",
            file=sys.stderr,
        )
        return 2
    small = args.small or not device.startswith("cuda")
    start = time.perf_counter()
    print(f"gpu_check on {device}" + (" (small sizes)" if small else ""), flush=True)
    report: dict[str, Any] = {"device": device, "machine": throughput.machine()}
    report["parity"] = parity(device, args.steps)
    report["bandwidth"] = copy_bandwidth(device, (64 << 20) if small else (1 << 30))
    bw = report["bandwidth"]
    print(
        f"  copy {bw['bytes'] / 1e9:.2f} GB: {bw['bytes_per_s'] / 1e9:.1f} GB/s read+write "
        f"-> fp32 Adam floor {bw['adam_fp32_floor'] / 1e9:.1f} Gparam/s",
        flush=True,
    )
    if not args.skip_throughput:
        layouts = (
            [("big", [(1_000_000,)] * 8), ("many", [(16, 64)] * 200)]
            if small
            else [(name, throughput.layout_shapes(name)) for name in ("big", "many")]
        )
        candidates = throughput.expand_candidates(
            ("adamkit-compiled",), lean, anchors.PACKAGES["bnb"] if "int8" in lean else ()
        )
        candidates = ["adamkit-compiled", "adamkit-auto", "torch-fused", "torch-foreach"] + [
            c for c in candidates if c != "adamkit-compiled"
        ]
        results = []
        for name, shapes in layouts:
            results += throughput.run_layout(
                name, shapes, candidates, device=device, repeats=args.repeats
            )
        rows = []
        for name, _ in layouts:
            rows += throughput.table_rows([r for r in results if r.layout == name])
        print(throughput.render(rows, f"throughput on {device}"))
        for line in throughput.format_notes(results) + throughput.skip_notes(results):
            print(line)
        report["throughput"] = [
            {
                "layout": r.layout,
                "candidate": r.candidate,
                "state": r.state,
                "skipped": r.skipped,
                "gparams_per_s": r.gparams,
                "median_s": r.median_s,
                "first_step_s": r.first_step_s,
                "compiles": r.compiles,
            }
            for r in results
        ]
    stats = compile_stats()
    report["compiles"] = {"count": stats.compiles, "seconds": stats.seconds}
    report["seconds"] = time.perf_counter() - start
    failed = [p["config"] for p in report["parity"] if p["worst_relative_error"] > p["tolerance"]]
    report["ok"] = not failed
    print(
        f"gpu_check: {'parity FAILED for ' + ', '.join(failed) if failed else 'parity ok'}; "
        f"{stats.compiles} kernels compiled in {stats.seconds:.1f} s; "
        f"total {report['seconds']:.0f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
