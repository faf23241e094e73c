"""Quantization methods, chosen by name. Each method is one module of this package that
registers a :class:`QuantMethod` when imported; every module here is imported below, so
adding a method is adding its module. A method names its deployable file's deployer
(:data:`mcp.deploy.deployable.DEPLOYERS`), which the deployment package owns. The CLI's choices, the configs' validation, the
engine, the deployable ONNX model and the README's table all read this registry.

Nothing here imports torch at import time: the CLI reads the names on start-up."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mcp.errors import ConfigError


@dataclass(frozen=True)
class QuantMethod:
    name: str
    summary: str  # what it does (README table, --help)
    deployed_as: str  # the deployable ONNX model (README table)
    # the deployable file: a deployer's name in mcp.deploy.deployable.DEPLOYERS, or a method's own callable
    # (mcp.deploy.deployable.DeployInputs) -> (path, deploy format)
    deploy: str | Callable[[Any], tuple[Path, str]] = "float"
    shares_weights: bool = False  # k-means codebooks (else uniform grids, simulated by QuantSim)
    int8_only: bool = False  # bits are 8; symmetric per-channel weights, 8-bit activations, reduce_range
    sim_mode: str = "fixed"  # QuantSim mode while quantizing: fixed, train (QAT), dynamic
    calibrates: bool = False  # static activation ranges from calibration batches
    linear_only: bool = False  # quantizes the fully connected layers only
    fine_tunes: bool = False  # trains after attaching, for --epochs
    needs_epochs: bool = False  # meaningless without training (QAT)
    coding: str = "fixed"  # how the payload is encoded: fixed or huffman
    prunes_first: bool = False  # runs the prune stage first (Deep Compression)
    default_bits: tuple[int, int] = (8, 8)  # (convolutions, fully connected layers) when bits are not given
    default_epochs: int = 10  # fine-tuning epochs when not given (methods that fine-tune)
    remarks: Callable[[str, Any], list[str]] = lambda fmt, spec: []  # notes on what was deployed


_METHODS: dict[str, QuantMethod] = {}


def register_quant_method(method: QuantMethod) -> QuantMethod:
    if method.name in _METHODS:
        raise ValueError(f"quantization method {method.name!r} registered twice")
    if method.sim_mode not in ("fixed", "train", "dynamic") or method.coding not in ("fixed", "huffman"):
        raise ValueError(f"quantization method {method.name!r}: bad sim_mode or coding")
    _METHODS[method.name] = method
    return method


def quant_method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def quant_method(name: str) -> QuantMethod:
    if name not in _METHODS:
        raise ConfigError(f"unknown quantization method {name!r}; choose one of: {', '.join(_METHODS)}")
    return _METHODS[name]


def markdown_table() -> str:
    """The README's table of methods."""
    rows = ["| method | what it does | deployed ONNX model |", "|---|---|---|"]
    rows += [f"| `{m.name}` | {m.summary} | {m.deployed_as} |" for m in _METHODS.values()]
    return "\n".join(rows)


_ORDER = ("ptq_int8", "dynamic_int8", "fixed_point", "qat", "kmeans", "huffman", "deep_compression")


def _load_all() -> None:
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    for name in sorted(names, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n)):
        importlib.import_module(f"{__name__}.{name}")


_load_all()
