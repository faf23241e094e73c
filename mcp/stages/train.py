"""`mcp train`: train a dense model, log everything, register it as the baseline."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mcp import tracking
from mcp.config import DataOptions, TrainConfig
from mcp.errors import McpError
from mcp.evaluation.metrics import model_metrics, peak_memory_mb
from mcp.evaluation.plots import plot_training_curves
from mcp.models import create_model
from mcp.stages.common import data_recipe, deployment_figures, log_and_register, setup_data
from mcp.tracking import schema
from mcp.tracking.tables import log_plot
from mcp.training import EarlyStopping, ProgressBar, Trainer, build_optimizer, build_scheduler, evaluate
from mcp.training.checkpoint import CheckpointEveryEpoch, load_checkpoint, restore_trainer


@dataclass
class TrainResult:
    run_id: str
    model_uri: str
    registered_name: str | None
    registered_version: str | None
    metrics: dict[str, float]
    checkpoint: Path
    model: nn.Module


def checkpoint_config(path: str) -> dict[str, Any]:
    """The settings a checkpoint was trained with: the defaults for ``--resume``."""
    return dict(load_checkpoint(path).get("config", {}))


def _describe(recipe: Any) -> str:
    if not isinstance(recipe, dict):
        return "an unknown model"
    shape = "x".join(map(str, recipe.get("input_shape", [])))
    return f"model {recipe.get('name')!r} (input {shape}, {recipe.get('num_classes')} classes)"


def run_train(cfg: TrainConfig, show_progress: bool | None = None) -> TrainResult:
    """Everything that can fail on bad input fails before the MLflow run starts."""
    device, splits, (train_loader, val_loader, test_loader) = setup_data(cfg)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, splits.num_classes, splits.input_shape)
    optimizer = build_optimizer(model.to(device), cfg.optimizer, cfg.lr, cfg.momentum, cfg.nesterov,
                                cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.epochs, cfg.step_size, cfg.gamma)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    trainer = Trainer(model, optimizer, scheduler, train_loader, val_loader, epochs=cfg.epochs, device=device,
                      loss_fn=loss_fn, seed=cfg.seed)
    resumed_from: dict[str, Any] = {}
    if cfg.resume:
        resumed_from = load_checkpoint(cfg.resume)
        if resumed_from.get("recipe") != model.mcp_recipe:
            raise McpError(f"checkpoint {cfg.resume!r} does not match: it was saved for "
                           f"{_describe(resumed_from.get('recipe'))}, this run builds {_describe(model.mcp_recipe)}")
        restore_trainer(trainer, resumed_from, cfg.resume)
        if trainer.epoch >= cfg.epochs:
            raise McpError(f"checkpoint {cfg.resume!r} already completed {trainer.epoch} epochs; "
                           f"pass --epochs larger than {trainer.epoch} to train on")

    params = {**cfg.to_dict(), **{f"data_{k}": v for k, v in splits.summary().items()},
              "device_resolved": device, "cpu_threads": torch.get_num_threads()}
    tags = {schema.MODEL: cfg.model, schema.DATASET: cfg.dataset}
    if resumed_from:
        tags[schema.RESUMED_FROM_RUN] = str(resumed_from.get("run_id", ""))
    with tracking.stage_run("train", params, tags, run_name=f"train-{cfg.model}-{cfg.dataset}") as run:
        run_id = run.info.run_id
        if resumed_from.get("run_id"):
            tracking.runs.mark_killed(resumed_from["run_id"])
        for epoch in range(trainer.epoch):  # the resumed epochs, so the curves are whole
            tracking.log_metrics({k: v[epoch] for k, v in trainer.history.items() if k != "epoch"}, step=epoch)
        ckpt = Path(cfg.checkpoint_dir) / run_id / "last.pt"
        trainer.callbacks = [
            ProgressBar(f"train {cfg.model}/{cfg.dataset}", disable=None if show_progress is None
                        else not show_progress),
            EarlyStopping(cfg.patience),
            CheckpointEveryEpoch(ckpt, {"config": cfg.to_dict(), "recipe": model.mcp_recipe, "run_id": run_id}),
            tracking.EpochLogger(),
        ]
        wall0 = time.perf_counter()
        trainer.fit()
        test = evaluate(model, test_loader, device)
        metrics = {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
                   "best_val_accuracy": trainer.best_val_accuracy, "best_epoch": float(trainer.best_epoch),
                   "epochs_trained": float(trainer.epoch), "train_time_s": trainer.train_time_s,
                   "wall_time_s": time.perf_counter() - wall0}
        metrics.update(model_metrics(model, splits.input_shape, device))
        metrics["peak_memory_mb"] = peak_memory_mb(device)
        metrics.update(deployment_figures(model, splits.input_shape, None, None, None, "the baseline"))
        tracking.log_metrics(metrics)

        log_plot(plot_training_curves, "training_curves.png", trainer.history, title=f"{cfg.model} on {cfg.dataset}")
        reg_name = tracking.registered_name(cfg.model, cfg.dataset) if cfg.register else None
        version_tags = {schema.STAGE: "train", "source_run": run_id,
                        **{k: f"{metrics[k]:.6g}" for k in
                           ("test_accuracy", "params_total", "macs", "size_bytes_fp32", "latency_ms_p50_cpu")
                           if k in metrics}}  # no latency yet in the pipeline: its benchmark times the baseline
        _, reg_version = log_and_register(model, next(iter(test_loader))[0][:4],
                                          data_recipe(splits), reg_name, "baseline", version_tags)
    return TrainResult(run_id, f"runs:/{run_id}/{tracking.models.ARTIFACT_PATH}", reg_name, reg_version,
                       metrics, ckpt, model)


def run_baseline(cfg: DataOptions, show_progress: bool | None, model: str | None = None,
                 tag: str | None = schema.PARENT_MODEL) -> tuple[nn.Module, str]:
    """Train and register ``<model>-<dataset>@baseline`` (default: ``cfg.model``) with
    train's defaults, as a run nested in the active one, and tag the active run with its
    URI: how a compression stage gets the baseline it starts from when none exists yet."""
    train_cfg = TrainConfig(model=model or cfg.model, **{k: getattr(cfg, k) for k in DataOptions.defaults()})
    trained = run_train(train_cfg, show_progress=show_progress)
    uri = schema.version_uri(trained.registered_name, trained.registered_version)
    if tag:
        tracking.runs.set_tag(tag, uri)
    return trained.model, uri
