r"""``adamkit.Adam`` and ``adamkit.AdamW``: torch.optim bookkeeping around the one update rule.

The classes do what ``torch.optim.Adam``/``AdamW`` do for the user (param groups, lazy state,
state_dict in torch's layout, step hooks, closures) and hand the arithmetic to an executor that
calls :func:`adamkit.rule.adam_update`. See :mod:`adamkit.rule` for the exact equations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from adamkit.execution.eager import run_eager
from adamkit.hparams import scalar_dtype, validate_group
from adamkit.rule import StepScalars, UpdateFlags, step_scalars
from adamkit.storage.float import FloatCodec

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]

# Keys adamkit adds to each param group beyond torch's. Filled in when absent, so that a
# state_dict saved by torch.optim loads into adamkit (and the reverse: torch ignores them).
_ADAMKIT_GROUP_KEYS = ("weight_decay_scaling", "decoupled_weight_decay", "maximize", "amsgrad")


def _scalar(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


class Adam(Optimizer):
    r"""Adam (Kingma & Ba 2015) with torch's conventions, optional AMSGrad and decoupled decay.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
        p_t = p_{t-1} - \mathrm{lr}\,\frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    ``eps`` is added outside the square root, after bias correction (PyTorch's and Algorithm 1's
    convention, not Keras' ``eps_hat``). With ``amsgrad`` the running max of the raw ``v_t``
    replaces ``v_t`` in the denominator.

    Args:
        params: tensors, param-group dicts, or ``named_parameters()`` pairs.
        lr: learning rate, a float or a 0-d tensor (default 1e-3).
        betas: (beta1, beta2), each in [0, 1) (default (0.9, 0.999)).
        eps: added to sqrt(v_hat) (default 1e-8).
        weight_decay: L2 coefficient added to the gradient (``g += wd * p``), or with
            ``decoupled_weight_decay=True`` the decoupled decay of AdamW (default 0).
        amsgrad: use the running max of v (Reddi et al. 2018).
        maximize: maximise the objective (the gradient is negated before weight decay).
        decoupled_weight_decay: decay the weights directly, ``p *= 1 - decay`` (AdamW).
        weight_decay_scaling: how decoupled decay is scaled: ``"lr"`` (decay = lr * wd, as
            torch and optax), ``"lr_ratio"`` (decay = lr / initial_lr * wd, Loshchilov &
            Hutter's Algorithm 2; initial_lr is the group's ``initial_lr`` when a scheduler set
            one, else its lr at construction) or ``"none"`` (decay = wd).

    Moments are kept in the param's dtype (torch's rule); the arithmetic always runs in float32
    (float64 for float64 params), so fp16/bf16 params never see fp16 rounding inside a step.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        weight_decay_scaling: str = "lr",
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas) if isinstance(betas, list) else betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "decoupled_weight_decay": decoupled_weight_decay,
            "weight_decay_scaling": weight_decay_scaling,
        }
        validate_group(defaults)
        self._codec = FloatCodec(None)
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------------------
    # param groups and state_dict compatibility

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyperparameters are validated before anything is changed."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        validate_group(merged)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        lr = group["lr"]
        group.setdefault("construction_lr", lr.clone() if isinstance(lr, Tensor) else lr)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key in _ADAMKIT_GROUP_KEYS:
                group.setdefault(key, self.defaults[key])
            group.setdefault("construction_lr", group["lr"])

    # ----------------------------------------------------------------------------------------
    # the step

    def _init_state(self, param: Tensor, group: dict[str, Any]) -> dict:
        state = self.state[param]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
            state.update(self._codec.allocate(param, "exp_avg"))
            state.update(self._codec.allocate(param, "exp_avg_sq"))
            if group["amsgrad"]:
                state.update(self._codec.allocate(param, "max_exp_avg_sq"))
        elif group["amsgrad"] and "max_exp_avg_sq" not in state:
            # amsgrad switched on mid-run: start the running max from the current v.
            state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()
        return state

    def _collect(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[dict]]:
        params, grads, states = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    "adamkit.Adam does not support sparse gradients (param of shape "
                    f"{tuple(p.shape)}); use torch.optim.SparseAdam or a dense gradient"
                )
            params.append(p)
            grads.append(p.grad)
            states.append(self._init_state(p, group))
        return params, grads, states

    @staticmethod
    def _flags(group: dict[str, Any]) -> UpdateFlags:
        wd_on = _scalar(group["weight_decay"]) != 0.0
        decoupled = group["decoupled_weight_decay"]
        return UpdateFlags(
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
            decoupled=decoupled and wd_on,
            coupled_l2=(not decoupled) and wd_on,
        )

    @staticmethod
    def _scalars_fn(group: dict[str, Any]) -> Callable[[float], StepScalars]:
        beta1, beta2 = (_scalar(b) for b in group["betas"])
        lr = _scalar(group["lr"])
        initial_lr = _scalar(group.get("initial_lr", group["construction_lr"]))

        def scalars(step: float) -> StepScalars:
            return step_scalars(
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=_scalar(group["eps"]),
                weight_decay=_scalar(group["weight_decay"]),
                step=step,
                decoupled=group["decoupled_weight_decay"],
                weight_decay_scaling=group["weight_decay_scaling"],
                initial_lr=initial_lr,
            )

        return scalars

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step; returns the closure's loss when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, states = self._collect(group)
            if params:
                run_eager(
                    params, grads, states, self._scalars_fn(group), self._flags(group), self._codec
                )
        return loss


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay, default wd 1e-2.

    ``AdamW(...)`` equals ``Adam(..., decoupled_weight_decay=True)`` with torch's AdamW defaults.
    Each step first scales the param by ``1 - decay`` (``decay`` per ``weight_decay_scaling``:
    lr * wd by default, as ``torch.optim.AdamW``), then applies the Adam update.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        weight_decay_scaling: str = "lr",
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=True,
            weight_decay_scaling=weight_decay_scaling,
        )
