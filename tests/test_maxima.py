# ruff: noqa: E501  (C++ source as inductor writes it)
"""The pass that takes block maxima of magnitudes over their int32 bit patterns
(adamkit.execution.maxima): on C++ of the shape inductor writes, and the order it relies on."""

from __future__ import annotations

import numpy as np
from cpp_loops import vector_loop

from adamkit.execution.maxima import MACRO, PRELUDE, integer_maxima, integer_reductions

IDX = "static_cast<int64_t>(x1 + 256L*x0)"
HEADER = "for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(256L); x1+=static_cast<int64_t>(16L))"
LIKELY = "if(C10_LIKELY(x1 >= static_cast<int64_t>(0) && x1 < static_cast<int64_t>(256L)))"
MINUS_INF = "at::vec::Vectorized<float> tmp_acc{k}_vec = at::vec::Vectorized<float>(-std::numeric_limits<float>::infinity());"
BODY = [
    f"auto tmp0 = at::vec::Vectorized<float>::loadu(in_ptr0 + {IDX}, static_cast<int64_t>(16));",
    "auto tmp1 = tmp0 * tmp0;",
    "auto tmp2 = tmp1.abs();",
    "auto tmp3 = tmp0.abs();",
    "tmp_acc0_vec = at::vec::maximum(tmp_acc0_vec, tmp3);",
    "tmp_acc1_vec = at::vec::maximum(tmp_acc1_vec, tmp2);",
]


def _reduce(k: int) -> str:
    """The horizontal maximum inductor writes after a loop (accumulator ``tmp_acc{k}``)."""
    return f"tmp_acc{k} = max_propagate_nan(tmp_acc{k}, at::vec::vec_reduce_all<float, 1>([](at::vec::Vectorized<float>& x, at::vec::Vectorized<float>& y) {{ return at::vec::maximum(x, y); }}, tmp_acc{k}_vec));"


def _source(body: list[str], declarations: list[str], after: tuple[str, ...] = ()) -> str:
    return "\n".join([*declarations, *vector_loop(HEADER, LIKELY, body), *after])


def _integer(acc: str, value: str) -> str:
    return f"            {acc} = at::vec::cast<float>(at::vec::maximum(at::vec::cast<int32_t>({acc}), at::vec::cast<int32_t>({value})));"


def test_a_maximum_of_magnitudes_from_minus_inf_becomes_an_integer_maximum() -> None:
    declarations = [MINUS_INF.format(k=0), MINUS_INF.format(k=1)]
    source = _source(BODY, declarations)
    out = integer_maxima(source).split("\n")
    assert _integer("tmp_acc0_vec", "tmp3") in out
    assert _integer("tmp_acc1_vec", "tmp2") in out
    changed = [a for a, b in zip(out, source.split("\n")) if a != b]
    assert len(out) == len(source.split("\n")) and len(changed) == 2


def test_other_maxima_stay() -> None:
    """Not an abs of this loop body (a product, which may be negative; an abs defined in
    another loop), or an accumulator that does not start at -inf as a float vector: unchanged."""
    signed = [*BODY[:4], "tmp_acc0_vec = at::vec::maximum(tmp_acc0_vec, tmp1);"]
    declarations = [MINUS_INF.format(k=0), MINUS_INF.format(k=1)]
    assert integer_maxima(_source(signed, declarations)) == _source(signed, declarations)
    # the abs belongs to an earlier loop
    earlier = vector_loop(HEADER, LIKELY, BODY[:4])
    later = vector_loop(HEADER, LIKELY, ["tmp_acc0_vec = at::vec::maximum(tmp_acc0_vec, tmp3);"])
    source = "\n".join([MINUS_INF.format(k=0), *earlier, *later])
    assert integer_maxima(source) == source
    # accumulators that start elsewhere (zero; an int vector; set again before the loop)
    for declarations in (
        ["at::vec::Vectorized<float> tmp_acc0_vec = at::vec::Vectorized<float>(0);"],
        ["at::vec::Vectorized<int32_t> tmp_acc0_vec = at::vec::Vectorized<int32_t>(-1);"],
        [MINUS_INF.format(k=0), "tmp_acc0_vec = at::vec::Vectorized<float>(0);"],
        [],
    ):
        body = [*BODY[:4], "tmp_acc0_vec = at::vec::maximum(tmp_acc0_vec, tmp3);"]
        source = _source(body, declarations)
        assert integer_maxima(source) == source, declarations


def test_bit_patterns_of_magnitudes_order_as_the_floats_and_nan_wins() -> None:
    """What the pass relies on: for floats with the sign bit clear, from -inf's pattern up,
    the int32 maximum of the patterns is the pattern of the float maximum, and a NaN (any
    payload) beats every number, +inf included; -inf's pattern is below them all."""
    rng = np.random.default_rng(0)
    specials = np.array([0.0, 1e-45, 1.2e-38, 1.0, 3.4e38, np.inf], dtype=np.float32)
    values = np.abs(
        np.concatenate(
            [
                specials,
                rng.standard_normal(1000).astype(np.float32) * 10.0 ** rng.integers(-40, 38, 1000),
            ]
        )
    ).astype(np.float32)
    nans = (np.array([0x7FC00000, 0x7F800001, 0x7FFFFFFF], dtype=np.uint32)).view(np.float32)
    start = np.int32(np.array([-np.inf], dtype=np.float32).view(np.int32)[0])
    for _ in range(200):
        row = rng.choice(values, size=16)
        ints = row.view(np.int32)
        assert (ints >= 0).all() and start < ints.min()
        assert np.max(ints).view(np.float32) == row.max()
        with_nan = row.copy()
        with_nan[rng.integers(16)] = nans[rng.integers(3)]
        assert np.isnan(np.max(with_nan.view(np.int32)).view(np.float32))


def _reduced(k: int) -> str:
    return f"tmp_acc{k} = max_propagate_nan(tmp_acc{k}, {MACRO}(tmp_acc{k}_vec));"


def test_reductions_of_integer_maxima_become_integer_reductions() -> None:
    """After integer_maxima, the horizontal maximum of each accumulator it rewrote is written
    behind the macro's guard (the float reduction kept under #else), and the prelude that
    defines the macro comes first; an accumulator with a float maximum among its updates
    keeps its float reduction."""
    declarations = [MINUS_INF.format(k=0), MINUS_INF.format(k=1)]
    after = (_reduce(0), _reduce(1))
    out = integer_reductions(integer_maxima(_source(BODY, declarations, after)))
    assert out.startswith(PRELUDE + "\n")
    lines = out[len(PRELUDE) + 1 :].split("\n")
    for k in (0, 1):
        at = lines.index(_reduced(k))
        assert lines[at - 1 : at + 4] == [
            f"#if defined({MACRO})",
            _reduced(k),
            "#else",
            _reduce(k),
            "#endif",
        ]
    # acc1 also takes a float maximum of a product: its reduction stays a float one
    mixed = [*BODY, "tmp_acc1_vec = at::vec::maximum(tmp_acc1_vec, tmp1);"]
    out = integer_reductions(integer_maxima(_source(mixed, declarations, after)))
    assert _reduced(0) in out.split("\n") and _reduced(1) not in out.split("\n")
    assert out.split("\n")[-1] == _reduce(1)


def test_reductions_left_alone() -> None:
    """No integer maxima (integer_maxima not run, or nothing it rewrites), an accumulator
    that does not start at -inf, or one that is never updated: the source is unchanged."""
    after = (_reduce(0),)
    plain = _source(BODY, [MINUS_INF.format(k=0)], after)
    assert integer_reductions(plain) == plain
    zero = ["at::vec::Vectorized<float> tmp_acc0_vec = at::vec::Vectorized<float>(0);"]
    source = integer_maxima(_source(BODY, zero, after))
    assert integer_reductions(source) == source
    idle = "\n".join(
        [MINUS_INF.format(k=0), MINUS_INF.format(k=1), *vector_loop(HEADER, LIKELY, BODY[:4])]
    )
    source = integer_maxima(_source(BODY[:5], [MINUS_INF.format(k=1)], ())) + "\n" + idle
    source += "\n" + _reduce(1)
    assert integer_reductions(source) == source


def test_the_largest_bit_pattern_is_the_maximum_or_a_nan() -> None:
    """What the reduction relies on: across 16 lanes of magnitudes' bit patterns, or -inf's,
    the largest int32 read back as a float is the float maximum (a NaN when a lane holds one)."""
    rng = np.random.default_rng(1)
    lanes = np.abs(rng.standard_normal((500, 16)).astype(np.float32)) * np.float32(1e-3)
    lanes[:50] = -np.inf  # accumulators that saw no value
    lanes[50:100, 3] = np.inf
    lanes[100:150, rng.integers(16)] = np.float32("nan")
    largest = lanes.view(np.int32).max(axis=1).view(np.float32)
    expected = np.where(np.isnan(lanes).any(axis=1), np.nan, np.nanmax(lanes, axis=1))
    np.testing.assert_array_equal(largest, expected)
