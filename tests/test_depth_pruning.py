"""Depth pruning: whole blocks removed, least important first, rebuilt from the recipe."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mcp.errors import ConfigError
from mcp.models import create_model, model_from_recipe
from mcp.pruning import PruneSpec, Pruning
from mcp.pruning.depth import block_order, removable_blocks, remove_blocks, removed_blocks

SHAPE = (1, 16, 16)


def _batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, *SHAPE, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("name, shape, expected", [
    ("resnet20", SHAPE, ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2"]),
    ("resnet18", (3, 32, 32), ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]),  # torchvision's
    ("tiny_cnn", (3, 8, 8), []),
])
def test_removable_blocks_are_the_shape_preserving_ones(name, shape, expected):
    assert removable_blocks(create_model(name, 10, shape), shape) == expected


def test_greedy_order_takes_the_block_whose_removal_costs_least_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model, batches = create_model("resnet20", 10, SHAPE), _batches()
    opt = torch.optim.Adam(model.parameters(), 0.01)
    for _ in range(30):  # fitted to the batches: removing a block that does something costs loss
        for x, y in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():  # layer2.2's residual branch outputs zero: removing it changes nothing
        model.layer2[2].bn2.weight.zero_()
        model.layer2[2].bn2.bias.zero_()
    x = torch.randn(4, *SHAPE)
    before = model(x).detach()
    order = block_order(model, SHAPE, batches, 3)
    assert order[0] == "layer2.2" and len(set(order)) == 3
    assert torch.equal(model(x), before)  # ranked on the model, restored afterwards
    assert block_order(model, SHAPE, [], 2) == ["layer3.1", "layer3.2"]  # no data: the deepest


def test_depth_and_channel_pruning_rebuild_from_the_recipe_in_the_order_they_happened(tmp_path):
    import onnx

    from mcp.deploy.onnx import export_onnx

    torch.manual_seed(0)
    model = create_model("resnet20", 10, SHAPE)
    batches = _batches()
    first = Pruning(model, SHAPE, PruneSpec(granularity="structured", scope="layerwise", sparsity=0.5,
                                            drop_blocks=2), batches)
    first.step()
    second = Pruning(model, SHAPE, PruneSpec(granularity="structured", scope="layerwise", sparsity=0.25,
                                             drop_blocks=1), batches)  # blocks removed after channels were
    second.step()
    events = model.mcp_recipe["depth_pruning"]
    assert [len(e["blocks"]) for e in events] == [2, 1] and events[0]["after_history"] == 0
    assert events[1]["after_history"] > 0 and removed_blocks(model) == second.dropped
    assert all(isinstance(model.get_submodule(b), nn.Identity) for b in second.dropped)

    rebuilt = model_from_recipe(copy.deepcopy(model.mcp_recipe))
    rebuilt.load_state_dict(model.state_dict())  # same shapes, same blocks gone
    x = torch.randn(3, *SHAPE)
    assert torch.allclose(rebuilt.eval()(x), model.eval()(x), atol=1e-6)
    convs = sum(n.op_type == "Conv" for n in onnx.load(export_onnx(model, SHAPE, tmp_path / "m.onnx")).graph.node)
    assert convs == 21 - 2 * 3  # ResNet-20's 21 convolutions, two per removed block


def test_ratios_of_removed_layers_are_moot_and_too_many_blocks_is_one_clear_error():
    model = create_model("resnet20", 10, SHAPE)
    ratios = {n: 0.5 for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != "conv1"}
    Pruning(model, SHAPE, PruneSpec(granularity="structured", scope="layerwise", ratios=ratios,
                                    blocks=("layer1.1",)), []).step()
    assert isinstance(model.layer1[1], nn.Identity) and model.layer1[0].conv1.out_channels == 8
    with pytest.raises(ConfigError, match=r"drop_blocks=8 is more than the 7 removable blocks this model has "
                                          r"\(layer1.0, "):
        block_order(create_model("resnet20", 10, SHAPE), SHAPE, [], 8)
    with pytest.raises(ConfigError, match="block 'layer1.1' cannot be removed"):
        remove_blocks(model, ["layer1.1"])  # already gone
    with pytest.raises(ConfigError, match="must be a list of"):
        model_from_recipe({**model.mcp_recipe, "depth_pruning": [{"blocks": "layer1.1"}]})


def test_prune_stage_drops_blocks_logs_them_and_the_registered_model_reloads(own_store):
    from mcp import tracking
    from mcp.config import PruneConfig, TrainConfig
    from mcp.stages.prune import run_prune
    from mcp.stages.train import run_train

    tiny = dict(dataset="synthetic", input_shape="3x8x8", num_classes=4)
    run_train(TrainConfig(model="tiny_resnet", epochs=1, **tiny), show_progress=False)
    result = run_prune(PruneConfig(model="tiny_resnet", granularity="structured", scope="layerwise", sparsity=0.25,
                                   drop_blocks=1, epochs=1, **tiny), show_progress=False)
    assert result.metrics["blocks_dropped"] == 1
    model = tracking.load_model(f"models:/{result.registered_name}/{result.registered_version}")
    assert isinstance(model.layer1[0], nn.Identity)  # ResNet-8's one block with an identity shortcut
    from mlflow import MlflowClient

    version = MlflowClient().get_model_version(result.registered_name, result.registered_version)
    assert version.tags["dropped_blocks"] == "layer1.0"
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(model(x), result.model.cpu().eval()(x), atol=1e-6)


def test_a_search_samples_blocks_to_remove_and_registers_a_winner_without_them(own_store, tmp_path):
    import optuna

    from mcp import tracking
    from mcp.config import SearchConfig, TrainConfig
    from mcp.tuner.objective import _start_params
    from mcp.tuner.space import build_space, sample
    from mcp.stages.search import run_search
    from mcp.stages.train import run_train

    space = build_space({"prune": {"ratio": [0.2, 0.5], "granularity": ["structured"], "drop_blocks": [0, 1]},
                         "quantize": {"bits": [8]}}, ["conv1", "layer1.0.conv1"], "s.yaml")
    assert space.drop_blocks == (0, 1)
    assert sample(optuna.trial.FixedTrial({**_start_params(space, {u: 0.2 for u in space.units},
                                                           {u: 8 for u in space.units}, 0.2)}), space).drop_blocks == 0
    with pytest.raises(ConfigError, match=r"prune.drop_blocks=\[2, 1\] is an empty range"):
        build_space({"prune": {"drop_blocks": [2, 1]}}, ["conv1"], "s.yaml")

    tiny = dict(dataset="synthetic", input_shape="3x8x8", num_classes=4)
    run_train(TrainConfig(model="tiny_resnet", epochs=1, **tiny), show_progress=False)
    path = tmp_path / "s.yaml"
    path.write_text("prune: {ratio: [0.2, 0.5], granularity: [structured], drop_blocks: [1, 1]}\n"
                    "quantize: {bits: [8]}\nfinetune: {epochs: [1, 1]}\nlayers: {fc: {ratio: [0.0, 0.0]}}\n")
    cfg = SearchConfig(model="tiny_resnet", storage=f"sqlite:///{tmp_path / 'optuna.db'}", trials=2, pruner="none",
                       budget_ratio=0.9, export=False, benchmark=False, space=str(path), finalists=2, **tiny)
    winners = run_search(cfg, show_progress=False).winners  # both trials rebuilt, ranked again on validation
    assert len(winners) == 2 and winners[0]["val_accuracy"] >= winners[1]["val_accuracy"]
    assert winners[0]["alias"] == "challenger" and winners[1]["alias"] is None
    model = tracking.load_model(f"models:/{winners[0]['registered_name']}/{winners[0]['version']}")
    assert isinstance(model.layer1[0], nn.Identity)
    with pytest.raises(ConfigError, match="finalists=2 is for mode max-accuracy"):
        cfg.replace(mode="pareto")
    with pytest.raises(ConfigError, match=r"removes up to 2 blocks, but this model has 1 removable blocks"):
        path.write_text("prune: {granularity: [structured], drop_blocks: [0, 2]}\n")
        run_search(cfg.replace(study_name="too-deep"), show_progress=False)


def test_a_latency_budget_starts_from_uniform_pruning_at_the_fewest_and_the_most_blocks_removed(monkeypatch):
    """Latency stands in for the parameter count, so the starts do not depend on this machine."""
    import optuna

    import mcp.tuner.trial as trial_module
    from mcp.tuner.objective import SearchProblem, enqueue_uniform
    from mcp.tuner.space import build_space, sample
    from mcp.tuner.trial import prune_candidate

    def fake(model, shape, calib, seconds=0.5, batch=1, runtime="onnxruntime"):
        return float(sum(p.numel() for p in model.parameters())) / 1000

    import mcp.tuner.objective as objective

    monkeypatch.setattr(trial_module, "deployed_latency", fake)
    monkeypatch.setattr(objective, "deployed_latency", fake)  # what the uniform start's bisection uses
    base = create_model("resnet20", 10, SHAPE).eval()
    layers = [n for n, m in base.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    space = build_space({"prune": {"ratio": [0.0, 0.9], "granularity": ["structured"], "drop_blocks": [0, 4]},
                         "quantize": {"bits": [8]}, "layers": {"fc": {"ratio": [0.0, 0.0]}}}, layers, "s.yaml")
    budget = fake(base, None, None) * 0.3
    problem = SearchProblem(space=space, base=base, input_shape=SHAPE, loaders=None, device="cpu",
                            calib=_batches(), budget=None, budget_ms=budget)
    study = optuna.create_study(direction="maximize")
    start = enqueue_uniform(study, problem, max_accuracy=True, limit=4)
    assert len(start.queued) == 2 and "with 4 blocks removed" in start.queued[1] and not start.warning
    trials = [t.system_attrs["fixed_params"] for t in study.get_trials(deepcopy=False)]  # enqueued, waiting
    assert [t["drop_blocks"] for t in trials] == [0, 4]
    found = []
    for params in trials:
        tc = sample(optuna.trial.FixedTrial(params), space)
        found.append({r for n, r in tc.ratios.items() if n != "fc"})
        model = prune_candidate(base, SHAPE, tc, problem.calib, "cpu")
        assert fake(model, None, None) <= budget and len(removed_blocks(model)) == tc.drop_blocks
    assert all(len(ratios) == 1 for ratios in found)  # one ratio in every layer
    assert found[1].pop() < found[0].pop()  # removing blocks leaves more channels within the same budget


def test_finalists_tied_on_validation_go_to_the_faster_under_a_latency_budget():
    from mcp.tuner.objective import tie_break

    rows = [{"val_accuracy": 0.9, "size_bytes_compressed": 100.0, "latency_ms_p50_cpu": 0.05},
            {"val_accuracy": 0.9, "size_bytes_compressed": 200.0, "latency_ms_p50_cpu": 0.04},
            {"val_accuracy": 0.95, "size_bytes_compressed": 300.0, "latency_ms_p50_cpu": 0.06},
            {"val_accuracy": 0.9, "size_bytes": 50.0, "latency_ms_p50_cpu": None}]  # a trial never timed

    def order(budget_ms, budget_batch):
        return [r["latency_ms_p50_cpu"] for r in sorted(
            rows, key=lambda r: (-r["val_accuracy"], tie_break(r, budget_ms, budget_batch)))]

    assert order(budget_ms=0.07, budget_batch=1) == [0.06, 0.04, 0.05, None]
    assert order(budget_ms=0.0, budget_batch=1) == [0.06, None, 0.05, 0.04]  # no latency budget: the smaller


def test_rebuilt_finalists_tied_on_validation_accuracy_go_to_the_lower_validation_loss():
    from mcp.tuner.objective import finalist_rank

    winners = [{"trial": 1, "val_accuracy": 0.955, "val_loss": 0.17, "size_bytes_compressed": 10_494.0,
                "latency_ms_p50_cpu": 0.05},
               {"trial": 2, "val_accuracy": 0.955, "val_loss": 0.15, "size_bytes_compressed": 10_517.0,
                "latency_ms_p50_cpu": 0.06},
               {"trial": 3, "val_accuracy": 0.950, "val_loss": 0.10, "size_bytes_compressed": 9_000.0,
                "latency_ms_p50_cpu": 0.04},
               {"trial": 4, "val_accuracy": 0.955, "size_bytes_compressed": 9_000.0,  # recorded before val_loss
                "latency_ms_p50_cpu": 0.04}]

    def order(budget_ms):
        return [w["trial"] for w in sorted(winners, key=lambda w: finalist_rank(w, budget_ms))]

    assert order(0.0) == [2, 1, 4, 3]  # accuracy first; then the loss, not the 23 bytes of size
    assert order(0.07) == [4, 1, 2, 3]  # under a latency budget the faster, as before


class _Res(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + torch.relu(self.conv(x))


class _ListNet(nn.Module):
    """A user's own class: blocks in an nn.ModuleList run by a loop, and a ModuleList whose
    forward reads its first child's weight (the identity has none)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.blocks = nn.ModuleList([_Res(4) for _ in range(3)])
        self.mixers = nn.ModuleList([nn.Conv2d(4, 4, 1), _Res(4)])
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = nn.functional.conv2d(x, self.mixers[0].weight) + self.mixers[1](x)
        return self.fc(x.mean((2, 3)))


def test_blocks_of_a_module_list_are_found_unless_removing_them_breaks_the_forward():
    model = _ListNet().eval()
    assert removable_blocks(model, SHAPE) == ["blocks.0", "blocks.1", "blocks.2", "mixers.1"]
    x = torch.randn(2, *SHAPE)
    before = model(x)
    order = block_order(model, SHAPE, _batches(), 2)
    assert model(x).equal(before)  # ranking leaves the model as it was
    model.mcp_recipe = {}
    remove_blocks(model, order)
    assert removed_blocks(model) == order and all(isinstance(model.get_submodule(n), nn.Identity) for n in order)
    assert model(x).shape == (2, 10)
    with pytest.raises(ConfigError, match="'stem' cannot be removed: it is not a block left in an nn.Sequential"):
        remove_blocks(model, ["stem"])
