"""The parity registry: one list of optimizer configs, crossed with dtype, backend and storage.

Each config builds a small set of params (odd sizes, a non-contiguous one), the same for
adamkit and for torch, and a deterministic gradient stream. ``run_parity`` steps both
optimizers and hands every param and state tensor to a comparison callback each step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import adamkit

STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@dataclass(frozen=True)
class Config:
    name: str
    cls: str = "AdamW"  # "Adam" | "AdamW"
    kwargs: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    group_overrides: tuple[dict[str, Any], ...] = ()  # one extra group per entry
    grad_none_every: int = 0  # the second param gets no grad on steps divisible by this
    complex: bool = False
    torch_fused: bool = False  # compare with torch's fused kernel (fp32 math for low precision)

    def __str__(self) -> str:
        return self.name


REGISTRY: tuple[Config, ...] = (
    Config("defaults"),
    Config("lr=1e-2", kwargs={"lr": 1e-2}),
    Config("weight_decay=0.1", kwargs={"lr": 1e-2, "weight_decay": 0.1}),
    Config("wd+maximize", kwargs={"lr": 1e-2, "weight_decay": 0.1, "maximize": True}),
    Config("amsgrad", kwargs={"lr": 1e-2, "amsgrad": True, "weight_decay": 0.05}),
    Config("adam+L2", cls="Adam", kwargs={"lr": 1e-2, "weight_decay": 0.1}),
    Config(
        "two groups",
        kwargs={"lr": 1e-2},
        group_overrides=(
            {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.3, "amsgrad": True},
        ),
    ),
    Config("grad None", kwargs={"lr": 1e-2, "weight_decay": 0.1}, grad_none_every=3),
    Config("complex", cls="Adam", kwargs={"lr": 1e-2, "weight_decay": 0.1}, complex=True),
    Config("float64", kwargs={"lr": 1e-2, "weight_decay": 0.1}, dtype=torch.float64),
    Config(
        "bf16", kwargs={"lr": 1e-2, "weight_decay": 0.1}, dtype=torch.bfloat16, torch_fused=True
    ),
)

TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-6}


def make_params(cfg: Config, seed: int = 0) -> list[torch.Tensor]:
    """Leaf params of odd sizes: a matrix, a vector, a non-contiguous matrix, a scalar."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (13,), (3, 4, 5), ()]
    out = []
    for i, shape in enumerate(shapes):
        base = torch.randn(shape, generator=gen, dtype=torch.float64)
        if cfg.complex:
            base = torch.complex(base, torch.randn(shape, generator=gen, dtype=torch.float64))
            t = base.to(torch.complex64 if cfg.dtype == torch.float32 else torch.complex128)
        else:
            t = base.to(cfg.dtype)
        if i == 2:  # a non-contiguous leaf
            t = t.transpose(0, 2).contiguous().transpose(0, 2)
            assert not t.is_contiguous()
        out.append(t.requires_grad_())
    return out


def clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for p in params:
        q = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype)
        q.copy_(p.detach())
        out.append(q.requires_grad_())
    return out


def param_groups_for(cfg: Config, params: list[torch.Tensor]) -> list[dict[str, Any]]:
    if not cfg.group_overrides:
        return [{"params": params}]
    split = len(params) // 2
    return [{"params": params[:split]}] + [
        {"params": params[split:], **o} for o in cfg.group_overrides
    ]


def build(cfg: Config, params: list[torch.Tensor], *, torch_impl: bool, **extra: Any):
    """The optimizer of ``cfg`` over ``params``: torch's or adamkit's (with ``extra`` kwargs)."""
    groups = param_groups_for(cfg, params)
    if torch_impl:
        cls = getattr(torch.optim, cfg.cls)
        kwargs = dict(cfg.kwargs)
        if cfg.torch_fused:
            kwargs["fused"] = True
        return cls(groups, **kwargs)
    cls = getattr(adamkit, cfg.cls)
    return cls(groups, **cfg.kwargs, **extra)


def gradients(cfg: Config, params: list[torch.Tensor], step: int) -> list[torch.Tensor | None]:
    gen = torch.Generator().manual_seed(1000 + step)
    grads: list[torch.Tensor | None] = []
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if p.is_complex():
            g = torch.complex(g, torch.randn(p.shape, generator=gen, dtype=torch.float64))
        g = g.to(p.dtype)
        if cfg.grad_none_every and i == 1 and step % cfg.grad_none_every == 0:
            g = None
        grads.append(g)
    return grads


def set_grads(params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    """Assign gradient copies laid out like their params, as autograd's AccumulateGrad does."""
    for p, g in zip(params, grads):
        if g is None:
            p.grad = None
        else:
            p.grad = torch.empty_strided(p.shape, p.stride(), dtype=g.dtype).copy_(g)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (over the real view; 0 for empty tensors)."""
    a = torch.view_as_real(actual) if actual.is_complex() else actual
    e = torch.view_as_real(expected) if expected.is_complex() else expected
    if e.numel() == 0:
        return 0.0
    a, e = a.detach().double(), e.detach().double()
    scale = e.abs().max().item()
    return (a - e).abs().max().item() / (scale if scale > 0 else 1.0)


def run_parity(
    cfg: Config,
    steps: int,
    compare: Callable[[int, str, torch.Tensor, torch.Tensor], None],
    *,
    reference: Callable[[list[torch.Tensor]], Any] | None = None,
    **extra: Any,
) -> None:
    """Step adamkit (with ``extra`` kwargs) and the reference optimizer side by side.

    ``compare(step, what, ours, theirs)`` is called for every param and state tensor after
    every step. The reference is torch's optimizer unless ``reference`` builds another.
    """
    ours_params = make_params(cfg)
    ref_params = clone_params(ours_params)
    ours = build(cfg, ours_params, torch_impl=False, **extra)
    ref = reference(ref_params) if reference else build(cfg, ref_params, torch_impl=True)
    for step in range(1, steps + 1):
        grads = gradients(cfg, ours_params, step)
        set_grads(ours_params, grads)
        set_grads(ref_params, grads)
        ours.step()
        ref.step()
        for i, (p, q) in enumerate(zip(ours_params, ref_params)):
            compare(step, f"param[{i}]", p, q)
            st_ours, st_ref = ours.state.get(p, {}), ref.state.get(q, {})
            assert set(st_ours) == set(st_ref), (step, i, set(st_ours), set(st_ref))
            for key in STATE_KEYS:
                if key in st_ref:
                    compare(step, f"{key}[{i}]", st_ours[key], st_ref[key])
            if "step" in st_ref:
                assert float(st_ours["step"]) == float(st_ref["step"])
