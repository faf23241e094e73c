"""Criteria and schedules compared on one model, over several seeds.

    python benchmarks/prune_compare.py [--model resnet20] [--dataset digits] [--data-dir DIR]
        [--val-fraction 0.1] [--granularity structured] [--sparsity 0.5] [--epochs 20] [--seeds 1]

Per seed, a baseline is trained (`mcp train` defaults, not registered), then two tracked
`mcp prune --compare` runs start from it: every criterion the model supports at
`--granularity`, layer-wise `--sparsity` (structured: channels or neurons physically
removed), one-shot; then every schedule with the magnitude criterion. Prints the
comparison tables that the runs log (one seed), or their mean ± sd over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile


def _table(per_seed: list[list[dict]]) -> str:
    from mcp.stages.prune import comparison_markdown

    if len(per_seed) == 1:
        return comparison_markdown(per_seed[0])

    def ms(values: list[float]) -> str:
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"

    lines = ["| variant | test accuracy % | drop (points) | per seed (test %) | training time (s) | non-zero params "
             "| size (KiB) |", "|---|---|---|---|---|---|---|"]
    for i, row in enumerate(per_seed[0]):
        rows = [seed[i] for seed in per_seed]
        acc = [100 * r["test_accuracy"] for r in rows]
        lines.append(f"| {row['variant']} | {ms(acc)} | {ms([100 * r['accuracy_drop'] for r in rows])} "
                     f"| {', '.join(f'{a:.2f}' for a in acc)} | {statistics.mean(r['training_time_s'] for r in rows):.1f} "
                     f"| {int(row['params_nonzero']):,} | {row['size_kib']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--granularity", default="structured")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs per variant")
    parser.add_argument("--prune-epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()

    import mlflow
    import torch

    from mcp.config import PruneConfig, TrainConfig
    from mcp.stages.prune import run_prune
    from mcp.stages.train import run_train

    mlflow.set_experiment("benchmark-prune-compare")
    data = dict(dataset=args.dataset, data_dir=args.data_dir, val_fraction=args.val_fraction)
    criteria, schedules, baselines = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            base = run_train(TrainConfig(model=args.model, seed=seed, register=False, checkpoint_dir=tmp, **data),
                             show_progress=False)
            baselines.append(100 * base.metrics["test_accuracy"])
            common = dict(model=args.model, model_uri=base.model_uri, granularity=args.granularity,
                          scope="layerwise", sparsity=args.sparsity, epochs=args.epochs, prune_epochs=args.prune_epochs,
                          prune_steps=5, seed=seed, register=False, **data)
            criteria.append(run_prune(PruneConfig(compare="criteria", **common), show_progress=False).comparison)
            schedules.append(run_prune(PruneConfig(compare="schedules", criterion="magnitude", **common),
                                       show_progress=False).comparison)
            print(f"seed {seed} done", flush=True)
    spread = f" ± {statistics.stdev(baselines):.2f}" if len(baselines) > 1 else ""
    print(f"\n{args.model} on {args.dataset}, {args.granularity} layer-wise {args.sparsity:.0%} sparsity, "
          f"{args.epochs} fine-tuning epochs, {args.seeds} seed(s), torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads; baseline {statistics.mean(baselines):.2f}{spread}%")
    print("\nCriteria (one-shot):\n")
    print(_table(criteria))
    print("\nSchedules (magnitude):\n")
    print(_table(schedules))


if __name__ == "__main__":
    main()
