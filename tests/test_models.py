"""Every registered model on every input shape we use: forward, backward, recipe."""

from __future__ import annotations

import pytest
import torch

from mcp.errors import ConfigError
from mcp.models import create_model, model_from_recipe, model_names

# digits, MNIST/Fashion-MNIST, CIFAR, and a larger image-folder size (ImageNet-style stems)
SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64)]


def test_registry_has_the_product_models():
    expected = {"lenet300_100", "lenet5", "lenet5_caffe", "resnet20", "resnet56", "resnet18", "resnet50", "vgg16", "vgg16_bn",
                "mobilenet_v2", "alexnet"}
    assert expected <= set(model_names(include_tiny=False))
    assert {"tiny_mlp", "tiny_cnn", "tiny_resnet"} <= set(model_names()) - set(model_names(include_tiny=False))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", model_names())
def test_forward_backward(name, shape):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, input_shape=shape)
    x = torch.randn(2, *shape)
    out = model(x)
    assert out.shape == (2, 7)
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_lenet5_caffe_has_the_papers_size_on_mnist():
    model = create_model("lenet5_caffe", 10, (1, 28, 28))
    assert sum(p.numel() for p in model.parameters()) == 431_080  # Han et al.'s Table 1: 431K weights
    assert model.classifier[1].in_features == 800  # 50 maps of 4x4


def test_recipe_rebuilds_the_same_architecture():
    model = create_model("resnet20", 10, (3, 32, 32), width=0.5)
    clone = model_from_recipe(model.mcp_recipe)
    clone.load_state_dict(model.state_dict())  # same shapes, strict
    assert model.mcp_recipe == {"name": "resnet20", "num_classes": 10, "input_shape": [3, 32, 32],
                                "kwargs": {"width": 0.5}}


def test_stems_follow_the_input_size():
    small = create_model("resnet18", 10, (3, 32, 32))
    large = create_model("resnet18", 10, (3, 64, 64))
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, torch.nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, torch.nn.MaxPool2d)


@pytest.mark.parametrize("call, message", [
    (lambda: create_model("resnet99", 10, (3, 32, 32)), "unknown model 'resnet99'; choose one of"),
    (lambda: create_model("lenet5", 10, (3, 32, 32), width=2), "model 'lenet5' does not take width"),
    (lambda: create_model("lenet5", 1, (3, 32, 32)), "num_classes=1 must be at least 2"),
    (lambda: create_model("lenet5", 10, (3, 32)), "must be (channels, height, width)"),
])
def test_bad_model_requests(call, message):
    with pytest.raises(ConfigError) as info:
        call()
    assert message in str(info.value)
