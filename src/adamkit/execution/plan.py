"""Plans: how one param group's params are laid out into compiled kernel calls.

A plan is built when the set of params with a grad changes (or after load_state_dict) and
holds everything that does not change from step to step: the buckets (device, dtype, codec),
the chunks of each bucket, the prepared argument list of every kernel call (params and moments
in place, grads filled in per step) and the float32 table of step scalars the kernels read.

Chunking of a bucket: tensors under :data:`SMALL_NUMEL` elements go to *small* chunks (serial
loops); equal sizes up to :data:`UNIFORM_MAX_NUMEL` fill *uniform* chunks (one fused loop);
the rest go to *mixed* chunks (one parallel loop each), the last one padded with dummies.
With 2000 tensors of mixed shapes that is at most three kernels per dtype and flag set.

Invariants that replace dynamo's guards, checked here: params are plain contiguous strided
tensors of a compiled dtype with at least :data:`MIN_NUMEL` elements, moments plain contiguous
tensors of the param's size, grads (per step) strided and of the dtype the plan was built for;
non-contiguous grads are copied to contiguous ones. Anything else takes the eager path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from adamkit.execution.kernels import (
    _COMPILE_FLOATS,
    _NUM_SCALARS,
    SIGNAL_ROW,
    CompileUnavailable,
    Kernel,
    KernelSpec,
    block_of,
    dummy_inputs,
    get_kernel,
    is_compiled,
    needs_random,
    signal_rows,
)
from adamkit.execution.multi_tensor import moment_keys
from adamkit.rule import StepScalars, UpdateFlags
from adamkit.storage.float import FloatCodec
from adamkit.storage.quantized import BlockwiseCodec
from adamkit.storage.rounding import KeySource
from adamkit.storage.shards import is_dtensor, local, local_grad, shard_start

MIXED_WIDTH = 8
"""Tensors per mixed chunk (one parallel loop each). Compile time grows with it."""

UNIFORM_WIDTH = 16
"""Tensors per uniform chunk (equal sizes, one fused parallel loop)."""

SMALL_WIDTH = 8
"""Tensors per small chunk (one serial loop each)."""

UNIFORM_MAX_NUMEL = 1 << 16
"""Equal-sized tensors up to this size share one loop (one OpenMP region for the chunk).
Larger ones run one loop each: a loop over 16 tensors reads and writes 112 streams at once,
more than the hardware prefetchers follow, and the region's cost is amortised anyway."""

SMALL_NUMEL = 4096
"""Tensors with fewer elements go to small chunks: their kernels run on one thread, since an
OpenMP region costs more than the work (and much more when another process holds a core)."""

MIN_NUMEL = 2
"""Smaller tensors take the eager path: dynamic sizes specialise on 0 and 1."""


def compiled_eligible(param: Tensor, codec, stochastic_param: bool) -> bool:
    """Whether ``param`` can be stepped by a compiled kernel (else: eager, per param).

    Every storage format compiles (float moments with or without stochastic rounding, int8 and
    int4 codes); ``stochastic_param`` is part of the kernel's spec.
    """
    if is_dtensor(param):  # FSDP2: the local shard, if it is a contiguous range of the param
        if not isinstance(shard_start(param), int):
            return False
        param = local(param)
    return (
        type(param) in (torch.Tensor, torch.nn.Parameter)
        and param.dtype in _COMPILE_FLOATS
        and param.layout == torch.strided
        and param.is_contiguous()
        and param.numel() >= MIN_NUMEL
        and isinstance(codec, (FloatCodec, BlockwiseCodec))
    )


def _as_signal_rows(
    spec: KernelSpec, device: torch.device, inputs: dict, used: int
) -> tuple[dict, int]:
    """A chunk's inputs with its float slots as ``[rows, SIGNAL_ROW]`` views (the padding
    slots replaced by the signal kernel's dummies) and the grads' row length."""

    def rows(t: Tensor) -> Tensor:
        if t.numel() % SIGNAL_ROW:
            raise CompileUnavailable(f"a slot of {t.numel()} elements is no whole rows")
        return t.view(-1, SIGNAL_ROW)

    params, grads, states = [], [], []
    for k in range(spec.width):
        if k < used:
            params.append(rows(inputs["params"][k]))
            grads.append(rows(inputs["grads"][k]))
            states.append({name: rows(t) for name, t in inputs["states"][k].items()})
        else:
            dummy = dummy_inputs(spec, device, k)
            params.append(dummy["param"])
            grads.append(dummy["grad"])
            states.append(dummy["state"])
    return {**inputs, "params": params, "grads": grads, "states": states}, SIGNAL_ROW


@dataclass
class _Slot:
    """What one kernel slot steps: a param, its whole blocks, or its last partial block."""

    index: int  # plan index of the param
    param: Tensor  # the param, a view of its whole blocks, or a staging block
    state: dict[str, Tensor]  # the moments' tensors (or views of them) for this slot
    numel: int
    start: int  # index of the slot's first element in the param (random streams)
    valid: int  # elements that are the param's (the rest of a staging block is padding)
    grad_numel: int | None  # the grad's elements to pass (from grad_offset); None: all of it
    # (for a block-wise codec, passed as rows of ``param.shape[1]``)
    staged: tuple[int, int] | None  # (offset, length) of a tail copied through staging
    grad_offset: int = 0  # where the slot's elements start in the (flat) grad

    def whole_grad_shape(self, row: int) -> tuple[int, int] | None:
        """The shape of the rows of ``row`` the kernel takes the grad in when the slot is the
        whole grad; None when it is a part of it or taken 1-d (``row`` 0: ``ravel`` is
        the cheapest view there)."""
        whole = self.grad_numel is None and self.staged is None
        return (self.numel // row, row) if whole and row else None


@dataclass
class _Call:
    kernel: Kernel
    args: list
    # (position in args, plan index, offset, numel, row length: 0 for 1-d, and the shape of
    # the rows the kernel takes the grad in when the slot is the whole grad, else None)
    grad_slots: list[tuple[int, int, int, int | None, int, tuple[int, int] | None]]
    members: list[int]  # indices of the params in the plan, slot by slot
    inputs: dict  # the traced function's inputs (to build the signals variant of the call)
    slots: list  # the _Slot of each member

    @staticmethod
    def build(kernel: Kernel, inputs: dict, chunk: list, row: int | None = None) -> _Call:
        """``row``: the length of the rows the grads are passed as (default: the codec's
        block; 0 for 1-d)."""
        args, positions = kernel.arguments(inputs)
        row = block_of(kernel.spec.codec) if row is None else row
        grad_slots = [
            (
                pos,
                chunk[k].index,
                chunk[k].grad_offset,
                chunk[k].grad_numel,
                row,
                chunk[k].whole_grad_shape(row),
            )
            for pos, k in positions
            if k < len(chunk) and chunk[k].staged is None
        ]
        return _Call(kernel, args, grad_slots, [slot.index for slot in chunk], inputs, chunk)


@dataclass
class _Bucket:
    """Params of one device/dtype/codec/flags: a scalar table and the kernel calls over it."""

    device: torch.device
    members: list[int]  # plan indices
    rows: list[int]  # the table row of each member
    table: Tensor  # [len(members) (+ padding), NUM_SCALARS] float32 on device
    calls: list[_Call]
    ints: Tensor  # [rows, 3] int64 on device: (key, start, valid) of each row (kernel slot)
    random: bool  # whether the kernels read ``rng`` (stochastic rounding)
    members_t: Tensor | None = None  # capturable: the same indices as device tensors
    rows_t: Tensor | None = None


class GroupPlan:
    """Everything about one param group that does not change from step to step.

    Built when the set of params with a grad changes (or after load_state_dict); per step only
    the grads are placed into the prepared argument lists.

    With ``device_scalars`` (capturable) the step counters live in one buffer on the params'
    device and the scalar tables are computed there from it: a step reads nothing back to the
    host.
    """

    def __init__(
        self,
        mask: tuple[bool, ...],
        params: list[Tensor],
        states: list[dict],
        codecs: list,
        flags: UpdateFlags,
        stochastic_param: bool,
        grads: list[Tensor],
        device_scalars: Callable[[Tensor], StepScalars] | None = None,
        keys: KeySource | None = None,
    ) -> None:
        self.mask = mask
        self.keys = keys
        self.device_scalars = device_scalars
        self.params = params
        self.states = states
        self.codecs = codecs
        self.flags = flags
        self.stochastic_param = stochastic_param
        self.grad_dtypes = [g.dtype for g in grads]
        self._bind_steps()
        self.eager: list[int] = []
        groups: dict[tuple, list[int]] = {}
        for i, (p, g, codec) in enumerate(zip(params, grads, codecs)):
            if (
                compiled_eligible(p, codec, stochastic_param)
                and g.dtype == p.dtype
                and self._moments_fit(i)
            ):
                key = (p.device, p.dtype, codec, codec.stored_dtype(p))
                groups.setdefault(key, []).append(i)
            else:
                self.eager.append(i)
        self.buckets: list[_Bucket] = []
        self.param_tails: list[Tensor] = []
        self.param_stages: list[Tensor] = []
        self.grad_stages: list[Tensor] = []
        self.grad_tails: list[tuple[int, int, int]] = []
        self.failed: list[int] = []
        self.compile_error: CompileUnavailable | None = None
        for (device, dtype, codec, stored), members in groups.items():
            staged = len(self.param_tails)
            try:
                self.buckets.append(self._bucket(device, dtype, codec, stored, members))
            except CompileUnavailable as err:
                for stages in (self.param_tails, self.param_stages, self.grad_stages):
                    del stages[staged:]
                del self.grad_tails[staged:]
                self.compile_error = err
                self.failed.extend(members)
        self.calls = [call for bucket in self.buckets for call in bucket.calls]
        self._signal_calls: list[_Call] | None = None
        self.signal_policy = None  # the executor's SignalPolicy for this plan

    def _bind_steps(self) -> None:
        """Move the params' step counters into one buffer; state['step'] become its views."""
        self.steps = None
        if not self.states:
            return
        first = self.states[0]["step"]
        dtype, device = first.dtype, first.device
        same = all(s["step"].dtype == dtype and s["step"].device == device for s in self.states)
        if not same or (device.type != "cpu" and self.device_scalars is None):
            return
        if self.device_scalars is not None:
            self.steps = torch.stack([s["step"].reshape(()) for s in self.states])
        else:
            values = [float(state["step"]) for state in self.states]
            self.steps = torch.tensor(values, dtype=dtype)
            self.steps_view = self.steps.numpy()
        for i, state in enumerate(self.states):
            state["step"] = self.steps[i]

    def _slots(self, i: int, codec) -> list[_Slot]:
        """The kernel slots of param ``i``: the param itself, or for a block-wise codec and a
        size that is no whole number of blocks, its whole blocks (views) and its last, partial
        block (stepped in a zero-padded staging block, copied in and out around the kernels).

        Float codecs get 1-d views (the kernels read sizes that are no graph input as
        ``size(0)``); a param of at least ``SMALL_NUMEL`` elements is cut into whole rows of
        ``SIGNAL_ROW`` and a tail of 2 to ``SIGNAL_ROW + 1`` elements (two slots, both in
        place), so that signal kernels can take its rows as ``[rows, SIGNAL_ROW]``. Block-wise
        codecs get ``[blocks, block]`` rows of the param and ``[blocks, bytes per block]`` rows
        of the codes (scales stay 1-d): a block's scale and its codes are then computed in one
        outer loop over rows.
        """
        param = local(self.params[i]).view(-1)
        base = shard_start(self.params[i]) if is_dtensor(self.params[i]) else 0
        state = {name: t.view(-1) for name, t in self._moments(i).items()}
        n = param.numel()
        block = block_of(codec)
        if not block:
            cut = n // SIGNAL_ROW * SIGNAL_ROW if n >= SMALL_NUMEL else n
            if n - cut == 1:  # no slot of one element: sizes 0 and 1 are specialised
                cut -= SIGNAL_ROW
            if cut == n:
                return [_Slot(i, param, state, n, base, n, None, None)]
            rem = n - cut
            return [
                _Slot(
                    i,
                    param.narrow(0, start, length),
                    {name: t.narrow(0, start, length) for name, t in state.items()},
                    length,
                    base + start,
                    length,
                    length,
                    None,
                    start,
                )
                for start, length in ((0, cut), (cut, rem))
            ]
        blocks, rem = divmod(n, block)
        total = blocks + (rem > 0)
        per_block = {name: t.numel() // total for name, t in state.items()}  # codes, scales

        def rows(name: str, t: Tensor, first: int, count: int) -> Tensor:
            part = t.narrow(0, first * per_block[name], count * per_block[name])
            return part.view(count, per_block[name]) if t.dtype == torch.uint8 else part

        slots = []
        if blocks:
            main = blocks * block
            views = {name: rows(name, t, 0, blocks) for name, t in state.items()}
            flat = param.narrow(0, 0, main).view(blocks, block)
            grad_numel = main if rem else None  # a part of the grad, or all of it
            slots.append(_Slot(i, flat, views, main, base, main, grad_numel, None))
        if rem:
            last = {name: rows(name, t, blocks, 1) for name, t in state.items()}
            staging = torch.zeros(1, block, dtype=param.dtype, device=param.device)
            offset = blocks * block
            slots.append(_Slot(i, staging, last, block, base + offset, rem, None, (offset, rem)))
        return slots

    def _bucket(self, device, dtype, codec, stored, members: list[int]) -> _Bucket:
        by_size: dict[int, list[_Slot]] = {}
        small: list[_Slot] = []
        for i in members:
            for slot in self._slots(i, codec):
                n = slot.numel
                if n < SMALL_NUMEL:
                    small.append(slot)
                elif n <= UNIFORM_MAX_NUMEL:
                    by_size.setdefault(n, []).append(slot)
                else:
                    by_size.setdefault(-len(by_size) - 1, []).append(slot)  # a mixed chunk
        chunks: list[tuple[list[_Slot], str]] = []
        mixed: list[_Slot] = []
        for same in by_size.values():
            full = len(same) - len(same) % UNIFORM_WIDTH
            chunks += [
                (same[k : k + UNIFORM_WIDTH], "uniform") for k in range(0, full, UNIFORM_WIDTH)
            ]
            mixed += same[full:]
        chunks += [(mixed[k : k + MIXED_WIDTH], "mixed") for k in range(0, len(mixed), MIXED_WIDTH)]
        chunks += [(small[k : k + SMALL_WIDTH], "small") for k in range(0, len(small), SMALL_WIDTH)]
        widths = {"uniform": UNIFORM_WIDTH, "mixed": MIXED_WIDTH, "small": SMALL_WIDTH}
        rows = sum(widths[layout] for _, layout in chunks)
        table = torch.zeros(rows, _NUM_SCALARS, dtype=torch.float32, device=device)
        ints = torch.zeros(rows, 3, dtype=torch.int64, device=device)
        random = False
        calls: list[_Call] = []
        slot_rows: list[int] = []
        slot_members: list[int] = []
        row = 0
        for chunk, layout in chunks:
            for slot in chunk:
                if layout != "small" and slot.valid != slot.numel:  # only small kernels mask
                    raise AssertionError(
                        f"a {layout} kernel has no tail mask, but got a slot of {slot.numel} "
                        f"elements of which {slot.valid} are the param's"
                    )
            width = widths[layout]
            sr = self.stochastic_param and dtype != torch.float32
            spec = KernelSpec(device.type, dtype, codec, stored, self.flags, width, layout, sr)
            random = random or needs_random(spec)
            kernel = get_kernel(spec, device)
            params = [slot.param for slot in chunk]
            states = [slot.state for slot in chunk]
            grads = [slot.param for slot in chunk]  # stand-ins of the right sizes
            for k, slot in enumerate(chunk):
                ints[row + k, 1] = slot.start
                ints[row + k, 2] = slot.valid
                if slot.staged is not None:
                    stage = torch.zeros_like(slot.param)
                    grads[k] = stage
                    self._stage(slot, stage)
            for slot_index in range(len(chunk), width):
                dummy = dummy_inputs(spec, device, slot_index)
                params.append(dummy["param"])
                grads.append(dummy["grad"])
                states.append(dummy["state"])
            inputs = {
                "params": params,
                "grads": grads,
                "states": states,
                "scalars": table[row : row + width],
                "ints": ints[row : row + width],
            }
            calls.append(_Call.build(kernel, inputs, chunk))
            slot_rows += range(row, row + len(chunk))
            slot_members += [slot.index for slot in chunk]
            row += width
        return _Bucket(device, slot_members, slot_rows, table, calls, ints, random)

    def _stage(self, slot: _Slot, grad_stage: Tensor) -> None:
        """Register the copies of a tail slot: param tail in and out, grad tail in."""
        offset, length = slot.staged
        param_tail = local(self.params[slot.index]).view(-1).narrow(0, offset, length)
        self.param_tails.append(param_tail)
        self.param_stages.append(slot.param.view(-1).narrow(0, 0, length))
        self.grad_stages.append(grad_stage.view(-1).narrow(0, 0, length))
        self.grad_tails.append((slot.index, offset, length))

    def stage_in(self, grads: list[Tensor]) -> None:
        """Copy the params' and grads' partial last blocks into their staging blocks."""
        if not self.param_tails:
            return
        tails = [
            local_grad(self.params[i], grads[i]).view(-1).narrow(0, offset, n)
            for i, offset, n in self.grad_tails
        ]
        torch._foreach_copy_(self.grad_stages, tails)
        torch._foreach_copy_(self.param_stages, self.param_tails)

    def stage_out(self) -> None:
        """Copy the stepped partial last blocks back into the params."""
        if self.param_tails:
            torch._foreach_copy_(self.param_tails, self.param_stages)

    def _fill_tables_on_device(self) -> None:
        if not self.buckets:
            return
        steps = self.steps
        if steps is None:  # counters on several devices: gather them (no host sync)
            device = self.buckets[0].device
            steps = torch.stack([s["step"].to(device).reshape(()) for s in self.states])
        scalars = self.device_scalars(steps)
        full = torch.empty(steps.shape[0], _NUM_SCALARS, dtype=torch.float32, device=steps.device)
        for column, value in enumerate(scalars):
            full[:, column] = value
        for bucket in self.buckets:
            if bucket.members_t is None or bucket.members_t.device != full.device:
                bucket.members_t = torch.tensor(bucket.members, device=full.device)
                bucket.rows_t = torch.tensor(bucket.rows, device=bucket.device)
            bucket.table[bucket.rows_t] = full[bucket.members_t].to(bucket.device)

    def _moments_fit(self, i: int) -> bool:
        """The stored moments are plain contiguous tensors of the sizes the codec allocates."""
        param, state, codec = local(self.params[i]), self.states[i], self.codecs[i]
        for key in moment_keys(self.flags):
            fresh = codec.allocate(torch.empty(param.shape, dtype=param.dtype, device="meta"), key)
            for name, like in fresh.items():
                have = local(state.get(name))
                if not (
                    type(have) is Tensor
                    and have.is_contiguous()
                    and have.numel() == like.numel()
                    and have.dtype == like.dtype
                ):
                    return False
        return True

    def _moments(self, i: int) -> dict[str, Tensor]:
        state, codec = self.states[i], self.codecs[i]
        return {
            name: local(state[name])
            for key in moment_keys(self.flags)
            for name in codec.state_keys(key)
        }

    # --------------------------------------------------------------------------------------------

    def advance_steps(self) -> tuple[list[float] | None, float | None]:
        """Add one to every step counter of the plan; return the new values (and the common
        value when they are all equal, as usual). Capturable: nothing is read back (None)."""
        if self.device_scalars is not None:
            if self.steps is not None:
                self.steps.add_(1)
            else:
                torch._foreach_add_([state["step"] for state in self.states], 1.0)
            return None, None
        if self.steps is not None:
            self.steps.add_(1)
            view = self.steps_view
            common = float(view[0]) if (view == view[0]).all() else None
            return view.tolist(), common
        out = []
        for state in self.states:
            state["step"] += 1
            out.append(float(state["step"]))
        common = out[0] if all(s == out[0] for s in out) else None
        return out, common

    def missing_signal_kernels(self) -> int:
        """How many of the plan's signal kernels are not compiled yet in this process."""
        specs = {dataclasses.replace(call.kernel.spec, signals=True) for call in self.calls}
        return sum(not is_compiled(spec) for spec in specs)

    def compiled_numel(self) -> int:
        """Elements of the params that the kernels step."""
        return sum(slot.numel for call in self.calls for slot in call.slots)

    def signal_calls(self) -> list[_Call]:
        """The plan's calls with kernels that also return the slots' squared norms (compiled
        on first use; built once per plan). Float slots outside small chunks are passed as
        ``[rows, SIGNAL_ROW]`` (whole rows: see :meth:`_slots`)."""
        if self._signal_calls is None:
            built = []
            for call in self.calls:
                spec = dataclasses.replace(call.kernel.spec, signals=True)
                device = call.inputs["params"][0].device
                kernel = get_kernel(spec, device)
                inputs, row = call.inputs, None
                if signal_rows(spec):
                    inputs, row = _as_signal_rows(spec, device, inputs, len(call.slots))
                built.append(_Call.build(kernel, inputs, call.slots, row))
            self._signal_calls = built
        return self._signal_calls

    def collect_sums(self, outputs: list[tuple[_Call, Tensor]]) -> dict[int, Tensor]:
        """Per param (plan index), its slots' signal sums added up (the columns all of its
        slots have, should two of its kernels give different ones: 5 with p0 and dp, else 3)."""
        sums: dict[int, Tensor] = {}
        for call, table in outputs:
            for k, i in enumerate(call.members):
                row = table[k]
                if i in sums:  # slots of one param: the columns that all of them have
                    n = min(row.numel(), sums[i].numel())
                    row = sums[i][:n] + row[:n]
                sums[i] = row
        return sums

    def fill_random(self, steps: list[float]) -> None:
        """Write this step's random-stream key of every tensor into the buckets' rng tables."""
        if not any(bucket.random for bucket in self.buckets):
            return
        if self.keys is None:
            raise CompileUnavailable("stochastic rounding needs the optimizer's random keys")
        all_steps = np.asarray(steps, dtype=np.int64)
        for bucket in self.buckets:
            if not bucket.random:
                continue
            members = np.asarray(bucket.members, dtype=np.int64)
            column = np.zeros(bucket.ints.shape[0], dtype=np.int64)
            column[bucket.rows] = self.keys.many(members, all_steps[members])
            bucket.ints[:, 0].copy_(torch.from_numpy(column))

    def fill_tables(
        self, steps: list[float], uniform_step: float | None, scalars_for_step
    ) -> dict[float, StepScalars]:
        """Write every tensor's row of StepScalars (float32) into the buckets' tables."""
        cache: dict[float, StepScalars] = {}
        if self.device_scalars is not None:
            self._fill_tables_on_device()
            return cache
        for bucket in self.buckets:
            if uniform_step is not None:
                if uniform_step not in cache:
                    cache[uniform_step] = scalars_for_step(uniform_step)
                rows = [list(cache[uniform_step])]
                values = torch.tensor(rows, dtype=torch.float32).expand(bucket.table.shape[0], -1)
            else:
                for i in bucket.members:
                    if steps[i] not in cache:
                        cache[steps[i]] = scalars_for_step(steps[i])
                first = list(cache[steps[bucket.members[0]]])
                rows = [first] * bucket.table.shape[0]
                for i, row in zip(bucket.members, bucket.rows):
                    rows[row] = list(cache[steps[i]])
                values = torch.tensor(rows, dtype=torch.float32)
            if bucket.device.type == "cpu":
                bucket.table.copy_(values)
            else:
                bucket.table.copy_(values.pin_memory(), non_blocking=True)
        return cache
