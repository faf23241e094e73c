"""`mcp sensitivity`: how much accuracy each layer loses when pruned alone.

Every layer in scope is pruned by itself at every ratio of the sweep (any criterion,
either granularity) and evaluated on the validation split (never the test split, so
the suggestion does not peek at it). The per-layer gradient norms on calibration
batches are recorded too. From the table, per-layer ratios are suggested for a target
overall sparsity: every layer gets the largest swept ratio whose accuracy drop stays
under one common tolerance, the smallest tolerance that reaches the target (Han et
al. 2015's sensitivity-guided thresholds; Distiller's sensitivity analysis).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from mcp import tracking
from mcp.config import SensitivityConfig
from mcp.data.calibration import calibration_batches
from mcp.evaluation.plots import plot_bars, plot_sensitivity
from mcp.pruning import PruneSpec, Pruning, create_criterion, prune
from mcp.pruning.pruner import select_layers
from mcp.stages.common import find_base_model, lineage, probe_model, setup_data
from mcp.stages.train import run_baseline
from mcp.tracking import schema
from mcp.tracking.tables import log_csv, log_plot
from mcp.training import evaluate


@dataclass
class SensitivityResult:
    run_id: str
    table: list[dict[str, float | str]]  # layer, ratio, val_accuracy, drop
    gradient_norms: dict[str, float]
    suggested: dict[str, float]
    suggested_sparsity: float


def suggest_ratios(table: list[dict], weights: dict[str, int], target: float) -> tuple[dict[str, float], float]:
    """Per-layer ratios reaching ``target`` (weighted by ``weights``) at the smallest common drop."""
    layers = list(weights)
    total = sum(weights.values())

    def at(tolerance: float) -> dict[str, float]:
        return {layer: max([0.0] + [r["ratio"] for r in table if r["layer"] == layer and r["drop"] <= tolerance])
                for layer in layers}

    def reached(ratios: dict[str, float]) -> float:
        return sum(ratios[n] * weights[n] for n in layers) / total

    for tolerance in sorted({r["drop"] for r in table}):
        ratios = at(tolerance)
        if reached(ratios) >= target - 1e-9:
            return _trim(ratios, weights, target), reached(_trim(ratios, weights, target))
    ratios = at(float("inf"))
    return ratios, reached(ratios)


def _trim(ratios: dict[str, float], weights: dict[str, int], target: float) -> dict[str, float]:
    """Scale the ratios down uniformly so the suggestion lands on the target, not past it."""
    total = sum(weights.values())
    reached = sum(ratios[n] * weights[n] for n in ratios) / total
    if reached <= target or reached == 0:
        return ratios
    return {n: round(r * target / reached, 4) for n, r in ratios.items()}


def gradient_norms(model: nn.Module, layers: dict[str, nn.Module], batches, device: str) -> dict[str, float]:
    norms = {n: 0.0 for n in layers}
    model.eval()
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        for n, m in layers.items():
            norms[n] += float(m.weight.grad.norm())
    model.zero_grad(set_to_none=True)
    return {n: v / max(len(batches), 1) for n, v in norms.items()}


def run_sensitivity(cfg: SensitivityConfig, show_progress: bool | None = None) -> SensitivityResult:
    from tqdm.auto import tqdm

    device, splits, (train_loader, val_loader, _) = setup_data(cfg)
    ratios = cfg.sweep_ratios()
    create_criterion(cfg.criterion, cfg.granularity)
    base, base_uri = find_base_model(cfg.model, cfg.model_uri, cfg.dataset, splits, cfg.trust_pickled_model)
    Pruning(probe_model(base, cfg.model, splits), splits.input_shape,
            PruneSpec(criterion=cfg.criterion, granularity=cfg.granularity, scope="layerwise"), [], "cpu")

    params = {**cfg.to_dict(), **{f"data_{k}": v for k, v in splits.summary().items()}, "device_resolved": device}
    arch, _ = lineage(base, base_uri, cfg.model, cfg.dataset)
    tags = {schema.MODEL: arch, schema.DATASET: cfg.dataset, schema.PARENT_MODEL: base_uri}
    with tracking.stage_run("sensitivity", params, tags, run_name=f"sensitivity-{arch}-{cfg.dataset}") as run:
        if base is None:
            base, base_uri = run_baseline(cfg, show_progress)
        base = base.to(device)
        batches = calibration_batches(train_loader, cfg.calib_batches)
        layers, _ = select_layers(base, splits.input_shape, False, cfg.granularity == "structured", [])
        base_val = evaluate(base, val_loader, device)["accuracy"]
        tracking.log_metrics({"baseline_val_accuracy": base_val})
        probe = copy.deepcopy(base)
        norms = gradient_norms(probe, select_layers(probe, splits.input_shape, False, False, [])[0], batches, device)
        table: list[dict[str, float | str]] = []
        bar = tqdm(total=len(layers) * len(ratios), desc="sensitivity", unit="prune", disable=None
                   if show_progress is None else not show_progress)
        for name in layers:
            for ratio in ratios:
                model = copy.deepcopy(base)
                spec = PruneSpec(criterion=cfg.criterion, granularity=cfg.granularity, scope="layerwise",
                                 sparsity=0.0, ratios={name: ratio}, norm=cfg.norm, hessian=cfg.hessian)
                prune(model, spec, splits.input_shape, batches, device)
                acc = evaluate(model, val_loader, device)["accuracy"]
                table.append({"layer": name, "ratio": ratio, "val_accuracy": acc, "drop": base_val - acc})
                bar.update(1)
        bar.close()
        weights = {n: m.weight.numel() for n, m in layers.items()}
        suggested, reached = suggest_ratios(table, weights, cfg.target_sparsity)
        tracking.log_metrics({"suggested_sparsity": reached})
        log_csv("sensitivity.csv", ["layer", "ratio", "val_accuracy", "drop"],
                 [[r["layer"], r["ratio"], r["val_accuracy"], r["drop"]] for r in table])
        log_csv("gradient_norms.csv", ["layer", "gradient_norm"], list(norms.items()))
        title = f"{arch}/{cfg.dataset}: {cfg.criterion}, {cfg.granularity}"
        log_plot(plot_sensitivity, "sensitivity.png", table, list(layers), ratios, title=title)
        log_plot(plot_bars, "gradient_norms.png", norms, ylabel="mean gradient norm", title=title)
        import yaml

        text = (f"# suggested per-layer ratios for {cfg.target_sparsity:.0%} overall sparsity ({cfg.criterion}, "
                f"{cfg.granularity}); use with: mcp prune --scope layerwise --ratios-file <this file>\n"
                + yaml.safe_dump(suggested, sort_keys=False))
        tracking.runs.log_text(text, "suggested_ratios.yaml")
        return SensitivityResult(run.info.run_id, table, norms, suggested, reached)
