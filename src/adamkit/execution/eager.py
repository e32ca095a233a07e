"""The eager executor: one param at a time, plain torch ops. The oracle and the fallback.

For each param it decodes the moments to the compute dtype (float32, or float64 for float64
params), calls :func:`adamkit.rule.adam_update` and writes the results back in place through
the param's codec. Complex params are handled through ``torch.view_as_real``, as torch does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from adamkit.rule import StepScalars, UpdateFlags, adam_update
from adamkit.storage.float import real_view
from adamkit.storage.rounding import round_stochastic, stream_cells
from adamkit.storage.shards import is_dtensor, local_step_inputs


def compute_dtype(param: Tensor) -> torch.dtype:
    """float64 for float64/complex128 params, float32 for everything else."""
    return torch.float64 if param.dtype in (torch.float64, torch.complex128) else torch.float32


def write_param_(
    param_real: Tensor, value: Tensor, stochastic: bool, rng_key: Tensor | int
) -> None:
    """Store the new param; narrower dtypes round stochastically when asked."""
    if stochastic and param_real.dtype != value.dtype:
        value = round_stochastic(value, param_real.dtype, stream_cells(value, rng_key, "param"))
    param_real.copy_(value)


def update_param_(
    param: Tensor,
    grad: Tensor,
    state: dict,
    scalars: StepScalars,
    flags: UpdateFlags,
    codec,
    *,
    rng_key: int = 0,
    stochastic_param: bool = False,
) -> None:
    """Apply one step to ``param`` and its ``state`` (which already holds the new step count).

    A DTensor param (FSDP2) is stepped on its local shard: no communication, and random
    numbers are drawn by the elements' indices in the full tensor (see ``storage.shards``).
    """
    if is_dtensor(param):
        param, grad, state, rng_key = local_step_inputs(param, grad, state, rng_key)
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
    write_param_(p_store, out.param, stochastic_param, rng_key)
    codec.encode_(state, "exp_avg", out.exp_avg, rng_key)
    codec.encode_(state, "exp_avg_sq", out.exp_avg_sq, rng_key)
    if flags.amsgrad:
        codec.encode_(state, "max_exp_avg_sq", out.max_exp_avg_sq, rng_key)


def run_eager(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict],
    codecs: Sequence,
    scalars_for_step: Callable[[float], StepScalars],
    flags: UpdateFlags,
    *,
    rng_keys: Callable[[int, float], int] | None = None,
    stochastic_param: bool = False,
) -> None:
    """Advance every param's step count and apply the update, one param at a time.

    ``rng_keys(i, step)`` gives the random-stream key of the i-th param at ``step`` (used by
    stochastic rounding only).
    """
    cache: dict[float, StepScalars] = {}
    for i, (param, grad, state, codec) in enumerate(zip(params, grads, states, codecs)):
        state["step"] += 1
        step = float(state["step"])
        if step not in cache:
            cache[step] = scalars_for_step(step)
        key = rng_keys(i, step) if rng_keys is not None else 0
        update_param_(
            param,
            grad,
            state,
            cache[step],
            flags,
            codec,
            rng_key=key,
            stochastic_param=stochastic_param,
        )
