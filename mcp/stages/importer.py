"""`mcp import`: a model trained elsewhere (a zoo architecture or the user's own factory,
with its weights) measured on a dataset and registered as the ``baseline`` of
``<name>-<dataset>``, so that every other stage starts from it. Nothing is unpickled:
weights are a ``state_dict`` read with ``weights_only=True`` or a safetensors file, and
the recipe names the factory by its import path."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mcp import tracking
from mcp.config import ImportConfig
from mcp.data.split import SPLIT_OF_MCP
from mcp.errors import McpError
from mcp.evaluation.metrics import model_metrics, peak_memory_mb
from mcp.evaluation.plots import plot_training_curves
from mcp.models import create_model
from mcp.models.foreign import (
    TIMM_FACTORY,
    build_from_factory,
    check_timm,
    find_head,
    load_weights,
    read_weights,
    replace_head,
)
from mcp.stages.common import data_recipe, deployment_figures, finetune_of, log_and_register, setup_data
from mcp.tracking import schema
from mcp.tracking.tables import log_plot
from mcp.training import evaluate
from mcp.training.transfer import finetune_transfer


@dataclass
class ImportResult:
    run_id: str
    metrics: dict[str, float]
    model: nn.Module
    registered_name: str | None
    registered_version: str | None
    test_set: str = ""  # which images it was measured on, and how they were split off


def build_model(cfg: ImportConfig, splits) -> tuple[nn.Module, dict[str, Any]]:
    """The model and the recipe that rebuilds it, weights loaded; every bad input fails here."""
    shape, classes = list(splits.input_shape), splits.num_classes
    source = cfg.source()
    if cfg.module or cfg.timm:
        factory, kwargs = cfg.module, cfg.factory_kwargs()
        if cfg.timm:
            factory, kwargs = TIMM_FACTORY, {"model_name": cfg.timm, **kwargs, "pretrained": False}
            check_timm(cfg.timm)
        model = build_from_factory(factory, kwargs)
        recipe = {"name": cfg.registered_model(), "factory": factory, "kwargs": kwargs,
                  "source": "timm" if cfg.timm else "module", "num_classes": classes, "input_shape": shape}
    else:
        model = create_model(cfg.model, classes, shape)
        recipe = {**model.mcp_recipe, "source": "zoo"}
    if cfg.weights:
        load_weights(model, read_weights(cfg.weights), f"weights={cfg.weights!r}")
    elif cfg.model_uri:
        load_weights(model, tracking.models.foreign_state_dict(cfg.model_uri, cfg.trust_pickled_model),
                     f"model_uri={cfg.model_uri!r}")
    if cfg.head:
        head = find_head(model, tuple(shape)) if cfg.head == "auto" else cfg.head
        recipe["head"] = replace_head(model, head, classes)
    model.eval()
    x = torch.zeros(2, *shape)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001 - the user's forward can raise anything
        raise McpError(f"{source} cannot take the dataset's input {shape}: {type(exc).__name__}: "
                       f"{(str(exc).splitlines() or [''])[0][:200]}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise McpError(f"{source} gives outputs {got} for a batch of 2, but dataset "
                       f"{cfg.dataset!r} has {classes} classes: it must return logits of shape [batch, {classes}] "
                       f"(--head auto replaces its classifier with one for these classes)")
    model.mcp_recipe = recipe
    return model, recipe


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_import(cfg: ImportConfig, show_progress: bool | None = None) -> ImportResult:
    """Build, load and check first; only a model that loads and fits the data gets a run."""
    device, splits, loaders = setup_data(cfg)
    test_loader = loaders[2]
    model, recipe = build_model(cfg, splits)
    name = cfg.registered_model()
    source = cfg.source()
    params = {**cfg.to_dict(), **{f"data_{k}": v for k, v in splits.summary().items()}, "device_resolved": device,
              "weights_sha256": _sha256(cfg.weights) if cfg.weights else ""}
    tags = {schema.MODEL: name, schema.DATASET: cfg.dataset, schema.SOURCE: source,
            **({schema.WEIGHTS: Path(cfg.weights).name} if cfg.weights else {}),
            **({schema.PARENT_MODEL: cfg.model_uri} if cfg.model_uri else {})}
    with tracking.stage_run("import", params, tags, run_name=f"import-{name}-{cfg.dataset}") as run:
        model = model.to(device)
        if cfg.epochs:
            history = finetune_transfer(
                model, loaders, recipe.get("head", {}).get("module", ""),
                finetune_of(cfg),
                cfg.freeze_epochs, device=device, callbacks=[tracking.EpochLogger()], progress=show_progress,
                desc=f"import {name}")
            log_plot(plot_training_curves, "training_curves.png", history, title=f"{name} on {cfg.dataset}")
        test = evaluate(model, test_loader, device)
        metrics = {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
                   **model_metrics(model, splits.input_shape, device), "peak_memory_mb": peak_memory_mb(device)}
        metrics.update(deployment_figures(model, splits.input_shape, None, None, None, "the imported model"))
        tracking.log_metrics(metrics)
        reg_name = schema.registered_name(name, cfg.dataset) if cfg.register else None
        version_tags = {schema.STAGE: "import", "source_run": run.info.run_id, "source": source,
                        **({"weights": Path(cfg.weights).name, "weights_sha256": params["weights_sha256"][:16]}
                           if cfg.weights else {}),
                        **({"parent_model": cfg.model_uri} if cfg.model_uri else {}),
                        **{k: f"{metrics[k]:.6g}" for k in ("test_accuracy", "params_total", "macs",
                                                             "size_bytes_fp32", "latency_ms_p50_cpu")}}
        _, version = log_and_register(model, next(iter(test_loader))[0][:4],
                                      data_recipe(splits), reg_name, schema.BASELINE if reg_name else None,
                                      version_tags)
    test_set = (f"{len(splits.test):,} images of {splits.name} ({splits.how}), test set {splits.test_fingerprint}"
                + ("" if cfg.split_file or splits.how != SPLIT_OF_MCP else
                   "; if your training saw any of them, give your split with --split-file (`mcp split` writes mcp's)"))
    return ImportResult(run.info.run_id, metrics, model, reg_name, version, test_set)
