# ruff: noqa: E501  (C++ source as inductor writes it)
"""The pass that accumulates a signals kernel's sums of squares with fused multiply-adds
(adamkit.execution.contraction), on C++ of the shape inductor writes."""

from __future__ import annotations

from cpp_loops import vector_loop

from adamkit.execution.contraction import contract_sums

IDX = "static_cast<int64_t>(x1 + 1024L*x0)"
HEADER = "for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(1024L); x1+=static_cast<int64_t>(16L))"
LIKELY = "if(C10_LIKELY(x1 >= static_cast<int64_t>(0) && x1 < static_cast<int64_t>(1024L)))"
LOAD = f"auto tmp0 = at::vec::Vectorized<float>::loadu(in_ptr0 + {IDX}, static_cast<int64_t>(16));"


def _source(body: list[str], before: list[str] = ()) -> str:
    return "\n".join([*before, *vector_loop(HEADER, LIKELY, body)])


def test_a_square_summed_alone_becomes_one_fmadd() -> None:
    body = [
        LOAD,
        "auto stmp2 = at::vec::Vectorized<float>::loadu(out_ptr15 + static_cast<int64_t>(x1 + 1024L*x0), static_cast<int64_t>(16));",
        "auto tmp1 = tmp0 * tmp0;",
        "auto stmp3 = stmp2 * stmp2;",
        "tmp_acc0_vec = tmp_acc0_vec + tmp1;",
        "tmp_acc1_vec = tmp_acc1_vec + stmp3;",
    ]
    out = contract_sums(_source(body)).split("\n")
    assert "            tmp_acc0_vec = at::vec::fmadd(tmp0, tmp0, tmp_acc0_vec);" in out
    assert "            tmp_acc1_vec = at::vec::fmadd(stmp2, stmp2, tmp_acc1_vec);" in out
    # the products' lines stay (unused now); nothing else changes
    assert len(out) == len(_source(body).split("\n"))
    changed = [a for a, b in zip(out, _source(body).split("\n")) if a != b]
    assert len(changed) == 2


def test_a_product_used_elsewhere_or_not_of_this_loop_stays() -> None:
    used_twice = [
        LOAD,
        "auto tmp1 = tmp0 * tmp0;",
        "auto tmp2 = tmp1 + tmp0;",
        "tmp_acc0_vec = tmp_acc0_vec + tmp1;",
        "tmp2.store(out_ptr1 + " + IDX + ");",
    ]
    assert contract_sums(_source(used_twice)) == _source(used_twice)
    # defined before the loop (an invariant): not this body's product
    outside = ["auto tmp9 = tmp7 * tmp8;"]
    body = [LOAD, "tmp_acc0_vec = tmp_acc0_vec + tmp9;"]
    assert contract_sums(_source(body, outside)) == _source(body, outside)
    # a sum, not a product; a scalar accumulator
    other = [
        LOAD,
        "auto tmp1 = tmp0 + tmp0;",
        "tmp_acc0_vec = tmp_acc0_vec + tmp1;",
        "auto tmp3 = tmp0 * tmp0;",
        "tmp_acc1 = tmp_acc1 + tmp3;",
    ]
    assert contract_sums(_source(other)) == _source(other)


def test_a_use_after_the_loop_body_does_not_count() -> None:
    """Names are defined once a body: a name of the same spelling past the loop's end is
    another loop's."""
    body = [LOAD, "auto tmp1 = tmp0 * tmp0;", "tmp_acc0_vec = tmp_acc0_vec + tmp1;"]
    after = [HEADER, "{", "    auto tmp1 = tmp5 + tmp5;", "}"]
    source = "\n".join([_source(body), *after])
    out = contract_sums(source)
    assert "tmp_acc0_vec = at::vec::fmadd(tmp0, tmp0, tmp_acc0_vec);" in out
    assert out.endswith("\n".join(after))
