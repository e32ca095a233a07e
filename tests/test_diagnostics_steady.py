"""The Monitor's steady-state replay (:mod:`adamkit.diagnostics.steady`) against its general
read: the same records, number for number, and a fall-back whenever the replay could be wrong."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adamkit
from adamkit.diagnostics import Monitor

pytestmark = pytest.mark.usefixtures("forget_compiled_kernels")


def _run(backend: str, amsgrad: bool, replay: bool, steps: int = 6, between=None):
    """A small MLP (one tensor above the sample size) trained ``steps`` steps with a Monitor
    sampling every step; ``between(opt, step)`` runs before each step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 5))
    opt = adamkit.AdamW(model.parameters(), lr=1e-2, amsgrad=amsgrad, backend=backend)
    opt.fused_signals = backend == "compiled"  # the compiled kernels' norms from step one
    monitor = Monitor(opt, names=model, every=1, alerts=False)
    monitor._replay = replay
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        opt.zero_grad()
        x = torch.randn(16, 40, generator=gen)
        model(x).square().mean().backward()
        if between is not None:
            between(opt, step)
        opt.step()
    monitor.close()
    return monitor, [{k: v for k, v in r.items() if k != "time"} for r in monitor.history()]


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_the_replay_gives_the_records_of_the_general_read(backend, amsgrad) -> None:
    replayed, got = _run(backend, amsgrad, replay=True)
    general, want = _run(backend, amsgrad, replay=False)
    assert general._replays == 0
    # the first sampled step reads in general (and builds the replay); the others replay it
    assert replayed._replays == len(got) - 1 == 5
    assert got == want
    assert got[-1]["tensors"]["0.weight"]["sample"] < got[-1]["tensors"]["0.weight"]["numel"]


def test_the_replay_falls_back_when_the_state_changes() -> None:
    """New moment tensors (assigned, or from load_state_dict) send the step back to the
    general read, with the records unchanged."""

    def swap(opt, step):
        if step == 3:  # the moments of one param become new tensors
            st = opt.state[opt.param_groups[0]["params"][0]]
            st["exp_avg"] = st["exp_avg"].clone()
        if step == 5:
            opt.load_state_dict(opt.state_dict())

    replayed, got = _run("eager", False, replay=True, steps=8, between=swap)
    _, want = _run("eager", False, replay=False, steps=8, between=swap)
    assert got == want
    # general reads at calls 1 (first), 4 (swapped) and 6 (loaded): 5 replays of 8
    assert replayed._replays == 5


def test_load_state_dict_drops_the_replay() -> None:
    model = nn.Linear(600, 2)
    opt = adamkit.AdamW(model.parameters(), lr=1e-2)
    monitor = Monitor(opt, alerts=False)
    for _ in range(3):
        model.weight.grad = torch.ones_like(model.weight)
        model.bias.grad = torch.ones_like(model.bias)
        opt.step()
    assert monitor._steady is not None  # it holds views of the moments
    opt.load_state_dict(opt.state_dict())
    assert monitor._steady is None
