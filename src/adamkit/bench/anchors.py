"""Optional low-bit anchors for ``adamkit bench``: bitsandbytes' and torchao's 8-/4-bit AdamW.

Neither package is a dependency of adamkit. An anchor whose package does not import, or whose
optimizer fails on the benchmark's device, is skipped with the reason (:class:`Unavailable`),
and the benchmark says so in a note instead of failing.

Both packages decide for themselves which tensors to quantise (bitsandbytes and torchao keep
tensors of fewer than 4096 elements in fp32; torchao also any tensor whose size is not a
multiple of its block), so :func:`state_formats` reads back what each state tensor actually is
and :func:`state_bytes` counts the bytes actually allocated, inner tensors of torchao's tensor
subclasses included.
"""

from __future__ import annotations

import importlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


class Unavailable(RuntimeError):
    """An anchor cannot run here; the message says why."""


@dataclass(frozen=True)
class Anchor:
    label: str  # the row's name in the table
    short: str  # the name in the "vs low-bit" column
    module: str
    attr: str  # the optimizer class in ``module``
    bits: int  # 8 or 4: compared with adamkit's int8 or int4 rows
    moment_key: str  # the state entry that holds the (quantised) first moment


ANCHORS = {
    "bnb-adamw8bit": Anchor(
        "bitsandbytes AdamW8bit", "bnb", "bitsandbytes.optim", "AdamW8bit", 8, "state1"
    ),
    "torchao-adamw8bit": Anchor(
        "torchao AdamW8bit", "torchao", "torchao.optim", "AdamW8bit", 8, "exp_avg"
    ),
    "torchao-adamw4bit": Anchor(
        "torchao AdamW4bit", "torchao", "torchao.optim", "AdamW4bit", 4, "exp_avg"
    ),
}
PACKAGES = {"bnb": ("bnb-adamw8bit",), "torchao": ("torchao-adamw8bit", "torchao-adamw4bit")}
"""``--anchors`` names and the anchor rows each adds."""

LOW_BIT = {"int8": 8, "int4": 4}
"""adamkit state dtypes compared with an anchor of the same number of bits."""


def optimizer_class(name: str) -> Callable[..., torch.optim.Optimizer]:
    """The anchor's optimizer class; :class:`Unavailable` if its package does not import.

    Both packages log warnings at import about native libraries this machine lacks (CUDA
    kernels); those are silenced for the import only.
    """
    anchor = ANCHORS[name]
    logging.disable(logging.WARNING)
    try:
        module = importlib.import_module(anchor.module)
    except Exception as e:  # noqa: BLE001 - any import failure means "not here"
        raise Unavailable(f"{anchor.module} does not import: {type(e).__name__}: {e}") from e
    finally:
        logging.disable(logging.NOTSET)
    try:
        return getattr(module, anchor.attr)
    except AttributeError as e:
        raise Unavailable(f"{anchor.module} has no {anchor.attr}") from e


def make_optimizer(name: str, params: list[Tensor], **kw) -> torch.optim.Optimizer:
    return optimizer_class(name)(params, **kw)


def _tensor_bytes(t: Tensor) -> int:
    if type(t) not in (Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()  # a tensor subclass: count what it holds
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state, as allocated."""
    return sum(
        _tensor_bytes(v)
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, Tensor)
    )


def quantised_format(name: str) -> str:
    """What :func:`state_formats` calls a tensor the anchor did quantise."""
    return f"{ANCHORS[name].bits}-bit"


def state_formats(name: str, optimizer: torch.optim.Optimizer) -> Counter:
    """How many params the anchor keeps in each format (``8-bit``, ``4-bit``, ``float32``)."""
    key = ANCHORS[name].moment_key
    formats: Counter = Counter()
    for group in optimizer.param_groups:
        for p in group["params"]:
            m = optimizer.state.get(p, {}).get(key)
            if m is None:
                formats["no state"] += 1
            elif type(m) is not Tensor:  # torchao's OptimState8bit / OptimState4bit
                formats[quantised_format(name)] += 1
            elif m.dtype in (torch.uint8, torch.int8):  # bitsandbytes' codes
                formats[quantised_format(name)] += 1
            else:
                formats[str(m.dtype).removeprefix("torch.")] += 1
    return formats
