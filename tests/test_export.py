"""`mcp export`: every kind of model exports, passes the checker and the parity check,
registers with format=onnx and reloads through mlflow.pyfunc; broken exports are caught."""

from __future__ import annotations

import copy

import mlflow
import numpy as np
import onnx
import pytest
import torch
from mlflow import MlflowClient

from conftest import separate_store
from mcp.config import ExportConfig, PruneConfig, QuantizeConfig, TrainConfig
from mcp.errors import McpError
from mcp.stages.export import run_export
from mcp.stages.prune import run_prune
from mcp.stages.quantize import run_quantize
from mcp.stages.train import run_train

TINY = dict(dataset="synthetic", input_shape="3x8x8", num_classes=4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One store for the module, with every kind of model the export must handle."""
    with pytest.MonkeyPatch.context() as mp, separate_store(tmp_path_factory.mktemp("export") / "export.db", mp):
        def version(result) -> str:
            return f"models:/{result.registered_name}/{result.registered_version}"

        kinds = {}
        kinds["dense"] = version(run_train(TrainConfig(model="tiny_cnn", epochs=15, **TINY), show_progress=False))
        run_train(TrainConfig(model="tiny_mlp", epochs=4, **TINY), show_progress=False)
        kinds["unstructured"] = version(run_prune(PruneConfig(model="tiny_cnn", sparsity=0.7, epochs=2, **TINY),
                                                  show_progress=False))
        kinds["structured"] = version(run_prune(PruneConfig(model="tiny_cnn", granularity="structured",
                                                            scope="layerwise", sparsity=0.5, epochs=2, **TINY),
                                                show_progress=False))
        kinds["qdq_int8"] = version(run_quantize(QuantizeConfig(model="tiny_cnn", **TINY), show_progress=False))
        kinds["dynamic_int8"] = version(run_quantize(QuantizeConfig(model="tiny_mlp", method="dynamic_int8", **TINY),
                                                     show_progress=False))
        kinds["int8_weights"] = version(run_quantize(QuantizeConfig(model="tiny_cnn", method="fixed_point", bits=4,
                                                                    **TINY), show_progress=False))
        kinds["kmeans"] = version(run_quantize(QuantizeConfig(model="tiny_mlp", method="kmeans", bits=3, epochs=1,
                                                              **TINY), show_progress=False))
        yield kinds


def len_all_runs() -> int:
    client = MlflowClient()
    return len(client.search_runs([e.experiment_id for e in client.search_experiments()], run_view_type=3))


EXPECTED_FORMAT = {"dense": "onnx_fp32", "unstructured": "onnx_fp32", "structured": "onnx_fp32",
                   "qdq_int8": "onnx_qdq_int8", "dynamic_int8": "onnx_dynamic_int8",
                   "int8_weights": "onnx_int8_weights", "kmeans": "onnx_fp32"}


@pytest.mark.parametrize("kind", sorted(EXPECTED_FORMAT))
def test_every_kind_exports_checks_matches_and_reloads_through_pyfunc(models, kind):
    from mcp import tracking

    source = models[kind]
    result = run_export(ExportConfig(model_uri=source, **TINY), show_progress=False)
    m = result.metrics
    assert result.deploy_format == EXPECTED_FORMAT[kind]
    assert m["onnx_agreement"] >= 0.99
    if kind in ("dense", "unstructured", "structured", "int8_weights", "kmeans"):
        assert m["onnx_max_abs_diff"] <= 1e-3  # float compute: the same logits
    client = MlflowClient()
    version = client.get_model_version(result.registered_name, result.registered_version)
    assert version.tags["format"] == "onnx" and version.tags["source_model"] == source
    assert result.registered_name == source.removeprefix("models:/").split("/")[0]

    # the registered ONNX model: checker-clean, pyfunc-loadable, same logits as ONNX Runtime on the source
    local = mlflow.artifacts.download_artifacts(f"models:/{result.registered_name}/{result.registered_version}")
    onnx.checker.check_model(f"{local}/model.onnx", full_check=True)
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    served = mlflow.pyfunc.load_model(f"models:/{result.registered_name}/{result.registered_version}")
    logits = served.predict(x.numpy())["logits"]
    assert logits.shape == (5, 4)
    reference = tracking.load_model(source)(x).detach().numpy()
    assert np.mean(logits.argmax(1) == reference.argmax(1)) >= 0.8  # 5 random inputs, quantized kinds included
    if EXPECTED_FORMAT[kind] in ("onnx_fp32", "onnx_int8_weights"):
        assert np.allclose(logits, reference, atol=1e-3)

    if kind == "unstructured":  # sparse weights are stored as they are: the zeros are in the file
        graph = onnx.load(f"{local}/model.onnx").graph
        zeros = sum(int((onnx.numpy_helper.to_array(t) == 0).sum()) for t in graph.initializer)
        assert zeros >= 0.6 * m["params_total"]
    if kind == "structured":  # the removed channels are gone from the graph's shapes
        assert m["params_total"] < 0.6 * client.get_run(
            tracking.models.source_run_id(models["dense"])).data.metrics["params_total"]


def test_a_broken_export_is_caught_by_the_parity_check(models, monkeypatch):
    import mcp.deploy.deployable as export  # where the deployable file is exported

    real = export.export_onnx

    def broken(model, *args, **kwargs):  # a wrong weight slips into the file
        bad = copy.deepcopy(model)
        with torch.no_grad():
            bad.fc.weight[0, 0] += 5.0
        return real(bad, *args, **kwargs)

    monkeypatch.setattr(export, "export_onnx", broken)
    client = MlflowClient()
    name = "tiny_cnn-synthetic"
    before = len(client.search_model_versions(f"name='{name}'"))
    runs_before = len_all_runs()
    with pytest.raises(McpError, match=r"parity check failed .* max \|PyTorch - onnxruntime\| = .*: logits differ by more than atol .*nothing was logged"):
        run_export(ExportConfig(model_uri=models["dense"], **TINY), show_progress=False)
    assert len(client.search_model_versions(f"name='{name}'")) == before
    assert len_all_runs() == runs_before


def test_optimisation_is_kept_only_when_it_removes_nodes(models):
    plain = run_export(ExportConfig(model_uri=models["dense"], optimize=False, register=False, **TINY),
                       show_progress=False)
    optimized = run_export(ExportConfig(model_uri=models["dense"], register=False, **TINY), show_progress=False)
    assert plain.metrics["onnx_nodes"] == plain.metrics["onnx_nodes_exported"]
    assert optimized.metrics["onnx_nodes"] <= optimized.metrics["onnx_nodes_exported"]


def test_bad_input_is_one_line_without_a_run(models, cli):
    exported = run_export(ExportConfig(model_uri=models["dense"], **TINY), show_progress=False)
    onnx_version = f"models:/{exported.registered_name}/{exported.registered_version}"
    runs_before = len_all_runs()
    for args, message in (
            (["--model-uri", onnx_version], "is not a PyTorch model (flavors: onnx, python_function)"),
            (["--model", "lenet5"], "models:/lenet5-synthetic@baseline does not exist; train it first"),
            (["--model-uri", "models:/tiny_cnn-synthetic/99"], "cannot load model 'models:/tiny_cnn-synthetic/99'"),
            (["--min-agreement", "0"], "min_agreement=0.0 is outside (0, 1]"),
            (["--opset", "9"], "opset=9 is outside the supported ONNX opsets 13-21")):
        result = cli("export", "--dataset", "synthetic", "--input-shape", "3x8x8", "--num-classes", "4", *args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], (args, result.output)
    assert len_all_runs() == runs_before


def test_a_logged_pytorch_model_serves_through_pyfunc_and_keeps_its_signature(tmp_path, monkeypatch):
    """The PyTorch flavor beside the recipe: `mlflow.pyfunc` serves a structured-pruned model
    with a block removed (MLflow's pt2 archive, no pickle) with mcp's logits."""
    from mcp import tracking
    from mcp.models import create_model
    from mcp.pruning import PruneSpec, Pruning

    model = create_model("resnet20", 4, (3, 16, 16)).eval()
    Pruning(model, (3, 16, 16), PruneSpec(granularity="structured", sparsity=0.5, drop_blocks=1), []).step()
    x = torch.randn(3, 3, 16, 16)
    with separate_store(tmp_path / "pyfunc.db", monkeypatch), mlflow.start_run():
        info = tracking.log_model(model, x[:2], {"dataset": "synthetic"})
        served = mlflow.pyfunc.load_model(info.model_uri)
        assert served.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3, 16, 16)
        np.testing.assert_allclose(served.predict(x.numpy()), model(x).detach().numpy(), atol=1e-5)
