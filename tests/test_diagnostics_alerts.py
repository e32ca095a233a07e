"""Each alert provoked by a real failure on the digits MLP, and none on a healthy run."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import adamkit
from adamkit.diagnostics import ALERT_NAMES, Alert, AlertConfig, Monitor
from adamkit.diagnostics.alerts import AlertEngine

_X, _Y = load_digits(return_X_y=True)
X = torch.tensor(_X / 16.0, dtype=torch.float32)
Y = torch.tensor(_Y)

Hook = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def digits_run(
    steps: int,
    *,
    lr: float = 1e-3,
    hook: Hook | None = None,
    loss_scale: Callable[[int], float] = lambda step: 1.0,
    grad_hook: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None = None,
    every: int = 1,
    alerts=True,
    stop_on_nan: bool = False,
    **opt_kwargs,
):
    """The digits MLP (64 -> 64 -> 10, ReLU), batches of 64, AdamW; returns (monitor, losses)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = adamkit.AdamW(model.parameters(), lr=lr, **opt_kwargs)
    monitor = Monitor(opt, names=model, every=every, alerts=alerts)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(X), (64,), generator=gen)
        x, y = X[idx], Y[idx]
        if hook:
            x, y = hook(step, x, y)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) * loss_scale(step)
        loss.backward()
        if grad_hook:
            grad_hook(step, model, opt)
        monitor.observe(loss=loss)
        opt.step()
        losses.append(loss.item())
        if stop_on_nan and not math.isfinite(losses[-1]):
            break
    return monitor, losses


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fired(monitor: Monitor) -> list[tuple[str, int, str | None]]:
    return [(a.name, a.step, a.tensor) for a in monitor.alerts]


def test_healthy_run_raises_no_alert(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="adamkit")
    monitor, losses = digits_run(500, lr=1e-3)
    assert monitor.alerts == []
    assert caplog.records == []
    assert losses[-1] < 0.3 < losses[0]  # it did learn
    assert len(monitor.history()) == 500


def test_eps_dominated_fires_when_eps_swamps_tiny_gradients(caplog) -> None:
    # a loss scaled by 1e-3 (e.g. a sum normalised twice): gradients of about 1e-5
    scale = lambda step: 1e-3  # noqa: E731
    quiet, _ = digits_run(30, eps=1e-8, loss_scale=scale)
    assert quiet.alerts == []  # eps = 1e-8 is far below these gradients: fine
    caplog.set_level(logging.WARNING, logger="adamkit")
    monitor, _ = digits_run(30, eps=1e-3, loss_scale=scale)
    grad_rms = monitor.history()[0]["overall"]["grad_rms"]
    assert 1e-6 < grad_rms < 1e-4
    names = {a.name for a in monitor.alerts}
    assert names == {"eps_dominated"}
    first = monitor.alerts[0]
    assert first.step == 1 and first.tensor == "0.weight"
    assert first.value > 0.9 and first.threshold == 0.5
    assert "Lower eps" in first.message
    # once per episode: the condition holds for all 30 steps, each tensor is reported once
    assert sorted(a.tensor for a in monitor.alerts) == ["0.bias", "0.weight", "2.bias",
                                                        "2.weight"]  # fmt: skip
    assert any("eps_dominated at step 1 in 0.weight" in r.getMessage() for r in caplog.records)


def test_lr_far_too_high_is_flagged_before_any_nan() -> None:
    monitor, losses = digits_run(60, lr=1.0, stop_on_nan=True)
    first_nan = next((i + 1 for i, x in enumerate(losses) if not math.isfinite(x)), math.inf)
    early = [a for a in monitor.alerts if a.name in ("update_too_large", "loss_spike")]
    assert early and early[0].step < first_nan
    too_large = [a for a in monitor.alerts if a.name == "update_too_large"]
    assert too_large[0].step == 1 and too_large[0].value > -1.0
    assert {a.tensor for a in too_large} == {"0.weight", "2.weight"}  # matrices only
    assert max(losses) > 10 * losses[0]  # and the run did go wrong


def test_nan_gradient_at_step_30_fires_nonfinite(caplog) -> None:
    def inject(step: int, model: nn.Module, opt) -> None:
        if step == 30:
            model[2].weight.grad[3, 7] = math.nan

    caplog.set_level(logging.WARNING, logger="adamkit")
    monitor, losses = digits_run(35, grad_hook=inject)
    nonfinite = [a for a in monitor.alerts if a.name == "nonfinite"]
    assert nonfinite[0].step == 30 and nonfinite[0].tensor == "2.weight"
    assert "1 in the grad" in nonfinite[0].message
    assert [a for a in monitor.alerts if a.step < 30] == []
    log = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("adamkit alert nonfinite at step 30 in 2.weight") for m in log)
    # without a guard the NaN spreads: later steps see a NaN loss, still one episode
    assert not math.isfinite(losses[-1])
    assert len(nonfinite) == 1


def test_nan_gradient_with_skip_nonfinite_changes_nothing() -> None:
    saved = {}

    def inject(step: int, model: nn.Module, opt) -> None:
        if step in (30, 31):  # before step 30, and after it (before step 31)
            saved[step] = [p.detach().clone() for p in model.parameters()] + [
                v.clone() for p in model.parameters() for v in opt.state[p].values()
            ]
        if step == 30:
            model[2].weight.grad[3, 7] = math.nan

    monitor, losses = digits_run(32, grad_hook=inject, skip_nonfinite=True)
    assert all(torch.equal(a, b) for a, b in zip(saved[30], saved[31]))  # bit-identical
    assert math.isfinite(losses[-1])
    rec30 = monitor.history()[29]
    assert rec30["skipped"] and rec30["skipped_steps"] == 1
    assert fired(monitor) == [("nonfinite", 30, "2.weight")]
    assert "The step was skipped" in monitor.alerts[0].message


def test_sign_descent_fires_when_beta2_is_zero() -> None:
    # betas = (0, 0): u = g / |g|, Adam becomes sign descent
    monitor, _ = digits_run(140, betas=(0.0, 0.0), lr=1e-4)
    sign = [a for a in monitor.alerts if a.name == "sign_descent"]
    assert fired(monitor) == [("sign_descent", 120, "0.weight"), ("sign_descent", 120, "2.weight")]
    assert all(a.value > 0.9 for a in sign)
    assert min(a.step for a in sign) > AlertConfig().warmup


def test_second_moment_lag_fires_when_gradients_collapse() -> None:
    # from step 150 the loss is scaled by 1e-3 (a changed loss weighting): g^2 drops by 1e6
    # while v, at beta2 = 0.999, keeps the old scale for thousands of steps
    monitor, _ = digits_run(280, loss_scale=lambda step: 1.0 if step < 150 else 1e-3)
    lag = [a for a in monitor.alerts if a.name == "second_moment_lag"]
    assert len(lag) == 1 and lag[0].tensor is None
    assert 150 + AlertConfig().lag_patience - 1 <= lag[0].step < 280
    assert lag[0].value < 1e-3
    # the other consequence: with v stuck high the updates shrink, and only after step 150
    others = [a for a in monitor.alerts if a.name != "second_moment_lag"]
    assert {a.name for a in others} == {"update_stalled"} and min(a.step for a in others) > 150


def test_update_stalled_fires_at_a_vanishing_lr() -> None:
    monitor, _ = digits_run(30, lr=1e-9)
    stalled = [a for a in monitor.alerts if a.name == "update_stalled"]
    assert {a.tensor for a in stalled} == {"0.weight", "2.weight"}
    assert all(a.step == AlertConfig().stalled_patience and a.value < -5 for a in stalled)


def test_a_corrupted_batch_fires_loss_and_grad_spikes() -> None:
    # a data-loader bug shifts the labels of one batch
    def corrupt(step, x, y):
        return (x, (y + 1) % 10) if step == 300 else (x, y)

    monitor, _ = digits_run(310, hook=corrupt)
    assert fired(monitor) == [("loss_spike", 300, None), ("grad_spike", 300, None)]
    spike = monitor.alerts[0]
    rec = monitor.history()[298]  # step 299: the statistics before the spike
    assert spike.threshold == pytest.approx(rec["loss_mean"] + 6 * rec["loss_std"], rel=0.05)
    assert spike.value > spike.threshold


def test_alerts_are_judged_on_sampled_steps_too() -> None:
    monitor, _ = digits_run(40, eps=1e-3, loss_scale=lambda s: 1e-3, every=10)
    assert [r["step"] for r in monitor.history()] == [10, 20, 30, 40]
    assert {(a.name, a.step) for a in monitor.alerts} == {("eps_dominated", 10)}


def test_thresholds_are_configurable_and_can_be_switched_off() -> None:
    scale = lambda step: 1e-3  # noqa: E731
    off, _ = digits_run(10, eps=1e-3, loss_scale=scale, alerts={"eps_dominated": None})
    assert off.alerts == []
    none, _ = digits_run(10, eps=1e-3, loss_scale=scale, alerts=False)
    assert none.alerts == [] and none.latest()["alerts"] == []
    strict, _ = digits_run(3, alerts=AlertConfig(update_too_large=-2.5))
    assert {a.name for a in strict.alerts} == {"update_too_large"}
    assert strict.alerts[0].threshold == -2.5


def _record(step: int, frac: float) -> dict:
    t = {"updated": True, "shape": [4, 4], "eps_dominated_frac": frac, "grad_rms": 1e-6}
    return {"step": step, "tensors": {"w": t}, "groups": [{"eps": 1e-3}], "overall": {}}


def test_an_episode_ends_after_the_cooldown() -> None:
    engine = AlertEngine(AlertConfig(cooldown=5))
    pattern = {1: 0.9, 2: 0.9, 3: 0.1, 4: 0.9, 5: 0.1, 6: 0.1, 7: 0.1, 8: 0.1, 9: 0.1, 10: 0.9}
    raised = [a.step for s, f in pattern.items() for a in engine.evaluate(_record(s, f))]
    # step 4 is the same episode (false for 1 step only); step 10 comes 6 steps after the
    # last true step (4): a new episode
    assert raised == [1, 10]


def test_patience_counts_steps_not_samples() -> None:
    engine = AlertEngine(AlertConfig(lag_patience=30, warmup=0), every=10)
    raised = []
    for step in (10, 20, 30, 40):
        rec = {"step": step, "tensors": {}, "overall": {"second_moment_lag": 1e-5}}
        raised += [a.step for a in engine.evaluate(rec)]
    assert raised == [30]  # three samples of 10 steps each


def test_alert_objects() -> None:
    a = Alert("grad_spike", 12, None, 5.0, 2.0, "what it means")
    assert str(a) == "adamkit alert grad_spike at step 12: what it means"
    assert a.to_dict() == {"name": "grad_spike", "step": 12, "tensor": None, "value": 5.0,
                           "threshold": 2.0, "message": "what it means"}  # fmt: skip
    assert set(ALERT_NAMES) <= set(AlertConfig.__dataclass_fields__)  # each has a threshold


def test_alerts_judged_on_arrays_are_those_of_the_records() -> None:
    """The Monitor judges its per-tensor alerts on arrays (TensorTable); the same records,
    replayed as dicts through a fresh engine (the path for records from elsewhere), raise
    the very same alerts, values and messages included: lr 1.0 fires update_too_large on both
    matrices; sign descent (betas 0) fires sign_descent, then a NaN gradient nonfinite."""

    def inject(step: int, model: nn.Module, opt) -> None:
        if step == 125:
            model[0].weight.grad[1, 2] = math.nan

    runs = [digits_run(20, lr=1.0), digits_run(130, betas=(0.0, 0.0), lr=1e-4, grad_hook=inject)]
    names = set()
    for monitor, _ in runs:
        engine = AlertEngine(AlertConfig())
        replayed = []
        for rec in monitor.history():
            replayed += engine.evaluate(rec, [(rec["step"], rec["loss"])])
        assert replayed == monitor.alerts
        names |= {a.name for a in monitor.alerts}
    assert {"update_too_large", "sign_descent", "nonfinite"} <= names


def test_records_read_late_or_written_at_once_are_the_same() -> None:
    """A record's tensors are built when it is read (latest, history) or written to a sink:
    records read at every step and records read only at the end hold the same values; with
    keep=4 the last 4 come back, each with its tensors; with tensors=False, none."""

    class Keep:
        def __init__(self) -> None:
            self.records = []

        def write(self, record) -> None:
            self.records.append(dict(record))

        def close(self) -> None:
            pass

    def run(read: bool = False, **kwargs):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        opt = adamkit.AdamW(model.parameters(), lr=1e-2)
        monitor = Monitor(opt, names=model, **kwargs)
        seen = []
        for step in range(6):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[step * 32 : step * 32 + 32]), Y[:32]).backward()
            opt.step()
            if read:
                seen.append(monitor.latest())
        return monitor, seen

    sink = Keep()
    late, _ = run()
    eager, seen = run(read=True, sinks=[sink])
    kept, _ = run(keep=4)
    bare, _ = run(tensors=False)
    drop = ("time",)
    for a, b, c in zip(late.history(), eager.history(), sink.records):
        assert a["tensors"] and set(a["tensors"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
        assert {k: v for k, v in a.items() if k not in drop} == {
            k: v for k, v in b.items() if k not in drop
        }
        assert c["tensors"] == b["tensors"]
    assert seen == eager.history()  # (read as they came: the same dicts)
    assert [r["step"] for r in kept.history()] == [3, 4, 5, 6]
    assert all(r["tensors"] == a["tensors"] for r, a in zip(kept.history(), late.history()[2:]))
    assert all(r["tensors"] == {} for r in bare.history())
    assert bare.latest()["overall"] == late.latest()["overall"]
