"""Moments kept as plain floating-point tensors (torch's layout).

A codec knows three things about one moment tensor: how to allocate it for a param, how to
decode it to the compute dtype and how to encode a compute-dtype value back into it. The float
codec stores the moment as a tensor of ``dtype`` with the param's shape, so the state_dict is
exactly torch's. ``dtype=None`` follows torch's rule: the moment has the param's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class FloatCodec:
    """Moments as tensors of ``dtype`` (None: the param's own dtype, as torch.optim does)."""

    dtype: torch.dtype | None = None

    @property
    def name(self) -> str:
        return "param dtype" if self.dtype is None else str(self.dtype).removeprefix("torch.")

    def stored_dtype(self, param: Tensor) -> torch.dtype:
        if self.dtype is None or param.is_complex():
            return param.dtype
        return self.dtype

    def allocate(self, param: Tensor) -> Tensor:
        """Zeros in the stored dtype, with the param's shape and memory format."""
        return torch.zeros_like(
            param, dtype=self.stored_dtype(param), memory_format=torch.preserve_format
        )

    @staticmethod
    def decode(stored: Tensor, compute_dtype: torch.dtype) -> Tensor:
        """The moment in the compute dtype (no copy when the dtypes agree)."""
        return stored if stored.dtype == compute_dtype else stored.to(compute_dtype)

    @staticmethod
    def encode_(stored: Tensor, value: Tensor) -> None:
        """Write ``value`` (compute dtype) into ``stored``, rounding to nearest."""
        stored.copy_(value)

    def bytes_per_element(self, param: Tensor) -> float:
        return torch.empty((), dtype=self.stored_dtype(param)).element_size()


_FLOAT_NAMES = {
    None: None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def codec_for(state_dtype: str | None) -> FloatCodec:
    """The codec for a ``state_dtype`` name."""
    if state_dtype not in _FLOAT_NAMES:
        raise ValueError(
            f"Invalid state_dtype={state_dtype!r}: expected one of {list(_FLOAT_NAMES)}"
        )
    return FloatCodec(_FLOAT_NAMES[state_dtype])
