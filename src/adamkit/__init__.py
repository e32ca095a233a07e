"""adamkit: Adam and AdamW for PyTorch, exact, fused, lean in memory and observable."""

from adamkit import schedules
from adamkit.diagnostics import Monitor, SpikeGuard
from adamkit.groups import param_groups
from adamkit.memory import export_state_dict, memory_report
from adamkit.optim import Adam, AdamW
from adamkit.schedules import Scheduler

__version__ = "0.1.0"

__all__ = [
    "Adam",
    "AdamW",
    "Monitor",
    "Scheduler",
    "SpikeGuard",
    "export_state_dict",
    "memory_report",
    "param_groups",
    "schedules",
    "__version__",
]
