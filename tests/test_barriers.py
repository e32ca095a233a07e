# ruff: noqa: E501  (C++ source as inductor writes it)
"""The barrier pass over inductor's C++ source (adamkit.execution.barriers)."""

from __future__ import annotations

import textwrap

from adamkit.execution.barriers import drop_barriers, fuse_row_loops

ROWS = "for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(ks0); x0+=static_cast<int64_t>(1L))"
INNER = "for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(256L); x1+=static_cast<int64_t>(16L))"
COPY = "for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(ks0); x0+=static_cast<int64_t>(16L))"


def _loop(header: str, *body: str) -> str:
    inner = "\n".join("        " + line for line in body)
    return f"    {{\n        #pragma omp for\n        {header}\n        {{\n{inner}\n        }}\n    }}"


def _kernel(*loops: str) -> str:
    region = "\n".join(loops)
    return textwrap.dedent(
        f"""\
        extern "C" void kernel(const float* in_ptr0, float* out_ptr0, float* out_ptr1)
        {{
            #pragma omp parallel
            {{
                int tid = omp_get_thread_num();
        {region}
            }}
        }}"""
    )


SCALES = _loop(  # a reduction per row: writes the row's scale
    ROWS,
    "float tmp_acc0 = 0;",
    INNER,
    "{",
    "    auto tmp0 = at::vec::Vectorized<float>::loadu(in_ptr0 + static_cast<int64_t>(x1 + 256L*x0), static_cast<int64_t>(16));",
    "}",
    "out_ptr0[static_cast<int64_t>(x0)] = static_cast<float>(tmp_acc0);",
)
MAIN = _loop(  # reads the row's scale, writes the row
    ROWS,
    INNER,
    "{",
    "    auto tmp0 = out_ptr0[static_cast<int64_t>(x0)];",
    "    auto tmp1 = at::vec::Vectorized<float>::loadu(in_ptr0 + static_cast<int64_t>(x1 + 256L*x0), static_cast<int64_t>(16));",
    "    tmp1.store(out_ptr1 + static_cast<int64_t>(x1 + 256L*x0));",
    "}",
)
SCALE_COPY = _loop(  # another iteration space: 16 scales an iteration
    COPY,
    "auto tmp0 = at::vec::Vectorized<float>::loadu(out_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(16));",
    "tmp0.store(out_ptr2 + static_cast<int64_t>(x0));",
)
PACK = _loop(  # reads half rows of the main loop's output, writes rows of 128
    ROWS,
    "for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(128L); x1+=static_cast<int64_t>(16L))",
    "{",
    "    auto tmp0 = at::vec::Vectorized<float>::loadu(out_ptr1 + static_cast<int64_t>(128L + x1 + 256L*x0), static_cast<int64_t>(16));",
    "    tmp0.store(out_ptr3 + static_cast<int64_t>(x1 + 128L*x0));",
    "}",
)


def _pragmas(source: str) -> list[str]:
    return [
        line.strip() for line in source.split("\n") if line.strip().startswith("#pragma omp for")
    ]


def test_row_local_loops_drop_their_barriers_and_the_copy_keeps_its_one():
    out = drop_barriers(_kernel(SCALES, MAIN, SCALE_COPY, PACK))
    assert _pragmas(out) == [
        "#pragma omp for schedule(static) nowait",  # the main loop reads only its own rows' scales
        "#pragma omp for schedule(static)",  # the copy overwrites scales of every row: wait
        "#pragma omp for schedule(static) nowait",  # the pack touches nothing the copy does
        "#pragma omp for schedule(static)",
    ]


def test_a_read_of_another_row_keeps_the_barrier():
    neighbour = MAIN.replace(
        "out_ptr0[static_cast<int64_t>(x0)]", "out_ptr0[static_cast<int64_t>(1L + x0)]"
    )
    assert _pragmas(drop_barriers(_kernel(SCALES, neighbour))) == ["#pragma omp for"] * 2
    # rows of 128 written 256 wide: each row's writes reach into the next row
    overlapping = _loop(
        ROWS,
        INNER,
        "{",
        "    auto tmp0 = at::vec::Vectorized<float>::loadu(in_ptr0 + static_cast<int64_t>(x1 + 256L*x0), static_cast<int64_t>(16));",
        "    tmp0.store(out_ptr1 + static_cast<int64_t>(x1 + 128L*x0));",
        "}",
    )
    reader = MAIN.replace(
        "out_ptr1 + static_cast<int64_t>(x1 + 256L*x0)",
        "out_ptr4 + static_cast<int64_t>(x1 + 256L*x0)",
    )
    reader = reader.replace(
        "loadu(in_ptr0 + static_cast<int64_t>(x1 + 256L*x0)",
        "loadu(out_ptr1 + static_cast<int64_t>(x1 + 128L*x0)",
    )
    assert _pragmas(drop_barriers(_kernel(overlapping, reader)))[0] == "#pragma omp for"
    # the same loops with rows of 256: row-local
    local = overlapping.replace("x1 + 128L*x0", "x1 + 256L*x0")
    reader256 = reader.replace("x1 + 128L*x0", "x1 + 256L*x0")
    assert _pragmas(drop_barriers(_kernel(local, reader256)))[0].endswith("nowait")


def test_loops_of_other_sizes_or_other_code_between_keep_their_barriers():
    other_rows = MAIN.replace("static_cast<int64_t>(ks0)", "static_cast<int64_t>(ks1)")
    assert _pragmas(drop_barriers(_kernel(SCALES, other_rows))) == ["#pragma omp for"] * 2
    statement = "    float shared = out_ptr0[0];"
    assert _pragmas(drop_barriers(_kernel(SCALES, statement, MAIN))) == ["#pragma omp for"] * 2
    unknown = MAIN.replace("tmp1.store(out_ptr1 + ", "at::vec::transpose_mxn(out_ptr0 + ")
    assert _pragmas(drop_barriers(_kernel(SCALES, unknown))) == ["#pragma omp for"] * 2
    atomic = MAIN.replace(
        "tmp1.store(out_ptr1 + static_cast<int64_t>(x1 + 256L*x0));",
        "atomic_add(&out_ptr0[static_cast<int64_t>(x0)], 1.0f);",
    )
    assert _pragmas(drop_barriers(_kernel(SCALES, atomic))) == ["#pragma omp for"] * 2


def test_loops_over_disjoint_buffers_drop_the_barrier_between_them():
    # both read the step's scalars (in_ptr0); neither writes what the other touches
    first = SCALE_COPY.replace(
        "auto tmp0 = ", "auto tmp9 = in_ptr0[static_cast<int64_t>(0L)];\n        auto tmp0 = "
    )
    second = first.replace("out_ptr0", "out_ptr4").replace("out_ptr2", "out_ptr5")
    assert _pragmas(drop_barriers(_kernel(first, second)))[0].endswith("nowait")
    same_output = first.replace("out_ptr0", "out_ptr4")  # both write out_ptr2
    assert _pragmas(drop_barriers(_kernel(first, same_output)))[0] == "#pragma omp for"


def test_a_source_without_a_parallel_region_comes_back_unchanged():
    source = _kernel(SCALES, MAIN).replace("#pragma omp parallel", "// serial")
    assert drop_barriers(source) == source


def _bodies(source: str) -> list[list[str]]:
    """The lines of each worksharing loop's body, stripped."""
    lines = [line.strip() for line in source.split("\n")]
    out = []
    for k, line in enumerate(lines):
        if line.startswith("#pragma omp for"):
            depth, body = 0, []
            for text in lines[k + 2 :]:
                depth += text.count("{") - text.count("}")
                body.append(text)
                if depth == 0:
                    break
            out.append(body[1:-1])
    return out


def test_independent_row_loops_fuse_into_one_in_their_order():
    out = fuse_row_loops(_kernel(SCALES, MAIN, SCALE_COPY))
    assert _pragmas(out) == ["#pragma omp for"] * 2  # the scale pass with the main loop; the copy
    fused, copy = _bodies(out)
    scales, main = _bodies(_kernel(SCALES, MAIN))
    # one row: the scale pass's body, then the main loop's, each in a block of its own
    assert fused == ["{", *scales, "}", "{", *main, "}"]
    assert copy == _bodies(_kernel(SCALE_COPY))[0]
    # and then the barrier pass still sees the fused loop (the copy needs every row's scale)
    assert _pragmas(drop_barriers(out)) == ["#pragma omp for"] * 2


def test_loops_that_are_not_row_local_or_not_alike_stay_apart():
    neighbour = MAIN.replace(
        "out_ptr0[static_cast<int64_t>(x0)]", "out_ptr0[static_cast<int64_t>(1L + x0)]"
    )
    other_rows = MAIN.replace("static_cast<int64_t>(ks0)", "static_cast<int64_t>(ks1)")
    statement = "    float shared = out_ptr0[0];"
    for source in (
        _kernel(SCALES, neighbour),  # reads the next row's scale: all of them must be written
        _kernel(SCALES, other_rows),  # another row count
        _kernel(SCALES, statement, MAIN),  # code between the loops
        _kernel(SCALE_COPY, SCALE_COPY.replace("out_ptr2", "out_ptr5")),  # 16 rows a step
        _kernel(SCALES, MAIN).replace("#pragma omp parallel", "// serial"),
    ):
        assert fuse_row_loops(source) == source


def _other_tensor(loop: str) -> str:
    """``loop`` over another tensor's rows (other buffers, the same row count)."""
    for old, new in (("in_ptr0", "in_ptr4"), ("out_ptr0", "out_ptr4"), ("out_ptr1", "out_ptr5")):
        loop = loop.replace(old, new)
    return loop


def test_a_long_run_is_cut_before_the_next_tensors_scale_pass(monkeypatch):
    """Past FUSED_LINES lines a run of fusable loops starts a new fused loop at the next loop
    that holds a reduction (the next tensor's scale pass), never between a tensor's scale pass
    and its main loop; without a limit the four loops fuse into one."""
    from adamkit.execution import barriers

    source = _kernel(SCALES, MAIN, _other_tensor(SCALES), _other_tensor(MAIN))
    first, second = (
        _bodies(_kernel(SCALES, MAIN)),
        _bodies(_kernel(_other_tensor(SCALES), _other_tensor(MAIN))),
    )
    monkeypatch.setattr(barriers, "FUSED_LINES", None)
    assert _bodies(fuse_row_loops(source)) == [
        ["{", *first[0], "}", "{", *first[1], "}", "{", *second[0], "}", "{", *second[1], "}"]
    ]
    for limit in (1, 20):  # the loops are 9 to 10 lines: each tensor alone past 20
        monkeypatch.setattr(barriers, "FUSED_LINES", limit)
        out = fuse_row_loops(source)
        assert _bodies(out) == [
            ["{", *first[0], "}", "{", *first[1], "}"],
            ["{", *second[0], "}", "{", *second[1], "}"],
        ]
        # the two fused loops share no buffer: the first needs no barrier after it
        assert "nowait" in _pragmas(drop_barriers(out))[0]
    monkeypatch.setattr(barriers, "FUSED_LINES", 1000)
    assert len(_bodies(fuse_row_loops(source))) == 1
