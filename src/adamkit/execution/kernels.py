"""Compiled chunk kernels: one torch.compile per kind of chunk, called without dynamo.

A kernel is :func:`adamkit.rule.adam_update` and the codec's ``decode``/``encode_`` traced over
``width`` tensors (:class:`KernelSpec` says what it is specialised on: device, dtypes, codec,
flags, width and layout). It is compiled once per process through dynamo with a backend that
keeps inductor's compiled callable and the list of the graph's inputs (from dynamo's sources:
``L['params'][3]``, ``L['params'][3].size()[0]``, ...). The executor then calls that callable
directly with exactly those inputs: no guards are evaluated and no arguments are flattened by
dynamo per call (measured: 107 us per call of a 32-tensor chunk through torch.compile, 67 us
with every guard dropped, 20 us direct). Dynamic sizes make one kernel serve every size; the
guards skipped are the executor's own invariants (see :mod:`adamkit.execution.plan`).

Every new kernel is checked against the uncompiled function on its example inputs (which also
checks that an N-d contiguous tensor may stand for the traced 1-d one) before it is used.
Kernels are shared by all optimizers of the process; :func:`compile_stats` counts them.
"""

from __future__ import annotations

import re
import threading
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from adamkit.execution.multi_tensor import moment_keys
from adamkit.rule import StepScalars, UpdateFlags, adam_update, step_scalars

LAYOUTS = ("uniform", "mixed", "small")
"""uniform: equal sizes, one fused parallel loop; mixed: one parallel loop per tensor; small:
one serial loop per tensor (traced with small size hints, so inductor emits no OpenMP region)."""

INDUCTOR_OPTIONS: dict[str, Any] = {"size_asserts": False}
"""Inductor config for the kernels: no shape asserts in the wrapper (the executor checks)."""

_COMPILE_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_NUM_SCALARS = len(StepScalars._fields)


class CompileUnavailable(RuntimeError):
    """The compiled path cannot run here (no compiler, unsupported device or dtype, error)."""


# ------------------------------------------------------------------------------------------------
# compile statistics


@dataclass
class CompileStats:
    """Compiles done by this process (all optimizers share the kernels)."""

    compiles: int = 0
    seconds: float = 0.0
    failures: int = 0
    kernels: list[str] = field(default_factory=list)


STATS = CompileStats()


def compile_stats() -> CompileStats:
    """How many kernels were compiled in this process, and how long it took."""
    return STATS


# ------------------------------------------------------------------------------------------------
# kernels


@dataclass(frozen=True)
class KernelSpec:
    """What one compiled chunk function is specialised on; everything else is a runtime input."""

    device_type: str
    param_dtype: torch.dtype
    codec: Any  # a hashable codec (frozen dataclass)
    stored_dtype: torch.dtype
    flags: UpdateFlags
    width: int
    layout: str  # one of LAYOUTS

    def describe(self) -> str:
        kind = self.layout
        dtype = str(self.param_dtype).removeprefix("torch.")
        state = str(self.stored_dtype).removeprefix("torch.")
        on = [name for name, value in self.flags._asdict().items() if value]
        return f"{self.device_type} {dtype} params/{state} state {kind}x{self.width} {on or ''}"


def _chunk_function(spec: KernelSpec) -> Callable:
    """The Python function traced for ``spec``: the rule and the codec over ``width`` tensors.

    ``params[i]``, ``grads[i]`` are tensors of the same number of elements; ``states[i]`` maps
    the codec's state keys to tensors; ``scalars[i]`` is the float32 row of
    :class:`StepScalars` of tensor i.
    """
    codec, flags, width = spec.codec, spec.flags, spec.width
    f32 = torch.float32

    def adamkit_chunk(params, grads, states, scalars):
        for i in range(width):
            param, state = params[i], states[i]
            s = StepScalars(*scalars[i].unbind(0))
            shape = param.shape
            out = adam_update(
                param.to(f32),
                grads[i].to(f32),
                codec.decode(state, "exp_avg", shape, f32),
                codec.decode(state, "exp_avg_sq", shape, f32),
                codec.decode(state, "max_exp_avg_sq", shape, f32) if flags.amsgrad else None,
                s,
                flags,
            )
            param.copy_(out.param)
            codec.encode_(state, "exp_avg", out.exp_avg)
            codec.encode_(state, "exp_avg_sq", out.exp_avg_sq)
            if flags.amsgrad:
                codec.encode_(state, "max_exp_avg_sq", out.max_exp_avg_sq)

    # A fresh code object per spec: dynamo caches compiled code per code object, and each spec
    # must be traced (and handed to our backend) on its own.
    code = adamkit_chunk.__code__.replace(co_name=f"adamkit_chunk_{abs(hash(spec)) % 10**8}")
    return types.FunctionType(
        code, adamkit_chunk.__globals__, code.co_name, None, adamkit_chunk.__closure__
    )


_SOURCE = re.compile(r"L\['(\w+)'\]((?:\[(?:\d+|'\w+')\])*)(\.size\(\)\[0\])?")
_ITEM = re.compile(r"\[(\d+|'\w+')\]")


def _parse_source(name: str) -> tuple[str, tuple, bool]:
    """``L['states'][3]['exp_avg'].size()[0]`` -> ('states', (3, 'exp_avg'), True)."""
    match = _SOURCE.fullmatch(name)
    if match is None:
        raise CompileUnavailable(f"unexpected graph input {name!r}")
    path = tuple(
        int(item) if item.isdigit() else item.strip("'") for item in _ITEM.findall(match[2])
    )
    return match[1], path, match[3] is not None


def _source_name(node) -> str:
    source = node.meta["grapharg"].source
    name = source.name
    return name() if callable(name) else name


class Kernel:
    """A compiled chunk function and the recipe of its graph inputs."""

    def __init__(self, spec: KernelSpec, fn: Callable, recipe: list[tuple[str, tuple, bool]]):
        self.spec = spec
        self.fn = fn
        self.recipe = recipe

    def arguments(self, inputs: dict[str, Any]) -> tuple[list, list[tuple[int, int]]]:
        """The graph's argument list for ``inputs`` and the positions of the grads in it.

        ``inputs`` holds 'params', 'grads', 'states', 'scalars' as passed to the traced
        function; sizes are taken as ``numel`` of the named tensor (tensors may be N-d and
        contiguous: the kernels see a pointer and an element count).
        """
        args: list = []
        grad_slots: list[tuple[int, int]] = []
        for root, path, is_size in self.recipe:
            value = inputs[root]
            for item in path:
                value = value[item]
            if is_size:
                args.append(value.numel())
                continue
            if root == "grads":
                grad_slots.append((len(args), path[0]))
            args.append(value)
        return args, grad_slots


_KERNELS: dict[KernelSpec, Kernel | CompileUnavailable] = {}
_LOCK = threading.Lock()


def _example_inputs(spec: KernelSpec, device: torch.device) -> dict[str, Any]:
    """Inputs to trace with: one size (uniform) or distinct even sizes (mixed, small).

    The sizes are hints for inductor's code generation: large ones get parallel loops, the
    small layout's (under 512 elements per thread) serial ones.
    """
    generator = torch.Generator().manual_seed(0)
    params, grads, states = [], [], []
    for i in range(spec.width):
        n = {"uniform": 4096, "mixed": 4096 + 32 * (i + 1), "small": 64 + 2 * (i + 1)}[spec.layout]
        p = torch.randn(n, generator=generator).to(device, spec.param_dtype)
        params.append(p)
        grads.append(torch.randn(n, generator=generator).to(device, spec.param_dtype))
        state: dict[str, Tensor] = {}
        for key in moment_keys(spec.flags):
            state.update(spec.codec.allocate(p, key))
        states.append(state)
    row = step_scalars(
        lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3.0, decoupled=True
    )
    scalars = torch.tensor([list(row)] * spec.width, dtype=torch.float32, device=device)
    return {"params": params, "grads": grads, "states": states, "scalars": scalars}


def _clone_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    return {
        "params": [p.clone() for p in inputs["params"]],
        "grads": inputs["grads"],
        "states": [{k: v.clone() for k, v in s.items()} for s in inputs["states"]],
        "scalars": inputs["scalars"],
    }


def _check_compiler(device: torch.device) -> None:
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as err:  # noqa: BLE001 - any failure means "no compiler"
            raise CompileUnavailable(f"no C++ compiler for inductor: {err}") from err
    elif device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError as err:
            raise CompileUnavailable("triton is not installed") from err
    else:
        raise CompileUnavailable(f"device type {device.type!r} is not supported")


def _compile(spec: KernelSpec, device: torch.device) -> Kernel:
    _check_compiler(device)
    if spec.param_dtype not in _COMPILE_FLOATS:
        raise CompileUnavailable(f"dtype {spec.param_dtype} is not compiled")
    from torch._inductor import compile as inductor_compile

    captured: dict[str, Any] = {}

    def backend(gm, example_inputs):
        captured["sources"] = [
            _source_name(node) for node in gm.graph.nodes if node.op == "placeholder"
        ]
        compiled = inductor_compile(gm, example_inputs, options=dict(INDUCTOR_OPTIONS))
        captured["fn"] = compiled
        return compiled

    inputs = _example_inputs(spec, device)
    traced = _chunk_function(spec)
    torch._dynamo.mark_static(inputs["scalars"])
    compiled_fn = torch.compile(traced, backend=backend, dynamic=True, fullgraph=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch-internal, not the user's
        compiled_fn(**_clone_inputs(inputs))
    if "fn" not in captured:
        raise CompileUnavailable("torch.compile did not call the adamkit backend")
    recipe = [_parse_source(name) for name in captured["sources"]]
    kernel = Kernel(spec, captured["fn"], recipe)
    _self_test(kernel, traced, inputs)
    return kernel


def _self_test(kernel: Kernel, traced: Callable, inputs: dict[str, Any]) -> None:
    """The direct call must agree with the uncompiled function (and accept N-d tensors)."""
    expected = _clone_inputs(inputs)
    with torch.no_grad():
        traced(**expected)
    got = _clone_inputs(inputs)
    # Pass the first tensor's param, grad and state as 2-d: the executor passes params as
    # they are, relying on the kernels seeing a pointer and an element count.
    n0 = got["params"][0].numel()
    reshaped = dict(got)
    reshaped["params"] = [got["params"][0].view(2, n0 // 2), *got["params"][1:]]
    reshaped["grads"] = [got["grads"][0].view(2, n0 // 2), *got["grads"][1:]]
    reshaped["states"] = [
        {k: v.view(2, n0 // 2) for k, v in got["states"][0].items()},
        *got["states"][1:],
    ]
    args, _ = kernel.arguments(reshaped)
    with torch.no_grad():
        kernel.fn(*args)
    low = kernel.spec.param_dtype != torch.float32 or kernel.spec.stored_dtype != torch.float32
    tol = 1e-2 if low else 1e-5
    pairs = list(zip(expected["params"], got["params"]))
    for s_exp, s_got in zip(expected["states"], got["states"]):
        pairs += [(s_exp[k], s_got[k]) for k in s_exp]
    for want, have in pairs:
        if not torch.allclose(have.float(), want.float(), rtol=tol, atol=tol * 1e-3):
            raise CompileUnavailable("compiled kernel disagrees with the update rule (self-test)")


def get_kernel(spec: KernelSpec, device: torch.device) -> Kernel:
    """The compiled kernel for ``spec`` (compiled on first use, shared by all optimizers).

    Raises :class:`CompileUnavailable` (also on later calls for the same spec) if it cannot be
    compiled.
    """
    with _LOCK:
        found = _KERNELS.get(spec)
        if isinstance(found, Kernel):
            return found
        if found is not None:
            raise found
        start = time.perf_counter()
        try:
            kernel = _compile(spec, device)
        except Exception as err:  # noqa: BLE001 - a failed compile must never end training
            failure = (
                err
                if isinstance(err, CompileUnavailable)
                else CompileUnavailable(f"{type(err).__name__}: {err}")
            )
            STATS.failures += 1
            _KERNELS[spec] = failure
            raise failure from err
        seconds = time.perf_counter() - start
        STATS.compiles += 1
        STATS.seconds += seconds
        STATS.kernels.append(f"{spec.describe()} ({seconds:.1f} s)")
        _KERNELS[spec] = kernel
        return kernel


def mark_failed(spec: KernelSpec, error: Exception) -> CompileUnavailable:
    """Record that ``spec``'s kernel failed at run time: it is not handed out again."""
    failure = CompileUnavailable(f"{type(error).__name__}: {error}")
    with _LOCK:
        _KERNELS[spec] = failure
    return failure


def compiled_kinds(flags: UpdateFlags) -> set[tuple]:
    """(device type, param dtype, codec, stored dtype) of the kernels compiled for ``flags``."""
    with _LOCK:
        return {
            (s.device_type, s.param_dtype, s.codec, s.stored_dtype)
            for s, k in _KERNELS.items()
            if isinstance(k, Kernel) and s.flags == flags
        }


def reset_kernels() -> None:
    """Forget compiled kernels and failures (tests)."""
    with _LOCK:
        _KERNELS.clear()


_DUMMIES: dict[tuple, dict[str, Any]] = {}


def dummy_inputs(spec: KernelSpec, device: torch.device, slot: int) -> dict[str, Any]:
    """Padding for slot ``slot`` of a chunk: a tiny param, grad and state that nobody reads."""
    key = (spec, str(device), slot)
    if key not in _DUMMIES:
        p = torch.zeros(16, dtype=spec.param_dtype, device=device)
        state: dict[str, Tensor] = {}
        for name in moment_keys(spec.flags):
            state.update(spec.codec.allocate(p, name))
        _DUMMIES[key] = {"param": p, "grad": torch.zeros_like(p), "state": state}
    return _DUMMIES[key]
