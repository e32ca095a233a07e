# ruff: noqa: E501  (C++ source as inductor writes it)
"""Three text passes over the integer lanes of stochastic rounding's C++ (adamkit.execution.
masks, shifts and indices): on C++ of the shape inductor writes, and the facts they rely on."""

from __future__ import annotations

import numpy as np
import pytest
from cpp_loops import stripped_lines, vector_loop

from adamkit.execution import indices, masks, shifts

HEADER = "for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(ks0); x0+=static_cast<int64_t>(32L))"
LIKELY = "if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(ks0)))"
N2 = "at::vec::VectorizedN<int32_t,2>"

HASH = [
    "auto tmp51 = in_ptr5[static_cast<int64_t>(1L)];",
    "auto tmp52 = c10::convert<int32_t>(tmp51);",
    "auto tmp53 = x0;",
    "auto tmp54 = c10::convert<int32_t>(tmp53);",
    f"auto tmp55 = ({N2}(tmp54) + {N2}::arange(0, 1));",
    f"auto tmp56 = {N2}(tmp52);",
    "auto tmp57 = tmp55 + tmp56;",
    "auto tmp58 = static_cast<int32_t>(-1640531535);",
    f"auto tmp59 = {N2}(tmp58);",
    "auto tmp60 = tmp57 * tmp59;",
    "auto tmp67 = static_cast<int32_t>(16);",
    f"auto tmp68 = {N2}(tmp67);",
    "auto tmp69 = tmp60 >> tmp68;",
    "auto tmp70 = static_cast<int32_t>(65535);",
    f"auto tmp71 = {N2}(tmp70);",
    "auto tmp72 = tmp69 & tmp71;",
    "auto tmp36 = at::vec::VectorizedN<float,2>::loadu(in_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(32));",
    "auto tmp47 = tmp36.abs();",
    "auto tmp48 = static_cast<float>(3.3895313892515355e+38);",
    "auto tmp49 = at::vec::VectorizedN<float,2>(tmp48);",
    "auto tmp50 = at::vec::VecMask<float,2>(tmp47 < tmp49);",
    "auto tmp79 = static_cast<int32_t>(0);",
    f"auto tmp80 = {N2}(tmp79);",
    "auto tmp81 = decltype(tmp72)::blendv(tmp80, tmp72, tmp50.template cast<int32_t,2>());",
    "tmp81.store(out_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(32));",
]


def _source(body: list[str]) -> str:
    return "\n".join(vector_loop(HEADER, LIKELY, body))


def _rewritten(module, body: list[str], line: str, new: str) -> None:
    """``module``'s pass puts ``new`` in place of ``line`` behind its macro (the original kept
    under ``#else``), its prelude in front, and leaves every other line as it was."""
    source = _source(body)
    out = getattr(module, PASSES[module])(source)
    assert out.startswith(module.PRELUDE + "\n")
    lines = stripped_lines(out[len(module.PRELUDE) + 1 :])
    at = lines.index(new)
    assert lines[at - 1 : at + 4] == [f"#if defined({module.MACRO})", new, "#else", line, "#endif"]
    assert lines[: at - 1] + [line] + lines[at + 4 :] == stripped_lines(source)


PASSES = {masks: "masked_moves", shifts: "logical_shifts", indices: "affine_indices"}


def test_a_blend_of_zero_by_a_float_comparison_becomes_a_masked_move() -> None:
    line = HASH[-2]
    _rewritten(masks, HASH, line, f"auto tmp81 = {masks.MACRO}2(tmp72, tmp47, tmp49);")
    single = [
        x.replace(N2, "at::vec::Vectorized<int32_t>")
        .replace("VectorizedN<float,2>", "Vectorized<float>")
        .replace("VecMask<float,2>", "VecMask<float,1>")
        .replace("cast<int32_t,2>", "cast<int32_t,1>")
        for x in HASH
    ]
    assert f"{masks.MACRO}1(tmp72, tmp47, tmp49)" in masks.masked_moves(_source(single))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("auto tmp79 = static_cast<int32_t>(0);", "auto tmp79 = static_cast<int32_t>(1);"),
        ("(tmp47 < tmp49)", "(tmp47 <= tmp49)"),
        ("blendv(tmp80, tmp72,", "blendv(tmp72, tmp80,"),  # zero where the mask holds
        ("VecMask<float,2>(tmp47", "VecMask<float,1>(tmp47"),  # widths disagree
    ],
)
def test_other_blends_stay(old, new) -> None:
    body = [line.replace(old, new) for line in HASH]
    assert masks.masked_moves(_source(body)) == _source(body)


def test_a_shift_masked_to_its_low_bits_becomes_a_logical_shift() -> None:
    _rewritten(
        shifts, HASH, "auto tmp72 = tmp69 & tmp71;", f"auto tmp72 = {shifts.MACRO}2(tmp60, 16);"
    )
    swapped = [line.replace("tmp69 & tmp71", "tmp71 & tmp69") for line in HASH]
    assert f"{shifts.MACRO}2(tmp60, 16)" in shifts.logical_shifts(_source(swapped))
    other = [
        line.replace("static_cast<int32_t>(16)", "static_cast<int32_t>(20)").replace(
            "static_cast<int32_t>(65535)", "static_cast<int32_t>(4095)"
        )
        for line in HASH
    ]
    assert f"{shifts.MACRO}2(tmp60, 20)" in shifts.logical_shifts(_source(other))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("static_cast<int32_t>(65535)", "static_cast<int32_t>(32767)"),  # keeps a sign copy
        ("static_cast<int32_t>(65535)", "static_cast<int32_t>(131071)"),
        ("tmp60 >> tmp68", "tmp60 << tmp68"),
        ("auto tmp68 = ", "auto tmp68 = tmp66 + "),  # a count that is not a broadcast
    ],
)
def test_other_masked_shifts_stay(old, new) -> None:
    body = [line.replace(old, new) for line in HASH]
    assert shifts.MACRO + "2(" not in shifts.logical_shifts(_source(body))


def test_the_facts_the_shift_relies_on() -> None:
    """(x >> k) & (2^(32-k) - 1) with an arithmetic shift equals the logical shift, for every
    k and for words with the sign bit set or not."""
    words = np.random.default_rng(0).integers(-(2**31), 2**31, 4096, dtype=np.int64)
    words = np.concatenate([words, [0, -1, -(2**31), 2**31 - 1]]).astype(np.int32)
    for k in range(1, 32):
        arithmetic = (words >> k) & np.int32((1 << (32 - k)) - 1)
        logical = (words.view(np.uint32) >> np.uint32(k)).view(np.int32)
        assert np.array_equal(arithmetic, logical), k


def test_a_hashed_index_becomes_an_affine_ramp() -> None:
    _rewritten(
        indices, HASH, "auto tmp60 = tmp57 * tmp59;",
        f"auto tmp60 = {indices.MACRO}2(tmp54, tmp52, -1640531535);",
    )  # fmt: skip
    # the sum's operands and the product's either way round, the constant broadcast directly
    body = [
        line.replace("tmp55 + tmp56", "tmp56 + tmp55")
        .replace("tmp57 * tmp59", "tmp59 * tmp57")
        .replace(f"{N2}(tmp58)", f"{N2}(static_cast<int32_t>(-1640531535))")
        for line in HASH
    ]
    assert f"{indices.MACRO}2(tmp54, tmp52, -1640531535)" in indices.affine_indices(_source(body))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("::arange(0, 1)", "::arange(0, 2)"),  # every other index
        (
            "auto tmp58 = static_cast<int32_t>(-1640531535);",
            "auto tmp58 = in_ptr5[static_cast<int64_t>(2L)];",
        ),
        ("auto tmp56 = ", "auto tmp56 = tmp55 + "),  # an offset that is not a broadcast
        ("tmp55 + tmp56", "tmp55 - tmp56"),
    ],
)
def test_other_products_stay(old, new) -> None:
    body = [line.replace(old, new) for line in HASH]
    assert indices.MACRO + "2(" not in indices.affine_indices(_source(body))


def test_the_fact_the_ramp_relies_on() -> None:
    """Modulo 2^32, (s + o + i) * C == (s + o) * C + i * C, as int32 vectors wrap."""
    rng = np.random.default_rng(1)
    for s, o, c in rng.integers(-(2**31), 2**31, (64, 3)).tolist():
        base = (s + o) * c % 2**32
        for i in range(32):
            assert (s + o + i) * c % 2**32 == (base + i * c) % 2**32


def test_sources_without_the_patterns_come_back_unchanged() -> None:
    plain = _source(["auto tmp0 = in_ptr0[static_cast<int64_t>(0L)];", "out_ptr0[x0] = tmp0;"])
    for module, name in PASSES.items():
        assert getattr(module, name)(plain) == plain
