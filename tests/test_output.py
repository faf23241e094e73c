"""Quiet where it should be, talkative where it should be."""

from __future__ import annotations

import logging
import os
import subprocess

import numpy as np

from conftest import PYTHON

DATA = ["--dataset", "synthetic", "--input-shape", "1x8x8", "--num-classes", "4"]


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


def test_the_missing_cuda_provider_is_said_once_per_process(tmp_path, experiment):
    import mlflow

    from mcp.export import export_onnx
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
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert repeated == []
    else:
        assert len(repeated) <= 1
