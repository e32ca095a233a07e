r"""The Adam update, written once.

Every execution path (eager, multi-tensor, compiled) and every state storage format calls
:func:`adam_update`; nothing else in adamkit does arithmetic on the moments.

The math is PyTorch's single-tensor ``torch.optim.Adam`` (torch 2.13), which is Kingma & Ba's
Algorithm 1 with the bias corrections folded in. With ``t`` the step count after increment::

    g     = -grad if maximize else grad           # negation happens before weight decay
    p     = p * param_scale                       # decoupled decay (AdamW): param_scale = 1 - decay
    g     = g + l2 * p                            # coupled L2 decay (Adam): l2 = weight_decay
    m     = lerp(m, g, 1 - beta1)                 # m + (1 - beta1) * (g - m)
    v     = beta2 * v + (1 - beta2) * g * g
    vmax  = max(vmax, v)                          # AMSGrad: running max of the RAW v
    denom = sqrt(v or vmax) / sqrt(1 - beta2^t) + eps       # eps OUTSIDE the sqrt of v_hat
    p     = p + (-lr / (1 - beta1^t)) * m / denom

so that ``p -= lr * m_hat / (sqrt(v_hat) + eps)`` with ``m_hat = m / (1 - beta1^t)`` and
``v_hat = v / (1 - beta2^t)``. ``eps`` is Algorithm 1's eps, not Keras' ``eps_hat``.

Weight decay (decoupled) comes in three scalings, chosen per param group:

- ``"lr"``       decay = lr * wd                  (torch.optim.AdamW, optax)
- ``"lr_ratio"`` decay = (lr / initial_lr) * wd   (Loshchilov & Hutter Algorithm 2: the decay
                 follows the schedule multiplier eta_t only; torch's wd equals the paper's
                 lambda / lr)
- ``"none"``     decay = wd

All tensors passed to :func:`adam_update` are in the compute dtype (float32, or float64 for
float64 params); complex params arrive as real views. Scalars are Python floats (eager) or 0-d
tensors (compiled: changing them never recompiles). The function is pure: it returns new tensors
and the caller decides where they are stored.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from torch import Tensor

Scalar = float | Tensor

WEIGHT_DECAY_SCALINGS = ("lr", "lr_ratio", "none")


class StepScalars(NamedTuple):
    """Per-step scalars of the update, derived once per group by :func:`step_scalars`.

    ``param_scale`` multiplies the param before the Adam step (1 - decoupled decay), ``l2`` is
    the coupled L2 coefficient added to the gradient, ``neg_step_size`` is -lr / (1 - beta1^t)
    and ``bias_correction2_sqrt`` is sqrt(1 - beta2^t).
    """

    one_minus_beta1: Scalar
    beta2: Scalar
    one_minus_beta2: Scalar
    eps: Scalar
    param_scale: Scalar
    l2: Scalar
    neg_step_size: Scalar
    bias_correction2_sqrt: Scalar


class UpdateFlags(NamedTuple):
    """Static switches of the update. They select code, so a compiled kernel is keyed on them."""

    amsgrad: bool = False
    maximize: bool = False
    decoupled: bool = False  # apply param_scale (AdamW-style decay)
    coupled_l2: bool = False  # add l2 * p to the gradient (Adam + L2)


class Update(NamedTuple):
    """New values of the param and the moments (``max_exp_avg_sq`` is None without AMSGrad)."""

    param: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    max_exp_avg_sq: Tensor | None


def decay_coefficient(scaling: str, lr: Scalar, initial_lr: Scalar, weight_decay: Scalar) -> Scalar:
    """Fraction of the param removed by decoupled weight decay in one step.

    ``"lr"``: lr * wd; ``"lr_ratio"``: (lr / initial_lr) * wd (0 when initial_lr is 0);
    ``"none"``: wd. See the module docstring.
    """
    if scaling == "lr":
        return lr * weight_decay
    if scaling == "lr_ratio":
        if isinstance(initial_lr, (int, float)) and initial_lr == 0:
            return 0.0 * weight_decay
        return (lr / initial_lr) * weight_decay
    if scaling == "none":
        return weight_decay
    raise ValueError(
        f"Invalid weight_decay_scaling={scaling!r}: expected one of {WEIGHT_DECAY_SCALINGS}"
    )


def bias_corrections(step: Scalar, beta1: Scalar, beta2: Scalar) -> tuple[Scalar, Scalar]:
    """(1 - beta1^t, 1 - beta2^t) for step t (floats, 0-d tensors or NumPy arrays)."""
    return 1 - beta1**step, 1 - beta2**step


def corrected_root(second_moment, bias_correction2):
    """sqrt(v_hat) = sqrt(v / (1 - beta2^t)), elementwise (tensors or NumPy arrays)."""
    return (second_moment / bias_correction2) ** 0.5


def normalized_update(exp_avg, second_moment, bias_correction1, bias_correction2, eps, root=None):
    """u = m_hat / (sqrt(v_hat) + eps): the direction :func:`adam_update` moves p along, as
    Algorithm 1 writes it (the step is -lr * u; :func:`adam_update` evaluates the same quantity
    in torch's operation order). Used by the diagnostics; works on tensors and NumPy arrays.
    ``second_moment`` is v, or AMSGrad's running max; ``root``, when the caller has it, is
    :func:`corrected_root` of it (not computed again).
    """
    if root is None:
        root = corrected_root(second_moment, bias_correction2)
    return (exp_avg / bias_correction1) / (root + eps)


def step_scalars(
    *,
    lr: Scalar,
    beta1: Scalar,
    beta2: Scalar,
    eps: Scalar,
    weight_decay: Scalar,
    step: Scalar,
    decoupled: bool,
    weight_decay_scaling: str = "lr",
    initial_lr: Scalar = 1.0,
) -> StepScalars:
    """The scalars of step ``step`` (already incremented), computed as torch does.

    With Python floats this is double precision, exactly as torch's single-tensor path; with
    0-d tensors (capturable/compiled) the same expressions run on the device.
    """
    bias_correction1, bias_correction2 = bias_corrections(step, beta1, beta2)
    if isinstance(bias_correction2, (int, float)):
        bias_correction2_sqrt = math.sqrt(bias_correction2)
    else:
        bias_correction2_sqrt = bias_correction2.sqrt()
    if decoupled:
        param_scale = 1 - decay_coefficient(weight_decay_scaling, lr, initial_lr, weight_decay)
        l2 = 0.0
    else:
        param_scale = 1.0
        l2 = weight_decay
    return StepScalars(
        one_minus_beta1=1 - beta1,
        beta2=beta2,
        one_minus_beta2=1 - beta2,
        eps=eps,
        param_scale=param_scale,
        l2=l2,
        neg_step_size=-(lr / bias_correction1),
        bias_correction2_sqrt=bias_correction2_sqrt,
    )


def adam_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    s: StepScalars,
    flags: UpdateFlags,
) -> Update:
    """One Adam/AdamW/AMSGrad step on compute-dtype tensors; pure (see the module docstring).

    The operation order reproduces torch's single-tensor kernels bit for bit on CPU:
    ``lerp`` for m, ``addcmul(v * beta2, (1 - beta2) * g, g)`` for v (a fused multiply-add on
    CPU, as torch's ``addcmul_``), and
    ``p + (neg_step_size * m) / denom`` (addcdiv).
    """
    g = -grad if flags.maximize else grad
    p = param
    if flags.decoupled:
        p = p * s.param_scale
    if flags.coupled_l2:
        # g + l2 * p as one fused multiply-add, as torch's ``grad.add(param, alpha=wd)``.
        g = g.add(p, alpha=s.l2) if isinstance(s.l2, float) else g.addcmul(p, s.l2)
    m = exp_avg.lerp(g, s.one_minus_beta1)
    v = (exp_avg_sq * s.beta2).addcmul(s.one_minus_beta2 * g, g)
    vmax = None
    if flags.amsgrad:
        assert max_exp_avg_sq is not None, "amsgrad needs max_exp_avg_sq"
        vmax = max_exp_avg_sq.maximum(v)
        denom = vmax.sqrt() / s.bias_correction2_sqrt + s.eps
    else:
        denom = v.sqrt() / s.bias_correction2_sqrt + s.eps
    p = p + (s.neg_step_size * m) / denom
    return Update(p, m, v, vmax)
