"""Train a student on a teacher's softened outputs (and, with hints, its features): the
whole distillation on ``nn.Module``s and data, with no tracking. The distill stage calls
it and logs what it returns; ``mcp.distill`` is it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from mcp.distillation.distiller import Distiller, DistillSpec
from mcp.evaluation.metrics import count_params, model_metrics, peak_memory_mb, size_bytes_fp32
from mcp.pruning.engine import KeepSparsity
from mcp.training import Callback, FineTune, ProgressBar, Trainer, evaluate


@dataclass
class DistillOutcome:
    student: nn.Module  # trained in place
    metrics: dict[str, float]
    history: dict[str, list[float]]
    teacher_test_accuracy: float
    run_id: str | None = None  # the MLflow run of a tracked mcp.* call
    model_uri: str | None = None  # the model it logged: mcp.load(model_uri) rebuilds it


def distill_model(teacher: nn.Module, student: nn.Module, loaders: Sequence[Any], input_shape: Sequence[int],
                  spec: DistillSpec, finetune: FineTune, *, device: str = "cpu", callbacks: Sequence[Callback] = (),
                  progress: bool | None = None, desc: str = "distill") -> DistillOutcome:
    """Train ``student`` (in place) for ``finetune.epochs`` on ``loaders = (train, val,
    test)`` with the KD loss of ``spec`` against ``teacher`` (eval mode, frozen). A pruned
    student keeps its zeros."""
    train_loader, val_loader, test_loader = loaders
    teacher = teacher.to(device).eval()
    teacher_test = evaluate(teacher, test_loader, device)
    teacher_size = size_bytes_fp32(teacher)
    metrics: dict[str, float] = {"teacher_test_accuracy": teacher_test["accuracy"],
                                 "teacher_params_total": float(count_params(teacher)["params_total"]),
                                 "teacher_size_bytes_fp32": float(teacher_size)}
    student = student.to(device)
    torch.manual_seed(finetune.seed)
    distiller = Distiller(teacher, spec, student, tuple(input_shape)).to(device)
    optimizer = finetune.make_optimizer(student)
    distiller.attach(optimizer)
    hooks: list[Callback] = [ProgressBar(desc, disable=None if progress is None else not progress), *callbacks]
    keep = KeepSparsity(student)
    if keep.active:  # a pruned student stays as sparse as it came
        hooks.insert(0, keep)
    trainer = Trainer(student, optimizer, finetune.make_scheduler(optimizer), train_loader, val_loader,
                      epochs=finetune.epochs, device=device, seed=finetune.seed, callbacks=hooks,
                      batch_loss=distiller)
    t0 = time.perf_counter()
    try:
        trainer.fit()
    finally:
        distiller.close()  # the hooks must not travel with the saved student
    test = evaluate(student, test_loader, device)
    metrics.update({
        "test_accuracy": test["accuracy"], "test_loss": test["loss"],
        "accuracy_gap_to_teacher": teacher_test["accuracy"] - test["accuracy"],
        "best_val_accuracy": trainer.best_val_accuracy, "best_epoch": float(trainer.best_epoch),
        "train_time_s": trainer.train_time_s, "training_time_s": time.perf_counter() - t0})
    metrics.update(model_metrics(student, tuple(input_shape), device))
    metrics["compression_ratio"] = teacher_size / metrics["size_bytes_fp32"]
    metrics["peak_memory_mb"] = peak_memory_mb(device)
    return DistillOutcome(student, metrics, trainer.history, teacher_test["accuracy"])
