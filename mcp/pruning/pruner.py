"""Cutting: masks for unstructured pruning, Torch-Pruning for structured pruning.

Both take the scores of a criterion and a target (one sparsity for global scope, or a
ratio per layer for layer-wise scope) and reach it exactly: unstructured to the weight,
structured to the channel (Torch-Pruning's rounding, at most one channel per layer).
"""

from __future__ import annotations

import math
from typing import Collection, Mapping

import torch
from torch import nn

from mcp.errors import ConfigError, McpError
from mcp.pruning.custom import graph_build_options, graph_options
from mcp.pruning.importance import Scores

PRUNABLE = (nn.Conv2d, nn.Linear)


def layers_in_order(model: nn.Module, input_shape) -> list[tuple[str, nn.Module]]:
    """Conv and linear layers in execution order (one forward pass on zeros)."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, PRUNABLE)}
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod)) for m in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    seen: list[nn.Module] = []
    for m in order:
        if m not in seen:
            seen.append(m)
    return [(names[m], m) for m in seen]


def select_layers(model: nn.Module, input_shape, keep_first: bool, keep_last: bool,
                  ignored: list[str]) -> tuple[dict[str, nn.Module], list[str]]:
    """(layers in scope, names of all conv/linear layers in execution order)."""
    ordered = layers_in_order(model, input_shape)
    all_names = [n for n, _ in ordered]
    unknown = [n for n in ignored if n not in all_names]
    if unknown:
        raise ConfigError(f"ignored_layers has unknown layer(s) {', '.join(unknown)}; "
                          f"this model's layers are: {', '.join(all_names)}")
    skip = set(ignored)
    if keep_first:
        skip.add(all_names[0])
    if keep_last:
        skip.add(all_names[-1])
    layers = {n: m for n, m in ordered if n not in skip}
    if not layers:
        raise ConfigError("no layer is left to prune after keep_first/keep_last/ignored_layers")
    return layers, all_names


def _kth_mask(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep-mask that zeroes exactly the ``n_prune`` lowest scores (ties: lowest index first)."""
    flat = scores.flatten()
    mask = torch.ones_like(flat, dtype=torch.bool)
    if n_prune > 0:
        idx = torch.argsort(flat, stable=True)[:n_prune]
        mask[idx] = False
    return mask.view_as(scores)


class UnstructuredPruner:
    """Weight masks on the layers in scope, kept exact through training.

    Masks are monotone: a weight once pruned gets score -inf and stays pruned, so the
    sparsity of a schedule only grows. Use :meth:`enforce` after every optimizer step
    and :meth:`mask_grads` after every backward pass (see ``MaskCallback``)."""

    def __init__(self, layers: Mapping[str, nn.Module], scope: str):
        self.layers, self.scope = dict(layers), scope
        self.masks: dict[nn.Module, torch.Tensor] = {
            m: torch.ones_like(m.weight, dtype=torch.bool) for m in self.layers.values()}

    def step(self, scores: Scores, target: float | Mapping[str, float]) -> None:
        ranked = {}
        for m in self.layers.values():
            if m not in scores.weight:
                raise ValueError(f"criterion gave no weight scores for {type(m).__name__}")
            s = scores.weight[m].detach().float().clone()
            s[~self.masks[m]] = float("-inf")
            ranked[m] = s
        if self.scope == "global":
            assert isinstance(target, float)
            flat = torch.cat([s.flatten().cpu() for s in ranked.values()])
            keep = _kth_mask(flat, round(target * flat.numel()))
            offset = 0
            for m, s in ranked.items():
                self.masks[m] = keep[offset: offset + s.numel()].view_as(s).to(s.device)
                offset += s.numel()
        else:
            for name, m in self.layers.items():
                ratio = target[name] if isinstance(target, Mapping) else target
                self.masks[m] = _kth_mask(ranked[m], round(ratio * ranked[m].numel()))
        self.enforce()

    @torch.no_grad()
    def enforce(self) -> None:
        for m, mask in self.masks.items():
            m.weight.mul_(mask)

    @torch.no_grad()
    def mask_grads(self) -> None:
        for m, mask in self.masks.items():
            if m.weight.grad is not None:
                m.weight.grad.mul_(mask)

    def layer_sparsity(self) -> dict[str, float]:
        return {n: 1.0 - self.masks[m].float().mean().item() for n, m in self.layers.items()}

    def sparsity(self) -> float:
        total = sum(mask.numel() for mask in self.masks.values())
        return 1.0 - sum(int(mask.sum()) for mask in self.masks.values()) / total


class ScoreImportance:
    """A Torch-Pruning importance built from a criterion's :class:`Scores`: a channel's
    score is the sum over its dependency group (the producing layer's filter, the BN
    channel, the consumers' input weights, residual partners). Global scope normalises
    each group by its mean, as Torch-Pruning's own importances do."""

    def __init__(self, normalize: bool):
        self.normalize = normalize
        self.scores = Scores()

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        from torch_pruning.pruner import function as F

        total: torch.Tensor | None = None
        for i, (dep, idxs) in enumerate(group):
            layer, fn = dep.layer, dep.pruning_fn
            root = group[i].root_idxs
            if any(r is None for r in root):
                continue
            local = None
            if fn in (F.prune_conv_out_channels, F.prune_linear_out_channels):
                if layer in self.scores.weight:
                    local = self.scores.weight[layer].flatten(1).sum(1)[idxs]
                elif layer in self.scores.out_channel:
                    local = self.scores.out_channel[layer][idxs]
            elif fn in (F.prune_conv_in_channels, F.prune_linear_in_channels):
                if layer in self.scores.weight:
                    per_in = self.scores.weight[layer].transpose(0, 1).flatten(1).sum(1)
                    if fn == F.prune_conv_in_channels and layer.groups not in (1, layer.in_channels):
                        per_in = per_in.repeat(layer.groups)
                    if per_in.numel() == 1 and layer.groups > 1:
                        continue  # depthwise: its out-channel entry in the group carries the score
                    local = per_in[idxs]
                elif layer in self.scores.in_channel:
                    local = self.scores.in_channel[layer][idxs]
            elif fn == F.prune_batchnorm_out_channels and layer in self.scores.out_channel:
                local = self.scores.out_channel[layer][idxs]
            if local is None:
                continue
            if total is None:
                total = torch.zeros(len(group[0].idxs), dtype=torch.float32, device=local.device)
            total.scatter_add_(0, torch.tensor(root, device=local.device), local.float())
        if total is None:
            return None
        # deterministic tie-break (untrained BN scales are all 1): lower index, lower score
        total = total + 1e-6 * total.abs().mean().clamp_min(1e-12) * torch.linspace(0, 1, len(total),
                                                                                   device=total.device)
        if self.normalize:
            total = total / total.mean().clamp_min(1e-12)
        return total


class StructuredPruner:
    """Physically remove channels with Torch-Pruning's dependency graph (residual
    additions, BatchNorm, depthwise convs and flattening handled by Torch-Pruning).

    ``schedule(target, steps)`` gives each event's channel sparsity; it is applied to
    ``sparsity`` (global scope, or every layer alike) or to each layer's own ratio in
    ``ratios``. :meth:`step` performs the next event."""

    def __init__(self, model: nn.Module, input_shape, layers: Mapping[str, nn.Module], all_names: list[str],
                 scope: str, schedule, steps: int, sparsity: float, ratios: Mapping[str, float] | None = None,
                 round_to: int = 1, head_ratio: float = 0.0, head_ratios: Mapping[str, float] | None = None):
        import torch_pruning as tp

        modules = dict(model.named_modules())
        device = next(model.parameters()).device
        example = torch.zeros(1, *input_shape, device=device)
        self.attention = attention_modules(model)
        heads = {m.qkv: m.num_heads for m in self.attention.values()}
        # whole heads: attention module -> the heads it loses in all (the rest keep their count, lose width)
        self.heads_out = whole_heads(self.attention, head_ratios or {}, scope, head_ratio)
        self.initial_heads = {name: m.num_heads for name, m in self.attention.items()}
        self.schedule, self.steps = schedule, steps
        foreign = foreign_parameters(model, example)
        blocked = sorted(per_head(model, foreign, {n: self.attention[n] for n in self.heads_out}))
        if blocked:
            name = blocked[0]
            raise ConfigError(f"whole attention heads cannot be removed from {name.rpartition('.')[0]}: its "
                              f"{name.rpartition('.')[2]} holds one entry per head, which the dependency graph does "
                              f"not prune with the heads; set head_ratio 0 (heads keep their count, lose width)")
        left: set[str] = set()
        if foreign and not _prunes_cleanly(model, example, [modules[all_names[-1]]], heads, foreign, self.attention):
            left = _coupled_to(model, example, layers, foreign)  # their dimension could not be verified
        unwrapped = [(p, dim) for _, p, dim in foreign] or None
        self.unwrapped = {name: dim for name, _, dim in foreign} if not left else {}
        in_scope = {m for n, m in layers.items() if n not in left}
        ratio_of = {layers[n]: r for n, r in (ratios or {}).items() if n not in left}
        for name in self.heads_out:  # Torch-Pruning removes heads only from a group it prunes at all
            qkv = self.attention[name].qkv
            ratio_of[qkv] = max(ratio_of.get(qkv, sparsity), self.heads_out[name] / self.initial_heads[name])
        if not in_scope:
            raise ConfigError(f"no layer can be pruned structurally: {', '.join(sorted(left))} feed parameters "
                              f"outside standard layers; use granularity unstructured")
        # The output layer keeps its outputs (the classes); layers out of scope keep theirs.
        ignored = [modules[n] for n in all_names if modules[n] not in in_scope] + [modules[all_names[-1]]]
        ignored += per_head_params(model, self.attention)  # heads keep their count: these stay whole
        self.importance = ScoreImportance(normalize=scope == "global")
        self.pruner = tp.pruner.BasePruner(
            model, example, importance=self.importance,
            global_pruning=scope == "global", pruning_ratio=sparsity,
            pruning_ratio_dict=ratio_of or None,
            iterative_steps=steps, ignored_layers=ignored, unwrapped_parameters=unwrapped,
            num_heads=heads, prune_num_heads=bool(self.heads_out),
            prune_head_dims=not self.heads_out,  # whole heads removed, or heads keep their count and lose width
            head_pruning_ratio_dict={self.attention[n].qkv: 0.0 for n in self.heads_out} or None,
            round_to=round_to if round_to > 1 else None, **graph_options(model),
            # Torch-Pruning asks for steps + 1 ratios, the first being the unpruned state
            iterative_pruning_ratio_scheduler=lambda target, n: [0.0] + list(schedule(target, n)),
        )
        self.layers, self.example = dict(layers), example
        self.initial_out = {n: _out_channels(m) for n, m in layers.items()}
        self.history: list = []
        # the layers whose output channels it may remove (the output layer keeps the classes)
        self.counted = [n for n, m in layers.items() if m in in_scope and m is not modules[all_names[-1]]]
        self.asked = {n: float((ratios or {}).get(n, sparsity)) for n in self.counted}
        self.sparsity, self.global_scope, self.round_to = float(sparsity), scope == "global", round_to
        self.norm_groups = _groupnorm_groups(self.pruner, {n: layers[n] for n in self.counted})
        self.roots = ({g[0].dep.target.module: len(g[0].idxs) for g in self.pruner.DG.get_all_groups(
            ignored_layers=self.pruner.ignored_layers, root_module_types=self.pruner.root_module_types)}
            if self.norm_groups and self.global_scope else {})

    def step(self, scores: Scores) -> dict[str, list[int]]:
        """Prune the next event; returns the output channels each layer lost (by name)."""
        from torch_pruning.pruner import function as F

        self.importance.scores = scores
        self._aim_heads()
        names = {m: n for n, m in self.pruner.model.named_modules()}
        removed: dict[str, list[int]] = {}
        try:
            for group in self.pruner.step(interactive=True):
                for dep, idxs in group:
                    if dep.pruning_fn in (F.prune_conv_out_channels, F.prune_linear_out_channels):
                        removed[names[dep.layer]] = sorted(int(i) for i in idxs)
                group.prune()
        except (IndexError, RuntimeError) as exc:  # channel indices past a layer's width: a wrong mapping
            raise self._unfollowed(exc) from None
        self.history = [list(h) if isinstance(h, tuple) else h for h in self.pruner.pruning_history()]
        set_heads(self.attention, {name: self.pruner.num_heads[m.qkv] for name, m in self.attention.items()})
        self._check_forward()
        if self.norm_groups and self.pruner.current_step == self.pruner.iterative_steps:
            self._say_group_rounding()
        return removed

    def _aim_heads(self) -> None:
        """Before an event: the share of its current heads each module loses now, so that it
        has lost ``heads_out``'s share of its first heads once the schedule ends (Torch-
        Pruning takes a module's ratio of the heads it has now, rounded up)."""
        k = self.pruner.current_step
        for name, total in self.heads_out.items():
            m = self.attention[name]
            first = self.initial_heads[name]
            due = math.ceil(self.schedule(total / first, self.steps)[k] * first - 1e-9)  # removed by this event
            now = due - (first - self.pruner.num_heads[m.qkv])
            share = (now - 0.5) / self.pruner.num_heads[m.qkv] if now > 0 else 0.0  # rounds up to exactly `now`
            self.pruner.head_pruning_ratio_dict[m.qkv] = [share] * (self.pruner.iterative_steps + 1)

    def _check_forward(self) -> None:
        """A pruned model that no longer runs (an architecture whose channels Torch-Pruning's
        graph does not follow everywhere) is one line, not a traceback later in training."""
        model = self.pruner.model
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(self.example)
        except Exception as exc:  # noqa: BLE001 - whatever the broken graph raises
            raise self._unfollowed(exc) from None
        finally:
            model.train(was)

    def _unfollowed(self, exc: Exception) -> McpError:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return McpError(f"structured pruning breaks this {type(self.pruner.model).__name__}'s forward pass "
                        f"({first}): its channels meet in a way the dependency graph does not follow; use "
                        f"granularity unstructured, or leave the layers involved out with ignored_layers")

    def layer_sparsity(self) -> dict[str, float]:
        return {n: 1.0 - _out_channels(m) / self.initial_out[n] for n, m in self.layers.items()}

    def recipe(self) -> dict:
        """What the model's recipe needs to replay this pruning: the parameters outside
        standard layers that were pruned with the channels (and along which dimension),
        and each attention module's heads."""
        return {**({"pruning_unwrapped": self.unwrapped} if self.unwrapped else {}),
                **({"attention_heads": {n: m.num_heads for n, m in self.attention.items()}} if self.attention else {})}

    def heads_fraction(self) -> float:
        """The share of all attention heads removed whole."""
        first = sum(self.initial_heads.values())
        return 1.0 - sum(m.num_heads for m in self.attention.values()) / first if first else 0.0

    def channel_sparsity(self) -> float:
        """The share of output channels removed from the layers it may prune (those in
        scope, the output layer aside)."""
        total = sum(self.initial_out[n] for n in self.counted)
        kept = sum(_out_channels(self.layers[n]) for n in self.counted)
        return 1.0 - kept / total if total else 0.0

    def _plain(self, channels: int, ratio: float) -> int:
        """Channels Torch-Pruning removes of ``channels`` at ``ratio`` one channel at a time."""
        removed = channels - int(channels * (1 - ratio))
        if self.round_to > 1:
            kept = channels - removed
            removed = channels - (kept - kept % self.round_to)
        return removed

    def _say_group_rounding(self) -> None:
        """A layer feeding a GroupNorm of G groups keeps a multiple of G channels: Torch-
        Pruning removes them G at a time (one per group), which can land beyond the ratio
        asked. Said after the last step: per layer with layer-wise ratios; for global
        scope, in one line when the channels removed overall (coupled layers counted once)
        are not those asked. Each layer once per process (a search prunes the same layers
        in every trial)."""
        import warnings

        def got(name: str) -> str:
            c0, c = self.initial_out[name], _out_channels(self.layers[name])
            return f"layer {name}, {self.norm_groups[name]} groups: {c0 - c} of {c0} removed"

        if not self.global_scope:
            for name, groups in self.norm_groups.items():
                c0, c = self.initial_out[name], _out_channels(self.layers[name])
                asked = self._plain(c0, self.asked[name])
                if c0 - c != asked and (name, groups) not in _SAID_ROUNDING:
                    _SAID_ROUNDING.add((name, groups))
                    warnings.warn(f"structured pruning removed {c0 - c} of layer {name}'s {c0} output channels "
                                  f"({(c0 - c) / c0:.1%}), asked {self.asked[name]:.1%} ({asked}): it feeds a "
                                  f"GroupNorm of {groups} groups, which keeps a multiple of {groups} channels",
                                  PruningWarning, stacklevel=4)
            return
        total = sum(self.roots.values())
        removed = total - sum(self.pruner.DG.get_out_channels(m) for m in self.roots)
        asked = self._plain(total, self.sparsity)
        key = tuple(sorted(self.norm_groups.items()))
        if removed != asked and key not in _SAID_ROUNDING:
            _SAID_ROUNDING.add(key)
            warnings.warn(f"structured pruning removed {removed} of {total} output channels ({removed / total:.1%}), "
                          f"asked {self.sparsity:.1%} ({asked}): a layer feeding a GroupNorm keeps a multiple of its "
                          f"groups, and the global ranking counts its channels per group "
                          f"({'; '.join(got(n) for n in self.norm_groups)})", PruningWarning, stacklevel=4)


class PruningWarning(UserWarning):
    """A layer of a foreign model that structured pruning leaves alone, and why."""


STANDARD = (nn.Conv2d, nn.Conv1d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
            nn.modules.instancenorm._InstanceNorm, nn.PReLU, nn.Embedding)


def foreign_parameters(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Parameter, int]]:
    """Parameters outside standard layers that channels reach (a ViT's ``pos_embed`` and
    ``cls_token``, a layer scale's ``gamma``), each with the dimension Torch-Pruning takes
    to follow the channels (the last one longer than 1): (name, parameter, dimension)."""
    if all(isinstance(m, STANDARD) for m in model.modules() if any(True for _ in m.parameters(recurse=False))):
        return []  # the usual case: no graph to build twice
    import warnings

    import torch_pruning as tp

    with warnings.catch_warnings():  # it says which dimension it takes; mcp checks that dimension instead
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False,
                                                      **graph_build_options(model))
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(u.parameters)], u.parameters, int(u.pruning_dim)) for u in graph.unwrapped_parameters
            if id(u.parameters) in names]


def attention_modules(model: nn.Module, names: Collection[str] | None = None) -> dict[str, nn.Module]:
    """Multi-head attention as timm writes it (ViT, DeiT, Swin, ...): a module with a ``qkv``
    Linear and ``num_heads`` heads, whose head width follows from ``qkv``'s outputs. With
    ``names``: those modules, whatever their widths now (a recipe replayed, heads not yet set)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)
            and (m.qkv.out_features % (3 * m.num_heads) == 0 if names is None else n in names)}


def whole_heads(attention: Mapping[str, nn.Module], ratios: Mapping[str, float], scope: str,
                default: float = 0.0) -> dict[str, int]:
    """How many whole heads each attention module loses at ``ratios`` (module name -> share
    of its heads; ``default`` for the modules it does not name), rounded up as Torch-Pruning
    rounds. Every bad request is one line: no attention module, a module that is not one,
    a share outside [0, 1) or one that leaves a module no head, global scope (heads are
    ranked within each module)."""
    asked = {n: float(r) for n, r in {**{n: default for n in attention}, **ratios}.items() if float(r) != 0.0}
    if default and not attention:
        asked = {"": float(default)}
    if not asked:
        return {}
    if not attention:
        raise ConfigError(f"head_ratio={next(iter(asked.values()))!r} removes attention heads, but this model has "
                          f"no attention module (one with a qkv Linear and num_heads, as timm's ViT, DeiT, Swin)")
    if scope != "layerwise":
        raise ConfigError(f"head_ratio removes heads within each attention module: it needs scope 'layerwise' "
                          f"(got {scope!r})")
    out = {}
    for name, ratio in asked.items():
        if name not in attention:
            raise ConfigError(f"head ratio for {name!r}: not an attention module; this model's are: "
                              f"{', '.join(attention)}")
        heads = attention[name].num_heads
        if not 0.0 < ratio < 1.0 or math.ceil(ratio * heads - 1e-9) >= heads:
            raise ConfigError(f"head_ratio={ratio!r} leaves {name} ({heads} heads) no head: it removes "
                              f"ceil({ratio:g} x {heads}) heads; allowed: above 0 and at most "
                              f"{(heads - 1) / heads:.4g} for {heads} heads")
        out[name] = math.ceil(ratio * heads - 1e-9)
    return out


def set_heads(attention: Mapping[str, nn.Module], heads: Mapping[str, int]) -> None:
    """After ``qkv`` lost channels: each module's head count, head width and attention width."""
    for name, m in attention.items():
        m.num_heads = int(heads[name])
        width = m.qkv.out_features // (3 * m.num_heads)
        if hasattr(m, "head_dim"):
            m.head_dim = width
        if hasattr(m, "attn_dim"):
            m.attn_dim = m.num_heads * width


def _prunes_cleanly(model: nn.Module, example: torch.Tensor, keep: list, heads: Mapping[nn.Module, int],
                    foreign: list, attention: Mapping[str, nn.Module]) -> bool:
    """Whether pruning a copy of ``model`` by half, its foreign parameters along the
    dimensions Torch-Pruning takes, prunes them all and gives a model that still runs:
    outputs of the same shape, finite. (The recipe replays the same dimensions; tests
    reload every family.)"""
    import copy

    import torch_pruning as tp

    trial = copy.deepcopy(model).eval()
    params = dict(trial.named_parameters())
    modules = {id(m): n for n, m in model.named_modules()}
    copies = dict(trial.named_modules())
    try:
        with torch.no_grad():
            expected = model.eval()(example).shape
        pruner = tp.pruner.BasePruner(
            trial, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
            ignored_layers=[copies[modules[id(m)]] for m in keep] + per_head_params(trial, attention_modules(trial)),
            num_heads={copies[modules[id(m)]]: h for m, h in heads.items()}, prune_num_heads=False,
            prune_head_dims=True, unwrapped_parameters=[(params[n], dim) for n, _, dim in foreign],
            **graph_options(trial))
        for group in pruner.step(interactive=True):
            group.prune()
        copied = {n: copies[n] for n in attention}
        set_heads(copied, {n: pruner.num_heads[m.qkv] for n, m in copied.items()})
        with torch.no_grad():
            out = trial(example)
        pruned = dict(trial.named_parameters())  # pruning replaces the parameters it cuts
        heads_wide = per_head(model, foreign, attention)  # these stay whole while heads keep their count
        shrunk = all(pruned[n].shape[dim] < p.shape[dim] for n, p, dim in foreign
                     if n not in heads_wide)  # none silently left whole
        return isinstance(out, torch.Tensor) and out.shape == expected and bool(torch.isfinite(out).all()) and shrunk
    except Exception:  # noqa: BLE001 - any failure of the trial means: do not trust these dimensions
        return False


def per_head_params(model: nn.Module, attention: Mapping[str, nn.Module]) -> list[nn.Parameter]:
    """The parameters of ``attention``'s modules with one entry per head along some dimension
    (:func:`per_head`): Torch-Pruning's graph ties them to the channels through the attention
    scores, so it is told to leave them whole (while heads keep their count)."""
    named = dict(model.named_parameters())
    candidates = [(f"{name}.{p}", param, dim) for name, m in attention.items()
                  for p, param in m.named_parameters(recurse=False) for dim in range(param.dim())]
    return [named[n] for n in sorted(per_head(model, candidates, attention))]


def per_head(model: nn.Module, foreign: list, attention: Mapping[str, nn.Module]) -> set[str]:
    """The parameters among ``foreign`` that hold one entry per head of the attention module
    they belong to (a Swin window's relative position bias table, ``[positions, heads]``)."""
    owners = {f"{name}.{p}": m for name, m in attention.items() for p, _ in m.named_parameters(recurse=False)}
    return {n for n, p, dim in foreign if n in owners and p.shape[dim] == owners[n].num_heads}


def _coupled_to(model: nn.Module, example: torch.Tensor, layers: Mapping[str, nn.Module], foreign: list) -> set[str]:
    """Layers whose output channels reach a foreign parameter whose dimension could not be
    verified: left unpruned, each said once in one line."""
    import warnings

    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False,
                                                  unwrapped_parameters=[(p, dim) for _, p, dim in foreign],
                                                  **graph_build_options(model))
    ids = {id(p): name for name, p, _ in foreign}
    owners = {id(p): type(m).__name__ for m in model.modules() for p in m.parameters(recurse=False)}
    left: set[str] = set()
    for name, layer in layers.items():
        if layer not in graph.module2node:  # inside a module pruned as one (mcp.pruning.custom)
            continue
        fn = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels
        hits = [dep.target.module for dep, _ in graph.get_pruning_group(layer, fn, idxs=[0])
                if id(dep.target.module) in ids]
        if hits:
            left.add(name)
            warnings.warn(f"structured pruning leaves layer {name} unpruned: its output channels reach "
                          f"{ids[id(hits[0])]} (in a {owners.get(id(hits[0]), 'custom')} module), a parameter outside "
                          f"standard layers whose channel dimension could not be verified (pruning it along "
                          f"dimension {next(d for _, p, d in foreign if p is hits[0])} breaks the forward pass)",
                          PruningWarning, stacklevel=3)
    return left


_SAID_ROUNDING: set = set()  # the layers (and sets of them, global scope) whose rounding was said


def _groupnorm_groups(pruner, layers: Mapping[str, nn.Module]) -> dict[str, int]:
    """The layers whose output channels reach a GroupNorm of more than one group: name ->
    its groups (the largest, when several)."""
    import torch_pruning as tp

    if not any(isinstance(m, nn.GroupNorm) for m in pruner.model.modules()):
        return {}
    found = {}
    for name, layer in layers.items():
        fn = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels
        groups = [dep.target.module.num_groups for dep, _ in pruner.DG.get_pruning_group(layer, fn, idxs=[0])
                  if isinstance(dep.target.module, nn.GroupNorm) and dep.target.module.num_groups > 1]
        if groups:
            found[name] = max(groups)
    return found


def _out_channels(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def replay_pruning(model: nn.Module, input_shape, history: list, unwrapped: Mapping[str, int] | None = None,
                   heads: Mapping[str, int] | None = None) -> nn.Module:
    """Rebuild a structured-pruned architecture from Torch-Pruning's pruning history, the
    parameters outside standard layers it pruned (name -> dimension) and each attention
    module's heads."""
    import warnings

    import torch_pruning as tp

    params = dict(model.named_parameters())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=torch.zeros(1, *input_shape),
            unwrapped_parameters=[(params[n], d) for n, d in (unwrapped or {}).items()] or None,
            ignored_params=per_head_params(model, attention_modules(model)), **graph_build_options(model))
    graph.load_pruning_history([tuple(h) for h in history])
    if heads:
        set_heads(attention_modules(model, heads), heads)
    return model
