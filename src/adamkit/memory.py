"""``memory_report`` and ``export_state_dict``: what the optimizer state costs, and a torch copy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from adamkit.hparams import check_optimizer
from adamkit.storage.shards import local


@dataclass(frozen=True)
class TensorMemory:
    """One param's state: its format, why, and the bytes actually allocated."""

    name: str
    group: int
    shape: tuple[int, ...]
    numel: int
    format: str
    reason: str
    state_bytes: int

    @property
    def bytes_per_param(self) -> float:
        return self.state_bytes / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class MemoryReport:
    """Bytes of optimizer state per parameter, overall, per group and per tensor.

    Counted from the tensors actually allocated (moments, codes, scales; the 0-d step counter
    too). Params without state yet (no gradient seen) count their parameters but no bytes.
    """

    tensors: list[TensorMemory] = field(default_factory=list)

    @property
    def state_bytes(self) -> int:
        return sum(t.state_bytes for t in self.tensors)

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def bytes_per_param(self) -> float:
        return self.state_bytes / self.numel if self.numel else 0.0

    def groups(self) -> dict[int, dict[str, float]]:
        out: dict[int, dict[str, float]] = {}
        for t in self.tensors:
            g = out.setdefault(t.group, {"numel": 0, "state_bytes": 0})
            g["numel"] += t.numel
            g["state_bytes"] += t.state_bytes
        for g in out.values():
            g["bytes_per_param"] = g["state_bytes"] / g["numel"] if g["numel"] else 0.0
        return out

    def __str__(self) -> str:
        lines = [
            f"optimizer state: {self.state_bytes:,} bytes for {self.numel:,} params "
            f"= {self.bytes_per_param:.3f} B/param"
        ]
        for gi, g in self.groups().items():
            lines.append(f"  group {gi}: {g['numel']:,} params, {g['bytes_per_param']:.3f} B/param")
        for t in self.tensors:
            lines.append(
                f"  {t.name:40s} {str(t.shape):18s} {t.format:12s} "
                f"{t.bytes_per_param:6.3f} B/param  ({t.reason})"
            )
        return "\n".join(lines)


def _nbytes(value: Any) -> int:
    value = local(value) if isinstance(value, Tensor) else value
    return value.numel() * value.element_size() if isinstance(value, Tensor) else 0


def memory_report(optimizer: torch.optim.Optimizer) -> MemoryReport:
    """Report the state memory of an adamkit (or any torch) optimizer, per tensor and format.

    Under FSDP2 (DTensor params) the report is this rank's: local shards and their state.
    """
    check_optimizer(optimizer)
    rows = []
    for gi, group in enumerate(optimizer.param_groups):
        names = group.get("param_names")
        for pi, p in enumerate(group["params"]):
            state = optimizer.state.get(p, {})
            if hasattr(optimizer, "codec_for"):
                codec, reason = optimizer.codec_for(p, group)
                fmt = codec.name if codec.name != "param dtype" else str(p.dtype).split(".")[-1]
            else:
                fmt, reason = "torch", "torch.optim layout"
            if not state:
                reason = "no state yet (no gradient seen)"
            name = names[pi] if names else f"group{gi}.param{pi}"
            rows.append(
                TensorMemory(
                    name=name,
                    group=gi,
                    shape=tuple(local(p).shape),
                    numel=local(p).numel(),
                    format=fmt,
                    reason=reason,
                    state_bytes=sum(_nbytes(v) for v in state.values()),
                )
            )
    return MemoryReport(rows)


def export_state_dict(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A torch-layout state_dict with fp32 moments, loadable by ``torch.optim.AdamW``.

    Compact formats (bf16, int8, int4) are decoded; 'step' is kept; adamkit's extra group keys
    are dropped so that the result is what torch itself would save. An optimizer that is not
    adamkit's (``torch.optim.AdamW`` itself) gives its own state, copied.
    """
    check_optimizer(optimizer)
    sd = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    decoded_state = getattr(optimizer, "decoded_state", None)
    state = {}
    for index, entry in sd["state"].items():
        if decoded_state is None:  # not adamkit's (torch's own): its layout already
            state[index] = {k: v.clone() if isinstance(v, Tensor) else v for k, v in entry.items()}
        else:
            state[index] = {k: v.clone() for k, v in decoded_state(params[index]).items()}
    torch_keys = (
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "amsgrad",
        "maximize",
        "params",
        "param_names",
        "initial_lr",
        "foreach",
        "capturable",
        "differentiable",
        "fused",
        "decoupled_weight_decay",
    )
    groups = [{k: v for k, v in g.items() if k in torch_keys} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}
