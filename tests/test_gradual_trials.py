"""Trials that prune while they train (the space's prune.schedule): the ratios reached
exactly, the budget still the exact encoded size (a trial pruned a little further where
training left it over), and winners rebuilt on the same schedule; studies that also start
from Deep Compression's allocation (the space's starts)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from mlflow import MlflowClient
from torch.utils.data import DataLoader, TensorDataset

from mcp import tracking
from mcp.config import SearchConfig, TrainConfig
from mcp.errors import ConfigError
from mcp.models import create_model
from mcp.stages.search import run_search
from mcp.stages.train import run_train
from mcp.tuner.space import GRADUAL_FROM, build_space, uniform
from mcp.tuner.trial import compressed_size, prune_candidate, prune_while_training, top_up

TINY = dict(dataset="synthetic", input_shape="3x8x8", num_classes=4)
SHAPE = (3, 8, 8)
LENET = ["fc1", "fc2", "fc3"]
SPACE = {"prune": {"ratio": [0.5, 0.9], "schedule": ["gradual", "one_shot"], "epochs": [2, 3]},
         "quantize": {"bits": [2, 3], "encoding": ["codebook", "grid"]}, "finetune": {"epochs": [1, 1],
                                                                                     "lr": [0.01, 0.01]}}


@pytest.fixture(autouse=True)
def _own_registry(own_store):
    """Each test registers its own versions."""


def test_the_space_takes_a_pruning_schedule_and_its_epochs_and_checks_them():
    space = build_space(SPACE, LENET, "s.yaml")
    assert space.schedule == ("gradual", "one_shot") and space.prune_epochs == (2, 3) and space.gradual
    tc = uniform(space, 0.95, 2, 1, 0.01)
    assert (tc.schedule, tc.prune_epochs) == ("gradual", 3)  # a sparse start: the first schedule, its most epochs
    tc = uniform(space, 0.7, 2, 1, 0.01)  # below GRADUAL_FROM a start prunes at once where the space allows it
    assert (tc.schedule, tc.prune_epochs, tc.prune_lr) == ("one_shot", 0, 0.0) and GRADUAL_FROM == 0.9
    gradual_only = build_space({**SPACE, "prune": {**SPACE["prune"], "schedule": ["gradual"]}}, LENET)
    assert uniform(gradual_only, 0.7, 2, 1, 0.01).schedule == "gradual"
    assert build_space({"prune": {"ratio": [0.0, 0.5]}}, LENET, "s.yaml").schedule == ("one_shot",)
    with pytest.raises(ConfigError, match="prune.schedule: 'cubic' is not allowed; choose from: one_shot, gradual, "
                                          "iterative"):
        build_space({"prune": {"schedule": ["cubic"]}}, LENET, "s.yaml")
    assert space.prune_lr == (0.01, 0.01)  # finetune.lr's range where prune.lr is left out
    assert build_space({**SPACE, "prune": {**SPACE["prune"], "lr": [0.01, 0.04]}}, LENET).prune_lr == (0.01, 0.04)
    assert abs(uniform(build_space({**SPACE, "prune": {**SPACE["prune"], "lr": [0.01, 0.04]}}, LENET), 0.95, 2, 1,
                       0.01).prune_lr - 0.02) < 1e-12
    for key, value in (("epochs", [2, 4]), ("lr", [0.01, 0.02])):
        with pytest.raises(ConfigError, match=rf"prune.{key}=\[{value[0]}, {value[1]}\] is for a gradual or iterative "
                                              rf"schedule: prune.schedule \['one_shot'\] has none"):
            build_space({"prune": {key: value}}, LENET, "s.yaml")
    with pytest.raises(ConfigError, match=r"prune.epochs=\[0, 4\] is outside \[1, 1000\]"):
        build_space({"prune": {"schedule": ["gradual"], "epochs": [0, 4]}}, LENET, "s.yaml")
    with pytest.raises(ConfigError, match="prunes while it trains in a trial: it needs granularity \\[unstructured\\]"):
        build_space({"prune": {"schedule": ["gradual"], "granularity": ["structured"]}}, LENET, "s.yaml")


def _data(n: int = 256):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *SHAPE, generator=g)
    y = (x.flatten(1)[:, :4].argmax(1)).long()  # learnable: the class is where the first four inputs peak
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    return loader, loader, loader


def test_a_trial_pruned_while_training_reaches_its_ratios_and_is_pruned_further_only_to_fit():
    torch.manual_seed(0)
    base = create_model("tiny_mlp", 4, SHAPE)
    space = build_space({**SPACE, "prune": {**SPACE["prune"], "ratio": [0.0, 0.99], "schedule": ["gradual"]}},
                        [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)], "s.yaml")
    tc = uniform(space, 0.8, 3, 1, 0.05)
    loaders = _data()
    calib = [next(iter(loaders[0]))]
    model = prune_while_training(base, SHAPE, tc, loaders, calib, "cpu", epochs=4)
    once = prune_candidate(base, SHAPE, tc, calib, "cpu")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, m in linears.items():
        zeros = int((m.weight == 0).sum())
        assert zeros == round(0.8 * m.weight.numel())  # the ratio, exactly, in every layer
    assert not torch.equal(base.state_dict()[f"{next(iter(linears))}.weight"],
                           model.state_dict()[f"{next(iter(linears))}.weight"])  # it trained
    masks = {n: m.weight != 0 for n, m in linears.items()}
    assert any(not torch.equal(masks[n], m.weight != 0) for n, m in once.named_modules() if n in masks)
    size = compressed_size(model, SHAPE, tc)
    same, same_tc = top_up(model, SHAPE, space, tc, size + 1, calib, "cpu")
    assert same is model and same_tc == tc  # within the budget: as it is
    budget = 0.9 * size
    fitted, more = top_up(model, SHAPE, space, tc, budget, calib, "cpu")
    assert compressed_size(fitted, SHAPE, more) <= budget
    assert all(more.ratios[n] > tc.ratios[n] for n in tc.ratios)
    for name, m in fitted.named_modules():
        if name in masks:  # the weights it had lost stay lost; the ones it keeps are untouched
            assert not m.weight[~masks[name]].any()
            kept = m.weight != 0
            assert torch.equal(m.weight[kept], linears[name].weight[kept])


def test_a_trial_prunes_while_training_with_the_prune_stages_weight_decay(monkeypatch):
    """A trial prunes while it trains with the weight decay the prune stage (and so Deep
    Compression's first stage) uses."""
    from mcp.config import PruneConfig
    from mcp.tuner import trial as trial_module

    decays = []
    real = trial_module.build_optimizer
    monkeypatch.setattr(trial_module, "build_optimizer",
                        lambda model, name, lr, momentum, nesterov, weight_decay: decays.append(weight_decay)
                        or real(model, name, lr, momentum, nesterov, weight_decay))
    torch.manual_seed(0)
    base = create_model("tiny_mlp", 4, SHAPE)
    space = build_space({**SPACE, "prune": {**SPACE["prune"], "schedule": ["gradual"]}},
                        [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)], "s.yaml")
    loaders = _data()
    prune_while_training(base, SHAPE, uniform(space, 0.8, 3, 1, 0.05), loaders, [next(iter(loaders[0]))], "cpu",
                         epochs=2)
    assert decays == [PruneConfig.defaults()["weight_decay"]] and decays[0] > 0


def test_a_search_over_schedules_prunes_gradually_within_the_budget_and_rebuilds_its_winner_so(experiment,
                                                                                                tmp_path):
    run_train(TrainConfig(model="tiny_mlp", epochs=6, **TINY), show_progress=False)
    space = tmp_path / "space.yaml"
    space.write_text(json.dumps({**SPACE, "prune": {**SPACE["prune"], "schedule": ["gradual"]}}))
    cfg = SearchConfig(model="tiny_mlp", storage=f"sqlite:///{tmp_path / 'optuna.db'}", trials=3, pruner="none",
                       budget_ratio=0.05, space=str(space), export=False, benchmark=False, final_prune_epochs=4,
                       **TINY)
    result = run_search(cfg, show_progress=False)
    assert result.trials[0]["params"]["prune_epochs"] == 3  # the uniform start: the most epochs
    for t in result.trials:
        if t["state"] == "complete":
            assert t["size_bytes_compressed"] <= result.budget_bytes
    (winner,) = result.winners
    assert winner["size_bytes_compressed"] <= result.budget_bytes
    tags = MlflowClient().get_model_version("tiny_mlp-synthetic", winner["version"]).tags
    assert tags["prune_schedule"] == "gradual" and tags["prune_epochs"] == "4"  # --final-prune-epochs
    assert tags["final_prune_epochs_option"] == "4"
    model = tracking.load_model(f"models:/tiny_mlp-synthetic/{winner['version']}")
    ratios = json.loads(tags["ratios"])
    for name, m in model.named_modules():  # each layer pruned to the ratio its trial ran (rounded in the tag)
        if name in ratios:
            assert abs(float((m.weight == 0).float().mean()) - ratios[name]) < 0.01
    with pytest.raises(ConfigError, match="final_prune_epochs=-1 must be 0 or more"):
        SearchConfig(final_prune_epochs=-1).validate()


def test_a_space_may_start_from_deep_compressions_allocation_beside_the_uniform_recipes():
    from mcp.tuner.objective import SearchProblem, enqueue_uniform, global_allocation

    class Study:  # what enqueue_uniform asks of an Optuna study
        def __init__(self):
            self.queued, self.kinds = [], []

        def enqueue_trial(self, params, user_attrs=None, skip_if_exists=False):
            self.queued.append(params)
            self.kinds.append(user_attrs["start"])

    torch.manual_seed(0)
    base = create_model("tiny_mlp", 4, SHAPE)
    names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    data = {"starts": ["uniform", "global"], "prune": {"ratio": [0.0, 0.99]}, "quantize": {"bits": [3, 8]}}
    space = build_space(data, names, "s.yaml")
    shares = global_allocation(base, space, 0.9)
    sizes = {n: dict(base.named_modules())[n].weight.numel() for n in names}
    assert abs(sum(shares[n] * sizes[n] for n in names) / sum(sizes.values()) - 0.9) < 1e-3
    assert shares[names[0]] != shares[names[-1]]  # one threshold: layers lose different shares
    budget = 2000.0
    study = Study()
    start = enqueue_uniform(study, SearchProblem(space, base, SHAPE, None, "cpu", [], budget), True)
    assert len(study.queued) == 4 and len(start.queued) == 4  # uniform at 3 and 8 bits, then global at 3 and 8
    assert start.queued[2].startswith("global magnitude") and "and 3 bits" in start.queued[2]
    assert study.kinds == ["uniform", "uniform", "global", "global"]  # what the finalists' rule looks for
    for params in study.queued[:2]:
        assert len({v for k, v in params.items() if k.startswith("ratio.")}) == 1
    for params in study.queued[2:]:
        ratios = {k.removeprefix("ratio."): v for k, v in params.items() if k.startswith("ratio.")}
        assert len(set(ratios.values())) == len(names)  # one share per layer
        tc = dataclasses.replace(uniform(space, 0.0, params[f"bits.{names[0]}"], 1, 0.01), ratios=ratios)
        assert compressed_size(prune_candidate(base, SHAPE, tc, [], "cpu"), SHAPE, tc) <= budget
    limited = Study()
    enqueue_uniform(limited, SearchProblem(space, base, SHAPE, None, "cpu", [], budget), True, limit=3)
    assert len(limited.queued) == 3  # no more starts than the call's trials
    with pytest.raises(ConfigError, match="a global start shares one magnitude threshold between layers' weights; "
                                          "it needs granularity unstructured first"):
        build_space({"starts": ["global"], "prune": {"granularity": ["structured"]}}, names, "s.yaml")


def test_starts_run_to_the_end_and_the_best_of_each_kind_is_a_finalist(experiment, tmp_path, monkeypatch):
    """A pruner that would stop every trial after its first epoch stops only the sampled
    ones: the starts are what the search must beat. With two finalists, the best trial
    and the best Deep Compression start are rebuilt (the best trial here a uniform start,
    or the global one itself: then the next best)."""
    import optuna

    from mcp.tuner.objective import best_trials

    run_train(TrainConfig(model="tiny_mlp", epochs=6, **TINY), show_progress=False)
    always = optuna.pruners.ThresholdPruner(lower=2.0)  # no accuracy reaches 2: every trial it may stop, it stops
    monkeypatch.setattr(optuna.pruners, "NopPruner", lambda: always)
    space = tmp_path / "space.yaml"
    space.write_text(json.dumps({"starts": ["uniform", "global"], "prune": {"ratio": [0.5, 0.9]},
                                 "quantize": {"bits": [3], "encoding": ["codebook"]},
                                 "finetune": {"epochs": [2, 2], "lr": [0.01, 0.01]}}))
    cfg = SearchConfig(model="tiny_mlp", storage=f"sqlite:///{tmp_path / 'optuna.db'}", trials=4, pruner="none",
                       budget_ratio=0.05, space=str(space), export=False, benchmark=False, finalists=2, **TINY)
    result = run_search(cfg, show_progress=False)
    kinds = [(t["start"], t["state"]) for t in result.trials]
    assert kinds[:2] == [("uniform", "complete"), ("global", "complete")]
    assert {state for start, state in kinds[2:]} == {"pruned"}  # the sampled trials, stopped after one epoch
    assert sorted(w["trial"] for w in result.winners) == [0, 1]
    import csv

    from mcp.tuner.objective import write_trials_csv

    with write_trials_csv(result.trials, tmp_path / "trials.csv").open() as fh:
        assert [row["start"] for row in csv.DictReader(fh)][:3] == ["uniform", "global", ""]

    rows = [{"number": n, "state": "complete", "feasible": True, "val_accuracy": v, "size_bytes": 1.0, "start": k}
            for n, v, k in [(0, 0.95, "uniform"), (1, 0.94, "global"), (2, 0.96, ""), (3, 0.93, "global"),
                            (4, 0.949, "uniform")]]
    assert [t["number"] for t in best_trials(rows, 1)] == [2]
    assert [t["number"] for t in best_trials(rows, 2)] == [2, 1]  # the best, then the best global start
    assert [t["number"] for t in best_trials(rows, 3)] == [2, 0, 1]  # and the best uniform one, by accuracy
    assert [t["number"] for t in best_trials(rows, 4)] == [2, 0, 4, 1]
    assert [t["number"] for t in best_trials(rows[:1] + rows[2:3], 2)] == [2, 0]  # no global start: the next best


def test_a_fit_to_the_budget_comes_in_a_few_evaluations_and_is_close_under_it():
    """False position (Illinois) on a straight size line and on a curved one: the result
    fits, lies within CLOSE_ENOUGH under the budget, and takes fewer evaluations than the
    ten halvings it replaced."""
    import math

    from mcp.tuner.trial import CLOSE_ENOUGH, least_fitting

    for curve in (lambda x: 20000 - 15000 * x, lambda x: 20000 * math.exp(-3 * x), lambda x: 20000 / (1 + 9 * x**4)):
        calls = []

        def value(x, curve=curve):
            calls.append(x)
            return curve(x)

        budget = 9000.0
        x = least_fitting(value, 0.0, 1.0, budget, curve(0.0), curve(1.0), steps=10)
        assert curve(x) <= budget and budget - curve(x) <= CLOSE_ENOUGH * budget, (x, curve(x))
        assert len(calls) <= 7
