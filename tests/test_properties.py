"""Property-based checks over shapes, dtypes and hyperparameters (hypothesis)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import ReferenceAdam
from registry import relative_error

import adamkit

shapes = st.sampled_from([(0,), (1,), (3,), (7, 5), (2, 0, 3), (17,), (4, 1, 9), (33, 3)])
hyper = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-4, 0.5),
        "betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.9999)),
        "eps": st.sampled_from([0.0, 1e-12, 1e-8, 1e-3]),
        "weight_decay": st.sampled_from([0.0, 1e-3, 0.1]),
        "amsgrad": st.booleans(),
        "maximize": st.booleans(),
        "decoupled_weight_decay": st.booleans(),
    }
)


def _grads(shape, dtype, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    # gradients of very different magnitudes, some exactly zero
    out = []
    for _ in range(steps):
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        g = g * 10.0 ** torch.randint(-3, 3, shape, generator=gen)
        g[torch.rand(shape, generator=gen) < 0.1] = 0.0
        out.append(g.to(dtype))
    return out


@settings(max_examples=40, deadline=None)
@given(
    shape=shapes,
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    hp=hyper,
    seed=st.integers(0, 2**16),
)
def test_matches_torch(shape, dtype, hp, seed) -> None:
    """Against torch: for-loop path for fp32/fp64, fused path (fp32 math) for bf16/fp16."""
    p0 = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    p = p0.to(dtype).clone().requires_grad_()
    q = p0.to(dtype).clone().requires_grad_()
    ours = adamkit.Adam([p], **hp)
    fused = dtype in (torch.bfloat16, torch.float16)
    theirs = torch.optim.Adam([q], **hp, fused=fused or None)
    for g in _grads(shape, dtype, 6, seed):
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    # bf16/fp16: both compute in fp32 and round once; with eps = 0 (a 0/0-prone corner torch
    # fuses differently) the fp32 results can sit on either side of a rounding boundary, one
    # ulp of the stored dtype apart (seen: fp16, lr 0.5, betas (0, 0.5), eps 0)
    low_ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
    tol = {torch.float64: 1e-12}.get(dtype, 1e-6)
    if hp["eps"] == 0.0:
        tol = max(tol, low_ulp.get(dtype, 0.0))
    _assert_close_nan_aware(p, q, tol)
    for key, value in theirs.state[q].items():
        if key != "step":
            _assert_close_nan_aware(ours.state[p][key], value, tol)


def _assert_close_nan_aware(ours: torch.Tensor, theirs: torch.Tensor, tol: float) -> None:
    """Same NaN pattern (eps = 0 with a zero gradient is 0/0 in torch too), the same
    infinities (an fp16 moment can overflow, in torch too), close elsewhere."""
    nan = torch.isnan(theirs)
    assert torch.equal(torch.isnan(ours), nan)
    inf = torch.isinf(theirs)
    assert torch.equal(torch.isinf(ours), inf) and torch.equal(ours[inf], theirs[inf])
    finite = ~(nan | inf)
    assert relative_error(ours[finite], theirs[finite]) <= tol


@settings(max_examples=30, deadline=None)
@given(
    shape=shapes,
    hp=hyper,
    scaling=st.sampled_from(["lr", "lr_ratio", "none"]),
    seed=st.integers(0, 2**16),
)
def test_matches_float64_reference(shape, hp, scaling, seed) -> None:
    hp = dict(hp)
    decoupled = hp.pop("decoupled_weight_decay")
    p0 = np.random.default_rng(seed).standard_normal(shape)
    p = torch.tensor(p0, requires_grad=True)
    opt = adamkit.Adam([p], **hp, decoupled_weight_decay=decoupled, weight_decay_scaling=scaling)
    ref = ReferenceAdam(
        p0,
        lr=hp["lr"],
        beta1=hp["betas"][0],
        beta2=hp["betas"][1],
        eps=hp["eps"],
        weight_decay=hp["weight_decay"],
        decay=("decoupled" if decoupled else "l2") if hp["weight_decay"] else "none",
        scaling=scaling,
        amsgrad=hp["amsgrad"],
        maximize=hp["maximize"],
    )
    for g in _grads(shape, torch.float64, 6, seed):
        p.grad = g
        opt.step()
        ref.step(g.numpy())
    # eps = 0 with a zero gradient is 0/0 in both; compare where the oracle is finite
    finite = np.isfinite(ref.param)
    np.testing.assert_allclose(p.detach().numpy()[finite], ref.param[finite], rtol=1e-9, atol=1e-12)
