"""`mcp export`: the deployable ONNX model of a registered version: checked, optimised,
parity-tested against PyTorch in its runtime (ONNX Runtime, OpenVINO, or the fastest of
them: ``--runtime auto``), logged with MLflow's ONNX flavor and registered as a version of
the same name tagged ``format=onnx`` and with the runtime and settings it runs with."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mcp import tracking
from mcp.config import ExportConfig
from mcp.deploy import ort_predict, runtimes
from mcp.deploy.deployable import export_deployable
from mcp.errors import McpError
from mcp.stages.common import deployable_of, lineage_baseline, resolve_model_ref, setup_data, timing_seconds
from mcp.tracking import schema


@dataclass
class ExportResult:
    run_id: str
    metrics: dict[str, float]
    source_uri: str
    deploy_format: str
    onnx_model_uri: str
    registered_name: str | None
    registered_version: str | None
    baseline: Any = None  # mcp.stages.common.Baseline: what the *_vs_baseline figures compare with


def run_export(cfg: ExportConfig, show_progress: bool | None = None) -> ExportResult:
    """Export, check and parity-test first; only a model that passes gets a run."""
    device, splits, (train_loader, _, test_loader) = setup_data(cfg)
    model, uri, arch = resolve_model_ref(cfg.model_uri or cfg.model, cfg.dataset, splits,
                                         cfg.trust_pickled_model)
    if model is None:
        raise McpError(f"{uri} does not exist; train it first (mcp train --model {arch} --dataset {cfg.dataset}) "
                       f"or pass --model-uri")
    reg_name = schema.registered_name_of(uri) or schema.registered_name(arch, cfg.dataset)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        done = export_deployable(model, splits.input_shape, train_loader, test_loader, tmp, opset=cfg.opset,
                                 optimize=cfg.optimize, rules=cfg.parity_rules(), parity_samples=cfg.parity_samples,
                                 deployed=deployable_of(uri, tmp), what=uri, runtime=cfg.runtime,
                                 timing_s=timing_seconds())
        path, fmt, metrics, session, x = done.path, done.deploy_format, done.metrics, done.session, done.example
        runtime_tags = {schema.RUNTIME: done.runtime, schema.RUNTIME_SETTINGS: runtimes.settings(done.runtime)}
        ref = lineage_baseline(model, uri, test_loader, device, metrics["test_accuracy"], cfg.trust_pickled_model)
        metrics.update(export_figures(metrics, ref))

        params = {**cfg.to_dict(), **{f"data_{k}": v for k, v in splits.summary().items()}, "source_model": uri,
                  "deploy_format": fmt}
        tags = {schema.MODEL: arch, schema.DATASET: cfg.dataset, schema.PARENT_MODEL: uri, schema.DEPLOY_FORMAT: fmt,
                schema.TEST_FINGERPRINT: splits.test_fingerprint, **runtime_tags, **ref.run_tags()}
        with tracking.stage_run("export", params, tags, run_name=f"export-{arch}-{cfg.dataset}") as run:
            tracking.log_metrics(metrics)
            example = x[:4].numpy().astype(np.float32)
            info = tracking.models.log_onnx_model(path, example, ort_predict(session, example))
            version = None
            if cfg.register:
                version_tags = {"format": "onnx", schema.STAGE: "export", "source_model": uri, "source_run":
                                run.info.run_id, "deploy_format": fmt, "test_fingerprint": splits.test_fingerprint,
                                "runtime": done.runtime, "runtime_settings": runtimes.settings(done.runtime),
                                **{k: f"{metrics[k]:.6g}" for k in ("onnx_test_accuracy", "size_bytes_onnx",
                                                                     "onnx_max_abs_diff", "onnx_agreement",
                                                                     "params_nonzero", "macs")},
                                **ref.version_tags(metrics, EXPORT_FIGURES)}
                version = str(tracking.register_model(info.model_uri, reg_name, None, version_tags).version)
    return ExportResult(run.info.run_id, metrics, uri, fmt, info.model_uri, reg_name if version else None, version,
                        ref)


EXPORT_FIGURES = ("compression_ratio_onnx", "compression_ratio_onnx_vs_baseline", "accuracy_drop",
                  "accuracy_drop_vs_baseline")


def export_figures(metrics: dict[str, float], ref) -> dict[str, float]:
    """The deployed file against its parent (the model exported: its PyTorch test accuracy,
    its float32 size) and against the baseline of its lineage: accuracy drops of the ONNX
    Runtime accuracy, and the float32 size over the ONNX file's."""
    onnx_size = max(metrics["size_bytes_onnx"], 1.0)
    return {"accuracy_drop": metrics["test_accuracy"] - metrics["onnx_test_accuracy"],
            "accuracy_drop_vs_baseline": ref.test_accuracy - metrics["onnx_test_accuracy"],
            "compression_ratio_onnx": metrics["size_bytes_fp32"] / onnx_size,
            "compression_ratio_onnx_vs_baseline": ref.size_bytes_fp32 / onnx_size,
            "parent_test_accuracy": metrics["test_accuracy"], "baseline_test_accuracy": ref.test_accuracy,
            "baseline_size_bytes_fp32": ref.size_bytes_fp32}
