"""Block maxima of magnitudes as integer maxima of their bit patterns (a text pass over
inductor's C++).

A block-wise codec scales each block by its absmax, ``max |x|`` over the block's new moment
values, and a non-finite value must make the scale non-finite (a NaN never enters the codes
silently). Inductor accumulates that maximum as any float maximum::

    auto tmp47 = tmp46.abs();
    tmp_acc0_vec = at::vec::maximum(tmp_acc0_vec, tmp47);

and ``at::vec::maximum`` propagates NaN with a compare, a mask move and an or after the
``max``: four vector instructions per 16 values, for m and v in every block-wise step.

For values whose sign bit is clear (what ``abs`` returns, NaN included), the bit patterns read
as int32 order exactly as the floats do, and every NaN pattern (exponent all ones, mantissa
not zero) lies above +inf's. An accumulator that starts at -inf (a negative int32) therefore
ends, lane by lane, at the same maximum with one integer ``max`` per vector, and at a NaN
whenever a NaN came in (its own pattern rather than the all-ones one ``maximum`` makes; any
NaN scale decodes every code of its block to NaN). :func:`integer_maxima` writes such an
accumulation as ``at::vec::maximum`` of the ``at::vec::cast<int32_t>`` bit patterns where the
value is an ``abs`` of the same loop body and the accumulator a float vector that starts at
-inf. Measured on the int8 step: docs/benchmarks.md, session 16.

The horizontal reduction after the loop, ``vec_reduce_all`` of ``at::vec::maximum``, takes
four shuffle-and-maximum stages with the same NaN test in each (20 vector instructions on one
dependency chain, per block and moment: 7% of an int8 step, sampled). Where every
accumulation into the vector was rewritten, its lanes are such bit patterns too, so
:func:`integer_reductions` writes that reduction as an integer one (``MACRO``: two
instructions a stage, AVX512 or AVX2 by the preprocessor; the original line stays for other
instruction sets). Same maximum; a NaN stays a NaN (the largest pattern among the lanes
rather than the all-ones one). Measured: docs/benchmarks.md, session 21.
"""

from __future__ import annotations

import re

from adamkit.execution.cpp_source import ANY_FOR, guarded_rewrite

_ABS = re.compile(r"^\s*auto ((?:s?tmp)\d+) = (?:s?tmp)\d+\.abs\(\);$")
_MAXIMUM = re.compile(r"^(\s*)(tmp_acc\d+_vec) = at::vec::maximum\(\2, ((?:s?tmp)\d+)\);$")
_NEG_INF = "(-std::numeric_limits<float>::infinity())"


def _updates_since_minus_inf(lines: list[str], accumulator: str, before: int) -> list[str] | None:
    """The lines (stripped) that set ``accumulator`` between its latest declaration above line
    ``before`` and that line, when the declaration makes it a float vector of -inf; else None."""
    declaration = f"at::vec::Vectorized<float> {accumulator} = "
    updates: list[str] = []
    for k in range(before - 1, -1, -1):
        line = lines[k].strip()
        if line.startswith(declaration):
            start = f"{declaration}at::vec::Vectorized<float>{_NEG_INF};"
            return updates if line == start else None
        if f" {accumulator} = " in f" {line}":
            updates.append(line)
    return None


def _starts_at_minus_inf(lines: list[str], accumulator: str, before: int) -> bool:
    """Whether ``accumulator`` starts as a float vector of -inf above line ``before`` and is set
    in between only by vector maxima."""
    updates = _updates_since_minus_inf(lines, accumulator, before)
    return updates is not None and all(_MAXIMUM.match(line) for line in updates)


def integer_maxima(source: str) -> str:
    """``source`` with every vector maximum of an ``abs`` that its loop body defines, into a
    float accumulator that starts at -inf, taken over the int32 bit patterns (see the module
    docstring)."""
    lines = source.split("\n")
    found: list[tuple[int, str, str, str]] = []  # (line, indent, accumulator, value)
    magnitudes: set[str] = set()  # names defined by .abs() in this loop body
    for k, line in enumerate(lines):
        if ANY_FOR.match(line):
            magnitudes = set()
            continue
        defined = _ABS.match(line)
        if defined:
            magnitudes.add(defined.group(1))
            continue
        acc = _MAXIMUM.match(line)
        if acc and acc.group(3) in magnitudes and _starts_at_minus_inf(lines, acc.group(2), k):
            found.append((k, *acc.groups()))
    for k, indent, total, value in found:  # rewritten after the scan: it reads the originals
        lines[k] = (
            f"{indent}{total} = at::vec::cast<float>(at::vec::maximum("
            f"at::vec::cast<int32_t>({total}), at::vec::cast<int32_t>({value})));"
        )
    return "\n".join(lines)


_REDUCE = re.compile(
    r"^(\s*)(tmp_acc\d+) = max_propagate_nan\(\2, at::vec::vec_reduce_all<float, 1>\("
    r"\[\]\(at::vec::Vectorized<float>& x, at::vec::Vectorized<float>& y\) "
    r"\{ return at::vec::maximum\(x, y\); \}, (\2_vec)\)\);$"
)

MACRO = "ADAMKIT_MAX_OF_BITS"
"""The macro a rewritten reduction calls: the float whose bit pattern is the largest int32
lane of a float vector's bit patterns."""

PRELUDE = f"""#if defined(CPU_CAPABILITY_AVX512)
#define {MACRO}(v) _mm_cvtss_f32(_mm_castsi128_ps(_mm_cvtsi32_si128( \\
    _mm512_reduce_max_epi32(at::vec::cast<int32_t>(v)))))
#elif defined(CPU_CAPABILITY_AVX2)
#define {MACRO}(v) ([](__m256i x) {{ \\
    __m128i m = _mm_max_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1)); \\
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4e)); \\
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xb1)); \\
    return _mm_cvtss_f32(_mm_castsi128_ps(m)); }}(at::vec::cast<int32_t>(v)))
#endif"""
"""Defined before the kernel where a reduction was rewritten (x86 vector ISAs only)."""


def integer_reductions(source: str) -> str:
    """``source`` (after :func:`integer_maxima`) with the horizontal float maximum of each
    accumulator that only ever took integer maxima of bit patterns written as an integer one
    (see the module docstring)."""
    if "at::vec::cast<int32_t>(tmp_acc" not in source:
        return source
    return guarded_rewrite(source, MACRO, PRELUDE, _integer_reduction)


def _integer_reduction(lines: list[str], k: int) -> str | None:
    found = _REDUCE.match(lines[k])
    if found is None or not _only_integer_maxima(lines, found.group(3), k):
        return None
    pad, total, vector = found.groups()
    return f"{pad}{total} = max_propagate_nan({total}, {MACRO}({vector}));"


def _only_integer_maxima(lines: list[str], accumulator: str, before: int) -> bool:
    """Whether, back to its -inf declaration, ``accumulator`` is set at least once and only
    by integer maxima of bit patterns (the form :func:`integer_maxima` writes)."""
    integer = f"{accumulator} = at::vec::cast<float>(at::vec::maximum(at::vec::cast<int32_t>("
    updates = _updates_since_minus_inf(lines, accumulator, before)
    return bool(updates) and all(line.startswith(integer) for line in updates)
