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
a strided sample of each param that has a gradient (at most ``signals.SAMPLE`` entries: no
copy of the params), and the post-hook reads each gradient once for its exact norm, takes the
same sample of p, g, m and v, moves everything to the host in one transfer per device and
computes the signals there in float64. On other steps the hooks only count. Observed losses are
kept as tensors until the next sampled step, so ``observe`` never synchronises.

Works with any ``torch.optim.Optimizer`` whose state holds torch's ``step``, ``exp_avg``,
``exp_avg_sq`` (and ``max_exp_avg_sq``), and with optimizers that expose
``decoded_state(param) -> dict`` of the same keys (compact state formats decode there). A
tensor whose step count did not advance (the step was skipped) reports its gradient and state
but no update signals.

Fused signals (for executors that fuse the step): an optimizer whose attribute
``supports_fused_signals`` is ``True`` finds ``fused_signals_request = True`` set before a
sampled step; it then leaves ``fused_signal_sums``, a dict param -> the vector
:func:`adamkit.diagnostics.signals.fused_sums` computes (exact sums over the whole tensor, from
the values inside its kernel), and the Monitor uses those instead of its sampled estimates
(the fractions and percentiles still come from the sample).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from adamkit.diagnostics import signals as S
from adamkit.diagnostics.alerts import Alert, AlertConfig, AlertEngine, log_alert
from adamkit.execution.eager import compute_dtype
from adamkit.storage.shards import is_dtensor, local


def _float(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _step_value(x: Any) -> float | Tensor | None:
    """A step count as a float (no sync for CPU tensors) or, on an accelerator, a 0-d copy."""
    if x is None:
        return None
    if isinstance(x, Tensor):
        return float(x) if x.device.type == "cpu" else x.detach().clone()
    return float(x)


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


@dataclass
class _Snapshot:
    param: Tensor
    group: int
    index: int
    stride: int
    before: Tensor  # the strided sample of the param before the step
    step_before: float | Tensor | None


@dataclass
class _Row:
    name: str
    group: int
    shape: tuple[int, ...]
    numel: int
    refs: dict[str, Tensor]
    n_rows: int = 3  # sample rows: p0, p1, g (+ m, v_used, v_raw with state)
    k: int = 0  # sample size
    has_state: bool = False
    step_after: float | None = None  # None: on the device, read from the transfer
    step_before: float | None = None
    exact: Tensor | None = None  # fused sums from the optimizer
    shards: tuple[Any, tuple[int, ...]] | None = None  # DTensor: (mesh, sharded mesh dims)
    sample: list[Tensor] | None = None
    steps: Tensor | None = None


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

    Records are dicts: ``step`` (calls of ``step()`` so far), ``time``, ``loss``,
    ``loss_mean``, ``loss_std``, ``skipped`` (no tensor advanced), ``skipped_steps`` (the
    optimizer's counter, when it has one), ``overall``, ``groups`` and ``tensors`` (name ->
    signals), ``alerts`` (those raised at this record). The signals are documented in
    :mod:`adamkit.diagnostics.signals`.
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
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"Invalid every={every!r}: must be an int >= 1")
        self.optimizer = optimizer
        self.every = every
        self.sinks = list(sinks)
        self.tensors = tensors
        self.keep = keep
        self._names_arg = list(names) if _is_pair_iterator(names) else names
        config = AlertConfig.resolve(alerts)
        self._engine = AlertEngine(config, every) if config is not None else None
        self.alerts: list[Alert] = []
        self._history: list[dict[str, Any]] = []
        self._calls = 0
        self._pending_loss: list[Any] = []
        self._loss_queue: list[tuple[int, list[Any]]] = []
        self._loss_stats = S.RollingStats(max(loss_window, 2), 2)
        self._last_loss: float | None = None
        self._snapshot: list[_Snapshot] | None = None
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]

    # -- public ------------------------------------------------------------------------------

    def observe(self, *, loss: float | Tensor) -> None:
        """Feed the loss of the coming step (several calls before one step are averaged)."""
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}"
                )
            loss = loss.detach()
        else:
            loss = float(loss)
        self._pending_loss.append(loss)

    def latest(self) -> dict[str, Any] | None:
        """The last record (None before the first sampled step)."""
        return self._history[-1] if self._history else None

    def history(self) -> list[dict[str, Any]]:
        """All records kept so far, oldest first."""
        return list(self._history)

    def close(self) -> None:
        """Detach from the optimizer and close the sinks."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- hooks -------------------------------------------------------------------------------

    def _pre_hook(self, opt: Optimizer, args: tuple, kwargs: dict) -> None:
        if (self._calls + 1) % self.every:
            return
        has_closure = len(args) > 1 and args[1] is not None or kwargs.get("closure") is not None
        if getattr(opt, "supports_fused_signals", False) is True:
            opt.fused_signals_request = True
        snaps = []
        for g, group in enumerate(opt.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is None and not has_closure:
                    continue
                lp = _real(p)  # the local shard of a DTensor
                stride = S.sample_stride(lp.numel())
                st = opt.state.get(p)
                step = _step_value(st and st.get("step"))
                snaps.append(_Snapshot(p, g, i, stride, S.strided(lp, stride).clone(), step))
        self._snapshot = snaps

    def _post_hook(self, opt: Optimizer, args: tuple, kwargs: dict) -> None:
        self._calls += 1
        if self._pending_loss:
            self._loss_queue.append((self._calls, self._pending_loss))
            self._pending_loss = []
        if self._snapshot is None:
            return
        snaps, self._snapshot = self._snapshot, None
        fused = None
        if getattr(opt, "fused_signals_request", False):
            opt.fused_signals_request = False
            fused = getattr(opt, "fused_signal_sums", None) or {}
        record = self._measure(snaps, fused)
        losses = self._drain_losses()
        if losses:
            self._last_loss = losses[-1][1]
        mean, std = self._loss_stats.mean_std()
        record.update(
            loss=self._last_loss,
            loss_mean=None if math.isnan(mean) else mean,
            loss_std=None if math.isnan(std) else std,
        )
        raised = self._engine.evaluate(record, losses) if self._engine else []
        for alert in raised:
            log_alert(alert)
        self.alerts.extend(raised)
        record["alerts"] = [a.to_dict() for a in raised]
        if not self.tensors:
            record["tensors"] = {}
        self._history.append(record)
        if self.keep is not None and len(self._history) > self.keep:
            del self._history[: len(self._history) - self.keep]
        for sink in self.sinks:
            sink.write(record)

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
        self, snaps: list[_Snapshot], fused: dict[Tensor, Tensor] | None
    ) -> dict[str, Any]:
        """Queue every tensor's reads, move the numbers to the host at once, assemble.

        ``fused``: exact sums the optimizer computed inside its step, by param. The reads are
        batched: one multi-tensor norm per (device, dtype) for the gradients, the first and
        the second moments, one ``torch.cat`` of every sample per (device, dtype), one copy
        to the host per device.
        """
        opt = self.optimizer
        names = param_names(opt, self._names_arg)
        hyper = [_Hyper.of(group) for group in opt.param_groups]
        rows: list[_Row] = []
        for snap in snaps:
            p = snap.param
            if p.grad is None:  # a guard took the gradients away for this step
                continue
            g, lp = _real(p.grad), _real(p)
            row = _Row(
                names[snap.group][snap.index],
                snap.group,
                tuple(p.shape),
                p.numel() * (2 if p.is_complex() else 1),  # of the whole tensor, if sharded
                refs={"grad": g, "param": lp},
                shards=_shard_groups(p),
            )
            stride = snap.stride
            row.sample = [snap.before, S.strided(lp, stride), S.strided(g, stride)]
            st = read_state(opt, p)
            if st is not None:
                row.has_state = True
                m, v = _real(st["exp_avg"]), _real(st["exp_avg_sq"])
                row.refs.update(exp_avg=m, exp_avg_sq=v)
                vmax = st.get("max_exp_avg_sq") if hyper[snap.group].amsgrad else None
                v_used = v
                if vmax is not None:
                    row.refs["max_exp_avg_sq"] = v_used = _real(vmax)
                row.sample += [S.strided(x, stride) for x in (m, v_used, v)]
                step = _step_value(st["step"])
                if isinstance(step, Tensor) or isinstance(snap.step_before, Tensor):
                    before = 0.0 if snap.step_before is None else snap.step_before
                    row.steps = torch.stack(
                        [torch.as_tensor(x, dtype=torch.float64).to(g.device)
                         for x in (step, before)]
                    )  # fmt: skip
                else:
                    row.step_after, row.step_before = step, snap.step_before or 0.0
                if fused is not None and p in fused:
                    row.exact = fused[p].reshape(-1)
            row.k, row.n_rows = row.sample[0].numel(), len(row.sample)
            rows.append(row)
        transfer = _Transfer()
        norm_handles = _squared_norms(rows, transfer)
        sample_handles = transfer.add_many([row.sample for row in rows])
        step_handles = [transfer.add(r.steps) if r.steps is not None else None for r in rows]
        transfer.fetch()
        T = len(rows)
        K = max((r.k for r in rows), default=1)
        samples = np.full((T, len(S.SAMPLE_ROWS), K), np.nan)
        scalars = np.zeros((T, 3))  # grad_sq, m_sq, v_sq
        exact: dict[int, np.ndarray] = {}
        for i, row in enumerate(rows):
            fused_row = row.exact is not None
            row.sample = row.steps = row.exact = None
            got = transfer.get(norm_handles[i])
            if fused_row:
                exact[i] = got
                got = got[[S.COLUMNS.grad_sq, S.COLUMNS.m_sq, S.COLUMNS.v_sq]]
            scalars[i, : got.size] = got
            if step_handles[i] is not None:
                row.step_after, row.step_before = transfer.get(step_handles[i]).tolist()
            for j, handle in enumerate(sample_handles[i]):
                samples[i, j, : row.k] = transfer.get(handle)
        return self._assemble(rows, samples, scalars, exact, hyper)

    def _assemble(
        self,
        rows: list[_Row],
        samples: np.ndarray,
        scalars: np.ndarray,
        exact: dict[int, np.ndarray],
        hyper: list[_Hyper],
    ) -> dict[str, Any]:
        n_groups = len(self.optimizer.param_groups)
        T = len(rows)
        group = np.array([r.group for r in rows], dtype=np.int64)
        has_state = np.array([r.has_state for r in rows], dtype=bool)
        updated = np.array([r.has_state and r.step_after != r.step_before for r in rows])
        h = [hyper[g] for g in group]
        batch = S.SampleBatch(
            samples,
            np.array([r.k for r in rows], dtype=np.int64),
            np.array([r.numel for r in rows], dtype=np.int64),
            updated.astype(bool),
            np.array([r.step_after or 0.0 for r in rows], dtype=np.float64),
            *(np.array([getattr(x, f) for x in h], dtype=np.float64)
              for f in ("beta1", "beta2", "eps", "lr")),
        )  # fmt: skip
        sums, eff, weight = S.batch_sums(batch)
        sums["grad_sq"], sums["m_sq"], sums["v_sq"] = scalars.T.copy()
        sums["lag_grad_sq"] = np.where(updated, scalars[:, 0], 0.0)
        for i, vec in exact.items():
            one = {key: float(sums[key][i]) for key in S.ADDITIVE}
            S.use_exact(one, vec)
            for key, value in one.items():
                sums[key][i] = value
        quantiles = S.row_percentiles(eff)
        tensors: dict[str, dict[str, Any]] = {}
        nonfinite = np.zeros((T, 3), dtype=np.int64)
        for i, row in enumerate(rows):
            one = {key: float(sums[key][i]) for key in S.ADDITIVE}
            rec: dict[str, Any] = {"group": row.group, "shape": list(row.shape)}
            rec.update(numel=row.numel, updated=bool(updated[i]))
            if row.has_state:
                rec["opt_step"] = int(row.step_after)
            rec.update(_norms(one, row.has_state, 1))
            rec.update(S.sums_to_signals(one))
            for q, x in zip(S.PERCENTILES, quantiles[i]):
                rec[f"eff_lr_p{q}"] = None if np.isnan(x) else float(x)
            counts = self._nonfinite(row, scalars[i], samples[i, : row.n_rows, : row.k])
            rec.update(counts)
            nonfinite[i] = [counts[k] for k in _NONFINITE_KEYS]
            tensors[row.name] = rec

        def scope(members: np.ndarray) -> dict[str, Any]:
            one = {key: float(sums[key][members].sum()) for key in S.ADDITIVE}
            out: dict[str, Any] = {
                "numel": int(one["numel"]),
                "tensors": int(members.sum()),
                "updated": int(one["updated"]),
            }
            if has_state[members].any():
                out["opt_step"] = max(int(r.step_after) for r, m in zip(rows, members) if m
                                      and r.has_state)  # fmt: skip
            out.update(_norms(one, has_state[members].any(), members.sum()))
            out.update(S.sums_to_signals(one))
            qs = S.weighted_percentiles(eff, weight, members)
            out.update({f"eff_lr_p{q}": x for q, x in zip(S.PERCENTILES, qs)})
            out.update(zip(_NONFINITE_KEYS, (int(x) for x in nonfinite[members].sum(axis=0))))
            return out

        groups = []
        for g in range(n_groups):
            groups.append({"group": g, "lr": hyper[g].lr, "eps": hyper[g].eps, **scope(group == g)})
        if n_groups == 1:
            overall = {k: v for k, v in groups[0].items() if k not in ("group", "lr", "eps")}
        else:
            overall = scope(np.ones(T, dtype=bool))
        record: dict[str, Any] = {
            "step": self._calls,
            "time": time.time(),
            "skipped": overall["updated"] == 0,
        }
        skipped_steps = getattr(self.optimizer, "skipped_steps", None)
        if skipped_steps is not None:
            record["skipped_steps"] = int(skipped_steps)
        record.update(overall=overall, groups=groups, tensors=tensors)
        return record

    @staticmethod
    def _nonfinite(row: _Row, norms: np.ndarray, sample: np.ndarray) -> dict[str, int]:
        """Exact NaN/inf counts, taken (one more pass) only when a norm or the sample shows a
        non-finite value."""
        if np.isfinite(norms).all() and np.isfinite(sample).all():
            return dict.fromkeys(_NONFINITE_KEYS, 0)
        state = [row.refs[k] for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in row.refs]
        return {
            "grad_nonfinite": int(S.nonfinite_count(row.refs["grad"])),
            "state_nonfinite": int(S.nonfinite_count(*state)) if state else 0,
            "param_nonfinite": int(S.nonfinite_count(row.refs["param"])),
        }


def _norms(sums: dict[str, float], has_state: bool, tensors: int) -> dict[str, float | None]:
    return {
        "grad_norm": math.sqrt(sums["grad_sq"]) if tensors else None,
        "grad_rms": math.sqrt(sums["grad_sq"] / max(sums["numel"], 1)) if tensors else None,
        "exp_avg_norm": math.sqrt(sums["m_sq"]) if has_state else None,
        "exp_avg_sq_norm": math.sqrt(sums["v_sq"]) if has_state else None,
    }


def _real(t: Tensor) -> Tensor:
    """The local shard (DTensor) as a real tensor, detached."""
    t = local(t.detach())
    return torch.view_as_real(t) if t.is_complex() else t


class _Transfer:
    """Tensors to move to the host together: one ``torch.cat`` and one copy per device."""

    def __init__(self) -> None:
        self._parts: dict[torch.device, list[Tensor]] = {}
        self._sizes: dict[torch.device, int] = {}
        self._host: dict[torch.device, np.ndarray] = {}

    def add(self, t: Tensor) -> tuple[torch.device, int, int]:
        """Queue ``t`` (any shape and dtype); returns the handle of its values."""
        dev, n = t.device, t.numel()
        offset = self._sizes.get(dev, 0)
        self._parts.setdefault(dev, []).append(t.reshape(-1).to(torch.float64))
        self._sizes[dev] = offset + n
        return dev, offset, n

    def add_many(self, groups: list[list[Tensor]]) -> list[list[tuple]]:
        """Queue many small 1-d tensors with one ``torch.cat`` per (device, dtype)."""
        by_key: dict[tuple, list[tuple[int, int, Tensor]]] = {}
        for i, tensors in enumerate(groups):
            for j, t in enumerate(tensors):
                by_key.setdefault((t.device, t.dtype), []).append((i, j, t))
        out: list[list[tuple]] = [[None] * len(ts) for ts in groups]
        for items in by_key.values():
            dev, base, _ = self.add(torch.cat([t for _, _, t in items]))
            for i, j, t in items:
                out[i][j] = (dev, base, t.numel())
                base += t.numel()
        return out

    def fetch(self) -> None:
        self._host = {d: torch.cat(ps).cpu().numpy() for d, ps in self._parts.items()}
        self._parts = {}

    def get(self, handle: tuple[torch.device, int, int]) -> np.ndarray:
        dev, offset, n = handle
        return self._host[dev][offset : offset + n]


def _squared_norms(rows: list[_Row], transfer: _Transfer) -> list[tuple]:
    """Queue, for every row, sum(g^2) (and sum(m^2), sum(v^2) with state) or, when the
    optimizer fused them, its exact sums; returns the handles by row.

    Plain tensors: one multi-tensor norm per (device, compute dtype) and per kind. Sharded
    (DTensor) params: the sums of the local shards, added up over the shards with one
    all-reduce per layout.
    """
    kinds = ("grad", "exp_avg", "exp_avg_sq")
    out: list[tuple | None] = [None] * len(rows)
    batches: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        n = S.N_SUMS if row.exact is not None else 3 if row.has_state else 1
        dtype = compute_dtype(row.refs["grad"])
        mesh, dims = row.shards if row.shards is not None else (None, ())
        key = (row.refs["grad"].device, id(mesh), dims, n, dtype, row.exact is not None)
        batches.setdefault(key, []).append(i)
    for (_, _, dims, n, dtype, fused), idx in batches.items():
        if fused:
            stacked = torch.stack([rows[i].exact.to(dtype) for i in idx])
        else:
            norms = [_tensor_norms([rows[i].refs[k] for i in idx], dtype) for k in kinds[:n]]
            stacked = torch.stack(norms, dim=1).square()
        if dims:
            mesh = rows[idx[0]].shards[0]
            for d in dims:
                torch.distributed.all_reduce(stacked, group=mesh.get_group(d))
        dev, base, _ = transfer.add(stacked)
        for j, i in enumerate(idx):
            out[i] = (dev, base + j * n, n)
    return out


def _tensor_norms(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """||t||_2 of each tensor, accumulated in ``dtype``: one multi-tensor kernel."""
    foreach_norm = getattr(torch, "_foreach_norm", None)
    if foreach_norm is not None:
        try:
            return torch.stack(foreach_norm(tensors, 2, dtype=dtype))
        except (RuntimeError, TypeError):  # an older signature or an unsupported layout
            pass
    return torch.stack([torch.linalg.vector_norm(t, dtype=dtype) for t in tensors])


def _shard_groups(t: Tensor) -> tuple[Any, tuple[int, ...]] | None:
    """(mesh, mesh dims) over which a DTensor is sharded: the sums of its local shards add up
    over those dims. None for plain tensors and fully replicated DTensors."""
    if not is_dtensor(t):
        return None
    dims = tuple(i for i, pl in enumerate(t.placements) if pl.is_shard())
    return (t.device_mesh, dims) if dims else None


def _is_pair_iterator(names: Any) -> bool:
    """A one-shot iterator of (name, param) pairs, e.g. ``model.named_parameters()``."""
    return (
        names is not None
        and not isinstance(names, (nn.Module, list, tuple, dict))
        and isinstance(names, Iterable)
    )
