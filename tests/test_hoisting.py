# ruff: noqa: E501  (C++ source as inductor writes it)
"""The loop-invariant pass over inductor's C++ source (adamkit.execution.hoisting)."""

from __future__ import annotations

import textwrap

from adamkit.execution.hoisting import hoist_invariants

ROW_LOOP = textwrap.dedent(
    """\
    #pragma omp for
    for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(ks0); x0+=static_cast<int64_t>(1L))
    {
        for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(256L); x1+=static_cast<int64_t>(16L))
        {
            {
                if(C10_LIKELY(x1 >= static_cast<int64_t>(0) && x1 < static_cast<int64_t>(256L)))
                {
                    auto tmp0 = in_ptr0[static_cast<int64_t>(2L)];
                    auto tmp1 = out_ptr3[static_cast<int64_t>(x0)];
                    auto tmp2 = at::vec::Vectorized<float>::loadu(in_ptr1 + static_cast<int64_t>(x1 + 256L*x0), static_cast<int64_t>(16));
                    auto tmp3 = static_cast<float>(1.0);
                    auto tmp4 = tmp3 / tmp1;
                    auto tmp5 = at::vec::Vectorized<float>(tmp4);
                    auto tmp6 = tmp2 * tmp5;
                    auto tmp7 = out_ptr2[static_cast<int64_t>(x0)];
                    auto tmp8 = c10::convert<int32_t>(x1 + 256L*x0);
                    auto tmp9 = at::vec::Vectorized<float>(tmp0) + tmp6;
                    tmp9.store(out_ptr1 + static_cast<int64_t>(x1 + 256L*x0));
                    out_ptr2[static_cast<int64_t>(x0)] = tmp7;
                }
                if(C10_UNLIKELY(x1 >= static_cast<int64_t>(256L) && x1 < static_cast<int64_t>(256L)))
                {
                    auto tmp20 = in_ptr0[static_cast<int64_t>(3L)];
                }
            }
        }
    }"""
)


def _lines(source: str) -> list[str]:
    return [line.strip() for line in source.split("\n")]


def test_scalar_loads_and_what_derives_from_them_move_in_front_of_the_row_loop():
    out = _lines(hoist_invariants(ROW_LOOP))
    row_loop = next(i for i, line in enumerate(out) if line.startswith("for(int64_t x1="))
    moved = [
        "auto tmp0 = in_ptr0[static_cast<int64_t>(2L)];",
        "auto tmp1 = out_ptr3[static_cast<int64_t>(x0)];",
        "auto tmp3 = static_cast<float>(1.0);",
        "auto tmp4 = tmp3 / tmp1;",
        "auto tmp5 = at::vec::Vectorized<float>(tmp4);",
    ]
    assert out[row_loop - len(moved) : row_loop] == moved  # in their order, each once
    assert all(out.count(line) == 1 for line in moved)
    body = out[row_loop:]
    for kept in (
        "auto tmp6 = tmp2 * tmp5;",  # reads a vector load of this loop
        "auto tmp7 = out_ptr2[static_cast<int64_t>(x0)];",  # the loop stores through out_ptr2
        "auto tmp8 = c10::convert<int32_t>(x1 + 256L*x0);",  # the loop variable
        "auto tmp9 = at::vec::Vectorized<float>(tmp0) + tmp6;",
        "auto tmp20 = in_ptr0[static_cast<int64_t>(3L)];",  # the tail branch is left alone
    ):
        assert kept in body
    # the outer (parallel) loop keeps its pragma right above it
    outer = next(i for i, line in enumerate(out) if line.startswith("for(int64_t x0="))
    assert out[outer - 1] == "#pragma omp for"


def test_loops_without_literal_bounds_or_a_full_step_are_left_as_written():
    dynamic = ROW_LOOP.replace("x1<static_cast<int64_t>(256L)", "x1<static_cast<int64_t>(ks1)")
    assert hoist_invariants(dynamic, sized=False) == dynamic
    short = ROW_LOOP.replace("x1<static_cast<int64_t>(256L)", "x1<static_cast<int64_t>(8L)")
    assert hoist_invariants(short) == short
    bound = ROW_LOOP.replace("x1<static_cast<int64_t>(256L)", "x1<static_cast<int64_t>(n + 1)")
    assert hoist_invariants(bound) == bound  # a bound that is neither literal nor a size


FLAT_LOOP = textwrap.dedent(
    """    {
        #pragma omp for schedule(static) nowait
        for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(ks0); x0+=static_cast<int64_t>(32L))
        {
            {
                if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(32L*(c10::div_floor_integer(static_cast<int64_t>(ks0), static_cast<int64_t>(32L))))))
                {
                    auto tmp0 = at::vec::VectorizedN<float,2>::loadu(out_ptr3 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                    auto tmp1 = in_ptr1[static_cast<int64_t>(4L)];
                    auto tmp2 = at::vec::VectorizedN<float,2>(tmp1);
                    auto tmp3 = tmp0 * tmp2;
                    auto tmp4 = in_ptr2[static_cast<int64_t>(ks1)];
                    auto tmp5 = in_ptr1[static_cast<int64_t>(x0)];
                    auto tmp6 = static_cast<float>(1.0);
                    auto tmp7 = float(tmp6 - tmp1);
                    tmp3.store(out_ptr3 + static_cast<int64_t>(x0));
                }
                if(C10_UNLIKELY(x0 >= static_cast<int64_t>(32L*(c10::div_floor_integer(static_cast<int64_t>(ks0), static_cast<int64_t>(32L)))) && x0 < static_cast<int64_t>(ks0)))
                {
                    auto tmp1 = in_ptr1[static_cast<int64_t>(4L)];
                }
            }
        }
    }"""
)


def test_a_loop_over_a_kernel_size_moves_only_loads_at_a_literal_index():
    """A flat loop up to ``ks0`` may run no iteration: what moves in front of it (above its
    pragma) is what reads only entries at a literal index of an input (the step's table) and
    what derives from those; a load at a size or at the loop index stays. ``sized=False``
    leaves the loop as written."""
    out = _lines(hoist_invariants(FLAT_LOOP))
    pragma = out.index("#pragma omp for schedule(static) nowait")
    moved = [
        "auto tmp1 = in_ptr1[static_cast<int64_t>(4L)];",
        "auto tmp2 = at::vec::VectorizedN<float,2>(tmp1);",
        "auto tmp6 = static_cast<float>(1.0);",
        "auto tmp7 = float(tmp6 - tmp1);",
    ]
    assert out[pragma - len(moved) : pragma] == moved
    assert out[pragma + 1].startswith("for(int64_t x0=")
    body = out[pragma + 1 :]
    for kept in (
        "auto tmp4 = in_ptr2[static_cast<int64_t>(ks1)];",
        "auto tmp5 = in_ptr1[static_cast<int64_t>(x0)];",
        "auto tmp3 = tmp0 * tmp2;",
        "auto tmp1 = in_ptr1[static_cast<int64_t>(4L)];",  # the tail's own, left alone
    ):
        assert kept in body
    assert body.count("auto tmp1 = in_ptr1[static_cast<int64_t>(4L)];") == 1
    assert hoist_invariants(FLAT_LOOP, sized=False) == FLAT_LOOP


def test_a_loop_with_an_inner_loop_or_a_lambda_keeps_those_lines():
    source = textwrap.dedent(
        """\
        for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(64L); x1+=static_cast<int64_t>(16L))
        {
            auto tmp0 = in_ptr0[static_cast<int64_t>(0L)];
            auto tmp1 = [&]
            {
                auto tmp2 = in_ptr1[static_cast<int64_t>(1L)];
                return tmp2;
            }
            ();
            auto tmp3 = [&]() { return in_ptr1[static_cast<int64_t>(2L)]; }();
            tmp0.store(out_ptr0 + static_cast<int64_t>(x1));
        }"""
    )
    out = _lines(hoist_invariants(source))
    assert out[0] == "auto tmp0 = in_ptr0[static_cast<int64_t>(0L)];"
    assert out[1].startswith("for(int64_t x1=")
    assert "auto tmp2 = in_ptr1[static_cast<int64_t>(1L)];" in out[2:]  # inside the lambda
    assert "auto tmp3 = [&]() { return in_ptr1[static_cast<int64_t>(2L)]; }();" in out[2:]
    nested = source.replace(
        "    tmp0.store", "    for(int64_t x2=0; x2<4; x2++) {}\n    tmp0.store"
    )
    assert hoist_invariants(nested) == nested


def test_a_source_without_row_loops_comes_back_unchanged():
    source = 'extern "C" void kernel(const float* in_ptr0)\n{\n    auto tmp0 = in_ptr0[0];\n}'
    assert hoist_invariants(source) == source


def test_sibling_loops_that_reuse_a_name_move_it_once():
    """Inductor numbers each fused kernel's temporaries from tmp0: two row loops of one block
    may both define tmp0. Only the first moves it; a second declaration in the same block
    would not compile."""
    loop = textwrap.dedent(
        """\
        for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(64L); x1+=static_cast<int64_t>(16L))
        {
            auto tmp0 = in_ptr0[static_cast<int64_t>({k}L)];
            auto tmp1 = at::vec::Vectorized<float>(tmp0);
            tmp1.store(out_ptr{k} + static_cast<int64_t>(x1));
        }"""
    )
    source = "{\n" + loop.replace("{k}", "1") + "\n" + loop.replace("{k}", "2") + "\n}"
    out = _lines(hoist_invariants(source))
    assert out.count("auto tmp0 = in_ptr0[static_cast<int64_t>(1L)];") == 1
    assert out.index("auto tmp0 = in_ptr0[static_cast<int64_t>(1L)];") < out.index(
        next(line for line in out if line.startswith("for("))
    )
    second = [i for i, line in enumerate(out) if line.startswith("for(")][1]
    assert "auto tmp0 = in_ptr0[static_cast<int64_t>(2L)];" in out[second:]  # stays inside
    assert "auto tmp1 = at::vec::Vectorized<float>(tmp0);" in out[second:]
    declarations = [line.split(" = ")[0] for line in out[:second] if line.startswith("auto ")]
    assert len(declarations) == len(set(declarations))
