"""Named alerts raised from monitor records, once per episode, logged through ``logging``.

An alert fires when its condition has held for ``patience`` steps; it is then not raised again
for the same (name, tensor) until the condition has been false for ``cooldown`` steps (the
episode ended). Alerts go to ``logging.getLogger("adamkit")`` at WARNING.

Default thresholds (REFERENCE.md section 5 and the papers it cites) are the fields of
:class:`AlertConfig`; set a threshold to ``None`` to switch that alert off::

    Monitor(opt, alerts=AlertConfig(eps_dominated=0.9, sign_descent=None))
    Monitor(opt, alerts={"update_too_large": -1.5})

Where an alert is judged:

- per tensor: ``eps_dominated`` (every tensor), ``update_stalled``, ``update_too_large`` and
  ``sign_descent`` (tensors with ``ndim >= 2`` only: the update-to-weight ratio of a bias
  initialised at zero is meaningless for its first steps, and 1-d tensors of a few entries are
  too noisy to judge a distribution);
- overall: ``second_moment_lag`` (sum over the model), ``loss_spike`` (every observed loss),
  ``grad_spike`` (the total grad norm of sampled steps), ``nonfinite`` (the first tensor with
  NaN/inf in its gradient, state or value, or a non-finite loss).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, NamedTuple

import numpy as np

from adamkit.diagnostics.signals import RollingStats

logger = logging.getLogger("adamkit")

ALERT_NAMES = (
    "eps_dominated",
    "update_stalled",
    "update_too_large",
    "sign_descent",
    "second_moment_lag",
    "loss_spike",
    "grad_spike",
    "nonfinite",
)


@dataclass(frozen=True)
class Alert:
    """One alert: what fired, where, on which value against which threshold, and what to try."""

    name: str
    step: int
    tensor: str | None
    value: float
    threshold: float
    message: str

    def __str__(self) -> str:
        where = f" in {self.tensor}" if self.tensor else ""
        return f"adamkit alert {self.name} at step {self.step}{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AlertConfig:
    """Thresholds (``None`` switches an alert off) and timing, in optimizer steps.

    - ``eps_dominated`` 0.5: fraction of a tensor's entries (those with v > 0) that have
      sqrt(v_hat) < eps, above which eps, not the gradient, sets the step (Kingma & Ba saw
      v_hat vanish; small transformers lower eps to 1e-15 to fix it).
    - ``update_stalled`` -5.0 and ``update_too_large`` -1.0: bounds on
      log10(rms(dp) / rms(p)), about -3 when healthy (REFERENCE.md section 5).
    - ``sign_descent`` 0.5: fraction of entries with |u| > 0.5. Healthy Adam has most of |u|
      well below 0.5 once v averages many steps (the digits MLP: about 0.1-0.2); sign descent
      has nearly every entry at |u| ~ 1 (Molybog et al. 2023: bimodal updates precede spikes).
    - ``second_moment_lag`` 1e-3: sum(g^2) / sum(v_hat) of the whole model below which v
      remembers gradients more than 30x larger than the current ones (beta2 = 0.999 takes
      about 7000 steps to forget a 1000x drop in g^2).
    - ``loss_spike`` and ``grad_spike`` 6.0: sigmas above the rolling mean over
      ``spike_window`` = 128 values after ``spike_warmup`` = 64 (OLMo's skip-step rule).
    - ``nonfinite`` True: any NaN/inf in a gradient, a moment, a param or the loss.
    - ``warmup`` 100: steps before ``sign_descent`` and ``second_moment_lag`` are judged (at
      step 1, u = sign(g) exactly, and v_hat averages only a few gradients early on).
    - ``patience`` for the slow conditions: ``update_stalled`` 10, ``sign_descent`` 20,
      ``second_moment_lag`` 100 steps; the others fire on the first step they hold.
    - ``cooldown`` 50: steps a condition must stay false before it can fire again.
    """

    eps_dominated: float | None = 0.5
    update_stalled: float | None = -5.0
    update_too_large: float | None = -1.0
    sign_descent: float | None = 0.9
    second_moment_lag: float | None = 1e-3
    loss_spike: float | None = 6.0
    grad_spike: float | None = 6.0
    nonfinite: bool = True
    spike_window: int = 128
    spike_warmup: int = 64
    warmup: int = 100
    stalled_patience: int = 10
    sign_descent_patience: int = 20
    lag_patience: int = 100
    cooldown: int = 50

    @classmethod
    def resolve(cls, alerts: bool | AlertConfig | dict[str, Any] | None) -> AlertConfig | None:
        """``True`` -> defaults, ``False``/``None`` -> no alerts, a dict -> defaults updated."""
        if alerts is True:
            return cls()
        if alerts is False or alerts is None:
            return None
        if isinstance(alerts, cls):
            return alerts
        if isinstance(alerts, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(alerts) - known)
            if unknown:
                raise ValueError(f"Unknown alert settings {unknown}; known: {sorted(known)}")
            return replace(cls(), **alerts)
        raise TypeError(
            f"alerts must be a bool, an AlertConfig or a dict, got {type(alerts).__name__}"
        )


class TensorTable(NamedTuple):
    """The per-tensor values the alerts judge, one entry per tensor (NaN where a record has
    None): what :meth:`AlertEngine.evaluate` reads instead of the record's dicts."""

    names: list[str]
    updated: np.ndarray  # bool
    matrix: np.ndarray  # bool: ndim >= 2
    opt_step: np.ndarray  # the tensor's own step count (NaN: not known, the record's step)
    eps_frac: np.ndarray
    ratio: np.ndarray  # log10_update_to_weight
    large: np.ndarray  # large_update_frac
    grad_rms: np.ndarray
    eps: np.ndarray  # its group's eps (for the message)
    nonfinite: np.ndarray  # [T, 3] counts: grad, state, param

    def index(self) -> dict[str, int]:
        """name -> row."""
        return {name: i for i, name in enumerate(self.names)}

    @staticmethod
    def of_record(record: dict[str, Any]) -> TensorTable:
        """The table of a record's ``tensors`` dicts (and its groups' eps)."""
        tensors = record.get("tensors") or {}
        groups = record.get("groups") or []

        def column(key: str, rows: list[dict[str, Any]]) -> np.ndarray:
            return np.array([np.nan if t.get(key) is None else t[key] for t in rows], float)

        rows = list(tensors.values())
        eps = []
        for t in rows:
            g = t.get("group")
            group = groups[g] if g is not None and g < len(groups) else {}
            eps.append(group.get("eps", 0.0))
        nonfinite = [
            [t.get(f"{what}_nonfinite") or 0 for what in ("grad", "state", "param")] for t in rows
        ]
        return TensorTable(
            list(tensors),
            np.array([bool(t.get("updated")) for t in rows], dtype=bool),
            np.array([len(t.get("shape", ())) >= 2 for t in rows], dtype=bool),
            column("opt_step", rows),
            column("eps_dominated_frac", rows),
            column("log10_update_to_weight", rows),
            column("large_update_frac", rows),
            column("grad_rms", rows),
            np.array(eps, dtype=float),
            np.array(nonfinite, dtype=np.int64).reshape(len(rows), 3),
        )


@dataclass
class _Episode:
    active: bool = False
    streak_start: int | None = None
    last_true: int = -(10**9)


class AlertEngine:
    """Judges records as they come, keeping the episode and spike state between them.

    ``every`` is the monitor's sampling period: a condition seen at one sample counts for
    ``every`` steps toward its patience.
    """

    def __init__(self, config: AlertConfig, every: int = 1) -> None:
        self.config = config
        self.every = every
        self._episodes: dict[tuple[str, str | None], _Episode] = {}
        self._loss = RollingStats(config.spike_window, config.spike_warmup)
        self._grad = RollingStats(config.spike_window, config.spike_warmup)

    # -- episodes ----------------------------------------------------------------------------

    def _judge(
        self, name: str, tensor: str | None, step: int, holds: bool, patience: int = 1
    ) -> bool:
        """Update the episode of (name, tensor); True when a new alert must be raised.

        An episode neither active nor in a streak is no episode: it is dropped, so that the
        episodes kept are the few :meth:`_check_tensors` must look at whatever holds."""
        key = (name, tensor)
        ep = self._episodes.get(key)
        if not holds:
            if ep is None:
                return False
            ep.streak_start = None
            if ep.active and step - ep.last_true >= self.config.cooldown:
                ep.active = False
            if not ep.active:
                del self._episodes[key]
            return False
        if ep is None:
            ep = self._episodes[key] = _Episode()
        if ep.streak_start is None:
            ep.streak_start = step
        ep.last_true = step
        if ep.active or step - ep.streak_start + self.every < patience:
            return False
        ep.active = True
        return True

    # -- the checks --------------------------------------------------------------------------

    def evaluate(
        self,
        record: dict[str, Any],
        losses: list[tuple[int, float]] = (),
        table: TensorTable | None = None,
    ) -> list[Alert]:
        """Alerts raised by ``record`` and by the ``losses`` observed since the last record.

        ``table``: the record's tensors as arrays (:class:`TensorTable`), when the caller has
        them (the Monitor); else they are read from ``record["tensors"]``."""
        c = self.config
        step = record["step"]
        out: list[Alert] = []
        if c.loss_spike is not None or c.nonfinite:
            for loss_step, loss in losses:
                out.extend(self._check_loss(loss_step, loss))
        if table is None:
            table = TensorTable.of_record(record)
        out.extend(self._check_tensors(step, table))
        out.extend(self._check_overall(step, record.get("overall", {})))
        if c.nonfinite:
            out.extend(self._check_nonfinite(step, table, bool(record.get("skipped"))))
        return out

    def _check_loss(self, step: int, loss: float) -> list[Alert]:
        c = self.config
        out = []
        if c.nonfinite and self._judge("nonfinite", None, step, not math.isfinite(loss)):
            out.append(
                Alert(
                    "nonfinite",
                    step,
                    None,
                    loss,
                    0.0,
                    f"the loss is {loss}. Look for the op that produced it "
                    "(torch.autograd.set_detect_anomaly), lower the lr, and keep such steps "
                    "out of the moments (skip_nonfinite=True).",
                )
            )
        if c.loss_spike is not None:
            bound = self._loss.bound(c.loss_spike)
            mean, std = self._loss.mean_std()
            spike = self._loss.is_spike(loss, c.loss_spike)
            if self._judge("loss_spike", None, step, spike):
                out.append(
                    Alert(
                        "loss_spike",
                        step,
                        None,
                        loss,
                        bound,
                        f"loss {loss:.4g} is above the rolling mean {mean:.4g} + "
                        f"{c.loss_spike:g} sigma ({bound:.4g}) of the last "
                        f"{len(self._loss.values)} losses. Lower the lr or add warmup, clip "
                        "gradients, inspect the batch, or skip such steps (adamkit.SpikeGuard).",
                    )
                )
            self._loss.add(loss)
        return out

    def _check_tensors(self, step: int, t: TensorTable) -> list[Alert]:
        """The per-tensor alerts, judged on arrays: a tensor is looked at one by one only where
        its condition holds or an episode of it is open (in a healthy run: none)."""
        c = self.config
        updated = t.updated
        on_matrix = updated & t.matrix
        # (NaN compares False, without a warning)
        checks = []
        if c.eps_dominated is not None:
            judged = updated & ~np.isnan(t.eps_frac)
            checks.append(("eps_dominated", judged, t.eps_frac > c.eps_dominated, 1))
        if c.update_too_large is not None or c.update_stalled is not None:
            finite_ratio = on_matrix & np.isfinite(t.ratio)
        if c.update_too_large is not None:
            holds = t.ratio > c.update_too_large
            checks.append(("update_too_large", finite_ratio, holds, 1))
        if c.update_stalled is not None:
            holds = t.ratio < c.update_stalled
            checks.append(("update_stalled", finite_ratio, holds, c.stalled_patience))
        if c.sign_descent is not None:
            late = np.where(np.isnan(t.opt_step), step, t.opt_step) > c.warmup
            judged = on_matrix & ~np.isnan(t.large) & late
            holds = t.large > c.sign_descent
            checks.append(("sign_descent", judged, holds, c.sign_descent_patience))
        raised = []
        for order, (name, judged, holds, patience) in enumerate(checks):
            open_ = [t for n, t in self._episodes if n == name and t is not None]
            hits = judged & holds
            if not open_ and not hits.any():
                continue
            look = np.flatnonzero(hits).tolist()
            if open_:
                index = t.index()
                look = sorted({*look, *(index[n] for n in open_ if n in index)})
            for i in look:
                if judged[i] and self._judge(name, t.names[i], step, bool(holds[i]), patience):
                    raised.append((i, order, self._tensor_alert(name, step, t, i)))
        if not raised:
            return []
        return [alert for _, _, alert in sorted(raised, key=lambda x: x[:2])]

    def _tensor_alert(self, name: str, step: int, t: TensorTable, i: int) -> Alert:
        c = self.config
        tensor = t.names[i]
        if name == "eps_dominated":
            frac = float(t.eps_frac[i])
            return Alert(
                name,
                step,
                tensor,
                frac,
                c.eps_dominated,
                f"{frac:.0%} of the entries that have a gradient have sqrt(v_hat) < "
                f"eps={t.eps[i]:g} (gradient rms {t.grad_rms[i]:.2g}): "
                "eps, not the gradient, sets the step there, so the update shrinks "
                "toward m_hat/eps. Lower eps (1e-10 to 1e-15) or scale the loss up.",
            )
        ratio = float(t.ratio[i])
        if name == "update_too_large":
            return Alert(
                name,
                step,
                tensor,
                ratio,
                c.update_too_large,
                f"log10(rms(update)/rms(weight)) = {ratio:.2f} (above "
                f"{c.update_too_large:g}; about -3 is healthy): one step changes the "
                f"weights by {10**ratio:.0%} of their size. Lower the lr or add warmup.",
            )
        if name == "update_stalled":
            return Alert(
                name,
                step,
                tensor,
                ratio,
                c.update_stalled,
                f"log10(rms(update)/rms(weight)) = {ratio:.2f} (below "
                f"{c.update_stalled:g}; about -3 is healthy): the weights barely move. "
                "Check the lr and its schedule, whether eps dominates the denominator "
                "and whether this tensor's gradient is tiny.",
            )
        large = float(t.large[i])
        return Alert(
            name,
            step,
            tensor,
            large,
            c.sign_descent,
            f"{large:.0%} of the normalised updates have |m_hat/(sqrt(v_hat)+eps)|"
            " > 0.5: Adam is doing sign descent (bimodal updates, which Molybog et "
            "al. 2023 saw before loss spikes). Raise beta2 if it is low (0.95-0.999),"
            " lower the lr, or clip gradients.",
        )

    def _check_overall(self, step: int, o: dict[str, Any]) -> list[Alert]:
        c = self.config
        out = []
        lag = o.get("second_moment_lag")
        opt_step = o.get("opt_step", step)
        if c.second_moment_lag is not None and lag is not None and opt_step > c.warmup:
            if self._judge(
                "second_moment_lag", None, step, lag < c.second_moment_lag, c.lag_patience
            ):
                out.append(
                    Alert(
                        "second_moment_lag",
                        step,
                        None,
                        lag,
                        c.second_moment_lag,
                        f"sum(g^2)/sum(v_hat) = {lag:.2g} (below {c.second_moment_lag:g} for "
                        f"{c.lag_patience} steps): v remembers gradients "
                        f"{1 / math.sqrt(lag):.0f}x larger than the current ones and decays "
                        "only at rate beta2, so it no longer tracks the gradient; when a large "
                        "gradient comes back the update can spike. Try a lower beta2 (0.95) or"
                        " gradient clipping.",
                    )
                )
        gn = o.get("grad_norm")
        if c.grad_spike is not None and gn is not None:
            bound = self._grad.bound(c.grad_spike)
            mean, _ = self._grad.mean_std()
            if self._judge("grad_spike", None, step, self._grad.is_spike(gn, c.grad_spike)):
                out.append(
                    Alert(
                        "grad_spike",
                        step,
                        None,
                        gn,
                        bound,
                        f"grad norm {gn:.4g} is above the rolling mean {mean:.4g} + "
                        f"{c.grad_spike:g} sigma ({bound:.4g}) of the last "
                        f"{len(self._grad.values)} sampled steps. Clip gradients, inspect the "
                        "batch, or skip such steps (adamkit.SpikeGuard).",
                    )
                )
            self._grad.add(gn)
        return out

    def _check_nonfinite(self, step: int, t: TensorTable, skipped: bool) -> list[Alert]:
        rows = np.flatnonzero(t.nonfinite.any(axis=1)).tolist()
        if not self._judge("nonfinite", None, step, bool(rows)):
            return []
        counts = dict(zip(("grad", "state", "param"), t.nonfinite[rows[0]].tolist()))
        where = ", ".join(f"{n} in the {what}" for what, n in counts.items() if n)
        others = [t.names[i] for i in rows[1:]]
        also = f" (also in {len(others)} more: {', '.join(others[:4])})" if others else ""
        return [
            Alert(
                "nonfinite",
                step,
                t.names[rows[0]],
                float(sum(counts.values())),
                0.0,
                f"NaN/inf entries: {where}{also}. "
                + (
                    "The step was skipped: params and state are unchanged. If it recurs, "
                    "find the op with torch.autograd.set_detect_anomaly, lower the lr, or use "
                    "loss scaling with fp16."
                    if skipped
                    else "A non-finite gradient poisons m and v for about 1/(1-beta2) steps. "
                    "Keep such steps out (skip_nonfinite=True or adamkit.SpikeGuard), find "
                    "the op with torch.autograd.set_detect_anomaly, lower the lr, or use loss "
                    "scaling with fp16."
                ),
            )
        ]


def log_alert(alert: Alert) -> None:
    """Log ``alert`` at WARNING on the ``adamkit`` logger."""
    logger.warning("%s", alert)
