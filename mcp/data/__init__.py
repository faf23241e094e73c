"""Dataset registry: ``load_dataset(name, ...)`` returns seeded train/val/test splits."""

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

__all__ = ["DataSplits", "dataset_description", "dataset_names", "load_dataset", "make_loaders", "parse_shape",
           "read_split_file", "register_dataset", "write_split"]
