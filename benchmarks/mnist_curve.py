"""The accuracy/size curve on MNIST's 10,000 real test images: the joint search against
uniform pruning with a uniform bit-width, the hand recipe and Deep Compression.

    python benchmarks/mnist_curve.py [--data-dir ../shared/data/mnist-t10k] [--seeds 3]
        [--budgets 0.01,0.02,0.05,0.1,0.2] [--trials 20] [--final-epochs 8]
        [--dc-sparsities 0.94,0.965,0.97] [--dc-prune-epochs N] [--dc-bits B]
        [--out mnist_curve.json] [--plot mnist_curve.png]

The data is `--dataset idx` on the MNIST test files: a fixed stratified split of 6,800
train, 1,200 validation and 2,000 test images (`--val-fraction 0.15`). Per seed:

- baseline: `mcp train` with its defaults (LeNet-300-100, 60 epochs);
- search: for every budget (a share of the baseline's float32 bytes), one `mcp search`
  study (max-accuracy, `--trials`, the lenet space); the winner is chosen on the
  validation split only and rebuilt with `--final-epochs` of fine-tuning;
- uniform: for every bit-width 2-8, the least single prune ratio in [0, 0.999] (in every
  layer, not held to the space's ranges) that fits the same budget with the search's
  margin, fine-tuned the same way (QAT for `--final-epochs` at the geometric mean of the
  space's LR range) and dropped if that leaves it over the budget; the bit-width with the
  best validation accuracy is kept;
- hand recipe: `mcp prune` 90% (gradual, 30 epochs) then `mcp quantize --method qat
  --bits 4` (8 epochs);
- Deep Compression: `mcp quantize --method deep_compression` with its defaults (or
  `--dc-prune-epochs`, `--dc-bits`), at each of `--dc-sparsities` (its default is 96.5%),
  with the size after each stage.

`--budgets ""` runs no search (Deep Compression alone). With `--grid-search`, a budget that
uniform grids cannot reach (float32 biases and all) is recorded as refused.

Everything is scored on the test split; sizes are encoded bytes (`size_bytes_compressed`).
Where every seed ran a budget's search and a Deep Compression setting (from the same
baseline), the report sets them side by side, seed by seed, with the mean difference and
its standard error.
Results go to `--out` after every step (JSON), so an interrupted run keeps what it did;
`--report` prints the tables and draws the plot from that file without training. The
JSON and the plot are logged as artifacts of a run "mnist-curve" in the experiment
"benchmark-mnist-curve", beside the runs that made them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

DATA = dict(dataset="idx", val_fraction=0.15)
MODEL_NAMES = {"lenet300_100": "LeNet-300-100", "lenet5": "LeNet-5", "lenet5_caffe": "LeNet-5 (Caffe)"}
# what Han et al. (Deep Compression, table 2 and 3) report for the model, on the full MNIST
HAN = {"lenet300_100": "Han et al.'s LeNet-300-100 (full MNIST: 40x, error 1.64% -> 1.58%)",
       "lenet5_caffe": "Han et al.'s LeNet-5 (full MNIST: 39x, error 0.80% -> 0.74%)"}


def _uniform(base, splits, loaders, space, budget, epochs, lr, seed, device):
    """Best (by validation accuracy) single ratio + single bit-width within the budget, held
    to it as the search's trials are: sized with the search's margin under the budget, and
    dropped when fine-tuning leaves it over."""
    from mcp.data.calibration import calibration_batches
    from mcp.tuner.space import uniform
    from mcp.tuner.study import FILL_SLACK
    from mcp.tuner.trial import finetune_quantized, prune_candidate, ratio_at_budget
    from mcp.training import evaluate

    shape = splits.input_shape
    calib = calibration_batches(loaders[0], 8)
    best = None
    for bits in range(2, 9):
        ratio = ratio_at_budget(base, shape, lambda r, b=bits: uniform(space, r, b, epochs, lr), 0.0, 0.999,
                                budget * (1 - FILL_SLACK), calib, device, seed)
        if ratio is None:
            continue
        tc = uniform(space, ratio, bits, epochs, lr)
        tuned = finetune_quantized(prune_candidate(base, shape, tc, calib, device), shape, tc, loaders, device, seed)
        if len(tuned.payload) > budget:
            continue  # over the budget after fine-tuning: infeasible, as a search trial would be
        val = evaluate(tuned.model, loaders[1], device)["accuracy"]
        if best is None or val > best["val"]:
            best = {"bits": bits, "ratio": ratio, "val": val, "size": len(tuned.payload),
                    "test": evaluate(tuned.model, loaders[2], device)["accuracy"]}
    return best


def _save(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=1))


def run(args) -> dict:
    arch = args.model
    import mlflow

    from mcp.config import PruneConfig, QuantizeConfig, SearchConfig, TrainConfig
    from mcp.errors import ConfigError
    from mcp.tuner.study import load_space
    from mcp.stages.common import setup_data
    from mcp.stages.prune import run_prune
    from mcp.stages.quantize import run_quantize
    from mcp.stages.search import run_search
    from mcp.stages.train import run_train

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"seeds": {}}
    results["settings"] = {k: v for k, v in vars(args).items() if k not in ("report",)}
    import torch

    results["settings"]["threads"] = torch.get_num_threads()  # the sums' order, and so the figures, depend on it
    mlflow.set_experiment("benchmark-mnist-curve")
    data = dict(DATA, data_dir=args.data_dir)
    budgets = [float(b) for b in args.budgets.split(",") if b]
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seed_start, args.seed_start + args.seeds):
            r = results["seeds"].setdefault(str(seed), {})
            t0 = time.perf_counter()
            base = run_train(TrainConfig(model=arch, seed=seed, register=False, checkpoint_dir=tmp, **data),
                             show_progress=False)
            r["baseline"] = {"test": base.metrics["test_accuracy"], "fp32": base.metrics["size_bytes_fp32"],
                             "seconds": time.perf_counter() - t0}
            _save(results, out)
            print(f"seed {seed}: baseline {100 * r['baseline']['test']:.2f}%", flush=True)

            r.setdefault("budgets", {})
            probe = SearchConfig(model=arch, seed=seed, space=args.space, **data)
            device, splits, loaders = setup_data(probe)
            space, _ = load_space(probe, base.model, splits.input_shape)
            for ratio in budgets:
                if str(ratio) in r["budgets"]:
                    continue  # done by an earlier, interrupted invocation with the same --out
                t1 = time.perf_counter()
                cfg = SearchConfig(model=arch, model_uri=base.model_uri, seed=seed, trials=args.trials,
                                   budget_ratio=ratio, final_epochs=args.final_epochs, space=args.space,
                                   final_prune_epochs=args.final_prune_epochs, finalists=args.finalists,
                                   storage=f"sqlite:///{tmp}/optuna.db", study_name=f"s{seed}-b{ratio}",
                                   register=False, **data)
                found = run_search(cfg, show_progress=False)
                w = found.winners[0]
                row = {"budget": found.budget_bytes, "search": w["test_accuracy"], "search_val": w["val_accuracy"],
                       "search_size": w["size_bytes_compressed"], "search_codebooks": _codebooks(w),
                       "uniform_warning": getattr(found, "uniform_warning", "")}
                if args.grid_search:  # the same study on uniform grids only (what ONNX Runtime runs as INT8)
                    try:
                        grid = run_search(cfg.replace(deployable="int8", study_name=f"s{seed}-b{ratio}-int8"),
                                          show_progress=False).winners[0]
                    except ConfigError as e:  # a budget below what grids alone can reach: refused before any run
                        row.update(grid_refused=str(e))
                    else:
                        row.update(grid=grid["test_accuracy"], grid_val=grid["val_accuracy"],
                                   grid_size=grid["size_bytes_compressed"])
                uni = _uniform(base.model, splits, loaders, space, found.budget_bytes, args.final_epochs,
                               (space.lr[0] * space.lr[1]) ** 0.5, seed, device) if args.uniform else None
                row.update({"uniform": uni and uni["test"], "uniform_val": uni and uni["val"],
                            "uniform_size": uni and uni["size"], "uniform_bits": uni and uni["bits"],
                            "uniform_ratio": uni and uni["ratio"], "uniform_ran": args.uniform,
                            "seconds": time.perf_counter() - t1})
                r["budgets"][str(ratio)] = row
                _save(results, out)
                u = f"{100 * uni['test']:.2f}%" if uni else "none fits" if args.uniform else "not run"
                g = (f", grid search {100 * row['grid']:.2f}%" if "grid" in row else
                     ", grid search refused" if "grid_refused" in row else "")
                print(f"seed {seed}: budget {ratio:.1%}: search {100 * w['test_accuracy']:.2f}%{g}, uniform {u} "
                      f"({time.perf_counter() - t1:.0f} s)", flush=True)
            if args.hand and not r.get("hand"):
                pruned = run_prune(PruneConfig(model=arch, model_uri=base.model_uri, sparsity=0.9,
                                               schedule="gradual", epochs=30, seed=seed, **data), show_progress=False)
                pruned_uri = f"models:/{pruned.registered_name}/{pruned.registered_version}"
                hand = run_quantize(QuantizeConfig(model=arch, model_uri=pruned_uri, method="qat", bits=4,
                                                   epochs=8, seed=seed, register=False, **data), show_progress=False)
                r["hand"] = {"test": hand.metrics["test_accuracy"], "size": hand.metrics["size_bytes_compressed"]}
                _save(results, out)
                print(f"seed {seed}: hand recipe {100 * r['hand']['test']:.2f}% {int(r['hand']['size']):,} B",
                      flush=True)

            r.setdefault("dc", {})
            for sparsity in [float(s) for s in args.dc_sparsities.split(",") if s]:
                for teacher in ("", "parent") if args.dc_distill else ("",):
                    extra = {k: v for k, v in (("prune_epochs", args.dc_prune_epochs), ("bits", args.dc_bits)) if v}
                    key = _dc_key(sparsity, extra, teacher)
                    if key in r["dc"]:
                        continue
                    dc = run_quantize(QuantizeConfig(model=arch, model_uri=base.model_uri, method="deep_compression",
                                                     sparsity=sparsity, distill_from=teacher, seed=seed,
                                                     register=False, **extra, **data), show_progress=False)
                    r["dc"][key] = {"test": dc.metrics["test_accuracy"], "pruned_test":
                                    dc.metrics.get("pruned_test_accuracy"), "size": dc.stages["huffman"],
                                    "stages": dc.stages, "bits": dc.tags.get("mcp.bits", "")}
                    _save(results, out)
                    print(f"seed {seed}: DC {key} {100 * dc.metrics['test_accuracy']:.2f}% "
                          f"{dc.stages['huffman']:,} B", flush=True)

    return results


def _dc_key(sparsity: float, options: dict, teacher: str) -> str:
    """A Deep Compression row's key: its sparsity, then what differs from the recipe's defaults
    (e.g. "0.97 160 prune_epochs 3 bits distilled")."""
    return " ".join([str(sparsity)] + [f"{v} {k}" for k, v in options.items()] + (["distilled"] if teacher else []))


def _codebooks(winner: dict) -> str:
    """The layers a search winner encodes with k-means codebooks (its run's trial params)."""
    from mlflow import MlflowClient

    params = MlflowClient().get_run(winner["run_id"]).data.params
    return ",".join(k.split(".", 1)[1] for k, v in sorted(params.items())
                    if k.startswith("encoding.") and v == "codebook")


def _ms(values: list[float]) -> str:
    values = [100 * v for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def report(results: dict, plot: str) -> None:
    import torch

    labelled = {k: r for k, r in sorted(results["seeds"].items(), key=lambda kv: int(kv[0])) if "baseline" in r}
    seeds = list(labelled.values())
    for r in seeds:  # a run without Deep Compression (--dc-sparsities "") or a budget (--budgets "")
        r.setdefault("dc", {})
        r.setdefault("budgets", {})
    if not seeds:
        raise SystemExit("no finished seed in the results file")
    fp32 = seeds[0]["baseline"]["fp32"]
    s = results["settings"]
    name = MODEL_NAMES.get(s.get("model", ""), s.get("model", ""))
    print(f"\n{name} on the MNIST test files (idx: 6,800 train / 1,200 val / 2,000 test), {len(seeds)} seeds, "
          f"{s['trials']} trials, {s['final_epochs']} final epochs, torch {torch.__version__}, "
          + (f"{s['threads']} CPU threads; " if "threads" in s else "") + "mean ± sd of test accuracy (%)\n")
    print(f"baseline (float32, {int(fp32):,} B): {_ms([r['baseline']['test'] for r in seeds])}%\n")
    grid = any("grid" in x for r in seeds for x in r["budgets"].values())
    budgets = sorted(seeds[0]["budgets"], key=float)
    print("| budget (of float32) | budget (B) | search | its size (B) | drop vs baseline (points, per seed) "
          + ("| grid-only search (--deployable int8) | its size (B) " if grid else "")
          + "| uniform (best single ratio + bits) | its size (B) | search - uniform (points, per seed) |"
          if budgets else "")
    print("|---|---|---|---|---|" + ("---|---|" if grid else "") + "---|---|---|" if budgets else "")
    for b in budgets:
        rows = [r["budgets"][b] for r in seeds if b in r["budgets"]]
        drops = ", ".join(f"{100 * (r['baseline']['test'] - r['budgets'][b]['search']):+.2f}" for r in seeds
                          if b in r["budgets"])
        ok = [x for x in rows if x.get("uniform") is not None]
        gaps = [100 * (x["search"] - x["uniform"]) for x in ok]
        picks = ", ".join(f"{x['uniform_bits']}b@{x['uniform_ratio']:.1%}" for x in ok)
        uni = (f"{_ms([x['uniform'] for x in ok])} ({picks})" if ok else
               "none fits" if any(x.get("uniform_ran", True) for x in rows) else "not run")
        grids = [x for x in rows if "grid" in x]
        grid_cells = (f"| {_ms([x['grid'] for x in grids])} | {int(statistics.mean(x['grid_size'] for x in grids)):,} "
                      if grids else "| out of reach (refused) | " if any("grid_refused" in x for x in rows)
                      else "| | ") if grid else ""
        print(f"| {100 * float(b):g}% | {int(statistics.mean(x['budget'] for x in rows)):,} "
              f"| {_ms([x['search'] for x in rows])} | {int(statistics.mean(x['search_size'] for x in rows)):,} "
              f"| {drops} {grid_cells}| {uni} | {int(statistics.mean(x['uniform_size'] for x in ok)) if ok else 0:,} "
              + (f"| {statistics.mean(gaps):+.2f} ({', '.join(f'{g:+.2f}' for g in gaps)}) |" if gaps else "| - |"))
    hand = [r["hand"] for r in seeds if r.get("hand")]
    if hand:
        print(f"\nhand recipe (prune 90% gradual + QAT 4 bits): {_ms([h['test'] for h in hand])}% at "
              f"{int(statistics.mean(h['size'] for h in hand)):,} B "
              f"({fp32 / statistics.mean(h['size'] for h in hand):.0f}x)\n")
    han = HAN.get(s.get("model", "lenet300_100"))
    print("Deep Compression (`mcp quantize --method deep_compression --sparsity S`, defaults otherwise)"
          + (f", beside {han}" if han else "") + "\n")
    print("| sparsity | baseline | pruned | after k-means + Huffman | drop (points) | pruned (B) | + k-means (B) "
          "| + Huffman (B) | ratio pruned | ratio k-means | ratio Huffman |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for sp in sorted(seeds[0]["dc"], key=lambda k: (float(k.split()[0]), k)):
        if not all(sp in r["dc"] for r in seeds):
            continue
        d = [r["dc"][sp] for r in seeds]
        drops = [r["baseline"]["test"] - r["dc"][sp]["test"] for r in seeds]
        st = {k: statistics.mean(x["stages"][k] for x in d) for k in ("fp32", "pruned", "kmeans", "huffman")}
        options = sp[len(sp.split()[0]):].replace("_", " ").replace(" distilled", ", distilled")
        label = f"{float(sp.split()[0]):.1%}{options}"
        print(f"| {label} | {_ms([r['baseline']['test'] for r in seeds])} | {_ms([x['pruned_test'] for x in d])} "
              f"| {_ms([x['test'] for x in d])} | {_ms(drops)} (worst {100 * max(drops):.2f}) | {int(st['pruned']):,} | {int(st['kmeans']):,} "
              f"| {int(st['huffman']):,} | {st['fp32'] / st['pruned']:.1f}x | {st['fp32'] / st['kmeans']:.1f}x "
              f"| {st['fp32'] / st['huffman']:.1f}x |")
    _paired(labelled, budgets)
    if plot:
        _plot(seeds, budgets, plot, name)
        print(f"\nplot: {plot}")


def _paired(seeds: dict[str, dict], budgets: list[str], within: float = 0.005) -> None:
    """Each budget's search beside each Deep Compression setting run on the same seeds (the
    same baselines), seed by seed: the difference, its mean with the standard error of
    that mean, and on how many seeds each is within ``within`` of its baseline."""
    for b in budgets:
        for sp in sorted(next(iter(seeds.values()))["dc"], key=lambda k: (float(k.split()[0]), k)):
            if not all(b in r["budgets"] and sp in r["dc"] for r in seeds.values()):
                continue
            print(f"\nsearch at {100 * float(b):g}% against Deep Compression {sp}, seed by seed (test %)\n")
            print("| seed | baseline | search | its size (B) | Deep Compression | its size (B) | search - DC (points) |")
            print("|---|---|---|---|---|---|---|")
            diffs, ok = [], {"search": 0, "DC": 0}
            for seed, r in seeds.items():
                base, x, d = r["baseline"]["test"], r["budgets"][b], r["dc"][sp]
                diffs.append(100 * (x["search"] - d["test"]))
                ok["search"] += base - x["search"] <= within + 1e-9
                ok["DC"] += base - d["test"] <= within + 1e-9
                print(f"| {seed} | {100 * base:.2f} | {100 * x['search']:.2f} | {int(x['search_size']):,} "
                      f"| {100 * d['test']:.2f} | {int(d['size']):,} | {diffs[-1]:+.2f} |")
            se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
            print(f"\nsearch - DC: {statistics.mean(diffs):+.2f} ± {se:.2f} points (mean ± its standard error, "
                  f"{len(diffs)} seeds); within {100 * within:g} points of the baseline: the search on {ok['search']} "
                  f"of {len(diffs)} seeds, Deep Compression on {ok['DC']}")


def _plot(seeds: list[dict], budgets: list[str], path: str, name: str = "LeNet-300-100") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def line(points):  # [(size, accuracy) per seed] per x -> mean size, mean and sd of accuracy
        xs = [statistics.mean(p[0] for p in pts) for pts in points]
        ys = [100 * statistics.mean(p[1] for p in pts) for pts in points]
        es = [100 * statistics.stdev([p[1] for p in pts]) if len(pts) > 1 else 0.0 for pts in points]
        return xs, ys, es

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, size_key, label, style in (("search", "search_size", "joint search (winner on validation)", "o-"),
                                        ("grid", "grid_size", "joint search, uniform grids only", "v-."),
                                        ("uniform", "uniform_size", "uniform ratio + bit-width", "s--")):
        pts = [[(r["budgets"][b][size_key], r["budgets"][b][key]) for r in seeds
                if b in r["budgets"] and r["budgets"][b].get(key) is not None] for b in budgets]
        pts = [p for p in pts if p]
        if pts:
            ax.errorbar(*line(pts), fmt=style, capsize=3, label=label)
    variants: dict[str, list[str]] = {}  # Deep Compression: a line per setting other than the sparsity
    for key in seeds[0]["dc"]:
        if "distilled" not in key and all(key in r["dc"] for r in seeds):
            variants.setdefault(key[len(key.split()[0]):].replace("_", " ").strip(), []).append(key)
    for options, keys in variants.items():
        keys.sort(key=lambda k: float(k.split()[0]))
        span = "-".join(dict.fromkeys(f"{100 * float(k.split()[0]):g}" for k in (keys[0], keys[-1])))
        ax.errorbar(*line([[(r["dc"][sp]["size"], r["dc"][sp]["test"]) for r in seeds] for sp in keys]),
                    fmt="^:", capsize=3, label=f"Deep Compression ({span}% pruned{', ' + options if options else ''})")
    if all(r.get("hand") for r in seeds):
        ax.errorbar(*line([[(r["hand"]["size"], r["hand"]["test"]) for r in seeds]]), fmt="D", capsize=3,
                    label="hand recipe (90% + 4 bits)")
    base = statistics.mean(100 * r["baseline"]["test"] for r in seeds)
    ax.axhline(base, color="gray", lw=0.8, ls=":", label=f"float32 baseline ({base:.2f}%)")
    ax.set_xscale("log")
    ax.set_xlabel("compressed size (bytes, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{name} on MNIST (2,000 test images), {len(seeds)} seeds, mean ± sd")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"
                                                  / "mnist-t10k"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed-start", type=int, default=0, help="first seed (to share the seeds out between "
                                                                  "processes, each with its own --out)")
    parser.add_argument("--budgets", default="0.01,0.02,0.05,0.1,0.2")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--model", default="lenet300_100", help="lenet300_100, lenet5 or lenet5_caffe")
    parser.add_argument("--space", default="", help="the search space (default: the model's family space)")
    parser.add_argument("--final-epochs", type=int, default=8)
    parser.add_argument("--finalists", type=int, default=1,
                        help="trials rebuilt in full; the winner is the finalist best on validation")
    parser.add_argument("--final-prune-epochs", type=int, default=0,
                        help="a winner whose trial pruned gradually is pruned again over this many float32 epochs "
                             "(0: its trial's)")
    parser.add_argument("--dc-sparsities", default="0.94,0.965,0.97")
    parser.add_argument("--dc-prune-epochs", type=int, default=0,
                        help="Deep Compression's --prune-epochs (0: the recipe's default)")
    parser.add_argument("--dc-bits", type=int, default=0,
                        help="Deep Compression's --bits in every layer (0: the recipe's default, 8 for convolutions "
                             "and 4 for fully connected layers)")
    parser.add_argument("--dc-distill", action="store_true",
                        help="also run Deep Compression distilled from the baseline (--distill-from parent)")
    parser.add_argument("--grid-search", action="store_true",
                        help="also run each budget's search with --deployable int8 (uniform grids only)")
    parser.add_argument("--no-uniform", dest="uniform", action="store_false", help="skip the uniform column")
    parser.add_argument("--no-hand", dest="hand", action="store_false", help="skip the hand recipe")
    parser.add_argument("--out", default="mnist_curve.json")
    parser.add_argument("--plot", default="mnist_curve.png")
    parser.add_argument("--report", action="store_true", help="only print the tables and plot from --out (a "
                                                                  "comma-separated list merges several)")
    args = parser.parse_args()
    if args.report:
        parts = [json.loads(Path(p).read_text()) for p in args.out.split(",")]
        results = {"settings": parts[0]["settings"], "seeds": {k: v for p in parts for k, v in p["seeds"].items()}}
    else:
        results = run(args)
    report(results, args.plot)
    import mlflow

    mlflow.set_experiment("benchmark-mnist-curve")
    with mlflow.start_run(run_name="mnist-curve"):  # the results and the plot, tracked beside the runs that made them
        for path in args.out.split(","):
            mlflow.log_artifact(path)
        if args.plot:
            mlflow.log_artifact(args.plot)


if __name__ == "__main__":
    main()
