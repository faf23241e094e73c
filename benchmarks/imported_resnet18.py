"""A user's torchvision ResNet-18 checkpoint, imported and compressed.

Nothing can be downloaded here, so the "ImageNet" checkpoint is made locally: torchvision's
resnet18 trained briefly on a generated 64x64 image folder of 5 texture classes and saved
as a state_dict, the way torchvision ships its weights. The user's task is another
generated folder of 3 texture classes. Per seed:

1. `mcp import --module torchvision.models:resnet18 --weights ... --head auto` with
   16 epochs of fine-tuning (backbone frozen for the first): the fp32 baseline;
2. `mcp prune --granularity structured --sparsity 0.5` of that baseline;
3. `mcp quantize --method ptq_int8` of that baseline;
4. `mcp benchmark` of the three: ONNX Runtime accuracy, sizes and CPU latency (batch 1,
   one thread), each model timed in a process of its own.

    python benchmarks/imported_resnet18.py --seeds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

NOISE = 1.2  # pixel noise against the pattern: high enough that accuracy is not 100%
PATTERNS = ("horizontal", "vertical", "diagonal", "checker", "rings", "dots", "cross", "noise")


def _texture(kind: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    f = rng.uniform(0.25, 0.6)
    phase = rng.uniform(0, 2 * np.pi)
    base = {
        "horizontal": np.sin(f * y + phase), "vertical": np.sin(f * x + phase),
        "diagonal": np.sin(f * (x + y) / 1.4 + phase),
        "checker": np.sign(np.sin(f * x + phase)) * np.sign(np.sin(f * y + phase)),
        "rings": np.sin(f * np.hypot(x - size / 2, y - size / 2) + phase),
        "dots": np.sin(f * x + phase) * np.sin(f * y + phase), "cross": np.maximum(np.sin(f * x), np.sin(f * y)),
        "noise": rng.standard_normal((size, size)).astype(np.float32),
    }[kind]
    colour = rng.uniform(0.3, 1.0, size=3)
    img = (base[..., None] * colour + rng.normal(0, NOISE, size=(size, size, 3))) * 60 + 128
    return np.clip(img, 0, 255).astype(np.uint8)


def make_folder(root: Path, classes: tuple[str, ...], per_class: int, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_texture(name, rng)).save(root / name / f"{i}.png")
    return root


def make_checkpoint(folder: Path, path: Path, epochs: int) -> Path:
    """torchvision's resnet18 trained on ``folder`` and saved as its state_dict."""
    import torch
    import torchvision

    from mcp.data import load_dataset, make_loaders
    from mcp.training import FineTune, Trainer

    torch.manual_seed(0)
    splits = load_dataset("imagefolder", folder, input_shape=(3, 64, 64))
    loaders = make_loaders(splits, 32, 0, 0)
    model = torchvision.models.resnet18(weights=None, num_classes=len(splits.class_names))
    ft = FineTune(epochs=epochs, lr=0.05)
    opt = ft.make_optimizer(model)
    Trainer(model, opt, ft.make_scheduler(opt), loaders[0], loaders[1], epochs=epochs).fit()
    torch.save(model.state_dict(), path)
    return path


def run_seed(seed: int, checkpoint: Path, folder: Path, pretrain_classes: int, import_epochs: int,
             epochs: int) -> list[dict]:
    import mlflow

    from mcp.config import BenchmarkConfig, ImportConfig, PruneConfig, QuantizeConfig
    from mcp.stages.benchmark import run_benchmark
    from mcp.stages.importer import run_import
    from mcp.stages.prune import run_prune
    from mcp.stages.quantize import run_quantize

    data = dict(dataset="imagefolder", data_dir=str(folder), input_shape="3x64x64", seed=seed, device="cpu")
    with tempfile.TemporaryDirectory() as store:
        mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
        mlflow.set_experiment(f"imported-resnet18-{seed}")
        imported = run_import(ImportConfig(module="torchvision.models:resnet18",
                                           module_kwargs=f"{{num_classes: {pretrain_classes}}}",
                                           weights=str(checkpoint), head="auto", epochs=import_epochs, freeze_epochs=1,
                                           lr=0.05, **data), show_progress=False)
        base = f"models:/{imported.registered_name}/{imported.registered_version}"
        pruned = run_prune(PruneConfig(model_uri=base, granularity="structured", sparsity=0.5, epochs=epochs,
                                       lr=0.02, **data), show_progress=False)
        quantized = run_quantize(QuantizeConfig(model_uri=base, method="ptq_int8", **data), show_progress=False)
        uris = [base, f"models:/{pruned.registered_name}/{pruned.registered_version}",
                f"models:/{quantized.registered_name}/{quantized.registered_version}"]
        bench = run_benchmark(BenchmarkConfig(models=",".join(uris), baseline=base, seconds=1.0, **data),
                              show_progress=False)
    rows = []
    for label, row in zip(("fp32 import", "structured 50%", "ptq_int8"), bench.rows):
        rows.append({"model": label, "accuracy": row["test_accuracy"], "params": row["params_nonzero"],
                     "onnx_bytes": row["size_bytes_onnx"], "p50_ms": row["latency_ms_p50_cpu"],
                     "speedup": row["speedup_p50_cpu"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--import-epochs", type=int, default=16, help="fine-tuning epochs of the import")
    parser.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs of the prune step")
    parser.add_argument("--per-class", type=int, default=120, help="images per class of the user's folder")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        pretrain = make_folder(tmp_path / "pretrain", PATTERNS[3:], 80, seed=1)
        target = make_folder(tmp_path / "target", PATTERNS[:3], args.per_class, seed=2)
        checkpoint = make_checkpoint(pretrain, tmp_path / "resnet18.pth", epochs=6)
        per_seed = [run_seed(s, checkpoint, target, len(PATTERNS[3:]), args.import_epochs, args.epochs)
                    for s in range(args.seeds)]
    test_images = round(0.2 * 3 * args.per_class)
    print(f"torchvision resnet18, 64x64 RGB, {args.per_class} images x 3 classes ({test_images} test images: one is "
          f"{100 / test_images:.2f} points), import fine-tuned "
          f"{args.import_epochs} epochs, pruned and fine-tuned {args.epochs}, {args.seeds} seeds, "
          f"{time.perf_counter() - started:.0f} s\n")
    print("| model | test accuracy (ONNX Runtime) | non-zero params (seed 0) | ONNX bytes (seed 0) "
          "| CPU p50 ms (batch 1, 1 thread) | speedup |")
    print("|---|---|---|---|---|---|")
    for i, label in enumerate(r["model"] for r in per_seed[0]):
        rows = [seed[i] for seed in per_seed]

        def spread(key: str, fmt: str, scale: float = 1.0) -> str:
            values = [scale * r[key] for r in rows]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{format(statistics.mean(values), fmt)} ± {format(sd, fmt)}"

        print(f"| {label} | {spread('accuracy', '.2f', 100)}% | {int(rows[0]['params']):,} | "
              f"{int(rows[0]['onnx_bytes']):,} | {spread('p50_ms', '.2f')} | {spread('speedup', '.2f')}x |")
    print("\nper seed (accuracy %): " + "; ".join(
        f"seed {s}: " + ", ".join(f"{r['model']} {100 * r['accuracy']:.2f}" for r in rows)
        for s, rows in enumerate(per_seed)))


if __name__ == "__main__":
    main()
