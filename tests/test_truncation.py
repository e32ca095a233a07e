# ruff: noqa: E501  (C++ source as inductor writes it)
"""The pass that writes exact fp32 -> bf16 conversions as truncations
(adamkit.execution.truncation): on C++ of the shape inductor writes, and the fact it relies on."""

from __future__ import annotations

import numpy as np
import torch
from cpp_loops import vector_loop

from adamkit.execution.truncation import MACRO, PRELUDE, truncate_exact_bf16
from adamkit.storage.rounding import round_stochastic

HEADER = "for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(ks0); x0+=static_cast<int64_t>(32L))"
LIKELY = "if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(32L*(c10::div_floor_integer(static_cast<int64_t>(ks0), static_cast<int64_t>(32L))))))"
CONVERT = "auto tmp87 = at::vec::convert<at::BFloat16,1,float,2>(tmp86);"
AS_FLOAT = "auto tmp86 = at::vec::VectorizedN<float,2>(at::vec::cast<float>(tmp85[0]), at::vec::cast<float>(tmp85[1]));"
BODY = [
    "auto tmp36 = at::vec::VectorizedN<float,2>::loadu(in_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(32));",
    "auto tmp46 = at::vec::VectorizedN<int32_t,2>(at::vec::cast<int32_t>(tmp36[0]), at::vec::cast<int32_t>(tmp36[1]));",
    "auto tmp82 = tmp46 + tmp46;",
    "auto tmp83 = static_cast<int32_t>(-65536);",
    "auto tmp84 = at::vec::VectorizedN<int32_t,2>(tmp83);",
    "auto tmp85 = tmp82 & tmp84;",
    AS_FLOAT,
    CONVERT,
    "tmp87.store(out_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(32));",
]


def _source(body: list[str]) -> str:
    return "\n".join(vector_loop(HEADER, LIKELY, body))


def test_a_conversion_of_a_value_with_its_low_half_cleared_becomes_a_truncation() -> None:
    source = _source(BODY)
    out = truncate_exact_bf16(source)
    assert out.startswith(PRELUDE + "\n")
    lines = [line.strip() for line in out[len(PRELUDE) + 1 :].split("\n")]
    at = lines.index(f"auto tmp87 = {MACRO}(tmp86[0], tmp86[1]);")
    # the original line stays for instruction sets without the macro
    assert lines[at - 1 : at + 3] == [f"#if defined({MACRO})", lines[at], "#else", CONVERT]
    assert lines[at + 3] == "#endif"
    # every other line as it was
    assert lines[: at - 1] + [lines[at + 2]] + lines[at + 4 :] == [
        line.strip() for line in source.split("\n")
    ]
    # operands either way round, and the mask broadcast from a literal
    swapped = [line.replace("tmp82 & tmp84", "tmp84 & tmp82") for line in BODY]
    assert MACRO + "(" in truncate_exact_bf16(_source(swapped))
    literal = [
        "auto tmp84 = at::vec::VectorizedN<int32_t,2>(static_cast<int32_t>(-65536));"
        if line.startswith("auto tmp84")
        else line
        for line in BODY
        if not line.startswith("auto tmp83")
    ]
    assert MACRO + "(" in truncate_exact_bf16(_source(literal))
    # the mask hoisted in front of the loop (hoisting names it stmp)
    hoisted = "\n".join(
        [
            "auto stmp83 = static_cast<int32_t>(-65536);",
            "auto stmp84 = at::vec::VectorizedN<int32_t,2>(stmp83);",
            *vector_loop(
                HEADER,
                LIKELY,
                [
                    line.replace("tmp82 & tmp84", "tmp82 & stmp84")
                    for line in BODY
                    if not line.startswith(("auto tmp83", "auto tmp84"))
                ],
            ),
        ]
    )
    assert MACRO + "(" in truncate_exact_bf16(hoisted)


def test_other_conversions_stay() -> None:
    """A mask that keeps some low bit, a value not masked, a float that is not the masked
    int's bit pattern, or a mask defined in another block: the source comes back unchanged."""
    variants = [
        [line.replace("-65536", "-65535") for line in BODY],
        [line.replace("tmp82 & tmp84", "tmp82 | tmp84") for line in BODY],
        [line.replace(AS_FLOAT, "auto tmp86 = tmp36 * tmp36;") for line in BODY],
        [
            line.replace(AS_FLOAT, "auto tmp86 = at::vec::convert<float,2,int32_t,2>(tmp85);")
            for line in BODY
        ],
    ]
    for body in variants:
        source = _source(body)
        assert truncate_exact_bf16(source) == source
    # the masked value is defined in a sibling block that has closed: not the one in scope
    earlier = vector_loop(HEADER, LIKELY, BODY[:6])
    later = vector_loop(HEADER, LIKELY, ["auto tmp85 = tmp36;", AS_FLOAT, CONVERT])
    source = "\n".join([*earlier, *later])
    assert truncate_exact_bf16(source) == source
    assert truncate_exact_bf16("int x = 0;") == "int x = 0;"


def test_high_halves_are_the_conversion_of_values_whose_low_half_is_zero() -> None:
    """What the pass relies on: a float32 whose low 16 bits are zero (what stochastic
    rounding makes, NaN and inf included) converts to bf16 as its high half; and
    round_stochastic gives such values, taking finite values past the largest bf16 to it
    (never to inf) and keeping inf and NaN."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32) & np.uint32(0xFFFF0000)
    values = torch.from_numpy(bits.view(np.int32).copy()).view(torch.float32)
    high = torch.from_numpy((bits >> np.uint32(16)).astype(np.uint16).view(np.int16).copy())
    converted = values.to(torch.bfloat16)
    finite = torch.isfinite(values)
    assert torch.equal(converted[finite].view(torch.int16), high[finite])
    assert torch.equal(torch.isnan(converted), torch.isnan(values))
    assert torch.equal(converted[torch.isinf(values)].float(), values[torch.isinf(values)])
    big = float(torch.finfo(torch.bfloat16).max)
    x = torch.tensor(
        [3.3998e38, -3.4e38, big, float("inf"), -float("inf"), float("nan"), 1.0 + 2**-9]
    )
    cells = torch.full((x.numel(),), 0xFFFF, dtype=torch.int32)  # the largest noise
    out = round_stochastic(x, torch.bfloat16, cells)
    assert out[:3].float().tolist() == [big, -big, big]
    assert out[3].item() == float("inf") and out[4].item() == -float("inf") and out[5].isnan()
    assert out[6].item() == 1.0 + 2**-7  # finite, below the largest: rounded up by the noise
