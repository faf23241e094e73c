"""`mcp import`: a user's own class (defined outside mcp, imported by its module path) or a
zoo architecture with weights from a file, registered as a baseline that every stage then
starts from. Nothing is unpickled; bad input is one line and registers nothing."""

from __future__ import annotations

import os
import subprocess
import textwrap

import numpy as np
import pytest
import torch

from conftest import PYTHON

USER_MODULE = textwrap.dedent('''
    """A user's own model code, outside mcp: a residual block, a depthwise conv, BatchNorm,
    a custom head."""
    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


    class Head(nn.Module):
        def __init__(self, c, classes):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc1 = nn.Linear(c, 2 * c)
            self.fc2 = nn.Linear(2 * c, classes)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(self.pool(x).flatten(1))))


    class UserNet(nn.Module):
        def __init__(self, classes=10, width=12):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU())
            self.block = Block(width)
            self.dw = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=width), nn.BatchNorm2d(width),
                                    nn.ReLU())
            self.head = Head(width, classes)

        def forward(self, x):
            return self.head(self.dw(self.block(self.stem(x))))


    def make(classes=10, width=12):
        return UserNet(classes, width)


    def broken(classes=10):
        raise RuntimeError("no GPU found")


    def not_a_model():
        return 42
''')


@pytest.fixture(scope="module")
def user_code(tmp_path_factory):
    """The user's module on disk, importable (sys.path here, PYTHONPATH in subprocesses),
    and its trained weights as a state_dict file and a safetensors file."""
    import sys

    from safetensors.torch import save_file

    from mcp.data import load_dataset, make_loaders
    from mcp.training import FineTune, Trainer

    root = tmp_path_factory.mktemp("user_code")
    (root / "usernet_mod.py").write_text(USER_MODULE)
    sys.path.insert(0, str(root))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    import usernet_mod

    torch.manual_seed(0)
    model = usernet_mod.make()
    loaders = make_loaders(load_dataset("digits"), 32, 0, 0)
    ft = FineTune(epochs=8, lr=0.05)
    opt = ft.make_optimizer(model)
    Trainer(model, opt, ft.make_scheduler(opt), loaders[0], loaders[1], epochs=8).fit()
    torch.save(model.state_dict(), root / "usernet.pt")
    torch.save({"epoch": 8, "state_dict": model.state_dict()}, root / "checkpoint.pth")  # a training script's file
    save_file(model.state_dict(), str(root / "usernet.safetensors"))
    yield root, model.eval(), loaders
    sys.path.remove(str(root))


def _import(cli, root, *extra):
    return cli("import", "--module", "usernet_mod:make", "--module-kwargs", '{"classes": 10}', "--name", "usernet",
               *extra)


def _outputs_in_a_fresh_process(uri: str, x: torch.Tensor, tmp_path) -> np.ndarray:
    np.save(tmp_path / "x.npy", x.numpy())
    code = (f"import numpy as np, torch; from mcp.tracking import load_model; "
            f"m = load_model({uri!r}); x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r})); "
            f"np.save({str(tmp_path / 'y.npy')!r}, m(x).detach().numpy())")
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.load(tmp_path / "y.npy")


def test_a_user_class_is_imported_measured_registered_and_reloads(user_code, own_store, cli, tmp_path):
    from mlflow import MlflowClient

    from mcp.training import evaluate

    root, model, loaders = user_code
    result = _import(cli, root, "--weights", str(root / "usernet.pt"))
    assert result.exit_code == 0, result.output
    version = MlflowClient().get_model_version_by_alias("usernet-digits", "baseline")
    assert version.tags["mcp.stage"] == "import" and version.tags["source"] == "usernet_mod:make"
    expected = evaluate(model, loaders[2])["accuracy"]
    assert float(version.tags["test_accuracy"]) == pytest.approx(expected, abs=1e-6)
    assert expected > 0.85
    x = torch.randn(5, 1, 8, 8)
    reloaded = _outputs_in_a_fresh_process("models:/usernet-digits@baseline", x, tmp_path)
    np.testing.assert_allclose(reloaded, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights", ["checkpoint.pth", "usernet.safetensors"])
def test_wrapped_checkpoints_and_safetensors_load(user_code, own_store, cli, weights):
    from mlflow import MlflowClient

    root, _, _ = user_code
    result = _import(cli, root, "--weights", str(root / weights))
    assert result.exit_code == 0, result.output
    assert MlflowClient().get_model_version_by_alias("usernet-digits", "baseline").tags["weights"] == weights


def test_a_zoo_architecture_with_weights_from_a_file(own_store, cli, tmp_path):
    from mlflow import MlflowClient

    from mcp.models import create_model

    torch.manual_seed(3)
    model = create_model("tiny_cnn", 10, (1, 8, 8))
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    result = cli("import", "--model", "tiny_cnn", "--weights", str(tmp_path / "tiny.pt"))
    assert result.exit_code == 0, result.output
    assert MlflowClient().get_model_version_by_alias("tiny_cnn-digits", "baseline").tags["source"] == "tiny_cnn"


def test_structured_pruning_of_an_imported_model_registers_a_smaller_version(user_code, own_store, cli):
    from mlflow import MlflowClient

    from mcp.tracking import load_model

    root, _, _ = user_code
    assert _import(cli, root, "--weights", str(root / "usernet.pt")).exit_code == 0
    result = cli("prune", "--model-uri", "models:/usernet-digits@baseline", "--granularity", "structured",
                 "--sparsity", "0.3", "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert "registered: models:/usernet-digits/2" in result.output
    version = MlflowClient().get_model_version("usernet-digits", "2")
    assert version.tags["parent_model"] == "models:/usernet-digits/1"
    pruned, base = load_model("models:/usernet-digits/2"), load_model("models:/usernet-digits/1")
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in base.parameters())
    assert pruned.stem[0].out_channels < 12 and pruned.head.fc2.out_features == 10  # the classes stay


@pytest.mark.slow  # every stage in turn: `.ci/run` runs it
def test_every_stage_works_on_an_imported_model(user_code, own_store, cli, tmp_path):
    """Pruned structured and unstructured, quantized (ptq_int8, qat), exported with the
    parity check, searched: each a version of usernet-digits that reloads identically."""
    from mlflow import MlflowClient

    from mcp.tracking import load_model

    root, _, _ = user_code
    assert _import(cli, root, "--weights", str(root / "usernet.pt")).exit_code == 0
    base = "models:/usernet-digits@baseline"
    steps = [
        ("prune", "--model-uri", base, "--granularity", "structured", "--sparsity", "0.3", "--epochs", "1"),
        ("prune", "--model-uri", base, "--sparsity", "0.5", "--epochs", "1"),
        ("quantize", "--model-uri", base, "--method", "ptq_int8", "--calib-batches", "4"),
        ("quantize", "--model-uri", base, "--method", "qat", "--bits", "4", "--epochs", "1"),
    ]
    client = MlflowClient()
    for step in steps:
        result = cli(*step)
        assert result.exit_code == 0, (step, result.output)
    versions = sorted(client.search_model_versions("name='usernet-digits'"), key=lambda v: int(v.version))
    assert [v.tags["mcp.stage"] for v in versions] == ["import", "prune", "prune", "quantize", "quantize"]
    structured = load_model(f"models:/usernet-digits/{versions[1].version}")
    assert sum(p.numel() for p in structured.parameters()) < sum(
        p.numel() for p in load_model(base).parameters())  # channels removed from a graph it never saw
    x = torch.randn(4, 1, 8, 8)
    for v in versions[1:]:
        uri = f"models:/usernet-digits/{v.version}"
        np.testing.assert_allclose(_outputs_in_a_fresh_process(uri, x, tmp_path),
                                   load_model(uri)(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    exported = cli("export", "--model-uri", f"models:/usernet-digits/{versions[4].version}")
    assert exported.exit_code == 0, exported.output
    assert "parity max |diff|" in exported.output
    taught = cli("distill", "--teacher", base, "--student", "tiny_mlp", "--epochs", "1")
    assert taught.exit_code == 0, taught.output
    assert client.get_model_version("tiny_mlp-digits", "1").tags["teacher"] == "models:/usernet-digits/1"
    learned = cli("distill", "--teacher", base, "--student", base,
                  "--epochs", "1", "--lr", "0.005")
    assert learned.exit_code == 0, learned.output
    assert "registered: models:/usernet-digits/" in learned.output  # the student keeps its own name
    benched = cli("benchmark", "--models", f"{base},models:/usernet-digits/{versions[1].version}")
    assert benched.exit_code == 0, benched.output
    searched = cli("search", "--model-uri", base, "--trials", "3", "--budget-ratio", "0.3", "--export", "false",
                   "--benchmark", "false", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}")
    assert searched.exit_code == 0, searched.output
    assert "study 'usernet-digits-max-accuracy'" in searched.output
    winner = [v for v in client.search_model_versions("name='usernet-digits'") if v.tags["mcp.stage"] == "search"]
    assert winner and client.get_model_version_by_alias("usernet-digits", "challenger").version == winner[0].version
    piped = cli("pipeline", "--model-uri", base, "--prune-epochs", "1", "--quantize-epochs", "1", "--trials", "2",
                "--final-epochs", "1", "--budget-ratio", "0.3", "--seconds", "0.1",
                "--storage", f"sqlite:///{tmp_path / 'optuna.db'}")
    assert piped.exit_code == 0, piped.output
    assert "| baseline | v1 import @baseline |" in piped.output  # the imported model is the pipeline's baseline


BAD = [
    (["--module", "usernet_mod:make", "--weights", "{root}/narrow.pt"],
     ["weights do not match", "shape mismatch: stem.0.weight [8, 1, 3, 3] vs model [12, 1, 3, 3]"]),
    (["--module", "usernet_mod:make", "--weights", "{root}/extra.pt"],
     ["unexpected 1 keys (extra.weight)", "missing 1 keys (head.fc2.bias)"]),
    (["--module", "no_such_module:make"], ["cannot import 'no_such_module'", "ModuleNotFoundError"]),
    (["--module", "usernet_mod:nothing"], ["has no attribute 'nothing'"]),
    (["--module", "usernet_mod:broken"], ["raised RuntimeError: no GPU found"]),
    (["--module", "usernet_mod:not_a_model"], ["returned a int, not a torch.nn.Module"]),
    (["--module", "usernet_mod:make", "--module-kwargs", "{{depth: 3}}"], ["does not take these arguments"]),
    (["--module", "usernet_mod:make", "--weights", "{root}/whole.pt"],
     ["holds pickled Python objects", "torch.save(model.state_dict(), path)"]),
    (["--module", "usernet_mod:make", "--weights", "{root}/garbage.pt"], ["is not a PyTorch checkpoint"]),
    (["--module", "usernet_mod:make", "--weights", "{root}/garbage.safetensors"], ["is not a safetensors file"]),
    (["--module", "usernet_mod:make", "--weights", "{root}/missing.pt"], ["does not exist"]),
    (["--module", "usernet_mod:make", "--module-kwargs", "{{classes: 4}}"],
     ["gives outputs [2, 4]", "has 10 classes"]),
    (["--module", "usernet_mod:make", "--model", "tiny_cnn"], ["exactly one of --model"]),
]


@pytest.mark.parametrize("args, fragments", BAD)
def test_bad_input_is_one_line_and_registers_nothing(user_code, own_store, cli, args, fragments):
    import mlflow
    from mlflow import MlflowClient

    from mcp.models import create_model
    import usernet_mod

    root, model, _ = user_code
    if not (root / "narrow.pt").exists():
        torch.save(usernet_mod.make(width=8).state_dict(), root / "narrow.pt")
        state = model.state_dict()
        state.pop("head.fc2.bias")
        state["extra.weight"] = torch.zeros(1)
        torch.save(state, root / "extra.pt")
        torch.save(create_model("tiny_mlp", 10, (1, 8, 8)), root / "whole.pt")  # a pickled whole model
        (root / "garbage.pt").write_bytes(b"\x00not a checkpoint")
        (root / "garbage.safetensors").write_bytes(b"not safetensors at all")
    result = cli("import", *[a.format(root=root) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert MlflowClient().search_registered_models() == []
    assert mlflow.search_runs(search_all_experiments=True).empty


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A tiny folder of 64x64 RGB images in 10 classes (a colour channel and a brightness each)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(10):
        (root / f"class{c}").mkdir()
        for i in range(5):
            pixels = rng.integers(0, 40, size=(64, 64, 3), dtype=np.uint8)
            pixels[:, :, c % 3] += np.uint8(60 + 50 * (c // 3))
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.mark.slow  # a ResNet-18 fine-tuned at 64x64 (13 s); the head's replacement and freezing are fast tests below
def test_a_torchvision_checkpoint_is_imported_with_a_new_head_and_fine_tuned(image_folder, own_store, cli, tmp_path):
    """torchvision's resnet18 state_dict, as a user downloads it (1000 ImageNet classes; the
    weights are made here, since nothing can be downloaded), transferred to a 10-class folder."""
    import torchvision
    from mlflow import MlflowClient

    from mcp.tracking import load_model

    torch.manual_seed(0)
    checkpoint = torchvision.models.resnet18(weights=None)
    torch.save(checkpoint.state_dict(), tmp_path / "resnet18-f37072fd.pth")
    data = ["--dataset", "imagefolder", "--data-dir", str(image_folder), "--input-shape", "3x64x64"]
    refused = cli("import", "--module", "torchvision.models:resnet18", "--weights",
                  str(tmp_path / "resnet18-f37072fd.pth"), *data)
    assert refused.exit_code == 2 and "[2, 1000]" in refused.output and "--head auto" in refused.output
    result = cli("import", "--module", "torchvision.models:resnet18", "--weights",
                 str(tmp_path / "resnet18-f37072fd.pth"), "--head", "--epochs", "2", "--freeze-epochs", "1",
                 "--batch-size", "16", *data)
    assert result.exit_code == 0, result.output
    model = load_model("models:/resnet18-imagefolder@baseline")
    assert model.mcp_recipe["head"] == {"module": "fc", "in_features": 512, "out_features": 10, "bias": True}
    assert model.fc.out_features == 10
    assert not torch.equal(model.layer4[1].conv2.weight, checkpoint.layer4[1].conv2.weight)  # trained after the freeze
    client = MlflowClient()
    run_id = client.get_model_version_by_alias("resnet18-imagefolder", "baseline").run_id
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [0, 1]
    assert "plots/training_curves.png" in [a.path for a in client.list_artifacts(run_id, "plots")]
    x = torch.randn(2, 3, 64, 64)
    np.testing.assert_allclose(_outputs_in_a_fresh_process("models:/resnet18-imagefolder@baseline", x, tmp_path),
                               model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_head_auto_replaces_the_last_linear_for_the_dataset_s_classes_and_reloads(user_code, own_store, cli):
    """A model built for 5 classes, on the 10 digits: `--head auto` replaces the last Linear
    it runs, fine-tunes, and the recipe's head rebuilds it."""
    from mlflow import MlflowClient

    from mcp.tracking import load_model

    root, _, _ = user_code
    refused = cli("import", "--module", "usernet_mod:make", "--module-kwargs", '{"classes": 5}', "--name", "five")
    assert refused.exit_code == 2 and "--head auto" in refused.output
    result = cli("import", "--module", "usernet_mod:make", "--module-kwargs", '{"classes": 5}', "--name", "five",
                 "--head", "--epochs", "1", "--freeze-epochs", "1")
    assert result.exit_code == 0, result.output
    model = load_model("models:/five-digits@baseline")
    assert model.mcp_recipe["head"]["module"] == "head.fc2" and model.head.fc2.out_features == 10
    assert MlflowClient().get_model_version_by_alias("five-digits", "baseline").tags["mcp.stage"] == "import"


def test_the_backbone_stays_frozen_for_the_first_epochs(image_folder):
    from mcp.data import load_dataset, make_loaders
    from mcp.models.foreign import replace_head
    from mcp.training import FineTune
    from mcp.training.transfer import finetune_transfer
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    replace_head(model, "fc", 10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loaders = make_loaders(load_dataset("imagefolder", image_folder, input_shape=(3, 64, 64)), 16, 0, 0)
    finetune_transfer(model, loaders, "fc", FineTune(epochs=1, lr=0.01), freeze_epochs=1)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"fc.weight", "fc.bias"}
    assert all(p.requires_grad for p in model.parameters())  # unfrozen afterwards


def test_a_timm_architecture_by_name_with_its_weights(own_store, cli, tmp_path):
    timm = pytest.importorskip("timm")  # the dev extra installs it
    from mlflow import MlflowClient

    from mcp.tracking import load_model

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=1).eval()
    torch.save(model.state_dict(), tmp_path / "test_resnet.pth")
    result = cli("import", "--timm", "test_resnet", "--module-kwargs", "{num_classes: 10, in_chans: 1}",
                 "--weights", str(tmp_path / "test_resnet.pth"))
    assert result.exit_code == 0, result.output
    version = MlflowClient().get_model_version_by_alias("test_resnet-digits", "baseline")
    assert version.tags["source"] == "timm:test_resnet"
    reloaded = load_model("models:/test_resnet-digits@baseline")
    assert reloaded.mcp_recipe["kwargs"]["pretrained"] is False  # weights never come from a download
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(reloaded(x), model(x))
    pruned = cli("prune", "--model-uri", "models:/test_resnet-digits@baseline", "--granularity", "structured",
                 "--sparsity", "0.3", "--epochs", "1")
    assert pruned.exit_code == 0, pruned.output


def test_timm_missing_unknown_or_downloading_is_one_line(own_store, cli, monkeypatch):
    import sys

    pytest.importorskip("timm")
    unknown = cli("import", "--timm", "resnet_no_such_thing")
    assert unknown.exit_code == 2 and "is not a timm architecture" in unknown.output
    download = cli("import", "--timm", "test_resnet", "--module-kwargs", "{pretrained: true}")
    assert download.exit_code == 2 and "would download weights" in download.output
    monkeypatch.setitem(sys.modules, "timm", None)  # as if the extra were not installed
    missing = cli("import", "--timm", "test_resnet")
    assert missing.exit_code == 2
    assert missing.output.strip() == "error: timm is not installed: pip install 'mcp-pipeline[timm]' (or pip install timm)"


def _log_plainly(model, fmt: str) -> str:
    """A model someone logged with plain MLflow, not mcp: MLflow 3's pt2 archive or a pickle."""
    import inspect

    import mlflow

    if "serialization_format" not in inspect.signature(mlflow.pytorch.log_model).parameters:
        pytest.skip("this MLflow has no pt2 format")
    with mlflow.start_run(run_name=f"plain-{fmt}") as run:
        mlflow.pytorch.log_model(model, name="model", input_example=torch.zeros(2, 1, 8, 8).numpy(),
                                 serialization_format=fmt, pip_requirements=["torch"])
    return f"runs:/{run.info.run_id}/model"


def test_weights_from_a_model_someone_logged_in_mlflow(user_code, own_store, cli):
    """pt2 (MLflow's own format) is read once MLflow has checked it holds no pickles; a
    pickle is refused unless trusted. The architecture comes from --module."""
    from mlflow import MlflowClient

    from mcp.tracking import load_model

    root, model, _ = user_code
    pt2 = _log_plainly(model, "pt2")
    result = _import(cli, root, "--model-uri", pt2)
    assert result.exit_code == 0, result.output
    version = MlflowClient().get_model_version_by_alias("usernet-digits", "baseline")
    assert version.tags["parent_model"] == pt2
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(load_model("models:/usernet-digits@baseline")(x), model(x))

    pickled = _log_plainly(model, "pickle")
    refused = _import(cli, root, "--model-uri", pickled)
    assert refused.exit_code == 2
    assert "pickled PyTorch model" in refused.output and "--trust-pickled-model" in refused.output
    trusted = _import(cli, root, "--model-uri", pickled, "--trust-pickled-model")
    assert trusted.exit_code == 0, trusted.output
    run = MlflowClient().get_run(MlflowClient().get_model_version_by_alias("usernet-digits", "baseline").run_id)
    assert run.data.tags["mcp.trust_pickled_model"] == "true"
