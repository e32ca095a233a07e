# ruff: noqa: E501  (C++ source as inductor writes it)
"""The pass that writes shifts of byte vectors by a constant as 16-bit shifts and a mask
(adamkit.execution.byteshift): on C++ of the shape inductor writes, and the fact it relies on."""

from __future__ import annotations

import numpy as np
from cpp_loops import vector_loop

from adamkit.execution.byteshift import MACRO, PRELUDE, constant_byte_shifts

HEADER = "for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(128L); x1+=static_cast<int64_t>(16L))"
LIKELY = "if(C10_LIKELY(x1 >= static_cast<int64_t>(0) && x1 < static_cast<int64_t>(128L)))"
SHIFT = "auto tmp4 = tmp1 << tmp3;"
BODY = [
    "auto tmp0 = at::vec::Vectorized<uint8_t>::loadu(lbuf_out_ptr2 + static_cast<int64_t>(x1), static_cast<int64_t>(16));",
    "auto tmp1 = at::vec::Vectorized<uint8_t>::loadu(lbuf_out_ptr2 + static_cast<int64_t>(128L + x1), static_cast<int64_t>(16));",
    SHIFT,
    "auto tmp5 = tmp0 | tmp4;",
    "tmp5.store(out_ptr9 + static_cast<int64_t>(x1 + 128L*x0), static_cast<int64_t>(16));",
]
COUNT = ["auto tmp2 = static_cast<uint8_t>(4);", "auto tmp3 = at::vec::Vectorized<uint8_t>(tmp2);"]


def _source(count: list[str], body: list[str]) -> str:
    return "\n".join(["{", *count, *vector_loop(HEADER, LIKELY, body), "}"])


def test_a_shift_of_bytes_by_a_broadcast_literal_becomes_a_16_bit_shift_and_a_mask() -> None:
    source = _source(COUNT, BODY)
    out = constant_byte_shifts(source)
    assert out.startswith(PRELUDE + "\n")
    lines = [line.strip() for line in out[len(PRELUDE) + 1 :].split("\n")]
    at = lines.index(f"auto tmp4 = {MACRO}(tmp1, slli, 4, 0xf0);")
    assert lines[at - 1 : at + 4] == [f"#if defined({MACRO})", lines[at], "#else", SHIFT, "#endif"]
    assert lines[: at - 1] + [lines[at + 2]] + lines[at + 4 :] == [
        line.strip() for line in source.split("\n")
    ]
    # a right shift by 3, the count broadcast from a literal
    right = [
        "auto tmp3 = at::vec::Vectorized<uint8_t>(static_cast<uint8_t>(3));",
    ]
    out = constant_byte_shifts(_source(right, [line.replace("<<", ">>") for line in BODY]))
    assert f"auto tmp4 = {MACRO}(tmp1, srli, 3, 0x1f);" in out


def test_other_shifts_stay() -> None:
    """A count of 0 or 8, a count that is not a broadcast literal, a shift of int32 vectors,
    a count defined in a sibling block: unchanged."""
    for count in (
        ["auto tmp2 = static_cast<uint8_t>(0);", COUNT[1]],
        ["auto tmp2 = static_cast<uint8_t>(8);", COUNT[1]],
        ["auto tmp3 = at::vec::Vectorized<uint8_t>::loadu(in_ptr0, static_cast<int64_t>(16));"],
        ["auto tmp2 = static_cast<int32_t>(4);", "auto tmp3 = at::vec::Vectorized<int32_t>(tmp2);"],
        ["auto tmp2 = static_cast<uint8_t>(x1);", COUNT[1]],
    ):
        source = _source(count, BODY)
        assert constant_byte_shifts(source) == source, count
    sibling = "\n".join(["{", *COUNT, "}", *vector_loop(HEADER, LIKELY, BODY)])
    assert constant_byte_shifts(sibling) == sibling
    assert constant_byte_shifts("int x = 0;") == "int x = 0;"


def test_16_bit_shifts_and_a_byte_mask_are_byte_shifts() -> None:
    """What the pass relies on: for every pair of bytes and every count 0 < k < 8, shifting
    their 16-bit lane by k and masking each byte with 0xFF << k (left) or 0xFF >> k (right)
    gives each byte shifted by k on its own."""
    pairs = np.arange(1 << 16, dtype=np.uint16)  # every (low byte, high byte) pair
    as_bytes = pairs.view(np.uint8)
    for k in range(1, 8):
        left = ((pairs << np.uint16(k)).view(np.uint8)) & np.uint8((0xFF << k) & 0xFF)
        assert np.array_equal(left, (as_bytes << np.uint8(k)).astype(np.uint8))
        right = ((pairs >> np.uint16(k)).view(np.uint8)) & np.uint8(0xFF >> k)
        assert np.array_equal(right, as_bytes >> np.uint8(k))
