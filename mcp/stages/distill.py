"""`mcp distill`: train a student on a teacher's softened outputs (and features), register it."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mcp import tracking
from mcp.config import DistillConfig
from mcp.distillation import Distiller, DistillSpec
from mcp.distillation.train import distill_model
from mcp.errors import McpError
from mcp.evaluation.plots import plot_training_curves
from mcp.models import create_model, model_names
from mcp.stages.common import (
    DEPLOY_KEYS,
    data_recipe,
    deployment_figures,
    finetune_of,
    lineage_baseline,
    log_and_register,
    resolve_model_ref,
    setup_data,
    tag_baseline,
)
from mcp.stages.train import run_baseline
from mcp.tracking import schema
from mcp.tracking.tables import log_plot
from mcp.training import evaluate


@dataclass
class DistillResult:
    run_id: str
    metrics: dict[str, float]
    model: nn.Module
    teacher_uri: str
    registered_name: str | None
    registered_version: str | None
    baseline: Any = None  # mcp.stages.common.Baseline: what the *_vs_baseline figures compare with


def spec_of(cfg: DistillConfig):
    return DistillSpec(cfg.temperature, cfg.alpha, cfg.hint_layers, cfg.hint_weight, cfg.label_smoothing)


def resolve_student(cfg: DistillConfig, splits) -> tuple[nn.Module, str, str]:
    """(student, the URI it starts from or "" for a fresh one, architecture name)."""
    if cfg.student in model_names():
        torch.manual_seed(cfg.seed)
        return create_model(cfg.student, splits.num_classes, splits.input_shape), "", cfg.student
    student, uri, arch = resolve_model_ref(cfg.student, cfg.dataset, splits, cfg.trust_pickled_model)
    quantized = student.mcp_recipe.get("quantization")
    if quantized:
        raise McpError(f"student {uri!r} is already quantized ({quantized.get('method')}); training would undo its "
                       f"grid. Distill before quantizing, or quantize with `mcp quantize --distill-from`")
    return student, uri, arch


def run_distill(cfg: DistillConfig, show_progress: bool | None = None) -> DistillResult:
    """Everything that can fail on bad input (models, hint layers) fails before the run starts."""
    device, splits, loaders = setup_data(cfg)
    teacher, teacher_uri, teacher_arch = resolve_model_ref(cfg.teacher, cfg.dataset, splits,
                                                                    cfg.trust_pickled_model)
    student, student_uri, student_arch = resolve_student(cfg, splits)
    probe_teacher = teacher if teacher is not None else create_model(teacher_arch, splits.num_classes,
                                                                     splits.input_shape)
    Distiller(probe_teacher, spec_of(cfg), copy.deepcopy(student), splits.input_shape).close()  # hint layers

    params = {**cfg.to_dict(), **{f"data_{k}": v for k, v in splits.summary().items()},
              "device_resolved": device, "teacher_uri": teacher_uri, "student_uri": student_uri}
    tags = {schema.MODEL: student_arch, schema.DATASET: cfg.dataset, schema.TEACHER: teacher_uri}
    if student_uri:
        tags[schema.PARENT_MODEL] = student_uri
    with tracking.stage_run("distill", params, tags, run_name=f"distill-{teacher_arch}-to-{student_arch}") as run:
        if teacher is None:  # no teacher registered for this dataset: train it first, as a nested run
            teacher, teacher_uri = run_baseline(cfg, show_progress, model=teacher_arch, tag=schema.TEACHER)
        result = _distill(cfg, teacher, teacher_uri, student, student_uri, student_arch, splits, loaders, device,
                          show_progress)
        result.run_id = run.info.run_id
        return result


def _distill(cfg: DistillConfig, teacher: nn.Module, teacher_uri: str, student: nn.Module, student_uri: str,
             student_arch: str, splits, loaders, device: str, show_progress: bool | None) -> DistillResult:
    test_loader = loaders[2]
    student = student.to(device)
    initial = evaluate(student, test_loader, device)["accuracy"] if student_uri else None
    finetune = finetune_of(cfg)
    outcome = distill_model(teacher, student, loaders, splits.input_shape, spec_of(cfg), finetune, device=device,
                            callbacks=[tracking.EpochLogger()], progress=show_progress,
                            desc=f"distill {student_arch} <- T={cfg.temperature:g}")
    metrics = outcome.metrics
    if initial is not None:
        metrics["initial_test_accuracy"] = initial
    # a student is compared with its teacher (compression_ratio: the teacher's float32 size over its
    # own) and with the baseline of the teacher's lineage
    metrics["accuracy_drop"] = metrics["accuracy_gap_to_teacher"]
    ref = lineage_baseline(teacher, teacher_uri, test_loader, device, metrics["teacher_test_accuracy"],
                           cfg.trust_pickled_model)
    metrics.update(ref.figures(metrics["test_accuracy"], metrics["size_bytes_fp32"]))
    metrics.update(deployment_figures(outcome.student, splits.input_shape, None, ref.model, (teacher, teacher_uri),
                                      "the student"))
    tag_baseline(ref)
    tracking.log_metrics(metrics)

    log_plot(plot_training_curves, "training_curves.png", outcome.history,
             title=f"{student_arch} distilled from {teacher.mcp_recipe['name']} on {cfg.dataset} "
                   f"(T={cfg.temperature:g}, alpha={cfg.alpha:g})",
             reference={"teacher (test)": outcome.teacher_test_accuracy})

    reg_name = tracking.registered_name(student_arch, cfg.dataset) if cfg.register else None
    run_id = tracking.runs.active_run_id()
    version_tags = {schema.STAGE: "distill", "source_run": run_id, "teacher": teacher_uri,
                    "temperature": cfg.temperature, "alpha": cfg.alpha,
                    **({"hint_layers": cfg.hint_layers} if cfg.hint_layers else {}),
                    **({"parent_model": student_uri} if student_uri else {}),
                    **{k: f"{metrics[k]:.6g}" for k in ("test_accuracy", "teacher_test_accuracy", "params_total",
                                                         "params_nonzero", "size_bytes_fp32") + DEPLOY_KEYS if k in metrics},
                    **ref.version_tags(metrics)}
    _, version = log_and_register(student, next(iter(test_loader))[0][:4],
                                  {**data_recipe(splits),
                                   "distilled_from": teacher_uri}, reg_name, None, version_tags)
    return DistillResult(run_id, metrics, student, teacher_uri, reg_name, version, ref)
