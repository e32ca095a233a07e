"""The counting-pass order of sampled entries against NumPy's stable sort and row sort."""

from __future__ import annotations

import numpy as np
import pytest

from adamkit.diagnostics import signals as S
from adamkit.diagnostics.ranking import RankedSample, value_order


def _values(rng: np.random.Generator, kind: int, n: int) -> np.ndarray:
    if kind == 0:  # positive, spread over decades (effective lrs)
        return rng.lognormal(size=n) * 1e-3
    if kind == 1:  # ties
        return np.round(rng.lognormal(size=n), 2)
    if kind == 2:  # distinct float64 values that round to one float32, in both orders
        return 1e-3 * (1 + rng.integers(0, 5, n) * 1e-12 + rng.integers(0, 3, n) * 1e-6)
    x = rng.normal(size=n)  # signs, zeros of both signs, infinities, float32 overflow
    x[rng.random(n) < 0.2] = 0.0
    x[rng.random(n) < 0.1] = -0.0
    x[rng.random(n) < 0.05] = rng.choice([np.inf, -np.inf, 1e300, -1e300, 1e-300, -1e-300])
    return x


@pytest.mark.parametrize("kind", range(4))
@pytest.mark.parametrize("n", [0, 1, 2, 7, 600, 20000])
def test_value_order_is_numpys_stable_argsort(kind: int, n: int) -> None:
    rng = np.random.default_rng(kind * 1000 + n)
    values = _values(rng, kind, n)
    got = value_order(values)
    expected = np.argsort(values, kind="stable")
    # equal values in position order: -0.0 and +0.0 are equal, so the permutation is the same
    np.testing.assert_array_equal(got, expected)


def test_value_order_takes_the_stable_order_of_float64_values_inside_one_float32() -> None:
    base = np.float64(np.float32(0.1))
    ulp = np.spacing(base)
    values = base + ulp * np.array([3.0, 1.0, 2.0, 1.0, 0.0, 3.0])
    assert len(set(values.astype(np.float32).tolist())) == 1  # one float32 for all
    np.testing.assert_array_equal(value_order(values), [4, 1, 3, 2, 0, 5])


@pytest.mark.parametrize("trial", range(60))
def test_row_percentiles_equal_the_row_sort(trial: int) -> None:
    rng = np.random.default_rng(trial)
    T, K = int(rng.integers(1, 40)), int(rng.choice([1, 8, 100, 512]))
    eff = _values(rng, trial % 4, T * K).reshape(T, K)
    eff[rng.random((T, K)) < rng.choice([0.0, 0.1, 0.9])] = np.nan
    if trial % 5 == 0:
        eff[int(rng.integers(T))] = np.nan  # a row without entries
    q = (0, 5, 50, 95, 100)
    got = RankedSample(eff).row_percentiles(q)
    np.testing.assert_array_equal(got, S.row_percentiles(eff, q))


def test_rows_past_the_counting_range_are_ordered_by_a_stable_sort() -> None:
    """More rows than 16-bit keys hold: the per-row pass falls back to NumPy's stable sort."""
    rng = np.random.default_rng(3)
    eff = rng.lognormal(size=(70000, 2))
    eff[rng.random(eff.shape) < 0.3] = np.nan
    q = (5, 50, 95)
    ranked = RankedSample(eff)
    np.testing.assert_array_equal(ranked.row_percentiles(q), S.row_percentiles(eff, q))
    w = rng.choice([1.0, 3.7], size=70000)
    rows = rng.random(70000) < 0.5
    keep = ~np.isnan(eff[rows])
    weights = np.broadcast_to(w[rows][:, None], eff[rows].shape)[keep]
    assert ranked.weighted_percentiles(w, rows, q) == S.percentiles(eff[rows][keep], q, weights)
