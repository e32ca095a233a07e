"""A hashed element index as one add, not a multiply (a text pass over inductor's C++).

The random hash of stochastic rounding (:func:`adamkit.storage.rounding.mix32`) starts from
``(index + offset) * C`` for each element: the element's index in the tensor, the stream's
offset and an odd constant. Inductor writes it per vector of elements as::

    auto tmp55 = (at::vec::Vectorized<int32_t>(tmp54)
                  + at::vec::Vectorized<int32_t>::arange(0, 1));    // (one line)
    auto tmp56 = at::vec::Vectorized<int32_t>(tmp52);                // the offset
    auto tmp57 = tmp55 + tmp56;
    auto tmp59 = at::vec::Vectorized<int32_t>(tmp58);                // tmp58: the literal C
    auto tmp60 = tmp57 * tmp59;

(``VectorizedN<int32_t,2>`` in the bf16 kernels): a broadcast, two adds and a 32-bit multiply
(``vpmulld``, the slowest integer instruction of the loop) for every 16 lanes. Modulo 2^32,
``(s + o + i) * C == (s + o) * C + i * C`` for lane ``i``: :func:`affine_indices` writes the
product as a scalar multiply, a broadcast and one add of the lanes' ``i * C`` (a constant the
compiler keeps out of the loop), in a function for AVX512 and AVX2 (the original line kept for
other instruction sets). Same bits: the arithmetic is done in uint32, which wraps as the
vector multiply does.
"""

from __future__ import annotations

import re

from adamkit.execution.cpp_source import (
    INT32_VECTORS,
    broadcast_literal,
    broadcast_name,
    definition,
    guarded_rewrite,
)

_PRODUCT = re.compile(r"^(\s*)auto ((?:s?tmp)\d+) = ((?:s?tmp)\d+) \* ((?:s?tmp)\d+);$")
_SUM = re.compile(r"^((?:s?tmp)\d+) \+ ((?:s?tmp)\d+)$")

MACRO = "ADAMKIT_AFFINE_INDEX"
"""``MACRO{n}(s, o, c)``: the int32 lanes ``(s + o + i) * c`` modulo 2^32, ``i`` the lane,
for ``n`` = 1 (``Vectorized``) or 2 (``VectorizedN<..., 2>``, lanes continuing into the
second half)."""

_ISAS = "(defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2))"
PRELUDE = f"""#if !defined({MACRO}) && {_ISAS}
#if defined(CPU_CAPABILITY_AVX512)
static inline at::vec::Vectorized<int32_t> adamkit_affine_index(
        int32_t s, int32_t o, int32_t c, int32_t first) {{
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    uint32_t base = ((uint32_t)s + (uint32_t)o + (uint32_t)first) * (uint32_t)c;
    return _mm512_add_epi32(_mm512_set1_epi32((int32_t)base),
                            _mm512_mullo_epi32(lanes, _mm512_set1_epi32(c)));
}}
#define ADAMKIT_INDEX_LANES 16
#else
static inline at::vec::Vectorized<int32_t> adamkit_affine_index(
        int32_t s, int32_t o, int32_t c, int32_t first) {{
    const __m256i lanes = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    uint32_t base = ((uint32_t)s + (uint32_t)o + (uint32_t)first) * (uint32_t)c;
    return _mm256_add_epi32(_mm256_set1_epi32((int32_t)base),
                            _mm256_mullo_epi32(lanes, _mm256_set1_epi32(c)));
}}
#define ADAMKIT_INDEX_LANES 8
#endif
#define {MACRO} 1
#define {MACRO}1(s, o, c) adamkit_affine_index(s, o, c, 0)
#define {MACRO}2(s, o, c) at::vec::VectorizedN<int32_t,2>(adamkit_affine_index(s, o, c, 0), \\
    adamkit_affine_index(s, o, c, ADAMKIT_INDEX_LANES))
#endif"""
"""Defined before the kernel where a product was rewritten (x86 vector ISAs only; once in
a source that holds several such kernels)."""


def affine_indices(source: str) -> str:
    """``source`` with each ``(broadcast(s) + arange(0, 1) + broadcast(o)) * broadcast(C)``
    of int32 vectors written as a scalar product and one add (see the module docstring)."""
    if "::arange(0, 1)" not in source:
        return source
    return guarded_rewrite(source, MACRO, PRELUDE, _affine)


def _affine(lines: list[str], k: int) -> str | None:
    found = _PRODUCT.match(lines[k])
    if found is None:
        return None
    pad, name, left, right = found.groups()
    for summed, factor in ((left, right), (right, left)):
        total = _SUM.match(definition(lines, summed, k) or "")
        literal = broadcast_literal(lines, factor, k)
        if total is None or literal is None:
            continue
        constant, width = literal
        for ramp, offset in (total.groups(), total.groups()[::-1]):
            start = _ramp_start(lines, ramp, width, k)
            other = broadcast_name(lines, offset, width, k)
            if start is not None and other is not None:
                return f"{pad}auto {name} = {MACRO}{width}({start}, {other}, {constant});"
    return None


def _ramp_start(lines: list[str], name: str, width: str, at: int) -> str | None:
    """``s`` of ``name = (CLS(s) + CLS::arange(0, 1))``, else None."""
    cls = INT32_VECTORS[width]
    rhs = definition(lines, name, at) or ""
    ramp = re.fullmatch(
        rf"\({re.escape(cls)}\(((?:s?tmp)\d+)\) \+ {re.escape(cls)}::arange\(0, 1\)\)", rhs
    )
    return ramp.group(1) if ramp else None
