"""Step times by memory state: many short rounds, grouped by how long torch's fused step took.

::

    python -m adamkit.bench.states --seconds 200 --layout big

The project's VM moves between memory states within minutes (torch's fused AdamW on 50M params
takes 17-19 ms in the fast one and 25-31 ms in the slow one), and a bench run of 7 rounds
usually sits in one of them. This tool steps torch's fused AdamW and adamkit's compiled AdamW
in each state dtype once a round, in an order drawn anew every round (seeded; a step's time
depends on the step before it: :func:`adamkit.bench.throughput.rounds`), for ``seconds``
seconds, then groups the rounds by torch's time that round and prints, per group, the median
step time of each optimizer and the median over the rounds of torch's time / ours (a ratio
paired within each round, so a state change between rounds does not enter it).
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence

import numpy as np
import torch

ANCHOR = "torch-fused"
EDGES_MS = (20.0, 24.0)  # the groups: torch's step under 20 ms, 20-24 ms, 24 ms and above


def make_optimizer(kind: str, shapes: Sequence[tuple[int, ...]], seed: int = 0):
    """``kind`` is ``torch-fused`` or a state dtype of adamkit's compiled AdamW (``float32``
    is the default: moments in the param's dtype); params and grads are seeded normals."""
    from adamkit.optim import AdamW

    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g))
        p.grad = torch.randn(shape, generator=g)
        params.append(p)
    if kind == ANCHOR:
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    state = None if kind == "float32" else kind
    return AdamW(params, lr=1e-3, backend="compiled", state_dtype=state)


def run(
    kinds: Sequence[str], shapes: Sequence[tuple[int, ...]], seconds: float, seed: int = 0
) -> list[dict[str, float]]:
    """Rounds of one timed step of each of ``kinds`` (the anchor included by the caller),
    in a drawn order, for ``seconds`` (at least one round); each round is a dict kind -> ms."""
    optimizers = {kind: make_optimizer(kind, shapes) for kind in kinds}
    for opt in optimizers.values():  # compile and warm up
        opt.step()
        opt.step()
    draw = random.Random(seed)
    rows: list[dict[str, float]] = []
    end = time.perf_counter() + seconds
    while not rows or time.perf_counter() < end:
        row = {}
        for kind in draw.sample(list(kinds), len(kinds)):
            start = time.perf_counter()
            optimizers[kind].step()
            row[kind] = (time.perf_counter() - start) * 1e3
        rows.append(row)
    return rows


def summarize(
    rows: Sequence[dict[str, float]], edges: Sequence[float] = EDGES_MS
) -> list[dict[str, object]]:
    """Per group of rounds (by the anchor's time, split at ``edges`` ms): ``low``, ``high``,
    ``rounds``, ``median_ms`` (kind -> median step time) and ``ratio`` (kind -> median over the
    rounds of anchor ms / kind ms); groups without rounds are left out."""
    bounds = [0.0, *edges, float("inf")]
    out = []
    for low, high in zip(bounds, bounds[1:]):
        group = [r for r in rows if low <= r[ANCHOR] < high]
        if not group:
            continue
        kinds = list(group[0])
        out.append(
            {
                "low": low,
                "high": high,
                "rounds": len(group),
                "median_ms": {k: float(np.median([r[k] for r in group])) for k in kinds},
                "ratio": {
                    k: float(np.median([r[ANCHOR] / r[k] for r in group]))
                    for k in kinds
                    if k != ANCHOR
                },
            }
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from adamkit.bench.throughput import layout_shapes

    parser = argparse.ArgumentParser(
        prog="python -m adamkit.bench.states", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=200.0, help="how long to step")
    parser.add_argument("--layout", default="big", help="big, many or custom")
    parser.add_argument("--params", type=int, default=None, help="params of the custom layout")
    parser.add_argument("--tensors", type=int, default=None, help="tensors of the custom layout")
    parser.add_argument(
        "--state-dtype",
        default="float32,bfloat16,int8,int4",
        help="comma list of float32, bfloat16, int8, int4 (adamkit compiled AdamW)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the rounds' order")
    args = parser.parse_args(argv)
    states = [s for s in args.state_dtype.split(",") if s]
    unknown = sorted(set(states) - {"float32", "bfloat16", "int8", "int4"})
    if unknown:
        parser.error(f"invalid --state-dtype {','.join(unknown)!r}")
    if not args.seconds > 0:
        parser.error(f"invalid --seconds {args.seconds!r}: must be > 0")
    shapes = layout_shapes(args.layout, args.params, args.tensors)
    rows = run([ANCHOR, *states], shapes, args.seconds, args.seed)
    params = sum(int(np.prod(s)) for s in shapes)
    print(f"{args.layout}: {params / 1e6:.1f}M params in {len(shapes)} tensors, {len(rows)} rounds")
    for group in summarize(rows):
        high = "" if group["high"] == float("inf") else f"{group['high']:g}"
        times = ", ".join(f"{k} {v:.2f}" for k, v in group["median_ms"].items())
        ratios = ", ".join(f"{k} {v:.3f}x" for k, v in group["ratio"].items())
        print(
            f"  {ANCHOR} {group['low']:g}-{high} ms, {group['rounds']} rounds: "
            f"median ms {times}; paired ratio {ratios}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
