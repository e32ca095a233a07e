r"""The Monitor's sample of a sharded (DTensor) param: the unsharded run's entries, gathered.

The Monitor samples the entries of a tensor at the flat, row-major indices (real view) of
``signals.sample_positions(n)`` for the tensor's ``n`` entries: all of them, or runs of
``signals.SAMPLE_RUN`` adjacent entries ``stride`` apart. Under sharding (FSDP2, tensor
parallel) ``n`` is the *full* tensor's size and the indices global: a rank takes the sampled
entries that fall in its shard (where they lie comes from
:func:`adamkit.storage.shards.shard_start`; a run may straddle two shards) and writes each
into its slot of a zero-filled vector of the sample's size. One all-reduce (sum) over the mesh
dims along which the param is sharded fills every slot, so that every rank holds exactly the
sample the unsharded run takes, in the same order, and computes the same signals from it (up
to the fp32 rounding of the values themselves). A sample is at most ``signals.SAMPLE``
entries of six rows: the all-reduce moves a few tens of kB per tensor, once per sampled step.

Exact sums (norms) need no sample: the Monitor adds the shards' sums with one all-reduce. The
non-finite counts, taken when a norm or the sample shows a NaN/inf, are added up the same way.

Shards that are not a rectangular block of the full tensor (``_StridedShard``, from FSDP2 and
tensor parallelism on the same dim) have no global index here: their sample is taken from the
local shard alone, as an estimate of the whole, and differs from rank to rank; their non-finite
counts are taken on every sampled step and added up over the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from adamkit.diagnostics import signals as S
from adamkit.storage.shards import is_dtensor, local, shard_start


def _real(t: Tensor) -> Tensor:
    """The local shard (DTensor) as a real tensor, detached."""
    t = local(t.detach())
    return torch.view_as_real(t) if t.is_complex() else t


def shard_groups(t: Tensor) -> tuple[Any, tuple[int, ...]] | None:
    """(mesh, mesh dims) over which a DTensor is sharded: the sums of its local shards add up
    over those dims. None for plain tensors and fully replicated DTensors."""
    if not is_dtensor(t):
        return None
    dims = tuple(i for i, pl in enumerate(t.placements) if pl.is_shard())
    return (t.device_mesh, dims) if dims else None


@dataclass(frozen=True)
class Sampler:
    """Which entries of a param (its local shard, for a DTensor) feed the Monitor's sample.

    Unsharded (``positions is None``): the ``runs`` runs of ``run`` adjacent entries,
    ``stride`` apart, of the flat tensor (:func:`adamkit.diagnostics.signals.sample_runs`).
    Sharded: the local entries ``flat[positions]``, which go to the global sample's ``slots``.
    ``size`` is the number of entries in the sample this rank ends up with. ``shards`` is the
    param's (mesh, sharded mesh dims) when the sample is to be completed by an all-reduce, else
    None (plain or replicated params, and strided shards, whose sample is local:
    ``local_only``).
    """

    runs: int
    run: int
    stride: int
    size: int
    positions: Tensor | None = None
    slots: Tensor | None = None
    shards: tuple[Any, tuple[int, ...]] | None = None
    local_only: bool = False

    def view(self, t: Tensor) -> Tensor:
        """The sampled entries of a contiguous real tensor ``t`` without a copy: 1-d when it
        is sampled whole, else ``[runs, run]``."""
        if self.runs == 1:
            return t.as_strided((self.run,), (1,))
        return t.as_strided((self.runs, self.run), (self.stride, 1))

    def take(self, t: Tensor) -> Tensor:
        """The sampled local entries of ``t`` (a param, its grad or a moment, any layout), 1-d."""
        flat = _real(t).reshape(-1)
        if self.positions is None:
            return self.view(flat).reshape(-1)
        return flat[self.positions]

    def place_(self, buffer: Tensor, values: Tensor) -> None:
        """Write local sampled entries ``values`` ([rows, local count]) into their slots of
        ``buffer`` ([rows, size])."""
        buffer[:, self.slots] = values


def sampler_for(param: Tensor) -> Sampler:
    """The :class:`Sampler` of ``param``: the entries of ``signals.sample_positions`` of the
    full tensor."""
    lp = _real(param)
    groups = shard_groups(param)
    start = shard_start(param) if groups is not None else None
    if groups is None or start is None:
        runs, run, stride = S.sample_runs(lp.numel())
        return Sampler(runs, run, stride, runs * run, local_only=groups is not None)
    numel = param.numel() * (2 if param.is_complex() else 1)
    runs, run, stride = S.sample_runs(numel)
    if isinstance(start, int):  # a contiguous range of the flat tensor
        wanted = torch.from_numpy(S.sample_positions(numel))
        inside = (wanted >= start) & (wanted < start + lp.numel())
        positions = wanted[inside] - start
        slots = torch.nonzero(inside).reshape(-1)
    else:  # the global index of every local entry
        j, r = start // stride, start % stride
        positions = torch.nonzero((j < runs) & (r < run)).reshape(-1)
        slots = (j * run + r)[positions]
    device = lp.device
    return Sampler(
        runs,
        run,
        stride,
        runs * run,
        positions=positions.to(device),
        slots=slots.to(device),
        shards=groups,
    )


def gather_samples_(rows: list[Any]) -> None:
    """Complete the samples of sharded rows: every rank ends up with the global sample.

    ``rows`` have ``sampler`` (a :class:`Sampler`), ``sample`` (a list of 1-d local sample
    rows) and ``k``; rows whose sampler has ``shards`` get float64 rows of ``sampler.size``
    entries, with one all-reduce per (device, mesh, sharded dims) and mesh dim.
    """
    batches: dict[tuple, list[Any]] = {}
    for row in rows:
        shards = row.sampler.shards
        if shards is not None:
            device = row.sample[0].device
            batches.setdefault((device, id(shards[0]), shards[1]), []).append(row)
    for (device, _, dims), members in batches.items():
        sizes = [len(r.sample) * r.sampler.size for r in members]
        buffer = torch.zeros(sum(sizes), dtype=torch.float64, device=device)
        views = []
        for row, part in zip(members, buffer.split(sizes)):
            view = part.view(len(row.sample), row.sampler.size)
            row.sampler.place_(view, torch.stack([x.to(torch.float64) for x in row.sample]))
            views.append(view)
        mesh = members[0].sampler.shards[0]
        for d in dims:
            torch.distributed.all_reduce(buffer, group=mesh.get_group(d))
        for row, view in zip(members, views):
            row.sample = list(view.unbind(0))
            row.k = row.sampler.size


def all_reduce_counts_(rows: list[Any], counts: dict[int, Tensor]) -> None:
    """Add up the non-finite counts (``counts[i]``: an int64 vector of row ``i``) of sharded
    rows over their shards (``rows[i].shards``: (mesh, sharded mesh dims) or None), one
    all-reduce per (device, mesh, sharded dims) and mesh dim."""
    batches: dict[tuple, list[int]] = {}
    for i, count in counts.items():
        shards = rows[i].shards
        if shards is not None:
            batches.setdefault((count.device, id(shards[0]), shards[1]), []).append(i)
    for (_, _, dims), idx in batches.items():
        stacked = torch.stack([counts[i] for i in idx])
        mesh = rows[idx[0]].shards[0]
        for d in dims:
            torch.distributed.all_reduce(stacked, group=mesh.get_group(d))
        for j, i in enumerate(idx):
            counts[i] = stacked[j]
