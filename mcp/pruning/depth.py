"""Depth pruning: whole blocks removed (replaced by the identity), least important first.

Removing channels stops paying at small widths: ONNX Runtime's fixed cost per operator
dominates (ResNet-20 at 1x32x32, one thread: 16/32/64 channels 0.38 ms, 2/4/8 channels
0.062 ms, 1/1/1 channels still 0.036 ms), while the 8-layer ResNet at 4/8/16 channels runs
in 0.036 ms. Fewer operators is the remaining lever, and a residual block with an identity
shortcut can go: the network still runs and its shortcut carries the signal.

A *removable block* is a child of an ``nn.Sequential`` or an ``nn.ModuleList`` (the
``for block in self.blocks: x = block(x)`` of a user's own class) that maps its input to an
output of the same shape and holds a convolution or linear layer (a ResNet's or MobileNet's
residual block with an identity shortcut; in a plain stack, a shape-preserving layer), the
outermost such module only. A candidate whose removal breaks the forward pass (a
ModuleList used otherwise than as a stack) is left out. Blocks are chosen greedily: each
step removes the block whose removal raises the loss on calibration batches the least,
with the earlier choices already removed.

The removed blocks are part of the model's recipe (``depth_pruning``: the block names and
how much structured-pruning history preceded them), so a saved model rebuilds its shapes.
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch
from torch import nn

from mcp.errors import ConfigError
from mcp.pruning.pruner import attention_modules, replay_pruning, set_heads

RECIPE_KEY = "depth_pruning"
STACKS = (nn.Sequential, nn.ModuleList)  # containers whose children may be blocks


def removable_blocks(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """Names of the removable blocks of ``model`` in execution order (one forward pass on zeros)."""
    modules = dict(model.named_modules())
    inside_sequential = {f"{name}.{key}" if name else key
                         for name, m in modules.items() if isinstance(m, STACKS) for key in m._modules}
    shapes: dict[str, tuple[tuple, tuple]] = {}
    order: list[str] = []

    def hook(name):
        def record(mod, args, out):
            if name not in shapes and args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                shapes[name] = (tuple(args[0].shape), tuple(out.shape))
                order.append(name)
        return record

    hooks = [modules[n].register_forward_hook(hook(n)) for n in inside_sequential if n in modules]
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape, device=param.device if param is not None else "cpu")
    try:
        with torch.no_grad():
            out_shape = tuple(model(x).shape)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    found: list[str] = []
    for name in order:
        if shapes[name][0] != shapes[name][1] or not _has_layer(modules[name]):
            continue
        if any(name.startswith(f"{outer}.") for outer in found):
            continue  # a block inside a removable block: the outer one is the unit
        if isinstance(_parent(model, name)[0], nn.ModuleList) and not _runs_without(model, name, x, out_shape):
            continue
        found = [f for f in found if not f.startswith(f"{name}.")] + [name]
    return [n for n in order if n in found]


def _runs_without(model: nn.Module, name: str, x: torch.Tensor, out_shape: tuple) -> bool:
    """Whether the model still runs, to an output of the same shape, with ``name`` replaced
    by the identity (a ModuleList's children need not be a stack)."""
    old = _set(model, name, nn.Identity())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return tuple(model(x).shape) == out_shape
    except Exception:  # noqa: BLE001 - any failure of the user's forward means: not removable
        return False
    finally:
        _set(model, name, old)
        model.train(was_training)


def _has_layer(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear)) for m in module.modules())


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, key = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, key


def _set(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent, key = _parent(model, name)
    old = parent._modules[key]
    parent._modules[key] = module
    return old


@torch.no_grad()
def _loss(model: nn.Module, batches, device: str) -> float:
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        total += float(nn.functional.cross_entropy(model(x), y, reduction="sum"))
        count += len(y)
    return total / max(count, 1)


def block_order(model: nn.Module, input_shape: Sequence[int], batches, count: int) -> list[str]:
    """The first ``count`` blocks greedy removal takes: each the removable block whose
    replacement by the identity raises the calibration loss the least, given the earlier
    ones gone, measured where ``model`` is. ``model`` is left as it was. Without
    ``batches``, the last ``count`` blocks."""
    candidates = removable_blocks(model, input_shape)
    if count > len(candidates):
        raise ConfigError(f"drop_blocks={count} is more than the {len(candidates)} removable blocks this model has"
                          + (f" ({', '.join(candidates)})" if candidates else
                             " (a removable block is a shape-preserving child of an nn.Sequential or "
                             "nn.ModuleList holding a convolution, such as a residual block with an identity "
                             "shortcut)"))
    if count <= 0:
        return []
    if not batches:
        return candidates[-count:]
    device = str(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    chosen: list[str] = []
    removed: dict[str, nn.Module] = {}
    try:
        for _ in range(count):
            losses = {}
            for name in candidates:
                if name in chosen:
                    continue
                old = _set(model, name, nn.Identity())
                losses[name] = _loss(model, batches, device)
                _set(model, name, old)
            best = min(losses, key=lambda n: (losses[n], candidates.index(n)))
            chosen.append(best)
            removed[best] = _set(model, best, nn.Identity())
    finally:
        for name, old in removed.items():
            _set(model, name, old)
        model.train(was_training)
    return chosen


_ORDERS: "weakref.WeakKeyDictionary[nn.Module, tuple[int, list[str]]]" = weakref.WeakKeyDictionary()


def cached_block_order(model: nn.Module, input_shape: Sequence[int], batches, count: int) -> list[str]:
    """:func:`block_order` remembered per model and calibration batches (a search prunes
    many copies of one starting model): the greedy order's prefix is the answer for any
    smaller count."""
    key = id(batches)
    known = _ORDERS.get(model)
    if known is None or known[0] != key or len(known[1]) < count:
        _ORDERS[model] = (key, block_order(model, input_shape, batches, count))
    return _ORDERS[model][1][:count]


def remove_blocks(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """Replace the named blocks by the identity, in place, and record it in the recipe."""
    if not names:
        return model
    modules = dict(model.named_modules())
    for name in names:
        parent = _parent(model, name)[0] if name in modules else None
        if not isinstance(parent, STACKS) or isinstance(modules[name], nn.Identity):
            raise ConfigError(f"block {name!r} cannot be removed: it is not a block left in an nn.Sequential "
                              f"or nn.ModuleList of this model")
    for name in names:
        _set(model, name, nn.Identity())
    recipe = dict(getattr(model, "mcp_recipe", {}) or {})
    history = recipe.get("pruning_history") or []
    recipe[RECIPE_KEY] = [*(recipe.get(RECIPE_KEY) or []), {"after_history": len(history), "blocks": list(names)}]
    model.mcp_recipe = recipe
    return model


def removed_blocks(model: nn.Module) -> list[str]:
    """Every block the model's recipe says was removed."""
    events = (getattr(model, "mcp_recipe", {}) or {}).get(RECIPE_KEY) or []
    return [name for event in events for name in event["blocks"]]


def within(layer: str, blocks: Sequence[str]) -> bool:
    return any(layer == b or layer.startswith(f"{b}.") for b in blocks)


def rebuild(model: nn.Module, input_shape: Sequence[int], history: list, events: list,
            unwrapped: dict | None = None, heads: dict | None = None) -> nn.Module:
    """Replay a recipe's structured-pruning ``history`` with its depth-pruning ``events``
    in the order they happened (each event says how much history preceded it); the
    parameters outside standard layers it pruned and the attention heads as
    :func:`mcp.pruning.pruner.replay_pruning` takes them."""
    if not isinstance(events, list) or not all(
            isinstance(e, dict) and isinstance(e.get("after_history"), int) and isinstance(e.get("blocks"), list)
            and all(isinstance(b, str) for b in e["blocks"]) for e in events):
        raise ConfigError(f"model recipe's {RECIPE_KEY}={events!r} must be a list of "
                          f"{{after_history: int, blocks: [names]}}")
    done = 0
    for event in sorted(events, key=lambda e: e["after_history"]):
        after = event["after_history"]
        if after > done:
            replay_pruning(model, input_shape, history[done:after], unwrapped)
            done = after
        remove_blocks(model, list(event["blocks"]))
    if history[done:]:
        replay_pruning(model, input_shape, history[done:], unwrapped)
    if heads:
        set_heads(attention_modules(model, heads), heads)
    return model
