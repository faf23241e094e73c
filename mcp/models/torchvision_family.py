"""ResNet-18/50 and MobileNetV2 from torchvision, with the stem adapted to the input:
a stride-1 3x3 stem without max-pool for inputs of 32 px or less (the usual CIFAR
variant), the ImageNet stem otherwise; any number of input channels."""

from __future__ import annotations

from torch import nn

from mcp.models.layers import is_small
from mcp.models.registry import register_model


def _resnet(builder, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    model = builder(weights=None, num_classes=num_classes)
    if is_small(input_shape):
        model.conv1 = nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(input_shape[0], 64, 7, 2, 3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@register_model("resnet18")
def resnet18(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """ResNet-18 (He et al. 2016), torchvision's definition."""
    from torchvision.models import resnet18 as tv

    return _resnet(tv, num_classes, input_shape)


@register_model("resnet50")
def resnet50(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """ResNet-50 (He et al. 2016), torchvision's definition."""
    from torchvision.models import resnet50 as tv

    return _resnet(tv, num_classes, input_shape)


@register_model("mobilenet_v2")
def mobilenet_v2(num_classes: int, input_shape: tuple[int, int, int], width: float = 1.0) -> nn.Module:
    """MobileNetV2 (Sandler et al. 2018), torchvision's definition, width multiplier `width`."""
    from torchvision.models import mobilenet_v2 as tv

    if width <= 0:
        raise ValueError(f"width={width!r} must be positive")
    model = tv(weights=None, num_classes=num_classes, width_mult=width)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(input_shape[0], stem.out_channels, 3, 1 if is_small(input_shape) else 2,
                                     1, bias=False)
    nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    return model
