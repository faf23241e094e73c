"""`mcp benchmark`: the deployed ONNX models side by side, in one runtime or several
(``--runtime``: a row per model and runtime, or each model in its fastest). Accuracy
through the row's runtime on the test split; latency p50/p95 at batch 1 and throughput at a
larger batch, after warm-up, with a fixed thread count, each model in an inference process
of its own (whose peak memory is recorded); PyTorch latency for reference; GPU columns
where CUDA exists (ONNX Runtime rows). Speedups and ratios are against a baseline measured
in the same run (in the first runtime listed)."""

from __future__ import annotations

import csv
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mcp import tracking
from mcp.config import BenchmarkConfig
from mcp.deploy import check_onnx, ort_evaluate, runtimes
from mcp.deploy.deployable import build_onnx
from mcp.errors import McpError
from mcp.evaluation.benchmark import csv_rows, markdown_table, measure_onnx
from mcp.evaluation.metrics import count_macs, count_params, measure_latency, size_bytes_fp32
from mcp.evaluation.plots import plot_tradeoffs
from mcp.stages.common import deployable_of, other_test_set, reference_uri, resolve_model_ref, setup_data
from mcp.tracking import schema
from mcp.tracking.tables import log_plot


@dataclass
class BenchmarkResult:
    run_id: str
    rows: list[dict[str, Any]]
    baseline: str
    markdown: str


def _label(uri: str, info: tuple[dict[str, str], list[str]] | None) -> str:
    """A short name for a table row: version, what made it, and its key settings."""
    if info is None:
        return uri.removeprefix("runs:/").split("/")[0][:8] if uri.startswith("runs:/") else uri
    tags, aliases = info
    version = "v" + uri.rsplit("/", 1)[-1]
    stage = tags.get(schema.STAGE, "")
    parent = tags.get("parent_model", "")
    of = f" of v{parent.rsplit('/', 1)[-1]}" if parent.rsplit("/", 1)[-1].isdigit() else ""
    if stage == "prune":
        unit = "channels" if tags.get("granularity") == "structured" else "weights"
        what = f"prune {float(tags.get('target_sparsity', tags.get('sparsity', 0))):.0%} {unit}"
    elif stage == "quantize":
        what = f"{tags.get('method', '')} {tags.get('bits', '')}b{of}"
    elif stage == "distill":
        what = "distilled"
    elif stage == "search":
        what = f"search trial {tags.get('trial', '?')} {_bits_range(tags.get('bits', ''))}{of}"
    else:
        what = stage or "model"
    if "baseline" in aliases:
        what += " @baseline"
    return f"{version} {what}"


def _bits_range(bits_json: str) -> str:
    """'2-8b' for a search's per-layer bits tag ({"fc1": 2, ...}); '' when unreadable."""
    import json

    try:
        values = sorted(set(json.loads(bits_json).values()))
    except (ValueError, AttributeError):
        return ""
    if not values:
        return ""
    return f"{values[0]}b" if len(values) == 1 else f"{values[0]}-{values[-1]}b"


def _references(cfg: BenchmarkConfig) -> list[str]:
    if cfg.model_refs():
        return cfg.model_refs()
    name = cfg.registered_model or tracking.registered_name(cfg.model, cfg.dataset)
    versions = [v for v, tags, _ in tracking.models.list_versions(name) if tags.get("format") != "onnx"]
    if not versions:
        raise McpError(f"registered model {name!r} has no versions to benchmark; train one first "
                       f"(mcp train) or pass --models")
    return [schema.version_uri(name, v) for v in versions]


def _prepare(cfg: BenchmarkConfig, splits, tmp: Path) -> list[dict[str, Any]]:
    """Load every model and build its ONNX file: all bad input fails here, before the run."""
    prepared, seen = [], set()
    for i, ref in enumerate(_references(cfg)):
        model, uri, arch = resolve_model_ref(ref, cfg.dataset, splits, cfg.trust_pickled_model)
        if model is None:
            raise McpError(f"{uri} does not exist; train it first (mcp train --model {arch} --dataset {cfg.dataset})")
        if uri in seen:
            continue
        seen.add(uri)
        path, fmt, _ = build_onnx(model, splits.input_shape, tmp / f"m{i}", cfg.opset,
                                  deployed=deployable_of(uri, tmp / f"m{i}"))
        check_onnx(path)
        info = tracking.models.version_info(uri)
        run_id = tracking.models.source_run_id(uri)
        compressed = tracking.runs.run_metrics(run_id).get("size_bytes_compressed") if run_id else None
        prepared.append({"uri": uri, "label": _label(uri, info), "model": model, "path": path, "deploy_format": fmt,
                         "aliases": info[1] if info else [], "size_bytes_onnx": float(path.stat().st_size),
                         "other_test_set": other_test_set(model.mcp_recipe, splits),
                         "size_kib_onnx": path.stat().st_size / 1024, "size_bytes_fp32": float(size_bytes_fp32(model)),
                         "macs": float(count_macs(model, splits.input_shape)), **count_params(model),
                         **({"size_bytes_compressed": compressed, "size_kib_compressed": compressed / 1024}
                            if compressed else {})})
    return prepared


def _baseline_index(cfg: BenchmarkConfig, rows: list[dict[str, Any]]) -> int:
    if cfg.baseline:
        uri = tracking.models.pin_version(reference_uri(cfg.baseline, cfg.dataset))
        for i, row in enumerate(rows):
            if row["uri"] == uri:
                return i
        raise McpError(f"baseline {cfg.baseline!r} ({uri}) is not one of the benchmarked models")
    return next((i for i, row in enumerate(rows) if "baseline" in row["aliases"]), 0)


def _with_runtimes(cfg: BenchmarkConfig, prepared: list[dict[str, Any]], shape) -> list[dict[str, Any]]:
    """The rows to measure: each model in each runtime asked for, side by side (the models
    first, runtimes in a fixed order), or with ``auto`` each model in the runtime that runs
    it fastest (every available runtime timed on its file side by side, the others' p50
    kept in the row)."""
    names = runtimes.candidates(cfg.runtime)
    if cfg.runtime.strip() != "auto":
        return [{**row, "runtime": name} for row in prepared for name in names]
    for row in prepared:
        row["runtime"], times = runtimes.fastest(row["path"], shape, min(cfg.seconds, 1.0), cfg.threads, names)
        row.update(runtimes.latency_metrics(times, "auto_latency_ms_p50_cpu_"))
    return prepared


def _measure(cfg: BenchmarkConfig, row: dict[str, Any], splits, test_loader, gpu: bool) -> None:
    shape = splits.input_shape
    accuracy = ort_evaluate(runtimes.session(row["path"], row["runtime"], cfg.threads), test_loader)
    row.update(test_accuracy=accuracy["accuracy"], test_loss=accuracy["loss"])
    cpu = measure_onnx(row["path"], shape, "cpu", cfg.threads, cfg.throughput_batch, cfg.warmup, cfg.iters,
                       cfg.seconds, row["runtime"])
    row.update(latency_ms_p50_cpu=cpu["p50_ms"], latency_ms_p95_cpu=cpu["p95_ms"],
               throughput_ips_cpu=cpu["throughput_ips"], batch_latency_ms_p50_cpu=cpu["batch_p50_ms"],
               peak_memory_mb=cpu["peak_rss_mb"], timed_runs_cpu=cpu["timed_runs"],
               timed_seconds_cpu=cpu["timed_seconds"], latency_spread_cpu=cpu["spread"])
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        row["torch_latency_ms_p50_cpu"] = measure_latency(row["model"], shape, "cpu", 1, cfg.warmup,
                                                          min(cfg.iters, 100))["p50"]
    finally:
        torch.set_num_threads(threads)
    if not gpu or row["runtime"] != "onnxruntime":
        return
    try:
        cuda = measure_onnx(row["path"], shape, "cuda", cfg.threads, cfg.throughput_batch, cfg.warmup, cfg.iters,
                            cfg.seconds)
        row.update(latency_ms_p50_gpu=cuda["p50_ms"], latency_ms_p95_gpu=cuda["p95_ms"],
                   throughput_ips_gpu=cuda["throughput_ips"])
    except McpError as exc:  # CUDA here, but no onnxruntime-gpu: the PyTorch columns still fill
        row["gpu_note"] = str(exc)
    single = measure_latency(row["model"], shape, "cuda", 1, cfg.warmup, min(cfg.iters, 100))
    batched = measure_latency(row["model"], shape, "cuda", cfg.throughput_batch, 3, 10)
    row.update(torch_latency_ms_p50_gpu=single["p50"], torch_throughput_ips_gpu=batched["throughput"])


def test_set_note(rows: list[dict[str, Any]], splits) -> str:
    """Which test images the table's accuracies are on, and which models were made with
    other ones (their training may have seen these images)."""
    where = (f"test set: {splits.test_fingerprint} ({len(splits.test):,} images of {splits.name}, {splits.how}) for "
             f"every row")
    others = [r["label"] for r in rows if r.get("other_test_set")]
    if not others:
        return where + "; every model was made with it"
    return (where + f"; made with another test set: {', '.join(others)} (their figures at registration are on "
            f"other images, and their training may have seen some of these)")


def _compare(rows: list[dict[str, Any]], base: dict[str, Any]) -> None:
    for row in rows:
        row["accuracy_delta"] = row["test_accuracy"] - base["test_accuracy"]
        row["size_ratio_onnx"] = base["size_bytes_onnx"] / row["size_bytes_onnx"]
        row["speedup_p50_cpu"] = base["latency_ms_p50_cpu"] / row["latency_ms_p50_cpu"]
        row["speedup_throughput_cpu"] = row["throughput_ips_cpu"] / base["throughput_ips_cpu"]
        if "latency_ms_p50_gpu" in row and "latency_ms_p50_gpu" in base:
            row["speedup_p50_gpu"] = base["latency_ms_p50_gpu"] / row["latency_ms_p50_gpu"]


def run_benchmark(cfg: BenchmarkConfig, show_progress: bool | None = None) -> BenchmarkResult:
    import onnxruntime
    from tqdm.auto import tqdm

    device, splits, (_, _, test_loader) = setup_data(cfg)
    gpu = device == "cuda"
    with tempfile.TemporaryDirectory() as tmp_dir:
        models = _prepare(cfg, splits, Path(tmp_dir))
        base_model = models[_baseline_index(cfg, models)]
        rows = _with_runtimes(cfg, models, splits.input_shape)
        base = next(r for r in rows if r["uri"] == base_model["uri"])  # in the first runtime listed
        environment = {"cpu_threads": cfg.threads, "onnxruntime_version": onnxruntime.__version__,
                       **runtimes.versions(),
                       "torch_version": torch.__version__, "processor": platform.processor() or platform.machine(),
                       "gpu": torch.cuda.get_device_name(0) if gpu else "not available",
                       "models_resolved": ",".join(m["uri"] for m in models)}
        tags = {schema.MODEL: cfg.model, schema.DATASET: cfg.dataset}
        data = {f"data_{k}": v for k, v in splits.summary().items()}
        with tracking.stage_run("benchmark", {**cfg.to_dict(), **data, **environment}, tags,
                                run_name=f"benchmark-{cfg.dataset}",
                                registered_model=schema.registered_name_of(base["uri"]) or "") as run:
            for row in tqdm(rows, desc="benchmark", unit="model", disable=None if show_progress is None
                            else not show_progress):
                _measure(cfg, row, splits, test_loader, gpu)
            _compare(rows, base)
            for row in rows:
                numbers = {k: float(v) for k, v in row.items() if isinstance(v, (int, float))
                           and not isinstance(v, bool)}
                with tracking.stage_run("benchmark", {"model_uri": row["uri"], "deploy_format": row["deploy_format"],
                                                      "runtime": row["runtime"],
                                                      "runtime_settings": runtimes.settings(row["runtime"],
                                                                                            cfg.threads)},
                                        {**tags, schema.PARENT_MODEL: row["uri"], schema.LABEL: row["label"],
                                         schema.RUNTIME: row["runtime"]},
                                        run_name=f"{row['label']} ({row['runtime']})" if len(rows) > len(models)
                                        else row["label"]):
                    tracking.log_metrics(numbers)
            table = markdown_table(rows)
            header, values = csv_rows(rows)
            path = Path(tmp_dir) / "benchmark.csv"
            with path.open("w", newline="") as fh:
                csv.writer(fh).writerows([header, *values])
            tracking.log_artifact(path)
            versions = ", ".join(f"{k.removesuffix('_version')} {v}" for k, v in environment.items()
                                 if k.endswith("_version") and k != "torch_version")
            note = (f"baseline: {base['label']} ({base['uri']}, {base['runtime']}); CPU: {environment['processor']}, "
                    f"{cfg.threads} thread(s), {versions}; GPU: {environment['gpu']}\n"
                    + test_set_note(rows, splits))
            tracking.runs.log_text(f"{table}\n\n{note}\n", "benchmark.md")
            log_plot(plot_tradeoffs, "tradeoffs.png", rows, title=f"{cfg.dataset}: deployed ONNX models "
                                                                  f"(Pareto front in red)")
    for row in rows:
        row.pop("model", None)
        row.pop("path", None)
    return BenchmarkResult(run.info.run_id, rows, base["label"], f"{table}\n\n{note}")
