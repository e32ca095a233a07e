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

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from adamkit.execution.kernels import (
    _COMPILE_FLOATS,
    _NUM_SCALARS,
    CompileUnavailable,
    Kernel,
    KernelSpec,
    dummy_inputs,
    get_kernel,
)
from adamkit.execution.multi_tensor import moment_keys, plain_float_codec
from adamkit.rule import StepScalars, UpdateFlags

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
    """Whether ``param`` can be stepped by a compiled kernel (else: eager, per param)."""
    return (
        type(param) in (torch.Tensor, torch.nn.Parameter)
        and param.dtype in _COMPILE_FLOATS
        and param.layout == torch.strided
        and param.is_contiguous()
        and param.numel() >= MIN_NUMEL
        and plain_float_codec(codec)
        and not (stochastic_param and param.dtype != torch.float32)
    )


@dataclass
class _Call:
    kernel: Kernel
    args: list
    grad_slots: list[tuple[int, int]]  # (position in args, index of the param in the plan)
    members: list[int]  # indices of the params in the plan


@dataclass
class _Bucket:
    """Params of one device/dtype/codec/flags: a scalar table and the kernel calls over it."""

    device: torch.device
    members: list[int]  # plan indices
    rows: list[int]  # the table row of each member
    table: Tensor  # [len(members) (+ padding), NUM_SCALARS] float32 on device
    calls: list[_Call]
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
    ) -> None:
        self.mask = mask
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
        self.failed: list[int] = []
        self.compile_error: CompileUnavailable | None = None
        for (device, dtype, codec, stored), members in groups.items():
            try:
                self.buckets.append(self._bucket(device, dtype, codec, stored, members))
            except CompileUnavailable as err:
                self.compile_error = err
                self.failed.extend(members)
        self.calls = [call for bucket in self.buckets for call in bucket.calls]

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

    def _bucket(self, device, dtype, codec, stored, members: list[int]) -> _Bucket:
        by_size: dict[int, list[int]] = {}
        small: list[int] = []
        for i in members:
            n = self.params[i].numel()
            if n < SMALL_NUMEL:
                small.append(i)
            elif n <= UNIFORM_MAX_NUMEL:
                by_size.setdefault(n, []).append(i)
            else:
                by_size.setdefault(-i - 1, []).append(i)  # a size of its own: a mixed chunk
        chunks: list[tuple[list[int], str]] = []
        mixed: list[int] = []
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
        calls: list[_Call] = []
        member_rows: list[int] = []
        row = 0
        for chunk, layout in chunks:
            width = widths[layout]
            spec = KernelSpec(device.type, dtype, codec, stored, self.flags, width, layout)
            kernel = get_kernel(spec, device)
            params = [self.params[i] for i in chunk]
            states = [self._moments(i) for i in chunk]
            grads = list(params)  # stand-ins with the right sizes; replaced every step
            for slot in range(len(chunk), width):
                dummy = dummy_inputs(spec, device, slot)
                params.append(dummy["param"])
                grads.append(dummy["grad"])
                states.append(dummy["state"])
            inputs = {
                "params": params,
                "grads": grads,
                "states": states,
                "scalars": table[row : row + width],
            }
            args, slots = kernel.arguments(inputs)
            grad_slots = [(pos, chunk[k]) for pos, k in slots if k < len(chunk)]
            calls.append(_Call(kernel, args, grad_slots, chunk))
            member_rows += range(row, row + len(chunk))
            row += width
        return _Bucket(device, [i for chunk, _ in chunks for i in chunk], member_rows, table, calls)

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
        """The stored moments are plain contiguous tensors of the param's size."""
        n = self.params[i].numel()
        state = self.states[i]
        keys = moment_keys(self.flags)
        return all(
            isinstance(state.get(k), Tensor) and state[k].is_contiguous() and state[k].numel() == n
            for k in keys
        )

    def _moments(self, i: int) -> dict[str, Tensor]:
        state = self.states[i]
        return {key: state[key] for key in moment_keys(self.flags)}

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
