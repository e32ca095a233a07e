r"""adamkit inside PyTorch's distributed engine: sharded state in and out of checkpoints.

adamkit ships no distributed runtime. Under DDP and ``ZeroRedundancyOptimizer`` params are plain
tensors and nothing here is involved. Under FSDP2 (``fully_shard``) params are DTensors: the
executors step the local shards (:mod:`adamkit.storage.shards`) and the optimizer's state holds

- float formats (``None``, ``"float32"``, ``"bfloat16"``): DTensor moments laid out as the
  param, exactly as ``torch.optim.AdamW`` keeps them under FSDP2;
- block-wise formats (``"int8"``, ``"int4"``): plain local tensors of codes and block scales
  for the local shard (blocks never cross a shard).

Codes of one shard mean nothing on another layout, and ``torch.distributed.checkpoint`` (DCP)
would take plain tensors for replicated copies and keep one rank's. So the ``state_dict()`` of a
sharded param presents block-wise moments in torch's layout: ``exp_avg``/``exp_avg_sq``/
``max_exp_avg_sq`` decoded to float32 DTensors with the param's layout
(:func:`present_state_dict`). DCP saves them shard by shard and reshards them to any world
size; ``load_state_dict`` re-encodes them into codes (:func:`adopt_sharded_state`). Decoded
values lie exactly on code levels and each block's largest value decodes to its scale, so
round-to-nearest re-encoding on the same layout gives back the very same codes and scales: a
resume on the same world size is bitwise identical. On another layout the blocks differ and the
moments are quantised once more (within the format's tolerance). The cost is checkpoint size:
8 bytes per param for int8/int4 moments instead of about 2 (bf16 moments stay 4, as DTensors).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from adamkit.execution.eager import compute_dtype
from adamkit.storage import blockwise
from adamkit.storage.float import real_view
from adamkit.storage.quantized import BlockwiseCodec
from adamkit.storage.select import MOMENT_KEYS as MOMENTS
from adamkit.storage.select import infer_codec
from adamkit.storage.shards import (
    is_dtensor,
    local,
    local_chunk,
    localize_state,
    shard_key,
    wrap_like,
)


def _decode_local(state: dict[str, Any], key: str, param: Tensor) -> Tensor | None:
    """``param``'s moment ``key`` decoded from its local state, shaped as the local shard."""
    local_state = localize_state(state)
    codec = infer_codec(local_state, key)
    if codec is None:
        return None
    real = real_view(local(param))
    value = codec.decode(local_state, key, real.shape, compute_dtype(param))
    if param.is_complex():
        value = torch.view_as_complex(value.contiguous())
    return value


def decoded_sharded_state(optimizer: Any, param: Tensor) -> dict[str, Tensor]:
    """``optimizer.decoded_state`` for a DTensor param: fp32 DTensor moments, no communication."""
    state = optimizer.state.get(param, {})
    if not state:
        return {}
    out: dict[str, Tensor] = {"step": state["step"]}
    for key in MOMENTS:
        value = _decode_local(state, key, param)
        if value is not None:
            out[key] = wrap_like(value, param)
    return out


def has_local_codes(state: dict[str, Any]) -> bool:
    return any(f"{key}_codes" in state for key in MOMENTS)


def present_state_dict(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with the block-wise moments of DTensor params as fp32 DTensors.

    Entries of other params are left alone (the same dict objects torch built). The live
    state is never modified.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = state_dict["state"]
    for index, entry in list(state.items()):
        param = params[index] if isinstance(index, int) and index < len(params) else None
        if param is None or not is_dtensor(param) or not has_local_codes(entry):
            continue
        out = {k: v for k, v in entry.items() if not k.endswith(("_codes", "_absmax"))}
        for key in MOMENTS:
            value = _decode_local(entry, key, param)
            if value is not None:
                out[key] = wrap_like(value, param)
        state[index] = out
    return state_dict


def _local_saved(value: Tensor, param: Tensor) -> Tensor:
    """The local shard of a saved moment: a DTensor is redistributed to the param's layout if
    needed (DCP already loads it so), a full plain tensor is cut to this rank's shard."""
    if is_dtensor(value):
        if tuple(value.placements) != tuple(param.placements):
            value = value.redistribute(param.device_mesh, param.placements)
        return real_view(value.to_local())
    return local_chunk(value, param)


def encode_nearest_(codec: BlockwiseCodec, state: dict[str, Any], key: str, value: Tensor) -> None:
    """Quantise ``value`` into ``state``'s codes with round-to-nearest (deterministic).

    A value decoded from codes of the same block layout gets exactly those codes back.
    """
    codes, absmax = blockwise.quantize(value.reshape(-1), noise=None, **codec._kw(key))
    codes_key, absmax_key = codec.state_keys(key)
    state[codes_key] = codes
    state[absmax_key] = absmax


def adopt_sharded_state(optimizer: Any, param: Tensor, saved: dict[str, Any]) -> None:
    """Rebuild a DTensor param's moments from a saved entry, in the optimizer's format.

    The saved moments are torch-layout tensors (DTensors from DCP, or full tensors from an
    unsharded checkpoint: each rank takes its shard), or local codes of the same format from
    a per-rank ``state_dict``. Block-wise formats re-encode with round-to-nearest, so that
    the codes this rank saved come back bit for bit; float formats are written through the
    codec (exact when the values are representable, as after a save in the same format).
    """
    codec, _ = optimizer.codec_for(param)
    state = optimizer.state[param]
    shape = real_view(local(param)).shape
    dtype = compute_dtype(param)
    for key in MOMENTS:
        source = infer_codec(saved, key)
        for stale in (key, f"{key}_codes", f"{key}_absmax"):
            state.pop(stale, None)
        if source is None:
            continue
        if isinstance(source, BlockwiseCodec):
            if source == codec:
                for k in codec.state_keys(key):
                    state[k] = local(saved[k]).to(local(param).device).clone()
                continue
            value = source.decode(localize_state(saved), key, shape, dtype)
        else:
            value = _local_saved(saved[key], param).to(local(param).device, dtype)
        if isinstance(codec, BlockwiseCodec):
            encode_nearest_(codec, state, key, value)
            continue
        state.update(codec.allocate(param, key))
        # round to nearest: values saved in this format are representable and kept exactly
        real_view(local(state[key])).copy_(value)


def start_sharded_running_max_(codec: Any, state: dict[str, Any], param: Tensor) -> None:
    """AMSGrad switched on mid-run for a DTensor param: the running max starts from v."""
    shape = real_view(local(param)).shape
    v = codec.decode(localize_state(state), "exp_avg_sq", shape, torch.float32)
    state.update(codec.allocate(param, "max_exp_avg_sq"))
    codec.encode_(localize_state(state), "max_exp_avg_sq", v, shard_key(param, 0))
