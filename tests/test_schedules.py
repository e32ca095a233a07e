"""adamkit.schedules and adamkit.Scheduler.

Expected values are written out as arithmetic from the definitions; transformers' and optax's
schedules are re-implemented here from their published formulas (neither is imported).
"""

from __future__ import annotations

import dataclasses
import io
import math
import pickle

import numpy as np
import pytest
import torch

import adamkit
from adamkit.schedules import (
    Scheduler,
    WarmupCosine,
    constant,
    inverse_sqrt,
    join,
    plot,
    warmup_cosine,
    warmup_linear,
    wsd,
)

# ---------------------------------------------------------------------------------------------
# reference formulas of other libraries, transcribed from their sources


def hf_cosine(s: int, W: int, T: int, min_lr_rate: float | None = None) -> float:
    """transformers get_cosine_schedule_with_warmup (num_cycles=0.5) and its min-lr variant."""
    num_cycles = 0.5
    if s < W:
        return float(s) / float(max(1, W))
    progress = float(s - W) / float(max(1, T - W))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    if min_lr_rate is None:
        return max(0.0, factor)
    factor = factor * (1 - min_lr_rate) + min_lr_rate
    return max(0, factor)


def hf_linear(s: int, W: int, T: int) -> float:
    """transformers get_linear_schedule_with_warmup."""
    if s < W:
        return float(s) / float(max(1, W))
    return max(0.0, float(T - s) / float(max(1, T - W)))


def hf_inverse_sqrt(s: int, W: int, timescale: int) -> float:
    """transformers get_inverse_sqrt_schedule."""
    if s < W:
        return float(s) / float(max(1, W))
    shift = timescale - W
    return 1.0 / math.sqrt((s + shift) / timescale)


def optax_warmup_cosine_decay(s, init_value, peak_value, warmup_steps, decay_steps, end_value):
    """optax.warmup_cosine_decay_schedule (exponent=1): join_schedules of a linear_schedule
    (polynomial, power 1) and a cosine_decay_schedule over decay_steps - warmup_steps."""

    def linear(count):
        count = min(max(count, 0), warmup_steps)
        frac = 1 - count / warmup_steps
        return (init_value - peak_value) * frac**1 + peak_value

    alpha = 0.0 if peak_value == 0.0 else end_value / peak_value

    def cosine(count):
        n = decay_steps - warmup_steps
        count = min(count, n)
        cosine_decay = 0.5 * (1 + math.cos(math.pi * count / n))
        return peak_value * ((1 - alpha) * cosine_decay**1.0 + alpha)

    return linear(s) if s < warmup_steps else cosine(s - warmup_steps)


def approx(x: float) -> object:
    return pytest.approx(x, rel=1e-13, abs=1e-15)


# ---------------------------------------------------------------------------------------------
# literal values at the boundaries


def test_warmup_cosine_boundaries():
    s = warmup_cosine(100, 1000, min_ratio=0.1)
    assert s(0) == approx(1 / 100)  # first step: (0 + 1) / 100, never 0
    assert s(1) == approx(2 / 100)
    assert s(99) == 1.0  # last warmup step: (99 + 1) / 100
    assert s(100) == 1.0  # first decay step: cos(0)
    assert s(550) == approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 450 / 900)))
    assert s(550) == approx(0.55)
    assert s(999) == approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 899 / 900)))
    assert s(1000) == 0.1  # total_steps
    assert s(1001) == 0.1 and s(1500) == 0.1 and s(10**9) == 0.1  # flat after the end


def test_warmup_cosine_start_ratio():
    s = warmup_cosine(100, 1000, start_ratio=0.2)
    assert s(0) == 0.2
    assert s(50) == approx(0.2 + 0.8 * 50 / 100)
    assert s(99) == approx(0.2 + 0.8 * 99 / 100)
    assert s(100) == 1.0
    assert s(1000) == 0.0
    z = warmup_cosine(10, 20, start_ratio=0.0)
    assert z(0) == 0.0 and z(5) == 0.5 and z(10) == 1.0


def test_warmup_cosine_without_warmup_and_degenerate_lengths():
    s = warmup_cosine(0, 10)
    assert s(0) == 1.0
    assert s(5) == approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert s(10) == 0.0
    # warmup_steps == total_steps: the decay takes the one step after the peak (as transformers)
    d = warmup_cosine(4, 4, min_ratio=0.3)
    assert [d(i) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 0.3]


def test_warmup_linear_boundaries():
    s = warmup_linear(10, 110, min_ratio=0.2)
    assert s(0) == approx(1 / 10)
    assert s(9) == 1.0
    assert s(10) == 1.0
    assert s(60) == approx(0.2 + 0.8 * (1 - 50 / 100))
    assert s(109) == approx(0.2 + 0.8 * (1 - 99 / 100))
    assert s(110) == 0.2
    assert s(200) == 0.2
    t = warmup_linear(10, 110, start_ratio=0.5)
    assert t(0) == 0.5 and t(4) == approx(0.5 + 0.5 * 4 / 10) and t(110) == 0.0


def test_constant_boundaries():
    assert [constant()(i) for i in (0, 1, 10**6)] == [1.0, 1.0, 1.0]
    c = constant(warmup_steps=4)
    assert [c(i) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    h = constant(warmup_steps=4, start_ratio=0.5)
    assert [h(i) for i in range(5)] == [0.5, 0.5 + 0.5 * 1 / 4, 0.75, 0.5 + 0.5 * 3 / 4, 1.0]


@pytest.mark.parametrize(
    "shape, mid",
    [
        ("linear", 1 - 0.5),
        ("cosine", 0.5 * (1 + math.cos(math.pi * 0.5))),
        ("1-sqrt", 1 - math.sqrt(0.5)),
    ],
)
def test_wsd_boundaries(shape, mid):
    # warmup 10, stable from 10 to 80, decay over the last 20 steps before 100
    s = wsd(10, 100, 20, decay_shape=shape, min_ratio=0.1)
    assert s(0) == approx(1 / 10)
    assert s(9) == 1.0  # last warmup step
    assert s(10) == 1.0  # stable
    assert s(79) == 1.0  # last stable step
    assert s(80) == 1.0  # first decay step: p = 0
    assert s(85) < 1.0
    assert s(90) == approx(0.1 + 0.9 * mid)  # p = 10 / 20
    assert s(100) == 0.1  # total_steps
    assert s(150) == 0.1  # after the end


def test_wsd_quarter_points():
    p = 5 / 20
    assert wsd(10, 100, 20, decay_shape="1-sqrt")(85) == approx(1 - math.sqrt(p))
    assert wsd(10, 100, 20, decay_shape="cosine")(85) == approx(0.5 * (1 + math.cos(math.pi * p)))
    assert wsd(10, 100, 20)(85) == approx(1 - p)  # linear is the default
    # decay_steps == total - warmup: no stable phase
    full = wsd(10, 100, 90, decay_shape="linear")
    assert full(10) == 1.0 and full(55) == approx(1 - 45 / 90) and full(100) == 0.0
    # decay_steps == 0: 1 up to total_steps, min_ratio from the step after
    cliff = wsd(0, 50, 0, min_ratio=0.2)
    assert cliff(0) == 1.0 and cliff(50) == 1.0 and cliff(51) == 0.2


def test_inverse_sqrt_boundaries():
    s = inverse_sqrt(100)  # tau = 100
    assert s(0) == approx(1 / 100)
    assert s(99) == 1.0
    assert s(100) == 1.0  # 1 / sqrt((100 + 100 - 100) / 100): continuous at the peak
    assert s(199) == approx(1 / math.sqrt((199 + 100 - 100) / 100))
    assert s(400) == approx(1 / math.sqrt((400 + 100 - 100) / 100))
    assert s(400) == approx(0.5)
    t = inverse_sqrt(100, timescale=50)
    assert t(100) == 1.0
    assert t(150) == approx(1 / math.sqrt((150 + 50 - 100) / 50))
    z = inverse_sqrt(0)  # tau = 1
    assert z.tau == 1
    assert z(0) == 1.0 and z(3) == approx(1 / math.sqrt((3 + 1 - 0) / 1)) and z(3) == 0.5
    w = inverse_sqrt(10, start_ratio=0.0)
    assert w(0) == 0.0 and w(9) == approx(0.9) and w(10) == 1.0


def test_join_counts_each_piece_from_its_start():
    ramp = warmup_linear(0, 10)  # 1 - s / 10
    j = join([ramp, ramp, constant()], [5, 8])
    assert j(0) == 1.0
    assert j(4) == approx(1 - 4 / 10)  # piece 0 at its step 4
    assert j(5) == 1.0  # piece 1 starts at its own step 0
    assert j(7) == approx(1 - 2 / 10)  # piece 1 at its step 2
    assert j(8) == 1.0 and j(1000) == 1.0  # last piece for ever
    z = join([constant(warmup_steps=3), ramp], [0])  # boundary 0: the first piece is never used
    assert z(0) == 1.0 and z(5) == approx(1 - 5 / 10)


def test_join_of_warmup_and_cosine_is_warmup_cosine():
    W, T = 30, 130
    spliced = join(
        [constant(warmup_steps=W, start_ratio=0.1), warmup_cosine(0, T - W, min_ratio=0.2)], [W]
    )
    whole = warmup_cosine(W, T, min_ratio=0.2, start_ratio=0.1)
    assert [spliced(s) for s in range(T + 20)] == [whole(s) for s in range(T + 20)]


# ---------------------------------------------------------------------------------------------
# other libraries


@pytest.mark.parametrize("W, T", [(0, 50), (1, 50), (10, 100), (37, 250), (100, 1000), (5, 5)])
def test_equals_transformers_cosine_at_every_step(W, T):
    ours = warmup_cosine(W, T, start_ratio=0.0)
    assert [ours(s) for s in range(T + 1)] == [hf_cosine(s, W, T) for s in range(T + 1)]
    for r in (0.0, 0.1, 0.3):
        ours = warmup_cosine(W, T, min_ratio=r, start_ratio=0.0)
        expected = [hf_cosine(s, W, T, min_lr_rate=r) for s in range(T + 1)]
        assert [ours(s) for s in range(T + 1)] == expected
        # past total_steps transformers rises again; ours stays at min_ratio
        if T > W + 1:
            assert hf_cosine(2 * T - W, W, T, min_lr_rate=r) > r + 0.5
            assert ours(2 * T - W) == r


@pytest.mark.parametrize("W, T", [(0, 50), (10, 100), (37, 250)])
def test_matches_transformers_linear_and_inverse_sqrt(W, T):
    ours = warmup_linear(W, T, start_ratio=0.0)
    for s in range(T + 1):
        assert ours(s) == pytest.approx(hf_linear(s, W, T), rel=0, abs=1e-15)
    inv = inverse_sqrt(W, timescale=max(W, 7), start_ratio=0.0)
    assert [inv(s) for s in range(3 * T)] == [
        hf_inverse_sqrt(s, W, max(W, 7)) for s in range(3 * T)
    ]


@pytest.mark.parametrize(
    "init, peak, warmup_steps, decay_steps, end",
    [(0.0, 1e-3, 10, 100, 0.0), (1e-5, 3e-4, 50, 400, 3e-6), (2e-4, 2e-4, 1, 30, 1e-4)],
)
def test_optax_warmup_cosine_decay_mapping(init, peak, warmup_steps, decay_steps, end):
    # optax's decay_steps is the TOTAL length: it becomes total_steps
    ours = warmup_cosine(warmup_steps, decay_steps, start_ratio=init / peak, min_ratio=end / peak)
    for s in range(decay_steps + 50):
        expected = optax_warmup_cosine_decay(s, init, peak, warmup_steps, decay_steps, end)
        assert peak * ours(s) == pytest.approx(expected, rel=1e-12, abs=1e-20)


# ---------------------------------------------------------------------------------------------
# properties of the schedule objects

ALL = [
    warmup_cosine(10, 100, min_ratio=0.1),
    warmup_linear(10, 100, min_ratio=0.1, start_ratio=0.3),
    constant(warmup_steps=7),
    wsd(10, 100, 30, decay_shape="1-sqrt", min_ratio=0.05),
    wsd(10, 100, 30, decay_shape="cosine"),
    inverse_sqrt(10, timescale=25),
    join([constant(warmup_steps=5), warmup_cosine(0, 50)], [20]),
]


@pytest.mark.parametrize("schedule", ALL, ids=repr)
def test_never_rises_after_the_peak_and_stays_in_range(schedule):
    values = [schedule(s) for s in range(400)]
    peak = values.index(1.0)
    after = values[peak:]
    assert all(b <= a for a, b in zip(after[:-1], after[1:], strict=True))
    assert all(0.0 <= v <= 1.0 for v in values)


@pytest.mark.parametrize("schedule", ALL, ids=repr)
def test_steps_must_be_non_negative_integers(schedule):
    with pytest.raises(ValueError, match=r"Invalid step=-1: must be >= 0"):
        schedule(-1)
    with pytest.raises(ValueError, match=r"Invalid step=2\.0: must be an integer"):
        schedule(2.0)
    assert schedule(np.int64(3)) == schedule(3)


def test_frozen_readable_comparable_picklable():
    s = warmup_cosine(100, 1000, min_ratio=0.1)
    assert repr(s) == (
        "WarmupCosine(warmup_steps=100, total_steps=1000, min_ratio=0.1, start_ratio=None)"
    )
    same = WarmupCosine(100, 1000, min_ratio=0.1)
    assert s == same and hash(s) == hash(same)
    assert s != warmup_cosine(100, 1000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.total_steps = 5
    for schedule in ALL:
        assert pickle.loads(pickle.dumps(schedule)) == schedule
    n = warmup_cosine(np.int64(10), 100, min_ratio=0)
    assert type(n.warmup_steps) is int and n.min_ratio == 0.0 and type(n.min_ratio) is float
    assert "decay_shape='1-sqrt'" in repr(wsd(1, 10, 3, decay_shape="1-sqrt"))
    assert repr(join([constant()], [])) == (
        "Join(schedules=(Constant(warmup_steps=0, start_ratio=None),), boundaries=())"
    )


# ---------------------------------------------------------------------------------------------
# validation

_c = constant()

INVALID = [
    (lambda: warmup_cosine(-1, 10), r"Invalid warmup_steps=-1: must be >= 0"),
    (lambda: warmup_cosine(1.5, 10), r"Invalid warmup_steps=1\.5: must be an integer"),
    (lambda: warmup_cosine(True, 10), r"Invalid warmup_steps=True: must be an integer"),
    (lambda: warmup_cosine(10, -5), r"Invalid total_steps=-5: must be >= 0"),
    (lambda: warmup_cosine(10, 100.0), r"Invalid total_steps=100\.0: must be an integer"),
    (lambda: warmup_cosine(20, 10), r"Invalid warmup_steps=20: must be <= total_steps=10"),
    (lambda: warmup_cosine(1, 10, min_ratio=1.5), r"Invalid min_ratio=1\.5: must be in \[0, 1\]"),
    (lambda: warmup_cosine(1, 10, min_ratio=-0.1), r"Invalid min_ratio=-0\.1: must be in"),
    (lambda: warmup_cosine(1, 10, min_ratio=math.nan), r"Invalid min_ratio=nan: must be in"),
    (lambda: warmup_cosine(1, 10, start_ratio=2), r"Invalid start_ratio=2: must be in \[0, 1\]"),
    (lambda: warmup_cosine(1, 10, start_ratio="0"), r"Invalid start_ratio='0': must be a number"),
    (lambda: warmup_linear(-1, 10), r"Invalid warmup_steps=-1: must be >= 0"),
    (lambda: warmup_linear(11, 10), r"Invalid warmup_steps=11: must be <= total_steps=10"),
    (lambda: warmup_linear(1, 10, min_ratio=2.0), r"Invalid min_ratio=2\.0"),
    (lambda: warmup_linear(1, 10, start_ratio=-1.0), r"Invalid start_ratio=-1\.0"),
    (lambda: constant(warmup_steps=-1), r"Invalid warmup_steps=-1: must be >= 0"),
    (lambda: constant(warmup_steps=2.5), r"Invalid warmup_steps=2\.5: must be an integer"),
    (lambda: constant(start_ratio=1.01), r"Invalid start_ratio=1\.01"),
    (lambda: wsd(-1, 100, 10), r"Invalid warmup_steps=-1: must be >= 0"),
    (lambda: wsd(10, 5, 0), r"Invalid warmup_steps=10: must be <= total_steps=5"),
    (lambda: wsd(10, 100, -1), r"Invalid decay_steps=-1: must be >= 0"),
    (lambda: wsd(10, 100, 1.5), r"Invalid decay_steps=1\.5: must be an integer"),
    (
        lambda: wsd(10, 100, 95),
        r"Invalid decay_steps=95: must be <= total_steps - warmup_steps = 90",
    ),
    (lambda: wsd(10, 100, 20, decay_shape="exp"), r"Invalid decay_shape='exp': expected one of"),
    (lambda: wsd(10, 100, 20, min_ratio=1.5), r"Invalid min_ratio=1\.5"),
    (lambda: wsd(10, 100, 20, start_ratio=-0.5), r"Invalid start_ratio=-0\.5"),
    (lambda: inverse_sqrt(-3), r"Invalid warmup_steps=-3: must be >= 0"),
    (lambda: inverse_sqrt(10, timescale=0), r"Invalid timescale=0: must be finite and > 0"),
    (lambda: inverse_sqrt(10, timescale=-1.0), r"Invalid timescale=-1\.0: must be finite"),
    (lambda: inverse_sqrt(10, timescale=math.inf), r"Invalid timescale=inf: must be finite"),
    (lambda: inverse_sqrt(10, timescale="5"), r"Invalid timescale='5': must be a number"),
    (lambda: inverse_sqrt(10, start_ratio=3), r"Invalid start_ratio=3"),
    (lambda: join([], []), r"Invalid schedules=\[\]: expected at least one schedule"),
    (lambda: join(_c, []), r"Invalid schedules=Constant\(.*\): expected a sequence"),
    (lambda: join([_c, 3], [5]), r"Invalid schedules\[1\]=3: expected a callable"),
    (lambda: join([_c], [5]), r"Invalid boundaries=\[5\]: expected len\(schedules\) - 1 = 0"),
    (lambda: join([_c, _c], []), r"Invalid boundaries=\[\]: expected len\(schedules\) - 1 = 1"),
    (lambda: join([_c, _c], 5), r"Invalid boundaries=5: expected a sequence"),
    (lambda: join([_c, _c], [-1]), r"Invalid boundaries=\[-1\]: entries must be >= 0"),
    (lambda: join([_c, _c], [2.5]), r"Invalid boundaries=\[2\.5\]: entries must be integers"),
    (lambda: join([_c, _c, _c], [5, 5]), r"Invalid boundaries=\[5, 5\]: must be strictly"),
    (lambda: join([_c, _c, _c], [8, 5]), r"Invalid boundaries=\[8, 5\]: must be strictly"),
    (lambda: plot(_c, 0, "unused.png"), r"Invalid steps=0: must be >= 1"),
    (lambda: plot(_c, -2, "unused.png"), r"Invalid steps=-2: must be >= 0"),
]


@pytest.mark.parametrize("build, message", INVALID, ids=[m for _, m in INVALID])
def test_invalid_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_scheduler_validation():
    opt = torch.optim.SGD([{"params": [torch.zeros(1)]}, {"params": [torch.zeros(1)]}], lr=0.1)
    with pytest.raises(ValueError, match=r"Invalid schedule: a list of 3 schedules for 2 param"):
        Scheduler(opt, [_c, _c, _c])
    with pytest.raises(ValueError, match=r"Invalid schedule: a list of 1 schedules for 2 param"):
        Scheduler(opt, [_c])
    with pytest.raises(TypeError, match=r"Invalid schedule for param group 1: 0\.5"):
        Scheduler(opt, [_c, 0.5])
    with pytest.raises(TypeError, match=r"dict is not an Optimizer"):
        Scheduler({}, _c)
    assert all("initial_lr" not in g for g in opt.param_groups)  # nothing touched on failure


# ---------------------------------------------------------------------------------------------
# the Scheduler


OPTIMIZERS = {"torch.optim.AdamW": torch.optim.AdamW, "adamkit.AdamW": adamkit.AdamW}


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(4, 3, generator=g)),
        torch.nn.Parameter(torch.randn(5, generator=g)),
    ]


def _set_grads(params, step: int) -> None:
    for p in params:
        p.grad = torch.sin(p.detach() * (1 + step % 7)) + 0.01 * step


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_first_lr_and_per_group_schedules(name):
    params = _params()
    opt = OPTIMIZERS[name]([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "lr": 0.01}])
    first, second = constant(warmup_steps=4), warmup_linear(0, 10, min_ratio=0.5)
    sched = Scheduler(opt, [first, second])
    assert [g["initial_lr"] for g in opt.param_groups] == [0.1, 0.01]
    assert [g["lr"] for g in opt.param_groups] == [0.1 * 0.25, 0.01 * 1.0]  # schedule(0)
    assert sched.get_last_lr() == [0.1 * 0.25, 0.01 * 1.0]
    for step in range(1, 13):
        _set_grads(params, step)
        opt.step()
        sched.step()
        expected = [0.1 * first(step), 0.01 * second(step)]
        assert [g["lr"] for g in opt.param_groups] == expected
        assert sched.get_last_lr() == expected
    assert [g["lr"] for g in opt.param_groups] == [0.1 * 1.0, 0.01 * (0.5 + 0.5 * 0.0)]
    assert all(torch.isfinite(p).all() for p in params)


def test_one_schedule_for_all_groups_works_with_sgd():
    opt = torch.optim.SGD(
        [{"params": [torch.zeros(1)], "lr": 1.0}, {"params": [torch.zeros(1)]}], lr=2.0
    )
    Scheduler(opt, warmup_cosine(2, 4))
    assert [g["lr"] for g in opt.param_groups] == [1.0 * 0.5, 2.0 * 0.5]


def _run(name, lr, schedule, steps, params, *, stop=None, resume=None):
    """Train from ``resume`` (a checkpoint, or None for a fresh start) to ``steps``; save a
    checkpoint at ``stop``. Returns (lrs used at each step, checkpoint)."""
    opt = OPTIMIZERS[name](params, lr=lr, weight_decay=0.1)
    sched = Scheduler(opt, schedule)
    start = 0
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        start = resume["step"]
    lr_object = opt.param_groups[0]["lr"]
    lrs, checkpoint = [], None
    for step in range(start, steps):
        if step == stop:
            buffer = io.BytesIO()
            torch.save(
                {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step},
                buffer,
            )
            buffer.seek(0)
            saved_params = [p.detach().clone() for p in params]
            checkpoint = (torch.load(buffer, weights_only=True), saved_params)
        # a tensor lr is updated in place: the very object stays in the group
        if isinstance(lr_object, torch.Tensor):
            assert opt.param_groups[0]["lr"] is lr_object
        lrs.append(float(opt.param_groups[0]["lr"]))
        _set_grads(params, step)
        opt.step()
        sched.step()
    return lrs, checkpoint


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("stop", [37, 150, 270], ids=["warmup", "decay", "after_end"])
def test_resume_reproduces_every_lr(name, tensor_lr, stop):
    schedule = warmup_cosine(100, 250, min_ratio=0.1)
    steps = 300

    def lr():
        return torch.tensor(3e-3) if tensor_lr else 3e-3

    straight_params = _params()
    straight, _ = _run(name, lr(), schedule, steps, straight_params)

    first_params = _params()
    before, (checkpoint, saved) = _run(name, lr(), schedule, stop + 1, first_params, stop=stop)
    resumed_params = [torch.nn.Parameter(p.clone()) for p in saved]
    after, _ = _run(name, lr(), schedule, steps, resumed_params, resume=checkpoint)

    assert before[:stop] + after == straight  # exact equality at every step
    assert after[0] == straight[stop]  # the first step after the restore
    for a, b in zip(resumed_params, straight_params, strict=True):
        assert torch.equal(a, b)
    # the lr of step i is initial_lr * schedule(i)
    base = float(lr())
    for i in (0, 99, 100, 175, 250, 299):
        want = base * schedule(i)
        assert straight[i] == (float(torch.tensor(want)) if tensor_lr else want)


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
def test_load_state_dict_sets_the_lr_at_once(tensor_lr):
    # restoring only the scheduler (optimizer freshly built) must still set the lr for the step
    schedule = warmup_cosine(100, 250, min_ratio=0.1)
    opt = adamkit.AdamW(_params(), lr=torch.tensor(0.5) if tensor_lr else 0.5)
    sched = Scheduler(opt, schedule)
    for _ in range(180):
        opt.step()  # no grads: nothing changes, but torch's scheduler expects this order
        sched.step()
    state = sched.state_dict()
    assert "schedules" not in state and "optimizer" not in state

    fresh = adamkit.AdamW(_params(), lr=torch.tensor(0.5) if tensor_lr else 0.5)
    fresh_sched = Scheduler(fresh, schedule)
    lr_object = fresh.param_groups[0]["lr"]
    first = 0.5 * schedule(0)
    assert float(lr_object) == (float(torch.tensor(first)) if tensor_lr else first)
    fresh_sched.load_state_dict(state)
    assert fresh_sched.last_epoch == 180
    want = 0.5 * schedule(180)
    if tensor_lr:
        assert fresh.param_groups[0]["lr"] is lr_object
        assert float(lr_object) == float(torch.tensor(want))
    else:
        assert fresh.param_groups[0]["lr"] == want
    assert float(fresh_sched.get_last_lr()[0]) == float(fresh.param_groups[0]["lr"])


def test_state_dict_of_a_lambda_schedule_saves():
    opt = torch.optim.SGD([torch.zeros(2)], lr=1.0)
    sched = Scheduler(opt, lambda step: 0.5**step)
    for _ in range(2):
        opt.step()
        sched.step()
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)  # would fail if the lambda were in the state
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    opt2 = torch.optim.SGD([torch.zeros(2)], lr=1.0)
    sched2 = Scheduler(opt2, lambda step: 0.5**step)
    sched2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == 0.25
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == 0.125


def test_lr_ratio_decay_follows_the_schedule_multiplier():
    # zero gradients: m = v = 0 and the Adam update is 0 / (0 + eps) = 0, so only decay moves p
    schedule = warmup_cosine(3, 10, min_ratio=0.2)
    lr, wd = 0.1, 0.5
    p0 = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = torch.nn.Parameter(p0.clone())
    opt = adamkit.AdamW([ours], lr=lr, weight_decay=wd, weight_decay_scaling="lr_ratio")
    sched = Scheduler(opt, schedule)
    theirs = torch.nn.Parameter(p0.clone())
    torch_opt = torch.optim.AdamW([theirs], lr=lr, weight_decay=wd)
    torch_sched = Scheduler(torch_opt, schedule)

    expected_ours, expected_theirs = p0.clone(), p0.clone()
    for step in range(14):
        lr_t = opt.param_groups[0]["lr"]
        assert lr_t == lr * schedule(step)
        expected_ours = expected_ours * (1 - (lr_t / lr) * wd)  # Loshchilov & Hutter: eta_t * wd
        expected_theirs = expected_theirs * (1 - lr_t * wd)  # torch: lr_t * wd
        for p in (ours, theirs):
            p.grad = torch.zeros_like(p)
        opt.step()
        torch_opt.step()
        sched.step()
        torch_sched.step()
        torch.testing.assert_close(ours.detach(), expected_ours, rtol=1e-14, atol=0)
        torch.testing.assert_close(theirs.detach(), expected_theirs, rtol=1e-14, atol=0)
    # by hand: the first step multiplies by 1 - (1/3) * 0.5; the last ones by 1 - 0.2 * 0.5
    factors = [1 - schedule(s) * wd for s in range(14)]
    assert factors[0] == approx(1 - (1 / 3) * 0.5) and factors[-1] == approx(1 - 0.2 * 0.5)
    torch.testing.assert_close(ours.detach(), p0 * math.prod(factors), rtol=1e-13, atol=0)


# ---------------------------------------------------------------------------------------------
# plot


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "schedule.png"
    returned = plot(wsd(10, 200, 50, decay_shape="1-sqrt", min_ratio=0.1), 250, path)
    assert returned == path
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000
