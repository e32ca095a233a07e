"""Step times by memory state: many short rounds, grouped by how long torch's fused step took.

::

    python -m adamkit.bench.states --seconds 200 --layout big

The project's VM moves between memory states within minutes (torch's fused AdamW on 50M params
takes 17-19 ms in the fast one and 25-31 ms in the slow one), and a bench run of 7 rounds
usually sits in one of them. This tool steps torch's fused AdamW and adamkit's compiled AdamW
(moments in the param's dtype, and in each ``--state-dtype``) once a round, in an order drawn
anew every round (seeded; a step's time depends on the step before it:
:func:`adamkit.bench.throughput.rounds`), for ``seconds`` seconds, then groups the rounds by
torch's time that round and prints, per group, the median step time of each optimizer and the
median over the rounds of torch's time / ours (a ratio paired within each round, so a state
change between rounds does not enter it).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np
import torch

from adamkit.bench import throughput as T

ANCHOR = "torch-fused"
EDGES_MS = (20.0, 24.0)  # the groups: torch's step under 20 ms, 20-24 ms, 24 ms and above


def run(
    candidates: Sequence[str], shapes: Sequence[tuple[int, ...]], seconds: float, seed: int = 0
) -> list[dict[str, float]]:
    """Rounds of one timed step of each of ``candidates`` (names as in ``adamkit bench``:
    ``torch-fused``, ``adamkit-compiled:int8``...; the anchor included by the caller), in an
    order drawn every round (:func:`adamkit.bench.throughput.rounds`), for ``seconds`` (at
    least one round); each round is a dict name -> ms. The candidates share one set of
    gradients, as in the bench."""
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    runs = [T._Candidate(name, list(shapes), grads, "cpu") for name in candidates]
    for cand in runs:  # compile and warm up
        cand.step(lambda: None)
        cand.step(lambda: None)
    rows: list[dict[str, float]] = []
    end = time.perf_counter() + seconds
    batch = 0
    while not rows or time.perf_counter() < end:
        for order in T.rounds(len(runs), 16, seed + batch):
            rows.append({runs[k].name: runs[k].step(lambda: None) * 1e3 for k in order})
            if time.perf_counter() >= end:
                break
        batch += 1
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
    parser = argparse.ArgumentParser(
        prog="python -m adamkit.bench.states", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=200.0, help="how long to step")
    parser.add_argument("--layout", default="big", help="big, many or custom")
    parser.add_argument("--params", type=int, default=None, help="params of the custom layout")
    parser.add_argument("--tensors", type=int, default=None, help="tensors of the custom layout")
    parser.add_argument(
        "--state-dtype",
        type=T._state_dtypes,
        default=("bfloat16", "int8", "int4"),
        metavar="LIST",
        help=f"comma list of {', '.join(T.STATE_DTYPES)}: a row each for adamkit's compiled "
        "AdamW, besides the default (moments in the param's dtype)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the rounds' order")
    args = parser.parse_args(argv)
    if not args.seconds > 0:
        parser.error(f"invalid --seconds {args.seconds!r}: must be > 0")
    shapes = T.layout_shapes(args.layout, args.params, args.tensors)
    candidates = [ANCHOR, *T.expand_candidates(["adamkit-compiled"], args.state_dtype)]
    rows = run(candidates, shapes, args.seconds, args.seed)
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
