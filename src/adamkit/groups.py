"""``param_groups``: the standard weight-decay split, with names kept.

Weights of matrices and convolutions (dim >= 2) decay; biases, norm weights and every other
1-d or 0-d param do not; embedding weights (``nn.Embedding``, ``nn.EmbeddingBag``) decay only
with ``decay_embeddings=True``. Frozen params (``requires_grad=False``) are left out.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def _embedding_param_ids(model: nn.Module) -> set[int]:
    ids = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def param_groups(
    model: nn.Module, weight_decay: float, *, decay_embeddings: bool = False
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable params into a decayed and a non-decayed group.

    Returns a list of param-group dicts for ``Adam``/``AdamW`` (or any torch optimizer). Each
    group's ``params`` are ``(name, param)`` pairs, so the optimizer keeps the names under
    ``param_names``. Empty groups are dropped. Tied params appear once, under their first name.

    Example::

        opt = adamkit.AdamW(adamkit.param_groups(model, weight_decay=0.1), lr=3e-4)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    embedding_ids = _embedding_param_ids(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = id(p) in embedding_ids
        wants_decay = p.dim() >= 2 and (decay_embeddings or not is_embedding)
        (decay if wants_decay else no_decay).append((name, p))
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
