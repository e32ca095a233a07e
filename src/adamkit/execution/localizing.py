"""Temporaries of one row kept on the stack (a text pass over inductor's C++).

A 4-bit step writes each row's new codes, one byte per code, into a temporary buffer of the
moment's size, and packs them into the state (two codes a byte: elements ``i`` and
``i + block / 2``) in a later loop over the rows; inductor cannot pack inside the loop that
computes the codes, since a byte takes codes from two of its vector steps. The temporary costs
4 B a param of memory traffic (a byte written and read back, for each moment) and an
allocation the size of the codes in every call, which glibc may give back to the system after
each step: measured 18k page faults a step on 50M params and a step 2x slower, depending on
what the process allocated before (docs/benchmarks.md, session 16).

:func:`localize_row_temps` removes both, in two steps over each ``#pragma omp parallel`` region:

1. A worksharing loop over rows moves up, past loops that touch none of its buffers (pointers
   compared by the buffer they point to), to right behind the nearest earlier loop with the
   same header: the pack loop then follows the main loop, and
   :func:`adamkit.execution.barriers.fuse_row_loops` runs both under one loop over the rows.
2. In a loop over rows ``x0``, a buffer that ``temporary`` names (an intermediate of the
   kernel, nothing the caller reads), that no other line of the kernel touches, and that the
   loop writes and then reads back only within the row (indices ``a * x0 + r``, ``0 <= r < a``,
   every entry read written earlier in the same iteration) becomes an ``alignas(64)`` array of
   ``a`` entries on the stack, declared at the top of the loop body.

Values are unchanged: the same operations in an order the rows' independence allows, the
temporary's entries read where they were written. A source without such loops comes back
unchanged (serial kernels too: they have no worksharing loops).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from adamkit.execution.barriers import (
    CAST,
    INT_LITERAL,
    LOOP_HEADER,
    Loop,
    floor_div,
    index_combos,
    loop_parts,
    parallel_regions,
    split_argument,
    worksharing_blocks,
)
from adamkit.execution.cpp_source import LITERAL_FOR, block_end, indent, no_prefetch

_SIGNATURE = re.compile(r"^\s*(?:const\s+)?([A-Za-z_][\w:]*)\*\s+((?:in_out|in|out)_ptr\d+)[,)]")


def hoist_row_loops(source: str, aliases: dict[str, str]) -> str:
    """``source`` with each worksharing loop over rows moved up behind the nearest earlier
    loop of the same header, past loops that share no buffer with it (step 1 above)."""
    if not aliases:  # pointers cannot be told apart from their buffers: nothing moves
        return source
    lines = source.split("\n")
    out: list[str] = []
    k = 0
    for start, end in parallel_regions(lines):
        if start < k:
            continue
        region = _hoisted_region(lines, start, end, aliases)
        if region is not None:
            out += lines[k:start] + region
            k = end
    return "\n".join(out + lines[k:]) if out else source


def _buffers(loop: Loop, aliases: dict[str, str]) -> set[str]:
    return {aliases.get(p, p) for p in loop.accesses}


def _hoisted_region(lines, start: int, end: int, aliases: dict[str, str]) -> list[str] | None:
    blocks = worksharing_blocks(lines, start, end)
    if blocks is None:
        return None
    order = list(range(len(blocks)))
    changed = False
    for j, (_, _, loop) in enumerate(blocks):
        if not _row_loop(loop):
            continue
        at = order.index(j)
        # walk back over loops that share no buffer with this one
        k = at - 1
        while k >= 0:
            first, last, other = blocks[order[k]]
            if other is None and first == last and not lines[first].strip():
                k -= 1  # an empty line
                continue
            if other is None or other.accesses is None:
                break  # a statement or an unreadable loop: nothing moves past it
            if other.header == loop.header:
                break
            if _buffers(other, aliases) & _buffers(loop, aliases):
                break
            k -= 1
        if k < 0 or blocks[order[k]][2] is None or blocks[order[k]][2].header != loop.header:
            continue
        if all(not lines[blocks[order[m]][0]].strip() for m in range(k + 1, at)):
            continue  # already behind it
        order.insert(k + 1, order.pop(at))
        changed = True
    if not changed:
        return None
    return [line for j in order for line in lines[blocks[j][0] : blocks[j][1] + 1]]


def _row_loop(loop: Loop | None) -> bool:
    if loop is None or loop.accesses is None:
        return False
    found = LOOP_HEADER.match(loop.header)
    return found is not None and found.group(4) == "1"


def localize_row_temps(source: str, temporary: Callable[[str], bool]) -> str:
    """``source`` with the row-local temporaries of its loops over rows on the stack (step 2
    above); ``temporary(pointer)`` tells whether a pointer argument names an intermediate
    buffer of the kernel."""
    lines = source.split("\n")
    types = _pointer_types(lines)
    changed = False
    for start, end in list(parallel_regions(lines)):
        blocks = worksharing_blocks(lines, start, end)
        for first, close, loop in blocks or ():
            if not _row_loop(loop):
                continue
            parts = loop_parts(lines, first, close)
            if parts is None:
                continue
            head, (body_start, body_end), _ = parts
            var = LOOP_HEADER.match(loop.header).group(1)
            outside = "\n".join(lines[:first] + lines[close + 1 :])
            for pointer in sorted(loop.accesses):
                dtype = types.get(pointer)
                if dtype is None or not temporary(pointer):
                    continue
                if re.search(rf"\b{pointer}\b", _without_signature(outside)):
                    continue
                size = _row_size(lines[body_start:body_end], pointer, var)
                if size is None:
                    continue
                name = f"lbuf_{pointer}"
                for k in range(body_start, body_end):
                    if re.search(rf"\b{pointer}\b", lines[k]):
                        lines[k] = _relocated(no_prefetch(lines[k]), pointer, name, size, var)
                pad = indent(lines[body_start - 1]) + "    "
                lines[body_start - 1] += f"\n{pad}alignas(64) {dtype} {name}[{size}];"
                changed = True
    return "\n".join(lines) if changed else source


def _pointer_types(lines: list[str]) -> dict[str, str]:
    """Element type of each pointer argument, from the kernel's parameter list."""
    types = {}
    for line in lines:
        found = _SIGNATURE.match(line)
        if found is not None:
            types[found.group(2)] = found.group(1)
        if line.strip() == "{":
            break
    return types


def _without_signature(text: str) -> str:
    return "\n".join(line for line in text.split("\n") if _SIGNATURE.match(line) is None)


def _row_size(body: list[str], pointer: str, var: str) -> int | None:
    """The row size ``a`` when every access of ``pointer`` in ``body`` (a loop over rows
    ``var``) is at ``a * var + r`` with ``0 <= r < a``, all writes come before all reads and
    every entry read was written; else None. Inner loop variables take the values of the
    loops that enclose the access (loops one after the other reuse names)."""
    scopes: list[tuple[str, list[int], int]] = []  # (name, values, closing line)
    rows: set[int] = set()
    written: set[int] = set()
    read: set[int] = set()
    reading = False
    for k, line in enumerate(body):
        scopes = [scope for scope in scopes if scope[2] >= k]
        found = LITERAL_FOR.match(line)
        if found is not None:
            name, lo, hi, step = found.groups()
            close = block_end(body, k + 1) if k + 1 < len(body) else None
            if close is None or body[k + 1].strip() != "{":
                return None
            scopes.append((name, list(range(int(lo), int(hi), int(step))), close))
            continue
        if line.strip().startswith("for"):
            return None  # an inner loop with symbolic bounds
        line = no_prefetch(line)
        inner = [(name, values) for name, values, _ in scopes]
        for hit in re.finditer(rf"\b{pointer}\b", line):
            kind, index, lanes = _access(line, hit.start(), hit.end())
            if kind is None:
                return None
            offsets = _offsets(index, var, inner, rows)
            if offsets is None:
                return None
            covered = {r + lane for r in offsets for lane in range(lanes)}
            if kind == "write":
                if reading:
                    return None  # a write after a read: not a write-then-read temporary
                written |= covered
            else:
                reading = True
                read |= covered
    if len(rows) != 1 or not written or not read or not read <= written:
        return None
    (a,) = rows
    return a if max(written) < a else None


def _access(line: str, start: int, end: int) -> tuple[str | None, str, int]:
    """(``"read"`` or ``"write"``, index, entries) of the pointer at ``line[start:end]``."""
    before, after = line[:start], line[end:]
    if after.startswith(" + " + CAST):
        index, rest = split_argument(after[3 + len(CAST) :])
        lanes = re.match(r"^, static_cast<int64_t>\((\d+)\)\)", rest)
        if before.endswith("::loadu(") and lanes is not None:
            return "read", index, int(lanes.group(1))
        if before.endswith(".store("):
            if lanes is not None:
                return "write", index, int(lanes.group(1))
    if after.startswith("[" + CAST):
        index, rest = split_argument(after[1 + len(CAST) :])
        if re.fullmatch(r"\s*auto tmp\d+ = ", before) and rest == "];":
            return "read", index, 1
        if not before.strip() and rest.startswith("] = "):
            return "write", index, 1
    return None, "", 0


def _offsets(index: str, var: str, inner, rows: set[int]) -> set[int] | None:
    """The values of ``index - a * var`` over the inner loops' values (``a`` added to
    ``rows``), when ``index`` is affine in ``var`` with ``r >= 0``; else None."""
    expr = index.replace(CAST, "(")
    expr = INT_LITERAL.sub(r"\1", expr).replace("c10::div_floor_integer", "floor_div")
    names = set(re.findall(r"\b[A-Za-z_]\w*\b", expr)) - {"floor_div"}
    if not names <= {var, *(n for n, _ in inner)}:
        return None
    try:
        code = compile(expr, "<index>", "eval")
    except SyntaxError:
        return None
    offsets = set()
    for combo in index_combos(inner):
        env = dict(zip((n for n, _ in inner), combo))
        at0 = eval(code, {"floor_div": floor_div}, {**env, var: 0})  # noqa: S307
        at1 = eval(code, {"floor_div": floor_div}, {**env, var: 1})  # noqa: S307
        if at0 < 0:
            return None
        rows.add(at1 - at0)
        offsets.add(at0)
    return offsets


def _relocated(line: str, pointer: str, name: str, size: int, var: str) -> str:
    """``line`` with the accesses of ``pointer`` made accesses of the row array ``name``."""
    out = []
    k = 0
    for found in re.finditer(rf"\b{pointer}\b", line):
        after = line[found.end() :]
        for lead in (" + " + CAST, "[" + CAST):
            if after.startswith(lead):
                index, _ = split_argument(after[len(lead) :])
                out.append(line[k : found.start()])
                out.append(f"{name}{lead}({index}) - {size}L*{var})")
                k = found.end() + len(lead) + len(index) + 1
                break
    out.append(line[k:])
    return "".join(out)
