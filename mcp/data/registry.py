"""Datasets by name, each a function returning fixed, seeded train/val/test splits.

Splits never depend on the training seed: the test set of a dataset is the same for
every run, so runs compare side by side. Nothing here downloads unless asked to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from mcp.config import AUGMENTATIONS
from mcp.errors import ConfigError, McpError

SPLIT_SEED = 0  # fixed: the split is part of the dataset, not of the experiment
TEST_FRACTION = 0.2  # for datasets that ship without a test split


@dataclass
class DataSplits:
    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    input_shape: tuple[int, int, int]
    num_classes: int
    class_names: list[str]
    augment: str = "none"  # the train-time augmentation applied (resolved from "auto")

    def summary(self) -> dict[str, object]:
        return {
            "dataset": self.name,
            "augment": self.augment,
            "input_shape": "x".join(map(str, self.input_shape)),
            "num_classes": self.num_classes,
            "train_size": len(self.train),
            "val_size": len(self.val),
            "test_size": len(self.test),
        }


Loader = Callable[..., DataSplits]
_DATASETS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    def wrap(fn: Loader) -> Loader:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} registered twice")
        _DATASETS[name] = fn
        return fn

    return wrap


def dataset_names() -> list[str]:
    return sorted(_DATASETS)


def dataset_description(name: str) -> str:
    doc = (_DATASETS[name].__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def parse_shape(text: str) -> tuple[int, int, int]:
    """'3x32x32' -> (3, 32, 32)."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) <= 0:
        raise ConfigError(f"input_shape={text!r} is not of the form CxHxW with positive sizes, e.g. 3x32x32")
    return shape  # type: ignore[return-value]


def load_dataset(
    name: str,
    data_dir: str | Path = "data",
    download: bool = False,
    input_shape: str | tuple[int, int, int] | None = None,
    num_classes: int = 0,
    val_fraction: float = 0.1,
    augment: str = "auto",
) -> DataSplits:
    """``augment``: train-time augmentation, one of :data:`AUGMENTATIONS`; ``auto`` is the
    dataset's own default (none for digits, MNIST-like and grayscale data)."""
    if name not in _DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(dataset_names())}")
    if augment not in AUGMENTATIONS:
        raise ConfigError(f"augment={augment!r} is not allowed; choose one of: {', '.join(AUGMENTATIONS)}")
    shape = parse_shape(input_shape) if isinstance(input_shape, str) and input_shape else input_shape or None
    return _DATASETS[name](
        data_dir=Path(data_dir), download=download, input_shape=shape,
        num_classes=num_classes, val_fraction=val_fraction, augment=augment,
    )


def make_loaders(splits: DataSplits, batch_size: int, workers: int = 0, seed: int = 0,
                 pin_memory: bool = False) -> tuple[DataLoader, DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(seed)
    common = dict(batch_size=batch_size, num_workers=workers, pin_memory=pin_memory,
                  persistent_workers=workers > 0)
    train = DataLoader(splits.train, shuffle=True, generator=gen, drop_last=False, **common)
    val = DataLoader(splits.val, shuffle=False, **common)
    test = DataLoader(splits.test, shuffle=False, **common)
    return train, val, test


# ----------------------------------------------------------------------------- helpers


def _split_indices(n: int, fraction: float, labels: np.ndarray | None = None,
                   seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (stratified when labels are given) split into (keep, held_out) indices."""
    rng = np.random.default_rng(seed)
    if labels is None:
        perm = rng.permutation(n)
        k = max(1, int(round(n * fraction)))
        return np.sort(perm[k:]), np.sort(perm[:k])
    keep, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * fraction))
        if len(idx) > 1:
            k = min(max(k, 1), len(idx) - 1)
        held.append(idx[:k])
        keep.append(idx[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


class _Transformed(Dataset):
    """Apply a per-sample tensor transform to a tensor dataset (train-time augmentation)."""

    def __init__(self, base: Dataset, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return self.transform(x), y


def _tensor_splits(name: str, x: torch.Tensor, y: torch.Tensor, val_fraction: float, class_names: list[str],
                   augment: str = "none", test: tuple[torch.Tensor, torch.Tensor] | None = None) -> DataSplits:
    """Stratified (test and) validation split of in-memory data, normalised with the
    training split's statistics. ``test``: a given test split (then only validation is
    held out of ``x``)."""
    labels = y.numpy()
    if test is None:
        rest, test_idx = _split_indices(len(y), TEST_FRACTION, labels)
        x_test, y_test = x[test_idx], y[test_idx]
    else:
        rest, (x_test, y_test) = np.arange(len(y)), test
    train_rel, val_rel = _split_indices(len(rest), val_fraction, labels[rest])
    train_idx, val_idx = rest[train_rel], rest[val_rel]
    mean = x[train_idx].mean(dim=(0, 2, 3), keepdim=True)
    std = x[train_idx].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    x, x_test = (x - mean) / std, (x_test - mean) / std
    train: Dataset = TensorDataset(x[train_idx], y[train_idx])
    if augment != "none":
        from torchvision import transforms as T

        train = _Transformed(train, T.Compose(_train_augment(augment, tuple(x.shape[2:]))))
    return DataSplits(
        name=name,
        train=train,
        val=TensorDataset(x[val_idx], y[val_idx]),
        test=TensorDataset(x_test, y_test),
        input_shape=tuple(x.shape[1:]),  # type: ignore[arg-type]
        num_classes=len(class_names),
        class_names=class_names,
        augment=augment,
    )


def _resized(x: torch.Tensor, input_shape: tuple[int, int, int] | None, dataset: str) -> torch.Tensor:
    """Grayscale N x 1 x H x W images at ``input_shape`` (bilinear; 3 channels repeat the gray one)."""
    if not input_shape or tuple(input_shape) == tuple(x.shape[1:]):
        return x
    channels, height, width = input_shape
    if channels not in (1, 3):
        raise ConfigError(f"input_shape channels={channels} for {dataset}; allowed: 1 (grayscale) or 3 (repeated)")
    if (height, width) != tuple(x.shape[2:]):
        x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return x.repeat(1, channels, 1, 1)


def _augment_of(requested: str, default: str) -> str:
    return default if requested == "auto" else requested


# ----------------------------------------------------------------------------- datasets


@register_dataset("digits")
def _digits(val_fraction: float, input_shape: tuple[int, int, int] | None = None, augment: str = "auto",
            **_: object) -> DataSplits:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real images, 10 classes);
    --input-shape 1xHxW (or 3xHxW) resizes them bilinearly, for models that need more pixels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = _resized(torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0, input_shape, "digits")
    y = torch.tensor(bunch.target, dtype=torch.long)
    return _tensor_splits("digits", x, y, val_fraction, [str(c) for c in range(10)], _augment_of(augment, "none"))


@register_dataset("synthetic")
def _synthetic(input_shape: tuple[int, int, int] | None, num_classes: int, val_fraction: float,
               augment: str = "auto", **_: object) -> DataSplits:
    """Random class prototypes plus noise: learnable, any shape, instant. For tests and speed checks."""
    shape = input_shape or (3, 32, 32)
    classes = num_classes or 10
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    n = 80 * classes
    prototypes = torch.randn((classes, *shape), generator=gen)
    y = torch.arange(n) % classes
    x = prototypes[y] + 1.5 * torch.randn((n, *shape), generator=gen)
    return _tensor_splits("synthetic", x, y, val_fraction, [f"class_{c}" for c in range(classes)],
                          _augment_of(augment, "none"))


# ----------------------------------------------------------------------------- IDX files

_IDX_IMAGES, _IDX_LABELS = "-images-idx3-ubyte", "-labels-idx1-ubyte"
_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned bytes, 3 dimensions (images) / 1 (labels)
_IDX_LAYOUT = ("expected <prefix>-images-idx3-ubyte[.gz] and <prefix>-labels-idx1-ubyte[.gz] (as MNIST, "
               "Fashion-MNIST, KMNIST and EMNIST ship), one pair, or a train and a test pair")


def read_idx(path: Path, dims: int) -> np.ndarray:
    """An IDX file of unsigned bytes with ``dims`` dimensions (gzipped or not) as a uint8 array."""
    import gzip

    try:
        raw = gzip.open(path).read() if path.name.endswith(".gz") else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise McpError(f"IDX file {str(path)!r} cannot be read: {exc}") from None
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != _IDX_MAGIC[dims]:
        found = "none (file shorter than 4 bytes)" if magic is None else f"0x{magic:08x}"
        raise McpError(f"IDX file {str(path)!r} has magic number {found}; expected 0x{_IDX_MAGIC[dims]:08x} "
                       f"(unsigned bytes, {dims} dimension{'s' if dims > 1 else ''})")
    header = 4 + 4 * dims
    if len(raw) < header:
        raise McpError(f"IDX file {str(path)!r} is truncated: {len(raw)} bytes, shorter than its "
                       f"{header}-byte header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise McpError(f"IDX file {str(path)!r} is truncated: its header says {'x'.join(map(str, shape))} = "
                       f"{expected:,} bytes of data, the file holds {len(raw) - header:,}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_pairs(data_dir: Path) -> dict[str, tuple[Path, Path]]:
    """{prefix: (images file, labels file)} for every complete pair in ``data_dir``."""
    if not data_dir.is_dir():
        raise McpError(f"data_dir {str(data_dir)!r} does not exist; {_IDX_LAYOUT}")
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(data_dir.iterdir()):
        stem = path.name[:-3] if path.name.endswith(".gz") else path.name
        for kind, suffix in (("images", _IDX_IMAGES), ("labels", _IDX_LABELS)):
            if stem.endswith(suffix):
                prefix = stem[: -len(suffix)]
                if kind in found.setdefault(prefix, {}):
                    raise McpError(f"data_dir {str(data_dir)!r} holds {found[prefix][kind].name} and {path.name}; "
                                   f"keep one of them")
                found[prefix][kind] = path
    pairs, lone = {}, []
    for prefix, files in found.items():
        if len(files) == 2:
            pairs[prefix] = (files["images"], files["labels"])
        else:
            lone.extend(p.name for p in files.values())
    if not pairs:
        detail = f" (unpaired: {', '.join(lone)})" if lone else ""
        raise McpError(f"no IDX image/label pair in data_dir {str(data_dir)!r}{detail}; {_IDX_LAYOUT}")
    return pairs


def _idx_role(prefix: str) -> str:
    name = prefix.lower()
    return "train" if "train" in name else "test" if ("test" in name or "t10k" in name) else "other"


def _read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise McpError(f"IDX files {images_path.name} and {labels_path.name} differ in length: "
                       f"{len(images):,} images and {len(labels):,} labels")
    return images, labels


@register_dataset("idx")
def _idx(data_dir: Path, input_shape: tuple[int, int, int] | None, val_fraction: float, augment: str = "auto",
         **_: object) -> DataSplits:
    """IDX files in --data-dir (MNIST, Fashion-MNIST, KMNIST, EMNIST; .gz or not): the train/test
    pair when both are there, else one pair split like the others; --input-shape resizes."""
    pairs = _idx_pairs(data_dir)
    roles: dict[str, list[str]] = {}
    for prefix in pairs:
        roles.setdefault(_idx_role(prefix), []).append(prefix)
    if len(pairs) == 1:
        (prefix,) = pairs
        x, y = _read_idx_pair(*pairs[prefix])
        test = None
    elif len(pairs) == 2 and len(roles.get("train", ())) == 1 and len(roles.get("test", ())) == 1:
        x, y = _read_idx_pair(*pairs[roles["train"][0]])
        x_test, y_test = _read_idx_pair(*pairs[roles["test"][0]])
        if x_test.shape[1:] != x.shape[1:]:
            raise McpError(f"IDX test images are {'x'.join(map(str, x_test.shape[1:]))}, training images "
                           f"{'x'.join(map(str, x.shape[1:]))}; they must match")
        test = (x_test, y_test)
    else:
        raise McpError(f"data_dir {str(data_dir)!r} holds {len(pairs)} IDX pairs ({', '.join(sorted(pairs))}); "
                       f"expected one, or one whose name says train and one that says test (or t10k)")
    classes = np.unique(y if test is None else np.concatenate([y, test[1]]))
    index = np.full(256, -1, dtype=np.int64)
    index[classes] = np.arange(len(classes))  # EMNIST letters are labelled 1-26: classes are the labels present

    def tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        xt = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        return _resized(xt, input_shape, "idx"), torch.from_numpy(index[labels])

    if len(classes) < 2:
        raise McpError(f"IDX labels in {str(data_dir)!r} hold {len(classes)} class; at least 2 are needed")
    xt, yt = tensors(x, y)
    return _tensor_splits("idx", xt, yt, val_fraction, [str(int(c)) for c in classes], _augment_of(augment, "none"),
                          test=None if test is None else tensors(*test))


_TORCHVISION = {
    # name: (class name, folder checked, mean, std, input shape, augment)
    "cifar10": ("CIFAR10", "cifar-10-batches-py", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                (3, 32, 32), "crop_flip"),
    "cifar100": ("CIFAR100", "cifar-100-python", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                 (3, 32, 32), "crop_flip"),
    "mnist": ("MNIST", "MNIST", (0.1307,), (0.3081,), (1, 28, 28), "none"),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST", (0.2860,), (0.3530,), (1, 28, 28), "flip"),
}


def _train_augment(kind: str, size: tuple[int, int]) -> list:
    from torchvision import transforms as T

    crop = [T.RandomCrop(size, padding=max(1, size[0] // 8))]  # shifts of up to 1/8 of the side
    return {"crop_flip": crop + [T.RandomHorizontalFlip()], "crop": crop, "flip": [T.RandomHorizontalFlip()],
            "none": []}[kind]


def _torchvision_dataset(name: str, data_dir: Path, download: bool, val_fraction: float,
                         augment: str) -> DataSplits:
    import torchvision
    from torchvision import transforms as T

    cls_name, folder, mean, std, shape, default_augment = _TORCHVISION[name]
    augment = _augment_of(augment, default_augment)
    cls = getattr(torchvision.datasets, cls_name)
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    train_tf = T.Compose(_train_augment(augment, shape[1:]) + normalize)
    eval_tf = T.Compose(normalize)
    try:
        train_aug = cls(str(data_dir), train=True, download=download, transform=train_tf)
        train_eval = cls(str(data_dir), train=True, download=False, transform=eval_tf)
        test = cls(str(data_dir), train=False, download=False, transform=eval_tf)
    except (RuntimeError, OSError) as exc:
        if download:
            raise McpError(f"could not download dataset {name!r} into {str(data_dir)!r}: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        raise McpError(
            f"dataset {name!r} not found in data_dir {str(data_dir)!r} (expected torchvision's layout, "
            f"{str(data_dir / folder)!r}); pass --download to fetch it where a network exists") from None
    labels = np.asarray(train_aug.targets)
    train_idx, val_idx = _split_indices(len(labels), val_fraction, labels)
    return DataSplits(
        name=name,
        train=Subset(train_aug, train_idx.tolist()),
        val=Subset(train_eval, val_idx.tolist()),
        test=test,
        input_shape=shape,
        num_classes=len(train_aug.classes),
        class_names=[str(c) for c in train_aug.classes],
        augment=augment,
    )


def _make_torchvision_loader(name: str) -> Loader:
    def load(data_dir: Path, download: bool, val_fraction: float, augment: str = "auto", **_: object) -> DataSplits:
        return _torchvision_dataset(name, data_dir, download, val_fraction, augment)

    load.__doc__ = f"torchvision's {_TORCHVISION[name][0]} from --data-dir (--download to fetch)."
    return load


for _name in _TORCHVISION:
    register_dataset(_name)(_make_torchvision_loader(_name))


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_IMAGEFOLDER_LAYOUT = ("expected class subfolders (data_dir/<class>/<image>) or split folders "
                       "(data_dir/train/<class>/..., optional val/ and test/)")


@register_dataset("imagefolder")
def _imagefolder(data_dir: Path, input_shape: tuple[int, int, int] | None, val_fraction: float,
                 augment: str = "auto", **_: object) -> DataSplits:
    """Any folder of class subfolders, optionally split into train/, val/, test/; augmented
    with random crops and flips when RGB, not at all when grayscale (--augment to choose)."""
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    if not data_dir.is_dir():
        raise McpError(f"data_dir {str(data_dir)!r} does not exist; {_IMAGEFOLDER_LAYOUT}")
    shape = input_shape or (3, 32, 32)
    channels, size = shape[0], shape[1:]
    if channels not in (1, 3):
        raise ConfigError(f"input_shape channels={channels} for imagefolder; allowed: 1 (grayscale) or 3 (RGB)")
    # RGB: ImageNet's statistics, which pretrained backbones expect; grayscale: the training split's (below)
    mean, std = ((0.0,), (1.0,)) if channels == 1 else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    base = [T.Grayscale(1)] if channels == 1 else [T.Lambda(_to_rgb)]
    base.append(T.Resize(size))
    norm = T.Normalize(mean, std)
    normalize = [T.ToTensor(), norm]
    augment = _augment_of(augment, "crop_flip" if channels == 3 else "none")
    train_tf = T.Compose(base + _train_augment(augment, size) + normalize)
    eval_tf = T.Compose(base + normalize)

    def folder(path: Path, tf) -> ImageFolder:
        try:
            found = ImageFolder(str(path), transform=tf, loader=_load_image)
        except (FileNotFoundError, RuntimeError) as exc:
            detail = " ".join(str(exc).split()) or exc.__class__.__name__
            raise McpError(f"no images found under {str(path)!r} ({detail}); {_IMAGEFOLDER_LAYOUT}; image types: "
                           f"{', '.join(IMAGE_EXTENSIONS)}") from None
        empty = [p for p, _ in found.samples if Path(p).stat().st_size == 0]
        if empty:
            raise McpError(f"image file {empty[0]!r} is empty ({len(empty)} empty file(s) under {str(path)!r}); "
                           f"remove or replace them")
        return found

    has_splits = (data_dir / "train").is_dir()
    root = data_dir / "train" if has_splits else data_dir
    train_aug, train_eval = folder(root, train_tf), folder(root, eval_tf)
    labels = np.asarray(train_aug.targets)
    pool = np.arange(len(labels))
    if has_splits and (data_dir / "test").is_dir():
        test: Dataset = folder(data_dir / "test", eval_tf)
        _check_classes(train_aug, test, "test")
    else:
        pool, test_idx = _split_indices(len(labels), TEST_FRACTION, labels)
        test = Subset(train_eval, test_idx.tolist())
    if has_splits and (data_dir / "val").is_dir():
        val: Dataset = folder(data_dir / "val", eval_tf)
        _check_classes(train_aug, val, "val")
        train_idx = pool
    else:
        keep, held = _split_indices(len(pool), val_fraction, labels[pool])
        train_idx, val = pool[keep], Subset(train_eval, pool[held].tolist())
    if len(train_idx) == 0 or len(val) == 0 or len(test) == 0:
        raise McpError(f"image folder {str(data_dir)!r} has too few images ({len(labels)}) to make "
                       f"train/val/test splits; add images or provide train/, val/ and test/ folders")
    if channels == 1:  # mean and sd of (a seeded sample of up to 2,000) training images, as for digits and IDX
        sample = np.random.default_rng(SPLIT_SEED).permutation(train_idx)[:2000]
        pixels = torch.stack([train_eval[int(i)][0] for i in sample])
        norm.mean, norm.std = [pixels.mean().item()], [max(pixels.std().item(), 1e-6)]
    return DataSplits(
        name="imagefolder",
        train=Subset(train_aug, train_idx.tolist()),
        val=val,
        test=test,
        input_shape=shape,
        num_classes=len(train_aug.classes),
        class_names=list(train_aug.classes),
        augment=augment,
    )


def _load_image(path: str):
    """PIL's loader, with a file that cannot be decoded named in one line (training stops
    there, the run ends FAILED and nothing is registered)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")  # as torchvision's default loader
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise McpError(f"image file {path!r} cannot be read ({' '.join(str(exc).split())}); remove or replace "
                       f"it") from None


def _to_rgb(image):
    return image.convert("RGB")


def _check_classes(train, other, split: str) -> None:
    if other.classes != train.classes:
        raise McpError(f"the {split}/ folder's classes {other.classes} differ from train/'s {train.classes}")
