"""Dense baselines: accuracy, size, compute, CPU latency (default: the embedded digits).

    python benchmarks/train_baselines.py [--models lenet300_100,lenet5,resnet20] [--seeds 3]
        [--dataset digits] [--data-dir DIR] [--val-fraction 0.1] [--epochs 0]

Trains each model with `mcp train`'s defaults (one tracked MLflow run per seed, in the
experiment "benchmark-baselines", not registered) and prints a markdown table of the
mean and standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="lenet300_100,lenet5,resnet20")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=0, help="0: mcp train's default")
    args = parser.parse_args()

    import mlflow

    from mcp.config import TrainConfig
    from mcp.stages.train import run_train

    mlflow.set_experiment("benchmark-baselines")
    rows = []
    with tempfile.TemporaryDirectory() as ckpt:
        for name in args.models.split(","):
            results = []
            for seed in range(args.seeds):
                overrides = {"epochs": args.epochs} if args.epochs else {}
                cfg = TrainConfig(model=name, dataset=args.dataset, data_dir=args.data_dir,
                                  val_fraction=args.val_fraction, seed=seed, register=False,
                                  checkpoint_dir=ckpt, **overrides)
                results.append(run_train(cfg, show_progress=False).metrics)
            acc = [r["test_accuracy"] * 100 for r in results]
            rows.append((name, statistics.mean(acc), statistics.stdev(acc) if len(acc) > 1 else 0.0,
                         results[0]["params_total"], results[0]["macs"], results[0]["size_bytes_fp32"] / 1024,
                         statistics.median(r["latency_ms_p50_cpu"] for r in results),
                         statistics.mean(r["train_time_s"] for r in results)))
    data = splits_summary(args)
    print(f"\n{args.dataset} ({data}), {args.seeds} seeds, torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")
    print("| model | test accuracy % (mean ± sd) | params | MACs | fp32 KiB | p50 latency CPU, batch 1 (ms) "
          "| train time (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, mean, sd, params, macs, kib, lat, secs in rows:
        print(f"| {name} | {mean:.2f} ± {sd:.2f} | {int(params):,} | {int(macs):,} | {kib:.1f} | {lat:.3f} "
              f"| {secs:.1f} |")


def splits_summary(args) -> str:
    from mcp.data import load_dataset

    s = load_dataset(args.dataset, args.data_dir, val_fraction=args.val_fraction)
    return f"{len(s.train):,} train / {len(s.val):,} val / {len(s.test):,} test"


if __name__ == "__main__":
    main()
