"""Loop-invariant code motion on the C++ source of inductor's CPU kernels (a text pass).

Inductor writes the body of an innermost vector loop as a list of single-assignment lines
(``auto tmpN = ...;``) and loads a per-row scalar (a block's scale, a hyperparameter from the
step's table) in every iteration: ``auto tmp28 = out_ptr8[static_cast<int64_t>(x0)];``. The
C++ compiler cannot lift those loads out of the loop, since the loop stores codes through
``uint8_t`` pointers, which may alias anything. So every 16 elements it loaded about ten
scalars again, broadcast them to vectors, and recomputed what depends on them only (two
scalar divisions ``1 / absmax`` among them). :func:`hoist_invariants` moves those lines in
front of the loop, where the compiler computes them once per row. Measured on int8 slots of
4.2M elements, 2 threads: 162 -> 117 instructions per 16 elements in the main loop, 0.51-0.58
-> 0.45-0.50 ms per million params (docs/benchmarks.md, session 13); the flat loops of the
bf16-state kernel, 146 -> 118 instructions per 32 elements (session 23).

A line moves only when all of this holds, so that the moved code runs exactly what the first
iteration ran, on the same values:

- its loop is innermost and has literal bounds and step, with at least one full step (it runs,
  and its first iteration takes the main, non-tail branch); or it runs from 0 to a size
  argument of the kernel (``ks0``: the flat loops of the float-state kernels, which may run no
  iteration, or only the tail branch), and then a load moves only from a literal index (an
  entry of the step's table, which the kernel is always given), so that what runs in front of
  the loop reads nothing the loop would not have been allowed to read;
- the line sits in the loop body itself or in its ``if(C10_LIKELY(...))`` branch, not inside
  a tail branch, another condition or a lambda;
- its right-hand side names no loop variable of this loop and no name assigned in the loop,
  other than lines already moved; loads are allowed only as ``ptr[static_cast<int64_t>(i)]``
  from a kernel argument that the loop body does not otherwise mention (so never stores to).

Anything else stays as inductor wrote it; a source without such loops comes back unchanged.
"""

from __future__ import annotations

import re

from adamkit.execution.cpp_source import (
    ANY_FOR,
    DEFINITION,
    LITERAL_FOR,
    POINTER,
    block_end,
    enclosing_block,
    indent,
)

_ASSIGNED = re.compile(r"^\s*(?:[\w:<>,]+\s+)?(\w+)\s*=[^=]")
_SCALAR_LOAD = re.compile(r"^((?:in_out|in|out)_ptr\d+)\[static_cast<int64_t>\(([^\[\]]*)\)\]$")
_IDENTIFIER = re.compile(r"\b[A-Za-z_]\w*\b")
_LITERAL_INDEX = re.compile(r"^\d+L?$")
_SIZED_FOR = re.compile(
    r"^\s*for\(int64_t (x\d+)=static_cast<int64_t>\((0)L\); \1<static_cast<int64_t>"
    r"\((ks\d+)\); \1\+=static_cast<int64_t>\((\d+)L\)\)\s*$"
)
"""A loop from 0 to a size argument of the kernel (``ks0``): it may run no iteration."""
_TMP = re.compile(r"\btmp\d+\b")


def hoist_invariants(source: str, sized: bool = True) -> str:
    """``source`` with the loop-invariant lines of its qualifying loops moved in front of
    them (see the module docstring); ``sized``: loops over a kernel size (``ks0``) too."""
    lines = source.split("\n")
    inserts: dict[int, list[str]] = {}
    moved: set[int] = set()
    declared: dict[int, set[str]] = {}  # names declared in a block (by its opening line)
    for i, line in enumerate(lines):
        found = LITERAL_FOR.match(line) or (_SIZED_FOR.match(line) if sized else None)
        if found is None or i + 1 >= len(lines) or lines[i + 1].strip() != "{":
            continue
        var, start, end, step = found.groups()
        pad = indent(line)
        sized = not end.lstrip("-").isdigit()  # a bound of the kernel's sizes (ks0): may not run
        if not sized and int(end) - int(start) < int(step):
            continue
        close = block_end(lines, i + 1)
        if close is None:
            continue
        body = range(i + 2, close)
        if any(ANY_FOR.match(lines[k]) for k in body):
            continue  # not innermost
        scope = enclosing_block(lines, i)
        if scope not in declared:
            declared[scope] = _declared_in(lines, scope)
        take = _invariant_lines(lines, body, var, declared[scope], literal_loads=sized)
        if not take:
            continue
        at = i
        while at > 0 and lines[at - 1].strip().startswith("#pragma"):
            at -= 1
        inserts.setdefault(at, []).extend(pad + lines[k].strip() for k in take)
        moved.update(take)
        # (sibling loops of one block may reuse names: inductor numbers each fused kernel's
        # temporaries from tmp0, so a name moved here is taken for the rest of the block)
        declared[scope].update(DEFINITION.match(lines[k]).group(1) for k in take)
    if not inserts:
        return source
    out: list[str] = []
    for k, line in enumerate(lines):
        out.extend(inserts.get(k, ()))
        if k not in moved:
            out.append(line)
    return "\n".join(out)


def _declared_in(lines: list[str], scope: int) -> set[str]:
    """``tmp`` names declared directly in the block opened at line ``scope``."""
    names: set[str] = set()
    depth = 0
    for k in range(scope + 1, len(lines)):
        if depth == 0 and (found := DEFINITION.match(lines[k])) is not None:
            names.add(found.group(1))
        depth += lines[k].count("{") - lines[k].count("}")
        if depth < 0:
            break
    return names


def _invariant_lines(
    lines: list[str], body: range, var: str, taken: set[str], literal_loads: bool = False
) -> list[int]:
    """Indices of the lines of ``body`` (a loop over ``var``) that may move in front of it,
    none declaring a name of ``taken`` (names the enclosing block already declares); with
    ``literal_loads``, loads only at a literal index (a loop that may not run)."""
    own_var = re.compile(rf"\b{var}(?!\d)")
    assigned = {m.group(1) for k in body if (m := _ASSIGNED.match(lines[k]))}
    # pointers named anywhere but on a line that only loads a scalar from them (stores, vector
    # loads, anything else): their scalars may change within the loop
    other_uses = {
        name for k in body if not _is_scalar_load(lines[k]) for name in POINTER.findall(lines[k])
    }
    invariant: set[str] = set()
    take: list[int] = []
    for k in _main_path(lines, body):
        found = DEFINITION.match(lines[k])
        if found is None:
            continue
        name, rhs = found.groups()
        if name in taken or own_var.search(rhs) or not _balanced(rhs):
            continue
        load = _SCALAR_LOAD.match(rhs)
        if load is not None:
            pointer, rest = load.groups()
            if pointer in other_uses:
                continue  # the loop stores through it (or reads it otherwise)
            if literal_loads and not _LITERAL_INDEX.match(rest):
                continue
        elif POINTER.search(rhs) or "[" in rhs:
            continue
        else:
            rest = rhs
        names = set(_IDENTIFIER.findall(rest)) & assigned
        if not names <= invariant or not set(_TMP.findall(rest)) <= invariant:
            continue
        invariant.add(name)
        take.append(k)
    return take


def _is_scalar_load(line: str) -> bool:
    """Whether ``line`` is ``auto tmpN = ptr[static_cast<int64_t>(i)];``."""
    found = DEFINITION.match(line)
    return found is not None and _SCALAR_LOAD.match(found.group(2)) is not None


def _main_path(lines: list[str], body: range) -> list[int]:
    """Lines of ``body`` outside any block but plain ones and ``if(C10_LIKELY(...))``."""
    path: list[int] = []
    stack: list[bool] = []  # per open block: whether lines in it are on the main path
    previous = ""
    for k in body:
        text = lines[k].strip()
        opened, closed = text.count("{"), text.count("}")
        if text == "{":
            plain = previous in ("", "{", "}") or previous.endswith(";")
            likely = previous.startswith("if(C10_LIKELY(")
            stack.append(plain or likely)
        elif text == "}":
            if stack:
                stack.pop()
        elif opened or closed:
            # a lambda or a block on one line: never on the main path, nor what it opens
            stack.extend(False for _ in range(opened - closed))
            del stack[len(stack) - max(0, closed - opened) :]
        elif all(stack):
            path.append(k)
        previous = text
    return path


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += (char == "(") - (char == ")")
        if depth < 0:
            return False
    return depth == 0
