"""The compiled and multi-tensor executors against the eager path (the oracle).

Compiling costs seconds, so the tests share kernels: every kernel is keyed by what it is
specialised on (device, dtypes, flags, chunk width), and the registry's configs need five of
them. Shapes stay small; what is checked is the wiring (which tensor goes where, every flag,
groups, grad None, the state layout), not speed.
"""

from __future__ import annotations

import math
import re
import sys
import warnings

import pytest
import torch
from registry import REGISTRY, Config, build, relative_error, run_parity

import adamkit
from adamkit.execution import kernels, plan
from adamkit.execution.compiled import compile_stats

STEPS = 50
TOLERANCE = 2e-6  # relative: max |compiled - eager| / max |eager|, per tensor, every step
# bf16 params: both paths compute in fp32 and round to bf16; where the fp32 results differ in
# the last bit (inductor does not contract a*b+c into an FMA where ATen's CPU kernels do), the
# rounding can land one bf16 ulp apart. Allow that ulp (2^-8 of the largest element).
BF16_TOLERANCE = 2.0**-7


pytestmark = pytest.mark.usefixtures("forget_compiled_kernels")


def _eager(cfg: Config):
    return lambda params: build(cfg, params, torch_impl=False, backend="eager")


@pytest.mark.parametrize("cfg", REGISTRY, ids=str)
@pytest.mark.parametrize("backend", ["compiled", "auto"])
def test_matches_eager_every_step(cfg: Config, backend: str) -> None:
    # auto runs the multi-tensor path (bitwise the eager one) until it compiles; here it
    # compiles at once when an earlier test compiled the kernels it needs.
    tol = BF16_TOLERANCE if cfg.dtype == torch.bfloat16 else TOLERANCE

    def compare(step: int, what: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (step, what)
        err = relative_error(ours, theirs)
        assert err <= tol, f"{cfg.name}/{backend}: step {step} {what}: {err:.3g} > {tol}"

    run_parity(cfg, STEPS, compare, reference=_eager(cfg), backend=backend)


def _model(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_() for s in shapes]


def _set_grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def _pair(shapes, **kwargs):
    ours, ref = _model(shapes), _model(shapes)
    return (
        ours,
        ref,
        adamkit.AdamW(ours, backend="compiled", **kwargs),
        adamkit.AdamW(ref, backend="eager", **kwargs),
    )


def _step_pair(ours, ref, opt, ref_opt, steps):
    """``steps`` steps of both optimizers on the same grads."""
    for step in range(steps):
        _set_grads(ours, step), _set_grads(ref, step)
        opt.step(), ref_opt.step()


def _assert_decoded_close(ours, ref, opt, ref_opt, param_tol, moment_tol):
    """Params within ``param_tol`` and decoded moments within ``moment_tol`` (relative)."""
    for p, q in zip(ours, ref):
        assert relative_error(p, q) <= param_tol, p.shape
        for key in ("exp_avg", "exp_avg_sq"):
            want, have = ref_opt.decoded_state(q)[key], opt.decoded_state(p)[key]
            assert relative_error(have, want) <= moment_tol, (p.shape, key)


def _assert_close(ours, ref, opt, ref_opt, tol=TOLERANCE):
    for p, q in zip(ours, ref):
        assert relative_error(p, q) <= tol
        for key in ("exp_avg", "exp_avg_sq"):
            assert relative_error(opt.state[p][key], ref_opt.state[q][key]) <= tol
        assert float(opt.state[p]["step"]) == float(ref_opt.state[q]["step"])


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_changing_hyperparameters_and_step_does_not_recompile() -> None:
    shapes = [(7, 5), (13,), (40,)]
    ours, ref, opt, ref_opt = _pair(shapes, lr=1e-2, weight_decay=0.1)
    _set_grads(ours, 0), _set_grads(ref, 0)
    opt.step(), ref_opt.step()
    before = (compile_stats().compiles, _graphs())
    for step in range(1, 8):
        for o in (opt, ref_opt):
            group = o.param_groups[0]
            group["lr"] = 1e-2 / step
            group["betas"] = (0.9 - 0.01 * step, 0.999 - 0.001 * step)
            group["weight_decay"] = 0.1 * step
            group["eps"] = 10.0**-step
        _set_grads(ours, step), _set_grads(ref, step)
        opt.step(), ref_opt.step()
        _assert_close(ours, ref, opt, ref_opt)
    assert (compile_stats().compiles, _graphs()) == before


def test_a_bounded_number_of_compiles_serves_many_shapes() -> None:
    gen = torch.Generator().manual_seed(3)
    sizes = torch.randint(2, 12000, (60,), generator=gen).tolist()
    # 60 distinct sizes (small and mixed chunks) and 20 equal ones (uniform chunks)
    shapes = [(n,) for n in sizes] + [(64, 80)] * (plan.UNIFORM_WIDTH + 4)
    ours, ref, opt, ref_opt = _pair(shapes, lr=1e-2)
    before = compile_stats().compiles
    for step in range(3):
        _set_grads(ours, step), _set_grads(ref, step)
        opt.step(), ref_opt.step()
    _assert_close(ours, ref, opt, ref_opt)
    assert compile_stats().compiles - before <= 3  # a small, a mixed and a uniform kernel
    # another model with other shapes reuses them
    before = compile_stats().compiles
    other, ref2, opt2, ref_opt2 = _pair([(n + 1, 3) for n in sizes[:30]], lr=1e-2)
    _set_grads(other, 0), _set_grads(ref2, 0)
    opt2.step(), ref_opt2.step()
    _assert_close(other, ref2, opt2, ref_opt2)
    assert compile_stats().compiles == before


def test_state_dict_is_torch_layout_and_round_trips() -> None:
    shapes = [(7, 5), (13,)]
    ours, ref, opt, ref_opt = _pair(shapes, lr=1e-2)
    for step in range(3):
        _set_grads(ours, step), _set_grads(ref, step)
        opt.step(), ref_opt.step()
    sd = opt.state_dict()
    for i, p in enumerate(ours):
        entry = sd["state"][i]
        assert entry["step"].dim() == 0 and entry["step"].dtype == torch.float32
        assert entry["exp_avg"].shape == p.shape
    torch_opt = torch.optim.AdamW(_model(shapes), lr=1e-2)
    torch_opt.load_state_dict(sd)
    # load into a fresh compiled optimizer and keep going: same as the eager run
    resumed = [p.detach().clone().requires_grad_() for p in ours]
    opt2 = adamkit.AdamW(resumed, lr=1e-2, backend="compiled")
    opt2.load_state_dict(sd)
    for step in range(3, 6):
        _set_grads(resumed, step), _set_grads(ref, step)
        opt2.step(), ref_opt.step()
    _assert_close(resumed, ref, opt2, ref_opt)


def test_compile_failure_falls_back_with_one_warning(monkeypatch) -> None:
    def broken(spec, device):
        raise kernels.CompileUnavailable("simulated: no C++ compiler")

    monkeypatch.setattr(kernels, "_KERNELS", {})
    monkeypatch.setattr(kernels, "_compile", broken)
    for backend in ("compiled", "auto"):
        shapes = [(7, 5), (13,), (40,)]
        ours, ref = _model(shapes), _model(shapes)
        opt = adamkit.AdamW(ours, lr=1e-2, backend=backend)
        ref_opt = adamkit.AdamW(ref, lr=1e-2, backend="eager")
        if backend == "auto":
            opt._step_executor().policy.compile_now = True  # as if the compile paid off
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(4):
                _set_grads(ours, step), _set_grads(ref, step)
                opt.step(), ref_opt.step()
        messages = [str(w.message) for w in caught if "compiled backend" in str(w.message)]
        assert len(messages) == 1, messages
        assert "simulated" in messages[0]
        _assert_close(ours, ref, opt, ref_opt, tol=0.0)


@pytest.mark.parametrize("backend", ["compiled", "eager"])
def test_grad_scaler_skips_inf_steps_and_unscales(backend: str) -> None:
    shapes = [(7, 5), (13,)]
    ours, ref = _model(shapes), _model(shapes)
    opt = adamkit.AdamW(ours, lr=1e-2, backend=backend)
    ref_opt = adamkit.AdamW(ref, lr=1e-2, backend="eager")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(5)
    for step in range(4):
        bad = step == 2
        loss = (ours[0] @ x).sum() + ours[1].sum() * (float("inf") if bad else 1.0)
        opt.zero_grad()
        scaler.scale(loss).backward()
        before = [p.detach().clone() for p in ours]
        state_before = {k: v.clone() for k, v in opt.state[ours[0]].items()} if step else {}
        scaler.step(opt)
        scale_used = scaler.get_scale()
        scaler.update()
        if bad:
            assert all(torch.equal(p, b) for p, b in zip(ours, before))
            for key, value in state_before.items():
                assert torch.equal(opt.state[ours[0]][key], value), key
            continue
        # the reference sees the unscaled gradients
        for p, q in zip(ours, ref):
            q.grad = p.grad.clone()
        ref_opt.step()
        assert scale_used > 0
    _assert_close(ours, ref, opt, ref_opt)
    assert float(opt.state[ours[0]]["step"]) == 3.0


def test_auto_does_not_compile_a_small_short_job(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "_KERNELS", {})  # as in a fresh process
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 40))
    assert sum(p.numel() for p in model.parameters()) < 11_000
    opt = adamkit.AdamW(model.parameters(), lr=1e-3)  # backend="auto" by default
    before = compile_stats().compiles
    x = torch.randn(32, 64)
    for _ in range(100):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert compile_stats().compiles == before
    assert not opt._step_executor().compiling


def test_invalid_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="Invalid backend='fast'"):
        adamkit.Adam([torch.zeros(2, requires_grad=True)], backend="fast")


@pytest.mark.parametrize("backend", ["compiled", "eager"])
def test_capturable_keeps_steps_on_device_and_matches(backend: str) -> None:
    shapes = [(7, 5), (13,), (5000,)]
    ours, ref = _model(shapes), _model(shapes)
    opt = adamkit.AdamW(ours, lr=1e-2, weight_decay=0.1, backend=backend, capturable=True)
    ref_opt = adamkit.AdamW(ref, lr=1e-2, weight_decay=0.1, backend="eager")
    for step in range(6):
        _set_grads(ours, step), _set_grads(ref, step)
        if step == 3:
            ours[1].grad = ref[1].grad = None
        opt.step(), ref_opt.step()
    _assert_close(ours, ref, opt, ref_opt)
    for p in ours:
        step = opt.state[p]["step"]
        assert step.dtype == torch.float32 and step.device == p.device and step.dim() == 0


def test_capturable_step_traces_whole_under_torch_compile() -> None:
    p = torch.randn(33, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt = adamkit.AdamW([p], lr=1e-2, capturable=True)
    ref_opt = adamkit.AdamW([q], lr=1e-2, backend="eager")
    compiled_step = torch.compile(opt.step, fullgraph=True)
    for step in range(3):
        p.grad = torch.full_like(p, 0.1 * (step + 1))
        q.grad = p.grad.clone()
        compiled_step()
        ref_opt.step()
    assert relative_error(p, q) <= TOLERANCE
    assert float(opt.state[p]["step"]) == 3.0


def test_non_contiguous_grads_and_params_are_handled() -> None:
    shapes = [(64, 80), (80, 64), (33,)]
    ours, ref = _model(shapes), _model(shapes)
    # a non-contiguous param (stepped on the eager path) and non-contiguous grads
    ours[1] = ours[1].detach().t().contiguous().t().requires_grad_()
    ref[1] = ref[1].detach().t().contiguous().t().requires_grad_()
    opt = adamkit.AdamW(ours, lr=1e-2, backend="compiled")
    ref_opt = adamkit.AdamW(ref, lr=1e-2, backend="eager")
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        for p, q in zip(ours, ref):
            g = torch.randn(tuple(reversed(p.shape)), generator=gen).t()  # non-contiguous
            p.grad, q.grad = g, g.clone()
        opt.step(), ref_opt.step()
    _assert_close(ours, ref, opt, ref_opt)


@pytest.mark.parametrize(
    ("shape", "offset", "numel", "row"),
    [((4, 256), 0, 1024, 256), ((512,), 0, 512, 256), ((8, 128), 0, 1024, 256),
     ((64, 128), 0, None, 128), ((3, 2, 256), 0, 1536, 256)],
)  # fmt: skip
def test_a_whole_grad_is_passed_as_the_same_rows_without_the_general_views(
    shape, offset, numel, row
) -> None:
    """A slot that is its whole param takes the grad itself, or one view of it, as its rows:
    the very memory, shape and strides that the general path (ravel, narrow, view) gives."""
    from adamkit.execution.compiled import grad_argument

    grad = torch.randn(shape)
    n = grad.numel()
    general = grad_argument(grad, offset, numel, row, None)
    fast = grad_argument(grad, offset, numel, row, (n // row, row))
    assert general.shape == fast.shape == (n // row, row)
    assert fast.data_ptr() == general.data_ptr() == grad.data_ptr()
    assert fast.stride() == general.stride() == (row, 1)
    assert (fast is grad) == (shape == (n // row, row))  # no view when none is needed


def _int8_pair(shapes, seed: int, steps: int):
    """Compiled and eager AdamW with int8 state on every tensor, on the same params, after
    ``steps`` steps on the same grads; the compiled one stepped every tensor in its kernels.
    Returns both params, both optimizers and the compiled plan."""
    kwargs = dict(lr=1e-2, weight_decay=0.1, state_dtype="int8", min_quantized_size=0, seed=seed)
    ours, ref, opt, ref_opt = _pair(shapes, **kwargs)
    _step_pair(ours, ref, opt, ref_opt, steps=steps)
    plan = opt._executor._plans[0]
    assert plan.eager == [] and plan.failed == []
    return ours, ref, opt, ref_opt, plan


WHOLE_BLOCK_SHAPES = [(4, 256), (512,), (8, 128), (300, 7), (64, 128)]


def test_whole_block_wise_grads_step_as_the_eager_path_does() -> None:
    """Params whose slots are whole (4x256: the grad itself; 512, 8x128 and 64x128: one view)
    and one whose slot is a part of it (300x7: whole blocks, then a tail) step compiled as the
    eager path steps them, moments included (a grad passed wrongly, e.g. scaled, moves the
    params about as far as the eager path, Adam being invariant to the grads' scale, but not
    m). 64x128 (32 blocks) is stepped by a kernel of the mixed layout, which has no tail mask
    (only small kernels step tails)."""
    ours, ref, opt, ref_opt, plan = _int8_pair(WHOLE_BLOCK_SHAPES, seed=3, steps=3)
    # int8: moments a level apart here and there
    _assert_decoded_close(ours, ref, opt, ref_opt, param_tol=2e-5, moment_tol=2e-2)
    whole = {s[5] for call in plan.calls for s in call.grad_slots if s[5] is not None}
    assert whole == {(4, 256), (2, 256), (32, 256)}, whole  # 512 and 8x128: two blocks
    assert {call.kernel.spec.layout for call in plan.calls} == {"small", "mixed"}


def test_a_nonfinite_value_makes_its_block_scale_nonfinite_as_eager() -> None:
    """A NaN or an inf in the grad makes the scale of its block non-finite in the compiled
    kernels (the block maxima over int32 bit patterns, adamkit.execution.maxima, let a NaN
    win), as in the eager path: NaN for a NaN, inf for an inf, every other block's scale
    as eager's."""
    # the shapes of the test above: its kernels
    ours, ref, opt, ref_opt, _ = _int8_pair(WHOLE_BLOCK_SHAPES, seed=3, steps=1)
    for params in (ours, ref):
        _set_grads(params, 1)
        params[0].grad[1, 3] = float("nan")  # block 1 of the small slot
        params[4].grad[10, 5] = float("inf")  # block 5 of the mixed slot
        params[4].grad[40, 0] = float("nan")  # block 20
    opt.step(), ref_opt.step()
    for p, q in zip(ours, ref):
        for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
            got, want = opt.state[p][key], ref_opt.state[q][key]
            assert torch.equal(got.isnan(), want.isnan()), (p.shape, key)
            assert torch.equal(got.isinf(), want.isinf()), (p.shape, key)
            finite = want.isfinite()
            assert relative_error(got[finite], want[finite]) <= 2e-2, (p.shape, key)
    nan_blocks = {0: [1], 4: [20]}
    for i, blocks in nan_blocks.items():
        scale = opt.state[ours[i]]["exp_avg_sq_absmax"]
        assert scale[blocks].isnan().all() and scale.isnan().sum() == len(blocks)
    assert opt.state[ours[4]]["exp_avg_absmax"][5].isinf()


def test_kernels_of_adamkits_widths_match_eager(monkeypatch) -> None:
    """The suite compiles kernels of 2 tensors (tests/conftest.py: compile time); adamkit's
    mixed kernels take 8. At that width, nine mixed tensors (a full kernel, then one slot and
    seven of padding) step as the eager path steps them, int8 state with stochastic rounding
    in every slot."""
    from adamkit.execution import plan

    monkeypatch.setattr(plan, "MIXED_WIDTH", 8)
    shapes = [(20 + k, 256) for k in range(9)]
    ours, ref, opt, ref_opt, plan_ = _int8_pair(shapes, seed=7, steps=2)
    _assert_decoded_close(ours, ref, opt, ref_opt, param_tol=2e-5, moment_tol=2e-2)
    calls = [(c.kernel.spec.layout, c.kernel.spec.width, len(c.members)) for c in plan_.calls]
    assert sorted(calls) == [("mixed", 8, 1), ("mixed", 8, 8)], calls


def test_row_loops_without_barriers_step_every_tensor_as_the_eager_path_does() -> None:
    """An int4 chunk of the mixed layout (each tensor's loops in one parallel region) on two
    threads runs a tensor's scale, main and packing loops without the barriers between them
    (adamkit.execution.barriers): each thread goes on with its own rows. The scale copies
    keep the barrier before them: with 40 rows a tensor, the copies' 16-scale iterations
    split the rows 32 + 8 where the row loops split them 20 + 20, so a thread copying new
    scales over the ones another thread still decodes would move those rows' updates (a race:
    tested with every barrier dropped, the params' error grew 20-fold)."""
    shapes = [(40, 256)] * 8  # 40 rows: the scale copies (16 an iteration) split them 32 + 8
    kwargs = dict(lr=1e-2, weight_decay=0.1, state_dtype="int4", min_quantized_size=0, seed=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ours, ref, opt, ref_opt = _pair(shapes, **kwargs)
        _step_pair(ours, ref, opt, ref_opt, steps=4)
    finally:
        torch.set_num_threads(threads)
    # params, measured: 1.1e-4 with the barriers or without them (a code a level apart here
    # and there moves the update); 2.3e-3 and 2.6e-3 with every barrier dropped (a race).
    # int4 moments: levels apart
    _assert_decoded_close(ours, ref, opt, ref_opt, param_tol=5e-4, moment_tol=5e-2)
    plan = opt._executor._plans[0]
    assert {call.kernel.spec.layout for call in plan.calls} == {"mixed"}


def test_a_padded_slot_never_reaches_a_kernel_without_the_tail_mask(monkeypatch) -> None:
    """Only small kernels mask a tail block's padding; were a tail slot (one block, 52 of its
    256 elements real) ever put in a mixed chunk, building the plan refuses it."""
    from adamkit.execution import plan as plan_module

    monkeypatch.setattr(plan_module, "SMALL_NUMEL", 200)  # the 256-element tail: not small
    p = torch.randn(300, 7, requires_grad=True)
    p.grad = torch.randn(300, 7)
    opt = adamkit.AdamW([p], lr=1e-2, backend="compiled", state_dtype="int8", min_quantized_size=0)
    with pytest.raises(AssertionError, match="256 elements of which 52 are the param's"):
        opt.step()


# Every storage format runs compiled. Sizes: no whole number of blocks (a 52-element tail
# after 8 int8 blocks, a tensor smaller than one block), whole blocks, and under 4096
# elements so that one kernel (small chunks) per format is compiled.
LEAN_SHAPES = [(300, 7), (129,), (1000,), (64, 33), (2, 3), (512,)]
LEAN_CASES = [
    ("bfloat16", torch.float32, False),
    ("int8", torch.float32, False),
    ("int4", torch.float32, False),
    ("float32", torch.bfloat16, True),  # bf16 params with stochastic rounding
    ("int8", torch.bfloat16, True),
]


@pytest.mark.parametrize(("state_dtype", "dtype", "sr"), LEAN_CASES, ids=str)
def test_lean_state_and_stochastic_rounding_run_compiled_and_match_eager(
    state_dtype: str, dtype: torch.dtype, sr: bool
) -> None:
    def model():
        gen = torch.Generator().manual_seed(0)
        return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in LEAN_SHAPES]

    ours, ref = model(), model()
    kwargs = dict(
        lr=1e-2,
        weight_decay=0.1,
        state_dtype=state_dtype,
        min_quantized_size=0,
        stochastic_rounding=sr,
        seed=3,
    )
    opt = adamkit.AdamW(ours, backend="compiled", **kwargs)
    ref_opt = adamkit.AdamW(ref, backend="eager", **kwargs)
    # The random streams are the same numbers on both paths (drawn by element index), so the
    # only differences come from fp32 rounding inside the update: a value within an ulp of a
    # rounding decision (a stochastic draw, a code boundary) can go the other way, leaving that
    # moment entry one step of its format apart (a bf16 ulp, an int8/int4 level) and moving
    # its param by up to lr * |change of u| in the next steps (about 1e-4 of the largest entry
    # here for one int8 level: it happens in a few of every ten seeds). So: at most 0.5% of
    # moment entries off by more than 2e-6, none by more than one step of the format, and the
    # param entries whose moments never went apart within 2e-5 (relative to the largest entry).
    level = {"bfloat16": 2.0**-7, "int8": 4.0 / 127, "int4": 0.5}.get(state_dtype, 2e-6)
    apart = [torch.zeros(p.shape, dtype=torch.bool) for p in ours]
    for step in range(20):
        gen = torch.Generator().manual_seed(100 + step)
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        for p, q, went in zip(ours, ref, apart):
            ours_state, ref_state = opt.decoded_state(p), ref_opt.decoded_state(q)
            for key in ("exp_avg", "exp_avg_sq"):
                want, have = ref_state[key].float(), ours_state[key].float()
                scale = want.abs().max().clamp_min(1e-30)
                diff = (have - want).abs() / scale
                off = (diff > 2e-6).float().mean().item()
                assert off <= 0.005 and diff.max() <= level, (step, tuple(p.shape), key, off)
                went |= diff > 2e-6
            error = (p.detach().double() - q.detach().double()).abs()
            error = error / q.detach().double().abs().max()
            assert error[~went].max() <= 2e-5, (step, tuple(p.shape))
    group_plan = opt._executor._plans[0]
    assert group_plan.eager == [] and group_plan.failed == []  # all of it ran compiled
    codec, _ = opt.codec_for(ours[0])
    assert any(spec.codec == codec for spec in kernels._KERNELS)


@pytest.mark.parametrize(("state_dtype", "tol"), [("float32", 1e-5), ("int8", 2e-2)])
def test_signal_kernels_return_the_norms_of_the_step(state_dtype: str, tol: float) -> None:
    """On a Monitor's sampled step (``fused_signals_request``) the compiled kernels return
    :func:`fused_norms` of every param (with p0 and p1 for fp32 params and moments), slots
    added up: float params of 4096 elements or more
    as rows of SIGNAL_ROW (1024) plus a tail slot (70x100: 6 rows + 856; 4097: 3 rows + 1025), int8
    as whole blocks plus a tail block (small params only: one compile fewer). By hand from g
    and the stored moments (int8: decoded, so within the quantisation error of the values the
    kernel saw); the params and moments step as a plain compiled step steps them."""
    from adamkit.diagnostics.signals import fused_norms

    shapes = [(300, 7), (129,), (64, 33)]
    if state_dtype == "float32":  # rows (int8 slots are blocks, whatever their size)
        shapes += [(70, 100), (64, 128), (4097,)]
    opts = []
    for request in (True, False):
        ps = _model(shapes)
        opt = adamkit.AdamW(
            ps, lr=1e-2, weight_decay=0.1, backend="compiled", state_dtype=state_dtype,
            min_quantized_size=0,
        )  # fmt: skip
        opt.fused_signals = True  # from the first sampled step ("auto" waits for a payoff)
        for step in range(2):
            _set_grads(ps, step)
            opt.fused_signals_request = request and step == 1
            before = [p.detach().clone() for p in ps]
            opt.step()
        opts.append((ps, opt, before))
    (ps, opt, before), (plain_ps, plain, _) = opts
    got = opt.fused_signal_sums
    assert set(got) == set(ps)
    for p, q, p0 in zip(ps, plain_ps, before):
        state = opt.decoded_state(p)
        args = [p.grad.flatten(), state["exp_avg"].flatten(), state["exp_avg_sq"].flatten()]
        if state_dtype == "float32":  # fp32 params, float moments: and sum p0^2, sum dp^2
            args += [p0.flatten(), p.detach().flatten()]
        want = fused_norms(*args)
        assert got[p].shape == want.shape == (len(args),)
        assert torch.allclose(got[p], want, rtol=tol, atol=1e-9), (p.shape, got[p], want)
        assert torch.allclose(p, q, rtol=1e-6, atol=0), p.shape
        other = plain.decoded_state(q)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(state[key], other[key], rtol=1e-6, atol=0), (p.shape, key)
    plan = opt._executor._plans[0]
    assert plan.eager == [] and plan.failed == []
    if state_dtype == "float32":  # the rows of 70x100 and of 4097 are slots of their own
        sizes = sorted(slot.numel for call in plan.calls for slot in call.slots)
        R = kernels.SIGNAL_ROW  # whole rows and a tail of 2 to R + 1 elements
        assert {7000 // R * R, 7000 % R, 4097 // R * R - R, 4097 % R + R, 8192} <= set(sizes)


def _variants(monkeypatch, flags: list[dict[str, bool]], passes: dict, run):
    """``run()`` with kernels compiled under each setting of ``flags`` (``kernels.<name>``
    values), each under a fresh CODEGEN_PATCHES key (every variant compiles here, none comes
    from a cache); returns the results and, per text pass ``kernels.<name>`` in ``passes``,
    whether it changed some source (``passes[name](out, source)``)."""
    import uuid

    seen: dict[str, list[bool]] = {name: [] for name in passes}
    for name, applied in passes.items():
        real = getattr(kernels, name)

        def recording(source, *args, real=real, name=name, applied=applied):
            out = real(source, *args)
            seen[name].append(applied(out, source))
            return out

        monkeypatch.setattr(kernels, name, recording)
    key = f"{kernels.CODEGEN_PATCHES}; test {uuid.uuid4().hex}"
    runs = []
    for k, setting in enumerate(flags):
        for flag, on in setting.items():
            monkeypatch.setattr(kernels, flag, on)
        monkeypatch.setattr(kernels, "CODEGEN_PATCHES", f"{key} {k}")
        kernels.reset_kernels()
        runs.append(run())
    kernels.reset_kernels()
    return runs, {name: any(s) for name, s in seen.items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes (NaN payloads and the sign of zero count)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _assert_same_bits(run, ref_run) -> None:
    """The params and every tensor of their state in two runs ``(params, optimizer)`` are
    the same bit for bit."""
    (ps, opt), (ref_ps, ref) = run, ref_run
    for p, q in zip(ps, ref_ps, strict=True):
        assert torch.equal(_bits(p), _bits(q)), p.shape
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(_bits(value), _bits(ref.state[q][key])), (p.shape, key)


def test_merged_and_contracted_sums_change_no_update_bit(monkeypatch) -> None:
    """kernels.MERGE_SUM_LOOPS (adamkit.execution.merging: a signals kernel's per-row sums
    computed in the loop that writes the row) changes no bit of the sums, the params or the
    moments; kernels.CONTRACT_SUMS (adamkit.execution.contraction: the sums of squares
    accumulated by fused multiply-adds) changes no bit of the params and moments and the sums
    only to float32 rounding; both passes did apply. Three variants: both on (the default),
    merged only, neither."""

    def run():
        ps = _model([(64, 128)])
        opt = adamkit.AdamW(ps, lr=1e-2, weight_decay=0.1, backend="compiled")
        opt.fused_signals = True
        for step in range(3):
            _set_grads(ps, step)
            opt.fused_signals_request = step >= 1
            opt.step()
        return ps, opt

    flags = [
        {"MERGE_SUM_LOOPS": True, "CONTRACT_SUMS": True},
        {"MERGE_SUM_LOOPS": True, "CONTRACT_SUMS": False},
        {"MERGE_SUM_LOOPS": False, "CONTRACT_SUMS": False},
    ]
    passes = {
        "merge_sum_loops": lambda out, src: out != src,
        "contract_sums": lambda out, src: "fmadd(" in out,
    }
    (both, merged, neither), applied = _variants(monkeypatch, flags, passes, run)
    assert applied == {"merge_sum_loops": True, "contract_sums": True}
    for (ps, opt), (ref_ps, ref), exact in ((merged, neither, True), (both, merged, False)):
        assert set(opt.fused_signal_sums) == set(ps)
        for p, q in zip(ps, ref_ps):
            got, want = opt.fused_signal_sums[p], ref.fused_signal_sums[q]
            if exact:
                assert torch.equal(got, want), p.shape
            else:
                assert torch.allclose(got, want, rtol=1e-6, atol=0), (p.shape, got, want)
            assert torch.equal(p, q), p.shape
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[p][key], ref.state[q][key]), (p.shape, key)


def test_shared_row_values_row_temporaries_and_integer_maxima_change_no_bit(monkeypatch) -> None:
    """With kernels.SHARE_ROW_VALUES (a block-wise kernel's scale pass and main loop under one
    loop over rows, the main loop loading the new moments the scale pass computed),
    kernels.LOCALIZE_ROW_TEMPS (an int4 kernel's pack loops moved up and fused with its main
    loop, the row of unpacked codes between them kept on the stack instead of a buffer the
    size of the moment) and kernels.INTEGER_MAXIMA (the block maxima over int32 bit patterns)
    the params and the stored codes and scales are those of the kernels without any of them,
    bit for bit, on two threads, and every pass did apply. (int4, whose kernels take all
    three; int8's meet the eager path in the tests above.)"""

    def run():
        ps = _model([(40, 512)])
        opt = adamkit.AdamW(ps, lr=1e-2, weight_decay=0.1, backend="compiled", state_dtype="int4")
        for step in range(3):
            _set_grads(ps, step)
            opt.step()
        assert opt._executor._plans[0].eager == [] and opt._executor._plans[0].failed == []
        return ps, opt

    flags = [
        {"SHARE_ROW_VALUES": True, "LOCALIZE_ROW_TEMPS": True, "INTEGER_MAXIMA": True},
        {"SHARE_ROW_VALUES": False, "LOCALIZE_ROW_TEMPS": False, "INTEGER_MAXIMA": False},
    ]
    passes = {
        "share_row_values": lambda out, src: "abuf" in out,
        "localize_row_temps": lambda out, src: "lbuf_" in out,
        "integer_maxima": lambda out, src: "at::vec::cast<int32_t>(tmp_acc" in out,
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs, applied = _variants(monkeypatch, flags, passes, run)
    finally:
        torch.set_num_threads(threads)
    assert applied == {"share_row_values": True, "localize_row_temps": True, "integer_maxima": True}
    _assert_same_bits(*runs)


def test_truncated_bf16_conversions_change_no_bit(monkeypatch) -> None:
    """With kernels.TRUNCATE_EXACT_BF16 (adamkit.execution.truncation: stochastic rounding's
    fp32 -> bf16 conversions written as truncations) the bf16 moments and the bf16 params
    written with stochastic rounding are those of the kernels without it, bit for bit, over
    steps whose values span many binades (and a tail that is not a whole vector), and the pass
    did apply."""
    from adamkit.execution.truncation import MACRO

    def run():
        shapes = [(40, 77), (3, 1000)]
        ps = _model(shapes)
        sr = [p.detach().to(torch.bfloat16).requires_grad_() for p in _model(shapes, seed=1)]
        opt = adamkit.AdamW(
            [{"params": ps, "state_dtype": "bfloat16"}, {"params": sr}],
            lr=1e-2,
            weight_decay=0.1,
            backend="compiled",
            stochastic_rounding=True,
        )
        for step in range(4):
            gen = torch.Generator().manual_seed(100 + step)
            for p in ps + sr:
                grad = torch.randn(p.shape, generator=gen) * 10.0 ** (3 * step - 6)
                p.grad = grad.to(p.dtype)
            opt.step()
        assert all(plan.eager == [] for plan in opt._executor._plans.values())
        return ps + sr, opt

    runs, applied = _variants(
        monkeypatch,
        [{"TRUNCATE_EXACT_BF16": True}, {"TRUNCATE_EXACT_BF16": False}],
        {"truncate_exact_bf16": lambda out, src: MACRO + "(" in out},
        run,
    )
    assert applied == {"truncate_exact_bf16": True}
    _assert_same_bits(*runs)
    ps, opt = runs[0]
    assert opt.state[ps[0]]["exp_avg"].dtype == torch.bfloat16
    assert ps[-1].dtype == torch.bfloat16


def _hoisted_above_a_sized_loop(source: str) -> bool:
    """Whether a definition sits right above a loop up to a kernel size (``ks0``; its pragma
    between them in parallel code): inductor writes a ``{`` there, only the hoisting of such
    a loop puts lines in front of one."""
    lines = [line.strip() for line in source.split("\n") if "#pragma" not in line]
    sized = re.compile(
        r"^for\(int64_t x\d+=static_cast<int64_t>\(0L\); x\d+<static_cast<int64_t>\(ks"
    )
    return any(a.startswith("auto ") and sized.match(b) for a, b in zip(lines, lines[1:]))


def test_masked_moves_logical_shifts_affine_indices_and_sized_hoisting_change_no_bit(
    monkeypatch,
) -> None:
    """With kernels.MASKED_MOVES, LOGICAL_SHIFTS, AFFINE_INDICES (adamkit.execution.masks,
    shifts, indices: stochastic rounding's guard, hash shifts and hashed indices) and
    HOIST_SIZED_LOOPS (the flat loops' invariants) the params and the bf16 and int8 state are
    those of the kernels without them, bit for bit, over steps whose values span many binades
    (values at the largest bf16 too, where the guard adds no noise), and every pass applied."""
    from adamkit.execution.indices import MACRO as INDEX
    from adamkit.execution.masks import MACRO as MASK
    from adamkit.execution.shifts import MACRO as SHIFT

    def run():
        shapes = [(40, 77), (3, 1000)]
        ps = _model(shapes)
        sr = [p.detach().to(torch.bfloat16).requires_grad_() for p in _model(shapes, seed=1)]
        q8 = _model([(9, 300)], seed=2)
        opt = adamkit.AdamW(
            [
                {"params": ps, "state_dtype": "bfloat16"},
                {"params": sr},
                {"params": q8, "state_dtype": "int8"},
            ],  # fmt: skip
            lr=1e-2,
            weight_decay=0.1,
            backend="compiled",
            stochastic_rounding=True,
            min_quantized_size=0,
        )
        for step in range(4):
            gen = torch.Generator().manual_seed(100 + step)
            for p in ps + sr + q8:
                grad = torch.randn(p.shape, generator=gen) * 10.0 ** (3 * step - 6)
                p.grad = grad.to(p.dtype)
            if step == 3:  # v of a few entries past the largest finite bf16: (0.001 g) g
                ps[0].grad.view(-1)[:5] = 5.83e20
            opt.step()
        assert all(plan.eager == [] for plan in opt._executor._plans.values())
        return ps + sr + q8, opt

    on = {"MASKED_MOVES": True, "LOGICAL_SHIFTS": True, "AFFINE_INDICES": True}
    runs, applied = _variants(
        monkeypatch,
        [{**on, "HOIST_SIZED_LOOPS": True}, {k: False for k in (*on, "HOIST_SIZED_LOOPS")}],
        {
            "masked_moves": lambda out, src: MASK + "2(" in out,
            "logical_shifts": lambda out, src: SHIFT + "1(" in out and SHIFT + "2(" in out,
            "affine_indices": lambda out, src: INDEX + "1(" in out and INDEX + "2(" in out,
            "hoist_invariants": lambda out, src: _hoisted_above_a_sized_loop(out),
        },
        run,
    )
    assert applied == dict.fromkeys(
        ("masked_moves", "logical_shifts", "affine_indices", "hoist_invariants"), True
    )
    _assert_same_bits(*runs)
    ps, opt = runs[0]
    v = opt.state[ps[0]]["exp_avg_sq"].float().view(-1)[:5]
    assert torch.isfinite(v).all() and (v == torch.finfo(torch.bfloat16).max).all()


def test_byte_shifts_and_integer_reductions_change_no_bit(monkeypatch) -> None:
    """With kernels.CONSTANT_BYTE_SHIFTS (adamkit.execution.byteshift: the int4 codes' packing
    shift as a 16-bit shift and a mask) and kernels.INTEGER_REDUCTIONS (adamkit.execution.maxima:
    the block maxima reduced across lanes as int32 maxima of their bit patterns) the params,
    codes and scales are those of the kernels without them, bit for bit, and both passes did
    apply. A NaN in a gradient then makes its block's scales NaN either way, and no other
    block's scale changes."""
    from adamkit.execution.byteshift import MACRO
    from adamkit.execution.maxima import MACRO as MAX_MACRO

    def run():
        ps = _model([(40, 512), (3, 300)])
        opt = adamkit.AdamW(ps, lr=1e-2, weight_decay=0.1, backend="compiled", state_dtype="int4")
        for step in range(3):
            _set_grads(ps, step)
            opt.step()
        assert all(plan.eager == [] for plan in opt._executor._plans.values())
        finite = [p.detach().clone() for p in ps]
        finite_state = [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]
        _set_grads(ps, 3)
        ps[0].grad[7, 300] = float("nan")  # element 3884, block 3884 // 256 = 15
        opt.step()
        scales = {k: opt.state[ps[0]][k].clone() for k in ("exp_avg_absmax", "exp_avg_sq_absmax")}
        for p, before, state in zip(ps, finite, finite_state, strict=True):
            p.data.copy_(before)
            opt.state[p].update(state)
        return ps, opt, scales

    runs, applied = _variants(
        monkeypatch,
        [
            {"CONSTANT_BYTE_SHIFTS": True, "INTEGER_REDUCTIONS": True},
            {"CONSTANT_BYTE_SHIFTS": False, "INTEGER_REDUCTIONS": False},
        ],
        {
            "constant_byte_shifts": lambda out, src: MACRO + "(" in out,
            "integer_reductions": lambda out, src: MAX_MACRO + "(" in out,
        },
        run,
    )
    assert applied == {"constant_byte_shifts": True, "integer_reductions": True}
    _assert_same_bits(runs[0][:2], runs[1][:2])
    ps, opt, scales = runs[0]
    assert opt.state[ps[0]]["exp_avg_int4_codes"].dtype == torch.uint8
    others = torch.arange(scales["exp_avg_absmax"].numel()) != 15
    for key, scale in scales.items():
        ref = runs[1][2][key]
        assert scale[15].isnan() and ref[15].isnan(), key
        assert torch.equal(_bits(scale[others]), _bits(ref[others])), key
        assert scale[others].isfinite().all(), key


def test_signal_kernels_follow_fused_signals() -> None:
    """fused_signals: False never hands sums over (the Monitor measures itself), "auto" does
    once the kernels exist in the process (their compile already paid), True does; anything
    else is refused by name."""
    shapes = [(300, 7), (129,), (64, 33)]
    got = {}
    for mode in (True, False, "auto"):  # True first: it compiles the kernels for "auto"
        ps = _model(shapes)
        opt = adamkit.AdamW(ps, lr=1e-2, weight_decay=0.1, backend="compiled")
        opt.fused_signals = mode
        _set_grads(ps, 0)
        opt.fused_signals_request = True
        opt.step()
        got[mode] = len(opt.fused_signal_sums)  # params handed sums
    assert got == {True: 3, "auto": 3, False: 0}
    opt.fused_signals = "yes"
    with pytest.raises(ValueError, match="fused_signals='yes'"):
        opt.supports_fused_signals  # noqa: B018


def test_signal_kernels_that_cannot_compile_warn_once_and_the_monitor_measures(
    monkeypatch,
) -> None:
    """A signals kernel that fails to compile leaves a Monitor to read the norms itself: the
    step and the records are those of the plain kernels, and one RuntimeWarning says why."""
    compile_kernel = kernels._compile

    def no_signals(spec, device):
        if spec.signals:
            raise kernels.CompileUnavailable("simulated: no signal kernel")
        return compile_kernel(spec, device)

    monkeypatch.setattr(kernels, "_KERNELS", {})
    monkeypatch.setattr(kernels, "_compile", no_signals)
    shapes = [(300, 7), (129,), (64, 33)]
    ps = _model(shapes)
    opt = adamkit.AdamW(ps, lr=1e-2, backend="compiled")
    opt.fused_signals = True
    mon = adamkit.Monitor(opt, every=1, alerts=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            _set_grads(ps, step)
            opt.step()
    messages = [str(w.message) for w in caught if "signal sums" in str(w.message)]
    assert len(messages) == 1 and "simulated: no signal kernel" in messages[0], messages
    assert not [str(w.message) for w in caught if "compiled backend" in str(w.message)]
    assert not opt.fused_signal_sums  # nothing was handed over
    record = mon.latest()
    for name, p in zip(record["tensors"], ps):
        t = record["tensors"][name]
        assert t["grad_norm"] == pytest.approx(p.grad.double().norm().item(), rel=1e-6)
        assert t["exp_avg_norm"] == pytest.approx(
            opt.state[p]["exp_avg"].double().norm().item(), rel=1e-6
        )
    mon.close()


def test_signal_policy_compiles_once_the_reads_saved_pay_for_it() -> None:
    """Ski rental: each sampled step without the kernels adds the read of g, m, v that they
    would have saved; the kernels are compiled once that reaches COMPILE_SECONDS per missing
    kernel, and at once when none is missing."""
    from adamkit.execution.compiled import SignalPolicy

    class Plan:
        buckets: list = []
        missing = 2

        def missing_signal_kernels(self):
            return self.missing

        def compiled_numel(self):
            return 100_000_000

    plan, policy = Plan(), SignalPolicy()
    per_step = 100_000_000 * SignalPolicy.READ_BYTES / SignalPolicy.READ_RATE["cpu"]
    needed = math.ceil(2 * SignalPolicy.COMPILE_SECONDS / per_step)
    answers = [policy.observe(plan) for _ in range(needed)]
    assert answers[-1] and not any(answers[:-1]), (needed, answers.index(True))
    plan.missing = 0
    assert SignalPolicy().observe(plan)


def test_auto_fused_signals_never_compile_on_a_short_run() -> None:
    """With "auto" (default) a sampled step whose signal kernels are not compiled yet is
    served by the plain kernels (no sums: the Monitor measures itself) and compiles nothing;
    a small model would need far more sampled steps than a test runs for them to pay."""
    ps = _model([(300, 7), (129,), (64, 33)])
    opt = adamkit.AdamW(ps, lr=1e-2, amsgrad=True, maximize=True, backend="compiled")
    _set_grads(ps, 0)
    opt.step()
    group_plan = opt._executor._plans[0]
    missing = group_plan.missing_signal_kernels()
    compiles = compile_stats().compiles
    for step in range(1, 4):
        _set_grads(ps, step)
        opt.fused_signals_request = True
        opt.step()
        assert len(opt.fused_signal_sums) == (0 if missing else 3)
    if missing:  # (kernels another test compiled would be used at once)
        assert compile_stats().compiles == compiles
        assert group_plan.missing_signal_kernels() == missing


@pytest.mark.parametrize("n", [16, 37, 4099])
@pytest.mark.parametrize("lanes", [16, 32])
def test_bit_casts_compile_to_vector_casts_with_the_same_bits(n, lanes) -> None:
    """Under the kernels' code-generation patch a float32 <-> int32 bit cast is one vector
    cast (not a store, 16 scalar casts and a load), or two in a loop tiled by 32 (a bf16
    output), and the bits are eager's, tails included."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    def f(x, noise):
        bits = x.view(torch.int32) + noise
        out = (bits & -65536).view(torch.float32) * 2.0
        return out.to(torch.bfloat16) if lanes == 32 else out

    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen)
    noise = torch.randint(0, 1 << 16, (n,), generator=gen, dtype=torch.int32)
    torch._dynamo.reset()
    with kernels._vector_bitcasts(), inductor_config.patch(fx_graph_cache=False):
        got, code = run_and_get_code(torch.compile(f, dynamic=False), x, noise)
    torch._dynamo.reset()
    source = "\n".join(code)
    assert "at::vec::cast<int32_t>" in source and "at::vec::cast<float>" in source
    assert "c10::bit_cast" not in source
    if lanes == 32 and n >= 32:
        assert "VectorizedN<int32_t,2>(at::vec::cast<int32_t>(" in source
    bits = torch.int16 if lanes == 32 else torch.int32
    assert torch.equal(got.view(bits), f(x, noise).view(bits))


@pytest.mark.skipif(sys.platform == "win32", reason="the prefetch is GCC/Clang only")
@pytest.mark.parametrize("n", [16, 37, 4099])
def test_index_vectors_and_prefetched_loads_keep_eager_values(n) -> None:
    """Under the kernels' code-generation patches a vector of element indices is a broadcast
    plus constant lanes (not 16 runtime scalars), each contiguous vector load is preceded by a
    prefetch further along the same tensor, and the values are eager's, tails included."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    def f(x, y, key):
        index = torch.arange(x.numel(), dtype=torch.int32) + key
        h = (index * -1640531535) ^ ((index >> 16) & 0xFFFF)
        return x * 2.0 + y.float() + (h & 0xFF).float()

    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen)
    y = torch.randn(n, generator=gen).to(torch.bfloat16)
    key = torch.tensor(12345, dtype=torch.int32)
    torch._dynamo.reset()
    with (
        kernels._vector_aranges(),
        kernels._prefetched_loads(),
        inductor_config.patch(fx_graph_cache=False),
    ):
        got, code = run_and_get_code(torch.compile(f, dynamic=False), x, y, key)
    torch._dynamo.reset()
    source = "\n".join(code)
    assert "::arange(0, 1)" in source
    assert not re.search(r"arange\(tmp", source)
    assert source.count("__builtin_prefetch(") >= 2  # x and y
    assert f"+ {kernels.PREFETCH_AHEAD}, 0, 3)" in source
    assert torch.equal(got, f(x, y, key))


def test_only_kernels_of_block_codes_prefetch(monkeypatch) -> None:
    """Kernels of float moments (fp32, bf16) are compiled without software prefetches (their
    loop bodies are short enough for the hardware prefetcher, and on the Zen 4 VM the
    prefetches cost them time); kernels of block codes prefetch ``PREFETCH_AHEAD`` elements
    ahead; ``_prefetched_loads(0)`` leaves inductor's loads as they are."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    asked: list[int] = []
    original = kernels._prefetched_loads

    def recording(ahead: int = kernels.PREFETCH_AHEAD):
        asked.append(ahead)
        return original(ahead)

    monkeypatch.setattr(kernels, "_prefetched_loads", recording)
    monkeypatch.setattr(kernels, "_KERNELS", {})
    gen = torch.Generator().manual_seed(0)
    for state_dtype, expected in [
        (None, 0),
        ("bfloat16", 0),
        ("int8", kernels.PREFETCH_AHEAD),
        ("int4", kernels.PREFETCH_AHEAD),
    ]:
        asked.clear()
        p = torch.nn.Parameter(torch.randn(300, generator=gen))
        p.grad = torch.randn(300, generator=gen)
        opt = adamkit.AdamW([p], backend="compiled", state_dtype=state_dtype, min_quantized_size=0)
        opt.step()
        assert asked and set(asked) == {expected}, (state_dtype, asked)
    assert kernels.PREFETCH_AHEAD > 0 and not kernels.PREFETCH_FLOAT_STATE

    def f(x):
        return x * 2.0 + 1.0

    x = torch.randn(4099, generator=gen)
    torch._dynamo.reset()
    with original(0), inductor_config.patch(fx_graph_cache=False):
        got, code = run_and_get_code(torch.compile(f, dynamic=False), x)
    torch._dynamo.reset()
    assert "loadu(" in "\n".join(code) and "__builtin_prefetch(" not in "\n".join(code)
    assert torch.equal(got, f(x))


@pytest.mark.parametrize("n", [16, 37, 4099])
def test_int32_to_uint8_compiles_to_a_vector_conversion_with_the_same_bytes(n) -> None:
    """Under the kernels' code-generation patch int32 -> uint8 (the block codes) goes through
    ATen's vector int8 conversion, and the bytes are eager's (modulo 256, out-of-range values
    and tails included)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    def f(x):
        return (x * 3 - 7).to(torch.uint8)

    x = torch.randint(
        -400, 400, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.int32
    )
    torch._dynamo.reset()
    with kernels._vector_narrowing(), inductor_config.patch(fx_graph_cache=False):
        got, code = run_and_get_code(torch.compile(f, dynamic=False), x)
    torch._dynamo.reset()
    source = "\n".join(code)
    assert "at::vec::cast<uint8_t>(at::vec::convert<int8_t>(" in source
    assert "at::vec::convert<uint8_t>(" not in source
    assert torch.equal(got, f(x))


def test_serial_and_parallel_cpu_code_are_cached_apart() -> None:
    # inductor writes CPU kernels without parallel loops in a one-thread process, and its
    # cache keys did not say so: the marker pass's uuid must, or a two-thread process gets
    # the serial code of an earlier one-thread compile from the on-disk cache
    threads = torch.get_num_threads()
    cpu = torch.device("cpu")
    try:
        torch.set_num_threads(1)
        serial = kernels._codegen_marker(cpu).uuid()
        torch.set_num_threads(2)
        parallel = kernels._codegen_marker(cpu).uuid()
    finally:
        torch.set_num_threads(threads)
    assert serial != parallel
    assert kernels.CODEGEN_PATCHES in serial and kernels.CODEGEN_PATCHES in parallel


def test_kept_scratch_buffers_change_no_sum_and_no_output_is_reused(monkeypatch) -> None:
    """With kernels.KEEP_SCRATCH (a signals kernel's wrapper keeps its scratch buffers between
    calls: adamkit.execution.scratch) three sampled steps of changing gradients give the sums,
    params and moments of the kernels without it, bit for bit; the sums a step handed over
    are still its own after the next steps (outputs are never kept); and the pass applied."""

    def run():
        ps = _model([(64, 128), (4097,), (300, 7)])
        opt = adamkit.AdamW(ps, lr=1e-2, weight_decay=0.1, backend="compiled")
        opt.fused_signals = True
        handed, copies = [], []
        for step in range(3):
            _set_grads(ps, step)
            opt.fused_signals_request = True
            opt.step()
            handed.append(dict(opt.fused_signal_sums))
            copies.append({p: s.clone() for p, s in opt.fused_signal_sums.items()})
        assert opt._executor._plans[0].eager == [] and opt._executor._plans[0].failed == []
        for sums, kept in zip(handed, copies):
            for p in ps:
                assert torch.equal(sums[p], kept[p]), p.shape
        return ps, opt, copies

    flags = [{"KEEP_SCRATCH": True}, {"KEEP_SCRATCH": False}]
    passes = {"keep_scratch": lambda out, src: out != src}
    runs, applied = _variants(monkeypatch, flags, passes, run)
    assert applied == {"keep_scratch": True}
    (ps, opt, sums), (ref_ps, ref, ref_sums) = runs
    assert any(not torch.equal(sums[0][p], sums[2][p]) for p in ps)  # the sums did change
    for p, q in zip(ps, ref_ps):
        assert torch.equal(p, q), p.shape
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], ref.state[q][key]), (p.shape, key)
        for step in range(3):
            assert torch.equal(sums[step][p], ref_sums[step][q]), (step, p.shape)
