# ruff: noqa: E501  (C++ source as inductor writes it)
"""The pass that merges a signals kernel's sums loop into its update loop
(adamkit.execution.merging), on C++ of the shape inductor writes (after the hoisting pass)."""

from __future__ import annotations

from cpp_loops import row_loop, stripped_lines, vector_loop

from adamkit.execution.merging import merge_sum_loops

INDEX = "static_cast<int64_t>(x1 + 128L*x0)"
HEADER = "for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(128L); x1+=static_cast<int64_t>(16L))"
LIKELY = "if(C10_LIKELY(x1 >= static_cast<int64_t>(0) && x1 < static_cast<int64_t>(128L)))"


def _load(ptr: str) -> str:
    return (
        f"(__builtin_prefetch({ptr} + {INDEX} + 1024, 0, 3), "
        f"at::vec::Vectorized<float>::loadu({ptr} + {INDEX}, static_cast<int64_t>(16)))"
    )


SUMS_BODY = [
    f"auto tmp0 = {_load('in_ptr0')};",
    f"auto tmp1 = {_load('in_ptr2')};",
    "auto tmp2 = tmp0 * tmp0;",
    "auto tmp3 = tmp1 * tmp4;",
    "auto tmp5 = tmp3 * tmp3;",
    "tmp_acc0_vec = tmp_acc0_vec + tmp2;",
    "tmp_acc1_vec = tmp_acc1_vec + tmp5;",
]
UPDATE_BODY = [
    f"auto tmp2 = {_load('in_ptr0')};",
    f"auto tmp3 = {_load('out_ptr9')};",
    "auto tmp4 = tmp3 * tmp7;",
    "auto tmp5 = tmp4 + tmp2;",
    "auto tmp6 = decltype(tmp4)::blendv(tmp4, tmp4, tmp8.template cast<float,1>());",
    "auto tmp9 = decltype(tmp5)::blendv(tmp5, tmp5, tmp8.template cast<float,1>());",
    f"tmp6.store(out_ptr9 + {INDEX});",
    f"tmp9.store(out_ptr11 + {INDEX});",
]
ALIASES = {
    "in_ptr0": "grad",
    "in_ptr1": "scalars",
    "in_ptr2": "exp_avg",
    "out_ptr0": "sum0",
    "out_ptr1": "sum1",
    "out_ptr3": "stacked",
    "out_ptr4": "stacked",
    "out_ptr9": "exp_avg",
    "out_ptr11": "param",
}


def _loop(body: list[str]) -> list[str]:
    return vector_loop(HEADER, LIKELY, body)


def _kernel(
    sums_body=SUMS_BODY, update_body=UPDATE_BODY, update_setup=None, header=HEADER, after=()
):
    setup = update_setup or [
        "auto tmp0 = out_ptr0[static_cast<int64_t>(x0)];",
        "auto tmp1 = tmp0 == tmp0;",
        "auto tmp7 = at::vec::Vectorized<float>(in_ptr1[static_cast<int64_t>(1L)]);",
        "auto tmp8 = at::vec::VecMask<float,1>::from(tmp1);",
    ]
    update = _loop(update_body)
    update[0] = header
    row = [
        "{",
        "    float tmp_acc0 = 0;",
        "    at::vec::Vectorized<float> tmp_acc0_vec = at::vec::Vectorized<float>(0);",
        "    float tmp_acc1 = 0;",
        "    at::vec::Vectorized<float> tmp_acc1_vec = at::vec::Vectorized<float>(0);",
        "    auto tmp4 = at::vec::Vectorized<float>(in_ptr1[static_cast<int64_t>(0L)]);",
        *(f"    {line}" for line in _loop(sums_body)),
        "    tmp_acc0 = tmp_acc0 + at::vec::vec_reduce_all<float, 1>([](at::vec::Vectorized<float>& x, at::vec::Vectorized<float>& y) { return x + y; }, tmp_acc0_vec);",
        "    out_ptr0[static_cast<int64_t>(x0)] = static_cast<float>(tmp_acc0);",
        "    tmp_acc1 = tmp_acc1 + at::vec::vec_reduce_all<float, 1>([](at::vec::Vectorized<float>& x, at::vec::Vectorized<float>& y) { return x + y; }, tmp_acc1_vec);",
        "    out_ptr1[static_cast<int64_t>(x0)] = static_cast<float>(tmp_acc1);",
        "}",
        "{",
        "    {",
        "        auto tmp0 = out_ptr0[static_cast<int64_t>(x0)];",
        "        out_ptr3[static_cast<int64_t>(2L*x0)] = tmp0;",
        "    }",
        "}",
        *setup,
        *update,
        *after,
    ]
    return row_loop(row, "        ")


def test_the_sums_loop_joins_the_update_loop_on_the_same_loads():
    out = stripped_lines(merge_sum_loops(_kernel(), ALIASES))
    assert sum(line == HEADER for line in out) == 1  # one loop over the row
    body_start = out.index(LIKELY) + 2
    body = out[body_start : out.index("}", body_start)]
    # the sums first, renamed, their load of m through the update's pointer and without the
    # prefetch the update loop issues anyway; then the update, its no-op selects gone
    assert body[:7] == [
        f"auto stmp0 = at::vec::Vectorized<float>::loadu(in_ptr0 + {INDEX}, static_cast<int64_t>(16));",
        f"auto stmp1 = at::vec::Vectorized<float>::loadu(out_ptr9 + {INDEX}, static_cast<int64_t>(16));",
        "auto stmp2 = stmp0 * stmp0;",
        "auto stmp3 = stmp1 * stmp4;",
        "auto stmp5 = stmp3 * stmp3;",
        "tmp_acc0_vec = tmp_acc0_vec + stmp2;",
        "tmp_acc1_vec = tmp_acc1_vec + stmp5;",
    ]
    assert body[7:] == [line.strip() for line in UPDATE_BODY[:4]] + [
        "auto tmp6 = tmp4;",
        "auto tmp9 = tmp5;",
        f"tmp6.store(out_ptr9 + {INDEX});",
        f"tmp9.store(out_ptr11 + {INDEX});",
    ]
    # the update's setup moved in front of the loop without the row sums' read (the tie)
    loop = out.index(HEADER)
    setup = out[out.index("float tmp_acc0 = 0;") : loop]
    assert setup == [
        "float tmp_acc0 = 0;",
        "at::vec::Vectorized<float> tmp_acc0_vec = at::vec::Vectorized<float>(0);",
        "float tmp_acc1 = 0;",
        "at::vec::Vectorized<float> tmp_acc1_vec = at::vec::Vectorized<float>(0);",
        "auto stmp4 = at::vec::Vectorized<float>(in_ptr1[static_cast<int64_t>(0L)]);",
        "auto tmp7 = at::vec::Vectorized<float>(in_ptr1[static_cast<int64_t>(1L)]);",
    ]
    # the row's sums are reduced and stored after the loop, then copied as before
    after = out[out.index("}", body_start) + 3 :]
    assert after[0].startswith("tmp_acc0 = tmp_acc0 + at::vec::vec_reduce_all")
    assert after[1] == "out_ptr0[static_cast<int64_t>(x0)] = static_cast<float>(tmp_acc0);"
    assert after[5:8] == ["{", "{", "auto tmp0 = out_ptr0[static_cast<int64_t>(x0)];"]


def test_without_the_pointers_buffers_nothing_changes():
    source = _kernel()
    assert merge_sum_loops(source, {}) == source
    partial = {k: v for k, v in ALIASES.items() if k != "out_ptr9"}
    assert merge_sum_loops(source, partial) == source


def test_other_shapes_are_left_as_written():
    cases = {
        # the sums loop stores
        "store": _kernel(sums_body=[*SUMS_BODY, f"tmp2.store(out_ptr5 + {INDEX});"]),
        # the update loop reads the row's sums other than through a no-op select
        "read": _kernel(
            update_body=[
                *UPDATE_BODY[:4],
                "auto tmp6 = decltype(tmp4)::blendv(tmp4, tmp5, tmp8.template cast<float,1>());",
                *UPDATE_BODY[5:],
            ]
        ),
        # another header (not the same elements per iteration)
        "header": _kernel(header=HEADER.replace("128L", "256L")),
        # a load at another index: it could read what an earlier iteration wrote
        "index": _kernel(
            sums_body=[
                *SUMS_BODY[:1],
                "auto tmp1 = at::vec::Vectorized<float>::loadu(in_ptr2 + static_cast<int64_t>(16L + x1 + 128L*x0), static_cast<int64_t>(16));",
                *SUMS_BODY[2:],
            ]
        ),
        # a narrower load
        "width": _kernel(
            sums_body=[
                *SUMS_BODY[:1],
                f"auto tmp1 = at::vec::Vectorized<float>::loadu(in_ptr2 + {INDEX}, static_cast<int64_t>(8));",
                *SUMS_BODY[2:],
            ]
        ),
        # a name of the update's setup used after the update loop
        "scope": _kernel(after=["auto tmp30 = tmp7;"]),
        # a statement other than a definition between the copies and the update loop
        "statement": _kernel(
            update_setup=[
                "auto tmp7 = at::vec::Vectorized<float>(in_ptr1[static_cast<int64_t>(1L)]);",
                "out_ptr4[static_cast<int64_t>(x0)] = 0;",
                "auto tmp8 = at::vec::VecMask<float,1>::from(true);",
            ]
        ),
    }
    for name, source in cases.items():
        assert merge_sum_loops(source, ALIASES) == source, name


def test_a_source_without_sums_loops_comes_back_unchanged():
    source = "\n".join(_loop(UPDATE_BODY))
    assert merge_sum_loops(source, ALIASES) == source
