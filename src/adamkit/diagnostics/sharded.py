r"""The Monitor's sample of a sharded (DTensor) param: the unsharded run's entries, gathered.

The Monitor samples the entries of a tensor whose flat, row-major index ``i`` (real view) has
``i % stride == 0``, with ``stride = signals.sample_stride(n)`` for the tensor's ``n`` entries.
Under sharding (FSDP2, tensor parallel) ``n`` is the *full* tensor's size and ``i`` the global
index: a rank takes the sampled entries that fall in its shard (where they lie comes from
:func:`adamkit.storage.shards.shard_start`) and writes each into slot ``i // stride`` of a
zero-filled vector of ``ceil(n / stride)`` slots. One all-reduce (sum) over the mesh dims
along which the param is sharded fills every slot, so that every rank holds exactly the sample
the unsharded run takes, in the same order, and computes the same signals from it (up to the
fp32 rounding of the values themselves). A sample is at most ``signals.SAMPLE`` entries of six
rows: the all-reduce moves a few tens of kB per tensor, once per sampled step.

Exact sums (norms) need no sample: the Monitor adds the shards' sums with one all-reduce. The
non-finite counts, taken when a norm or the sample shows a NaN/inf, are added up the same way.

Shards that are not a rectangular block of the full tensor (``_StridedShard``, from FSDP2 and
tensor parallelism on the same dim) have no global index here: their sample is taken from the
local shard alone, as an estimate of the whole, and differs from rank to rank; their non-finite
counts are taken on every sampled step and added up over the ranks.
"""

from __future__ import annotations

import math
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

    The local entries taken are ``flat[first::stride]`` (``positions is None``) or
    ``flat[positions]``; they go to the global sample's slots ``slot0, slot0 + 1, ...`` or
    ``slots``. ``shards`` is the param's (mesh, sharded mesh dims) when the sample is to be
    completed by an all-reduce, else None (plain or replicated params, and strided shards,
    whose sample is local: ``local_only``).
    """

    stride: int
    size: int  # entries in the sample this rank ends up with
    first: int = 0
    slot0: int = 0
    positions: Tensor | None = None
    slots: Tensor | None = None
    shards: tuple[Any, tuple[int, ...]] | None = None
    local_only: bool = False

    def take(self, t: Tensor) -> Tensor:
        """The sampled local entries of ``t`` (a param, its grad or a moment, any layout)."""
        flat = _real(t).reshape(-1)
        if self.positions is None:
            return flat[self.first :: self.stride]
        return flat[self.positions]

    def place_(self, buffer: Tensor, values: Tensor) -> None:
        """Write local sampled entries ``values`` ([rows, local count]) into their slots of
        ``buffer`` ([rows, size])."""
        if self.slots is None:
            buffer[:, self.slot0 : self.slot0 + values.shape[1]] = values
        else:
            buffer[:, self.slots] = values


def sampler_for(param: Tensor) -> Sampler:
    """The :class:`Sampler` of ``param``: every ``stride``-th entry of the full tensor."""
    lp = _real(param)
    groups = shard_groups(param)
    start = shard_start(param) if groups is not None else None
    if groups is None or start is None:
        stride = S.sample_stride(lp.numel())
        size = len(range(0, lp.numel(), stride))
        return Sampler(stride, size, local_only=groups is not None)
    numel = param.numel() * (2 if param.is_complex() else 1)
    stride = S.sample_stride(numel)
    size = math.ceil(numel / stride)
    if isinstance(start, int):
        first = (-start) % stride
        return Sampler(stride, size, first=first, slot0=(start + first) // stride, shards=groups)
    positions = torch.nonzero(start % stride == 0).reshape(-1)
    slots = start[positions] // stride
    device = lp.device
    return Sampler(
        stride, size, positions=positions.to(device), slots=slots.to(device), shards=groups
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
