"""Distillation building blocks: the KD loss, hint losses and adapters, the Trainer hook."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mcp.distillation import Distiller, DistillSpec, HintLoss, HintPair, distillation_loss, kd_loss, parse_hint_layers
from mcp.errors import ConfigError
from mcp.models import create_model
from mcp.pruning import KeepSparsity
from mcp.training import Trainer, build_optimizer


def _softmax(row: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def test_kd_loss_equals_its_closed_form_with_the_t_squared_factor():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.5]]
    for t in (1.0, 2.0, 4.0):
        # KL(p_t || p_s) per row, by hand, averaged over the batch, times T^2
        kl = []
        for s_row, t_row in zip(student, teacher):
            p_s, p_t = _softmax(s_row, t), _softmax(t_row, t)
            kl.append(sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s)))
        expected = t * t * sum(kl) / len(kl)
        got = kd_loss(torch.tensor(student), torch.tensor(teacher), t)
        assert got.item() == pytest.approx(expected, rel=1e-6), t


def test_kd_gradient_is_t_times_the_softened_probability_gap():
    """Hinton et al.: with the T^2 factor, d loss / d logit = T (q_i - p_i) / batch, so the
    soft targets' gradients do not shrink as T grows."""
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], requires_grad=True)
    t_logits = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.5, 2.5]])
    t = 3.0
    kd_loss(s, t_logits, t).backward()
    expected = t * (torch.softmax(s.detach() / t, 1) - torch.softmax(t_logits / t, 1)) / 2
    assert torch.allclose(s.grad, expected, atol=1e-6)


def test_distillation_loss_weighs_labels_and_soft_targets_by_alpha():
    s, t = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 3, 0])
    total, ce, kd = distillation_loss(s, t, y, temperature=2.0, alpha=0.3)
    assert ce.item() == pytest.approx(nn.functional.cross_entropy(s, y).item())
    assert kd.item() == pytest.approx(kd_loss(s, t, 2.0).item())
    assert total.item() == pytest.approx(0.7 * ce.item() + 0.3 * kd.item(), rel=1e-6)
    assert kd_loss(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)  # a perfect copy has nothing to learn


def _data(n: int = 64, shape=(1, 8, 8), classes: int = 4) -> tuple[DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, *shape, generator=gen), torch.arange(n) % classes
    x += y.view(-1, 1, 1, 1).float()  # learnable
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator())
    return train, DataLoader(TensorDataset(x, y), batch_size=32)


def _train(student: nn.Module, batch_loss=None, epochs: int = 2, callbacks=()) -> nn.Module:
    train, val = _data()
    opt = build_optimizer(student, "sgd", 0.05, 0.9)
    if batch_loss is not None:
        batch_loss.attach(opt)
    Trainer(student, opt, None, train, val, epochs=epochs, seed=3, batch_loss=batch_loss, callbacks=callbacks,
            restore_best=False).fit()
    return student


def test_alpha_zero_trains_exactly_as_plain_training():
    torch.manual_seed(0)
    teacher = create_model("tiny_cnn", 4, (1, 8, 8))
    torch.manual_seed(1)
    start = create_model("tiny_mlp", 4, (1, 8, 8))
    plain = _train(_copy(start))
    at_zero = _train(_copy(start), Distiller(teacher, DistillSpec(temperature=4.0, alpha=0.0)))
    distilled = _train(_copy(start), Distiller(teacher, DistillSpec(temperature=4.0, alpha=0.9)))
    for (name, a), b, c in zip(plain.state_dict().items(), at_zero.state_dict().values(),
                               distilled.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(plain.state_dict().values(), distilled.state_dict().values()))


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def test_the_trainer_logs_each_part_of_the_loss_per_epoch():
    teacher = create_model("tiny_cnn", 4, (1, 8, 8))
    student = create_model("tiny_mlp", 4, (1, 8, 8))
    train, val = _data()
    distiller = Distiller(teacher, DistillSpec(alpha=0.5, hint_layers="auto"), student, (1, 8, 8))
    opt = build_optimizer(student, "sgd", 0.05, 0.9)
    distiller.attach(opt)
    trainer = Trainer(student, opt, None, train, val, epochs=2, batch_loss=distiller)
    history = trainer.fit()
    for key in ("ce_loss", "kd_loss", "hint_loss", "train_loss"):
        assert len(history[key]) == 2 and all(math.isfinite(v) for v in history[key]), key
    # the epoch's loss is the weighted sum of its parts (averaged over the same samples)
    for e in range(2):
        expected = 0.5 * history["ce_loss"][e] + 0.5 * history["kd_loss"][e] + history["hint_loss"][e]
        assert history["train_loss"][e] == pytest.approx(expected, rel=1e-5)


def test_the_teacher_is_a_frozen_copy():
    teacher = create_model("tiny_cnn", 4, (1, 8, 8))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller = Distiller(teacher, DistillSpec())
    _train(create_model("tiny_mlp", 4, (1, 8, 8)), distiller)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # BN stats too
    assert all(torch.equal(before[k], v) for k, v in distiller.teacher.state_dict().items())
    assert not any(p.requires_grad for p in distiller.teacher.parameters())


def test_auto_hints_match_penultimate_features_through_a_learned_linear_adapter():
    teacher = create_model("lenet300_100", 4, (1, 8, 8))  # penultimate width 100
    student = create_model("tiny_mlp", 4, (1, 8, 8))  # penultimate width 16
    hints = HintLoss(student, teacher, parse_hint_layers("auto"), (1, 8, 8))
    assert hints.pairs == [HintPair("5", "fc3")]
    (adapter,) = hints.adapters
    assert isinstance(adapter, nn.Linear) and (adapter.in_features, adapter.out_features) == (16, 100)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        teacher(x)
    student(x)
    loss = hints()
    loss.backward()
    assert loss.item() > 0 and adapter.weight.grad.abs().sum() > 0
    assert student[1].weight.grad.abs().sum() > 0  # the student's own layers learn from the hint
    hints.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in (*student.modules(), *teacher.modules()))


def test_conv_hints_get_a_1x1_adapter_and_pool_to_the_smaller_map():
    teacher = create_model("tiny_cnn", 4, (1, 8, 8))  # features.2: 8 channels at 8x8; features.6: 16 at 4x4
    student = create_model("tiny_cnn", 4, (1, 8, 8))
    hints = HintLoss(student, teacher, parse_hint_layers("features.2=features.6, features.6=features.6"), (1, 8, 8))
    conv, same = hints.adapters
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and (conv.in_channels, conv.out_channels) == (
        8, 16)
    assert isinstance(same, nn.Identity)  # equal widths need no adapter
    x = torch.randn(2, 1, 8, 8)
    teacher(x), student(x)
    assert torch.isfinite(hints())
    hints.remove()


@pytest.mark.parametrize("text, message", [
    ("fc9=fc3", "hint layer 'fc9' is not a module of the student"),
    ("5=nope", "hint layer 'nope' is not a module of the teacher"),
    ("5", "is not student_layer=teacher_layer"),
])
def test_bad_hint_layers_are_clear_errors(text, message):
    teacher = create_model("lenet300_100", 4, (1, 8, 8))
    student = create_model("tiny_mlp", 4, (1, 8, 8))
    with pytest.raises(ConfigError, match=message):
        Distiller(teacher, DistillSpec(hint_layers=text), student, (1, 8, 8))
    assert not any(m._forward_hooks for m in student.modules())  # nothing left attached


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 0.0}, "temperature=0.0 must be positive"),
    ({"alpha": 1.5}, r"alpha=1.5 is outside \[0, 1\]"),
    ({"hint_weight": -1.0}, "hint_weight=-1.0 must be 0 or more"),
])
def test_bad_distillation_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DistillSpec(**kwargs)


def test_keep_sparsity_keeps_a_pruned_students_zeros():
    torch.manual_seed(0)
    student = create_model("tiny_mlp", 4, (1, 8, 8))
    with torch.no_grad():
        student[1].weight[:, ::2] = 0.0  # half the first layer pruned
    zeros = student[1].weight == 0
    keep = KeepSparsity(student)
    assert keep.active and list(keep.cut.layers) == ["1"]
    teacher = create_model("tiny_cnn", 4, (1, 8, 8))
    _train(student, Distiller(teacher, DistillSpec()), callbacks=[keep])
    assert torch.equal(student[1].weight == 0, zeros)
    assert not KeepSparsity(create_model("tiny_mlp", 4, (1, 8, 8))).active  # a dense model has no masks
