"""Training quality with lean state and bf16 params: final loss against fp32, 3 seeds (issue 5)."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import pytest
import torch
from torch import Tensor, nn

import adamkit

SEEDS = (0, 1, 2)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models: one thread is fastest, and on a shared 2-core machine two threads that
    wait for each other make these runs 10-30x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# How params are stored and written back: (dtype, stochastic_rounding).
PARAMS = {
    "float32": (torch.float32, False),
    "bfloat16+sr": (torch.bfloat16, True),
    "bfloat16": (torch.bfloat16, False),
}


def _stored_params(model: nn.Module, params: str) -> tuple[list[Tensor], Callable[..., Tensor]]:
    """``model``'s params as leaf tensors stored as ``PARAMS[params]`` says, and ``model``'s
    forward computed in fp32 from them (``torch.func.functional_call``).

    Runs that differ in ``params`` differ in how the params are stored and written back (and
    in the gradients, which arrive in the params' dtype), not in the arithmetic of forward and
    backward. With fp32 params the leaves alias the model's own and the losses are bitwise
    those of calling ``model`` directly.
    """
    dtype, _ = PARAMS[params]
    names = [name for name, _ in model.named_parameters()]
    leaves = [p.detach().to(dtype).requires_grad_() for p in model.parameters()]

    def forward(*args: Tensor) -> Tensor:
        values = {name: p.float() for name, p in zip(names, leaves, strict=True)}
        return torch.func.functional_call(model, values, args)

    return leaves, forward


@cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:1500] / 16.0, dtype=torch.float32), torch.tensor(y[:1500])


def _train_digits(
    seed: int, state_dtype: str | None, params: str = "float32", steps: int = 300, lr: float = 3e-3
) -> float:
    """An MLP on digits with a cosine lr decay to 0; returns the final full-batch train loss."""
    x, y = _digits()
    torch.manual_seed(seed)
    leaves, model = _stored_params(
        nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), params
    )
    opt = adamkit.AdamW(
        leaves,
        lr=lr,
        weight_decay=0.01,
        state_dtype=state_dtype,
        min_quantized_size=0,
        stochastic_rounding=PARAMS[params][1],
        seed=seed,
    )
    gen = torch.Generator().manual_seed(seed)
    for s in range(steps):
        opt.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * s / steps))
        idx = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y).item()


@cache
def _mean_loss(state_dtype: str | None, params: str = "float32") -> float:
    return sum(_train_digits(s, state_dtype, params) for s in SEEDS) / len(SEEDS)


@pytest.mark.parametrize(
    ("state_dtype", "tolerance"), [("bfloat16", 0.01), ("int8", 0.01), ("int4", 0.03)]
)
def test_digits_mlp_final_loss_close_to_fp32_state(state_dtype, tolerance) -> None:
    fp32, lean = _mean_loss("float32"), _mean_loss(state_dtype)
    assert abs(lean - fp32) <= tolerance * fp32, (state_dtype, lean, fp32)


@cache
def _text() -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))[:200_000]
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([lookup[c] for c in text])


class _CharModel(nn.Module):
    """A one-layer decoder-only transformer (causal self-attention + MLP)."""

    def __init__(self, vocab: int, d: int = 48, context: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        self.block = nn.TransformerEncoderLayer(
            d, nhead=4, dim_feedforward=4 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx) + self.pos[: idx.shape[1]]
        return self.head(self.block(h, src_mask=self.mask, is_causal=True))


def _train_chars(
    seed: int, state_dtype: str | None, params: str = "float32", steps: int = 150
) -> float:
    data = _text()
    vocab = int(data.max()) + 1
    torch.manual_seed(seed)
    leaves, model = _stored_params(_CharModel(vocab), params)
    opt = adamkit.AdamW(
        leaves,
        lr=3e-3,
        weight_decay=0.1,
        state_dtype=state_dtype,
        min_quantized_size=0,
        stochastic_rounding=PARAMS[params][1],
        seed=seed,
    )
    sched = adamkit.Scheduler(opt, adamkit.schedules.warmup_cosine(15, steps))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 33, (16,), generator=gen)
        batch = torch.stack([data[s : s + 33] for s in starts])
        opt.zero_grad()
        logits = model(batch[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1)).backward()
        opt.step()
        sched.step()
    eval_gen = torch.Generator().manual_seed(1234)
    starts = torch.randint(0, len(data) - 33, (64,), generator=eval_gen)
    batch = torch.stack([data[s : s + 33] for s in starts])
    with torch.no_grad():
        logits = model(batch[:, :-1])
        return nn.functional.cross_entropy(
            logits.reshape(-1, vocab), batch[:, 1:].reshape(-1)
        ).item()


@cache
def _mean_char_loss(state_dtype: str | None, params: str = "float32") -> float:
    return sum(_train_chars(s, state_dtype, params) for s in SEEDS) / len(SEEDS)


@pytest.mark.parametrize(
    ("state_dtype", "tolerance"), [("bfloat16", 0.01), ("int8", 0.01), ("int4", 0.03)]
)
def test_char_transformer_final_loss_close_to_fp32_state(state_dtype, tolerance) -> None:
    fp32, lean = _mean_char_loss("float32"), _mean_char_loss(state_dtype)
    assert abs(lean - fp32) <= tolerance * fp32, (state_dtype, lean, fp32)


@pytest.mark.parametrize(
    ("mean_loss", "worse_by"),
    [(_mean_loss, 0.10), (_mean_char_loss, 0.003)],
    ids=["digits-mlp", "char-transformer"],
)
def test_bf16_params_with_stochastic_rounding_match_fp32_params(mean_loss, worse_by) -> None:
    """bf16 params + SR within 2% of fp32 params; plain bf16 params worse by ``worse_by``.

    Same lr, schedule and seeds as the state tests above, fp32 state, forward in fp32 from the
    stored params (see :func:`_stored_params`). No smaller lr is needed to make plain bf16
    stall: as the cosine takes the lr to 0, more and more updates fall below half an ulp
    (more than 2^-9 |w|) and round away; decoupled weight decay alone (lr * wd * |w|, at most
    3e-4 |w|) always does. Weights left unchanged by a step with plain bf16, seed 0, per quarter
    of the run: digits 23%, 45%, 81%, 97%; char transformer 20%, 35%, 55%, 88%.

    Measured, seeds 0..5 (paired: same init and batches): SR within -0.72%..+0.30% of fp32 per
    seed on digits, -0.02%..+0.04% on the transformer; plain bf16 +22.5%..+25.4% and
    +0.57%..+0.80%. ``worse_by`` is under half the smallest gap: 10% and 0.3%.
    """
    fp32 = mean_loss("float32")
    sr = mean_loss("float32", "bfloat16+sr")
    plain = mean_loss("float32", "bfloat16")
    assert abs(sr - fp32) <= 0.02 * fp32, (sr, fp32)
    assert plain >= (1 + worse_by) * fp32, (plain, fp32)
