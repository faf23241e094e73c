"""Quiet where it should be, talkative where it should be."""

from __future__ import annotations

import logging
import os
import subprocess

import numpy as np
import pytest

from conftest import PYTHON

DATA = ["--dataset", "synthetic", "--input-shape", "1x8x8", "--num-classes", "4"]


@pytest.mark.slow  # 13 s, a whole training process; a search's lines in a log are checked fast (test_search)
def test_training_into_a_log_file_prints_one_line_per_epoch(tmp_path, mlflow_store):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env.update(MLFLOW_TRACKING_URI=mlflow_store, MLFLOW_EXPERIMENT_NAME="log-lines")
    proc = subprocess.run([PYTHON, "-m", "mcp", "train", "--model", "tiny_mlp", "--epochs", "3", "--register",
                           "false", "--checkpoint-dir", str(tmp_path), *DATA], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    epochs = [line for line in proc.stderr.splitlines() if ": epoch " in line]
    assert [line.split(": epoch ")[1].split()[0] for line in epochs] == ["1/3", "2/3", "3/3"]
    assert all("val_accuracy=" in line and "train_loss=" in line for line in epochs)
    assert "\r" not in proc.stderr  # no progress-bar redraws in a log file


def test_the_missing_cuda_provider_is_said_once_per_process_and_not_without_a_gpu(tmp_path, experiment):
    import mlflow

    from mcp.deploy import export_onnx
    from mcp.models import create_model
    from mcp.tracking.models import log_onnx_model

    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    path = export_onnx(create_model("tiny_mlp", 4, (1, 8, 8)), (1, 8, 8), tmp_path / "m.onnx", 17)
    x = np.zeros((2, 1, 8, 8), np.float32)
    logger = logging.getLogger("mlflow.onnx")
    handler = Collect()
    logger.addHandler(handler)
    try:
        with mlflow.start_run():
            for _ in range(3):
                log_onnx_model(path, x, np.zeros((2, 4), np.float32))
    finally:
        logger.removeHandler(handler)
    import onnxruntime

    repeated = [m for m in seen if "unavailable in this onnxruntime build" in m]
    import torch

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert repeated == []
    elif torch.cuda.is_available():
        assert len(repeated) <= 1
    else:  # no GPU: CPU is all there is, and a server with onnxruntime-gpu uses the CUDA it declares
        assert repeated == []


QUIET_SCRIPT = r"""
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mcp
from mcp.deploy import export_onnx
from mcp.models import create_model
from mcp.tracking.models import log_model, log_onnx_model, register_model

torch.manual_seed(0)
vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, num_classes=4, depth=2,
                        embed_dim=32, num_heads=2)
cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                    nn.GroupNorm(2, 8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(8),
                    nn.Linear(8, 4))
for m in [*vit.modules(), *cnn.modules()]:  # scales of their own, as trained ones are: one initializer each
    if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
        nn.init.uniform_(m.weight, 0.5, 1.5)
data = DataLoader(TensorDataset(torch.randn(32, 3, 16, 16), torch.randint(0, 4, (32,))), batch_size=16)
for model in (vit, cnn):
    mcp.quantize(model, (data, data, data), method="ptq_int8", calib_batches=2, track=False)

tiny = create_model("tiny_mlp", 4, (1, 8, 8))
x = np.zeros((2, 1, 8, 8), np.float32)
path = export_onnx(tiny, (1, 8, 8), Path(sys.argv[1]) / "m.onnx", 17)
with mlflow.start_run():
    info = log_model(tiny, torch.zeros(2, 1, 8, 8))
    for _ in range(3):
        register_model(info.model_uri, "quiet-lines", None, {})
    for _ in range(2):
        log_onnx_model(path, x, np.zeros((2, 4), np.float32))
print("done")
"""


def test_no_third_party_warning_line_repeats(tmp_path, own_store):
    """A ViT and a GroupNorm CNN through ONNX Runtime's INT8 quantizer, a name registered
    three times, an ONNX model logged twice: no warning line twice, none of the known
    empty ones (the quantizer's 'Axis 1 is out-of-range' per norm, MLflow's 'already
    exists', its missing-CUDA line on a machine without a GPU)."""
    import collections

    import torch

    script = tmp_path / "quiet.py"
    script.write_text(QUIET_SCRIPT)
    proc = subprocess.run([PYTHON, str(script), str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = (proc.stdout + proc.stderr).splitlines()
    assert "done" in lines and "Created version '3' of model 'quiet-lines'." in lines  # it all ran
    warned = collections.Counter(line for line in lines if "warning" in line.lower())
    assert [line for line, n in warned.items() if n > 1] == []
    assert not [line for line in lines if "is out-of-range for weight" in line]
    assert not [line for line in lines if "already exists. Creating a new version" in line]
    if not torch.cuda.is_available():
        assert not [line for line in lines if "are unavailable in this onnxruntime build" in line]


def test_the_quantizer_lets_any_other_line_through_once():
    from mcp.quantization.onnx_int8 import _QuantizerLines

    lines = _QuantizerLines({"ln.weight"})

    def passes(message: str) -> bool:
        return lines.filter(logging.LogRecord("root", logging.WARNING, __file__, 1, message, None, None))

    assert not passes("Axis 1 is out-of-range for weight 'ln.weight' with rank 1")  # a norm's scale: nothing to say
    other = "Axis 1 is out-of-range for weight 'fc.weight' with rank 1"  # not a norm's: said, once
    assert passes(other) and not passes(other)


def test_structured_prune_says_what_it_removed_and_times_a_baseline_parent_once(cli, own_store, monkeypatch):
    from mcp.evaluation import ort_bench

    timed: list[list[str]] = []
    compare = ort_bench.compare

    def counted(paths, *args, **kwargs):
        timed.append(list(paths))
        return compare(paths, *args, **kwargs)

    monkeypatch.setattr(ort_bench, "compare", counted)
    result = cli("prune", "--model", "tiny_mlp", "--granularity", "structured", "--sparsity", "0.5", "--epochs", "1",
                 *DATA)
    assert result.exit_code == 0, result.output
    from mlflow import MlflowClient

    run_id = next(line.split()[1].rstrip(":") for line in result.output.splitlines() if line.startswith("run "))
    m = MlflowClient().get_run(run_id).data.metrics
    assert m["channels_pruned_fraction"] == 0.5  # 16 of 32 and 8 of 16: the output layer keeps its 4 classes
    assert f"channels removed 50.0%, parameters removed {100 * m['pruned_fraction']:.1f}%;" in result.output
    assert "pruned=" not in result.output
    # the parent is the baseline: timed once (the model and the parent: two files), one figure for both
    assert [len(paths) for paths in timed][-1] == 2
    assert m["baseline_latency_ms_p50_cpu"] == m["parent_latency_ms_p50_cpu"]
    (deployed,) = [line for line in result.output.splitlines() if line.startswith("deployed:")]
    assert "the baseline's" in deployed and deployed.endswith(" ms (the parent))") and "the parent's" not in deployed


def test_removed_line_names_what_was_removed():
    from mcp.cli import removed_line

    assert removed_line({"pruned_fraction": 0.9}) == "weights removed 90.0%;"
    assert removed_line({"pruned_fraction": 0.7394, "channels_pruned_fraction": 0.5}) == (
        "channels removed 50.0%, parameters removed 73.9%;")


def test_a_baseline_that_is_the_parent_is_timed_once(monkeypatch):
    import copy

    from mcp.cli import deployed_line
    from mcp.evaluation import ort_bench
    from mcp.models import create_model
    from mcp.stages.common import Baseline, deployment_figures

    timed: list[int] = []

    def fake(paths, shape, batch, seconds, runtimes=None):
        timed.append(len(paths))
        return [1.0, 2.0, 3.0][:len(paths)]

    monkeypatch.setattr(ort_bench, "compare", fake)
    model, parent = create_model("tiny_mlp", 4, (1, 8, 8)), create_model("tiny_mlp", 4, (1, 8, 8))
    same = deployment_figures(model, (1, 8, 8), None, parent, (parent, ""), "the model")
    other = deployment_figures(model, (1, 8, 8), None, copy.deepcopy(parent), (parent, ""), "the model")
    assert timed == [2, 3]  # the model and the parent; then the model, the baseline and the parent
    assert same["baseline_latency_ms_p50_cpu"] == same["parent_latency_ms_p50_cpu"] == 2.0
    assert same["speedup_p50_cpu_vs_baseline"] == same["speedup_p50_cpu_vs_parent"] == 2.0
    assert (other["baseline_latency_ms_p50_cpu"], other["parent_latency_ms_p50_cpu"]) == (2.0, 3.0)

    def ref(uri: str, fallback: str = "") -> Baseline:
        return Baseline(uri, "models:/m/2", 0.9, 100.0, 25.0, fallback)

    assert deployed_line(same, ref("models:/m/2")) == ("deployed: CPU p50 1.000 ms in ONNX Runtime (batch 1, one "
                                                       "thread; 2.00x the baseline's 2.000 ms (the parent))")
    assert deployed_line(same, ref("models:/m/2", "no baseline")).endswith("; 2.00x the parent's 2.000 ms)")
    assert deployed_line(other, ref("models:/m/1")).endswith(
        "; 2.00x the baseline's 2.000 ms; 3.00x the parent's 3.000 ms)")
