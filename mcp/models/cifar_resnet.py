"""CIFAR ResNets (He et al. 2016, section 4.2): 6n+2 layers in three stages of 16/32/64
channels. Shortcuts that change shape use a 1x1 conv + BN (option B), which keeps the
dependency graph explicit for structured pruning."""

from __future__ import annotations

import torch
from torch import nn

from mcp.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, in_c: int, out_c: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_c, out_c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_c)
        self.conv2 = nn.Conv2d(out_c, out_c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_c)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_c != out_c:
            self.shortcut = nn.Sequential(nn.Conv2d(in_c, out_c, 1, stride, bias=False), nn.BatchNorm2d(out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, input_shape: tuple[int, int, int],
                 widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(input_shape[0], widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, in_c = [], widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_c, w, 2 if (i > 0 and j == 0) else 1))
                in_c = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _widths(width: float) -> tuple[int, int, int]:
    if width <= 0:
        raise ValueError(f"width={width!r} must be positive")
    return tuple(max(1, round(c * width)) for c in (16, 32, 64))  # type: ignore[return-value]


@register_model("resnet20")
def resnet20(num_classes: int, input_shape: tuple[int, int, int], width: float = 1.0) -> nn.Module:
    """ResNet-20 for CIFAR (0.27M parameters at width 1)."""
    return CifarResNet(20, num_classes, input_shape, _widths(width))


@register_model("resnet56")
def resnet56(num_classes: int, input_shape: tuple[int, int, int], width: float = 1.0) -> nn.Module:
    """ResNet-56 for CIFAR (0.85M parameters at width 1)."""
    return CifarResNet(56, num_classes, input_shape, _widths(width))


@register_model("tiny_resnet", tiny=True)
def tiny_resnet(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """Test variant: ResNet-8 with 8/16/32 channels (residual additions, BN, downsampling)."""
    return CifarResNet(8, num_classes, input_shape, (8, 16, 32))
