"""The Monitor's reads on a sampled step, batched across tensors.

What changes between sampled steps is the values, not the layout: which params are measured,
their names, groups, sizes and sample strides, and the strided views of the params themselves.
A :class:`Layout` keeps all of that, rebuilt only when its signature (the params with a
gradient, their groups, storage and shapes) changes. A sampled step then costs, per
(device, dtype):

- before the step, one ``torch.cat`` of the params' sample views (the snapshot of p0: a copy of
  at most ``signals.SAMPLE`` entries per tensor) and the step counts (numbers on the CPU, one
  ``torch.stack`` on an accelerator);
- after it, one ``torch.cat`` of every sample row (p1, m, v) and one copy to the host per
  device (:class:`Transfer`), scattered into the ``[T, rows, K]`` array of
  :func:`adamkit.diagnostics.signals.batch_sums` with one fancy-indexed assignment.

A sample view is one ``as_strided`` of a contiguous real tensor: the whole tensor (1-d) or its
runs (``[runs, SAMPLE_RUN]``; ``Sampler.take`` for the others: complex, non-contiguous,
sharded). Views of the two shapes are concatenated apart (one ``torch.cat`` per (device,
dtype, row shape)); views of gradients and moments are made per step,
since those tensors may be new objects each step (``zero_grad(set_to_none=True)``, decoded
compact state) and a cached view would keep them alive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adamkit.diagnostics import signals as S
from adamkit.diagnostics.sharded import Sampler, sampler_for, shard_groups
from adamkit.storage.shards import is_dtensor

ROW = {name: j for j, name in enumerate(S.SAMPLE_ROWS)}
"""Row of each sampled quantity in the samples array."""


def gather_key(t: Tensor) -> tuple:
    """What tensors must share to go into one ``torch.cat``: device, dtype and the shape past
    dim 0 (sample views are 1-d for a whole tensor, ``[runs, SAMPLE_RUN]`` otherwise)."""
    return (t.device, t.dtype, t.shape[1:])


@dataclass(eq=False)
class Entry:
    """One measured param: what does not change between sampled steps."""

    param: Tensor
    name: str
    group: int
    shape: tuple[int, ...]
    numel: int  # entries of the whole tensor, real view (of the full tensor when sharded)
    sampler: Sampler
    shards: tuple[Any, tuple[int, ...]] | None  # DTensor: (mesh, sharded mesh dims)
    k: int  # sample size (global, after gathering a sharded sample)
    plain: bool  # a real, non-DTensor param: sampled by one as_strided view
    # weak references to the stored moments (exp_avg, exp_avg_sq, max_exp_avg_sq) when the
    # optimizer's decoded_state returned those very tensors: read them directly while they
    # are still the stored ones
    stored: tuple[Any, ...] | None = None

    def view(self, t: Tensor) -> Tensor:
        """The sampled entries of ``t`` (the param, its gradient or a moment): a view when
        ``t`` is contiguous (1-d, or ``[runs, SAMPLE_RUN]``), else a 1-d copy; flattened,
        the entries in the sample's order either way."""
        if self.plain and t.is_contiguous() and not t.is_complex():
            return self.sampler.view(t)
        return self.sampler.take(t)


class Layout:
    """The entries measured on a sampled step and the params' sample views, by (device, dtype,
    view shape: whole or runs).

    ``signature`` identifies it: the (group, index, id, storage, shape, dtype) of every param
    that has a gradient (every param when the step has a closure).
    """

    def __init__(self, signature: tuple, entries: list[Entry]) -> None:
        self.signature = signature
        self.entries = entries
        buckets: dict[tuple, tuple[list[int], list[Tensor]]] = {}
        self.other: list[int] = []  # entries sampled by Sampler.take, one by one
        with torch.no_grad():
            for i, e in enumerate(entries):
                p = e.param
                if e.plain and p.is_contiguous():
                    view = e.view(p.detach())
                    idx, views = buckets.setdefault(gather_key(view), ([], []))
                    idx.append(i)
                    views.append(view)
                else:
                    self.other.append(i)
        self.param_views = list(buckets.values())
        self.fused_last = False  # every entry had a fused row at the last sampled step

    @staticmethod
    def signature_of(param_groups: list[dict[str, Any]], has_closure: bool) -> tuple:
        return tuple(
            (g, i, id(p), 0 if is_dtensor(p) else p.data_ptr(), p.shape, p.dtype)
            for g, group in enumerate(param_groups)
            for i, p in enumerate(group["params"])
            if has_closure or p.grad is not None
        )

    @classmethod
    def build(cls, signature: tuple, param_groups: list, names: list[list[str]]) -> Layout:
        entries = []
        for g, i, *_ in signature:
            p = param_groups[g]["params"][i]
            sampler = sampler_for(p)  # a DTensor: the full tensor's sampled entries
            entries.append(
                Entry(
                    p,
                    names[g][i],
                    g,
                    tuple(p.shape),
                    p.numel() * (2 if p.is_complex() else 1),
                    sampler,
                    shard_groups(p),
                    sampler.size,
                    not p.is_complex() and not is_dtensor(p),
                )
            )
        return cls(signature, entries)

    def sample_cats(self) -> list[tuple[list[int], Tensor]]:
        """The sampled entries of the params now (a 1-d copy), but for :attr:`other`: one
        ``torch.cat`` per bucket of :attr:`param_views`, with the entry indices in its order."""
        return [(idx, torch.cat(views).reshape(-1)) for idx, views in self.param_views]

    def sample_others(self) -> dict[int, Tensor]:
        """The sampled entries of the params of :attr:`other` now (a copy), by entry."""
        return {
            i: self.entries[i].view(self.entries[i].param).reshape(-1).clone() for i in self.other
        }


def tensor_norms(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """||t||_2 of each tensor, accumulated in ``dtype``: one multi-tensor kernel.

    Not BLAS ``dot`` per tensor, although on an idle CPU it is faster (measured on 16.8M fp32
    params in 35 tensors: 1.6 ms against 2.4 ms per kind): with one other busy process on the
    project's 2-core machine its median went to 15 ms for the three kinds, with outliers at
    0.2 s, while the multi-tensor norm stayed at 9 ms.
    """
    foreach_norm = getattr(torch, "_foreach_norm", None)
    if foreach_norm is not None:
        try:
            return torch.stack(foreach_norm(tensors, 2, dtype=dtype))
        except (RuntimeError, TypeError):  # an older signature or an unsupported layout
            pass
    return torch.stack([torch.linalg.vector_norm(t, dtype=dtype) for t in tensors])


class Transfer:
    """Tensors to move to the host together: one ``torch.cat`` (along dim 0: tensors of one
    shape past it go together) and one copy per (device, dtype, trailing shape), converted to
    float64 on the host.

    Nothing is converted on the device: a dtype conversion is an elementwise op that torch
    parallelises above 32768 entries, and on a busy machine a parallel region can wait
    milliseconds for its threads; NumPy converts on the host, in one thread.
    """

    def __init__(self) -> None:
        self._parts: dict[tuple, list[Tensor]] = {}
        self._sizes: dict[tuple, int] = {}
        self._host: dict[tuple, np.ndarray] = {}

    def add(self, t: Tensor | list[Tensor], n: int | None = None) -> tuple[tuple, int, int]:
        """Queue ``t`` (any shape; a list: tensors of one device, dtype and shape past dim 0,
        end to end); returns the handle of its values, flattened. ``n``: their number of
        entries, when known."""
        parts = t if isinstance(t, list) else [t.reshape(-1)]
        key = gather_key(parts[0])
        if n is None:
            n = sum(x.numel() for x in parts)
        offset = self._sizes.get(key, 0)
        self._parts.setdefault(key, []).extend(parts)
        self._sizes[key] = offset + n
        return key, offset, n

    def fetch(self) -> None:
        self._host = {
            key: _host_float64(torch.cat(ps).reshape(-1)) for key, ps in self._parts.items()
        }
        self._parts = {}

    def get(self, handle: tuple[tuple, int, int]) -> np.ndarray:
        key, offset, n = handle
        return self._host[key][offset : offset + n]


def _host_float64(t: Tensor) -> np.ndarray:
    """A 1-d tensor's values as a float64 NumPy array (bfloat16 through its bits)."""
    t = t.cpu()
    if t.dtype == torch.bfloat16:
        bits = t.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    return t.numpy().astype(np.float64)


class Samples:
    """Sample rows of many tensors, queued as (row, kind, sample: 1-d or runs) and gathered
    with one ``torch.cat`` per (device, dtype, shape past dim 0); :meth:`scatter` writes them
    into ``[T, rows, K]``."""

    def __init__(self) -> None:
        self._by_key: dict[tuple, tuple[list[int], list[int], list[Tensor]]] = {}
        self._queued: list[tuple[tuple, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, row: int, kind: int, t: Tensor) -> None:
        rows, kinds, ts = self._by_key.setdefault(gather_key(t), ([], [], []))
        rows.append(row)
        kinds.append(kind)
        ts.append(t)

    def add_cat(self, rows: list[int], kind: int, cat: Tensor, sizes: np.ndarray) -> None:
        """Queue ``cat``, the samples of ``rows`` (of ``sizes`` entries) end to end."""
        self._queued.append((cat, np.asarray(rows), np.full(len(rows), kind), sizes))

    def queue(self, transfer: Transfer, size_of: np.ndarray) -> None:
        """Move everything into ``transfer`` (``size_of[row]``: the sample size of a row)."""
        for rows, kinds, ts in self._by_key.values():
            r = np.asarray(rows)
            self._queued.append((ts, r, np.asarray(kinds), size_of[r]))
        self._by_key = {}
        self._queued = [(transfer.add(t), r, j, k) for t, r, j, k in self._queued]

    def scatter(self, transfer: Transfer, out: np.ndarray) -> None:
        """Write the fetched values into ``out`` ([T, rows, K]); a row index < 0 is dropped."""
        _, R, K = out.shape
        flat = out.reshape(-1)
        for handle, rows, kinds, sizes in self._queued:
            dest, keep = _destinations(R, K, rows, kinds, sizes)
            values = transfer.get(handle)
            flat[dest] = values if keep is None else values[keep]
        self._queued = []


_DESTINATIONS: dict[tuple, tuple[np.ndarray, np.ndarray | None]] = {}


def _destinations(
    R: int, K: int, rows: np.ndarray, kinds: np.ndarray, sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """Where the values of samples of ``sizes`` entries, end to end, go in a flat [T, R, K]
    array (rows < 0 dropped: the mask of the values kept, None for all). The same layout
    recurs every sampled step, so the index arrays are kept (at most 64 layouts)."""
    key = (R, K, rows.tobytes(), np.asarray(kinds).tobytes(), np.asarray(sizes).tobytes())
    found = _DESTINATIONS.get(key)
    if found is None:
        starts = (rows * R + kinds) * K
        ends = np.cumsum(sizes)
        dest = np.repeat(starts - (ends - sizes), sizes) + np.arange(ends[-1])
        keep = np.repeat(rows >= 0, sizes)
        found = (dest[keep], None if keep.all() else keep)
        if len(_DESTINATIONS) >= 64:
            _DESTINATIONS.clear()
        _DESTINATIONS[key] = found
    return found


class StepCounts:
    """Step counts of many params, read now without a host sync: numbers and CPU tensors as
    floats, other tensors stacked per device (a copy) and moved with the :class:`Transfer`;
    a missing count is 0."""

    def __init__(self, values: list[Any]) -> None:
        host = [0.0] * len(values)
        by_device: dict[torch.device, tuple[list[int], list[Tensor]]] = {}
        for i, x in enumerate(values):
            if x is None:
                continue
            if isinstance(x, Tensor):
                if x.is_cpu:  # torch keeps the count in a CPU scalar: ~0.1 us to read
                    host[i] = float(x.item())
                    continue
                idx, ts = by_device.setdefault(x.device, ([], []))
                idx.append(i)
                ts.append(x.reshape(()))
            else:
                host[i] = float(x)
        self.host = np.array(host, dtype=np.float64)
        self._stacked = [(np.asarray(idx), torch.stack(ts)) for idx, ts in by_device.values()]
        self._handles: list = []

    def queue(self, transfer: Transfer) -> None:
        self._handles = [(idx, transfer.add(t)) for idx, t in self._stacked]
        self._stacked = []

    def read(self, transfer: Transfer) -> np.ndarray:
        for idx, handle in self._handles:
            self.host[idx] = transfer.get(handle)
        self._handles = []
        return self.host
