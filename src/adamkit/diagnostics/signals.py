r"""Signals that show whether Adam is helping or failing: pure functions, each with its formula.

Notation, for one param tensor of ``n`` entries at step ``t`` (the step count *after* the
step, as stored in ``state['step']``)::

    p0, p1   the param before and after the step;  dp = p1 - p0 (the actual change: Adam's
             update, weight decay, anything else the step did)
    g        the gradient the step read (``p.grad``: before ``maximize`` and coupled L2)
    m, v     the moments after the step (``exp_avg``; ``exp_avg_sq``, or ``max_exp_avg_sq``
             with AMSGrad: the v the denominator used)
    m_hat    = m / (1 - beta1^t)        v_hat = v / (1 - beta2^t)
    u        = m_hat / (sqrt(v_hat) + eps)    the normalised update (lr * u is Adam's step)
    rms(x)   = sqrt(sum(x^2) / n)

Signals (REFERENCE.md section 5 gives the healthy ranges; :mod:`adamkit.diagnostics.alerts`
the thresholds):

============================  ================================================================
``grad_norm``, ``grad_rms``   ||g||_2 and rms(g)
``update_rms``                rms(u): about 0.1-1 healthy, near 0 stalled, near 1 everywhere
                              is sign descent
``log10_update_to_weight``    log10(rms(dp) / rms(p0)): about -3 healthy, near -1 too large,
                              below -5 stalled (None when p0 is all zeros)
``eps_dominated_frac``        fraction of the entries with v > 0 that have sqrt(v_hat) < eps:
                              eps, not the gradient, sets their step. Entries with v = 0 (no
                              non-zero gradient yet: dead units, constant inputs, unused
                              embedding rows) do not move whatever eps is; they are left out.
``large_update_frac``         fraction of the entries with v > 0 that have |u| > 0.5
                              (sign-descent / bimodal updates, Molybog et al. 2023); entries
                              that never had a gradient have u = 0 and are left out
``second_moment_lag``         sum(g^2) / sum(v_hat): about 1 when v tracks the gradient scale,
                              << 1 when v remembers gradients much larger than today's. A
                              ratio of sums, not a mean of ratios, so entries with v_hat ~ 0
                              do not dominate. v is after the step, so it already holds
                              (1 - beta2) g^2.
``eff_lr_p5/p50/p95``         percentiles of the effective per-entry learning rate
                              lr / (sqrt(v_hat) + eps), the factor Adam applies to m_hat,
                              over the entries with v > 0 (nearest-rank percentiles)
``exp_avg_norm``,             ||m||_2 and ||v||_2 of the raw stored moments (no bias
``exp_avg_sq_norm``           correction)
``*_nonfinite``               number of NaN/inf entries in g, in the state (m, v, vmax), in p1
============================  ================================================================

The single-signal functions below are the readable definitions (0-d tensors, no host
synchronisation). The Monitor computes the same quantities without a copy of the params:

- exactly, with one read of each gradient and of each moment: ``grad_norm``, ``grad_rms``,
  ``exp_avg_norm``, ``exp_avg_sq_norm`` (a fourth power of the gradient scale: too
  heavy-tailed to estimate from a sample) and the non-finite counts of gradients and state
  (``Monitor(exact="grad")`` reads only the gradients in full, to a third of the cost, and
  takes the moment norms from the sample, scaled as below);
- from a sample of at most ``SAMPLE`` entries per tensor, taken from p before the step and
  from p, m, v after it (every entry of a tensor of up to ``SAMPLE`` entries, so small
  tensors are exact): the update signals, in float64 on the host (:func:`batch_sums`). Sums
  over the sample are scaled by n / (sample size), so tensors, groups and the model aggregate
  by addition. A larger tensor's sample is up to 64 runs of ``SAMPLE_RUN`` adjacent entries,
  evenly spaced (:func:`sample_positions`): the run starts are ``SAMPLE_RUN`` times a prime
  apart, so they walk across a matrix's columns instead of aliasing onto a few of them, and
  each run is one cache line to read where single entries would cost one each (the gather of
  the samples of 35 tensors after a step that evicted them: 0.70 ms as single entries, 0.22
  ms as runs of 8). With 512 entries a rms or a fraction is within a few percent;
- non-finite entries are counted exactly (one more pass) whenever a norm or the sample shows
  one; a NaN param entry that is not in the sample shows once it reaches the loss and the
  gradients, at the next sampled step.

An executor that fuses the step can compute the exact sums and counts inside its kernel
(:func:`fused_sums`) and hand them over: then every signal but the effective-lr percentiles
is exact; see :mod:`adamkit.diagnostics.monitor`.
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from adamkit import rule
from adamkit.diagnostics import native
from adamkit.diagnostics.ranking import RankedSample, nearest_ranks, weighted_crossings
from adamkit.rule import bias_corrections

Scalar = float | Tensor

LARGE_UPDATE = 0.5  # |u| above this counts toward large_update_frac
SAMPLE = 512  # at most this many entries per tensor feed the sampled signals
SAMPLE_RUN = 8  # adjacent entries per run of a larger tensor's sample
PERCENTILES = (5, 50, 95)


# ---------------------------------------------------------------------------------------------
# the single-signal definitions


def normalized_update(
    exp_avg: Tensor, exp_avg_sq: Tensor, step: Scalar, beta1: Scalar, beta2: Scalar, eps: Scalar
) -> Tensor:
    """u = m_hat / (sqrt(v_hat) + eps), per entry (:func:`adamkit.rule.normalized_update`)."""
    bc1, bc2 = bias_corrections(step, beta1, beta2)
    return rule.normalized_update(exp_avg, exp_avg_sq, bc1, bc2, eps)


def rms(x: Tensor) -> Tensor:
    """sqrt(mean(x^2)) over all entries."""
    return x.square().mean().sqrt()


def grad_norm(grad: Tensor) -> Tensor:
    """||g||_2."""
    return torch.linalg.vector_norm(grad)


def update_rms(u: Tensor) -> Tensor:
    """rms(u) of the normalised update."""
    return rms(u)


def log10_update_to_weight(param_before: Tensor, param_after: Tensor) -> Tensor:
    """log10(rms(p1 - p0) / rms(p0)); inf/nan when p0 is all zeros."""
    return torch.log10(rms(param_after - param_before) / rms(param_before))


def eps_dominated_frac(exp_avg_sq: Tensor, step: Scalar, beta2: Scalar, eps: Scalar) -> Tensor:
    """Among entries with v > 0, the fraction with sqrt(v_hat) < eps."""
    _, bc2 = bias_corrections(step, 0.0, beta2)
    root = rule.corrected_root(exp_avg_sq, bc2)
    return (root < eps)[root > 0].float().mean()


def large_update_frac(u: Tensor, exp_avg_sq: Tensor, threshold: float = LARGE_UPDATE) -> Tensor:
    """Among entries with v > 0, the fraction with |u| > threshold."""
    active = exp_avg_sq > 0
    return (u.abs() > threshold)[active].float().mean()


def second_moment_lag(grad: Tensor, exp_avg_sq: Tensor, step: Scalar, beta2: Scalar) -> Tensor:
    """sum(g^2) / sum(v_hat)."""
    _, bc2 = bias_corrections(step, 0.0, beta2)
    return grad.square().sum() / (exp_avg_sq / bc2).sum()


def effective_lr(
    exp_avg_sq: Tensor, step: Scalar, beta2: Scalar, eps: Scalar, lr: Scalar
) -> Tensor:
    """lr / (sqrt(v_hat) + eps), per entry."""
    _, bc2 = bias_corrections(step, 0.0, beta2)
    return lr / (rule.corrected_root(exp_avg_sq, bc2) + eps)


def nonfinite_count(*tensors: Tensor) -> Tensor:
    """Number of NaN or inf entries over all ``tensors``."""
    return sum((t.numel() - torch.isfinite(t).sum() for t in tensors), torch.tensor(0))


def percentiles(
    values: np.ndarray, q: Sequence[float] = PERCENTILES, weights: np.ndarray | None = None
) -> list[float]:
    """Nearest-rank percentiles: the smallest x with (weighted) fraction of values <= x >= q/100.

    numpy's ``np.percentile(values, q, method="inverted_cdf")`` for equal weights. ``weights``
    lets samples of different tensors stand for the entries they skip.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return [math.nan] * len(q)
    # stable: equal values in their order, which weighted_percentiles reproduces
    if weights is None:
        ordered = np.sort(values, kind="stable")
        cum = np.arange(1, values.size + 1, dtype=np.float64)
    else:
        order = np.argsort(values, kind="stable")
        ordered, cum = values[order], np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    idx = weighted_crossings(cum, q)
    return [float(ordered[min(i, values.size - 1)]) for i in idx]


# ---------------------------------------------------------------------------------------------
# all signals of one tensor cheaply: an exact gradient norm and a sample


class Sums(NamedTuple):
    """Columns of :func:`fused_sums`; additive over tensors (and over the shards of one).

    ``grad_sq`` and ``v_hat_sum`` are also the numerator and the denominator of
    ``second_moment_lag``; ``active``, ``eps_count`` and ``large`` are the counts behind
    ``eps_dominated_frac`` (eps_count / active) and ``large_update_frac`` (large / active).
    No column counts non-finite entries: a sum of squares (or of v_hat >= 0) is finite exactly
    when every term is, so ``grad_sq``, ``m_sq``, ``v_sq``, ``v_hat_sum`` (vmax with AMSGrad),
    ``param_sq`` and ``delta_sq`` show whether g, m, v, vmax, p0 and p1 hold a NaN/inf, and
    the Monitor counts them (one more pass) only then.
    """

    grad_sq: int = 0  # sum g^2
    param_sq: int = 1  # sum p0^2
    delta_sq: int = 2  # sum dp^2
    update_sq: int = 3  # sum u^2
    v_hat_sum: int = 4  # sum v_hat
    m_sq: int = 5  # sum m^2
    v_sq: int = 6  # sum v^2 (raw exp_avg_sq)
    active: int = 7  # entries with v > 0
    eps_count: int = 8  # entries with v > 0 and sqrt(v_hat) < eps
    large: int = 9  # entries with v > 0 and |u| > LARGE_UPDATE


COLUMNS = Sums()
N_SUMS = len(COLUMNS)
UPDATE_SUMS = ("param_sq", "delta_sq", "update_sq", "v_hat_sum", "active", "eps_count", "large")
"""The columns of :func:`fused_sums` that describe the update: used when the step advanced."""


def fused_sums(
    param_before: Tensor,
    param_after: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    bias_correction1: Scalar,
    bias_correction2: Scalar,
    eps: Scalar,
) -> Tensor:
    """The exact sums and counts of one tensor, a vector indexed by :data:`COLUMNS`.

    Pure and functional (no in-place op, no host synchronisation, no data-dependent branch),
    for an executor to call inside its compiled step, where p0, p1, g, m and v are at hand and
    the reductions fuse with the update's loop. Inputs are compute-dtype tensors of one shape;
    ``max_exp_avg_sq`` (AMSGrad) is the v the denominator used, None without AMSGrad. The
    vector has the inputs' dtype.

    The counts are integer sums of per-entry 0/1 values (exact for any size; no boolean
    tensor is stored once compiled), converted at the end: in float32 a count is exact up to
    2^24 (16.8M) and within 6e-8 relative beyond. Integer sums are also cheaper than float
    ones in inductor's CPU kernels, which sum floats in cascades.
    """
    v = exp_avg_sq if max_exp_avg_sq is None else max_exp_avg_sq
    v_hat = v / bias_correction2
    root = rule.corrected_root(v, bias_correction2)
    u = rule.normalized_update(exp_avg, v, bias_correction1, bias_correction2, eps, root)
    delta = param_after - param_before
    active = v > 0
    sums = torch.stack(
        [
            grad.square().sum(),
            param_before.square().sum(),
            delta.square().sum(),
            u.square().sum(),
            v_hat.sum(),
            exp_avg.square().sum(),
            exp_avg_sq.square().sum(),
        ]
    )
    counts = torch.stack(
        [
            active.to(torch.int32).sum(),
            (active & (root < eps)).to(torch.int32).sum(),
            (active & (u.abs() > LARGE_UPDATE)).to(torch.int32).sum(),
        ]
    )
    return torch.cat([sums, counts.to(sums.dtype)])


NORM_SUMS = ("grad_sq", "m_sq", "v_sq")
"""The columns of :func:`fused_norms`."""
NORM_DELTA_SUMS = (*NORM_SUMS, "param_sq", "delta_sq")
"""The columns of :func:`fused_norms` given the param before and after the step."""


def norm_sums(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    param_before: Tensor | None = None,
    param_after: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """The columns of :func:`fused_norms`, apart: sum g^2, sum m^2, sum v^2 over the last
    dimension (and sum p0^2, sum (p1 - p0)^2 given the params)."""
    sums = (grad.square().sum(-1), exp_avg.square().sum(-1), exp_avg_sq.square().sum(-1))
    if param_before is None or param_after is None:
        return sums
    delta = param_after - param_before
    return (*sums, param_before.square().sum(-1), delta.square().sum(-1))


def fused_norms(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    param_before: Tensor | None = None,
    param_after: Tensor | None = None,
) -> Tensor:
    """(sum g^2, sum m^2, sum v^2) over the last dimension, stacked last: ``[..., 3]``; given
    the param before and after the step (as stored), also sum p0^2 and sum (p1 - p0)^2:
    ``[..., 5]`` (:data:`NORM_DELTA_SUMS`).

    What adamkit's compiled step hands a Monitor: the squared norms of the gradient and of
    the new raw moments, the quantities that need every entry, and for fp32 params the
    squared norms behind the update-to-weight ratio, which then need no sample of the param
    before and after the step; the Monitor takes the other signals from its sample. Over
    ``[rows, n]`` inputs the sums stay per row, so that a compiler can put each row's sums in
    the loop that writes the row.
    """
    return torch.stack(norm_sums(grad, exp_avg, exp_avg_sq, param_before, param_after), -1)


FINITE_SUMS = ("grad_sq", "param_sq", "delta_sq", "update_sq", "v_hat_sum", "m_sq", "v_sq")
"""Columns of :func:`fused_sums` that are finite exactly when g, p0, p1, m, v and vmax are
(or when a huge finite value overflows a square: then a count finds nothing)."""


def sample_stride(numel: int, budget: int = SAMPLE) -> int:
    """Distance between the starts of two runs of the sample that keeps at most ``budget``
    entries of ``numel``: 1 when the tensor fits (it is sampled whole), else ``SAMPLE_RUN``
    times the smallest prime >= max(3, numel / budget), so that the runs walk across the
    columns of a matrix instead of aliasing onto a few of them."""
    if numel <= budget:
        return 1
    k = max(3, math.ceil(numel / budget))
    while any(k % d == 0 for d in range(2, math.isqrt(k) + 1)):
        k += 1
    return SAMPLE_RUN * k


def sample_runs(numel: int) -> tuple[int, int, int]:
    """(runs, run length, stride) of the sample of a tensor of ``numel`` entries: the flat
    entries ``j * stride + r`` for ``j < runs``, ``r < run length``; one run of every entry
    when the tensor fits in ``SAMPLE``, else the runs of ``SAMPLE_RUN`` that fit."""
    stride = sample_stride(numel)
    if stride == 1:
        return 1, numel, max(numel, 1)
    return (numel - SAMPLE_RUN) // stride + 1, SAMPLE_RUN, stride


def sample_positions(numel: int) -> np.ndarray:
    """The flat indices of the entries in the sample of a tensor of ``numel`` entries, in the
    sample's order (int64): the definition :func:`sample_of` and the Monitor's views follow."""
    runs, length, stride = sample_runs(numel)
    return (np.arange(runs)[:, None] * stride + np.arange(length)[None, :]).reshape(-1)


def sample_of(t: Tensor) -> Tensor:
    """The sampled entries of ``t`` (flattened; real view for complex), 1-d: a copy unless the
    tensor is sampled whole and contiguous."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    flat = t.reshape(-1)
    runs, length, stride = sample_runs(flat.numel())
    return flat.as_strided((runs, length), (stride, 1)).reshape(-1)


SAMPLE_ROWS = ("p0", "p1", "m", "v")
"""Rows of a tensor's sample: p before and after the step, m, and the v the denominator used
(vmax with AMSGrad). The gradient and the raw v need no sample: their exact norms are taken."""

UPDATE_SIGNALS = (
    "update_rms",
    "log10_update_to_weight",
    "eps_dominated_frac",
    "large_update_frac",
    "second_moment_lag",
) + tuple(f"eff_lr_p{q}" for q in PERCENTILES)

ADDITIVE = (
    "numel",
    "updated",
    "updated_numel",
    "grad_sq",
    "m_sq",
    "v_sq",
    "param_sq",
    "delta_sq",
    "update_sq",
    "v_hat_sum",
    "lag_grad_sq",
    "active",
    "eps_count",
    "large",
)
"""Per-tensor sums behind the signals; those of a group or of the model are their sums."""


class SampleBatch(NamedTuple):
    """The samples of T tensors and what is known about each (arrays of length T).

    ``samples`` is [T, len(SAMPLE_ROWS), K], row i valid in its first ``k[i]`` entries and
    zero past them (:func:`batch_sums` and :func:`effective_lrs` count on it).
    """

    samples: np.ndarray
    k: np.ndarray
    numel: np.ndarray
    updated: np.ndarray  # bool: the step count advanced
    step: np.ndarray
    beta1: np.ndarray
    beta2: np.ndarray
    eps: np.ndarray
    lr: np.ndarray


def _counted(k: np.ndarray, updated: np.ndarray, K: int) -> np.ndarray | None:
    """The sampled entries that count ([T, K]): the first ``k`` of each row of an updated
    tensor; None when that is every entry (no mask to apply)."""
    if updated.all() and (k == K).all():
        return None
    return (np.arange(K)[None, :] < k[:, None]) & updated[:, None]


def sample_roots(b: SampleBatch) -> np.ndarray:
    """sqrt(v_hat) of every sampled v ([T, K]), for :func:`batch_sums` and
    :func:`effective_lrs` to share."""
    v = b.samples[:, SAMPLE_ROWS.index("v"), :]
    _, bc2 = bias_corrections(b.step, b.beta1, b.beta2)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return rule.corrected_root(v, bc2[:, None])


def batch_sums(
    b: SampleBatch,
    rows: np.ndarray | None = None,
    root: np.ndarray | None = None,
    params: bool = True,
) -> dict[str, np.ndarray]:
    """Per-tensor sums (each an array of length T; sampled sums scaled by n / k).

    Only the tensors ``rows`` (default: all) are summed from their samples; the sampled sums
    of the others are left at 0, for exact ones (:func:`use_exact_rows`) to replace. The
    exact ``grad_sq``, ``m_sq``, ``v_sq`` and ``lag_grad_sq`` are left at 0 for the caller.
    ``root``: :func:`sample_roots` of ``b``, when the caller has it. ``params=False`` leaves
    ``param_sq`` and ``delta_sq`` at 0 too (the caller has them: the sample holds no p).
    """
    T = len(b.k)
    sums = {key: np.zeros(T) for key in ADDITIVE}
    sums.update(
        numel=b.numel.astype(np.float64),
        updated=b.updated.astype(np.float64),
        updated_numel=np.where(b.updated, b.numel, 0).astype(np.float64),
    )
    if rows is None:
        rows = slice(None)
    elif not len(rows):
        return sums
    k = b.k[rows]
    updated = b.updated[rows]
    w = np.where(updated, b.numel[rows] / np.maximum(k, 1), 0.0)
    # entries past k are zeros: they add nothing to a sum (u = 0 / (0 + eps) = 0) nor to a
    # count (sqrt(v_hat) = 0 is not active), so only the tensors that did not move are masked,
    # as a whole; with eps = 0 a padded u would be NaN, so entries are masked then
    eps_zero = not (b.eps[rows] > 0).all()
    upd = _counted(k, updated, b.samples.shape[2]) if eps_zero else None
    p0, p1, m, v = (b.samples[rows, i, :] for i in range(len(SAMPLE_ROWS)))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        bc1, bc2 = (
            c[:, None] for c in bias_corrections(b.step[rows], b.beta1[rows], b.beta2[rows])
        )
        eps = b.eps[rows][:, None]
        root = (sample_roots(b) if root is None else root)[rows]
        u = rule.normalized_update(m, v, bc1, bc2, eps, root)
        if params:
            sums["param_sq"][rows] = _squares(w, p0, upd)
            sums["delta_sq"][rows] = _squares(w, p1 - p0, upd)
        reduced = native.row_sums(u, root, v, k, w, eps[:, 0], LARGE_UPDATE)
        if reduced is not None:  # C where it builds: the same sums and counts, one pass
            update_sq, v_sum, active, eps_count, large = reduced
            v_hat_sum = np.where(w != 0, v_sum / bc2[:, 0], 0.0)
        else:
            on = root > 0 if upd is None else upd & (root > 0)
            update_sq, v_hat_sum = _squares(w, u, upd), _total(w, v / bc2, upd)
            active = w * np.count_nonzero(on, axis=1)
            eps_count = w * np.count_nonzero(on & (root < eps), axis=1)
            large = w * np.count_nonzero(on & (np.abs(u) > LARGE_UPDATE), axis=1)
        for key, value in (
            ("update_sq", update_sq),
            ("v_hat_sum", v_hat_sum),
            ("active", active),
            ("eps_count", eps_count),
            ("large", large),
        ):
            sums[key][rows] = value
    return sums


def _total(w: np.ndarray, x: np.ndarray, upd: np.ndarray | None) -> np.ndarray:
    """``w`` times each row's sum of ``x`` over the entries ``upd`` (None: all)."""
    return _weighted(w, (x if upd is None else np.where(upd, x, 0.0)).sum(axis=1))


def _squares(w: np.ndarray, x: np.ndarray, upd: np.ndarray | None) -> np.ndarray:
    """``w`` times each row's sum of ``x^2`` over the entries ``upd`` (None: all)."""
    if upd is None:
        return _weighted(w, np.einsum("ij,ij->i", x, x))
    return _total(w, x * x, upd)


def _weighted(w: np.ndarray, row_sums: np.ndarray) -> np.ndarray:
    """``w * row_sums``, 0 where ``w`` is 0 (a tensor that did not move: whatever it holds)."""
    return np.where(w != 0, w * row_sums, 0.0)


def effective_lrs(b: SampleBatch, root: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The effective lr lr / (sqrt(v_hat) + eps) of every sampled entry ([T, K], NaN where the
    entry is not an active entry of an updated tensor) and the weight n / k of each tensor's
    entries. ``root``: :func:`sample_roots` of ``b``, when the caller has it."""
    weight = b.numel / np.maximum(b.k, 1)
    if root is None:
        root = sample_roots(b)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        keep = root > 0  # not the zeros past k
        if not b.updated.all():
            keep &= b.updated[:, None]
        eff = b.lr[:, None] / (root + b.eps[:, None])
        eff[~keep] = np.nan
    return eff, weight


def rows_to_arrays(s: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The update signals of many tensors (or scopes) from their sums (arrays, one entry per
    tensor), each as (values, defined): not defined are every signal of a tensor that was not
    updated, the update-to-weight ratio where p0 is zero (or unknown), the lag where
    sum(v_hat) is 0. Fractions of a tensor without active entries are 0."""
    updated = np.asarray(s["updated"]) > 0
    active, param_sq, v_hat_sum = s["active"], s["param_sq"], s["v_hat_sum"]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return {
            "update_rms": (np.sqrt(s["update_sq"] / s["updated_numel"]), updated),
            "log10_update_to_weight": (
                0.5 * np.log10(s["delta_sq"] / param_sq),
                updated & (param_sq > 0),
            ),
            "eps_dominated_frac": (np.where(active != 0, s["eps_count"] / active, 0.0), updated),
            "large_update_frac": (np.where(active != 0, s["large"] / active, 0.0), updated),
            "second_moment_lag": (s["lag_grad_sq"] / v_hat_sum, updated & (v_hat_sum != 0)),
        }


def rows_to_signals(s: dict[str, np.ndarray]) -> dict[str, list[float | None]]:
    """:func:`rows_to_arrays` as lists of Python floats, None where not defined."""
    return {
        key: [x if ok else None for x, ok in zip(v.tolist(), mask.tolist())]
        for key, (v, mask) in rows_to_arrays(s).items()
    }


def sums_to_signals(s: dict[str, float]) -> dict[str, float | None]:
    """The update signals from (per-tensor or added-up) sums; None where undefined."""
    out = rows_to_signals({key: np.array([float(s[key])]) for key in ADDITIVE})
    return {key: value[0] for key, value in out.items()}


def row_percentiles(eff: np.ndarray, q: Sequence[float] = PERCENTILES) -> np.ndarray:
    """Nearest-rank percentiles of each row of ``eff`` over its non-NaN entries ([T, len(q)],
    NaN for a row without any)."""
    if eff.shape[1] == 0:
        return np.full((eff.shape[0], len(q)), np.nan)
    ordered = np.sort(eff, axis=1)  # NaN last
    count = np.count_nonzero(~np.isnan(eff), axis=1)
    idx = nearest_ranks(q, count)
    out = np.take_along_axis(ordered, idx, axis=1)  # a row without entries: NaN already
    out[count == 0] = np.nan
    return out


def weighted_percentiles(
    eff: np.ndarray, w: np.ndarray, rows: np.ndarray, q: Sequence[float] = PERCENTILES
) -> list[float | None]:
    """Nearest-rank percentiles over the non-NaN entries of ``eff[rows]`` (``rows``: a mask),
    entry (i, j) standing for ``w[i]`` entries of its tensor: :func:`percentiles` of all of
    them, equal to it bit for bit, ordered by counting passes instead of its stable argsort
    (:class:`adamkit.diagnostics.ranking.RankedSample`)."""
    return RankedSample(eff).weighted_percentiles(w, rows, q)


def tensor_signals(
    rows: np.ndarray,
    *,
    numel: int,
    grad_sq: float,
    m_sq: float,
    v_sq: float,
    step: float,
    beta1: float,
    beta2: float,
    eps: float,
    lr: float,
    exact: np.ndarray | None = None,
) -> dict[str, float | None]:
    """Every signal of one updated tensor from its sample rows p0, p1, g, m, v, v_raw (g and
    v_raw are not read) and its exact sums of squares; with ``exact`` (a :func:`fused_sums`
    vector) every sum is exact and only the percentiles come from the sample."""
    rows = np.asarray(rows, dtype=np.float64)
    batch = SampleBatch(
        rows[None, [0, 1, 3, 4]],
        np.array([rows.shape[1]]),
        np.array([numel]),
        np.array([True]),
        *(np.array([x], dtype=np.float64) for x in (step, beta1, beta2, eps, lr)),
    )
    root = sample_roots(batch)
    sums = batch_sums(batch, root=root)
    eff, _ = effective_lrs(batch, root)
    one = {key: float(value[0]) for key, value in sums.items()}
    one.update(grad_sq=grad_sq, lag_grad_sq=grad_sq, m_sq=m_sq, v_sq=v_sq)
    if exact is not None:
        use_exact(one, exact)
    out: dict[str, float | None] = {
        "grad_norm": math.sqrt(one["grad_sq"]),
        "exp_avg_norm": math.sqrt(one["m_sq"]),
        "exp_avg_sq_norm": math.sqrt(one["v_sq"]),
        **sums_to_signals(one),
    }
    qs = row_percentiles(eff)[0]
    out.update({f"eff_lr_p{q}": None if np.isnan(x) else float(x) for q, x in zip(PERCENTILES, qs)})
    return out


def use_exact(sums: dict[str, float], exact: np.ndarray) -> None:
    """Replace one tensor's sums by exact ones (a row of :func:`fused_sums`)."""
    use_exact_rows(sums, np.array([0]), np.asarray(exact).reshape(1, -1), None)


def use_exact_rows(
    sums: dict, rows: np.ndarray, exact: np.ndarray, updated: np.ndarray | None
) -> None:
    """Replace the sums of tensors ``rows`` by exact ones (``exact``: their rows of
    :func:`fused_sums`, [len(rows), N_SUMS]). ``sums`` holds arrays indexed by tensor, or
    floats of one tensor (``rows = [0]``); ``updated``: whether each of ``rows`` advanced
    (None: from ``sums``)."""
    c = COLUMNS
    scalar = not isinstance(sums["grad_sq"], np.ndarray)
    if scalar:
        work = {key: np.array([float(value)]) for key, value in sums.items()}
    else:
        work = sums
    if updated is None:
        updated = np.asarray(work["updated"])[rows] > 0
    work["grad_sq"][rows] = exact[:, c.grad_sq]
    work["m_sq"][rows], work["v_sq"][rows] = exact[:, c.m_sq], exact[:, c.v_sq]
    work["lag_grad_sq"][rows] = np.where(updated, exact[:, c.grad_sq], 0.0)
    moved = rows[updated]
    for key in UPDATE_SUMS:
        work[key][moved] = exact[updated, getattr(c, key)]
    if scalar:
        sums.update({key: float(value[0]) for key, value in work.items()})


# ---------------------------------------------------------------------------------------------
# the loss and other scalar series


def loss_value(loss: object) -> float | Tensor:
    """A loss given to ``observe(loss=...)``, as it is kept until the step reads it: a real
    number as a float, a one-element tensor detached (read with the step's other numbers, so
    that observing costs no sync). Anything else is refused, naming ``loss``."""
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}")
        if loss.is_complex():
            raise ValueError(f"loss must be real, got a tensor of dtype {loss.dtype}")
        return loss.detach()
    if isinstance(loss, bool) or not isinstance(loss, numbers.Real):
        raise TypeError(f"loss must be a real number or a one-element tensor, got {loss!r}")
    return float(loss)


class RollingStats:
    """Mean and standard deviation of the last ``window`` finite values, with spike checks.

    A value is a spike when at least ``warmup`` finite values are in the window and
    ``value > mean + threshold * std`` (std with Bessel's correction, as ``torch.std_mean``)
    over the window *before* the value is added, as OLMo's skip-step optimizer does.
    Non-finite values are never added (they would poison the statistics); finite values are
    added whether they spiked or not.
    """

    def __init__(self, window: int = 128, warmup: int = 64) -> None:
        if window < 2 or not 2 <= warmup <= window:
            raise ValueError(
                f"Invalid window={window}, warmup={warmup}: need window >= 2 and "
                "2 <= warmup <= window"
            )
        self.window = window
        self.warmup = warmup
        self.values: deque[float] = deque(maxlen=window)
        self._stats: tuple[float, float] | None = None  # of the values as they are now

    def ready(self) -> bool:
        return len(self.values) >= self.warmup

    def mean_std(self) -> tuple[float, float]:
        if self._stats is None:
            if not self.values:
                return math.nan, math.nan
            a = np.fromiter(self.values, dtype=np.float64)
            self._stats = float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0
        return self._stats

    def bound(self, threshold: float) -> float:
        """mean + threshold * std (inf before warmup)."""
        if not self.ready():
            return math.inf
        mean, std = self.mean_std()
        return mean + threshold * std

    def is_spike(self, value: float, threshold: float) -> bool:
        """True when ``value`` exceeds :meth:`bound` (a NaN/inf value is not a spike here)."""
        return math.isfinite(value) and value > self.bound(threshold)

    def add(self, value: float) -> None:
        if math.isfinite(value):
            self.values.append(float(value))
            self._stats = None
