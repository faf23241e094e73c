"""`mcp search`: spaces, a tiny study end to end, budgets, resuming, Pareto fronts, winners."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from conftest import runs_of
from mcp import tracking
from mcp.config import SearchConfig, TrainConfig
from mcp.errors import ConfigError, McpError
from mcp.evaluation.benchmark import non_dominated, pareto_front
from mcp.models import create_model
from mcp.pruning.pruner import layers_in_order
from mcp.tuner import uniform
from mcp.tuner.space import SPACES_DIR, build_space, read_space_file, resolve_space, space_file_for
from mcp.tuner.trial import compressed_size
from mcp.stages.search import STATE_TAG, run_search
from mcp.stages.train import run_train

TINY = dict(dataset="synthetic", input_shape="3x8x8", num_classes=4)
LENET = ["fc1", "fc2", "fc3"]


@pytest.fixture(autouse=True)
def _own_registry(own_store):
    """Each test registers its own tiny_mlp-synthetic versions."""


def _space(tmp_path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


def test_family_spaces_and_their_groups():
    for model, shape, file in (("lenet300_100", (1, 8, 8), "lenet.yaml"), ("resnet20", (1, 8, 8), "resnet.yaml"),
                               ("resnet18", (3, 32, 32), "resnet.yaml"), ("tiny_cnn", (3, 8, 8), "default.yaml")):
        path = space_file_for(model)
        assert path.name == file, model
        names = [n for n, _ in layers_in_order(create_model(model, 10, shape), shape)]
        space = build_space(read_space_file(path), names, path.name)
        assert sorted(n for members in space.units.values() for n in members) == sorted(names)  # every layer once
        if file == "resnet.yaml":  # one unit per stage: a 20-layer net is searched over a handful of units
            assert set(space.units) <= {"stem", "stage1", "stage2", "stage3", "stage4", "head"}
            assert space.bits_of["stem"] == (6, 8)
    lenet = build_space(read_space_file(space_file_for("lenet5")), ["features.0", "features.3", "classifier.1",
                                                                    "classifier.3", "fc3"], "lenet.yaml")
    assert lenet.ratio_of["fc3"] == (0.0, 0.999) and lenet.bits_of["fc3"] == (2, 3, 4, 5, 6, 8)


SHIPPED = ["default", "lenet", "resnet", "resnet_latency", "structured", "transformer"]


def test_a_shipped_space_is_named_by_its_name_and_a_file_by_its_path(tmp_path):
    for name in SHIPPED:
        assert resolve_space(name) == SPACES_DIR / f"{name}.yaml"
    assert resolve_space("", "lenet5").name == "lenet.yaml" and resolve_space("", "mynet").name == "default.yaml"
    own = _space(tmp_path, "prune: {ratio: [0.0, 0.5]}\n")
    assert resolve_space(own) == resolve_space(tmp_path / "space.yaml") == tmp_path / "space.yaml"
    with pytest.raises(ConfigError) as err:
        resolve_space("nosuch")
    assert str(err.value) == ("search space 'nosuch' does not exist: name a YAML file or a shipped space: "
                              + ", ".join(SHIPPED))
    with pytest.raises(ConfigError, match=r"'search_spaces/structured.yaml' does not exist: .*did you mean "
                                          r"'structured'\?\)$"):
        resolve_space("search_spaces/structured.yaml")  # the files' old place, relative to a checkout


def test_the_shipped_spaces_are_package_data():
    """The wheel carries every space: pyproject's package-data covers each file, the folder is a
    package (so packages.find takes it) and importlib.resources finds them."""
    import fnmatch
    import importlib.resources
    import tomllib

    from conftest import ROOT

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["mcp.tuner.spaces"]
    files = sorted(p.name for p in SPACES_DIR.iterdir() if p.suffix != ".py" and p.is_file())
    assert [f[:-5] for f in files] == SHIPPED
    assert all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files)
    assert any(fnmatch.fnmatch("mcp.tuner.spaces", pat) for pat in setuptools["packages"]["find"]["include"])
    assert (SPACES_DIR / "__init__.py").is_file()
    shipped = importlib.resources.files("mcp.tuner.spaces")
    assert sorted(r.name for r in shipped.iterdir() if r.name.endswith(".yaml")) == files
    assert not (ROOT / "search_spaces").exists()  # one copy of each space, the shipped one


@pytest.mark.parametrize("data, message", [
    ({"prune": {"ratio": [0.5, 0.2]}}, "prune.ratio=[0.5, 0.2] is an empty range"),
    ({"prune": {"ratio": [0.0, 1.0]}}, "prune.ratio=[0.0, 1.0] is outside [0.0, 1.0)"),
    ({"quantize": {"bits": [4, 9]}}, "bits 9 are outside the allowed bit-widths 2-8"),
    ({"quantize": {"bits": []}}, "must be a non-empty list of bit-widths"),
    ({"layers": {"fc9": {"bits": [4]}}}, "unknown layer 'fc9'; choose from: fc1, fc2, fc3"),
    ({"layers": {"fc1": {"ratios": [0, 1]}}}, "unknown key 'ratios' in s.yaml: layers.fc1"),
    ({"groups": {"g": ["fc9"]}}, "group 'g' names unknown layer 'fc9'"),
    ({"prune": {"granularity": ["channels"]}}, "'channels' is not allowed; choose from: unstructured, structured"),
    ({"finetune": {"epoch": [1, 2]}}, "unknown key 'epoch' in s.yaml: finetune"),
    ({"pruning": {}}, "unknown key 'pruning' in s.yaml"),
])
def test_an_invalid_space_is_a_clear_error(data, message):
    with pytest.raises(ConfigError) as info:
        build_space(data, LENET, "s.yaml")
    assert message in str(info.value)


def _cfg(tmp_path, **kw) -> SearchConfig:
    values = dict(model="tiny_mlp", storage=f"sqlite:///{tmp_path / 'optuna.db'}", trials=4, pruner="none",
                  budget_ratio=0.5, export=False, benchmark=False, **TINY)
    values.update(kw)
    return SearchConfig(**values)


SMALL_SPACE = """
prune: {ratio: [0.3, 0.9]}
quantize: {bits: [2, 4, 8]}
finetune: {epochs: [1, 2], lr: [0.005, 0.02]}
"""


def test_a_tiny_study_tracks_every_trial_registers_its_winner_and_resumes(experiment, tmp_path):
    run_train(TrainConfig(model="tiny_mlp", epochs=6, **TINY), show_progress=False)
    cfg = _cfg(tmp_path, space=_space(tmp_path, SMALL_SPACE), trials=5, export=True, benchmark=True)
    result = run_search(cfg, show_progress=False)
    client = MlflowClient()
    children = [r for r in runs_of(experiment) if r.data.tags.get("mlflow.parentRunId") == result.run_id]
    trial_runs = {r.data.tags["mcp.trial_number"]: r for r in children if r.info.run_name.startswith("trial-")}
    assert sorted(map(int, trial_runs)) == [0, 1, 2, 3, 4]
    for t in result.trials:
        run = trial_runs[str(t["number"])]
        assert run.data.tags[STATE_TAG] == t["state"] and t["state"] in ("complete", "infeasible")
        assert run.data.params["trial"] == str(t["number"])
        assert {k for k in run.data.params if k.startswith(("ratio.", "bits."))} == {
            "ratio.1", "ratio.3", "ratio.5", "bits.1", "bits.3", "bits.5"}
        if t["state"] == "complete":
            assert t["size_bytes_compressed"] <= result.budget_bytes
            assert "val_accuracy" in run.data.metrics
            if min(t["ratios"].values()) > 0.3:  # not at the space's low end: moved to spend the whole budget
                assert t["size_bytes_compressed"] >= 0.9 * result.budget_bytes
    first = result.trials[0]["params"]  # a new study starts from the uniform configuration that fills the budget
    assert len({v for k, v in first.items() if k.startswith("ratio.")}) == 1
    assert len({v for k, v in first.items() if k.startswith("bits.")}) == 1 and first["bits.1"] == 2
    (winner,) = result.winners
    best = max((t for t in result.trials if t["state"] == "complete"),
               key=lambda t: (t["val_accuracy"], -t["size_bytes_compressed"]))  # ties: the smaller
    assert winner["trial"] == best["number"] and winner["alias"] == "challenger"
    version = client.get_model_version_by_alias("tiny_mlp-synthetic", "challenger")
    assert str(version.version) == winner["version"] and version.tags["trial"] == str(best["number"])
    assert json.loads(version.tags["bits"]) == {k: best["params"][f"bits.{k}"] for k in ("1", "3", "5")}
    model = tracking.load_model("models:/tiny_mlp-synthetic@challenger")
    for name, bits in json.loads(version.tags["bits"]).items():  # each channel on its own b-bit grid
        weight = dict(model.named_modules())[name].weight.detach()
        assert max(len(row.unique()) for row in weight) <= 2 ** bits
        used = json.loads(version.tags["ratios"])[name]  # the ratio the trial used (moved to fill the budget)
        assert float((weight == 0).float().mean()) >= used - 0.02  # pruned, and the zeros kept
    assert winner["size_bytes_compressed"] <= result.budget_bytes
    artifacts = {a.path for a in client.list_artifacts(result.run_id)} | {
        a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert {"trials.csv", "plots/optimization_history.png"} <= artifacts

    # the winner was exported (a format=onnx version) and benchmarked against the starting model, as nested runs
    onnx_version = client.get_model_version("tiny_mlp-synthetic", winner["onnx_version"])
    assert onnx_version.tags["format"] == "onnx" and onnx_version.tags["source_model"].endswith(f"/{winner['version']}")
    # ... in the deployable form the winner logged: INT8 weights behind DequantizeLinear, the bytes it reported
    assert winner["deploy_format"] == onnx_version.tags["deploy_format"] == "onnx_int8_weights"
    assert winner["size_bytes_onnx"] == float(onnx_version.tags["size_bytes_onnx"])
    assert {"export", "benchmark"} <= {r.data.tags["mcp.stage"] for r in children}
    assert winner["latency_ms_p50_cpu"] > 0 and winner["speedup_p50_cpu"] > 0

    again = run_search(cfg.replace(trials=8, export=False, benchmark=False), show_progress=False)  # resumes to 8
    assert len(again.trials) == 8 and [t["number"] for t in again.trials] == list(range(8))
    assert MlflowClient().get_run(again.run_id).data.params["study_trials_before"] == "5"


def test_a_search_reports_every_trial_as_a_line_in_a_log_and_as_a_bar_on_a_terminal(experiment, tmp_path, capsys,
                                                                                       monkeypatch):
    import sys

    run_train(TrainConfig(model="tiny_mlp", epochs=2, **TINY), show_progress=False)
    result = run_search(_cfg(tmp_path, space=_space(tmp_path, SMALL_SPACE), trials=3), show_progress=None)
    err = capsys.readouterr().err
    name = result.study_name
    assert f"study {name!r}: 3 trials: the first " in err and "sampled by tpe" in err  # what the study starts from
    lines = [line for line in err.splitlines() if line.startswith(f"search {name}: ")]
    assert [line.split(": ")[1].split(",")[0] for line in lines] == ["1/3 trials", "2/3 trials", "3/3 trials"]
    for line, t in zip(lines, result.trials):
        assert f"trial {t['number']} {t['state']}" in line and f"of the {result.budget_bytes:,.0f} B budget" in line
        assert "best " in line or "no feasible trial yet" in line
    best = max((t for t in result.trials if t["state"] == "complete"), key=lambda t: t["val_accuracy"])
    assert f"best {best['val_accuracy']:.4f} (trial {best['number']})" in lines[-1]

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # a terminal: one bar, no lines
    run_search(_cfg(tmp_path, space=_space(tmp_path, SMALL_SPACE), trials=5), show_progress=None)
    err = capsys.readouterr().err
    assert f"search {name}" in err and "5/5" in err and "best " in err
    assert not any(line.startswith(f"search {name}: ") and "trials, trial" in line for line in err.splitlines())


def test_an_over_budget_trial_is_rejected_before_any_training(experiment, tmp_path, monkeypatch):
    import mcp.tuner.objective as objective
    import mcp.tuner.trial as trial_module

    run_train(TrainConfig(model="tiny_mlp", epochs=2, **TINY), show_progress=False)
    tuned_sizes = []
    real = trial_module.finetune_quantized

    def recording(model, shape, tc, *args, **kwargs):
        tuned_sizes.append(trial_module.compressed_size(model, shape, tc))
        return real(model, shape, tc, *args, **kwargs)

    monkeypatch.setattr(objective, "finetune_quantized", recording)  # what trials and the winner's rebuild call
    space = _space(tmp_path, "prune: {ratio: [0.0, 0.9]}\nquantize: {bits: [8]}\nfinetune: {epochs: [1, 1]}\n")
    result = run_search(_cfg(tmp_path, space=space, budget_ratio=0.12, fill_budget=False, trials=6, register=False),
                        show_progress=False)
    states = [t["state"] for t in result.trials]
    assert "infeasible" in states and "complete" in states, states
    for t in result.trials:
        assert (t["state"] == "infeasible") == (t["size_bytes_compressed"] > result.budget_bytes)
    # only the feasible trials (and the winner's rebuild) were fine-tuned, every one within the budget
    assert len(tuned_sizes) == states.count("complete") + 1
    assert max(tuned_sizes) <= result.budget_bytes
    for run in runs_of(experiment):
        if run.info.run_name.startswith("trial-") and run.data.tags[STATE_TAG] == "infeasible":
            assert "val_accuracy" not in run.data.metrics and "size_bytes_compressed" in run.data.metrics


def test_a_budget_on_the_onnx_file_prunes_channels_and_holds_for_the_exported_model(experiment, tmp_path):
    import onnx

    run_train(TrainConfig(model="tiny_mlp", epochs=4, **TINY), show_progress=False)
    space = _space(tmp_path, "prune: {ratio: [0.0, 0.8], granularity: [structured]}\nquantize: {bits: [4, 8]}\n"
                             "finetune: {epochs: [1, 1]}\n")
    result = run_search(_cfg(tmp_path, space=space, budget_ratio=0.12, budget_on="onnx", trials=3, export=True),
                        show_progress=False)
    done = [t for t in result.trials if t["state"] == "complete"]
    assert done and all(t["size_bytes_onnx"] <= result.budget_bytes for t in done)
    (winner,) = result.winners
    assert winner["size_bytes_onnx"] <= result.budget_bytes
    base = tracking.load_model("models:/tiny_mlp-synthetic@baseline")
    dense = uniform(build_space({}, [n for n, _ in layers_in_order(base, (3, 8, 8))]), 0.0, 8, 1, 0.01)
    assert compressed_size(base, (3, 8, 8), dense, on="onnx") > result.budget_bytes  # so channels had to go
    version = MlflowClient().get_model_version("tiny_mlp-synthetic", winner["onnx_version"])
    assert float(version.tags["size_bytes_onnx"]) == winner["size_bytes_onnx"]
    path = tracking.models.deployable_onnx(f"models:/tiny_mlp-synthetic/{winner['version']}", tmp_path / "d")[0]
    graph = onnx.load(str(path)).graph
    assert {i.data_type for i in graph.initializer if i.name.endswith("_int8")} == {onnx.TensorProto.INT8}
    assert any(n.op_type == "DequantizeLinear" for n in graph.node)
    model = tracking.load_model(f"models:/tiny_mlp-synthetic/{winner['version']}")
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in base.parameters())  # removed
    assert MlflowClient().get_run(result.run_id).data.params["budget_on"] == "onnx"


@pytest.mark.parametrize("budget_on, hint", [("compressed", ""), ("onnx", "stores pruned zeros densely")])
def test_an_unreachable_budget_is_a_clear_error_before_any_run(experiment, tmp_path, budget_on, hint):
    run_train(TrainConfig(model="tiny_mlp", epochs=1, **TINY), show_progress=False)
    before = len(runs_of(experiment))
    space = _space(tmp_path, "prune: {ratio: [0.0, 0.1]}\nquantize: {bits: [8]}\n")
    with pytest.raises(ConfigError) as info:
        run_search(_cfg(tmp_path, space=space, budget_mb=0.0005, budget_on=budget_on), show_progress=False)
    message = str(info.value)
    assert message.startswith("budget 500 B is below the smallest size space 'space.yaml' can reach")
    assert f"measured as {budget_on}" in message and hint in message and "\n" not in message
    assert len(runs_of(experiment)) == before


def test_a_pareto_study_returns_only_non_dominated_trials(experiment, tmp_path):
    run_train(TrainConfig(model="tiny_mlp", epochs=6, **TINY), show_progress=False)
    cfg = _cfg(tmp_path, space=_space(tmp_path, SMALL_SPACE), mode="pareto", budget_ratio=0.0, trials=6,
               sampler="nsga2", register=False)
    result = run_search(cfg, show_progress=False)
    done = [t for t in result.trials if t["state"] == "complete"]
    front = {done[i]["number"] for i in pareto_front([(t["size_bytes_compressed"], t["val_accuracy"]) for t in done])}
    assert {w["trial"] for w in result.winners} == front
    for t in done:  # every trial left out is beaten on both counts by a winner
        if t["number"] not in front:
            assert any(d["size_bytes_compressed"] <= t["size_bytes_compressed"] and d["val_accuracy"] >= t[
                "val_accuracy"] for d in done if d["number"] in front)
    assert "plots/pareto_front.png" in {a.path for a in MlflowClient().list_artifacts(result.run_id, "plots")}


def test_a_pareto_study_can_add_cpu_latency_as_a_third_objective(experiment, tmp_path):
    import optuna

    run_train(TrainConfig(model="tiny_mlp", epochs=4, **TINY), show_progress=False)
    cfg = _cfg(tmp_path, space=_space(tmp_path, SMALL_SPACE), mode="pareto", budget_ratio=0.0, trials=4,
               sampler="nsga2", register=False, latency=True)
    result = run_search(cfg, show_progress=False)
    study = optuna.load_study(study_name=cfg.name(), storage=cfg.storage)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE", "MINIMIZE"]
    done = [t for t in result.trials if t["state"] == "complete"]
    assert done and all(t["latency_ms_p50_cpu"] > 0 for t in done)
    for t in done:  # the latency the study optimised is the one the trial's run logged
        assert MlflowClient().get_run(t["mlflow_run_id"]).data.metrics["latency_ms_p50_cpu"] == t["latency_ms_p50_cpu"]
    points = [(-t["val_accuracy"], t["size_bytes_compressed"], t["latency_ms_p50_cpu"]) for t in done]
    assert {w["trial"] for w in result.winners} == {done[i]["number"] for i in non_dominated(points)}


def test_non_dominated_points():
    points = [(1, 5, 3), (2, 4, 3), (1, 5, 4), (3, 3, 3), (3, 3, 3), (0, 9, 9)]
    assert non_dominated(points) == [0, 1, 3, 4, 5]  # (1, 5, 4) loses to (1, 5, 3); equal points both stay
    assert pareto_front([(10, 0.9), (20, 0.95), (15, 0.85)]) == [0, 1]


@pytest.mark.parametrize("args, message", [
    (["--space", "missing.yaml"], "search space 'missing.yaml' does not exist: name a YAML file or a shipped space: "
                                  "default, lenet, resnet, resnet_latency, structured"),
    (["--budget-ratio", "0"], "mode max-accuracy needs a budget"),
    (["--storage", "nosuchdb://x"], "cannot open study"),
    (["--storage", "postgresql://mcp@127.0.0.1:1/optuna"], "cannot open study"),  # nothing listens: in seconds
    (["--trials", "0"], "trials=0 must be positive"),
    (["--latency"], "latency=true is an objective of mode pareto"),
])
def test_bad_input_is_one_line_without_a_run(cli, experiment, tmp_path, args, message):
    run_train(TrainConfig(model="tiny_mlp", epochs=1, **TINY), show_progress=False)
    before = len(runs_of(experiment))
    result = cli("search", "--model", "tiny_mlp", "--dataset", "synthetic", "--input-shape", "3x8x8",
                 "--num-classes", "4", "--storage", f"sqlite:///{tmp_path / 'o.db'}", *args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert len(runs_of(experiment)) == before


def test_resuming_in_another_mode_is_refused(cli, experiment, tmp_path):
    run_train(TrainConfig(model="tiny_mlp", epochs=1, **TINY), show_progress=False)
    space = _space(tmp_path, SMALL_SPACE)
    run_search(_cfg(tmp_path, space=space, trials=1, study_name="s"), show_progress=False)
    result = cli("search", "--model", "tiny_mlp", "--dataset", "synthetic", "--input-shape", "3x8x8",
                 "--num-classes", "4", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--study-name", "s",
                 "--mode", "pareto", "--space", space)
    assert result.exit_code == 2 and "was created for another mode" in result.output


def test_resuming_under_other_settings_or_from_another_model_is_refused_before_any_run(experiment, tmp_path):
    run_train(TrainConfig(model="tiny_mlp", epochs=1, **TINY), show_progress=False)
    space = _space(tmp_path, SMALL_SPACE)
    cfg = _cfg(tmp_path, space=space, trials=1, register=False)
    run_search(cfg, show_progress=False)
    before = len(runs_of(experiment))
    with pytest.raises(McpError, match=r"was run with budget_bytes \d+, this call has \d+; use --study-name"):
        run_search(cfg.replace(budget_ratio=0.4), show_progress=False)
    (tmp_path / "space.yaml").write_text(SMALL_SPACE.replace("[2, 4, 8]", "[4, 8]"))
    with pytest.raises(McpError, match="was run with search space 'space.yaml', this call has 'space.yaml, edited"):
        run_search(cfg, show_progress=False)
    (tmp_path / "space.yaml").write_text(SMALL_SPACE)
    run_train(TrainConfig(model="tiny_mlp", epochs=1, **TINY), show_progress=False)  # a new baseline: version 2
    before += 1
    with pytest.raises(McpError, match="searched from models:/tiny_mlp-synthetic/1, this call starts from "
                                       "models:/tiny_mlp-synthetic/2"):
        run_search(cfg, show_progress=False)
    assert len(runs_of(experiment)) == before
    assert len(run_search(cfg.replace(model_uri="models:/tiny_mlp-synthetic/1", trials=2),
                          show_progress=False).trials) == 2


def test_a_resumed_study_reuses_its_registered_winner_and_its_onnx_version(experiment, tmp_path, monkeypatch):
    import mcp.tuner.objective as objective

    run_train(TrainConfig(model="tiny_mlp", epochs=2, **TINY), show_progress=False)
    cfg = _cfg(tmp_path, space=_space(tmp_path, SMALL_SPACE), trials=2, export=True)
    (first,) = run_search(cfg, show_progress=False).winners
    versions = len(MlflowClient().search_model_versions("name='tiny_mlp-synthetic'"))

    def broken(*args, **kwargs):
        raise ValueError("no fine-tuning in this call")

    monkeypatch.setattr(objective, "finetune_quantized", broken)  # the new trial fails; a rebuild would too
    again = run_search(cfg.replace(trials=3), show_progress=False)  # one more trial: it fails, and its retries
    assert [t["state"] for t in again.trials[2:]] == ["failed"] * 3
    (winner,) = again.winners
    assert winner["reused"] and winner["trial"] == first["trial"]
    assert (winner["version"], winner["onnx_version"], winner["alias"]) == (first["version"], first["onnx_version"],
                                                                            "challenger")
    assert winner["test_accuracy"] == first["test_accuracy"] and winner["size_bytes_onnx"] == first["size_bytes_onnx"]
    assert len(MlflowClient().search_model_versions("name='tiny_mlp-synthetic'")) == versions


def test_promote_moves_champion_by_version_or_by_the_stated_policy(cli, experiment, tmp_path):
    run_train(TrainConfig(model="tiny_mlp", epochs=4, **TINY), show_progress=False)
    cfg = _cfg(tmp_path, space=_space(tmp_path, SMALL_SPACE), mode="pareto", budget_ratio=0.0, trials=4)
    result = run_search(cfg, show_progress=False)
    client = MlflowClient()
    best = max(result.winners, key=lambda w: (w["test_accuracy"], -w["size_bytes_compressed"], int(w["version"])))
    out = cli("promote", "tiny_mlp-synthetic", "--best")
    assert out.exit_code == 0, out.output
    assert str(client.get_model_version_by_alias("tiny_mlp-synthetic", "champion").version) == best["version"]
    out = cli("promote", "tiny_mlp-synthetic", "--version", "1")
    assert out.exit_code == 0 and f"(was {best['version']})" in out.output
    assert str(client.get_model_version_by_alias("tiny_mlp-synthetic", "champion").version) == "1"
    for args, message in ((["tiny_mlp-synthetic", "--version", "99"], "has no version '99'"),
                          (["tiny_mlp-synthetic"], "give exactly one of --version N and --best"),
                          (["ghost", "--best"], "registered model 'ghost' does not exist")):
        out = cli("promote", *args)
        assert out.exit_code == 2 and message in out.output and len(out.output.strip().splitlines()) == 1


def test_a_space_that_caps_a_layer_starts_from_uniform_where_allowed_and_says_why(experiment, tmp_path, capsys):
    """ResNet-20's space caps the stem's ratio, so no single ratio fits the budget: the
    study says so in one warning line and a run tag, and starts from every layer at one
    ratio and bit-width clipped to its range. (Before, it started from nothing, silently.)"""
    run_train(TrainConfig(model="tiny_mlp", epochs=2, **TINY), show_progress=False)
    space = _space(tmp_path, "prune: {ratio: [0.0, 0.9]}\nquantize: {bits: [4, 8]}\nfinetune: {epochs: [1, 1]}\n"
                             "layers:\n  '5': {ratio: [0.0, 0.2], bits: [8]}\n")
    capsys.readouterr()
    result = run_search(_cfg(tmp_path, space=space, budget_ratio=0.1, trials=1, register=False), show_progress=False)
    warning = result.uniform_warning
    assert warning.startswith("no uniform starting trial")
    assert "5 allows only 8 bits, not 4" in warning  # the head's bits exclude the fewest
    assert "5's ratio range [0, 0.2] excludes" in warning and "8 bits in every layer fits the budget" in warning
    assert "starting instead from uniform where allowed" in warning
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert err == [f"warning: {warning}"]
    tags = MlflowClient().get_run(result.run_id).data.tags
    assert tags["mcp.uniform_warning"] == warning and tags["mcp.uniform_start"].startswith("uniform where allowed")
    first = result.trials[0]["params"]  # one ratio and bit-width, clipped where the space caps them
    assert first["ratio.1"] == first["ratio.3"] > 0.2 and first["ratio.5"] == 0.2
    assert first["bits.1"] == first["bits.3"] == 4 and "bits.5" not in first  # the head has one choice: 8
    for w in result.winners:  # the starting model is the baseline: the figures against both are one
        assert w["compression_ratio_vs_baseline"] == w["compression_ratio"]
        assert w["accuracy_drop_vs_baseline"] == w["accuracy_drop"]


def test_a_space_every_layer_fits_starts_from_strictly_uniform_without_a_warning(experiment, tmp_path):
    from mcp.tuner.objective import SearchProblem, enqueue_uniform
    from mcp.tuner.study import load_space

    class Study:  # what enqueue_uniform asks of an Optuna study
        def __init__(self):
            self.queued = []

        def enqueue_trial(self, params, user_attrs=None, skip_if_exists=False):
            self.queued.append(params)

    run_train(TrainConfig(model="tiny_mlp", epochs=1, **TINY), show_progress=False)
    base = tracking.load_model("models:/tiny_mlp-synthetic@baseline")
    cfg = _cfg(tmp_path, space=_space(tmp_path, "prune: {ratio: [0.0, 0.9]}\nquantize: {bits: [4, 8]}\n"))
    space, _ = load_space(cfg, base, (3, 8, 8))
    study = Study()
    start = enqueue_uniform(study, SearchProblem(space, base, (3, 8, 8), None, "cpu", [], 4000.0), True)
    assert start.warning == "" and len(study.queued) == 2 and start.describe().startswith("uniform: ratio")
    assert sorted({v for k, v in study.queued[0].items() if k.startswith("bits.")}
                  | {v for k, v in study.queued[1].items() if k.startswith("bits.")}) == [4, 8]  # every bit-width
    for params in study.queued:  # one ratio, one bit-width in every layer
        assert len({v for k, v in params.items() if k.startswith("ratio.")}) == 1
        assert len({v for k, v in params.items() if k.startswith("bits.")}) == 1


@pytest.mark.slow  # a real kill -9; the fast test_scale_out checks the same sweep in-process
def test_a_worker_killed_mid_trial_leaves_nothing_running_and_the_trial_is_retried(tmp_path):
    """kill -9 of a search worker during a trial: the next worker on the study fails the
    stale trial (no heartbeat), queues it once more, and ends its MLflow runs KILLED."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import warnings

    import mlflow
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    storage = f"sqlite:///{tmp_path}/optuna.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_EXPERIMENT")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    args = [sys.executable, "-m", "mcp", "search", "--model", "tiny_mlp", "--dataset", "synthetic",
            "--input-shape", "3x8x8", "--num-classes", "4", "--budget-ratio", "0.3", "--heartbeat", "1",
            "--storage", storage, "--register", "false", "--export", "false", "--benchmark", "false",
            "--pruner", "none",  # trials long enough (30 epochs) to be caught running
            "--space", _space(tmp_path, SMALL_SPACE.replace("epochs: [1, 2]", "epochs: [30, 30]"))]
    log = open(tmp_path / "worker.log", "w")
    args += ["--trials", "3"]
    worker = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=log, stderr=log)
    killed, seen, polls = None, set(), None
    deadline = time.time() + 240
    try:
        while killed is None and time.time() < deadline and worker.poll() is None:
            time.sleep(0.05)
            if polls is None:  # one storage for every poll: opening one per poll took most of a window
                if not (tmp_path / "optuna.db").exists():
                    continue
                try:
                    polls = optuna.storages.RDBStorage(storage)
                except Exception:  # noqa: BLE001 - the worker is creating its tables right now: look again
                    continue
            try:
                study = optuna.load_study(study_name="tiny_mlp-synthetic-max-accuracy", storage=polls)
            except KeyError:
                continue  # not created yet
            running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
            seen.update(t.number for t in running)
            if running and running[0].number >= 1 and "mlflow_run_id" in running[0].user_attrs:
                os.kill(worker.pid, signal.SIGKILL)
                killed = running[0].number
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait()
    log.close()
    assert killed is not None, f"seen running: {sorted(seen)}\n" + (tmp_path / "worker.log").read_text()[-3000:]
    time.sleep(3.5)  # three heartbeats of silence: the trial is stale

    again = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True)  # the same command
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"warning: trial {killed} of study 'tiny_mlp-synthetic-max-accuracy' was left running" in again.stderr
    study = optuna.load_study(study_name="tiny_mlp-synthetic-max-accuracy", storage=storage)
    states = {t.number: t.state for t in study.trials}
    assert states[killed] == optuna.trial.TrialState.FAIL
    assert optuna.trial.TrialState.RUNNING not in states.values()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retried = [t for t in study.trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed]
    assert len(retried) == 1 and retried[0].state == optuna.trial.TrialState.COMPLETE
    assert retried[0].params == study.trials[killed].params
    # it resumed to the requested total: 3 finished trials besides the killed one
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 3 + ["FAIL"]

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    finally:
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    by_id = {r.info.run_id: r for r in runs}
    killed_run = by_id[study.trials[killed].user_attrs["mlflow_run_id"]]
    assert killed_run.info.status == "KILLED"
    assert by_id[killed_run.data.tags["mlflow.parentRunId"]].info.status == "KILLED"  # the dead worker's study run
