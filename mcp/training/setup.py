"""Devices, optimizers and learning-rate schedules (schedules are plain functions)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mcp.errors import McpError


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; 'cuda' without CUDA is an error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise McpError("device='cuda' was asked for but CUDA is not available here; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise McpError(f"device={name!r} is not allowed; choose one of: auto, cpu, cuda")
    return name


def lr_factor(kind: str, epoch: int, epochs: int, step_size: int = 10, gamma: float = 0.1) -> float:
    """Multiplier of the peak LR during ``epoch`` (0-based) of ``epochs``."""
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if kind == "step":
        return gamma ** (epoch // step_size)
    if kind == "constant":
        return 1.0
    raise ValueError(f"unknown LR schedule {kind!r}; choose one of: cosine, step, constant")


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float = 0.9, nesterov: bool = True,
                    weight_decay: float = 0.0) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                               weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of: sgd, adamw")


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, epochs: int, step_size: int = 10,
                    gamma: float = 0.1, start_epoch: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch schedule: ``scheduler.step()`` once after every epoch. ``start_epoch``
    continues a schedule on a new optimizer (after a structured pruning step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: lr_factor(kind, epoch + start_epoch, epochs, step_size, gamma))


@dataclass(frozen=True)
class FineTune:
    """How a compressed model is fine-tuned: epochs, optimizer and LR schedule."""

    epochs: int = 10
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "cosine"
    nesterov: bool = True
    seed: int = 0

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(model, self.optimizer, self.lr, self.momentum, self.nesterov, self.weight_decay)

    def make_scheduler(self, optimizer: torch.optim.Optimizer,
                       start_epoch: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
        return build_scheduler(optimizer, self.scheduler, self.epochs, start_epoch=start_epoch)
