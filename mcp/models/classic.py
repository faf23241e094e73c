"""LeNet-300-100, LeNet-5 (LeCun's and Caffe's), VGG-16(-BN) and AlexNet, adapted to any input size."""

from __future__ import annotations

import math

import torch
from torch import nn

from mcp.models.layers import conv_features, init_weights, is_small
from mcp.models.registry import register_model


class LeNet300100(nn.Module):
    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(math.prod(input_shape), 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(self.flatten(x)))
        return self.fc3(self.relu(self.fc2(x)))


@register_model("lenet300_100")
def lenet300_100(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """LeNet-300-100: a 300-100 fully connected network (LeCun et al. 1998)."""
    return LeNet300100(num_classes, input_shape)


class LeNet5(nn.Module):
    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]):
        super().__init__()
        c, h, w = input_shape
        # 28x28 inputs get the classic 2-px padding of the first conv; the second conv is
        # padded only when the map would otherwise vanish (8x8 digits).
        pad2 = 0 if min(h, w) >= 16 else 2
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(6, 16, 5, padding=pad2), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).numel()
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("lenet5")
def lenet5(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """LeNet-5: two 5x5 convs and three fully connected layers (LeCun et al. 1998)."""
    return LeNet5(num_classes, input_shape)


class LeNet5Caffe(nn.Module):
    """Caffe's MNIST example (20 and 50 5x5 filters, unpadded, a 500-unit layer), the
    "LeNet-5" of the compression papers: 431K weights on 28x28 inputs, 7 times LeCun's."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]):
        super().__init__()
        c, h, w = input_shape
        pad = 0 if min(h, w) >= 16 else 2  # 8x8 digits: padded so the second pool has a map left
        # ReLU after each convolution, as the PyTorch versions of the papers that compress it
        # (Caffe's prototxt has none there; without them SGD at training's default 0.05 diverges)
        self.features = nn.Sequential(
            nn.Conv2d(c, 20, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(20, 50, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).numel()
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, 500), nn.ReLU(), nn.Linear(500, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("lenet5_caffe")
def lenet5_caffe(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """LeNet-5 as in Caffe's MNIST example, the one Han et al. (39x) and Ullrich et al. (162x) compress."""
    return LeNet5Caffe(num_classes, input_shape)


VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    """VGG with a CIFAR head (512-512-classes) for small inputs and the ImageNet head
    (7x7 pool, 4096-4096-classes, torchvision's layout) otherwise."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], batch_norm: bool):
        super().__init__()
        c, h, w = input_shape
        self.features, out_c, _ = conv_features(c, VGG16_CFG, min(h, w), batch_norm=batch_norm)
        if is_small(input_shape):
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(
                nn.Flatten(), nn.Linear(out_c, 512), nn.ReLU(inplace=True), nn.Dropout(0.5),
                nn.Linear(512, num_classes),
            )
        else:
            self.avgpool = nn.AdaptiveAvgPool2d(7)
            self.classifier = nn.Sequential(
                nn.Flatten(), nn.Linear(out_c * 49, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
                nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(4096, num_classes),
            )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


@register_model("vgg16")
def vgg16(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """VGG-16 (Simonyan and Zisserman 2015), configuration D."""
    return VGG(num_classes, input_shape, batch_norm=False)


@register_model("vgg16_bn")
def vgg16_bn(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """VGG-16 with BatchNorm after every convolution."""
    return VGG(num_classes, input_shape, batch_norm=True)


class SmallAlexNet(nn.Module):
    """AlexNet's five conv layers with 3x3 kernels for inputs of 32 px or less."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]):
        super().__init__()
        c, h, w = input_shape
        cfg = [64, "M", 192, "M", 384, 256, 256, "M"]
        self.features, out_c, _ = conv_features(c, cfg, min(h, w))
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.5), nn.Linear(out_c * 4, 1024), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(1024, 1024), nn.ReLU(inplace=True), nn.Linear(1024, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


@register_model("alexnet")
def alexnet(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """AlexNet (Krizhevsky et al. 2012); torchvision's layout above 32 px, 3x3 kernels below."""
    if is_small(input_shape):
        return SmallAlexNet(num_classes, input_shape)
    from torchvision.models import alexnet as tv_alexnet

    model = tv_alexnet(weights=None, num_classes=num_classes)
    old = model.features[0]
    model.features[0] = nn.Conv2d(input_shape[0], old.out_channels, old.kernel_size, old.stride, old.padding)
    return model
