"""`mcp pipeline` and the MLproject's `main` entry point: every step a nested run, the
champion the most accurate compressed model within the budget, bad input refused first."""

from __future__ import annotations

import os
import subprocess

import pytest
from mlflow import MlflowClient

from conftest import PYTHON, ROOT, runs_of
from mcp.config import PipelineConfig
from mcp.evaluation import ort_bench
from mcp.stages.pipeline import run_pipeline

TINY = dict(dataset="synthetic", input_shape="3x8x8", num_classes=4)
SHORT = dict(epochs=4, prune_epochs=2, quantize_epochs=1, trials=3, final_epochs=1, seconds=0.2)


@pytest.fixture(autouse=True)
def _own_registry(own_store):
    """Each test registers its own baselines and champions."""


def _children(experiment, parent_id):
    return [r for r in runs_of(experiment) if r.data.tags.get("mlflow.parentRunId") == parent_id]


def test_the_pipeline_runs_every_step_nested_and_promotes_the_best_model_within_the_budget(experiment, tmp_path,
                                                                                          monkeypatch):
    timed = []  # what the stages time themselves: nothing, the benchmark step times every model once
    real = ort_bench.compare
    monkeypatch.setattr(ort_bench, "compare", lambda paths, *a, **k: timed.append(paths) or real(paths, *a, **k))
    cfg = PipelineConfig(model="tiny_mlp", storage=f"sqlite:///{tmp_path / 'optuna.db'}", **TINY, **SHORT)
    result = run_pipeline(cfg, show_progress=False)
    assert timed == []
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mcp.stage"] == "pipeline"
    children = _children(experiment, result.run_id)
    stages = [r.data.tags["mcp.stage"] for r in children]
    assert sorted(set(stages)) == ["benchmark", "export", "prune", "quantize", "search", "train"]
    assert stages.count("export") == 3  # baseline, pruned, quantized (the search exports its winner itself)

    steps = [r["step"] for r in result.rows]
    assert steps[:3] == ["baseline", "prune", "quantize"] and steps[3].startswith("search trial ")
    assert len({r["uri"] for r in result.rows}) == len(result.rows)
    assert f"{steps[3]} " in result.rows[3]["label"]  # the benchmark names the search's version by its trial
    for r in result.rows:
        assert r["within_budget"] == (r["step"] != "baseline" and r["size_bytes_compressed"] <= result.budget_bytes)
    assert not result.rows[0]["within_budget"] and result.rows[2]["within_budget"]  # 90% pruned at 4 bits fits 10%
    fitting = [r for r in result.rows if r["within_budget"]]
    assert fitting and result.champion["test_accuracy"] == max(r["test_accuracy"] for r in fitting)
    champion = client.get_model_version_by_alias("tiny_mlp-synthetic", "champion")
    assert result.champion["uri"] == f"models:/tiny_mlp-synthetic/{champion.version}"
    assert run.data.tags["mcp.champion"] == result.champion["uri"]
    assert run.data.metrics["champion_test_accuracy"] == result.champion["test_accuracy"]
    assert {"pipeline.md", "pipeline.csv"} <= {a.path for a in client.list_artifacts(result.run_id)}
    assert "champion" in result.markdown and result.champion["label"] in result.markdown
    # each model against the baseline and against the model its step started from
    base, pruned, quantized = result.rows[:3]
    assert base["compression_ratio"] is None and base["compression_ratio_vs_baseline"] == 1.0
    assert quantized["compression_ratio_vs_baseline"] == base["size_bytes_compressed"] / quantized[
        "size_bytes_compressed"]  # the baseline's float32 bytes: its own "compressed" size
    assert quantized["accuracy_drop"] == pruned["test_accuracy"] - quantized["test_accuracy"]
    assert quantized["accuracy_drop_vs_baseline"] == base["test_accuracy"] - quantized["test_accuracy"]
    assert "| ratio vs baseline | ratio vs parent | drop vs baseline (points) | drop vs parent (points) |" in (
        result.markdown)
    assert run.data.tags["mcp.baseline_model"] == base["uri"]
    # each stage's run and registered version carry the benchmark's figures, as a stage alone logs its own
    p50 = {r["uri"]: r["latency_ms_p50_cpu"] for r in result.rows}
    parents = [None, base["uri"], pruned["uri"], base["uri"]]
    for r, parent in zip(result.rows, parents):
        name, version = r["uri"].removeprefix("models:/").split("/")
        registered = client.get_model_version(name, version)
        m = client.get_run(registered.run_id).data.metrics
        assert m["latency_ms_p50_cpu"] == r["latency_ms_p50_cpu"] > 0
        assert registered.tags["latency_ms_p50_cpu"] == f"{r['latency_ms_p50_cpu']:.6g}"
        if parent is None:
            assert "parent_latency_ms_p50_cpu" not in m
            continue
        assert m["parent_latency_ms_p50_cpu"] == p50[parent] and m["baseline_latency_ms_p50_cpu"] == p50[base["uri"]]
        assert m["speedup_p50_cpu_vs_parent"] == pytest.approx(p50[parent] / r["latency_ms_p50_cpu"])
        assert registered.tags["speedup_p50_cpu_vs_baseline"] == f"{m['speedup_p50_cpu_vs_baseline']:.6g}"
    (search,) = [r for r in children if r.data.tags["mcp.stage"] == "search"]
    # named after the baseline and the search problem (space, budget measure, budget ratio)
    assert search.data.params["study_name"] == "pipeline-tiny_mlp-synthetic-v1-default-compressed-0.1"

    # the same command again: the baseline is reused and its study resumed
    again = run_pipeline(cfg, show_progress=False)
    children = _children(experiment, again.run_id)
    assert "train" not in {r.data.tags["mcp.stage"] for r in children}
    (search,) = [r for r in children if r.data.tags["mcp.stage"] == "search"]
    assert search.data.params["study_trials_before"] == "3"


@pytest.mark.parametrize("args, message", [
    (["--quantize-method", "ptq_int8"], "method ptq_int8 is 8-bit; use fixed_point or qat for bits=4"),
    (["--space", "missing.yaml"], "search space 'missing.yaml' does not exist"),
    (["--budget-ratio", "0.001"], "is below the smallest size space 'default.yaml' can reach"),
    (["--sparsity", "1"], "sparsity=1.0 is outside [0, 1)"),
    (["--model", "resnet99"], "unknown model 'resnet99'"),
    (["--storage", "nosuchdb://x"], "cannot open Optuna storage 'nosuchdb://x'"),
    (["--quantize-method", "deep_compression"], "quantize_method='deep_compression' prunes again"),
    (["--budget-ratio", "0"], "budget_ratio=0.0 is outside (0, 1)"),
    (["--budget-batch", "8"], "budget_batch=8 must be 1 or more, and more than 1 only with a latency budget"),
    (["--finalists", "0"], "finalists=0"),
])
def test_bad_input_is_one_line_before_any_run(cli, experiment, tmp_path, args, message):
    result = cli("pipeline", "--model", "tiny_mlp", "--dataset", "synthetic", "--input-shape", "3x8x8",
                 "--num-classes", "4", "--storage", f"sqlite:///{tmp_path / 'o.db'}", *args)
    assert result.exit_code == 2
    assert message in result.output and result.output.count("\n") == 1, result.output
    assert runs_of(experiment) == []
    assert MlflowClient().search_registered_models() == []


def test_a_throughput_budget_reaches_the_search_and_the_benchmark_at_its_batch():
    cfg = PipelineConfig(model="tiny_mlp", budget_ms=5.0, budget_batch=32, **TINY)
    steps = cfg.stage_configs("models:/tiny_mlp-synthetic/1")
    assert (steps["search"].budget_ms, steps["search"].budget_batch) == (5.0, 32)
    assert steps["benchmark"].throughput_batch == 32  # the figure the pipeline checks the budget on
    assert PipelineConfig(model="tiny_mlp", **TINY).stage_configs("models:/x/1")["benchmark"].throughput_batch == 64
    assert PipelineConfig(model="tiny_mlp", finalists=3, **TINY).stage_configs("models:/x/1")["search"].finalists == 3


@pytest.mark.slow  # an `mlflow run` or a large model: `.ci/run` runs it
def test_mlflow_run_with_no_entry_point_runs_the_whole_pipeline(tmp_path):
    """`mlflow run . --env-manager local`, the README's first command, shortened."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")}
    env.update(PATH=os.path.dirname(PYTHON) + os.pathsep + os.environ["PATH"], MLFLOW_TRACKING_URI=uri)
    args = [PYTHON, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "--experiment-name", "main"]
    for key, value in {**SHORT, "storage": f"sqlite:///{tmp_path / 'optuna.db'}"}.items():
        args += ["-P", f"{key}={value}"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("main")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED" and parent.data.tags["mcp.stage"] == "pipeline"
    assert {r.data.tags["mcp.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id} \
        == {"train", "prune", "quantize", "search", "export", "benchmark"}
    champion = client.get_model_version_by_alias("lenet300_100-digits", "champion")
    assert parent.data.tags["mcp.champion"] == f"models:/lenet300_100-digits/{champion.version}"
    assert parent.data.metrics["champion_size_bytes_compressed"] <= parent.data.metrics["budget_bytes"]


def test_a_study_the_pipeline_cannot_resume_is_refused_before_its_run(cli, experiment, tmp_path):
    from mcp.config import SearchConfig
    from mcp.stages.search import run_search

    storage = f"sqlite:///{tmp_path / 'o.db'}"
    run_search(SearchConfig(model="tiny_mlp", mode="pareto", budget_ratio=0.0, trials=1, storage=storage,
                            study_name="taken", register=False, export=False, benchmark=False, **TINY),
               show_progress=False)  # trains the baseline too
    before = len(runs_of(experiment))
    result = cli("pipeline", "--model", "tiny_mlp", "--dataset", "synthetic", "--input-shape", "3x8x8",
                 "--num-classes", "4", "--storage", storage, "--study-name", "taken")
    assert result.exit_code == 2 and "study 'taken'" in result.output and "another mode" in result.output
    assert len(runs_of(experiment)) == before


@pytest.mark.slow  # the ONNX budget itself has a fast test in test_search.py
def test_a_pipeline_budget_on_the_onnx_file_judges_every_model_by_its_onnx_size(experiment, tmp_path):
    cfg = PipelineConfig(model="tiny_mlp", storage=f"sqlite:///{tmp_path / 'optuna.db'}", budget_on="onnx",
                         budget_ratio=0.2, space="structured", **TINY, **SHORT)
    result = run_pipeline(cfg, show_progress=False)
    by_step = {r["step"]: r for r in result.rows}
    # unstructured zeros and 4-bit values are stored densely in INT8 by ONNX: the quantized model cannot fit
    assert by_step["quantize"]["size_bytes_onnx"] > result.budget_bytes and not by_step["quantize"]["within_budget"]
    (searched,) = [r for r in result.rows if r["step"].startswith("search")]
    assert searched["within_budget"] and searched["size_bytes_onnx"] <= result.budget_bytes
    assert result.champion["uri"] == searched["uri"]
    assert MlflowClient().get_run(result.run_id).data.params["budget_on"] == "onnx"
