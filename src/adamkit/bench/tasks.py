r"""The tasks of ``adamkit compare``: each one data set, model, loss, metric and step budget.

A :class:`Task` says what is measured; ``task.build(seed, full_batch=..., quick=...)`` returns a
fresh :class:`Problem`: the params (initialised from ``seed``), the training loss of step ``s``
(minibatches drawn in an order fixed by ``seed``), the full training objective, and the held-out
evaluation. Data splits never depend on the seed. Everything ships offline: scikit-learn's
digits and Python's own ``pydoc_data.topics`` text.

- ``digits-logreg``: L2-regularised multinomial logistic regression on the 8x8 digits (Kingma &
  Ba 2015, Fig. 1, on MNIST there).
- ``digits-mlp``: two hidden layers of 128 ReLU units with dropout (their Fig. 2a; 1000 units
  on MNIST there).
- ``char-transformer``: a 2-layer decoder-only transformer (d_model 64, 4 heads, context 32)
  predicting the next character, lr on warmup (10% of the steps) + cosine to 0.1.
- ``amsgrad-counterexample``: Reddi et al. (2018)'s online problem on ``[-1, 1]``:
  ``f_t(x) = 3x`` when ``t mod 3 == 1`` else ``-x``; Adam with betas ``(0, 0.1)`` goes to the
  worst point ``+1``, AMSGrad to the optimum ``-1``.
- ``rosenbrock``: ``(1 - x)^2 + 100 (y - x^2)^2`` from ``(-1.2, 1)``; minimum 0 at ``(1, 1)``.
- ``decoupling-grid`` (opt-in, :data:`DECOUPLING_GRID`): lr x weight decay of AdamW and
  Adam + L2 on ``digits-mlp`` (Loshchilov & Hutter 2019, Fig. 2).

Units: losses are natural-log cross-entropies (nats) except where a task says otherwise; the
transformer's held-out metric is bits per character.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# -------------------------------------------------------------------------------------------
# what a task is


@dataclass(frozen=True)
class Budget:
    """Optimizer steps of one run, and how often (in steps) the training objective is logged."""

    steps: int
    eval_every: int


@dataclass
class Problem:
    """One freshly initialised instance of a task, ready to be optimised.

    ``loss(step)`` is the training loss of the 0-based ``step`` (a minibatch, or the whole
    training set with ``full_batch=True``), in training mode (dropout on). ``objective()`` is the
    full training objective in evaluation mode, ``heldout(split)`` evaluates ``"val"`` (used to
    pick the lr) or ``"test"`` (reported) and returns ``{"loss": ..., <task.metric>: ...}``.
    ``project_()`` runs after every optimizer step (the counterexample's clamp to ``[-1, 1]``);
    ``probe()`` returns extra values logged with the curve (positions on the 2-D problems).
    """

    params: list[tuple[str, Tensor]]
    loss: Callable[[int], Tensor]
    objective: Callable[[], float]
    heldout: Callable[[str], dict[str, float]]
    project_: Callable[[], None] | None = None
    probe: Callable[[], dict[str, float]] | None = None


@dataclass(frozen=True)
class Task:
    """A benchmark task: how to build it, its budget, its lr sweep and what it reports.

    ``base_lr`` maps an optimizer family (``"adam"``, ``"sgd"``, ``"momentum"``, ``"rmsprop"``,
    ``"adagrad"``) to the middle of its lr sweep. ``target_loss`` is the training objective at
    which "steps to target" and "seconds to target" are read. A task that is not ``stochastic``
    gives the same result for every seed, so it runs one. ``full_batch=False`` means full-batch
    gradient descent does not apply (an online problem, or data too large for one batch).
    ``schedule`` is the lr schedule every optimizer follows (``"constant"`` or
    ``"warmup_cosine"``); ``ablation`` lists extra schedules run for Adam and AdamW only.
    ``adam_betas`` overrides the betas of the Adam family (the counterexample needs (0, 0.1)).
    """

    name: str
    summary: str
    source: str
    build: Callable[..., Problem]
    default: Budget
    quick: Budget
    base_lr: Mapping[str, float]
    metric: str
    higher_is_better: bool
    target_loss: float
    stochastic: bool = True
    full_batch: bool = True
    schedule: str = "constant"
    ablation: tuple[str, ...] = ()
    adam_betas: tuple[float, float] | None = None

    def budget(self, quick: bool) -> Budget:
        return self.quick if quick else self.default


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Evaluation mode and no grad inside, the previous mode restored after."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def batch_indices(n: int, batch_size: int, seed: int) -> Callable[[int], Tensor]:
    """Minibatch ``step -> indices``: epochs of random permutations of ``range(n)`` in an order
    fixed by ``seed`` (independent of the optimizer and the lr, so every run sees the same data)."""
    gen = torch.Generator().manual_seed(seed)
    stream: list[Tensor] = []
    filled = 0

    def indices(step: int) -> Tensor:
        nonlocal filled
        start, stop = step * batch_size, (step + 1) * batch_size
        while filled < stop:
            stream.append(torch.randperm(n, generator=gen))
            filled += n
        return torch.cat(stream)[start:stop] if len(stream) > 1 else stream[0][start:stop]

    return indices


# -------------------------------------------------------------------------------------------
# data: scikit-learn's digits, split once (train 1197 / val 300 / test 300)


@dataclass(frozen=True)
class Digits:
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


@functools.lru_cache(maxsize=1)
def load_digits_splits() -> Digits:
    """The 1797 digits, shuffled once with a fixed seed, standardised with train statistics."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.data.astype(np.float32) / 16.0
    y = data.target.astype(np.int64)
    order = np.random.default_rng(20150101).permutation(len(y))
    x, y = x[order], y[order]
    n_val = n_test = 300
    n_train = len(y) - n_val - n_test
    mean = x[:n_train].mean(axis=0)
    std = x[:n_train].std(axis=0)
    x = (x - mean) / np.where(std > 0, std, 1.0)
    t = torch.from_numpy
    return Digits(
        t(x[:n_train]).clone(),
        t(y[:n_train]).clone(),
        t(x[n_train : n_train + n_val]).clone(),
        t(y[n_train : n_train + n_val]).clone(),
        t(x[n_train + n_val :]).clone(),
        t(y[n_train + n_val :]).clone(),
    )


def _classifier_problem(
    model: nn.Module,
    seed: int,
    full_batch: bool,
    batch_size: int,
    device: str,
    penalty: Callable[[], Tensor] | None = None,
) -> Problem:
    """Cross-entropy (+ ``penalty``) on digits, accuracy on the held-out splits."""
    d = load_digits_splits()
    d = Digits(*(getattr(d, f).to(device) for f in d.__dataclass_fields__))
    model.to(device)
    next_batch = batch_indices(len(d.y_train), batch_size, seed)

    def regularised(logits: Tensor, y: Tensor) -> Tensor:
        ce = F.cross_entropy(logits, y)
        return ce if penalty is None else ce + penalty()

    def loss(step: int) -> Tensor:
        model.train()
        if full_batch:
            return regularised(model(d.x_train), d.y_train)
        idx = next_batch(step).to(device)
        return regularised(model(d.x_train[idx]), d.y_train[idx])

    def objective() -> float:
        with evaluating(model):
            return float(regularised(model(d.x_train), d.y_train))

    def heldout(split: str) -> dict[str, float]:
        x, y = (d.x_val, d.y_val) if split == "val" else (d.x_test, d.y_test)
        with evaluating(model):
            logits = model(x)
            return {
                "loss": float(F.cross_entropy(logits, y)),
                "accuracy": float((logits.argmax(dim=1) == y).float().mean()),
            }

    return Problem(list(model.named_parameters()), loss, objective, heldout)


# -------------------------------------------------------------------------------------------
# digits-logreg and digits-mlp

LOGREG_L2 = 1e-3  # the objective adds LOGREG_L2 / 2 * ||W||^2 (the bias is not penalised)


def build_digits_logreg(
    seed: int, *, full_batch: bool = False, quick: bool = False, device: str = "cpu"
) -> Problem:
    """Multinomial logistic regression 64 -> 10 with an L2 penalty, minibatches of 64."""
    torch.manual_seed(seed)
    model = nn.Linear(64, 10)

    def penalty() -> Tensor:
        return 0.5 * LOGREG_L2 * model.weight.square().sum()

    return _classifier_problem(model, seed, full_batch, 64, device, penalty)


def make_mlp(hidden: int = 128, dropout: float = 0.25) -> nn.Module:
    """64 -> hidden -> hidden -> 10, ReLU, dropout after each hidden layer."""
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, 10),
    )


def build_digits_mlp(
    seed: int, *, full_batch: bool = False, quick: bool = False, device: str = "cpu"
) -> Problem:
    """The two-hidden-layer MLP with dropout, minibatches of 64."""
    torch.manual_seed(seed)
    return _classifier_problem(make_mlp(), seed, full_batch, 64, device)


# -------------------------------------------------------------------------------------------
# char-transformer on pydoc_data.topics


@dataclass(frozen=True)
class Corpus:
    """Characters encoded as ints; train is the first 90% of the text, val and test 5% each."""

    vocab: str
    train: Tensor
    val: Tensor
    test: Tensor


@functools.lru_cache(maxsize=1)
def load_corpus() -> Corpus:
    """Python's own help texts (``pydoc_data.topics``, about 465k characters), in key order."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[key] for key in sorted(topics))
    vocab = "".join(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(vocab)}
    codes = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    n = len(codes)
    a, b = int(0.9 * n), int(0.95 * n)
    return Corpus(vocab, codes[:a], codes[a:b], codes[b:])


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    """Token + learned position embeddings, ``n_layers`` blocks, a final norm and a linear head."""

    def __init__(self, vocab: int, d_model: int, n_layers: int, n_heads: int, context: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


@dataclass(frozen=True)
class TransformerSize:
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    context: int = 32
    batch_size: int = 4  # small batches: more steps for the same CPU time
    eval_windows: int = 64  # fixed windows per split for objective() and heldout()


TRANSFORMER_SIZE = TransformerSize()
TRANSFORMER_QUICK = TransformerSize(d_model=32, n_layers=1, eval_windows=32)


def _windows(codes: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    offsets = torch.arange(context)
    x = codes[starts[:, None] + offsets]
    y = codes[starts[:, None] + offsets + 1]
    return x, y


def _fixed_starts(codes: Tensor, count: int, context: int) -> Tensor:
    """``count`` evenly spaced window starts (the same in every run)."""
    return torch.linspace(0, len(codes) - context - 2, count).long()


def build_char_transformer(
    seed: int, *, full_batch: bool = False, quick: bool = False, device: str = "cpu"
) -> Problem:
    """Next-character prediction; batches are random windows of the training text."""
    if full_batch:
        raise ValueError("char-transformer has no full-batch form")
    size = TRANSFORMER_QUICK if quick else TRANSFORMER_SIZE
    corpus = load_corpus()
    torch.manual_seed(seed)
    model = CharTransformer(
        len(corpus.vocab), size.d_model, size.n_layers, size.n_heads, size.context
    ).to(device)
    train_codes = corpus.train.to(device)
    gen = torch.Generator().manual_seed(seed)
    high = len(corpus.train) - size.context - 1

    def cross_entropy(x: Tensor, y: Tensor) -> Tensor:
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def loss(step: int) -> Tensor:
        model.train()
        starts = torch.randint(0, high, (size.batch_size,), generator=gen).to(device)
        return cross_entropy(*_windows(train_codes, starts, size.context))

    fixed = {
        name: tuple(
            t.to(device)
            for t in _windows(
                codes, _fixed_starts(codes, size.eval_windows, size.context), size.context
            )
        )
        for name, codes in (("train", corpus.train), ("val", corpus.val), ("test", corpus.test))
    }

    def objective() -> float:
        with evaluating(model):
            return float(cross_entropy(*fixed["train"]))

    def heldout(split: str) -> dict[str, float]:
        with evaluating(model):
            nats = float(cross_entropy(*fixed[split]))
        return {"loss": nats, "bits_per_char": nats / math.log(2)}

    return Problem(list(model.named_parameters()), loss, objective, heldout)


# -------------------------------------------------------------------------------------------
# amsgrad-counterexample (Reddi, Kale & Kumar 2018, section 3)

COUNTEREXAMPLE_C = 3.0
COUNTEREXAMPLE_BETAS = (0.0, 1.0 / (1.0 + COUNTEREXAMPLE_C**2))  # (0, 0.1)


def counterexample_gradient(step: int, c: float = COUNTEREXAMPLE_C) -> float:
    """df_t/dx at the 0-based ``step`` (t = step + 1): ``c`` when ``t mod 3 == 1``, else -1."""
    return c if (step + 1) % 3 == 1 else -1.0


def build_amsgrad_counterexample(
    seed: int, *, full_batch: bool = False, quick: bool = False, device: str = "cpu"
) -> Problem:
    """x starts at 0; each step sees ``f_t(x) = g_t * x`` and x is clamped to ``[-1, 1]``.

    The objective is the average of ``f_t`` over a period, ``(c - 2) / 3 * x``, minimised at
    ``x = -1``; the held-out metric is ``x`` itself (the problem has no data to hold out).
    """
    if full_batch:
        raise ValueError("amsgrad-counterexample is an online problem: no full batch")
    x = torch.zeros(1, device=device, requires_grad=True)
    slope = (COUNTEREXAMPLE_C - 2.0) / 3.0

    def loss(step: int) -> Tensor:
        return counterexample_gradient(step) * x.sum()

    def objective() -> float:
        return slope * float(x.detach())

    def heldout(split: str) -> dict[str, float]:
        return {"loss": objective(), "x": float(x.detach())}

    def project_() -> None:
        with torch.no_grad():
            x.clamp_(-1.0, 1.0)

    return Problem([("x", x)], loss, objective, heldout, project_, lambda: {"x": float(x.detach())})


# -------------------------------------------------------------------------------------------
# rosenbrock

ROSENBROCK_START = (-1.2, 1.0)


def rosenbrock(x: Tensor, y: Tensor) -> Tensor:
    """``(1 - x)^2 + 100 (y - x^2)^2``; works elementwise on grids too."""
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def build_rosenbrock(
    seed: int, *, full_batch: bool = False, quick: bool = False, device: str = "cpu"
) -> Problem:
    """The 2-D Rosenbrock function from the classic start ``(-1.2, 1)``; metric: distance to
    the minimum ``(1, 1)``. Deterministic: the seed is not used."""
    xy = torch.tensor(ROSENBROCK_START, device=device, requires_grad=True)

    def loss(step: int) -> Tensor:
        return rosenbrock(xy[0], xy[1])

    def objective() -> float:
        with torch.no_grad():
            return float(rosenbrock(xy[0], xy[1]))

    def heldout(split: str) -> dict[str, float]:
        with torch.no_grad():
            distance = float(torch.linalg.vector_norm(xy - torch.ones_like(xy)))
        return {"loss": objective(), "distance": distance}

    def probe() -> dict[str, float]:
        return {"x": float(xy[0].detach()), "y": float(xy[1].detach())}

    return Problem([("xy", xy)], loss, objective, heldout, None, probe)


# -------------------------------------------------------------------------------------------
# the registry

DIGITS_LR = {"adam": 3e-2, "sgd": 1.0, "momentum": 1e-1, "rmsprop": 3e-3, "adagrad": 1e-1}
MLP_LR = {"adam": 1e-3, "sgd": 1e-1, "momentum": 1e-2, "rmsprop": 1e-3, "adagrad": 1e-2}

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            name="digits-logreg",
            summary="L2-regularised logistic regression on scikit-learn's 8x8 digits",
            source="Kingma & Ba 2015, Fig. 1",
            build=build_digits_logreg,
            default=Budget(steps=400, eval_every=5),
            quick=Budget(steps=60, eval_every=5),
            base_lr=DIGITS_LR,
            metric="accuracy",
            higher_is_better=True,
            target_loss=0.1,
        ),
        Task(
            name="digits-mlp",
            summary="two hidden layers (128 ReLU units) with dropout 0.25 on the digits",
            source="Kingma & Ba 2015, Fig. 2a",
            build=build_digits_mlp,
            default=Budget(steps=400, eval_every=20),
            quick=Budget(steps=60, eval_every=10),
            base_lr=MLP_LR,
            metric="accuracy",
            higher_is_better=True,
            target_loss=0.05,
        ),
        Task(
            name="char-transformer",
            summary="2-layer decoder-only transformer (d_model 64, context 32, batches of 4) "
            "on pydoc_data.topics, lr on warmup + cosine",
            source="the LLM recipe in miniature (warmup + cosine decay)",
            build=build_char_transformer,
            default=Budget(steps=300, eval_every=20),
            quick=Budget(steps=30, eval_every=10),
            base_lr={"adam": 1e-2, "sgd": 1.0, "momentum": 3e-1, "rmsprop": 3e-3, "adagrad": 3e-2},
            metric="bits_per_char",
            higher_is_better=False,
            target_loss=2.6,
            full_batch=False,
            schedule="warmup_cosine",
            ablation=("constant",),
        ),
        Task(
            name="amsgrad-counterexample",
            summary="Reddi et al.'s online problem on [-1, 1] (C = 3), optimum x = -1",
            source="Reddi, Kale & Kumar 2018, Theorem 1",
            build=build_amsgrad_counterexample,
            default=Budget(steps=1500, eval_every=15),
            quick=Budget(steps=400, eval_every=10),
            base_lr={"adam": 1e-2, "sgd": 1e-2, "momentum": 1e-3, "rmsprop": 1e-2, "adagrad": 1e-1},
            metric="x",
            higher_is_better=False,
            target_loss=-0.3,
            stochastic=False,
            full_batch=False,
            adam_betas=COUNTEREXAMPLE_BETAS,
        ),
        Task(
            name="rosenbrock",
            summary="the 2-D Rosenbrock function from (-1.2, 1), minimum 0 at (1, 1)",
            source="Rosenbrock 1960; the classic optimizer test",
            build=build_rosenbrock,
            default=Budget(steps=1000, eval_every=10),
            quick=Budget(steps=150, eval_every=10),
            base_lr={"adam": 1e-1, "sgd": 1e-3, "momentum": 3e-4, "rmsprop": 1e-2, "adagrad": 1.0},
            metric="distance",
            higher_is_better=False,
            target_loss=1e-3,
            stochastic=False,
            full_batch=False,
        ),
    )
}


# -------------------------------------------------------------------------------------------
# decoupling-grid (opt-in)


@dataclass(frozen=True)
class GridVariant:
    """One heat map: an optimizer and the weight decays on its axis.

    ``"adamw"`` uses ``weight_decay_scaling="lr_ratio"``, Loshchilov & Hutter's Algorithm 2: the
    per-step decay is ``wd`` times the schedule multiplier, independent of lr. ``"adamw-torch"``
    is torch's scaling (per-step decay ``lr * wd``). ``"adam-l2"`` adds ``wd * p`` to the grad.
    """

    name: str
    label: str
    weight_decays: tuple[float, ...]


@dataclass(frozen=True)
class DecouplingGrid:
    """lr x weight-decay sweeps of AdamW and Adam + L2 on ``digits-mlp`` (one seed per cell);
    each cell reports the held-out loss of the val split."""

    name: str
    base_task: str
    source: str
    lrs: tuple[float, ...]
    quick_lrs: tuple[float, ...]
    variants: tuple[GridVariant, ...]
    quick_variants: tuple[GridVariant, ...]
    default: Budget
    quick: Budget
    seed: int = 0
    notes: tuple[str, ...] = field(default=())

    def budget(self, quick: bool) -> Budget:
        return self.quick if quick else self.default


DECOUPLING_GRID = DecouplingGrid(
    name="decoupling-grid",
    base_task="digits-mlp",
    source="Loshchilov & Hutter 2019, Fig. 2",
    lrs=(3e-4, 1e-3, 3e-3, 1e-2),
    quick_lrs=(1e-3, 3e-3, 1e-2),
    variants=(
        GridVariant(
            "adamw", "AdamW (decay = wd x schedule, paper)", (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
        ),
        GridVariant("adam-l2", "Adam + L2 (grad += wd x p)", (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)),
        GridVariant("adamw-torch", "AdamW (decay = lr x wd, torch)", (1e-1, 3e-1, 1.0, 3.0, 10.0)),
    ),
    quick_variants=(
        GridVariant("adamw", "AdamW (decay = wd x schedule, paper)", (1e-4, 1e-3, 1e-2)),
        GridVariant("adam-l2", "Adam + L2 (grad += wd x p)", (1e-4, 1e-3, 1e-2)),
    ),
    default=Budget(steps=400, eval_every=100),
    quick=Budget(steps=150, eval_every=50),
)

ALL_TASKS: tuple[str, ...] = (*TASKS, DECOUPLING_GRID.name)
DEFAULT_TASKS: tuple[str, ...] = tuple(TASKS)
