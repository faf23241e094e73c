"""Figures a user can compare: every stage reports its compression ratio and accuracy drop
against the model it started from (its parent: ``compression_ratio``, ``accuracy_drop``)
and against the baseline its lineage starts from (``*_vs_baseline``), on the run, on the
registered version and in the CLI's line; without a baseline in the lineage, the parent
stands in and a tag says so."""

from __future__ import annotations

import re

import pytest
import torch
from mlflow import MlflowClient

from mcp.config import PruneConfig, TrainConfig
from mcp.stages.prune import run_prune
from mcp.stages.train import run_train

TINY = {"dataset": "synthetic", "input_shape": "3x8x8", "num_classes": 4}
DATA = ["--dataset", "synthetic", "--input-shape", "3x8x8", "--num-classes", "4"]
FIGURES = ("compression_ratio", "compression_ratio_vs_baseline", "accuracy_drop", "accuracy_drop_vs_baseline")


def _quantize_run(output: str):
    run_id = re.search(r"^run (\w+):", output, re.MULTILINE).group(1)
    return MlflowClient().get_run(run_id)


def _registered(output: str):
    name, version = re.search(r"^registered: models:/([\w.-]+)/(\d+)", output, re.MULTILINE).groups()
    return MlflowClient().get_model_version(name, version)


def test_a_quantized_pruned_model_is_compared_with_its_baseline_and_its_parent(cli, own_store):
    """The user's case: a structured-pruned model quantized. Its ratio against its parent
    (the pruned model) is the smaller one; against the baseline, the pruning counts too."""
    run_train(TrainConfig(model="tiny_cnn", epochs=2, **TINY), show_progress=False)
    pruned = run_prune(PruneConfig(model="tiny_cnn", granularity="structured", scope="layerwise", sparsity=0.5,
                                   epochs=1, **TINY), show_progress=False)
    baseline = MlflowClient().get_model_version_by_alias("tiny_cnn-synthetic", "baseline")
    baseline_uri = f"models:/tiny_cnn-synthetic/{baseline.version}"
    pm = pruned.metrics
    # the prune step started from the baseline: both figures are the same, and printed once
    assert pruned.baseline.uri == baseline_uri and pruned.baseline.is_parent
    assert pm["compression_ratio_vs_baseline"] == pm["compression_ratio"] > 1
    assert pm["accuracy_drop_vs_baseline"] == pm["accuracy_drop"]
    assert pm["baseline_test_accuracy"] == pm["parent_test_accuracy"]

    uri = f"models:/{pruned.registered_name}/{pruned.registered_version}"
    result = cli("quantize", "--model", "tiny_cnn", "--model-uri", uri, "--method", "fixed_point", "--bits", "4",
                 *DATA)
    assert result.exit_code == 0, result.output
    run = _quantize_run(result.output)
    m, tags = run.data.metrics, run.data.tags
    assert tags["mcp.baseline_model"] == baseline_uri and "mcp.baseline_fallback" not in tags
    assert m["parent_test_accuracy"] == pytest.approx(pm["test_accuracy"])
    assert m["baseline_test_accuracy"] == pytest.approx(pm["baseline_test_accuracy"])
    assert m["compression_ratio"] == pytest.approx(pm["size_bytes_fp32"] / m["size_bytes_compressed"])
    assert m["compression_ratio_vs_baseline"] == pytest.approx(
        m["baseline_size_bytes_fp32"] / m["size_bytes_compressed"])
    assert m["baseline_size_bytes_fp32"] == pytest.approx(pm["parent_size_bytes_fp32"])  # the unpruned model's
    assert m["compression_ratio_vs_baseline"] > 1.5 * m["compression_ratio"]  # half the channels went first
    assert m["accuracy_drop"] == pytest.approx(m["parent_test_accuracy"] - m["onnx_test_accuracy"])
    assert m["accuracy_drop_vs_baseline"] == pytest.approx(m["baseline_test_accuracy"] - m["onnx_test_accuracy"])

    line = f"{m['compression_ratio_vs_baseline']:.1f}x vs baseline, {m['compression_ratio']:.1f}x vs parent"
    assert line in result.output, result.output
    assert (f"accuracy drop {100 * m['accuracy_drop_vs_baseline']:.2f} points vs baseline, "
            f"{100 * m['accuracy_drop']:.2f} vs parent") in result.output
    version = _registered(result.output)
    assert version.tags["baseline_model"] == baseline_uri and version.tags["parent_model"] == uri
    for key in FIGURES:
        assert float(version.tags[key]) == pytest.approx(m[key], rel=1e-5), key


def test_without_a_baseline_in_its_lineage_the_parent_stands_in_and_a_tag_says_so(cli, own_store):
    """A model logged by a run that no mcp stage made (so no lineage): the figures are
    against the parent, said by a tag on the run and the version and in the CLI's line."""
    import mlflow

    from mcp import tracking
    from mcp.models import create_model

    model = create_model("tiny_cnn", 4, (3, 8, 8))
    with mlflow.start_run(run_name="someone-elses"):
        info = tracking.log_model(model, torch.zeros(2, 3, 8, 8), {"dataset": "synthetic"})
    result = cli("quantize", "--model", "tiny_cnn", "--model-uri", info.model_uri, "--method", "fixed_point",
                 "--bits", "4", *DATA)
    assert result.exit_code == 0, result.output
    run = _quantize_run(result.output)
    m, tags = run.data.metrics, run.data.tags
    assert tags["mcp.baseline_model"] == info.model_uri
    assert "no registered baseline in the lineage" in tags["mcp.baseline_fallback"]
    assert "not made by an mcp stage" in tags["mcp.baseline_fallback"]
    assert m["compression_ratio_vs_baseline"] == m["compression_ratio"]
    assert m["accuracy_drop_vs_baseline"] == m["accuracy_drop"]
    assert f"{m['compression_ratio']:.1f}x vs parent;" in result.output
    assert "no baseline in its lineage" in result.output and "vs baseline" not in result.output
    assert "no registered baseline" in _registered(result.output).tags["baseline_fallback"]


def test_a_quantized_baseline_prints_its_figures_once(cli, own_store):
    """Parent and baseline are the same model: one figure each, said to be both."""
    run_train(TrainConfig(model="tiny_mlp", epochs=2, **TINY), show_progress=False)
    result = cli("quantize", "--model", "tiny_mlp", "--method", "fixed_point", "--bits", "4", *DATA)
    assert result.exit_code == 0, result.output
    m = _quantize_run(result.output).data.metrics
    assert m["compression_ratio_vs_baseline"] == m["compression_ratio"]
    assert f"{m['compression_ratio']:.1f}x vs baseline (the parent); accuracy drop" in result.output
    assert "vs parent" not in result.output
