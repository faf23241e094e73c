"""Pieces every stage shares: data + device set-up, final metrics, logging and registering."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from mcp.config import DataOptions
from mcp.errors import McpError


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


def find_base_model(model: str, model_uri: str, dataset: str, splits) -> tuple[nn.Module | None, str]:
    """The model a compression stage starts from: ``model_uri``, else the registered
    ``<model>-<dataset>@baseline``. (None, its URI) when no baseline exists yet."""
    from mcp import tracking

    uri = model_uri
    if not uri:
        name = tracking.registered_name(model, dataset)
        uri = f"models:/{name}@baseline"
        if not tracking.alias_exists(name, "baseline"):
            return None, uri
    loaded = tracking.load_model(uri)
    recipe = loaded.mcp_recipe
    if tuple(recipe["input_shape"]) != tuple(splits.input_shape) or recipe["num_classes"] != splits.num_classes:
        raise McpError(f"model {uri!r} expects input {recipe['input_shape']} and {recipe['num_classes']} classes; "
                       f"dataset {dataset!r} gives {list(splits.input_shape)} and {splits.num_classes}")
    return loaded, uri


def probe_model(base: nn.Module | None, model: str, splits) -> nn.Module:
    """A copy of the starting model (or, when its baseline is still to be trained, a fresh
    one of the same architecture) to check a stage's settings on before any run starts."""
    from mcp.models import create_model

    return copy.deepcopy(base) if base is not None else create_model(model, splits.num_classes, splits.input_shape)


def train_baseline(cfg: DataOptions, show_progress: bool | None) -> tuple[nn.Module, str]:
    """Train and register ``<model>-<dataset>@baseline`` with train's defaults, as a run
    nested in the active one; tag the active run with it as ``mcp.parent_model``."""
    from mcp import tracking
    from mcp.config import TrainConfig
    from mcp.stages.train import run_train

    train_cfg = TrainConfig(model=cfg.model, **{k: getattr(cfg, k) for k in DataOptions.defaults()})
    trained = run_train(train_cfg, show_progress=show_progress)
    uri = f"models:/{trained.registered_name}/{trained.registered_version}"
    tracking.runs.set_tag("mcp.parent_model", uri)
    return trained.model, uri
