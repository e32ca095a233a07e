"""Moments kept as block-wise int8 or int4 codes with one fp32 absmax per block.

A moment ``key`` (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) is stored under two state
keys: the codes and ``{key}_absmax`` (fp32, one per block). The codes are ``{key}_codes``
(uint8) for int8 and ``{key}_int4_codes`` for int4 (two codes a byte, packed as halves of a
block). ``{key}_codes`` holding 4-bit codes is the neighbour layout of earlier versions, read
from checkpoints only. The first moment uses the signed map, the second moments the unsigned
map without a zero level (see :mod:`adamkit.storage.blockwise`). Every tensor is quantised,
whatever its size: the last block is zero-padded. The codec never sees the update rule: it
decodes to fp32 and encodes from fp32, inside whichever executor runs the step.

Two maps from a block's normalised values to codes. Power maps (the first int4 format, read
from checkpoints only): the first moment is stored as sqrt(|m|) (power 2), the second as
v^(1/4), i.e. sqrt of the sqrt(v) that the update divides by. Minifloat maps (``mantissa``
bits; int8 with ``mantissa=3``, 8 levels per octave; int4 with ``mantissa=1``): encoded and
decoded with integer arithmetic on the float bits, about 2x faster compiled kernels than the
power maps at the same quality (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from adamkit.storage import blockwise
from adamkit.storage.rounding import stream_cells
from adamkit.storage.shards import local

SIGNED_KEYS = ("exp_avg",)


@dataclass(frozen=True)
class BlockwiseCodec:
    """Block-wise ``bits``-bit codes with one fp32 scale per ``block`` elements."""

    bits: int
    block: int
    power_signed: float = 2.0
    power_unsigned: float = 4.0
    mantissa: int | None = None  # minifloat map with this many mantissa bits (else powers)
    packing: str = "halves"  # byte layout of 4-bit codes (blockwise.PACKINGS)

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def _kw(self, key: str) -> dict:
        signed = key in SIGNED_KEYS
        kw = {"block": self.block, "bits": self.bits, "signed": signed}
        if self.bits == 4:
            kw["packing"] = self.packing
        if self.mantissa is not None:
            return {**kw, "mantissa": self.mantissa}
        return {**kw, "power": self.power_signed if signed else self.power_unsigned}

    def stored_dtype(self, param: Tensor) -> torch.dtype:
        """The dtype of the codes (the block scales are float32)."""
        return torch.uint8

    def state_keys(self, key: str) -> tuple[str, ...]:
        """``(codes, scales)`` keys of moment ``key``. 4-bit codes packed as halves are kept
        under ``{key}_int4_codes``: the name tells a checkpoint's byte layout (both int4
        layouts have 128 bytes of codes per scale)."""
        codes = "int4_codes" if self.bits == 4 and self.packing == "halves" else "codes"
        return (f"{key}_{codes}", f"{key}_absmax")

    def same_levels(self, other: object) -> bool:
        """Whether ``other`` stores the same values in the same blocks (maybe another byte
        layout), so that its codes convert to this codec's exactly."""
        return isinstance(other, BlockwiseCodec) and replace(other, packing=self.packing) == self

    def check_saved(self, saved: dict, key: str, numel: int) -> None:
        """Refuse saved codes and scales of moment ``key`` that cannot be a param's of ``numel``
        entries in this format: codes not uint8, scales not floating-point, or other counts
        than ``ceil(numel / block)`` scales and ``bits / 8 * block`` bytes of codes each."""
        codes_key, absmax_key = self.state_keys(key)
        codes, absmax = saved[codes_key], saved.get(absmax_key)
        if not isinstance(codes, Tensor) or codes.dtype != torch.uint8:
            what = codes.dtype if isinstance(codes, Tensor) else type(codes).__name__
            raise ValueError(f"{codes_key}: expected uint8 codes, got {what}")
        if not isinstance(absmax, Tensor) or not absmax.is_floating_point():
            what = absmax.dtype if isinstance(absmax, Tensor) else type(absmax).__name__
            raise ValueError(f"{absmax_key}: expected floating-point block scales, got {what}")
        blocks = blockwise.num_blocks(numel, self.block)
        if absmax.numel() != blocks or codes.numel() != blockwise.code_bytes(
            numel, self.block, self.bits
        ):
            raise ValueError(
                f"{codes_key}, {absmax_key}: {codes.numel()} bytes of codes and "
                f"{absmax.numel()} scales for a param of {numel} entries, which takes "
                f"{blockwise.code_bytes(numel, self.block, self.bits)} and {blocks} "
                f"({self.name}, block {self.block})"
            )

    def adopt(self, source: BlockwiseCodec, saved: dict, key: str, device) -> dict[str, Tensor]:
        """The state entries of moment ``key`` from ``saved`` codes of ``source`` (a codec of
        :meth:`same_levels`): copied, or repacked from another byte layout, bit for bit."""
        codes_key, absmax_key = source.state_keys(key)
        codes, absmax = saved[codes_key], saved[absmax_key]
        if source.packing != self.packing and self.bits == 4:
            rows = codes.reshape(-1, self.block // 2)
            codes = blockwise.pack4(blockwise.unpack4(rows, source.packing), self.packing)
        new_codes, new_absmax = self.state_keys(key)
        return {
            new_codes: codes.reshape(-1).to(device).clone(),
            new_absmax: absmax.reshape(-1).to(device).clone(),
        }

    def allocate(self, param: Tensor, key: str) -> dict[str, Tensor]:
        """Codes of an all-zero moment (zero codes are not all-zero bytes: encode zeros).

        A DTensor param (FSDP2) gets plain codes for its local shard: blocks never cross shards.
        """
        param = local(param)
        n = param.numel() * (2 if param.is_complex() else 1)
        codes, absmax = blockwise.quantize(torch.zeros(n, device=param.device), **self._kw(key))
        codes_key, absmax_key = self.state_keys(key)
        return {codes_key: codes, absmax_key: absmax}

    def decode(self, state: dict, key: str, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        """The moment in ``dtype`` with ``shape`` (the param's real view), in row-major order."""
        codes_key, absmax_key = self.state_keys(key)
        numel = 1
        for size in shape:
            numel *= size
        flat = blockwise.dequantize(state[codes_key], state[absmax_key], numel, **self._kw(key))
        return flat.view(shape).to(dtype)

    def encode_(self, state: dict, key: str, value: Tensor, rng_key: Tensor | int = 0) -> None:
        """Quantise ``value`` (compute dtype, any layout) into the state's codes and scales.

        A 2-d ``value`` of ``[blocks, block]`` is taken as the rows of the blocks (the compiled
        kernels' layout); anything else is flattened. Codes are rounded stochastically
        (unbiased) from the ``key`` stream of ``rng_key``.
        """
        codes_key, absmax_key = self.state_keys(key)
        blocks = state[absmax_key].shape[0]
        rows = value if value.shape == (blocks, self.block) else value.reshape(-1)
        noise = stream_cells(rows, rng_key, key)
        codes, absmax = blockwise.quantize(rows, noise=noise, blocks=blocks, **self._kw(key))
        state[codes_key].view(codes.shape).copy_(codes)
        state[absmax_key].copy_(absmax)

    def bytes_per_element(self, param: Tensor) -> float:
        return self.bits / 8 + 4 / self.block
