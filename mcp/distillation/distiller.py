"""The verb: ``Distiller(teacher, DistillSpec)`` is the Trainer's batch loss.

``Trainer(..., batch_loss=distiller)`` trains a student on
``(1 - alpha) * CE + alpha * T^2 * KL + hint_weight * hint`` and logs each part per
epoch (``ce_loss``, ``kd_loss``, ``hint_loss``). The same object is the recovery loss
of pruning and quantization-aware training, with the uncompressed model as teacher.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from mcp.distillation.hints import HintLoss, parse_hint_layers
from mcp.distillation.loss import distillation_loss
from mcp.errors import ConfigError


@dataclass(frozen=True)
class DistillSpec:
    temperature: float = 4.0
    alpha: float = 0.9
    hint_layers: str = ""
    hint_weight: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature!r} must be positive")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha={self.alpha!r} is outside [0, 1] (the weight of the distillation term)")
        if self.hint_weight < 0:
            raise ConfigError(f"hint_weight={self.hint_weight!r} must be 0 or more")
        parse_hint_layers(self.hint_layers)


class Distiller:
    """Distillation from a frozen copy of ``teacher``; call it as ``(student, x, y)``."""

    def __init__(self, teacher: nn.Module, spec: DistillSpec, student: nn.Module | None = None,
                 input_shape: Sequence[int] | None = None):
        self.spec = spec
        self.teacher = copy.deepcopy(teacher).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        pairs = parse_hint_layers(spec.hint_layers)
        self.hints: HintLoss | None = None
        if pairs:
            if student is None or input_shape is None:
                raise ValueError("hint layers need the student and the input shape")
            self.hints = HintLoss(student, self.teacher, pairs, input_shape)

    def to(self, device: str | torch.device) -> "Distiller":
        self.teacher.to(device)
        if self.hints is not None:
            self.hints.to(device)
        return self

    def parameters(self) -> list[nn.Parameter]:
        """The adapters' parameters: train them with the student's (see :meth:`attach`)."""
        return list(self.hints.parameters()) if self.hints is not None else []

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Add the adapters to ``optimizer`` (same LR, no weight decay)."""
        params = self.parameters()
        if params:
            optimizer.add_param_group({"params": params, "weight_decay": 0.0})

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        self.teacher.eval()
        return self.teacher(x)

    def __call__(self, student: nn.Module, x: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        spec = self.spec
        t_out = self.teacher_logits(x)
        s_out = student(x)
        loss, ce, kd = distillation_loss(s_out, t_out, y, spec.temperature, spec.alpha, spec.label_smoothing)
        parts = {"ce_loss": ce.item(), "kd_loss": kd.item()}
        if self.hints is not None:
            hint = self.hints()
            loss = loss + spec.hint_weight * hint
            parts["hint_loss"] = hint.item()
        return loss, s_out, parts

    def close(self) -> None:
        """Remove the hooks from the student and the teacher (before the student is saved)."""
        if self.hints is not None:
            self.hints.remove()
