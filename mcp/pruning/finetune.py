"""Prune on a schedule while fine-tuning: the whole pruning operation on an ``nn.Module``
and its data, with no tracking. The prune stage calls it and logs what it returns (and,
through ``on_step`` and ``callbacks``, what happens on the way); ``mcp.prune`` is it."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from mcp.data.calibration import calibration_batches
from mcp.evaluation.metrics import count_macs, count_params, model_metrics, peak_memory_mb, size_bytes_fp32
from mcp.pruning.engine import BNL1Penalty, PruneSpec, Pruning, PruningCallback
from mcp.pruning.schedules import event_steps
from mcp.quantization.codec import encode_model
from mcp.training import Callback, FineTune, ProgressBar, Trainer, evaluate


@dataclass
class PruneOutcome:
    """A pruned, fine-tuned copy of the model and what was measured."""

    model: nn.Module
    metrics: dict[str, float]  # glossary metrics, test accuracy, the baseline's, the drop, sizes
    layer_sparsity: dict[str, float]
    history: dict[str, list[float]]  # per-epoch training curves, with the pruned fraction
    structured: bool
    run_id: str | None = None  # the MLflow run of a tracked mcp.* call
    model_uri: str | None = None  # the model it logged: mcp.load(model_uri) rebuilds it
    dropped: list[str] = field(default_factory=list)  # blocks removed (depth pruning), this call's and earlier


def prune_and_finetune(base: nn.Module, loaders: Sequence[Any], input_shape: Sequence[int], spec: PruneSpec,
                       finetune: FineTune, *, prune_epochs: int = 0, calib_batches: int = 8, bn_l1: float = 0.0,
                       device: str = "cpu", batch_loss: Any = None, callbacks: Sequence[Callback] = (),
                       on_step: Callable[[int, dict[str, float]], None] | None = None,
                       progress: bool | None = None, desc: str = "prune") -> PruneOutcome:
    """Prune a copy of ``base`` by ``spec`` (criterion, scope, granularity, schedule) while
    fine-tuning it for ``finetune.epochs`` on ``loaders = (train, val, test)``.

    The schedule's steps are spread over the first ``prune_epochs`` epochs (one-shot: before
    training). ``on_step(k, metrics)`` gets each step's measurements (target, reached
    sparsity, params, MACs, test accuracy and loss, elapsed time); ``callbacks`` join the
    trainer's (an epoch logger, say); ``batch_loss`` replaces cross-entropy (distillation as
    recovery). ``base`` is left as it is."""
    train_loader, val_loader, test_loader = loaders
    shape = tuple(input_shape)
    torch.manual_seed(finetune.seed)
    model = copy.deepcopy(base).to(device)
    base_counts = count_params(base)
    base_test = evaluate(base.to(device), test_loader, device)
    pruning = Pruning(model, shape, spec, calibration_batches(train_loader, calib_batches), device)

    def rebuild(trainer: Trainer) -> None:  # structured steps replace the parameters
        trainer.optimizer = finetune.make_optimizer(trainer.model)
        trainer.scheduler = finetune.make_scheduler(trainer.optimizer, start_epoch=trainer.epoch)

    def pruned_fraction() -> float:
        if pruning.structured:
            return 1.0 - count_params(model)["params_total"] / base_counts["params_total"]
        return pruning.cut.sparsity()

    t0 = time.perf_counter()

    def on_event(k: int, target: float) -> None:
        if on_step is None:
            return
        test = evaluate(model.to(device), test_loader, device)
        counts = count_params(model)
        on_step(k, {"prune_step_target": target, "prune_step_sparsity": pruned_fraction(),
                    "prune_step_params": counts["params_total"] if pruning.structured else counts["params_nonzero"],
                    "prune_step_macs": count_macs(model, shape),
                    "prune_step_test_accuracy": test["accuracy"], "prune_step_test_loss": test["loss"],
                    "prune_step_elapsed_s": time.perf_counter() - t0})

    class FractionLogger(Callback):  # the schedule, to overlay on the curves
        def on_epoch_end(self, trainer, epoch, logs):
            logs["pruned_fraction"] = pruned_fraction()
            trainer.history.setdefault("pruned_fraction", []).append(logs["pruned_fraction"])

    span = len(train_loader) * (prune_epochs if spec.schedule != "one_shot" else 0)
    optimizer = finetune.make_optimizer(model)
    hooks: list[Callback] = [PruningCallback(pruning, event_steps(pruning.spec.events, span), rebuild, on_event),
                             FractionLogger(),
                             ProgressBar(desc, disable=None if progress is None else not progress), *callbacks]
    if bn_l1 > 0:
        hooks.insert(1, BNL1Penalty(bn_l1))
    trainer = Trainer(model, optimizer, finetune.make_scheduler(optimizer), train_loader, val_loader,
                      epochs=finetune.epochs, device=device, seed=finetune.seed, callbacks=hooks,
                      restore_best=False,  # the best epoch may precede the last pruning step
                      batch_loss=batch_loss)
    trainer.fit()
    training_time = time.perf_counter() - t0

    test = evaluate(model.to(device), test_loader, device)
    metrics = {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
               "baseline_test_accuracy": base_test["accuracy"],
               "accuracy_drop": base_test["accuracy"] - test["accuracy"],
               "target_sparsity": spec.sparsity, "pruned_fraction": pruned_fraction(),
               "train_time_s": trainer.train_time_s, "training_time_s": training_time}
    if pruning.structured:  # pruned_fraction is then the parameters removed; this, the channels
        metrics["channels_pruned_fraction"] = pruning.cut.channel_sparsity()
        if pruning.cut.heads_out:  # whole attention heads removed: their share of all heads
            metrics["heads_pruned_fraction"] = pruning.cut.heads_fraction()
    metrics.update(model_metrics(model, shape, device))
    metrics["compression_ratio"] = base_counts["params_total"] / max(metrics["params_nonzero"], 1.0)
    metrics["size_bytes_nonzero_fp32"] = 4.0 * metrics["params_nonzero"]
    metrics["size_bytes_compressed"] = float(len(encode_model(model, {}, "fixed")))  # float32 values, sparse indices
    metrics["baseline_size_bytes_fp32"] = float(size_bytes_fp32(base))
    metrics["peak_memory_mb"] = peak_memory_mb(device)
    metrics["blocks_dropped"] = float(len(pruning.dropped))
    return PruneOutcome(model, metrics, pruning.layer_sparsity(), trainer.history, pruning.structured,
                        dropped=list(pruning.dropped))
