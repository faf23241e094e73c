"""Deployment-aware compression: per-layer precision by measured speed, a latency budget for
the search, kernel-friendly widths, and the deployed latency every registered model reports."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from mlflow import MlflowClient

from conftest import runs_of
from mcp import tracking
from mcp.config import ExportConfig, PruneConfig, QuantizeConfig, SearchConfig, TrainConfig
from mcp.errors import ConfigError, McpError
from mcp.deploy import kernel_speed
from mcp.models import create_model
from mcp.stages.export import run_export
from mcp.stages.prune import run_prune
from mcp.stages.quantize import run_quantize
from mcp.stages.search import run_search
from mcp.stages.train import run_train

TINY = dict(dataset="synthetic", input_shape="3x8x8", num_classes=4)


def _experiment() -> str:
    """The active experiment of the test's own store (its registry holds only its models)."""
    from mlflow.tracking.fluent import _get_experiment_id

    return _get_experiment_id()


def _onnx(tmp_path, name="tiny_cnn"):
    from mcp.deploy.onnx import export_onnx

    return export_onnx(create_model(name, 4, (3, 8, 8)), (3, 8, 8), tmp_path / "m.onnx")


def test_layer_speeds_time_every_conv_and_gemm_once_per_shape_and_cache_them(tmp_path, monkeypatch):
    path = _onnx(tmp_path)
    cache = tmp_path / "cache.json"
    speeds = kernel_speed.layer_speeds(path, cache=cache)
    nodes = kernel_speed.weighted_nodes(onnx.load(str(path)))
    assert [s.node for s in speeds] == [n.name for n in nodes] and len(speeds) >= 2
    assert all(s.fp32_ms > 0 and s.int8_ms > 0 for s in speeds)
    assert {n.op_type for n in nodes} == {"Conv", "Gemm"}
    stored = __import__("json").loads(cache.read_text())
    assert list(stored) == [kernel_speed.machine_key(1)]  # keyed by CPU model, ONNX Runtime version, threads
    assert set(stored[kernel_speed.machine_key(1)]) == {s.signature for s in speeds}

    def no_timing(*args, **kwargs):
        raise AssertionError("a cached shape was timed again")

    monkeypatch.setattr(kernel_speed, "time_pair", no_timing)
    assert kernel_speed.layer_speeds(path, cache=cache) == speeds
    monkeypatch.undo()
    broken = {kernel_speed.machine_key(1): {speeds[0].signature: "fast", speeds[1].signature: [0.1, 0.2]}, "x": 3}
    cache.write_text(__import__("json").dumps(broken))  # a malformed entry is timed again, the rest kept
    again = kernel_speed.layer_speeds(path, cache=cache)
    assert again[1].fp32_ms == 0.1 and again[0].fp32_ms > 0


def _only_first_layer_faster(monkeypatch):
    """INT8 faster in the first layer only: a decision the machine's timing cannot blur."""
    real = kernel_speed.layer_speeds

    def decided(path, threads=1, cache=None, runtime="onnxruntime"):
        return [kernel_speed.LayerSpeed(s.node, s.signature, 1.0, 0.5 if i == 0 else 2.0)
                for i, s in enumerate(real(path, threads, cache, runtime))]

    monkeypatch.setattr(kernel_speed, "layer_speeds", decided)


def _deployed_faster(monkeypatch, faster: bool = True):
    """The deployed file timed faster (or slower) than the others, whatever this machine says."""
    import mcp.evaluation.ort_bench as ort_bench

    monkeypatch.setattr(ort_bench, "compare", lambda paths, *a, **k: [1.0 if faster else 2.0] +
                        [1.5] * (len(paths) - 1))


def test_precision_speed_deploys_int8_only_where_faster_and_passes_parity(own_store, tmp_path, monkeypatch):
    _only_first_layer_faster(monkeypatch)
    _deployed_faster(monkeypatch)
    run_train(TrainConfig(model="tiny_cnn", epochs=12, **TINY), show_progress=False)  # confident predictions
    result = run_quantize(QuantizeConfig(model="tiny_cnn", precision="speed", **TINY), show_progress=False)
    m = result.metrics
    assert (m["int8_layers"], m["float_layers"]) == (1.0, 2.0)
    assert m["onnx_agreement"] >= 0.99 and abs(m["onnx_test_accuracy"] - m["test_accuracy"]) <= 0.02
    assert "INT8 in 1 of 3 layers" in result.tags["mcp.deploy_note"]
    uri = f"models:/{result.registered_name}/{result.registered_version}"
    path, fmt = tracking.models.deployable_onnx(uri, tmp_path / "d")
    graph = onnx.load(str(path)).graph
    convs = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    inits = {i.name for i in graph.initializer}
    # the first layer's weight comes through DequantizeLinear; the others are float initializers
    assert convs[0].input[1] not in inits and all(n.input[1] in inits for n in convs[1:])
    assert fmt == "onnx_qdq_int8"
    exported = run_export(ExportConfig(model="tiny_cnn", model_uri=uri, **TINY), show_progress=False)
    assert exported.metrics["onnx_agreement"] >= 0.99  # the export's parity check against the mixed model


def test_precision_speed_refuses_a_mixed_model_slower_than_its_start(own_store, monkeypatch):
    _only_first_layer_faster(monkeypatch)
    _deployed_faster(monkeypatch, faster=False)
    run_train(TrainConfig(model="tiny_cnn", epochs=1, **TINY), show_progress=False)
    with pytest.raises(McpError) as info:
        run_quantize(QuantizeConfig(model="tiny_cnn", precision="speed", **TINY), show_progress=False)
    assert str(info.value) == (
        "precision speed: the ptq_int8 model with INT8 in 1 of 3 layers deploys slower than the model it started "
        "from: 2.000 ms against 1.500 ms in ONNX Runtime (CPU p50, batch 1, one thread); the conversions where "
        "INT8 and float32 layers meet cost more than those layers gain; deploy the float32 model (mcp export), or "
        "use --precision int8 for the smaller file")
    assert [str(v.version) for v in MlflowClient().search_model_versions("name='tiny_cnn-synthetic'")] == ["1"]
    (run,) = [r for r in runs_of(_experiment()) if r.data.tags.get("mcp.stage") == "quantize"]
    assert run.info.status == "FAILED" and not MlflowClient().list_artifacts(run.info.run_id, "onnx")


def test_precision_speed_with_no_faster_layer_is_one_clear_error(own_store, monkeypatch):
    real = kernel_speed.layer_speeds
    monkeypatch.setattr(kernel_speed, "layer_speeds", lambda path, threads=1, cache=None, runtime="onnxruntime": [
        kernel_speed.LayerSpeed(s.node, s.signature, 1.0, 1.5) for s in real(path, threads, cache, runtime)])
    run_train(TrainConfig(model="tiny_cnn", epochs=1, **TINY), show_progress=False)
    with pytest.raises(McpError, match=r"^precision speed: no layer of this model runs at least 10% faster"):
        run_quantize(QuantizeConfig(model="tiny_cnn", precision="speed", **TINY), show_progress=False)
    with pytest.raises(ConfigError, match="precision=speed .* is for method ptq_int8, not qat"):
        QuantizeConfig(method="qat", precision="speed")


def test_round_to_keeps_pruned_channel_counts_at_multiples(own_store):
    run_train(TrainConfig(model="tiny_cnn", epochs=1, **TINY), show_progress=False)
    result = run_prune(PruneConfig(model="tiny_cnn", granularity="structured", scope="layerwise", sparsity=0.6,
                                   round_to=4, epochs=1, **TINY), show_progress=False)
    convs = [m for m in result.model.modules() if isinstance(m, __import__("torch").nn.Conv2d)]
    assert convs and all(c.out_channels % 4 == 0 for c in convs)
    plain = run_prune(PruneConfig(model="tiny_cnn", granularity="structured", scope="layerwise", sparsity=0.6,
                                  epochs=1, register=False, **TINY), show_progress=False)
    assert any(m.out_channels % 4 for m in plain.model.modules() if isinstance(m, __import__("torch").nn.Conv2d))
    with pytest.raises(ConfigError, match="round_to=8 .* granularity structured"):
        PruneConfig(round_to=8)


def _search_cfg(tmp_path, space_text, **kw) -> SearchConfig:
    space = tmp_path / "space.yaml"
    space.write_text(space_text)
    values = dict(model="tiny_cnn", storage=f"sqlite:///{tmp_path / 'optuna.db'}", trials=3, pruner="none",
                  budget_ratio=0.0, space=str(space), export=False, benchmark=False, **TINY)
    values.update(kw)
    return SearchConfig(**values)


STRUCTURED = "prune: {ratio: [0.0, 0.8], granularity: [structured]}\nquantize: {bits: [8]}\nfinetune: {epochs: [1, 1]}\n"


def test_a_latency_budget_rejects_slow_trials_before_fine_tuning(own_store, tmp_path, monkeypatch):
    """Latency stands in for a deterministic function of the channels kept, so the test does
    not depend on this machine's timing; the real measurement is the next test's."""
    import mcp.tuner.objective as objective
    import mcp.tuner.trial as trial_module

    run_train(TrainConfig(model="tiny_cnn", epochs=2, **TINY), show_progress=False)
    def fake(model, shape, calib, seconds=0.5, batch=1, runtime="onnxruntime"):  # a batch of n costs n images
        return batch * float(sum(p.numel() for p in model.parameters())) / 1000

    monkeypatch.setattr(trial_module, "deployed_latency", fake)  # what the space's smallest latency uses
    monkeypatch.setattr(objective, "deployed_latency", fake)  # what trials use
    tuned = []
    real = trial_module.finetune_quantized
    monkeypatch.setattr(objective, "finetune_quantized", lambda *a, **k: tuned.append(1) or real(*a, **k))
    base = tracking.load_model("models:/tiny_cnn-synthetic@baseline")
    dense = fake(base, None, None)
    result = run_search(_search_cfg(tmp_path, STRUCTURED, budget_ms=dense * 0.5, trials=6, register=False,
                                    fill_budget=False), show_progress=False)
    states = [t["state"] for t in result.trials]
    assert "infeasible" in states and "complete" in states, states
    for t in result.trials:
        assert (t["state"] == "infeasible") == (t["latency_ms_p50_cpu"] > dense * 0.5)
    assert len(tuned) == states.count("complete") + 1  # the feasible trials and the winner's rebuild alone
    for run in runs_of(_experiment()):
        if run.info.run_name.startswith("trial-") and run.data.tags.get("mcp.trial_state") == "infeasible":
            assert "val_accuracy" not in run.data.metrics and "latency_ms_p50_cpu" in run.data.metrics
    # filled: each trial's sampled ratios move along a line until it just meets the budget, here a
    # throughput budget (a batch of 4 within the time), which every measurement gets
    filled = run_search(_search_cfg(tmp_path, STRUCTURED, budget_ms=dense * 2, budget_batch=4, trials=3,
                                    register=False, study_name="filled"), show_progress=False)
    assert all(t["state"] == "complete" for t in filled.trials)
    assert all(dense * 1.2 < t["batch_latency_ms_p50_cpu"] <= dense * 2 for t in filled.trials), filled.trials
    assert all(t["latency_ms_p50_cpu"] is None for t in filled.trials)
    winner = MlflowClient().get_run(filled.winners[0]["run_id"])
    assert winner.data.metrics["batch_latency_ms_p50_cpu"] <= dense * 2
    assert winner.data.tags["mcp.within_budget"] == "true"


@pytest.mark.parametrize("batch, budget_ms", [(0, 1.0), (-2, 1.0), (4, 0.0)])
def test_a_throughput_budget_needs_a_batch_and_a_time(batch, budget_ms):
    with pytest.raises(ConfigError, match=f"budget_batch={batch} must be 1 or more"):
        SearchConfig(model="tiny_cnn", budget_ms=budget_ms, budget_batch=batch, **TINY)


def test_a_batch_call_is_timed_for_a_throughput_budget(tmp_path):
    from mcp.tuner.trial import deployed_latency

    import torch

    model = create_model("tiny_cnn", 4, (3, 8, 8))
    calib = [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))]
    one = deployed_latency(model, (3, 8, 8), calib, seconds=0.1)
    many = deployed_latency(model, (3, 8, 8), calib, seconds=0.1, batch=256)
    assert 0 < one < many  # one call at 256 images, not one image's share of it


@pytest.mark.slow
def test_a_latency_budget_met_on_real_timings(own_store, tmp_path):
    run_train(TrainConfig(model="tiny_cnn", epochs=2, **TINY), show_progress=False)
    result = run_search(_search_cfg(tmp_path, STRUCTURED, budget_ms=50.0, trials=2), show_progress=False)
    (winner,) = result.winners
    assert all(0 < t["latency_ms_p50_cpu"] <= 50.0 for t in result.trials)
    run = MlflowClient().get_run(winner["run_id"])
    assert run.data.metrics["latency_ms_p50_cpu"] <= 50.0 and run.data.tags["mcp.within_budget"] == "true"
    assert run.data.metrics["baseline_latency_ms_p50_cpu"] > 0


def test_a_latency_budget_nothing_can_meet_is_refused_before_any_run(own_store, tmp_path):
    run_train(TrainConfig(model="tiny_cnn", epochs=1, **TINY), show_progress=False)
    before = len(runs_of(_experiment()))
    with pytest.raises(ConfigError) as info:
        run_search(_search_cfg(tmp_path, STRUCTURED, budget_ms=1e-6, study_name="fast"), show_progress=False)
    message = str(info.value)
    assert message.startswith("budget_ms=1e-06 is below the smallest latency space 'space.yaml' can reach on "
                              "this CPU (") and "\n" not in message
    reached = float(message.split("reach on this CPU (")[1].split(" ms")[0])
    assert 0 < reached < 50
    assert len(runs_of(_experiment())) == before  # refused before any run, so before any fine-tuning


def test_a_model_that_deploys_slower_than_its_start_says_so_once(own_store, monkeypatch):
    import mcp.evaluation.ort_bench as ort_bench

    run_train(TrainConfig(model="tiny_cnn", epochs=1, **TINY), show_progress=False)
    monkeypatch.setattr(ort_bench, "compare", lambda paths, *a, **k: [2.0] + [1.0] * (len(paths) - 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_quantize(QuantizeConfig(model="tiny_cnn", **TINY), show_progress=False)
    said = [str(w.message) for w in caught if w.category.__name__ == "DeploymentWarning"]
    assert said == ["the ptq_int8 model deploys slower than the model it started from: 2.000 ms against 1.000 ms "
                    "in ONNX Runtime (CPU p50, batch 1, one thread)"]
    assert result.metrics["speedup_p50_cpu_vs_parent"] == 0.5
    version = MlflowClient().get_model_version(result.registered_name, result.registered_version)
    assert float(version.tags["parent_latency_ms_p50_cpu"]) == 1.0


def test_compare_times_models_side_by_side(tmp_path):
    from mcp.evaluation.ort_bench import compare

    path = _onnx(tmp_path)
    p50 = compare([str(path), str(path)], (3, 8, 8), seconds=0.05)
    assert len(p50) == 2 and all(np.isfinite(p) and p > 0 for p in p50)


def test_float_layers_stay_float_in_a_residual_graph_whose_order_preprocessing_changes(tmp_path):
    """ONNX Runtime's pre-processing writes a residual block's shortcut before its convolutions:
    the layers left float are named on the export, whose order is the model's."""
    import torch

    from mcp.deploy.onnx import export_onnx
    from mcp.pruning.pruner import layers_in_order
    from mcp.quantization.onnx_int8 import static_int8

    model = create_model("tiny_resnet", 4, (3, 8, 8)).eval()
    names = [n for n, _ in layers_in_order(model, (3, 8, 8))]
    shortcut = next(i for i, n in enumerate(names) if "shortcut" in n)
    path = export_onnx(model, (3, 8, 8), tmp_path / "fp32.onnx")
    float_node = kernel_speed.weighted_nodes(onnx.load(str(path)))[shortcut].name
    assert "shortcut" in float_node
    batches = [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)) for _ in range(2)]
    graph = onnx.load(str(static_int8(path, tmp_path / "q.onnx", batches, float_layers=[shortcut]))).graph
    inits = {i.name for i in graph.initializer}
    convs = {n.name: n for n in graph.node if n.op_type in ("Conv", "Gemm")}
    assert convs[float_node].input[1] in inits  # float32 weight
    assert all(n.input[1] not in inits for name, n in convs.items() if name != float_node)  # INT8 behind DQ
