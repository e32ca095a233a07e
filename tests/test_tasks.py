"""The tasks and optimizers of ``adamkit compare``: data, models, losses, determinism, sweeps."""

from __future__ import annotations

import math

import pytest
import torch

import adamkit
from adamkit.bench import tasks as T
from adamkit.bench.optimizers import OPTIMIZERS, applies, ladder, lr_sweep, make_grid_optimizer


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _train(problem: T.Problem, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for step in range(steps):
        optimizer.zero_grad()
        problem.loss(step).backward()
        optimizer.step()
        if problem.project_ is not None:
            problem.project_()


def _params(problem: T.Problem) -> list[torch.Tensor]:
    return [p for _, p in problem.params]


# ---------------------------------------------------------------------------------------------
# data


def test_digits_splits_are_fixed_disjoint_and_standardised():
    d = T.load_digits_splits()
    assert d.x_train.shape == (1197, 64) and d.y_train.shape == (1197,)
    assert d.x_val.shape == (300, 64) and d.x_test.shape == (300, 64)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert set(d.y_train.tolist()) == set(range(10))
    # standardised with train statistics: mean 0, std 1 where a pixel varies
    assert d.x_train.mean(0).abs().max() < 1e-5
    stds = d.x_train.std(0, unbiased=False)
    assert torch.allclose(stds[stds > 0], torch.ones_like(stds[stds > 0]), atol=1e-4)
    assert len(d.y_train) + len(d.y_val) + len(d.y_test) == 1797
    # the cache returns the same object; a fresh load gives the same split
    T.load_digits_splits.cache_clear()
    again = T.load_digits_splits()
    assert torch.equal(again.x_val, d.x_val) and torch.equal(again.y_test, d.y_test)


def test_corpus_is_pydoc_topics_split_90_5_5():
    from pydoc_data.topics import topics

    c = T.load_corpus()
    n = len(c.train) + len(c.val) + len(c.test)
    assert n == len("\n".join(topics[k] for k in sorted(topics)))
    assert abs(len(c.train) / n - 0.9) < 1e-3 and abs(len(c.val) / n - 0.05) < 1e-3
    decoded = "".join(c.vocab[i] for i in c.train[:200].tolist())
    assert decoded == "\n".join(topics[k] for k in sorted(topics))[:200]


def test_batch_indices_are_seeded_epochs_of_permutations():
    a, b, other = T.batch_indices(10, 4, 0), T.batch_indices(10, 4, 0), T.batch_indices(10, 4, 1)
    first = [a(s) for s in range(5)]  # 20 indices: two whole epochs
    assert all(torch.equal(x, b(s)) for s, x in enumerate(first))
    stream = torch.cat(first)
    assert sorted(stream[:10].tolist()) == list(range(10))
    assert sorted(stream[10:20].tolist()) == list(range(10))
    assert not all(torch.equal(x, other(s)) for s, x in enumerate(first))


# ---------------------------------------------------------------------------------------------
# every task


@pytest.mark.parametrize("name", list(T.TASKS))
def test_task_builds_deterministically_and_evaluates(name):
    task = T.TASKS[name]
    p1, p2 = task.build(3, quick=True), task.build(3, quick=True)
    for (n1, a), (n2, b) in zip(p1.params, p2.params, strict=True):
        assert n1 == n2 and torch.equal(a, b)
    torch.manual_seed(0)  # dropout draws from the global generator (seeded per run by compare)
    l1 = p1.loss(0)
    torch.manual_seed(0)
    l2 = p2.loss(0)
    assert l1.dim() == 0 and torch.isfinite(l1) and torch.equal(l1, l2)
    for split in ("val", "test"):
        held = p1.heldout(split)
        assert set(held) == {"loss", task.metric}
        assert all(math.isfinite(v) for v in held.values())
    assert math.isfinite(p1.objective())
    assert task.budget(True).steps < task.budget(False).steps
    for family in ("adam", "sgd", "momentum", "rmsprop", "adagrad"):
        assert task.base_lr[family] > 0


@pytest.mark.parametrize(
    "name, steps, lr",
    [
        ("digits-logreg", 30, 3e-2),
        ("digits-mlp", 30, 3e-3),
        ("char-transformer", 30, 1e-2),
        ("rosenbrock", 100, 3e-2),
    ],
)
def test_adam_lowers_the_training_objective(name, steps, lr):
    problem = T.TASKS[name].build(0, quick=True)
    before = problem.objective()
    _train(problem, adamkit.Adam(_params(problem), lr=lr), steps)
    assert problem.objective() < 0.9 * before


def test_seeds_change_init_and_batches_but_not_the_data():
    a, b = T.build_digits_mlp(0), T.build_digits_mlp(1)
    assert not torch.equal(a.params[0][1], b.params[0][1])
    assert a.heldout("val").keys() == b.heldout("val").keys()


def test_full_batch_uses_the_whole_training_set():
    d = T.load_digits_splits()
    problem = T.build_digits_logreg(0, full_batch=True)
    # the full-batch loss is the same at every step and equals the objective in train mode
    assert torch.equal(problem.loss(0), problem.loss(7))
    w = dict(problem.params)["weight"]
    expected = (
        torch.nn.functional.cross_entropy(d.x_train @ w.T + dict(problem.params)["bias"], d.y_train)
        + 0.5 * T.LOGREG_L2 * w.square().sum()
    )
    assert torch.allclose(problem.loss(0), expected)
    with pytest.raises(ValueError, match="full-batch"):
        T.build_char_transformer(0, full_batch=True)
    with pytest.raises(ValueError, match="online"):
        T.build_amsgrad_counterexample(0, full_batch=True)


def test_mlp_has_two_hidden_layers_with_dropout():
    model = T.make_mlp()
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 128), (128, 128), (128, 10)]
    assert sum(isinstance(m, torch.nn.Dropout) for m in model) == 2
    # dropout is on in loss() (train mode) and off in objective() (eval mode)
    problem = T.build_digits_mlp(0, full_batch=True)
    torch.manual_seed(0)
    a = problem.loss(0)
    b = problem.loss(0)
    assert not torch.equal(a, b)
    assert problem.objective() == problem.objective()


def test_transformer_is_causal():
    torch.manual_seed(0)
    model = T.CharTransformer(vocab=20, d_model=16, n_layers=2, n_heads=2, context=8).eval()
    x = torch.randint(0, 20, (1, 8))
    y = x.clone()
    y[0, 5:] = (y[0, 5:] + 1) % 20  # change the future only
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[0, :5], b[0, :5], atol=1e-6)
    assert not torch.allclose(a[0, 5:], b[0, 5:])


def test_transformer_reports_bits_per_char():
    problem = T.build_char_transformer(0, quick=True)
    held = problem.heldout("val")
    assert held["bits_per_char"] == pytest.approx(held["loss"] / math.log(2))
    # an untrained model is near uniform over the vocabulary
    assert held["loss"] == pytest.approx(math.log(len(T.load_corpus().vocab)), rel=0.15)


# ---------------------------------------------------------------------------------------------
# the two analytic problems


def test_rosenbrock_minimum_is_zero_at_one_one():
    one = torch.tensor(1.0, requires_grad=True)
    one_y = torch.tensor(1.0, requires_grad=True)
    value = T.rosenbrock(one, one_y)
    value.backward()
    assert value.item() == 0.0 and one.grad.item() == 0.0 and one_y.grad.item() == 0.0
    assert T.rosenbrock(torch.tensor(-1.2), torch.tensor(1.0)).item() == pytest.approx(24.2)
    problem = T.build_rosenbrock(0)
    assert problem.objective() == pytest.approx(24.2)
    assert problem.probe() == pytest.approx({"x": -1.2, "y": 1.0})
    assert problem.heldout("test")["distance"] == pytest.approx(math.hypot(2.2, 0.0))


def test_counterexample_gradients_cycle_with_period_three():
    assert [T.counterexample_gradient(s) for s in range(6)] == [3.0, -1.0, -1.0] * 2
    problem = T.build_amsgrad_counterexample(0)
    x = problem.params[0][1]
    problem.loss(0).backward()
    assert x.grad.item() == 3.0
    with torch.no_grad():
        x.fill_(5.0)
    problem.project_()
    assert x.item() == 1.0
    # the objective is the average loss over a period: (C - 2) / 3 * x
    assert problem.objective() == pytest.approx(1.0 / 3.0)
    assert problem.heldout("val") == {"loss": pytest.approx(1 / 3), "x": 1.0}


@pytest.mark.parametrize("amsgrad, end", [(False, 1.0), (True, -1.0)])
def test_counterexample_adam_goes_to_plus_one_amsgrad_to_minus_one(amsgrad, end):
    """Reddi et al.: betas (0, 1/(1+C^2)); 400 steps at lr 0.03 are enough to see both ends."""
    problem = T.build_amsgrad_counterexample(0)
    x = problem.params[0][1]
    opt = adamkit.Adam([x], lr=3e-2, betas=T.COUNTEREXAMPLE_BETAS, amsgrad=amsgrad)
    _train(problem, opt, 400)
    assert x.item() == pytest.approx(end, abs=0.05)


# ---------------------------------------------------------------------------------------------
# optimizers and sweeps


def test_lr_ladder_and_sweeps():
    assert [ladder(r) for r in (-6, -5, -4, -3, -2, 0, 1)] == [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 1, 3]
    assert lr_sweep(1e-2, quick=False) == [1e-3, 3e-3, 1e-2, 3e-2]
    assert lr_sweep(3e-2, quick=True) == [1e-2, 3e-2, 1e-1]
    assert lr_sweep(3e-4, quick=True) == [1e-4, 3e-4, 1e-3]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_builds_and_steps(name):
    spec = OPTIMIZERS[name]
    task = T.TASKS["rosenbrock"]
    problem = task.build(0)
    opt, hp = spec.make(_params(problem), 1e-3, task)
    assert hp["lr"] == 1e-3 and opt.param_groups[0]["lr"] == 1e-3
    _train(problem, opt, 5)
    assert problem.objective() < 24.2
    assert applies(spec, T.TASKS["digits-logreg"])
    assert applies(spec, T.TASKS["char-transformer"]) == (name != "gd")


def test_optimizer_settings():
    task = T.TASKS["amsgrad-counterexample"]
    x = [torch.zeros(1, requires_grad=True)]
    opt, hp = OPTIMIZERS["amsgrad"].make(x, 0.01, task)
    assert isinstance(opt, adamkit.Adam) and opt.param_groups[0]["amsgrad"]
    assert opt.param_groups[0]["betas"] == T.COUNTEREXAMPLE_BETAS
    opt, hp = OPTIMIZERS["adamw-lr-ratio"].make(x, 0.01, task)
    group = opt.param_groups[0]
    assert group["weight_decay_scaling"] == "lr_ratio"
    assert group["weight_decay"] == pytest.approx(1e-2 * task.base_lr["adam"])
    opt, hp = OPTIMIZERS["adamw"].make(x, 0.01, T.TASKS["digits-mlp"])
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    assert opt.param_groups[0]["weight_decay"] == 1e-2
    opt, hp = OPTIMIZERS["sgd-nesterov"].make(x, 0.01, task)
    assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9
    assert OPTIMIZERS["gd"].full_batch and not OPTIMIZERS["sgd"].full_batch


def test_grid_optimizers():
    p = [torch.ones(3, requires_grad=True)]
    opt, hp = make_grid_optimizer("adam-l2", p, 1e-3, 0.1)
    assert not opt.param_groups[0]["decoupled_weight_decay"]
    opt, hp = make_grid_optimizer("adamw", p, 1e-3, 0.1)
    assert opt.param_groups[0]["weight_decay_scaling"] == "lr_ratio"
    # the paper's decay: 0.1 of the weight per step, whatever the lr
    p[0].grad = torch.zeros(3)
    opt.step()
    assert torch.allclose(p[0].detach(), torch.full((3,), 0.9))
    opt, hp = make_grid_optimizer("adamw-torch", p, 1e-3, 0.1)
    assert hp["weight_decay_scaling"] == "lr"
