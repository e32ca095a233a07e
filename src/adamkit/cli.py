"""The ``adamkit`` command: ``compare``, ``bench`` and ``report`` (``python -m adamkit`` too).

A thin layer over :mod:`adamkit.bench`: it parses arguments and calls one function. The
subcommands import their modules lazily, so that a missing optional module or dependency gives
a clear message instead of breaking the whole command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

COMMANDS = ("compare", "bench", "report")


def _names(value: str, known: Sequence[str], what: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or repr(value)}; choose from {', '.join(known)}"
        )
    return names


def at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= low``, else an error that names the value."""

    def number(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = None
        if n is None or n < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value!r}")
        return n

    return number


def _device(value: str) -> str:
    """A torch device this process can put a tensor on (``cpu``, ``cuda``, ``cuda:1``...)."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"not a torch device: {value!r} ({e})") from None
    try:
        torch.empty(0, device=device)
    except (AssertionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise argparse.ArgumentTypeError(f"{value!r} is not available here ({first})") from None
    return value


def compare_parser(prog: str = "adamkit compare") -> argparse.ArgumentParser:
    from adamkit.bench.optimizers import OPTIMIZERS
    from adamkit.bench.tasks import ALL_TASKS, DEFAULT_TASKS

    p = argparse.ArgumentParser(
        prog=prog,
        description="Run Adam, AdamW, AMSGrad and torch's optimizers on offline tasks, sweep the "
        "lr, repeat seeds, check the papers' claims, and write report.md, report.html, "
        "results.json and PNG plots.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="every task at reduced size (3 lrs, 2 seeds, fewer steps): under a minute",
    )
    p.add_argument(
        "--tasks",
        type=lambda v: _names(v, ("all", *ALL_TASKS), "task"),
        default=DEFAULT_TASKS,
        help="comma-separated; 'all' adds the opt-in decoupling-grid. Default: "
        + ",".join(DEFAULT_TASKS),
    )
    p.add_argument(
        "--optimizers",
        type=lambda v: _names(v, tuple(OPTIMIZERS), "optimizer"),
        default=tuple(OPTIMIZERS),
        help="comma-separated, default all: " + ",".join(OPTIMIZERS),
    )
    p.add_argument(
        "--seeds",
        type=at_least(1),
        default=None,
        help="seeds per optimizer at the picked lr (default 3, 2 with --quick)",
    )
    p.add_argument(
        "--steps", type=at_least(1), default=None, help="override every task's step budget"
    )
    p.add_argument("--device", type=_device, default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("adamkit-compare"),
        help="output folder (default ./adamkit-compare)",
    )
    return p


def run_compare_command(argv: Sequence[str]) -> int:
    from adamkit.bench.compare import CompareConfig, run_compare
    from adamkit.bench.tasks import ALL_TASKS

    args = compare_parser().parse_args(list(argv))
    tasks = ALL_TASKS if "all" in args.tasks else args.tasks
    try:  # before any run: a folder that cannot be made fails now, not after the runs
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"adamkit compare: cannot use --out {str(args.out)!r}: {e}", file=sys.stderr)
        return 2
    config = CompareConfig(
        tasks=tasks,
        optimizers=args.optimizers,
        seeds=args.seeds,
        steps=args.steps,
        quick=args.quick,
        device=args.device,
        out=args.out,
    )
    return run_compare(config)


def _delegate(module: str, argv: Sequence[str], command: str) -> int:
    """Call ``module.main(argv)``; a missing module is a one-line error, exit status 2."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        print(
            f"adamkit {command}: not available ({module} could not be imported: {e})",
            file=sys.stderr,
        )
        return 2
    result = mod.main(list(argv))
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adamkit`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (
        "usage: adamkit {compare,bench,report} [options]\n\n"
        "  compare  optimizers on offline tasks, with a report and the papers' claims checked\n"
        "  bench    optimizer-step throughput (adamkit.bench.throughput)\n"
        "  report   render a diagnostics log (adamkit.diagnostics.report)\n\n"
        "'adamkit COMMAND --help' for the options of a command."
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from adamkit import __version__

        print(f"adamkit {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "compare":
        try:
            return run_compare_command(rest)
        except KeyboardInterrupt:  # pragma: no cover - run_compare handles Ctrl-C itself
            return 130
    if command == "bench":
        return _delegate("adamkit.bench.throughput", rest, command)
    if command == "report":
        return _delegate("adamkit.diagnostics.report", rest, command)
    print(f"adamkit: unknown command {command!r}\n\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
