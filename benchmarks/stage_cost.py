"""Where a small stage's seconds go: `mcp quantize` and `mcp export` from the command line
against the same stage called in a warm process, and against the work done by hand.

    python benchmarks/stage_cost.py [--repeat 3]

In a scratch tracking store (deleted afterwards): `mcp train` ResNet-20 on digits at
1x32x32 for 2 epochs, `mcp prune` 75% of its channels (1 epoch). Then, each --repeat times,
median reported:

- the command line: `python -m mcp quantize --method ptq_int8` and `python -m mcp export`
  of the pruned model, and the same quantize of the dense baseline (whose recipe needs no
  Torch-Pruning), each a new process (wall time);
- the imports alone: a new process importing what those stages import (torch, mlflow,
  torch_pruning, onnx, onnxruntime, matplotlib, and the digits read from scikit-learn's file);
- the same stages in one warm process (`mcp.stages.*.run_*`, imports and the store
  already open): what remains is the stage's own work and logging;
- by hand: `torch.onnx.export` of the loaded model and ONNX Runtime's `quantize_static`
  on 8 calibration batches, no tracking.

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = ["--dataset", "digits", "--input-shape", "1x32x32"]
IMPORTS = ("import torch, mlflow, torch_pruning, onnx, onnxruntime, matplotlib.pyplot; "
           "from mcp.data.registry import digits_arrays; digits_arrays()")


def _wall(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        os.environ["MLFLOW_TRACKING_URI"] = uri
        mcp = [sys.executable, "-m", "mcp"]
        subprocess.run(mcp + ["train", "--model", "resnet20", "--epochs", "2", *DATA], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(mcp + ["prune", "--model", "resnet20", "--granularity", "structured", "--scope", "layerwise",
                              "--sparsity", "0.75", "--epochs", "1", *DATA], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pruned = "models:/resnet20-digits/2"
        quantize = mcp + ["quantize", "--model", "resnet20", "--model-uri", pruned, "--method", "ptq_int8", *DATA]
        export = mcp + ["export", "--model", "resnet20", "--model-uri", pruned, *DATA]
        dense = mcp + ["quantize", "--model", "resnet20", "--model-uri", "models:/resnet20-digits/1", "--method",
                       "ptq_int8", *DATA]
        rows: dict[str, list[float]] = {}
        for _ in range(args.repeat):
            rows.setdefault("command line: mcp quantize --method ptq_int8", []).append(_wall(quantize, env))
            rows.setdefault("command line: the same, of the dense baseline (no Torch-Pruning)", []).append(
                _wall(dense, env))
            rows.setdefault("command line: mcp export", []).append(_wall(export, env))
            rows.setdefault("a new process importing what they import", []).append(
                _wall([sys.executable, "-c", IMPORTS], env))
        rows.update(_warm(pruned, args.repeat, Path(tmp)))
    print(f"ResNet-20, 75% of channels removed, digits 1x32x32; median of {args.repeat}\n")
    print("| what | seconds |\n|---|---|")
    for label, values in rows.items():
        print(f"| {label} | {statistics.median(values):.2f} |")


def _warm(pruned: str, repeat: int, tmp: Path) -> dict[str, list[float]]:
    """The stages in this process after a first call (imports done, store open), and the
    export + static INT8 by hand."""
    import warnings

    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from mcp import tracking
    from mcp.config import ExportConfig, QuantizeConfig
    from mcp.data import load_dataset, make_loaders
    from mcp.deploy.onnx import export_onnx
    from mcp.stages.export import run_export
    from mcp.stages.quantize import run_quantize

    data = dict(dataset="digits", input_shape="1x32x32")
    out: dict[str, list[float]] = {}
    for i in range(repeat + 1):  # the first call warms up
        t0 = time.perf_counter()
        run_quantize(QuantizeConfig(model="resnet20", model_uri=pruned, method="ptq_int8", **data),
                     show_progress=False)
        t1 = time.perf_counter()
        run_export(ExportConfig(model="resnet20", model_uri=pruned, **data), show_progress=False)
        t2 = time.perf_counter()
        if i:
            out.setdefault("in a warm process: run_quantize", []).append(t1 - t0)
            out.setdefault("in a warm process: run_export", []).append(t2 - t1)
    model = tracking.load_model(pruned)
    splits = load_dataset("digits", "data", False, (1, 32, 32), 0, 0.1, "auto")
    batches = [x.numpy().astype(np.float32) for x, _ in list(make_loaders(splits, 32)[0])[:8]]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter({"input": x} for x in batches)

        def get_next(self):
            return next(self.items, None)

    for i in range(repeat):
        t0 = time.perf_counter()
        path = export_onnx(model, (1, 32, 32), tmp / f"hand{i}.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(str(path), str(tmp / f"hand{i}_int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8)
        out.setdefault("by hand: torch.onnx.export + quantize_static (no tracking)", []).append(
            time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    main()
