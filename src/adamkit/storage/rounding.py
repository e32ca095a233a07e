r"""Counter-based random numbers and stochastic rounding, traceable by torch.compile.

Stochastic rounding needs one uniform number per element per step. Drawing them from a
``torch.Generator`` would cost a pass over memory and could not be fused into a compiled kernel
deterministically, so adamkit derives them from a hash of ``(key, element index)``: one
multiply-xorshift round of the murmur3 finaliser over ``index * golden + key`` (the full
finaliser's two more rounds cost the int8 and bf16-state steps 7-8% and bought nothing that
stochastic rounding needs: docs/benchmarks.md, session 16). Each hash gives two streams of 16
bits (m and v share one; vmax and the param another), since hashing is a good part of the
compiled kernels' arithmetic. ``key`` mixes the optimizer's seed, the
param's index and the step count, so the numbers are a pure function of saved state: a run
resumed from a checkpoint draws exactly the numbers the uninterrupted run drew.

``round_stochastic(x, dtype, u)`` rounds fp32 ``x`` to ``dtype`` (bf16 or fp16) up or down, with
the probability of rounding up equal to the remainder: E[round(x)] = x, so small updates that
round-to-nearest would drop (below about 0.4% of the weight in bf16) survive in expectation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_BF16_MAX = float(torch.finfo(torch.bfloat16).max)


def mix_keys(seed: int, param_index: np.ndarray, step: np.ndarray) -> np.ndarray:
    """32-bit keys (int64) of (seed, param, step) draws: splitmix-style, modulo 2^64.

    Vectorised over ``param_index`` and ``step`` (integer arrays of one shape), so that the
    compiled executor derives the keys of a whole plan in a few array operations.
    """
    u64 = np.uint64
    index = np.asarray(param_index).astype(u64)
    steps = np.asarray(step).astype(u64)
    seeds = np.full(index.shape, seed & (2**64 - 1), dtype=u64)  # arrays wrap silently
    z = seeds * u64(0x9E3779B97F4A7C15) + index * u64(0xBF58476D1CE4E5B9)
    z = z + steps * u64(0x94D049BB133111EB)
    z ^= z >> u64(31)
    z = z * u64(0xBF58476D1CE4E5B9)
    z ^= z >> u64(29)
    return (z & u64(_MASK32)).astype(np.int64)


def mix_key(seed: int, param_index: int, step: int) -> int:
    """The key of one (seed, param, step) draw (see :func:`mix_keys`)."""
    return int(mix_keys(seed, np.array([param_index]), np.array([step]))[0])


@dataclass(frozen=True)
class KeySource:
    """Random-stream keys of a list of params: ``positions[i]`` is param i's index in the
    optimizer (its identity for the random streams), ``seed`` the optimizer's seed."""

    seed: int
    positions: np.ndarray

    def __call__(self, i: int, step: float) -> int:
        return mix_key(self.seed, int(self.positions[i]), int(step))

    def many(self, members: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """Keys of params ``members`` at ``steps`` (arrays of one length)."""
        return mix_keys(self.seed, self.positions[members], steps.astype(np.int64))


def _int32(value: int) -> int:
    """The int32 whose bits are the low 32 bits of ``value``."""
    value &= _MASK32
    return value - (1 << 32) if value >= 1 << 31 else value


_GOLDEN, _MIX = _int32(0x9E3779B1), _int32(0x85EBCA6B)


def hash32(
    numel: int, key: Tensor | int, device: torch.device | str = "cpu", start: int | Tensor = 0
) -> Tensor:
    """``numel`` 32-bit hashes (an int32 tensor holding the bits), a pure function of ``key``
    and element index.

    Element ``i`` uses index ``start + i`` (``start`` an int or a 0-d int64 tensor), or
    ``start[i]`` when ``start`` is a 1-d tensor of indices: a shard of a tensor draws exactly
    the numbers of its elements in the whole tensor. ``key`` may be a 0-d int64 tensor (the
    compiled kernels read keys from a table). The arithmetic is int32 modulo 2^32 (vector
    instructions take 16 lanes of int32 but 8 of int64); right shifts are arithmetic in
    torch, hence the masks.
    """
    if isinstance(start, Tensor) and start.dim() > 0:
        index = start.reshape(-1).to(device=device, dtype=torch.int32)
    else:
        first = start.to(torch.int32) if isinstance(start, Tensor) else _int32(start)
        index = torch.arange(numel, dtype=torch.int32, device=device) + first
    k = key.to(torch.int32) if isinstance(key, Tensor) else _int32(key)
    h = index * _GOLDEN + k
    h = h ^ ((h >> 16) & 0xFFFF)  # the high half into the low one: both feed the product
    return h * _MIX


def uniform(
    numel: int, key: Tensor | int, device: torch.device | str = "cpu", start: int | Tensor = 0
) -> Tensor:
    """``numel`` float32 numbers in [0, 1) on a grid of 2^-24 (see :func:`hash32`)."""
    bits = (hash32(numel, key, device, start) >> 8) & 0xFFFFFF
    return bits.to(torch.float32) * (1.0 / 16777216.0)


# Random streams: one 32-bit hash per element serves two quantities, 16 bits each (plenty
# for stochastic rounding: bf16 drops 16 bits, a code level needs far fewer), so that the
# moments m and v, updated in the same loop, share one hash: (pair key, which half).
STREAMS = {
    "exp_avg": (0x1B873593, 0),
    "exp_avg_sq": (0x1B873593, 16),
    "max_exp_avg_sq": (0xE6546B64, 0),
    "param": (0xE6546B64, 16),
}


class ShardKey(NamedTuple):
    """The key of a shard: ``key`` plus where the shard's elements sit in the whole tensor.

    ``start`` is the row-major index of the shard's first element in the full tensor (the
    shard is a contiguous range), or a tensor with the full-tensor index of every element of
    the shard. Codecs pass it through to :func:`stream_cells` unchanged, so a sharded step
    (FSDP2) draws the numbers the unsharded step draws for the same elements.
    """

    key: Tensor | int
    start: int | Tensor


def stream_cells(like: Tensor, rng_key: Tensor | int | ShardKey, stream: str) -> Tensor:
    """The ``stream`` of ``rng_key`` for every element of ``like``: int32 cell indices ``k`` in
    [0, 2^16), uniform (16 bits of a hash that one other stream shares). Cell ``k`` stands
    for the uniform number ``(k + 1/2) / 2^16`` (:func:`as_uniform`); integer consumers take
    the cells as they are (:func:`noise_bits`), which costs no float round trip in a kernel."""
    key, start = rng_key if isinstance(rng_key, ShardKey) else (rng_key, 0)
    pair, shift = STREAMS[stream]
    h = hash32(like.numel(), key ^ pair, like.device, start).view(like.shape)
    return (h >> shift) & 0xFFFF


def as_uniform(u: Tensor) -> Tensor:
    """Float uniform numbers from ``u``: returned as they are if floating point, else 16-bit
    cells ``k`` (:func:`stream_cells`) taken as ``(k + 1/2) / 2^16``."""
    if u.is_floating_point():
        return u
    return (u.to(torch.float32) + 0.5) * (1.0 / 65536.0)


def noise_bits(u: Tensor, shift: int) -> Tensor:
    """``floor(u * 2^shift)`` as int32: the noise that stochastic rounding adds to an fp32 bit
    pattern before dropping its low ``shift`` bits (round up with probability of the
    remainder).

    ``u`` is uniform floats in [0, 1) or 16-bit cells ``k`` standing for ``(k + 1/2) / 2^16``;
    for cells the result is the same integer without float arithmetic:
    ``k * 2^(shift - 16) + 2^(shift - 17)`` when ``shift > 16``, ``k >> (16 - shift)`` else.
    """
    if u.is_floating_point():
        return (u * float(1 << shift)).to(torch.int32)
    if shift > 16:
        return (u << (shift - 16)) + (1 << (shift - 17))
    return u >> (16 - shift) if shift < 16 else u


def round_stochastic(x: Tensor, dtype: torch.dtype, u: Tensor) -> Tensor:
    """Round fp32 ``x`` to ``dtype`` up or down with probability given by the remainder.

    ``u`` holds uniform numbers in [0, 1) with ``x``'s number of elements (row-major order),
    as floats or as 16-bit cells (:func:`stream_cells`).
    Values that ``dtype`` represents exactly, infinities and NaN are returned unchanged.

    bfloat16 is fp32 with the low 16 bits dropped, so there it is integer arithmetic on the
    bits: add ``floor(u * 2^16)`` to the low half and truncate. The value moves away from zero
    (to the next bf16 in magnitude) with probability (low half) / 2^16: the same unbiased
    rounding in a few vector instructions. At or past the largest finite bf16 (and for inf and
    NaN) no noise is added: a finite value there truncates toward zero, to the largest finite
    bf16, and never becomes inf; a NaN keeps its sign and the high bits of its payload. (A NaN
    stays NaN when it is quiet, as every NaN that arithmetic makes is: the quiet bit is among
    the high ones. A signalling NaN built bit by bit with a payload in the low half only would
    truncate to inf; the optimizers only ever round results of arithmetic.)
    """
    if dtype == torch.bfloat16 and x.dtype == torch.float32:
        bits = x.view(torch.int32)
        # at or past the largest finite bf16 (and inf, NaN): no noise, so that a finite value
        # never rounds up to inf (a float compare: vectorises, isinf does not)
        noise = torch.where(x.abs() < _BF16_MAX, noise_bits(u.view(x.shape), 16), 0)
        # every low half is now zero: the conversion below is exact, and compiled kernels
        # make it a truncation (adamkit.execution.truncation)
        return ((bits + noise) & -65536).view(torch.float32).to(dtype)
    nearest = x.to(dtype)
    near32 = nearest.to(x.dtype)
    toward = torch.where(near32 < x, torch.full_like(nearest, float("inf")), -torch.inf)
    other = torch.nextafter(nearest, toward.to(dtype))
    other32 = other.to(x.dtype)
    gap = (other32 - near32).abs()
    # probability of taking the other neighbour: the distance from nearest over the gap
    p_other = torch.where(gap > 0, (x - near32).abs() / gap, torch.zeros_like(x))
    take_other = as_uniform(u).view(x.shape) < p_other
    return torch.where(take_other & torch.isfinite(other32), other, nearest)
