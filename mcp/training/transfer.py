"""Transfer to the user's classes: fine-tune a model whose classifier was just replaced,
with the rest frozen for the first epochs (the usual way to start from an ImageNet
checkpoint on a small labelled folder)."""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from mcp.training.loop import Callback, ProgressBar, Trainer
from mcp.training.setup import FineTune


class FreezeBackbone(Callback):
    """Only the parameters under ``head`` train for the first ``epochs`` epochs; then all do.
    (BatchNorm statistics keep adapting to the new data throughout.)"""

    def __init__(self, model: nn.Module, head: str, epochs: int):
        self.model, self.head, self.epochs = model, head, epochs

    def _set(self, frozen: bool) -> None:
        for name, p in self.model.named_parameters():
            if not name.startswith(self.head + "."):
                p.requires_grad_(not frozen)

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.epochs > 0:
            self._set(True)

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if epoch == self.epochs:
            self._set(False)

    def on_fit_end(self, trainer: Trainer) -> None:
        self._set(False)


def finetune_transfer(model: nn.Module, loaders: Sequence[Any], head: str, finetune: FineTune, freeze_epochs: int,
                      *, device: str = "cpu", callbacks: Sequence[Callback] = (), progress: bool | None = None,
                      desc: str = "transfer") -> dict[str, list[float]]:
    """Fine-tune ``model`` in place for ``finetune.epochs``, the backbone frozen for the
    first ``freeze_epochs``; returns the training curves."""
    model.to(device)
    optimizer = finetune.make_optimizer(model)  # built before freezing, so it holds every parameter
    trainer = Trainer(model, optimizer, finetune.make_scheduler(optimizer), loaders[0], loaders[1],
                      epochs=finetune.epochs, device=device, seed=finetune.seed,
                      callbacks=[FreezeBackbone(model, head, freeze_epochs),
                                 ProgressBar(desc, disable=None if progress is None else not progress), *callbacks])
    trainer.fit()
    return trainer.history
