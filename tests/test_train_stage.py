"""`mcp train` end to end against a temporary MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from conftest import PYTHON, ROOT, runs_of
from mcp.config import TrainConfig
from mcp.stages.train import run_train

GLOSSARY = ("test_accuracy", "test_loss", "params_total", "params_nonzero", "sparsity", "macs", "size_bytes_fp32",
            "latency_ms_p50_cpu", "torch_latency_ms_p95_cpu", "torch_throughput_ips_cpu", "peak_memory_mb", "train_time_s")
TINY = ["--model", "tiny_cnn", "--dataset", "synthetic", "--input-shape", "3x8x8", "--num-classes", "4"]


@pytest.fixture(scope="module")
def default_run(mlflow_store, tmp_path_factory):
    """The README's first command: the default config, lenet300_100 on digits."""
    import mlflow

    mlflow.set_experiment("default-train")
    ckpt = tmp_path_factory.mktemp("ckpt")
    return run_train(TrainConfig(checkpoint_dir=str(ckpt)), show_progress=False)


def test_default_config_trains_lenet300_100_to_96_percent(default_run):
    assert default_run.metrics["test_accuracy"] >= 0.96
    assert default_run.metrics["params_total"] == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert default_run.metrics["macs"] == 64 * 300 + 300 * 100 + 100 * 10
    # dense float32 in the payload's container: 4 bytes a parameter, and each tensor's shape (6 tensors, no BN)
    assert 0 < default_run.metrics["size_bytes_fp32"] - 4 * default_run.metrics["params_total"] < 64
    version = MlflowClient().get_model_version_by_alias("lenet300_100-digits", "baseline")
    assert version.run_id == default_run.run_id or version.tags["source_run"] == default_run.run_id
    assert float(version.tags["test_accuracy"]) == pytest.approx(default_run.metrics["test_accuracy"], rel=1e-5)


def test_logged_model_reloads_identically_in_a_fresh_process(default_run, tmp_path):
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = default_run.model.cpu().eval()(x).numpy()
    np.save(tmp_path / "x.npy", x.numpy())
    script = textwrap.dedent(f"""
        import json, sys, numpy as np, torch, mlflow
        from mcp.tracking import load_model
        x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))
        out = {{}}
        for uri in ("runs:/{default_run.run_id}/model", "models:/lenet300_100-digits@baseline"):
            with torch.no_grad():
                out["mcp " + uri] = load_model(uri)(x).numpy().tolist()
                out["mlflow " + uri] = mlflow.pytorch.load_model(uri)(x).numpy().tolist()
        print(json.dumps(out))
    """)
    proc = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, env=os.environ.copy(),
                          cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr[-2000:]
    outputs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(outputs) == 4
    for name, values in outputs.items():
        got = np.asarray(values, dtype=np.float32)
        if name.startswith("mcp"):
            np.testing.assert_array_equal(got, expected, err_msg=name)  # same modules, same weights: bit-exact
        else:
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=name)


def test_cli_run_is_fully_tracked(cli, experiment, tmp_path):
    result = cli("train", *TINY, "--epochs", "3", "--checkpoint-dir", tmp_path)
    assert result.exit_code == 0, result.output
    (run,) = runs_of(experiment)
    client = MlflowClient()
    assert run.info.status == "FINISHED"
    assert run.data.tags["mcp.stage"] == "train"
    assert set(TrainConfig.defaults()) <= set(run.data.params)
    assert run.data.params["model"] == "tiny_cnn" and run.data.params["epochs"] == "3"
    assert run.data.params["augment"] == "auto" and run.data.params["data_augment"] == "none"  # as applied
    for metric in GLOSSARY:
        assert metric in run.data.metrics, metric
    for metric in ("train_loss", "val_accuracy", "lr"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert sorted(m.step for m in history) == [0, 1, 2], metric
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/training_curves.png" in artifacts
    png = client.download_artifacts(run.info.run_id, "plots/training_curves.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    version = client.get_model_version_by_alias("tiny_cnn-synthetic", "baseline")
    assert version.tags["source_run"] == run.info.run_id
    assert float(version.tags["test_accuracy"]) == pytest.approx(run.data.metrics["test_accuracy"], rel=1e-5)
    assert (tmp_path / run.info.run_id / "last.pt").is_file()
    assert f"runs:/{run.info.run_id}/model" in result.output


def test_resume_from_a_checkpoint(cli, experiment, tmp_path):
    assert cli("train", *TINY, "--epochs", "2", "--checkpoint-dir", tmp_path, "--register", "false").exit_code == 0
    (first,) = runs_of(experiment)
    ckpt = tmp_path / first.info.run_id / "last.pt"
    # the checkpoint's settings are the defaults: only --epochs changes
    result = cli("train", "--resume", ckpt, "--epochs", "4")
    assert result.exit_code == 0, result.output
    second = next(r for r in runs_of(experiment) if r.info.run_id != first.info.run_id)
    assert second.data.tags["mcp.resumed_from_run"] == first.info.run_id
    assert second.data.params["model"] == "tiny_cnn" and second.data.params["epochs"] == "4"
    assert second.data.metrics["epochs_trained"] == 4
    steps = [m.step for m in MlflowClient().get_metric_history(second.info.run_id, "val_accuracy")]
    assert sorted(steps) == [0, 1, 2, 3]
    # the same checkpoint for another model: one clear line, no run
    before = len(runs_of(experiment))
    bad = cli("train", "--resume", ckpt, "--model", "tiny_mlp", "--epochs", "4")
    assert bad.exit_code == 2
    assert "does not match: it was saved for model 'tiny_cnn'" in bad.output
    assert len(runs_of(experiment)) == before


@pytest.mark.parametrize("args, message", [
    (["--model", "nope"], "unknown model 'nope'"),
    (["--dataset", "imagefolder", "--data-dir", "missing-folder"], "data_dir 'missing-folder' does not exist"),
    (["--dataset", "mnist", "--data-dir", "missing-folder"], "pass --download"),
    (["--epochs", "0"], "epochs=0 must be positive"),
    (["--batch-size", "0"], "batch_size=0 must be positive"),
    (["--augment", "rotate"], "'rotate' is not one of 'auto', 'none', 'flip', 'crop', 'crop_flip'"),
    (["--bogus", "1"], "No such option '--bogus'"),  # click's usage errors are one line too
    (["--dataset", "idx", "--data-dir", "missing-folder"], "data_dir 'missing-folder' does not exist; expected"),
])
def test_bad_input_is_one_line_and_leaves_no_run(cli, experiment, args, message):
    result = cli("train", *args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert runs_of(experiment) == []


def test_failure_inside_the_run_ends_it_failed_and_registers_nothing(experiment, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("latency probe exploded")

    monkeypatch.setattr("mcp.stages.train.model_metrics", broken)
    cfg = TrainConfig(model="tiny_mlp", dataset="synthetic", input_shape="1x4x4", epochs=1,
                      checkpoint_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="exploded"):
        run_train(cfg, show_progress=False)
    (run,) = runs_of(experiment)
    assert run.info.status == "FAILED"
    versions = MlflowClient().search_model_versions("name='tiny_mlp-synthetic'")
    assert run.info.run_id not in {v.tags.get("source_run") for v in versions}


@pytest.mark.slow  # 16 s; the fast suite checks every entry point's parameters against the CLI (test_project)
@pytest.mark.parametrize("entry, params", [("train", {"model": "lenet5", "epochs": "2"})])
def test_mlflow_run_entry_points(tmp_path, entry, params):
    """`mlflow run . -e <entry> --env-manager local` in a fresh process, as a user would."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")}
    env["PATH"] = os.path.dirname(PYTHON) + os.pathsep + os.environ["PATH"]
    args = ["-m", "mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local",
            "--experiment-name", f"mlflow-run-{entry}"]
    for key, value in {**params, "checkpoint_dir": str(tmp_path / "ckpt")}.items():
        args += ["-P", f"{key}={value}"]
    proc = subprocess.run([PYTHON, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    experiment = client.get_experiment_by_name(f"mlflow-run-{entry}")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mcp.stage"] == "train"
    model = params.get("model", "lenet300_100")
    assert run.data.params["model"] == model
    assert run.data.metrics["epochs_trained"] == 2 and "test_accuracy" in run.data.metrics
    versions = client.search_model_versions(f"name='{model}-digits'")
    assert run.info.run_id in {v.tags.get("source_run") for v in versions}


def test_augment_is_applied_and_logged(cli, experiment, tmp_path):
    result = cli("train", *TINY, "--epochs", "1", "--checkpoint-dir", tmp_path, "--register", "false",
                 "--augment", "crop_flip")
    assert result.exit_code == 0, result.output
    (run,) = runs_of(experiment)
    assert run.data.params["augment"] == run.data.params["data_augment"] == "crop_flip"


def test_a_diverged_training_fails_in_one_line_and_registers_nothing(cli, own_store, tmp_path):
    import mlflow

    result = cli("train", *TINY, "--epochs", "3", "--lr", "1e6", "--checkpoint-dir", tmp_path)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: training diverged: the loss is ") and "learning rate 1e+06" in lines[-1]
    assert "Traceback" not in result.output
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED"
    assert not MlflowClient().search_model_versions("name='tiny_cnn-synthetic'")


def test_an_unreachable_tracking_server_fails_in_seconds_in_one_line(cli, experiment, tmp_path):
    import socket
    import time

    import mlflow

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    try:
        t0 = time.perf_counter()
        result = cli("train", *TINY, "--epochs", "1", "--checkpoint-dir", tmp_path)
        seconds = time.perf_counter() - t0
    finally:
        mlflow.set_tracking_uri(before)
    assert result.exit_code == 2 and seconds < 15
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"MLflow tracking server 'http://127.0.0.1:{port}' is not reachable" in lines[0]
    assert runs_of(experiment) == []


def test_an_mlflow_setting_the_store_refuses_is_one_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "MLFLOW_EXPERIMENT_ID": "987654"}
    result = subprocess.run([sys.executable, "-m", "mcp", "train", *TINY, "--epochs", "1"], env=env, cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if " INFO " not in line]  # MLflow's migrations
    assert len(lines) == 1 and lines[0].startswith("error: MLflow: ") and "987654" in lines[0], result.stderr


def test_epoch_metrics_are_written_together_and_all_of_them_at_the_end(experiment):
    """The epoch logger writes at most once a second (each write is a store commit) and
    everything left when training ends: no epoch is lost, every one keeps its step."""
    import mlflow

    from mcp.tracking import EpochLogger

    with mlflow.start_run() as run:
        logger = EpochLogger(every_s=3600)
        for epoch in range(5):
            logger.on_epoch_end(None, epoch, {"val_accuracy": epoch / 10, "train_loss": 1.0 - epoch / 10})
        client = MlflowClient()
        assert client.get_metric_history(run.info.run_id, "val_accuracy") == []  # not yet written
        logger.on_fit_end(None)
        history = sorted(client.get_metric_history(run.info.run_id, "val_accuracy"), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(e, e / 10) for e in range(5)]
        many = EpochLogger(every_s=3600)
        for epoch in range(300):  # 1,200 metrics: more than MLflow takes in one call
            many.on_epoch_end(None, epoch, {f"m{j}": float(j) for j in range(4)})
        many.on_fit_end(None)
        assert len(client.get_metric_history(run.info.run_id, "m3")) == 300
        eager = EpochLogger(every_s=0.0)
        eager.on_epoch_end(None, 7, {"lr": 0.5})  # past its interval: written at once
        assert [m.step for m in client.get_metric_history(run.info.run_id, "lr")] == [7]
