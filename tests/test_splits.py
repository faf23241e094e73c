"""A user's own split, mcp's split written out, the test set's fingerprint, and a registered
model that remembers its data: every later stage loads the same data without being told."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest
import torch

from mcp.data import load_dataset, write_split
from mcp.errors import ConfigError
from test_data import _idx_pair, _image_folder, _write_idx


def _disjoint(s) -> None:
    parts = [set(map(int, s.parts[p])) for p in ("train", "val", "test")]
    assert all(parts) and not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert [len(p) for p in parts] == [len(s.train), len(s.val), len(s.test)]


def _kinds(tmp_path):
    """One dataset of every kind of pool: in memory, IDX (one pair, train + test pair),
    torchvision's files, an image folder with and without split folders."""
    _idx_pair(tmp_path / "one", "t10k", 100, gz=False)
    _idx_pair(tmp_path / "two", "train", 80, gz=False, seed=1)
    _idx_pair(tmp_path / "two", "t10k", 30, gz=False, seed=2)
    _write_idx(tmp_path / "tv", "MNIST")
    _image_folder(tmp_path / "flat", per_class=10, size=(8, 8))
    for part in ("train", "val", "test"):
        _image_folder(tmp_path / "folders" / part, per_class=4, size=(8, 8))
    return [("digits", {}), ("idx", {"data_dir": tmp_path / "one"}), ("idx", {"data_dir": tmp_path / "two"}),
            ("mnist", {"data_dir": tmp_path / "tv"}), ("imagefolder", {"data_dir": tmp_path / "flat"}),
            ("imagefolder", {"data_dir": tmp_path / "folders"})]


def test_every_dataset_kind_splits_disjointly_and_its_written_split_loads_the_same_samples(tmp_path):
    for name, kwargs in _kinds(tmp_path):
        s = load_dataset(name, input_shape="1x8x8" if name == "imagefolder" else None, **kwargs)
        _disjoint(s)
        path = write_split(s, tmp_path / f"{name}-{len(s.test)}.json")
        again = load_dataset(name, split_file=path, input_shape="1x8x8" if name == "imagefolder" else None, **kwargs)
        _disjoint(again)
        for part in ("train", "val", "test"):
            assert np.array_equal(s.parts[part], again.parts[part]), (name, part)
            a, b = getattr(s, part), getattr(again, part)
            for i in (0, len(a) - 1):
                assert torch.allclose(a[i][0], b[i][0]) and int(a[i][1]) == int(b[i][1]), (name, part, i)
        assert again.test_fingerprint == s.test_fingerprint and again.how.startswith("split file")
        written = json.loads(path.read_text())
        assert written["samples"] == s.pool_size and written["test_fingerprint"] == s.test_fingerprint
        if name == "imagefolder":  # an image folder's split names its files
            assert all(isinstance(e, str) and (tmp_path / kwargs["data_dir"] / e).is_file() for e in written["test"])


def test_the_data_s_own_parts_are_kept(tmp_path):
    kinds = dict(((n, str(k.get("data_dir", ""))), n) for n, k in _kinds(tmp_path))
    assert kinds
    two = load_dataset("idx", data_dir=tmp_path / "two")
    assert set(map(int, two.parts["test"])) == set(range(80, 110)) and two.how.startswith("the IDX train and test")
    folders = load_dataset("imagefolder", data_dir=tmp_path / "folders")
    assert all(folders.sample_ids[i].startswith("test/") for i in folders.parts["test"])
    assert all(folders.sample_ids[i].startswith("val/") for i in folders.parts["val"])


def test_a_user_split_is_used_as_given(tmp_path):
    _idx_pair(tmp_path, "t10k", 100, gz=False)
    split = {"train": list(range(0, 60)), "val": list(range(60, 70)), "test": list(range(70, 100))}
    (tmp_path / "mine.json").write_text(json.dumps(split))
    s = load_dataset("idx", data_dir=tmp_path, split_file=tmp_path / "mine.json")
    assert (len(s.train), len(s.val), len(s.test)) == (60, 10, 30)
    assert s.parts["test"].tolist() == split["test"]
    # val is optional: held out of train (stratified, seeded) when the file has none
    (tmp_path / "noval.yaml").write_text(f"train: {split['train'] + split['val']}\ntest: {split['test']}\n")
    s = load_dataset("idx", data_dir=tmp_path, split_file=tmp_path / "noval.yaml", val_fraction=0.25)
    assert (len(s.train), len(s.val), len(s.test)) == (50, 20, 30) and "val held out by mcp" in s.how  # 2 of 7 a class
    assert set(map(int, s.parts["val"])) <= set(range(70))


@pytest.mark.parametrize("content, message", [
    ({"train": [0, 1, 2], "test": [2, 3]}, "1 sample(s) are in both train and test (first: 2)"),
    ({"train": [0, 1], "val": [1], "test": [5]}, "in both train and val"),
    ({"train": [0, 1], "test": [100]}, "index 100, outside the dataset's 100 samples (0-99)"),
    ({"train": [0, 0, 1], "test": [5]}, "lists sample 0 more than once"),
    ({"train": [0, 1]}, "has no test list"),
    ({"train": [], "test": [1]}, "train must be a non-empty list"),
    ({"train": ["a.png"], "test": [1]}, "holds 'a.png'; each entry must be an index"),
    ([1, 2, 3], "must hold a mapping"),
])
def test_a_bad_split_file_is_one_line_naming_the_problem(tmp_path, content, message):
    _idx_pair(tmp_path, "t10k", 100, gz=False)
    (tmp_path / "bad.json").write_text(json.dumps(content))
    with pytest.raises(ConfigError) as info:
        load_dataset("idx", data_dir=tmp_path, split_file=tmp_path / "bad.json")
    assert message in str(info.value) and "bad.json" in str(info.value) and "\n" not in str(info.value)


def test_an_image_folder_split_names_files_and_refuses_unknown_ones(tmp_path):
    _image_folder(tmp_path, per_class=6, size=(8, 8))
    (tmp_path / "split.json").write_text(json.dumps({"train": [f"cat/{i}.png" for i in range(5)] + ["dog/0.png"],
                                                      "test": ["./dog/1.png", "dog/2.png"]}))
    s = load_dataset("imagefolder", data_dir=tmp_path, split_file=tmp_path / "split.json", val_fraction=0.2)
    assert len(s.test) == 2 and len(s.train) + len(s.val) == 6
    (tmp_path / "split.json").write_text(json.dumps({"train": ["cat/0.png"], "test": ["cow/1.png"]}))
    with pytest.raises(ConfigError, match="names 'cow/1.png', which is not an image of the data folder"):
        load_dataset("imagefolder", data_dir=tmp_path, split_file=tmp_path / "split.json")


def test_the_fingerprint_follows_the_test_images_not_how_they_are_shown(tmp_path):
    base = load_dataset("digits")
    assert load_dataset("digits", input_shape="1x16x16", val_fraction=0.3).test_fingerprint == base.test_fingerprint
    write_split(base, tmp_path / "s.json")
    split = json.loads((tmp_path / "s.json").read_text())
    split["train"].append(split["test"].pop())  # one test image fewer
    (tmp_path / "s.json").write_text(json.dumps(split))
    other = load_dataset("digits", split_file=tmp_path / "s.json")
    assert other.test_fingerprint != base.test_fingerprint and len(other.test) == len(base.test) - 1
    assert base.summary()["test_fingerprint"] == base.test_fingerprint == base.record()["test_fingerprint"]


# --------------------------------------------------------------------- a model that remembers its data

USER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn


    class SeeNet(nn.Module):
        """A conv stem with GroupNorm, a squeeze-excitation gate, a dropout classifier."""

        def __init__(self, width=8, classes=10):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.GroupNorm(2, width), nn.ReLU())
            self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, width), nn.Sigmoid())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1),
                                      nn.Linear(width, classes))

        def forward(self, x):
            h = self.stem(x)
            return self.head(h * self.gate(h)[:, :, None, None])
''')


@pytest.fixture
def seenet(tmp_path, monkeypatch):
    """The user's module on disk and importable, IDX files in a folder of their own, the
    user's split (trained on its train part) and the weights trained on it."""
    import sys

    (tmp_path / "seenet_mod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    sys.modules.pop("seenet_mod", None)
    import seenet_mod

    data = tmp_path / "idx"
    _idx_pair(data, "t10k", 200, gz=True, size=12)
    split = {"train": list(range(0, 120)), "val": list(range(120, 150)), "test": list(range(150, 200))}
    (tmp_path / "mine.json").write_text(json.dumps(split))
    torch.manual_seed(0)
    model = seenet_mod.SeeNet()
    torch.save(model.state_dict(), tmp_path / "seenet.pt")
    return tmp_path, data


def test_an_imported_model_remembers_its_data_and_split_through_the_lineage(seenet, own_store, cli, tmp_path):
    from mlflow import MlflowClient

    root, data = seenet
    result = cli("import", "--module", "seenet_mod:SeeNet", "--weights", root / "seenet.pt", "--dataset", "idx",
                 "--data-dir", data, "--split-file", root / "mine.json", "--name", "seenet")
    assert result.exit_code == 0, result.output
    mine = load_dataset("idx", data_dir=data, split_file=root / "mine.json")
    assert mine.test_fingerprint in result.output  # the import says which test images it measured on
    base = "models:/seenet-idx@baseline"
    steps = [("prune", "--model-uri", base, "--granularity", "structured", "--sparsity", "0.5", "--epochs", "1"),
             ("quantize", "--model-uri", "models:/seenet-idx/2", "--method", "ptq_int8", "--calib-batches", "2"),
             ("export", "--model-uri", "models:/seenet-idx/2")]
    for step in steps:  # no dataset option: each stage loads the data the model was made on
        result = cli(*step)
        assert result.exit_code == 0, (step, result.output)
    client = MlflowClient()
    versions = sorted(client.search_model_versions("name='seenet-idx'"), key=lambda v: int(v.version))
    assert [v.tags["mcp.stage"] for v in versions] == ["import", "prune", "quantize", "export"]
    for v in versions:
        params = client.get_run(v.run_id).data.params
        assert params["dataset"] == "idx" and params["data_test_fingerprint"] == mine.test_fingerprint
        assert params["split_file"] == str(root / "mine.json") and params["data_test_size"] == "50"
        assert v.tags["test_fingerprint"] == mine.test_fingerprint  # the ONNX version too
        if v.tags["mcp.stage"] != "export":  # the ONNX file has no recipe: its data is its source model's
            assert json.loads(v.tags["data"])["data_dir"] == str(data)


def test_a_recorded_folder_that_moved_is_one_line_naming_the_option(seenet, own_store, cli, tmp_path):
    root, data = seenet
    assert cli("import", "--module", "seenet_mod:SeeNet", "--weights", root / "seenet.pt", "--dataset", "idx",
               "--data-dir", data, "--name", "seenet").exit_code == 0
    data.rename(root / "moved")
    from click.testing import CliRunner

    from mcp.cli import main

    result = CliRunner().invoke(main, ["prune", "--model-uri", "models:/seenet-idx@baseline", "--epochs", "1"])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and str(data) in line and "--data-dir" in line and "does not exist" in line
    moved = cli("prune", "--model-uri", "models:/seenet-idx@baseline", "--epochs", "1", "--data-dir", root / "moved")
    assert moved.exit_code == 0, moved.output


def test_a_model_measured_on_other_test_images_says_so(seenet, own_store, cli, tmp_path):
    root, data = seenet
    assert cli("import", "--module", "seenet_mod:SeeNet", "--weights", root / "seenet.pt", "--dataset", "idx",
               "--data-dir", data, "--name", "seenet").exit_code == 0
    result = cli("prune", "--model-uri", "models:/seenet-idx@baseline", "--epochs", "1", "--split-file",
                 root / "mine.json")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("warning: models:/seenet-idx/1")]
    assert len(lines) == 1 and "made with test set" in lines[0] and "(40 images), this run tests on" in lines[0]
    assert "(50 images)" in lines[0] and "training may have seen" in lines[0]
    same = cli("prune", "--model-uri", "models:/seenet-idx@baseline", "--epochs", "1")
    assert same.exit_code == 0 and "made with test set" not in same.output
    # a table of them says which were made with other test images (the benchmark tests all on the baseline's)
    table = cli("benchmark", "--registered-model", "seenet-idx", "--seconds", "0.05", "--iters", "5", "--warmup", "1")
    assert table.exit_code == 0, table.output
    note = next(line for line in table.output.splitlines() if line.startswith("test set:"))
    assert "(40 images of idx" in note and "made with another test set: v2 " in note and "v3" not in note


def test_mcp_split_writes_the_split_a_model_was_made_with(seenet, own_store, cli, tmp_path):
    root, data = seenet
    assert cli("import", "--module", "seenet_mod:SeeNet", "--weights", root / "seenet.pt", "--dataset", "idx",
               "--data-dir", data, "--split-file", root / "mine.json", "--name", "seenet").exit_code == 0
    result = cli("split", "--model-uri", "models:/seenet-idx@baseline", "--out", tmp_path / "back.json")
    assert result.exit_code == 0, result.output
    assert "train 120, val 30, test 50 of 200 samples" in result.output
    back = json.loads((tmp_path / "back.json").read_text())
    mine = json.loads((root / "mine.json").read_text())
    assert all(back[p] == mine[p] for p in ("train", "val", "test"))
    result = cli("split", "--dataset", "idx", "--data-dir", data, "--out", tmp_path / "mcp.json")
    assert result.exit_code == 0 and "train 140, val 20, test 40 of 200 samples" in result.output
