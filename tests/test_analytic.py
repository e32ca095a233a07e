"""Facts about Adam that follow from the algorithm, checked on adamkit."""

from __future__ import annotations

import pytest
import torch

import adamkit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.9), (0.0, 0.99)])
def test_first_step_is_lr_times_sign_when_eps_is_zero(dtype, betas) -> None:
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(50, generator=gen, dtype=dtype)
    g = torch.randn(50, generator=gen, dtype=dtype) * torch.logspace(-4, 4, 50, dtype=dtype)
    p = p0.clone().requires_grad_()
    opt = adamkit.Adam([p], lr=0.01, betas=betas, eps=0.0)
    p.grad = g
    opt.step()
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(p.detach() - p0, -0.01 * torch.sign(g), rtol=tol, atol=0.01 * tol)


def _run(scale: float, steps: int = 30) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(40, generator=gen).requires_grad_()
    opt = adamkit.AdamW([p], lr=1e-2, eps=0.0, weight_decay=0.0)
    for _ in range(steps):
        p.grad = torch.randn(40, generator=gen) * scale
        opt.step()
    return p.detach()


def test_update_invariant_to_gradient_scale() -> None:
    base = _run(1.0)
    # A power-of-two scale is exact in binary floating point: identical bits.
    assert torch.equal(_run(1024.0), base)
    torch.testing.assert_close(_run(1000.0), base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_run(1e-3), base, rtol=1e-5, atol=1e-6)


def test_step_bounded_by_lr() -> None:
    """|step| <= lr * (1 - b1) / sqrt(1 - b2) when (1 - b1) > sqrt(1 - b2), else <= lr."""
    gen = torch.Generator().manual_seed(2)
    for betas in [(0.9, 0.999), (0.0, 0.99)]:
        b1, b2 = betas
        bound = 0.1 * ((1 - b1) / (1 - b2) ** 0.5 if (1 - b1) > (1 - b2) ** 0.5 else 1.0)
        p = torch.zeros(100, dtype=torch.float64, requires_grad=True)
        opt = adamkit.Adam([p], lr=0.1, betas=betas, eps=0.0)
        for _ in range(50):
            before = p.detach().clone()
            p.grad = torch.randn(100, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(
                -3, 3, (100,), generator=gen
            )
            opt.step()
            assert (p.detach() - before).abs().max().item() <= bound * (1 + 1e-9)


def _reddi_counterexample(amsgrad: bool, steps: int = 20_000) -> float:
    """Reddi et al. 2018: f_t(x) = C x if t mod 3 == 1 else -x on [-1, 1], C = 3."""
    c = 3.0
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = adamkit.Adam([x], lr=1e-3, betas=(0.0, 1.0 / (1.0 + c**2)), amsgrad=amsgrad)
    g_big = torch.tensor([c], dtype=torch.float64)
    g_small = torch.tensor([-1.0], dtype=torch.float64)
    for t in range(1, steps + 1):
        x.grad = g_big if t % 3 == 1 else g_small
        opt.step()
        with torch.no_grad():
            x.clamp_(-1.0, 1.0)
    return x.item()


def test_reddi_counterexample_adam_goes_to_worst_point() -> None:
    assert _reddi_counterexample(amsgrad=False) == pytest.approx(1.0, abs=1e-3)


def test_reddi_counterexample_amsgrad_finds_optimum() -> None:
    assert _reddi_counterexample(amsgrad=True) == pytest.approx(-1.0, abs=1e-3)
