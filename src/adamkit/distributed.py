r"""adamkit inside PyTorch's distributed engine: sharded state in and out of checkpoints.

adamkit ships no distributed runtime. Under DDP and ``ZeroRedundancyOptimizer`` params are plain
tensors and nothing here is involved. Under FSDP2 (``fully_shard``) params are DTensors: the
executors step the local shards (:mod:`adamkit.storage.shards`) and the optimizer's state holds

- float formats (``None``, ``"float32"``, ``"bfloat16"``): DTensor moments laid out as the
  param, exactly as ``torch.optim.AdamW`` keeps them under FSDP2;
- block-wise formats (``"int8"``, ``"int4"``): plain local tensors of codes and block scales
  for the local shard (blocks never cross a shard).

``torch.distributed.checkpoint`` (DCP) saves DTensors shard by shard and reshards them on
load; it matches entries by key into a template that the *loading* optimizer's
``state_dict()`` provides. So ``state_dict()`` presents the block-wise moments of a sharded
param in one of two forms, chosen from what does not change with the world size (the param's
shape, its kind of layout and the state format), so that the saving and the loading side
present the same keys:

- **compact** (:func:`compact_layout`): when the layout splits dim 0 only (FSDP2's ``Shard(0)``,
  and ``Replicate``) and one dim-0 slice of the param (a *row*, ``c`` elements of its real
  view) holds whole blocks (``c % block == 0``). Every shard is then a range of whole rows, so
  of whole blocks, on any number of ranks, and the codes and scales of the shards, in rank
  order, are those of the unsharded tensor. They are presented as DTensors laid out as the
  param: the codes (``{key}_codes``, int4: ``{key}_int4_codes``) of shape
  ``(rows, c * bits / 8)`` (uint8) and ``{key}_absmax`` of shape ``(rows, c / block)``
  (float32). DCP reshards them like any row-sharded tensor, and a
  load on any world size takes the codes back unchanged: no requantisation, bitwise.
  Checkpoint bytes per element: ``bits / 8 + 4 / block`` per moment (int8 about 1.02, int4
  about 0.52) instead of 4.
- **decoded** (every other block-wise param: rows that split blocks, 1-d params, column or
  strided shards): ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq`` decoded to float32 DTensors
  with the param's layout, torch's layout. Decoded values lie exactly on code levels and each
  block's largest value decodes to its scale, so round-to-nearest re-encoding on the same
  layout gives back the very same codes and scales: a resume on the same world size is
  bitwise identical. On another layout the blocks differ and the moments are quantised once
  more (within the format's tolerance).

``load_state_dict`` (:func:`adopt_sharded_state`) takes either form, from DTensors or from full
tensors (a gathered checkpoint), and re-encodes whatever is not already this shard's blocks in
this format: where the saved blocks do not start and end on this shard's block boundaries, the
blocks that cover the shard are decoded and the shard re-encoded. A checkpoint whose form
differs from the loading side's template (another state format, a checkpoint of an older
adamkit or of ``torch.optim``) loads with :class:`LoadPlanner`, which fits the template to
the checkpoint.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from adamkit.execution.eager import compute_dtype
from adamkit.storage import blockwise
from adamkit.storage.float import real_view
from adamkit.storage.quantized import BlockwiseCodec
from adamkit.storage.select import BLOCK_SUFFIXES, READABLE, infer_codec, stored_names
from adamkit.storage.select import MOMENT_KEYS as MOMENTS
from adamkit.storage.shards import (
    DTensor,
    is_dtensor,
    local,
    local_chunk,
    localize_state,
    shard_key,
    shard_start,
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
    names = (name for key in MOMENTS for name in stored_names(key) if name.endswith("_codes"))
    return any(name in state for name in names)


# ---------------------------------------------------------------------------------------------
# the compact form: codes and scales as row-sharded DTensors


def _row_elements(param: Tensor) -> int:
    """Elements of the real view in one dim-0 slice (a row) of ``param``."""
    shape = real_view(param).shape
    count = 1
    for size in shape[1:]:
        count *= size
    return count


def _splits_rows_only(param: Tensor) -> bool:
    """Every shard of DTensor ``param`` is a range of whole rows: its placements are
    ``Shard(0)`` (not strided) or ``Replicate``."""
    for placement in param.placements:
        if placement.is_replicate():
            continue
        if type(placement).__name__ != "Shard" or placement.dim != 0:
            return False
    return True


def compact_layout(param: Tensor, codec: Any) -> tuple[int, int] | None:
    """(code bytes, block scales) per row when the block-wise moments of DTensor ``param`` in
    ``codec`` are checkpointed compact, else None (see the module docstring).

    A function of the param's shape, its kind of layout and the codec only, never of the
    number of ranks: a checkpoint and the template that loads it agree on the form.
    """
    if not (is_dtensor(param) and isinstance(codec, BlockwiseCodec)) or param.dim() == 0:
        return None
    row = _row_elements(param)
    if row == 0 or row % codec.block or not _splits_rows_only(param):
        return None
    return row * codec.bits // 8, row // codec.block


def _rows_dtensor(flat_local: Tensor, like: Tensor, per_row: int) -> Tensor:
    """Local ``flat_local`` (``per_row`` values per local row of ``like``) as a DTensor of
    shape (rows, per_row) laid out as ``like``: no copy, no communication."""
    rows = local(like).shape[0]
    if flat_local.numel() != rows * per_row:  # every rank must present the same keys: no fallback
        raise RuntimeError(
            f"local codes of {flat_local.numel()} values do not fill {rows} rows of {per_row}"
        )
    return DTensor.from_local(
        flat_local.view(rows, per_row),
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=(like.shape[0], per_row),
        stride=(per_row, 1),
    )


def _compact_entry(entry: dict[str, Any], param: Tensor) -> dict[str, Any] | None:
    """``entry`` with every block-wise moment as row-sharded codes and scales, or None when
    :func:`compact_layout` rules one of them out (the entry is then presented decoded)."""
    out = dict(entry)
    local_entry = localize_state(entry)
    for key in MOMENTS:
        codec = infer_codec(local_entry, key)
        if codec is None or not isinstance(codec, BlockwiseCodec):
            continue
        layout = compact_layout(param, codec)
        if layout is None:
            return None
        for name, per_row in zip(codec.state_keys(key), layout):
            out[name] = _rows_dtensor(local_entry[name].reshape(-1), param, per_row)
    return out


def present_state_dict(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with the block-wise moments of DTensor params as DTensors: compact
    (codes and scales, sharing the live state's storage) where :func:`compact_layout` allows,
    else decoded to fp32.

    Entries of other params are left alone (the same dict objects torch built). The live
    state is never modified here (DCP's load writes into compact templates in place, as it
    writes into torch's float moments; ``load_state_dict`` follows).
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = state_dict["state"]
    for index, entry in list(state.items()):
        param = params[index] if isinstance(index, int) and index < len(params) else None
        if param is None or not is_dtensor(param) or not has_local_codes(entry):
            continue
        compact = _compact_entry(entry, param)
        if compact is not None:
            state[index] = compact
            continue
        out = {k: v for k, v in entry.items() if not k.endswith(("_codes", "_absmax"))}
        for key in MOMENTS:
            value = _decode_local(entry, key, param)
            if value is not None:
                out[key] = wrap_like(value, param)
        state[index] = out
    return state_dict


# ---------------------------------------------------------------------------------------------
# loading: either form, DTensor or full, into this shard's format


def flatten_blocks(entry: dict[str, Any]) -> dict[str, Any]:
    """A saved state entry with plain codes and scales flat, as the codecs keep them.

    A gathered compact checkpoint (``dcp_to_torch_save``, ``full_state_dict``) holds them
    row-shaped, ``(rows, bytes per row)`` and ``(rows, blocks per row)``; in row-major order
    they are the unsharded tensor's codes and scales. DTensors are left as they are.
    """
    return {
        k: v.reshape(-1)
        if k.endswith(("_codes", "_absmax")) and isinstance(v, Tensor) and not is_dtensor(v)
        else v
        for k, v in entry.items()
    }


def _local_saved(value: Tensor, param: Tensor) -> Tensor:
    """The local shard of a saved moment: a DTensor is redistributed to the param's layout if
    needed (DCP already loads it so), a full plain tensor is cut to this rank's shard."""
    if is_dtensor(value):
        if tuple(value.placements) != tuple(param.placements):
            value = value.redistribute(param.device_mesh, param.placements)
        return real_view(value.to_local())
    return local_chunk(value, param)


def _saved_blocks(
    source: BlockwiseCodec, saved: dict[str, Any], key: str, param: Tensor
) -> tuple[dict[str, Tensor] | None, Tensor | None]:
    """This shard's part of saved block-wise moment ``key``: ``(codes, None)``, flat codes and
    scales of exactly the shard's blocks, or ``(None, values)``, the shard's values decoded
    from the saved blocks that cover it (fp32, the local real shape).

    Saved codes are row-sharded DTensors (a compact checkpoint), full tensors (flat, or
    ``(rows, bytes per row)`` from a gathered compact checkpoint) or this shard's own codes.
    """
    codes_key, absmax_key = source.state_keys(key)
    codes, absmax = saved[codes_key], saved[absmax_key]
    real = real_view(local(param))
    n_local = real.numel()
    if is_dtensor(codes):  # row-sharded as the param: this rank's rows are its blocks
        codes, absmax = (_local_rows(t, param).reshape(-1) for t in (codes, absmax))
        return {codes_key: codes, absmax_key: absmax}, None
    codes, absmax = codes.reshape(-1), absmax.reshape(-1)
    n_full = param.numel() * (2 if param.is_complex() else 1)
    block, per_block = source.block, source.block * source.bits // 8
    full = codes.numel() == blockwise.code_bytes(n_full, block, source.bits)
    if not full or absmax.numel() != blockwise.num_blocks(n_full, block):
        if absmax.numel() != blockwise.num_blocks(n_local, block):
            raise ValueError(
                f"saved {key} codes for {absmax.numel()} blocks fit neither the full param "
                f"({n_full} elements) nor this rank's shard ({n_local} elements)"
            )
        return {codes_key: codes, absmax_key: absmax}, None  # this shard's own codes
    kw = source._kw(key)
    start = shard_start(param)
    if not isinstance(start, int):  # not a contiguous range: decode the whole tensor
        values = blockwise.dequantize(codes, absmax, n_full, **kw)
        full_shape = (*param.shape, 2) if param.is_complex() else tuple(param.shape)
        return None, local_chunk(values.view(full_shape), param)
    first, last = start // block, blockwise.num_blocks(start + n_local, block)
    codes = codes[first * per_block : last * per_block]
    absmax = absmax[first:last]
    ends_on_block = n_local % block == 0 or start + n_local == n_full
    if start % block == 0 and ends_on_block:
        return {codes_key: codes, absmax_key: absmax}, None
    values = blockwise.dequantize(codes, absmax, (last - first) * block, **kw)
    offset = start - first * block
    return None, values[offset : offset + n_local].view(real.shape)


def _local_rows(value: Tensor, param: Tensor) -> Tensor:
    """The local rows of a row-sharded DTensor ``value``, laid out as ``param``."""
    if tuple(value.placements) != tuple(param.placements):
        value = value.redistribute(param.device_mesh, param.placements)
    return value.to_local()


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

    The saved moments are float tensors in torch's layout (DTensors from DCP, or full tensors
    from an unsharded checkpoint: each rank takes its shard), or block-wise codes and scales
    (compact DTensors from DCP, full codes of a gathered checkpoint, or this shard's own
    codes; see :func:`_saved_blocks`). Codes of exactly this shard's blocks in this format are
    taken back bit for bit; anything else is decoded and re-encoded, block-wise formats with
    round-to-nearest (so that moments decoded from codes of the same blocks get those codes
    back), float formats through the codec (exact when the values are representable, as after
    a save in the same format).
    """
    codec, _ = optimizer.codec_for(param)
    state = optimizer.state[param]
    shape = real_view(local(param)).shape
    dtype = compute_dtype(param)
    device = local(param).device
    for key in MOMENTS:
        source = infer_codec(saved, key)
        for stale in stored_names(key):
            state.pop(stale, None)
        if source is None:
            continue
        if isinstance(source, BlockwiseCodec):
            blocks, value = _saved_blocks(source, saved, key, param)
            same = isinstance(codec, BlockwiseCodec) and codec.same_levels(source)
            if blocks is not None and same:
                state.update(codec.adopt(source, blocks, key, device))
                continue
            if blocks is not None:
                value = source.decode(blocks, key, shape, dtype)
            value = value.to(device, dtype)
        else:
            value = _local_saved(saved[key], param).to(device, dtype)
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


# ---------------------------------------------------------------------------------------------
# loading a checkpoint whose form differs from the template

try:  # torch.distributed may be missing from a build
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
except ImportError:  # pragma: no cover
    DefaultLoadPlanner = object

_MOMENT_FQN = re.compile(
    r"^(?P<base>.+)\.(?P<key>"
    + "|".join(MOMENTS)
    + ")("
    + "|".join(map(re.escape, BLOCK_SUFFIXES))
    + ")?$"
)


class LoadPlanner(DefaultLoadPlanner):
    """``torch.distributed.checkpoint.load`` planner that fits adamkit's moment templates to the
    checkpoint: ``dcp.load(state, checkpoint_id=..., planner=adamkit.distributed.LoadPlanner())``.

    DCP loads by key into the template the loading optimizer presents. When a param's moment
    is saved in another form than the template asks for (compact codes and scales, or decoded
    float moments: another state format, a checkpoint of ``torch.optim`` or of an adamkit that
    saved everything decoded), the template entries are replaced by empty ones of the saved
    form, laid out as the param (row-sharded) where the layout allows, else full; the
    optimizer's ``load_state_dict`` then decodes and re-encodes. Entries whose form matches are
    left alone, so that with matching forms this is :class:`DefaultLoadPlanner`. Only entries
    of optimizer state (dicts with a ``step``) are touched.
    """

    def set_up_planner(self, state_dict: Any, metadata: Any = None, is_coordinator=False):
        super().set_up_planner(state_dict, metadata, is_coordinator)
        if metadata is not None and self.flatten_state_dict:
            self._fit_moments(metadata.state_dict_metadata)

    def _fit_moments(self, saved: dict[str, Any]) -> None:
        moments = {}
        for fqn in list(self.state_dict):
            match = _MOMENT_FQN.match(fqn)
            if match and "step" in self._parent(fqn):
                moments.setdefault((match["base"], match["key"]), []).append(fqn)
        for (base, key), names in moments.items():
            compact = [list(c.state_keys(f"{base}.{key}")) for c in READABLE]
            compact = [pair for pair in compact if all(n in saved for n in pair)]
            if compact:
                want = compact[0]
            elif f"{base}.{key}" in saved:
                want = [f"{base}.{key}"]
            else:
                continue  # missing from the checkpoint: DCP reports it (or leaves it)
            fits = sorted(names) == sorted(want) and all(
                tuple(self.state_dict[n].size()) == tuple(saved[n].size) for n in want
            )
            if fits:
                continue
            like = self.state_dict[names[0]]
            parent, path = self._parent(names[0]), self.mappings[names[0]][:-1]
            for name in names:
                del parent[self.mappings.pop(name)[-1]]
                del self.state_dict[name]
            for name in want:
                value = _empty_like_saved(saved[name], like)
                leaf = name[len(base) + 1 :]
                parent[leaf] = self.state_dict[name] = value
                self.mappings[name] = (*path, leaf)

    def _parent(self, fqn: str) -> dict[str, Any]:
        node = self.original_state_dict
        for step in self.mappings[fqn][:-1]:
            node = node[step]
        return node


def _empty_like_saved(meta: Any, like: Tensor) -> Tensor:
    """Zeros of a saved tensor's size and dtype (DCP ``TensorStorageMetadata``), laid out as
    template ``like`` (a row-sharded DTensor) when both split the same rows, else full."""
    size, dtype = tuple(meta.size), meta.properties.dtype
    device = local(like).device
    rows_only = is_dtensor(like) and _splits_rows_only(like)
    if not (rows_only and len(size) > 0 and like.shape[0] == size[0]):
        return torch.zeros(size, dtype=dtype, device=device)
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # pragma: no cover - torch 2.4
        from torch.distributed._tensor._utils import compute_local_shape_and_global_offset
    local_shape, _ = compute_local_shape_and_global_offset(size, like.device_mesh, like.placements)
    stride, acc = [], 1
    for n in reversed(size):
        stride.append(acc)
        acc *= n
    return DTensor.from_local(
        torch.zeros(local_shape, dtype=dtype, device=device),
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=size,
        stride=tuple(reversed(stride)),
    )
