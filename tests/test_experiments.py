"""MLflow's conventions: each run lands in a named experiment (never ``Default``), and
what MLflow's own loaders give for a model mcp logged."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

DATA = ["--dataset", "synthetic", "--input-shape", "1x8x8", "--num-classes", "4"]


@pytest.fixture
def bare(own_store, monkeypatch):
    """A store of the test's own, with no experiment named by the environment (the fixtures
    name one with ``mlflow.set_experiment``, which sets MLFLOW_EXPERIMENT_ID)."""
    saved = os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    yield own_store
    if saved is not None:
        os.environ["MLFLOW_EXPERIMENT_ID"] = saved


def _experiment_of(run_id: str) -> str:
    client = MlflowClient()
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


def _train(cli, tmp_path, *args: str):
    result = cli("train", "--model", "tiny_mlp", "--epochs", "1", "--register", "false", "--checkpoint-dir",
                 tmp_path, *DATA, *args)
    assert result.exit_code == 0, result.output
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=1)[0]  # the newest


def test_a_stage_run_lands_in_the_experiment_of_its_registered_model(cli, bare, tmp_path):
    run = _train(cli, tmp_path)
    assert _experiment_of(run.info.run_id) == "tiny_mlp-synthetic"
    assert MlflowClient().search_runs(["0"]) == []  # nothing in Default


def test_experiment_option_and_environment(cli, bare, tmp_path, monkeypatch):
    run = _train(cli, tmp_path, "--experiment", "mine")
    assert _experiment_of(run.info.run_id) == "mine" and run.data.params["experiment"] == "mine"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    assert _experiment_of(_train(cli, tmp_path).info.run_id) == "from-env"
    assert _experiment_of(_train(cli, tmp_path, "--experiment", "mine").info.run_id) == "mine"  # the option first


def test_the_rule_names_the_registered_model_a_stage_works_on():
    from mcp.tracking import schema
    from mcp.tracking.runs import experiment_name

    assert experiment_name({schema.MODEL: "lenet300_100", schema.DATASET: "digits"}) == "lenet300_100-digits"
    assert experiment_name({schema.MODEL: "resnet18", schema.DATASET: "cifar10",
                            schema.PARENT_MODEL: "models:/myresnet-cifar10/3"}) == "myresnet-cifar10"
    assert experiment_name({schema.MODEL: "resnet18", schema.DATASET: "cifar10",
                            schema.PARENT_MODEL: "runs:/abc/model"}) == "resnet18-cifar10"
    assert experiment_name({schema.MODEL: "tiny_mlp", schema.DATASET: "digits"}, "imported-digits") == \
        "imported-digits"
    assert experiment_name({schema.MODEL: "UserNet"}) == "UserNet"  # a Python API call: no dataset


def test_a_nested_run_stays_in_its_parents_experiment(bare, monkeypatch):
    from mcp.tracking import schema, stage_run

    tags = {schema.MODEL: "tiny_mlp", schema.DATASET: "synthetic"}
    with stage_run("pipeline", {}, tags) as parent:
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "elsewhere")  # MLflow alone would start the child there
        with stage_run("train", {"experiment": "elsewhere-too"}, tags) as child:
            pass
    assert _experiment_of(parent.info.run_id) == _experiment_of(child.info.run_id) == "tiny_mlp-synthetic"
    assert MlflowClient().get_run(child.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id


def test_an_api_call_outside_a_run_lands_in_a_named_experiment(bare):
    import mcp
    from mcp.api import Data

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    out = mcp.quantize(model, Data((loader, loader, loader), (1, 8, 8), 4), method="fixed_point", bits=8,
                       device="cpu")
    assert _experiment_of(out.run_id) == "Sequential"


def test_a_study_keeps_its_experiment_whichever_worker_runs(bare, tmp_path):
    from mcp.config import SearchConfig, TrainConfig
    from mcp.stages.search import run_search
    from mcp.stages.train import run_train
    from mcp.tracking.runs import ExperimentWarning

    tiny = dict(dataset="synthetic", input_shape="1x8x8", num_classes=4)
    run_train(TrainConfig(model="tiny_mlp", epochs=1, checkpoint_dir=str(tmp_path), **tiny), show_progress=False)
    space = tmp_path / "space.yaml"
    space.write_text("prune: {ratio: [0.3, 0.6]}\nquantize: {bits: [8]}\nfinetune: {epochs: [1, 1]}\n")
    cfg = SearchConfig(model="tiny_mlp", storage=f"sqlite:///{tmp_path / 'optuna.db'}", trials=1, pruner="none",
                       budget_ratio=0.9, export=False, benchmark=False, register=False, space=str(space),
                       final_epochs=1, **tiny)
    first = run_search(cfg, show_progress=False)
    assert _experiment_of(first.run_id) == "tiny_mlp-synthetic"
    with pytest.warns(ExperimentWarning, match="the study's runs are in experiment 'tiny_mlp-synthetic'"):
        second = run_search(cfg.replace(trials=2, experiment="another"), show_progress=False)
    assert _experiment_of(second.run_id) == "tiny_mlp-synthetic"
    assert MlflowClient().get_experiment_by_name("another") is None


def test_under_mlflow_run_the_joined_run_keeps_its_experiment(bare, monkeypatch):
    from mcp.tracking import schema, stage_run
    from mcp.tracking.runs import ExperimentWarning

    import mlflow

    client = MlflowClient()
    made = client.create_run(client.create_experiment("chosen-by-mlflow-run"))
    monkeypatch.setenv("MLFLOW_RUN_ID", made.info.run_id)
    active, mlflow.tracking.fluent._active_experiment_id = mlflow.tracking.fluent._active_experiment_id, None
    try:  # as in a process `mlflow run` started: no experiment set in it
        with pytest.warns(ExperimentWarning, match="not used under `mlflow run`"):
            with stage_run("train", {"experiment": "mine"}, {schema.MODEL: "m", schema.DATASET: "d"}) as run:
                pass
    finally:
        mlflow.tracking.fluent._active_experiment_id = active
    assert run.info.run_id == made.info.run_id and _experiment_of(run.info.run_id) == "chosen-by-mlflow-run"
    assert client.get_experiment_by_name("mine") is None and client.get_experiment_by_name("m-d") is None


def test_an_experiment_another_worker_just_created_is_joined(bare, monkeypatch):
    from mcp.tracking.runs import ensure_experiment

    first = ensure_experiment("shared")
    assert ensure_experiment("shared") == first
    # the race of two workers: this one looked before the other created it, and the store refuses its own
    # creation (RESOURCE_ALREADY_EXISTS); it takes the other's
    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", _none_once(MlflowClient.get_experiment_by_name))
    assert ensure_experiment("shared") == first


def _none_once(get):
    calls = []

    def patched(self, name):
        calls.append(name)
        return None if len(calls) == 1 else get(self, name)

    return patched


def test_a_deleted_experiment_is_one_clear_line(cli, bare, tmp_path):
    client = MlflowClient()
    client.delete_experiment(client.create_experiment("gone"))
    result = cli("train", "--model", "tiny_mlp", "--epochs", "1", "--checkpoint-dir", tmp_path, *DATA,
                 "--experiment", "gone")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: MLflow experiment 'gone' is deleted; restore it (mlflow experiments restore --experiment-id "
        f"{client.get_experiment_by_name('gone').experiment_id}), or choose another with --experiment"]


# --- What MLflow's own loaders give for a model mcp logged -------------------------------------------


@pytest.fixture
def logged(bare):
    """tiny_cnn (batch norm) with running statistics far from a batch's own, logged by mcp
    from an example batch of one; returns (model in eval mode, its runs:/ URI)."""
    import mlflow

    from mcp.models import create_model
    from mcp.tracking.models import log_model

    torch.manual_seed(0)
    model = create_model("tiny_cnn", 4, (3, 8, 8))
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-2, 2)
        bn.running_var.uniform_(0.5, 4)
    with mlflow.start_run():
        info = log_model(model, torch.randn(1, 3, 8, 8))
    return model.eval(), info.model_uri


def test_mlflow_pytorch_load_model_gives_a_graph_module_in_eval_mode_to_call(logged):
    import mlflow

    model, uri = logged
    loaded = mlflow.pytorch.load_model(uri)
    assert isinstance(loaded, torch.fx.GraphModule)
    for batch in (1, 5):  # any batch size, though the example logged had one image
        x = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            assert torch.allclose(loaded(x), model(x), atol=1e-5)  # eval mode: the running statistics
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(loaded(x), model.train()(x), atol=1e-3)  # not the batch's own statistics
    for switch in (loaded.eval, loaded.train):  # torch.export's rule for an exported program
        with pytest.raises(NotImplementedError):
            switch()


def test_mlflow_pyfunc_predicts_logits_from_a_float32_array(logged):
    import mlflow

    model, uri = logged
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    predicted = mlflow.pyfunc.load_model(uri).predict(x)
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(predicted), model(torch.from_numpy(x)).numpy(), atol=1e-5)


def test_mcp_load_model_gives_the_module_itself(logged):
    from mcp.tracking import load_model

    model, uri = logged
    loaded = load_model(uri)
    assert type(loaded) is type(model) and not loaded.training
    loaded.train()
    loaded.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_mcp_logs_pt2_even_where_mlflows_default_is_a_pickle(bare, monkeypatch):
    """On a Databricks tracking URI (and in the first MLflow versions with the choice) MLflow's
    default format is pickle; mcp asks for pt2."""
    import mlflow

    from mcp.models import create_model
    from mcp.tracking.models import log_model

    monkeypatch.setattr(mlflow.pytorch, "_get_default_serialization_format", lambda export_model: "pickle")
    with mlflow.start_run():
        info = log_model(create_model("tiny_mlp", 4, (1, 8, 8)), torch.randn(4, 1, 8, 8))
    files = os.listdir(os.path.join(mlflow.artifacts.download_artifacts(info.model_uri), "data"))
    assert files == ["model.pt2"]
