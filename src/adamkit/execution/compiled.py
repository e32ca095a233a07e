r"""The compiled executor: the update rule traced by torch.compile into a few fused kernels.

An Adam step reads p, g, m, v and writes p, m, v: 28 B per fp32 param and no reuse, so it is
bound by memory bandwidth and by whatever fixed cost each tensor adds. What was measured on the
project's 2-core CPU (torch 2.13; docs/backends.md has the numbers) decided the design:

- one graph over all of a model's tensors compiles in time that grows with the tensors (80 s for
  200), so a compiled function covers a *chunk* of a few tensors, with dynamic sizes: at most
  three kernels (small, mixed, uniform chunks; :mod:`adamkit.execution.plan`) per dtype and
  flag set serve any number of tensors of any shapes;
- calling a ``torch.compile``'d function costs about 3 us per tensor argument (guards and
  argument handling), as much as the arithmetic of a 64x256 tensor; the executor calls
  inductor's compiled callable directly (:mod:`adamkit.execution.kernels`);
- params and grads are never copied (no torch.cat on the hot path) and the moments stay
  torch's per-param tensors, so ``state_dict`` is torch's layout and a step moves 28 B/param;
- hyperparameters and step-derived scalars reach the kernels as rows of a float32 table (one
  row of :class:`adamkit.rule.StepScalars` per tensor, computed in double precision as the eager
  path computes them): changing lr, betas, weight decay or the step never recompiles;
- the step counters of a plan's params are 0-d views into one buffer (``state[p]['step']``
  stays a 0-d float tensor), so advancing them is one op; with ``capturable`` the buffer and
  the tables live on the device and a step reads nothing back to the host.

The compiled path takes fp32/bf16/fp16 params with every storage format (float moments of
any dtype, int8/int4 block-wise codes) and stochastic rounding of params or moments: the traced
function calls the codec's ``decode``/``encode_`` around the one update rule, and the random
streams are keyed per tensor from an int64 table filled each step (the same numbers as the
eager path draws). A block-wise param that is no whole number of blocks is stepped as two
slots: its whole blocks in place, and its last partial block in a zero-padded staging block
(:mod:`adamkit.execution.plan`). float64 and complex params, DTensors and non-contiguous params
take the eager path, per param.

``backend="auto"`` (:class:`AutoPolicy`) runs the uncompiled multi-tensor path until compiling
is expected to have paid for itself. If compiling fails (no C++ compiler, an unsupported device
or dtype, an inductor error), the executor warns once and the affected params take the
uncompiled path from then on: a failed compile never ends a training run.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from adamkit.execution.capturable import run_capturable
from adamkit.execution.eager import update_param_
from adamkit.execution.kernels import (
    CompileStats,
    CompileUnavailable,
    Kernel,
    KernelSpec,
    block_of,
    compile_stats,
    compiled_kinds,
    get_kernel,
    mark_failed,
    reset_kernels,
)
from adamkit.execution.multi_tensor import run_multi_tensor
from adamkit.execution.plan import GroupPlan, compiled_eligible
from adamkit.rule import StepScalars, UpdateFlags
from adamkit.storage.rounding import KeySource
from adamkit.storage.shards import local_grad

# ------------------------------------------------------------------------------------------------
# the executor


class CompiledExecutor:
    """Runs an optimizer's groups through compiled kernels, with plans cached per group.

    ``warn`` is called once with a message if some params must fall back to the uncompiled
    path. With ``auto=True`` (``backend="auto"``) the groups take the uncompiled multi-tensor
    path until :class:`AutoPolicy` expects the compile to pay for itself.
    """

    def __init__(self, *, auto: bool = False, warn: Callable[[str], None] | None = None):
        self.auto = auto
        self._warn = warn or (lambda msg: warnings.warn(msg, RuntimeWarning, stacklevel=4))
        self._warned: set[str] = set()  # the kinds of warning given (each at most once)
        self._plans: dict[int, GroupPlan] = {}
        self._kinds: dict[int, tuple] = {}  # auto: the kernel kinds each group needs
        self.policy = AutoPolicy() if auto else None
        self.fused_signals: bool | str = "auto"  # see SignalPolicy; the optimizer sets it

    def invalidate(self) -> None:
        """Forget the plans (after load_state_dict or a change of param groups)."""
        self._plans.clear()
        self._kinds.clear()

    @property
    def compiling(self) -> bool:
        return self.policy is None or self.policy.compile_now

    def step_group(
        self,
        index: int,
        group: dict[str, Any],
        grads_all: list[Tensor | None],
        prepare: Callable[[list[Tensor]], tuple[list[dict], list]],
        scalars_for_step: Callable[[float], StepScalars],
        flags: UpdateFlags,
        rng_keys: Callable[[list[Tensor]], KeySource],
        device_scalars: Callable[[Tensor], StepScalars] | None = None,
        signals: dict[Tensor, Tensor] | None = None,
    ) -> None:
        """Step one group. ``prepare(params)`` returns their (initialised) states and codecs.

        ``device_scalars`` (capturable groups) maps step tensors to StepScalars on the device;
        then no value is read back to the host. ``signals``: a dict to fill with the squared
        norms (:func:`adamkit.diagnostics.signals.fused_norms`) of every param the compiled
        kernels step, by param (the Monitor's sampled steps), when :meth:`_signals_pay`.
        """
        params_all = group["params"]
        mask = tuple(g is not None for g in grads_all)
        if not any(mask):
            return
        stochastic = group["stochastic_rounding"]
        if not self.compiling:
            params = [p for p, m in zip(params_all, mask) if m]
            grads = [g for g in grads_all if g is not None]
            states, codecs = prepare(params)
            kinds = self._kinds.get(index)
            if kinds is None or kinds[0] != mask or kinds[1] != flags:
                kinds = (mask, flags, _kinds(params, codecs, stochastic))
                self._kinds[index] = kinds
                if any(block_of(kind[2]) for kind in kinds[2]):
                    self.policy.compile_seconds = AutoPolicy.BLOCKWISE_COMPILE_SECONDS
            if _kernels_ready(kinds[2], flags):
                self.policy.compile_now = True  # nothing left to pay for
                return self.step_group(
                    index,
                    group,
                    grads_all,
                    prepare,
                    scalars_for_step,
                    flags,
                    rng_keys,
                    device_scalars,
                    signals,
                )
            start = time.perf_counter()
            if device_scalars is not None:
                run_capturable(params, grads, states, codecs, device_scalars, flags)
                self.policy.observe(params, time.perf_counter() - start)
                return
            run_multi_tensor(
                params,
                grads,
                states,
                codecs,
                scalars_for_step,
                flags,
                rng_keys=rng_keys(params),
                stochastic_param=stochastic,
            )
            self.policy.observe(params, time.perf_counter() - start)
            return
        plan = self._plans.get(index)
        grads = [g for g in grads_all if g is not None]
        stale = (
            plan is None
            or plan.mask != mask
            or plan.flags != flags
            or (plan.device_scalars is None) != (device_scalars is None)
        )
        if stale or not _dense_grads_(plan, grads):
            params = [p for p, m in zip(params_all, mask) if m]
            states, codecs = prepare(params)
            plan = GroupPlan(
                mask,
                params,
                states,
                codecs,
                flags,
                stochastic,
                grads,
                device_scalars,
                rng_keys(params),
            )
            self._plans[index] = plan
            if plan.compile_error is not None:
                self._warn_unavailable(plan.compile_error)
            _dense_grads_(plan, grads)  # the kernels need contiguous grads
        if device_scalars is not None:
            plan.device_scalars = device_scalars  # the group's current hyperparameters
        fused = signals is not None and device_scalars is None and self._signals_pay(plan)
        sums = self._run(plan, grads, scalars_for_step, fused)
        if signals is not None:
            signals.update({plan.params[i]: row for i, row in sums.items()})

    def _signals_pay(self, plan: GroupPlan) -> bool:
        """Whether this sampled step goes through the plan's signal kernels (fused_signals:
        True always, False never, "auto" once :class:`SignalPolicy` says so)."""
        mode = self.fused_signals
        if mode is True or plan._signal_calls is not None:
            return mode is not False
        if mode is False or not plan.calls:
            return False
        if plan.signal_policy is None:
            plan.signal_policy = SignalPolicy()
        return plan.signal_policy.observe(plan)

    def _run(
        self, plan: GroupPlan, grads: list[Tensor], scalars_for_step, fused: bool = False
    ) -> dict[int, Tensor]:
        """Step the plan; with ``fused`` through the signals kernels, returning each param's
        squared norms by plan index (empty otherwise)."""
        steps, common = plan.advance_steps()
        cache = plan.fill_tables(steps, common, scalars_for_step)
        if steps is not None:
            plan.fill_random(steps)
        rest = plan.eager + plan.failed
        calls = plan.calls
        outputs: list = []
        if fused and calls:
            try:
                calls = plan.signal_calls()
            except CompileUnavailable as err:
                calls, fused = plan.calls, False  # no sums: the Monitor measures itself
                self._warn_no_signals(err)
        plan.stage_in(grads)
        for k, call in enumerate(calls):
            args = call.args
            for pos, i, offset, numel, row, whole in call.grad_slots:
                g = grads[i]
                if type(g) is not Tensor:
                    g, whole = local_grad(plan.params[i], g), None  # FSDP2: the local shard
                args[pos] = grad_argument(g, offset, numel, row, whole)
            try:
                out = call.kernel.fn(*args)
                if fused:
                    outputs.append((call, out[0]))
            except Exception as err:  # noqa: BLE001 - never end a training run here
                # Params whose slots did not all run are stepped uncompiled. (A param whose
                # whole blocks ran in an earlier call and whose last block did not cannot be
                # undone; kernels are self-tested when compiled, so this is a last resort.)
                done = {i for c in calls[:k] for i in c.members}
                pending = {i for c in calls[k:] for i in c.members}
                rest = rest + sorted(pending - done)
                self._give_up(plan, call.kernel, err)
                break
            finally:
                for pos, *_ in call.grad_slots:
                    args[pos] = None  # do not keep the grads alive
        plan.stage_out()
        if rest and plan.device_scalars is not None:
            for i in rest:
                state = plan.states[i]
                scalars = plan.device_scalars(state["step"])
                update_param_(plan.params[i], grads[i], state, scalars, plan.flags, plan.codecs[i])
        elif rest:
            keys = plan.keys
            for i in rest:
                step = steps[i]
                if step not in cache:
                    cache[step] = scalars_for_step(step)
                update_param_(
                    plan.params[i],
                    grads[i],
                    plan.states[i],
                    cache[step],
                    plan.flags,
                    plan.codecs[i],
                    rng_key=keys(i, step),
                    stochastic_param=plan.stochastic_param,
                )
        if not fused:
            return {}
        uncompiled = set(rest)
        return {i: row for i, row in plan.collect_sums(outputs).items() if i not in uncompiled}

    def _give_up(self, plan: GroupPlan, kernel: Kernel, err: Exception) -> None:
        """A kernel failed at run time: this plan and later ones step its params uncompiled."""
        failure = mark_failed(kernel.spec, err)
        plan.failed = plan.failed + sorted({i for c in plan.calls for i in c.members})
        plan.buckets = []
        plan.calls = []
        plan.compile_error = failure
        self._warn_unavailable(failure)

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            self._warn(message)

    def _warn_unavailable(self, error: Exception) -> None:
        self._warn_once(
            "kernels",
            f"adamkit: the compiled backend is unavailable for some params ({error}); they "
            "take the uncompiled path",
        )

    def _warn_no_signals(self, error: Exception) -> None:
        """The signal kernels cannot run: a Monitor's sampled steps then read every gradient
        and moment for their norms (exact, slower), which the user should know once."""
        self._warn_once(
            "signals",
            f"adamkit: the compiled signal sums are unavailable ({error}); a Monitor's sampled "
            "steps measure the norms themselves (slower)",
        )


def _kinds(params: list[Tensor], codecs: list, stochastic: bool) -> set[tuple]:
    """The kinds of kernel (device, dtype, codec, stored dtype) that ``params`` would need."""
    return {
        (p.device.type, p.dtype, codec, codec.stored_dtype(p))
        for p, codec in zip(params, codecs)
        if compiled_eligible(p, codec, stochastic)
    }


def grad_argument(
    grad: Tensor, offset: int, numel: int | None, row: int, whole: tuple[int, int] | None
) -> Tensor:
    """What a kernel slot takes of a (contiguous) grad: its ``numel`` elements from
    ``offset`` (None: all of it), 1-d, or as rows of ``row`` for a block-wise codec or a
    signals kernel. ``whole``: the shape of those rows when the slot is the whole grad; then
    the grad itself, when it has that shape, or one view of it: 0.1-0.7 us a tensor against
    2.4 us for ``ravel``, ``narrow`` and ``view`` (docs/benchmarks.md, session 12)."""
    if whole is not None:
        return grad if grad.shape == whole else grad.view(*whole)
    g = grad if grad.dim() == 1 else grad.ravel()  # 1-d (a view): see Kernel.arguments
    g = g if numel is None else g.narrow(0, offset, numel)
    return g.view(-1, row) if row else g  # block-wise: rows of whole blocks


def _kernels_ready(kinds: set[tuple], flags: UpdateFlags) -> bool:
    """Whether this process already compiled kernels for every kind in ``kinds``."""
    return bool(kinds) and kinds <= compiled_kinds(flags)  # empty: nothing would run compiled


def _dense_grads_(plan: GroupPlan, grads: list[Tensor]) -> bool:
    """Whether ``grads`` fit the plan: strided, of the dtypes the plan was built for. Grads
    that are not contiguous are replaced (in the list) by contiguous copies."""
    try:
        if not all(map(Tensor.is_contiguous, grads)):
            for i, g in enumerate(grads):
                grads[i] = g.contiguous()
    except RuntimeError:  # a sparse grad: let the plan builder refuse it
        return False
    return [g.dtype for g in grads] == plan.grad_dtypes


# ------------------------------------------------------------------------------------------------
# backend="auto"


class AutoPolicy:
    """When to stop using the uncompiled path and compile (``backend="auto"``).

    A ski-rental rule: keep stepping uncompiled while the time the compiled kernels would have
    saved so far is less than what compiling is expected to cost. The saving per step is the
    measured uncompiled step time minus the expected compiled one (params / COMPILED_RATE); so a
    model of 10k params never compiles in a short run, and a model of 50M params compiles
    after a few dozen steps. Kernels already compiled in this process cost nothing, so an
    optimizer whose kernels exist switches at once. Device steps are asynchronous, so off the
    CPU the uncompiled time is estimated from the sizes instead of measured.
    """

    COMPILE_SECONDS = 10.0
    BLOCKWISE_COMPILE_SECONDS = 30.0  # int8/int4 kernels (reductions per block) compile longer
    COMPILED_RATE = {"cpu": 1.0e9, "cuda": 5.0e10}  # params per second, conservative
    UNCOMPILED_RATE = {"cpu": 2.5e8, "cuda": 5.0e9}
    PER_TENSOR_SECONDS = {"cpu": 5e-5, "cuda": 1e-4}

    def __init__(self) -> None:
        self.saved = 0.0
        self.compile_now = False
        self.compile_seconds = self.COMPILE_SECONDS

    def observe(self, params: Sequence[Tensor], seconds: float) -> None:
        if self.compile_now or not params:
            return
        device = params[0].device.type
        numel = sum(p.numel() for p in params)
        if device != "cpu":
            seconds = numel / self.UNCOMPILED_RATE.get(device, 5e9) + len(params) * (
                self.PER_TENSOR_SECONDS.get(device, 1e-4)
            )
        compiled = numel / self.COMPILED_RATE.get(device, 5e10) + len(params) * 1e-6
        self.saved += max(0.0, seconds - compiled)
        if self.saved >= self.compile_seconds:
            self.compile_now = True


class SignalPolicy:
    """When to compile a plan's signal kernels (``fused_signals="auto"``): ski rental again.

    A sampled step that the signal kernels do not serve costs the Monitor its own read of g,
    m and v (``READ_BYTES`` per param at ``READ_RATE``), which the kernels would have saved;
    compile once those costs add up to ``COMPILE_SECONDS`` per signal kernel not yet compiled
    in this process (none missing: at once). Measured on the project's CPU: 16.8M fp32 params in
    35 tensors need two signal kernels (12 s from a cold cache) and a sampled step reads ~3 ms,
    so "auto" switches after a few thousand sampled steps there, and after a few dozen for a
    model of a billion params.
    """

    COMPILE_SECONDS = 6.0
    READ_BYTES = 12.0  # fp32 g, m, v
    READ_RATE = {"cpu": 2.5e10, "cuda": 2.0e12}  # bytes per second, the Monitor's norm passes

    def __init__(self) -> None:
        self.saved = 0.0

    def observe(self, plan: GroupPlan) -> bool:
        """Count one sampled step of ``plan``; whether its signal kernels are now worth it."""
        missing = plan.missing_signal_kernels()
        if not missing:
            return True
        device = plan.buckets[0].device.type if plan.buckets else "cpu"
        self.saved += plan.compiled_numel() * self.READ_BYTES / self.READ_RATE.get(device, 2e12)
        return self.saved >= self.COMPILE_SECONDS * missing


__all__ = [
    "CompileStats",
    "CompileUnavailable",
    "CompiledExecutor",
    "AutoPolicy",
    "SignalPolicy",
    "KernelSpec",
    "compile_stats",
    "get_kernel",
    "reset_kernels",
]
