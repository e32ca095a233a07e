"""Shifts of byte vectors by a constant as 16-bit shifts and a mask (a text pass over
inductor's C++).

A 4-bit step packs two codes a byte (:mod:`adamkit.storage.quantized`): ``low | (high << 4)``
on ``Vectorized<uint8_t>``, which inductor writes as ``tmp1 << tmp3`` with ``tmp3`` a
broadcast of ``static_cast<uint8_t>(4)``. x86 has no 8-bit vector shift, and ATen's
``operator<<`` for bytes emulates one for any per-lane count: three byte shuffles, two
variable 16-bit shifts, two ands and an or, for each vector of codes of each moment.

For one count ``k`` for every lane, a 16-bit shift by ``k`` moves each byte's bits up as the
byte shift does, and carries the top ``k`` bits of each low byte into the bottom ``k`` bits of
the byte above; a mask of ``0xFF << k`` in every byte clears exactly those, and they are the
bits a byte shift leaves zero. :func:`constant_byte_shifts` writes such a shift (``<<`` or, with
the mask ``0xFF >> k``, ``>>`` of ``uint8_t``) as those two instructions where the count is
such a broadcast literal, ``0 < k < 8`` (AVX512 or AVX2 by the preprocessor where the kernel
is compiled; the original line stays for other instruction sets). Same bits either way.
"""

from __future__ import annotations

import re

from adamkit.execution.cpp_source import broadcast_literal, guarded_rewrite

_SHIFT = re.compile(r"^(\s*)auto ((?:s?tmp)\d+) = ((?:s?tmp)\d+) (<<|>>) ((?:s?tmp)\d+);$")
_BYTES = {"1": "at::vec::Vectorized<uint8_t>"}

MACRO = "ADAMKIT_BYTE_SHIFT"
"""The macro a rewritten shift calls: ``(value, 16-bit shift intrinsic suffix, count, mask)``."""

PRELUDE = f"""#if defined(CPU_CAPABILITY_AVX512)
#define {MACRO}(a, dir, k, mask) at::vec::Vectorized<uint8_t>(_mm512_and_si512( \\
    _mm512_##dir##_epi16(a, k), _mm512_set1_epi8(static_cast<char>(mask))))
#elif defined(CPU_CAPABILITY_AVX2)
#define {MACRO}(a, dir, k, mask) at::vec::Vectorized<uint8_t>(_mm256_and_si256( \\
    _mm256_##dir##_epi16(a, k), _mm256_set1_epi8(static_cast<char>(mask))))
#endif"""
"""Defined before the kernel where a shift was rewritten (x86 vector ISAs only)."""


def constant_byte_shifts(source: str) -> str:
    """``source`` with each shift of a ``Vectorized<uint8_t>`` by a broadcast literal count
    written as a 16-bit shift and a byte mask (see the module docstring)."""
    if "Vectorized<uint8_t>" not in source:
        return source
    return guarded_rewrite(source, MACRO, PRELUDE, _shift)


def _shift(lines: list[str], k: int) -> str | None:
    """Line ``k`` as a 16-bit shift and a mask, when it shifts bytes by a literal count."""
    found = _SHIFT.match(lines[k])
    if found is None:
        return None
    pad, name, value, op, count = found.groups()
    bits = _count(lines, count, k)
    if bits is None:
        return None
    direction, mask = ("slli", (0xFF << bits) & 0xFF) if op == "<<" else ("srli", 0xFF >> bits)
    return f"{pad}auto {name} = {MACRO}({value}, {direction}, {bits}, {mask:#04x});"


def _count(lines: list[str], name: str, at: int) -> int | None:
    """The count ``k`` (0 < k < 8) when ``name`` is a uint8 vector broadcast of a literal."""
    found = broadcast_literal(lines, name, at, _BYTES)
    return found[0] if found is not None and 0 < found[0] < 8 else None
