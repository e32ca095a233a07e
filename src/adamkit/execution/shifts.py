"""Masked arithmetic shifts as logical shifts (a text pass over inductor's C++).

torch has no logical right shift of int32 tensors, so the random hash of stochastic rounding
(:func:`adamkit.storage.rounding.mix32`) takes the high bits of a 32-bit word as
``(h >> k) & (2^(32-k) - 1)``: an arithmetic shift, then a mask that clears the copies of
the sign bit. Inductor writes both::

    auto tmp69 = tmp66 >> tmp68;      // tmp68: a broadcast 16
    auto tmp72 = tmp69 & tmp71;       // tmp71: a broadcast 65535

:func:`logical_shifts` writes the second line, where the shift count ``k`` and the mask are
such broadcasts of literals with mask ``== 2^(32-k) - 1``, as one logical shift of ``tmp66``
(``vpsrld``; a macro for AVX512 and AVX2, the original line kept for other instruction sets).
The compiler drops the arithmetic shift where nothing else reads it. Same bits: both clear
the top ``k`` bits and move the rest down by ``k``.
"""

from __future__ import annotations

import re

from adamkit.execution.cpp_source import broadcast_literal, definition, guarded_rewrite

_AND = re.compile(r"^(\s*)auto ((?:s?tmp)\d+) = ((?:s?tmp)\d+) & ((?:s?tmp)\d+);$")
_SHIFT = re.compile(r"^((?:s?tmp)\d+) >> ((?:s?tmp)\d+)$")

MACRO = "ADAMKIT_SRL"
"""``MACRO{n}(x, k)``: the int32 lanes of ``x`` shifted right by the literal ``k``, zeros
shifted in, for ``n`` = 1 (``Vectorized``) or 2 (``VectorizedN<..., 2>``)."""

PRELUDE = f"""#if defined(CPU_CAPABILITY_AVX512)
#define {MACRO}1(x, k) at::vec::Vectorized<int32_t>(_mm512_srli_epi32(x, k))
#elif defined(CPU_CAPABILITY_AVX2)
#define {MACRO}1(x, k) at::vec::Vectorized<int32_t>(_mm256_srli_epi32(x, k))
#endif
#if defined({MACRO}1)
#define {MACRO} 1
#define {MACRO}2(x, k) at::vec::VectorizedN<int32_t,2>({MACRO}1(x[0], k), {MACRO}1(x[1], k))
#endif"""
"""Defined before the kernel where a shift was rewritten (x86 vector ISAs only)."""


def logical_shifts(source: str) -> str:
    """``source`` with each ``(x >> k) & (2^(32-k) - 1)`` of int32 vectors written as one
    logical shift (see the module docstring)."""
    if " >> " not in source:
        return source
    return guarded_rewrite(source, MACRO, PRELUDE, _logical_shift)


def _logical_shift(lines: list[str], k: int) -> str | None:
    found = _AND.match(lines[k])
    if found is None:
        return None
    pad, name, left, right = found.groups()
    for shifted, mask in ((left, right), (right, left)):
        shift = _SHIFT.match(definition(lines, shifted, k) or "")
        if shift is None:
            continue
        count = broadcast_literal(lines, shift.group(2), k)
        bits = broadcast_literal(lines, mask, k)
        if count is None or bits is None or count[1] != bits[1]:
            continue
        if 0 < count[0] < 32 and bits[0] == (1 << (32 - count[0])) - 1:
            return f"{pad}auto {name} = {MACRO}{count[1]}({shift.group(1)}, {count[0]});"
    return None
