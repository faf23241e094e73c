"""Composes a criterion, a pruner and a schedule; hooks pruning into the training loop."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from mcp.config import check_drop_blocks
from mcp.errors import ConfigError
from mcp.pruning.depth import block_order, remove_blocks, removed_blocks, within
from mcp.pruning.importance import Batches, create_criterion
from mcp.pruning.pruner import StructuredPruner, UnstructuredPruner, select_layers
from mcp.pruning.schedules import SCHEDULES
from mcp.training.loop import Callback, Trainer

SCOPES = ("global", "layerwise")
GRANULARITIES = ("unstructured", "structured")


@dataclass(frozen=True)
class PruneSpec:
    """What to prune and how; the stage config maps onto it one to one."""

    criterion: str = "magnitude"
    scope: str = "global"
    granularity: str = "unstructured"
    schedule: str = "one_shot"
    sparsity: float = 0.5
    initial_sparsity: float = 0.0
    steps: int = 1
    ratios: Mapping[str, float] = field(default_factory=dict)
    keep_first: bool = False
    keep_last: bool = False
    ignored_layers: Sequence[str] = ()
    norm: int = 1
    hessian: str = "fisher"
    round_to: int = 1  # structured: keep channel counts at multiples of this (Torch-Pruning's round_to)
    drop_blocks: int = 0  # depth: remove this many whole blocks first, least important first (pruning/depth.py)
    # the blocks to remove, when already chosen (a search ranks them once on its starting model)
    blocks: Sequence[str] = ()
    # structured, layer-wise: whole attention heads removed, this share of each attention module's heads
    # (their width kept); head_ratios: per module by name (a search's). 0: heads keep their count, lose width
    head_ratio: float = 0.0
    head_ratios: Mapping[str, float] = field(default_factory=dict)

    @property
    def events(self) -> int:
        return 1 if self.schedule == "one_shot" else self.steps


class Pruning:
    """The pruning events of one schedule on one model. ``step()`` performs the next one."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int], spec: PruneSpec, batches: Batches,
                 device: str = "cpu"):
        if spec.scope not in SCOPES:
            raise ConfigError(f"scope={spec.scope!r} is not allowed; choose one of: {', '.join(SCOPES)}")
        if spec.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={spec.schedule!r} is not allowed; choose one of: {', '.join(SCHEDULES)}")
        self.model, self.input_shape, self.spec = model, tuple(input_shape), spec
        self.batches, self.device = batches, device
        check_drop_blocks(spec.drop_blocks)
        if spec.blocks or spec.drop_blocks:
            remove_blocks(model, list(spec.blocks) or block_order(model, self.input_shape, batches,
                                                                  spec.drop_blocks))
        self.dropped = removed_blocks(model)  # these and any removed before
        self.criterion = create_criterion(spec.criterion, spec.granularity, norm=spec.norm, hessian=spec.hessian)
        self.layers, self.all_names = select_layers(model, input_shape, spec.keep_first, spec.keep_last,
                                                    list(spec.ignored_layers))
        if not isinstance(spec.round_to, int) or spec.round_to < 1:
            raise ConfigError(f"round_to={spec.round_to!r} must be a whole number of channels, 1 or more")
        if spec.round_to > 1 and spec.granularity != "structured":
            raise ConfigError(f"round_to={spec.round_to} rounds channel counts: it needs granularity structured")
        if spec.ratios and spec.scope != "layerwise":
            raise ConfigError("per-layer ratios need scope 'layerwise'")
        ratios = {n: r for n, r in spec.ratios.items() if not within(n, self.dropped)}  # gone with their block
        unknown = sorted(set(ratios) - set(self.layers))
        if unknown:
            raise ConfigError(f"ratios name layer(s) not in scope: {', '.join(unknown)}; "
                              f"prunable layers: {', '.join(self.layers)}")
        for name, ratio in ratios.items():
            if not 0.0 <= float(ratio) < 1.0:
                raise ConfigError(f"ratio {ratio!r} for layer {name!r} is outside [0, 1)")
        schedule = SCHEDULES[spec.schedule]
        if spec.schedule == "gradual":
            schedule = functools.partial(schedule, initial=spec.initial_sparsity)
        self.schedule = schedule
        self.final = {n: float(ratios.get(n, spec.sparsity)) for n in self.layers}
        if spec.granularity == "structured":
            self.cut: UnstructuredPruner | StructuredPruner = StructuredPruner(
                model, self.input_shape, self.layers, self.all_names, spec.scope, schedule, spec.events,
                spec.sparsity, ratios if spec.scope == "layerwise" else None, spec.round_to, spec.head_ratio,
                {n: r for n, r in spec.head_ratios.items() if not within(n, self.dropped)})
        else:
            if spec.head_ratio or any(spec.head_ratios.values()):
                raise ConfigError(f"head_ratio removes whole attention heads: it needs granularity structured "
                                  f"(got {spec.granularity!r})")
            self.cut = UnstructuredPruner(self.layers, spec.scope)
        self.done = 0

    @property
    def structured(self) -> bool:
        return self.spec.granularity == "structured"

    def target(self, k: int) -> float:
        """The overall target of event ``k`` (for reports; layers may have their own)."""
        return self.schedule(self.spec.sparsity, self.spec.events)[k]

    def step(self) -> float:
        """Perform the next event; returns its target sparsity."""
        k = self.done
        if k >= self.spec.events:
            raise RuntimeError("all pruning events are done")
        modules = dict(self.model.named_modules())
        # Structured criteria score every conv/linear: consumers outside the scope still rank inputs.
        scored = {n: modules[n] for n in self.all_names} if self.structured else self.layers
        state = self.criterion.before_prune(self.model, scored, self.batches, self.device) if self.structured else {}
        scores = self.criterion.scores(self.model, scored, self.batches, self.device)
        if self.structured:
            state["pruned_out"] = self.cut.step(scores)
            self.criterion.after_prune(self.model, state, self.batches, self.device)
            self.model.mcp_recipe = {**getattr(self.model, "mcp_recipe", {}), **self.cut.recipe(),
                                     "pruning_history": self._base_history + self.cut.history}
        else:
            if self.spec.scope == "global":
                target: float | dict[str, float] = self.target(k)
            else:
                target = {n: self.schedule(r, self.spec.events)[k] for n, r in self.final.items()}
            self.cut.step(scores, target)
        self.done += 1
        return self.target(k)

    @functools.cached_property
    def _base_history(self) -> list:
        """Pruning history the model already carried (a structured model pruned again)."""
        return list(getattr(self.model, "mcp_recipe", {}).get("pruning_history", []))

    def layer_sparsity(self) -> dict[str, float]:
        return self.cut.layer_sparsity()


def prune(model: nn.Module, spec: PruneSpec, input_shape: Sequence[int], batches: Batches = (),
          device: str = "cpu") -> Pruning:
    """Run every event of ``spec`` back to back, without training in between (the verb
    for one-shot use from Python; the `prune` stage interleaves events with training)."""
    pruning = Pruning(model, input_shape, spec, list(batches), device)
    while pruning.done < spec.events:
        pruning.step()
    return pruning


class PruningCallback(Callback):
    """Performs the events at their optimizer steps and keeps unstructured masks exact.

    ``at_steps[k]`` is the optimizer step after which event ``k`` happens (0: before
    training). After a structured event the parameters are new tensors, so
    ``rebuild(trainer)`` gives the trainer a fresh optimizer and LR schedule."""

    def __init__(self, pruning: Pruning, at_steps: Sequence[int],
                 rebuild: Callable[[Trainer], None] | None = None,
                 on_event: Callable[[int, float], None] | None = None):
        self.pruning, self.at_steps = pruning, list(at_steps)
        self.rebuild, self.on_event = rebuild, on_event

    def _due(self, trainer: Trainer) -> None:
        while self.pruning.done < len(self.at_steps) and self.at_steps[self.pruning.done] <= trainer.global_step:
            k = self.pruning.done
            target = self.pruning.step()
            if self.pruning.structured and self.rebuild:
                self.rebuild(trainer)
            if self.on_event:
                self.on_event(k, target)

    def on_fit_start(self, trainer: Trainer) -> None:
        self._due(trainer)

    def on_after_backward(self, trainer: Trainer) -> None:
        if not self.pruning.structured:
            self.pruning.cut.mask_grads()

    def on_batch_end(self, trainer: Trainer, batch: int, loss: float) -> None:
        if not self.pruning.structured:
            self.pruning.cut.enforce()
        self._due(trainer)


class BNL1Penalty(Callback):
    """Network slimming's sparsity penalty ``lambda * sum |gamma|`` on BatchNorm scales."""

    def __init__(self, strength: float):
        self.strength = strength

    @torch.no_grad()
    def on_after_backward(self, trainer: Trainer) -> None:
        for m in trainer.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.weight.grad is not None:
                m.weight.grad.add_(self.strength * torch.sign(m.weight))


class KeepSparsity(Callback):
    """Keeps the zeros of an already pruned model zero while it trains further (for
    example as a distillation student): its zero weights become fixed masks."""

    def __init__(self, model: nn.Module):
        layers = {name: m for name, m in model.named_modules()
                  if isinstance(m, (nn.Conv2d, nn.Linear)) and bool((m.weight == 0).any())}
        self.cut = UnstructuredPruner(layers, "layerwise")
        self.cut.masks = {m: m.weight.detach() != 0 for m in layers.values()}

    @property
    def active(self) -> bool:
        return bool(self.cut.layers)

    def on_fit_start(self, trainer: Trainer) -> None:
        self.cut.masks = {m: mask.to(m.weight.device) for m, mask in self.cut.masks.items()}

    def on_after_backward(self, trainer: Trainer) -> None:
        self.cut.mask_grads()

    def on_batch_end(self, trainer: Trainer, batch: int, loss: float) -> None:
        self.cut.enforce()
