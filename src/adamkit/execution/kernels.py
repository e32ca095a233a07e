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
checks the argument recipe) before it is used. The executor passes 1-d tensors only: a size
that is no graph input is read by the compiled code as ``size(0)`` of a tensor.
Kernels are shared by all optimizers of the process; :func:`compile_stats` counts them.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from adamkit.diagnostics.signals import norm_sums
from adamkit.execution import barriers
from adamkit.execution.barriers import drop_barriers, fuse_row_loops
from adamkit.execution.byteshift import constant_byte_shifts
from adamkit.execution.contraction import contract_sums
from adamkit.execution.eager import write_param_
from adamkit.execution.hoisting import hoist_invariants
from adamkit.execution.indices import affine_indices
from adamkit.execution.localizing import hoist_row_loops, localize_row_temps
from adamkit.execution.masks import masked_moves
from adamkit.execution.maxima import integer_maxima, integer_reductions
from adamkit.execution.merging import merge_sum_loops
from adamkit.execution.multi_tensor import moment_keys
from adamkit.execution.scratch import keep_scratch
from adamkit.execution.sharing import share_row_values
from adamkit.execution.shifts import logical_shifts
from adamkit.execution.truncation import truncate_exact_bf16
from adamkit.rule import StepScalars, UpdateFlags, adam_update, step_scalars
from adamkit.storage.rounding import ShardKey


def minifloat(codec: Any) -> bool:
    """Whether ``codec`` stores minifloat codes (block-wise, integer encode and decode)."""
    return getattr(codec, "mantissa", None) is not None


def block_of(codec: Any) -> int:
    """The block size of a block-wise codec; 0 for float codecs."""
    return int(getattr(codec, "block", 0))


LAYOUTS = ("uniform", "mixed", "small")
"""uniform: equal sizes, one fused parallel loop; mixed: one parallel loop per tensor; small:
one serial loop per tensor (traced with small size hints, so inductor emits no OpenMP region)."""

INDUCTOR_OPTIONS: dict[str, Any] = {"size_asserts": False}
"""Inductor config for the kernels: no shape asserts in the wrapper (the executor checks)."""

MINIFLOAT_OPTIONS: dict[str, Any] = {
    "realize_opcount_threshold": 10_000,
    "realize_reads_threshold": 10_000,
    "realize_acc_reads_threshold": 10_000,
}
"""Inductor config added for minifloat block-wise codecs: never store an intermediate for
reuse."""

SIGNAL_ROW = 1024
"""Elements per row of a signals kernel's float slots (a row of p, g, m, v: 16 KiB in fp32).

The row's sums share the loop that writes the row (:mod:`adamkit.execution.merging`): each
row ends with one horizontal sum per column and a store of the row's sums, which longer rows
make rarer. Measured on 16.8M fp32 params in 35 tensors, 2 threads (AMD EPYC, 2026-12-07),
sampled step against plain step, alternating in one process: rows of 128 +1.04 ms, 512 +0.99,
1024 +0.86, 2048 +0.92 (and in a second run 128 +1.42, 1024 +1.21). Before the sums were
merged into the update loop a row had to stay in L1 between two loops, and 128 was best."""

MOMENT_NAMES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

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
    stochastic_param: bool = False  # bf16/fp16 params written with stochastic rounding
    signals: bool = False  # also return the slots' fused signal sums (Monitor, sampled steps)

    def describe(self) -> str:
        kind = self.layout
        dtype = str(self.param_dtype).removeprefix("torch.")
        state = getattr(self.codec, "name", "")
        if state in ("", "param dtype"):
            state = str(self.stored_dtype).removeprefix("torch.")
        on = [name for name, value in self.flags._asdict().items() if value]
        if self.stochastic_param:
            on.append("sr")
        if self.signals:
            on.append("signals")
        return f"{self.device_type} {dtype} params/{state} state {kind}x{self.width} {on or ''}"


def _chunk_function(spec: KernelSpec) -> Callable:
    """The Python function traced for ``spec``: the rule and the codec over ``width`` tensors.

    ``params[i]``, ``grads[i]`` are tensors of the same number of elements; ``states[i]`` maps
    the codec's state keys to tensors; ``scalars[i]`` is the float32 row of
    :class:`StepScalars` of tensor i; ``ints[i]`` the int64 row (key, start, valid) of slot i:
    the key of its random streams and the index of its first element in the whole tensor
    (:class:`adamkit.storage.rounding.ShardKey`, read by stochastic rounding only) and, for
    block-wise codecs, how many of its elements are real (a tensor's last, partial block is
    stepped in a zero-padded slot of one block). The body is the eager executor's
    :func:`update_param_`, minus its DTensor and complex handling.

    With ``spec.signals`` the function also returns, for each slot, the squared norms of
    :func:`adamkit.diagnostics.signals.fused_norms` (a ``[width, 3]`` float32 tensor: g and
    the new m and v), computed from the values the step has at hand. Float slots of such a
    kernel outside small chunks arrive as ``[rows, SIGNAL_ROW]`` (:func:`signal_rows`), so
    that each row's sums share a loop with the row's writes. Kernels of fp32 params with float
    moments also sum p0^2 and (p1 - p0)^2 (``[width, 5]``).
    """
    codec, flags, width, sr = spec.codec, spec.flags, spec.width, spec.stochastic_param
    f32 = torch.float32
    block = block_of(codec)
    rows = minifloat(codec)  # minifloat codes are traced as rows (one outer loop per block)
    keys = moment_keys(flags)
    signals = spec.signals
    tie = signals and signal_rows(spec)  # float slots arrive as [rows, SIGNAL_ROW]
    # A param's last, partial block is a slot of one block (under SMALL_NUMEL elements), so
    # only small chunks hold tails; the other layouts' slots are whole blocks, stepped without
    # the mask (its compare and two selects per vector: int8 -4% a slot, docs/benchmarks.md)
    tails = spec.layout == "small"

    def step_region(param, grad, state_in, state, s, key, inside):
        """Step one slot; with ``signals`` return its (sum g^2, sum m^2, sum v^2)."""
        shape = param.shape
        g32 = grad.to(f32)
        out = adam_update(
            param.to(f32),
            g32,
            codec.decode(state_in, "exp_avg", shape, f32),
            codec.decode(state_in, "exp_avg_sq", shape, f32),
            codec.decode(state_in, "max_exp_avg_sq", shape, f32) if flags.amsgrad else None,
            s,
            flags,
        )
        new_param = out.param
        moments = {k: v for k, v in zip(MOMENT_NAMES, out[1:]) if k in keys}
        if inside is not None:
            # A tail slot's elements past the tensor's end are zero, as the eager path pads
            # them: no influence on the block's scale or codes (nor on the sums).
            moments = {k: torch.where(inside, v, 0.0) for k, v in moments.items()}
        norms = None
        if signals:
            # fp32 params with float moments: also sum p0^2 and sum (p1 - p0)^2 of the values
            # written (in rows, the update loop holds them once the sums are merged into it:
            # merging.py); block-wise kernels leave the param's change to the Monitor's sample
            delta = not block and not sr and spec.param_dtype == f32
            p0, p1 = (param, new_param) if delta else (None, None)
            sums = norm_sums(g32, moments["exp_avg"], moments["exp_avg_sq"], p0, p1)
            if tie:
                # Float rows: every write reads its row's sums through a no-op select, so
                # that inductor puts a row's sums and its writes under one outer loop and
                # the row is read from memory once (measured +9-17% on a 4.5M slot, where
                # untied sums take a loop of their own: docs/benchmarks.md).
                # (The select reads a sum itself: a stacked copy of the sums would be a
                # buffer of its own, and the writes would leave the rows' loop.)
                ok = (sums[0] == sums[0])[:, None]
                new_param = torch.where(ok, new_param, new_param)
                moments = {k: torch.where(ok, v, v) for k, v in moments.items()}
            norms = torch.stack(sums, -1).reshape(-1, len(sums)).sum(0)
        write_param_(param, new_param.view(param.shape), sr, key)
        for name in keys:
            codec.encode_(state, name, moments[name], key)
        return norms

    def adamkit_chunk(params, grads, states, scalars, ints):
        sums = []
        for i in range(width):
            param, grad, state = params[i], grads[i], states[i]
            state_in, inside = state, None
            if block:
                # The executor passes whole blocks as [blocks, block] rows; the scales' views
                # tie their sizes to the rows (no padding, no masked load is traced).
                blocks = param.shape[0]
                state_in = {
                    name: t if t.dtype == torch.uint8 else t.view(blocks)
                    for name, t in state.items()
                }
                if not rows:
                    # power maps: traced flat (measured 31 ms vs 42 ms as rows, on one
                    # 4.5M-element slot: as rows, inductor stores more intermediates)
                    param, grad = param.view(blocks * block), grad.view(blocks * block)
                    state_in = {name: t.view(-1) for name, t in state_in.items()}
                if tails:
                    index = torch.arange(param.numel(), dtype=torch.int32, device=param.device)
                    inside = index.view(param.shape) < ints[i, 2].to(torch.int32)
            s = StepScalars(*scalars[i].unbind(0))
            key = ShardKey(ints[i, 0], ints[i, 1])
            sums.append(step_region(param, grad, state_in, state, s, key, inside))
        if signals:
            return torch.stack(sums)
        return None

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
        function; sizes are taken as ``numel`` of the named tensor (tensors must be 1-d and
        contiguous: the kernels see a pointer and an element count).
        """
        args: list = []
        grad_slots: list[tuple[int, int]] = []
        for root, path, is_size in self.recipe:
            value = inputs[root]
            for item in path:
                value = value[item]
            if is_size:
                args.append(value.size(0))
                continue
            if root == "grads":
                grad_slots.append((len(args), path[0]))
            args.append(value)
        return args, grad_slots


_KERNELS: dict[KernelSpec, Kernel | CompileUnavailable] = {}
_LOCK = threading.Lock()


def _example_inputs(spec: KernelSpec, device: torch.device) -> dict[str, Any]:
    """Inputs to trace with: one size (uniform) or distinct sizes (mixed, small).

    The sizes are hints for inductor's code generation: large ones get parallel loops, the
    small layout's (under 512 elements per thread) serial ones. They are chosen so that no
    state tensor has a param's size by accident and every
    tensor has at least two blocks (sizes 0 and 1 would be specialised); see :func:`_compile`
    for how equal sizes are treated.
    """
    generator = torch.Generator().manual_seed(0)
    params, grads, states = [], [], []
    block = block_of(spec.codec)
    if block:  # slots of whole blocks
        sizes = [
            block * {"uniform": 17, "mixed": 17 + i, "small": 2}[spec.layout]
            for i in range(spec.width)
        ]
    elif signal_rows(spec):  # whole rows
        sizes = [
            SIGNAL_ROW * {"uniform": 9, "mixed": 9 + i}[spec.layout] for i in range(spec.width)
        ]
    else:
        sizes = [
            {"uniform": 4098, "mixed": 4096 + 32 * (i + 1), "small": 300 + 2 * (i + 1)}[spec.layout]
            for i in range(spec.width)
        ]
    for i in range(spec.width):
        n = sizes[i]
        p = torch.randn(n, generator=generator).to(device, spec.param_dtype)
        grad = torch.randn(n, generator=generator).to(device, spec.param_dtype)
        state: dict[str, Tensor] = {}
        for key in moment_keys(spec.flags):
            state.update(spec.codec.allocate(p, key))
        if block:
            p, grad, state = as_rows(p, block), as_rows(grad, block), rows_of_codes(state)
        elif signal_rows(spec):
            p, grad = as_rows(p, SIGNAL_ROW), as_rows(grad, SIGNAL_ROW)
            state = {name: as_rows(t, SIGNAL_ROW) for name, t in state.items()}
        params.append(p)
        grads.append(grad)
        states.append(state)
    row = step_scalars(
        lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3.0, decoupled=True
    )
    scalars = torch.tensor([list(row)] * spec.width, dtype=torch.float32, device=device)
    ints = torch.tensor([[12345 + i, 0, sizes[i]] for i in range(spec.width)], device=device)
    return {
        "params": params,
        "grads": grads,
        "states": states,
        "scalars": scalars,
        "ints": ints,
    }


def signal_rows(spec: KernelSpec) -> bool:
    """Whether ``spec``'s kernel takes its float slots as ``[rows, SIGNAL_ROW]``: a signals
    kernel of a float codec outside small chunks (the plan cuts such slots to whole rows)."""
    return spec.signals and not block_of(spec.codec) and spec.layout != "small"


def as_rows(t: Tensor, block: int) -> Tensor:
    """``t`` as ``[blocks, block]`` rows (the block-wise kernels' layout of params and grads)."""
    return t.view(-1, block)


def rows_of_codes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Block-wise state with its codes as one row per block (scales stay 1-d)."""
    blocks = next(t.numel() for t in state.values() if t.dtype != torch.uint8)
    return {k: t.view(blocks, -1) if t.dtype == torch.uint8 else t for k, t in state.items()}


def _clone_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    return {
        "params": [p.clone() for p in inputs["params"]],
        "grads": inputs["grads"],
        "states": [{k: v.clone() for k, v in s.items()} for s in inputs["states"]],
        "scalars": inputs["scalars"],
        "ints": inputs["ints"],
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
        options = dict(INDUCTOR_OPTIONS)
        marker = _codegen_marker(device)
        if marker is not None:  # the cache must not hand back code generated without them
            options["post_grad_custom_post_pass"] = marker
        if spec.layout != "small":
            # Inductor sizes its parallel loops from the trace's size hints and left some
            # mixed kernels (stochastic rounding, block codes) serial: measured 0.29x torch
            # fused for bf16 moments on 33 tensors of 1.5M. One parallel scope per loop,
            # its threads chosen at run time, as for the fp32 kernels.
            options["cpp.dynamic_threads"] = True
        if minifloat(spec.codec):
            # Recompute rather than store: a block's new moments are needed by its scale (a
            # reduction over the row) and by its codes. Inductor's default realises them as
            # fp32 buffers (measured: 40 B/param moved, 2.2x slower); recomputed, the step
            # is one pass for the scales and one for everything else. (Power-companded
            # codes are left alone: inlined, their int4 kernels took 195 s to compile.)
            options.update(MINIFLOAT_OPTIONS)
        if signal_rows(spec):
            # The rows' sums of p0^2 and (p1 - p0)^2 need the new param, as its write does:
            # realised, it became a buffer of the slot (written, then read back: the signals
            # kernel took 2x the plain one). Recomputed in the sums loop, the merging pass
            # leaves one computation of it (merging.py).
            options.update(MINIFLOAT_OPTIONS)
        # (stochastic rounding included, now that _vector_bitcasts casts pairs of vectors:
        # bf16 moments with SR, one 4.5M slot, one thread, 9.4 ms at 16 lanes, 5.3 at 32)
        lowp = next((d for d in (spec.stored_dtype, spec.param_dtype) if d in _LOWP), None)
        with (
            _copies_follow_lowp_tiling(lowp),
            _vector_bitcasts(),
            _vector_aranges(),
            _prefetched_loads(prefetch_ahead(spec)),
            _vector_narrowing(),
            _rewritten_source(),
            _kept_scratch(spec.signals and KEEP_SCRATCH),
        ):
            compiled = inductor_compile(gm, example_inputs, options=options)
        captured["fn"] = compiled
        return compiled

    inputs = _example_inputs(spec, device)
    traced = _chunk_function(spec)
    # Every tensor size is dynamic; Python numbers (the codec's bits and block, module
    # constants) are constants.
    # Sizes that are no graph input are read from the tensors, as ``size(0)``: the executor
    # passes 1-d tensors only. Uniform chunks hold tensors of one size: equal sizes share one
    # symbol ("duck" sizing), so the chunk is one loop. Elsewhere equal example sizes are a
    # coincidence, not a rule.
    torch._dynamo.mark_static(inputs["scalars"])
    torch._dynamo.mark_static(inputs["ints"])
    compiled_fn = torch.compile(traced, backend=backend, dynamic=True, fullgraph=True)
    first = _clone_inputs(inputs)  # (traced with these: marks do not carry over to clones)
    for t in [
        *first["params"],
        *first["grads"],
        *(v for st in first["states"] for v in st.values()),
    ]:
        if t.dim() == 2:
            torch._dynamo.mark_static(t, 1)  # the length of a row of blocks
    duck = torch.fx.experimental._config.patch(use_duck_shape=spec.layout == "uniform")
    ints_static = torch._dynamo.config.patch(specialize_int=True, specialize_float=True)
    with torch.no_grad(), warnings.catch_warnings(), duck, ints_static:
        warnings.simplefilter("ignore", DeprecationWarning)  # torch-internal, not the user's
        compiled_fn(**first)
    if "fn" not in captured:
        raise CompileUnavailable("torch.compile did not call the adamkit backend")
    recipe = [_parse_source(name) for name in captured["sources"]]
    kernel = Kernel(spec, captured["fn"], recipe)
    _self_test(kernel, traced, inputs)
    return kernel


_LOWP = (torch.bfloat16, torch.float16)


def needs_random(spec: KernelSpec) -> bool:
    """Whether ``spec``'s kernel draws random numbers (stochastic rounding somewhere)."""
    codec = spec.codec
    if block_of(codec):
        return True
    narrow_state = codec.stochastic and spec.stored_dtype != torch.float32
    return narrow_state or (spec.stochastic_param and spec.param_dtype != torch.float32)


def _inductor_cpp():
    from torch._inductor.codegen import cpp

    return cpp


def _vec_kernel():
    return _inductor_cpp().CppVecKernel


@contextlib.contextmanager
def _replaced(owner: Callable[[], Any], name: str, replace: Callable[[Any], Any]):
    """While the block runs, ``owner().<name>`` is ``replace(original)``; the original after.

    The code-generation patches below are all of this form. Where inductor lacks the owner or
    the attribute (another torch version), nothing is replaced and the block runs as it is.
    """
    try:
        target = owner()
        original = vars(target)[name]
    except (ImportError, AttributeError, KeyError):
        yield
        return
    setattr(target, name, replace(original))
    try:
        yield
    finally:
        setattr(target, name, original)


def _copies_follow_lowp_tiling(lowp: torch.dtype | None):
    """While compiling a kernel with bf16/fp16 tensors: let a loop body that only copies fp32
    values count as of ``lowp`` when inductor's C++ backend picks a fused loop's vector width.

    Inductor tiles a loop by 32 elements only if every body in it holds a bf16/fp16 value;
    a param update ends in such a copy body (the new param, computed from the old one, is
    realised and copied in), so the loop was tiled by 16 and every bf16 load and store was a
    masked half-vector: measured 3.35 ms against 1.25 ms tiled by 32 for a 4.5M slot with bf16
    moments (fp32 moments: 1.2-1.7 ms). A copy body computes nothing, so its tiling changes no
    value. Without inductor's function (another torch version), nothing is changed.
    """
    if lowp is None:
        return contextlib.nullcontext()

    def replace(original):
        def lowp_fp(body):
            found = original(body)
            if found[0] is None and _only_copies(body):
                return lowp, True  # True: computes (nothing) in fp32
            return found

        return lowp_fp

    return _replaced(_inductor_cpp, "get_loop_body_lowp_fp", replace)


CODEGEN_PATCHES = (
    "adamkit-codegen: lowp copies tiled (SR too), vector bitcasts x1/x2, aranges, "
    "prefetches only where blocks are coded, int32->uint8 through int8, invariants hoisted "
    "from row loops (a name once a block), "
    "barriers dropped, signal sums merged into the update loop (p0 and dp too), row loops "
    "fused (runs of them), row values shared, sums of squares by fmadd, row temporaries of "
    "the kernel's own nodes on the stack, block maxima of magnitudes as int32 maxima, "
    "signal wrappers keep their scratch buffers (a Scratch per wrapper; any derived name "
    "that is returned keeps its buffers out; tables of rows of <= 16 kept; Scratch.get "
    "called in the wrapper), exact bf16 conversions truncated, byte shifts by a constant "
    "as 16-bit shifts, block maxima reduced as int32 maxima, fused row loops cut per tensor, "
    "blends of zero by a float comparison as masked moves, masked shifts as logical shifts, "
    "hashed indices as affine ramps, invariants hoisted from loops over a kernel size too"
)
"""Names the changes this module makes to inductor's C++ code generation while it compiles
(:func:`_copies_follow_lowp_tiling`, :func:`_vector_bitcasts`, :func:`_vector_aranges`,
:func:`_prefetched_loads`, :func:`_vector_narrowing`, :func:`_rewritten_source`; with
:data:`MERGE_SUM_LOOPS` or :data:`SHARE_ROW_VALUES` off the key says so).
Inductor's caches key compiled code on the graph and the config, not on such changes: a
no-op post-grad pass with this uuid (:func:`_codegen_marker`) puts them in the key, so a
cache filled before a change is not handed back after it. Change the string whenever the
patches change."""


def _codegen_marker(device: torch.device):
    """A no-op inductor post-grad pass whose uuid is :data:`CODEGEN_PATCHES` (None where
    inductor has no custom-pass interface), plus whether CPU code is generated serial.

    Inductor writes a CPU kernel without any parallel loop when the process has one thread
    (``torch.get_num_threads() == 1`` at compile time), and its caches do not key on that: a
    kernel compiled in a one-thread process was handed to a two-thread one and ran serial
    (measured: int4 on 50M params in 33 tensors, 248 ms a step against 66). With the mode in
    the uuid, serial and parallel code are cached apart (parallel code picks its thread count
    at run time, ``cpp.dynamic_threads``). Within one process a kernel keeps the mode it was
    compiled with.
    """
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass
        from torch._inductor.utils import parallel_num_threads
    except ImportError:
        return None
    mode = "cpu serial" if device.type == "cpu" and parallel_num_threads() == 1 else "parallel"
    merged = "" if MERGE_SUM_LOOPS else "; sums not merged"
    merged += "" if CONTRACT_SUMS else "; sums not contracted"
    shared = "" if SHARE_ROW_VALUES else "; row values not shared"
    shared += "" if LOCALIZE_ROW_TEMPS else "; row temporaries not local"
    shared += "" if KEEP_SCRATCH else "; scratch not kept"
    shared += "" if TRUNCATE_EXACT_BF16 else "; bf16 conversions not truncated"
    shared += "" if CONSTANT_BYTE_SHIFTS else "; byte shifts emulated"
    shared += "" if INTEGER_REDUCTIONS else "; maxima reduced as floats"
    shared += "" if MASKED_MOVES else "; blends by a comparison not masked"
    shared += "" if LOGICAL_SHIFTS else "; masked shifts arithmetic"
    shared += "" if AFFINE_INDICES else "; hashed indices multiplied"
    shared += "" if HOIST_SIZED_LOOPS else "; loops over a size not hoisted"
    shared += f"; runs cut past {barriers.FUSED_LINES} lines"
    shared += f"; prefetch {PREFETCH_AHEAD} ahead"
    shared += " (float state too)" if PREFETCH_FLOAT_STATE else ""
    key = f"{CODEGEN_PATCHES}; {mode}{merged}{shared}"

    class CodegenPatches(CustomGraphPass):
        def __call__(self, graph) -> None:
            return None

        def uuid(self) -> str:
            return key

    return CodegenPatches()


def _vector_bitcasts():
    """While compiling a kernel: let inductor's C++ backend reinterpret a vector of float32 as
    int32 (and back) as one vector, ``at::vec::cast``, instead of element by element.

    Stochastic rounding and the minifloat codes work on fp32 bit patterns
    (``x.view(torch.int32)``). Inductor 2.13 has no vector form of that bit cast: it stores
    the vector, casts its 16 elements one by one and loads them back, and the compiler builds
    the result with element inserts whose store is not forwarded to the load. The bits are
    the same either way. Without inductor's class (another torch version) nothing changes.
    """
    same_width = {torch.float32, torch.int32}

    def replace(original):
        def to_dtype_bitcast(x, dtype, src_dtype):
            inductor_cpp = _inductor_cpp()
            if {dtype, src_dtype} == same_width and getattr(x, "dtype", None) == src_dtype:
                cpp = inductor_cpp.DTYPE_TO_CPP[dtype]
                vectors = inductor_cpp.V.kernel._get_num_vectors(src_dtype)
                if vectors == 1:
                    return f"at::vec::cast<{cpp}>({x})"
                if vectors == 2:  # (a loop tiled by 32: two vectors of 16)
                    halves = f"at::vec::cast<{cpp}>({x}[0]), at::vec::cast<{cpp}>({x}[1])"
                    return f"at::vec::VectorizedN<{cpp},2>({halves})"
            return original.__func__(x, dtype, src_dtype)

        return staticmethod(to_dtype_bitcast)

    return _replaced(lambda: _inductor_cpp().CppVecOverrides, "to_dtype_bitcast", replace)


def _vector_aranges():
    """While compiling a kernel: let inductor's C++ backend build a vector of element indices
    as ``broadcast(first) + [0, 1, ..., 15] * stride`` instead of from 16 runtime scalars.

    The random streams of stochastic rounding (and the tail mask of a block) hash the element
    index. Inductor writes ``Vectorized<int32_t>::arange(x0, 1)``, whose 16 lanes the compiler
    assembles with element inserts on every iteration (about 30 instructions on the one port
    that shuffles); with a base of 0 the lanes are a constant that stays in a register. Same
    values either way. Without inductor's class (another torch version) nothing changes.
    """

    def replace(original):
        def arange(self, index, stride):
            if index.dtype != torch.int32:  # (the random streams' and tail masks' indices)
                return original(self, index, stride)
            vec = self._get_vec_type(index.dtype)
            csevar = self.cse.generate(
                self.compute, f"({vec}({index}) + {vec}::arange(0, {stride}))"
            )
            csevar.dtype = index.dtype
            csevar.is_vec = True
            return csevar

        return arange

    return _replaced(_vec_kernel, "arange", replace)


def _vector_narrowing():
    """While compiling a kernel: let inductor's C++ backend convert a vector of int32 to uint8
    through int8 (``cast<uint8_t>(convert<int8_t>(x))``), which ATen's vector library has a
    vector instruction for, instead of ``convert<uint8_t>(x)``, which it builds element by
    element (no specialisation for that pair; the compiler assembles the bytes with inserts).

    The block-wise codes (int8, int4) are computed in int32 and stored as uint8. The low eight
    bits are the same either way (both conversions wrap modulo 256). One 4.5M-element int8
    slot, one thread: 13.4 -> 9.5 ms. Without inductor's class nothing changes.
    """

    def replace(original):
        def to_dtype_expr(self, src, dtype, src_dtype, rounding=False):
            if (
                getattr(src, "is_vec", False)
                and (src_dtype, dtype) == (torch.int32, torch.uint8)
                and self._get_num_vectors(torch.int32) == 1
                and self._get_num_vectors(torch.uint8) == 1
            ):
                return f"at::vec::cast<uint8_t>(at::vec::convert<int8_t>({src}))"
            return original(self, src, dtype, src_dtype, rounding)

        return to_dtype_expr

    return _replaced(_vec_kernel, "get_to_dtype_expr", replace)


PREFETCH_AHEAD = 256
"""Elements ahead of a vector load that :func:`_prefetched_loads` asks the cache for, in the
kernels that hold block codes (1 KB of fp32, 256 B of int8 codes). Measured on the Zen 4 VM
(session 22, docs/benchmarks.md), 50M params in 33 tensors, paired in one process: int8
-0.4 ms a step without prefetches, -0.5 at 128, -0.9 at 256, -0.5 to -0.7 at 512 (against
1024, the earlier distance); int4 -0.4 to -0.6 at 256."""

PREFETCH_FLOAT_STATE = False
"""Whether kernels whose moments are floats (fp32, bf16; no block codes) prefetch too. Their
loop bodies are short enough for the hardware prefetcher: on the Zen 4 VM the prefetches
cost them time (paired, 50M params in 33 tensors: fp32 -2.1 ms a step without them in the
fast memory state, -1.0 in the slow one; bf16 state -3.9 ms; 2000 tensors: -1.3 and -1.9
ms). (The Intel Xeon VM of session 8 measured the opposite: a one-thread bf16-state slot,
14.0 -> 9.3 ms with them; set this to True on such a machine.)"""


def prefetch_ahead(spec: KernelSpec) -> int:
    """How far ahead ``spec``'s kernel prefetches its loads: :data:`PREFETCH_AHEAD` elements
    where it holds block codes, none (0) for float moments unless
    :data:`PREFETCH_FLOAT_STATE`."""
    if block_of(spec.codec) or PREFETCH_FLOAT_STATE:
        return PREFETCH_AHEAD
    return 0


_KERNEL_ARGUMENT = re.compile(r"(in|out)_ptr\d+$")


def _prefetched_loads(ahead: int | None = None):
    """While compiling a kernel: precede each contiguous vector load of inductor's C++ backend
    with a software prefetch of the same tensor ``ahead`` elements further on (0: none; None:
    :data:`PREFETCH_AHEAD` as it is now; :func:`prefetch_ahead` chooses per kernel).

    An optimizer step streams every tensor once, and the kernels with stochastic rounding or
    block codes run 100-200 instructions per 16 elements: the out-of-order window then holds
    too few iterations to keep enough loads in flight, and perf put half of a bf16-state
    kernel's samples on the instructions right after its loads (waits on memory, at 8 GB/s of
    a 40 GB/s stream). Prefetching ahead hid the wait on the Intel Xeon VM of session 8: one
    4.5M-element slot, one thread, bf16 state 14.0 -> 9.3 ms, int8 18.8 -> 12.8 ms, fp32 5.9
    -> 5.0 ms. On the Zen 4 VM only the block-code kernels gain, from a shorter distance
    (:data:`PREFETCH_AHEAD`, :data:`PREFETCH_FLOAT_STATE`; docs/benchmarks.md). A prefetch
    never faults, so addresses past a tensor's end are harmless, and it changes no value. Only
    for GCC/Clang (``__builtin_prefetch``); elsewhere nothing changes.
    """
    ahead = PREFETCH_AHEAD if ahead is None else ahead
    if sys.platform == "win32" or ahead <= 0:  # (MSVC has no __builtin_prefetch)
        return contextlib.nullcontext()

    def replace(original):
        def load_line(self, var, index, dtype, load_mask=None):
            line = original(self, var, index, dtype, load_mask)
            if load_mask is not None or dtype == torch.bool or not _KERNEL_ARGUMENT.match(var):
                return line  # (masked, boolean, or from a local buffer of gathered elements)
            start = f"{var} + {_inductor_cpp().cexpr_index(index)}" if index != 0 else var
            # (a comma expression: the line stays one expression, as inductor's CSE expects)
            return f"(__builtin_prefetch({start} + {ahead}, 0, 3), {line})"

        return load_line

    return _replaced(_vec_kernel, "_get_vec_load_line", replace)


def _rewritten_source():
    """While compiling a kernel: twelve passes over the C++ source inductor writes.

    - :func:`adamkit.execution.hoisting.hoist_invariants` moves the loop-invariant lines of
      innermost row loops (a block's scale, the step's scalars and what derives from them
      alone) in front of the loop: computed once a row instead of every 16 elements; with
      :data:`HOIST_SIZED_LOOPS`, the step's scalars of the flat loops up to a kernel size too;
    - :func:`adamkit.execution.merging.merge_sum_loops` (with :data:`MERGE_SUM_LOOPS`) puts a
      signals kernel's per-row sums into the loop that writes the row, given which pointer
      arguments name the same buffer (:func:`_pointer_buffers`);
    - :func:`adamkit.execution.contraction.contract_sums` (with :data:`CONTRACT_SUMS`)
      accumulates its sums of squares with fused multiply-adds;
    - :func:`adamkit.execution.maxima.integer_maxima` (with :data:`INTEGER_MAXIMA`) takes a
      block-wise kernel's block maxima of magnitudes over their int32 bit patterns, and
      :func:`~adamkit.execution.maxima.integer_reductions` (with :data:`INTEGER_REDUCTIONS`)
      reduces them across the vector's lanes the same way;
    - with :data:`SHARE_ROW_VALUES`, :func:`adamkit.execution.barriers.fuse_row_loops` runs a
      block-wise kernel's scale pass and main loop under one loop over rows (a chunk's
      tensors about one to such a loop: ``barriers.FUSED_LINES``), and
      :func:`adamkit.execution.sharing.share_row_values` keeps the new moments the scale pass
      computed for the main loop (a row buffer in L1 instead of decoding them again); with
      :data:`LOCALIZE_ROW_TEMPS` too, the int4 pack loop first moves up behind the main loop
      (:func:`adamkit.execution.localizing.hoist_row_loops`) to be fused with it, and the row
      of unpacked codes between them stays on the stack
      (:func:`adamkit.execution.localizing.localize_row_temps`);
    - :func:`adamkit.execution.barriers.drop_barriers` gives ``nowait`` to the worksharing
      loops that no later loop of the region can race with;
    - :func:`adamkit.execution.truncation.truncate_exact_bf16` (with
      :data:`TRUNCATE_EXACT_BF16`) writes the fp32 -> bf16 conversions of values whose low half
      is provably zero (stochastic rounding's results) as truncations;
    - :func:`adamkit.execution.byteshift.constant_byte_shifts` (with
      :data:`CONSTANT_BYTE_SHIFTS`) writes shifts of byte vectors by a constant (int4 packing)
      as a 16-bit shift and a mask;
    - :func:`adamkit.execution.masks.masked_moves` (with :data:`MASKED_MOVES`) writes
      stochastic rounding's guard, a blend of zero by a float comparison, as a masked move;
    - :func:`adamkit.execution.shifts.logical_shifts` (with :data:`LOGICAL_SHIFTS`) writes
      the hash's ``(h >> k) & (2^(32-k) - 1)`` as one logical shift;
    - :func:`adamkit.execution.indices.affine_indices` (with :data:`AFFINE_INDICES`) writes
      the hash's ``(index + offset) * C`` as a scalar product and one vector add.

    Same values either way (the sums of squares: to float32 rounding). Without inductor's
    method (another torch version) nothing changes."""

    def replace(original):
        def define_kernel(self, src_code, *args, **kwargs):
            source = hoist_invariants(src_code, HOIST_SIZED_LOOPS)
            kernel_args = args[1] if len(args) > 1 else kwargs.get("kernel_args")
            buffers = _pointer_buffers(self, kernel_args)
            if MERGE_SUM_LOOPS:
                source = merge_sum_loops(source, buffers)
            if CONTRACT_SUMS:
                source = contract_sums(source)
            if INTEGER_MAXIMA:
                source = integer_maxima(source)
                if INTEGER_REDUCTIONS:
                    source = integer_reductions(source)
            if SHARE_ROW_VALUES:
                if LOCALIZE_ROW_TEMPS:
                    source = hoist_row_loops(source, buffers)
                source = share_row_values(fuse_row_loops(source), buffers)
                if LOCALIZE_ROW_TEMPS:
                    nodes = args[0] if args else kwargs.get("nodes", ())
                    source = localize_row_temps(source, _temporaries(buffers, nodes))
            source = drop_barriers(source)
            if TRUNCATE_EXACT_BF16:
                source = truncate_exact_bf16(source)
            if CONSTANT_BYTE_SHIFTS:
                source = constant_byte_shifts(source)
            if MASKED_MOVES:
                source = masked_moves(source)
            if LOGICAL_SHIFTS:
                source = logical_shifts(source)
            if AFFINE_INDICES:
                source = affine_indices(source)
            return original(self, source, *args, **kwargs)

        return define_kernel

    return _replaced(lambda: _inductor_cpp().CppScheduling, "define_kernel", replace)


def _kept_scratch(on: bool):
    """While compiling a signals kernel: its Python wrapper keeps the buffers its sums are
    written to between calls (:func:`adamkit.execution.scratch.keep_scratch`) instead of
    allocating about 600 buffers and views a step. Without inductor's method nothing changes."""
    if not on:
        return contextlib.nullcontext()

    def replace(original):
        def generate(self, *args, **kwargs):
            code, declarations = original(self, *args, **kwargs)
            code.value = keep_scratch(code.value)
            return code, declarations

        return generate

    return _replaced(_python_wrapper, "generate", replace)


def _python_wrapper():
    from torch._inductor.codegen.wrapper import PythonWrapperCodegen

    return PythonWrapperCodegen


KEEP_SCRATCH = True
"""Whether signals kernels keep their scratch buffers between calls (:func:`_kept_scratch`;
tests and A/B timings switch it off)."""

CONSTANT_BYTE_SHIFTS = True
"""Whether :func:`_rewritten_source` writes the shifts of byte vectors by a constant (the int4
codes' packing) as 16-bit shifts and a mask (:mod:`adamkit.execution.byteshift`; tests and A/B
timings switch it off)."""

MERGE_SUM_LOOPS = True
"""Whether :func:`_rewritten_source` merges a signals kernel's sums loops into its update loops
(:mod:`adamkit.execution.merging`; tests and A/B timings switch it off)."""

CONTRACT_SUMS = True
"""Whether :func:`_rewritten_source` accumulates a signals kernel's sums of squares with fused
multiply-adds (:mod:`adamkit.execution.contraction`; tests and A/B timings switch it off)."""

INTEGER_MAXIMA = True
"""Whether :func:`_rewritten_source` takes the block maxima of magnitudes as integer maxima of
their bit patterns (:mod:`adamkit.execution.maxima`; tests and A/B timings switch it off)."""

INTEGER_REDUCTIONS = True
"""Whether :func:`_rewritten_source` also reduces those block maxima across a vector's lanes as
integer maxima (:func:`adamkit.execution.maxima.integer_reductions`; tests and A/B timings
switch it off)."""

SHARE_ROW_VALUES = True
"""Whether :func:`_rewritten_source` fuses a block-wise kernel's scale pass and main loop under
one loop over rows (:func:`adamkit.execution.barriers.fuse_row_loops`) and lets the main loop
load the new moments the scale pass computed (:mod:`adamkit.execution.sharing`; tests and A/B
timings switch it off)."""


LOCALIZE_ROW_TEMPS = True
"""Whether :func:`_rewritten_source` keeps a row's temporaries on the stack
(:mod:`adamkit.execution.localizing`; tests and A/B timings switch it off)."""

MASKED_MOVES = True
"""Whether :func:`_rewritten_source` writes blends of a broadcast zero by a float comparison
as masked moves (:mod:`adamkit.execution.masks`; tests and A/B timings switch it off)."""

LOGICAL_SHIFTS = True
"""Whether :func:`_rewritten_source` writes ``(x >> k) & (2^(32-k) - 1)`` as logical shifts
(:mod:`adamkit.execution.shifts`; tests and A/B timings switch it off)."""

HOIST_SIZED_LOOPS = True
"""Whether :func:`_rewritten_source` also hoists the invariants of loops whose bound is a kernel
size (``ks0``: the flat loops of float-state kernels), loads at a literal index only
(:func:`adamkit.execution.hoisting.hoist_invariants`; tests and A/B timings switch it off)."""

AFFINE_INDICES = True
"""Whether :func:`_rewritten_source` writes the hash's ``(index + offset) * C`` as a scalar
product and one vector add (:mod:`adamkit.execution.indices`; tests and A/B timings switch it
off)."""

TRUNCATE_EXACT_BF16 = True
"""Whether :func:`_rewritten_source` writes the fp32 -> bf16 conversions of values whose low
half is zero (stochastic rounding's results) as truncations (:mod:`adamkit.execution.truncation`;
tests and A/B timings switch it off)."""


def _temporaries(buffers: dict[str, str], nodes: Any) -> Callable[[str], bool]:
    """Whether a pointer argument names an intermediate buffer of the kernel being defined:
    ``bufN``, not an output of the graph, read by no scheduler node outside ``nodes`` (the
    kernel's own). Always False where inductor's structures are not as expected."""
    try:
        from torch._inductor.virtualized import V

        outputs = set(V.graph.get_output_names())
        users = V.graph.scheduler.name_to_buf
        inside = {n.get_name() for node in nodes for n in (node, *node.get_nodes())}
    except Exception:  # noqa: BLE001 - another inductor: nothing is local
        return lambda pointer: False

    def temporary(pointer: str) -> bool:
        name = buffers.get(pointer, "")
        if re.fullmatch(r"buf\d+", name) is None or name in outputs:
            return False
        try:
            return all(user.node.get_name() in inside for user in users[name].users)
        except Exception:  # noqa: BLE001
            return False

    return temporary


def _pointer_buffers(scheduling: Any, kernel_args: Any) -> dict[str, str]:
    """The buffer each pointer argument of the kernel being defined points to, e.g.
    ``{"in_ptr2": "arg3_1", "out_ptr9": "arg3_1"}`` for a moment read and written in place
    (empty where inductor's structures are not as expected)."""
    try:
        args = scheduling.kernel_group.args if kernel_args is None else kernel_args
        definitions, call_args, _ = args.cpp_argdefs()
    except Exception:  # noqa: BLE001 - another inductor: no merging
        return {}
    out = {}
    for definition, buffer in zip(definitions, call_args):
        name = str(definition).split()[-1] if str(definition).split() else ""
        if re.fullmatch(r"(?:in_out|in|out)_ptr\d+", name):
            out[name] = str(buffer)
    return out


def _only_copies(body) -> bool:
    try:
        blocks = [body.root_block, *body.subblocks.values()]
        targets = {
            node.target for block in blocks for node in block.graph.nodes
            if node.op == "call_method"
        }  # fmt: skip
    except AttributeError:
        return False
    return targets <= {"load", "store", "get_index", "output"}


def _self_test(kernel: Kernel, traced: Callable, inputs: dict[str, Any]) -> None:
    """The direct call must agree with the uncompiled function."""
    expected = _clone_inputs(inputs)
    with torch.no_grad():
        want_sums = traced(**expected)
    got = _clone_inputs(inputs)
    args, _ = kernel.arguments(got)
    with torch.no_grad():
        outputs = kernel.fn(*args)
    spec = kernel.spec
    if spec.signals:
        have_sums = outputs[0]
        if not torch.allclose(have_sums, want_sums, rtol=1e-4, atol=1e-6):
            raise CompileUnavailable("compiled signal sums disagree with fused_norms (self-test)")
    shapes = [p.shape for p in expected["params"]]
    pairs = list(zip(expected["params"], got["params"]))
    for s_exp, s_got, shape in zip(expected["states"], got["states"], shapes):
        for key in moment_keys(spec.flags):
            want = spec.codec.decode(s_exp, key, shape, torch.float32)
            have = spec.codec.decode(s_got, key, shape, torch.float32)
            pairs.append((want, have))
    for want, have in pairs:
        if not _agrees(want.float(), have.float(), spec):
            raise CompileUnavailable("compiled kernel disagrees with the update rule (self-test)")


def _agrees(want: Tensor, have: Tensor, spec: KernelSpec) -> bool:
    """Whether a kernel's output matches the uncompiled function's: to rounding for fp32; for
    narrower formats, to one step of the format at a few elements at most (a value on a
    rounding boundary may fall either way when the compiler contracts or reorders)."""
    low = spec.param_dtype != torch.float32 or spec.stored_dtype != torch.float32
    if not low and not hasattr(spec.codec, "bits"):
        return torch.allclose(have, want, rtol=1e-5, atol=1e-8)
    scale = want.abs().max().clamp_min(1e-30)
    err = (have - want).abs()
    close = err <= 1e-2 * want.abs() + 1e-6 * scale
    return bool(close.float().mean() >= 0.99) and bool(err.max() <= 0.5 * scale)


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


def is_compiled(spec: KernelSpec) -> bool:
    """Whether ``spec``'s kernel was compiled in this process (and did not fail)."""
    with _LOCK:
        return isinstance(_KERNELS.get(spec), Kernel)


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
        block = block_of(spec.codec) or (SIGNAL_ROW if signal_rows(spec) else 0)
        size = 2 * block if signal_rows(spec) else block or 16  # rows: never 0 or 1 of them
        p = torch.zeros(size, dtype=spec.param_dtype, device=device)
        state: dict[str, Tensor] = {}
        for name in moment_keys(spec.flags):
            state.update(spec.codec.allocate(p, name))
        if block:
            p = as_rows(p, block)
            state = (
                {n: as_rows(t, block) for n, t in state.items()}
                if signal_rows(spec)
                else (rows_of_codes(state))
            )
        _DUMMIES[key] = {"param": p, "grad": torch.zeros_like(p), "state": state}
    return _DUMMIES[key]
