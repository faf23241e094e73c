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
from mcp.errors import McpError
from mcp.evaluation.metrics import model_metrics, peak_memory_mb
from mcp.models import create_model
from mcp.models.foreign import build_from_factory, load_weights, read_weights
from mcp.stages.common import log_and_register, setup_data
from mcp.tracking import schema
from mcp.training import evaluate


@dataclass
class ImportResult:
    run_id: str
    metrics: dict[str, float]
    model: nn.Module
    registered_name: str | None
    registered_version: str | None


def build_model(cfg: ImportConfig, splits) -> tuple[nn.Module, dict[str, Any]]:
    """The model and the recipe that rebuilds it, weights loaded; every bad input fails here."""
    shape, classes = list(splits.input_shape), splits.num_classes
    if cfg.module:
        kwargs = cfg.factory_kwargs()
        model = build_from_factory(cfg.module, kwargs)
        recipe = {"name": cfg.registered_model(), "factory": cfg.module, "kwargs": kwargs, "source": "module",
                  "num_classes": classes, "input_shape": shape}
    else:
        model = create_model(cfg.model, classes, shape)
        recipe = {**model.mcp_recipe, "source": "zoo"}
    what = f"weights={cfg.weights!r}" if cfg.weights else f"module={cfg.module!r}"
    if cfg.weights:
        load_weights(model, read_weights(cfg.weights), what)
    model.eval()
    x = torch.zeros(2, *shape)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001 - the user's forward can raise anything
        raise McpError(f"{cfg.module or cfg.model} cannot take the dataset's input {shape}: {type(exc).__name__}: "
                       f"{(str(exc).splitlines() or [''])[0][:200]}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise McpError(f"{cfg.module or cfg.model} gives outputs {got} for a batch of 2, but dataset "
                       f"{cfg.dataset!r} has {classes} classes: it must return logits of shape [batch, {classes}]")
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
    device, splits, (_, _, test_loader) = setup_data(cfg)
    model, recipe = build_model(cfg, splits)
    name = cfg.registered_model()
    source = cfg.module or cfg.model
    params = {**cfg.to_dict(), **{f"data_{k}": v for k, v in splits.summary().items()}, "device_resolved": device,
              "weights_sha256": _sha256(cfg.weights) if cfg.weights else ""}
    tags = {schema.MODEL: name, schema.DATASET: cfg.dataset, schema.SOURCE: source,
            **({schema.WEIGHTS: Path(cfg.weights).name} if cfg.weights else {})}
    with tracking.stage_run("import", params, tags, run_name=f"import-{name}-{cfg.dataset}") as run:
        model = model.to(device)
        test = evaluate(model, test_loader, device)
        metrics = {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
                   **model_metrics(model, splits.input_shape, device), "peak_memory_mb": peak_memory_mb(device)}
        tracking.log_metrics(metrics)
        reg_name = schema.registered_name(name, cfg.dataset) if cfg.register else None
        version_tags = {schema.STAGE: "import", "source_run": run.info.run_id, "source": source,
                        **({"weights": Path(cfg.weights).name, "weights_sha256": params["weights_sha256"][:16]}
                           if cfg.weights else {}),
                        **{k: f"{metrics[k]:.6g}" for k in ("test_accuracy", "params_total", "macs",
                                                             "size_bytes_fp32", "latency_ms_p50_cpu")}}
        _, version = log_and_register(model, next(iter(test_loader))[0][:4],
                                      {"dataset": cfg.dataset, "class_names": splits.class_names},
                                      reg_name, schema.BASELINE if reg_name else None, version_tags)
    return ImportResult(run.info.run_id, metrics, model, reg_name, version)
