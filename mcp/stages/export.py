"""`mcp export`: the deployable ONNX model of a registered version: checked, optimised,
parity-tested against PyTorch in ONNX Runtime, logged with MLflow's ONNX flavor and
registered as a version of the same name tagged ``format=onnx``."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mcp.config import ExportConfig
from mcp.errors import McpError

FLOAT_FORMATS = ("onnx_fp32", "onnx_int8_weights")  # float compute: logits must match closely


@dataclass
class ExportResult:
    run_id: str
    metrics: dict[str, float]
    source_uri: str
    deploy_format: str
    onnx_model_uri: str
    registered_name: str | None
    registered_version: str | None


def parity_batch(test_loader, n: int) -> torch.Tensor:
    """The first ``n`` test images, in the split's fixed order."""
    xs, count = [], 0
    for x, _ in test_loader:
        xs.append(x)
        count += len(x)
        if count >= n:
            break
    return torch.cat(xs)[:n]


def build_onnx(model: nn.Module, uri: str, input_shape, tmp: Path, opset: int = 17,
               optimize: bool = True) -> tuple[Path, str, dict]:
    """(ONNX file, deploy format, node counts): a quantized model's own deployable form
    (made by `mcp quantize`), else a fresh export, optimised where that removes nodes."""
    from mcp import tracking
    from mcp.export import export_onnx, node_count, optimize_onnx

    tmp.mkdir(parents=True, exist_ok=True)
    deployed, fmt = tracking.models.deployable_onnx(uri, tmp / "deployed")
    if deployed is not None:
        return deployed, fmt, {"onnx_nodes": float(node_count(deployed))}
    path = export_onnx(model, input_shape, tmp / "exported.onnx", opset)
    counts = {"onnx_nodes_exported": float(node_count(path))}
    if optimize:
        optimized = optimize_onnx(path, tmp / "optimized.onnx")
        if node_count(optimized) < counts["onnx_nodes_exported"]:
            path = optimized
    counts["onnx_nodes"] = float(node_count(path))
    return path, "onnx_fp32", counts


def reference_model(model: nn.Module, fmt: str, input_shape, train_loader) -> nn.Module:
    """What the ONNX model must agree with: the PyTorch model itself, or, where the ONNX
    model quantizes activations too, the PyTorch model with the same activation
    quantization simulated (recalibrated on the quantize stage's calibration batches)."""
    quantization = getattr(model, "mcp_recipe", {}).get("quantization")
    if fmt in FLOAT_FORMATS or not quantization:
        return model
    from torch.utils.data import DataLoader

    from mcp.quantization.engine import simulated
    from mcp.stages.prune import calibration_batches

    loader = DataLoader(train_loader.dataset, batch_size=int(quantization.get("calib_batch_size", 32)))
    batches = calibration_batches(loader, int(quantization.get("calib_batches", 16)))
    return simulated(model, input_shape, quantization, batches)


def check_parity(cfg: ExportConfig, fmt: str, result: dict[str, float], uri: str) -> None:
    float_compute = fmt in FLOAT_FORMATS
    if (float_compute and result["max_abs_diff"] > cfg.atol) or result["agreement"] < cfg.min_agreement:
        limits = f"atol {cfg.atol:g}, " if float_compute else ""
        raise McpError(f"parity check failed for {uri!r} ({fmt}): max |PyTorch - ONNX Runtime| = "
                       f"{result['max_abs_diff']:.3g}, agreement {result['agreement']:.4f} (allowed: {limits}"
                       f"min_agreement {cfg.min_agreement:g}); nothing was logged or registered")


def run_export(cfg: ExportConfig, show_progress: bool | None = None) -> ExportResult:
    """Export, check and parity-test first; only a model that passes gets a run."""
    from mcp import tracking
    from mcp.evaluation.metrics import count_macs, count_params, size_bytes_fp32
    from mcp.export import check_onnx, ort_evaluate, ort_predict, ort_session, parity
    from mcp.stages.common import resolve_model_ref, setup_data
    from mcp.training import evaluate

    _, splits, (train_loader, _, test_loader) = setup_data(cfg)
    model, uri, arch = resolve_model_ref(cfg.model_uri or cfg.model, cfg.dataset, splits)
    if model is None:
        raise McpError(f"{uri} does not exist; train it first (mcp train --model {arch} --dataset {cfg.dataset}) "
                       f"or pass --model-uri")
    reg_name = uri.removeprefix("models:/").split("/")[0] if uri.startswith("models:/") else \
        tracking.registered_name(arch, cfg.dataset)
    x = parity_batch(test_loader, cfg.parity_samples)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        path, fmt, counts = build_onnx(model, uri, splits.input_shape, tmp, cfg.opset, cfg.optimize)
        check_onnx(path)
        session = ort_session(path)
        par = parity(reference_model(model, fmt, splits.input_shape, train_loader), session, x)
        check_parity(cfg, fmt, par, uri)

        metrics = {"onnx_max_abs_diff": par["max_abs_diff"], "onnx_agreement": par["agreement"], **counts,
                   "size_bytes_onnx": float(path.stat().st_size), "size_bytes_fp32": float(size_bytes_fp32(model)),
                   "macs": float(count_macs(model, splits.input_shape)), **count_params(model)}
        onnx_test = ort_evaluate(session, test_loader)
        torch_test = evaluate(model, test_loader)
        metrics.update(onnx_test_accuracy=onnx_test["accuracy"], onnx_test_loss=onnx_test["loss"],
                       test_accuracy=torch_test["accuracy"], test_loss=torch_test["loss"])

        params = {**cfg.to_dict(), "source_model": uri, "deploy_format": fmt}
        tags = {"mcp.model": arch, "mcp.dataset": cfg.dataset, "mcp.parent_model": uri, "mcp.deploy_format": fmt}
        with tracking.stage_run("export", params, tags, run_name=f"export-{arch}-{cfg.dataset}") as run:
            tracking.log_metrics(metrics)
            example = x[:4].numpy().astype(np.float32)
            info = tracking.models.log_onnx_model(path, example, ort_predict(session, example))
            version = None
            if cfg.register:
                version_tags = {"format": "onnx", "mcp.stage": "export", "source_model": uri, "source_run":
                                run.info.run_id, "deploy_format": fmt,
                                **{k: f"{metrics[k]:.6g}" for k in ("onnx_test_accuracy", "size_bytes_onnx",
                                                                     "onnx_max_abs_diff", "onnx_agreement",
                                                                     "params_nonzero", "macs")}}
                version = str(tracking.register_model(info.model_uri, reg_name, None, version_tags).version)
    return ExportResult(run.info.run_id, metrics, uri, fmt, info.model_uri, reg_name if version else None, version)
