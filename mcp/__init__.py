"""mcp: a tracked model compression pipeline for PyTorch vision models.

The public Python API is the core the CLI stages call (see :mod:`mcp.api`)::

    import mcp
    pruned = mcp.prune(model, (train, val, test), sparsity=0.5, granularity="structured")
    quantized = mcp.quantize(pruned.model, (train, val, test), method="qat", bits=4, epochs=5)
    study = mcp.search(model, (train, val, test), space="default", budget_bytes=20_000)
    deployed = mcp.export(quantized.model, (train, val, test), "model.onnx")

``mcp.search`` and ``mcp.export`` are also the packages that hold those cores; calling
them calls :func:`mcp.api.search` and :func:`mcp.api.export`.

`import mcp` stays light: torch, mlflow and friends load in the modules that use them.
"""

from __future__ import annotations

import importlib
from typing import Any

from mcp.errors import ConfigError, McpError

__version__ = "0.1.0"

_API = ("prune", "quantize", "distill", "measure", "load", "as_data", "Data")
_CALLABLE_PACKAGES = ("search", "export")

__all__ = ["ConfigError", "McpError", "__version__", *_API, *_CALLABLE_PACKAGES]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module("mcp.api"), name)
    if name in _CALLABLE_PACKAGES:
        return importlib.import_module(f"mcp.{name}")
    raise AttributeError(f"module 'mcp' has no attribute {name!r}")
