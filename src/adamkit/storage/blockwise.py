r"""Block-wise quantisation kernels: pure functions on flat tensors, traceable by torch.compile.

A flat fp32 tensor of ``n`` elements is padded with zeros to whole blocks of ``block``
elements; each block keeps one fp32 scale (its absmax) and one code per element of ``bits``
bits (8, or 4 packed two to a byte). Two byte layouts of 4-bit codes (``packing``):

- ``"halves"`` (adamkit's int4): byte ``j`` of a block holds code ``j`` in its low nibble and
  code ``j + block / 2`` in its high nibble, so that a kernel reads and writes the codes of a
  block as two contiguous runs (measured 25-38% faster int4 steps than ``"pairs"``,
  docs/benchmarks.md, session 9);
- ``"pairs"`` (int4 checkpoints of earlier versions): byte ``j`` holds codes ``2j`` (low) and
  ``2j + 1`` (high), which a vector kernel can only gather with stride 2.

Codes follow a power-companded map, so small values keep relative precision (a linear map
rounds everything under absmax / (2 Q) to zero):

- **signed** (first moment): ``y = sign(x) |x|^(1/power)`` with ``x = m / absmax`` in [-1, 1],
  ``q = round(Q y)`` in [-Q, Q] with ``Q = 2^(bits-1) - 1``, stored as ``q + Q``.
  Decoding: ``x = sign(y) |y|^power`` with ``y = q / Q``. Zero is exact.
- **unsigned** (second moment): ``y = x^(1/power)`` with ``x = v / absmax`` in [0, 1] and a map
  WITHOUT zero, ``y_c = (c + 1) / (Q + 1)``, ``c`` in [0, Q], ``Q = 2^bits - 1``. A value that
  would round to zero is stored as the smallest level instead: v is only ever overestimated
  there, so the update ``m / (sqrt(v) + eps)`` shrinks rather than explodes (Li et al. 2023
  show that a zero level in v's map is what breaks 4-bit Adam). A block whose absmax is 0
  decodes to exact zeros.

Rounding is to nearest, or stochastic when ``noise`` (uniform numbers in [0, 1), one per
element, as floats or as the 16-bit cells of :func:`adamkit.storage.rounding.stream_cells`) is
given: the code is one of the two levels around ``x`` in value space, the upper one
with probability ``(x - lo) / (hi - lo)``, so that E[decode(encode(x))] = x. That keeps the
exponential moving averages moving: with round-to-nearest an increment of ``(1 - beta2) g^2``
smaller than half a level is lost every step and v freezes. Bytes per element:
``bits / 8 + 4 / block``.
"""

from __future__ import annotations

import struct

import torch
from torch import Tensor

from adamkit.storage.rounding import as_uniform, noise_bits


def num_blocks(n: int, block: int) -> int:
    return -(-n // block)


def code_bytes(n: int, block: int, bits: int) -> int:
    """Bytes of the code tensor for ``n`` elements (padded to whole blocks)."""
    return num_blocks(n, block) * block * bits // 8


def _pad_to_blocks(x: Tensor, block: int, blocks: int) -> Tensor:
    """``x`` zero-padded to ``blocks`` rows of ``block`` (no branch on the sizes: traceable
    with dynamic sizes)."""
    return torch.nn.functional.pad(x, (0, blocks * block - x.shape[0])).view(blocks, block)


PACKINGS = ("halves", "pairs")


def pack4(codes: Tensor, packing: str) -> Tensor:
    """Two 4-bit codes (values 0..15, uint8) per byte along the last dimension, which holds
    one block (``packing``: see the module docstring)."""
    if packing == "halves":
        half = codes.shape[-1] // 2
        return codes[..., :half] | (codes[..., half:] << 4)
    pairs = codes.unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack4(packed: Tensor, packing: str, dtype: torch.dtype = torch.uint8) -> Tensor:
    """The codes of :func:`pack4`, along the last dimension (one block's bytes), as ``dtype``.

    Decoding asks for int32: the nibbles are then shifted in 32-bit lanes, one vector
    instruction, where x86 has no shift of bytes and a compiled kernel emulates one with about
    eight (docs/benchmarks.md, session 13).
    """
    wide = packed.to(dtype)
    if packing == "halves":
        # [..., 2, half] by a broadcast shift, flattened: a compiled kernel indexes the
        # packed bytes directly (a torch.cat became a copy into a buffer of its own on CPU:
        # measured 15.6 -> 13.4 ms an int4 slot, one thread, docs/benchmarks.md session 10)
        shifts = torch.arange(2, dtype=dtype, device=packed.device).view(2, 1) * 4
        return ((wide.unsqueeze(-2) >> shifts) & 15).flatten(-2)
    return torch.stack([wide & 15, wide >> 4], dim=-1).flatten(-2)


def _root(x: Tensor, power: float) -> Tensor:
    """x^(1/power) for x >= 0; square roots for the powers adamkit uses (2 and 4)."""
    if power == 1:
        return x
    if power == 2:
        return x.sqrt()
    if power == 4:
        return x.sqrt().sqrt()
    return x.pow(1.0 / power)


def _power(y: Tensor, power: float) -> Tensor:
    """y^power for y >= 0; products for the powers adamkit uses (2 and 4)."""
    if power == 1:
        return y
    if power == 2:
        return y * y
    if power == 4:
        y2 = y * y
        return y2 * y2
    return y.pow(power)


def _stochastic_level(
    magnitude: Tensor, noise: Tensor, level_of, value_of, lowest: int, highest: int
) -> Tensor:
    """Level index around ``magnitude``: the upper neighbour with probability of the remainder."""
    lo = level_of(magnitude).floor().clamp(lowest, highest)
    hi = (lo + 1).clamp(max=highest)
    v_lo, v_hi = value_of(lo), value_of(hi)
    gap = v_hi - v_lo
    p_up = torch.where(gap > 0, ((magnitude - v_lo) / gap).clamp(0.0, 1.0), 0.0)
    # 1 where noise < p_up, else 0, in float arithmetic: a boolean here makes inductor store
    # a byte mask one element at a time (measured: most of the compiled kernel's time).
    up = (p_up - as_uniform(noise)).sign().clamp_min(0.0)
    return lo + (hi - lo) * up


def quantize(
    x: Tensor,
    *,
    block: int,
    bits: int,
    signed: bool,
    power: float | None = None,
    mantissa: int | None = None,
    noise: Tensor | None = None,
    blocks: int | None = None,
    packing: str = "halves",
) -> tuple[Tensor, Tensor]:
    """Codes (uint8, packed for 4 bits as ``packing`` says) and per-block fp32 absmax scales
    of flat ``x``, or of ``x`` already laid out as ``[blocks, block]`` rows (then the codes
    come as rows too).

    The map is the power-companded one (``power``) or the minifloat one (``mantissa`` bits;
    see :func:`float_levels`). With ``noise`` (uniform [0, 1) or 16-bit cells, ``x``'s length)
    the rounding is stochastic and unbiased. ``blocks`` (default: as few as hold ``x``) is the
    number of blocks to produce.
    """
    _check_map(power, mantissa)
    if x.dim() == 2:  # rows of whole blocks (the compiled kernels' layout)
        rows, u = x.float(), noise
    else:
        count = num_blocks(x.shape[0], block) if blocks is None else blocks
        rows = _pad_to_blocks(x.float(), block, count)
        u = None if noise is None else _pad_to_blocks(noise, block, count)
    if mantissa is not None:
        codes, absmax = _float_codes(rows, u, bits, signed, mantissa)
    else:
        codes, absmax = _power_codes(rows, u, bits, signed, power)
    if bits == 4:
        codes = pack4(_materialized(codes), packing)
    return (codes if x.dim() == 2 else codes.reshape(-1)), absmax


def _materialized(codes: Tensor) -> Tensor:
    """``codes`` as they are; inside torch.compile, kept in a buffer of their own.

    A byte of 4-bit codes needs the codes of two elements. Computed where the byte is
    written, each code would repeat its element's update (the step would compute the new
    moments three times: for the scales, the param and the bytes). Stored first as one byte
    per element, in the loop that writes the param, the bytes are a cheap second pass over
    them (measured 14.1 -> 12.9 ms an int4 slot, one thread, docs/benchmarks.md session 10).
    """
    if not torch.compiler.is_compiling():
        return codes
    from torch._inductor import inductor_prims  # noqa: F401 (registers the prim)

    return torch.ops.prims.inductor_force_stride_order(codes, codes.stride())


def _check_map(power: float | None, mantissa: int | None) -> None:
    if (power is None) == (mantissa is None):
        raise ValueError(f"give exactly one map: power={power!r} or mantissa={mantissa!r}")


def _power_codes(
    rows: Tensor, u: Tensor | None, bits: int, signed: bool, power: float
) -> tuple[Tensor, Tensor]:
    absmax = rows.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = (rows / safe[:, None]).clamp(-1.0, 1.0)
    if signed:
        q_max = 2 ** (bits - 1) - 1
        mag = normed.abs()
        if u is None:
            level = torch.round(_root(mag, power) * q_max)
        else:
            level = _stochastic_level(
                mag,
                u,
                lambda m: _root(m, power) * q_max,
                lambda c: _power(c / q_max, power),
                0,
                q_max,
            )
        return (normed.sign() * level + q_max).to(torch.uint8), absmax
    q_max = 2**bits - 1
    mag = normed.clamp_min(0.0)
    if u is None:
        level = (torch.round(_root(mag, power) * (q_max + 1)) - 1).clamp(0, q_max)
    else:
        level = _stochastic_level(
            mag,
            u,
            lambda m: _root(m, power) * (q_max + 1) - 1,
            lambda c: _power((c + 1) / (q_max + 1), power),
            0,
            q_max,
        )
    return level.to(torch.uint8), absmax


# ------------------------------------------------------------------------------------------------
# minifloat map


def _float_layout(bits: int, signed: bool, mantissa: int) -> tuple[int, int, int]:
    """(shift, base, top) of the minifloat map: level ``k`` has the fp32 bit pattern
    ``(k + base) << shift``; ``top`` is the level of 1.0."""
    exponent = bits - int(signed) - mantissa
    shift = 23 - mantissa
    base = (127 - (2**exponent - 1)) << mantissa
    top = (2**exponent - 1) << mantissa
    return shift, base, top


def float_levels(bits: int, signed: bool, mantissa: int) -> Tensor:
    r"""The non-negative magnitudes of the minifloat map, level by level (float64).

    With ``E = bits - signed - mantissa`` exponent bits and ``M = mantissa`` bits, let
    ``f(k) = 2^(e - 2^E + 1) (1 + r / 2^M)`` for ``e = k >> M``, ``r = k mod 2^M``: the value
    whose fp32 bit pattern is ``(k + base) << (23 - M)``, so that encoding and decoding are
    integer operations on bit patterns. Levels run up to ``k = (2^E - 1) 2^M``.

    - unsigned (second moments): level ``k`` is ``f(k)``, from ``f(0) = 2^(1 - 2^E)`` to 1:
      neighbours within ``2^-M`` (relative) over ``2^E`` octaves, and no zero level (smaller
      values are stored as level 0, never decoded as 0).
    - signed (first moment; the sign is a separate bit): level ``k`` is
      ``(f(k) - f(0)) / (1 - f(0))``, so that level 0 is exactly zero, the top level exactly 1
      (a decoded block re-encodes to itself) and the smallest levels are evenly spaced (as
      fp32 subnormals are).
    """
    _, base, top = _float_layout(bits, signed, mantissa)
    k = torch.arange(top + 1, dtype=torch.int64)
    pattern = ((k + base) << (23 - mantissa)).to(torch.int32)
    levels = pattern.view(torch.float32).double()
    return (levels - levels[0]) / (1 - levels[0]) if signed else levels


def _float_codes(
    rows: Tensor, u: Tensor | None, bits: int, signed: bool, mantissa: int
) -> tuple[Tensor, Tensor]:
    """Minifloat codes of ``rows`` (see :func:`float_levels`).

    Between neighbouring levels the map is linear in the fp32 bit pattern, so rounding is
    integer arithmetic on it: add ``round_bits`` (half a level: nearest; ``u`` times a level:
    stochastic, up with the probability of the remainder, unbiased) and drop the low ``shift``
    bits. The signed map encodes ``f(0) + (1 - f(0)) |x| / absmax``.
    """
    shift, base, _ = _float_layout(bits, signed, mantissa)
    magnitude = rows.abs()
    absmax = magnitude.amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, 0.0)
    # at most 1.0 (a product can round a hair above it): an integer minimum of the bit
    # patterns, which orders non-negative floats as floats do (one vector instruction; a float
    # clamp propagates NaN, four)
    mag = (magnitude * inv[:, None]).view(torch.int32).clamp_max(_ONE_BITS)
    mag = mag.view(torch.float32)
    if signed:
        low = _pattern_value(base, shift)
        mag = mag * (1.0 - low) + low
    # k = ((bits + round) >> shift) - base, with base << shift taken off before the shift
    # (exact: a multiple of 2^shift; no overflow, bits + round < 2^31) so that the compiler
    # folds it into the constant of the noise: one vector instruction fewer per moment
    if u is None:
        round_bits = (1 << (shift - 1)) - (base << shift)
    else:
        round_bits = noise_bits(u, shift) - (base << shift)
    k = (mag.view(torch.int32) + round_bits) >> shift
    # mag <= 1 (clamped), and the added bits stay below one level, so k <= top; the signed
    # map adds f(0) first, so there k >= 0 too (for finite values; a non-finite one makes the
    # block's scale non-finite, which every code then decodes through). Only the unsigned map
    # can fall below its lowest level: two fewer vector instructions per 16 codes of m
    # (measured with the clamp of v: 10.63 -> 10.32 ms an int8 slot).
    k = k if signed else k.clamp_min(0)
    if signed:
        # the sign bit (bit 31 of the value, moved to bit bits - 1) only on a non-zero
        # magnitude: no "-0" code, so that decoded values re-encode to their own codes.
        # k <= top < S, so (k + S - 1) & S is S exactly when k > 0: integer arithmetic
        # without masks (four vector instructions where compares and selects took nine)
        sign = 1 << (bits - 1)
        k = k | ((rows.view(torch.int32) >> (32 - bits)) & (k + (sign - 1)) & sign)
    return k.to(torch.uint8), absmax


_ONE_BITS = 0x3F800000  # the bit pattern of 1.0 in fp32


def _pattern_value(pattern: int, shift: int) -> float:
    """The fp32 number whose bit pattern is ``pattern << shift``."""
    return struct.unpack("<f", struct.pack("<i", pattern << shift))[0]


def _float_decode(c: Tensor, bits: int, signed: bool, mantissa: int) -> Tensor:
    shift, base, _ = _float_layout(bits, signed, mantissa)
    c = c.to(torch.int32)
    if not signed:
        return ((c + base) << shift).view(torch.float32)
    magnitude = (((c & ((1 << (bits - 1)) - 1)) + base) << shift).view(torch.float32)
    low = _pattern_value(base, shift)
    magnitude = (magnitude - low) * (1.0 / (1.0 - low))
    # the code's sign bit moved to the float's (magnitude >= 0): no compare and select
    sign = (c & (1 << (bits - 1))) << (32 - bits)
    return (magnitude.view(torch.int32) | sign).view(torch.float32)


def dequantize(
    codes: Tensor,
    absmax: Tensor,
    n: int,
    *,
    block: int,
    bits: int,
    signed: bool,
    power: float | None = None,
    mantissa: int | None = None,
    packing: str = "halves",
) -> Tensor:
    """The flat fp32 tensor of ``n`` elements that ``codes`` and ``absmax`` stand for."""
    _check_map(power, mantissa)
    if bits == 4:
        codes = unpack4(codes.view(absmax.shape[0], block // 2), packing, torch.int32)
    c = codes.view(absmax.shape[0], block)
    if mantissa is not None:
        x = _float_decode(c, bits, signed, mantissa)
    elif signed:
        q_max = 2 ** (bits - 1) - 1
        y = (c.float() - q_max) / q_max
        x = y.sign() * _power(y.abs(), power)
    else:
        q_max = 2**bits - 1
        x = _power((c.float() + 1) / (q_max + 1), power)
    return (x * absmax[:, None]).view(-1).narrow(0, 0, n)  # narrow: a size of exactly n
