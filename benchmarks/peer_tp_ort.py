"""The peer: the same task done with Torch-Pruning and ONNX Runtime's quantizer, used directly.

    python benchmarks/peer_tp_ort.py [--baseline-epochs 30] [--epochs 20] [--sparsities 0.5 0.75 0.875]
                                     [--rounds 5] [--threads 1] [--out-dir DIR]

What a user writes without mcp (about 100 lines, all in this file): Torch-Pruning
prunes channels of a trained model in one step (the criterion and pruner its README
shows), a plain PyTorch loop fine-tunes it, ``torch.onnx.export`` writes it and
``onnxruntime.quantization`` (``quant_pre_process`` + ``quantize_static``, QDQ) makes a
static INT8 copy. Accuracy is measured in ONNX Runtime on the whole test split. Only the
data splits and the starting architecture come from mcp, so that they match
``benchmarks/deploy_vs_peer.py``, which imports :func:`peer_variants` and :func:`time_files`.

Timing (:func:`time_files`) opens every file in ONE process with the same session
options and runs batch-1 calls over several rounds; round r starts at file r mod n
(rotated order), so drift of the machine's speed does not favour any file.

Run alone, this script trains its own ResNet-20 on digits (1x32x32), builds the peer
files under ``--out-dir`` (a temporary directory by default, deleted afterwards) and
prints a markdown table. No MLflow run is made.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

TOOL = "Torch-Pruning + ORT"


# ----------------------------------------------------------------------------- the peer (a user's own code)


def train(model: nn.Module, loader, epochs: int, lr: float = 0.01, seed: int = 0, desc: str = "fine-tune",
          adamw_decay: float | None = None) -> nn.Module:
    """Plain loop: SGD (momentum 0.9, Nesterov, weight decay 5e-4), or AdamW with weight decay
    ``adamw_decay`` when given (transformers); cosine LR, cross-entropy; the final weights are kept."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    opt = (torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=adamw_decay) if adamw_decay is not None else
           torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    for _ in tqdm(range(epochs), desc=desc, leave=False):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        sched.step()
    return model.eval()


def export(model: nn.Module, input_shape: Sequence[int], path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(model).cpu().eval(), (torch.zeros(2, *input_shape),), str(path),
                          dynamo=False,  # the TorchScript exporter (torch >= 2.9 defaults to dynamo)
                          opset_version=17, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def quantize(fp32_path: Path, out_path: Path, train_loader, calib_batches: int) -> Path:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            batches = [x.numpy().astype(np.float32) for x, _ in _take(train_loader, calib_batches)]
            self.items = iter({"input": x} for x in batches)

        def get_next(self):
            return next(self.items, None)

    prepped = out_path.with_name(out_path.stem + "_prep.onnx")
    quant_pre_process(str(fp32_path), str(prepped))
    # reduce_range=True: 7-bit weights. ONNX Runtime's x86 u8 x s8 kernels without VNNI
    # sum pairs of products into saturating 16-bit integers; full-range weights overflow.
    quantize_static(str(prepped), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    prepped.unlink()
    return out_path


def ort_accuracy(path: Path, loader) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    correct = total = 0
    for x, y in loader:
        logits = sess.run(["logits"], {"input": x.numpy().astype(np.float32)})[0]
        correct += int((logits.argmax(1) == y.numpy()).sum())
        total += int(y.numel())
    return correct / max(total, 1)


def peer_variants(baseline: nn.Module, loaders, input_shape: Sequence[int], out_dir: str | Path,
                  sparsities: Sequence[float] = (0.5, 0.75, 0.875), epochs: int = 20, lr: float = 0.01,
                  seed: int = 0, calib_batches: int = 16) -> list[dict]:
    """FP32 and static INT8 ONNX files of the dense baseline and of each channel-pruned,
    fine-tuned copy (``sparsities`` are Torch-Pruning's ``pruning_ratio``: the share of
    channels removed), with their ONNX Runtime test accuracy and parameter count."""
    import torch_pruning as tp

    train_loader, _, test_loader = loaders
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []

    def emit(model: nn.Module, sparsity: float, tag: str, name: str) -> None:
        params = sum(p.numel() for p in model.parameters())
        fp32 = export(model, input_shape, out_dir / f"peer_fp32_{tag}.onnx")
        int8 = quantize(fp32, out_dir / f"peer_int8_{tag}.onnx", train_loader, calib_batches)
        for fmt, path in (("fp32", fp32), ("int8", int8)):
            rows.append({"tool": TOOL, "label": f"peer {name} {fmt}", "sparsity": sparsity, "format": fmt,
                         "path": str(path), "accuracy": ort_accuracy(path, test_loader), "params": int(params)})

    emit(baseline, 0.0, "dense", "dense")
    for s in sparsities:
        model = copy.deepcopy(baseline).cpu().eval()
        # Torch-Pruning's README (v1.6): group L2 magnitude, BasePruner (MetaPruner is its
        # deprecated alias), the classifier left whole, one step. Its README also passes
        # round_to=8; left out here, as it would change the ratios on 16/32/64-channel stages.
        imp = tp.importance.GroupMagnitudeImportance(p=2)
        fc = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        pruner = tp.pruner.BasePruner(model, torch.randn(1, *input_shape), importance=imp, pruning_ratio=s,
                                      ignored_layers=[fc])
        pruner.step()
        train(model, train_loader, epochs, lr, seed, desc=f"fine-tune {s:g}")
        emit(model, float(s), f"s{s:g}", f"{s * 100:g}% channels")
    return rows


# ----------------------------------------------------------------------------- timing


def time_files(paths: Sequence[str], input_shape: Sequence[int], rounds: int = 5, threads: int = 1,
               seconds: float = 1.0, warmup: int = 50) -> dict[str, dict]:
    """Batch-1 latency of ONNX files, all in this process with the same session options.
    Round r visits the files starting at file r mod n. Per file: the median over all
    calls, the per-round medians and their spread (100 * (max - min) / median)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    paths = [str(p) for p in paths]
    sessions = {p: ort.InferenceSession(p, options, providers=["CPUExecutionProvider"]) for p in paths}
    x = np.random.default_rng(0).standard_normal((1, *input_shape)).astype(np.float32)
    calls: dict[str, list[list[float]]] = {p: [] for p in paths}
    for r in range(rounds if paths else 0):
        for p in paths[r % len(paths):] + paths[:r % len(paths)]:
            sess = sessions[p]
            feed = {sess.get_inputs()[0].name: x}
            for _ in range(warmup):
                sess.run(None, feed)
            times, end = [], time.perf_counter() + seconds
            while True:
                t0 = time.perf_counter()
                sess.run(None, feed)
                t1 = time.perf_counter()
                times.append((t1 - t0) * 1e3)
                if t1 >= end:
                    break
            calls[p].append(times)
    out = {}
    for p in paths:
        medians = [float(np.median(t)) for t in calls[p]]
        mid = float(np.median(medians)) if medians else float("nan")
        out[p] = {"p50_ms": float(np.median(np.concatenate(calls[p]))) if calls[p] else float("nan"),
                  "p50_ms_rounds": medians,
                  "spread_pct": 100.0 * (max(medians) - min(medians)) / mid if medians else float("nan")}
    return out


def _take(loader, n: int) -> list:
    out = []
    for batch in loader:
        if len(out) >= n:
            break
        out.append(batch)
    return out


# ----------------------------------------------------------------------------- alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-epochs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs after pruning")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.875],
                        help="Torch-Pruning pruning_ratio values (share of channels removed)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-batches", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per file per round")
    parser.add_argument("--out-dir", default=None, help="keep the ONNX files here (default: a temporary directory)")
    args = parser.parse_args()

    from mcp.data import load_dataset, make_loaders
    from mcp.models import create_model

    shape = (1, 32, 32)
    splits = load_dataset("digits", "data", False, shape, 0, 0.1, "auto")
    loaders = make_loaders(splits, 32, 0, args.seed)
    torch.manual_seed(args.seed)
    baseline = create_model("resnet20", splits.num_classes, shape)
    train(baseline, loaders[0], args.baseline_epochs, args.lr, args.seed, desc="baseline")

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.out_dir) if args.out_dir else Path(tmp)
        rows = peer_variants(baseline, loaders, shape, out_dir, args.sparsities, args.epochs, args.lr, args.seed,
                             args.calib_batches)
        timing = time_files([r["path"] for r in rows], shape, args.rounds, args.threads, args.seconds)
    print(f"\nTorch-Pruning + ONNX Runtime, digits 1x32x32, batch 1, {args.threads} thread(s), "
          f"{args.rounds} rounds, rotated order\n")
    print("| file | format | accuracy % | params | p50 ms | spread % |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        t = timing[r["path"]]
        print(f"| {r['label']} | {r['format']} | {100 * r['accuracy']:.2f} | {r['params']:,} | "
              f"{t['p50_ms']:.3f} | {t['spread_pct']:.1f} |")


if __name__ == "__main__":
    main()
