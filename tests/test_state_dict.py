"""state_dict interchange with torch.optim and bitwise-deterministic resume."""

from __future__ import annotations

import io

import pytest
import torch
from registry import REGISTRY, Config, build, clone_params, gradients, make_params, set_grads

import adamkit

CONFIGS = [
    c for c in REGISTRY if c.name in ("weight_decay=0.1", "amsgrad", "two groups", "adam+L2")
]


def _roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _steps(cfg: Config, opt, params, start: int, stop: int) -> None:
    for step in range(start, stop):
        set_grads(params, gradients(cfg, params, step))
        opt.step()


def _assert_same(params_a, opt_a, params_b, opt_b) -> None:
    for p, q in zip(params_a, params_b):
        assert torch.equal(p, q)
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert set(sa) == set(sb)
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("direction", ["torch->adamkit", "adamkit->torch"])
def test_interchange_with_torch(cfg: Config, direction: str) -> None:
    """Load the other library's state_dict at step 10; the continued runs agree bit for bit."""
    src_is_torch = direction == "torch->adamkit"
    params_src = make_params(cfg)
    src = build(cfg, params_src, torch_impl=src_is_torch)
    _steps(cfg, src, params_src, 1, 11)
    sd = _roundtrip(src.state_dict())

    params_dst = clone_params(params_src)
    dst = build(cfg, params_dst, torch_impl=not src_is_torch)
    dst.load_state_dict(sd)
    _steps(cfg, src, params_src, 11, 21)
    _steps(cfg, dst, params_dst, 11, 21)
    _assert_same(params_src, src, params_dst, dst)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_resume_is_bitwise_identical(cfg: Config) -> None:
    params_a = make_params(cfg)
    params_b = clone_params(params_a)
    uninterrupted = build(cfg, params_a, torch_impl=False)
    _steps(cfg, uninterrupted, params_a, 1, 31)

    first = build(cfg, params_b, torch_impl=False)
    _steps(cfg, first, params_b, 1, 13)
    sd = _roundtrip(first.state_dict())
    resumed = build(cfg, params_b, torch_impl=False)
    resumed.load_state_dict(sd)
    _steps(cfg, resumed, params_b, 13, 31)
    _assert_same(params_a, uninterrupted, params_b, resumed)


def test_state_dict_layout_is_torchs() -> None:
    p = torch.randn(3, 2, requires_grad=True)
    q = torch.randn(4, requires_grad=True)
    opt = adamkit.AdamW([p, q], amsgrad=True)
    p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    assert list(sd["state"]) == [0]  # q has no grad yet: no state
    st = sd["state"][0]
    assert set(st) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert st["step"].dim() == 0 and st["step"].dtype == torch.float32 and st["step"].item() == 1
    assert st["exp_avg"].shape == p.shape
    (group,) = sd["param_groups"]
    assert group["params"] == [0, 1]
    for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
        assert key in group
    assert group["weight_decay_scaling"] == "lr"


def test_load_rejects_mismatched_groups() -> None:
    p = torch.randn(3, requires_grad=True)
    opt = adamkit.AdamW([p])
    other = adamkit.AdamW([torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)])
    with pytest.raises(ValueError):
        opt.load_state_dict(other.state_dict())
