"""The search's winner against uniform pruning + a uniform bit-width at the same budget.

    python benchmarks/search_vs_uniform.py [--model lenet300_100] [--budget-ratio 0.1] [--trials 30]
                                           [--final-epochs 8] [--seeds 3]

Per seed: a baseline is trained (`mcp train`), then

- search: one `mcp search` study (max-accuracy, --trials, budget --budget-ratio of the
  baseline's float32 size, space from search_spaces/), its winner rebuilt with
  --final-epochs of fine-tuning;
- uniform: for every bit-width the space allows, the smallest single prune ratio (within
  the space's ranges) that fits the same budget, found by encoding as the search sizes
  its trials, then fine-tuned the same way (QAT for --final-epochs, at the geometric mean
  of the space's LR range); the bit-width with the best validation accuracy is kept.

Both are scored on the test split; sizes are encoded bytes (`size_bytes_compressed`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def _uniform(base, splits, loaders, space, budget, epochs, lr, seed, device):
    """Best (by validation accuracy) uniform ratio + bit-width within the budget."""
    from mcp.search import uniform
    from mcp.search.trial import finetune_quantized, prune_candidate, uniform_at_budget
    from mcp.data.calibration import calibration_batches
    from mcp.training import evaluate

    shape = splits.input_shape
    calib = calibration_batches(loaders[0], 8)
    best = None
    for bits in sorted({b for choices in space.bits_of.values() for b in choices}):
        ratio = uniform_at_budget(base, shape, space, bits, budget, calib, device, seed)
        if ratio is None:
            continue  # no single ratio in the space fits at this bit-width
        tc = uniform(space, ratio, bits, epochs, lr)
        tuned = finetune_quantized(prune_candidate(base, shape, tc, calib, device), shape, tc, loaders, device, seed)
        val = evaluate(tuned.model, loaders[1], device)["accuracy"]
        if best is None or val > best["val"]:
            best = {"bits": bits, "ratio": ratio, "val": val, "size": len(tuned.payload),
                    "test": evaluate(tuned.model, loaders[2], device)["accuracy"]}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lenet300_100")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--budget-ratio", type=float, default=0.1)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--final-epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()

    import mlflow
    import torch

    from mcp.config import SearchConfig, TrainConfig
    from mcp.stages.common import setup_data
    from mcp.search.study import load_space
    from mcp.stages.search import run_search
    from mcp.stages.train import run_train

    mlflow.set_experiment("benchmark-search-vs-uniform")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            base = run_train(TrainConfig(model=args.model, dataset=args.dataset, seed=seed, register=False),
                             show_progress=False)
            cfg = SearchConfig(model=args.model, dataset=args.dataset, model_uri=base.model_uri, seed=seed,
                               trials=args.trials, budget_ratio=args.budget_ratio, final_epochs=args.final_epochs,
                               storage=f"sqlite:///{tmp}/optuna.db", study_name=f"seed{seed}", register=False)
            t0 = time.perf_counter()
            found = run_search(cfg, show_progress=False)
            seconds = time.perf_counter() - t0
            winner = found.winners[0]
            device, splits, loaders = setup_data(cfg)
            space, _ = load_space(cfg, base.model, splits.input_shape)
            uni = _uniform(base.model, splits, loaders, space, found.budget_bytes, args.final_epochs,
                           (space.lr[0] * space.lr[1]) ** 0.5, seed, device)
            rows.append({"seed": seed, "baseline": base.metrics["test_accuracy"], "search": winner["test_accuracy"],
                         "search_size": winner["size_bytes_compressed"], "uniform": uni["test"],
                         "uniform_size": uni["size"], "uniform_bits": uni["bits"], "uniform_ratio": uni["ratio"],
                         "budget": found.budget_bytes, "seconds": seconds})
            print(f"seed {seed} done", flush=True)

    print(f"\n{args.model} on {args.dataset}, budget {args.budget_ratio:.0%} of float32, {args.trials} trials, "
          f"{args.final_epochs} final epochs, torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")
    print("| seed | baseline | search winner | its size (B) | uniform (best bit-width) | its size (B) | budget (B) "
          "| study time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {100 * r['baseline']:.2f}% | {100 * r['search']:.2f}% | {int(r['search_size']):,} "
              f"| {100 * r['uniform']:.2f}% ({r['uniform_bits']} bits, {r['uniform_ratio']:.1%} pruned) "
              f"| {int(r['uniform_size']):,} | {int(r['budget']):,} | {r['seconds']:.0f} |")

    def stats(key: str) -> str:
        values = [100 * r[key] for r in rows]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {sd:.2f}%"

    gains = [100 * (r["search"] - r["uniform"]) for r in rows]
    print(f"\nsearch {stats('search')}, uniform {stats('uniform')}; search minus uniform "
          f"{statistics.mean(gains):+.2f} points (per seed: {', '.join(f'{g:+.2f}' for g in gains)})")


if __name__ == "__main__":
    main()
