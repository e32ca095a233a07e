"""The C parts of a sampled step (diagnostics/native.py) against NumPy and torch, and the
fallback to them."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from adamkit.diagnostics import native
from adamkit.diagnostics import signals as S

Q = (0, 1, 5, 25, 50, 75, 95, 99, 100)


def _values(rng: np.random.Generator, kind: int, shape: tuple[int, int]) -> np.ndarray:
    if kind == 0:  # effective lrs: positive, over decades
        return rng.lognormal(size=shape) * 1e-3
    if kind == 1:  # ties
        return np.round(rng.lognormal(size=shape), 2)
    if kind == 2:  # distinct float64 values that share a float32
        return 1e-3 * (1 + rng.integers(0, 5, shape) * 1e-12 + rng.integers(0, 3, shape) * 1e-6)
    if kind == 3:  # signs, zeros of both signs, infinities, extremes
        x = rng.normal(size=shape)
        x[rng.random(shape) < 0.2] = 0.0
        x[rng.random(shape) < 0.1] = -0.0
        extremes = [np.inf, -np.inf, 1e300, -1e300, 1e-300, -1e-300]
        x[rng.random(shape) < 0.05] = rng.choice(extremes)
        return x
    if kind == 4:  # values packed far tighter than their range: one bucket holds most
        x = 1.0 + rng.random(shape) * 1e-9
        x.flat[0] = 1e300
        return x
    return np.full(shape, 0.25)  # one value


def _reference(eff: np.ndarray, w: np.ndarray, scopes: np.ndarray):
    rows = S.row_percentiles(eff, Q)
    out = np.full((len(scopes), len(Q)), np.nan)
    for s, inside in enumerate(scopes):
        sub = eff[inside]
        keep = ~np.isnan(sub)
        if keep.any():
            weights = np.broadcast_to(w[inside][:, None], sub.shape)[keep]
            out[s] = S.percentiles(sub[keep], Q, weights)
    return rows, out


def test_the_library_builds_where_a_compiler_is() -> None:
    has_compiler = any(shutil.which(c) for c in ("cc", "gcc", "clang"))
    wanted = os.environ.get("ADAMKIT_NATIVE", "1") != "0"
    assert (native.library() is not None) == (has_compiler and wanted)


@pytest.mark.parametrize("kind", range(6))
def test_native_percentiles_equal_the_references_bit_for_bit(kind: int) -> None:
    rng = np.random.default_rng(kind)
    percentiles = native.Percentiles()
    for _ in range(40):
        T, K = int(rng.integers(1, 45)), int(rng.choice([1, 7, 64, 500, 512]))
        eff = _values(rng, kind, (T, K))
        eff[rng.random((T, K)) < rng.choice([0.0, 0.2, 0.97])] = np.nan
        w = rng.choice([1.0, 2.5, 41.3, 520.126984126984, 8192.0], size=T)
        scopes = np.stack([np.ones(T, bool), rng.random(T) < 0.5, np.zeros(T, bool)])
        got_rows, got_scopes = percentiles(eff, w, scopes, Q)
        want_rows, want_scopes = _reference(eff, w, scopes)
        np.testing.assert_array_equal(got_rows, want_rows)
        np.testing.assert_array_equal(got_scopes, want_scopes)


def test_without_the_library_the_numpy_path_gives_the_same(monkeypatch) -> None:
    rng = np.random.default_rng(9)
    eff = _values(rng, 0, (35, 512))
    eff[rng.random(eff.shape) < 0.1] = np.nan
    w = rng.choice([1.0, 520.126984126984, 8192.0], size=35)
    scopes = np.stack([np.ones(35, bool), rng.random(35) < 0.5])
    monkeypatch.setattr(native, "_TRIED", True)
    monkeypatch.setattr(native, "_LIBRARY", None)
    got = native.Percentiles()(eff, w, scopes, Q)
    want = _reference(eff, w, scopes)
    for g, x in zip(got, want):
        np.testing.assert_array_equal(g, x)


def test_a_compiler_that_fails_leaves_numpy_in_charge(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(native, "_TRIED", False)
    monkeypatch.setattr(native, "_LIBRARY", None)
    monkeypatch.setenv("CC", "false")  # exits 1: the build fails
    monkeypatch.setattr(native, "_compiler", lambda: "false")
    monkeypatch.setenv("ADAMKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert native.library() is None
    assert native.library() is None  # tried once per process
    assert not list(tmp_path.rglob("*.so"))  # no library, no partial file


def test_adamkit_native_0_turns_it_off(monkeypatch) -> None:
    monkeypatch.setattr(native, "_TRIED", False)
    monkeypatch.setattr(native, "_LIBRARY", None)
    monkeypatch.setenv("ADAMKIT_NATIVE", "0")
    assert native.library() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_gather_copies_the_sampled_runs_as_float64(dtype) -> None:
    if native.library() is None:
        assert native.Gather.of([torch.zeros(4)], np.array([[1, 4, 4, 0]])) is None
        return
    g = torch.Generator().manual_seed(0)
    tensors = [(torch.randn(n, generator=g) * 100).to(dtype) for n in (5, 512, 70001)]
    tensors[0][1] = float("inf")
    tensors[0][2] = float("nan")
    if dtype == torch.float16:
        tensors[0][3] = 3e-6  # a subnormal half
    table, want, at = [], [], 0
    for t in tensors:
        runs, run, stride = S.sample_runs(t.numel())
        table.append((runs, run, stride, at))
        want.append(t.as_strided((runs, run), (stride, 1)).reshape(-1).double().numpy())
        at += runs * run
    gather = native.Gather.of(tensors, np.array(table))
    out = np.full(at + 3, -1.0)
    gather(out)
    np.testing.assert_array_equal(out[:at], np.concatenate(want))
    assert (out[at:] == -1.0).all()  # nothing written past the samples
    with pytest.raises(ValueError, match="float64 array"):
        gather(np.zeros(at - 1))
    with pytest.raises(ValueError, match="reaches past a tensor of 5 entries"):
        native.Gather.of(tensors[:1], np.array([[2, 4, 4, 0]]))


def test_the_monitors_steady_read_gathers_in_c_where_it_builds() -> None:
    import adamkit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 5))
    opt = adamkit.AdamW(model.parameters(), lr=1e-2)
    monitor = adamkit.Monitor(opt, every=1, alerts=False)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 40)).square().mean().backward()
        opt.step()
    assert monitor._replays == 2
    assert (monitor._steady.gather is not None) == (native.library() is not None)
    monitor.close()


@pytest.mark.parametrize("params", [True, False])
def test_row_sums_in_c_equal_numpys_batch_sums(params, monkeypatch) -> None:
    rng = np.random.default_rng(3)
    for trial in range(30):
        T, K = int(rng.integers(1, 30)), 512
        k = rng.choice([1, 8, 300, 504, 512], size=T)
        samples = rng.normal(size=(T, len(S.SAMPLE_ROWS), K)) * 1e-2
        samples[:, S.SAMPLE_ROWS.index("v")] = samples[:, S.SAMPLE_ROWS.index("v")] ** 2
        samples = np.where(np.arange(K)[None, None, :] < k[:, None, None], samples, 0.0)
        if trial % 4 == 0:
            samples[0, S.SAMPLE_ROWS.index("v"), : k[0] // 2] = 0.0  # inactive entries
        if trial % 5 == 0:
            samples[-1, S.SAMPLE_ROWS.index("m"), 0] = np.nan
        batch = S.SampleBatch(
            samples,
            k,
            k * rng.integers(1, 100, size=T),
            rng.random(T) < 0.8,
            rng.integers(1, 50, size=T).astype(np.float64),
            np.full(T, 0.9),
            np.full(T, 0.999),
            np.where(rng.random(T) < 0.2 * (trial % 2), 0.0, 1e-3),  # eps = 0 on some rows
            np.full(T, 1e-3),
        )
        rows = None if trial % 3 else np.flatnonzero(rng.random(T) < 0.6)
        native_sums = S.batch_sums(batch, rows, params=params)
        with monkeypatch.context() as m:
            m.setattr(native, "_TRIED", True)
            m.setattr(native, "_LIBRARY", None)
            numpy_sums = S.batch_sums(batch, rows, params=params)
        for key in S.ADDITIVE:
            np.testing.assert_allclose(native_sums[key], numpy_sums[key], rtol=1e-12, err_msg=key)


def test_mismatched_shapes_are_refused_before_c_reads_them() -> None:
    if native.library() is None:
        return  # the NumPy path raises its own errors
    eff = np.ones((3, 4))
    with pytest.raises(ValueError, match=r"w of shape \(3,\)"):
        native.Percentiles()(eff, np.ones(2), np.ones((1, 3), bool), (50,))
    with pytest.raises(ValueError, match=r"scopes of shape \(S, 3\)"):
        native.Percentiles()(eff, np.ones(3), np.ones((1, 4), bool), (50,))
    with pytest.raises(ValueError, match="row_sums: u, root and v of one shape"):
        native.row_sums(eff, eff[:2], eff, np.full(3, 4), np.ones(3), np.ones(3), 0.5)
