"""Lean state: codecs against brute force, memory, checkpoints, stochastic rounding."""

from __future__ import annotations

import io

import pytest
import torch
from registry import relative_error

import adamkit
from adamkit.storage import blockwise
from adamkit.storage.rounding import round_stochastic, uniform

CODECS = [(8, 256), (4, 128)]


def _levels(bits: int, signed: bool, power: float) -> torch.Tensor:
    """Every value the map can decode to (normalised), enumerated by brute force."""
    if signed:
        q = 2 ** (bits - 1) - 1
        return torch.tensor([(c - q) / q for c in range(2 * q + 1)]).sign() * torch.tensor(
            [abs((c - q) / q) ** power for c in range(2 * q + 1)]
        )
    q = 2**bits - 1
    return torch.tensor([((c + 1) / (q + 1)) ** power for c in range(q + 1)])


@pytest.mark.parametrize(("bits", "block"), CODECS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 5, 127, 128, 129, 600])
def test_round_to_nearest_matches_brute_force(bits, block, signed, n) -> None:
    power = 2.0 if signed else 4.0
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-4, 2, (n,), generator=gen)
    if not signed:
        x = x.abs()
    codes, absmax = blockwise.quantize(x, block=block, bits=bits, signed=signed, power=power)
    assert codes.dtype == torch.uint8
    assert codes.numel() == blockwise.code_bytes(n, block, bits)
    decoded = blockwise.dequantize(
        codes, absmax, n, block=block, bits=bits, signed=signed, power=power
    )
    assert decoded.shape == (n,)
    levels = _levels(bits, signed, power)
    for b in range(blockwise.num_blocks(n, block)):
        chunk = x[b * block : (b + 1) * block]
        scale = chunk.abs().max()
        assert absmax[b] == scale
        # nearest level in the companded domain y = sign(x)|x|^(1/power)
        y = chunk / scale
        y = y.sign() * y.abs().pow(1 / power)
        grid = levels.sign() * levels.abs().pow(1 / power)
        nearest = (y[:, None] - grid[None, :]).abs().argmin(dim=1)
        expected = levels[nearest] * scale
        torch.testing.assert_close(decoded[b * block : (b + 1) * block], expected)


@pytest.mark.parametrize(("bits", "block"), CODECS)
@pytest.mark.parametrize("signed", [True, False])
def test_stochastic_rounding_is_unbiased_and_picks_neighbours(bits, block, signed) -> None:
    power = 2.0 if signed else 4.0
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(block, generator=gen)
    if not signed:
        x = x.abs()
    x[0] = x.abs().max() * 1.5  # fix the block scale
    scale = x.abs().max()
    levels = _levels(bits, signed, power) * scale
    draws = []
    for k in range(400):
        codes, absmax = blockwise.quantize(
            x, block=block, bits=bits, signed=signed, power=power, noise=uniform(block, k)
        )
        d = blockwise.dequantize(
            codes, absmax, block, block=block, bits=bits, signed=signed, power=power
        )
        draws.append(d)
    draws = torch.stack(draws)
    # every draw is one of the two levels around x
    below = torch.where(levels[None, :] <= x[:, None] + 1e-6 * scale, levels, -torch.inf).amax(1)
    above = torch.where(levels[None, :] >= x[:, None] - 1e-6 * scale, levels, torch.inf).amin(1)
    if not signed:
        below = torch.where(torch.isinf(below), levels.min(), below)
    ok = ((draws - below).abs() <= 1e-6 * scale) | ((draws - above).abs() <= 1e-6 * scale)
    assert ok.all()
    # and the mean converges on x (standard error of 400 draws of a level gap)
    gap = (above - below).clamp_min(0)
    inside = torch.isfinite(gap) & (x >= levels.min())
    err = (draws.mean(0) - x).abs()[inside]
    assert (err <= 4 * gap[inside] / 2 / 20 + 1e-5 * scale).all()


def test_pack4_roundtrip() -> None:
    codes = torch.randint(0, 16, (256,), dtype=torch.uint8)
    packed = blockwise.pack4(codes)
    assert packed.numel() == 128
    assert torch.equal(blockwise.unpack4(packed), codes)


def test_unsigned_map_never_decodes_nonzero_block_to_zero() -> None:
    x = torch.tensor([1.0, 1e-30, 0.0, 1e-12] * 32)
    codes, absmax = blockwise.quantize(x, block=128, bits=4, signed=False, power=4.0)
    d = blockwise.dequantize(codes, absmax, 128, block=128, bits=4, signed=False, power=4.0)
    assert (d > 0).all()
    zeros, zmax = blockwise.quantize(torch.zeros(10), block=128, bits=4, signed=False, power=4.0)
    assert (
        blockwise.dequantize(zeros, zmax, 10, block=128, bits=4, signed=False, power=4.0) == 0
    ).all()


def test_round_stochastic_is_unbiased_for_bf16_and_fp16() -> None:
    x = torch.randn(2000, generator=torch.Generator().manual_seed(0)) * 3
    for dtype in (torch.bfloat16, torch.float16):
        draws = torch.stack([round_stochastic(x, dtype, uniform(x.numel(), k)) for k in range(300)])
        assert draws.dtype == dtype
        lo = torch.minimum(draws.float().amin(0), x)
        hi = torch.maximum(draws.float().amax(0), x)
        assert ((hi - lo) <= x.abs() * 2.0**-7 + 1e-30).all()  # at most one ulp apart
        bias = (draws.float().mean(0) - x).abs() / x.abs()
        nearest = (x.to(dtype).float() - x).abs() / x.abs()
        assert bias.mean() < nearest.mean() / 4


# ---------------------------------------------------------------------------------------------
# the optimizer with each format


def _model_params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(96, 100, generator=gen).requires_grad_(),
        torch.randn(5000, generator=gen).requires_grad_(),
        torch.randn(33, generator=gen).requires_grad_(),
    ]


def _train(opt, params, steps, start=0):
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * (1 + step % 3)
        opt.step()


@pytest.mark.parametrize(
    ("state_dtype", "limit"), [("int8", 2.1), ("int4", 1.1), ("bfloat16", 4.0), ("float32", 8.0)]
)
def test_state_bytes_per_param(state_dtype, limit) -> None:
    params = [torch.randn(512, 1024, requires_grad=True), torch.randn(300_001, requires_grad=True)]
    opt = adamkit.AdamW(params, state_dtype=state_dtype)
    _train(opt, params, 1)
    report = adamkit.memory_report(opt)
    allocated = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values())
    assert report.state_bytes == allocated
    step_bytes = 4 * len(params)  # the 0-d step counters
    per_param = (allocated - step_bytes) / report.numel
    assert per_param <= limit + 1e-9
    if state_dtype == "bfloat16":
        assert per_param == 4.0
    assert {t.format for t in report.tensors} == {state_dtype}


def test_small_tensors_stay_fp32_and_report_says_why() -> None:
    params = _model_params()
    opt = adamkit.AdamW(params, state_dtype="int8", min_quantized_size=4096)
    _train(opt, params, 1)
    rows = adamkit.memory_report(opt).tensors
    assert [r.format for r in rows] == ["int8", "int8", "float32"]
    assert "min_quantized_size=4096" in rows[2].reason
    assert "exp_avg_codes" in opt.state[params[0]]
    assert opt.state[params[2]]["exp_avg"].dtype == torch.float32
    opt0 = adamkit.AdamW(_model_params(), state_dtype="int4", min_quantized_size=0)
    _train(opt0, opt0.param_groups[0]["params"], 1)
    assert [r.format for r in adamkit.memory_report(opt0).tensors] == ["int4"] * 3


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8", "int4"])
def test_compact_resume_is_bitwise(state_dtype) -> None:
    a, b = _model_params(), _model_params()
    kw = {"state_dtype": state_dtype, "min_quantized_size": 0, "lr": 1e-2}
    full = adamkit.AdamW(a, **kw)
    _train(full, a, 12)
    first = adamkit.AdamW(b, **kw)
    _train(first, b, 5)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    if state_dtype != "bfloat16":
        assert sd["state"][0]["exp_avg_codes"].dtype == torch.uint8
        assert sd["state"][0]["exp_avg_absmax"].dtype == torch.float32
    resumed = adamkit.AdamW(b, **kw)
    resumed.load_state_dict(sd)
    _train(resumed, b, 7, start=5)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for key, value in full.state[p].items():
            assert torch.equal(value, resumed.state[q][key]), key


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8", "int4"])
def test_torch_state_dict_loads_quantised_and_exports_back(state_dtype) -> None:
    params = _model_params()
    torch_opt = torch.optim.AdamW(params, lr=1e-2)
    _train(torch_opt, params, 4)
    ours = adamkit.AdamW(params, lr=1e-2, state_dtype=state_dtype, min_quantized_size=0)
    ours.load_state_dict(torch_opt.state_dict())
    tol = {"bfloat16": 1e-2, "int8": 0.05, "int4": 0.3}[state_dtype]
    for p in params:
        decoded = ours.decoded_state(p)
        for key in ("exp_avg", "exp_avg_sq"):
            assert relative_error(decoded[key], torch_opt.state[p][key]) <= tol, key
    exported = adamkit.export_state_dict(ours)
    back = torch.optim.AdamW(params, lr=1e-2)
    back.load_state_dict(exported)
    for p in params:
        assert back.state[p]["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(back.state[p]["exp_avg"], ours.decoded_state(p)["exp_avg"])
        assert back.state[p]["step"].item() == 4


def test_bad_state_arguments() -> None:
    p = [torch.randn(3, requires_grad=True)]
    with pytest.raises(ValueError, match=r"Invalid state_dtype='int3'"):
        adamkit.AdamW(p, state_dtype="int3")
    with pytest.raises(ValueError, match=r"Invalid min_quantized_size=-1"):
        adamkit.AdamW(p, min_quantized_size=-1)
    with pytest.raises(ValueError, match=r"Invalid stochastic_rounding='yes'"):
        adamkit.AdamW(p, stochastic_rounding="yes")
    with pytest.raises(ValueError, match=r"Invalid seed=1\.5"):
        adamkit.AdamW(p, seed=1.5)


def _regression(dtype, stochastic: bool, steps: int = 300) -> float:
    """Weights near 1 that need updates of ~1e-4: below half a bf16 ulp (about 2e-3)."""
    gen = torch.Generator().manual_seed(0)
    target = 1.0 + 0.02 * torch.randn(256, generator=gen)
    w = torch.ones(256, dtype=dtype, requires_grad=True)
    opt = adamkit.Adam([w], lr=1e-4, stochastic_rounding=stochastic, state_dtype="float32")
    for _ in range(steps):
        opt.zero_grad()
        loss = ((w.float() - target) ** 2).mean()
        loss.backward()
        opt.step()
    return ((w.detach().float() - target) ** 2).mean().item()


def test_bf16_params_with_stochastic_rounding_track_fp32() -> None:
    fp32 = _regression(torch.float32, False)
    plain = _regression(torch.bfloat16, False)
    sr = _regression(torch.bfloat16, True)
    start = (
        (
            (
                torch.ones(256)
                - (1.0 + 0.02 * torch.randn(256, generator=torch.Generator().manual_seed(0)))
            )
            ** 2
        )
        .mean()
        .item()
    )
    assert fp32 < 0.5 * start  # fp32 learns
    assert plain > 0.9 * start  # round-to-nearest bf16 stalls: every update rounds away
    assert abs(sr - fp32) <= 0.02 * fp32 + 0.02 * (start - fp32)
