"""Models mcp did not define: a factory named by its import path (``package.module:callable``,
the user's own class or function, importable from the environment or the working
directory) and weights read from a file without running code from it (a ``state_dict`` in
``.pt``/``.pth`` read with ``weights_only=True``, or ``.safetensors``).

A recipe names the factory and its keyword arguments; it never carries code."""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mcp.errors import ConfigError, McpError
from mcp.pruning.pruner import layers_in_order

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")  # common checkpoint layouts


def resolve_factory(path: str) -> Any:
    """The callable ``package.module:name`` names, imported from the environment or the
    working directory; a clear one-line error when it does not import or is not there."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"module={path!r} must be package.module:factory (a class or function that returns an "
                          f"nn.Module)")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)  # the user's own code beside them, as `python -c` would find it
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - an import runs the user's module: anything can fail
        raise McpError(f"module={path!r}: cannot import {module_name!r}: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise McpError(f"module={path!r}: {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise McpError(f"module={path!r}: {attr!r} is a {type(target).__name__}, not a class or function")
    return target


TIMM_FACTORY = "timm:create_model"


def check_timm(name: str) -> None:
    """timm is an optional extra: a clear line when it is missing or does not know ``name``."""
    try:
        import timm
    except ImportError:
        raise McpError("timm is not installed: pip install 'mcp-pipeline[timm]' (or pip install timm)") from None
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        raise ConfigError(f"timm={name!r} is not a timm architecture"
                          + (f"; similar: {', '.join(close)}" if close else "; see timm.list_models()"))


def build_from_factory(path: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Call the factory ``path`` names with ``kwargs``; its result must be an nn.Module."""
    factory = resolve_factory(path)
    kwargs = dict(kwargs or {})
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"module={path!r} does not take these arguments {sorted(kwargs)}: {exc}") from None
    except ValueError:
        pass  # no signature to check (a builtin): let the call say
    try:
        model = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's factory can raise anything
        raise McpError(f"module={path!r} raised {type(exc).__name__}: "
                       f"{(str(exc).splitlines() or [''])[0][:200]}") from None
    if not isinstance(model, nn.Module):
        raise McpError(f"module={path!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights_only(path: str | Path, *, pickled: str, corrupt: str) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, so no
    code runs. A file holding pickled objects fails with the one-line ``pickled``; one that
    is no PyTorch file at all with ``corrupt`` (``{error}`` names what torch raised)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower():  # it references objects: a pickle of more than tensors
            raise McpError(pickled) from None
        raise McpError(corrupt.format(error="UnpicklingError")) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise McpError(corrupt.format(error=type(exc).__name__)) from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``state_dict`` from ``path`` without running code from it: ``.safetensors``, or a
    PyTorch file read with ``weights_only=True`` (a dict of tensors, or one wrapped under
    ``state_dict``/``model``/... as training scripts save it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights={str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise McpError(f"weights={str(path)!r} is not a safetensors file: "
                           f"{(str(exc).splitlines() or [''])[0][:200]}") from None
    payload = load_weights_only(
        path, pickled=f"weights={str(path)!r} holds pickled Python objects (a whole model saved with "
                      f"torch.save(model)?); refused because unpickling runs code. Save "
                      f"torch.save(model.state_dict(), path) or use safetensors instead",
        corrupt=f"weights={str(path)!r} is not a PyTorch checkpoint ({{error}})")
    for _ in range(2):  # unwrap {"state_dict": {...}} and the like
        if isinstance(payload, Mapping) and not any(isinstance(v, torch.Tensor) for v in payload.values()):
            inner = next((payload[k] for k in _WRAPPERS if isinstance(payload.get(k), Mapping)), None)
            if inner is not None:
                payload = inner
    if not isinstance(payload, Mapping) or not any(isinstance(v, torch.Tensor) for v in payload.values()):
        raise McpError(f"weights={str(path)!r} holds no state_dict (a mapping of parameter names to tensors)")
    state = {str(k): v for k, v in payload.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Load ``state`` strictly; a mismatch is one line naming the first missing and
    unexpected keys and the shape mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs model {list(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({', '.join(unexpected[:4])}"
                         f"{', ...' if len(unexpected) > 4 else ''})")
        if shapes:
            parts.append(f"shape mismatch: {'; '.join(shapes[:3])}{'; ...' if len(shapes) > 3 else ''}")
        raise McpError(f"{what}: the weights do not match the model: {'; '.join(parts)}")
    model.load_state_dict(dict(state), strict=True)


def find_head(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    """The final classifier: the last nn.Linear to run in a forward pass."""
    linear = [n for n, m in layers_in_order(model, input_shape) if isinstance(m, nn.Linear)]
    if not linear:
        raise McpError("no nn.Linear runs in this model's forward pass, so its classifier cannot be found; "
                       "name it with --head")
    return linear[-1]


def replace_head(model: nn.Module, name: str, num_classes: int) -> dict[str, Any]:
    """Swap the nn.Linear ``name`` for a new one with ``num_classes`` outputs (transfer to
    the user's classes); returns the structural edit a recipe records to rebuild it."""
    modules = dict(model.named_modules())
    old = modules.get(name)
    if not isinstance(old, nn.Linear):
        found = type(old).__name__ if old is not None else "nothing"
        raise McpError(f"head={name!r} is {found}, not an nn.Linear; the model's Linear layers are: "
                       f"{', '.join(n for n, m in modules.items() if isinstance(m, nn.Linear)) or 'none'}")
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    parent_name, _, attr = name.rpartition(".")
    setattr(modules[parent_name] if parent_name else model, attr, new)
    return {"module": name, "in_features": old.in_features, "out_features": num_classes,
            "bias": old.bias is not None}


def apply_head(model: nn.Module, edit: Mapping[str, Any]) -> None:
    """Re-apply a recorded head replacement (rebuilding a model from its recipe)."""
    replace_head(model, str(edit["module"]), int(edit["out_features"]))
