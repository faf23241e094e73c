"""Which operators of a vision transformer should run in INT8 in ONNX Runtime: measured on a
ViT trained on real images.

    python benchmarks/transformer_int8.py                  # seeds 0 1 2, 12 epochs each
    python benchmarks/transformer_int8.py --from-json       # the table of the saved results

The ViT of ``benchmarks/modern_mnist.py`` (6 blocks, width 64, 4 heads, MLP ratio 2, 65
tokens) is trained on MNIST's real test files at 1x32x32 (6,800 train / 1,200 val / 2,000
test, mcp's split), exported, and made INT8 in three ways:

- ``every operator``: ONNX Runtime's static QDQ quantizer with its default operator set
  (the MatMuls and the patch embedding, and also LayerNormalization, Softmax, Add, Mul,
  ...): what ``ptq_int8`` wrote for transformers before;
- ``weighted only``: what ``ptq_int8`` writes for a graph with attention now: the same
  calibration, but only the operators with a weight (the patch embedding's Conv, each
  block's qkv, proj, fc1 and fc2 MatMuls, the head's Gemm) run INT8, with float outputs;
  the attention's own products (queries by keys, scores by values), LayerNorm, Softmax,
  GELU (Erf) and the residual additions stay float;
- ``dynamic``: ONNX Runtime's dynamic quantization of the MatMuls (``dynamic_int8``).

Per seed: the test accuracy of every file in ONNX Runtime, its top-1 agreement with the
float32 file, and the CPU p50 (batch 1, one thread) of all four files timed side by side
in a fresh process once all training is done, rotated rounds
(:func:`modern_mnist.fresh_times`). Results go to
``benchmarks/results/transformer_int8.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from modern_mnist import SETTINGS, SHAPE, build, fit, fresh_times  # the same ViT, training loop, timing

from mcp.data import load_dataset, make_loaders
from mcp.deploy.onnx import export_onnx
from mcp.quantization.onnx_int8 import dynamic_int8, static_int8

def predictions(path: Path, loader) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x.numpy().astype(np.float32)})[0].argmax(1) for x, _ in loader])


def one_seed(seed: int, args, splits, tmp: Path) -> dict:
    train, _, test = make_loaders(splits, 64, 0, seed)
    torch.manual_seed(seed)
    model = fit(build("vit"), train, args.epochs, SETTINGS["vit"]["lr"], SETTINGS["vit"]["weight_decay"], seed,
                f"vit, seed {seed}")
    calib = [batch for _, batch in zip(range(8), train)]
    files = {"float32": export_onnx(model, SHAPE, tmp / f"fp32-{seed}.onnx")}
    files["every operator"] = static_int8(files["float32"], tmp / f"all-{seed}.onnx", calib, op_types=None)
    files["weighted only"] = static_int8(files["float32"], tmp / f"weighted-{seed}.onnx", calib)  # "auto"
    files["dynamic"] = dynamic_int8(files["float32"], tmp / f"dynamic-{seed}.onnx")
    labels = np.concatenate([y.numpy() for _, y in test])
    reference = predictions(files["float32"], test)
    row: dict = {"seed": seed, "files": {label: str(path) for label, path in files.items()}}
    for label, path in files.items():
        ours = predictions(path, test)
        row[label] = {"accuracy": float((ours == labels).mean()), "agreement": float((ours == reference).mean()),
                      "size_kib": path.stat().st_size / 1024}
    return row


def timed(row: dict, args) -> dict:
    """The row's four files timed side by side in a fresh process, once all training is done."""
    files = row.pop("files")
    times = fresh_times(files.values(), args.rounds, args.seconds)
    for label, path in files.items():
        row[label].update(p50_ms=times[path]["p50_ms"], spread_pct=times[path]["spread_pct"])
    return row


def _spread(values) -> str:
    values = list(values)
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def table(rows: list[dict]) -> str:
    lines = ["| file | test accuracy % | agreement with float32 % | CPU p50 ms | speedup over float32 | size KiB |",
             "|---|---|---|---|---|---|"]
    for label in ("float32", "every operator", "weighted only", "dynamic"):
        lines.append(f"| {label} | {_spread(100 * r[label]['accuracy'] for r in rows)} | "
                     f"{_spread(100 * r[label]['agreement'] for r in rows)} | "
                     f"{_spread(r[label]['p50_ms'] for r in rows)} | "
                     f"{_spread(r['float32']['p50_ms'] / r[label]['p50_ms'] for r in rows)}x | "
                     f"{statistics.mean(r[label]['size_kib'] for r in rows):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per file and round")
    parser.add_argument("--mnist-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                                   "mnist-t10k"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "transformer_int8.json"))
    parser.add_argument("--from-json", action="store_true", help="print the table of the saved results")
    args = parser.parse_args()
    if args.from_json:
        print(table(json.loads(Path(args.out).read_text())["rows"]))
        return
    splits = load_dataset("idx", args.mnist_dir, False, SHAPE, 0, 0.15, "auto")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            rows.append(one_seed(seed, args, splits, Path(tmp)))
        for row in rows:
            print(json.dumps(timed(row, args)), flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "from_json")}
    Path(args.out).write_text(json.dumps({"settings": settings, "threads": torch.get_num_threads(), "rows": rows},
                                         indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
