"""Criteria and schedules compared on one small CNN (default: resnet20 on digits).

    python benchmarks/prune_compare.py [--model resnet20] [--sparsity 0.5] [--epochs 20]

One invocation, two tracked `mcp prune --compare` runs on the same registered baseline
(trained first if missing): every criterion at structured, layer-wise `--sparsity`
(channels physically removed, one-shot), then every schedule with the magnitude
criterion. Prints the comparison tables that the runs log (accuracy, drop, training
time, non-zero params, size, CPU p50 latency at batch 1).
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs per variant")
    parser.add_argument("--prune-epochs", type=int, default=10)
    args = parser.parse_args()

    import mlflow
    import torch

    from mcp.config import PruneConfig
    from mcp.stages.prune import comparison_markdown, run_prune

    mlflow.set_experiment("benchmark-prune-compare")
    common = dict(model=args.model, dataset=args.dataset, granularity="structured", scope="layerwise",
                  sparsity=args.sparsity, epochs=args.epochs, prune_epochs=args.prune_epochs, prune_steps=5)
    criteria = run_prune(PruneConfig(compare="criteria", **common), show_progress=False)
    schedules = run_prune(PruneConfig(compare="schedules", criterion="magnitude", **common), show_progress=False)
    print(f"\n{args.model} on {args.dataset}, structured layer-wise {args.sparsity:.0%} channel sparsity, "
          f"{args.epochs} fine-tuning epochs, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"\nCriteria (one-shot), run {criteria.run_id}:\n")
    print(comparison_markdown(criteria.comparison))
    print(f"\nSchedules (magnitude), run {schedules.run_id}:\n")
    print(comparison_markdown(schedules.comparison))


if __name__ == "__main__":
    main()
