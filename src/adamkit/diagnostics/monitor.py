"""``Monitor``: samples the signals of :mod:`adamkit.diagnostics.signals` through step hooks.

::

    monitor = adamkit.Monitor(opt, names=model, every=10, sinks=[JSONLSink("run.jsonl")])
    for x, y in batches:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        monitor.observe(loss=loss)     # between backward() and step(): this step's loss
        opt.step()
    monitor.latest()["overall"]["update_rms"], monitor.alerts

On a sampled step (the ``k``-th call of ``step()`` with ``k % every == 0``) the pre-hook keeps
a sample of each param that has a gradient (at most ``signals.SAMPLE`` entries, in runs of
adjacent ones: ``signals.sample_positions``; no copy of the params), and the post-hook reads
each gradient and moment once for their exact norms (with ``exact="grad"`` the gradients
only: the moment norms then come from the sample), takes the same sample of p, m and v,
moves everything to the host in one transfer per device and computes the signals there in
float64, all tensors at once (:mod:`adamkit.diagnostics.readout`). On other steps the hooks
only count. Observed losses are kept as tensors until the next sampled step, so ``observe``
never synchronises.

Works with any ``torch.optim.Optimizer`` whose state holds torch's ``step``, ``exp_avg``,
``exp_avg_sq`` (and ``max_exp_avg_sq``), and with optimizers that expose
``decoded_state(param) -> dict`` of the same keys (compact state formats decode there). A
tensor whose step count did not advance (the step was skipped) reports its gradient and state
but no update signals.

Fused signals (for executors that fuse the step): an optimizer whose attribute
``supports_fused_signals`` is ``True`` finds ``fused_signals_request = True`` (and
``fused_signal_sums = None``) set before a sampled step; it then leaves ``fused_signal_sums``,
a dict param -> a vector computed inside its kernel, for every param it stepped: either the
three or five squared norms of :func:`adamkit.diagnostics.signals.fused_norms` (what
adamkit's compiled executor gives, five for fp32 params with float moments: the Monitor then
reads no gradient or moment in full, and takes the rest from its sample as usual, without
sampling p where it has the five), or the vector of
:func:`adamkit.diagnostics.signals.fused_sums` (exact sums and counts over the whole tensor).
For the params with full sums the Monitor takes every signal from the sums but the effective-lr
percentiles, which come from a sample of v: it reads no gradient or moment in full, samples
only v, and counts no non-finite entry itself. When every param had full sums or five norms at
the previous sampled step, the pre-hook takes no sample of p; a param then left without them
has no update-to-weight ratio in that record (a ``RuntimeWarning`` says so once).
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from adamkit.diagnostics import readout
from adamkit.diagnostics import signals as S
from adamkit.diagnostics.alerts import Alert, AlertConfig, AlertEngine, TensorTable, log_alert
from adamkit.diagnostics.native import Percentiles
from adamkit.diagnostics.readout import (
    ROW,
    Entry,
    Layout,
    Samples,
    StepCounts,
    Transfer,
)
from adamkit.diagnostics.sharded import Sampler, all_reduce_counts_, gather_samples_
from adamkit.diagnostics.sharded import _real as _local_real
from adamkit.diagnostics.steady import SteadyReads
from adamkit.execution.eager import compute_dtype
from adamkit.hparams import check_optimizer
from adamkit.storage.select import MOMENT_KEYS


def _float(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def param_names(optimizer: Optimizer, names: Any = None) -> list[list[str]]:
    """The name of every param, group by group.

    From ``names`` (an ``nn.Module`` or ``(name, param)`` pairs, matched by identity), else
    the group's ``param_names`` (torch >= 2.6 keeps them when built from named params), else
    ``"group{g}.param{i}"``.
    """
    by_id: dict[int, str] = {}
    if names is not None:
        pairs = names.named_parameters() if isinstance(names, nn.Module) else names
        for n, p in pairs:
            by_id.setdefault(id(p), n)
    out = []
    for g, group in enumerate(optimizer.param_groups):
        given = group.get("param_names")
        row = []
        for i, p in enumerate(group["params"]):
            if id(p) in by_id:
                row.append(by_id[id(p)])
            elif given is not None and i < len(given):
                row.append(given[i])
            else:
                row.append(f"group{g}.param{i}")
        out.append(row)
    return out


def read_state(optimizer: Optimizer, param: Tensor) -> dict[str, Any] | None:
    """The param's moments in torch's keys: ``decoded_state(param)`` when the optimizer has
    one (compact storage formats), else its ``state``; None before the first step."""
    decoded = getattr(optimizer, "decoded_state", None)
    st = decoded(param) if callable(decoded) else optimizer.state.get(param)
    if not st or "exp_avg" not in st or "exp_avg_sq" not in st:
        return None
    if "step" not in st:
        st = {**st, "step": optimizer.state.get(param, {}).get("step")}
    return st


@dataclass(eq=False)
class _Snapshot:
    """What the pre-hook took: the layout, p0's samples and the step counts before the step."""

    layout: Layout
    p0: list[tuple[list[int], Tensor]] | None  # per (device, dtype); None: not needed
    p0_other: dict[int, Tensor]  # entries sampled one by one
    steps: StepCounts


@dataclass(eq=False)
class _Row:
    """One measured tensor on this step: its local real tensors and what the step left."""

    entry: Entry
    index: int  # into the layout's entries
    grad: Tensor
    param: Tensor
    m: Tensor | None = None
    v: Tensor | None = None  # raw exp_avg_sq
    vmax: Tensor | None = None  # AMSGrad's max_exp_avg_sq, the v the denominator used
    exact: Tensor | None = None  # fused sums from the optimizer
    norms: Tensor | None = None  # the optimizer's squared norms of g, m, v (and p0, dp)
    step_after: Any = None
    # for sharded.gather_samples_: the local sample rows, then the gathered ones
    sample: list[Tensor] | None = None
    kinds: list[int] | None = None
    k: int = 0

    @property
    def has_state(self) -> bool:
        return self.m is not None

    @property
    def has_delta(self) -> bool:
        """Whether the optimizer gave sum p0^2 and sum (p1 - p0)^2 (no sample of p needed)."""
        return self.norms is not None and self.norms.numel() == len(S.NORM_DELTA_SUMS)

    @property
    def shards(self) -> tuple[Any, tuple[int, ...]] | None:
        return self.entry.shards

    @property
    def sampler(self) -> Sampler:
        return self.entry.sampler


class _Flags(NamedTuple):
    """What each measured row is, as arrays (length T): built once per read, or once per
    replay of steady reads (the rows and what they are do not change between its steps)."""

    group: np.ndarray  # int64
    numel: np.ndarray  # int64
    k: np.ndarray  # int64: sample size
    has_state: np.ndarray  # bool
    fused: np.ndarray  # bool: the optimizer's full sums
    has_delta: np.ndarray  # bool: its five norms
    no_vmax: np.ndarray  # bool: the sample of v is raw v (no AMSGrad max)
    local: np.ndarray  # bool: a shard sampled locally (strided), not the tensor's sample
    matrix: np.ndarray  # bool: ndim >= 2 (the alerts judge some signals there only)
    names: list[str]

    @staticmethod
    def of(rows: list[_Row]) -> _Flags:
        table = np.array(
            [
                (
                    r.entry.group,
                    r.entry.numel,
                    r.entry.k,
                    r.m is not None,
                    r.exact is not None,
                    r.has_delta,
                    r.vmax is None,
                    bool(r.entry.shards) and r.sampler.shards is None,
                    len(r.entry.shape) >= 2,
                )
                for r in rows
            ],
            dtype=np.int64,
        ).reshape(len(rows), 9)
        group, numel, k, *flags = table.T
        names = [r.entry.name for r in rows]
        return _Flags(group, numel, k, *(f.astype(bool) for f in flags), names)


class _Hyper(NamedTuple):
    lr: float
    eps: float
    beta1: float
    beta2: float
    amsgrad: bool

    @staticmethod
    def of(group: dict[str, Any]) -> _Hyper:
        beta1, beta2 = group.get("betas", (0.9, 0.999))
        return _Hyper(
            _float(group["lr"]),
            _float(group.get("eps", 1e-8)),
            _float(beta1),
            _float(beta2),
            bool(group.get("amsgrad", False)),
        )


_NONFINITE_KEYS = ("grad_nonfinite", "state_nonfinite", "param_nonfinite")
_NORM_COLUMNS = (len(S.NORM_SUMS), len(S.NORM_DELTA_SUMS))
EXACT_MODES = ("all", "grad")


class Monitor:
    """Samples Adam's health signals every ``every`` steps and raises named alerts.

    Args:
        optimizer: ``adamkit.Adam``/``AdamW`` (any backend and storage) or ``torch.optim``'s
            Adam/AdamW (any implementation).
        names: a model or ``named_parameters()`` pairs, so records name tensors
            ``encoder.layers.3.attn.q_proj.weight``; default: the groups' ``param_names`` or
            ``group{g}.param{i}``.
        every: sample every ``every``-th call of ``step()`` (1: every step).
        sinks: objects with ``write(record)`` and ``close()`` (:mod:`adamkit.diagnostics.sinks`).
        alerts: ``True`` (default thresholds), ``False``, an :class:`AlertConfig` or a dict of
            its fields.
        tensors: keep per-tensor signals in the records (group and overall are always kept).
        loss_window: number of observed losses behind ``loss_mean`` and ``loss_std``.
        keep: keep at most this many records in :meth:`history` (None: all).
        exact: what a sampled step reads in full. ``"all"`` (default): every gradient and
            moment, for exact norms and non-finite counts (12 B per fp32 param). ``"grad"``:
            the gradients only (4 B/param: exact ``grad_norm`` and gradient counts); the
            moment norms of a tensor above ``signals.SAMPLE`` entries are then estimated
            from the sample of m and v (AMSGrad tensors and strided shards still
            read v in full), and state counts come from the sample. ``exp_avg_sq_norm`` is a
            fourth power of the gradient scale: with heavy tails its estimate can be off by
            much more than the other sampled signals.

    Records are dicts: ``step`` (calls of ``step()`` so far), ``time``, ``loss``,
    ``loss_mean``, ``loss_std``, ``skipped`` (no tensor advanced), ``skipped_steps`` (the
    optimizer's counter, when it has one), ``exact`` (the mode above), ``overall``,
    ``groups`` and ``tensors`` (name -> signals, with the tensor's ``group``, ``shape``,
    ``numel``, ``sample`` (entries in its sample) and ``updated``), ``alerts`` (those raised at
    this record). The signals are documented in :mod:`adamkit.diagnostics.signals`.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        names: Any = None,
        every: int = 1,
        sinks: Sequence[Any] = (),
        alerts: bool | AlertConfig | dict[str, Any] = True,
        tensors: bool = True,
        loss_window: int = 128,
        keep: int | None = None,
        exact: str = "all",
    ) -> None:
        check_optimizer(optimizer)
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"Invalid every={every!r}: must be an int >= 1")
        if exact not in EXACT_MODES:
            raise ValueError(f"Invalid exact={exact!r}: must be one of {EXACT_MODES}")
        if isinstance(loss_window, bool) or not isinstance(loss_window, int) or loss_window < 2:
            raise ValueError(f"Invalid loss_window={loss_window!r}: must be an int >= 2")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"Invalid keep={keep!r}: must be None or an int >= 1")
        for sink in sinks:
            if not callable(getattr(sink, "write", None)) or not callable(
                getattr(sink, "close", None)
            ):
                raise TypeError(
                    f"Invalid sink {sink!r}: a sink needs write(record) and close() "
                    "(adamkit.diagnostics.JSONLSink, CSVSink, TensorBoardSink)"
                )
        self.optimizer = optimizer
        self.exact = exact
        self.every = every
        self.sinks = list(sinks)
        self.tensors = tensors
        self.keep = keep
        self._names_arg = _name_pairs(names)
        config = AlertConfig.resolve(alerts)
        self._engine = AlertEngine(config, every) if config is not None else None
        self.alerts: list[Alert] = []
        self._history: list[dict[str, Any]] = []
        self._unbuilt: list[tuple[dict[str, Any], _TensorRows]] = []  # records, tensors to come
        self._calls = 0
        self._pending_loss: list[Any] = []
        self._loss_queue: list[tuple[int, list[Any]]] = []
        self._loss_stats = S.RollingStats(loss_window, 2)
        self._last_loss: float | None = None
        self._snapshot: _Snapshot | None = None
        self._layout: Layout | None = None
        self._warned_unfused = False
        self._steady: SteadyReads | None = None
        self._steady_flags: _Flags | None = None  # the replay's rows, as _Flags
        self._replay = True  # replay steady reads (False: the general read every time)
        self._replays = 0  # sampled steps read by the replay
        self._percentiles = Percentiles()  # in C where it builds (native.py), with its scratch
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]
        on_load = getattr(optimizer, "register_load_state_dict_post_hook", None)
        if on_load is not None:  # new moment tensors: no replay may keep the old ones alive
            self._handles.append(on_load(self._drop_replay))

    # -- public ------------------------------------------------------------------------------

    def observe(self, *, loss: float | Tensor) -> None:
        """Feed the loss of the coming step (several calls before one step are averaged)."""
        self._pending_loss.append(S.loss_value(loss))

    def latest(self) -> dict[str, Any] | None:
        """The last record (None before the first sampled step)."""
        if not self._history:
            return None
        self._build()
        return self._history[-1]

    def history(self) -> list[dict[str, Any]]:
        """All records kept so far, oldest first."""
        self._build()
        return list(self._history)

    def close(self) -> None:
        """Detach from the optimizer and close the sinks."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._steady = None
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- hooks -------------------------------------------------------------------------------

    def _drop_replay(self, *args: Any) -> None:
        self._steady = None

    def _pre_hook(self, opt: Optimizer, args: tuple, kwargs: dict) -> None:
        if (self._calls + 1) % self.every:
            return
        has_closure = len(args) > 1 and args[1] is not None or kwargs.get("closure") is not None
        fusing = getattr(opt, "supports_fused_signals", False) is True
        if fusing:
            opt.fused_signals_request = True
            opt.fused_signal_sums = None  # never read the sums of an earlier step
        signature = Layout.signature_of(opt.param_groups, has_closure)
        layout = self._layout
        if layout is None or layout.signature != signature:
            names = param_names(opt, self._names_arg)
            layout = self._layout = Layout.build(signature, opt.param_groups, names)
        states = opt.state
        steps = []
        for e in layout.entries:
            st = states.get(e.param)
            steps.append(st.get("step") if st else None)
        with torch.no_grad():
            # every param had a fused row last time: the optimizer's sums replace p0's sample
            if fusing and layout.fused_last:
                p0, p0_other = None, {}
            else:
                p0, p0_other = layout.sample_cats(), layout.sample_others()
            self._snapshot = _Snapshot(layout, p0, p0_other, StepCounts(steps))

    def _post_hook(self, opt: Optimizer, args: tuple, kwargs: dict) -> None:
        self._calls += 1
        if self._pending_loss:
            self._loss_queue.append((self._calls, self._pending_loss))
            self._pending_loss = []
        if self._snapshot is None:
            return
        snap, self._snapshot = self._snapshot, None
        fused = None
        if getattr(opt, "fused_signals_request", False):
            opt.fused_signals_request = False
            fused = getattr(opt, "fused_signal_sums", None) or {}
            opt.fused_signal_sums = None
        with torch.no_grad():
            record, table, tensors = self._measure(snap, fused)
        losses = self._drain_losses()
        if losses:
            self._last_loss = losses[-1][1]
        mean, std = self._loss_stats.mean_std()
        record.update(
            loss=self._last_loss,
            loss_mean=None if math.isnan(mean) else mean,
            loss_std=None if math.isnan(std) else std,
        )
        raised = self._engine.evaluate(record, losses, table) if self._engine else []
        for alert in raised:
            log_alert(alert)
        self.alerts.extend(raised)
        record["alerts"] = [a.to_dict() for a in raised]
        self._history.append(record)
        if self.tensors:  # built when a record is read or written (_TensorRows)
            self._unbuilt.append((record, tensors))
        if self.keep is not None and len(self._history) > self.keep:
            del self._history[: len(self._history) - self.keep]
            del self._unbuilt[: max(len(self._unbuilt) - self.keep, 0)]
        if self.sinks:
            self._build()
            for sink in self.sinks:
                sink.write(record)

    def _build(self) -> None:
        """Fill in the ``tensors`` of the records kept so far that lack them."""
        for record, tensors in self._unbuilt:
            record["tensors"] = tensors.build()
        self._unbuilt = []

    def _drain_losses(self) -> list[tuple[int, float]]:
        queue, self._loss_queue = self._loss_queue, []
        tensors = [x for _, xs in queue for x in xs if isinstance(x, Tensor)]
        synced = (
            iter(torch.stack([t.float().reshape(()) for t in tensors]).tolist())
            if (tensors)
            else iter(())
        )
        out = []
        for step, xs in queue:
            vals = [next(synced) if isinstance(x, Tensor) else x for x in xs]
            value = float(sum(vals) / len(vals))
            self._loss_stats.add(value)
            out.append((step, value))
        return out

    def _measure(
        self, snap: _Snapshot, fused: dict[Tensor, Tensor] | None
    ) -> tuple[dict[str, Any], TensorTable, _TensorRows]:
        """Read the step's numbers (replaying the previous read when it is a steady one:
        :mod:`adamkit.diagnostics.steady`), count non-finite entries, assemble the record
        (without its ``tensors``), the alerts' table and the tensors' rows to build."""
        hyper = [_Hyper.of(group) for group in self.optimizer.param_groups]
        steady = self._steady
        got = None
        if steady is not None:
            got = steady.read(self.optimizer.state, snap, hyper, fused)
        if got is not None:
            self._replays += 1
            rows = steady.rows
            sampled, norms, delta, steps_before, steps_after = got
            exact = np.full((len(rows), S.N_SUMS), np.nan)
            no_p0 = np.zeros(len(rows), dtype=bool)
            snap.layout.fused_last = steady.delta
            flags = self._steady_flags
        else:
            rows, sampled, norms, delta, exact, steps_before, steps_after, no_p0 = self._read(
                snap, fused, hyper
            )
            self._steady = None
            flags = _Flags.of(rows)
            if self._replay:
                self._steady = SteadyReads.of(snap.layout, rows, hyper, fused, self.exact)
                self._steady_flags = flags
        nonfinite = self._nonfinite(rows, flags, norms, delta, sampled, exact)
        return self._assemble(
            rows,
            flags,
            sampled,
            norms,
            delta,
            exact,
            nonfinite,
            steps_before,
            steps_after,
            hyper,
            no_p0,
        )

    def _read(
        self, snap: _Snapshot, fused: dict[Tensor, Tensor] | None, hyper: list[_Hyper]
    ) -> tuple[list[_Row], np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, Any, Any]:
        """The general read: queue every tensor's reads, move the numbers to the host at once.

        ``fused``: exact sums the optimizer computed inside its step, by param; such a row
        needs only the sample of v (for the effective-lr percentiles). The others need their
        exact norms (one multi-tensor norm per (device, dtype) for the gradients, the first
        and the second moments, unless the optimizer gave them) and the samples of p0, p1, m
        and v; p0 and p1 not where the optimizer also gave sum p0^2 and sum (p1 - p0)^2
        (``delta``, [T, 2], NaN elsewhere). Samples are gathered with one ``torch.cat`` per
        (device, dtype), and everything reaches the host in one copy per device.
        """
        opt = self.optimizer
        layout = snap.layout
        rows: list[_Row] = []
        row_of = np.full(len(layout.entries), -1, dtype=np.int64)
        states = opt.state
        for index, e in enumerate(layout.entries):
            p = e.param
            grad = p.grad
            if grad is None:  # a guard took the gradients away for this step
                continue
            plain = e.plain
            row = _Row(e, index, grad if plain else _real(grad), p if plain else _real(p))
            st = states.get(p)
            moments = _moments(opt, e, st)
            if moments is not None:
                m, v, vmax = moments
                real = _same if plain else _real
                row.m, row.v = real(m), real(v)
                if vmax is not None and hyper[e.group].amsgrad:
                    row.vmax = real(vmax)
                row.step_after = st.get("step") if st else None
                given = fused.get(p) if fused else None
                if given is not None and given.numel() in _NORM_COLUMNS:
                    row.norms = given
                else:
                    row.exact = given
            row_of[index] = len(rows)
            rows.append(row)
        layout.fused_last = bool(fused) and all(
            row.exact is not None or row.has_delta for row in rows
        )

        transfer = Transfer()
        samples = self._queue_samples(snap, rows, row_of)
        k = np.array([row.entry.k for row in rows], dtype=np.int64)
        samples.queue(transfer, k)
        norm_batches = _squared_norms(rows, transfer, self.exact == "all")
        before = snap.steps
        before.queue(transfer)
        after = StepCounts([row.step_after for row in rows])
        after.queue(transfer)
        transfer.fetch()

        T = len(rows)
        sampled = np.zeros((T, len(S.SAMPLE_ROWS), max(k.max(initial=1), 1)))
        samples.scatter(transfer, sampled)
        norms = np.zeros((T, 3))  # grad_sq, m_sq, v_sq
        delta = np.full((T, 2), np.nan)  # param_sq, delta_sq where given
        exact = np.full((T, S.N_SUMS), np.nan)
        c = S.COLUMNS
        estimated = np.zeros(T, dtype=bool)
        for idx, handle, fused_rows in norm_batches:
            got = transfer.get(handle).reshape(len(idx), -1)
            if fused_rows:
                exact[idx] = got
                got = got[:, [getattr(c, key) for key in S.NORM_SUMS]]
            elif got.shape[1] == len(S.NORM_DELTA_SUMS):
                delta[idx] = got[:, 3:]
                got = got[:, :3]
            norms[idx, : got.shape[1]] = got
            if got.shape[1] == 1:
                estimated[idx] = [rows[i].has_state for i in idx]
        if estimated.any():  # moment norms from the sample: sum(x^2) * n / k
            scale = np.array([row.entry.numel / max(row.entry.k, 1) for row in rows])
            moments = sampled[estimated][:, [ROW["m"], ROW["v"]], :]
            norms[estimated, 1:] = np.square(moments).sum(axis=2) * scale[estimated, None]
        steps_before = before.read(transfer)[[row.index for row in rows]]
        steps_after = after.read(transfer)
        no_p0 = np.zeros(T, dtype=bool)
        if snap.p0 is None:  # rows that moved without fused sums have no sample of p0
            has_state = np.array([row.has_state for row in rows], dtype=bool)
            unfused = np.array([row.exact is None and not row.has_delta for row in rows])
            no_p0 = unfused & has_state & (steps_after != steps_before)
            if no_p0.any():
                self._warn_unfused([rows[i].entry.name for i in np.flatnonzero(no_p0)])
        return rows, sampled, norms, delta, exact, steps_before, steps_after, no_p0

    @staticmethod
    def _queue_samples(snap: _Snapshot, rows: list[_Row], row_of: np.ndarray) -> Samples:
        """Queue the sample rows: p0 (from the snapshot), p1, m and v for rows measured from
        their sample (no p0 and p1 where the optimizer gave the param's sums); only v for
        rows with fused sums. Sharded rows are gathered first, so that every rank holds the
        full tensor's sample."""
        R = ROW
        samples = Samples()
        layout = snap.layout
        if snap.p0 is not None:
            for idx, cat in snap.p0:
                sizes = np.array([layout.entries[i].k for i in idx], dtype=np.int64)
                samples.add_cat(list(row_of[idx]), R["p0"], cat, sizes)
            if any(row.exact is None and not row.has_delta and row.entry.plain for row in rows):
                for idx, cat in layout.sample_cats():
                    sizes = np.array([layout.entries[i].k for i in idx], dtype=np.int64)
                    samples.add_cat(list(row_of[idx]), R["p1"], cat, sizes)
        other = set(layout.other)
        gathered = []
        for i, row in enumerate(rows):
            e = row.entry
            kinds: list[tuple[int, Tensor]] = []
            if row.exact is None:
                if not row.has_delta:
                    p0 = snap.p0_other.get(row.index)
                    if p0 is not None:
                        kinds.append((R["p0"], p0))
                    if row.index in other or snap.p0 is None:
                        kinds.append((R["p1"], e.view(row.param)))
                if row.has_state:
                    kinds.append((R["m"], e.view(row.m)))
            if row.has_state:
                kinds.append((R["v"], e.view(row.v if row.vmax is None else row.vmax)))
            if e.sampler.shards is not None:
                row.kinds = [j for j, _ in kinds]
                row.sample = [t for _, t in kinds]
                gathered.append(row)
            else:
                for j, t in kinds:
                    samples.add(i, j, t)
        if gathered:
            gather_samples_(gathered)  # every rank gets the full tensor's sample
            for row in gathered:
                for j, t in zip(row.kinds, row.sample):
                    samples.add(row_of[row.index], j, t)
                row.sample = row.kinds = None
        return samples

    def _warn_unfused(self, names: list[str]) -> None:
        if not self._warned_unfused:
            self._warned_unfused = True
            warnings.warn(
                f"adamkit Monitor: the optimizer left no fused_signal_sums for "
                f"{', '.join(names[:4])}{' and more' if len(names) > 4 else ''} after "
                "providing them for every "
                "param at the previous sampled step, so no sample of those params was taken "
                "before this step: their log10_update_to_weight is None in this record",
                RuntimeWarning,
                stacklevel=4,
            )

    def _assemble(
        self,
        rows: list[_Row],
        flags: _Flags,
        samples: np.ndarray,
        norms: np.ndarray,
        delta: np.ndarray,
        exact: np.ndarray,
        nonfinite: np.ndarray,
        steps_before: np.ndarray,
        steps_after: np.ndarray,
        hyper: list[_Hyper],
        no_p0: np.ndarray,
    ) -> tuple[dict[str, Any], TensorTable, _TensorRows]:
        n_groups = len(self.optimizer.param_groups)
        T = len(rows)
        group, numel, has_state = flags.group, flags.numel, flags.has_state
        updated = has_state & (steps_after != steps_before)
        table = np.array([(h.beta1, h.beta2, h.eps, h.lr) for h in hyper], dtype=np.float64)
        beta1, beta2, eps, lr = table[group].T if T else np.zeros((4, 0))
        batch = S.SampleBatch(
            samples,
            flags.k,
            numel,
            updated,
            steps_after,
            beta1,
            beta2,
            eps,
            lr,
        )
        fused = np.flatnonzero(flags.fused)
        sampled = None if not len(fused) else np.flatnonzero(~flags.fused)
        root = S.sample_roots(batch)
        given = updated & flags.has_delta  # the optimizer's sum p0^2 and sum dp^2
        sums = S.batch_sums(batch, sampled, root, params=not given.all())
        sums["grad_sq"], sums["m_sq"], sums["v_sq"] = norms.T.copy()
        sums["lag_grad_sq"] = np.where(updated, norms[:, 0], 0.0)
        S.use_exact_rows(sums, fused, exact[fused], updated[fused])
        if given.any():  # the optimizer's sums of p0^2 and dp^2 instead of the sample's
            sums["param_sq"][given], sums["delta_sq"][given] = delta[given].T
        if no_p0.any():  # sampled after the step only: the change of the param is unknown
            sums["param_sq"][no_p0] = sums["delta_sq"][no_p0] = np.nan
        eff, weight = S.effective_lrs(batch, root)
        # scopes: each group, then the model when there are several groups
        members = np.stack([group == g for g in range(n_groups)], axis=1)
        if n_groups > 1:
            members = np.concatenate([members, np.ones((T, 1), dtype=bool)], axis=1)
        quantiles, scope_quantiles = self._percentiles(eff, weight, members.T, S.PERCENTILES)
        signals = S.rows_to_arrays(sums)
        grad_rms = np.sqrt(sums["grad_sq"] / np.maximum(numel, 1))
        opt_step = np.where(has_state, steps_after, np.nan)
        table = TensorTable(
            flags.names,
            updated,
            flags.matrix,
            opt_step,
            *(
                np.where(ok, values, np.nan)
                for values, ok in (
                    signals[key]
                    for key in ("eps_dominated_frac", "log10_update_to_weight", "large_update_frac")
                )
            ),
            grad_rms,
            eps,
            nonfinite,
        )
        tensors = _TensorRows(
            rows, has_state, updated, steps_after, sums, grad_rms, signals, quantiles, nonfinite
        )

        # the scopes' sums are the members' sums (one product), their signals one call
        weights = members.astype(np.float64)
        additive = np.stack([sums[key] for key in S.ADDITIVE]) @ weights
        totals = dict(zip(S.ADDITIVE, additive.tolist()))
        scope_signals = S.rows_to_signals(dict(zip(S.ADDITIVE, additive)))
        scope_nonfinite = (weights.T @ nonfinite).astype(np.int64).tolist()
        scopes = []
        for j in range(members.shape[1]):
            inside = members[:, j]
            one = {key: values[j] for key, values in totals.items()}
            stateful = bool(has_state[inside].any())
            out: dict[str, Any] = {
                "numel": int(one["numel"]),
                "tensors": int(inside.sum()),
                "updated": int(one["updated"]),
            }
            if stateful:
                out["opt_step"] = int(steps_after[inside & has_state].max())
            out.update(_norms(one, stateful, out["tensors"]))
            out.update((key, values[j]) for key, values in scope_signals.items())
            qs = scope_quantiles[j].tolist()
            out.update(
                {f"eff_lr_p{q}": None if math.isnan(x) else x for q, x in zip(S.PERCENTILES, qs)}
            )
            out.update(zip(_NONFINITE_KEYS, scope_nonfinite[j]))
            scopes.append(out)
        groups = [
            {"group": g, "lr": hyper[g].lr, "eps": hyper[g].eps, **scopes[g]}
            for g in range(n_groups)
        ]
        overall = dict(scopes[0]) if n_groups == 1 else scopes[-1]
        record: dict[str, Any] = {
            "step": self._calls,
            "time": time.time(),
            "skipped": overall["updated"] == 0,
            "exact": self.exact,
        }
        skipped_steps = getattr(self.optimizer, "skipped_steps", None)
        if skipped_steps is not None:
            record["skipped_steps"] = int(skipped_steps)
        record.update(overall=overall, groups=groups, tensors={})
        return record, table, tensors

    @staticmethod
    def _nonfinite(
        rows: list[_Row],
        flags: _Flags,
        norms: np.ndarray,
        delta: np.ndarray,
        samples: np.ndarray,
        exact: np.ndarray,
    ) -> np.ndarray:
        """NaN/inf counts of g, the state and p1 by row ([T, 3]), counted (one more pass)
        only for a row whose sums, norms or sample show a non-finite value.

        Sharded rows add their shards' counts with an all-reduce. Their sums, norms and sample
        are global, so every rank takes the same decision; a strided shard's sample is local,
        so its counts are taken whenever it is measured from its sample.
        """
        fused, given = flags.fused, flags.has_delta
        out = np.zeros((len(rows), len(_NONFINITE_KEYS)), dtype=np.int64)
        if given.all() and flags.no_vmax.all() and not flags.local.any():
            # every row's five norms cover its sample (below); all finite: nothing to count
            with np.errstate(over="ignore", invalid="ignore"):
                if np.isfinite(norms.sum() + delta.sum()):
                    return out
        finite = np.isfinite(norms).all(axis=1)
        finite[given] &= np.isfinite(delta[given]).all(axis=1)
        if fused.any():
            columns = [getattr(S.COLUMNS, key) for key in S.FINITE_SUMS]
            finite[fused] &= np.isfinite(exact[fused][:, columns]).all(axis=1)
        # a sum is finite exactly when its terms are (or when finite terms overflow: then the
        # count below finds nothing). Rows whose five norms are finite need no look at their
        # sample: it holds only m and v (no p with them), entries of the finite m and v those
        # norms summed (not with AMSGrad: its sample of v is the max, which they did not sum)
        covered = given & finite & flags.no_vmax
        measured = np.flatnonzero(~fused & ~covered)
        with np.errstate(over="ignore", invalid="ignore"):
            if len(measured) == len(rows):  # one sum of everything first: no copy
                if not np.isfinite(samples.sum()):
                    finite &= np.isfinite(samples.sum(axis=(1, 2)))
            elif len(measured):
                finite[measured] &= np.isfinite(samples[measured].sum(axis=(1, 2)))
        finite[flags.local & ~fused] = False
        counts: dict[int, Tensor] = {}
        for i in np.flatnonzero(~finite).tolist():
            row = rows[i]
            state = [t for t in (row.m, row.v, row.vmax) if t is not None]
            grad = row.grad
            counts[i] = torch.stack(
                [
                    S.nonfinite_count(grad),
                    S.nonfinite_count(*state).to(grad.device)
                    if state
                    else grad.new_zeros((), dtype=torch.int64),
                    S.nonfinite_count(row.param),
                ]
            ).to(torch.int64)
        all_reduce_counts_(rows, counts)
        for i, count in counts.items():
            out[i] = count.cpu().numpy()
        return out


class _TensorRows:
    """A sampled step's per-tensor signals as arrays, turned into the record's ``tensors``
    dicts (name -> signals) only when the record is read or written: most records of a long
    run are never looked at tensor by tensor, and building the dicts is about a fifth of the
    host time of a sampled step (35 tensors)."""

    def __init__(
        self,
        rows: list[_Row],
        has_state: np.ndarray,
        updated: np.ndarray,
        steps_after: np.ndarray,
        sums: dict[str, np.ndarray],
        grad_rms: np.ndarray,
        signals: dict[str, tuple[np.ndarray, np.ndarray]],
        quantiles: np.ndarray,
        nonfinite: np.ndarray,
    ) -> None:
        self.entries = [row.entry for row in rows]
        self.has_state = has_state
        self.updated = updated
        self.steps_after = steps_after
        self.norms = (sums["grad_sq"], sums["m_sq"], sums["v_sq"])
        self.grad_rms = grad_rms
        self.signals = signals
        self.quantiles = quantiles
        self.nonfinite = nonfinite

    def build(self) -> dict[str, dict[str, Any]]:
        grad_sq, m_sq, v_sq = self.norms
        has_state = self.has_state
        quantiles = self.quantiles
        columns = {
            "grad_norm": np.sqrt(grad_sq).tolist(),
            "grad_rms": self.grad_rms.tolist(),
            "exp_avg_norm": _where(has_state, np.sqrt(m_sq)),
            "exp_avg_sq_norm": _where(has_state, np.sqrt(v_sq)),
            **{key: _where(ok, values) for key, (values, ok) in self.signals.items()},
            **{
                f"eff_lr_p{q}": _where(~np.isnan(quantiles[:, j]), quantiles[:, j])
                for j, q in enumerate(S.PERCENTILES)
            },
            **{key: self.nonfinite[:, j].tolist() for j, key in enumerate(_NONFINITE_KEYS)},
        }
        keys = list(columns)
        opt_step = self.steps_after.astype(np.int64).tolist()
        tensors: dict[str, dict[str, Any]] = {}
        for e, stateful, moved, step, values in zip(
            self.entries,
            has_state.tolist(),
            self.updated.tolist(),
            opt_step,
            zip(*columns.values()),
        ):
            rec: dict[str, Any] = {
                "group": e.group,
                "shape": list(e.shape),
                "numel": e.numel,
                "sample": e.k,
                "updated": moved,
            }
            if stateful:
                rec["opt_step"] = step
            rec.update(zip(keys, values))
            tensors[e.name] = rec
        return tensors


def _same(t: Tensor) -> Tensor:
    return t


def _moments(
    opt: Optimizer, entry: Entry, stored: dict[str, Any] | None
) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """(exp_avg, exp_avg_sq, max_exp_avg_sq or None) of ``entry``'s param as
    :func:`read_state` gives them; None before the first step.

    When ``decoded_state`` returned the stored tensors themselves (float state), they are
    read from the state directly while they remain the stored ones: decoding costs a few
    microseconds per param and call.
    """
    refs = entry.stored
    if refs is not None and stored:
        m, v, vmax = (stored.get(key) for key in MOMENT_KEYS)
        if refs[0]() is m and refs[1]() is v and (refs[2]() if refs[2] else None) is vmax:
            return m, v, vmax
    entry.stored = None
    st = read_state(opt, entry.param)
    if st is None:
        return None
    m, v, vmax = (st.get(key) for key in MOMENT_KEYS)
    if stored and all(x is stored.get(key) for x, key in zip((m, v, vmax), MOMENT_KEYS)):
        entry.stored = tuple(None if x is None else weakref.ref(x) for x in (m, v, vmax))
    return m, v, vmax


def _real(t: Tensor) -> Tensor:
    """The local shard (DTensor) as a real tensor, detached."""
    return _local_real(t)


def _where(ok: np.ndarray, values: np.ndarray) -> list[float | None]:
    """``values`` as Python floats, None where not ``ok``."""
    return [v if o else None for v, o in zip(values.tolist(), ok.tolist())]


def _norms(sums: dict[str, float], has_state: bool, tensors: int) -> dict[str, float | None]:
    return {
        "grad_norm": math.sqrt(sums["grad_sq"]) if tensors else None,
        "grad_rms": math.sqrt(sums["grad_sq"] / max(sums["numel"], 1)) if tensors else None,
        "exp_avg_norm": math.sqrt(sums["m_sq"]) if has_state else None,
        "exp_avg_sq_norm": math.sqrt(sums["v_sq"]) if has_state else None,
    }


def _squared_norms(
    rows: list[_Row], transfer: Transfer, moments: bool
) -> list[tuple[list[int], tuple, bool]]:
    """Queue, for every row, sum(g^2) (and sum(m^2), sum(v^2) with state, when ``moments``
    or when the sample cannot stand for them), the squared norms the optimizer gave (three,
    or five with sum p0^2 and sum (p1 - p0)^2), or, when the optimizer fused them all, its
    exact sums; returns (rows, handle, fused)
    by batch, the handle's values being the rows' vectors end to end. A batch of one column
    leaves the moments to the sample.

    Plain tensors: one multi-tensor norm per (device, compute dtype) and per kind. Sharded
    (DTensor) params: the sums of the local shards, added up over the shards with one
    all-reduce per layout.
    """
    kinds = ("grad", "m", "v")
    out = []
    batches: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        fused = row.exact is not None
        given = "given" if row.norms is not None else ""
        full = row.has_state and (moments or not _sample_stands_for_moments(row))
        n = S.N_SUMS if fused else row.norms.numel() if given else 3 if full else 1
        dtype = row.exact.dtype if fused else compute_dtype(row.grad)
        mesh, dims = row.shards if row.shards is not None else (None, ())
        key = (row.grad.device, id(mesh), dims, n, dtype, fused or given)
        batches.setdefault(key, []).append(i)
    for (_, _, dims, n, dtype, fused), idx in batches.items():
        if fused == "given":
            stacked = torch.stack([rows[i].norms.reshape(-1).to(dtype) for i in idx])
            fused = False
        elif fused:
            stacked = torch.stack([rows[i].exact.reshape(-1) for i in idx])
            if stacked.shape[1] != S.N_SUMS:
                raise ValueError(
                    f"fused_signal_sums rows must have {S.N_SUMS} entries (the columns of "
                    f"adamkit.diagnostics.signals.Sums), got {stacked.shape[1]}"
                )
        else:
            norms = [
                readout.tensor_norms([getattr(rows[i], k) for i in idx], dtype) for k in kinds[:n]
            ]
            stacked = torch.stack(norms, dim=1).square()
        if dims:
            mesh = rows[idx[0]].shards[0]
            for d in dims:
                torch.distributed.all_reduce(stacked, group=mesh.get_group(d))
        out.append((idx, transfer.add(stacked), fused))
    return out


def _sample_stands_for_moments(row: _Row) -> bool:
    """Whether the sample holds raw m and v of the whole tensor: not with AMSGrad (the sample
    holds the max), nor for a strided shard (its sample is its rank's own)."""
    return row.vmax is None and (row.sampler.shards is not None or row.shards is None)


def _name_pairs(names: Any) -> nn.Module | list[tuple[str, Tensor]] | None:
    """``names`` as :func:`param_names` takes it: None, a module, or a list of (name, param)
    pairs (from pairs such as ``model.named_parameters()``, a one-shot iterator read once
    here, or a dict of name -> param). Anything else is refused here, not at the first step."""
    if names is None or isinstance(names, nn.Module):
        return names
    if isinstance(names, dict):
        names = names.items()
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise TypeError(
            "names must be an nn.Module, (name, param) pairs such as model.named_parameters() "
            f"or a dict of name -> param, got {type(names).__name__}"
        )
    pairs = list(names)
    for pair in pairs:
        if (
            not isinstance(pair, (tuple, list))
            or len(pair) != 2
            or not isinstance(pair[0], str)
            or not isinstance(pair[1], Tensor)
        ):
            raise TypeError(f"names must hold (name, param) pairs, got the entry {pair!r:.80}")
    return [tuple(pair) for pair in pairs]
