"""Lanes kept by a float comparison as a masked move (a text pass over inductor's C++).

Stochastic rounding adds its noise only to values below the largest finite bf16 (so that no
finite value rounds up to inf: :func:`adamkit.storage.rounding.round_stochastic`), written in
torch as ``torch.where(|x| < limit, noise, 0)``. Inductor's C++ for it, per moment::

    auto tmp50 = at::vec::VecMask<float,2>(tmp47 < tmp49);
    auto tmp81 = decltype(tmp78)::blendv(tmp80, tmp78, tmp50.template cast<int32_t,2>());

with ``tmp80`` a broadcast zero. On AVX512 the comparison gives a mask register, which the
vector classes turn into a vector of all-ones lanes (``vpmovm2d``), compare back into a mask
(``vpcmpeqd``) and blend: four instructions per 16 lanes where a comparison into a mask and a
zero-masked move are two, and the move can merge with the ``& 0xFFFF`` before it.
:func:`masked_moves` writes such a blend, where its first operand is a broadcast zero and its
mask a float ``<`` of this form, as that pair (a macro: AVX512 mask registers, or AVX2's
vector compare and an and; the original line stays for other instruction sets). Same lanes
either way: ``<`` is the ordered, quiet comparison in both (false for NaN).
"""

from __future__ import annotations

import re

from adamkit.execution.cpp_source import broadcast_literal, definition, guarded_rewrite

_BLEND = re.compile(
    r"^(\s*)auto ((?:s?tmp)\d+) = decltype\(((?:s?tmp)\d+)\)::blendv\(((?:s?tmp)\d+), \3, "
    r"((?:s?tmp)\d+)\.template cast<int32_t,([12])>\(\)\);$"
)
_LESS = re.compile(r"^at::vec::VecMask<float,([12])>\(((?:s?tmp)\d+) < ((?:s?tmp)\d+)\)$")

MACRO = "ADAMKIT_KEEP_LESS"
"""``MACRO{n}(x, a, b)``: the int32 lanes of ``x`` where ``a < b`` (floats), zero elsewhere,
for ``n`` = 1 (``Vectorized``) or 2 (``VectorizedN<..., 2>``)."""

PRELUDE = f"""#if defined(CPU_CAPABILITY_AVX512)
#define {MACRO}1(x, a, b) at::vec::Vectorized<int32_t>(_mm512_maskz_mov_epi32( \\
    _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), x))
#elif defined(CPU_CAPABILITY_AVX2)
#define {MACRO}1(x, a, b) at::vec::Vectorized<int32_t>(_mm256_and_si256( \\
    _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_LT_OQ)), x))
#endif
#if defined({MACRO}1)
#define {MACRO} 1
#define {MACRO}2(x, a, b) at::vec::VectorizedN<int32_t,2>( \\
    {MACRO}1(x[0], a[0], b[0]), {MACRO}1(x[1], a[1], b[1]))
#endif"""
"""Defined before the kernel where a blend was rewritten (x86 vector ISAs only)."""


def masked_moves(source: str) -> str:
    """``source`` with each blend of a broadcast zero and a value by a float ``<`` written
    as a masked move (see the module docstring)."""
    if "::blendv(" not in source or "at::vec::VecMask<float," not in source:
        return source
    return guarded_rewrite(source, MACRO, PRELUDE, _masked_move)


def _masked_move(lines: list[str], k: int) -> str | None:
    found = _BLEND.match(lines[k])
    if found is None:
        return None
    pad, name, value, zero, mask, width = found.groups()
    less = _LESS.match(definition(lines, mask, k) or "")
    if less is None or less.group(1) != width or broadcast_literal(lines, zero, k) != (0, width):
        return None
    return f"{pad}auto {name} = {MACRO}{width}({value}, {less.group(2)}, {less.group(3)});"
