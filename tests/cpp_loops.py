"""C++ of the shape inductor writes, for the text-pass tests (merging, sharing)."""

from __future__ import annotations


def vector_loop(header: str, condition: str, body: list[str]) -> list[str]:
    """An innermost vector loop: ``header { { condition { body } } }``, indented."""
    return (
        [header, "{", "    {", f"        {condition}", "        {"]
        + [f"            {line}" for line in body]
        + ["        }", "    }", "}"]
    )
