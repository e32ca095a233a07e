"""The rows of ``adamkit bench``: a measured :class:`Result`, its ratios, and the table.

Ratios are speeds relative to a reference row of the same layout (>1: faster): torch's fused
and foreach AdamW for every row, and for adamkit's int8/int4 rows the low-bit anchors of as
many bits (:mod:`adamkit.bench.anchors`) that ran and quantised every tensor (an anchor that
kept tensors in fp32 is not a low-bit reference).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from adamkit.bench import anchors


@dataclass
class Result:
    """One candidate on one layout: step times (s), first step, compiles, and its state."""

    candidate: str
    layout: str
    numel: int
    tensors: int
    step_s: list[float] = field(default_factory=list)
    first_step_s: float = 0.0
    compiles: int = 0
    compile_s: float = 0.0
    graphs: int = 0
    switched_at: int | None = None
    note: str = ""
    label: str = ""  # the row's name; the candidate key if empty
    state: str = "float32"  # the requested state format
    formats: dict[str, int] = field(default_factory=dict)  # tensors per actual state format
    state_bytes_per_param: float | None = None
    skipped: str = ""  # why an optional anchor did not run (then no timings)

    @property
    def quantised(self) -> str:
        """``"33/33"``: tensors stored in the requested format, of all tensors."""
        return f"{self.formats.get(self.state, 0)}/{self.tensors}"

    @property
    def name(self) -> str:
        """The row's name: the anchor's label, or the candidate without its state dtype."""
        return self.label or self.candidate.split(":")[0]

    @property
    def fully_quantised(self) -> bool:
        return self.formats.get(self.state, 0) == self.tensors

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s) if self.step_s else float("nan")

    @property
    def gparams(self) -> float:
        return self.numel / self.median_s / 1e9


def ratios(result: Result, results: list[Result]) -> dict[str, float]:
    """The speed of ``result`` relative to torch fused and foreach, and (int8/int4 rows) to
    each low-bit anchor of as many bits that ran: >1 means ``result`` is faster."""
    refs = ["torch-fused", "torch-foreach"]
    bits = anchors.LOW_BIT.get(result.state) if result.candidate.startswith("adamkit-") else None
    refs += [name for name, a in anchors.ANCHORS.items() if bits and a.bits == bits]
    out = {}
    for name in refs:
        ref = next((r for r in results if r.candidate == name and r.step_s), None)
        if ref is not None and name in anchors.ANCHORS and not ref.fully_quantised:
            ref = None
        if ref is not None and result.step_s:
            out[name] = ref.median_s / result.median_s
    return out


def table_rows(results: list[Result]) -> list[list[str]]:
    """One row per candidate that ran (skipped anchors are in :func:`skip_notes`)."""
    rows = []
    for r in results:
        if r.skipped:
            continue
        ratio = ratios(r, results)
        low_bit = next(
            (
                f"{v:.2f}x {anchors.ANCHORS[k].short}"
                for k, v in ratio.items()
                if k in anchors.ANCHORS
            ),
            "-",
        )
        if r.compiles:
            compiles = f"{r.compiles} ({r.compile_s:.1f} s)"
        else:
            compiles = f"{r.graphs} graphs" if r.graphs else "0"
        rows.append(
            [
                r.layout,
                r.name,
                f"{r.state} {r.quantised}",
                f"{r.state_bytes_per_param:.2f}",
                f"{r.gparams:.3f}",
                f"{ratio['torch-fused']:.2f}x" if "torch-fused" in ratio else "-",
                f"{ratio['torch-foreach']:.2f}x" if "torch-foreach" in ratio else "-",
                low_bit,
                f"{r.median_s * 1e3:.1f}",
                f"{r.first_step_s:.2f}",
                compiles,
                r.note,
            ]
        )
    return rows


def skip_notes(results: list[Result]) -> list[str]:
    """A line for each anchor that did not run, with the reason."""
    return [f"note: {r.layout}: {r.name} skipped, {r.skipped}" for r in results if r.skipped]


def format_notes(results: list[Result]) -> list[str]:
    """Whether each row's state is stored in the format it asked for: one line for all the
    adamkit rows that are, one per row that is not (with the formats it got)."""
    lines = []
    for r in results:
        if not r.skipped and not r.fully_quantised:
            got = ", ".join(f"{n} {fmt}" for fmt, n in sorted(r.formats.items()))
            lines.append(f"note: {r.layout}: {r.name} asked for {r.state}, got {got}")
    lean = [r for r in results if r.candidate.startswith("adamkit-") and ":" in r.candidate]
    if lean and all(r.fully_quantised for r in lean if not r.skipped):
        states = ", ".join(dict.fromkeys(r.state for r in lean))
        lines.insert(
            0,
            f"state: every tensor of every adamkit {states} row is stored in that format "
            "(adamkit.memory_report)",
        )
    return lines


HEADER = [
    "layout",
    "optimizer",
    "state (tensors)",
    "B/param",
    "Gparam/s",
    "vs fused",
    "vs foreach",
    "vs low-bit",
    "step ms",
    "first step s",
    "compiles",
    "note",
]


def render(rows: list[list[str]], title: str) -> str:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return _plain(rows, title)
    table = Table(title=title)
    for name in HEADER:
        table.add_column(
            name,
            justify="left"
            if name in ("layout", "optimizer", "state (tensors)", "note")
            else "right",
        )
    for row in rows:
        table.add_row(*row)
    console = Console(width=200, record=True, force_terminal=False)
    with console.capture() as capture:
        console.print(table)
    return capture.get()


def _plain(rows: list[list[str]], title: str) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(HEADER)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(HEADER, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
