"""Values a row's first loop computed, kept for its second loop (a text pass over inductor's C++).

A block-wise kernel steps a block in two loops over its elements: the scale pass decodes both
moments, updates them and takes each block's maximum; the main loop decodes and updates them
again, then writes the param and the codes. Once both loops run under one outer loop per row
(:func:`adamkit.execution.barriers.fuse_row_loops`), the second can read what the first
computed from a row buffer in L1 instead of computing it again. :func:`share_row_values`
finds, for two innermost loops with the same header inside one outer iteration, the values of
the second loop that the first computes by the same expression from the same inputs, stores
them in the first loop (``alignas(64) float`` arrays of one row) and loads them in the second.

A value is shared only when all of this holds:

- its expression, with every temporary replaced by its own expression down to loads, constants
  and names from outside both loops, is the same text in both loops, pointers compared by the
  buffer they point to (``aliases``, from the kernel's arguments);
- every load it depends on is from a buffer that nothing stores to between the two loops, or
  that the second loop stores to only after its definitions, at the index both loops read (an
  iteration's own elements);
- it is a float vector (inferred from its expression), it is not a load itself, and a line of
  the second loop that is not shared uses it (``|x|`` of a shared value is computed again);
- the loops start at 0, run at most 4096 entries (the buffers live on the stack) and load
  float vectors of the loops' step.

Anything else stays as inductor wrote it; the compiler drops what the second loop no longer
uses. The values are the same bit for bit (the same operations on the same inputs). Measured
on this project's 2-thread machine (A/B in one process, torch.optim.AdamW fused alongside):
int8 on 52M params in 33 tensors 24.7 -> 18.7 ms with the loops fused and the moments shared
(fused alone: 21.6), int4 32.3 -> 26.5 ms (inductor already ran its two loops under one), int8
on 2000 tensors of 64x256 26.9 -> 23.6 ms (docs/benchmarks.md, session 14).
"""

from __future__ import annotations

import re

from adamkit.execution.cpp_source import (
    DEFINITION,
    LITERAL_FOR,
    POINTER,
    VECTOR_LOAD,
    VECTOR_STORE,
    InnermostLoop,
    block_end,
    enclosing_block,
    indent,
    no_prefetch,
)

_TMP = re.compile(r"\btmp\d+\b")
_LOAD = "::loadu("
_FLOAT_SOURCES = (
    "at::vec::Vectorized<float>::loadu(",
    "at::vec::Vectorized<float>(",
    "at::vec::cast<float>(",
)
_SAME_TYPE = re.compile(r"^decltype\((tmp\d+)\)::blendv\(|^(tmp\d+)\.(?:abs|sqrt|neg)\(\)$")
_BINARY = re.compile(r"^(tmp\d+) [-+*/] (tmp\d+)$")
_UNARY = re.compile(r"^tmp\d+\.(?:abs|neg)\(\)$")
_STORE = re.compile(r"\.store\(((?:in_out|in|out)_ptr\d+) ")
_SCALAR_STORE = re.compile(r"^\s*((?:in_out|in|out)_ptr\d+)\[[^\]]*\] = ")


def share_row_values(source: str, aliases: dict[str, str]) -> str:
    """``source`` with the values of qualifying second loops taken from their first loops
    (see the module docstring); unchanged without ``aliases``."""
    if not aliases or "abuf" in source:
        return source
    lines = source.split("\n")
    edits: dict[int, list[str]] = {}  # line -> replacement lines
    count = 0
    for k, line in enumerate(lines):
        first = InnermostLoop(lines, k) if LITERAL_FOR.match(line) else None
        if first is None or not first.ok:
            continue
        second = _next_loop(lines, first)
        if second is None:
            continue
        shared = _shared(lines, first, second, aliases)
        if not shared:
            continue
        scope = _scope(lines, first.at, second.end)
        if scope is None or any(x in edits for x in (scope, first.at, second.at)):
            continue
        _, start, end, step = LITERAL_FOR.match(lines[first.at]).groups()
        vector = "at::vec::Vectorized<float>::loadu("
        if int(start) != 0 or int(end) > 4096:
            continue
        if not any(vector in x and f"static_cast<int64_t>({step}))" in x for x in second.body):
            continue  # no evidence that a float vector holds ``step`` entries here
        end = int(end)
        pad = indent(lines[scope]) + "    "
        decls = []
        var = LITERAL_FOR.match(lines[first.at]).group(1)
        for source_line, target_line, name_s, name_m in shared:
            buf = f"abuf{count}"
            count += 1
            decls.append(f"{pad}alignas(64) float {buf}[{end}];")
            at = f"{buf} + static_cast<int64_t>({var})"
            edits.setdefault(source_line, [lines[source_line]]).append(
                f"{indent(lines[source_line])}{name_s}.store({at});"
            )
            edits[target_line] = [
                f"{indent(lines[target_line])}auto {name_m} = "
                f"at::vec::Vectorized<float>::loadu({at}, static_cast<int64_t>({step}));"
            ]
        edits[scope] = [lines[scope], *decls]
    if not edits:
        return source
    out: list[str] = []
    for k, line in enumerate(lines):
        out.extend(edits.get(k, [line]))
    return "\n".join(out)


def _next_loop(lines: list[str], first: InnermostLoop) -> InnermostLoop | None:
    """The next innermost loop after ``first`` with the same header, when no other loop lies
    between them."""
    for k in range(first.end + 1, len(lines)):
        text = lines[k].strip()
        if text.startswith("for"):
            loop = InnermostLoop(lines, k)
            return loop if loop.ok and loop.header == first.header else None
        if text.startswith("#pragma omp"):
            return None
    return None


def _scope(lines: list[str], first: int, last: int) -> int | None:
    """The ``{`` line of the innermost block holding lines ``first`` to ``last``."""
    k = enclosing_block(lines, first)
    while k >= 0:
        close = block_end(lines, k)
        if lines[k].strip() == "{" and close is not None and close >= last:
            return k
        k = enclosing_block(lines, k)
    return None


def _definitions(lines: list[str], start: int, end: int) -> dict[str, str]:
    """name -> right-hand side of the ``auto tmpN = ...;`` lines in ``[start, end)``."""
    out = {}
    for k in range(start, end):
        found = DEFINITION.match(lines[k])
        if found is not None:
            out[found.group(1)] = found.group(2)
    return out


class _Canon:
    """Expressions with temporaries replaced, recursively, by the ids of their own."""

    def __init__(self, aliases: dict[str, str]) -> None:
        self.aliases = aliases
        self.ids: dict[str, int] = {}

    def of(self, name: str, defs: dict[str, str], memo: dict[str, int], depth: int = 0) -> int:
        if name in memo:
            return memo[name]
        rhs = defs.get(name)
        if rhs is None or depth > 200:
            text = f"@{name}"  # from outside both loops: the same variable on both sides
        else:
            rhs = no_prefetch(rhs)
            rhs = POINTER.sub(lambda m: f"${self.aliases.get(m.group(0), m.group(0))}", rhs)
            text = _TMP.sub(lambda m: f"#{self.of(m.group(0), defs, memo, depth + 1)}", rhs)
        memo[name] = self.ids.setdefault(text, len(self.ids))
        return memo[name]


def _shared(lines: list[str], first: InnermostLoop, second: InnermostLoop, aliases: dict[str, str]):
    """[(line of the value in the first loop, line of it in the second, its name in each)]."""
    body_s = range(first.at + 5, first.end - 2)
    body_m = range(second.at + 5, second.end - 2)
    var = LITERAL_FOR.match(lines[first.at]).group(1)
    # the buffers the second loop stores to, each at one index that moves with the loop
    # (an iteration's own elements): where a value loads from one, only at that index
    written: dict[str, set[str]] = {}
    for k in body_m:
        found = VECTOR_STORE.search(lines[k])
        if found is not None:
            written.setdefault(aliases.get(found.group(1), found.group(1)), set()).add(
                found.group(2)
            )
    own_index = re.compile(rf"^\({var}(?: \+ \d+L\*x\d+)?\)$")
    if any(len(at) != 1 or not own_index.match(next(iter(at))) for at in written.values()):
        return []
    # nothing the values read may be stored to between the loops; the second loop stores
    # (vectors, at the index both loops read) only after its definitions
    between = set()
    for k in range(first.at, second.at):
        for found in (_SCALAR_STORE.match(lines[k]), _STORE.search(lines[k])):
            if found is not None:
                between.add(aliases.get(found.group(1), found.group(1)))
    own = [k for k in body_m if _STORE.search(lines[k])]
    if any(_SCALAR_STORE.match(lines[k]) for k in body_m):
        return []
    if own and any(DEFINITION.match(lines[k]) for k in body_m if k > own[0]):
        return []
    scope_s = _scope(lines, first.at, first.end)
    if scope_s is None:
        return []
    defs_s = _definitions(lines, scope_s, first.end)
    defs_m = _definitions(lines, first.end + 1, second.end)
    canon = _Canon(aliases)
    memo_s: dict[str, int] = {}
    memo_m: dict[str, int] = {}
    in_s: dict[int, tuple[str, int]] = {}
    for k in body_s:
        found = DEFINITION.match(lines[k])
        if found is not None:
            in_s.setdefault(canon.of(found.group(1), defs_s, memo_s), (found.group(1), k))
    matched: dict[str, int] = {}
    for k in body_m:
        found = DEFINITION.match(lines[k])
        if found is not None and canon.of(found.group(1), defs_m, memo_m) in in_s:
            matched[found.group(1)] = k
    kept = [k for k in body_m if not (DEFINITION.match(lines[k]) and k in matched.values())]
    shared: list[str] = []
    done: set[str] = set()
    while True:
        frontier = [
            name
            for name in matched
            if name not in done
            and any(re.search(rf"\b{name}\b", no_prefetch(lines[k])) for k in kept)
        ]
        if not frontier:
            break
        for name in frontier:
            done.add(name)
            rhs = defs_m[name]
            if _UNARY.match(rhs):  # |x| or -x of a value: computed again from the shared one
                kept.append(matched[name])
            elif _LOAD not in rhs and _TMP.search(rhs) and _type(name, defs_m, {}) == "float":
                loads = _loads(name, defs_m)
                if any(aliases.get(p, p) in between for p, _ in loads):
                    return []
                if any(
                    aliases.get(p, p) in written and {at} != written[aliases.get(p, p)]
                    for p, at in loads
                ):
                    return []
                shared.append(name)
    out = []
    for name in shared:
        source_name, source_line = in_s[memo_m[name]]
        out.append((source_line, matched[name], source_name, name))
    return out


def _loads(name: str, defs: dict[str, str], seen: set[str] | None = None) -> set[tuple]:
    """(pointer, index) of every load ``name``'s expression makes, through its temporaries
    (index None for a scalar load)."""
    seen = set() if seen is None else seen
    if name in seen or name not in defs:
        return set()
    seen.add(name)
    rhs = no_prefetch(defs[name])
    out = {(found.group(1), found.group(2)) for found in VECTOR_LOAD.finditer(rhs)}
    out |= {(p, None) for p in POINTER.findall(rhs)} - {(p, None) for p, _ in out}
    for child in _TMP.findall(rhs):
        out |= _loads(child, defs, seen)
    return out


def _type(name: str, defs: dict[str, str], memo: dict[str, str | None]) -> str | None:
    """ "float" when ``name`` is a ``Vectorized<float>`` by its expression, else None."""
    if name in memo:
        return memo[name]
    memo[name] = None
    rhs = no_prefetch(defs.get(name, ""))
    kind = None
    if rhs.startswith(_FLOAT_SOURCES):
        kind = "float"
    elif (found := _SAME_TYPE.match(rhs)) is not None:
        kind = _type(found.group(1) or found.group(2), defs, memo)
    elif (found := _BINARY.match(rhs)) is not None:
        left, right = (_type(n, defs, memo) for n in found.groups())
        kind = "float" if left == right == "float" else None
    memo[name] = kind
    return kind
