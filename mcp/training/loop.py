"""The train/evaluate loop. Logging, progress, early stopping and checkpoints are callbacks.

Every epoch reseeds torch's RNG and the loader's shuffle from (seed, epoch), so a run
resumed from a checkpoint continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader

from mcp.errors import McpError


# (model, x, y) -> (loss, logits, named parts of the loss as floats, averaged into the epoch's logs)
BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, float]]]


class Callback:
    """Hooks called by :class:`Trainer`; override what you need."""

    def on_fit_start(self, trainer: "Trainer") -> None: ...
    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None: ...
    def on_after_backward(self, trainer: "Trainer") -> None: ...
    def on_batch_end(self, trainer: "Trainer", batch: int, loss: float) -> None: ...
    def on_epoch_end(self, trainer: "Trainer", epoch: int, logs: dict[str, float]) -> None: ...
    def on_fit_end(self, trainer: "Trainer") -> None: ...


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: str | torch.device = "cpu") -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy of ``model`` on ``loader`` (eval mode)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss_sum += nn.functional.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        count += y.numel()
    model.train(was_training)
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1)}


class TrainingDiverged(McpError):
    """The training loss became NaN or infinite."""


class Trainer:
    """Train ``model`` for ``epochs``, validating after each; keeps the best-val weights."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None, train_loader: DataLoader,
                 val_loader: DataLoader, *, epochs: int, device: str = "cpu",
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 seed: int = 0, callbacks: Iterable[Callback] = (), restore_best: bool = True,
                 batch_loss: BatchLoss | None = None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_loader, self.val_loader = train_loader, val_loader
        self.epochs, self.device, self.seed = epochs, device, seed
        self.loss_fn = loss_fn or nn.CrossEntropyLoss()
        self.batch_loss = batch_loss
        self.callbacks: list[Callback] = list(callbacks)
        self.restore_best = restore_best
        self.epoch = 0  # epochs completed
        self.global_step = 0  # optimizer steps taken
        self.history: dict[str, list[float]] = {}
        self.best_val_accuracy = -1.0
        self.best_epoch = -1
        self.best_state: dict[str, torch.Tensor] | None = None
        self.should_stop = False
        self.train_time_s = 0.0

    # ----------------------------------------------------------------- state for checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "history": self.history,
            "best_val_accuracy": self.best_val_accuracy,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "train_time_s": self.train_time_s,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state.get("global_step", 0))
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.best_val_accuracy = float(state["best_val_accuracy"])
        self.best_epoch = int(state["best_epoch"])
        self.best_state = state["best_state"]
        self.train_time_s = float(state.get("train_time_s", 0.0))

    # ----------------------------------------------------------------- the loop
    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _reseed(self, epoch: int) -> None:
        torch.manual_seed(self.seed * 100_003 + epoch)
        gen = getattr(self.train_loader, "generator", None)
        if gen is not None:
            gen.manual_seed(self.seed * 100_003 + epoch)

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        loss_sum, correct, count = 0.0, 0, 0
        part_sums: dict[str, float] = {}
        for i, (x, y) in enumerate(self.train_loader):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.batch_loss is not None:
                loss, out, parts = self.batch_loss(self.model, x, y)
            else:
                out = self.model(x)
                loss, parts = self.loss_fn(out, y), {}
            value = loss.item()
            if not math.isfinite(value):  # diverged: stop before the step writes NaN into the weights
                raise TrainingDiverged(
                    f"training diverged: the loss is {value} at epoch {epoch + 1}, batch {i + 1} (learning rate "
                    f"{self.optimizer.param_groups[0]['lr']:g}); the run ends FAILED and nothing is registered; "
                    f"lower the learning rate (--lr)")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._call("on_after_backward")
            self.optimizer.step()
            self.global_step += 1
            n = y.numel()
            loss_sum += value * n
            correct += (out.argmax(1) == y).sum().item()
            count += n
            for key, value in parts.items():
                part_sums[key] = part_sums.get(key, 0.0) + value * n
            self._call("on_batch_end", i, value)
        return {"train_loss": loss_sum / max(count, 1), "train_accuracy": correct / max(count, 1),
                **{key: total / max(count, 1) for key, total in part_sums.items()}}

    def fit(self) -> dict[str, list[float]]:
        self.model.to(self.device)
        self._call("on_fit_start")
        while self.epoch < self.epochs and not self.should_stop:
            epoch = self.epoch
            self._reseed(epoch)
            lr = self.optimizer.param_groups[0]["lr"]
            self._call("on_epoch_start", epoch)
            t0 = time.perf_counter()
            logs = self.train_one_epoch(epoch)
            self.train_time_s += time.perf_counter() - t0
            val = evaluate(self.model, self.val_loader, self.device)
            logs.update(val_loss=val["loss"], val_accuracy=val["accuracy"], lr=lr)
            if self.scheduler:
                with warnings.catch_warnings():  # a structured pruning step on the epoch's last batch gives
                    # a fresh optimizer that has not stepped yet; its schedule (built with start_epoch) is right
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                    self.scheduler.step()
            if val["accuracy"] >= self.best_val_accuracy:  # ties: the later, better-converged epoch
                self.best_val_accuracy, self.best_epoch = val["accuracy"], epoch
                self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            for key, value in {"epoch": float(epoch), **logs}.items():
                self.history.setdefault(key, []).append(value)
            self.epoch = epoch + 1
            self._call("on_epoch_end", epoch, logs)
        if self.restore_best and self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self._call("on_fit_end")
        return self.history


class EarlyStopping(Callback):
    """Stop when val accuracy has not improved for ``patience`` epochs."""

    def __init__(self, patience: int):
        self.patience = patience

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        if self.patience > 0 and epoch - trainer.best_epoch >= self.patience:
            trainer.should_stop = True


class ProgressBar(Callback):
    """An epoch bar with the latest metrics, and a transient batch bar (tqdm, on stderr).

    ``disable=None`` decides by where stderr goes: a terminal gets the bars; a file or a
    scheduler's log gets one line per epoch instead (bars there would print nothing until
    the end). ``disable=True`` prints nothing."""

    def __init__(self, desc: str = "train", disable: bool | None = None):
        self.desc, self.disable = desc, disable
        self.epochs = self.batches = None
        self.lines = False

    def on_fit_start(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        isatty = getattr(sys.stderr, "isatty", None)
        self.lines = self.disable is None and not (isatty is not None and isatty())
        self._started = time.perf_counter()
        if not self.lines:
            self.epochs = tqdm(total=trainer.epochs, initial=trainer.epoch, desc=self.desc, unit="epoch",
                               disable=self.disable, dynamic_ncols=True)

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if not self.lines:
            self.batches = self._tqdm(total=len(trainer.train_loader), desc=f"epoch {epoch + 1}", unit="batch",
                                      leave=False, disable=self.disable, dynamic_ncols=True)

    def on_batch_end(self, trainer: Trainer, batch: int, loss: float) -> None:
        if self.batches is not None:
            self.batches.update(1)
            if batch % 10 == 0:
                self.batches.set_postfix(loss=f"{loss:.3f}")

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        if self.lines:
            print(f"{self.desc}: epoch {epoch + 1}/{trainer.epochs} train_loss={logs['train_loss']:.4f} "
                  f"val_accuracy={logs['val_accuracy']:.4f} lr={logs['lr']:.3g} "
                  f"({time.perf_counter() - self._started:.1f} s)", file=sys.stderr, flush=True)
            return
        self.batches.close()
        self.epochs.update(1)
        self.epochs.set_postfix(loss=f"{logs['train_loss']:.3f}", val_acc=f"{logs['val_accuracy']:.4f}",
                                lr=f"{logs['lr']:.3g}")

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.epochs is not None:
            self.epochs.close()

