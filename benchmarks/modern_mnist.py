"""A vision transformer and a modern CNN on real images, pruned to half their parameters:
mcp against Torch-Pruning used directly (its own ViT recipe), with the deployed CPU speedup.

    python benchmarks/modern_mnist.py                       # vit and convnext, seeds 0 1 2
    python benchmarks/modern_mnist.py --models vit --seeds 0 --epochs 2 --finetune-epochs 1   # a quick look
    python benchmarks/modern_mnist.py --from-json            # the table of the saved results

Data: MNIST's real test set (``--mnist-dir``, ../shared/data/mnist-t10k) read as IDX
files at 1x32x32, mcp's fixed stratified split 6,800 train / 1,200 validation / 2,000
test (one test image = 0.05 points). Models (timm, untrained, 10 classes, one input channel):

- ``vit``: a ViT of 6 blocks, width 64, 4 heads of 16, MLP ratio 2, patches of 4x4 (65 tokens);
- ``convnext``: timm's ``convnext_atto`` (layer scale, LayerNorm, depthwise 7x7).

Per seed and model: one baseline trained from scratch (AdamW, cosine schedule; the same
baseline for both tools), then

- **mcp**: ``mcp.prune(baseline, structured, layer-wise, sparsity=r)`` with its default
  criterion (magnitude) and schedule (one shot), fine-tuned with the baseline as teacher
  (distillation, mcp's default T=4, alpha=0.9);
- **Torch-Pruning**: its timm ViT recipe (``examples/transformers/prune_timm_vit.py``):
  ``BasePruner`` with ``GroupTaylorImportance`` (gradients of 10 batches), uniform
  ratios, heads kept, head width pruned, the head layer ignored, then ``num_heads`` and
  ``head_dim`` set by hand; fine-tuned with plain cross-entropy, the same optimizer,
  schedule and epochs.

Each tool's channel ratio ``r`` is the one (found by bisection on a copy) that leaves half
the baseline's parameters or fewer. Accuracy is ONNX Runtime's on the 2,000 test images;
mcp's export checks parity. Once all training is done, the three files of a seed
(baseline, mcp, peer) are timed side by side in a fresh process (ONNX Runtime only),
batch 1, one thread, rotated rounds (:func:`peer_tp_ort.time_files`). ``--retime`` times
the saved results' architectures again (untrained, same shapes: a float32 file's latency
does not depend on its weights). Results go to ``benchmarks/results/modern_mnist.json``.
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

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_tp_ort  # the benchmarks' own helpers (after the path)

import mcp
from mcp.data import load_dataset, make_loaders
from mcp.models.foreign import TIMM_FACTORY, build_from_factory
from mcp.pruning import PruneSpec
from mcp.pruning.engine import prune as prune_once

SHAPE = (1, 32, 32)
MODELS = {
    "vit": {"model_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 6, "embed_dim": 64,
            "num_heads": 4, "mlp_ratio": 2.0},
    "convnext": {"model_name": "convnext_atto"},
}
SETTINGS = {"vit": {"lr": 1e-3, "weight_decay": 0.05}, "convnext": {"lr": 2e-3, "weight_decay": 0.05}}


def build(kind: str) -> nn.Module:
    kwargs = {**MODELS[kind], "pretrained": False, "num_classes": 10, "in_chans": 1}
    model = build_from_factory(TIMM_FACTORY, kwargs)
    model.mcp_recipe = {"name": kind, "factory": TIMM_FACTORY, "kwargs": kwargs, "num_classes": 10,
                        "input_shape": list(SHAPE)}
    return model


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fit(model: nn.Module, loader, epochs: int, lr: float, weight_decay: float, seed: int, desc: str) -> nn.Module:
    """A plain loop: AdamW, cosine schedule, cross-entropy (the baseline, and the peer's fine-tuning)."""
    return peer_tp_ort.train(model, loader, epochs, lr, seed, desc, adamw_decay=weight_decay)


def _attention(model: nn.Module) -> dict:
    from timm.models.vision_transformer import Attention

    return {m.qkv: m for m in model.modules() if isinstance(m, Attention)}


def tp_prune(model: nn.Module, ratio: float, loader=None, batches: int = 10) -> nn.Module:
    """The peer: Torch-Pruning's timm ViT recipe, as a user writes it (Taylor importance from
    ``batches`` batches when a loader is given, else magnitude: the bisection only counts)."""
    import torch_pruning as tp

    example = torch.zeros(1, *SHAPE)
    attention = _attention(model)
    imp = tp.importance.GroupTaylorImportance() if loader is not None else tp.importance.GroupMagnitudeImportance(p=1)
    pruner = tp.pruner.BasePruner(model, example, importance=imp, pruning_ratio=ratio, global_pruning=False,
                                  ignored_layers=[model.get_classifier()],
                                  num_heads={qkv: m.num_heads for qkv, m in attention.items()},
                                  prune_num_heads=False, prune_head_dims=True, round_to=1)
    if loader is not None:
        model.zero_grad()
        for k, (x, y) in enumerate(loader):
            if k >= batches:
                break
            nn.functional.cross_entropy(model(x), y).backward()
    for group in pruner.step(interactive=True):
        group.prune()
    for qkv, m in attention.items():  # the recipe's last step; this timm also keeps attn_dim
        m.num_heads = pruner.num_heads[qkv]
        m.head_dim = qkv.out_features // (3 * m.num_heads)
        if hasattr(m, "attn_dim"):
            m.attn_dim = m.num_heads * m.head_dim
    model.zero_grad()
    return model.eval()


def mcp_prune_once(model: nn.Module, ratio: float) -> nn.Module:
    prune_once(model, PruneSpec(granularity="structured", scope="layerwise", sparsity=ratio), SHAPE)
    return model


def ratio_for_half(baseline: nn.Module, cut, share: float = 0.5) -> float:
    """The smallest channel ratio (to 0.005) whose pruned copy keeps at most ``share`` of the parameters."""
    whole = params(baseline)
    lo, hi = 0.0, 0.9
    while hi - lo > 0.005:
        mid = (lo + hi) / 2
        if params(cut(copy.deepcopy(baseline), mid)) <= share * whole:
            hi = mid
        else:
            lo = mid
    return round(hi, 4)


def one_seed(kind: str, seed: int, args, loaders, tmp: Path) -> dict:
    train, _, test = loaders
    settings = SETTINGS[kind]
    torch.manual_seed(seed)
    baseline = fit(build(kind), train, args.epochs, settings["lr"], settings["weight_decay"], seed,
                   f"{kind} baseline, seed {seed}")
    row: dict = {"model": kind, "seed": seed, "params": params(baseline)}
    started = time.perf_counter()
    r_mcp = ratio_for_half(baseline, mcp_prune_once)
    pruned = mcp.prune(copy.deepcopy(baseline), loaders, sparsity=r_mcp, granularity="structured", scope="layerwise",
                       epochs=args.finetune_epochs, optimizer="adamw", lr=settings["lr"] / 2,
                       weight_decay=settings["weight_decay"], teacher=baseline, seed=seed, device="cpu",
                       track=False, progress=False)
    row["mcp_s"] = time.perf_counter() - started
    started = time.perf_counter()
    r_tp = ratio_for_half(baseline, tp_prune)
    peer = tp_prune(copy.deepcopy(baseline).train(), r_tp, train)
    peer = fit(peer, train, args.finetune_epochs, settings["lr"] / 2, settings["weight_decay"], seed,
               f"{kind} Torch-Pruning fine-tune, seed {seed}")
    row["peer_s"] = time.perf_counter() - started
    files = {"baseline": mcp.export(baseline, loaders, tmp / f"{kind}{seed}-base.onnx").path,
             "mcp": mcp.export(pruned.model.cpu().eval(), loaders, tmp / f"{kind}{seed}-mcp.onnx").path,
             "peer": peer_tp_ort.export(peer, SHAPE, tmp / f"{kind}{seed}-peer.onnx")}
    for tool, path in files.items():
        row[f"{tool}_accuracy"] = peer_tp_ort.ort_accuracy(Path(path), test)
    row.update(mcp_ratio=r_mcp, peer_ratio=r_tp, mcp_params=params(pruned.model), peer_params=params(peer))
    for tool in ("mcp", "peer"):
        row[f"{tool}_params_removed"] = 1 - row[f"{tool}_params"] / row["params"]
        row[f"{tool}_drop_points"] = 100 * (row["baseline_accuracy"] - row[f"{tool}_accuracy"])
    row["files"] = {tool: str(path) for tool, path in files.items()}  # timed once all training is done
    return row


def fresh_times(paths, rounds: int, seconds: float) -> dict[str, dict]:
    """:func:`peer_tp_ort.time_files` of ``paths`` (1x32x32 inputs) in a process of its own:
    ONNX Runtime only, no training threads of this process in the way."""
    out = subprocess.run([sys.executable, __file__, "--time-files", *map(str, paths), "--rounds", str(rounds),
                          "--seconds", str(seconds)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_in_fresh_process(row: dict, args) -> dict:
    """Time a row's three files side by side in a fresh process (:func:`fresh_times`), and
    put the figures in the row."""
    files = row.pop("files")
    times = fresh_times(files.values(), args.rounds, args.seconds)
    for tool, path in files.items():
        row[f"{tool}_p50_ms"] = times[path]["p50_ms"]
        row[f"{tool}_spread_pct"] = times[path]["spread_pct"]
    for tool in ("mcp", "peer"):
        row[f"{tool}_speedup"] = row["baseline_p50_ms"] / row[f"{tool}_p50_ms"]
    return row


def retime(rows: list[dict], args, tmp: Path) -> None:
    """Time the rows' architectures again, untrained (a float32 file's latency depends on its
    shapes, not its weights): each model pruned at the recorded ratio by each tool, its
    parameter count checked against the recorded one, the three files timed in a fresh process."""
    for row in rows:
        torch.manual_seed(row["seed"])
        baseline = build(row["model"]).eval()
        ours = mcp_prune_once(copy.deepcopy(baseline), row["mcp_ratio"])
        theirs = tp_prune(copy.deepcopy(baseline), row["peer_ratio"])
        assert (params(ours), params(theirs)) == (row["mcp_params"], row["peer_params"]), row["model"]
        name = f"{row['model']}{row['seed']}"
        row["files"] = {tool: str(peer_tp_ort.export(m, SHAPE, tmp / f"{name}-{tool}.onnx"))
                        for tool, m in (("baseline", baseline), ("mcp", ours), ("peer", theirs))}
        time_in_fresh_process(row, args)
        print(json.dumps({k: v for k, v in row.items() if "p50" in k or "speedup" in k}), flush=True)


def _spread(values) -> str:
    values = list(values)
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def table(rows: list[dict]) -> str:
    lines = ["| model | seeds | baseline accuracy % | tool | channel ratio | parameters removed | accuracy % | "
             "drop (points) | worst drop | CPU p50 ms | speedup |", "|" + "---|" * 11]
    for kind in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == kind]
        base = _spread(100 * r["baseline_accuracy"] for r in mine)
        for tool, label in (("mcp", "mcp (distilled)"), ("peer", "Torch-Pruning recipe")):
            lines.append(
                f"| {kind} ({mine[0]['params']:,} params) | {len(mine)} | {base} | {label} | "
                f"{_spread(r[f'{tool}_ratio'] for r in mine)} | "
                f"{100 * statistics.mean(r[f'{tool}_params_removed'] for r in mine):.1f}% | "
                f"{_spread(100 * r[f'{tool}_accuracy'] for r in mine)} | "
                f"{_spread(r[f'{tool}_drop_points'] for r in mine)} | {max(r[f'{tool}_drop_points'] for r in mine):.2f} | "
                f"{_spread(r[f'{tool}_p50_ms'] for r in mine)} (baseline {_spread(r['baseline_p50_ms'] for r in mine)}) "
                f"| {_spread(r[f'{tool}_speedup'] for r in mine)}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit,convnext")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20, help="baseline training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=8, help="fine-tuning epochs after pruning (both tools)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per file and round")
    parser.add_argument("--mnist-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                                   "mnist-t10k"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "modern_mnist.json"))
    parser.add_argument("--from-json", action="store_true", help="print the table of the saved results")
    parser.add_argument("--retime", action="store_true",
                        help="time the saved results' architectures again (untrained, same shapes) and save")
    parser.add_argument("--time-files", nargs="+", help=argparse.SUPPRESS)  # the fresh timing process
    args = parser.parse_args()
    if args.time_files:
        print(json.dumps(peer_tp_ort.time_files(args.time_files, SHAPE, rounds=args.rounds, seconds=args.seconds)))
        return
    if args.from_json or args.retime:
        saved = json.loads(Path(args.out).read_text())
        if args.retime:
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            with tempfile.TemporaryDirectory() as tmp:
                retime(saved["rows"], args, Path(tmp))
            saved["timing"] = (f"retimed after training: the same shapes, untrained, {args.rounds} rounds of "
                               f"{args.seconds} s per file, in a fresh process")
            Path(args.out).write_text(json.dumps(saved, indent=1))
        print(table(saved["rows"]))
        return
    bad = [m for m in args.models.split(",") if m not in MODELS]
    if bad:
        parser.error(f"--models: {bad[0]!r} is not one of: {', '.join(MODELS)}")
    warnings.filterwarnings("ignore", message="Unwrapped parameters detected")  # the peer's: one per pruner
    splits = load_dataset("idx", args.mnist_dir, False, SHAPE, 0, 0.15, "auto")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models.split(","):
            for seed in args.seeds:
                loaders = make_loaders(splits, 64, 0, seed)
                rows.append(one_seed(kind, seed, args, loaders, Path(tmp)))
        for row in rows:  # once all training is done
            print(json.dumps(time_in_fresh_process(row, args)), flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "from_json")}
    Path(args.out).write_text(json.dumps({"settings": settings, "split": {p: len(splits.parts[p]) for p in
                                                                         ("train", "val", "test")},
                                          "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
