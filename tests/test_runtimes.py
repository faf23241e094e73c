"""Runtimes: OpenVINO beside ONNX Runtime on the same files (parity and accuracy, float32 and
INT8), the runtime recorded on a registered version, `auto` choosing by measurement (and
with ONNX Runtime alone), the parity rules of a lossy deployable, the benchmark's runtime
rows, and a search whose winner fails a deploy check leaving nothing registered."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from conftest import runs_of
from mcp.config import BenchmarkConfig, ExportConfig, QuantizeConfig, SearchConfig, TrainConfig
from mcp.deploy import ort_predict, runtimes
from mcp.deploy.deployable import ParityRules, parity_failure
from mcp.errors import McpError
from mcp.stages.benchmark import run_benchmark
from mcp.stages.export import run_export
from mcp.stages.quantize import run_quantize
from mcp.stages.train import run_train

TINY = dict(dataset="synthetic", input_shape="3x8x8", num_classes=4)
openvino = pytest.importorskip("openvino")


@pytest.fixture(autouse=True)
def _own_registry(own_store):
    """Each test registers its own versions."""


def _trained(epochs: int = 10) -> str:
    result = run_train(TrainConfig(model="tiny_cnn", epochs=epochs, **TINY), show_progress=False)
    return f"models:/{result.registered_name}/{result.registered_version}"


def test_openvino_runs_a_float32_and_an_int8_file_with_parity_and_the_version_says_where(experiment):
    source = _trained()
    client = MlflowClient()
    ort = run_export(ExportConfig(model_uri=source, register=False, **TINY), show_progress=False)
    ov = run_export(ExportConfig(model_uri=source, runtime="openvino", **TINY), show_progress=False)
    # the same file, float32 arithmetic in both: the same logits and accuracy
    assert ov.metrics["onnx_max_abs_diff"] <= 1e-3 and ov.metrics["onnx_agreement"] >= 0.99
    assert abs(ov.metrics["onnx_test_accuracy"] - ort.metrics["onnx_test_accuracy"]) <= 0.01
    version = client.get_model_version(ov.registered_name, ov.registered_version)
    assert version.tags["runtime"] == "openvino"
    assert "INFERENCE_PRECISION_HINT=f32" in version.tags["runtime_settings"]
    assert "INFERENCE_NUM_THREADS=1" in version.tags["runtime_settings"]
    assert client.get_run(ov.run_id).data.tags["mcp.runtime"] == "openvino"

    int8 = run_quantize(QuantizeConfig(model="tiny_cnn", model_uri=source, runtime="openvino", **TINY),
                        show_progress=False)
    uri = f"models:/{int8.registered_name}/{int8.registered_version}"
    tags = client.get_model_version(int8.registered_name, int8.registered_version).tags
    assert tags["runtime"] == "openvino" and int8.metrics["latency_ms_p50_cpu"] > 0  # timed where it runs
    ov8 = run_export(ExportConfig(model_uri=uri, runtime="openvino", register=False, **TINY), show_progress=False)
    ort8 = run_export(ExportConfig(model_uri=uri, register=False, **TINY), show_progress=False)
    assert ov8.deploy_format == ort8.deploy_format == "onnx_qdq_int8"  # OpenVINO reads the QDQ file as it is
    assert ov8.metrics["onnx_agreement"] >= 0.95
    assert abs(ov8.metrics["onnx_test_accuracy"] - ort8.metrics["onnx_test_accuracy"]) <= 0.03


def test_auto_times_every_installed_runtime_and_keeps_the_fastest_that_passes(experiment, monkeypatch):
    from mcp.deploy import deployable

    source = _trained(epochs=4)
    fake = {"onnxruntime": 0.30, "openvino": 0.10, "openvino-bf16": 0.05}
    from mcp.evaluation import ort_bench

    monkeypatch.setattr(ort_bench, "compare", lambda paths, shape, threads=1, seconds=0.5, rounds=4, runtimes=None:
                        [fake[n] for n in runtimes])
    real = deployable.parity_failure

    def bf16_refused(fmt, result, rules, runtime="onnxruntime", accuracy=None):
        return "refused here" if runtime == "openvino-bf16" else real(fmt, result, rules, runtime, accuracy)

    monkeypatch.setattr(deployable, "parity_failure", bf16_refused)
    done = run_export(ExportConfig(model_uri=source, runtime="auto", **TINY), show_progress=False)
    version = MlflowClient().get_model_version(done.registered_name, done.registered_version)
    assert version.tags["runtime"] == "openvino"  # the fastest that passed its check
    metrics = MlflowClient().get_run(done.run_id).data.metrics
    assert metrics["latency_ms_p50_cpu_onnxruntime"] == 0.30 and metrics["latency_ms_p50_cpu_openvino"] == 0.10


def test_auto_with_only_onnx_runtime_installed_and_a_missing_runtime_is_one_line(experiment, cli, monkeypatch):
    source = _trained(epochs=2)
    monkeypatch.setattr(runtimes, "installed", lambda runtime: runtime == "onnxruntime")
    assert runtimes.available() == ["onnxruntime"]
    done = run_export(ExportConfig(model_uri=source, runtime="auto", register=False, **TINY), show_progress=False)
    assert MlflowClient().get_run(done.run_id).data.tags["mcp.runtime"] == "onnxruntime"
    before = len(runs_of(experiment))
    for args, message in ((["export", "--runtime", "openvino"], "runtime openvino is not installed here (pip install"),
                          (["export", "--runtime", "tensorrt"], "'tensorrt' is not a runtime; allowed: onnxruntime"),
                          (["benchmark", "--model", "tiny_cnn", "--runtime", "onnxruntime,openvino"],
                           "runtime openvino is not installed here")):
        result = cli(*args, "--dataset", "synthetic", "--input-shape", "3x8x8", "--num-classes", "4")
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], (args, result.output)
    assert len(runs_of(experiment)) == before


def test_a_lossy_deployable_is_judged_by_accuracy_and_agreement_and_the_refusal_names_its_rule():
    rules = ParityRules()
    close = {"max_abs_diff": 0.98, "agreement": 0.9727}
    # the search's INT8 winner of the report: agreement below 0.99, accuracy higher than PyTorch's: it passes
    assert parity_failure("onnx_qdq_int8", close, rules, "onnxruntime", (0.6441, 0.6372)) is None
    assert "max_accuracy_drop 0.005" in parity_failure("onnx_qdq_int8", close, rules, "onnxruntime", (0.60, 0.6372))
    assert "lossy_min_agreement 0.95" in parity_failure("onnx_qdq_int8", {**close, "agreement": 0.9}, rules)
    # float32 computed as stored: the logits must match, whatever the accuracy
    assert "atol 0.001" in parity_failure("onnx_fp32", close, rules, "openvino", (0.70, 0.60))
    # the same float32 file in bf16 is lossy: judged like INT8
    assert parity_failure("onnx_fp32", close, rules, "openvino-bf16", (0.64, 0.6372)) is None


def test_a_bf16_session_is_lossy_but_close(tmp_path):
    if "openvino-bf16" not in runtimes.available():
        pytest.skip("this CPU has no bfloat16 instructions")
    from mcp.deploy import export_onnx
    from mcp.models import create_model

    model = create_model("tiny_cnn", 4, (3, 8, 8)).eval()
    path = export_onnx(model, (3, 8, 8), tmp_path / "m.onnx")
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    want = model(x).detach().numpy()
    f32 = ort_predict(runtimes.session(path, "openvino"), x)
    bf16 = ort_predict(runtimes.session(path, "openvino-bf16"), x)
    assert np.allclose(f32, want, atol=1e-4)
    assert not np.array_equal(bf16, f32) and np.allclose(bf16, want, atol=0.1)


def test_the_benchmark_measures_each_model_in_each_runtime_side_by_side(experiment):
    _trained(epochs=2)
    quick = dict(iters=20, seconds=0.05, warmup=2, throughput_batch=8)
    result = run_benchmark(BenchmarkConfig(model="tiny_cnn", runtime="onnxruntime,openvino", **quick, **TINY),
                           show_progress=False)
    assert [r["runtime"] for r in result.rows] == ["onnxruntime", "openvino"]
    assert result.rows[0]["speedup_p50_cpu"] == 1.0 and result.rows[1]["latency_ms_p50_cpu"] > 0
    assert abs(result.rows[0]["test_accuracy"] - result.rows[1]["test_accuracy"]) <= 0.01
    header = result.markdown.splitlines()[0]
    assert "| runtime |" in header and "| onnxruntime |" in result.markdown and "| openvino |" in result.markdown
    auto = run_benchmark(BenchmarkConfig(model="tiny_cnn", runtime="auto", **quick, **TINY), show_progress=False)
    (row,) = auto.rows
    timed = {k.removeprefix("auto_latency_ms_p50_cpu_"): v for k, v in row.items()
             if k.startswith("auto_latency_ms_p50_cpu_")}
    assert set(timed) >= {"onnxruntime", "openvino"} and row["runtime"].replace("-", "_") == min(timed,
                                                                                                key=timed.get)


def _search(tmp_path, **kw) -> SearchConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    space = tmp_path / "space.yaml"
    space.write_text("prune: {ratio: [0.3, 0.6]}\nquantize: {bits: [8]}\nfinetune: {epochs: [1, 1], lr: [0.01, "
                     "0.01]}\n")
    values = dict(model="tiny_mlp", storage=f"sqlite:///{tmp_path / 'optuna.db'}", trials=2, pruner="none",
                  budget_ratio=0.5, space=str(space), export=True, benchmark=False, **TINY)
    return SearchConfig(**{**values, **kw})


def test_a_search_winner_that_fails_its_deploy_check_leaves_no_version_or_alias(experiment, tmp_path, monkeypatch):
    import mcp.stages.search as search

    run_train(TrainConfig(model="tiny_mlp", epochs=2, **TINY), show_progress=False)
    client = MlflowClient()
    name = "tiny_mlp-synthetic"
    first = search.run_search(_search(tmp_path), show_progress=False).winners[0]  # a challenger exists
    assert client.get_model_version_by_alias(name, "challenger").version == int(first["version"])
    versions = {v.version for v in client.search_model_versions(f"name='{name}'")}

    # the winner's own deploy check fails: refused before anything of it is registered
    monkeypatch.setattr(search, "parity_failure", lambda *a, **k: "agreement 0.5000: made to fail")
    with pytest.raises(McpError, match=r"winner failed the deploy check \(onnx_int8_weights, onnxruntime\): agreement 0.5000.*"
                                       r"nothing was registered"):
        search.run_search(_search(tmp_path / "b", trials=1, study_name="b"), show_progress=False)
    assert {v.version for v in client.search_model_versions(f"name='{name}'")} == versions
    monkeypatch.undo()

    # the export after it fails: what this search registered goes, the alias goes back
    def failing(cfg, show_progress=None):
        raise McpError(f"parity check failed for {cfg.model_uri!r}: made to fail; nothing was logged or registered")

    monkeypatch.setattr(search, "run_export", failing)
    with pytest.raises(McpError, match=r"made to fail; .*removed what this search registered: version\(s\) \d+ of "
                                       r"tiny_mlp-synthetic; the challenger alias is back on version "
                                       + first["version"]):
        search.run_search(_search(tmp_path / "c", trials=1, study_name="c"), show_progress=False)
    assert {v.version for v in client.search_model_versions(f"name='{name}'")} == versions
    assert client.get_model_version_by_alias(name, "challenger").version == int(first["version"])


def test_a_latency_search_with_runtime_auto_times_every_runtime_and_its_winner_meets_the_budget_where_it_runs(
        experiment, tmp_path, monkeypatch):
    """OpenVINO stands in as twice as fast as ONNX Runtime for every file (a deterministic
    function of the channels kept), so the test does not depend on this machine's timing."""
    import mcp.stages.search as search
    import mcp.tuner.trial as trial_module
    from mcp.deploy import deployable
    from mcp.evaluation import ort_bench

    run_train(TrainConfig(model="tiny_cnn", epochs=2, **TINY), show_progress=False)
    # The accuracy rule of the winner's checks is another test's (test_a_search_winner_that_
    # fails_its_deploy_check_...). Here the model is near chance on 64 images, and OpenVINO's
    # INT8 results vary between CPUs and runs: one flipped image is 1.56 points (56.25%
    # against PyTorch's 57.81% failed this test on CI). Both checks a winner passes, the
    # search's deploy check and its export's parity check, go through parity_failure.
    def loose(fmt, result, rules, *args, **kwargs):
        rules = dataclasses.replace(rules, max_accuracy_drop=0.05, lossy_min_agreement=0.9)
        return parity_failure(fmt, result, rules, *args, **kwargs)

    monkeypatch.setattr(search, "parity_failure", loose)
    monkeypatch.setattr(deployable, "parity_failure", loose)
    factor = {"onnxruntime": 1.0, "openvino": 0.5}
    monkeypatch.setattr(runtimes, "available", lambda: ["onnxruntime", "openvino"])
    timed = []

    def fake_measure(path, shape, device="cpu", threads=1, batch=1, warmup=0, iters=0, seconds=0.0,
                     runtime="onnxruntime"):
        import onnx

        weights = sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)
        timed.append(runtime)
        return {"p50_ms": factor[runtime] * weights / 1000, "batch_p50_ms": 0.0}

    def fake_compare(paths, shape, threads=1, seconds=0.5, rounds=4, runtimes=None):
        return [fake_measure(p, shape, runtime=r)["p50_ms"] for p, r in zip(paths, runtimes or
                                                                           ["onnxruntime"] * len(paths))]

    monkeypatch.setattr(trial_module, "measure_onnx", fake_measure)
    monkeypatch.setattr(ort_bench, "compare", fake_compare)
    space = tmp_path / "space.yaml"
    space.write_text("prune: {ratio: [0.0, 0.8], granularity: [structured]}\nquantize: {bits: [8]}\n"
                     "finetune: {epochs: [1, 1]}\n")
    from mcp.models import create_model

    dense = sum(p.numel() for p in create_model("tiny_cnn", 4, (3, 8, 8)).parameters()) / 1000
    budget = 0.4 * dense  # beyond reach on ONNX Runtime without pruning, and within reach on OpenVINO
    cfg = SearchConfig(model="tiny_cnn", storage=f"sqlite:///{tmp_path / 'optuna.db'}", trials=2, pruner="none",
                       budget_ratio=0.0, budget_ms=budget, space=str(space), runtime="auto", fill_budget=False,
                       export=True, benchmark=False, **TINY)
    result = search.run_search(cfg, show_progress=False)
    assert {"onnxruntime", "openvino"} <= set(timed)  # every trial timed in both; the faster counts
    for t in result.trials:
        if t["latency_ms_p50_cpu"] is not None:
            assert t["state"] == ("infeasible" if t["latency_ms_p50_cpu"] > budget else "complete")
    (winner,) = result.winners
    client = MlflowClient()
    version = client.get_model_version("tiny_cnn-synthetic", winner["version"])
    assert version.tags["runtime"] == winner["runtime"] == "openvino"
    run = client.get_run(winner["run_id"])
    assert run.data.metrics["latency_ms_p50_cpu"] <= budget and run.data.tags["mcp.runtime"] == "openvino"
    assert run.data.metrics["latency_ms_p50_cpu_onnxruntime"] == 2 * run.data.metrics["latency_ms_p50_cpu_openvino"]
    exported = client.get_model_version("tiny_cnn-synthetic", winner["onnx_version"])
    assert exported.tags["runtime"] == "openvino"  # exported and checked where it runs


def test_the_uniform_start_tag_states_the_ratios_the_trial_ran(experiment, tmp_path, monkeypatch):
    """A latency budget met by the dense model: the bisection's ratio is 0, one layer's
    least is 0.5, so the trial runs 0 in one layer and 0.5 in the other; the tag says so
    (it said "ratio 0.0000 in every layer")."""
    import mcp.stages.search as search
    import mcp.tuner.objective as objective
    import mcp.tuner.trial as trial_module

    run_train(TrainConfig(model="tiny_cnn", epochs=1, **TINY), show_progress=False)

    def fake(model, shape, calib, seconds=0.5, batch=1, runtime="onnxruntime"):
        return float(sum(p.numel() for p in model.parameters())) / 1000

    monkeypatch.setattr(trial_module, "deployed_latency", fake)
    monkeypatch.setattr(objective, "deployed_latency", fake)
    space = tmp_path / "space.yaml"
    space.write_text("prune: {ratio: [0.0, 0.8], granularity: [structured]}\nquantize: {bits: [8]}\n"
                     "finetune: {epochs: [1, 1]}\nlayers:\n  features.4: {ratio: [0.5, 0.8]}\n")
    cfg = SearchConfig(model="tiny_cnn", storage=f"sqlite:///{tmp_path / 'optuna.db'}", trials=1, pruner="none",
                       budget_ratio=0.0, budget_ms=1e6, space=str(space), fill_budget=False, register=False,
                       export=False, benchmark=False, **TINY)
    result = search.run_search(cfg, show_progress=False)
    tag = MlflowClient().get_run(result.run_id).data.tags["mcp.uniform_start"]
    ran = result.trials[0]["ratios"]
    assert ran["features.4"] == 0.5 and ran["features.0"] == 0.0
    assert "in every layer" not in tag and "clipped to each layer's range: features.0 at 0; features.4 at 0.5" in tag, tag


def test_layer_speeds_are_timed_in_each_runtime_and_cached_apart(tmp_path, monkeypatch):
    """OpenVINO runs the same single-node models (u8 in and out for INT8); its timings are
    cached under their own key, beside ONNX Runtime's, and read back without timing."""
    import onnx

    from mcp.deploy import kernel_speed
    from mcp.deploy.onnx import export_onnx
    from mcp.models import create_model

    path = export_onnx(create_model("tiny_cnn", 4, (3, 8, 8)), (3, 8, 8), tmp_path / "m.onnx")
    cache = tmp_path / "cache.json"
    ort = kernel_speed.layer_speeds(path, cache=cache)
    ov = kernel_speed.layer_speeds(path, cache=cache, runtime="openvino")
    assert [s.signature for s in ov] == [s.signature for s in ort]
    assert all(s.fp32_ms > 0 and s.int8_ms > 0 for s in ov)
    stored = __import__("json").loads(cache.read_text())
    key = kernel_speed.machine_key(1, "openvino")
    assert set(stored) == {kernel_speed.machine_key(1), key} and "openvino" in key
    assert set(stored[key]) == {s.signature for s in ov}
    assert len(ov) == len(kernel_speed.weighted_nodes(onnx.load(str(path))))

    def no_timing(*args, **kwargs):
        raise AssertionError("a cached shape was timed again")

    monkeypatch.setattr(kernel_speed, "time_pair", no_timing)
    assert kernel_speed.layer_speeds(path, cache=cache, runtime="openvino") == ov


def test_precision_speed_on_auto_chooses_int8_layers_on_each_runtime_and_keeps_the_fastest_file(experiment,
                                                                                               monkeypatch, tmp_path):
    """ONNX Runtime runs the first layer faster in INT8, OpenVINO the second (made so, not
    timed); OpenVINO's file is timed faster (made so). The registered deployable is
    OpenVINO's: INT8 in the second layer only, recorded to run there."""
    import onnx

    from mcp import tracking
    from mcp.deploy import kernel_speed
    from mcp.evaluation import ort_bench

    real = kernel_speed.layer_speeds
    fast = {"onnxruntime": 0, "openvino": 1}

    def decided(path, threads=1, cache=None, runtime="onnxruntime"):
        return [kernel_speed.LayerSpeed(s.node, s.signature, 1.0, 0.5 if i == fast[runtime] else 2.0)
                for i, s in enumerate(real(path, threads, cache, "onnxruntime"))]

    def compare(paths, shape, threads=1, seconds=0.5, rounds=4, runtimes=None):
        return [{"onnxruntime": 2.0, "openvino": 1.0}[r] for r in runtimes or ["onnxruntime"] * len(paths)]

    monkeypatch.setattr(kernel_speed, "layer_speeds", decided)
    monkeypatch.setattr(ort_bench, "compare", compare)
    monkeypatch.setattr(runtimes, "available", lambda: ["onnxruntime", "openvino"])
    source = _trained(epochs=12)
    result = run_quantize(QuantizeConfig(model="tiny_cnn", model_uri=source, precision="speed", runtime="auto",
                                         **TINY), show_progress=False)
    assert result.tags["mcp.runtime"] == "openvino"
    assert "where OpenVINO runs their shapes faster" in result.tags["mcp.deploy_note"]
    assert result.metrics["latency_ms_p50_cpu_openvino"] == 1.0
    assert result.metrics["latency_ms_p50_cpu_onnxruntime"] == 2.0
    uri = f"models:/{result.registered_name}/{result.registered_version}"
    assert MlflowClient().get_model_version(result.registered_name, result.registered_version).tags["runtime"] == \
        "openvino"
    path, fmt = tracking.models.deployable_onnx(uri, tmp_path / "d")
    graph = onnx.load(str(path)).graph
    inits = {i.name for i in graph.initializer}
    quantized = [n.input[1] not in inits for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert fmt == "onnx_qdq_int8" and quantized == [False, True, False]  # OpenVINO's choice, not ONNX Runtime's
