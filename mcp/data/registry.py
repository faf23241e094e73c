"""Datasets by name, each a function returning fixed, seeded train/val/test splits.

Splits never depend on the training seed: the test set of a dataset is the same for
every run, so runs compare side by side. How a split is made, how a user gives their own
(``split_file``) and the test set's fingerprint: :mod:`mcp.data.split`. Nothing here
downloads unless asked to.
"""

from __future__ import annotations

import collections.abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

from mcp.data.augment import AUGMENTATIONS, train_augment
from mcp.data.split import SPLIT_OF_MCP, SPLIT_SEED, TEST_FRACTION, fingerprint, read_split_file, resolve_parts  # noqa: F401
from mcp.errors import ConfigError, McpError


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
    parts: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # pool indices of train/val/test
    pool_size: int = 0  # samples in the dataset's pool (see mcp.data.split)
    sample_ids: list[str] | None = field(default=None, repr=False)  # an image folder's relative paths
    order: str = ""  # what the pool indices index
    how: str = ""  # how the split was made
    test_fingerprint: str = ""  # of the test part's images and labels (mcp.data.split.fingerprint)
    settings: dict[str, Any] = field(default_factory=dict)  # what load_dataset was given, to load it again

    def summary(self) -> dict[str, object]:
        return {
            "dataset": self.name,
            "augment": self.augment,
            "input_shape": "x".join(map(str, self.input_shape)),
            "num_classes": self.num_classes,
            "train_size": len(self.train),
            "val_size": len(self.val),
            "test_size": len(self.test),
            "split": self.how,
            "test_fingerprint": self.test_fingerprint,
        }

    def record(self) -> dict[str, Any]:
        """The data settings a model made on these splits records (in its recipe and its
        registered version), so that a stage started from it loads the same data."""
        return {**self.settings, "augment": self.augment, "input_shape": "x".join(map(str, self.input_shape)),
                "test_fingerprint": self.test_fingerprint, "test_size": len(self.test), "split": self.how}


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


# datasets whose files live in --data-dir (digits and synthetic need none)
NEEDS_DATA_DIR = ("idx", "imagefolder", "cifar10", "cifar100", "mnist", "fashion_mnist")


def load_dataset(
    name: str,
    data_dir: str | Path = "data",
    download: bool = False,
    input_shape: str | tuple[int, int, int] | None = None,
    num_classes: int = 0,
    val_fraction: float = 0.1,
    augment: str = "auto",
    split_file: str | Path = "",
) -> DataSplits:
    """``augment``: train-time augmentation, one of :data:`AUGMENTATIONS`; ``auto`` is the
    dataset's own default (none for digits, MNIST-like and grayscale data). ``split_file``:
    the user's own train/val/test split (see :mod:`mcp.data.split`)."""
    if name not in _DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(dataset_names())}")
    if augment not in AUGMENTATIONS:
        raise ConfigError(f"augment={augment!r} is not allowed; choose one of: {', '.join(AUGMENTATIONS)}")
    shape = parse_shape(input_shape) if isinstance(input_shape, str) and input_shape else input_shape or None
    split = Path(split_file).resolve() if split_file else None
    splits = _DATASETS[name](
        data_dir=Path(data_dir), download=download, input_shape=shape,
        num_classes=num_classes, val_fraction=val_fraction, augment=augment, split_file=split,
    )
    splits.settings = {"dataset": name, "data_dir": str(Path(data_dir).resolve()) if name in NEEDS_DATA_DIR else "",
                       "val_fraction": val_fraction, "num_classes": num_classes if name == "synthetic" else 0,
                       "split_file": str(split) if split else ""}
    return splits


class Gathered(collections.abc.Sequence):
    """A batch of an :class:`InMemory` dataset, gathered in one indexing per tensor.
    :func:`collate` takes its tensors as they are; any other collate function sees the
    samples one by one (``gathered[k]``), as ``dataset[i]`` gives them."""

    def __init__(self, tensors: tuple[torch.Tensor, ...]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, k: int):
        return tuple(t[k] for t in self.tensors)


class InMemory(TensorDataset):
    """A :class:`~torch.utils.data.TensorDataset` whose batches DataLoader fetches in one
    indexing per tensor (``__getitems__``) instead of sample by sample and stacked: the
    same batches, in a quarter of the time (8x8 digits at batch 32: 1.4 ms an epoch against
    5.8 ms; fetching had been a seventh of a LeNet-300-100 training epoch)."""

    def __getitems__(self, indices: list[int]) -> Gathered:
        index = torch.as_tensor(indices)
        return Gathered(tuple(t[index] for t in self.tensors))


def collate(batch):
    """DataLoader's default collation, but a :class:`Gathered` batch is already stacked."""
    from torch.utils.data import default_collate

    return list(batch.tensors) if isinstance(batch, Gathered) else default_collate(batch)


def make_loaders(splits: DataSplits, batch_size: int, workers: int = 0, seed: int = 0,
                 pin_memory: bool = False) -> tuple[DataLoader, DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(seed)
    common = dict(batch_size=batch_size, num_workers=workers, pin_memory=pin_memory,
                  persistent_workers=workers > 0, collate_fn=collate)
    train = DataLoader(splits.train, shuffle=True, generator=gen, drop_last=False, **common)
    val = DataLoader(splits.val, shuffle=False, **common)
    test = DataLoader(splits.test, shuffle=False, **common)
    return train, val, test


# ----------------------------------------------------------------------------- helpers


class _Transformed(Dataset):
    """Apply a per-sample transform to a dataset's samples (train-time augmentation, or
    the eval transform of an image pool)."""

    def __init__(self, base: Dataset, transform: Callable[[Any], torch.Tensor]):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return self.transform(x), y


def _parts(labels: np.ndarray, given: dict[str, np.ndarray], own: str, val_fraction: float,
           split_file: Path | None, names: Sequence[str] | None = None) -> tuple[dict[str, np.ndarray], str]:
    """(train/val/test pool indices, how they were made): the split file's parts, else the
    data's own (``given``, described by ``own``), the rest held out by mcp."""
    if split_file is not None:
        given, own = read_split_file(split_file, len(labels), names), f"split file {split_file.name}"
    parts = resolve_parts(labels, given, val_fraction)
    if not given:
        return parts, SPLIT_OF_MCP
    held = [p for p in ("val", "test") if p not in given]
    return parts, own + (f"; {' and '.join(held)} held out by mcp" if held else "")


def _finish(splits: DataSplits, parts: dict[str, np.ndarray], how: str, order: str, pool_size: int,
            test_items: Callable[[], Iterator[bytes]], labels: np.ndarray,
            names: Sequence[str] | None = None) -> DataSplits:
    splits.parts, splits.how, splits.order, splits.pool_size = parts, how, order, pool_size
    splits.sample_ids = list(names) if names is not None else None
    splits.test_fingerprint = fingerprint(test_items, [splits.class_names[int(c)] for c in labels[parts["test"]]])
    return splits


def _tensor_splits(name: str, x: torch.Tensor, y: torch.Tensor, val_fraction: float, class_names: list[str],
                   augment: str = "none", raw: np.ndarray | None = None, given: dict[str, np.ndarray] | None = None,
                   own: str = "", split_file: Path | None = None, order: str = "") -> DataSplits:
    """Split in-memory data (see :mod:`mcp.data.split`), normalised with the training
    part's statistics. ``raw``: the samples as stored (before resizing and scaling), for
    the test set's fingerprint; ``given``: the data's own parts."""
    labels = y.numpy()
    parts, how = _parts(labels, given or {}, own, val_fraction, split_file)
    train_idx, val_idx, test_idx = parts["train"], parts["val"], parts["test"]
    mean = x[train_idx].mean(dim=(0, 2, 3), keepdim=True)
    std = x[train_idx].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    x = (x - mean) / std
    train: Dataset = InMemory(x[train_idx], y[train_idx])
    if augment != "none":
        from torchvision import transforms as T

        train = _Transformed(train, T.Compose(train_augment(augment, tuple(x.shape[2:]))))
    stored = raw if raw is not None else x.numpy()
    splits = DataSplits(
        name=name,
        train=train,
        val=InMemory(x[val_idx], y[val_idx]),
        test=InMemory(x[test_idx], y[test_idx]),
        input_shape=tuple(x.shape[1:]),  # type: ignore[arg-type]
        num_classes=len(class_names),
        class_names=class_names,
        augment=augment,
    )
    return _finish(splits, parts, how, order or f"the {len(labels):,} samples in the order {name} reads them",
                   len(labels), lambda: (np.ascontiguousarray(stored[i]).tobytes() for i in test_idx), labels)


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


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``load_digits()`` gives them (images (1797, 8, 8) float64,
    labels): read from the file scikit-learn ships, as ``load_digits`` reads it, without
    importing scikit-learn (1.3 s of a stage's start-up here, for a 0.02 s read); through
    ``load_digits`` where the file is not where scikit-learn keeps it."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")
            return np.ascontiguousarray(data[:, :-1]).reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


@register_dataset("digits")
def _digits(val_fraction: float, input_shape: tuple[int, int, int] | None = None, augment: str = "auto",
            split_file: Path | None = None, **_: object) -> DataSplits:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real images, 10 classes);
    --input-shape 1xHxW (or 3xHxW) resizes them bilinearly, for models that need more pixels."""
    images, target = digits_arrays()
    x = _resized(torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0, input_shape, "digits")
    y = torch.tensor(target, dtype=torch.long)
    return _tensor_splits("digits", x, y, val_fraction, [str(c) for c in range(10)], _augment_of(augment, "none"),
                          raw=images, split_file=split_file,
                          order="the 1,797 images in scikit-learn's load_digits() order")


@register_dataset("synthetic")
def _synthetic(input_shape: tuple[int, int, int] | None, num_classes: int, val_fraction: float,
               augment: str = "auto", split_file: Path | None = None, **_: object) -> DataSplits:
    """Random class prototypes plus noise: learnable, any shape, instant. For tests and speed checks."""
    shape = input_shape or (3, 32, 32)
    classes = num_classes or 10
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    n = 80 * classes
    prototypes = torch.randn((classes, *shape), generator=gen)
    y = torch.arange(n) % classes
    x = prototypes[y] + 1.5 * torch.randn((n, *shape), generator=gen)
    return _tensor_splits("synthetic", x, y, val_fraction, [f"class_{c}" for c in range(classes)],
                          _augment_of(augment, "none"), split_file=split_file,
                          order=f"the {n:,} generated samples (class = index mod {classes})")


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
         split_file: Path | None = None, **_: object) -> DataSplits:
    """IDX files in --data-dir (MNIST, Fashion-MNIST, KMNIST, EMNIST; .gz or not): the train/test
    pair when both are there, else one pair split like the others; --input-shape resizes."""
    pairs = _idx_pairs(data_dir)
    roles: dict[str, list[str]] = {}
    for prefix in pairs:
        roles.setdefault(_idx_role(prefix), []).append(prefix)
    if len(pairs) == 1:
        (prefix,) = pairs
        x, y = _read_idx_pair(*pairs[prefix])
        given: dict[str, np.ndarray] = {}
        order = f"the {len(y):,} images of {pairs[prefix][0].name}"
    elif len(pairs) == 2 and len(roles.get("train", ())) == 1 and len(roles.get("test", ())) == 1:
        x, y = _read_idx_pair(*pairs[roles["train"][0]])
        x_test, y_test = _read_idx_pair(*pairs[roles["test"][0]])
        if x_test.shape[1:] != x.shape[1:]:
            raise McpError(f"IDX test images are {'x'.join(map(str, x_test.shape[1:]))}, training images "
                           f"{'x'.join(map(str, x.shape[1:]))}; they must match")
        order = (f"the {len(y):,} images of {pairs[roles['train'][0]][0].name}, then the {len(y_test):,} of "
                 f"{pairs[roles['test'][0]][0].name} (indices from {len(y):,})")
        given = {"train": np.arange(len(y)), "test": np.arange(len(y), len(y) + len(y_test))}
        x, y = np.concatenate([x, x_test]), np.concatenate([y, y_test])
    else:
        raise McpError(f"data_dir {str(data_dir)!r} holds {len(pairs)} IDX pairs ({', '.join(sorted(pairs))}); "
                       f"expected one, or one whose name says train and one that says test (or t10k)")
    classes = np.unique(y)
    index = np.full(256, -1, dtype=np.int64)
    index[classes] = np.arange(len(classes))  # EMNIST letters are labelled 1-26: classes are the labels present
    if len(classes) < 2:
        raise McpError(f"IDX labels in {str(data_dir)!r} hold {len(classes)} class; at least 2 are needed")
    xt = _resized(torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1), input_shape, "idx")
    return _tensor_splits("idx", xt, torch.from_numpy(index[y]), val_fraction, [str(int(c)) for c in classes],
                          _augment_of(augment, "none"), raw=x, given=given,
                          own="the IDX train and test files" if given else "", split_file=split_file, order=order)


_TORCHVISION = {
    # name: (class name, folder checked, mean, std, input shape, augment)
    "cifar10": ("CIFAR10", "cifar-10-batches-py", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                (3, 32, 32), "crop_flip"),
    "cifar100": ("CIFAR100", "cifar-100-python", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                 (3, 32, 32), "crop_flip"),
    "mnist": ("MNIST", "MNIST", (0.1307,), (0.3081,), (1, 28, 28), "none"),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST", (0.2860,), (0.3530,), (1, 28, 28), "flip"),
}


def _torchvision_dataset(name: str, data_dir: Path, download: bool, val_fraction: float,
                         augment: str, split_file: Path | None = None) -> DataSplits:
    import torchvision
    from torchvision import transforms as T

    cls_name, folder, mean, std, shape, default_augment = _TORCHVISION[name]
    augment = _augment_of(augment, default_augment)
    cls = getattr(torchvision.datasets, cls_name)
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    train_tf = T.Compose(train_augment(augment, shape[1:]) + normalize)
    eval_tf = T.Compose(normalize)
    try:
        train = cls(str(data_dir), train=True, download=download)
        test = cls(str(data_dir), train=False, download=False)
    except (RuntimeError, OSError) as exc:
        if download:
            raise McpError(f"could not download dataset {name!r} into {str(data_dir)!r}: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        raise McpError(
            f"dataset {name!r} not found in data_dir {str(data_dir)!r} (expected torchvision's layout, "
            f"{str(data_dir / folder)!r}); pass --download to fetch it where a network exists") from None
    n_train = len(train)
    labels = np.concatenate([np.asarray(train.targets), np.asarray(test.targets)])
    given = {"train": np.arange(n_train), "test": np.arange(n_train, len(labels))}
    parts, how = _parts(labels, given, f"{cls_name}'s train and test sets", val_fraction, split_file)
    pool = ConcatDataset([train, test])
    raw = (np.asarray(train.data), np.asarray(test.data))
    splits = DataSplits(
        name=name,
        train=_Transformed(Subset(pool, parts["train"].tolist()), train_tf),
        val=_Transformed(Subset(pool, parts["val"].tolist()), eval_tf),
        test=_Transformed(Subset(pool, parts["test"].tolist()), eval_tf),
        input_shape=shape,
        num_classes=len(train.classes),
        class_names=[str(c) for c in train.classes],
        augment=augment,
    )
    return _finish(splits, parts, how, f"{cls_name}'s {n_train:,} training images, then its {len(test):,} test "
                                       f"images (indices from {n_train:,})", len(labels),
                   lambda: (np.ascontiguousarray(raw[0][i] if i < n_train else raw[1][i - n_train]).tobytes()
                            for i in parts["test"]), labels)


def _make_torchvision_loader(name: str) -> Loader:
    def load(data_dir: Path, download: bool, val_fraction: float, augment: str = "auto",
             split_file: Path | None = None, **_: object) -> DataSplits:
        return _torchvision_dataset(name, data_dir, download, val_fraction, augment, split_file)

    load.__doc__ = f"torchvision's {_TORCHVISION[name][0]} from --data-dir (--download to fetch)."
    return load


for _name in _TORCHVISION:
    register_dataset(_name)(_make_torchvision_loader(_name))


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_IMAGEFOLDER_LAYOUT = ("expected class subfolders (data_dir/<class>/<image>) or split folders "
                       "(data_dir/train/<class>/..., optional val/ and test/)")


@register_dataset("imagefolder")
def _imagefolder(data_dir: Path, input_shape: tuple[int, int, int] | None, val_fraction: float,
                 augment: str = "auto", split_file: Path | None = None, **_: object) -> DataSplits:
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
    train_tf = T.Compose(base + train_augment(augment, size) + normalize)
    eval_tf = T.Compose(base + normalize)

    def folder(path: Path) -> ImageFolder:
        try:
            found = ImageFolder(str(path), loader=_load_image)
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
    names = [p for p in ("train", "val", "test") if has_splits and (data_dir / p).is_dir()] or [""]
    folders = [folder(data_dir / p) for p in names]
    for part, found in zip(names[1:], folders[1:]):
        _check_classes(folders[0], found, part)
    labels = np.concatenate([np.asarray(f.targets, dtype=np.int64) for f in folders])
    ids = [Path(p).relative_to(data_dir).as_posix() for f in folders for p, _ in f.samples]
    starts = np.cumsum([0] + [len(f) for f in folders])
    given = {p: np.arange(starts[i], starts[i + 1]) for i, p in enumerate(names) if p}
    own = f"the folders {', '.join(p + '/' for p in names)}" if has_splits else ""
    parts, how = _parts(labels, given, own, val_fraction, split_file, ids)
    if min(len(parts[p]) for p in parts) == 0:
        raise McpError(f"image folder {str(data_dir)!r} has too few images ({len(labels)}) to make "
                       f"train/val/test splits; add images or provide train/, val/ and test/ folders")
    pool = ConcatDataset(folders)
    evaluated = _Transformed(pool, eval_tf)
    if channels == 1:  # mean and sd of (a seeded sample of up to 2,000) training images, as for digits and IDX
        sample = np.random.default_rng(SPLIT_SEED).permutation(parts["train"])[:2000]
        pixels = torch.stack([evaluated[int(i)][0] for i in sample])
        norm.mean, norm.std = [pixels.mean().item()], [max(pixels.std().item(), 1e-6)]
    splits = DataSplits(
        name="imagefolder",
        train=_Transformed(Subset(pool, parts["train"].tolist()), train_tf),
        val=Subset(evaluated, parts["val"].tolist()),
        test=Subset(evaluated, parts["test"].tolist()),
        input_shape=shape,
        num_classes=len(folders[0].classes),
        class_names=list(folders[0].classes),
        augment=augment,
    )
    sizes = [Path(p).stat().st_size for f in folders for p, _ in f.samples]
    return _finish(splits, parts, how, "the image files (paths relative to the data folder)", len(labels),
                   lambda: (f"{Path(ids[i]).name}:{sizes[i]}".encode() for i in parts["test"]), labels, ids)


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
