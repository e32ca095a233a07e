"""One pass over a row instead of two: the sums of a signals kernel merged into its update loop
(a text pass over inductor's C++).

A signals kernel (``KernelSpec.signals``: the Monitor's sampled steps) takes each float slot as
rows of ``SIGNAL_ROW`` elements and, per row, first sums ``g^2``, ``m'^2`` and ``v'^2`` (the new
moments) in one inner loop, then writes the row's new param and moments in a second one. The
writes read the row's sums through a no-op select, so that inductor puts both loops under one
outer loop and the row comes from memory once (kernels.py). The first loop still loads g, m and v
again from L1 and recomputes the new moments: measured on 16.8M params in 35 tensors, 2 threads,
the signals kernel took 0.55-1.25 ms more than the plain one (7-23% of a step).

:func:`merge_sum_loops` puts the first loop's lines in front of the second loop's in one loop
and renames the first loop's loads to the pointers the second loop uses for the same buffers
(``aliases``: from the kernel's arguments). The C++ compiler then sees the same loads and the
same arithmetic twice and computes them once; what the sums add is their squares and
accumulators. Each row's sums are computed from exactly the values they were before, in the
same order, and the writes are the same, bit for bit.

It merges only this shape, all of which it checks:

- in one block: the accumulators' declarations, lines ``auto tmpN = ...;`` and the sums loop,
  then the accumulators' final lines (reductions and scalar stores of the row's sums);
- then, optionally, blocks that copy those sums elsewhere (a scalar load and a scalar store);
- then lines ``auto tmpN = ...;`` and the update loop, with the same header (innermost, literal
  bounds) and the same body shape ``{ { if(C10_LIKELY(...)) { lines } } }``;
- the sums loop stores nothing; both loops reach every buffer at one index expression (the
  vector of this iteration), with vector loads of the loop's step;
- the update loop reads the row's sums only through ``decltype(x)::blendv(x, x, mask)``
  (which is ``x``), and nothing after it in the row uses a name defined for it.

In the merged loop the sums' loads come first, before any store of the iteration, and an
iteration touches only its own elements, so they read what they read before. Anything else
comes back as inductor wrote it.
"""

from __future__ import annotations

import re

from adamkit.execution.cpp_source import (
    ANY_FOR,
    DEFINITION,
    POINTER,
    VECTOR_LOAD,
    VECTOR_STORE,
    InnermostLoop,
    block_end,
    enclosing_block,
    no_prefetch,
    parenthesised,
)

_ACC_DECL = re.compile(
    r"^\s*(?:float|double|at::vec::Vectorized<(?:float|double)>) tmp_acc\d+(?:_vec)? = "
)
_ACC_UPDATE = re.compile(r"^\s*(tmp_acc\d+_vec) = \1 \+ tmp\d+;$")
_ACC_FINAL = re.compile(r"^\s*(tmp_acc\d+) = \1 \+ at::vec::vec_reduce_all<")
_SCALAR_STORE = re.compile(
    r"^\s*((?:in_out|in|out)_ptr\d+)\[static_cast<int64_t>\([^\[\]]*\)\] = [^;]*;$"
)
_SCALAR_LOAD = re.compile(
    r"^\s*auto tmp\d+ = ((?:in_out|in|out)_ptr\d+)\[static_cast<int64_t>\([^\[\]]*\)\];$"
)
_TMP = re.compile(r"\btmp(\d+)\b")
_NOOP_BLEND = re.compile(
    r"^decltype\((tmp\d+)\)::blendv\(\1, \1, tmp\d+\.template cast<[\w, ]+>\(\)\)$"
)
_RENAMED = "stmp"  # prefix of the sums' names once merged (``\btmp\d+\b`` does not match it)


def merge_sum_loops(source: str, aliases: dict[str, str]) -> str:
    """``source`` with each qualifying sums loop merged into the update loop that follows it
    (see the module docstring). ``aliases`` maps each pointer argument of the kernel to the
    buffer it points to; without it nothing changes."""
    if not aliases or _RENAMED in source:
        return source
    lines = source.split("\n")
    out: list[str] = []
    k = 0
    while k < len(lines):
        merged = _merge_at(lines, k, aliases) if ANY_FOR.match(lines[k]) else None
        if merged is None:
            out.append(lines[k])
            k += 1
            continue
        start, end, replacement = merged  # lines[start:end] become ``replacement``
        del out[len(out) - (k - start) :]
        out.extend(replacement)
        k = end
    return "\n".join(out)


def _merge_at(lines: list[str], at: int, aliases: dict[str, str]):
    """The merge of the sums loop at line ``at`` with its update loop: (first line, end line,
    new lines), or None when the code is not of the shape the module describes."""
    sums = InnermostLoop(lines, at)
    if not sums.ok or not any(_ACC_UPDATE.match(s) for s in sums.body):
        return None
    if any(".store(" in s or _SCALAR_STORE.match(s) for s in sums.body):
        return None
    # the sums' block: declarations and definitions, the loop, the finals
    open_a = at - 1
    while open_a >= 0 and lines[open_a].strip() != "{":
        if not (_ACC_DECL.match(lines[open_a]) or DEFINITION.match(lines[open_a])):
            return None
        open_a -= 1
    close_a = block_end(lines, open_a) if open_a >= 0 else None
    if close_a is None or close_a <= sums.end:
        return None
    finals = lines[sums.end + 1 : close_a]
    if not finals or any(not (_ACC_FINAL.match(s) or _SCALAR_STORE.match(s)) for s in finals):
        return None
    written = {m.group(1) for s in finals if (m := _SCALAR_STORE.match(s))}
    # copy blocks: { { auto tmpN = p[...]; q[...] = tmpN; } }
    k = close_a + 1
    while k < len(lines) and lines[k].strip() == "{":
        end = block_end(lines, k)
        if end is None:
            return None
        inner = [s for s in lines[k + 1 : end] if s.strip() not in ("{", "}")]
        if not inner or any(not (_SCALAR_LOAD.match(s) or _SCALAR_STORE.match(s)) for s in inner):
            return None
        written |= {m.group(1) for s in inner if (m := _SCALAR_STORE.match(s))}
        k = end + 1
    copies_end = k
    # the update loop's definitions, then the update loop
    while k < len(lines) and DEFINITION.match(lines[k]):
        k += 1
    if k >= len(lines) or lines[k].strip() != sums.header:
        return None
    update = InnermostLoop(lines, k)
    if not update.ok or update.condition != sums.condition:
        return None
    setup = _noop_blends_removed(lines[copies_end:k])
    body = _noop_blends_removed(update.body)
    setup = _unused_dropped(setup, body, lines, update.end, open_a)
    if setup is None:
        return None
    if any(p in written for s in setup + body for p in POINTER.findall(s)):
        return None  # the update still reads the row's sums
    index = _one_index(sums.body + body)
    if index is None or not _loads_of_width(sums.body, index, sums.step):
        return None
    if not _stores_of_width(body, index, sums.step):
        return None
    used = {p for s in body for p in POINTER.findall(s)}
    loaded = {m.group(1) for s in body for m in VECTOR_LOAD.finditer(s)}
    rename = _renaming(sums.body + lines[open_a + 1 : at], used, loaded, aliases)
    if rename is None:
        return None
    head = [_sums_name(_pointers(s, rename)) for s in lines[open_a + 1 : at]]
    inner = [_sums_name(_pointers(no_prefetch(s), rename)) for s in sums.body]
    pad = sums.indent
    merged = [
        lines[open_a],
        *head,
        *setup,
        lines[at],
        f"{pad}{{",
        f"{pad}    {{",
        f"{pad}        {sums.condition}",
        f"{pad}        {{",
        *(f"{pad}            {s.strip()}" for s in inner),
        *(f"{pad}            {s.strip()}" for s in body),
        f"{pad}        }}",
        f"{pad}    }}",
        f"{pad}}}",
        *(_sums_name(s) for s in finals),
        lines[close_a],
        *lines[close_a + 1 : copies_end],
    ]
    return open_a, update.end + 1, merged


def _noop_blends_removed(lines: list[str]) -> list[str]:
    """``auto t = decltype(x)::blendv(x, x, m);`` -> ``auto t = x;``."""
    out = []
    for s in lines:
        found = DEFINITION.match(s)
        if found is not None and (blend := _NOOP_BLEND.match(found.group(2))) is not None:
            s = s[: len(s) - len(found.group(2)) - 1] + blend.group(1) + ";"
        out.append(s)
    return out


def _unused_dropped(
    setup: list[str], body: list[str], lines: list[str], update_end: int, open_a: int
) -> list[str] | None:
    """The setup lines that the update loop (or a line kept before it) still uses; None when
    a setup name is used after the update loop in the enclosing block (it moves into the
    sums' block)."""
    kept = list(setup)
    while True:
        used = {n for s in body for n in _TMP.findall(s)}
        used |= {n for s in kept for n in _TMP.findall(DEFINITION.match(s).group(2))}
        drop = [s for s in kept if _TMP.match(DEFINITION.match(s).group(1)).group(1) not in used]
        if not drop:
            break
        kept = [s for s in kept if s not in drop]
    names = {DEFINITION.match(s).group(1) for s in setup}
    scope = enclosing_block(lines, open_a)
    scope_end = block_end(lines, scope) if scope >= 0 else None
    if scope_end is None:
        return None
    after = " ".join(lines[update_end + 1 : scope_end])
    if any(re.search(rf"\b{n}\b", after) for n in names):
        return None
    return kept


def _one_index(body: list[str]) -> str | None:
    """The one index expression every pointer of ``body`` is reached at (None: several, or a
    pointer reached otherwise)."""
    seen = set()
    for s in body:
        for found in POINTER.finditer(s):
            rest = s[found.end() :]
            if not rest.startswith(" + static_cast<int64_t>("):
                return None
            expr = parenthesised(rest, len(" + static_cast<int64_t>"))
            if expr is None:
                return None
            seen.add(expr)
    return seen.pop() if len(seen) == 1 else None


def _loads_of_width(body: list[str], index: str, step: int) -> bool:
    """Whether every load of ``body`` is a vector load of ``step`` entries at ``index``."""
    for s in body:
        for found in POINTER.finditer(s):
            start = s[: found.start()]
            tail = f"{found.group(0)} + static_cast<int64_t>{index}"
            if start.endswith("__builtin_prefetch("):
                continue
            if not start.endswith("::loadu("):
                return False
            if not s[found.start() :].startswith(f"{tail}, static_cast<int64_t>({step}))"):
                return False
    return True


def _stores_of_width(body: list[str], index: str, step: int) -> bool:
    """Whether every store of ``body`` is a whole vector (``step`` entries) at ``index``."""
    for s in body:
        if ".store(" not in s and "] =" not in s:
            continue
        found = VECTOR_STORE.search(s)
        if found is None or found.group(2) != index or found.group(3) not in (None, str(step)):
            return False
    return True


def _renaming(
    sums: list[str], used: set[str], loaded: set[str], aliases: dict[str, str]
) -> dict[str, str] | None:
    """For each pointer of the sums' lines, the update loop's pointer to the same buffer (or
    itself); None when a pointer has no known buffer."""
    by_buffer: dict[str, str] = {}
    for p in sorted(used, key=lambda p: (p not in loaded, p)):  # a pointer it loads from first
        if p not in aliases:
            return None
        by_buffer.setdefault(aliases[p], p)
    rename = {}
    for s in sums:
        for p in POINTER.findall(s):
            if p not in aliases:
                return None
            rename[p] = by_buffer.get(aliases[p], p)
    return rename


def _pointers(line: str, rename: dict[str, str]) -> str:
    return POINTER.sub(lambda m: rename.get(m.group(0), m.group(0)), line)


def _sums_name(line: str) -> str:
    return _TMP.sub(lambda m: f"{_RENAMED}{m.group(1)}", line)
