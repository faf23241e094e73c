"""A small training loop; side effects hang off it as callbacks."""

from mcp.training.loop import Callback, EarlyStopping, ProgressBar, Trainer, evaluate
from mcp.training.setup import FineTune, build_optimizer, build_scheduler, lr_factor, resolve_device

__all__ = [
    "Callback", "EarlyStopping", "ProgressBar", "Trainer", "evaluate",
    "FineTune", "build_optimizer", "build_scheduler", "lr_factor", "resolve_device",
]
