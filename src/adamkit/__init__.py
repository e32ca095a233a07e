"""adamkit: Adam and AdamW for PyTorch, exact, fused, lean in memory and observable."""

from adamkit.groups import param_groups
from adamkit.optim import Adam, AdamW

__version__ = "0.1.0"

__all__ = ["Adam", "AdamW", "param_groups", "__version__"]
