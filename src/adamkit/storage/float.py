"""Moments kept as plain floating-point tensors (torch's layout).

Every codec knows three things about one moment (``exp_avg``, ``exp_avg_sq`` or
``max_exp_avg_sq``) of one param: how to allocate it, how to decode it to the compute dtype and
how to encode a compute-dtype value back into the state, in place. The float codec keeps the
moment as one tensor of ``dtype`` with the param's shape under the moment's own key, so the
state_dict is exactly torch's. ``dtype=None`` follows torch's rule: the param's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from adamkit.storage.rounding import round_stochastic, stream_cells


def real_view(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


@dataclass(frozen=True)
class FloatCodec:
    """Moments as tensors of ``dtype`` (None: the param's own dtype, as torch.optim does).

    With ``stochastic=True`` a moment stored in a narrower dtype than the compute dtype (bf16
    state) is written with unbiased stochastic rounding, so that increments of
    ``(1 - beta2) g^2``, far below bf16's resolution, still move v in expectation.
    """

    dtype: torch.dtype | None = None
    stochastic: bool = False

    @property
    def name(self) -> str:
        return "param dtype" if self.dtype is None else str(self.dtype).removeprefix("torch.")

    def stored_dtype(self, param: Tensor) -> torch.dtype:
        if self.dtype is None or param.is_complex():
            return param.dtype
        return self.dtype

    def state_keys(self, key: str) -> tuple[str, ...]:
        return (key,)

    def allocate(self, param: Tensor, key: str) -> dict[str, Tensor]:
        """Zeros in the stored dtype, with the param's shape and memory format."""
        zeros = torch.zeros_like(
            param, dtype=self.stored_dtype(param), memory_format=torch.preserve_format
        )
        return {key: zeros}

    @staticmethod
    def check_saved(saved: dict, key: str, numel: int) -> None:
        """Refuse a saved moment ``key`` that cannot be a param's of ``numel`` real entries:
        not a floating-point (or complex) tensor, or another number of entries."""
        t = saved[key]
        if not isinstance(t, Tensor) or not (t.is_floating_point() or t.is_complex()):
            what = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{key}: expected a floating-point tensor, got {what}")
        if real_view(t).numel() != numel:
            raise ValueError(
                f"{key}: {real_view(t).numel()} entries for a param of {numel} "
                f"(shape {tuple(t.shape)})"
            )

    @staticmethod
    def decode(state: dict, key: str, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        """The moment in the compute dtype, shaped like the param's real view (no copy if fp32)."""
        return real_view(state[key]).to(dtype)

    def encode_(self, state: dict, key: str, value: Tensor, rng_key: Tensor | int = 0) -> None:
        """Write ``value`` (compute dtype) into the stored moment (``rng_key``: see rounding)."""
        dst = real_view(state[key])
        if self.stochastic and dst.dtype != value.dtype:
            value = round_stochastic(value, dst.dtype, stream_cells(value, rng_key, key))
        dst.copy_(value)

    def bytes_per_element(self, param: Tensor) -> float:
        return float(torch.empty((), dtype=self.stored_dtype(param)).element_size())
