# ruff: noqa: E501  (C++ source as inductor writes it)
"""C++ of the shape inductor writes, for the text-pass tests (merging, sharing, contraction)."""

from __future__ import annotations


def vector_loop(header: str, condition: str, body: list[str]) -> list[str]:
    """An innermost vector loop: ``header { { condition { body } } }``, indented."""
    return (
        [header, "{", "    {", f"        {condition}", "        {"]
        + [f"            {line}" for line in body]
        + ["        }", "    }", "}"]
    )


ROWS_HEADER = "for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(ks0); x0+=static_cast<int64_t>(1L))"


def row_loop(row: list[str], indent: str = "") -> str:
    """A worksharing loop over rows ``x0`` around ``row`` (its lines), every line indented by
    ``indent``."""
    lines = ["#pragma omp for", ROWS_HEADER, "{", *(f"    {line}" for line in row), "}"]
    return "\n".join(f"{indent}{line}" if line else line for line in lines)


def stripped_lines(source: str) -> list[str]:
    """``source``'s lines without their indentation."""
    return [line.strip() for line in source.split("\n")]
