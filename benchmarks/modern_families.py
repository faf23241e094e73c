"""Structured pruning of the models users bring today, at 224x224: how far half the
channels take each family, whether the pruned model deploys with parity, and how much
faster it runs.

For each architecture (timm's, torchvision's ResNet-18 as the reference; untrained
weights: structure and latency do not depend on them), at 10 classes:

1. structured pruning at ratio 0.5 (magnitude criterion, global scope, one shot, no
   fine-tuning), as `mcp prune --granularity structured --sparsity 0.5` cuts;
2. parameters and MACs before and after, and the share of ResNet-18's parameter
   reduction the family reaches;
3. the ONNX parity agreement of the pruned model (mcp's export check, on 64 random images);
4. the static INT8 file of the pruned model (``ptq_int8``'s QDQ file: ONNX Runtime's
   quantizer, 4 calibration batches of random images) and its top-1 agreement with the
   float32 model on the same 64 images (untrained weights: a floor, not the accuracy a
   trained model keeps);
5. the CPU p50 (ONNX Runtime, batch 1, one thread) of the three files (float32 before,
   float32 after, INT8 after), timed side by side, and which deployable is the fastest.

    python benchmarks/modern_families.py                 # all families
    python benchmarks/modern_families.py --models vit_tiny_patch16_224,resnet18 --size 224

The results are written to benchmarks/results/modern_families.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

MODELS = ("vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "swin_tiny_patch4_window7_224", "convnext_atto",
          "efficientnet_b0", "mobilenetv3_small_100", "regnetx_002", "resnet18")


def build(name: str, size: int) -> torch.nn.Module:
    from mcp.models.foreign import TIMM_FACTORY, build_from_factory

    if name == "resnet18":
        kwargs = {"num_classes": 10}
        model = build_from_factory("torchvision.models:resnet18", kwargs)
        factory = "torchvision.models:resnet18"
    else:
        kwargs = {"model_name": name, "pretrained": False, "num_classes": 10}
        if "vit" in name or "deit" in name or "swin" in name:
            kwargs["img_size"] = size
        model = build_from_factory(TIMM_FACTORY, kwargs)
        factory = TIMM_FACTORY
    model.mcp_recipe = {"name": name, "factory": factory, "kwargs": kwargs, "num_classes": 10,
                        "input_shape": [3, size, size]}
    return model.eval()


def measure(name: str, size: int, folder: Path, seconds: float) -> dict:
    from mcp.deploy.deployable import export_deployable
    from mcp.deploy.onnx import export_onnx
    from mcp.errors import McpError
    from mcp.evaluation.metrics import count_macs
    from mcp.evaluation.ort_bench import compare
    from mcp.pruning import PruneSpec
    from mcp.pruning.engine import prune
    from mcp.quantization.onnx_int8 import static_int8

    torch.manual_seed(0)
    shape = (3, size, size)
    model = build(name, size)
    row: dict = {"model": name, "params_before": sum(p.numel() for p in model.parameters()),
                 "macs_before": float(count_macs(model, shape))}
    pruned = build(name, size)
    pruned.load_state_dict(model.state_dict())
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            prune(pruned, PruneSpec(granularity="structured", scope="global", sparsity=0.5), shape)
    except McpError as exc:
        row["error"] = str(exc)
        return row
    row["prune_s"] = time.perf_counter() - started
    row["warnings"] = sorted({str(w.message) for w in said if w.category.__module__.startswith("mcp.")})
    row["params_after"] = sum(p.numel() for p in pruned.parameters())
    row["macs_after"] = float(count_macs(pruned, shape))
    row["params_removed"] = 1 - row["params_after"] / row["params_before"]
    images = torch.randn(64, *shape, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(images, torch.zeros(64, dtype=torch.long)), batch_size=16)
    (folder / name).mkdir()
    deployed = export_deployable(pruned.cpu().eval(), shape, loader, loader, folder / name, parity_samples=64,
                                 what=name, atol=float("inf"), min_agreement=0.0)  # measured here, not refused
    row["onnx_agreement"] = deployed.metrics["onnx_agreement"]
    row["onnx_max_abs_diff"] = deployed.metrics["onnx_max_abs_diff"]
    before = export_onnx(model, shape, folder / f"{name}-before.onnx")
    after = folder / f"{name}-after.onnx"
    after.write_bytes(deployed.path.read_bytes())
    int8 = static_int8(after, folder / f"{name}-int8.onnx", list(loader)[:4])  # ptq_int8's QDQ file
    row["int8_agreement"] = agreement(pruned, int8, loader)
    row["latency_ms_before"], row["latency_ms_after"], row["latency_ms_int8"] = compare(
        [str(before), str(after), str(int8)], shape, 1, seconds)
    row["speedup"] = row["latency_ms_before"] / row["latency_ms_after"]
    row["int8_speedup"] = row["latency_ms_before"] / row["latency_ms_int8"]
    return row


def agreement(model: torch.nn.Module, path: Path, loader) -> float:
    """The share of images on which the ONNX file's top class is the PyTorch model's."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    same = total = 0
    with torch.no_grad():
        for x, _ in loader:
            ours = model(x).argmax(1).numpy()
            theirs = session.run(None, {session.get_inputs()[0].name: x.numpy().astype(np.float32)})[0].argmax(1)
            same, total = same + int((ours == theirs).sum()), total + len(x)
    return same / total


def table(rows: list[dict]) -> str:
    reference = next((r for r in rows if r["model"] == "resnet18" and "params_removed" in r), None)
    lines = ["| model | params before | params after | removed | of ResNet-18's | MACs before | MACs after | "
             "ONNX agreement | CPU p50 ms before | after | speedup | INT8 p50 ms | INT8 agreement | fastest |",
             "|" + "---|" * 14]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['params_before']:,} | not pruned (see below) |" + " - |" * 11)
            continue
        share = f"{r['params_removed'] / reference['params_removed']:.0%}" if reference else "-"
        lines.append(f"| {r['model']} | {r['params_before']:,} | {r['params_after']:,} | {r['params_removed']:.1%} | "
                     f"{share} | {r['macs_before'] / 1e6:,.0f} M | {r['macs_after'] / 1e6:,.0f} M | "
                     f"{r['onnx_agreement']:.4f} | {r['latency_ms_before']:.2f} | {r['latency_ms_after']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['latency_ms_int8']:.2f} | {r['int8_agreement']:.4f} | "
                     f"{'INT8' if r['latency_ms_int8'] < r['latency_ms_after'] else 'float32'} "
                     f"({r['latency_ms_before'] / min(r['latency_ms_int8'], r['latency_ms_after']):.2f}x) |")
    lines += [f"\n{r['model']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per file (side by side)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "modern_families.json"))
    parser.add_argument("--from-json", action="store_true", help="print the table of the saved results")
    args = parser.parse_args()
    if args.from_json:
        print(table(json.loads(Path(args.out).read_text())["rows"]))
        return
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            row = measure(name, args.size, Path(tmp), args.seconds)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "warnings"}), flush=True)
    Path(args.out).write_text(json.dumps({"size": args.size, "rows": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
