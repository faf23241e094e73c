"""The same ONNX files in every CPU runtime mcp knows (ONNX Runtime, OpenVINO f32, OpenVINO
bf16), and OpenVINO's own INT8 (NNCF post-training quantization, used directly) beside them.

    pip install 'mcp-pipeline[openvino]' nncf             # nncf: the peer column (skipped without it)
    python benchmarks/runtimes.py                        # both parts, seeds 0 1 2
    python benchmarks/runtimes.py --part zoo             # the 224x224 models only (speed)
    python benchmarks/runtimes.py --part mnist --seeds 0 --epochs 3 --finetune-epochs 1   # a quick look
    python benchmarks/runtimes.py --part search          # mcp search --budget-ms X --runtime auto, MNIST ResNet-20
    python benchmarks/runtimes.py --part layers          # which layers each runtime runs faster in INT8
    python benchmarks/runtimes.py --from-json            # the tables of the saved results

**zoo** (speed only: their accuracy needs ImageNet, which this machine does not have):
torchvision ``resnet18`` and ``mobilenet_v2`` and timm ``efficientnet_b0`` at 3x224x224,
untrained (a file's latency depends on its shapes, not its weights). Files: the float32
export (``mcp.export``), ``ptq_int8`` of it (``mcp.quantize``, QDQ for ONNX Runtime), the
model with half its channels removed (``mcp.prune``, structured, layer-wise) and its
``ptq_int8``; the peer: NNCF's ``nncf.quantize`` of the float32 file read by OpenVINO.
Calibration: 8 batches of 4 random images.

**mnist**: ResNet-20 on MNIST's real test images (``--mnist-dir``, IDX files, 1x32x32,
mcp's fixed split 6,800 / 1,200 / 2,000: one test image is 0.05 points), per seed: the
baseline trained from scratch, ``mcp.prune`` (structured, layer-wise, distilled from the
baseline) at 75% and 87.5% of channels, ``ptq_int8`` of the baseline and of each pruned
model, and NNCF's INT8 of each float32 file (calibrated as ``mcp.quantize`` is: on the first
16 training batches of 64). Accuracy of every file in every runtime on the 2,000 test images.

**search**: per seed, the stages as a user runs them (`mcp train`, then `mcp search
--model-uri <baseline> --budget-ratio 0 --budget-ms X --runtime auto --space resnet_latency
--distill`, in a tracking store of its own) on the same data: X is the float32 baseline's
p50 in its fastest runtime over --speedup. Then the winner's registered deployable and the
baseline's export are timed afresh in every runtime (the protocol below): does the winner
meet X in the runtime its version records, is that runtime still the fastest for it, and
its accuracy there against the baseline's.

**layers**: what `--precision speed` sees in each runtime: every Conv/Gemm layer of
``resnet18`` at 3x224x224 and of the CIFAR ResNet-20 at 1x32x32 timed alone as float32 and
as INT8 QDQ (``mcp.deploy.kernel_speed``, a fresh cache), per runtime; which layers run at
least 10% faster in INT8 there.

Timing: every (file, runtime) pair of a model in ONE fresh process, batch 1, one thread,
--rounds rounds in rotated order, --seconds per pair and round; the p50 over all calls and
the spread of the round medians. Per runtime, the fastest file within 1 point of the float32
baseline's ONNX Runtime accuracy (mnist); "best against best": the fastest within 1 point
over all runtimes against the fastest within 1 point on ONNX Runtime alone. Results go to
``benchmarks/results/runtimes.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_tp_ort  # noqa: E402 - the benchmarks' own helpers (after the path)

import mcp  # noqa: E402
from mcp.data import load_dataset, make_loaders  # noqa: E402
from mcp.deploy import runtimes  # noqa: E402
from mcp.deploy.onnx import ort_evaluate  # noqa: E402
from mcp.models import create_model  # noqa: E402
from mcp.pruning import PruneSpec  # noqa: E402
from mcp.pruning.engine import prune as prune_once  # noqa: E402

ZOO = ("resnet18", "mobilenet_v2", "efficientnet_b0")
MNIST_SHAPE = (1, 32, 32)
WITHIN_POINTS = 1.0


def zoo_model(name: str) -> torch.nn.Module:
    if name == "efficientnet_b0":
        import timm

        return timm.create_model("efficientnet_b0", pretrained=False, num_classes=1000).eval()
    import torchvision

    return getattr(torchvision.models, name)(weights=None).eval()


def random_loaders(shape, batches: int = 8, batch: int = 4, classes: int = 1000):
    """(train, val, test) loaders of random images, for calibration and the API's checks."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(batches * batch, *shape, generator=g),
                         torch.randint(0, classes, (batches * batch,), generator=g))
    loader = DataLoader(data, batch_size=batch)
    return loader, loader, loader


def nncf_int8(fp32: Path, out: Path, loader, batches: int) -> Path | None:
    """The peer: NNCF post-training INT8 of the float32 file, as OpenVINO's docs show it
    (read_model, nncf.Dataset over the calibration images, nncf.quantize, save_model), on
    the loader's first ``batches`` batches (NNCF's subset_size counts the dataset's items)."""
    try:
        import nncf
        import openvino as ov
    except ImportError:
        return None
    model = ov.Core().read_model(str(fp32))
    dataset = nncf.Dataset(loader, lambda item: item[0].numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = nncf.quantize(model, dataset, subset_size=batches)
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return out


def pairs(files: dict[str, Path]) -> list[tuple[str, str, str]]:
    """(label, path, runtime) of every file in every runtime that can run it: an OpenVINO
    IR (.xml) file, NNCF's, runs in OpenVINO only."""
    out = []
    for label, path in files.items():
        for rt in runtimes.available():
            if str(path).endswith(".xml") and rt == "onnxruntime":
                continue
            out.append((label, str(path), rt))
    return out


def time_pairs(items: list[tuple[str, str, str]], shape, rounds: int, seconds: float) -> list[dict]:
    """Every (file, runtime) pair timed in this process, rotated rounds."""
    from mcp.evaluation.ort_bench import runner

    runs = [runner(path, rt, 1)[0] for _, path, rt in items]
    x = np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)
    calls: list[list[list[float]]] = [[] for _ in items]
    for run in runs:
        for _ in range(20):
            run(x)
    n = len(items)
    for r in range(rounds):
        for k in [(r + i) % n for i in range(n)]:
            times, end = [], time.perf_counter() + seconds
            while True:
                t0 = time.perf_counter()
                runs[k](x)
                t1 = time.perf_counter()
                times.append((t1 - t0) * 1e3)
                if t1 >= end:
                    break
            calls[k].append(times)
    out = []
    for (label, path, rt), rounds_of in zip(items, calls):
        medians = [float(np.median(t)) for t in rounds_of]
        out.append({"file": label, "runtime": rt, "p50_ms": float(np.median(np.concatenate(rounds_of))),
                    "spread_pct": 100 * (max(medians) - min(medians)) / float(np.median(medians))})
    return out


def fresh_timing(items, shape, args) -> list[dict]:
    """:func:`time_pairs` in a process of its own (no training threads of this one in the way)."""
    spec = json.dumps({"items": items, "shape": list(shape), "rounds": args.rounds, "seconds": args.seconds})
    out = subprocess.run([sys.executable, __file__, "--time-pairs", spec], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the timing process failed: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def accuracy(path: Path, rt: str, loader) -> float:
    return ort_evaluate(runtimes.session(path, rt, 1), loader)["accuracy"]


def zoo_part(name: str, args, tmp: Path) -> dict:
    model = zoo_model(name)
    shape = (3, 224, 224)
    loaders = random_loaders(shape)
    folder = tmp / name
    folder.mkdir()
    files: dict[str, Path] = {}
    files["float32"] = mcp.export(model, loaders, folder / "fp32.onnx", parity_samples=4).path
    int8 = mcp.quantize(copy.deepcopy(model), loaders, method="ptq_int8", calib_batches=8, out_dir=folder / "q",
                        track=False, progress=False)
    files["ptq_int8"] = Path(int8.onnx_path)
    pruned = copy.deepcopy(model)  # untrained: pruned once, nothing to fine-tune
    prune_once(pruned, PruneSpec(granularity="structured", scope="layerwise", sparsity=0.5), shape)
    pruned.eval()
    files["pruned 50% float32"] = mcp.export(pruned, loaders, folder / "pruned.onnx", parity_samples=4).path
    pruned8 = mcp.quantize(copy.deepcopy(pruned), loaders, method="ptq_int8", calib_batches=8,
                           out_dir=folder / "pq", track=False, progress=False)
    files["pruned 50% ptq_int8"] = Path(pruned8.onnx_path)
    peer = nncf_int8(files["float32"], folder / "nncf.xml", loaders[0], 8)
    if peer:
        files["NNCF INT8 (peer)"] = peer
    rows = fresh_timing(pairs(files), shape, args)
    return {"model": name, "shape": list(shape), "rows": rows}


def mnist_seed(seed: int, args, splits, tmp: Path) -> dict:
    loaders = make_loaders(splits, 64, 0, seed)
    train, _, test = loaders
    torch.manual_seed(seed)
    started = time.perf_counter()
    baseline = peer_tp_ort.train(create_model("resnet20", 10, MNIST_SHAPE), train, args.epochs, 0.05, seed,
                                 f"ResNet-20 baseline, seed {seed}")
    folder = tmp / f"mnist{seed}"
    folder.mkdir()
    files: dict[str, Path] = {"float32": mcp.export(baseline, loaders, folder / "fp32.onnx").path}
    models = {"float32": baseline}
    for sparsity in (0.75, 0.875):
        pruned = mcp.prune(copy.deepcopy(baseline), loaders, sparsity=sparsity, granularity="structured",
                           scope="layerwise", epochs=args.finetune_epochs, lr=0.01, teacher=baseline, seed=seed,
                           device="cpu", track=False, progress=False).model.cpu().eval()
        label = f"pruned {sparsity:.1%} float32"
        files[label] = mcp.export(pruned, loaders, folder / f"pruned{sparsity}.onnx").path
        models[label] = pruned
    for label, model in list(models.items()):
        q = mcp.quantize(copy.deepcopy(model), loaders, method="ptq_int8", out_dir=folder / f"q{len(files)}",
                         track=False, progress=False)
        files[label.replace("float32", "ptq_int8")] = Path(q.onnx_path)
    for label in [k for k in files if k.endswith("float32")]:  # mcp.quantize's calibration: 16 training batches
        peer = nncf_int8(files[label], folder / f"nncf-{len(files)}.xml", train, 16)
        if peer:
            files[label.replace("float32", "NNCF INT8 (peer)")] = peer
    compute_s = time.perf_counter() - started
    items = pairs(files)
    accuracies = {(label, rt): accuracy(Path(path), rt, test) for label, path, rt in items}
    rows = fresh_timing(items, MNIST_SHAPE, args)
    for row in rows:
        row["accuracy"] = accuracies[(row["file"], row["runtime"])]
    return {"seed": seed, "rows": rows, "compute_s": compute_s, **best_of(rows)}


def search_seed(seed: int, args, tmp: Path) -> dict:
    """`mcp train` and `mcp search --budget-ms X --runtime auto` on MNIST at 1x32x32, in a
    tracking store of their own; the winner timed afresh in every runtime."""
    import os

    import mlflow

    from mcp import tracking
    from mcp.config import SearchConfig, TrainConfig
    from mcp.deploy.onnx import export_onnx
    from mcp.stages.search import run_search
    from mcp.stages.train import run_train

    store = tmp / f"search{seed}"
    store.mkdir()
    cwd = os.getcwd()
    os.chdir(store)  # the store's artifacts (./mlruns) stay in it
    try:
        mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
        data = dict(dataset="idx", data_dir=args.mnist_dir, input_shape="x".join(map(str, MNIST_SHAPE)), seed=seed,
                    val_fraction=0.15)
        started = time.perf_counter()
        base = run_train(TrainConfig(model="resnet20", epochs=args.epochs, **data), show_progress=False)
        base_uri = f"models:/{base.registered_name}/{base.registered_version}"
        base_path = export_onnx(tracking.load_model(base_uri), MNIST_SHAPE, store / "baseline.onnx")
        base_rows = fresh_timing(pairs({"float32 baseline": base_path}), MNIST_SHAPE, args)
        budget = min(r["p50_ms"] for r in base_rows) / args.speedup
        found = run_search(SearchConfig(model="resnet20", model_uri=base_uri, space="resnet_latency",
                                        budget_ratio=0.0, budget_ms=budget, runtime="auto", distill=True,
                                        trials=args.search_trials, final_epochs=args.finetune_epochs, export=False,
                                        benchmark=False, storage=f"sqlite:///{store / 'optuna.db'}", **data),
                           show_progress=False)
        compute_s = time.perf_counter() - started
        winner = found.winners[0]
        uri = f"models:/{winner['registered_name']}/{winner['version']}"
        tags = tracking.models.version_info(uri)[0]
        recorded = tags["runtime"]
        searched = tracking.runs.run_metrics(winner["run_id"])
        path, fmt = tracking.models.deployable_onnx(uri, store / "winner")
        splits = load_dataset("idx", args.mnist_dir, False, MNIST_SHAPE, 0, 0.15, "auto")
        test = make_loaders(splits, 64, 0, seed)[2]
        rows = fresh_timing(pairs({"float32 baseline": base_path, "search winner": path}), MNIST_SHAPE, args)
        for row in rows:
            row["accuracy"] = accuracy(Path(base_path if row["file"] == "float32 baseline" else path),
                                       row["runtime"], test)
    finally:
        os.chdir(cwd)
    mine = {r["runtime"]: r for r in rows if r["file"] == "search winner"}
    base_ref = next(r for r in rows if r["file"] == "float32 baseline" and r["runtime"] == "onnxruntime")
    return {"seed": seed, "budget_ms": budget, "speedup_asked": args.speedup, "recorded_runtime": recorded,
            "runtime_settings": tags.get("runtime_settings", ""), "deploy_format": fmt, "trial": winner["trial"],
            "dropped_blocks": tags.get("dropped_blocks", ""),
            "search_latency_ms": searched.get("latency_ms_p50_cpu"),
            "search_latency_per_runtime": {k[len("latency_ms_p50_cpu_"):]: v for k, v in searched.items()
                                           if k.startswith("latency_ms_p50_cpu_") and "baseline" not in k
                                           and "parent" not in k},
            "retimed_ms": mine[recorded]["p50_ms"], "meets_budget": mine[recorded]["p50_ms"] <= budget,
            "fastest_retimed": min(mine, key=lambda rt: mine[rt]["p50_ms"]),
            "winner_accuracy": mine[recorded]["accuracy"], "baseline_accuracy": base_ref["accuracy"],
            "rows": rows, "compute_s": compute_s}


def layers_part(tmp: Path) -> list[dict]:
    from mcp.deploy import kernel_speed
    from mcp.deploy.onnx import export_onnx

    out = []
    for name, model, shape in (("resnet18", zoo_model("resnet18"), (3, 224, 224)),
                               ("resnet20", create_model("resnet20", 10, MNIST_SHAPE), MNIST_SHAPE)):
        path = export_onnx(model.eval(), shape, tmp / f"{name}.onnx")
        for rt in runtimes.available():
            speeds = kernel_speed.layer_speeds(path, cache=tmp / "kernel_speed.json", runtime=rt)
            out.append({"model": name, "shape": list(shape), "runtime": rt,
                        "int8_faster": [s.int8_faster for s in speeds],
                        "fp32_ms": [s.fp32_ms for s in speeds], "int8_ms": [s.int8_ms for s in speeds]})
    return out


def layers_table(rows: list[dict]) -> str:
    lines = ["| model | runtime | INT8 faster in | layers in graph order (I: INT8 at least 10% faster, .: not) |",
             "|---|---|---|---|"]
    for r in rows:
        marks = "".join("I" if f else "." for f in r["int8_faster"])
        lines.append(f"| {r['model']} | {r['runtime']} | {sum(r['int8_faster'])} of {len(marks)} | `{marks}` |")
    return "\n".join(lines)


def search_table(seeds: list[dict]) -> str:
    lines = ["| seed | budget X (ms) | runtime recorded | its p50 as the search logged it (ms) | winner p50 there, "
             "retimed (ms) | meets X | fastest retimed | winner accuracy % | baseline accuracy % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        lines.append(f"| {s['seed']} | {s['budget_ms']:.4f} | {s['recorded_runtime']} | {s['search_latency_ms']:.4f} "
                     f"| {s['retimed_ms']:.4f} | "
                     f"{'yes' if s['meets_budget'] else 'NO'} | {s['fastest_retimed']} | "
                     f"{100 * s['winner_accuracy']:.2f} | {100 * s['baseline_accuracy']:.2f} |")
    return "\n".join(lines)


def _fastest(rows):
    return min(rows, key=lambda r: r["p50_ms"]) if rows else None


def best_of(rows: list[dict]) -> dict:
    """Per runtime the fastest row within 1 point of the float32 file's ONNX Runtime accuracy
    (peer files apart), and best against best."""
    ref = next(r["accuracy"] for r in rows if r["file"] == "float32" and r["runtime"] == "onnxruntime")
    ok = [r for r in rows if r["accuracy"] >= ref - WITHIN_POINTS / 100]
    mine = [r for r in ok if "peer" not in r["file"]]
    per_runtime = {rt: _fastest([r for r in mine if r["runtime"] == rt]) for rt in {r["runtime"] for r in rows}}
    best, ort_best = _fastest(mine), per_runtime.get("onnxruntime")
    peer = _fastest([r for r in rows if "peer" in r["file"] and r["accuracy"] >= ref - WITHIN_POINTS / 100])
    return {"reference_accuracy": ref, "best": best, "best_per_runtime": per_runtime,
            "best_vs_onnxruntime_best": ort_best["p50_ms"] / best["p50_ms"] if best and ort_best else None,
            "peer_best": peer, "best_vs_peer": peer["p50_ms"] / best["p50_ms"] if peer and best else None}


def _spread(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{statistics.mean(values):.2f}x" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def zoo_table(parts: list[dict]) -> str:
    names = [rt for rt in ("onnxruntime", "openvino", "openvino-bf16") if any(r["runtime"] == rt for p in parts
                                                                               for r in p["rows"])]
    lines = ["| model | file | " + " | ".join(f"{n} p50 (ms)" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for part in parts:
        for label in dict.fromkeys(r["file"] for r in part["rows"]):
            cells = []
            for rt in names:
                row = next((r for r in part["rows"] if r["file"] == label and r["runtime"] == rt), None)
                cells.append(f"{row['p50_ms']:.2f} (±{row['spread_pct']:.0f}%)" if row else "")
            lines.append(f"| {part['model']} | {label} | " + " | ".join(cells) + " |")
        fastest = _fastest(part["rows"])
        ort = _fastest([r for r in part["rows"] if r["runtime"] == "onnxruntime"])
        lines.append(f"| {part['model']} | **fastest** | {fastest['file']} on {fastest['runtime']}: "
                     f"{ort['p50_ms'] / fastest['p50_ms']:.2f}x ONNX Runtime's fastest ({ort['file']}) |"
                     + " |" * (len(names) - 1))
    return "\n".join(lines)


def mnist_table(seeds: list[dict]) -> str:
    lines = ["| seed | float32 (ORT) | fastest within 1 point, ONNX Runtime | fastest within 1 point, any runtime | "
             "best vs ORT best | NNCF INT8 (peer), fastest within 1 point | mcp vs peer |", "|---|---|---|---|---|---|---|"]

    def cell(row):
        return f"{row['file']} on {row['runtime']}: {row['p50_ms']:.3f} ms, {row['accuracy']:.2%}" if row else "none"

    for s in seeds:
        lines.append(f"| {s['seed']} | {s['reference_accuracy']:.2%} | {cell(s['best_per_runtime'].get('onnxruntime'))}"
                     f" | {cell(s['best'])} | {s['best_vs_onnxruntime_best']:.2f}x | {cell(s['peer_best'])} | "
                     + (f"{s['best_vs_peer']:.2f}x" if s["best_vs_peer"] else "n/a") + " |")
    lines.append(f"| mean ± sd | | | | {_spread([s['best_vs_onnxruntime_best'] for s in seeds])} | | "
                 f"{_spread([s['best_vs_peer'] for s in seeds])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("zoo", "mnist", "search", "layers", "all"), default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15, help="baseline training epochs (mnist)")
    parser.add_argument("--finetune-epochs", type=int, default=8, help="fine-tuning epochs after pruning (mnist)")
    parser.add_argument("--speedup", type=float, default=3.0, help="search: X = the baseline's fastest p50 / this")
    parser.add_argument("--search-trials", type=int, default=8, help="search: trials of the study")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.5, help="timing per (file, runtime) and round")
    parser.add_argument("--mnist-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                                   "mnist-t10k"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "runtimes.json"))
    parser.add_argument("--from-json", action="store_true", help="print the tables of the saved results")
    parser.add_argument("--time-pairs", help=argparse.SUPPRESS)  # the fresh timing process
    args = parser.parse_args()
    if args.time_pairs:
        spec = json.loads(args.time_pairs)
        print(json.dumps(time_pairs([tuple(i) for i in spec["items"]], spec["shape"], spec["rounds"],
                                    spec["seconds"])))
        return
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.exists() else {}
    if not args.from_json:
        warnings.filterwarnings("ignore")
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            if args.part in ("zoo", "all"):
                saved["zoo"] = [zoo_part(name, args, Path(tmp)) for name in ZOO]
            if args.part in ("mnist", "all"):
                splits = load_dataset("idx", args.mnist_dir, False, MNIST_SHAPE, 0, 0.15, "auto")
                saved["mnist"] = [mnist_seed(seed, args, splits, Path(tmp)) for seed in args.seeds]
            if args.part in ("layers", "all"):
                saved["layers"] = layers_part(Path(tmp))
            if args.part in ("search", "all"):
                saved["search"] = [search_seed(seed, args, Path(tmp)) for seed in args.seeds]
        saved[f"settings_{args.part}"] = {k: v for k, v in vars(args).items() if k not in ("out", "from_json",
                                                                                           "time_pairs")}
        saved[f"wall_s_{args.part}"] = time.perf_counter() - started
        saved["versions"] = {**runtimes.versions(), "torch": torch.__version__}
        out.write_text(json.dumps(saved, indent=1))
    if saved.get("zoo"):
        print(zoo_table(saved["zoo"]))
    if saved.get("mnist"):
        print()
        print(mnist_table(saved["mnist"]))
    if saved.get("layers"):
        print()
        print(layers_table(saved["layers"]))
    if saved.get("search"):
        print()
        print(search_table(saved["search"]))


if __name__ == "__main__":
    main()
