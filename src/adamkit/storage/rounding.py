r"""Counter-based random numbers and stochastic rounding, traceable by torch.compile.

Stochastic rounding needs one uniform number per element per step. Drawing them from a
``torch.Generator`` would cost a pass over memory and could not be fused into a compiled kernel
deterministically, so adamkit derives them from a hash of ``(key, element index)``: the
murmur3 32-bit finaliser over ``index * golden + key``. ``key`` mixes the optimizer's seed, the
param's index and the step count, so the numbers are a pure function of saved state: a run
resumed from a checkpoint draws exactly the numbers the uninterrupted run drew.

``round_stochastic(x, dtype, u)`` rounds fp32 ``x`` to ``dtype`` (bf16 or fp16) up or down, with
the probability of rounding up equal to the remainder: E[round(x)] = x, so small updates that
round-to-nearest would drop (below about 0.4% of the weight in bf16) survive in expectation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def mix_key(seed: int, param_index: int, step: int, stream: int) -> int:
    """A 32-bit key for one (seed, param, step, stream) draw (splitmix-style, in Python ints)."""
    z = (seed * 0x9E3779B97F4A7C15 + param_index * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = (z + step * 0x94D049BB133111EB + stream * 0xD6E8FEB86659FD93) & (2**64 - 1)
    z ^= z >> 31
    z = (z * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z ^= z >> 29
    return int(z & _MASK32)


def uniform(
    numel: int, key: Tensor | int, device: torch.device | str = "cpu", start: int | Tensor = 0
) -> Tensor:
    """``numel`` float32 numbers in [0, 1), a pure function of ``key`` and the element index.

    Element ``i`` uses index ``start + i``, or ``start[i]`` when ``start`` is a tensor of
    indices: a shard of a tensor draws exactly the numbers of its elements in the whole tensor.
    """
    if isinstance(start, Tensor):
        h = start.reshape(-1).to(device=device, dtype=torch.int64)
    else:
        h = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    h = (h * 0x9E3779B1 + key) & _MASK32
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    h = h ^ (h >> 16)
    return (h >> 8).to(torch.float32) * (1.0 / 16777216.0)


# One stream of numbers per quantity, so that m, v, vmax and the param draw differently.
STREAMS = {
    "exp_avg": 0x1B873593,
    "exp_avg_sq": 0xCC9E2D51,
    "max_exp_avg_sq": 0xE6546B64,
    "param": 0x85EBCA6B,
}


class ShardKey(NamedTuple):
    """The key of a shard: ``key`` plus where the shard's elements sit in the whole tensor.

    ``start`` is the row-major index of the shard's first element in the full tensor (the
    shard is a contiguous range), or a tensor with the full-tensor index of every element of
    the shard. Codecs pass it through to :func:`stream_uniform` unchanged, so a sharded step
    (FSDP2) draws the numbers the unsharded step draws for the same elements.
    """

    key: Tensor | int
    start: int | Tensor


def stream_uniform(like: Tensor, rng_key: Tensor | int | ShardKey, stream: str) -> Tensor:
    """Uniform numbers for every element of ``like`` from the ``stream`` of ``rng_key``."""
    if isinstance(rng_key, ShardKey):
        key, start = rng_key
        return uniform(like.numel(), key ^ STREAMS[stream], like.device, start)
    return uniform(like.numel(), rng_key ^ STREAMS[stream], like.device)


def round_stochastic(x: Tensor, dtype: torch.dtype, u: Tensor) -> Tensor:
    """Round fp32 ``x`` to ``dtype`` up or down with probability given by the remainder.

    ``u`` holds uniform numbers in [0, 1) with ``x``'s number of elements (row-major order).
    Values that ``dtype`` represents exactly, infinities and NaN are returned unchanged.
    """
    nearest = x.to(dtype)
    near32 = nearest.to(x.dtype)
    toward = torch.where(near32 < x, torch.full_like(nearest, float("inf")), -torch.inf)
    other = torch.nextafter(nearest, toward.to(dtype))
    other32 = other.to(x.dtype)
    gap = (other32 - near32).abs()
    # probability of taking the other neighbour: the distance from nearest over the gap
    p_other = torch.where(gap > 0, (x - near32).abs() / gap, torch.zeros_like(x))
    take_other = u.view(x.shape) < p_other
    return torch.where(take_other & torch.isfinite(other32), other, nearest)
