"""Sums of squares accumulated with one fused multiply-add (a text pass over inductor's C++).

A signals kernel accumulates the squares it sums (``g^2``, ``m'^2``, ``v'^2``, ``p0^2``,
``(p1 - p0)^2``) as inductor writes any sum of a product::

    auto tmp7 = tmp3 * tmp3;
    tmp_acc2_vec = tmp_acc2_vec + tmp7;

and inductor compiles without floating-point contraction (``-ffp-contract=off``: the update's
values must not depend on whether the compiler fused a multiply and an add), so that is a
multiply and an add per vector and per sum. :func:`contract_sums` writes the accumulation as
``tmp_acc2_vec = at::vec::fmadd(tmp3, tmp3, tmp_acc2_vec);`` where the product is defined by
the line's own loop body and used nowhere else: one instruction instead of two, for five sums
of every vector of a slot. The product's line stays (the compiler drops it unused). Only the
sums change, and only in their last bits (one rounding less per term); the params and moments
the kernel writes are the same, bit for bit.
"""

from __future__ import annotations

import re

from adamkit.execution.cpp_source import ANY_FOR

_ACCUMULATE = re.compile(r"^(\s*)(tmp_acc\d+_vec) = \2 \+ ((?:s?tmp)\d+);$")
_PRODUCT = re.compile(r"^\s*auto ((?:s?tmp)\d+) = ((?:s?tmp)\d+) \* ((?:s?tmp)\d+);$")


def contract_sums(source: str) -> str:
    """``source`` with every vector accumulation of a product that its loop body defines for
    it alone written as one ``at::vec::fmadd`` (see the module docstring)."""
    lines = source.split("\n")
    products: dict[str, tuple[int, str, str]] = {}  # name -> (line, a, b), this loop body
    for k, line in enumerate(lines):
        if ANY_FOR.match(line):
            products = {}
            continue
        found = _PRODUCT.match(line)
        if found:
            products[found.group(1)] = (k, found.group(2), found.group(3))
            continue
        acc = _ACCUMULATE.match(line)
        if acc is None or acc.group(3) not in products:
            continue
        indent, total, name = acc.groups()
        defined, a, b = products[name]
        if _used_elsewhere(lines, name, defined, k):
            continue
        lines[k] = f"{indent}{total} = at::vec::fmadd({a}, {b}, {total});"
    return "\n".join(lines)


def _used_elsewhere(lines: list[str], name: str, defined: int, used: int) -> bool:
    """Whether ``name`` appears in a line other than its definition and the accumulation, up
    to the end of the enclosing loop body (names are defined once in a body)."""
    word = re.compile(rf"\b{name}\b")
    depth = 0
    for k in range(defined + 1, len(lines)):
        if k == used:
            continue
        line = lines[k]
        if word.search(line):
            return True
        depth += line.count("{") - line.count("}")
        if depth < 0:  # left the body that defines it
            return False
    return False
