"""Datasets: ``load_dataset(name, ...)`` returns fixed, seeded train/val/test splits
(:mod:`mcp.data.registry`); how they are made, a user's own split and the test set's
fingerprint: :mod:`mcp.data.split`; augmentation: :mod:`mcp.data.augment`.

The names below load on first use (PEP 562), so that the configuration can read the
augmentation names without importing torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what static tools (type checkers, the API reference) see; loaded lazily below
    from mcp.data.registry import (
        DataSplits,
        dataset_description,
        dataset_names,
        load_dataset,
        make_loaders,
        parse_shape,
        register_dataset,
    )
    from mcp.data.split import read_split_file, write_split

_LAZY = {"DataSplits": "registry", "dataset_description": "registry", "dataset_names": "registry",
         "load_dataset": "registry", "make_loaders": "registry", "parse_shape": "registry",
         "register_dataset": "registry", "read_split_file": "split", "write_split": "split"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
