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
from adamkit.storage.float import FloatCodec, real_view


def compute_dtype(param: Tensor) -> torch.dtype:
    """float64 for float64/complex128 params, float32 for everything else."""
    return torch.float64 if param.dtype in (torch.float64, torch.complex128) else torch.float32


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
    shape = p_store.shape
    out = adam_update(
        p_store.to(dtype),
        real_view(grad).to(dtype),
        codec.decode(state, "exp_avg", shape, dtype),
        codec.decode(state, "exp_avg_sq", shape, dtype),
        codec.decode(state, "max_exp_avg_sq", shape, dtype) if flags.amsgrad else None,
        scalars,
        flags,
    )
    p_store.copy_(out.param)
    codec.encode_(state, "exp_avg", out.exp_avg)
    codec.encode_(state, "exp_avg_sq", out.exp_avg_sq)
    if flags.amsgrad:
        codec.encode_(state, "max_exp_avg_sq", out.max_exp_avg_sq)


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
