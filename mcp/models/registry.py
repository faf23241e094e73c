"""The registry itself, kept free of model definitions to avoid import cycles."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch import nn

from mcp.errors import ConfigError
from mcp.models.foreign import apply_head, build_from_factory
from mcp.pruning.depth import rebuild
from mcp.pruning.pruner import replay_pruning

Factory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Factory
    tiny: bool
    description: str


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, *, tiny: bool = False) -> Callable[[Factory], Factory]:
    """Register ``factory(num_classes, input_shape, **kw) -> nn.Module`` under ``name``."""

    def wrap(factory: Factory) -> Factory:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        doc = (inspect.getdoc(factory) or "").splitlines()
        _MODELS[name] = ModelEntry(name, factory, tiny, doc[0] if doc else "")
        return factory

    return wrap


def model_names(include_tiny: bool = True) -> list[str]:
    return sorted(n for n, e in _MODELS.items() if include_tiny or not e.tiny)


def model_info(name: str) -> ModelEntry:
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}")
    return _MODELS[name]


def create_model(name: str, num_classes: int, input_shape: Sequence[int], **kw: Any) -> nn.Module:
    entry = model_info(name)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise ConfigError(f"input_shape={input_shape!r} must be (channels, height, width) with positive sizes")
    if num_classes < 2:
        raise ConfigError(f"num_classes={num_classes!r} must be at least 2")
    allowed = [p for p in inspect.signature(entry.factory).parameters if p not in ("num_classes", "input_shape")]
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ConfigError(f"model {name!r} does not take {', '.join(unknown)}; "
                          f"it takes: {', '.join(allowed) or 'no extra arguments'}")
    model = entry.factory(num_classes=num_classes, input_shape=shape, **kw)
    model.mcp_recipe = {"name": name, "num_classes": num_classes, "input_shape": list(shape), "kwargs": dict(kw)}
    return model


def model_from_recipe(recipe: dict[str, Any], model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model's architecture from the recipe stored beside its weights: a zoo
    model by name, or an imported one by its factory's import path (``factory``) and
    keyword arguments. A recipe names code already importable here; it never carries any.
    ``model``: a freshly built instance of the original architecture (a user's class whose
    constructor arguments the recipe does not know) to apply the recipe's structural edits
    to, instead of building one."""
    try:
        if model is not None:
            recipe["num_classes"], recipe["input_shape"]  # noqa: B018 - every recipe has them
        elif recipe.get("factory") and recipe.get("kwargs_known", True):
            model = build_from_factory(str(recipe["factory"]), recipe.get("kwargs", {}))
            recipe["num_classes"], recipe["input_shape"]  # noqa: B018 - every recipe has them
        elif recipe.get("factory"):
            raise ConfigError(f"the model was made from your class {recipe['factory']}, whose constructor arguments "
                              f"mcp does not know: pass one built as you built the original (mcp.load(..., "
                              f"model={recipe['factory'].rpartition(':')[2]}(...)))")
        else:
            model = create_model(recipe["name"], recipe["num_classes"], recipe["input_shape"],
                                 **recipe.get("kwargs", {}))
    except KeyError as exc:
        raise ConfigError(f"model recipe lacks the key {exc.args[0]!r}: {recipe!r}") from None
    if recipe.get("head"):  # an imported model's classifier replaced for the user's classes
        apply_head(model, recipe["head"])
    if recipe.get("depth_pruning"):  # blocks removed, before or after channels were: replay both in order
        rebuild(model, recipe["input_shape"], list(recipe.get("pruning_history") or []), recipe["depth_pruning"],
                recipe.get("pruning_unwrapped"), recipe.get("attention_heads"))
    elif recipe.get("pruning_history"):  # structured pruning: replay it to get the smaller shapes
        replay_pruning(model, recipe["input_shape"], recipe["pruning_history"], recipe.get("pruning_unwrapped"),
                       recipe.get("attention_heads"))
    model.mcp_recipe = dict(recipe)
    return model
