"""Quantize a model by any registered method: the whole operation on an ``nn.Module`` and
its data, with no tracking. Attach the method, calibrate, fine-tune where the method
trains, bake the weights, encode the payload (the honest compressed size) and build the
deployable ONNX model the method defines, measured in PyTorch and in ONNX Runtime. The
quantize stage calls it and logs what it returns; ``mcp.quantize`` is it."""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from mcp.data.calibration import calibration_batches
from mcp.deploy import runtimes
from mcp.deploy.deployable import DeployInputs, deploy_note, deploy_quantized
from mcp.deploy.kernel_speed import MARGIN, cpu_model, int8_layers
from mcp.deploy.onnx import export_onnx, ort_evaluate, ort_predict, ort_session
from mcp.errors import ConfigError, McpError
from mcp.evaluation.metrics import model_metrics, peak_memory_mb, size_bytes_fp32
from mcp.pruning.pruner import layers_in_order
from mcp.quantization.codec import encode_model
from mcp.quantization.engine import Quantizer, QuantSpec, layer_table
from mcp.training import Callback, FineTune, ProgressBar, Trainer, evaluate


@dataclass
class QuantizeOutcome:
    """The quantized model (weights baked on their grids or codebooks) and what was measured."""

    model: nn.Module
    metrics: dict[str, float]
    payload: bytes  # the encoded model: len(payload) == metrics["size_bytes_compressed"]
    onnx_path: Path  # the deployable ONNX model, in the caller's out_dir
    deploy_format: str
    deploy_note: str
    layers: list[dict[str, Any]]  # per quantized tensor: bits, params, bytes
    quantization: dict[str, Any]  # the description a recipe records to rebuild the activation quantization
    history: dict[str, list[float]] | None = None  # fine-tuning curves, when the method trains
    stages: dict[str, int] = field(default_factory=dict)  # size after each stage (Deep Compression)
    run_id: str | None = None  # the MLflow run of a tracked mcp.* call
    model_uri: str | None = None  # the model it logged: mcp.load(model_uri) rebuilds it
    runtime: str = ""  # precision speed: the runtime its INT8 layers were chosen on (and, from auto, the fastest)
    runtime_times: dict[str, float] = field(default_factory=dict)  # from auto: each runtime's p50 of its own file


def by_speed(model: nn.Module, shape: tuple[int, ...], spec: QuantSpec, opset: int = 17,
             runtime: str = "onnxruntime") -> tuple[QuantSpec, str, dict[str, float]]:
    """``spec`` with the layers that ``runtime`` runs no faster in INT8 than in float32 at
    their shapes on this CPU (see :mod:`mcp.deploy.kernel_speed`) added to its ignored
    layers; the note and figures that say so."""
    order = [n for n, _ in layers_in_order(model, shape)]
    with tempfile.TemporaryDirectory() as tmp:
        speeds = int8_layers(order, export_onnx(model, shape, Path(tmp) / "float.onnx", opset), runtime=runtime)
    candidates = [n for n in order if n not in spec.ignored_layers]
    if not candidates:
        raise ConfigError(f"precision speed: no layer left to quantize (ignored: {', '.join(spec.ignored_layers)})")
    faster = [n for n in candidates if speeds[n].int8_faster]
    if not faster:
        best = min(candidates, key=lambda n: speeds[n].int8_ms / speeds[n].fp32_ms)
        raise McpError(f"precision speed: no layer of this model runs at least {MARGIN:.0%} faster in INT8 than in "
                       f"float32 in {runtime} on this CPU ({cpu_model()}; the closest, {best}, takes {speeds[best].int8_ms:.4f} "
                       f"against {speeds[best].fp32_ms:.4f} ms); deploy the float32 model (mcp export), or use "
                       f"--precision int8 for the smaller file")
    slow = tuple(n for n in candidates if n not in faster)
    note = (f"INT8 in {len(faster)} of {len(order)} layers (where {RUNTIME_NAMES[runtime]} runs their shapes faster "
            f"than float32 on this CPU), float32 in the rest")
    figures = {"int8_layers": float(len(faster)), "float_layers": float(len(order) - len(faster)),
               "kernel_ms_fp32": sum(speeds[n].fp32_ms for n in order),
               "kernel_ms_chosen": sum(speeds[n].int8_ms if n in faster else speeds[n].fp32_ms for n in order)}
    return dataclasses.replace(spec, ignored_layers=tuple(spec.ignored_layers) + slow), note, figures


RUNTIME_NAMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "openvino-bf16": "OpenVINO (bf16)"}


@torch.no_grad()
def _predict(model: nn.Module, loader, device: str) -> np.ndarray:
    model.eval()
    return np.concatenate([model(x.to(device)).argmax(1).cpu().numpy() for x, _ in loader])


def quantize_model(model: nn.Module, loaders: Sequence[Any], input_shape: Sequence[int], spec: QuantSpec,
                   out_dir: str | Path, finetune: FineTune | None = None, *, reference: nn.Module | None = None,
                   calib_batches: int = 16, opset: int = 17, device: str = "cpu", batch_loss: Any = None,
                   callbacks: Sequence[Callback] = (), progress: bool | None = None, runtime: str = "onnxruntime",
                   timing_s: float = 0.3) -> QuantizeOutcome:
    """Quantize a copy of ``model`` by ``spec`` on ``loaders = (train, val, test)``; the
    deployable ONNX file is written into ``out_dir``.

    ``finetune`` trains methods that fine-tune (QAT, k-means centroids) for its epochs,
    with ``batch_loss`` in place of cross-entropy when given (distillation). ``reference``
    is the model the accuracy drop and compression ratio compare with (default: ``model``;
    the unpruned model when ``model`` was pruned first). With ``spec.precision == "speed"``
    the INT8 layers are those that ``runtime`` runs faster; ``auto``: a file is built for
    each available runtime, the files are timed side by side (``timing_s`` each, in their
    own runtimes) and the fastest is returned."""
    if spec.precision == "speed" and runtime == "auto":
        return _fastest_by_runtime(model, loaders, input_shape, spec, Path(out_dir), timing_s, finetune=finetune,
                                   reference=reference, calib_batches=calib_batches, opset=opset, device=device,
                                   batch_loss=batch_loss, callbacks=callbacks, progress=progress)
    train_loader, val_loader, test_loader = loaders
    shape = tuple(input_shape)
    kind = spec.kind
    reference = model if reference is None else reference
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_test = evaluate(reference.to(device), test_loader, device)
    metrics: dict[str, float] = {"baseline_test_accuracy": base_test["accuracy"]}
    stages: dict[str, int] = {}
    t0 = time.perf_counter()

    model = copy.deepcopy(model).to(device)
    if kind.prunes_first:
        stages["fp32"] = size_bytes_fp32(model)
        stages["pruned"] = len(encode_model(model, {}, "fixed"))
    speed_note = ""
    if spec.precision == "speed":
        spec, speed_note, speed_metrics = by_speed(model, shape, spec, opset, runtime)
        metrics.update(speed_metrics)
    torch.manual_seed(spec.seed)
    quantizer = Quantizer(model, shape, spec)
    calib = calibration_batches(train_loader, calib_batches)
    quantizer.calibrate(calib, device)
    history = None
    if kind.fine_tunes and finetune is not None and finetune.epochs > 0:
        optimizer = finetune.make_optimizer(model)
        trainer = Trainer(model, optimizer, finetune.make_scheduler(optimizer), train_loader, val_loader,
                          epochs=finetune.epochs, device=device, seed=finetune.seed, restore_best=False,
                          batch_loss=batch_loss,
                          callbacks=[ProgressBar(f"quantize {spec.method}",
                                                 disable=None if progress is None else not progress), *callbacks])
        trainer.fit()
        history = trainer.history
        metrics["train_time_s"] = trainer.train_time_s
    quantizer.freeze()
    sim_test = evaluate(model, test_loader, device)  # the fake-quantized PyTorch model
    sim_pred = _predict(model, test_loader, device)
    entries = quantizer.finish()
    payload = encode_model(model, entries, spec.codings(entries))
    if kind.prunes_first:
        stages["kmeans"] = len(encode_model(model, entries, "fixed"))
        stages["huffman"] = len(payload)
    layers = layer_table(model, entries, quantizer.bits, spec.codings(entries))
    metrics["training_time_s"] = time.perf_counter() - t0

    fp32_path = export_onnx(model, shape, out_dir / "fp32.onnx", opset)
    deploy_path, deploy_format = deploy_quantized(kind, DeployInputs(fp32_path, out_dir / "model.onnx", quantizer,
                                                                     entries, calib, spec))
    session = ort_session(deploy_path)
    onnx_test = ort_evaluate(session, test_loader)
    onnx_pred = np.concatenate([ort_predict(session, x).argmax(1) for x, _ in test_loader])

    metrics.update(model_metrics(model, shape, device))
    metrics.update({
        "test_accuracy": sim_test["accuracy"], "test_loss": sim_test["loss"],
        "onnx_test_accuracy": onnx_test["accuracy"], "onnx_test_loss": onnx_test["loss"],
        "onnx_agreement": float(np.mean(onnx_pred == sim_pred)),
        "accuracy_drop": base_test["accuracy"] - onnx_test["accuracy"],
        "accuracy_drop_torch": base_test["accuracy"] - sim_test["accuracy"],
        "size_bytes_onnx": float(deploy_path.stat().st_size),
        "size_bytes_compressed": float(len(payload)), "peak_memory_mb": peak_memory_mb(device)})
    metrics["size_bytes_fp32"] = float(size_bytes_fp32(reference))
    metrics["compression_ratio"] = metrics["size_bytes_fp32"] / metrics["size_bytes_compressed"]
    for name, size in stages.items():
        metrics[f"size_bytes_{name}"] = float(size)
        metrics[f"compression_ratio_{name}"] = stages.get("fp32", size) / size
    note = deploy_note(deploy_format, quantizer.bits, "; ".join([*kind.remarks(deploy_format, spec),
                                                                 *([speed_note] if speed_note else [])]))
    return QuantizeOutcome(model, metrics, payload, deploy_path, deploy_format, note, layers, quantizer.describe(),
                           history, stages, runtime=runtime if speed_note else "")


def _fastest_by_runtime(model: nn.Module, loaders: Sequence[Any], input_shape: Sequence[int], spec: QuantSpec,
                        out_dir: Path, timing_s: float, **kw: Any) -> QuantizeOutcome:
    """``precision speed`` on ``auto``: the INT8 layers chosen on each available runtime, a
    file built for each, the fastest (each file timed in its runtime, side by side) kept."""
    outcomes = {name: quantize_model(model, loaders, input_shape, spec, out_dir / name, runtime=name, **kw)
                for name in runtimes.available()}
    best, times = runtimes.fastest_of({name: o.onnx_path for name, o in outcomes.items()}, input_shape, timing_s)
    outcome = outcomes[best]
    outcome.runtime_times = times
    return outcome
