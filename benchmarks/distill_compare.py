"""Distillation on the embedded default: students alone vs distilled, pruning recovery
with and without distillation, over several seeds.

    python benchmarks/distill_compare.py [--teacher resnet20] [--students lenet300_100,tiny_mlp]
                                         [--sparsity 0.95,0.98] [--seeds 3]

Per seed, every number comes from tracked stage runs (`mcp train`, `mcp distill`,
`mcp prune`) in the MLflow store of the working directory:

1. the teacher is trained (`mcp train`, its defaults: 60 epochs);
2. each student is trained alone (`mcp train`) and distilled from that teacher
   (`mcp distill`, T=4, alpha=0.9, same epochs, optimizer and LR schedule);
3. the first student's own trained model is pruned one-shot to each --sparsity and
   fine-tuned for --prune-epochs, once with plain cross-entropy and once with
   `--distill-from parent` (the unpruned model as teacher).

Accuracies are on the test split; mean and sample standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import statistics


def _stats(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}%"


def _gain(before: list[float], after: list[float]) -> str:
    gains = [b - a for a, b in zip(before, after)]
    return (f"{100 * statistics.mean(gains):+.2f} (per seed: "
            f"{', '.join(f'{100 * g:+.2f}' for g in gains)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--teacher", default="resnet20")
    parser.add_argument("--students", default="lenet300_100,tiny_mlp")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--sparsity", default="0.95,0.98", help="comma-separated pruning targets")
    parser.add_argument("--prune-epochs", type=int, default=20)
    args = parser.parse_args()

    import mlflow
    import torch

    from mcp.config import DistillConfig, PruneConfig, TrainConfig
    from mcp.stages.distill import run_distill
    from mcp.stages.prune import run_prune
    from mcp.stages.train import run_train

    mlflow.set_experiment("benchmark-distill-compare")
    students = [s.strip() for s in args.students.split(",") if s.strip()]
    data = dict(dataset=args.dataset)
    teacher_acc: list[float] = []
    alone: dict[str, list[float]] = {s: [] for s in students}
    distilled: dict[str, list[float]] = {s: [] for s in students}
    params: dict[str, float] = {}
    sparsities = [float(v) for v in args.sparsity.split(",") if v.strip()]
    dense: list[float] = []
    recovery: dict[tuple[float, str], list[float]] = {(sp, k): [] for sp in sparsities for k in ("plain", "kd")}
    for seed in range(args.seeds):
        teacher = run_train(TrainConfig(model=args.teacher, seed=seed, register=False, **data), show_progress=False)
        teacher_acc.append(teacher.metrics["test_accuracy"])
        params[args.teacher] = teacher.metrics["params_total"]
        for student in students:
            plain = run_train(TrainConfig(model=student, seed=seed, register=False, **data), show_progress=False)
            alone[student].append(plain.metrics["test_accuracy"])
            params[student] = plain.metrics["params_total"]
            kd = run_distill(DistillConfig(teacher=teacher.model_uri, student=student, seed=seed, register=False,
                                           temperature=args.temperature, alpha=args.alpha, **data),
                             show_progress=False)
            distilled[student].append(kd.metrics["test_accuracy"])
            if student != students[0]:
                continue
            dense.append(plain.metrics["test_accuracy"])
            for sparsity in sparsities:
                prune = dict(model=student, model_uri=plain.model_uri, sparsity=sparsity, seed=seed,
                             epochs=args.prune_epochs, register=False, **data)
                recovery[sparsity, "plain"].append(
                    run_prune(PruneConfig(**prune), show_progress=False).metrics["test_accuracy"])
                recovery[sparsity, "kd"].append(run_prune(
                    PruneConfig(distill_from="parent", distill_temperature=args.temperature,
                                distill_alpha=args.alpha, **prune), show_progress=False).metrics["test_accuracy"])
        print(f"seed {seed} done", flush=True)

    print(f"\n{args.dataset}, {args.seeds} seeds, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"mean ± sd of test accuracy")
    print(f"\nteacher {args.teacher} ({int(params[args.teacher]):,} params): {_stats(teacher_acc)}\n")
    print(f"| student | params | trained alone | distilled (T={args.temperature:g}, alpha={args.alpha:g}) "
          f"| gain (points) |")
    print("|---|---|---|---|---|")
    for s in students:
        print(f"| {s} | {int(params[s]):,} | {_stats(alone[s])} | {_stats(distilled[s])} "
              f"| {_gain(alone[s], distilled[s])} |")
    print(f"\npruning recovery: {students[0]} (dense: {_stats(dense)}) pruned one-shot (magnitude, global), "
          f"{args.prune_epochs} epochs of fine-tuning\n")
    print("| sparsity | fine-tuned with cross-entropy | fine-tuned by distillation from the dense model "
          "| gain (points) |")
    print("|---|---|---|---|")
    for sparsity in sparsities:
        plain, kd = recovery[sparsity, "plain"], recovery[sparsity, "kd"]
        print(f"| {sparsity:.0%} | {_stats(plain)} | {_stats(kd)} | {_gain(plain, kd)} |")


if __name__ == "__main__":
    main()
