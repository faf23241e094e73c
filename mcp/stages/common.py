"""Pieces every stage shares: data + device set-up, final metrics, logging and registering."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mcp.config import DataOptions, RecoveryOptions
from mcp.errors import McpError
from mcp.tracking import schema
from mcp.training.setup import FineTune


def setup_data(cfg: DataOptions):
    """(device, splits, (train, val, test) loaders): fails on bad input before any run starts."""
    from mcp.data import load_dataset, make_loaders
    from mcp.training import resolve_device

    device = resolve_device(cfg.device)
    splits = load_dataset(cfg.dataset, cfg.data_dir, cfg.download, cfg.input_shape or None,
                          cfg.num_classes, cfg.val_fraction)
    loaders = make_loaders(splits, cfg.batch_size, cfg.workers, cfg.seed, pin_memory=device == "cuda")
    return device, splits, loaders


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
    from mcp.config import URI_SCHEMES
    from mcp.models import model_names

    if ref in model_names():
        return schema.alias_uri(schema.registered_name(ref, dataset), schema.BASELINE)
    return ref if ref.startswith(URI_SCHEMES) else schema.MODELS_SCHEME + ref


def resolve_model_ref(ref: str, dataset: str, splits,
                      trust_pickled: bool = False) -> tuple[nn.Module | None, str, str]:
    """Load the model ``ref`` names (see :func:`mcp.config.check_model_ref`) and check it
    fits the dataset. Returns (model, URI, architecture name); the model is None when
    ``ref`` is a model name whose ``<model>-<dataset>@baseline`` is still to be trained."""
    from mcp import tracking
    from mcp.models import model_names

    uri = reference_uri(ref, dataset)
    if ref in model_names() and not tracking.alias_exists(tracking.registered_name(ref, dataset), "baseline"):
        return None, uri, ref
    loaded = tracking.load_model(uri, trust_pickled=trust_pickled)
    uri = tracking.models.pin_version(uri)
    recipe = loaded.mcp_recipe
    if tuple(recipe["input_shape"]) != tuple(splits.input_shape) or recipe["num_classes"] != splits.num_classes:
        raise McpError(f"model {uri!r} expects input {recipe['input_shape']} and {recipe['num_classes']} classes; "
                       f"dataset {dataset!r} gives {list(splits.input_shape)} and {splits.num_classes}")
    return loaded, uri, recipe["name"]


def find_base_model(model: str, model_uri: str, dataset: str, splits,
                    trust_pickled: bool = False) -> tuple[nn.Module | None, str]:
    """The model a compression stage starts from: ``model_uri``, else the registered
    ``<model>-<dataset>@baseline``. (None, its URI) when no baseline exists yet."""
    loaded, uri, _ = resolve_model_ref(model_uri or model, dataset, splits, trust_pickled)
    return loaded, uri


def probe_model(base: nn.Module | None, model: str, splits) -> nn.Module:
    """A copy of the starting model (or, when its baseline is still to be trained, a fresh
    one of the same architecture) to check a stage's settings on before any run starts."""
    from mcp.models import create_model

    return copy.deepcopy(base) if base is not None else create_model(model, splits.num_classes, splits.input_shape)


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
    teacher, uri, _ = resolve_model_ref(cfg.distill_from, cfg.dataset, splits, cfg.trust_pickled_model)
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


def deployable_of(uri: str, tmp: Path) -> tuple[Path, str] | None:
    """The deployable ONNX file (and its format) the stage that made ``uri`` built and
    logged, for a quantized model; None for a float model (the export builds its file)."""
    from mcp import tracking

    (tmp / "deployed").mkdir(parents=True, exist_ok=True)
    path, fmt = tracking.models.deployable_onnx(uri, tmp / "deployed")
    return (path, fmt) if path is not None else None


def lineage(base: nn.Module | None, base_uri: str, model: str, dataset: str) -> tuple[str, str]:
    """(architecture name, registered name) of what a stage makes from its starting model:
    a new version of the registered model ``base_uri`` belongs to, else of
    ``<architecture>-<dataset>``. An imported model keeps its own name; a baseline still
    to be trained is the zoo ``model``'s."""
    arch = str(base.mcp_recipe.get("name", model)) if base is not None else model
    return arch, schema.registered_name_of(base_uri) or schema.registered_name(arch, dataset)


def finetune_of(cfg: Any) -> FineTune:
    """The fine-tuning settings of a stage config that trains (epochs, optimizer, LR, ...)."""
    return FineTune(epochs=cfg.epochs, optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                    weight_decay=cfg.weight_decay, scheduler=cfg.scheduler, seed=cfg.seed)
