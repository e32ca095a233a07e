"""Exact fp32 -> bf16 conversions as truncations (a text pass over inductor's C++).

Stochastic rounding to bf16 (:func:`adamkit.storage.rounding.round_stochastic`: bf16 state,
bf16 params with ``stochastic_rounding=True``) adds noise to an fp32 bit pattern, clears its
low 16 bits and converts the result to bf16. That value is a bf16 already, but inductor writes
the conversion as ATen's round-to-nearest-even one::

    auto tmp84 = at::vec::VectorizedN<int32_t,2>(tmp83);      // tmp83: -65536
    auto tmp85 = tmp82 & tmp84;
    auto tmp86 = at::vec::VectorizedN<float,2>(at::vec::cast<float>(tmp85[0]), ...);
    auto tmp87 = at::vec::convert<at::BFloat16,1,float,2>(tmp86);

about 16 vector instructions per 32 values (the rounding bias, a NaN check and blend, the
pack), for each moment of every bf16-state step. On a value whose low half is zero, rounding
changes nothing: the high halves, packed, are the conversion (a NaN's too: the low half it
drops is zero). :func:`truncate_exact_bf16` writes such a conversion, where the operand is
proven to be an int32 ``& -65536`` seen as float, as two shifts, a pack and a permute
(AVX512 or AVX2, chosen by the preprocessor where the kernel is compiled; the original line
stays for any other instruction set). Same bits either way; measured on the bf16-state step:
docs/benchmarks.md, session 20.
"""

from __future__ import annotations

import re

from adamkit.execution.cpp_source import broadcast_literal, definition, guarded_rewrite

_CONVERT = re.compile(
    r"^(\s*)auto ((?:s?tmp)\d+) = at::vec::convert<at::BFloat16,1,float,2>\(((?:s?tmp)\d+)\);$"
)
_AS_FLOAT = re.compile(
    r"^at::vec::VectorizedN<float,2>\(at::vec::cast<float>\(((?:s?tmp)\d+)\[0\]\), "
    r"at::vec::cast<float>\(\1\[1\]\)\)$"
)
_AND = re.compile(r"^((?:s?tmp)\d+) & ((?:s?tmp)\d+)$")

MACRO = "ADAMKIT_BF16_HIGH_HALVES"
"""The macro a rewritten conversion calls: the high halves of two fp32 vectors, packed."""

PRELUDE = f"""#if defined(CPU_CAPABILITY_AVX512)
#define {MACRO}(a, b) at::vec::Vectorized<at::BFloat16>(_mm512_permutexvar_epi64( \\
    _mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0), _mm512_packus_epi32( \\
    _mm512_srli_epi32(_mm512_castps_si512(a), 16), _mm512_srli_epi32(_mm512_castps_si512(b), 16))))
#elif defined(CPU_CAPABILITY_AVX2)
#define {MACRO}(a, b) at::vec::Vectorized<at::BFloat16>(_mm256_permute4x64_epi64( \\
    _mm256_packus_epi32(_mm256_srli_epi32(_mm256_castps_si256(a), 16), \\
    _mm256_srli_epi32(_mm256_castps_si256(b), 16)), 0xd8))
#endif"""
"""Defined before the kernel where a conversion was rewritten (x86 vector ISAs only)."""


def truncate_exact_bf16(source: str) -> str:
    """``source`` with each fp32 -> bf16 vector conversion of a value whose low 16 bits are
    provably zero written as a truncation (see the module docstring)."""
    if "at::vec::convert<at::BFloat16,1,float,2>" not in source:
        return source
    return guarded_rewrite(source, MACRO, PRELUDE, _truncation)


def _truncation(lines: list[str], k: int) -> str | None:
    """Line ``k`` as a truncation, when it converts a value with its low half cleared."""
    found = _CONVERT.match(lines[k])
    if found is None or not _low_half_cleared(lines, found.group(3), k):
        return None
    pad, name, operand = found.groups()
    return f"{pad}auto {name} = {MACRO}({operand}[0], {operand}[1]);"


def _low_half_cleared(lines: list[str], operand: str, at: int) -> bool:
    """Whether ``operand`` is an int32 pair ``x & broadcast(-65536)`` seen as floats."""
    as_float = definition(lines, operand, at)
    bits = _AS_FLOAT.match(as_float or "")
    if bits is None:
        return False
    masked = _AND.match(definition(lines, bits.group(1), at) or "")
    if masked is None:
        return False
    return any(broadcast_literal(lines, side, at) == (-65536, "2") for side in masked.groups())
