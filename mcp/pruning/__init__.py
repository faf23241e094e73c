"""Pruning: criteria score (importance.py), pruners cut (pruner.py), schedules time
(schedules.py); engine.py composes them and hooks them into training."""

from mcp.pruning.engine import (GRANULARITIES, SCOPES, BNL1Penalty, KeepSparsity, PruneSpec, Pruning, PruningCallback,
                                prune)
from mcp.pruning.importance import create_criterion, criterion_names
from mcp.pruning.schedules import SCHEDULES, event_steps, gradual, iterative, one_shot

__all__ = [
    "GRANULARITIES", "SCOPES", "SCHEDULES", "BNL1Penalty", "KeepSparsity", "PruneSpec", "Pruning", "PruningCallback",
    "prune",
    "create_criterion", "criterion_names", "event_steps", "gradual", "iterative", "one_shot",
]
