"""Dropping the barriers between row loops that cannot race (a text pass over inductor's C++).

Inside a kernel's ``#pragma omp parallel`` region, inductor writes each loop as a
``#pragma omp for``, and every such loop ends in a barrier: all threads wait for the slowest.
A block-wise kernel steps each tensor in several loops over the same rows (the scale pass, the
main loop, the packing of 4-bit codes), and a kernel of the 2000-tensor layout runs about a
hundred of them per call with 32 rows a thread, so the waits add up: giving every loop
``nowait`` (timing only) took an int4 step on 2000 x 64x256 from 37.6 to 32.3 ms
(docs/benchmarks.md, session 13).

:func:`drop_barriers` gives a loop ``nowait`` when no thread can reach memory that another
thread's share of the earlier loops still touches. Loops with the same header (same bounds,
step 1) and ``schedule(static)`` hand the same rows to the same threads (OpenMP guarantees
this for static schedules of equal iteration counts in one parallel region), so a later loop
may start on its rows at once if every buffer that either loop writes and both touch is
accessed row-locally: at index ``a * x0 + r`` with the same ``a`` for every access, and
``0 <= r`` and ``r + width <= a`` for every value of the inner loop variables (checked by
evaluating the index over the inner loops' literal ranges). Anything the pass cannot read
(another access form, symbolic inner bounds, code between the loops other than plain
worksharing blocks) keeps its barrier. A source without such loops comes back unchanged.

:func:`fuse_row_loops` goes one step further for adjacent loops over the same rows that are
independent in that sense, pair by pair: one loop, whose body runs the first loop's row, then
the second's, and so on. A thread then finishes a row while its data is in L1 (a block-wise
kernel's scale pass and main loop read the same gradient and codes), and a later body can use
what an earlier one computed (:mod:`adamkit.execution.sharing`,
:mod:`adamkit.execution.localizing`).

The readers of the parallel regions, their worksharing blocks and the row indices
(:func:`parallel_regions`, :func:`worksharing_blocks`, :func:`loop_parts`, :class:`Loop`,
:func:`split_argument`, :func:`index_combos`, ``LOOP_HEADER``, ``INT_LITERAL``, ``CAST``) are
shared with :mod:`adamkit.execution.localizing`.
"""

from __future__ import annotations

import itertools
import re

from adamkit.execution.cpp_source import LITERAL_FOR, POINTER, block_end, indent

_PARALLEL = re.compile(r"^\s*#pragma omp parallel\b")
_OMP_FOR = "#pragma omp for"
LOOP_HEADER = re.compile(
    r"^for\(int64_t (x\d+)=static_cast<int64_t>\((.*?)\); \1<static_cast<int64_t>\((.*?)\); "
    r"\1\+=static_cast<int64_t>\((\d+)L\)\)$"
)
CAST = "static_cast<int64_t>("


def drop_barriers(source: str) -> str:
    """``source`` with ``nowait`` (and ``schedule(static)``) on the worksharing loops whose
    barrier no later loop needs (see the module docstring)."""
    lines = source.split("\n")
    changed = {}
    for start, end in parallel_regions(lines):
        changed.update(_region(lines, start, end))
    if not changed:
        return source
    return "\n".join(changed.get(k, line) for k, line in enumerate(lines))


def parallel_regions(lines: list[str]):
    """(first line, closing line) of the body of each ``#pragma omp parallel`` block."""
    for i, line in enumerate(lines):
        if _PARALLEL.match(line) and i + 1 < len(lines) and lines[i + 1].strip() == "{":
            end = block_end(lines, i + 1)
            if end is not None:
                yield i + 2, end


def worksharing_blocks(lines: list[str], start: int, end: int) -> list[tuple] | None:
    """The region between ``start`` and ``end`` as (first line, last line, worksharing loop
    or None): one entry per top-level block, one per other line; None when a block is open."""
    items: list[tuple] = []
    k = start
    while k < end:
        if lines[k].strip() == "{":
            close = block_end(lines, k)
            if close is None or close > end:
                return None
            items.append((k, close, _worksharing(lines, k, close)))
            k = close + 1
        else:
            items.append((k, k, None))
            k += 1
    return items


class Loop:
    """One worksharing loop: its pragma line, header and accesses by pointer."""

    def __init__(self, pragma: int, header: str, accesses: dict | None):
        self.pragma = pragma
        self.header = header
        self.accesses = accesses  # pointer -> [(writes, row, width)]; None: unreadable

    def writes(self) -> set[str]:
        return {p for p, acc in self.accesses.items() if any(w for w, _, _ in acc)}


def _region(lines: list[str], start: int, end: int) -> dict[int, str]:
    """New pragma lines for the loops of the parallel region between ``start`` and ``end``."""
    blocks = worksharing_blocks(lines, start, end)
    if blocks is None:
        return {}
    items = [  # None: anything but a plain worksharing block
        loop
        for first, last, loop in blocks
        if first != last or lines[first].strip() not in ("", "int tid = omp_get_thread_num();")
    ]
    changed: dict[int, str] = {}
    pending: list[Loop] = []
    previous: Loop | None = None
    for item in items:
        if item is None or item.accesses is None:
            pending, previous = [], None
            continue
        if previous is not None and all(_independent(x, item) for x in pending):
            changed[previous.pragma] = _pragma(lines[previous.pragma], nowait=True)
            changed.setdefault(item.pragma, _pragma(lines[item.pragma], nowait=False))
            pending.append(item)
        else:
            pending = [item]
        previous = item
    return changed


def _pragma(line: str, nowait: bool) -> str:
    return indent(line) + _OMP_FOR + " schedule(static)" + (" nowait" if nowait else "")


def _worksharing(lines: list[str], open_line: int, close: int) -> Loop | None:
    """The loop of the block ``{ #pragma omp for / for(...) { body } }``, else None."""
    inner = [k for k in range(open_line + 1, close) if lines[k].strip()]
    if len(inner) < 3 or lines[inner[0]].strip() != _OMP_FOR:
        return None
    header = lines[inner[1]].strip()
    found = LOOP_HEADER.match(header)
    if found is None or lines[inner[2]].strip() != "{":
        return None
    body_close = block_end(lines, inner[2])
    if body_close is None or any(k > body_close for k in inner):
        return None
    var, _, _, step = found.groups()
    accesses = _accesses(lines[inner[2] + 1 : body_close], var)
    if accesses is not None and step != "1":
        # not a loop over rows (a vector of elements an iteration): reads and writes count,
        # rows do not
        accesses = {p: [(w, None, 0) for w, _, _ in acc] for p, acc in accesses.items()}
    return Loop(inner[0], header, accesses)


def _accesses(body: list[str], var: str) -> dict | None:
    """Pointer -> [(writes, (a, ok) row-locality, width)] of a loop over rows ``var``."""
    # the values each inner loop variable takes; loops one after the other often reuse a
    # name (x1), which then takes the union of their values (a product over the loops would
    # grow as (trips) ** (loops): 64 ** 5 for five row loops of 1024 / 16)
    values: dict[str, set[int]] = {}
    width = 1
    for line in body:
        found = LITERAL_FOR.match(line)
        if found is not None:
            name, lo, hi, step = found.groups()
            values.setdefault(name, set()).update(range(int(lo), int(hi), int(step)))
            width = max(width, int(step))
        elif line.strip().startswith("for"):
            return None  # an inner loop with symbolic bounds
    inner = [(name, sorted(taken)) for name, taken in values.items()]
    accesses: dict[str, list] = {}
    for line in body:
        for found in POINTER.finditer(line):
            kind, index = _access(line, found.start(), found.end())
            if kind is None:
                return None
            if kind == "prefetch":
                continue
            lanes = width if kind in ("vload", "vstore") else 1
            row = _row(index, var, inner)
            writes = kind in ("store", "vstore")
            accesses.setdefault(found.group(0), []).append((writes, row, lanes))
    return accesses


def _access(line: str, start: int, end: int) -> tuple[str | None, str]:
    """(kind, index expression) of the pointer named at ``line[start:end]``."""
    before, after = line[:start], line[end:]
    if after.startswith("[" + CAST):
        # only inductor's two forms: `auto tmpN = ptr[i];` and `ptr[i] = value;` (anything
        # else, an atomic add or a compound assignment, makes the loop unreadable)
        index, rest = split_argument(after[1 + len(CAST) :])
        if re.fullmatch(r"\s*auto tmp\d+ = ", before) and rest == "];":
            return "load", index
        if not before.strip() and rest.startswith("] = "):
            return "store", index
        return None, ""
    if after.startswith(" + " + CAST):
        index, _ = split_argument(after[3 + len(CAST) :])
        if before.endswith("__builtin_prefetch("):
            return "prefetch", index
        if before.endswith(".store("):
            return "vstore", index
        if before.endswith("::loadu("):
            return "vload", index
    return None, ""


def split_argument(text: str) -> tuple[str, str]:
    """The text up to the parenthesis that closes an opened one, and what follows it."""
    depth = 1
    for k, char in enumerate(text):
        depth += (char == "(") - (char == ")")
        if depth == 0:
            return text[:k], text[k + 1 :]
    return text, ""


INT_LITERAL = re.compile(r"\b(\d+)L\b")


def _row(index: str, var: str, inner: list[tuple[str, list[int]]]) -> tuple[int, int] | None:
    """``(a, largest r)`` when ``index`` is ``a * var + r(inner vars)`` with a fixed ``a > 0``
    and ``r >= 0`` for every value of the inner variables (the largest r plus the access's
    width is checked against ``a`` later); None for any other expression."""
    expr = index.replace(CAST, "(")
    expr = INT_LITERAL.sub(r"\1", expr).replace("c10::div_floor_integer", "floor_div")
    names = set(re.findall(r"\b[A-Za-z_]\w*\b", expr)) - {"floor_div"}
    if not names <= {var, *(n for n, _ in inner)}:
        return None  # a size symbol or anything else: not a fixed row
    try:
        code = compile(expr, "<index>", "eval")
    except SyntaxError:
        return None
    values = [dict(zip((n for n, _ in inner), combo)) for combo in index_combos(inner)]
    rows = set()
    low, high = None, None
    for env in values:
        at0 = eval(code, {"floor_div": floor_div}, {**env, var: 0})  # noqa: S307
        at1 = eval(code, {"floor_div": floor_div}, {**env, var: 1})  # noqa: S307
        rows.add(at1 - at0)
        low = at0 if low is None else min(low, at0)
        high = at0 if high is None else max(high, at0)
    if len(rows) != 1:
        return None
    (a,) = rows
    return (a, high) if a > 0 and low is not None and low >= 0 else None


def index_combos(inner: list[tuple[str, list[int]]]):
    if not inner:
        return [()]
    return itertools.product(*(r for _, r in inner))


def floor_div(a: int, b: int) -> int:
    return a // b


def _independent(earlier: Loop, later: Loop) -> bool:
    """Whether ``later`` may start on its rows before other threads finish ``earlier``."""
    shared = (earlier.writes() | later.writes()) & set(earlier.accesses) & set(later.accesses)
    if not shared:
        return True
    if earlier.header != later.header:
        return False
    for pointer in shared:
        row_sizes = set()
        for _, row, lanes in earlier.accesses[pointer] + later.accesses[pointer]:
            if row is None:
                return False
            a, high = row
            if high + lanes > a:
                return False
            row_sizes.add(a)
        if len(row_sizes) != 1:
            return False
    return True


FUSED_LINES = 300
"""Lines of C++ past which :func:`fuse_row_loops` starts a new fused loop at the next loop that
holds a reduction (in a block-wise kernel: the scale pass of the next tensor's rows); None: no
limit.

A chunk of equal tensors (2000 of 64x256) had all 16 tensors' loops fused into one loop over
rows, whose body was about 70 KB of machine code (int4; 49 KB for int8). That is more than the
core's 32 KB instruction cache, so the code was fetched again for every row. With one tensor's
loops per fused loop (about 330 lines for int8), paired on 2000 tensors: int8 -5.7 ms of 38
a step, int4 -8.1 of 54 (docs/benchmarks.md, session 21)."""


def fuse_row_loops(source: str) -> str:
    """``source`` with each run of adjacent worksharing loops over the same rows that
    :func:`drop_barriers` finds independent, pair by pair, made one loop whose body runs the
    first loop's row, then the second loop's, and so on (each in a block of its own: inductor
    reuses names); a run longer than :data:`FUSED_LINES` is cut where a reduction starts."""
    lines = source.split("\n")
    out: list[str] = []
    k = 0
    for start, end in parallel_regions(lines):
        if start < k:
            continue  # inside a region already fused
        region = _fused_region(lines, start, end)
        if region is not None:
            out += lines[k:start] + region
            k = end
    return "\n".join(out + lines[k:]) if out else source


def _fused_region(lines: list[str], start: int, end: int) -> list[str] | None:
    """The region's lines with its fusable pairs of loops fused; None when there are none."""
    blocks = worksharing_blocks(lines, start, end)
    if blocks is None:
        return None
    out: list[str] = []
    changed = False
    j = 0
    while j < len(blocks):
        first, close, loop = blocks[j]
        # the longest run of loops from here that are fusable pairwise
        run = [j]
        while run[-1] + 1 < len(blocks) and all(
            _fusable(blocks[m][2], blocks[run[-1] + 1][2]) for m in run
        ):
            if _starts_group(lines, blocks, run):
                break
            run.append(run[-1] + 1)
        parts = [loop_parts(lines, blocks[m][0], blocks[m][1]) for m in run]
        if len(run) > 1 and all(part is not None for part in parts):
            head, _, tail = parts[0]
            pad = indent(lines[head[-1]])
            out += [lines[x] for x in head]
            for _, body, _ in parts:
                out += [pad + "    {", *lines[body[0] : body[1]], pad + "    }"]
            out += [lines[x] for x in tail]
            changed = True
            j = run[-1] + 1
            continue
        out += lines[first : close + 1]
        j += 1
    return out if changed else None


def _starts_group(lines: list[str], blocks: list[tuple], run: list[int]) -> bool:
    """Whether the loop after ``run`` (of two loops or more) should open a fused loop of its
    own: it holds a reduction and the run with it would exceed :data:`FUSED_LINES` lines."""
    if FUSED_LINES is None or len(run) < 2:  # a tensor's scale pass and main loop stay one
        return False
    first, close, _ = blocks[run[-1] + 1]
    size = sum(blocks[m][1] - blocks[m][0] + 1 for m in run) + close - first + 1
    return size > FUSED_LINES and any("tmp_acc" in lines[k] for k in range(first, close + 1))


def _fusable(first: Loop | None, second: Loop | None) -> bool:
    if first is None or second is None or first.accesses is None or second.accesses is None:
        return False
    found = LOOP_HEADER.match(first.header)
    return first.header == second.header and found.group(4) == "1" and _independent(first, second)


def loop_parts(lines: list[str], open_line: int, close: int):
    """(head line indices, (body start, body end), tail line indices) of a worksharing block
    ``{ #pragma omp for / for(...) / { body } }``; None for another shape."""
    inner = [k for k in range(open_line + 1, close) if lines[k].strip()]
    if len(inner) < 3:
        return None
    body_close = block_end(lines, inner[2])
    if body_close is None or body_close + 1 != close:
        return None
    return (
        [open_line, inner[0], inner[1], inner[2]],
        (inner[2] + 1, body_close),
        [body_close, close],
    )
