"""Behaviour of Adam/AdamW as users rely on it: validation, grads, dtypes, closures, groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import adamkit


def _param(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).requires_grad_()


BAD = [
    ({"lr": -1.0}, r"Invalid learning rate: lr=-1\.0"),
    ({"lr": math.nan}, r"Invalid learning rate: lr=nan"),
    ({"lr": math.inf}, r"Invalid learning rate: lr=inf"),
    ({"lr": torch.tensor(-0.5)}, r"Invalid learning rate: lr=-0\.5"),
    ({"eps": -1e-8}, r"Invalid epsilon value: eps=-1e-08"),
    ({"eps": math.nan}, r"Invalid epsilon value: eps=nan"),
    ({"betas": (1.0, 0.999)}, r"Invalid beta parameter at index 0: betas\[0\]=1\.0"),
    ({"betas": (-0.1, 0.999)}, r"Invalid beta parameter at index 0: betas\[0\]=-0\.1"),
    ({"betas": (0.9, 1.0)}, r"Invalid beta parameter at index 1: betas\[1\]=1\.0"),
    ({"betas": (0.9, math.nan)}, r"Invalid beta parameter at index 1: betas\[1\]=nan"),
    ({"betas": (0.9,)}, r"Invalid betas=\(0\.9,\)"),
    ({"weight_decay": -1.0}, r"Invalid weight_decay value: weight_decay=-1\.0"),
    ({"weight_decay": math.nan}, r"Invalid weight_decay value: weight_decay=nan"),
    ({"weight_decay_scaling": "cosine"}, r"Invalid weight_decay_scaling='cosine'"),
    ({"lr": "0.1"}, r"Invalid lr='0\.1'"),
    ({"amsgrad": "yes"}, r"Invalid amsgrad='yes'"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD, ids=[m for _, m in BAD])
@pytest.mark.parametrize("cls", [adamkit.Adam, adamkit.AdamW])
def test_constructor_rejects_bad_hyperparameters(cls, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        cls([_param(3)], **kwargs)


@pytest.mark.parametrize(("kwargs", "message"), BAD, ids=[m for _, m in BAD])
def test_add_param_group_rejects_and_leaves_optimizer_unchanged(kwargs, message) -> None:
    opt = adamkit.AdamW([_param(3)])
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [_param(2)], **kwargs})
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0].keys() == before[0].keys()


def test_sparse_gradients_are_refused() -> None:
    emb = nn.Embedding(10, 3, sparse=True)
    opt = adamkit.Adam(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_params_without_grad_are_untouched() -> None:
    a, b = _param(4), _param(4)
    b0 = b.detach().clone()
    opt = adamkit.AdamW([a, b], weight_decay=0.5, lr=0.1)
    for _ in range(3):
        a.grad = torch.ones_like(a)
        opt.step()
    assert torch.equal(b, b0)  # no decay either
    assert b not in opt.state or len(opt.state[b]) == 0
    assert opt.state[a]["step"].item() == 3


def test_zero_size_and_one_element_params() -> None:
    z, one = _param(0, 3), _param(1)
    opt = adamkit.AdamW([z, one], lr=0.1)
    z.grad, one.grad = torch.zeros(0, 3), torch.tensor([2.0])
    before = one.detach().clone()
    opt.step()
    assert opt.state[z]["exp_avg"].shape == (0, 3)
    assert one.item() == pytest.approx(before.item() * (1 - 0.1 * 0.01) - 0.1, rel=1e-6)


def test_closure_loss_is_returned_and_grads_enabled() -> None:
    w = _param(3)
    opt = adamkit.Adam([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    expected = (w.detach() ** 2).sum()
    assert torch.equal(opt.step(closure), expected)
    assert w.grad is not None


def test_fp16_zero_gradient_stays_finite() -> None:
    """torch's for-loop path gives NaN here (1e-8 rounds to 0 in fp16); adamkit computes in fp32."""
    p = torch.zeros(8, dtype=torch.float16, requires_grad=True)
    opt = adamkit.Adam([p], eps=1e-8)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.isfinite(p).all() and (p == 0).all()
    assert opt.state[p]["exp_avg"].dtype == torch.float16  # torch's dtype rule for moments


def test_tensor_lr_is_accepted_and_used() -> None:
    p, q = _param(5), None
    q = p.detach().clone().requires_grad_()
    a = adamkit.AdamW([p], lr=torch.tensor(0.01))
    b = adamkit.AdamW([q], lr=0.01)
    for _ in range(3):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
        a.step()
        b.step()
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_named_parameters_keep_names() -> None:
    model = nn.Linear(3, 2)
    opt = adamkit.AdamW(model.named_parameters())
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]


def test_adamw_defaults_match_torch() -> None:
    ours = adamkit.AdamW([_param(2)]).defaults
    theirs = torch.optim.AdamW([_param(2)]).defaults
    for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
        assert ours[key] == theirs[key], key
    assert adamkit.Adam([_param(2)]).defaults["weight_decay"] == 0.0
    assert ours["decoupled_weight_decay"] is True


@pytest.mark.parametrize(
    ("ours", "theirs"), [(adamkit.Adam, torch.optim.Adam), (adamkit.AdamW, torch.optim.AdamW)]
)
def test_every_torch_keyword_is_accepted(ours, theirs) -> None:
    """A call written for torch.optim runs unchanged: every argument of torch's constructor is
    one of ours, and its default value steps the same params to the same place."""
    import inspect

    torch_args = set(inspect.signature(theirs.__init__).parameters) - {"self"}
    assert torch_args <= set(inspect.signature(ours.__init__).parameters)
    defaults = {
        name: arg.default
        for name, arg in inspect.signature(theirs.__init__).parameters.items()
        if name not in ("self", "params")
    }
    torch.manual_seed(0)
    a, b = _param(5, 3), None
    b = a.detach().clone().requires_grad_()
    opt_a, opt_b = ours([a], **defaults), theirs([b], **defaults)
    for _ in range(3):
        g = torch.randn(5, 3)
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("switches", "backend"),
    [
        ({"fused": True}, "compiled"),
        ({"fused": True, "foreach": False}, "compiled"),
        ({"foreach": False}, "eager"),
        ({"foreach": False, "fused": False}, "eager"),
        ({"foreach": True}, "auto"),
        ({"fused": False}, "auto"),
        ({"fused": True, "backend": "compiled"}, "compiled"),
        ({"foreach": False, "backend": "eager"}, "eager"),
        ({"foreach": True, "backend": "eager"}, "eager"),
    ],
)
def test_torch_implementation_switches_pick_the_backend(switches, backend) -> None:
    assert adamkit.AdamW([_param(3)], **switches).backend == backend
    assert adamkit.Adam([_param(3)], **switches).backend == backend


@pytest.mark.parametrize(
    ("switches", "message"),
    [
        ({"fused": True, "foreach": True}, r"Invalid fused=True with foreach=True"),
        ({"fused": True, "backend": "eager"}, r"Invalid fused=True with backend='eager'"),
        (
            {"foreach": False, "backend": "compiled"},
            r"Invalid foreach=False with backend='compiled'",
        ),
        ({"differentiable": True}, r"Invalid differentiable=True"),
        ({"differentiable": 1}, r"Invalid differentiable=1"),
        ({"fused": "yes"}, r"Invalid fused='yes'"),
        ({"foreach": 0}, r"Invalid foreach=0"),
    ],
)
def test_torch_implementation_switches_that_cannot_hold_are_refused(switches, message) -> None:
    for cls in (adamkit.Adam, adamkit.AdamW):
        with pytest.raises(ValueError, match=message):
            cls([_param(3)], **switches)


def test_step_hooks_run() -> None:
    p = _param(2)
    opt = adamkit.Adam([p])
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    p.grad = torch.ones_like(p)
    opt.step()
    assert seen == ["pre", "post"]


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 11, bias=False)
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(()))


def test_param_groups_split() -> None:
    model = _Tiny()
    groups = adamkit.param_groups(model, weight_decay=0.1)
    names = [[n for n, _ in g["params"]] for g in groups]
    assert names[0] == ["proj.weight", "head.weight"]
    assert sorted(names[1]) == sorted(
        ["emb.weight", "proj.bias", "norm.weight", "norm.bias", "scale"]
    )
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    with_emb = adamkit.param_groups(model, weight_decay=0.1, decay_embeddings=True)
    assert [n for n, _ in with_emb[0]["params"]] == ["emb.weight", "proj.weight", "head.weight"]
    opt = adamkit.AdamW(groups, lr=1e-3)
    assert opt.param_groups[0]["param_names"] == ["proj.weight", "head.weight"]
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_param_groups_tied_weights_once() -> None:
    model = _Tiny()
    model.head.weight = model.emb.weight  # tied: counts as an embedding, listed once
    groups = adamkit.param_groups(model, weight_decay=0.1)
    all_params = [p for g in groups for _, p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params})
    assert "emb.weight" in [n for n, _ in groups[-1]["params"]]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("state_dtype", [None, "int8"])
def test_skip_nonfinite_leaves_everything_bit_identical(bad, state_dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(64, 80, generator=gen).requires_grad_(), _param(7)]
    opt = adamkit.AdamW(params, lr=1e-2, skip_nonfinite=True, state_dtype=state_dtype)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    before_params = [p.detach().clone() for p in params]
    before_state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    params[0].grad[3, 5] = bad
    opt.step()
    assert opt.skipped_steps == 1
    for p, b in zip(params, before_params):
        assert torch.equal(p, b)
        for k, v in opt.state[p].items():
            assert torch.equal(v, before_state[id(p)][k]), k
    params[0].grad[3, 5] = 0.0
    opt.step()  # the next finite step goes through and counts from 3
    assert opt.state[params[0]]["step"].item() == 4
    assert opt.skipped_steps == 1


def test_without_skip_nonfinite_torch_behaviour_is_kept() -> None:
    p = _param(3)
    opt = adamkit.Adam([p])
    p.grad = torch.tensor([1.0, math.nan, 1.0])
    opt.step()
    assert torch.isnan(p[1]) and torch.isfinite(p[0])
    assert opt.skipped_steps == 0
