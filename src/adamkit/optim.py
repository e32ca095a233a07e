r"""``adamkit.Adam`` and ``adamkit.AdamW``: torch.optim bookkeeping around the one update rule.

The classes do what ``torch.optim.Adam``/``AdamW`` do for the user (param groups, lazy state,
state_dict in torch's layout, step hooks, closures) and hand the arithmetic to an executor that
calls :func:`adamkit.rule.adam_update`. See :mod:`adamkit.rule` for the exact equations.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from adamkit.distributed import (
    adopt_sharded_state,
    decoded_sharded_state,
    flatten_blocks,
    present_state_dict,
    start_sharded_running_max_,
)
from adamkit.execution.capturable import run_capturable, tensor_step_scalars
from adamkit.execution.compiled import CompiledExecutor
from adamkit.execution.eager import compute_dtype, run_eager
from adamkit.hparams import scalar_dtype, validate_group
from adamkit.rule import StepScalars, UpdateFlags, step_scalars
from adamkit.storage.quantized import BlockwiseCodec
from adamkit.storage.rounding import KeySource
from adamkit.storage.select import (
    DEFAULT_MIN_QUANTIZED_SIZE,
    MOMENT_KEYS,
    Codec,
    infer_codec,
    select_codec,
    stored_names,
    validate_min_quantized_size,
    validate_state_dtype,
)
from adamkit.storage.shards import is_dtensor

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]

# Keys adamkit adds to each param group beyond torch's. Filled in when absent, so that a
# state_dict saved by torch.optim loads into adamkit (and the reverse: torch ignores them).
_ADAMKIT_GROUP_KEYS = (
    "weight_decay_scaling",
    "decoupled_weight_decay",
    "maximize",
    "amsgrad",
    "state_dtype",
    "min_quantized_size",
    "stochastic_rounding",
    "capturable",
)
BACKENDS = ("auto", "eager", "compiled")


def validate_backend(backend: object) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend={backend!r}: expected one of {BACKENDS}")


def resolve_backend(
    backend: object, *, foreach: object = None, fused: object = None, differentiable: object = False
) -> str:
    """The backend a constructor runs, given torch.optim's implementation switches too.

    ``torch.optim.Adam``/``AdamW`` choose their implementation with ``foreach`` and ``fused``;
    adamkit accepts them so that a call written for torch runs unchanged, and reads them as
    backends: ``fused=True`` is ``"compiled"`` (one fused kernel over all params),
    ``foreach=False`` is ``"eager"`` (one param at a time), ``foreach=True`` and ``None`` leave
    ``backend`` as it is (``"auto"`` is adamkit's multi-tensor path). Given with a ``backend``
    other than ``"auto"``, a switch must name the same one. ``fused=True`` with
    ``foreach=True`` is an error, as in torch. ``differentiable=True`` (gradients through the
    step) is not supported: adamkit's steps run under ``torch.no_grad``.
    """
    validate_backend(backend)
    for name, value in (("foreach", foreach), ("fused", fused)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"Invalid {name}={value!r}: expected None or a bool")
    if not isinstance(differentiable, bool):
        raise ValueError(f"Invalid differentiable={differentiable!r}: expected a bool")
    if differentiable:
        raise ValueError(
            "Invalid differentiable=True: adamkit's steps run under torch.no_grad, so no "
            "gradient flows through them; use torch.optim.Adam(differentiable=True) for that"
        )
    if fused and foreach:
        raise ValueError("Invalid fused=True with foreach=True: choose one, as in torch.optim")
    wanted = "compiled" if fused else "eager" if foreach is False else None
    if wanted is None or backend == wanted:
        return str(backend)
    if backend == "auto":
        return wanted
    switch = "fused=True" if fused else "foreach=False"
    raise ValueError(
        f"Invalid {switch} with backend={backend!r}: {switch} means backend={wanted!r}; "
        "give one of them"
    )


def _validate_all(group: dict[str, Any]) -> None:
    validate_group(group)
    validate_state_dtype(group["state_dtype"])
    validate_min_quantized_size(group["min_quantized_size"])
    if not isinstance(group["stochastic_rounding"], bool):
        raise ValueError(
            f"Invalid stochastic_rounding={group['stochastic_rounding']!r}: expected a bool"
        )
    if not isinstance(group["capturable"], bool):
        raise ValueError(f"Invalid capturable={group['capturable']!r}: expected a bool")
    if group["capturable"] and (
        group["stochastic_rounding"] or group["state_dtype"] not in (None, "float32")
    ):
        raise ValueError(
            "Invalid capturable=True with stochastic rounding or "
            f"state_dtype={group['state_dtype']!r}: their random streams are keyed by the "
            "step count on the host; use capturable=False"
        )


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
        state_dtype: how the moments are stored: ``None`` (the param's dtype, torch's rule),
            ``"float32"``, ``"bfloat16"`` (stochastic rounding), ``"int8"`` or ``"int4"``
            (block-wise codes; see :mod:`adamkit.storage.select`).
        min_quantized_size: params with fewer elements keep fp32 moments under int8/int4
            (default 4096; 0 quantises everything). :func:`adamkit.memory_report` says which.
        stochastic_rounding: write bf16/fp16 params back from the fp32 result with unbiased
            stochastic rounding, so updates below half an ulp survive in expectation.
        seed: seed of the counter-based random streams of stochastic rounding. The numbers
            are a function of (seed, param index, step), so resume is bitwise exact.
        skip_nonfinite: check every gradient before the step; if any holds inf or NaN, change
            no param and no state, leave the step counts alone and count the step in
            ``optimizer.skipped_steps`` (one extra read of the gradients and one sync).
        backend: how the update runs (see :mod:`adamkit.execution`): ``"eager"`` (one param
            at a time, plain torch ops: the reference), ``"compiled"`` (torch.compile'd
            kernels over chunks of tensors: C++ on CPU, Triton on GPU; compiles on the first
            step) or ``"auto"`` (default: an uncompiled multi-tensor path that pools small
            tensors, switching to the compiled kernels once the time they would have saved
            exceeds what compiling costs). If compiling is impossible, adamkit warns once and
            stays uncompiled. Every ``state_dtype`` and stochastic rounding compile; float64
            and complex params and DTensors take the eager path.
        capturable: keep ``state['step']`` on the param's device (float32, as torch's
            capturable Adam) and compute the bias corrections there (in float64), so that no
            step reads a value back to the host: the step can be captured in a CUDA graph or
            traced whole by ``torch.compile``. Not with stochastic rounding or bf16/int8/int4
            states. With a GradScaler, checking ``found_inf`` still syncs once per step.
        foreach, fused, differentiable: torch.optim's implementation switches, accepted so
            that a call written for torch runs unchanged (:func:`resolve_backend`):
            ``fused=True`` selects ``backend="compiled"``, ``foreach=False``
            ``backend="eager"``; ``differentiable=True`` is refused (not supported).

    Supports ``torch.amp.GradScaler``'s optimizer protocol (as torch's fused Adam): the scaler
    sets ``grad_scale`` and ``found_inf``; on inf/NaN the step changes nothing (params, state,
    step counts), otherwise the gradients are unscaled in place before the update.

    The arithmetic always runs in float32 (float64 for float64 params), so fp16/bf16 params
    never see fp16 rounding inside a step.
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
        state_dtype: str | None = None,
        min_quantized_size: int = DEFAULT_MIN_QUANTIZED_SIZE,
        stochastic_rounding: bool = False,
        seed: int = 0,
        skip_nonfinite: bool = False,
        backend: str = "auto",
        capturable: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Invalid seed={seed!r}: expected an int")
        if not isinstance(skip_nonfinite, bool):
            raise ValueError(f"Invalid skip_nonfinite={skip_nonfinite!r}: expected a bool")
        backend = resolve_backend(
            backend, foreach=foreach, fused=fused, differentiable=differentiable
        )
        self.seed = seed
        self.skip_nonfinite = skip_nonfinite
        self.backend = backend
        self._executor: CompiledExecutor | None = None
        self.skipped_steps = 0
        defaults = {
            "lr": lr,
            "betas": tuple(betas) if isinstance(betas, list) else betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "decoupled_weight_decay": decoupled_weight_decay,
            "weight_decay_scaling": weight_decay_scaling,
            "state_dtype": state_dtype,
            "min_quantized_size": min_quantized_size,
            "stochastic_rounding": stochastic_rounding,
            "capturable": capturable,
        }
        _validate_all(defaults)
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------------------
    # param groups and state_dict compatibility

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyperparameters are validated before anything is changed."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        _validate_all(merged)
        super().add_param_group(param_group)
        self._invalidate_plans()
        group = self.param_groups[-1]
        lr = group["lr"]
        group.setdefault("construction_lr", lr.clone() if isinstance(lr, Tensor) else lr)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._invalidate_plans()
        for group in self.param_groups:
            for key in _ADAMKIT_GROUP_KEYS:
                group.setdefault(key, self.defaults[key])
            group.setdefault("construction_lr", group["lr"])

    # ----------------------------------------------------------------------------------------
    # the step

    def codec_for(self, param: Tensor, group: dict[str, Any] | None = None) -> tuple[Codec, str]:
        """The codec that stores ``param``'s moments, and why it was chosen."""
        group = group if group is not None else self._group_of(param)
        return select_codec(param, group["state_dtype"], group["min_quantized_size"])

    def _group_of(self, param: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise KeyError("param is not managed by this optimizer")

    def _init_state(self, param: Tensor, group: dict[str, Any], codec: Codec) -> dict:
        state = self.state[param]
        if len(state) == 0:
            if group["capturable"]:
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            else:
                state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
            state.update(codec.allocate(param, "exp_avg"))
            state.update(codec.allocate(param, "exp_avg_sq"))
            if group["amsgrad"]:
                state.update(codec.allocate(param, "max_exp_avg_sq"))
        elif group["amsgrad"] and all(k not in state for k in codec.state_keys("max_exp_avg_sq")):
            # amsgrad switched on mid-run: start the running max from the current v.
            if is_dtensor(param):
                start_sharded_running_max_(codec, state, param)
                return state
            shape = torch.view_as_real(param).shape if param.is_complex() else param.shape
            v = codec.decode(state, "exp_avg_sq", shape, torch.float32)
            state.update(codec.allocate(param, "max_exp_avg_sq"))
            codec.encode_(state, "max_exp_avg_sq", v)
        return state

    def _collect(
        self, group: dict[str, Any]
    ) -> tuple[list[Tensor], list[Tensor], list[dict], list[Codec]]:
        params = [p for p in group["params"] if p.grad is not None]
        states, codecs = self._prepare(group, params)
        return params, [p.grad for p in params], states, codecs

    def _prepare(
        self, group: dict[str, Any], params: list[Tensor]
    ) -> tuple[list[dict], list[Codec]]:
        """The (lazily initialised) states and the codecs of ``params``, which have grads."""
        states, codecs = [], []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError(
                    "adamkit.Adam does not support sparse gradients (param of shape "
                    f"{tuple(p.shape)}); use torch.optim.SparseAdam or a dense gradient"
                )
            codec, _ = self.codec_for(p, group)
            states.append(self._init_state(p, group, codec))
            codecs.append(codec)
        return states, codecs

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
        signals: dict[Tensor, Tensor] | None = None
        if getattr(self, "fused_signals_request", False):  # a Monitor's sampled step
            signals = self.fused_signal_sums = {}
        if self._amp_found_inf():
            return loss
        if self.skip_nonfinite and self._has_nonfinite_grad():
            self.skipped_steps += 1
            return loss
        self._amp_unscale_()
        executor = self._step_executor()
        if executor is not None:
            executor.fused_signals = self.fused_signals
        offset = 0
        for group_index, group in enumerate(self.param_groups):
            if executor is not None:
                self._step_group(executor, group_index, group, offset, signals)
                offset += len(group["params"])
                continue
            params, grads, states, codecs = self._collect(group)
            if params and group["capturable"]:
                flags, scalars = self._flags(group), self._device_scalars_fn(group)
                run_capturable(params, grads, states, codecs, scalars, flags)
            elif params:
                index = self._param_index(group, params, offset)
                run_eager(
                    params,
                    grads,
                    states,
                    codecs,
                    self._scalars_fn(group),
                    self._flags(group),
                    rng_keys=KeySource(self.seed, np.asarray(index, dtype=np.int64)),
                    stochastic_param=group["stochastic_rounding"],
                )
            offset += len(group["params"])
        return loss

    def _step_executor(self) -> CompiledExecutor | None:
        """The executor of backend "compiled"/"auto"; None for the eager path.

        Inside a ``torch.compile`` of the user's training step the eager path runs (dynamo
        traces it into the user's graph).
        """
        backend = getattr(self, "backend", "auto")
        if backend == "eager" or torch.compiler.is_compiling():
            return None
        if getattr(self, "_executor", None) is None:
            self._executor = CompiledExecutor(auto=backend == "auto")
        return self._executor

    def _step_group(
        self,
        executor: CompiledExecutor,
        index: int,
        group: dict[str, Any],
        offset: int,
        signals: dict[Tensor, Tensor] | None = None,
    ) -> None:
        def rng_keys(params: list[Tensor]) -> KeySource:
            position = self._param_index(group, params, offset)
            return KeySource(self.seed, np.asarray(position, dtype=np.int64))

        executor.step_group(
            index,
            group,
            [p.grad for p in group["params"]],
            lambda params: self._prepare(group, params),
            self._scalars_fn(group),
            self._flags(group),
            rng_keys,
            self._device_scalars_fn(group) if group["capturable"] else None,
            signals,
        )

    fused_signals: bool | str = "auto"
    """Whether the compiled kernels hand a Monitor the squared norms of g, m and v on its
    sampled steps (:func:`adamkit.diagnostics.signals.fused_norms`), sparing it its own pass
    over them. Float params are stepped as rows there, each row's sums in the loop that writes
    it: measured +3-12% on a sampled step, against +25-35% for a separate pass over the
    gradients alone (docs/benchmarks.md). The signal kernels are compiled on first use: True
    uses them from the first sampled step, False never, "auto" (default) once the reads they
    save would have paid for their compile (:class:`adamkit.execution.compiled.SignalPolicy`):
    a Monitor never makes a short run wait for a compiler."""

    @property
    def supports_fused_signals(self) -> bool:
        """Whether a Monitor's sampled step gets exact signal sums from the compiled kernels
        (``fused_signal_sums``, by param; see :mod:`adamkit.diagnostics.monitor`)."""
        if self.fused_signals not in (True, False, "auto"):
            raise ValueError(
                f"Invalid fused_signals={self.fused_signals!r}: must be True, False or 'auto'"
            )
        return bool(self.fused_signals) and getattr(self, "backend", "auto") != "eager"

    @staticmethod
    def _device_scalars_fn(group: dict[str, Any]) -> Callable[[Tensor], StepScalars]:
        """StepScalars of step tensors, on their device (capturable: no host sync)."""

        def scalars(step: Tensor) -> StepScalars:
            beta1, beta2 = group["betas"]
            return tensor_step_scalars(
                step,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                decoupled=group["decoupled_weight_decay"],
                weight_decay_scaling=group["weight_decay_scaling"],
                initial_lr=group.get("initial_lr", group["construction_lr"]),
            )

        return scalars

    def _invalidate_plans(self) -> None:
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.invalidate()

    # GradScaler protocol (torch.amp.GradScaler.step): the scaler looks for this attribute and
    # then sets ``grad_scale`` (the scale to divide the grads by, or None if the user already
    # called ``scaler.unscale_``) and ``found_inf`` (non-zero if any grad is inf/NaN) on the
    # optimizer for the duration of ``step()``, as for torch's fused Adam.
    _step_supports_amp_scaling = True

    def _amp_found_inf(self) -> bool:
        """GradScaler found inf/NaN grads: skip the step (one sync on the scaler's device)."""
        found_inf = getattr(self, "found_inf", None)
        return found_inf is not None and bool(found_inf.item() != 0)

    def _amp_unscale_(self) -> None:
        """Divide the grads by GradScaler's ``grad_scale`` in place (as torch's fused Adam)."""
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is None:
            return
        by_device: dict[torch.device, list[Tensor]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    by_device.setdefault(p.grad.device, []).append(p.grad)
        for device, grads in by_device.items():
            torch._foreach_div_(grads, grad_scale.to(device=device, dtype=torch.float32))

    def _has_nonfinite_grad(self) -> bool:
        """Whether any gradient holds inf or NaN (one device sync for all of them)."""
        flags = [
            torch.isfinite(p.grad).all()
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        return bool(flags) and not bool(torch.stack(flags).all())

    @staticmethod
    def _param_index(group: dict[str, Any], params: list[Tensor], offset: int) -> list[int]:
        """Each param's position in the optimizer (state_dict order): its random-stream id."""
        position = {id(p): offset + i for i, p in enumerate(group["params"])}
        return [position[id(p)] for p in params]

    # ----------------------------------------------------------------------------------------
    # compact state: decoding, loading, exporting

    def decoded_state(self, param: Tensor) -> dict[str, Tensor]:
        """``param``'s state in torch's layout with fp32 (fp64 for fp64 params) moments.

        Complex params get complex moments. Used by :func:`adamkit.export_state_dict` and by
        the diagnostics, whatever the storage format.
        """
        if is_dtensor(param):
            return decoded_sharded_state(self, param)
        state = self.state.get(param, {})
        if not state:
            return {}
        out: dict[str, Tensor] = {"step": state["step"]}
        real = torch.view_as_real(param) if param.is_complex() else param
        for key in MOMENT_KEYS:
            codec = infer_codec(state, key)
            if codec is None:
                continue
            value = codec.decode(state, key, real.shape, compute_dtype(param))
            if param.is_complex():
                value = torch.view_as_complex(value.contiguous())
            out[key] = value
        return out

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict. Block-wise moments of DTensor (FSDP2) params appear as DTensors
        that torch.distributed.checkpoint saves and reshards: compact codes and scales laid out
        like the param where its rows are whole blocks, else decoded to fp32 in torch's layout
        (see :mod:`adamkit.distributed`); everything else is as stored."""
        return present_state_dict(self, super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of adamkit (any storage format) or of torch.optim.Adam/AdamW.

        Compact codes and scales are taken back exactly; float moments (torch's layout) are
        re-encoded into this optimizer's storage format. torch's own loader would cast every
        floating-point value to the param's dtype, so the moments are restored here instead.

        Every entry is checked against its param first (moments of the param's size, codes
        of uint8 with one scale per block, m and v together: :func:`_check_saved_entry`); an
        entry that does not fit raises ``ValueError`` naming it, and any failure while loading
        leaves the optimizer's state and groups as they were.
        """
        saved = {k: dict(v) for k, v in state_dict["state"].items()}
        # saved ids are what the saved groups list (ints, or FQNs from get_state_dict), by
        # position, as torch matches them
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        index_to_param = dict(zip(saved_ids, (p for g in self.param_groups for p in g["params"])))
        for index, entry in saved.items():  # every entry checked before anything changes
            param = index_to_param.get(index)
            if param is not None and not is_dtensor(param):
                _check_saved_entry(index, param, entry)
        old_state, old_groups = self.state, self.param_groups
        try:
            super().load_state_dict(state_dict)
            for index, entry in saved.items():
                param = index_to_param.get(index)
                if param is None or param not in self.state:
                    continue
                self._adopt_state(param, entry)
        except BaseException:  # torch's load builds new state and groups: put the old back
            self.state, self.param_groups = old_state, old_groups
            self._invalidate_plans()
            raise

    def _adopt_state(self, param: Tensor, saved: dict[str, Tensor]) -> None:
        """Rebuild ``param``'s moments from a saved entry, in this optimizer's format.

        The same compact format is taken back code for code; anything else (torch's float
        layout, another format) is decoded and re-encoded. DTensor (FSDP2) params: see
        :func:`adamkit.distributed.adopt_sharded_state`.
        """
        if is_dtensor(param):
            adopt_sharded_state(self, param, saved)
            return
        saved = flatten_blocks(saved)  # a gathered compact checkpoint holds them row-shaped
        codec, _ = self.codec_for(param)
        state = self.state[param]
        real = torch.view_as_real(param) if param.is_complex() else param
        for key in MOMENT_KEYS:
            source = infer_codec(saved, key)
            for stale in stored_names(key):
                state.pop(stale, None)
            if source is None:
                continue
            if isinstance(codec, BlockwiseCodec) and codec.same_levels(source):
                state.update(codec.adopt(source, saved, key, param.device))
                continue
            value = source.decode(saved, key, real.shape, compute_dtype(param))
            state.update(codec.allocate(param, key))
            codec.encode_(state, key, value.to(param.device))


def _check_saved_entry(index: object, param: Tensor, entry: dict[str, Any]) -> None:
    """Refuse a saved state entry that cannot be ``param``'s, naming it: moments of another
    size or element type (each format checks its own: ``check_saved``), or one of m and v
    without the other. ``max_exp_avg_sq`` may be missing (AMSGrad starts it from v)."""
    entry = flatten_blocks(entry)
    numel = param.numel() * (2 if param.is_complex() else 1)
    found = {}
    try:
        for key in MOMENT_KEYS:
            source = infer_codec(entry, key)
            if source is not None:
                source.check_saved(entry, key, numel)
                found[key] = source
    except ValueError as e:
        raise ValueError(
            f"state_dict['state'][{index!r}] does not fit param {index!r} of shape "
            f"{tuple(param.shape)}: {e}"
        ) from None
    step = entry.get("step")
    if step is not None:
        value = float(step.float().reshape(-1)[0]) if isinstance(step, Tensor) else step
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(
                f"state_dict['state'][{index!r}]['step'] = {step!r} for param {index!r}: "
                "expected a finite count >= 0"
            )
    floats = [t for t in entry.values() if isinstance(t, Tensor) and t.is_floating_point()]
    bad = sum(int((~torch.isfinite(t)).sum()) for t in floats)
    if bad:
        warnings.warn(
            f"state_dict['state'][{index!r}] holds {bad} non-finite values (inf or NaN) for "
            f"param {index!r} of shape {tuple(param.shape)}: they are loaded as they are and "
            "will spread into the param at its next step",
            RuntimeWarning,
            stacklevel=3,
        )
    pair = ("exp_avg", "exp_avg_sq")
    if len([k for k in pair if k in found]) == 1:
        missing = next(k for k in pair if k not in found)
        raise ValueError(
            f"state_dict['state'][{index!r}] has {', '.join(found)} but no {missing} (in any "
            f"format) for param {index!r} of shape {tuple(param.shape)}"
        )


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
        state_dtype: str | None = None,
        min_quantized_size: int = DEFAULT_MIN_QUANTIZED_SIZE,
        stochastic_rounding: bool = False,
        seed: int = 0,
        skip_nonfinite: bool = False,
        backend: str = "auto",
        capturable: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
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
            state_dtype=state_dtype,
            min_quantized_size=min_quantized_size,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            skip_nonfinite=skip_nonfinite,
            backend=backend,
            capturable=capturable,
            foreach=foreach,
            fused=fused,
            differentiable=differentiable,
        )
