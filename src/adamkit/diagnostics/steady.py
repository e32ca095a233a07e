"""The Monitor's reads in the steady state of a run: one prepared gather per sampled step.

Between two sampled steps of a long run nothing changes but the values: the same params have
gradients, the optimizer keeps its moments in the same tensors (float state is updated in
place) and hands over the same kind of norms. The general read of
:meth:`adamkit.diagnostics.monitor.Monitor._measure` still rebuilds, every sampled step, one
record per tensor, every sample view of m and v (an ``as_strided`` each) and the queue of rows
to scatter. :class:`SteadyReads` keeps all of that from one general read and replays it:

- the sample views of p, m and v (the v the denominator used) and where their values go in
  the ``[T, rows, K]`` sample array, with the snapshot of p0 taken before the step (neither p0
  nor p1 when the optimizer gives every param's sum p0^2 and sum (p1 - p0)^2 with its norms);
- the measured rows themselves (their gradient and step count refreshed each step).

Each step it first checks that the replay is still the general read: every param has a
gradient, its state holds the very moment tensors the views were made of (``is``), and the
norms come the same way (given by the optimizer for every param, with the same columns, or
taken here). Anything else,
including a new layout of params, AMSGrad switched on or off, ``load_state_dict`` (the Monitor
drops the replay then, so that no view keeps replaced moments alive), sends the step back to
the general read, which may build a new replay. Both give the same numbers (tested); this one
spends its time in the gather itself: one ``torch.cat`` per (device, dtype, view shape) and one
copy to the host; each run of a sample of a tensor larger than the caches is a cache miss of
its own (0.22 ms for m and v of 35 tensors after a step on a CPU).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from adamkit.diagnostics import native, readout
from adamkit.diagnostics import signals as S
from adamkit.diagnostics.readout import ROW, Layout, StepCounts, Transfer, _destinations
from adamkit.execution.eager import compute_dtype


class SteadyReads:
    """A replay of one general read (see the module docstring); build with :meth:`of`."""

    def __init__(
        self,
        layout: Layout,
        rows: list[Any],
        moments: list[tuple[Tensor, Tensor, Tensor | None]],
        amsgrad: tuple[bool, ...],
        given: bool,
        dtype: torch.dtype,
        delta: bool = False,
    ) -> None:
        self.layout = layout
        self.rows = rows
        self.moments = moments
        self.amsgrad = amsgrad
        self.given = given  # norms from the optimizer (else one multi-tensor norm per kind)
        self.dtype = dtype  # compute dtype of the norms taken here
        self.delta = delta  # the optimizer also gives sum p0^2 and sum dp^2: no sample of p
        self.columns = len(S.NORM_DELTA_SUMS if delta else S.NORM_SUMS)
        T = len(rows)
        self.k = np.array([row.entry.k for row in rows], dtype=np.int64)
        self.K = max(int(self.k.max(initial=1)), 1)
        index = {row.index: i for i, row in enumerate(rows)}
        # p0 (the snapshot's cats) and p1 (the layout's views of the params, gathered now):
        # one cat per (device, dtype), in the layout's order of entries
        param_rows = [np.array([index[i] for i in idx]) for idx, _ in layout.param_views]
        if delta:
            param_rows = []
        self.p0_dest = [self._dest(r, np.full(len(r), ROW["p0"])) for r in param_rows]
        self.groups = [
            (views, self._dest(r, np.full(len(r), ROW["p1"])))
            for r, (_, views) in zip(param_rows, layout.param_views)
        ]
        self.shape = (T, len(S.SAMPLE_ROWS), self.K)
        # m and v (the v the denominator used): in C where it builds (native.Gather: one
        # call), else one list of views per (device, dtype, view shape: whole or runs)
        moments = [
            (i, kind, t)
            for i, row in enumerate(rows)
            for kind, t in ((ROW["m"], row.m), (ROW["v"], row.v if row.vmax is None else row.vmax))
        ]
        self.gather = self._native_gather(rows, moments)
        if self.gather is None:
            groups: dict[tuple, tuple[list[Tensor], list[int], list[int]]] = {}
            for i, kind, t in moments:
                view = rows[i].entry.view(t)
                views, rs, kinds = groups.setdefault(readout.gather_key(view), ([], [], []))
                views.append(view)
                rs.append(i)
                kinds.append(kind)
            self.groups += [
                (views, self._dest(np.array(rs), np.array(kinds)))
                for views, rs, kinds in groups.values()
            ]

    def _native_gather(self, rows: list[Any], moments: list[tuple]) -> native.Gather | None:
        """The copy of the samples of ``moments`` ((row, kind, tensor)) in C, or None."""
        R, K = len(S.SAMPLE_ROWS), self.K
        table = []
        for i, kind, _ in moments:
            sampler = rows[i].entry.sampler
            table.append((sampler.runs, sampler.run, sampler.stride, (i * R + kind) * K))
        tensors = [t for _, _, t in moments]
        return native.Gather.of(tensors, np.array(table, dtype=np.int64).reshape(-1, 4))

    def _dest(self, rows: np.ndarray, kinds: np.ndarray) -> np.ndarray:
        """Where the samples of ``rows`` (of ``kinds``), end to end, go in the flat array."""
        dest, keep = _destinations(len(S.SAMPLE_ROWS), self.K, rows, kinds, self.k[rows])
        assert keep is None  # every row is measured
        return dest

    @classmethod
    def of(
        cls,
        layout: Layout,
        rows: list[Any],
        hyper: list[Any],
        fused: dict[Tensor, Tensor] | None,
        exact: str,
    ) -> SteadyReads | None:
        """The replay of this general read, or None when it is not a steady one: every row a
        plain param with float moments read as stored, contiguous p, m and v, no fused sums,
        and norms given for every row or for none (then, with ``exact="all"``, taken here with
        one compute dtype)."""
        if not rows or len(layout.other) or not layout.param_views:
            return None
        moments = []
        given = []
        deltas = []
        for row in rows:
            e = row.entry
            if not (e.plain and row.has_state and row.exact is None and e.stored is not None):
                return None
            if e.shards is not None or e.sampler.shards is not None:
                return None
            m, v = row.m, row.v if row.vmax is None else row.vmax
            if not all(t.is_contiguous() for t in (row.param, m, v)):
                return None
            stored = tuple(ref() if ref is not None else None for ref in e.stored)
            if stored[0] is not row.m or stored[1] is not row.v:
                return None
            moments.append(stored)  # as stored: vmax even where AMSGrad is off
            given.append(row.norms is not None)
            deltas.append(row.has_delta)
        if any(given) and not all(given) or any(deltas) and not all(deltas):
            return None
        if not all(given):
            dtypes = {compute_dtype(row.grad) for row in rows}
            devices = {row.grad.device for row in rows}
            if exact != "all" or len(dtypes) != 1 or len(devices) != 1:
                return None
        amsgrad = tuple(h.amsgrad for h in hyper)
        dtype = compute_dtype(rows[0].grad)
        return cls(layout, rows, moments, amsgrad, all(given), dtype, all(deltas))

    def read(
        self, states: dict, snap: Any, hyper: list[Any], fused: dict[Tensor, Tensor] | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """(samples [T, rows, K], squared norms [T, 3], the optimizer's sum p0^2 and sum dp^2
        [T, 2] (NaN without them), steps before, steps after), or None when the replay no
        longer matches what a general read would do (see the module)."""
        if snap.layout is not self.layout or snap.p0_other:
            return None
        if snap.p0 is None and not self.delta:
            return None
        if tuple(h.amsgrad for h in hyper) != self.amsgrad:
            return None
        if self.given != bool(fused):
            return None
        steps = []
        norms = []
        for row, (m, v, vmax) in zip(self.rows, self.moments):
            p = row.entry.param
            grad = p.grad
            st = states.get(p)
            if grad is None or not st:
                return None
            if st.get("exp_avg") is not m or st.get("exp_avg_sq") is not v:
                return None
            if st.get("max_exp_avg_sq") is not vmax:
                return None
            if self.given:
                given = fused.get(p)
                if given is None or given.numel() != self.columns:
                    return None
                norms.append(given if given.dim() == 1 else given.reshape(-1))
            row.grad = grad
            row.step_after = st.get("step")
            steps.append(row.step_after)
        transfer = Transfer()
        p0 = snap.p0 if not self.delta else []
        handles = [(transfer.add(cat), dest) for (_, cat), dest in zip(p0, self.p0_dest)]
        handles += [(transfer.add(views, len(dest)), dest) for views, dest in self.groups]
        if self.given:
            norm = torch.stack(norms).to(self.dtype)
        else:
            kinds = ([r.grad for r in self.rows], [m for m, _, _ in self.moments])
            kinds += ([v for _, v, _ in self.moments],)
            norm = torch.stack([readout.tensor_norms(ts, self.dtype) for ts in kinds], 1).square()
        norm_handle = transfer.add(norm)
        before = snap.steps
        before.queue(transfer)
        after = StepCounts(steps)
        after.queue(transfer)
        transfer.fetch()
        samples = np.zeros(self.shape)
        flat = samples.reshape(-1)
        for handle, dest in handles:
            flat[dest] = transfer.get(handle)
        if self.gather is not None:
            self.gather(samples)
        got = transfer.get(norm_handle).reshape(len(self.rows), self.columns)
        delta = got[:, 3:] if self.delta else np.full((len(self.rows), 2), np.nan)
        steps_before = before.read(transfer)[[row.index for row in self.rows]]
        return samples, got[:, :3], delta, steps_before, after.read(transfer)
