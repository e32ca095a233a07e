"""The uncompiled multi-tensor executor: few large ops instead of many small ones.

The eager executor issues about fifteen torch ops per param, so a model of many small tensors
spends its step in op dispatch, not arithmetic. Here params below :data:`POOL_MAX_NUMEL`
elements that share a device, dtypes and step count are packed into flat buffers (one C++ cat
each for params, grads and moments), :func:`adamkit.rule.adam_update` runs once on the flat
buffers, and the results are copied back with one ``torch._foreach_copy_`` per tensor list.
Larger params go through the eager path, where the per-op cost is already amortised. The
arithmetic is the rule's, called once per pool: nothing is re-implemented.

Pools hold at most :data:`POOL_MAX_ELEMENTS` elements, so the temporaries of one pool stay small
and in cache. Only codecs that store a moment as one plain tensor round to nearest (the float
codec without stochastic rounding) are pooled; everything else, DTensors, complex params and
stochastic rounding go through :func:`adamkit.execution.eager.update_param_`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from adamkit.execution.eager import compute_dtype, update_param_, write_param_
from adamkit.rule import StepScalars, UpdateFlags, adam_update
from adamkit.storage.float import FloatCodec

POOL_MAX_NUMEL = 1 << 14
"""Params with fewer elements than this are pooled; larger ones run one at a time."""

POOL_MAX_ELEMENTS = 1 << 16
"""Elements in one pool. Measured on 2 cores, ms per step, eager vs pooled with pools of 64K
elements: 2000 x 64: 85 vs 34; 1000 x 512: 49 vs 18; 500 x 2048: 26 vs 12; 300 x 4096: 17 vs
11; 100 x 16384: 10 vs 9. Pools of 1M elements lost from 2048 elements up (26 vs 34): their
temporaries are big enough to be fresh pages every step."""

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def moment_keys(flags: UpdateFlags) -> tuple[str, ...]:
    return (
        ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        if flags.amsgrad
        else (
            "exp_avg",
            "exp_avg_sq",
        )
    )


def plain_float_codec(codec) -> bool:
    """Whether ``codec`` keeps each moment as one tensor, rounded to nearest (poolable)."""
    return isinstance(codec, FloatCodec) and not codec.stochastic


def poolable(param: Tensor, grad: Tensor, codec, stochastic_param: bool) -> bool:
    """Whether ``param`` can be stepped as part of a flat buffer."""
    return (
        type(param) in (torch.Tensor, torch.nn.Parameter)  # no DTensor or other subclass
        and param.dtype in _FLOATS
        and grad.dtype == param.dtype
        and grad.layout == torch.strided
        and grad.device == param.device
        and plain_float_codec(codec)
        and not (stochastic_param and param.dtype != torch.float32)
    )


def step_pool_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict],
    codec: FloatCodec,
    scalars: StepScalars,
    flags: UpdateFlags,
) -> None:
    """One step of params that share device, dtype, codec and step count, on flat buffers."""
    dtype = compute_dtype(params[0])
    flat_p = _flatten_dense_tensors(list(params))
    flat_g = _flatten_dense_tensors(list(grads))
    keys = moment_keys(flags)
    stored = {key: [state[key] for state in states] for key in keys}
    flat_state = {key: _flatten_dense_tensors(stored[key]) for key in keys}
    shape = flat_p.shape
    out = adam_update(
        flat_p.to(dtype),
        flat_g.to(dtype),
        codec.decode(flat_state, "exp_avg", shape, dtype),
        codec.decode(flat_state, "exp_avg_sq", shape, dtype),
        codec.decode(flat_state, "max_exp_avg_sq", shape, dtype) if flags.amsgrad else None,
        scalars,
        flags,
    )
    write_param_(flat_p, out.param, False, 0)
    codec.encode_(flat_state, "exp_avg", out.exp_avg)
    codec.encode_(flat_state, "exp_avg_sq", out.exp_avg_sq)
    if flags.amsgrad:
        codec.encode_(flat_state, "max_exp_avg_sq", out.max_exp_avg_sq)
    torch._foreach_copy_(list(params), _unflatten_dense_tensors(flat_p, list(params)))
    for key in keys:
        torch._foreach_copy_(stored[key], _unflatten_dense_tensors(flat_state[key], stored[key]))


def run_multi_tensor(
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
    """Same contract as :func:`adamkit.execution.eager.run_eager`, with small params pooled."""
    if not params:
        return
    steps = [state["step"] for state in states]
    if all(s.device.type == "cpu" for s in steps):
        torch._foreach_add_(steps, 1.0)
    else:
        for s in steps:
            s += 1
    values = [float(s) for s in steps]
    cache: dict[float, StepScalars] = {}
    pools: dict[tuple, list[int]] = {}
    for i, (param, grad, codec) in enumerate(zip(params, grads, codecs)):
        step = values[i]
        if step not in cache:
            cache[step] = scalars_for_step(step)
        if param.numel() < POOL_MAX_NUMEL and poolable(param, grad, codec, stochastic_param):
            key = (param.device, param.dtype, codec.stored_dtype(param), step)
            pools.setdefault(key, []).append(i)
            continue
        update_param_(
            param,
            grad,
            states[i],
            cache[step],
            flags,
            codec,
            rng_key=rng_keys(i, step) if rng_keys is not None else 0,
            stochastic_param=stochastic_param,
        )
    for (_, _, _, step), members in pools.items():
        for chunk in _split(members, [params[i].numel() for i in members]):
            step_pool_(
                [params[i] for i in chunk],
                [grads[i] for i in chunk],
                [states[i] for i in chunk],
                codecs[chunk[0]],
                cache[step],
                flags,
            )


def _split(members: list[int], sizes: list[int]) -> list[list[int]]:
    """Consecutive runs of ``members`` of at most POOL_MAX_ELEMENTS elements each."""
    chunks: list[list[int]] = [[]]
    total = 0
    for i, n in zip(members, sizes):
        if chunks[-1] and total + n > POOL_MAX_ELEMENTS:
            chunks.append([])
            total = 0
        chunks[-1].append(i)
        total += n
    return chunks
