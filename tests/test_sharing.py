# ruff: noqa: E501  (C++ source as inductor writes it)
"""The pass that keeps a row's new moments from the scale pass for the main loop
(adamkit.execution.sharing), on C++ of the shape of a fused block-wise row."""

from __future__ import annotations

from cpp_loops import row_loop, stripped_lines, vector_loop

from adamkit.execution.sharing import share_row_values

IDX = "static_cast<int64_t>(x1 + 256L*x0)"
INNER = "for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(256L); x1+=static_cast<int64_t>(16L))"
LIKELY = "if(C10_LIKELY(x1 >= static_cast<int64_t>(0) && x1 < static_cast<int64_t>(256L)))"
ALIASES = {
    "in_ptr1": "grad",
    "in_ptr2": "m_codes",
    "out_ptr0": "new_scale",
    "out_ptr5": "param",
    "out_ptr6": "m_codes",
    "out_ptr8": "old_scale",
}

SCALE_BODY = [
    f"auto tmp0 = at::vec::Vectorized<float>::loadu(in_ptr1 + {IDX}, static_cast<int64_t>(16));",
    f"auto tmp3 = at::vec::Vectorized<uint8_t>::loadu(in_ptr2 + {IDX}, static_cast<int64_t>(16));",
    "auto tmp4 = at::vec::convert<int32_t>(tmp3);",
    "auto tmp5 = at::vec::cast<float>(tmp4);",
    "auto tmp6 = tmp5 * tmp2;",
    "auto tmp7 = tmp6 + tmp0;",
    "auto tmp8 = tmp7.abs();",
    "tmp_acc0_vec = at::vec::maximum(tmp_acc0_vec, tmp8);",
]
MAIN_BODY = [
    f"auto tmp12 = at::vec::Vectorized<uint8_t>::loadu(out_ptr6 + {IDX}, static_cast<int64_t>(16));",
    f"auto tmp13 = at::vec::Vectorized<float>::loadu(in_ptr1 + {IDX}, static_cast<int64_t>(16));",
    "auto tmp14 = at::vec::convert<int32_t>(tmp12);",
    "auto tmp15 = at::vec::cast<float>(tmp14);",
    "auto tmp16 = tmp15 * tmp11;",
    "auto tmp17 = tmp16 + tmp13;",
    "auto tmp18 = tmp17.abs();",
    "auto tmp19 = tmp18 * tmp21;",
    "auto tmp22 = at::vec::cast<uint8_t>(at::vec::convert<int8_t>(at::vec::cast<int32_t>(tmp19)));",
    "auto tmp23 = tmp17 * tmp13;",
    f"tmp22.store(out_ptr6 + {IDX}, static_cast<int64_t>(16));",
    f"tmp23.store(out_ptr5 + {IDX});",
]


def _loop(body: list[str], header: str = INNER) -> list[str]:
    return vector_loop(header, LIKELY, body)


def _row(
    scale_body=SCALE_BODY, main_body=MAIN_BODY, old_scale="out_ptr8", main_header=INNER
) -> str:
    scale = [
        "{",
        "    float tmp_acc0 = -std::numeric_limits<float>::infinity();",
        "    at::vec::Vectorized<float> tmp_acc0_vec = at::vec::Vectorized<float>(-std::numeric_limits<float>::infinity());",
        f"    auto tmp1 = {old_scale}[static_cast<int64_t>(x0)];",
        "    auto tmp2 = at::vec::Vectorized<float>(tmp1);",
        *(f"    {line}" for line in _loop(scale_body)),
        "    tmp_acc0 = max_propagate_nan(tmp_acc0, at::vec::vec_reduce_all<float, 1>([](at::vec::Vectorized<float>& x, at::vec::Vectorized<float>& y) { return at::vec::maximum(x, y); }, tmp_acc0_vec));",
        "    out_ptr0[static_cast<int64_t>(x0)] = static_cast<float>(tmp_acc0);",
        "}",
    ]
    main = [
        f"auto tmp10 = {old_scale}[static_cast<int64_t>(x0)];",
        "auto tmp11 = at::vec::Vectorized<float>(tmp10);",
        "auto tmp20 = out_ptr0[static_cast<int64_t>(x0)];",
        "auto tmp21 = at::vec::Vectorized<float>(tmp20);",
        *_loop(main_body, main_header),
    ]
    row = ["{", *(f"    {x}" for x in scale), "}", "{", *(f"    {x}" for x in main), "}"]
    return row_loop(row)


def test_the_new_moment_of_the_scale_pass_is_kept_for_the_main_loop():
    source = _row()
    out = stripped_lines(share_row_values(source, ALIASES))
    # one row buffer, declared in the row's body
    assert out[3] == "alignas(64) float abuf0[256];"
    assert sum(line.startswith("alignas(64)") for line in out) == 1
    # the scale pass stores its new m right where it computes it ...
    at = out.index("auto tmp7 = tmp6 + tmp0;")
    assert out[at + 1] == "tmp7.store(abuf0 + static_cast<int64_t>(x1));"
    # ... and the main loop loads it instead of decoding the codes again (same buffer through
    # another pointer); |m| is computed again from it, the rest is as written
    assert (
        "auto tmp17 = at::vec::Vectorized<float>::loadu(abuf0 + static_cast<int64_t>(x1), static_cast<int64_t>(16));"
        in out
    )
    assert "auto tmp16 = tmp15 * tmp11;" in out and "auto tmp18 = tmp17.abs();" in out
    kept = [line for line in stripped_lines(source) if line not in ("auto tmp17 = tmp16 + tmp13;",)]
    assert [
        line for line in out if not line.startswith(("alignas", "tmp7.store", "auto tmp17"))
    ] == kept


def test_values_that_may_differ_between_the_loops_are_computed_again():
    cases = {
        # the moment's scale is the one the scale pass writes: another value in each loop
        "stored between": _row(old_scale="out_ptr0"),
        # the main loop overwrites the codes at another iteration's index first
        "other index": _row(
            main_body=[
                line.replace(
                    f"tmp22.store(out_ptr6 + {IDX}",
                    "tmp22.store(out_ptr6 + static_cast<int64_t>(16L + x1 + 256L*x0)",
                )
                for line in MAIN_BODY
            ]
        ),
        # a definition after a store: it could read what the iteration just wrote
        "after a store": _row(main_body=[*MAIN_BODY, "auto tmp30 = tmp17 + tmp13;"]),
        # loops of another length
        "header": _row(main_header=INNER.replace("256L", "128L")),
        # codes read as another buffer in the main loop
        "other buffer": _row(
            main_body=[line.replace("loadu(out_ptr6", "loadu(out_ptr5") for line in MAIN_BODY]
        ),
    }
    for name, source in cases.items():
        assert share_row_values(source, ALIASES) == source, name
    assert share_row_values(_row(), {}) == _row()  # nothing known about the pointers


def test_only_float_vectors_computed_from_loads_are_shared():
    # the new moment as an int32 vector (its type is not inferred): nothing is shared
    body = [
        line.replace("at::vec::cast<float>(tmp4)", "at::vec::cast<int32_t>(tmp4)")
        for line in SCALE_BODY
    ]
    main = [
        line.replace("at::vec::cast<float>(tmp14)", "at::vec::cast<int32_t>(tmp14)")
        for line in MAIN_BODY
    ]
    source = _row(scale_body=body, main_body=main)
    assert share_row_values(source, ALIASES) == source
