"""Dataset registry: fixed seeded splits, real loaders on tiny generated data, clear errors."""

from __future__ import annotations

import gzip
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
                                    "synthetic", "idx"}


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


def test_digits_are_scikit_learns_read_without_importing_it(monkeypatch):
    """The file scikit-learn ships, read as load_digits reads it (the same arrays, so the
    same test-set fingerprint); load_digits itself where the file is not found."""
    import importlib.util
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from mcp.data.registry import digits_arrays

    bunch = load_digits()
    images, target = digits_arrays()
    assert images.dtype == bunch.images.dtype and np.array_equal(images, bunch.images)
    assert np.array_equal(target, bunch.target)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no file to be found: the loader
    again, labels = digits_arrays()
    assert np.array_equal(again, bunch.images) and np.array_equal(labels, bunch.target)
    loaded = subprocess.run([sys.executable, "-c", "import sys; from mcp.data import load_dataset; "
                             "load_dataset('digits'); print('sklearn' in sys.modules)"],
                            capture_output=True, text=True, check=True)
    assert loaded.stdout.split()[-1] == "False"


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


def test_in_memory_batches_are_gathered_at_once_and_equal_the_sample_by_sample_ones(monkeypatch):
    """Digits, IDX and synthetic data fetch a batch in one indexing per tensor; the batches
    are those DataLoader's sample-by-sample fetching and stacking gives, in the same order,
    and a DataLoader with the default collation over the same dataset still works."""
    from torch.utils.data import DataLoader, TensorDataset

    from mcp.data.registry import Gathered

    s = load_dataset("digits")
    train = s.train
    plain = TensorDataset(*train.tensors)
    fetched = []
    real = type(train).__getitems__
    monkeypatch.setattr(type(train), "__getitems__", lambda self, i: fetched.append(len(i)) or real(self, i))
    ours = list(make_loaders(s, 32, seed=5)[0])
    theirs = list(DataLoader(plain, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(5)))
    assert len(ours) == len(theirs) == len(fetched) == -(-len(plain) // 32)  # one fetch per batch
    for (x, y), (x0, y0) in zip(ours, theirs):
        assert torch.equal(x, x0) and torch.equal(y, y0) and x.dtype == x0.dtype and y.dtype == y0.dtype
    default = list(DataLoader(train, batch_size=32))  # the default collation, sample by sample
    assert torch.equal(default[1][0], plain.tensors[0][32:64]) and torch.equal(default[1][1], plain.tensors[1][32:64])
    gathered = train.__getitems__([3, 1])
    assert isinstance(gathered, Gathered) and len(gathered) == 2
    assert torch.equal(gathered[1][0], plain[1][0]) and list(gathered)[0][1] == plain[3][1]


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


# ----------------------------------------------------------------------------- IDX files


def _idx_bytes(images: np.ndarray, labels: np.ndarray) -> tuple[bytes, bytes]:
    n, h, w = images.shape
    return (struct.pack(">IIII", 0x803, n, h, w) + images.tobytes(),
            struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes())


def _idx_pair(folder, prefix: str, n: int, gz: bool, seed: int = 0, classes: int = 10, first_label: int = 0,
              size: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Class c is a bright c-th row band plus noise: learnable, and each image is traceable."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % classes + first_label).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, size, size), dtype=np.uint8)
    for i, c in enumerate(labels - first_label):
        images[i, c % size] = 250
    folder.mkdir(parents=True, exist_ok=True)
    for kind, blob in zip(("images-idx3", "labels-idx1"), _idx_bytes(images, labels)):
        path = folder / f"{prefix}-{kind}-ubyte{'.gz' if gz else ''}"
        path.write_bytes(gzip.compress(blob) if gz else blob)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_idx_single_pair_is_split_stratified_and_fixed(tmp_path, gz):
    images, labels = _idx_pair(tmp_path, "t10k", 200, gz)
    s = load_dataset("idx", data_dir=tmp_path, val_fraction=0.25)
    assert s.name == "idx" and s.input_shape == (1, 12, 12) and s.num_classes == 10
    assert s.class_names == [str(c) for c in range(10)] and s.augment == "none"
    assert (len(s.train), len(s.val), len(s.test)) == (120, 40, 40)  # 20% test, then 25% of the rest
    assert all(np.bincount(_labels(split), minlength=10).tolist() == [len(split) // 10] * 10
               for split in (s.train, s.val, s.test))  # stratified
    x = s.train.tensors[0]
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 0.05  # normalised by train statistics
    # the pixels are the file's: un-normalising a test image finds it among the images written
    again = load_dataset("idx", data_dir=tmp_path, val_fraction=0.25)
    assert torch.equal(s.test.tensors[0], again.test.tensors[0])
    band = s.test.tensors[0][0, 0].mean(dim=1).argmax().item()
    assert band == int(s.test.tensors[1][0])


def test_idx_train_and_test_pair_keep_the_official_test_split(tmp_path):
    _idx_pair(tmp_path, "train", 100, gz=True, seed=1)
    test_images, test_labels = _idx_pair(tmp_path, "t10k", 30, gz=False, seed=2)
    s = load_dataset("idx", data_dir=tmp_path, val_fraction=0.2)
    assert (len(s.train), len(s.val), len(s.test)) == (80, 20, 30)
    assert torch.equal(s.test.tensors[1], torch.tensor(test_labels, dtype=torch.long))
    # the test images are normalised with the training split's statistics, in file order
    raw = torch.tensor(test_images, dtype=torch.float32) / 255.0
    corr = torch.corrcoef(torch.stack([raw.flatten(), s.test.tensors[0].flatten()]))[0, 1]
    assert corr > 0.999


def test_idx_labels_that_start_at_one_become_classes(tmp_path):
    _idx_pair(tmp_path, "emnist-letters-train", 60, gz=False, classes=3, first_label=1)
    s = load_dataset("idx", data_dir=tmp_path)
    assert s.num_classes == 3 and s.class_names == ["1", "2", "3"]
    assert set(_labels(s.train)) == {0, 1, 2}


def test_idx_resizes_to_input_shape(tmp_path):
    _idx_pair(tmp_path, "data", 100, gz=False)
    assert load_dataset("idx", data_dir=tmp_path, input_shape="3x20x20").train[0][0].shape == (3, 20, 20)


def _corrupt(tmp_path, name: str, blob: bytes) -> str:
    _idx_pair(tmp_path, "t10k", 40, gz=name.endswith(".gz"))
    (tmp_path / name).write_bytes(blob)
    with pytest.raises(McpError) as info:
        load_dataset("idx", data_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_idx_wrong_magic_number(tmp_path):
    good, _ = _idx_bytes(np.zeros((4, 12, 12), np.uint8), np.zeros(4))
    message = _corrupt(tmp_path, "t10k-images-idx3-ubyte", struct.pack(">I", 0x801) + good[4:])
    assert "t10k-images-idx3-ubyte" in message and "magic number 0x00000801" in message and "0x00000803" in message


def test_idx_counts_that_differ(tmp_path):
    _, labels = _idx_bytes(np.zeros((39, 12, 12), np.uint8), np.zeros(39))
    message = _corrupt(tmp_path, "t10k-labels-idx1-ubyte", labels)
    assert "differ in length" in message and "40 images and 39 labels" in message


def test_idx_truncated_data(tmp_path):
    images, _ = _idx_bytes(np.zeros((40, 12, 12), np.uint8), np.zeros(40))
    message = _corrupt(tmp_path, "t10k-images-idx3-ubyte", images[:-100])
    assert "truncated" in message and "40x12x12 = 5,760 bytes" in message and "5,660" in message
    message = _corrupt(tmp_path / "b", "t10k-images-idx3-ubyte", images[:10])
    assert "truncated" in message and "16-byte header" in message


def test_idx_truncated_gzip(tmp_path):
    images, _ = _idx_bytes(np.zeros((40, 12, 12), np.uint8), np.zeros(40))
    message = _corrupt(tmp_path, "t10k-images-idx3-ubyte.gz", gzip.compress(images)[:50])
    assert "cannot be read" in message and "t10k-images-idx3-ubyte.gz" in message


@pytest.mark.parametrize("files, expected", [
    ((), "no IDX image/label pair"),
    (("a-images-idx3-ubyte",), "unpaired: a-images-idx3-ubyte"),
])
def test_idx_missing_files(tmp_path, files, expected):
    for name in files:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(McpError, match=expected):
        load_dataset("idx", data_dir=tmp_path)
    with pytest.raises(McpError, match="does not exist"):
        load_dataset("idx", data_dir=tmp_path / "missing")


def test_idx_ambiguous_pairs(tmp_path):
    _idx_pair(tmp_path, "a", 20, gz=False)
    _idx_pair(tmp_path, "b", 20, gz=False)
    with pytest.raises(McpError, match="holds 2 IDX pairs \\(a, b\\)"):
        load_dataset("idx", data_dir=tmp_path)
    _idx_pair(tmp_path / "both", "t10k", 20, gz=False)
    _idx_pair(tmp_path / "both", "t10k", 20, gz=True)
    with pytest.raises(McpError, match="keep one of them"):
        load_dataset("idx", data_dir=tmp_path / "both")


def test_idx_reads_the_shared_mnist_test_files():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-t10k"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not on this machine")
    s = load_dataset("idx", data_dir=folder, val_fraction=0.15)
    assert (len(s.train), len(s.val), len(s.test)) == (6800, 1200, 2000) and s.input_shape == (1, 28, 28)
    counts = np.bincount(s.test.tensors[1].numpy(), minlength=10) + np.bincount(s.val.tensors[1].numpy(), minlength=10)
    counts += np.bincount(s.train.tensors[1].numpy(), minlength=10)
    assert counts.tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # its README's class counts


# ----------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_augment_values_on_tensor_datasets(name):
    base = load_dataset(name, input_shape="1x8x8" if name == "synthetic" else None)
    assert base.augment == "none"  # the default for digits, MNIST-like and synthetic data
    stored = base.train.tensors[0][:64]
    assert torch.equal(torch.stack([base.train[i][0] for i in range(64)]), stored)
    torch.manual_seed(0)
    for augment in ("flip", "crop", "crop_flip"):
        s = load_dataset(name, augment=augment, input_shape="1x8x8" if name == "synthetic" else None)
        assert s.augment == augment and len(s.train) == len(base.train)
        assert torch.equal(s.val.tensors[0], base.val.tensors[0]) and torch.equal(s.test.tensors[0], base.test.tensors[0])
        draws = torch.stack([s.train[i][0] for i in range(64)])
        changed = [not torch.equal(d, x) for d, x in zip(draws, stored)]
        flips = [torch.equal(d, x.flip(-1)) for d, x in zip(draws, stored)]
        assert 10 < sum(changed) < 64 or augment != "flip"  # about half of the images are flipped
        if augment == "flip":
            assert all(f for f, c in zip(flips, changed) if c)  # and nothing else happens to them
        if augment == "crop":
            assert not any(f and c for f, c in zip(flips, changed)) and sum(changed) > 32  # shifted, never flipped
    with pytest.raises(ConfigError, match="augment='rotate' is not allowed; choose one of: auto, none, flip"):
        load_dataset(name, augment="rotate")


def test_augment_defaults_per_dataset(tmp_path):
    _image_folder(tmp_path / "rgb", per_class=10)
    assert load_dataset("imagefolder", data_dir=tmp_path / "rgb").augment == "crop_flip"
    assert load_dataset("imagefolder", data_dir=tmp_path / "rgb", input_shape="1x16x16").augment == "none"
    assert load_dataset("imagefolder", data_dir=tmp_path / "rgb", augment="none").augment == "none"
    gray = load_dataset("imagefolder", data_dir=tmp_path / "rgb", input_shape="1x16x16", augment="flip")
    assert gray.augment == "flip"
    _write_idx(tmp_path, "MNIST")
    _write_idx(tmp_path, "FashionMNIST")
    assert load_dataset("mnist", data_dir=tmp_path).augment == "none"
    assert load_dataset("fashion_mnist", data_dir=tmp_path).augment == "flip"
    assert load_dataset("mnist", data_dir=tmp_path, augment="crop").augment == "crop"
    _idx_pair(tmp_path / "idx", "t10k", 40, gz=False)
    assert load_dataset("idx", data_dir=tmp_path / "idx").augment == "none"


def test_imagefolder_augment_none_gives_the_stored_pixels(tmp_path):
    _image_folder(tmp_path, per_class=10)
    s = load_dataset("imagefolder", data_dir=tmp_path, input_shape="3x16x16", augment="none")
    assert torch.equal(s.train[0][0], s.train[0][0])
    flipped = load_dataset("imagefolder", data_dir=tmp_path, input_shape="3x16x16", augment="flip")
    torch.manual_seed(0)
    draws = [flipped.train[0][0] for _ in range(20)]
    assert any(torch.equal(d, s.train[0][0].flip(-1)) for d in draws)
    assert all(torch.equal(d, s.train[0][0]) or torch.equal(d, s.train[0][0].flip(-1)) for d in draws)


def _pixels(part) -> list[tuple[int, bytes]]:
    """A split's (label, 0-255 pixels) pairs, sorted: its normalisation undone (MNIST's pixels
    span 0-255 in every split), the order its loader gave it forgotten."""
    if hasattr(part, "tensors"):
        x, y = part.tensors
    else:
        items = [part[i] for i in range(len(part))]
        x, y = torch.stack([item[0] for item in items]), [item[1] for item in items]
    lo, hi = x.amin(), x.amax()
    raw = ((x - lo) / (hi - lo) * 255).round().to(torch.uint8)
    return sorted((int(label), raw[i].numpy().tobytes()) for i, label in enumerate(y))


@pytest.mark.slow
def test_mnist_as_png_folder_trains_as_well_as_through_idx(tmp_path, experiment):
    """A new user's path: the MNIST files saved as PNG class folders (train/, val/ and test/,
    the parts `idx` makes) load as the same images and labels, and train LeNet-300-100 as
    well as the IDX loader does (within 1 point: the two loaders order the images
    differently, so the two trainings differ as two seeds do, by about 0.35 points sd)."""
    from pathlib import Path

    from PIL import Image

    from mcp.config import TrainConfig
    from mcp.stages.train import run_train

    folder = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-t10k"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not on this machine")
    idx = load_dataset("idx", data_dir=folder)
    for split_name in ("train", "val", "test"):
        for i, (label, pixels) in enumerate(_pixels(getattr(idx, split_name))):
            path = tmp_path / "png" / split_name / str(label)
            path.mkdir(parents=True, exist_ok=True)
            Image.frombytes("L", (28, 28), pixels).save(path / f"{i}.png")
    png = load_dataset("imagefolder", data_dir=tmp_path / "png", input_shape="1x28x28")
    for split_name in ("train", "val", "test"):
        assert _pixels(getattr(png, split_name)) == _pixels(getattr(idx, split_name)), split_name
    common = dict(model="lenet300_100", epochs=15, register=False, checkpoint_dir=str(tmp_path / "ck"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the sums' order, and so the last digits of training, depend on the thread count
    try:
        through_idx = run_train(TrainConfig(dataset="idx", data_dir=str(folder), **common), show_progress=False)
        through_png = run_train(TrainConfig(dataset="imagefolder", data_dir=str(tmp_path / "png"),
                                            input_shape="1x28x28", **common), show_progress=False)
    finally:
        torch.set_num_threads(threads)
    import mlflow

    params = mlflow.get_run(through_png.run_id).data.params
    assert params["data_augment"] == "none" and params["data_test_size"] == "2000"
    a, b = through_idx.metrics["test_accuracy"], through_png.metrics["test_accuracy"]
    assert a > 0.95 and b > 0.95 and abs(a - b) <= 0.01, (a, b)


@pytest.mark.parametrize("damage", ["empty", "truncated", "not_an_image"])
def test_imagefolder_names_a_file_that_cannot_be_read(tmp_path, damage):
    _image_folder(tmp_path, per_class=10)
    bad = tmp_path / "dog" / "3.png"
    data = bad.read_bytes()
    bad.write_bytes({"empty": b"", "truncated": data[: len(data) // 3], "not_an_image": b"hello"}[damage])
    with pytest.raises(McpError) as info:
        s = load_dataset("imagefolder", data_dir=tmp_path, input_shape="3x16x16")
        for i in range(len(s.train)):  # a damaged file is met when training reads it
            s.train[i]
        for split in (s.val, s.test):
            for i in range(len(split)):
                split[i]
    message = str(info.value)
    assert str(bad) in message and "\n" not in message
    assert ("is empty" if damage == "empty" else "cannot be read") in message


def test_imagefolder_an_empty_class_folder_is_named(tmp_path):
    _image_folder(tmp_path, per_class=3)
    (tmp_path / "bird").mkdir()
    with pytest.raises(McpError, match="no images found under .* bird"):
        load_dataset("imagefolder", data_dir=tmp_path)
