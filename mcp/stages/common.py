"""Pieces every stage shares: data + device set-up, final metrics, logging and registering."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from mcp.config import DataOptions


def setup_data(cfg: DataOptions):
    """(device, splits, (train, val, test) loaders): fails on bad input before any run starts."""
    from mcp.data import load_dataset, make_loaders
    from mcp.training import resolve_device

    device = resolve_device(cfg.device)
    splits = load_dataset(cfg.dataset, cfg.data_dir, cfg.download, cfg.input_shape or None,
                          cfg.num_classes, cfg.val_fraction)
    loaders = make_loaders(splits, cfg.batch_size, cfg.workers, cfg.seed, pin_memory=device == "cuda")
    return device, splits, loaders


def final_metrics(model: nn.Module, input_shape: tuple[int, ...], device: str) -> dict[str, float]:
    """Glossary metrics of a model's shape, size and speed (accuracy is added by the caller)."""
    from mcp.evaluation.metrics import count_macs, count_params, latency_metrics, size_bytes_fp32

    metrics: dict[str, float] = dict(count_params(model))
    metrics["macs"] = float(count_macs(model, input_shape))
    metrics["size_bytes_fp32"] = float(size_bytes_fp32(model))
    metrics.update(latency_metrics(model, input_shape, "cpu"))
    if device == "cuda":
        metrics.update(latency_metrics(model, input_shape, "cuda"))
    return metrics


def log_plot(plot: Callable[..., Path], filename: str, *args: Any, **kwargs: Any) -> None:
    """Draw with ``plot(..., path)`` into a temporary PNG and log it under ``plots/``."""
    from mcp import tracking

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        plot(*args, path=path, **kwargs)
        tracking.log_artifact(path, "plots")


def log_and_register(model: nn.Module, example: torch.Tensor, extra_recipe: Mapping[str, Any],
                     registered: str | None, alias: str | None, tags: Mapping[str, Any]) -> tuple[str, str | None]:
    """Log the model into the active run; register it when ``registered`` is a name.
    Returns (model URI of the logged model, registered version or None)."""
    from mcp import tracking

    info = tracking.log_model(model, example, extra_recipe)
    if not registered:
        return info.model_uri, None
    version = tracking.register_model(info.model_uri, registered, alias, tags)
    return info.model_uri, str(version.version)
