"""Small building blocks shared by model definitions."""

from __future__ import annotations

from torch import nn


def is_small(input_shape: tuple[int, int, int]) -> bool:
    """CIFAR-scale input (32 px or less): use a stride-1 stem and no early max-pool."""
    return max(input_shape[1:]) <= 32


def conv_features(in_channels: int, cfg: list, size: int, batch_norm: bool = False,
                  kernel: int = 3) -> tuple[nn.Sequential, int, int]:
    """Conv stack from a VGG-style list ('M' = 2x2 max-pool); pools that would shrink the
    feature map below 1 px are skipped so the stack fits any input size.
    Returns (features, out_channels, out_size)."""
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            if size >= 2:
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
            continue
        layers.append(nn.Conv2d(c, v, kernel, padding=kernel // 2, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        c = v
    return nn.Sequential(*layers), c, size


def init_weights(module: nn.Module) -> None:
    """Kaiming init for convs, BN to identity, small normal for linears (torchvision's recipe)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
