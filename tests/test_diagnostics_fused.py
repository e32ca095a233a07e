"""Fused signal sums: ``signals.fused_sums`` against float64 by hand (eager and compiled), and the
Monitor's side of the protocol with an optimizer that computes them in its step: every signal
but the effective-lr percentiles exact, and none of the norm or sample work they replace."""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import adamkit.diagnostics.readout as R
from adamkit.diagnostics import Monitor
from adamkit.diagnostics import signals as S

LR, EPS, BETAS = 1e-2, 2e-5, (0.9, 0.999)


def by_hand_sums(p0, p1, g, m, v, vmax, bc1, bc2, eps) -> dict[str, float]:
    """Every column of ``fused_sums`` in float64 NumPy, from its definition, and the
    non-finite counts the Monitor reports."""
    p0, p1, g, m, v = (np.asarray(x, dtype=np.float64).ravel() for x in (p0, p1, g, m, v))
    used = v if vmax is None else np.asarray(vmax, dtype=np.float64).ravel()
    with np.errstate(invalid="ignore", over="ignore"):
        root = np.sqrt(used / bc2)
        u = (m / bc1) / (root + eps)
        active = used > 0
        state = [m, v] + ([] if vmax is None else [used])
        return {
            "grad_sq": np.sum(g**2),
            "param_sq": np.sum(p0**2),
            "delta_sq": np.sum((p1 - p0) ** 2),
            "update_sq": np.sum(u**2),
            "v_hat_sum": np.sum(used / bc2),
            "m_sq": np.sum(m**2),
            "v_sq": np.sum(v**2),
            "active": np.sum(active),
            "eps_count": np.sum(active & (root < eps)),
            "large": np.sum(active & (np.abs(u) > S.LARGE_UPDATE)),
            "grad_nonfinite": np.sum(~np.isfinite(g)),
            "state_nonfinite": sum(np.sum(~np.isfinite(x)) for x in state),
            "param_nonfinite": np.sum(~np.isfinite(p1)),
        }


def moments_case(n: int = 6000, *, nonfinite: bool = False, amsgrad: bool = False):
    """Inputs of fused_sums with fractions strictly between 0 and 1 and some v = 0 entries;
    ``nonfinite``: NaN and inf in every input (never in p0: the sums would all be NaN)."""
    gen = torch.Generator().manual_seed(5)
    bc1, bc2 = S.bias_corrections(6.0, *BETAS)
    p0 = torch.randn(n, generator=gen)
    p1 = p0 + 1e-3 * torch.randn(n, generator=gen)
    g = 1e-3 * torch.randn(n, generator=gen)
    m = 1e-4 * torch.randn(n, generator=gen)
    # |m_hat| / sqrt(v_hat) between 0.3 and 2, as Adam keeps it; sqrt(v_hat) straddles eps
    v = bc2 * (m / bc1 / (0.3 + 1.7 * torch.rand(n, generator=gen))).square()
    v[:50], m[:50] = 0.0, 0.0
    vmax = torch.maximum(v, 1.1 * v) if amsgrad else None
    if nonfinite:
        g[7], g[9] = math.nan, math.inf
        m[100] = -math.inf
        v[200] = math.nan
        p1[300] = math.nan
        if vmax is not None:
            vmax[400] = math.inf
    return (p0, p1, g, m, v, vmax, bc1, bc2, 2e-4)


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("nonfinite", [False, True], ids=["finite", "nonfinite"])
def test_fused_sums_match_their_definitions(amsgrad, nonfinite) -> None:
    args = moments_case(nonfinite=nonfinite, amsgrad=amsgrad)
    got = S.fused_sums(*args)
    assert got.shape == (S.N_SUMS,) and got.dtype == torch.float32
    want = by_hand_sums(*args)
    for key in S.Sums._fields:
        have, value = float(got[getattr(S.COLUMNS, key)]), want[key]
        if key in ("active", "eps_count", "large"):
            assert have == value, key  # counts are exact
        elif math.isfinite(value):
            assert have == pytest.approx(value, rel=1e-5), key
        else:
            assert not math.isfinite(have), key
    finite = [math.isfinite(float(got[getattr(S.COLUMNS, k)])) for k in S.FINITE_SUMS]
    assert all(finite) != nonfinite  # the sums show whether anything is NaN/inf
    if not nonfinite:  # the checks are not vacuous
        assert 0 < want["eps_count"] < want["active"] and 0 < want["large"] < want["active"]
        assert want["active"] == args[0].numel() - 50


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_fused_sums_compile_to_the_same_numbers(amsgrad) -> None:
    """Traceable in one graph, branch-free, and the compiled counts are the eager ones."""
    compiled = torch.compile(S.fused_sums, fullgraph=True, dynamic=False)
    for nonfinite in (False, True):
        args = moments_case(nonfinite=nonfinite, amsgrad=amsgrad)
        want, got = S.fused_sums(*args), compiled(*args)
        counts = slice(S.COLUMNS.active, None)
        assert torch.equal(got[counts], want[counts]), (got, want)
        assert torch.allclose(got[: counts.start], want[: counts.start], rtol=1e-5, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# the Monitor's side, with an optimizer that computes the sums in its step


class FusingAdamW(torch.optim.AdamW):
    """torch's AdamW that, when a Monitor asks, leaves ``fused_sums`` of every param it
    steps, as a fused executor would (``skip``: names of params to leave without a row)."""

    supports_fused_signals = True

    def __init__(self, params, **kw) -> None:
        super().__init__(params, foreach=False, **kw)
        self.requests = 0
        self.skip: set[int] = set()

    def step(self, closure=None):
        requested = getattr(self, "fused_signals_request", False)
        params = [p for group in self.param_groups for p in group["params"]]
        before = {p: p.detach().clone() for p in params}
        # the unhooked parent step: calling super().step() would run the hooks twice
        with torch.no_grad():
            inspect.unwrap(torch.optim.AdamW.step)(self, closure)
        if not requested:
            return
        self.requests += 1
        self.fused_signal_sums = {}
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is None or i in self.skip:
                    continue
                st = self.state[p]
                bc1, bc2 = S.bias_corrections(float(st["step"]), *group["betas"])
                self.fused_signal_sums[p] = S.fused_sums(
                    before[p], p.detach(), p.grad, st["exp_avg"], st["exp_avg_sq"],
                    st.get("max_exp_avg_sq"), bc1, bc2, group["eps"],
                )  # fmt: skip


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(300, 40), nn.Tanh(), nn.Linear(40, 30))  # 12000, 1200 weights


def train(net: nn.Module, opt, monitor: Monitor, steps: int, nan_at: int | None = None):
    """Steps of a regression; returns (p0, p1) of every param at the last step."""
    gen = torch.Generator().manual_seed(1)
    before = {}
    for step in range(steps):
        x = torch.randn(16, 300, generator=gen)
        x[:, :3] = 0.0  # dead inputs: v = 0 in three weight columns
        opt.zero_grad()
        loss = (net(x) * 0.05 - 0.1).square().mean()
        loss.backward()
        if step == nan_at:
            net[0].weight.grad[5, 7] = math.nan
        monitor.observe(loss=loss)
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        opt.step()
    return before


def by_hand_record(net, opt, before, t) -> dict[str, dict[str, float]]:
    """Per-tensor signals from the full tensors, in float64 (the eff-lr percentiles from the
    Monitor's sample of v)."""
    out = {}
    for name, p in net.named_parameters():
        group = opt.param_groups[0]
        st = opt.state[p]
        vmax = st.get("max_exp_avg_sq") if group["amsgrad"] else None
        bc1, bc2 = S.bias_corrections(float(t), *group["betas"])
        sums = by_hand_sums(before[name], p.detach(), p.grad, st["exp_avg"], st["exp_avg_sq"],
                            vmax, bc1, bc2, group["eps"])  # fmt: skip
        used = (st["exp_avg_sq"] if vmax is None else vmax).double().numpy().ravel()
        sample = used[S.sample_positions(p.numel())]
        eff = group["lr"] / (np.sqrt(sample[sample > 0] / bc2) + group["eps"])
        out[name] = {
            "grad_norm": math.sqrt(sums["grad_sq"]),
            "exp_avg_norm": math.sqrt(sums["m_sq"]),
            "exp_avg_sq_norm": math.sqrt(sums["v_sq"]),
            "update_rms": math.sqrt(sums["update_sq"] / p.numel()),
            "log10_update_to_weight": 0.5 * math.log10(sums["delta_sq"] / sums["param_sq"]),
            "eps_dominated_frac": sums["eps_count"] / sums["active"],
            "large_update_frac": sums["large"] / sums["active"],
            "second_moment_lag": sums["grad_sq"] / sums["v_hat_sum"],
            "grad_nonfinite": sums["grad_nonfinite"],
            "state_nonfinite": sums["state_nonfinite"],
            "param_nonfinite": sums["param_nonfinite"],
            **{
                f"eff_lr_p{q}": float(np.percentile(eff, q, method="inverted_cdf"))
                for q in S.PERCENTILES
            },
        }
    return out


@pytest.fixture
def spy(monkeypatch):
    """Counts the Monitor's norm passes, non-finite passes and sampled rows by kind."""
    seen = {"norms": 0, "nonfinite": 0, "kinds": set()}
    norms, count = R.tensor_norms, S.nonfinite_count
    add, add_cat = R.Samples.add, R.Samples.add_cat

    def spy_norms(*a):
        seen["norms"] += 1
        return norms(*a)

    def spy_count(*a):
        seen["nonfinite"] += 1
        return count(*a)

    def spy_add(self, row, kind, t):
        seen["kinds"].add(S.SAMPLE_ROWS[kind])
        return add(self, row, kind, t)

    def spy_add_cat(self, rows, kind, cat, sizes):
        seen["kinds"].add(S.SAMPLE_ROWS[kind])
        return add_cat(self, rows, kind, cat, sizes)

    monkeypatch.setattr(R, "tensor_norms", spy_norms)
    monkeypatch.setattr(S, "nonfinite_count", spy_count)
    monkeypatch.setattr(R.Samples, "add", spy_add)
    monkeypatch.setattr(R.Samples, "add_cat", spy_add_cat)
    return seen


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_the_monitor_uses_every_fused_sum(spy, amsgrad) -> None:
    net = model()
    opt = FusingAdamW(net.parameters(), lr=LR, eps=EPS, betas=BETAS, amsgrad=amsgrad)
    monitor = Monitor(opt, names=net, every=2, alerts=False)
    snapshots = []
    # registered after the Monitor's: sees what its pre-hook took
    opt.register_step_pre_hook(lambda *a: snapshots.append(monitor._snapshot))
    before = train(net, opt, monitor, 6)
    assert opt.requests == 3 and opt.fused_signals_request is False
    assert opt.fused_signal_sums is None  # read and dropped: never reused by a later record
    # the first sampled step snapshots p0 (nothing is known yet); later ones need no p0
    taken = [s.p0 is not None for s in snapshots if s is not None]
    assert taken == [True, False, False]
    # no norm pass, no non-finite pass, and only v is sampled (for the eff-lr percentiles)
    assert spy["norms"] == 0 and spy["nonfinite"] == 0
    assert spy["kinds"] == {"p0", "v"}  # p0: the first sampled step only
    rec = monitor.latest()
    want = by_hand_record(net, opt, before, 6)
    for name, signals in want.items():
        got = rec["tensors"][name]
        assert got["updated"] and got["opt_step"] == 6
        for key, value in signals.items():
            if key.endswith("_frac") or key.endswith("nonfinite"):
                assert got[key] == value, (name, key)  # exact counts
            else:
                assert got[key] == pytest.approx(value, rel=2e-6), (name, key)
    weight = want["0.weight"]
    assert 0 < weight["eps_dominated_frac"] < 1 and 0 < weight["large_update_frac"] < 1
    # the model's signals are ratios of the tensors' exact sums
    overall = rec["overall"]
    total = lambda key: sum(t[key] for t in rec["tensors"].values())  # noqa: E731
    assert overall["grad_norm"] == pytest.approx(
        math.sqrt(sum(w["grad_norm"] ** 2 for w in want.values())), rel=2e-6
    )
    assert overall["updated"] == 4 and overall["grad_nonfinite"] == total("grad_nonfinite") == 0


def test_fused_nonfinite_counts_are_taken_only_when_a_sum_shows_one(spy) -> None:
    net = model()
    opt = FusingAdamW(net.parameters(), lr=LR, eps=EPS)
    monitor = Monitor(opt, names=net, alerts=False)
    train(net, opt, monitor, 2)
    assert spy["nonfinite"] == 0
    train(net, opt, monitor, 1, nan_at=0)
    rec = monitor.latest()
    w = rec["tensors"]["0.weight"]
    # the NaN gradient entry; m and v; the param it made NaN
    assert (w["grad_nonfinite"], w["state_nonfinite"], w["param_nonfinite"]) == (1, 2, 1)
    assert rec["overall"]["grad_nonfinite"] == 1 and rec["overall"]["state_nonfinite"] == 2
    # one pass over the poisoned tensor's gradient, state and param; none over the others
    assert spy["nonfinite"] == 3 and spy["norms"] == 0


def test_a_step_without_fused_sums_is_measured_from_the_sample(spy) -> None:
    """Sums are requested anew each sampled step: a step that leaves none (a skipped step, an
    executor that fell back) is measured by the Monitor itself, never from older sums."""
    net = model()
    opt = FusingAdamW(net.parameters(), lr=LR, eps=EPS)
    monitor = Monitor(opt, names=net, alerts=False)
    train(net, opt, monitor, 2)
    opt.supports_fused_signals = False  # no request: the Monitor measures
    train(net, opt, monitor, 1)
    assert spy["norms"] > 0 and opt.requests == 2
    assert {"p0", "p1", "m", "v"} <= spy["kinds"]
    rec = monitor.latest()["tensors"]["0.weight"]
    assert rec["updated"] and rec["log10_update_to_weight"] is not None


def test_a_param_that_loses_its_fused_row_is_reported_without_its_ratio(spy) -> None:
    """After a sampled step where every param had fused sums, the next one takes no sample
    of p0; a param the optimizer then leaves without sums has no update-to-weight ratio in
    that record (and a warning says why); the one after is complete again."""
    net = model()
    opt = FusingAdamW(net.parameters(), lr=LR, eps=EPS)
    monitor = Monitor(opt, names=net, alerts=False)
    train(net, opt, monitor, 2)
    opt.skip = {0}  # "0.weight" gets no row
    with pytest.warns(RuntimeWarning, match="no fused_signal_sums for 0.weight"):
        train(net, opt, monitor, 1)
    rec = monitor.latest()
    w = rec["tensors"]["0.weight"]
    assert w["log10_update_to_weight"] is None and w["updated"]
    assert w["update_rms"] is not None and w["grad_norm"] > 0  # measured from its sample
    assert rec["tensors"]["2.weight"]["log10_update_to_weight"] is not None
    assert rec["overall"]["log10_update_to_weight"] is None  # the model's sum lacks a term
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # p0 is sampled again: nothing is missing
        train(net, opt, monitor, 1)
    assert monitor.latest()["tensors"]["0.weight"]["log10_update_to_weight"] is not None


@pytest.mark.usefixtures("forget_compiled_kernels")
def test_compiled_fp32_steps_hand_over_the_params_sums(spy) -> None:
    """adamkit's compiled kernels give fp32 params (float moments) sum p0^2 and sum
    (p1 - p0)^2 with the three norms (five columns of signals.fused_norms): the Monitor then
    samples no p (p0 at the first sampled step only, before it knows) and reports each
    tensor's exact update-to-weight ratio, from the whole tensor rather than a sample."""
    import adamkit

    net = model()
    opt = adamkit.AdamW(net.parameters(), lr=LR, eps=EPS, weight_decay=0.1, backend="compiled")
    opt.fused_signals = True
    monitor = Monitor(opt, names=net, every=2, alerts=False)
    snapshots = []
    opt.register_step_pre_hook(lambda *a: snapshots.append(monitor._snapshot))
    before = train(net, opt, monitor, 6)
    assert [s.p0 is not None for s in snapshots if s is not None] == [True, False, False]
    assert spy["kinds"] == {"p0", "m", "v"} and spy["norms"] == 0
    assert monitor._replays == 2  # the later sampled steps replay the first one's read
    rec = monitor.latest()
    for name, p in net.named_parameters():
        p0, p1 = before[name].double(), p.detach().double()
        want = 0.5 * math.log10(float((p1 - p0).square().sum() / p0.square().sum()))
        assert rec["tensors"][name]["log10_update_to_weight"] == pytest.approx(want, abs=1e-5)
        assert rec["tensors"][name]["sample"] < p.numel() or p.numel() <= S.SAMPLE


def test_malformed_fused_rows_are_refused(monkeypatch) -> None:
    layer = nn.Linear(4, 3)
    opt = FusingAdamW(layer.parameters(), lr=LR)
    Monitor(opt, alerts=False)
    real = S.fused_sums
    monkeypatch.setattr(S, "fused_sums", lambda *a: real(*a)[:7])  # an older version's columns
    layer(torch.ones(2, 4)).sum().backward()
    with pytest.raises(ValueError, match=f"must have {S.N_SUMS} entries"):
        opt.step()


def test_weighted_percentiles_equal_the_sorted_reference() -> None:
    """The key-sorted percentiles equal nearest-rank percentiles over every entry sorted."""
    rng = np.random.default_rng(0)
    q = (0, 5, 50, 95, 100)
    for trial in range(400):
        T, K = int(rng.integers(1, 40)), int(rng.choice([1, 8, 100, 512]))
        eff = rng.lognormal(size=(T, K)) * 1e-3
        if trial % 3 == 0:
            eff = np.round(eff, 4)  # ties
        if trial % 5 == 1:  # distinct float64 values that round to one float32
            eff = 1e-3 * (
                1 + rng.integers(0, 5, (T, K)) * 1e-12 + rng.integers(0, 3, (T, K)) * 1e-6
            )
        if trial % 5 == 2:  # signs, zeros of both signs, extremes
            eff = rng.normal(size=(T, K))
            eff[rng.random((T, K)) < 0.2] = 0.0
            eff[rng.random((T, K)) < 0.1] = -0.0
            eff[rng.random((T, K)) < 0.05] = rng.choice([np.inf, -np.inf, 1e300, 1e-300, -1e-300])
        if trial % 7 == 0:
            eff[:] = 1.0
        eff[rng.random((T, K)) < rng.choice([0.0, 0.1, 0.9])] = np.nan
        w = rng.choice([1.0, 3.7, 8192.0, 41.3], size=T) if trial % 2 else np.full(T, 5.0)
        rows = rng.random(T) < 0.8
        got = S.weighted_percentiles(eff, w, rows, q)
        sub = eff[rows]
        keep = ~np.isnan(sub)
        if not keep.any():
            assert got == [None] * len(q)
            continue
        weights = np.broadcast_to(w[rows][:, None], sub.shape)[keep]
        assert got == S.percentiles(sub[keep], q, weights), trial


def test_a_sampled_step_that_raises_is_sampled_again() -> None:
    """A step that raises is not counted: the next call is the sampled step again, with a
    fresh snapshot and request."""
    net = model()
    opt = FusingAdamW(net.parameters(), lr=LR)
    monitor = Monitor(opt, names=net, every=2, alerts=False)
    train(net, opt, monitor, 1)

    def failing():
        raise RuntimeError("data loader died")

    with pytest.raises(RuntimeError, match="loader"):
        opt.step(failing)  # the second call: a sampled step
    assert opt.requests == 0 and monitor.history() == []
    before = train(net, opt, monitor, 1)
    assert opt.requests == 1 and opt.fused_signals_request is False
    rec = monitor.latest()
    assert rec["step"] == 2 and rec["tensors"]["0.weight"]["updated"]
    want = by_hand_record(net, opt, before, 2)["0.weight"]
    assert rec["tensors"]["0.weight"]["log10_update_to_weight"] == pytest.approx(
        want["log10_update_to_weight"], rel=2e-6
    )


@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_batch_sums_count_only_the_sampled_entries_of_moved_tensors(eps) -> None:
    """Rows shorter than K (zeros past k) and tensors that did not move (whatever they hold,
    NaN included) add nothing: each sum equals a loop over the first k entries of the moved
    tensors, scaled by n / k."""
    rng = np.random.default_rng(3)
    T, K = 4, 16
    k = np.array([16, 9, 5, 16])
    updated = np.array([True, True, True, False])
    samples = np.zeros((T, len(S.SAMPLE_ROWS), K))
    for i in range(T):
        samples[i, :, : k[i]] = rng.normal(size=(4, k[i])) * [[1.0], [1.0], [0.1], [0.0]]
        samples[i, 3, : k[i]] = rng.random(k[i]) ** 4 * 1e-4  # v >= 0, some ~0
    if eps:
        samples[1, 3, 0] = 0.0  # a v of zero: not active, u = m_hat / eps
    samples[3] = np.nan  # did not move: never read
    numel, step = np.array([64, 90, 5, 32]), np.array([3.0, 3.0, 3.0, 2.0])
    b1, b2, lr = 0.9, 0.99, 1e-3
    batch = S.SampleBatch(
        samples, k, numel, updated, step, *(np.full(T, x) for x in (b1, b2, eps, lr))
    )
    sums = S.batch_sums(batch)
    eff, _ = S.effective_lrs(batch)
    for i in range(T):
        want = dict.fromkeys(("param_sq", "delta_sq", "update_sq", "v_hat_sum"), 0.0)
        want.update(active=0.0, eps_count=0.0, large=0.0)
        scale = numel[i] / k[i]
        for j in range(k[i] if updated[i] else 0):
            p0, p1, m, v = samples[i, :, j]
            v_hat = v / (1 - b2 ** step[i])
            root = math.sqrt(v_hat)
            u = m / (1 - b1 ** step[i]) / (root + eps)
            want["update_sq"] += u * u * scale
            if root > 0:
                want["active"] += scale
                want["eps_count"] += scale * (root < eps)
                want["large"] += scale * (abs(u) > S.LARGE_UPDATE)
                assert eff[i, j] == pytest.approx(lr / (root + eps), rel=1e-12)
            else:
                assert math.isnan(eff[i, j])
            want["param_sq"] += p0 * p0 * scale
            want["delta_sq"] += (p1 - p0) ** 2 * scale
            want["v_hat_sum"] += v_hat * scale
        for key, value in want.items():
            assert sums[key][i] == pytest.approx(value, rel=1e-12, abs=1e-300), (i, key)
        assert np.isnan(eff[i, k[i] :]).all() and (updated[i] or np.isnan(eff[i]).all())
