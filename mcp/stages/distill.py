"""`mcp distill`: train a student on a teacher's softened outputs (and features), register it."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from mcp.config import DistillConfig
from mcp.errors import McpError


@dataclass
class DistillResult:
    run_id: str
    metrics: dict[str, float]
    model: nn.Module
    teacher_uri: str
    registered_name: str | None
    registered_version: str | None


def spec_of(cfg: DistillConfig):
    from mcp.distillation import DistillSpec

    return DistillSpec(cfg.temperature, cfg.alpha, cfg.hint_layers, cfg.hint_weight, cfg.label_smoothing)


def resolve_student(cfg: DistillConfig, splits) -> tuple[nn.Module, str, str]:
    """(student, the URI it starts from or "" for a fresh one, architecture name)."""
    from mcp.models import create_model, model_names
    from mcp.stages.common import resolve_model_ref

    if cfg.student in model_names():
        torch.manual_seed(cfg.seed)
        return create_model(cfg.student, splits.num_classes, splits.input_shape), "", cfg.student
    student, uri, arch = resolve_model_ref(cfg.student, cfg.dataset, splits)
    quantized = student.mcp_recipe.get("quantization")
    if quantized:
        raise McpError(f"student {uri!r} is already quantized ({quantized.get('method')}); training would undo its "
                       f"grid. Distill before quantizing, or quantize with `mcp quantize --distill-from`")
    return student, uri, arch


def run_distill(cfg: DistillConfig, show_progress: bool | None = None) -> DistillResult:
    """Everything that can fail on bad input (models, hint layers) fails before the run starts."""
    from mcp import tracking
    from mcp.distillation import Distiller
    from mcp.models import create_model
    from mcp.stages.common import resolve_model_ref, setup_data, train_baseline

    device, splits, loaders = setup_data(cfg)
    teacher, teacher_uri, teacher_arch = resolve_model_ref(cfg.teacher, cfg.dataset, splits)
    student, student_uri, student_arch = resolve_student(cfg, splits)
    probe_teacher = teacher if teacher is not None else create_model(teacher_arch, splits.num_classes,
                                                                     splits.input_shape)
    Distiller(probe_teacher, spec_of(cfg), copy.deepcopy(student), splits.input_shape).close()  # hint layers

    params = {**cfg.to_dict(), **{f"data_{k}": v for k, v in splits.summary().items()},
              "device_resolved": device, "teacher_uri": teacher_uri, "student_uri": student_uri}
    tags = {"mcp.model": student_arch, "mcp.dataset": cfg.dataset, "mcp.teacher": teacher_uri}
    if student_uri:
        tags["mcp.parent_model"] = student_uri
    with tracking.stage_run("distill", params, tags, run_name=f"distill-{teacher_arch}-to-{student_arch}") as run:
        if teacher is None:  # no teacher registered for this dataset: train it first, as a nested run
            teacher, teacher_uri = train_baseline(cfg, show_progress, model=teacher_arch, tag="mcp.teacher")
        result = _distill(cfg, teacher, teacher_uri, student, student_uri, student_arch, splits, loaders, device,
                          show_progress)
        result.run_id = run.info.run_id
        return result


def _distill(cfg: DistillConfig, teacher: nn.Module, teacher_uri: str, student: nn.Module, student_uri: str,
             student_arch: str, splits, loaders, device: str, show_progress: bool | None) -> DistillResult:
    from mcp import tracking
    from mcp.distillation import Distiller
    from mcp.evaluation.metrics import count_params, peak_memory_mb, size_bytes_fp32
    from mcp.evaluation.plots import plot_training_curves
    from mcp.pruning import KeepSparsity
    from mcp.stages.common import final_metrics, log_and_register, log_plot
    from mcp.training import ProgressBar, Trainer, build_optimizer, build_scheduler, evaluate

    train_loader, val_loader, test_loader = loaders
    teacher = teacher.to(device).eval()
    teacher_test = evaluate(teacher, test_loader, device)
    teacher_size = size_bytes_fp32(teacher)
    metrics: dict[str, float] = {"teacher_test_accuracy": teacher_test["accuracy"],
                                 "teacher_params_total": float(count_params(teacher)["params_total"]),
                                 "teacher_size_bytes_fp32": float(teacher_size)}
    tracking.log_metrics(metrics)
    student = student.to(device)
    if student_uri:
        metrics["initial_test_accuracy"] = evaluate(student, test_loader, device)["accuracy"]

    torch.manual_seed(cfg.seed)
    distiller = Distiller(teacher, spec_of(cfg), student, splits.input_shape).to(device)
    optimizer = build_optimizer(student, cfg.optimizer, cfg.lr, cfg.momentum, True, cfg.weight_decay)
    distiller.attach(optimizer)
    callbacks = [ProgressBar(f"distill {student_arch} <- T={cfg.temperature:g}", disable=None
                             if show_progress is None else not show_progress), tracking.EpochLogger()]
    keep = KeepSparsity(student)
    if keep.active:  # a pruned student stays as sparse as it came
        callbacks.insert(0, keep)
    trainer = Trainer(student, optimizer, build_scheduler(optimizer, cfg.scheduler, cfg.epochs), train_loader,
                      val_loader, epochs=cfg.epochs, device=device, seed=cfg.seed, callbacks=callbacks,
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
    metrics.update(final_metrics(student, splits.input_shape, device))
    metrics["compression_ratio"] = teacher_size / metrics["size_bytes_fp32"]
    metrics["peak_memory_mb"] = peak_memory_mb(device)
    tracking.log_metrics(metrics)

    log_plot(plot_training_curves, "training_curves.png", trainer.history,
             title=f"{student_arch} distilled from {teacher.mcp_recipe['name']} on {cfg.dataset} "
                   f"(T={cfg.temperature:g}, alpha={cfg.alpha:g})",
             reference={"teacher (test)": teacher_test["accuracy"]})

    reg_name = tracking.registered_name(student_arch, cfg.dataset) if cfg.register else None
    run_id = tracking.runs.active_run_id()
    version_tags = {"mcp.stage": "distill", "source_run": run_id, "teacher": teacher_uri,
                    "temperature": cfg.temperature, "alpha": cfg.alpha,
                    **({"hint_layers": cfg.hint_layers} if cfg.hint_layers else {}),
                    **({"parent_model": student_uri} if student_uri else {}),
                    **{k: f"{metrics[k]:.6g}" for k in ("test_accuracy", "teacher_test_accuracy", "params_total",
                                                         "params_nonzero", "size_bytes_fp32", "latency_ms_p50_cpu")}}
    _, version = log_and_register(student, next(iter(test_loader))[0][:4],
                                  {"dataset": cfg.dataset, "class_names": splits.class_names,
                                   "distilled_from": teacher_uri}, reg_name, None, version_tags)
    return DistillResult(run_id, metrics, student, teacher_uri, reg_name, version)
