"""Pruning: schedules, every criterion x scope x granularity cell, masks through training,
structured pruning on residual / BN / depthwise models, reload with the smaller shapes."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from mcp.errors import ConfigError
from mcp.models import create_model, model_from_recipe
from mcp.pruning import (PruneSpec, Pruning, PruningCallback, create_criterion, criterion_names, event_steps,
                         gradual, iterative, one_shot, prune)
from mcp.pruning.importance import _greedy_thinet
from mcp.pruning.pruner import select_layers
from mcp.training import Trainer, build_optimizer

SHAPE = (3, 8, 8)
SUPPORTED = {  # criterion -> granularities; anything else must be refused with a clear error
    "magnitude": {"unstructured", "structured"}, "second_order": {"unstructured", "structured"},
    "sensitivity": {"unstructured", "structured"}, "bn_scaling": {"structured"}, "apoz": {"structured"},
    "regression": {"structured"},
}
CELLS = list(itertools.product(sorted(SUPPORTED), ("global", "layerwise"), ("unstructured", "structured")))


def _batches(shape=SHAPE, n=3, classes=4):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(16, *shape, generator=gen), torch.randint(0, classes, (16,), generator=gen))
            for _ in range(n)]


def _model(name="tiny_cnn", shape=SHAPE, classes=4):
    torch.manual_seed(0)
    model = create_model(name, classes, shape)
    for m in model.modules():  # trained-looking BN scales (untrained ones are all 1)
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.1, 1.0)
    return model


def _out(m):
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


# ----------------------------------------------------------------------------- schedules

def test_schedules_end_at_the_target():
    assert one_shot(0.8) == [0.8]
    it = iterative(0.9, 4)
    assert it[-1] == pytest.approx(0.9) and all(a < b for a, b in zip(it, it[1:]))
    # the same fraction of the remaining weights at every step
    kept = [1 - s for s in [0.0, *it]]
    assert [b / a for a, b in zip(kept, kept[1:])] == pytest.approx([0.1 ** 0.25] * 4)
    g = gradual(0.9, 5, initial=0.2)
    assert g == pytest.approx([0.9 + (0.2 - 0.9) * (1 - j / 5) ** 3 for j in range(1, 6)])
    assert g[-1] == pytest.approx(0.9)
    assert event_steps(4, 100) == [0, 25, 50, 75] and event_steps(1, 0) == [0]


# ----------------------------------------------------------------------------- the cells

@pytest.mark.parametrize("criterion, scope, granularity", CELLS, ids=lambda v: str(v))
def test_every_cell(criterion, scope, granularity):
    model = _model()
    spec = PruneSpec(criterion=criterion, scope=scope, granularity=granularity, sparsity=0.5)
    if granularity not in SUPPORTED[criterion]:
        with pytest.raises(ConfigError, match=f"criterion '{criterion}' does not support {granularity} pruning"):
            prune(model, spec, SHAPE, _batches())
        return
    before = {n: (m.weight.numel(), _out(m)) for n, m in select_layers(model, SHAPE, False, False, [])[0].items()}
    params0 = sum(p.numel() for p in model.parameters())
    from mcp.evaluation.metrics import count_macs

    macs0 = count_macs(model, SHAPE)
    pruning = prune(model, spec, SHAPE, _batches())
    layers = pruning.layers
    if granularity == "unstructured":
        zeros = {n: int((m.weight == 0).sum()) for n, m in layers.items()}
        if scope == "global":
            total = sum(n for n, _ in before.values())
            assert sum(zeros.values()) == round(0.5 * total)  # exact, to the weight
        else:
            assert zeros == {n: round(0.5 * before[n][0]) for n in layers}
        assert pruning.cut.sparsity() == pytest.approx(0.5, abs=1 / sum(n for n, _ in before.values()))
    else:
        out_layer = pruning.all_names[-1]
        pruned = {n: _out(m) for n, m in layers.items() if n != out_layer}
        if scope == "layerwise":
            for name, channels in pruned.items():
                assert abs(channels - before[name][1] * 0.5) <= 1, name  # within one channel per layer
        else:
            total0 = sum(before[n][1] for n in pruned)
            assert abs(sum(pruned.values()) - 0.5 * total0) <= len(pruned)
        assert sum(p.numel() for p in model.parameters()) < params0
        assert count_macs(model, SHAPE) < macs0
        _assert_reloads(model)


def _assert_reloads(model):
    x = torch.randn(5, *model.mcp_recipe["input_shape"])
    clone = model_from_recipe(model.mcp_recipe)
    clone.load_state_dict(model.state_dict())  # strict: the smaller shapes are rebuilt
    model.eval(), clone.eval()
    with torch.no_grad():
        assert torch.equal(model(x), clone(x))


@pytest.mark.parametrize("name, shape", [("resnet20", (3, 16, 16)), ("vgg16_bn", (3, 16, 16)),
                                         ("mobilenet_v2", (3, 8, 8))])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_structured_on_residual_bn_and_depthwise_models(name, shape, scope):
    from mcp.evaluation.metrics import count_macs

    model = _model(name, shape, classes=10)
    params0, macs0 = sum(p.numel() for p in model.parameters()), count_macs(model, shape)
    pruning = prune(model, PruneSpec(scope=scope, granularity="structured", sparsity=0.4), shape)
    assert sum(p.numel() for p in model.parameters()) < 0.8 * params0
    assert count_macs(model, shape) < 0.8 * macs0
    assert model(torch.randn(2, *shape)).shape == (2, 10)
    assert pruning.cut.history  # Torch-Pruning's record, stored in the recipe
    _assert_reloads(model)


def test_unsupported_cells_and_bad_layers_are_clear_errors():
    with pytest.raises(ConfigError, match="needs BatchNorm layers, and this model has none"):
        prune(_model("tiny_mlp"), PruneSpec(criterion="bn_scaling", granularity="structured"), SHAPE)
    with pytest.raises(ConfigError, match="unknown criterion 'l0'; choose one of: apoz"):
        create_criterion("l0", "structured")
    with pytest.raises(ConfigError, match="ignored_layers has unknown layer.* nope; this model's layers are"):
        Pruning(_model(), SHAPE, PruneSpec(ignored_layers=("nope",)), [])
    with pytest.raises(ConfigError, match="ratios name layer.* not in scope: fc2"):
        Pruning(_model(), SHAPE, PruneSpec(scope="layerwise", ratios={"fc2": 0.3}), [])
    with pytest.raises(ConfigError, match="ratio 1.5 for layer 'fc' is outside"):
        Pruning(_model(), SHAPE, PruneSpec(scope="layerwise", ratios={"fc": 1.5}), [])


def test_per_layer_ratios_and_protected_layers():
    model = _model()
    spec = PruneSpec(scope="layerwise", sparsity=0.5, ratios={"features.4": 0.25}, keep_first=True)
    pruning = prune(model, spec, SHAPE)
    sparsity = pruning.layer_sparsity()
    assert "features.0" not in sparsity and (model.features[0].weight == 0).sum() == 0
    assert sparsity["features.4"] == pytest.approx(round(0.25 * 16 * 8 * 9) / (16 * 8 * 9))
    assert sparsity["fc"] == pytest.approx(0.5, abs=0.02)


# ----------------------------------------------------------------------------- training with masks

def _train_with(pruning, at_steps, epochs=2, optimizer="sgd"):
    from mcp.data import load_dataset, make_loaders

    splits = load_dataset("synthetic", input_shape="3x8x8", num_classes=4)
    train, val, _ = make_loaders(splits, 32)
    opt = build_optimizer(pruning.model, optimizer, 0.05, momentum=0.9, weight_decay=1e-3)
    trainer = Trainer(pruning.model, opt, None, train, val, epochs=epochs,
                      callbacks=[PruningCallback(pruning, at_steps)], restore_best=False)
    trainer.fit()
    return trainer


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_masks_survive_fine_tuning(optimizer):
    model = _model()
    pruning = Pruning(model, SHAPE, PruneSpec(sparsity=0.7), [])
    trainer = _train_with(pruning, [0], optimizer=optimizer)
    assert trainer.global_step >= 16  # two epochs of optimizer steps
    for m, mask in pruning.cut.masks.items():
        assert torch.all(m.weight[~mask] == 0)  # exactly zero after momentum and weight decay
        assert (m.weight[mask] != 0).all()
    assert pruning.cut.sparsity() == pytest.approx(0.7, abs=1e-3)


@pytest.mark.parametrize("schedule", ["iterative", "gradual"])
def test_schedules_through_training_reach_the_target(schedule):
    model = _model()
    pruning = Pruning(model, SHAPE, PruneSpec(schedule=schedule, steps=4, sparsity=0.8), [])
    trainer_steps = event_steps(4, 30)
    pruning_cb_events = []

    def record(k, target):
        pruning_cb_events.append((k, target, pruning.cut.sparsity()))

    from mcp.data import load_dataset, make_loaders

    splits = load_dataset("synthetic", input_shape="3x8x8", num_classes=4)
    train, val, _ = make_loaders(splits, 32)
    opt = build_optimizer(model, "sgd", 0.05)
    Trainer(model, opt, None, train, val, epochs=3, restore_best=False,
            callbacks=[PruningCallback(pruning, trainer_steps, on_event=record)]).fit()
    targets = [t for _, t, _ in pruning_cb_events]
    assert [k for k, _, _ in pruning_cb_events] == [0, 1, 2, 3]
    assert targets == pytest.approx((iterative if schedule == "iterative" else gradual)(0.8, 4))
    for _, target, reached in pruning_cb_events:
        assert reached == pytest.approx(target, abs=1e-3)


def test_structured_steps_in_training_rebuild_the_optimizer():
    model = _model()
    pruning = Pruning(model, SHAPE, PruneSpec(granularity="structured", scope="layerwise", schedule="iterative",
                                              steps=2, sparsity=0.5), _batches())
    rebuilt = []

    def rebuild(trainer):
        rebuilt.append(trainer.global_step)
        trainer.optimizer = build_optimizer(trainer.model, "sgd", 0.01)

    from mcp.data import load_dataset, make_loaders

    splits = load_dataset("synthetic", input_shape="3x8x8", num_classes=4)
    train, val, _ = make_loaders(splits, 32)
    Trainer(model, build_optimizer(model, "sgd", 0.01), None, train, val, epochs=2, restore_best=False,
            callbacks=[PruningCallback(pruning, [0, 10], rebuild)]).fit()
    assert rebuilt == [0, 10]
    assert model.features[0].out_channels == 4 and model.features[4].out_channels == 8
    _assert_reloads(model)


# ----------------------------------------------------------------------------- criteria details

def test_greedy_thinet_removes_useless_channels_first():
    # channel 2 contributes nothing; channels 0 and 1 cancel each other (removing both is free)
    gram = torch.tensor([[1.0, -1.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0],
                         [0.0, 0.0, 0.0, 4.0]])
    score = _greedy_thinet(gram)
    assert score.argsort().tolist() == [2, 0, 1, 3]  # the greedy removal order
    assert float(score[1]) == pytest.approx(float(score[0]), abs=1e-6)  # 0 and 1 together cost what 0 alone did


def test_regression_refit_reconstructs_the_next_layer_better():
    model = _model("tiny_mlp")
    batches = _batches()
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        hidden = model[2](model[1](model[0](x)))  # input of layer 3 (16 -> ... consumer)
    target = model[3](hidden) - model[3].bias

    spec = PruneSpec(criterion="regression", granularity="structured", scope="layerwise", sparsity=0.5,
                     ignored_layers=("3",))
    refit = _model("tiny_mlp")
    prune(refit, spec, SHAPE, batches)
    plain = _model("tiny_mlp")
    crit = create_criterion("regression", "structured")
    crit.after_prune = lambda *a, **k: None  # same selection, no least-squares refit
    pruning = Pruning(plain, SHAPE, spec, batches)
    pruning.criterion = crit
    pruning.step()

    def error(m):
        with torch.no_grad():
            h = m[2](m[1](m[0](x)))
            return ((m[3](h) - m[3].bias) - target).pow(2).mean().item()

    assert refit[1].out_features == plain[1].out_features == 16
    assert error(refit) < error(plain)


@pytest.mark.parametrize("hessian", ["fisher", "hutchinson"])
def test_second_order_saliency_is_obd(hessian):
    model = _model("tiny_mlp")
    layers, _ = select_layers(model, SHAPE, False, False, [])
    with torch.no_grad():
        model[1].weight[0, :5] = 0
    scores = create_criterion("second_order", "unstructured", hessian=hessian).scores(model, layers, _batches(),
                                                                                      "cpu")
    for m in layers.values():
        s = scores.weight[m]
        assert s.shape == m.weight.shape and (s >= 0).all() and torch.isfinite(s).all()
    assert (scores.weight[model[1]][0, :5] == 0).all()  # a zero weight has zero saliency
    assert scores.weight[model[1]].sum() > 0


def test_bn_l1_penalty_shrinks_bn_scales():
    from mcp.data import load_dataset, make_loaders
    from mcp.pruning import BNL1Penalty

    splits = load_dataset("synthetic", input_shape="3x8x8", num_classes=4)
    train, val, _ = make_loaders(splits, 32)
    norms = []
    for strength in (0.0, 0.05):
        model = _model()
        cbs = [BNL1Penalty(strength)] if strength else []
        Trainer(model, build_optimizer(model, "sgd", 0.05), None, train, val, epochs=2, callbacks=cbs).fit()
        norms.append(sum(m.weight.abs().sum().item() for m in model.modules() if isinstance(m, nn.BatchNorm2d)))
    assert norms[1] < 0.8 * norms[0]


def test_criterion_names_match_the_table():
    assert set(criterion_names()) == set(SUPPORTED)
    for name, granularities in SUPPORTED.items():
        assert set(create_criterion(name, "structured").granularities) == granularities


# ----------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_mlp"])
def test_a_pruned_float_models_sizes_count_the_same_tensors(name):
    """``size_bytes_fp32`` and ``size_bytes_compressed`` of a float model count the same
    tensors (BatchNorm running statistics too) in the same container: a structured-pruned
    model is dense, so both are equal, and an unstructured one encodes smaller, never larger.
    Before, ``size_bytes_fp32`` counted the parameters alone: 4,592 B of BatchNorm statistics
    and 498 B of tensor headers short on a structured-pruned ResNet-20."""
    from torch.utils.data import DataLoader, TensorDataset

    from mcp.pruning.finetune import prune_and_finetune
    from mcp.quantization import encode_model
    from mcp.training import FineTune

    shape = SHAPE if name == "tiny_resnet" else (1, 8, 8)
    x, y = (torch.cat(t) for t in zip(*_batches(shape, n=2)))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    base = _model(name, shape)
    for granularity in ("structured", "unstructured"):
        out = prune_and_finetune(base, (loader, loader, loader), shape,
                                 PruneSpec(granularity=granularity, sparsity=0.5), FineTune(epochs=1), progress=False)
        m = out.metrics
        assert m["size_bytes_compressed"] == len(encode_model(out.model, {}, "fixed"))
        if granularity == "structured":
            assert m["size_bytes_compressed"] == m["size_bytes_fp32"] < m["baseline_size_bytes_fp32"]
        else:
            assert m["size_bytes_compressed"] < m["size_bytes_fp32"] == m["baseline_size_bytes_fp32"]
    buffers = sum(b.numel() for b in base.buffers() if b.is_floating_point())
    assert m["size_bytes_fp32"] > 4 * (m["params_total"] + buffers)  # every tensor, and its header


def _groupnorm_net(groups: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(groups, 16), nn.ReLU(),
                         nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 4))


def _group_warnings(model: nn.Module, scope: str, sparsity: float) -> tuple[list[str], Pruning]:
    import warnings

    from mcp.pruning.pruner import PruningWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = prune(model, PruneSpec(granularity="structured", scope=scope, sparsity=sparsity), SHAPE)
    return [str(w.message) for w in caught if issubclass(w.category, PruningWarning)], done


def test_groupnorm_rounding_beyond_the_ratio_is_said_once_per_layer():
    # layer-wise 30%: the GroupNorm layer goes in steps of 4 (one per group) and loses 8 of 16, not 5
    said, done = _group_warnings(_groupnorm_net(), "layerwise", 0.3)
    assert done.layer_sparsity()["0"] == 0.5 and done.layer_sparsity()["3"] == pytest.approx(8 / 24)
    assert said == [("structured pruning removed 8 of layer 0's 16 output channels (50.0%), asked 30.0% (5): it "
                     "feeds a GroupNorm of 4 groups, which keeps a multiple of 4 channels")]
    assert done.cut.channel_sparsity() == pytest.approx((8 + 8) / 40)
    # a GroupNorm of 16 groups over 16 channels leaves nothing to remove: said too
    said, done = _group_warnings(_groupnorm_net(16), "layerwise", 0.5)
    assert done.layer_sparsity()["0"] == 0.0 and len(said) == 1 and "removed 0 of layer 0's 16" in said[0]
    # where the groups do not change the count (50%: 2 of each group's 4), nothing to say
    assert _group_warnings(_groupnorm_net(), "layerwise", 0.5)[0] == []
    # global scope: the channels removed overall miss the 70% asked, in one line naming the layer
    said, done = _group_warnings(_groupnorm_net(), "global", 0.7)
    assert len(said) == 1 and said[0].startswith("structured pruning removed 16 of 40 output channels (40.0%), "
                                                 "asked 70.0% (28)")
    assert "layer 0, 4 groups: 0 of 16 removed" in said[0]
    # the same net with BatchNorm reaches the ratio: no line
    net = _groupnorm_net()
    net[1] = nn.BatchNorm2d(16)
    assert _group_warnings(net, "global", 0.7)[0] == []
    # the same layer again in this process (a search's next trial): said once is enough
    said, done = _group_warnings(_groupnorm_net(), "layerwise", 0.3)
    assert done.layer_sparsity()["0"] == 0.5 and said == []
