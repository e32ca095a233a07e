"""What monitoring costs: step time with a :class:`Monitor` attached, relative to without.

``measure()`` times ``optimizer.step()`` on fixed gradients, plain and with a Monitor sampling
every ``k`` steps, interleaving the configurations: each repeat times a plain run and then each
monitored run right after it, and the overhead is the median over the repeats of the ratio
within a repeat. (The project's VM moves between memory states that change a step's time by
a third within minutes; the fastest plain run and the fastest monitored run can come from
different states, which made that ratio swing from -22% to +17% for the same code.) Each run
attaches a new Monitor and lets it take one sampled step untimed first, so that what is timed is
the steady state of a long run (its first sampled step also builds its layout of the params).
The Monitor has its default arguments unless told otherwise, alerts included: their
evaluation is timed; any warnings the synthetic run provokes (its gradients never change) are
kept off the ``adamkit`` logger while timing. ``adamkit bench --monitor`` calls it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adamkit.diagnostics.monitor import Monitor


def transformer_like_params(
    width: int = 512, layers: int = 4, vocab: int = 8192, device: str | torch.device = "cpu"
) -> list[Tensor]:
    """Params shaped like a small transformer: an embedding, per layer q/k/v/o (width^2),
    an MLP (width x 4 width, both ways) and two norms with biases.

    The default is about 16.8M params in 45 tensors.
    """
    g = torch.Generator().manual_seed(0)
    shapes: list[tuple[int, ...]] = [(vocab, width)]
    for _ in range(layers):
        shapes += [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]
        shapes += [(width,), (width,)]
    shapes += [(width,), (width,)]
    params = []
    for shape in shapes:
        p = (torch.randn(shape, generator=g) * 0.02).to(device).requires_grad_()
        p.grad = torch.randn(shape, generator=g).to(device) * 1e-2
        params.append(p)
    return params


class _TimedMonitor(Monitor):
    """A Monitor that adds up the time spent in its own hooks (host time; on an accelerator
    the queued work it waits for is the monitor's own, since it syncs only on sampled steps)."""

    hook_s = 0.0

    def _pre_hook(self, *args: Any) -> None:
        start = time.perf_counter()
        super()._pre_hook(*args)
        self.hook_s += time.perf_counter() - start

    def _post_hook(self, *args: Any) -> None:
        start = time.perf_counter()
        super()._post_hook(*args)
        self.hook_s += time.perf_counter() - start


@contextlib.contextmanager
def _alerts_unlogged():
    """While timing: the ``adamkit`` logger drops warnings (the Monitor still evaluates and
    collects its alerts; only their log lines, one per episode, are left out)."""
    log = logging.getLogger("adamkit")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _time_steps(opt: torch.optim.Optimizer, steps: int, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    sync()
    return (time.perf_counter() - start) / steps


def measure(
    make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None,
    params: Sequence[Tensor] | None = None,
    *,
    every: Sequence[int] = (1, 10),
    steps: int = 20,
    repeats: int = 5,
    warmup: int = 3,
    monitor_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Seconds per step without and with a Monitor, and the relative overhead.

    Args:
        make_optimizer: builds the optimizer from a list of params (default
            ``adamkit.AdamW(params, lr=1e-4)``; pass a compiled-backend factory to measure
            that path). One optimizer is built and reused, so compilation happens once.
        params: params with ``.grad`` set (default :func:`transformer_like_params`).
        every: the sampling periods to measure.
        steps: steps per timed run (a multiple of every ``every`` keeps the ratio exact).
        repeats: interleaved timed runs per configuration (the ratios are medians over them).
        warmup: untimed steps per configuration before the first timed run.
        monitor_kwargs: extra arguments for the Monitor (names, alerts...; default: none,
            so alerts are evaluated as in a default Monitor).

    Returns ``{"params", "tensors", "device", "plain_s", "plain_runs_s", "monitored": {every:
    {"step_s", "overhead", "hook_s", "hook_overhead", "runs_s", "hook_runs_s"}}}`` (``*runs_s``:
    seconds per step of each repeat, in order): ``plain_s`` and ``step_s`` are the fastest runs;
    ``overhead`` is the median over the repeats of (monitored run / the plain run of the same
    repeat) - 1, end to end; ``hook_s`` is the time spent inside the Monitor's hooks per step
    (the median over the runs) and ``hook_overhead`` the median of hook_s / plain run time,
    the same cost measured directly, which a busy machine perturbs much less than a
    difference of two step times.
    """
    if make_optimizer is None:
        from adamkit.optim import AdamW

        def make_optimizer(ps: list[Tensor]) -> torch.optim.Optimizer:
            return AdamW(ps, lr=1e-4)

    params = list(params) if params is not None else transformer_like_params()
    device = params[0].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    opt = make_optimizer(params)
    kwargs = dict(monitor_kwargs or {})
    configs: list[int | None] = [None, *every]
    times: dict[int | None, list[float]] = {c: [] for c in configs}
    hooks: dict[int | None, list[float]] = {c: [] for c in configs}
    with _alerts_unlogged():
        for c in configs:
            mon = _TimedMonitor(opt, every=c, **kwargs) if c else None
            _time_steps(opt, warmup, sync)
            if mon:
                mon.close()
        for _ in range(repeats):
            for c in configs:
                mon = _TimedMonitor(opt, every=c, **kwargs) if c else None
                if mon:  # steady state, as in a run: the Monitor has seen one sampled step
                    _time_steps(opt, c, sync)
                    mon.hook_s = 0.0
                times[c].append(_time_steps(opt, steps, sync))
                if mon:
                    mon.close()
                    hooks[c].append(mon.hook_s / steps)
    plain_runs = np.array(times[None])
    monitored = {}
    for c in every:
        runs, hook = np.array(times[c]), np.array(hooks[c])
        monitored[c] = {
            "step_s": float(runs.min()),
            "overhead": float(np.median(runs / plain_runs)) - 1,
            "hook_s": float(np.median(hook)),
            "hook_overhead": float(np.median(hook / plain_runs)),
            "runs_s": runs.tolist(),
            "hook_runs_s": hook.tolist(),
        }
    plain = float(plain_runs.min())
    return {
        "params": sum(p.numel() for p in params),
        "tensors": len(params),
        "device": str(device),
        "plain_s": plain,
        "plain_runs_s": plain_runs.tolist(),
        "monitored": monitored,
    }
