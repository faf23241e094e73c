"""`mcp quantize`: quantize a registered model (dense or pruned), measure it in PyTorch and
in ONNX Runtime, encode it for its honest size, register it."""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mcp.config import DataOptions, PruneConfig, QuantizeConfig
from mcp.errors import ConfigError

DEPLOY_NOTES = {
    "onnx_qdq_int8": "INT8 weights and activations (QDQ), run by ONNX Runtime's integer kernels",
    "onnx_dynamic_int8": "INT8 weights of the fully connected layers, activations quantized at run time",
    "onnx_int8_weights": "weights stored as INT8 + DequantizeLinear per channel; compute in float32",
    "onnx_fp32": "float32 weights holding the quantized values",
}


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


def read_bits(path: str) -> dict[str, int]:
    """Per-layer bit-widths from YAML (layer name: bits)."""
    from mcp.config import read_config_file

    data = read_config_file(path)
    out = {}
    for k, v in data.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"bits file {path!r}: layer {k!r} has bits {v!r}; bits are integers 2-8")
        out[str(k)] = v
    return out


def spec_of(cfg: QuantizeConfig, layer_bits: dict[str, int]):
    from mcp.quantization import QuantSpec

    return QuantSpec(method=cfg.method, bits=cfg.bits, layer_bits=layer_bits, act_bits=cfg.act_bits,
                     symmetric=cfg.symmetric, per_channel=cfg.per_channel, observer=cfg.observer,
                     kmeans_init=cfg.kmeans_init, ignored_layers=cfg.ignored(), reduce_range=cfg.reduce_range,
                     share_biases=cfg.share_biases, seed=cfg.seed)


def prune_config(cfg: QuantizeConfig, base_uri: str) -> PruneConfig:
    """deep_compression's pruning step: the prune stage with these settings."""
    data = {k: getattr(cfg, k) for k in DataOptions.defaults()}
    return PruneConfig(model=cfg.model, model_uri=base_uri, sparsity=cfg.sparsity, schedule=cfg.prune_schedule,
                       distill_from=cfg.distill_from, distill_temperature=cfg.distill_temperature,
                       distill_alpha=cfg.distill_alpha,
                       epochs=cfg.prune_epochs, prune_epochs=max(1, cfg.prune_epochs // 2),
                       scope="layerwise" if cfg.ratios_file else "global", ratios_file=cfg.ratios_file,
                       ignored_layers=",".join(cfg.ignored()), register=False, **data)


def run_quantize(cfg: QuantizeConfig, show_progress: bool | None = None) -> QuantizeResult:
    from mcp import tracking
    from mcp.quantization import Quantizer
    from mcp.stages.common import find_base_model, probe_model, recovery_teacher, setup_data, train_baseline

    device, splits, loaders = setup_data(cfg)
    layer_bits = read_bits(cfg.bits_file) if cfg.bits_file else {}
    base, base_uri = find_base_model(cfg.model, cfg.model_uri, cfg.dataset, splits)
    teacher, teacher_uri = recovery_teacher(cfg, base, base_uri, splits)
    Quantizer(probe_model(base, cfg.model, splits), splits.input_shape,
              spec_of(cfg, layer_bits))  # bad layers or bits: fail now
    if cfg.method == "deep_compression":
        prune_config(cfg, base_uri)  # its settings are checked before the run starts too

    params = {**cfg.to_dict(), **{f"data_{k}": v for k, v in splits.summary().items()}, "device_resolved": device}
    tags = {"mcp.model": cfg.model, "mcp.dataset": cfg.dataset, "mcp.parent_model": base_uri,
            "mcp.quant_method": cfg.method}
    with tracking.stage_run("quantize", params, tags, run_name=f"quantize-{cfg.method}-{cfg.model}") as run:
        if base is None:
            base, base_uri = train_baseline(cfg, show_progress)
            teacher, teacher_uri = recovery_teacher(cfg, base, base_uri, splits)
        if teacher_uri:
            tracking.runs.set_tag("mcp.distill_from", teacher_uri)
        result = _quantize(cfg, layer_bits, base, base_uri, splits, loaders, device, show_progress, teacher,
                           teacher_uri)
        result.run_id = run.info.run_id
        return result


@torch.no_grad()
def _predict(model: nn.Module, loader, device: str) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    preds, labels = [], []
    for x, y in loader:
        preds.append(model(x.to(device)).argmax(1).cpu().numpy())
        labels.append(y.numpy())
    return np.concatenate(preds), np.concatenate(labels)


def _quantize(cfg: QuantizeConfig, layer_bits: dict[str, int], base: nn.Module, base_uri: str, splits, loaders,
              device: str, show_progress: bool | None, teacher: nn.Module | None,
              teacher_uri: str) -> QuantizeResult:
    from mcp import tracking
    from mcp.evaluation.metrics import peak_memory_mb, size_bytes_fp32
    from mcp.evaluation.plots import plot_layer_quant, plot_training_curves
    from mcp.export import export_onnx, ort_evaluate, ort_predict, ort_session
    from mcp.quantization import Quantizer, encode_model, layer_table
    from mcp.quantization.engine import TRAINED
    from mcp.stages.common import final_metrics, log_and_register, log_plot, recovery_loss
    from mcp.stages.prune import _evaluate, _log_csv, calibration_batches
    from mcp.training import ProgressBar, Trainer, build_optimizer, build_scheduler

    train_loader, val_loader, test_loader = loaders
    spec = spec_of(cfg, layer_bits)
    base_test = _evaluate(base, test_loader, device)
    metrics: dict[str, float] = {"baseline_test_accuracy": base_test["accuracy"]}
    stages: dict[str, int] = {}
    t0 = time.perf_counter()

    model = copy.deepcopy(base).to(device)
    if cfg.method == "deep_compression":
        from mcp.stages.prune import run_prune

        pruned = run_prune(prune_config(cfg, base_uri), show_progress=show_progress)
        model = pruned.model.to(device)
        stages["fp32"] = size_bytes_fp32(model)
        stages["pruned"] = len(encode_model(model, {}, "fixed"))
        metrics["pruned_test_accuracy"] = pruned.metrics["test_accuracy"]

    torch.manual_seed(cfg.seed)
    quantizer = Quantizer(model, splits.input_shape, spec)
    calib = calibration_batches(train_loader, cfg.calib_batches)
    quantizer.calibrate(calib, device)
    history = None
    if cfg.method in TRAINED and cfg.epochs > 0:
        optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.momentum, True, cfg.weight_decay)
        trainer = Trainer(model, optimizer, build_scheduler(optimizer, cfg.scheduler, cfg.epochs), train_loader,
                          val_loader, epochs=cfg.epochs, device=device, seed=cfg.seed, restore_best=False,
                          batch_loss=recovery_loss(cfg, teacher, device),
                          callbacks=[ProgressBar(f"quantize {cfg.method}", disable=None if show_progress is None
                                                 else not show_progress), tracking.EpochLogger()])
        trainer.fit()
        history = trainer.history
        metrics["train_time_s"] = trainer.train_time_s
    quantizer.freeze()
    sim_test = _evaluate(model, test_loader, device)  # the fake-quantized PyTorch model
    sim_pred, labels = _predict(model, test_loader, device)
    entries = quantizer.finish()
    payload = encode_model(model, entries, spec.coding)
    if cfg.method == "deep_compression":
        stages["kmeans"] = len(encode_model(model, entries, "fixed"))
        stages["huffman"] = len(payload)
    layers = layer_table(model, entries, quantizer.bits, spec.coding)
    metrics["training_time_s"] = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = export_onnx(model, splits.input_shape, Path(tmp) / "fp32.onnx", cfg.opset)
        deploy_path, deploy_format = _deployable(cfg, quantizer, entries, fp32_path, Path(tmp), calib)
        session = ort_session(deploy_path)
        onnx_test = ort_evaluate(session, test_loader)
        onnx_pred = np.concatenate([ort_predict(session, x).argmax(1) for x, _ in test_loader])
        metrics["size_bytes_onnx"] = float(deploy_path.stat().st_size)
        tracking.log_artifact(deploy_path, "onnx")
        payload_path = Path(tmp) / "model.mcpz"
        payload_path.write_bytes(payload)
        tracking.log_artifact(payload_path, "compressed")

    metrics.update(final_metrics(model, splits.input_shape, device))
    metrics.update({
        "test_accuracy": sim_test["accuracy"], "test_loss": sim_test["loss"],
        "onnx_test_accuracy": onnx_test["accuracy"], "onnx_test_loss": onnx_test["loss"],
        "onnx_agreement": float(np.mean(onnx_pred == sim_pred)),
        "accuracy_drop": base_test["accuracy"] - onnx_test["accuracy"],
        "accuracy_drop_torch": base_test["accuracy"] - sim_test["accuracy"],
        "size_bytes_compressed": float(len(payload)), "peak_memory_mb": peak_memory_mb(device)})
    metrics["size_bytes_fp32"] = float(size_bytes_fp32(base))
    metrics["compression_ratio"] = metrics["size_bytes_fp32"] / metrics["size_bytes_compressed"]
    for name, size in stages.items():
        metrics[f"size_bytes_{name}"] = float(size)
        metrics[f"compression_ratio_{name}"] = stages.get("fp32", size) / size
    tracking.log_metrics(metrics)

    title = f"{cfg.model}/{cfg.dataset}: {cfg.method}"
    _log_csv("quant_layers.csv", list(layers[0]), [list(r.values()) for r in layers])
    log_plot(plot_layer_quant, "quant_layers.png", layers, title=title)
    if stages:
        _log_csv("compression_stages.csv", ["stage", "size_bytes", "compression_ratio"],
                 [[k, v, stages["fp32"] / v] for k, v in stages.items()])
    if history:
        log_plot(plot_training_curves, "finetune_curves.png", history, title=title)

    bits_tag = _bits_tag(quantizer.bits)
    run_tags = {"mcp.deploy_format": deploy_format, "mcp.deploy_note": _deploy_note(cfg, deploy_format, quantizer),
                "mcp.bits": bits_tag}
    for k, v in run_tags.items():
        tracking.runs.set_tag(k, v)
    reg_name = tracking.registered_name(cfg.model, cfg.dataset) if cfg.register else None
    run_id = tracking.runs.active_run_id()
    version_tags = {"mcp.stage": "quantize", "source_run": run_id, "parent_model": base_uri, "method": cfg.method,
                    "bits": bits_tag, "deploy_format": deploy_format, "sparsity": f"{metrics['sparsity']:.4f}",
                    **({"distilled_from": teacher_uri} if teacher_uri else {}),
                    **{k: f"{metrics[k]:.6g}" for k in ("test_accuracy", "onnx_test_accuracy", "size_bytes_compressed",
                                                         "size_bytes_onnx", "compression_ratio")}}
    _, version = log_and_register(model, next(iter(test_loader))[0][:4],
                                  {"dataset": cfg.dataset, "class_names": splits.class_names,
                                   "quantization": {**quantizer.describe(), "calib_batches": cfg.calib_batches,
                                                    "calib_batch_size": cfg.batch_size}},
                                  reg_name, None, version_tags)
    return QuantizeResult(run_id, metrics, model, layers, reg_name, version, stages, run_tags)


def _bits_tag(bits: dict[str, int]) -> str:
    values = sorted(set(bits.values()))
    return str(values[0]) if len(values) == 1 else "mixed:" + ",".join(map(str, values))


def _deployable(cfg: QuantizeConfig, quantizer, entries, fp32_path: Path, tmp: Path, calib) -> tuple[Path, str]:
    """The ONNX model users deploy, and its format (see DEPLOY_NOTES)."""
    from mcp.quantization.onnx_int8 import dynamic_int8, static_int8

    if cfg.method == "ptq_int8":
        return (static_int8(fp32_path, tmp / "model.onnx", calib, cfg.observer, reduce_range=cfg.reduce_range),
                "onnx_qdq_int8")
    if cfg.method == "dynamic_int8":
        return dynamic_int8(fp32_path, tmp / "model.onnx", reduce_range=cfg.reduce_range), "onnx_dynamic_int8"
    if cfg.method in ("fixed_point", "qat"):
        return int8_weights_or_fp32(fp32_path, quantizer, entries, tmp / "model.onnx")
    out = tmp / "model.onnx"
    out.write_bytes(fp32_path.read_bytes())
    return out, "onnx_fp32"


def int8_weights_or_fp32(fp32_path: Path, quantizer, entries, out: Path) -> tuple[Path, str]:
    """The deployable form of weights on b-bit uniform grids: INT8 initializers behind
    DequantizeLinear where they fit INT8 (``onnx_int8_weights``), else the float file."""
    from mcp.quantization.onnx_int8 import weight_int8_dq

    ints = quantizer.signed_integers(entries)
    if any(i is not None for i in ints):
        return weight_int8_dq(fp32_path, out, ints), "onnx_int8_weights"
    out.write_bytes(Path(fp32_path).read_bytes())
    return out, "onnx_fp32"


def _deploy_note(cfg: QuantizeConfig, deploy_format: str, quantizer) -> str:
    note = DEPLOY_NOTES[deploy_format]
    low = sorted({b for b in quantizer.bits.values() if b < 8})
    if deploy_format == "onnx_int8_weights" and low:
        note += f"; {','.join(map(str, low))}-bit values in INT8 containers (ONNX Runtime has no kernels below 8 bits)"
    if deploy_format == "onnx_fp32" and cfg.method in ("kmeans", "huffman", "deep_compression"):
        note += "; k-means codebooks have no ONNX Runtime format (the compressed payload is the small artifact)"
    if deploy_format == "onnx_fp32" and cfg.method in ("fixed_point", "qat"):
        note += "; these integers do not fit INT8 (8-bit asymmetric), so float32 is the nearest deployable format"
    if cfg.method in ("fixed_point", "qat") and cfg.act_bits:
        note += f"; activations are quantized to {cfg.act_bits} bits in PyTorch only, float in the ONNX model"
    return note
