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


def _stepped(state_dtype, amsgrad=False):
    torch.manual_seed(0)
    params = [torch.randn(80, 64, requires_grad=True), torch.randn(80, requires_grad=True)]
    opt = adamkit.AdamW(params, state_dtype=state_dtype, min_quantized_size=0, amsgrad=amsgrad)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return params, opt


def _truncated(sd, key):
    sd["state"][0][key] = sd["state"][0][key][:5]


def _retyped(sd, key):
    sd["state"][0][key] = sd["state"][0][key].float() + 0.5


def _blocks_cut(sd, key):  # codes and scales of 5 blocks: a format's ratio, too few blocks
    sd["state"][0][key] = sd["state"][0][key][: 5 * 256]
    sd["state"][0][key.replace("_codes", "_absmax")] = sd["state"][0][key.replace(
        "_codes", "_absmax")][:5]  # fmt: skip


def _dropped(sd, key):
    del sd["state"][0][key]


CORRUPTIONS = [  # fmt: skip
    (
        None,
        "exp_avg",
        _truncated,
        r"\[0\] does not fit param 0 of shape \(80, 64\): exp_avg: 320 entries for a param of "
        r"5120 \(shape \(5, 64\)\)",
    ),
    ("bfloat16", "exp_avg_sq", _truncated, r"exp_avg_sq: 320 entries for a param of 5120"),
    (None, "exp_avg_sq", _retyped, None),  # fp32 -> fp32 + 0.5: a float moment is taken
    (
        "int8",
        "exp_avg_codes",
        _retyped,
        r"exp_avg_codes: expected uint8 codes, got "
        r"torch.float32",
    ),
    (
        "int8",
        "exp_avg_sq_absmax",
        _truncated,
        r"exp_avg_sq_codes: 1024 bytes of codes per "
        r"block scale match no adamkit format",
    ),
    (
        "int8",
        "exp_avg_sq_codes",
        _blocks_cut,
        r"exp_avg_sq_codes, exp_avg_sq_absmax: 1280 bytes of codes and 5 scales for a param of "
        r"5120 entries, which takes 5120 and 20 \(int8, block 256\)",
    ),
    (
        "int4",
        "exp_avg_int4_codes",
        _truncated,
        r"exp_avg_int4_codes: 0 bytes of codes per "
        r"block scale match no adamkit format",
    ),
    (
        "int8",
        "exp_avg_codes",
        _dropped,
        r"has exp_avg_sq but no exp_avg \(in any format\) for param 0",
    ),
    (None, "exp_avg_sq", _dropped, r"has exp_avg but no exp_avg_sq"),
]


@pytest.mark.parametrize(("state_dtype", "key", "corrupt", "message"), CORRUPTIONS)
def test_a_state_dict_that_does_not_fit_is_refused_and_changes_nothing(
    state_dtype, key, corrupt, message
) -> None:
    """The error names the entry, the param and what is wrong; the optimizer keeps its state
    and groups object for object and value for value, and steps on as if never asked."""
    params, opt = _stepped(state_dtype)
    twin_params, twin = _stepped(state_dtype)
    sd = opt.state_dict()
    bad = {"state": {i: dict(e) for i, e in sd["state"].items()}, "param_groups": [
        {**g, "lr": 0.5} for g in sd["param_groups"]]}  # fmt: skip
    corrupt(bad, key)
    state_before, groups_before = opt.state, opt.param_groups
    if message is None:
        opt.load_state_dict(bad)  # a float moment of the right size loads (and is used)
        assert opt.param_groups[0]["lr"] == 0.5
        return
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(bad)
    assert opt.state is state_before and opt.param_groups is groups_before
    assert opt.param_groups[0]["lr"] == twin.param_groups[0]["lr"] != 0.5
    for p, q in zip(params, twin_params):
        for k, v in opt.state[p].items():
            assert torch.equal(v, twin.state[q][k]), k
    for ps, o in ((params, opt), (twin_params, twin)):
        for p in ps:
            p.grad = torch.ones_like(p)
        o.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)


def test_an_amsgrad_checkpoint_without_its_running_max_still_loads() -> None:
    """max_exp_avg_sq may be missing (a plain Adam checkpoint resumed with AMSGrad): the
    running max then starts from the loaded v, as when amsgrad is switched on mid-run."""
    _, opt = _stepped(None, amsgrad=True)
    sd = opt.state_dict()
    saved_v = [entry["exp_avg_sq"].clone() for entry in sd["state"].values()]
    for entry in sd["state"].values():
        del entry["max_exp_avg_sq"]
    _, fresh = _stepped(None, amsgrad=True)
    fresh.load_state_dict(sd)
    params = fresh.param_groups[0]["params"]
    for p in params:
        p.grad = torch.zeros_like(p)
    fresh.step()  # zero gradients: v shrinks by beta2, the max keeps the loaded v
    for p, v in zip(params, saved_v):
        assert torch.equal(fresh.state[p]["max_exp_avg_sq"], v)
        assert (fresh.state[p]["exp_avg_sq"] < v).any()


@pytest.mark.parametrize("step", [-1.0, float("nan"), float("inf")])
def test_a_step_count_that_is_no_count_is_refused(step) -> None:
    params, opt = _stepped(None)
    sd = opt.state_dict()
    sd = {"state": {i: dict(e) for i, e in sd["state"].items()}, "param_groups": sd["param_groups"]}
    sd["state"][1]["step"] = torch.tensor(step)
    state_before = opt.state
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[1\]\['step'\] = tensor\("):
        opt.load_state_dict(sd)
    assert opt.state is state_before and opt.state[params[1]]["step"].item() == 1


@pytest.mark.parametrize("state_dtype", [None, "int8"])
def test_non_finite_moments_load_with_a_warning_that_counts_them(state_dtype) -> None:
    """A checkpoint whose moments hold inf/NaN loads as it is (to be inspected), never
    silently: a RuntimeWarning names the entry and counts the values."""
    params, opt = _stepped(state_dtype)
    sd = opt.state_dict()
    key = "exp_avg" if state_dtype is None else "exp_avg_absmax"
    sd["state"][0][key] = sd["state"][0][key].clone()
    sd["state"][0][key].view(-1)[:3] = torch.tensor([float("nan"), float("inf"), 1.0])
    _, fresh = _stepped(state_dtype)
    with pytest.warns(RuntimeWarning, match=r"\['state'\]\[0\] holds 2 non-finite values"):
        fresh.load_state_dict(sd)
    loaded = fresh.state[fresh.param_groups[0]["params"][0]][key]
    assert int((~torch.isfinite(loaded)).sum()) == 2
