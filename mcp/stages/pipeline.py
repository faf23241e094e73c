"""`mcp pipeline`, the MLproject's `main` entry point: the whole pipeline as one run whose
steps are nested runs.

1. baseline: ``<model>-<dataset>@baseline``, trained when missing (or with ``--retrain``);
2. prune: global magnitude pruning on a schedule, fine-tuned;
3. quantize: the pruned model quantized (QAT at 4 bits by default);
4. search: an Optuna study over per-layer ratios and bit-widths under the size budget,
   its winner registered as ``challenger`` and exported;
5. export: the baseline, the pruned and the quantized model to ONNX (parity-checked);
6. benchmark: every model above side by side, deployed in ONNX Runtime;
7. promote: ``champion`` moves to the most accurate compressed model within the budget.

Every bad input (settings, search space, an unreachable budget) is refused before the
pipeline's run starts.
"""

from __future__ import annotations

import contextlib
import csv
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcp import tracking
from mcp.config import ExportConfig, ModelSource, PipelineConfig
from mcp.stages.benchmark import run_benchmark
from mcp.stages.common import (
    find_base_model,
    lineage,
    log_deployment_figures,
    setup_data,
    study_storage,
    timed_by_the_benchmark,
)
from mcp.stages.export import run_export
from mcp.stages.promote import run_promote
from mcp.stages.prune import run_prune
from mcp.stages.quantize import run_quantize
from mcp.stages.search import run_search
from mcp.stages.train import run_train
from mcp.tracking import schema
from mcp.tuner.objective import latency_key
from mcp.tuner.progress import lines_mode
from mcp.tuner.study import check_search, check_storage, open_study, within_budget

STEPS = ("baseline", "prune", "quantize", "search", "export", "benchmark", "promote")


@dataclass
class PipelineResult:
    run_id: str
    budget_bytes: float
    rows: list[dict[str, Any]]  # one per model: step, uri, sizes, accuracy, latency
    champion: dict[str, Any] | None
    markdown: str


def run_pipeline(cfg: PipelineConfig, show_progress: bool | None = None) -> PipelineResult:
    from tqdm.auto import tqdm

    _, splits, loaders = setup_data(cfg)
    cfg = cfg.replace(storage=study_storage(cfg.storage))
    base, base_uri = (None, "") if cfg.retrain else find_base_model(cfg.model, cfg.model_uri, cfg.dataset, splits,
                                                                          cfg.trust_pickled_model)
    if base is None:
        base_uri = ""
    arch, _ = lineage(base, base_uri, cfg.model, cfg.dataset)  # an imported model keeps its own name
    search_cfg = cfg.stage_configs(base_uri or "models:/unknown/1")["search"]
    checked = check_search(search_cfg, splits, loaders, base)
    check_storage(cfg.storage)
    if base_uri or cfg.study_name:  # the study is known now: one it cannot resume is refused here
        open_study(search_cfg.replace(study_name=study_name(cfg, base_uri, checked, arch)), checked, base_uri)

    params = {**cfg.to_dict(), **{f"data_{k}": v for k, v in splits.summary().items()},
              "budget_bytes": checked.budget or 0}
    tags = {schema.MODEL: arch, schema.DATASET: cfg.dataset}
    started = time.perf_counter()
    with tracking.stage_run("pipeline", params, tags, run_name=f"pipeline-{arch}-{cfg.dataset}") as run:
        bar = tqdm(STEPS, desc="pipeline", unit="step", disable=None if show_progress is None else not show_progress)
        steps = iter(bar)
        rows = _compress(cfg, base_uri, checked, steps, bar, show_progress, arch)
        champion = _promote(cfg, rows, next(steps), bar, show_progress)
        bar.close()
        budget = checked.budget or 0.0
        markdown = _summary(cfg, rows, budget, champion)
        metrics = {"pipeline_time_s": time.perf_counter() - started, "budget_bytes": budget,
                   "baseline_test_accuracy": rows[0]["test_accuracy"]}
        if champion:
            metrics.update({f"champion_{k}": float(champion[k]) for k in (
                "test_accuracy", "size_bytes_compressed", "compression_ratio", "compression_ratio_vs_baseline",
                "accuracy_drop", "accuracy_drop_vs_baseline", "size_bytes_onnx", "speedup_p50_cpu")})
        tracking.log_metrics(metrics)
    return PipelineResult(run.info.run_id, budget, rows, champion, markdown)


def study_name(cfg: PipelineConfig, base_uri: str, checked, arch: str = "") -> str:
    """``--study-name``, else one per baseline version and search problem (space, budget
    measure, budget ratio): the same command resumes its study, another starts its own."""
    if cfg.study_name:
        return cfg.study_name
    version = base_uri.rsplit("/", 1)[-1]
    return (f"pipeline-{arch or cfg.model}-{cfg.dataset}-v{version}-{checked.space_path.stem}-{cfg.budget_on}-"
            f"{cfg.budget_ratio:g}")


def _compress(cfg: PipelineConfig, base_uri: str, checked, steps, bar, show_progress: bool | None,
              arch: str) -> list[dict[str, Any]]:
    """Steps 1-6: the models, exported and benchmarked; one row per model."""
    def step() -> str:
        name = next(steps)
        bar.set_postfix_str(name)
        announce(name, show_progress)
        return name

    # the benchmark step times every model at batch 1 on one thread in ONNX Runtime: the
    # stages' own deployment timings of the same files would repeat it (a latency budget
    # keeps the search's, which decide)
    later = cfg.runtime == "onnxruntime" and cfg.threads == 1 and not cfg.budget_ms
    with timed_by_the_benchmark() if later else contextlib.nullcontext():
        step()
        if not base_uri:
            trained = run_train(cfg.stage_configs("models:/unknown/1")["train"], show_progress=show_progress)
            base_uri = schema.version_uri(trained.registered_name, trained.registered_version)
        base_uri = tracking.models.pin_version(base_uri)
        tracking.runs.set_tag(schema.PARENT_MODEL, base_uri)

        step()
        pruned = run_prune(cfg.stage_configs(base_uri)["prune"], show_progress=show_progress)
        pruned_uri = schema.version_uri(pruned.registered_name, pruned.registered_version)

        step()
        configs = cfg.stage_configs(base_uri, pruned_uri)
        quantized = run_quantize(configs["quantize"], show_progress=show_progress)
        quantized_uri = schema.version_uri(quantized.registered_name, quantized.registered_version)

        step()
        study = study_name(cfg, base_uri, checked, arch)
        searched = run_search(configs["search"].replace(study_name=study), show_progress=show_progress)
        winners = [schema.version_uri(w['registered_name'], w['version']) for w in searched.winners]

    step()
    data = {k: getattr(cfg, k) for k in ModelSource.defaults()}  # the data options, and trust_pickled_model
    for uri in (base_uri, pruned_uri, quantized_uri):
        run_export(ExportConfig(model=cfg.model, model_uri=uri, runtime=cfg.runtime, **data),
                   show_progress=show_progress)

    step()
    candidates = {base_uri: "baseline", pruned_uri: "prune", quantized_uri: "quantize",
                  **{uri: f"search trial {w['trial']}" for uri, w in zip(winners, searched.winners)}}
    bench = run_benchmark(configs["benchmark"].replace(models=",".join(candidates), baseline=base_uri),
                          show_progress=show_progress)
    compressed = {pruned_uri: pruned.metrics["size_bytes_compressed"],
                  quantized_uri: quantized.metrics["size_bytes_compressed"],
                  **{uri: w["size_bytes_compressed"] for uri, w in zip(winners, searched.winners)}}
    budget = checked.budget or 0.0
    by_uri = {r["uri"]: r for r in bench.rows}
    parents = {pruned_uri: base_uri, quantized_uri: pruned_uri, **{uri: base_uri for uri in winners}}
    ref = pruned.baseline  # the baseline of the starting model's lineage, as the prune step found it
    if later:
        names = {base_uri: "the baseline", pruned_uri: "the pruned model", quantized_uri: "the quantized model",
                 **{uri: f"search trial {w['trial']}'s model" for uri, w in zip(winners, searched.winners)}}
        log_deployment_figures(bench.rows, parents, ref.uri, names)
    for key, value in ref.run_tags().items():
        tracking.runs.set_tag(key, value)
    if ref.uri in by_uri:  # measured like every other row: deployed, in ONNX Runtime
        base_fp32, base_accuracy = by_uri[ref.uri]["size_bytes_fp32"], by_uri[ref.uri]["test_accuracy"]
    else:  # the pipeline started further down the lineage: the baseline as the prune step tested it
        base_fp32, base_accuracy = ref.size_bytes_fp32, ref.test_accuracy
    rows = []
    budget_latency = latency_key(cfg.budget_batch)
    for row in bench.rows:
        size = compressed.get(row["uri"]) or row["size_bytes_fp32"]
        measured = row["size_bytes_onnx"] if cfg.budget_on == "onnx" else size
        parent = by_uri.get(parents.get(row["uri"], ""))
        rows.append({"step": candidates[row["uri"]], "uri": row["uri"], "label": row["label"],
                     "deploy_format": row["deploy_format"], "test_accuracy": row["test_accuracy"],
                     "size_bytes_compressed": float(size), "compression_ratio_vs_baseline": base_fp32 / size,
                     "compression_ratio": parent["size_bytes_fp32"] / size if parent else None,
                     "accuracy_drop_vs_baseline": base_accuracy - row["test_accuracy"],
                     "accuracy_drop": parent["test_accuracy"] - row["test_accuracy"] if parent else None,
                     "size_bytes_budgeted": float(measured), "within_budget": row["uri"] != base_uri
                     and within_budget(measured, budget)
                     and (not cfg.budget_ms or row[budget_latency] <= cfg.budget_ms),
                     "size_bytes_onnx": row["size_bytes_onnx"], "latency_ms_p50_cpu": row["latency_ms_p50_cpu"],
                     "speedup_p50_cpu": row["speedup_p50_cpu"]})
    return rows


def announce(name: str, show_progress: bool | None) -> None:
    """'pipeline: step 2/7, prune' on stderr where no progress bar shows (a log file)."""
    import sys

    if lines_mode(show_progress):
        print(f"pipeline: step {STEPS.index(name) + 1}/{len(STEPS)}, {name}", file=sys.stderr, flush=True)


def _promote(cfg: PipelineConfig, rows: list[dict[str, Any]], name: str, bar,
             show_progress: bool | None) -> dict | None:
    """The most accurate compressed model within the budget (ties: the smaller) gets
    ``champion``; None when no compressed model fits the budget."""
    bar.set_postfix_str(name)
    announce(name, show_progress)
    fitting = [r for r in rows if r["within_budget"]]
    if not fitting:
        return None
    best = max(fitting, key=lambda r: (r["test_accuracy"], -r["size_bytes_budgeted"]))
    best["champion"] = True
    if cfg.promote:
        registered, version, _ = schema.parse_models_uri(best["uri"])
        run_promote(registered, version, False)
        tracking.runs.set_tag(schema.CHAMPION, best["uri"])
    return best


COLUMNS = (("step", "step"), ("label", "model"), ("deploy_format", "deployed as"),
           ("test_accuracy", "test acc (ONNX Runtime)"), ("size_bytes_compressed", "compressed B"),
           ("compression_ratio_vs_baseline", "ratio vs baseline"), ("compression_ratio", "ratio vs parent"),
           ("accuracy_drop_vs_baseline", "drop vs baseline (points)"), ("accuracy_drop", "drop vs parent (points)"),
           ("size_bytes_onnx", "ONNX B"), ("latency_ms_p50_cpu", "CPU p50 ms"), ("speedup_p50_cpu", "speedup"))


def _cell(key: str, value: Any) -> str:
    if value is None:  # the starting model has no parent in the pipeline
        return "-"
    if key == "test_accuracy":
        return f"{value:.2%}"
    if key in ("size_bytes_compressed", "size_bytes_onnx"):
        return f"{value:,.0f}"
    if key.startswith("accuracy_drop"):
        return f"{100 * value:.2f}"
    if key in ("compression_ratio", "compression_ratio_vs_baseline", "speedup_p50_cpu"):
        return f"{value:.2f}x" if key == "speedup_p50_cpu" else f"{value:.1f}x"
    if key == "latency_ms_p50_cpu":
        return f"{value:.3f}"
    return str(value)


def _summary(cfg: PipelineConfig, rows: list[dict[str, Any]], budget: float, champion: dict | None) -> str:
    """The pipeline's table (markdown, logged with a CSV beside it)."""
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " | within budget |",
             "|" + "---|" * (len(COLUMNS) + 1)]
    for r in rows:
        mark = "champion" if r.get("champion") else ("yes" if r["within_budget"] else "no")
        lines.append("| " + " | ".join(_cell(k, r[k]) for k, _ in COLUMNS) + f" | {mark} |")
    where = (schema.alias_uri(schema.registered_name_of(champion["uri"]), schema.CHAMPION_ALIAS)
             if champion else "")
    note = (f"ratios: float32 size over the compressed size, against the baseline and against the model each "
            f"step started from (its parent); drops: test accuracy points lost, the same two ways.\n"
            f"budget: {budget:,.0f} B as {'the ONNX file' if cfg.budget_on == 'onnx' else 'the encoded payload'} "
            f"({cfg.budget_ratio:g} of the baseline's float32 size); "
            + (f"champion: {champion['label']} -> {where}" if champion and cfg.promote else
               f"best within the budget: {champion['label']} (not promoted)" if champion else
               "no compressed model fits the budget: champion not moved"))
    text = "\n".join(lines) + f"\n\n{note}\n"
    tracking.runs.log_text(text, "pipeline.md")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pipeline.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            keys = ["step", "uri", "label", "deploy_format", "test_accuracy", "size_bytes_compressed",
                    "compression_ratio_vs_baseline", "compression_ratio", "accuracy_drop_vs_baseline", "accuracy_drop",
                    "within_budget", "size_bytes_onnx", "latency_ms_p50_cpu", "speedup_p50_cpu"]
            writer.writerow(keys + ["champion"])
            for r in rows:
                writer.writerow([r[k] for k in keys] + [bool(r.get("champion"))])
        tracking.log_artifact(path)
    return text
