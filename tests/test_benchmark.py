"""`mcp benchmark`: a row per model measured from its deployed ONNX file, speedups against a
baseline from the same run, no GPU numbers without a GPU, everything logged."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from mlflow import MlflowClient

from conftest import PYTHON, ROOT, runs_of
from mcp.config import BenchmarkConfig, ExportConfig, PruneConfig, QuantizeConfig, TrainConfig
from mcp.evaluation.benchmark import NOT_AVAILABLE, markdown_table, pareto_front
from mcp.stages.benchmark import run_benchmark
from mcp.stages.export import run_export
from mcp.stages.prune import run_prune
from mcp.stages.quantize import run_quantize
from mcp.stages.train import run_train

TINY = dict(dataset="synthetic", input_shape="3x8x8", num_classes=4)
QUICK = dict(iters=20, seconds=0.05, warmup=2, throughput_batch=8)


@pytest.fixture(autouse=True)
def _own_registry(own_store):
    """Each test registers its own versions of tiny_cnn-synthetic."""


def test_pareto_front_keeps_only_non_dominated_points():
    points = [(1.0, 0.90), (2.0, 0.95), (2.0, 0.93), (3.0, 0.95), (0.5, 0.80), (4.0, 0.99)]
    assert pareto_front(points) == [0, 1, 4, 5]  # (2, .93) and (3, .95) are beaten by (2, .95)
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]  # equal points do not dominate each other


def test_gpu_columns_say_not_available_without_numbers():
    row = {"label": "m", "deploy_format": "onnx_fp32", "test_accuracy": 0.9, "accuracy_delta": 0.0,
           "size_kib_onnx": 1.0, "size_ratio_onnx": 1.0, "params_nonzero": 10, "macs": 100,
           "latency_ms_p50_cpu": 0.1, "latency_ms_p95_cpu": 0.2, "throughput_ips_cpu": 1000.0,
           "speedup_p50_cpu": 1.0, "speedup_throughput_cpu": 1.0, "peak_memory_mb": 50.0,
           "torch_latency_ms_p50_cpu": 0.3}
    line = markdown_table([row]).splitlines()[2]
    assert line.count(NOT_AVAILABLE) == 3 and "0.100" in line and "90.00%" in line


def test_benchmark_measures_every_version_against_the_baseline(experiment):
    base = run_train(TrainConfig(model="tiny_cnn", epochs=8, **TINY), show_progress=False)
    pruned = run_prune(PruneConfig(model="tiny_cnn", granularity="structured", scope="layerwise", sparsity=0.5,
                                   epochs=2, **TINY), show_progress=False)
    run_quantize(QuantizeConfig(model="tiny_cnn", model_uri=f"models:/tiny_cnn-synthetic/{pruned.registered_version}",
                                **TINY), show_progress=False)
    run_export(ExportConfig(model="tiny_cnn", **TINY), show_progress=False)  # an ONNX version: not a row of its own

    result = run_benchmark(BenchmarkConfig(model="tiny_cnn", **QUICK, **TINY), show_progress=False)
    rows = result.rows
    assert [r["uri"] for r in rows] == [f"models:/tiny_cnn-synthetic/{v}" for v in (1, 2, 3)]
    assert [r["deploy_format"] for r in rows] == ["onnx_fp32", "onnx_fp32", "onnx_qdq_int8"]
    assert result.baseline == rows[0]["label"] and "@baseline" in rows[0]["label"]
    assert rows[0]["speedup_p50_cpu"] == 1.0 and rows[0]["accuracy_delta"] == 0.0
    assert rows[0]["test_accuracy"] == pytest.approx(base.metrics["test_accuracy"], abs=1e-9)  # ORT = PyTorch here
    for r in rows:
        assert r["latency_ms_p50_cpu"] <= r["latency_ms_p95_cpu"] and r["throughput_ips_cpu"] > 0
        assert r["batch_latency_ms_p50_cpu"] > r["latency_ms_p50_cpu"]  # one call at the throughput batch
        assert 10 < r["peak_memory_mb"] < 800  # the inference process alone, not this test process
        assert r["size_ratio_onnx"] == pytest.approx(rows[0]["size_bytes_onnx"] / r["size_bytes_onnx"])
        assert r["speedup_p50_cpu"] == pytest.approx(rows[0]["latency_ms_p50_cpu"] / r["latency_ms_p50_cpu"])
    assert rows[1]["params_total"] < rows[0]["params_total"]  # the structured pruning shows in the ONNX model
    assert rows[1]["macs"] < rows[0]["macs"] and rows[2]["macs"] == rows[1]["macs"]
    assert rows[2]["label"] == "v3 ptq_int8 8b of v2"

    table = result.markdown.splitlines()
    assert len([line for line in table if line.startswith("| v")]) == 3  # a row per model
    if not torch.cuda.is_available():
        assert all(line.count(NOT_AVAILABLE) == 3 for line in table if line.startswith("| v"))
        assert all("latency_ms_p50_gpu" not in r for r in rows)

    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.data.tags["mcp.stage"] == "benchmark" and run.data.params["cpu_threads"] == "1"
    children = [r for r in runs_of(experiment) if r.data.tags.get("mlflow.parentRunId") == result.run_id]
    assert sorted(r.data.tags["mcp.parent_model"] for r in children) == [r["uri"] for r in rows]
    assert all("latency_ms_p50_cpu" in r.data.metrics and "test_accuracy" in r.data.metrics for r in children)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)} | {
        a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert {"benchmark.csv", "benchmark.md", "plots/tradeoffs.png"} <= artifacts


def test_models_and_baseline_can_be_chosen(experiment):
    run_train(TrainConfig(model="tiny_cnn", epochs=2, **TINY), show_progress=False)
    run_train(TrainConfig(model="tiny_mlp", epochs=2, **TINY), show_progress=False)
    result = run_benchmark(BenchmarkConfig(models="tiny_cnn, tiny_mlp-synthetic@baseline", baseline="tiny_mlp",
                                           **QUICK, **TINY), show_progress=False)
    assert [r["uri"] for r in result.rows] == ["models:/tiny_cnn-synthetic/1", "models:/tiny_mlp-synthetic/1"]
    assert result.rows[1]["speedup_p50_cpu"] == 1.0  # the chosen baseline


@pytest.mark.parametrize("args, message", [
    (["--models", "nope"], "models='nope' is not a model reference"),
    (["--models", "tiny_cnn", "--baseline", "tiny_mlp"], "baseline 'tiny_mlp' (models:/tiny_mlp-synthetic@baseline) "
                                                         "is not one of the benchmarked models"),
    (["--registered-model", "ghost"], "registered model 'ghost' has no versions to benchmark"),
    (["--threads", "0"], "threads=0 must be positive"),
])
def test_bad_input_is_one_line_without_a_run(cli, experiment, args, message):
    run_train(TrainConfig(model="tiny_cnn", epochs=1, **TINY), show_progress=False)
    before = len(runs_of(experiment))
    result = cli("benchmark", "--dataset", "synthetic", "--input-shape", "3x8x8", "--num-classes", "4",
                 "--seconds", "0.05", *args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert len(runs_of(experiment)) == before


@pytest.mark.slow  # an `mlflow run` or a large model: `.ci/run` runs it
def test_mlflow_run_export_and_benchmark(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'fresh.db'}"
    env["PATH"] = os.path.dirname(PYTHON) + os.pathsep + os.environ["PATH"]

    def mlflow_run(entry: str, *params: str) -> None:
        args = [PYTHON, "-m", "mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local"]
        for p in (*params, f"data_dir={tmp_path}"):
            args += ["-P", p]
        proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    mlflow_run("train", "epochs=3", f"checkpoint_dir={tmp_path / 'ckpt'}")
    mlflow_run("export")
    mlflow_run("benchmark", "seconds=0.1")
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    versions = client.search_model_versions("name='lenet300_100-digits'")
    assert sorted((str(v.version), v.tags.get("format", "")) for v in versions) == [("1", ""), ("2", "onnx")]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (bench,) = [r for r in runs if r.data.tags.get("mcp.stage") == "benchmark" and "mlflow.parentRunId" not in
                r.data.tags]
    assert bench.info.status == "FINISHED" and bench.data.params["models_resolved"] == "models:/lenet300_100-digits/1"


def test_a_timing_stops_once_its_times_settle_and_runs_to_its_limit_while_they_do_not():
    """torch.utils.benchmark's adaptive rule: steady times stop after a quarter second
    (not the two seconds a noisy machine may need); scattered ones run for all of
    ``seconds``; the least number of runs is kept either way."""
    import itertools
    import time

    from mcp.evaluation.ort_bench import SETTLE_SECONDS, spread, timed

    steady, spent = timed(lambda x: time.sleep(0.002), None, 20, seconds=3.0)
    assert SETTLE_SECONDS <= spent < 1.0 and spread(steady) <= 0.1
    waits = itertools.cycle([0.0005, 0.004, 0.001, 0.003])
    scattered, spent = timed(lambda x: time.sleep(next(waits)), None, 20, seconds=0.6)
    assert spent >= 0.6 and spread(scattered) > 0.1
    few, spent = timed(lambda x: time.sleep(0.002), None, 50, seconds=0.01)
    assert len(few) == 50  # at least the runs asked for, however short the limit
