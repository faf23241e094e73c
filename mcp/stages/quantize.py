"""`mcp quantize`: quantize a registered model (dense or pruned), measure it in PyTorch and
in ONNX Runtime, encode it for its honest size, register it."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from mcp import tracking
from mcp.config import DataOptions, PruneConfig, QuantizeConfig, read_config_file
from mcp.deploy import ort_evaluate, runtimes
from mcp.errors import ConfigError
from mcp.evaluation.plots import plot_layer_quant, plot_training_curves
from mcp.quantization import Quantizer, QuantSpec
from mcp.quantization.methods import quant_method
from mcp.quantization.quantize import quantize_model
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
    timing_seconds,
)
from mcp.stages.prune import run_prune
from mcp.stages.train import run_baseline
from mcp.tracking import schema
from mcp.tracking.tables import log_csv, log_plot


@dataclass
class QuantizeResult:
    run_id: str
    metrics: dict[str, float]
    model: nn.Module
    layers: list[dict[str, Any]]
    registered_name: str | None
    registered_version: str | None
    stages: dict[str, int] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    baseline: Baseline | None = None  # what the *_vs_baseline figures compare with


def read_bits(path: str) -> dict[str, int]:
    """Per-layer bit-widths from YAML (layer name: bits)."""
    data = read_config_file(path)
    out = {}
    for k, v in data.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"bits file {path!r}: layer {k!r} has bits {v!r}; bits are integers 2-8")
        out[str(k)] = v
    return out


def spec_of(cfg: QuantizeConfig, layer_bits: dict[str, int]) -> QuantSpec:
    return QuantSpec(method=cfg.method, bits=cfg.bits, layer_bits=layer_bits, act_bits=cfg.act_bits,
                     symmetric=cfg.symmetric, per_channel=cfg.per_channel, observer=cfg.observer,
                     kmeans_init=cfg.kmeans_init, ignored_layers=cfg.ignored(), reduce_range=cfg.reduce_range,
                     precision=cfg.precision,
                     share_biases={"true": True, "false": False}.get(cfg.share_biases, "auto"), seed=cfg.seed)


def prune_config(cfg: QuantizeConfig, base_uri: str) -> PruneConfig:
    """deep_compression's pruning step: the prune stage with these settings."""
    data = {k: getattr(cfg, k) for k in DataOptions.defaults()}
    return PruneConfig(model=cfg.model, model_uri=base_uri, sparsity=cfg.sparsity, schedule=cfg.prune_schedule,
                       distill_from=cfg.distill_from, distill_temperature=cfg.distill_temperature,
                       distill_alpha=cfg.distill_alpha,
                       epochs=cfg.prune_epochs, prune_epochs=max(1, cfg.prune_epochs // 2),
                       scope="layerwise" if cfg.ratios_file else "global", ratios_file=cfg.ratios_file,
                       ignored_layers=",".join(cfg.ignored()), register=False,
                       trust_pickled_model=cfg.trust_pickled_model, **data)


def run_quantize(cfg: QuantizeConfig, show_progress: bool | None = None) -> QuantizeResult:
    device, splits, loaders = setup_data(cfg)
    layer_bits = read_bits(cfg.bits_file) if cfg.bits_file else {}
    base, base_uri = find_base_model(cfg.model, cfg.model_uri, cfg.dataset, splits, cfg.trust_pickled_model)
    teacher, teacher_uri = recovery_teacher(cfg, base, base_uri, splits)
    Quantizer(probe_model(base, cfg.model, splits), splits.input_shape,
              spec_of(cfg, layer_bits))  # bad layers or bits: fail now
    if quant_method(cfg.method).prunes_first:
        prune_config(cfg, base_uri)  # its settings are checked before the run starts too

    params = {**cfg.to_dict(), **{f"data_{k}": v for k, v in splits.summary().items()}, "device_resolved": device}
    arch, _ = lineage(base, base_uri, cfg.model, cfg.dataset)
    tags = {schema.MODEL: arch, schema.DATASET: cfg.dataset, schema.PARENT_MODEL: base_uri,
            schema.QUANT_METHOD: cfg.method}
    with tracking.stage_run("quantize", params, tags, run_name=f"quantize-{cfg.method}-{arch}") as run:
        if base is None:
            base, base_uri = run_baseline(cfg, show_progress)
            teacher, teacher_uri = recovery_teacher(cfg, base, base_uri, splits)
        if teacher_uri:
            tracking.runs.set_tag(schema.DISTILL_FROM, teacher_uri)
        result = _quantize(cfg, layer_bits, base, base_uri, splits, loaders, device, show_progress, teacher,
                           teacher_uri)
        result.run_id = run.info.run_id
        return result


def _quantize(cfg: QuantizeConfig, layer_bits: dict[str, int], base: nn.Module, base_uri: str, splits, loaders,
              device: str, show_progress: bool | None, teacher: nn.Module | None,
              teacher_uri: str) -> QuantizeResult:
    test_loader = loaders[2]
    spec = spec_of(cfg, layer_bits)
    model, pruned_metrics = base, {}
    if spec.kind.prunes_first:  # the prune stage first, as a nested run
        pruned = run_prune(prune_config(cfg, base_uri), show_progress=show_progress)
        model, pruned_metrics = pruned.model, pruned.metrics
    finetune = finetune_of(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        outcome = quantize_model(model, loaders, splits.input_shape, spec, Path(tmp), finetune, reference=base,
                                 calib_batches=cfg.calib_batches, opset=cfg.opset, device=device,
                                 batch_loss=recovery_loss(cfg, teacher, device), callbacks=[tracking.EpochLogger()],
                                 progress=show_progress, runtime=cfg.runtime, timing_s=timing_seconds())
        ref = lineage_baseline(base, base_uri, test_loader, device, outcome.metrics["baseline_test_accuracy"],
                               cfg.trust_pickled_model)
        what, refuse = f"the {cfg.method} model", None
        if cfg.precision == "speed":  # asked for speed alone: a slower model is refused before anything is logged
            m = outcome.metrics
            what += f" with INT8 in {int(m['int8_layers'])} of {int(m['int8_layers'] + m['float_layers'])} layers"
            refuse = ("precision speed", "the conversions where INT8 and float32 layers meet cost more than those "
                      "layers gain; deploy the float32 model (mcp export), or use --precision int8 for the smaller "
                      "file")
        runtime, times = outcome.runtime or cfg.runtime, outcome.runtime_times  # precision speed chose it
        if runtime == "auto":  # where this file runs fastest, timed side by side
            runtime, times = runtimes.fastest(outcome.onnx_path, splits.input_shape, timing_seconds())
        if runtime != "onnxruntime":  # its accuracy where it will run
            outcome.metrics["onnx_test_accuracy"] = ort_evaluate(runtimes.session(outcome.onnx_path, runtime),
                                                                 test_loader)["accuracy"]
        deployment = deployment_figures(outcome.model, splits.input_shape, outcome.onnx_path, ref.model,
                                        (base, base_uri), what, refuse, runtime=runtime)
        deployment.update(runtimes.latency_metrics(times))
        tracking.log_artifact(outcome.onnx_path, "onnx")
        payload_path = Path(tmp) / "model.mcpz"
        payload_path.write_bytes(outcome.payload)
        tracking.log_artifact(payload_path, "compressed")
    model, metrics, layers, stages, history = (outcome.model, outcome.metrics, outcome.layers, outcome.stages,
                                               outcome.history)
    deploy_format = outcome.deploy_format
    if pruned_metrics:
        metrics["pruned_test_accuracy"] = pruned_metrics["test_accuracy"]
        metrics["training_time_s"] += pruned_metrics["training_time_s"]  # the whole pipeline's time
    # the core's "baseline" is the model it was given (its reference): here, the parent
    metrics["parent_test_accuracy"] = metrics.pop("baseline_test_accuracy")
    metrics["parent_size_bytes_fp32"] = metrics["size_bytes_fp32"]
    metrics.update(deployment)
    metrics.update(ref.figures(metrics["onnx_test_accuracy"], metrics["size_bytes_compressed"]))
    tag_baseline(ref)
    tracking.log_metrics(metrics)

    arch, registered = lineage(base, base_uri, cfg.model, cfg.dataset)
    title = f"{arch}/{cfg.dataset}: {cfg.method}"
    log_csv("quant_layers.csv", list(layers[0]), [list(r.values()) for r in layers])
    log_plot(plot_layer_quant, "quant_layers.png", layers, title=title)
    if stages:
        log_csv("compression_stages.csv", ["stage", "size_bytes", "compression_ratio"],
                 [[k, v, stages["fp32"] / v] for k, v in stages.items()])
    if history:
        log_plot(plot_training_curves, "finetune_curves.png", history, title=title)

    bits_tag = _bits_tag(outcome.quantization["bits"])
    run_tags = {schema.DEPLOY_FORMAT: deploy_format, schema.DEPLOY_NOTE: outcome.deploy_note, schema.BITS: bits_tag,
                schema.RUNTIME: runtime, schema.RUNTIME_SETTINGS: runtimes.settings(runtime)}
    for k, v in run_tags.items():
        tracking.runs.set_tag(k, v)
    reg_name = registered if cfg.register else None
    run_id = tracking.runs.active_run_id()
    version_tags = {schema.STAGE: "quantize", "source_run": run_id, "parent_model": base_uri, "method": cfg.method,
                    "bits": bits_tag, "deploy_format": deploy_format, "sparsity": f"{metrics['sparsity']:.4f}",
                    "runtime": runtime, "runtime_settings": runtimes.settings(runtime),
                    **({"distilled_from": teacher_uri} if teacher_uri else {}),
                    **{k: f"{metrics[k]:.6g}" for k in ("test_accuracy", "onnx_test_accuracy", "size_bytes_compressed",
                                                         "size_bytes_onnx") + DEPLOY_KEYS if k in metrics},
                    **ref.version_tags(metrics)}
    _, version = log_and_register(model, next(iter(test_loader))[0][:4],
                                  {**data_recipe(splits),
                                   "quantization": {**outcome.quantization, "calib_batches": cfg.calib_batches,
                                                    "calib_batch_size": cfg.batch_size}},
                                  reg_name, None, version_tags)
    return QuantizeResult(run_id, metrics, model, layers, reg_name, version, stages, run_tags, ref)


def _bits_tag(bits: dict[str, int]) -> str:
    values = sorted(set(bits.values()))
    return str(values[0]) if len(values) == 1 else "mixed:" + ",".join(map(str, values))
