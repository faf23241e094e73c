"""`mcp prune`: prune a trained model on a schedule, fine-tune at a reduced LR, register it."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import nn

from mcp import tracking
from mcp.config import PRUNE_SCHEDULES, PruneConfig, read_config_file
from mcp.errors import ConfigError
from mcp.evaluation.plots import plot_bars, plot_comparison, plot_pruning_curves
from mcp.pruning import PruneSpec, Pruning, create_criterion, criterion_names
from mcp.pruning.finetune import prune_and_finetune
from mcp.stages.common import (
    DEPLOY_KEYS,
    Baseline,
    data_recipe,
    deployment_figures,
    find_base_model,
    finetune_of,
    lineage,
    lineage_baseline,
    log_and_register,
    probe_model,
    recovery_loss,
    recovery_teacher,
    setup_data,
    tag_baseline,
)
from mcp.stages.train import run_baseline
from mcp.tracking import schema
from mcp.tracking.tables import log_csv, log_plot
from mcp.training import evaluate


@dataclass
class PruneResult:
    run_id: str
    metrics: dict[str, float]
    model: nn.Module
    layer_sparsity: dict[str, float]
    registered_name: str | None
    registered_version: str | None
    comparison: list[dict[str, Any]] | None = None
    baseline: Baseline | None = None  # what the *_vs_baseline figures compare with


def read_ratios(path: str) -> dict[str, float]:
    """Per-layer ratios from YAML (layer name: ratio)."""
    data = read_config_file(path)
    try:
        return {str(k): float(v) for k, v in data.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"ratios file {path!r} must map layer names to numbers in [0, 1)") from None


def spec_of(cfg: PruneConfig, ratios: dict[str, float]) -> PruneSpec:
    return PruneSpec(criterion=cfg.criterion, scope=cfg.scope, granularity=cfg.granularity, schedule=cfg.schedule,
                     sparsity=cfg.sparsity, initial_sparsity=cfg.initial_sparsity, steps=cfg.prune_steps,
                     ratios=ratios, keep_first=cfg.keep_first, keep_last=cfg.keep_last,
                     ignored_layers=tuple(cfg.ignored()), norm=cfg.norm, hessian=cfg.hessian,
                     round_to=cfg.round_to, drop_blocks=cfg.drop_blocks, head_ratio=cfg.head_ratio)


def variants(cfg: PruneConfig, model: nn.Module) -> list[PruneConfig]:
    """The configs one call runs: one, or one per schedule / per applicable criterion."""
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


def run_prune(cfg: PruneConfig, show_progress: bool | None = None) -> PruneResult:
    device, splits, loaders = setup_data(cfg)
    ratios = read_ratios(cfg.ratios_file) if cfg.ratios_file else {}
    base, base_uri = find_base_model(cfg.model, cfg.model_uri, cfg.dataset, splits, cfg.trust_pickled_model)
    teacher, teacher_uri = recovery_teacher(cfg, base, base_uri, splits)
    # Check every variant against the architecture before any run starts.
    probe = probe_model(base, cfg.model, splits)
    runs = variants(cfg, probe)
    for variant in runs:
        Pruning(copy.deepcopy(probe), splits.input_shape, spec_of(variant, ratios), [], "cpu")

    params = {**cfg.to_dict(), **{f"data_{k}": v for k, v in splits.summary().items()}, "device_resolved": device}
    arch, _ = lineage(base, base_uri, cfg.model, cfg.dataset)
    tags = {schema.MODEL: arch, schema.DATASET: cfg.dataset, schema.PARENT_MODEL: base_uri}
    with tracking.stage_run("prune", params, tags, run_name=f"prune-{arch}-{cfg.dataset}") as run:
        if base is None:  # no baseline yet: train one first, as a nested run
            base, base_uri = run_baseline(cfg, show_progress)
            teacher, teacher_uri = recovery_teacher(cfg, base, base_uri, splits)
        if teacher_uri:
            tracking.runs.set_tag(schema.DISTILL_FROM, teacher_uri)
        base_metrics = evaluate(base.to(device), loaders[2], device)
        ref = lineage_baseline(base, base_uri, loaders[2], device, base_metrics["accuracy"], cfg.trust_pickled_model)
        tag_baseline(ref)
        tracking.log_metrics({"parent_test_accuracy": base_metrics["accuracy"],
                              "baseline_test_accuracy": ref.test_accuracy})
        if len(runs) == 1:
            result = _prune_one(cfg, ratios, base, base_uri, splits, loaders, device, show_progress, teacher,
                                teacher_uri, ref)
            result.run_id = run.info.run_id
            return result
        rows = []
        for variant in runs:
            label = variant.schedule if cfg.compare == "schedules" else variant.criterion
            with tracking.stage_run("prune", variant.to_dict(), {**tags, schema.COMPARE: label, **ref.run_tags()},
                                    run_name=f"prune-{label}"):
                one = _prune_one(variant.replace(register=False), ratios, base, base_uri, splits, loaders, device,
                                 show_progress, teacher, teacher_uri, ref)
            rows.append(_comparison_row(label, one.metrics))
        _log_comparison(rows, cfg.compare)
        return PruneResult(run.info.run_id, {}, base, {}, None, None, rows, ref)


def _prune_one(cfg: PruneConfig, ratios: dict[str, float], base: nn.Module, base_uri: str, splits, loaders,
               device: str, show_progress: bool | None, teacher: nn.Module | None = None,
               teacher_uri: str = "", ref: Baseline | None = None) -> PruneResult:
    """Prune a copy of ``base`` per ``cfg`` inside the active run (fine-tuning by
    distillation from ``teacher`` when given); log and register it. Its figures compare
    with ``base`` (the parent) and with ``ref``, the baseline of its lineage."""
    test_loader = loaders[2]
    outcome = prune_and_finetune(
        base, loaders, splits.input_shape, spec_of(cfg, ratios), finetune_of(cfg), prune_epochs=cfg.prune_epochs,
        calib_batches=cfg.calib_batches, bn_l1=cfg.bn_l1, device=device,
        batch_loss=recovery_loss(cfg, teacher, device), callbacks=[tracking.EpochLogger()],
        on_step=lambda k, values: tracking.log_metrics(values, step=k), progress=show_progress,
        desc=f"prune {cfg.schedule} {cfg.criterion}")
    model, metrics, layer_sparsity, history = outcome.model, outcome.metrics, outcome.layer_sparsity, outcome.history
    if ref is None:
        ref = lineage_baseline(base, base_uri, test_loader, device, metrics["baseline_test_accuracy"],
                               cfg.trust_pickled_model)
    # the core's "baseline" is the model it was given: here, the parent
    metrics["parent_test_accuracy"] = metrics.pop("baseline_test_accuracy")
    metrics["parent_size_bytes_fp32"] = metrics.pop("baseline_size_bytes_fp32")
    metrics.update(ref.figures(metrics["test_accuracy"], metrics["params_nonzero"], by_params=True))
    metrics["baseline_params_total"] = ref.params_total
    metrics.update(deployment_figures(model, splits.input_shape, None, ref.model, (base, base_uri),
                                      f"the pruned model ({cfg.granularity}, {cfg.sparsity:g})"))
    tracking.log_metrics(metrics)

    arch, registered = lineage(base, base_uri, cfg.model, cfg.dataset)
    title = f"{arch}/{cfg.dataset}: {cfg.criterion}, {cfg.scope}, {cfg.granularity}, {cfg.schedule}"
    log_plot(plot_pruning_curves, "pruning_curves.png", history, title=title)
    log_plot(plot_bars, "layer_sparsity.png", layer_sparsity,
             ylabel="channel sparsity" if outcome.structured else "weight sparsity", title=title)
    log_csv("layer_sparsity.csv", ["layer", "sparsity"], list(layer_sparsity.items()))

    reg_name = registered if cfg.register else None
    run_id = tracking.runs.active_run_id()
    tags = {schema.STAGE: "prune", "source_run": run_id, "parent_model": base_uri, "criterion": cfg.criterion,
            "scope": cfg.scope, "granularity": cfg.granularity, "schedule": cfg.schedule,
            "sparsity": f"{metrics['pruned_fraction']:.4f}", "target_sparsity": cfg.sparsity,
            **({"dropped_blocks": ",".join(outcome.dropped)} if outcome.dropped else {}),
            **({"distilled_from": teacher_uri} if teacher_uri else {}),
            **{k: f"{metrics[k]:.6g}" for k in ("test_accuracy", "params_nonzero", "macs", "latency_ms_p50_cpu",
                                                 "size_bytes_compressed") + DEPLOY_KEYS if k in metrics},
            **ref.version_tags(metrics)}
    _, version = log_and_register(model, next(iter(test_loader))[0][:4], data_recipe(splits), reg_name, None, tags)
    return PruneResult(run_id, metrics, model, layer_sparsity, reg_name, version, baseline=ref)


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
    log_csv(f"compare_{kind}.csv", ["variant", *COMPARISON_COLUMNS],
             [[r["variant"], *(r[c] for c in COMPARISON_COLUMNS)] for r in rows])
    tracking.runs.log_text(comparison_markdown(rows), f"compare_{kind}.md")
    log_plot(plot_comparison, f"compare_{kind}.png", rows, "variant", title=f"pruning: {kind} compared")
