"""Pieces every stage shares: data + device set-up, final metrics, logging and registering."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from mcp.config import DataOptions, RecoveryOptions
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


def reference_uri(ref: str, dataset: str) -> str:
    """The URI a model reference means: a model name is ``models:/<model>-<dataset>@baseline``,
    ``<name>@<alias>`` is ``models:/<name>@<alias>``, a URI is itself."""
    from mcp import tracking
    from mcp.config import URI_SCHEMES
    from mcp.models import model_names

    if ref in model_names():
        return f"models:/{tracking.registered_name(ref, dataset)}@baseline"
    return ref if ref.startswith(URI_SCHEMES) else f"models:/{ref}"


def resolve_model_ref(ref: str, dataset: str, splits) -> tuple[nn.Module | None, str, str]:
    """Load the model ``ref`` names (see :func:`mcp.config.check_model_ref`) and check it
    fits the dataset. Returns (model, URI, architecture name); the model is None when
    ``ref`` is a model name whose ``<model>-<dataset>@baseline`` is still to be trained."""
    from mcp import tracking
    from mcp.models import model_names

    uri = reference_uri(ref, dataset)
    if ref in model_names() and not tracking.alias_exists(tracking.registered_name(ref, dataset), "baseline"):
        return None, uri, ref
    loaded = tracking.load_model(uri)
    uri = tracking.models.pin_version(uri)
    recipe = loaded.mcp_recipe
    if tuple(recipe["input_shape"]) != tuple(splits.input_shape) or recipe["num_classes"] != splits.num_classes:
        raise McpError(f"model {uri!r} expects input {recipe['input_shape']} and {recipe['num_classes']} classes; "
                       f"dataset {dataset!r} gives {list(splits.input_shape)} and {splits.num_classes}")
    return loaded, uri, recipe["name"]


def find_base_model(model: str, model_uri: str, dataset: str, splits) -> tuple[nn.Module | None, str]:
    """The model a compression stage starts from: ``model_uri``, else the registered
    ``<model>-<dataset>@baseline``. (None, its URI) when no baseline exists yet."""
    loaded, uri, _ = resolve_model_ref(model_uri or model, dataset, splits)
    return loaded, uri


def probe_model(base: nn.Module | None, model: str, splits) -> nn.Module:
    """A copy of the starting model (or, when its baseline is still to be trained, a fresh
    one of the same architecture) to check a stage's settings on before any run starts."""
    from mcp.models import create_model

    return copy.deepcopy(base) if base is not None else create_model(model, splits.num_classes, splits.input_shape)


def train_baseline(cfg: DataOptions, show_progress: bool | None, model: str | None = None,
                   tag: str | None = "mcp.parent_model") -> tuple[nn.Module, str]:
    """Train and register ``<model>-<dataset>@baseline`` (default: ``cfg.model``) with
    train's defaults, as a run nested in the active one; tag the active run with it."""
    from mcp import tracking
    from mcp.config import TrainConfig
    from mcp.stages.train import run_train

    train_cfg = TrainConfig(model=model or cfg.model, **{k: getattr(cfg, k) for k in DataOptions.defaults()})
    trained = run_train(train_cfg, show_progress=show_progress)
    uri = f"models:/{trained.registered_name}/{trained.registered_version}"
    if tag:
        tracking.runs.set_tag(tag, uri)
    return trained.model, uri


def recovery_teacher(cfg: RecoveryOptions, base: nn.Module | None, base_uri: str,
                     splits) -> tuple[nn.Module | None, str]:
    """The teacher of distillation-as-recovery: (model or None, its URI); ("", None) when
    ``distill_from`` is empty. 'parent' is the model the stage starts from (``base``),
    None while that baseline is still to be trained."""
    from mcp.config import PARENT

    if not cfg.distill_from:
        return None, ""
    if cfg.distill_from == PARENT:
        return base, base_uri
    teacher, uri, _ = resolve_model_ref(cfg.distill_from, cfg.dataset, splits)
    if teacher is None:
        raise McpError(f"distill_from={cfg.distill_from!r}: {uri} does not exist; train it first "
                       f"(mcp train --model {cfg.distill_from} --dataset {cfg.dataset})")
    return teacher, uri


def recovery_loss(cfg: RecoveryOptions, teacher: nn.Module | None, device: str):
    """The Trainer's ``batch_loss`` for distillation-as-recovery (None: plain CE)."""
    if teacher is None:
        return None
    from mcp.distillation import Distiller, DistillSpec

    return Distiller(teacher, DistillSpec(cfg.distill_temperature, cfg.distill_alpha)).to(device)
