"""The training loop: schedules, learning, early stopping, exact resume, checkpoint errors."""

from __future__ import annotations

import math

import pytest
import torch

from mcp.data import load_dataset, make_loaders
from mcp.errors import McpError
from mcp.models import create_model
from mcp.training import EarlyStopping, Trainer, build_optimizer, build_scheduler, evaluate, lr_factor
from mcp.training.checkpoint import load_checkpoint, restore_trainer, save_checkpoint


def test_lr_schedules():
    assert [lr_factor("cosine", e, 4) for e in range(4)] == pytest.approx(
        [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])
    assert [lr_factor("step", e, 30, step_size=10, gamma=0.1) for e in (0, 9, 10, 25)] == pytest.approx(
        [1, 1, 0.1, 0.01])
    assert lr_factor("constant", 7, 10) == 1.0
    with pytest.raises(ValueError, match="unknown LR schedule 'linear'"):
        lr_factor("linear", 0, 1)


def _trainer(epochs=3, seed=0, model="tiny_cnn", optimizer="sgd", callbacks=()):
    splits = load_dataset("synthetic", input_shape="3x8x8", num_classes=4)
    train, val, test = make_loaders(splits, 32, seed=seed)
    torch.manual_seed(seed)
    net = create_model(model, splits.num_classes, splits.input_shape)
    opt = build_optimizer(net, optimizer, 0.05, weight_decay=1e-4)
    sched = build_scheduler(opt, "cosine", epochs)
    return Trainer(net, opt, sched, train, val, epochs=epochs, seed=seed, callbacks=callbacks), test


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_training_learns(optimizer):
    trainer, test = _trainer(epochs=4, optimizer=optimizer)
    before = evaluate(trainer.model, test)["accuracy"]
    history = trainer.fit()
    after = evaluate(trainer.model, test)["accuracy"]
    assert after > max(before, 0.5)
    assert history["epoch"] == [0, 1, 2, 3]
    assert history["lr"][0] == pytest.approx(0.05) and history["lr"][-1] < history["lr"][0]
    assert history["train_loss"][-1] < history["train_loss"][0]


def test_best_val_weights_are_restored():
    trainer, _ = _trainer(epochs=3)
    trainer.fit()
    best = trainer.best_state
    assert all(torch.equal(v, best[k]) for k, v in trainer.model.state_dict().items())
    assert trainer.history["val_accuracy"][trainer.best_epoch] == max(trainer.history["val_accuracy"])


def test_a_fresh_optimizer_at_an_epoch_end_continues_the_schedule_without_a_warning():
    """What a structured pruning step on an epoch's last batch does: new parameters, so a
    new optimizer and a schedule that starts at the current epoch."""
    import warnings

    from mcp.training import Callback

    class Rebuild(Callback):
        def on_batch_end(self, trainer, batch, loss):
            if trainer.epoch == 1 and batch == len(trainer.train_loader) - 1:
                trainer.optimizer = build_optimizer(trainer.model, "sgd", 0.05, weight_decay=1e-4)
                trainer.scheduler = build_scheduler(trainer.optimizer, "cosine", 4, start_epoch=trainer.epoch)

    trainer, _ = _trainer(epochs=4, callbacks=[Rebuild()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        history = trainer.fit()
    assert history["lr"] == pytest.approx([0.05 * lr_factor("cosine", e, 4) for e in range(4)])


def test_early_stopping_stops():
    trainer, _ = _trainer(epochs=50, callbacks=[EarlyStopping(patience=2)])
    trainer.fit()
    assert trainer.epoch < 50
    assert trainer.epoch - 1 - trainer.best_epoch == 2


def test_resume_continues_exactly(tmp_path):
    straight, _ = _trainer(epochs=4)
    straight.fit()

    first, _ = _trainer(epochs=4)
    first.epochs = 2
    first.fit()
    path = save_checkpoint(tmp_path / "last.pt", first, {"config": {}})
    first.epochs = 4  # not used further

    resumed, _ = _trainer(epochs=4)
    restore_trainer(resumed, load_checkpoint(path), path)
    assert resumed.epoch == 2
    resumed.fit()
    assert resumed.history["val_loss"] == pytest.approx(straight.history["val_loss"], abs=1e-6)
    for key, value in straight.model.state_dict().items():
        assert torch.allclose(value.float(), resumed.model.state_dict()[key].float(), atol=1e-6), key


def test_checkpoint_that_does_not_match_the_model(tmp_path):
    trainer, _ = _trainer(epochs=1)
    trainer.fit()
    path = save_checkpoint(tmp_path / "cnn.pt", trainer, {})
    other, _ = _trainer(epochs=1, model="tiny_resnet")
    with pytest.raises(McpError) as info:
        restore_trainer(other, load_checkpoint(path), path)
    assert str(info.value).startswith(f"checkpoint '{path}' does not match the model")
    assert "\n" not in str(info.value)


def test_corrupt_checkpoints(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(McpError, match="is corrupt or not an mcp checkpoint"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(McpError, match="is not an mcp checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(McpError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
