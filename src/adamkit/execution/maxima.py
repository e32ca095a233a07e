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
-inf; the horizontal reduction after the loop stays a float one. Measured on the int8 step:
docs/benchmarks.md, session 16.
"""

from __future__ import annotations

import re

from adamkit.execution.cpp_source import ANY_FOR

_ABS = re.compile(r"^\s*auto ((?:s?tmp)\d+) = (?:s?tmp)\d+\.abs\(\);$")
_MAXIMUM = re.compile(r"^(\s*)(tmp_acc\d+_vec) = at::vec::maximum\(\2, ((?:s?tmp)\d+)\);$")
_NEG_INF = "(-std::numeric_limits<float>::infinity())"


def _starts_at_minus_inf(lines: list[str], accumulator: str, before: int) -> bool:
    """Whether the latest declaration of ``accumulator`` above line ``before`` is a float
    vector set to -inf."""
    declaration = f"at::vec::Vectorized<float> {accumulator} = "
    for k in range(before - 1, -1, -1):
        line = lines[k].strip()
        if line.startswith(declaration):
            return line == f"{declaration}at::vec::Vectorized<float>{_NEG_INF};"
        if f" {accumulator} = " in f" {line}" and not _MAXIMUM.match(lines[k]):
            return False  # set another way in between
    return False


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
