"""`mcp distill` end to end, and distillation as the recovery loss of `prune` and `quantize`."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from mlflow import MlflowClient

from conftest import PYTHON, ROOT, runs_of
from mcp import tracking
from mcp.config import DistillConfig, PruneConfig, QuantizeConfig, TrainConfig
from mcp.stages.distill import run_distill
from mcp.stages.prune import run_prune
from mcp.stages.quantize import run_quantize
from mcp.stages.train import run_train

TINY = dict(dataset="synthetic", input_shape="3x8x8", num_classes=4)


@pytest.fixture(autouse=True)
def _own_registry(own_store):
    """These tests register baselines (tiny_cnn-synthetic, ...) that other modules'
    tests expect to be absent: each test gets a store of its own."""


def _history(run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)]


def _baseline(model: str, epochs: int = 3, **data) -> str:
    trained = run_train(TrainConfig(model=model, epochs=epochs, **(data or TINY)), show_progress=False)
    return f"models:/{trained.registered_name}/{trained.registered_version}"


def test_distill_trains_the_missing_teacher_first_and_registers_the_student(experiment):
    cfg = DistillConfig(teacher="tiny_cnn", student="tiny_mlp", epochs=3, temperature=3.0, alpha=0.7,
                        hint_layers="auto", **TINY)
    result = run_distill(cfg, show_progress=False)
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mcp.stage"] == "distill"
    (teacher_run,) = [r for r in runs_of(experiment) if r.data.tags.get("mlflow.parentRunId") == result.run_id]
    assert teacher_run.data.tags["mcp.stage"] == "train" and teacher_run.data.params["model"] == "tiny_cnn"
    teacher_version = client.get_model_version_by_alias("tiny_cnn-synthetic", "baseline")
    assert teacher_version.tags["source_run"] == teacher_run.info.run_id
    assert run.data.tags["mcp.teacher"] == result.teacher_uri == f"models:/tiny_cnn-synthetic/{teacher_version.version}"
    assert (run.data.params["temperature"], run.data.params["alpha"]) == ("3.0", "0.7")

    for key in ("kd_loss", "ce_loss", "hint_loss", "train_loss", "val_accuracy"):
        assert len(_history(result.run_id, key)) == 3, key
    m = run.data.metrics
    for key in ("test_accuracy", "teacher_test_accuracy", "params_total", "params_nonzero", "macs", "size_bytes_fp32",
                "compression_ratio", "latency_ms_p50_cpu", "peak_memory_mb", "train_time_s"):
        assert key in m, key
    assert m["test_accuracy"] > 0.5  # 4 classes: it learned
    assert m["compression_ratio"] == pytest.approx(m["teacher_size_bytes_fp32"] / m["size_bytes_fp32"])
    assert "plots/training_curves.png" in {a.path for a in client.list_artifacts(result.run_id, "plots")}

    version = client.get_model_version("tiny_mlp-synthetic", result.registered_version)
    assert version.tags["teacher"] == result.teacher_uri and version.tags["mcp.stage"] == "distill"
    assert (version.tags["temperature"], version.tags["alpha"], version.tags["hint_layers"]) == ("3.0", "0.7", "auto")
    # it reloads (without the teacher or hint hooks) and gives the same outputs
    reloaded = tracking.load_model(f"models:/tiny_mlp-synthetic/{result.registered_version}")
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), result.model.cpu().eval()(x), atol=1e-6)
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in result.model.modules())
    assert reloaded.mcp_recipe["distilled_from"] == result.teacher_uri


def test_a_pruned_student_keeps_its_zeros_and_names_its_parent(experiment):
    teacher_uri = _baseline("tiny_cnn")
    pruned = run_prune(PruneConfig(model="tiny_mlp", sparsity=0.6, epochs=2, **TINY), show_progress=False)
    student_uri = f"models:/tiny_mlp-synthetic/{pruned.registered_version}"
    cfg = DistillConfig(teacher=teacher_uri, student=student_uri, epochs=2, lr=0.01, **TINY)
    result = run_distill(cfg, show_progress=False)
    before = tracking.load_model(student_uri)
    for (name, a), b in zip(before.state_dict().items(), result.model.state_dict().values()):
        if name.endswith("weight"):
            assert torch.equal(a == 0, b.cpu() == 0), name
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["mcp.parent_model"] == student_uri
    assert run.data.metrics["sparsity"] == pytest.approx(pruned.metrics["sparsity"])
    assert "initial_test_accuracy" in run.data.metrics


def test_prune_distills_from_the_model_it_started_from(experiment, cli):
    base_uri = _baseline("tiny_mlp")
    common = dict(model="tiny_mlp", sparsity=0.8, epochs=2, seed=1, **TINY)
    plain = run_prune(PruneConfig(**common), show_progress=False)
    recovered = run_prune(PruneConfig(distill_from="parent", distill_temperature=2.0, **common), show_progress=False)
    client = MlflowClient()
    run = client.get_run(recovered.run_id)
    assert run.data.tags["mcp.distill_from"] == base_uri
    assert len(_history(recovered.run_id, "kd_loss")) == 2
    assert client.get_model_version("tiny_mlp-synthetic", recovered.registered_version).tags["distilled_from"] == base_uri
    assert "kd_loss" not in client.get_run(plain.run_id).data.metrics
    assert any(not torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(),
                                                     recovered.model.state_dict().values()))
    # `--distill-from` alone means the parent model
    result = cli("prune", "--model", "tiny_mlp", "--dataset", "synthetic", "--input-shape", "3x8x8",
                 "--num-classes", "4", "--epochs", "1", "--distill-from")
    assert result.exit_code == 0, result.output
    newest = runs_of(experiment)[0]
    assert newest.data.params["distill_from"] == "parent" and newest.data.tags["mcp.distill_from"] == base_uri


def test_qat_distills_from_a_given_teacher(experiment):
    _baseline("tiny_mlp")
    teacher_uri = _baseline("tiny_cnn")
    cfg = QuantizeConfig(model="tiny_mlp", method="qat", bits=4, epochs=2, distill_from="tiny_cnn", **TINY)
    result = run_quantize(cfg, show_progress=False)
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["mcp.distill_from"] == teacher_uri  # the model name resolves to its pinned baseline
    assert len(_history(result.run_id, "kd_loss")) == 2
    assert MlflowClient().get_model_version("tiny_mlp-synthetic", result.registered_version).tags[
        "distilled_from"] == teacher_uri


@pytest.mark.slow  # an `mlflow run` or a large model: `.ci/run` runs it
def test_resnet50_teacher_to_resnet18_student_on_cifar_shapes(experiment):
    """The seed use case at the level of shapes: CIFAR-sized synthetic images, one epoch each."""
    data = dict(dataset="synthetic", input_shape="3x32x32", num_classes=2, batch_size=16)
    # one epoch at the default LR (0.05) leaves ResNet-50's eval-mode logits near 1e12 on this noise, and the
    # distillation loss NaN at once (caught since training stops on a non-finite loss): train it gently
    teacher_uri = _baseline("resnet50", epochs=1, lr=0.005, **data)
    cfg = DistillConfig(teacher=teacher_uri, student="resnet18", epochs=1, hint_layers="auto, layer4=layer4", **data)
    result = run_distill(cfg, show_progress=False)
    assert result.registered_name == "resnet18-synthetic"
    m = MlflowClient().get_run(result.run_id).data.metrics
    assert m["teacher_params_total"] > 2 * m["params_total"] and "hint_loss" in m


@pytest.mark.parametrize("args, message", [
    (["--teacher", "nope"], "teacher='nope' is not a model reference"),
    (["--teacher", "ghost-synthetic@baseline"], "cannot load model 'models:/ghost-synthetic@baseline'"),
    (["--alpha", "1.5"], "alpha=1.5 is outside [0, 1]"),
    (["--hint-layers", "fc9=fc3"], "hint layer 'fc9' is not a module of the student"),
])
def test_bad_input_fails_in_one_line_without_a_run(cli, experiment, args, message):
    _baseline("tiny_cnn")
    before = len(runs_of(experiment))
    result = cli("distill", "--teacher", "tiny_cnn", "--student", "tiny_mlp", "--dataset", "synthetic",
                 "--input-shape", "3x8x8", "--num-classes", "4", *args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert len(runs_of(experiment)) == before


def test_a_quantized_student_or_an_untrained_method_is_refused(cli, experiment):
    _baseline("tiny_mlp")
    quantized = run_quantize(QuantizeConfig(model="tiny_mlp", method="fixed_point", bits=4, **TINY),
                             show_progress=False)
    before = len(runs_of(experiment))
    uri = f"models:/tiny_mlp-synthetic/{quantized.registered_version}"
    result = cli("distill", "--teacher", "tiny_mlp", "--student", uri, "--dataset", "synthetic", "--input-shape",
                 "3x8x8", "--num-classes", "4")
    assert result.exit_code == 2 and "is already quantized (fixed_point)" in result.output
    result = cli("quantize", "--model", "tiny_mlp", "--method", "ptq_int8", "--distill-from", "--dataset",
                 "synthetic", "--input-shape", "3x8x8", "--num-classes", "4")
    assert result.exit_code == 2 and "distill_from needs fine-tuning" in result.output
    assert len(runs_of(experiment)) == before


@pytest.mark.slow  # an `mlflow run` or a large model: `.ci/run` runs it
def test_mlflow_run_distill(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'fresh.db'}"
    env["PATH"] = os.path.dirname(PYTHON) + os.pathsep + os.environ["PATH"]
    proc = subprocess.run([PYTHON, "-m", "mlflow", "run", str(ROOT), "-e", "distill", "--env-manager", "local",
                           "-P", "teacher=lenet5", "-P", "epochs=2", "-P", f"data_dir={tmp_path}"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (run,) = [r for r in runs if r.data.tags.get("mcp.stage") == "distill"]
    assert run.info.status == "FINISHED" and run.data.tags["mcp.teacher"] == "models:/lenet5-digits/1"
    assert run.data.metrics["test_accuracy"] > 0.5
    (version,) = client.search_model_versions("name='lenet300_100-digits'")
    assert version.tags["teacher"] == "models:/lenet5-digits/1"
