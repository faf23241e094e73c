"""mcp: a tracked model compression pipeline for PyTorch vision models.

The public Python API is the core the CLI stages call (see :mod:`mcp.api`)::

    import mcp
    pruned = mcp.prune(model, (train, val, test), sparsity=0.5, granularity="structured")
    quantized = mcp.quantize(pruned.model, (train, val, test), method="qat", bits=4, epochs=5)
    found = mcp.search(model, (train, val, test), space="default", budget_bytes=20_000)
    deployed = mcp.export(quantized.model, (train, val, test), "model.onnx")
    again = mcp.load(pruned.model_uri, model=MyNet())   # in a fresh process

`import mcp` stays light: the functions load :mod:`mcp.api` (and torch, MLflow and
friends with it) when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from mcp.errors import ConfigError, McpError

__version__ = "0.1.0"

_API = ("prune", "quantize", "distill", "export", "search", "measure", "load", "as_data", "Data", "SearchOutcome")

__all__ = ["ConfigError", "McpError", "__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module("mcp.api"), name)
    raise AttributeError(f"module 'mcp' has no attribute {name!r}")
