"""Every Monitor signal against a by-hand float64 computation on a small model."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from torch import nn

import adamkit
from adamkit.diagnostics import Monitor, SpikeGuard
from adamkit.diagnostics import signals as S

Q = (5, 50, 95)


def by_hand(p0, p1, g, m, v, t, b1, b2, eps, lr):
    """The documented formulas, in float64 NumPy, over concatenated entries."""
    f = lambda x: np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in x])  # noqa: E731
    p0, p1, g, m, v = f(p0), f(p1), f(g), f(m), f(v)
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    root = np.sqrt(v_hat)
    u = m_hat / (root + eps)
    rms = lambda x: math.sqrt(np.mean(x**2))  # noqa: E731
    active = v > 0
    return {
        "grad_norm": float(np.linalg.norm(g)),
        "grad_rms": rms(g),
        "update_rms": rms(u),
        "log10_update_to_weight": math.log10(rms(p1 - p0) / rms(p0)),
        "eps_dominated_frac": float(np.sum(active & (root < eps)) / np.sum(active)),
        "large_update_frac": float(np.sum((np.abs(u) > 0.5) & active) / np.sum(active)),
        "second_moment_lag": float(np.sum(g**2) / np.sum(v_hat)),
        **{
            f"eff_lr_p{q}": float(
                np.percentile(lr / (root[active] + eps), q, method="inverted_cdf")
            )
            for q in Q
        },
        "exp_avg_norm": float(np.linalg.norm(m)),
        "exp_avg_sq_norm": float(np.linalg.norm(v)),
    }


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    return model


def batches(n: int):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(16, 6, generator=g)
        x[:, 0] = 0.0  # a dead input: its weight column never gets a gradient (v = 0)
        y = torch.randn(16, 3, generator=g)
        yield x, y


# name -> (factory, whether the dead input column keeps v exactly 0: not with coupled L2,
# which adds wd * p to the gradient, nor with int8 codes, whose smallest v is not 0)
OPTIMIZERS = {
    "adamkit.AdamW": lambda ps: adamkit.AdamW(ps, lr=3e-2, eps=1e-4, weight_decay=0.1),
    "adamkit.Adam amsgrad L2": lambda ps: adamkit.Adam(
        ps, lr=1e-2, eps=1e-4, weight_decay=1e-4, amsgrad=True
    ),
    "adamkit.AdamW int8": lambda ps: adamkit.AdamW(
        ps, lr=3e-2, eps=1e-4, state_dtype="int8", min_quantized_size=0
    ),
    "torch.AdamW": lambda ps: torch.optim.AdamW(ps, lr=3e-2, eps=1e-4, foreach=False),
    "torch.Adam foreach amsgrad": lambda ps: torch.optim.Adam(
        ps, lr=1e-2, eps=1e-4, amsgrad=True, foreach=True
    ),
}


DEAD_V_IS_ZERO = {"adamkit.AdamW", "torch.AdamW", "torch.Adam foreach amsgrad"}


@pytest.mark.parametrize("case", OPTIMIZERS)
def test_every_signal_matches_a_by_hand_computation(case) -> None:
    make = OPTIMIZERS[case]
    model = small_model()
    opt = make(model.parameters())
    monitor = Monitor(opt, names=model, alerts=False)
    before = {}
    for i, (x, y) in enumerate(batches(4)):
        opt.zero_grad()
        loss = (model(x) * 0.05 - y * 0.05).square().mean()  # grads around eps, for fractions
        loss.backward()
        monitor.observe(loss=loss)
        if i == 3:
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
    rec = monitor.latest()
    assert rec["step"] == 4
    group = opt.param_groups[0]
    b1, b2 = group["betas"]
    amsgrad = group["amsgrad"]
    decoded = getattr(opt, "decoded_state", lambda p: opt.state[p])
    names = [n for n, _ in model.named_parameters()]
    cols: dict[str, list] = {k: [] for k in ("p0", "p1", "g", "m", "v", "vraw")}
    for name, p in model.named_parameters():
        st = decoded(p)
        v_used = st["max_exp_avg_sq"] if amsgrad else st["exp_avg_sq"]
        parts = (before[name], p.detach(), p.grad, st["exp_avg"], v_used, st["exp_avg_sq"])
        for key, value in zip(cols, parts):
            cols[key].append(value.numpy())
        want = by_hand(*parts[:5], t=4, b1=b1, b2=b2, eps=group["eps"], lr=group["lr"])
        got = rec["tensors"][name]
        assert got["updated"] and got["opt_step"] == 4 and got["shape"] == list(p.shape)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=2e-5, abs=1e-12), (name, key)
        assert got["exp_avg_sq_norm"] == pytest.approx(np.linalg.norm(parts[5]), rel=2e-5)
        assert got["grad_nonfinite"] == got["state_nonfinite"] == got["param_nonfinite"] == 0
    # the dead input column: v = 0 there, so it counts neither as eps-dominated nor as large
    assert (cols["v"][0][:, 0] == 0).all() == (case in DEAD_V_IS_ZERO)
    want = by_hand(*(cols[k] for k in ("p0", "p1", "g", "m", "v")), 4, b1, b2, group["eps"],
                   group["lr"])  # fmt: skip
    for scope in (rec["overall"], rec["groups"][0]):
        for key, value in want.items():
            assert scope[key] == pytest.approx(value, rel=2e-5, abs=1e-12), key
        assert scope["numel"] == sum(p.numel() for p in model.parameters())
        assert scope["tensors"] == scope["updated"] == len(names)
    # the checks are not vacuous: the fractions are strictly between 0 and 1
    assert 0 < want["eps_dominated_frac"] < 1 and 0 < want["large_update_frac"] < 1


def test_groups_aggregate_their_own_tensors_with_their_own_lr() -> None:
    model = small_model()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = adamkit.AdamW([{"params": weights, "lr": 1e-2}, {"params": biases, "lr": 1e-3}], eps=1e-3)
    monitor = Monitor(opt, alerts=False)
    snap = {}
    for i, (x, y) in enumerate(batches(2)):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        if i == 1:
            snap = {p: p.detach().clone() for p in model.parameters()}
        opt.step()
    rec = monitor.latest()
    assert list(rec["tensors"]) == ["group0.param0", "group0.param1", "group1.param0",
                                    "group1.param1"]  # fmt: skip
    for gi, ps in enumerate((weights, biases)):
        lr = opt.param_groups[gi]["lr"]
        parts = [[a[k] for a in [{"p0": snap[p], "p1": p.detach(), "g": p.grad,
                                  "m": opt.state[p]["exp_avg"], "v": opt.state[p]["exp_avg_sq"]}
                                 for p in ps]] for k in ("p0", "p1", "g", "m", "v")]  # fmt: skip
        want = by_hand(*parts, t=2, b1=0.9, b2=0.999, eps=1e-3, lr=lr)
        got = rec["groups"][gi]
        assert got["lr"] == lr
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=2e-5), (gi, key)
    # overall percentiles mix the groups' lrs: p95 comes from the lr=1e-2 group
    assert rec["overall"]["eff_lr_p95"] == pytest.approx(rec["groups"][0]["eff_lr_p95"])
    assert rec["overall"]["eff_lr_p5"] <= rec["groups"][1]["eff_lr_p50"]


def test_single_signal_definitions_by_hand() -> None:
    m = torch.tensor([0.1, -0.2, 0.0, 1e-6])
    v = torch.tensor([0.01, 0.04, 0.0, 1e-16])
    t, b1, b2, eps = 1.0, 0.9, 0.999, 1e-6
    # t = 1: m_hat = m / 0.1, v_hat = v / 0.001
    u = S.normalized_update(m, v, t, b1, b2, eps)
    want_u = [1.0 / (math.sqrt(10.0) + 1e-6), -2.0 / (math.sqrt(40.0) + 1e-6), 0.0,
              1e-5 / (math.sqrt(1e-13) + 1e-6)]  # fmt: skip
    assert u.tolist() == pytest.approx(want_u, rel=1e-5)
    assert float(S.update_rms(u)) == pytest.approx(math.sqrt(sum(x * x for x in want_u) / 4))
    # sqrt(v_hat) = [3.16, 6.32, 0, 3.2e-7]: the last of the three with v > 0 is below eps
    assert float(S.eps_dominated_frac(v, t, b2, eps)) == pytest.approx(1 / 3)
    # |u| = [0.316, 0.316, 0, 7.6]: one of the three active entries is above 0.5
    assert float(S.large_update_frac(u, v)) == pytest.approx(1 / 3)
    g = torch.tensor([0.1, 0.1, 0.0, 0.0])
    assert float(S.second_moment_lag(g, v, t, b2)) == pytest.approx(0.02 / (0.05 / 0.001))
    assert S.effective_lr(v, t, b2, eps, 0.5).tolist() == pytest.approx(
        [0.5 / (math.sqrt(10) + 1e-6), 0.5 / (math.sqrt(40) + 1e-6), 0.5 / 1e-6,
         0.5 / (math.sqrt(1e-13) + 1e-6)], rel=1e-5)  # fmt: skip
    p0 = torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert float(S.log10_update_to_weight(p0, p0 * 1.001)) == pytest.approx(-3.0, abs=1e-4)
    assert float(S.grad_norm(torch.tensor([3.0, 4.0]))) == 5.0
    assert int(S.nonfinite_count(torch.tensor([1.0, math.nan]), torch.tensor([math.inf]))) == 2


def _large_case():
    gen = torch.Generator().manual_seed(3)
    shape = (300, 70)  # 21000 entries: the sample is runs of adjacent entries
    p0 = torch.randn(shape, generator=gen)
    p1 = p0 + 1e-3 * torch.randn(shape, generator=gen)
    g = torch.randn(shape, generator=gen) * 1e-3
    m = torch.randn(shape, generator=gen) * 1e-4
    # |m| / sqrt(v) between 0.3 and 2, as Adam's moments keep it; sqrt(v) straddles eps
    v = (m / (0.3 + 1.7 * torch.rand(shape, generator=gen))).square()
    v[:10] = 0.0
    m[:10] = 0.0
    return p0, p1, g, m, v, 7.0, 0.9, 0.99, 1e-4  # t, beta1, beta2, eps


def _definitions(p0, p1, g, m, v, t, b1, b2, eps, lr=0.1):
    u = S.normalized_update(m, v, t, b1, b2, eps)
    return {
        "grad_norm": float(S.grad_norm(g)),
        "update_rms": float(S.update_rms(u)),
        "log10_update_to_weight": float(S.log10_update_to_weight(p0, p1)),
        "second_moment_lag": float(S.second_moment_lag(g, v, t, b2)),
        "eps_dominated_frac": float(S.eps_dominated_frac(v, t, b2, eps)),
        "large_update_frac": float(S.large_update_frac(u, v)),
        "exp_avg_norm": float(m.norm()),
        "exp_avg_sq_norm": float(v.norm()),
        "eff_lr_p50": float(S.effective_lr(v, t, b2, eps, lr)[v > 0].quantile(0.5)),
    }


def test_fused_sums_are_exact() -> None:
    p0, p1, g, m, v, t, b1, b2, eps = _large_case()
    bc1, bc2 = S.bias_corrections(t, b1, b2)
    vec = S.fused_sums(p0, p1, g, m, v, None, bc1, bc2, eps).double().numpy()
    rows = np.stack([S.sample_of(x).numpy() for x in (p0, p1, g, m, v, v)])
    got = S.tensor_signals(rows, numel=p0.numel(), grad_sq=0.0, m_sq=0.0, v_sq=0.0, step=t,
                           beta1=b1, beta2=b2, eps=eps, lr=0.1, exact=vec)  # fmt: skip
    want = _definitions(p0, p1, g, m, v, t, b1, b2, eps)
    for key in ("grad_norm", "update_rms", "log10_update_to_weight", "second_moment_lag",
                "exp_avg_norm", "exp_avg_sq_norm"):  # fmt: skip
        assert got[key] == pytest.approx(want[key], rel=1e-5), key


def test_a_sample_of_runs_estimates_a_large_tensor() -> None:
    p0, p1, g, m, v, t, b1, b2, eps = _large_case()
    stride = S.sample_stride(p0.numel())
    assert stride == 8 * 43  # runs of 8, the smallest prime >= 21000 / 512 runs of 8 apart
    rows = np.stack([S.sample_of(x).numpy() for x in (p0, p1, g, m, v, v)])
    assert rows.shape == (6, 8 * ((21000 - 8) // stride + 1))  # every run that fits
    # the sample is the entries at sample_positions, runs of 8 adjacent ones
    positions = S.sample_positions(p0.numel())
    assert list(positions[:10]) == [0, 1, 2, 3, 4, 5, 6, 7, stride, stride + 1]
    assert np.array_equal(rows[3], m.numpy().ravel()[positions])
    got = S.tensor_signals(
        rows, numel=p0.numel(), grad_sq=float(g.square().sum()), m_sq=float(m.square().sum()),
        v_sq=float(v.square().sum()), step=t, beta1=b1, beta2=b2, eps=eps, lr=0.1,
    )  # fmt: skip
    # on the sampled entries the signals are the definitions exactly
    on_sample = _definitions(*(torch.from_numpy(r) for r in rows[:5]), t, b1, b2, eps)
    for key in ("eps_dominated_frac", "large_update_frac", "update_rms"):
        assert got[key] == pytest.approx(on_sample[key], rel=1e-5), key
    want = _definitions(p0, p1, g, m, v, t, b1, b2, eps)
    for key in ("grad_norm", "exp_avg_norm", "exp_avg_sq_norm"):  # given exactly
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    # and the sample estimates the whole tensor within a few percent
    for key in ("update_rms", "second_moment_lag", "eff_lr_p50"):
        assert got[key] == pytest.approx(want[key], rel=0.06), key
    assert got["log10_update_to_weight"] == pytest.approx(want["log10_update_to_weight"], abs=0.03)
    for key in ("eps_dominated_frac", "large_update_frac"):
        assert got[key] == pytest.approx(want[key], abs=0.05), key
    assert 0.1 < want["large_update_frac"] < 0.9 and 0.1 < want["eps_dominated_frac"] < 0.9


def test_the_sample_does_not_alias_onto_matrix_columns() -> None:
    assert [S.sample_stride(n) for n in (1, 512, 513, 4096, 21000)] == [1, 1, 24, 88, 344]
    assert S.sample_runs(512) == (1, 512, 512) and S.sample_runs(513) == (22, 8, 24)
    # a 64 x 64 weight whose inputs 0, 8, 16, ... are dead: single entries 8 apart would see
    # only them
    v = torch.full((64, 64), 1e-4)
    v[:, ::8] = 0.0
    assert v.reshape(-1)[::8].count_nonzero() == 0
    sample = S.sample_of(v)
    assert sample.count_nonzero() / sample.numel() == pytest.approx(7 / 8, abs=0.02)
    # and the runs start in every eighth column: 88 = 8 x 11 walks them all (11 is odd)
    starts = S.sample_positions(v.numel())[::8] % 64
    assert set(starts.tolist()) == set(range(0, 64, 8))


def test_percentiles_are_nearest_rank_and_weighted() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        x = rng.standard_normal(n)
        for q in (0, 5, 50, 95, 100):
            want = float(np.percentile(x, q, method="inverted_cdf"))
            assert S.percentiles(x, [q]) == [want]
            assert S.percentiles(x, [q], np.full(n, 4.0)) == [want]
    # one sample standing for 9 entries outweighs three standing for 1 each
    assert S.percentiles([1.0, 2.0, 3.0, 10.0], [50], [1, 1, 1, 9]) == [10.0]


def test_rolling_stats_spike_rule() -> None:
    stats = S.RollingStats(window=4, warmup=3)
    for x in (1.0, 2.0):
        assert not stats.is_spike(x, 1.0)
        stats.add(x)
    assert not stats.ready() and stats.bound(1.0) == math.inf
    stats.add(math.nan)  # never enters the statistics
    stats.add(3.0)
    mean, std = stats.mean_std()
    assert (mean, std) == (2.0, 1.0)  # Bessel-corrected
    assert stats.bound(2.0) == 4.0
    assert stats.is_spike(4.01, 2.0) and not stats.is_spike(4.0, 2.0)
    assert not stats.is_spike(math.inf, 2.0)
    for x in (4.0, 5.0, 6.0):
        stats.add(x)
    assert list(stats.values) == [3.0, 4.0, 5.0, 6.0]  # window of 4
    with pytest.raises(ValueError, match="warmup"):
        S.RollingStats(window=4, warmup=5)


def test_loss_statistics_and_observe_averaging() -> None:
    model = small_model()
    opt = adamkit.Adam(model.parameters())
    monitor = Monitor(opt, every=3, loss_window=4, alerts=False)
    losses = []
    for i, (x, y) in enumerate(batches(9)):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        monitor.observe(loss=loss)
        monitor.observe(loss=float(i))  # two observations of one step are averaged
        losses.append((loss.item() + i) / 2)
        opt.step()
    recs = monitor.history()
    assert [r["step"] for r in recs] == [3, 6, 9]
    assert recs[-1]["loss"] == pytest.approx(losses[-1])
    window = np.array(losses[-4:])
    assert recs[-1]["loss_mean"] == pytest.approx(window.mean())
    assert recs[-1]["loss_std"] == pytest.approx(window.std(ddof=1))
    with pytest.raises(ValueError, match="scalar"):
        monitor.observe(loss=torch.ones(2))


def test_unsampled_steps_take_no_snapshot() -> None:
    model = small_model()
    opt = adamkit.AdamW(model.parameters())
    monitor = Monitor(opt, every=5, alerts=False)
    seen = []
    # registered after the Monitor's: runs right after its pre-hook, before the step
    opt.register_step_pre_hook(lambda o, a, k: seen.append(monitor._snapshot is not None))
    for x, y in batches(10):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
    assert seen == [False] * 4 + [True] + [False] * 4 + [True]
    assert [r["step"] for r in monitor.history()] == [5, 10]
    monitor.close()
    opt.zero_grad()
    (model(x) - y).square().mean().backward()
    opt.step()
    assert len(monitor.history()) == 2  # detached


def test_names_from_a_model_pairs_groups_or_positions() -> None:
    model = small_model()
    expected = [n for n, _ in model.named_parameters()]

    def run(opt, names=None):
        monitor = Monitor(opt, names=names, alerts=False)
        for x, y in batches(1):
            opt.zero_grad()
            (model(x) - y).square().mean().backward()
            opt.step()
        return list(monitor.latest()["tensors"])

    assert run(adamkit.Adam(model.parameters()), model) == expected
    assert run(adamkit.Adam(model.parameters()), model.named_parameters()) == expected
    assert run(adamkit.Adam(model.named_parameters())) == expected  # the group's param_names
    assert run(adamkit.Adam(model.parameters())) == [f"group0.param{i}" for i in range(4)]


def test_nonfinite_counts_and_skipped_tensors() -> None:
    model = small_model()
    opt = adamkit.AdamW(model.parameters(), skip_nonfinite=True)
    monitor = Monitor(opt, names=model, alerts=False)
    for i, (x, y) in enumerate(batches(3)):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        if i == 2:
            model[0].weight.grad[1, :3] = torch.tensor([math.nan, math.inf, -math.inf])
        opt.step()
    rec = monitor.latest()
    assert rec["skipped"] and rec["skipped_steps"] == 1
    w = rec["tensors"]["0.weight"]
    assert w["grad_nonfinite"] == 3 and w["state_nonfinite"] == 0 and w["param_nonfinite"] == 0
    assert math.isnan(w["grad_norm"])
    assert not w["updated"] and w["update_rms"] is None and w["opt_step"] == 2
    assert rec["overall"]["grad_nonfinite"] == 3 and rec["overall"]["updated"] == 0
    # moments are still reported for a skipped tensor
    assert w["exp_avg_norm"] == pytest.approx(float(opt.state[model[0].weight]["exp_avg"].norm()))


@pytest.mark.parametrize("exact", ["all", "grad"])
def test_nan_in_state_is_counted(exact) -> None:
    model = small_model()
    opt = torch.optim.Adam(model.parameters())
    monitor = Monitor(opt, names=model, alerts=False, exact=exact)
    for i, (x, y) in enumerate(batches(2)):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        if i == 1:
            model[2].bias.grad[0] = math.nan  # enters m, v and the param in this step
        opt.step()
    t = monitor.latest()["tensors"]["2.bias"]
    assert t["grad_nonfinite"] == 1 and t["state_nonfinite"] == 2 and t["param_nonfinite"] == 1


def test_exact_grad_reads_the_grads_and_samples_the_moments() -> None:
    """exact="grad": tensors of up to SAMPLE entries are sampled whole, so their records
    equal exact="all"'s; in a large tensor a NaN gradient is still counted, with the state and
    the param it reached (the gradient's norm triggers the count)."""
    records = {}
    for exact in ("all", "grad"):
        model = small_model()
        opt = adamkit.AdamW(model.parameters())
        monitor = Monitor(opt, names=model, alerts=False, exact=exact)
        for x, y in batches(3):
            opt.zero_grad()
            (model(x) - y).square().mean().backward()
            opt.step()
        records[exact] = monitor.latest()
        assert records[exact]["exact"] == exact
    for name, want in records["all"]["tensors"].items():
        got = records["grad"]["tensors"][name]
        assert got["sample"] == got["numel"] == want["numel"]
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-6), (name, key)  # fp32 vs f64 sums

    torch.manual_seed(0)
    layer = nn.Linear(300, 40)  # 12000 weights: sampled
    opt = torch.optim.Adam(layer.parameters())
    monitor = Monitor(opt, names=layer, alerts=False, exact="grad")
    for i in range(2):
        opt.zero_grad()
        layer(torch.randn(8, 300)).square().mean().backward()
        if i == 1:
            layer.weight.grad[3, 7] = math.nan
        opt.step()
    w = monitor.latest()["tensors"]["weight"]
    assert w["sample"] < w["numel"]
    assert w["grad_nonfinite"] == 1 and w["state_nonfinite"] == 2 and w["param_nonfinite"] == 1


def test_decoded_state_is_read_when_the_optimizer_has_one() -> None:
    model = small_model()

    class Decoding(adamkit.AdamW):
        def decoded_state(self, param):
            st = super().decoded_state(param)
            return {**st, "exp_avg": st["exp_avg"] * 0 + 2.0} if st else st

    opt = Decoding(model.parameters())
    monitor = Monitor(opt, names=model, alerts=False)
    for x, y in batches(1):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
    t = monitor.latest()["tensors"]["0.weight"]
    assert t["exp_avg_norm"] == pytest.approx(2.0 * math.sqrt(30))


def test_fused_signal_sums_replace_the_sampled_estimates(monkeypatch) -> None:
    """An optimizer that computes the exact sums inside its step gets them used, and the
    Monitor then reads no gradient or moment in full."""
    import adamkit.diagnostics.readout as R

    norm_calls = []
    real_norms = R.tensor_norms
    monkeypatch.setattr(R, "tensor_norms", lambda *a: norm_calls.append(1) or real_norms(*a))

    class Fusing(adamkit.AdamW):
        supports_fused_signals = True
        requests = 0

        def step(self, closure=None):
            before = {p: p.detach().clone() for g in self.param_groups for p in g["params"]}
            # the unhooked parent step: calling super().step() would run the hooks twice
            with torch.no_grad():
                inspect.unwrap(adamkit.AdamW.step)(self, closure)
            if getattr(self, "fused_signals_request", False):
                self.requests += 1
                self.fused_signal_sums = {}
                for group in self.param_groups:
                    b1, b2 = group["betas"]
                    for p in group["params"]:
                        st = self.state[p]
                        bc1, bc2 = S.bias_corrections(float(st["step"]), b1, b2)
                        self.fused_signal_sums[p] = S.fused_sums(
                            before[p], p.detach(), p.grad, st["exp_avg"], st["exp_avg_sq"],
                            None, bc1, bc2, group["eps"],
                        )  # fmt: skip

    results, calls = {}, {}
    for cls, exact in ((adamkit.AdamW, "grad"), (adamkit.AdamW, "all"), (Fusing, "grad")):
        norm_calls.clear()
        torch.manual_seed(0)
        layer = nn.Linear(300, 40)  # 12000 weights: the Monitor alone samples them
        opt = cls(layer.parameters(), lr=1e-2)
        monitor = Monitor(opt, names=layer, every=2, alerts=False, exact=exact)
        gen = torch.Generator().manual_seed(0)
        for _ in range(4):
            opt.zero_grad()
            layer(torch.randn(8, 300, generator=gen)).square().mean().backward()
            before = layer.weight.detach().clone()
            opt.step()
        st = opt.state[layer.weight]
        want = by_hand([before], [layer.weight.detach()], [layer.weight.grad], [st["exp_avg"]],
                       [st["exp_avg_sq"]], 4, 0.9, 0.999, 1e-8, 1e-2)  # fmt: skip
        results[cls, exact] = (monitor.latest()["tensors"]["weight"], want, opt)
        calls[cls, exact] = len(norm_calls)
    assert calls[Fusing, "grad"] == 0 and calls[adamkit.AdamW, "grad"] > 0
    sampled = ("update_rms", "log10_update_to_weight", "second_moment_lag")
    got, want, opt = results[Fusing, "grad"]
    assert opt.requests == 2 and opt.fused_signals_request is False
    for key in (*sampled, "grad_norm", "exp_avg_norm", "exp_avg_sq_norm"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    for exact, full in (("grad", ("grad_norm",)), ("all", ("grad_norm", "exp_avg_norm"))):
        got, want, _ = results[adamkit.AdamW, exact]
        assert S.SAMPLE // 2 < got["sample"] <= S.SAMPLE < got["numel"] == 12000
        for key in full:  # read in full
            assert got[key] == pytest.approx(want[key], rel=1e-5), (exact, key)
        estimated = [*sampled, *(("exp_avg_norm", "exp_avg_sq_norm") if exact == "grad" else ())]
        for key in estimated:  # the sampled estimates are close, not exact
            assert got[key] == pytest.approx(want[key], rel=0.15) and got[key] != pytest.approx(
                want[key], rel=1e-5
            ), (exact, key)


def test_bf16_and_complex_params() -> None:
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(8, 4).to(torch.bfloat16))
    c = nn.Parameter(torch.randn(5, dtype=torch.complex64))
    opt = adamkit.AdamW([p, c], lr=1e-2)
    monitor = Monitor(opt, alerts=False)
    for _ in range(2):
        opt.zero_grad()
        (p.float().square().sum() + (c * c.conj()).real.sum()).backward()
        before = [p.detach().float().clone(), torch.view_as_real(c.detach()).clone()]
        opt.step()
    rec = monitor.latest()["tensors"]
    st = opt.decoded_state(c)
    want = by_hand([before[1]], [torch.view_as_real(c.detach())], [torch.view_as_real(c.grad)],
                   [torch.view_as_real(st["exp_avg"])], [torch.view_as_real(st["exp_avg_sq"])],
                   2, 0.9, 0.999, 1e-8, 1e-2)  # fmt: skip
    assert rec["group0.param1"]["numel"] == 10
    for key in ("grad_norm", "update_rms", "log10_update_to_weight", "second_moment_lag"):
        assert rec["group0.param1"][key] == pytest.approx(want[key], rel=1e-5), key
    st = opt.decoded_state(p)
    want = by_hand([before[0]], [p.detach().float()], [p.grad.float()], [st["exp_avg"]],
                   [st["exp_avg_sq"]], 2, 0.9, 0.999, 1e-8, 1e-2)  # fmt: skip
    for key in ("grad_norm", "update_rms", "log10_update_to_weight"):
        assert rec["group0.param0"][key] == pytest.approx(want[key], rel=1e-5), key


def test_invalid_arguments() -> None:
    opt = adamkit.Adam([nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="every"):
        Monitor(opt, every=0)
    with pytest.raises(TypeError, match="Optimizer"):
        Monitor(object())
    with pytest.raises(ValueError, match="Unknown alert settings"):
        Monitor(opt, alerts={"eps_dominatd": 0.5})
    with pytest.raises(ValueError, match="exact='moments'"):
        Monitor(opt, exact="moments")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"names": 42}, TypeError, r"names must be an nn.Module, \(name, param\) pairs"),
        ({"names": "weight"}, TypeError, r"names must be an nn.Module"),
        (
            {"names": ["weight"]},
            TypeError,
            r"names must hold \(name, param\) pairs, got the "
            r"entry 'weight'",
        ),
        ({"names": [(0, torch.zeros(2))]}, TypeError, r"names must hold \(name, param\) pairs"),
        ({"sinks": [object()]}, TypeError, r"Invalid sink <object object"),
        ({"loss_window": 1}, ValueError, r"Invalid loss_window=1: must be an int >= 2"),
        ({"loss_window": 2.5}, ValueError, r"Invalid loss_window=2.5"),
        ({"keep": 0}, ValueError, r"Invalid keep=0: must be None or an int >= 1"),
        ({"keep": -1}, ValueError, r"Invalid keep=-1"),
    ],
)
def test_invalid_arguments_are_refused_before_the_first_step(kwargs, error, message) -> None:
    """Refused by the constructor, naming the argument: the step that follows is not broken
    by a hook failing on them (before, ``names=42`` raised from inside ``opt.step()``)."""
    p = nn.Parameter(torch.zeros(2))
    opt = adamkit.Adam([p])
    with pytest.raises(error, match=message):
        Monitor(opt, **kwargs)
    p.grad = torch.ones(2)
    opt.step()  # no hook of the refused Monitor is left on the optimizer
    assert p.detach().tolist() == pytest.approx([-1e-3, -1e-3])


def test_names_as_a_dict_or_pairs_name_the_records() -> None:
    model = small_model()
    for names in (dict(model.named_parameters()), list(model.named_parameters()),
                  model.named_parameters()):  # fmt: skip
        opt = adamkit.Adam(model.parameters())
        monitor = Monitor(opt, names=names)
        model(torch.randn(4, 6)).square().mean().backward()
        opt.step()
        assert set(monitor.latest()["tensors"]) == {n for n, _ in model.named_parameters()}
        monitor.close()


@pytest.mark.parametrize(
    ("loss", "error", "message"),
    [
        (None, TypeError, r"loss must be a real number or a one-element tensor, got None"),
        ("0.5", TypeError, r"got '0\.5'"),
        (True, TypeError, r"got True"),
        (torch.ones(2), ValueError, r"loss must be a scalar, got a tensor of shape \(2,\)"),
        (torch.ones(1, dtype=torch.complex64), ValueError, r"loss must be real"),
    ],
)
def test_observe_refuses_what_is_not_a_loss(loss, error, message) -> None:
    """Monitor and SpikeGuard alike; nothing is queued, so the next record's loss is the
    next good one."""
    opt = adamkit.Adam([nn.Parameter(torch.zeros(2))])
    monitor, guard = Monitor(opt), SpikeGuard(opt)
    for watcher in (monitor, guard):
        with pytest.raises(error, match=message):
            watcher.observe(loss=loss)
    monitor.observe(loss=np.float32(0.25))
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    opt.step()
    assert monitor.latest()["loss"] == 0.25


def test_a_step_with_a_closure_is_measured() -> None:
    model = small_model()
    opt = adamkit.Adam(model.parameters())
    monitor = Monitor(opt, names=model, alerts=False)
    x, y = next(batches(1))

    def closure():
        opt.zero_grad(set_to_none=True)  # no gradient exists when step() is called
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    rec = monitor.latest()
    assert rec["overall"]["updated"] == 4
    assert rec["tensors"]["0.weight"]["grad_norm"] == pytest.approx(
        float(model[0].weight.grad.norm())
    )
