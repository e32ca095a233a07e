"""Which codec stores the moments of a param, and why (``state_dtype``, ``min_quantized_size``).

``state_dtype``:

- ``None``: torch's rule, moments in the param's dtype, rounded to nearest (bit-compatible with
  torch.optim);
- ``"float32"``: fp32 moments whatever the param dtype (the AMP master-state layout);
- ``"bfloat16"``: bf16 moments written with stochastic rounding (4 B/param for m and v);
- ``"int8"``: block-wise 8-bit codes, block 256 (about 2.03 B/param);
- ``"int4"``: block-wise 4-bit codes, block 256 (about 1.03 B/param), minifloat maps with one
  mantissa bit (m: sign and 7 magnitudes; v: 15 levels over 7 octaves, no zero level), two
  codes a byte packed as halves of a block (``{key}_int4_codes``).
  Earlier versions wrote int4 codes under ``{key}_codes``: with the same maps and blocks but
  neighbouring codes in a byte (such checkpoints load bit for bit, repacked), or with power
  maps (m sqrt, v fourth root) in blocks of 128 (recognised by their block and re-encoded
  when loaded). See ``infer_codec``.

Quantised formats keep params with fewer than ``min_quantized_size`` elements in fp32: biases
and norm weights are a negligible share of memory and the most sensitive to noise. The reason
is returned with the codec and shown by :func:`adamkit.memory_report`. Complex params are
quantised through their real view.
"""

from __future__ import annotations

import torch
from torch import Tensor

from adamkit.storage.float import FloatCodec
from adamkit.storage.quantized import BlockwiseCodec

MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
"""The moments a codec stores: m, v and (AMSGrad) the running max of v."""

STATE_DTYPES = (None, "float32", "bfloat16", "int8", "int4")
DEFAULT_MIN_QUANTIZED_SIZE = 4096

_FIXED = {
    None: FloatCodec(None),
    "float32": FloatCodec(torch.float32),
    "bfloat16": FloatCodec(torch.bfloat16, stochastic=True),
    "int8": BlockwiseCodec(bits=8, block=256, mantissa=3),
    "int4": BlockwiseCodec(bits=4, block=256, mantissa=1),
}

LEGACY_INT4 = BlockwiseCodec(bits=4, block=128, packing="pairs")
"""The first int4 format (power maps, block 128): read from checkpoints only."""

PAIRED_INT4 = BlockwiseCodec(bits=4, block=256, mantissa=1, packing="pairs")
"""The second int4 format (2026-12-05 to 2026-12-06): today's maps and blocks, neighbouring
codes in a byte (``{key}_codes``). Read from checkpoints only, and repacked without loss."""

READABLE = (_FIXED["int8"], _FIXED["int4"], PAIRED_INT4, LEGACY_INT4)
"""Every block-wise format a saved state may hold. Each is told apart by its codes' key and
the bytes of codes per block scale (``block * bits / 8``): int8 256, int4 128 under
``{key}_int4_codes``, the second int4 128 and the first 64 under ``{key}_codes``."""

BLOCK_SUFFIXES = tuple(dict.fromkeys(name for c in READABLE for name in c.state_keys("")))
"""The suffixes of the state keys of block-wise moments (``_codes``, ``_absmax``, ...)."""

Codec = FloatCodec | BlockwiseCodec


def validate_state_dtype(state_dtype: object) -> None:
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype={state_dtype!r}: expected one of {STATE_DTYPES}")


def validate_min_quantized_size(size: object) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"Invalid min_quantized_size={size!r}: expected an int >= 0")


def select_codec(
    param: Tensor, state_dtype: str | None, min_quantized_size: int
) -> tuple[Codec, str]:
    """The codec for ``param``'s moments and the reason for the choice."""
    codec = _FIXED[state_dtype]
    if isinstance(codec, BlockwiseCodec):
        numel = param.numel() * (2 if param.is_complex() else 1)
        if numel < min_quantized_size:
            return _FIXED["float32"], (
                f"{numel} elements < min_quantized_size={min_quantized_size}: kept in float32"
            )
        return codec, f"state_dtype={state_dtype!r}"
    if state_dtype is None:
        return codec, "state_dtype=None: the param's dtype, as torch.optim"
    return codec, f"state_dtype={state_dtype!r}"


def stored_names(key: str) -> tuple[str, ...]:
    """Every state key under which any format keeps moment ``key`` (float, codes of each
    layout, scales): what to clear before the moment is stored anew."""
    return (key, *(key + suffix for suffix in BLOCK_SUFFIXES))


def infer_codec(state: dict, key: str) -> Codec | None:
    """The codec a saved state was written with (None if ``key`` is absent)."""
    present = [c for c in READABLE if c.state_keys(key)[0] in state]
    if present:
        codes_key, absmax_key = present[0].state_keys(key)
        scales = state[absmax_key].numel()
        if scales == 0:  # an empty tensor: no block, nothing to decode either way
            return present[0]
        ratio = state[codes_key].numel() // scales
        for codec in present:
            if ratio == codec.block * codec.bits // 8:
                return codec
        known = ", ".join(f"{c.block * c.bits // 8}: {c.name} block {c.block}" for c in present)
        raise ValueError(
            f"{codes_key}: {ratio} bytes of codes per block scale match no adamkit format ({known})"
        )
    if key in state:
        return FloatCodec(state[key].dtype)
    return None
