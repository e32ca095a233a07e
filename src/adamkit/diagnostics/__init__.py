"""Diagnostics: signals, the Monitor, alerts, sinks, guards and the run report."""

from adamkit.diagnostics.alerts import ALERT_NAMES, Alert, AlertConfig
from adamkit.diagnostics.guards import SpikeGuard
from adamkit.diagnostics.monitor import Monitor
from adamkit.diagnostics.sinks import CSVSink, JSONLSink, TensorBoardSink, read_jsonl

__all__ = [
    "ALERT_NAMES",
    "Alert",
    "AlertConfig",
    "CSVSink",
    "JSONLSink",
    "Monitor",
    "SpikeGuard",
    "TensorBoardSink",
    "read_jsonl",
]
