"""Dataset registry: fixed seeded splits, real loaders on tiny generated data, clear errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from mcp.data import dataset_names, load_dataset, make_loaders
from mcp.errors import ConfigError, McpError


def _labels(ds) -> np.ndarray:
    return np.array([int(ds[i][1]) for i in range(len(ds))])


def test_registry_names():
    assert set(dataset_names()) == {"digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder",
                                    "synthetic"}


def test_digits_splits_are_fixed_disjoint_stratified_and_normalised():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    sizes = (len(a.train), len(a.val), len(a.test))
    assert sum(sizes) == 1797 and len(a.test) == pytest.approx(1797 * 0.2, abs=10)
    for split in ("train", "val", "test"):  # the same samples every time
        assert torch.equal(getattr(a, split).tensors[0], getattr(b, split).tensors[0])
    rows = {split: {tuple(x.flatten().tolist()) for x in getattr(a, split).tensors[0]} for split in ("train", "test")}
    assert len(rows["train"] & rows["test"]) <= 2  # digits has a handful of duplicate images, no shared rows else
    assert set(_labels(a.test)) == set(range(10))  # stratified: every class in every split
    x = a.train.tensors[0]
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 0.05


def test_val_fraction_changes_only_the_val_split():
    small, large = load_dataset("digits", val_fraction=0.1), load_dataset("digits", val_fraction=0.3)
    assert torch.equal(small.test.tensors[1], large.test.tensors[1])
    assert len(large.val) > len(small.val)


def test_synthetic_any_shape_and_class_count():
    s = load_dataset("synthetic", input_shape="2x12x10", num_classes=3)
    assert s.input_shape == (2, 12, 10) and s.num_classes == 3
    x, y = s.train[0]
    assert x.shape == (2, 12, 10) and 0 <= int(y) < 3


def test_loaders_shuffle_reproducibly():
    s = load_dataset("digits")
    first = [y for _, y in make_loaders(s, 64, seed=3)[0]]
    second = [y for _, y in make_loaders(s, 64, seed=3)[0]]
    other = [y for _, y in make_loaders(s, 64, seed=4)[0]]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def _write_idx(root, folder: str, n_train: int = 50, n_test: int = 20) -> None:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 255, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_datasets_load_from_data_dir(tmp_path, name, folder):
    _write_idx(tmp_path, folder)
    s = load_dataset(name, data_dir=tmp_path, val_fraction=0.2)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert (len(s.train), len(s.val), len(s.test)) == (40, 10, 20)
    x, y = s.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist", "fashion_mnist"])
def test_missing_torchvision_data_says_where_and_mentions_download(tmp_path, name):
    with pytest.raises(McpError) as info:
        load_dataset(name, data_dir=tmp_path / "nowhere")
    message = str(info.value)
    assert name in message and "nowhere" in message and "--download" in message
    assert "\n" not in message


def _image_folder(root, classes=("cat", "dog"), per_class=6, size=(20, 14)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")


def test_imagefolder_without_splits(tmp_path):
    _image_folder(tmp_path, per_class=10)
    s = load_dataset("imagefolder", data_dir=tmp_path, input_shape="3x16x16")
    assert s.class_names == ["cat", "dog"] and s.num_classes == 2
    assert len(s.train) + len(s.val) + len(s.test) == 20
    assert s.train[0][0].shape == (3, 16, 16) and s.test[0][0].shape == (3, 16, 16)
    gray = load_dataset("imagefolder", data_dir=tmp_path, input_shape="1x8x8")
    assert gray.train[0][0].shape == (1, 8, 8)


def test_imagefolder_with_split_folders(tmp_path):
    for split in ("train", "val", "test"):
        _image_folder(tmp_path / split, per_class=3)
    s = load_dataset("imagefolder", data_dir=tmp_path)
    assert (len(s.train), len(s.val), len(s.test)) == (6, 6, 6)
    assert s.input_shape == (3, 32, 32)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(McpError, match="does not exist; expected class subfolders"):
        load_dataset("imagefolder", data_dir=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(McpError, match="no images found under .*empty"):
        load_dataset("imagefolder", data_dir=tmp_path / "empty")


def test_digits_resize_to_a_larger_input():
    small, large = load_dataset("digits"), load_dataset("digits", input_shape="1x32x32")
    assert large.input_shape == (1, 32, 32) and len(large.train) == len(small.train)
    x_small, y_small = small.test[:5]
    x_large, y_large = large.test[:5]
    assert torch.equal(y_small, y_large)  # the same images in the same splits, only bigger
    pooled = torch.nn.functional.adaptive_avg_pool2d(x_large, 8)
    corr = torch.corrcoef(torch.stack([pooled.flatten(), x_small.flatten()]))[0, 1]
    assert corr > 0.9
    assert load_dataset("digits", input_shape="3x16x16").input_shape == (3, 16, 16)
    with pytest.raises(ConfigError, match="input_shape channels=2 for digits"):
        load_dataset("digits", input_shape="2x16x16")
