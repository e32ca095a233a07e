"""What adamkit's text passes read in the C++ source of inductor's CPU kernels.

The passes (:mod:`adamkit.execution.hoisting`, :mod:`~adamkit.execution.barriers`,
:mod:`~adamkit.execution.merging`, :mod:`~adamkit.execution.sharing`) rewrite the source that
inductor's C++ backend writes before it is compiled. They share the forms of that source
defined here: kernel pointers, single-assignment temporaries, loops with literal bounds, vector
loads and stores at an index, blocks, and the shape of an innermost vector loop.
"""

from __future__ import annotations

import re
from collections.abc import Callable

POINTER = re.compile(r"\b(?:in_out|in|out)_ptr\d+\b")
"""A kernel argument: ``in_ptr3``, ``out_ptr9``, ``in_out_ptr0``."""
DEFINITION = re.compile(r"^\s*auto (tmp\d+) = (.*);$")
"""``auto tmpN = rhs;`` (name, right-hand side)."""
ANY_FOR = re.compile(r"^\s*for\s*\(")
LITERAL_FOR = re.compile(
    r"^\s*for\(int64_t (x\d+)=static_cast<int64_t>\((-?\d+)L\); \1<static_cast<int64_t>"
    r"\((-?\d+)L\); \1\+=static_cast<int64_t>\((\d+)L\)\)\s*$"
)
"""A loop header with literal bounds and step (variable, start, end, step)."""
VECTOR_LOAD = re.compile(
    r"::loadu\(((?:in_out|in|out)_ptr\d+) \+ static_cast<int64_t>(\(.*?\)), "
    r"static_cast<int64_t>\((\d+)\)\)"
)
"""A vector load (pointer, parenthesised index, entries)."""
VECTOR_STORE = re.compile(
    r"\.store\(((?:in_out|in|out)_ptr\d+) \+ static_cast<int64_t>(\(.*?\))"
    r"(?:, static_cast<int64_t>\((\d+)\))?\);$"
)
"""A vector store ending a line (pointer, parenthesised index, entries or None: a whole
vector)."""
_PREFETCH = "(__builtin_prefetch("


def indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def block_end(lines: list[str], open_line: int) -> int | None:
    """Index of the line that closes the block opened at ``open_line`` (None: unclosed)."""
    depth = 0
    for k in range(open_line, len(lines)):
        depth += lines[k].count("{") - lines[k].count("}")
        if depth == 0:
            return k
    return None


def enclosing_block(lines: list[str], line: int) -> int:
    """Index of the line that opens the innermost block holding ``line`` (-1: none)."""
    depth = 0
    for k in range(line - 1, -1, -1):
        depth += lines[k].count("}") - lines[k].count("{")
        if depth < 0:
            return k
    return -1


def definition(lines: list[str], name: str, at: int) -> str | None:
    """The right-hand side of the definition of ``name`` in scope at line ``at``, if any."""
    prefix = f"auto {name} = "
    for k in range(at - 1, -1, -1):
        text = lines[k].strip()
        if not text.startswith(prefix) or not text.endswith(";"):
            continue
        opened = enclosing_block(lines, k)
        closed = block_end(lines, opened) if opened >= 0 else len(lines)
        if closed is not None and opened < at <= closed:
            return text[len(prefix) : -1]
    return None


INT32_VECTORS = {"1": "at::vec::Vectorized<int32_t>", "2": "at::vec::VectorizedN<int32_t,2>"}
"""The int32 vector classes of one and two registers, by width."""
_LITERAL = re.compile(r"^static_cast<\w+>\((-?\d+)L?\)$")
_NAME = re.compile(r"^(?:s?tmp\d+|x\d+)$")


def broadcast_of(
    lines: list[str], name: str, at: int, classes: dict[str, str] = INT32_VECTORS
) -> tuple[str, str] | None:
    """(what is broadcast, width) where ``name`` is ``CLS(what)``, ``CLS`` a vector class of
    ``classes`` (width -> class; default :data:`INT32_VECTORS`), in scope at line ``at``;
    else None."""
    rhs = definition(lines, name, at) or ""
    for width, cls in classes.items():
        if rhs.startswith(f"{cls}(") and rhs.endswith(")"):
            return rhs[len(cls) + 1 : -1], width
    return None


def broadcast_literal(
    lines: list[str], name: str, at: int, classes: dict[str, str] = INT32_VECTORS
) -> tuple[int, str] | None:
    """(value, width) where ``name`` is a vector of ``classes`` broadcast from an integer
    literal (``static_cast<T>(n)``), directly or by a name defined as one; else None."""
    found = broadcast_of(lines, name, at, classes)
    if found is None:
        return None
    inner, width = found
    if _NAME.match(inner):
        inner = definition(lines, inner, at) or ""
    literal = _LITERAL.match(inner)
    return (int(literal.group(1)), width) if literal else None


def broadcast_name(lines: list[str], name: str, width: str, at: int) -> str | None:
    """The scalar (a name) broadcast into ``name``, an int32 vector of ``width``; else None."""
    found = broadcast_of(lines, name, at)
    if found is None or found[1] != width or not _NAME.match(found[0]):
        return None
    return found[0]


def guarded_rewrite(
    source: str, macro: str, prelude: str, rewrite: Callable[[list[str], int], str | None]
) -> str:
    """``source`` with each line ``k`` for which ``rewrite(lines, k)`` gives a new line put
    behind ``#if defined(macro)`` (the old line kept under ``#else``), and ``prelude`` (which
    defines ``macro`` where it can) in front; unchanged when no line is rewritten."""
    lines = source.split("\n")
    changed = False
    for k, line in enumerate(lines):
        new = rewrite(lines, k)
        if new is None:
            continue
        lines[k] = "\n".join([f"#if defined({macro})", new, "#else", line, "#endif"])
        changed = True
    return prelude + "\n" + "\n".join(lines) if changed else source


def parenthesised(text: str, at: int) -> str | None:
    """The balanced ``(...)`` starting at ``text[at]`` (None: no such group)."""
    if at >= len(text) or text[at] != "(":
        return None
    depth = 0
    for k in range(at, len(text)):
        depth += (text[k] == "(") - (text[k] == ")")
        if depth == 0:
            return text[at : k + 1]
    return None


def no_prefetch(line: str) -> str:
    """``(__builtin_prefetch(a, 0, 3), load)`` -> ``load``."""
    while (at := line.find(_PREFETCH)) >= 0:
        group = parenthesised(line, at)
        inner = parenthesised(line, at + 1 + len("__builtin_prefetch"))
        if group is None or inner is None:
            return line
        rest = group[1 + len("__builtin_prefetch") + len(inner) :]
        if not rest.startswith(", "):
            return line
        line = line[:at] + rest[2:-1] + line[at + len(group) :]
    return line


class InnermostLoop:
    """An innermost loop ``for(...) { { if(C10_LIKELY(...)) { lines } } }`` with literal
    bounds at line ``at``; ``ok`` is False for any other shape."""

    def __init__(self, lines: list[str], at: int) -> None:
        self.at = at
        self.header = lines[at].strip()
        self.end = block_end(lines, at + 1)
        self.body: list[str] = []
        self.ok = False
        if self.end is None or LITERAL_FOR.match(lines[at]) is None:
            return
        shape = [lines[j].strip() for j in range(at + 1, at + 5)]
        tail = [lines[j].strip() for j in range(self.end - 2, self.end + 1)]
        if shape[:2] != ["{", "{"] or not shape[2].startswith("if(C10_LIKELY("):
            return
        if shape[3] != "{" or tail != ["}", "}", "}"] or self.end - 2 <= at + 5:
            return
        body = lines[at + 5 : self.end - 2]
        if any("{" in s or "}" in s or ANY_FOR.match(s) for s in body):
            return
        if any(not (DEFINITION.match(s) or s.strip().endswith(";")) for s in body):
            return
        self.condition = shape[2]
        self.indent = indent(lines[at])
        self.body = body
        self.ok = True

    @property
    def step(self) -> int:
        return int(LITERAL_FOR.match(self.header).group(4))
