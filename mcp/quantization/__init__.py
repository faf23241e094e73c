"""Quantization: uniform fixed point (PTQ, QAT, per-layer bits), INT8 through ONNX
Runtime, k-means weight sharing, Huffman coding and the encoded payload that sizes them.
Methods are chosen by name from :mod:`mcp.quantization.methods` (one module each).

The names below load on first use, so that reading the method registry (the CLI does on
start-up) does not import torch."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Codebook": "codec", "Uniform": "codec", "decode": "codec", "decode_into": "codec", "encode": "codec",
    "encode_model": "codec", "QuantSpec": "engine", "Quantizer": "engine", "layer_table": "engine",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
