"""No code runs from a model file: a pickled model that mcp did not log is refused by every
stage that takes a model, unless the user opts in with --trust-pickled-model."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from torch import nn

from conftest import PYTHON, runs_of

DATA = ["--dataset", "synthetic", "--input-shape", "1x8x8", "--num-classes", "4"]


class Payload(nn.Module):
    """A model whose pickle runs ``os.mkdir(marker)`` when it is loaded."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.fc = nn.Linear(64, 4)

    def forward(self, x):
        return self.fc(x.flatten(1))

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _log_pickled(model: nn.Module) -> str:
    """Log ``model`` the plain MLflow way (a pickle), as a stranger's model reaches a registry."""
    import mlflow

    fmt = ({"serialization_format": "pickle"}  # MLflow 3.x's default became pt2; pickle was the default before
           if "serialization_format" in inspect.signature(mlflow.pytorch.log_model).parameters else {})
    with mlflow.start_run(run_name="foreign") as run:  # pip_requirements given: inferring them loads the model
        mlflow.pytorch.log_model(model, name="model", pip_requirements=["torch"], **fmt)
    return f"runs:/{run.info.run_id}/model"


@pytest.fixture
def store(own_store):
    """A store of the test's own (no registered baselines: each stage meets the payload
    first), and the id of its experiment."""
    import mlflow

    return mlflow.get_experiment_by_name("tests").experiment_id


@pytest.fixture
def payload_uri(store, tmp_path):
    marker = tmp_path / "payload-ran"
    uri = _log_pickled(Payload(str(marker)))
    assert not marker.exists()
    return uri, marker


STAGE_ARGS = {
    "prune": ["prune", "--model", "tiny_mlp", "--model-uri", "{uri}"],
    "prune-distill-from": ["prune", "--model", "tiny_mlp", "--distill-from", "{uri}"],
    "sensitivity": ["sensitivity", "--model", "tiny_mlp", "--model-uri", "{uri}"],
    "quantize": ["quantize", "--model", "tiny_mlp", "--model-uri", "{uri}"],
    "export": ["export", "--model", "tiny_mlp", "--model-uri", "{uri}"],
    "search": ["search", "--model", "tiny_mlp", "--model-uri", "{uri}"],
    "distill-teacher": ["distill", "--teacher", "{uri}", "--student", "tiny_mlp"],
    "distill-student": ["distill", "--teacher", "tiny_mlp", "--student", "{uri}"],
    "benchmark": ["benchmark", "--model", "tiny_mlp", "--models", "{uri}"],
    "import": ["import", "--model", "tiny_mlp", "--model-uri", "{uri}"],
    "pipeline": ["pipeline", "--model", "tiny_mlp", "--model-uri", "{uri}"],
}


@pytest.mark.parametrize("case", sorted(STAGE_ARGS))
def test_a_pickled_payload_runs_nothing_in_any_stage(case, payload_uri, store, cli, tmp_path):
    uri, marker = payload_uri
    before = {r.info.run_id for r in runs_of(store)}
    args = [a.format(uri=uri) for a in STAGE_ARGS[case]] + DATA
    result = cli(*args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert uri in lines[0] and "not logged by mcp" in lines[0] and "--trust-pickled-model" in lines[0]
    assert not marker.exists(), "the pickle's code ran"
    assert {r.info.run_id for r in runs_of(store)} == before, "a run was started"


def test_trusting_a_pickle_is_explicit_warns_once_and_tags_the_run(store, cli):
    from mlflow import MlflowClient

    from mcp.models import create_model

    torch.manual_seed(0)
    uri = _log_pickled(create_model("tiny_mlp", 4, (1, 8, 8)))  # mcp's architecture, logged as a pickle
    refused = cli("export", "--model", "tiny_mlp", "--model-uri", uri, "--register", "false", *DATA)
    assert refused.exit_code == 2 and "not logged by mcp" in refused.output

    result = cli("export", "--model", "tiny_mlp", "--model-uri", uri, "--register", "false",
                 "--trust-pickled-model", *DATA)
    assert result.exit_code == 0, result.output
    assert result.output.count("warning: unpickling") <= 1
    runs = [r for r in runs_of(store) if r.data.tags.get("mcp.stage") == "export"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["mcp.trust_pickled_model"] == "true"
    assert MlflowClient().get_run(runs[0].info.run_id).data.params["trust_pickled_model"] == "true"


def test_a_trusted_pickle_without_a_recipe_is_one_line(store, cli):
    import mlflow

    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    uri = _log_pickled(plain)
    result = cli("export", "--model", "tiny_mlp", "--model-uri", uri, "--trust-pickled-model", "true", *DATA)
    assert result.exit_code == 2
    assert "has no mcp recipe" in result.output.strip().splitlines()[-1]
    assert mlflow.active_run() is None


def test_an_mcp_model_folder_with_a_pickled_state_dict_is_refused(tmp_path):
    from mcp.errors import McpError
    from mcp.models import create_model
    from mcp.tracking import load_model
    from mcp.tracking.models import RECIPE_FILE, STATE_FILE

    model = create_model("tiny_mlp", 4, (1, 8, 8))
    extra = tmp_path / "model" / "extra_files"
    extra.mkdir(parents=True)
    (extra / RECIPE_FILE).write_text(json.dumps(model.mcp_recipe))
    marker = tmp_path / "payload-ran"
    torch.save({"fc": Payload(str(marker))}, extra / STATE_FILE)
    with pytest.raises(McpError, match="pickled Python objects"):
        load_model(str(tmp_path / "model"))
    assert not marker.exists()

    torch.save(model.state_dict(), extra / STATE_FILE)  # the same folder with plain tensors loads
    reloaded = load_model(str(tmp_path / "model"))
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(reloaded(x), model.eval()(x))


def test_a_pickled_checkpoint_is_refused_without_running_it(tmp_path, cli, experiment):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "last.pt"
    torch.save({"format": "x", "model": Payload(str(marker))}, evil)
    result = cli("train", "--resume", str(evil), *DATA)
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    assert str(evil) in line and "pickled" in line
    assert not marker.exists()
    assert runs_of(experiment) == []


def test_sigterm_ends_the_run_killed(tmp_path, mlflow_store):
    """A scheduler's SIGTERM in the middle of training leaves the run KILLED, never RUNNING."""
    from mlflow import MlflowClient

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env.update(MLFLOW_TRACKING_URI=mlflow_store, MLFLOW_EXPERIMENT_NAME="sigterm")
    proc = subprocess.Popen([PYTHON, "-m", "mcp", "train", "--model", "tiny_mlp", "--epochs", "100000",
                             "--checkpoint-dir", str(tmp_path), *DATA], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(mlflow_store)
    deadline = time.time() + 120
    runs = []
    while time.time() < deadline and not runs:
        time.sleep(1)
        experiment = client.get_experiment_by_name("sigterm")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
    assert runs, "the training run never started"
    time.sleep(2)  # into the epochs
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert client.get_run(runs[0].info.run_id).info.status == "KILLED"


def test_the_payload_is_live_when_trusted(payload_uri):
    """The refusal above is what keeps the payload from running: trusted, it runs."""
    from mcp.errors import McpError
    from mcp.tracking import load_model

    uri, marker = payload_uri
    with pytest.raises(McpError):
        load_model(uri, trust_pickled=True)  # it unpickles to os.mkdir's None, not a model
    assert marker.is_dir()
