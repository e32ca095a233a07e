# ruff: noqa: E501  (C++ source as inductor writes it)
"""Row temporaries on the stack (adamkit.execution.localizing), on inductor-like C++ source.
That the rewritten kernels compute the same bits: tests/test_compiled.py."""

from __future__ import annotations

import re

from adamkit.execution.barriers import fuse_row_loops
from adamkit.execution.localizing import hoist_row_loops, localize_row_temps

ROWS = "for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(ks0); x0+=static_cast<int64_t>(1L))"
INNER = "for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(256L); x1+=static_cast<int64_t>(16L))"
HALF = "for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(128L); x1+=static_cast<int64_t>(16L))"
COPY = "for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(ks0); x0+=static_cast<int64_t>(16L))"
SIGNATURE = [
    "const float* in_ptr0",
    "float* out_ptr0",
    "uint8_t* out_ptr1",
    "float* out_ptr2",
    "uint8_t* out_ptr3",
]
# each pointer its own buffer; out_ptr1 an intermediate (buf), the others the graph's inputs
ALIASES = {
    "in_ptr0": "arg0_1",
    "out_ptr0": "buf0",
    "out_ptr1": "buf1",
    "out_ptr2": "arg1_1",
    "out_ptr3": "arg2_1",
}


def _loop(header: str, *body: str) -> str:
    inner = "\n".join("        " + line for line in body)
    return f"    {{\n        #pragma omp for\n        {header}\n        {{\n{inner}\n        }}\n    }}"


def _kernel(*loops: str) -> str:
    params = ",\n".join("                       " + p for p in SIGNATURE)
    region = "\n".join("    " + line for loop in loops for line in loop.split("\n"))
    return (
        f'extern "C" void kernel({params[23:]})\n{{\n    #pragma omp parallel\n    {{\n'
        f"        int tid = omp_get_thread_num();\n{region}\n    }}\n}}"
    )


MAIN = _loop(  # the row's new codes, one byte each, into the temporary out_ptr1
    ROWS,
    INNER,
    "{",
    "    auto tmp0 = (__builtin_prefetch(in_ptr0 + static_cast<int64_t>(x1 + 256L*x0) + 1024, 0, 3), at::vec::Vectorized<float>::loadu(in_ptr0 + static_cast<int64_t>(x1 + 256L*x0), static_cast<int64_t>(16)));",
    "    auto tmp1 = at::vec::convert<uint8_t>(tmp0);",
    "    tmp1.store(out_ptr1 + static_cast<int64_t>(x1 + 256L*x0), static_cast<int64_t>(16));",
    "}",
    "out_ptr0[static_cast<int64_t>(x0)] = static_cast<float>(1);",
)
SCALE_COPY = _loop(  # another iteration space, other buffers
    COPY,
    "auto tmp0 = at::vec::Vectorized<float>::loadu(out_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(16));",
    "tmp0.store(out_ptr2 + static_cast<int64_t>(x0));",
)
PACK = _loop(  # two codes a byte: entries x1 and 128 + x1 of the row, into the state
    ROWS,
    HALF,
    "{",
    "    auto tmp0 = (__builtin_prefetch(out_ptr1 + static_cast<int64_t>(x1 + 256L*x0) + 1024, 0, 3), at::vec::Vectorized<uint8_t>::loadu(out_ptr1 + static_cast<int64_t>(x1 + 256L*x0), static_cast<int64_t>(16)));",
    "    auto tmp1 = at::vec::Vectorized<uint8_t>::loadu(out_ptr1 + static_cast<int64_t>(128L + x1 + 256L*x0), static_cast<int64_t>(16));",
    "    auto tmp2 = tmp0 | (tmp1 << at::vec::Vectorized<uint8_t>(4));",
    "    tmp2.store(out_ptr3 + static_cast<int64_t>(x1 + 128L*x0), static_cast<int64_t>(16));",
    "}",
)


def _temporary(pointer: str) -> bool:
    return ALIASES.get(pointer, "").startswith("buf")


def _order(source: str) -> list[str]:
    """The loops of the region by what they store to."""
    out = []
    for loop in source.split("#pragma omp for")[1:]:
        stores = sorted(set(re.findall(r"\.store\((\w+) |^\s*(\w+)\[", loop, re.M)) - {("", "")})
        out.append(",".join(a or b for a, b in stores))
    return out


def test_a_row_loop_moves_up_behind_the_loop_of_its_header_past_unrelated_loops():
    source = _kernel(MAIN, SCALE_COPY, PACK)
    assert _order(source) == ["out_ptr0,out_ptr1", "out_ptr2", "out_ptr3"]
    hoisted = hoist_row_loops(source, ALIASES)
    assert _order(hoisted) == ["out_ptr0,out_ptr1", "out_ptr3", "out_ptr2"]
    assert sorted(hoisted.split("\n")) == sorted(source.split("\n"))  # the same lines
    # nothing moves past a loop that shares a buffer with it (the copy writes the packed
    # codes' buffer under another name), nor without knowing the buffers
    shared = {**ALIASES, "out_ptr2": "arg2_1"}
    assert hoist_row_loops(source, shared) == source
    assert hoist_row_loops(source, {}) == source
    # nor past a statement
    statement = "    float kept = out_ptr0[0];"
    assert hoist_row_loops(
        _kernel(MAIN, statement, PACK).replace("    float", "float"), ALIASES
    ) == _kernel(MAIN, statement, PACK).replace("    float", "float")


def _localized(source: str, temporary=_temporary) -> str:
    return localize_row_temps(fuse_row_loops(hoist_row_loops(source, ALIASES)), temporary)


def test_the_row_of_codes_between_main_loop_and_pack_stays_on_the_stack():
    out = _localized(_kernel(MAIN, SCALE_COPY, PACK))
    assert out.count("#pragma omp for") == 2  # main + pack fused, the copy apart
    fused = out.split("#pragma omp for")[1]
    assert fused.count("alignas(64) uint8_t lbuf_out_ptr1[256];") == 1
    lines = out.split("\n")
    assert [line.strip() for line in lines if re.search(r"\bout_ptr1\b", line)] == [
        "uint8_t* out_ptr1,"
    ]
    # indices relative to the row, no prefetch of the stack array
    assert "lbuf_out_ptr1 + static_cast<int64_t>((128L + x1 + 256L*x0) - 256L*x0)" in out
    assert "__builtin_prefetch(lbuf" not in out
    assert "__builtin_prefetch(in_ptr0" in out  # other loads keep theirs
    # declared inside the loop over rows: one array per thread and row
    row_loop = fused.split(ROWS, 1)[1]
    assert row_loop.index("alignas(64)") < row_loop.index(INNER)


def test_what_is_not_a_row_temporary_stays_in_memory():
    fused = fuse_row_loops(hoist_row_loops(_kernel(MAIN, SCALE_COPY, PACK), ALIASES))
    assert localize_row_temps(fused, lambda pointer: False) == fused  # a buffer the caller reads
    reader = _loop(
        ROWS,
        "auto tmp0 = out_ptr1[static_cast<int64_t>(256L*x0)];",
        "out_ptr2[static_cast<int64_t>(x0)] = tmp0;",
    )
    for source in (
        _kernel(
            MAIN, SCALE_COPY, PACK, reader.replace(ROWS, ROWS.replace("ks0", "ks1"))
        ),  # read elsewhere too
        _kernel(
            MAIN.replace(
                "x1 + 256L*x0), static_cast<int64_t>(16));",
                "x1 + 256L*x0 - 256L), static_cast<int64_t>(16));",
            ),
            SCALE_COPY,
            PACK,
        ),  # another row's entries
        _kernel(MAIN.replace(INNER, HALF), SCALE_COPY, PACK),  # reads entries never written
        _kernel(PACK.replace("out_ptr3 +", "out_ptr1 +"), SCALE_COPY),  # written after it is read
    ):
        fused = fuse_row_loops(hoist_row_loops(source, ALIASES))
        assert "lbuf_" not in localize_row_temps(fused, _temporary), source


def test_a_serial_kernel_comes_back_unchanged():
    source = _kernel(MAIN, SCALE_COPY, PACK).replace("#pragma omp parallel", "// serial")
    assert hoist_row_loops(source, ALIASES) == source
    assert localize_row_temps(source, _temporary) == source
