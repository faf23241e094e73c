"""Tiny test variants: every code path on a model that trains in a second."""

from __future__ import annotations

import math

import torch
from torch import nn

from mcp.models.registry import register_model


@register_model("tiny_mlp", tiny=True)
def tiny_mlp(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """Test variant: a 32-16 fully connected network."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(input_shape), 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
        nn.Linear(16, num_classes),
    )


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@register_model("tiny_cnn", tiny=True)
def tiny_cnn(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """Test variant: two conv-BN-ReLU layers and a linear classifier."""
    return TinyCNN(num_classes, input_shape)
