"""DTensor params (FSDP2, tensor parallel): the local shard and where it sits in the full tensor.

adamkit steps sharded params on their local shards only: no collective runs in a step and no
full tensor is ever gathered. These helpers give the executors and codecs plain local tensors:

- :func:`local` unwraps a DTensor to its local shard (the same storage: writes land in the
  DTensor);
- :func:`shard_start` says where the local shard's elements sit in the full tensor, so that
  the counter-based random numbers of stochastic rounding are drawn by *global* element index:
  a sharded bf16 step draws exactly the numbers of the unsharded step;
- :func:`localize_state` maps a state dict to local tensors for one step;
- :func:`wrap_like` puts a local tensor back into a DTensor with a param's layout.

Block-wise codes of a sharded param are kept per shard (blocks never cross a shard), as plain
local tensors; see :mod:`adamkit.distributed` for how they are checkpointed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from adamkit.storage.rounding import ShardKey

try:  # torch >= 2.5; torch.distributed may also be missing from a build
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older or non-distributed torch builds
    try:
        from torch.distributed._tensor import DTensor
    except ImportError:
        DTensor = None


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2 and TP params, their grads)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (shares its storage), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def localize_state(state: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``state`` with every DTensor replaced by its local shard.

    Codecs write moments in place, so writes through the copy land in the real state.
    """
    return {k: local(v) for k, v in state.items()}


def _row_major_strides(shape: list[int]) -> list[int]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= size
    return strides[::-1]


def _layout(t: Tensor) -> tuple[list[int], list[int], list[int]] | None:
    """(full shape, local shape, offset of the local block) of ``t``'s real view, or None
    when the local shard is not one rectangular block of the full tensor."""
    if any(type(p).__name__ == "_StridedShard" for p in t.placements):
        return None
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # pragma: no cover - torch 2.4
        from torch.distributed._tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(
        t.shape, t.device_mesh, t.placements
    )
    full, loc, off = list(t.shape), list(local_shape), list(offset)
    if len(off) != len(full) or loc != list(t.to_local().shape):
        return None
    if t.is_complex():
        full, loc, off = full + [2], loc + [2], off + [0]
    return full, loc, off


def shard_start(t: Tensor) -> int | Tensor | None:
    """Row-major index in the full (real-view) tensor of the local shard's elements.

    An int (the first element's index) when the shard is a contiguous range of the full
    tensor, as FSDP2's dim-0 shards are; else an int64 tensor with every element's index;
    None when the layout is not a rectangular block (strided shards), in which case
    :func:`shard_key` falls back to a per-shard key.
    """
    layout = _layout(t)
    if layout is None:
        return None
    full, loc, off = layout
    strides = _row_major_strides(full)
    first = sum(o * s for o, s in zip(off, strides))
    split = [d for d in range(len(full)) if loc[d] != full[d]]
    # contiguous: the dims before the first cut dim have one index, the dims after it are whole
    if not split or (
        math.prod(loc[: split[0]]) == 1
        and all(loc[d] == full[d] for d in range(split[0] + 1, len(full)))
    ):
        return first
    index = torch.zeros((), dtype=torch.int64)
    for d, (size, o, s) in enumerate(zip(loc, off, strides)):
        shape = [1] * len(loc)
        shape[d] = size
        index = index + ((torch.arange(size, dtype=torch.int64) + o) * s).view(shape)
    return index.reshape(-1)


def shard_key(t: Tensor, rng_key: Any) -> Any:
    """``rng_key`` for the local shard of DTensor ``t`` (see :class:`ShardKey`)."""
    start = shard_start(t)
    if start is None:
        coordinate = t.device_mesh.get_coordinate() or []
        salt = math.prod(c + 2 for c in coordinate) * 0x2545F491
        return ShardKey(rng_key ^ (salt & 0xFFFFFFFF), 0)
    return ShardKey(rng_key, start)


def wrap_like(local_value: Tensor, like: Tensor) -> Tensor:
    """``local_value`` (the local shard of something shaped like DTensor ``like``) as a DTensor
    with ``like``'s mesh, placements, shape and strides; no communication."""
    return DTensor.from_local(
        local_value,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=tuple(_row_major_strides(list(like.shape))),
    )


def local_chunk(full_value: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of a full (unsharded) tensor laid out as DTensor ``like``."""
    layout = _layout(like)
    if layout is None:
        raise NotImplementedError(
            "loading a full tensor into a param with strided shards is not supported; "
            "load a DTensor state_dict (torch.distributed.checkpoint) instead"
        )
    full, loc, off = layout
    value = torch.view_as_real(full_value) if full_value.is_complex() else full_value
    if list(value.shape) != full:
        raise ValueError(
            f"saved state of shape {tuple(value.shape)} does not match the param's full "
            f"shape {tuple(full)}"
        )
    for d, (size, o) in enumerate(zip(loc, off)):
        value = value.narrow(d, o, size)
    return value


def local_grad(param: Tensor, grad: Tensor) -> Tensor:
    """The local shard of ``grad`` laid out as DTensor ``param`` (plain tensors unchanged).

    The grad is normally laid out as the param (FSDP2 reduce-scatters into the param's
    shards); a grad with other placements is redistributed first, the one case in which a
    step communicates.
    """
    if is_dtensor(grad) and tuple(grad.placements) != tuple(param.placements):
        grad = grad.redistribute(param.device_mesh, param.placements)
    return local(grad)


def local_step_inputs(
    param: Tensor, grad: Tensor, state: dict[str, Any], rng_key: Any
) -> tuple[Tensor, Tensor, dict[str, Any], Any]:
    """Local shards of a DTensor param, its grad (:func:`local_grad`) and its state, and the
    shard's random key."""
    return local(param), local_grad(param, grad), localize_state(state), shard_key(param, rng_key)
