"""The capturable eager path: step counts and bias corrections stay on the device.

With ``capturable=True`` each ``state['step']`` is a float32 0-d tensor on the param's device
(as torch's capturable Adam keeps it) and the step-derived scalars are computed from it with
tensor ops, in float64, then rounded to float32 where the kernels use them (the eager path
computes the same numbers in Python doubles). Nothing reads a value back to the host, so a
step can be captured in a CUDA graph or traced whole by ``torch.compile`` (fullgraph).

The arithmetic is :func:`adamkit.rule.adam_update`'s, called per param through
:func:`adamkit.execution.eager.update_param_`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from adamkit.execution.eager import update_param_
from adamkit.rule import StepScalars, UpdateFlags, step_scalars


def tensor_step_scalars(
    step: Tensor,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled: bool,
    weight_decay_scaling: str,
    initial_lr,
) -> StepScalars:
    """:func:`adamkit.rule.step_scalars` of a step tensor (any shape), on its device.

    Computed in float64 (so that ``1 - beta2**t`` keeps its digits), returned as float32
    tensors, or Python floats where they do not depend on the step or on a tensor.
    """
    device = step.device

    def f64(x):
        return x.to(device=device, dtype=torch.float64) if isinstance(x, Tensor) else x

    s = step_scalars(
        lr=f64(lr),
        beta1=f64(beta1),
        beta2=f64(beta2),
        eps=f64(eps),
        weight_decay=f64(weight_decay),
        step=step.to(torch.float64),
        decoupled=decoupled,
        weight_decay_scaling=weight_decay_scaling,
        initial_lr=f64(initial_lr),
    )
    return StepScalars(*(x.float() if isinstance(x, Tensor) else x for x in s))


def run_capturable(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict],
    codecs: Sequence,
    scalars_of_step: Callable[[Tensor], StepScalars],
    flags: UpdateFlags,
) -> None:
    """Advance every step count on its device and apply the update, one param at a time."""
    steps = [state["step"] for state in states]
    if steps:
        torch._foreach_add_(steps, 1.0)
    for param, grad, state, codec in zip(params, grads, states, codecs):
        update_param_(param, grad, state, scalars_of_step(state["step"]), flags, codec)
