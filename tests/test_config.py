"""Configs: typed fields, clear errors, --config files, command line wins."""

from __future__ import annotations

import json

import pytest

from mcp.config import DistillConfig, PruneConfig, QuantizeConfig, TrainConfig
from mcp.errors import ConfigError


@pytest.mark.parametrize("changes, message", [
    ({"epochs": 0}, "epochs=0 must be positive"),
    ({"batch_size": -4}, "batch_size=-4 must be positive"),
    ({"model": "resnet99"}, "unknown model 'resnet99'; choose one of: alexnet"),
    ({"dataset": "cifar11"}, "unknown dataset 'cifar11'; choose one of: cifar10"),
    ({"optimizer": "adam"}, "optimizer='adam' is not allowed; choose one of: sgd, adamw"),
    ({"label_smoothing": 1.0}, "label_smoothing=1.0 is outside [0, 1)"),
    ({"val_fraction": 1.0}, "val_fraction=1.0 is outside (0, 1)"),
    ({"val_fraction": -0.1}, "val_fraction=-0.1 is outside (0, 1)"),
    ({"input_shape": "3x32"}, "input_shape='3x32' is not of the form CxHxW"),
    ({"epochs": "ten"}, "epochs='ten' is not an integer"),
    ({"nesterov": "maybe"}, "nesterov='maybe' is not a boolean"),
])
def test_bad_values_name_the_value_and_what_is_allowed(changes, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(changes)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unset_data_options_fall_back_to_the_defaults_without_a_starting_model():
    cfg = TrainConfig.from_dict({"dataset": "", "data_dir": "", "augment": "", "val_fraction": 0})
    assert (cfg.dataset, cfg.data_dir, cfg.augment, cfg.val_fraction) == ("digits", "data", "auto", 0.1)
    given = TrainConfig.from_dict({"dataset": "synthetic", "augment": "flip", "val_fraction": 0.3})
    assert (given.dataset, given.augment, given.val_fraction) == ("synthetic", "flip", 0.3)


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="unknown key 'epoch' in run.yaml; allowed keys: .*epochs"):
        TrainConfig.from_dict({"epoch": 3}, source="run.yaml")


def test_dashes_and_strings_are_accepted():
    cfg = TrainConfig.from_dict({"batch-size": "16", "lr": "0.01", "nesterov": "false"})
    assert (cfg.batch_size, cfg.lr, cfg.nesterov) == (16, 0.01, False)


def _run_train_spy(monkeypatch):
    """Capture the config `mcp train` would run with, without training."""
    seen = {}

    def fake_run_train(cfg, show_progress=None):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr("mcp.stages.train.run_train", fake_run_train)
    return seen


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_and_command_line_precedence(tmp_path, monkeypatch, cli, suffix):
    seen = _run_train_spy(monkeypatch)
    values = {"epochs": 7, "lr": 0.02, "model": "lenet5", "batch-size": 8}
    path = tmp_path / f"train{suffix}"
    path.write_text(json.dumps(values))  # JSON is valid YAML too
    cli("train", "--config", path, "--epochs", "3")
    cfg = seen["cfg"]
    assert cfg.epochs == 3  # command line wins
    assert (cfg.lr, cfg.model, cfg.batch_size) == (0.02, "lenet5", 8)  # file beats defaults
    assert cfg.optimizer == "sgd"  # defaults fill the rest


def test_config_file_unknown_key_fails_on_the_command_line(tmp_path, cli):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 2\nlearning_rate: 0.1\n")
    result = cli("train", "--config", path)
    assert result.exit_code == 2
    assert f"unknown key 'learning_rate' in {path}" in result.output


def test_config_file_missing_or_not_a_mapping(tmp_path, cli):
    assert "does not exist" in cli("train", "--config", tmp_path / "none.yaml").output
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    assert "must hold a mapping" in cli("train", "--config", path).output


def test_bool_options_take_a_flag_or_a_value(monkeypatch, cli):
    seen = _run_train_spy(monkeypatch)
    cli("train", "--download", "--nesterov", "false")
    assert seen["cfg"].download is True and seen["cfg"].nesterov is False


@pytest.mark.parametrize("cls, changes, message", [
    (PruneConfig, {"distill_from": "nope"}, "distill_from='nope' is not a model reference; use 'parent'"),
    (PruneConfig, {"distill_alpha": -0.1}, "distill_alpha=-0.1 is outside [0, 1]"),
    (PruneConfig, {"distill_temperature": 0.0}, "distill_temperature=0.0 must be positive"),
    (PruneConfig, {"momentum": 1.0}, "momentum=1.0 is outside [0, 1)"),
    (QuantizeConfig, {"method": "qat", "epochs": 0, "distill_from": "parent"}, "method qat needs epochs >= 1"),
    (QuantizeConfig, {"method": "kmeans", "epochs": 0, "distill_from": "parent"}, "distill_from needs fine-tuning"),
    (DistillConfig, {"student": "runs/abc"}, "student='runs/abc' is not a model reference"),
    (DistillConfig, {"teacher": "@baseline"}, "teacher='@baseline' is not a model reference"),
    (DistillConfig, {"temperature": -1.0}, "temperature=-1.0 must be positive"),
    (DistillConfig, {"hint_layers": "fc1"}, "hint_layers item 'fc1' is not student_layer=teacher_layer"),
    (DistillConfig, {"weight_decay": -1.0}, "weight_decay=-1.0 must be 0 or more"),
])
def test_distillation_settings_are_checked(cls, changes, message):
    with pytest.raises(ConfigError) as info:
        cls(**changes)
    assert message in str(info.value)


def test_model_references_that_are_accepted():
    for ref in ("lenet5", "lenet5-digits@champion", "runs:/0123/model", "models:/lenet5-digits/3"):
        assert DistillConfig(teacher=ref).teacher == ref
    assert PruneConfig(distill_from="parent").distill_from == "parent"
