"""Scratch buffers kept between calls (a text pass over inductor's Python wrapper).

A signals kernel's wrapper (the Python ``call`` inductor writes around the C++ kernel) allocates,
on every call, the buffers the kernel writes its per-row and per-slot sums into: for a graph of
8 slots about 40 ``empty_strided_cpu`` calls and as many ``reinterpret_tensor`` views of them,
310 and 294 a step for 35 tensors, about 0.3 ms of Python before the first row is touched, and
as much again in the tensors' deallocation (docs/benchmarks.md, session 18). Only the output,
the ``[slots, sums]`` table, leaves the call; every other buffer is scratch: written by the
kernel, read by the kernel, dropped.

:func:`keep_scratch` rewrites the wrapper so that the scratch buffers of a call are made once
per (thread, sizes) and handed back on later calls with the same sizes::

    buf0 = empty_strided_cpu((s22, ), (1, ), torch.float32)
    buf6 = reinterpret_tensor(buf11, (1, ), (1, ), 0)  # alias

become one line, ``buf0, buf6, ... = <cache>.get(<maker>, (s22, ...))``, whose
maker (a module-level function appended to the wrapper) holds the original lines. A buffer is
scratch when it is small (at most 1-D, or rows of a few entries: row sums, their [rows, 5]
table, scalars) and neither it nor anything made of it appears in the ``return`` line; an
alias is scratch with its base. Buffers are reused only by the thread that made them (two
threads calling one kernel at once each get their own); a wrapper keeps the sizes of its last
:data:`KEEP_SIZES` calls within :data:`MAX_BYTES` in all (the row sums of a call are 20
bytes per 1024 params, 0.5% of fp32 params' bytes), and a call's buffers above that are made
per call as before. The kernel's values do not change: it writes every scratch element it
reads (each row's sums are stored before the slot's sums read them), as it did on fresh,
uninitialised memory.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

from torch import Tensor

KEEP_SIZES = 16
"""Sizes (keys) one wrapper keeps scratch buffers for; the oldest are dropped beyond that."""

MAX_BYTES = 64 << 20
"""Bytes one wrapper keeps at most, all sizes together: the oldest sizes are dropped beyond
that, and a call whose scratch alone is larger makes it per call (not kept). (The row sums of
a signals kernel take 20 bytes per 1024 params: 64 MiB holds those of 3.3G params.)"""


ROW_WIDTH = 16
"""A 2-d (or more) buffer is kept only when its rows hold at most this many entries."""


class Scratch:
    """The scratch buffers one wrapper keeps, by (thread, sizes), oldest first."""

    def __init__(self) -> None:
        self.kept: dict[tuple, tuple[tuple[Tensor, ...], int]] = {}
        self.bytes = 0

    def get(self, make: Callable[..., tuple[Tensor, ...]], sizes: tuple) -> tuple:
        """The buffers of a call with ``sizes`` on this thread: kept ones, else new."""
        key = (threading.get_ident(), *sizes)
        got = self.kept.get(key)
        if got is not None:
            return got[0]
        made = make(*sizes)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in made}
        size = sum(storages.values())
        if size <= MAX_BYTES:
            while self.kept and (len(self.kept) >= KEEP_SIZES or self.bytes + size > MAX_BYTES):
                _, dropped = self.kept.pop(next(iter(self.kept)))
                self.bytes -= dropped
            self.kept[key] = (made, size)
            self.bytes += size
        return made


_ALLOC = re.compile(r"^(\s+)(buf\d+) = empty_strided_cpu\(\((.*?)\), \((.*?)\), (torch\.\w+)\)$")
_ALIAS = re.compile(r"^(\s+)(buf\d+) = reinterpret_tensor\((buf\d+), (.*)\)  # alias$")
_ASSIGN = re.compile(r"^\s+(buf\d+) = (.*)$")
_RETURN = re.compile(r"^\s+return \(")
_SYMBOL_DEF = re.compile(r"^\s+([su]\d+) = ")
_CALL = re.compile(r"^(\s+)def call\(self, args\):$")
_BUF = re.compile(r"\bbuf\d+\b")
_NAME = re.compile(r"\b[A-Za-z_]\w*\b")
_DTYPE = re.compile(r"\btorch\.\w+")
_KNOWN = {"empty_strided_cpu", "reinterpret_tensor"}
_SIZE = re.compile(r"^[su]\d+$")


def keep_scratch(source: str) -> str:
    """``source`` (a wrapper module) with its ``call``'s scratch buffers kept between calls
    (see the module docstring); unchanged where it finds no scratch or an unexpected form."""
    lines = source.split("\n")
    start = next((k for k, line in enumerate(lines) if _CALL.match(line)), None)
    if start is None:
        return source
    body_indent = len(_CALL.match(lines[start]).group(1)) + 4
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) >= body_indent):
        end += 1
    body = range(start + 1, end)
    returns = [k for k in body if _RETURN.match(lines[k])]
    if len(returns) != 1:
        return source
    escaping = set(_BUF.findall(lines[returns[0]]))

    bases: dict[str, set[str]] = {}  # every buffer name -> the allocations it may view
    allocs: dict[str, int] = {}  # allocation (at most 1-d) -> its line
    aliases: dict[str, tuple[str, int]] = {}  # alias -> (its allocation, its line)
    symbols: dict[str, int] = {}  # size symbol -> line of its definition
    for k in body:
        line = lines[k]
        found = _SYMBOL_DEF.match(line)
        if found:
            symbols.setdefault(found.group(1), k)
            continue
        found = _ALLOC.match(line)
        if found:
            name, shape = found.group(2), found.group(3)
            bases[name] = {name}
            if _small(shape):
                allocs[name] = k
            continue
        found = _ALIAS.match(line)
        if found and len(bases.get(found.group(3), ())) == 1:
            bases[found.group(2)] = set(bases[found.group(3)])
            aliases[found.group(2)] = (next(iter(bases[found.group(3)])), k)
            continue
        found = _ASSIGN.match(line)
        if found:  # a reuse, a view, anything made of buffers: it may be any of them
            made_of = {b for n in _BUF.findall(found.group(2)) for b in bases.get(n, ())}
            bases.setdefault(found.group(1), set()).update(made_of)
    # a buffer leaves the call when it, or anything made of it, is returned
    gone = {b for name in escaping for b in bases.get(name, ())}
    kept = {name: k for name, k in allocs.items() if name not in gone}
    kept_aliases = {name: k for name, (of, k) in aliases.items() if of in kept}
    if not kept:
        return source
    chosen = sorted([*kept.values(), *kept_aliases.values()])
    first = chosen[0]
    # every size the kept lines use is defined above the first of them
    sizes: list[str] = []
    for k in chosen:
        for word in _NAME.findall(_DTYPE.sub("", lines[k].split("#")[0])):
            if word in _KNOWN or word in bases:
                continue
            if not _SIZE.match(word) or symbols.get(word, end) > first:
                return source
            if word not in sizes:
                sizes.append(word)
    names = [_target(lines[k]) for k in chosen]
    tag = len(re.findall(r"^def _adamkit_scratch_make_\d+", source, re.M))
    maker, cache = f"_adamkit_scratch_make_{tag}", f"_adamkit_scratch_cache_{tag}"
    made = [f"def {maker}({', '.join(sizes)}):"]
    made += ["    " + lines[k].strip() for k in chosen]
    made.append(f"    return ({', '.join(names)},)")
    made.append(f"{cache} = _AdamkitScratch()")
    indent = " " * body_indent
    unpack = ", ".join(names)
    key = ", ".join(sizes) + ("," if len(sizes) == 1 else "")
    lines[first] = f"{indent}{unpack}, = {cache}.get({maker}, ({key}))"
    for k in chosen[1:]:
        lines[k] = ""  # (blank: the line numbers of the wrapper's line map stay right)
    header = "from adamkit.execution.scratch import Scratch as _AdamkitScratch"
    return "\n".join([*lines, header, *made, ""])


def _small(shape: str) -> bool:
    """Whether a buffer of ``shape`` (the text of its size tuple) is small next to the params:
    at most 1-d (row sums, scalars), or rows of at most :data:`ROW_WIDTH` entries, the width a
    literal (a table of the rows' sums). Not a row of a block's codes (256 entries)."""
    dims = [d.strip() for d in shape.split(",") if d.strip()]
    if len(dims) <= 1:
        return True
    width = 1
    for d in dims[1:]:
        if not d.isdigit():
            return False
        width *= int(d)
    return width <= ROW_WIDTH


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _target(line: str) -> str:
    return line.strip().split(" = ", 1)[0]
