"""What ONNX Runtime's settings and kernel-friendly widths do to the latency of ResNet-20 at
1x32x32 on this CPU (batch 1): graph optimisation level x channel rounding x threads.

    python benchmarks/ort_settings.py [--threads 1,2] [--seconds 1.0]

Latency depends on the shapes, not on the weights' values, so the models are untrained:
ResNet-20 dense and structurally pruned (Torch-Pruning, through mcp's pruning engine) at
50%, 75% and 87.5% of channels, with and without `round_to` 8. Each file is timed in this
process with mcp.evaluation.ort_bench.compare (rotated rounds), once per setting.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from mcp.deploy.onnx import export_onnx
    from mcp.models import create_model
    from mcp.pruning import PruneSpec, Pruning

    shape = (1, 32, 32)
    torch.manual_seed(0)
    base = create_model("resnet20", 10, shape).eval()
    variants = {"dense": base}
    for sparsity in (0.5, 0.75, 0.875):
        for round_to in (1, 8):
            model = copy.deepcopy(base)
            Pruning(model, shape, PruneSpec(granularity="structured", scope="layerwise", sparsity=sparsity,
                                            round_to=round_to), [], "cpu").step()
            variants[f"{sparsity:.1%} channels" + (f", round_to {round_to}" if round_to > 1 else "")] = model
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all (default)": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    threads = [int(t) for t in args.threads.split(",")]
    header = [f"{level}, {t} thread(s)" for t in threads for level in levels]
    print(f"ONNX Runtime {ort.__version__}, CPU p50 ms at batch 1\n")
    print("| model | channels | " + " | ".join(header) + " |")
    print("|---|---|" + "---|" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in variants.items():
            path = export_onnx(model, shape, Path(tmp) / "m.onnx")
            widths = sorted({m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)})
            cells = []
            for t in threads:
                for level in levels.values():
                    cells.append(_p50(str(path), shape, t, level, args.seconds))
            print(f"| {name} | {widths} | " + " | ".join(f"{c:.4f}" for c in cells) + " |", flush=True)
        print("\nOffline-optimised files (ONNX Runtime's optimized_model_filepath), 1 thread: session start "
              "(median of 5) and p50\n")
        print("| model | file | session start (ms) | p50 (ms) |\n|---|---|---|---|")
        all_level = levels["all (default)"]
        for name in ("dense", "75.0% channels"):
            path = export_onnx(variants[name], shape, Path(tmp) / "m.onnx")
            files = {"as exported": str(path)}
            for label, level in (("optimised offline, extended", levels["extended"]), ("optimised offline, all",
                                                                                        all_level)):
                out = Path(tmp) / f"{label[-3:]}.onnx"
                options = ort.SessionOptions()
                options.graph_optimization_level = level
                options.optimized_model_filepath = str(out)
                ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                files[label] = str(out)
            for label, file in files.items():
                start = _start_ms(file)
                print(f"| {name} | {label} | {start:.1f} | {_p50(file, shape, 1, all_level, args.seconds):.4f} |",
                      flush=True)


def _start_ms(path: str) -> float:
    import statistics
    import time

    import onnxruntime as ort

    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _p50(path: str, shape, threads: int, level, seconds: float) -> float:
    import time

    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = level
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)
    for _ in range(50):
        session.run(None, {"input": x})
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 50:
        t0 = time.perf_counter()
        session.run(None, {"input": x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


if __name__ == "__main__":
    main()
