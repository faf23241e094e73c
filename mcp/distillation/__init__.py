"""Distillation: KD loss, hint loss with adapters, and the Trainer hook that uses them
(a student from a teacher, or the recovery loss of pruning and QAT)."""

from mcp.distillation.distiller import DistillSpec, Distiller
from mcp.distillation.hints import HintLoss, HintPair, parse_hint_layers
from mcp.distillation.loss import distillation_loss, kd_loss

__all__ = ["DistillSpec", "Distiller", "HintLoss", "HintPair", "distillation_loss", "kd_loss", "parse_hint_layers"]
