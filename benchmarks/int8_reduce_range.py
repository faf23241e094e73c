"""Why INT8 weights default to ONNX Runtime's reduced range [-64, 64].

    python benchmarks/int8_reduce_range.py [--model tiny_cnn] [--epochs 6]

Trains a small CNN on digits, quantizes it with `ptq_int8` with and without
`reduce_range`, and prints, over the whole test split, the accuracy of the PyTorch
fake-quant model, of the ONNX Runtime model with its integer kernels, and of the same
ONNX model with graph optimisations off (ONNX Runtime's reference QDQ arithmetic), and
how often their predictions agree. ONNX Runtime's x86 u8 x s8 kernels can sum pairs
of products into saturating 16-bit integers (the non-VNNI path): full-range weights
overflow them.
No MLflow run is made.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny_cnn")
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch

    from mcp.data import load_dataset, make_loaders
    from mcp.deploy import export_onnx, ort_predict, ort_session
    from mcp.models import create_model
    from mcp.quantization import QuantSpec, Quantizer
    from mcp.quantization.onnx_int8 import static_int8
    from mcp.training import Trainer, build_optimizer

    splits = load_dataset("digits", "data", False, None, 0, 0.1)
    train, _, test = make_loaders(splits, 64, 0, 0)
    torch.manual_seed(0)
    model = create_model(args.model, splits.num_classes, splits.input_shape)
    optimizer = build_optimizer(model, "adamw", 0.01, 0.9, False, 0.0)
    Trainer(model, optimizer, None, train, test, epochs=args.epochs, device="cpu", seed=0, callbacks=[]).fit()
    model.eval()
    calib = [b for _, b in zip(range(8), train)]
    x = torch.cat([b[0] for b in test])
    y = torch.cat([b[1] for b in test]).numpy()
    with torch.no_grad():
        fp32 = model(x).argmax(1).numpy()
    print(f"\n{args.model} on digits ({y.size} test images), onnxruntime {ort.__version__}, "
          f"float32 accuracy {100 * np.mean(fp32 == y):.2f}%\n")
    print("| reduce_range | PyTorch fake-quant | ONNX Runtime (integer kernels) | ONNX Runtime (reference) "
          "| agreement PyTorch / ORT kernels | agreement ORT reference / kernels |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = export_onnx(model, splits.input_shape, Path(tmp) / "fp32.onnx")
        for reduce_range in (False, True):
            int8 = static_int8(fp32_path, Path(tmp) / f"int8_{reduce_range}.onnx", calib, "minmax",
                               reduce_range=reduce_range)
            sim = copy.deepcopy(model)
            quantizer = Quantizer(sim, splits.input_shape, QuantSpec("ptq_int8", reduce_range=reduce_range))
            quantizer.calibrate(calib, "cpu")
            with torch.no_grad():
                torch_pred = sim(x).argmax(1).numpy()
            kernels = ort_predict(ort_session(int8), x).argmax(1)
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            reference = ort_predict(ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"]),
                                    x).argmax(1)
            print(f"| {reduce_range} | {100 * np.mean(torch_pred == y):.2f}% | {100 * np.mean(kernels == y):.2f}% "
                  f"| {100 * np.mean(reference == y):.2f}% | {100 * np.mean(torch_pred == kernels):.2f}% "
                  f"| {100 * np.mean(reference == kernels):.2f}% |")


if __name__ == "__main__":
    main()
