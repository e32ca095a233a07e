"""SpikeGuard: OLMo-style skipping of spiking or non-finite steps, which then change nothing."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import adamkit
from adamkit.diagnostics import Monitor, SpikeGuard

_X, _Y = load_digits(return_X_y=True)
X = torch.tensor(_X / 16.0, dtype=torch.float32)
Y = torch.tensor(_Y)


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        out += [v.clone() for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    return out


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(make_opt, steps, *, bad_step=None, nan_step=None, watch=("grad_norm", "loss"),
          monitor=None, **guard_kwargs):  # fmt: skip
    """Digits MLP (64 -> 64 -> 10), batches of 64; a batch whose labels a loader bug shifted
    at ``bad_step``, a NaN gradient at ``nan_step``. ``monitor``: None, "after" or "before"
    the guard.

    Returns the guard, the monitor, and the (params + state) just before and after each
    of those steps.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = make_opt(model.parameters())
    mon = Monitor(opt, names=model, alerts=False) if monitor == "before" else None
    guard = SpikeGuard(opt, watch=watch, **guard_kwargs)
    mon = Monitor(opt, names=model, alerts=False) if monitor == "after" else mon
    gen = torch.Generator().manual_seed(0)
    around = {}
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(X), (64,), generator=gen)
        x, y = X[idx], Y[idx]
        if step == bad_step:
            y = (y + 1) % 10
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if step == nan_step:
            model[0].weight.grad[0, 5] = math.nan
        guard.observe(loss=loss)
        grads = [p.grad for p in model.parameters()]
        if step in (bad_step, nan_step):
            before = snapshot(model, opt)
        opt.step()
        assert [p.grad for p in model.parameters()] == grads  # the gradients are given back
        if step in (bad_step, nan_step):
            around[step] = (before, snapshot(model, opt))
    return guard, mon, around


OPTS = {
    "adamkit.AdamW": lambda ps: adamkit.AdamW(ps, lr=1e-3),
    "torch.AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
}


@pytest.mark.parametrize("make_opt", OPTS.values(), ids=OPTS.keys())
def test_a_spiking_step_is_skipped_and_changes_nothing(make_opt, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="adamkit")
    guard, monitor, around = train(make_opt, 301, bad_step=300, monitor="after")
    assert guard.skipped_steps == 1
    assert [(s, what) for s, what, _, _ in guard.skips] == [(300, "grad_norm"), (300, "loss")]
    _, what, value, bound = guard.skips[0]
    mean, std = guard.grad_norms.mean_std()
    assert value > bound > mean
    before, after = around[300]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # params and state, bitwise
    rec = monitor.history()[299]
    assert rec["step"] == 300 and rec["skipped"] and rec["tensors"] == {}
    assert not monitor.history()[300]["skipped"]  # training goes on
    assert any("SpikeGuard skipped step 300: grad norm" in r.getMessage() for r in caplog.records)


def test_monitor_registered_first_also_sees_the_skip() -> None:
    _, monitor, _ = train(OPTS["adamkit.AdamW"], 300, bad_step=300, monitor="before")
    rec = monitor.history()[299]
    assert rec["skipped"] and rec["tensors"] == {} and rec["overall"]["updated"] == 0


def test_no_skip_on_a_healthy_run() -> None:
    guard, _, _ = train(OPTS["adamkit.AdamW"], 500)
    assert guard.skipped_steps == 0 and guard.skips == []
    assert len(guard.grad_norms.values) == 128  # the window


def test_nonfinite_is_skipped_before_warmup_and_kept_out_of_the_statistics() -> None:
    guard, _, around = train(OPTS["adamkit.AdamW"], 40, nan_step=30)
    assert guard.skipped_steps == 1 and guard.skips[0][:2] == (30, "grad_norm")
    assert math.isnan(guard.skips[0][2])
    before, after = around[30]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert len(guard.grad_norms.values) == 39 and all(map(math.isfinite, guard.grad_norms.values))
    assert not guard.grad_norms.ready()  # 39 < 64: nothing finite was judged yet


def test_loss_only_guard_uses_the_observed_loss() -> None:
    guard, _, around = train(OPTS["adamkit.AdamW"], 300, bad_step=300, watch=("loss",))
    assert [(s, what) for s, what, _, _ in guard.skips] == [(300, "loss")]
    assert len(guard.grad_norms.values) == 0  # not watched
    before, after = around[300]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_a_higher_threshold_lets_the_step_through() -> None:
    guard, _, around = train(OPTS["adamkit.AdamW"], 300, bad_step=300, threshold=1e6)
    assert guard.skipped_steps == 0
    before, after = around[300]
    assert not all(torch.equal(a, b) for a, b in zip(before, after))


def test_closures_and_bad_arguments_are_refused() -> None:
    p = nn.Parameter(torch.ones(3))
    opt = adamkit.Adam([p])
    guard = SpikeGuard(opt)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(lambda: p.sum())
    guard.remove()
    with pytest.raises(ValueError, match="watch"):
        SpikeGuard(opt, watch=("loss", "lr"))
    with pytest.raises(ValueError, match="threshold"):
        SpikeGuard(opt, threshold=0)
    with pytest.raises(ValueError, match="warmup"):
        SpikeGuard(opt, window=10, warmup=20)
