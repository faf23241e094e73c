"""`mcp prune`: prune a trained model on a schedule, fine-tune at a reduced LR, register it."""

from __future__ import annotations

import copy
import csv
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from mcp.config import PRUNE_SCHEDULES, PruneConfig
from mcp.errors import ConfigError


@dataclass
class PruneResult:
    run_id: str
    metrics: dict[str, float]
    model: nn.Module
    layer_sparsity: dict[str, float]
    registered_name: str | None
    registered_version: str | None
    comparison: list[dict[str, Any]] | None = None


def read_ratios(path: str) -> dict[str, float]:
    """Per-layer ratios from YAML (layer name: ratio)."""
    from mcp.config import read_config_file

    data = read_config_file(path)
    try:
        return {str(k): float(v) for k, v in data.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"ratios file {path!r} must map layer names to numbers in [0, 1)") from None


def spec_of(cfg: PruneConfig, ratios: dict[str, float]):
    from mcp.pruning import PruneSpec

    return PruneSpec(criterion=cfg.criterion, scope=cfg.scope, granularity=cfg.granularity, schedule=cfg.schedule,
                     sparsity=cfg.sparsity, initial_sparsity=cfg.initial_sparsity, steps=cfg.prune_steps,
                     ratios=ratios, keep_first=cfg.keep_first, keep_last=cfg.keep_last,
                     ignored_layers=tuple(cfg.ignored()), norm=cfg.norm, hessian=cfg.hessian)


def variants(cfg: PruneConfig, model: nn.Module) -> list[PruneConfig]:
    """The configs one call runs: one, or one per schedule / per applicable criterion."""
    from mcp.pruning import create_criterion, criterion_names

    if cfg.compare == "schedules":
        return [cfg.replace(schedule=s, compare="") for s in PRUNE_SCHEDULES]
    if cfg.compare == "criteria":
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        chosen = []
        for name in criterion_names():
            try:
                create_criterion(name, cfg.granularity)
            except ConfigError:
                continue
            if name != "bn_scaling" or has_bn:
                chosen.append(cfg.replace(criterion=name, compare=""))
        return chosen
    return [cfg]


def calibration_batches(loader: DataLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    fixed = DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False)
    batches = []
    for i, batch in enumerate(fixed):
        if i >= n:
            break
        batches.append(batch)
    return batches


def run_prune(cfg: PruneConfig, show_progress: bool | None = None) -> PruneResult:
    from mcp import tracking
    from mcp.pruning import Pruning
    from mcp.stages.common import find_base_model, probe_model, recovery_teacher, setup_data, train_baseline

    device, splits, loaders = setup_data(cfg)
    ratios = read_ratios(cfg.ratios_file) if cfg.ratios_file else {}
    base, base_uri = find_base_model(cfg.model, cfg.model_uri, cfg.dataset, splits)
    teacher, teacher_uri = recovery_teacher(cfg, base, base_uri, splits)
    # Check every variant against the architecture before any run starts.
    probe = probe_model(base, cfg.model, splits)
    runs = variants(cfg, probe)
    for variant in runs:
        Pruning(copy.deepcopy(probe), splits.input_shape, spec_of(variant, ratios), [], "cpu")

    params = {**cfg.to_dict(), **{f"data_{k}": v for k, v in splits.summary().items()}, "device_resolved": device}
    tags = {"mcp.model": cfg.model, "mcp.dataset": cfg.dataset, "mcp.parent_model": base_uri}
    with tracking.stage_run("prune", params, tags, run_name=f"prune-{cfg.model}-{cfg.dataset}") as run:
        if base is None:  # no baseline yet: train one first, as a nested run
            base, base_uri = train_baseline(cfg, show_progress)
            teacher, teacher_uri = recovery_teacher(cfg, base, base_uri, splits)
        if teacher_uri:
            tracking.runs.set_tag("mcp.distill_from", teacher_uri)
        base_metrics = _evaluate(base, loaders[2], device)
        tracking.log_metrics({"baseline_test_accuracy": base_metrics["accuracy"]})
        if len(runs) == 1:
            result = _prune_one(cfg, ratios, base, base_uri, splits, loaders, device, show_progress, teacher,
                                teacher_uri)
            result.run_id = run.info.run_id
            return result
        rows = []
        for variant in runs:
            label = variant.schedule if cfg.compare == "schedules" else variant.criterion
            with tracking.stage_run("prune", variant.to_dict(), {**tags, "mcp.compare": label},
                                    run_name=f"prune-{label}"):
                one = _prune_one(variant.replace(register=False), ratios, base, base_uri, splits, loaders, device,
                                 show_progress, teacher, teacher_uri)
            rows.append(_comparison_row(label, one.metrics))
        _log_comparison(rows, cfg.compare)
        return PruneResult(run.info.run_id, {}, base, {}, None, None, rows)


@torch.no_grad()
def _evaluate(model: nn.Module, loader: DataLoader, device: str) -> dict[str, float]:
    from mcp.training import evaluate

    return evaluate(model.to(device), loader, device)


def _prune_one(cfg: PruneConfig, ratios: dict[str, float], base: nn.Module, base_uri: str, splits, loaders,
               device: str, show_progress: bool | None, teacher: nn.Module | None = None,
               teacher_uri: str = "") -> PruneResult:
    """Prune a copy of ``base`` per ``cfg`` inside the active run (fine-tuning by
    distillation from ``teacher`` when given); log and register it."""
    from mcp import tracking
    from mcp.evaluation.metrics import count_macs, count_params, peak_memory_mb, size_bytes_fp32
    from mcp.evaluation.plots import plot_bars, plot_pruning_curves
    from mcp.pruning import BNL1Penalty, Pruning, PruningCallback, event_steps
    from mcp.stages.common import final_metrics, log_and_register, log_plot, recovery_loss
    from mcp.training import Callback, ProgressBar, Trainer, build_optimizer, build_scheduler

    train_loader, val_loader, test_loader = loaders
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(base).to(device)
    base_counts = count_params(base)
    base_test = _evaluate(base, test_loader, device)
    pruning = Pruning(model, splits.input_shape, spec_of(cfg, ratios),
                      calibration_batches(train_loader, cfg.calib_batches), device)

    def make_optimizer(m: nn.Module):
        return build_optimizer(m, cfg.optimizer, cfg.lr, cfg.momentum, True, cfg.weight_decay)

    def rebuild(trainer: Trainer) -> None:  # structured steps replace the parameters
        trainer.optimizer = make_optimizer(trainer.model)
        trainer.scheduler = build_scheduler(trainer.optimizer, cfg.scheduler, cfg.epochs, start_epoch=trainer.epoch)

    def pruned_fraction() -> float:
        if pruning.structured:
            return 1.0 - count_params(model)["params_total"] / base_counts["params_total"]
        return pruning.cut.sparsity()

    t0 = time.perf_counter()

    def on_event(k: int, target: float) -> None:
        test = _evaluate(model, test_loader, device)
        counts = count_params(model)
        tracking.log_metrics({
            "prune_step_target": target, "prune_step_sparsity": pruned_fraction(),
            "prune_step_params": counts["params_total"] if pruning.structured else counts["params_nonzero"],
            "prune_step_macs": count_macs(model, splits.input_shape),
            "prune_step_test_accuracy": test["accuracy"], "prune_step_test_loss": test["loss"],
            "prune_step_elapsed_s": time.perf_counter() - t0}, step=k)

    class FractionLogger(Callback):  # the schedule, to overlay on the curves
        def on_epoch_end(self, trainer, epoch, logs):
            logs["pruned_fraction"] = pruned_fraction()
            trainer.history.setdefault("pruned_fraction", []).append(logs["pruned_fraction"])

    span = len(train_loader) * (cfg.prune_epochs if cfg.schedule != "one_shot" else 0)
    optimizer = make_optimizer(model)
    callbacks = [PruningCallback(pruning, event_steps(pruning.spec.events, span), rebuild, on_event),
                 FractionLogger(), ProgressBar(f"prune {cfg.schedule} {cfg.criterion}", disable=None
                                               if show_progress is None else not show_progress),
                 tracking.EpochLogger()]
    if cfg.bn_l1 > 0:
        callbacks.insert(1, BNL1Penalty(cfg.bn_l1))
    trainer = Trainer(model, optimizer, build_scheduler(optimizer, cfg.scheduler, cfg.epochs), train_loader,
                      val_loader, epochs=cfg.epochs, device=device, seed=cfg.seed, callbacks=callbacks,
                      restore_best=False,  # the best epoch may precede the last pruning step
                      batch_loss=recovery_loss(cfg, teacher, device))
    trainer.fit()
    training_time = time.perf_counter() - t0

    test = _evaluate(model, test_loader, device)
    layer_sparsity = pruning.layer_sparsity()
    metrics = {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
               "baseline_test_accuracy": base_test["accuracy"],
               "accuracy_drop": base_test["accuracy"] - test["accuracy"],
               "target_sparsity": cfg.sparsity, "pruned_fraction": pruned_fraction(),
               "train_time_s": trainer.train_time_s, "training_time_s": training_time}
    metrics.update(final_metrics(model, splits.input_shape, device))
    metrics["compression_ratio"] = base_counts["params_total"] / max(metrics["params_nonzero"], 1.0)
    metrics["size_bytes_nonzero_fp32"] = 4.0 * metrics["params_nonzero"]
    from mcp.quantization import encode_model

    metrics["size_bytes_compressed"] = float(len(encode_model(model, {}, "fixed")))  # float32 values, sparse indices
    metrics["baseline_size_bytes_fp32"] = float(size_bytes_fp32(base))
    metrics["peak_memory_mb"] = peak_memory_mb(device)
    tracking.log_metrics(metrics)

    title = f"{cfg.model}/{cfg.dataset}: {cfg.criterion}, {cfg.scope}, {cfg.granularity}, {cfg.schedule}"
    log_plot(plot_pruning_curves, "pruning_curves.png", trainer.history, title=title)
    log_plot(plot_bars, "layer_sparsity.png", layer_sparsity,
             ylabel="channel sparsity" if pruning.structured else "weight sparsity", title=title)
    _log_csv("layer_sparsity.csv", ["layer", "sparsity"], list(layer_sparsity.items()))

    reg_name = tracking.registered_name(cfg.model, cfg.dataset) if cfg.register else None
    run_id = tracking.runs.active_run_id()
    tags = {"mcp.stage": "prune", "source_run": run_id, "parent_model": base_uri, "criterion": cfg.criterion,
            "scope": cfg.scope, "granularity": cfg.granularity, "schedule": cfg.schedule,
            "sparsity": f"{metrics['pruned_fraction']:.4f}", "target_sparsity": cfg.sparsity,
            **({"distilled_from": teacher_uri} if teacher_uri else {}),
            **{k: f"{metrics[k]:.6g}" for k in ("test_accuracy", "params_nonzero", "macs", "latency_ms_p50_cpu")}}
    _, version = log_and_register(model, next(iter(test_loader))[0][:4], {"dataset": cfg.dataset,
                                  "class_names": splits.class_names}, reg_name, None, tags)
    return PruneResult(run_id, metrics, model, layer_sparsity, reg_name, version)


def _log_csv(name: str, header: list[str], rows: list) -> None:
    from mcp import tracking

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)
        tracking.log_artifact(path)


COMPARISON_COLUMNS = ("test_accuracy", "accuracy_drop", "training_time_s", "params_nonzero", "size_kib",
                      "latency_ms_p50_cpu")


def _comparison_row(label: str, m: dict[str, float]) -> dict[str, Any]:
    return {"variant": label, "test_accuracy": m["test_accuracy"], "accuracy_drop": m["accuracy_drop"],
            "training_time_s": m["training_time_s"], "params_nonzero": m["params_nonzero"],
            "size_kib": m["size_bytes_nonzero_fp32"] / 1024, "latency_ms_p50_cpu": m["latency_ms_p50_cpu"]}


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | test accuracy | drop (points) | training time (s) | non-zero params | size (KiB) "
             "| CPU p50 (ms) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {100 * r['test_accuracy']:.2f}% | {100 * r['accuracy_drop']:.2f} "
                     f"| {r['training_time_s']:.1f} | {int(r['params_nonzero']):,} | {r['size_kib']:.1f} "
                     f"| {r['latency_ms_p50_cpu']:.3f} |")
    return "\n".join(lines)


def _log_comparison(rows: list[dict[str, Any]], kind: str) -> None:
    from mcp import tracking
    from mcp.evaluation.plots import plot_comparison
    from mcp.stages.common import log_plot

    _log_csv(f"compare_{kind}.csv", ["variant", *COMPARISON_COLUMNS],
             [[r["variant"], *(r[c] for c in COMPARISON_COLUMNS)] for r in rows])
    tracking.runs.log_text(comparison_markdown(rows), f"compare_{kind}.md")
    log_plot(plot_comparison, f"compare_{kind}.png", rows, "variant", title=f"pruning: {kind} compared")
