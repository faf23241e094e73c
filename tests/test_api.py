"""The public Python API on a user's own nn.Module, and the proof that it is the stages'
implementation: the same call through the CLI stage gives the same weights."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import mcp
from mcp.data import load_dataset, make_loaders


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class UserNet(nn.Module):
    """A user's own class: a stem, a residual block, a depthwise conv, a custom head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block(8)
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(),
                                  nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.dw(self.block(self.stem(x))))


@pytest.fixture(scope="module")
def data():
    return make_loaders(load_dataset("digits"), 32, 0, 0)  # 1,797 real 8x8 digits


@pytest.fixture(scope="module")
def trained(data):
    """The user's model, trained by the user's own loop (here mcp's Trainer)."""
    from mcp.training import FineTune, Trainer

    torch.manual_seed(0)
    model = UserNet()
    ft = FineTune(epochs=8, lr=0.05)
    opt = ft.make_optimizer(model)
    Trainer(model, opt, ft.make_scheduler(opt), data[0], data[1], epochs=8).fit()
    return model.eval()


def test_distill_into_a_user_class(trained, data):
    torch.manual_seed(1)
    student = UserNet()
    out = mcp.distill(trained, student, data, epochs=6, device="cpu")
    assert out.student is student
    assert out.metrics["teacher_test_accuracy"] == pytest.approx(mcp.measure(trained, data)["test_accuracy"])
    assert out.metrics["test_accuracy"] > 0.8


def test_import_mcp_stays_light():
    import subprocess

    code = "import sys, mcp; print(any(m in sys.modules for m in ('torch', 'mlflow', 'optuna', 'onnxruntime')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_prune_structured_on_a_user_class(trained, data):
    before = mcp.measure(trained, data, device="cpu")
    out = mcp.prune(trained, data, sparsity=0.5, granularity="structured", criterion="magnitude", epochs=2,
                    drop_blocks=1, device="cpu")  # the one shape-preserving block in a Sequential: dw.0
    assert out.structured and out.dropped == ["dw.0"] and out.metrics["blocks_dropped"] == 1
    assert isinstance(out.model.dw[0], nn.Identity) and isinstance(trained.dw[0], nn.Conv2d)
    assert out.metrics["params_total"] < before["params_total"]
    assert out.metrics["pruned_fraction"] > 0.2
    x = torch.randn(2, 1, 8, 8)
    assert out.model(x).shape == (2, 10)
    assert sum(p.numel() for p in trained.parameters()) == before["params_total"]  # the original is untouched


def test_prune_unstructured_reaches_the_exact_sparsity(trained, data):
    out = mcp.prune(trained, data, sparsity=0.6, schedule="gradual", epochs=3, prune_epochs=2, device="cpu")
    assert out.metrics["pruned_fraction"] == pytest.approx(0.6, abs=1e-3)
    assert len(out.history["pruned_fraction"]) == 3


def test_quantize_qat_and_export_with_parity(trained, data, tmp_path):
    q = mcp.quantize(trained, data, method="qat", bits=4, epochs=1, device="cpu", out_dir=tmp_path / "q")
    assert q.deploy_format == "onnx_int8_weights"
    assert q.metrics["size_bytes_compressed"] == len(q.payload) < q.metrics["size_bytes_fp32"] / 3  # BN, biases: fp32
    assert q.onnx_path.is_file() and q.metrics["onnx_agreement"] >= 0.95
    ptq = mcp.quantize(trained, data, method="ptq_int8", device="cpu", out_dir=tmp_path / "p")
    assert ptq.deploy_format == "onnx_qdq_int8"
    deployed = mcp.export(trained, data, tmp_path / "model.onnx")
    assert deployed.path == tmp_path / "model.onnx" and deployed.path.is_file()
    assert deployed.metrics["onnx_max_abs_diff"] < 1e-3
    assert deployed.metrics["onnx_test_accuracy"] == pytest.approx(deployed.metrics["test_accuracy"], abs=0.02)


def test_search_a_few_trials_under_a_budget(trained, data, tmp_path):
    from mcp.tuner.objective import trial_table

    space = tmp_path / "space.yaml"
    space.write_text("prune:\n  granularity: [unstructured]\n  criterion: [magnitude]\n  ratio: [0.3, 0.8]\n"
                     "quantize:\n  bits: [4, 8]\nfinetune:\n  epochs: [1, 1]\n  lr: [0.005, 0.005]\n")
    budget = 0.2 * 4 * sum(p.numel() for p in trained.parameters())
    found = mcp.search(trained, data, space=space, budget_bytes=budget, trials=3, device="cpu")
    rows = trial_table(found.study, "compressed")
    assert len(rows) == 3 and found.trials == rows
    done = [r for r in rows if r["state"] == "complete"]
    assert done and all(r["size_bytes"] <= budget for r in done)
    # the winner: the most accurate feasible trial, rebuilt from the model and fine-tuned, within the budget
    best = max(done, key=lambda r: (r["val_accuracy"], -r["size_bytes"]))
    assert found.winner.number == best["number"] and found.winner.config.bits == {
        k.removeprefix("bits."): v for k, v in best["params"].items() if k.startswith("bits.")}
    assert found.metrics["size_bytes_compressed"] <= budget * 1.01 and found.metrics["test_accuracy"] > 0.5
    assert found.model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert mcp.measure(found.model, data, device="cpu")["test_accuracy"] == pytest.approx(
        found.metrics["test_accuracy"])
    assert sum(p.numel() for p in trained.parameters()) == sum(p.numel() for p in UserNet().parameters())


def test_the_prune_stage_and_mcp_prune_are_one_implementation(tmp_path, own_store):
    """`mcp prune` on a registered model and mcp.prune on the same model and data give the
    same weights, bit for bit."""
    from mcp import tracking
    from mcp.config import PruneConfig, TrainConfig
    from mcp.stages.common import setup_data
    from mcp.stages.prune import run_prune
    from mcp.stages.train import run_train

    common = dict(dataset="synthetic", input_shape="1x8x8", num_classes=4, model="tiny_cnn")
    base = run_train(TrainConfig(epochs=2, checkpoint_dir=str(tmp_path), **common), show_progress=False)
    uri = f"models:/{base.registered_name}/{base.registered_version}"
    cfg = PruneConfig(model_uri=uri, sparsity=0.5, epochs=2, register=False, **common)
    staged = run_prune(cfg, show_progress=False)
    _, _, loaders = setup_data(cfg)
    direct = mcp.prune(tracking.load_model(uri), loaders, sparsity=0.5, epochs=2, prune_epochs=cfg.prune_epochs,
                       lr=cfg.lr, device="cpu")
    for (k, a), (_, b) in zip(staged.model.state_dict().items(), direct.model.state_dict().items()):
        assert torch.equal(a.cpu(), b.cpu()), k
    assert direct.metrics["test_accuracy"] == staged.metrics["test_accuracy"]


def _cells():
    from mcp.errors import ConfigError
    from mcp.pruning import create_criterion, criterion_names

    for granularity in ("unstructured", "structured"):
        for criterion in criterion_names():
            try:
                create_criterion(criterion, granularity)
            except ConfigError:
                continue
            yield granularity, criterion


@pytest.mark.parametrize("granularity, criterion", list(_cells()))
def test_every_criterion_prunes_a_user_class(trained, data, granularity, criterion):
    """Every criterion at every granularity it supports, on an architecture mcp never
    defined (residual addition, depthwise conv, BatchNorm, a two-layer head)."""
    out = mcp.prune(trained, data, sparsity=0.4, granularity=granularity, criterion=criterion, epochs=1,
                    device="cpu", track=False)
    if granularity == "unstructured":
        assert out.metrics["pruned_fraction"] == pytest.approx(0.4, abs=1e-3)
    else:
        assert out.metrics["params_total"] < sum(p.numel() for p in trained.parameters())
    assert out.model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_a_call_is_an_mlflow_run_nested_in_the_active_one(trained, data, experiment):
    import mlflow
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    client = MlflowClient()
    with mlflow.start_run() as parent:
        out = mcp.prune(trained, data, sparsity=0.5, schedule="gradual", epochs=2, prune_epochs=1, device="cpu")
    run = client.get_run(out.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.tags["mcp.stage"] == "prune" and run.data.tags["mcp.api"] == "true"
    assert run.data.tags["mcp.model"] == "UserNet" and run.info.status == "FINISHED"
    assert run.data.params["sparsity"] == "0.5" and run.data.params["schedule"] == "gradual"
    assert run.data.metrics["test_accuracy"] == pytest.approx(out.metrics["test_accuracy"])
    assert [m.step for m in client.get_metric_history(out.run_id, "train_loss")] == [0, 1]
    assert len(client.get_metric_history(out.run_id, "prune_step_sparsity")) == 10  # one per gradual step
    weights = load_file(mlflow.artifacts.download_artifacts(run_id=out.run_id,
                                                            artifact_path="weights/model.safetensors"))
    for key, value in out.model.state_dict().items():
        assert torch.equal(weights[key], value.cpu()), key


def test_a_call_without_an_active_run_starts_one_and_a_failure_ends_it_failed(trained, data, experiment,
                                                                               monkeypatch):
    from mlflow import MlflowClient

    from conftest import runs_of
    from mcp.training import Trainer

    out = mcp.quantize(trained, data, method="fixed_point", bits=6, device="cpu")
    run = MlflowClient().get_run(out.run_id)
    assert "mlflow.parentRunId" not in run.data.tags and run.data.tags["mcp.stage"] == "quantize"
    assert run.data.metrics["size_bytes_compressed"] == len(out.payload)

    def exploded(self):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(Trainer, "fit", exploded)
    with pytest.raises(RuntimeError, match="out of memory"):
        mcp.distill(trained, UserNet(), data, epochs=1, device="cpu")
    statuses = {r.data.tags["mcp.stage"]: r.info.status for r in runs_of(experiment)}
    assert statuses == {"quantize": "FINISHED", "distill": "FAILED"}
    monkeypatch.undo()
    untracked = mcp.prune(trained, data, sparsity=0.3, epochs=1, device="cpu", track=False)
    assert untracked.run_id is None and len(runs_of(experiment)) == 2


class Scale(nn.Module):
    """A custom per-channel scale: a parameter outside any standard layer."""

    def __init__(self, c: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x):
        return x * self.gamma


class ScaledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.s = Scale(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.s(self.c1(x))))).mean((2, 3)))


def test_a_custom_parameter_is_pruned_along_the_dimension_that_follows_the_channels(data):
    """A per-channel scale outside any standard layer: the dimension that follows the
    channels is inferred, checked by pruning a copy, and replayed from the recipe."""
    from mcp.models import model_from_recipe

    torch.manual_seed(0)
    out = mcp.prune(ScaledNet(), data, sparsity=0.5, granularity="structured", epochs=1, device="cpu", track=False)
    assert out.model.c1.out_channels < 8 and out.model.s.gamma.shape[1] == out.model.c1.out_channels
    assert out.model.mcp_recipe["pruning_unwrapped"] == {"s.gamma": 1}
    recipe = {**out.model.mcp_recipe, "input_shape": [1, 8, 8], "num_classes": 10}  # as mcp.prune's run logs it
    again = model_from_recipe(recipe, ScaledNet())
    again.load_state_dict(out.model.state_dict())
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(again.eval()(x), out.model.eval()(x), atol=1e-6)


class ColumnScale(nn.Module):
    """A scale whose channels are its first dimension, not its last: a guess that fails."""

    def __init__(self, c: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(c, 3))

    def forward(self, x):
        return x * self.gamma[:, 0].view(1, -1, 1, 1)


class ColumnScaledNet(ScaledNet):
    def __init__(self):
        super().__init__()
        self.s = ColumnScale(8)


def test_a_layer_feeding_a_parameter_whose_dimension_cannot_be_verified_is_left_unpruned_with_one_line(data):
    from mcp.pruning.pruner import PruningWarning

    torch.manual_seed(0)
    with pytest.warns(PruningWarning) as caught:
        out = mcp.prune(ColumnScaledNet(), data, sparsity=0.5, granularity="structured", epochs=1, device="cpu",
                        track=False)
    lines = [str(w.message) for w in caught if issubclass(w.category, PruningWarning)]
    assert lines and all(line == lines[0] for line in lines)
    assert "leaves layer c1 unpruned" in lines[0] and "s.gamma" in lines[0] and "ColumnScale" in lines[0]
    assert "could not be verified" in lines[0] and "\n" not in lines[0]
    assert out.model.c1.out_channels == 8 and out.model.s.gamma.shape == (8, 3)  # left alone
    assert out.model.c2.out_channels < 8  # the rest is pruned
    assert out.model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


API_MODULE = """
import torch
from torch import nn


class ApiNet(nn.Module):
    def __init__(self, width=8, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU()),
                                  nn.Conv2d(width, width, 3, padding=1, groups=width))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))

    def forward(self, x):
        return self.head(torch.relu(self.body(self.stem(x))))
"""


def test_a_model_mcp_prune_made_of_a_user_class_reloads_through_the_api_in_a_fresh_process(data, experiment,
                                                                                           tmp_path, monkeypatch):
    import os
    import subprocess

    import numpy as np

    (tmp_path / "apinet_mod.py").write_text(API_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import apinet_mod

    torch.manual_seed(0)
    model = apinet_mod.ApiNet(width=12)
    out = mcp.prune(model, data, sparsity=0.5, granularity="structured", epochs=1, drop_blocks=1, device="cpu")
    assert out.model.stem[0].out_channels < 12 and out.dropped  # channels and a block removed
    assert out.model_uri == f"runs:/{out.run_id}/weights"
    with pytest.raises(mcp.ConfigError, match=r"apinet_mod:ApiNet, whose constructor arguments .* model=ApiNet"):
        mcp.load(out.model_uri)  # its width is the user's to say
    x = torch.randn(4, 1, 8, 8)
    np.save(tmp_path / "x.npy", x.numpy())
    code = ("import numpy as np, torch, mcp, apinet_mod; "
            f"m = mcp.load({out.run_id!r}, model=apinet_mod.ApiNet(width=12)); "
            f"np.save({str(tmp_path / 'y.npy')!r}, m(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))).detach().numpy())")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), out.model.eval()(x).detach().numpy(), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(mcp.McpError, match="weights do not fit the model you passed"):
        mcp.load(out.model_uri, model=apinet_mod.ApiNet(width=16))


def test_a_model_with_a_recipe_reloads_through_mcp_load_alone(experiment):
    from mcp.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny_cnn", 10, (1, 8, 8))
    data = make_loaders(load_dataset("digits"), 64, 0, 0)
    out = mcp.prune(model, data, sparsity=0.5, granularity="structured", epochs=1, device="cpu")
    x = torch.randn(3, 1, 8, 8)
    for source in (out.model_uri, out.run_id, f"runs:/{out.run_id}", f"runs:/{out.run_id}/model"):
        assert torch.allclose(mcp.load(source)(x), out.model.eval()(x), atol=1e-6)


API_WORKER = """
import json, sys, time
from pathlib import Path
import torch
import mcp
from mcp.data import load_dataset, make_loaders
from mcp.models import create_model

folder, me = Path(sys.argv[1]), sys.argv[2]
splits = load_dataset("synthetic", input_shape="1x8x8", num_classes=4)
data = make_loaders(splits, 32)
torch.manual_seed(0)
model = create_model("tiny_mlp", 4, (1, 8, 8))
(folder / f"ready-{me}").touch()
while len(list(folder.glob("ready-*"))) < 2:  # start together: both workers must find tickets left
    time.sleep(0.05)
found = mcp.search(model, data, space="default", budget_bytes=0.3 * 4 * sum(p.numel() for p in model.parameters()),
                   trials=6, storage=f"sqlite:///{folder / 'study.db'}", study_name="shared", device="cpu")
(folder / f"{me}.json").write_text(json.dumps({"winner": found.winner.number, "trials": len(found.trials)}))
"""


def test_two_api_workers_share_one_study_s_total(tmp_path):
    """mcp.search and `mcp search` run one worker loop: two processes naming the same study run
    its total between them (tickets), and agree on one winner."""
    import json
    import os
    import sqlite3
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    (tmp_path / "worker.py").write_text(API_WORKER)
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(tmp_path), name], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    a, b = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("a", "b"))
    assert a["trials"] == b["trials"] == 6 and a["winner"] == b["winner"]  # the total, not 6 each
    with sqlite3.connect(tmp_path / "study.db") as db:
        states = [s for (s,) in db.execute("SELECT state FROM trials")]
        owners = {o for (o,) in db.execute("SELECT owner FROM mcp_claims WHERE key LIKE 'run-%'")}
    assert len(states) == 6 and set(states) <= {"COMPLETE", "PRUNED"}
    assert len({o.rsplit(":", 1)[0] for o in owners}) == 2  # both workers ran trials
