"""The eager executor: one param at a time, plain torch ops. The oracle and the fallback.

For each param it decodes the moments to the compute dtype (float32, or float64 for float64
params), calls :func:`adamkit.rule.adam_update` and writes the results back in place. Complex
params are handled through ``torch.view_as_real``, as torch does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from adamkit.rule import StepScalars, UpdateFlags, adam_update
from adamkit.storage.float import FloatCodec


def compute_dtype(param: Tensor) -> torch.dtype:
    """float64 for float64/complex128 params, float32 for everything else."""
    return torch.float64 if param.dtype in (torch.float64, torch.complex128) else torch.float32


def real_view(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def update_param_(
    param: Tensor,
    grad: Tensor,
    state: dict,
    scalars: StepScalars,
    flags: UpdateFlags,
    codec: FloatCodec,
) -> None:
    """Apply one step to ``param`` and its ``state`` (which already holds the new step count)."""
    dtype = compute_dtype(param)
    p_store = real_view(param)
    m_store = real_view(state["exp_avg"])
    v_store = real_view(state["exp_avg_sq"])
    vmax_store = real_view(state["max_exp_avg_sq"]) if flags.amsgrad else None
    out = adam_update(
        p_store.to(dtype),
        real_view(grad).to(dtype),
        codec.decode(m_store, dtype),
        codec.decode(v_store, dtype),
        None if vmax_store is None else codec.decode(vmax_store, dtype),
        scalars,
        flags,
    )
    p_store.copy_(out.param)
    codec.encode_(m_store, out.exp_avg)
    codec.encode_(v_store, out.exp_avg_sq)
    if vmax_store is not None:
        codec.encode_(vmax_store, out.max_exp_avg_sq)


def run_eager(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict],
    scalars_for_step: Callable[[float], StepScalars],
    flags: UpdateFlags,
    codec: FloatCodec,
) -> None:
    """Advance every param's step count and apply the update, one param at a time."""
    cache: dict[float, StepScalars] = {}
    for param, grad, state in zip(params, grads, states):
        state["step"] += 1
        step = float(state["step"])
        if step not in cache:
            cache[step] = scalars_for_step(step)
        update_param_(param, grad, state, cache[step], flags, codec)
