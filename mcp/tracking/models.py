"""Logging, registering and loading models.

A model is logged with MLflow's PyTorch flavor (MLflow 3's pt2 format: torch.export's
graph of the model in eval mode, no pickle; ``mlflow.pytorch.load_model`` gives a
``torch.fx.GraphModule`` to call, whose ``.eval()``/``.train()`` raise, and pyfunc
serving works) and, beside it, the recipe that rebuilds its architecture plus its
``state_dict``. :func:`load_model` prefers recipe + state_dict, which survives
code changes that break pickles and checks that weights and architecture match.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from mcp.errors import McpError
from mcp.models import model_from_recipe
from mcp.models.foreign import load_weights_only
from mcp.quantization.codec import decode_into
from mcp.tracking import schema
from mcp.tracking.runs import mlflow_write
from mcp.tracking.schema import registered_name  # noqa: F401  (mcp.tracking.registered_name)

RECIPE_FILE = "mcp_recipe.json"
STATE_FILE = "mcp_state_dict.pt"
ARTIFACT_PATH = "model"
ONNX_ARTIFACT_PATH = "onnx_model"


def _requirements() -> list[str]:
    from importlib.metadata import version

    import mlflow

    # torchvision's version from its metadata: importing it (0.9 s) only for this would be
    # most of a small stage's start-up when nothing else needs it
    return [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={version('torchvision').split('+')[0]}",
            f"mlflow=={mlflow.__version__}"]


@mlflow_write
def log_model(model: nn.Module, example: torch.Tensor, extra_recipe: Mapping[str, Any] | None = None):
    """Log ``model`` (moved to CPU, eval mode) into the active run; returns MLflow's ModelInfo."""
    import mlflow
    from mlflow.models import infer_signature

    recipe = dict(getattr(model, "mcp_recipe", {}) or {})
    if not recipe:
        raise ValueError("model has no mcp_recipe; build it with mcp.models.create_model")
    recipe.update(extra_recipe or {})
    model = model.to("cpu").eval()  # MLflow's pt2 copy is traced now: in eval mode, for good
    x = example.to("cpu")
    if x.shape[0] < 2:  # torch.export fixes a batch dimension of 1: MLflow's loaders would take only batch 1
        x = torch.cat([x, x])
    with torch.no_grad():
        y = model(x)
    signature = infer_signature(x.numpy(), y.numpy())
    with tempfile.TemporaryDirectory() as tmp:
        recipe_path, state_path = Path(tmp) / RECIPE_FILE, Path(tmp) / STATE_FILE
        recipe_path.write_text(json.dumps(recipe, indent=2))
        torch.save(model.state_dict(), state_path)
        return mlflow.pytorch.log_model(
            model, name=ARTIFACT_PATH, signature=signature, input_example=x.numpy(),
            extra_files=[str(recipe_path), str(state_path)], pip_requirements=_requirements(), **_pt2_format(),
        )


def _pt2_format() -> dict[str, str]:
    """MLflow's pt2 format (torch.export's graph, no pickle) whatever MLflow's default is:
    pickle on a Databricks tracking URI and in the first MLflow versions that offered the
    choice. MLflow versions older than ``serialization_format`` write their default."""
    import inspect

    import mlflow

    wanted = "serialization_format" in inspect.signature(mlflow.pytorch.log_model).parameters
    return {"serialization_format": "pt2"} if wanted else {}


@mlflow_write
def log_weights(model: nn.Module, input_shape: Sequence[int] | None = None, num_classes: int | None = None) -> str:
    """Log what a Python API call produced into the active run, so that :func:`load_api`
    (``mcp.load``) rebuilds it in a fresh process. A model with a recipe mcp can rebuild
    (a zoo, imported or reloaded model) is logged as a model (``model/``: it reloads,
    registers and compresses further). A model of the user's own class gets a recipe that
    names the class and records the structural edits (channels and blocks removed), logged
    with its ``state_dict`` as ``weights/mcp_recipe.json`` and ``weights/model.safetensors``
    (no pickle): its constructor's arguments are the user's to give again. Returns the
    logged model's URI."""
    import mlflow
    from safetensors.torch import save_file

    recipe = dict(getattr(model, "mcp_recipe", None) or {})
    shape = list(recipe.get("input_shape") or input_shape or [])
    if shape and (recipe.get("name") or recipe.get("factory")):  # a recipe that rebuilds it
        return log_model(model, torch.zeros(2, *shape)).model_uri
    cls = type(model)
    recipe.update(name=cls.__name__, factory=f"{cls.__module__}:{cls.__qualname__}", kwargs={}, kwargs_known=False,
                  input_shape=shape, num_classes=num_classes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / WEIGHTS_FILE
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
        (Path(tmp) / RECIPE_FILE).write_text(json.dumps(recipe, indent=2))
        mlflow.log_artifacts(tmp, artifact_path=WEIGHTS_PATH)
    return f"runs:/{mlflow.active_run().info.run_id}/{WEIGHTS_PATH}"


WEIGHTS_PATH, WEIGHTS_FILE = "weights", "model.safetensors"


def load_api(source: str, model: nn.Module | None = None, device: str = "cpu") -> nn.Module:
    """The model a stage or a Python API call logged, rebuilt without running code from the
    store: ``source`` is a ``models:/`` URI, a ``runs:/<run_id>/<path>`` URI, or a run
    (its id, or ``runs:/<run_id>``) whose logged model (``model/``) or weights
    (``weights/``) are taken. ``model``: a freshly built instance of the original
    architecture, needed for the user's own class (whose constructor arguments mcp does
    not know); the recipe's structural edits are applied to it before the weights load."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = source.strip()
    if not uri.startswith(("models:/", "runs:/")) and all(c in "0123456789abcdef" for c in uri) and len(uri) == 32:
        uri = f"runs:/{uri}"
    if uri.startswith("runs:/") and "/" not in uri[len("runs:/"):].strip("/"):  # a run: what it logged
        run_id = uri[len("runs:/"):].strip("/")
        try:
            logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
        except MlflowException as exc:
            raise McpError(f"cannot load {source!r}: {(str(exc).splitlines() or [''])[0][:200]}") from None
        if read_recipe(f"runs:/{run_id}/{ARTIFACT_PATH}") is not None:  # MLflow 3 keeps it as the run's logged model
            uri = f"runs:/{run_id}/{ARTIFACT_PATH}"
        elif WEIGHTS_PATH in logged:
            uri = f"runs:/{run_id}/{WEIGHTS_PATH}"
        else:
            raise McpError(f"run {run_id} logged no model (no {ARTIFACT_PATH}/ or {WEIGHTS_PATH}/ artifacts)")
    if uri.rstrip("/").endswith(f"/{WEIGHTS_PATH}"):
        local = _download(uri)
        recipe = json.loads((local / RECIPE_FILE).read_text())
        from safetensors.torch import load_file

        state = load_file(str(local / WEIGHTS_FILE))
    elif model is None:
        return load_model(uri, device)
    else:
        local = _download(uri) / "extra_files"
        if not (local / RECIPE_FILE).is_file():
            raise McpError(f"model {source!r} was not logged by mcp (it has no {RECIPE_FILE})")
        recipe = json.loads((local / RECIPE_FILE).read_text())
        state = read_state_dict(local / STATE_FILE, f"model {source!r}")
    built = model_from_recipe(recipe, copy.deepcopy(model) if model is not None else None)
    try:
        built.load_state_dict(state)
    except RuntimeError as exc:
        given = f"the model you passed ({type(model).__name__})" if model is not None else recipe.get("factory")
        raise McpError(f"{source!r}: its weights do not fit {given}: {str(exc).splitlines()[0][:200]}") from None
    return built.to(device).eval()


@mlflow_write
def register_model(model_uri: str, name: str, alias: str | None, tags: Mapping[str, Any]):
    """Register ``model_uri`` as a new version of ``name`` with ``tags`` and move ``alias`` to it."""
    import mlflow
    from mlflow import MlflowClient

    _quiet_reregistration()
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, version.version)
    return version


_REREGISTRATION = "already exists. Creating a new version of this model"


def _quiet_reregistration() -> None:
    """MLflow prints "Registered model 'x' already exists. Creating a new version of this
    model..." at every registration of a name after its first (a search makes dozens);
    mcp says which version it registered, and MLflow's "Created version 'n'" stays: that
    line is left out (MLflow prints it with its ``eprint``, not a logger, so no log
    filter reaches it)."""
    from mlflow.tracking._model_registry import fluent

    say = getattr(fluent, "eprint", None)
    if say is None or getattr(say, "mcp_quiet", False):
        return

    def eprint(*args, **kwargs):
        if not (args and _REREGISTRATION in str(args[0])):
            say(*args, **kwargs)

    eprint.mcp_quiet = True
    fluent.eprint = eprint


def alias_version(name: str, alias: str) -> str | None:
    """The version ``alias`` points at, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


@mlflow_write
def set_alias(name: str, alias: str, version: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias(name, alias, version)


@mlflow_write
def delete_version(name: str, version: str) -> None:
    """Remove one version (and the aliases on it) from the registry."""
    from mlflow import MlflowClient

    MlflowClient().delete_model_version(name, version)


def alias_exists(name: str, alias: str) -> bool:
    """Whether registered model ``name`` has a version with ``alias``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient().get_model_version_by_alias(name, alias)
        return True
    except MlflowException:
        return False


def pin_version(uri: str) -> str:
    """``models:/<name>@<alias>`` -> ``models:/<name>/<version>`` (an alias moves; the
    version it points at now is what provenance tags should name). Other URIs unchanged."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not uri.startswith(schema.MODELS_SCHEME) or "@" not in uri:
        return uri
    name, _, alias = schema.parse_models_uri(uri)
    try:
        return schema.version_uri(name, MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return uri


def load_model(uri: str, device: str = "cpu", trust_pickled: bool = False) -> nn.Module:
    """Load a model from a ``runs:/``, ``models:/`` or local URI, in eval mode, without
    running code from the artifact.

    A model mcp logged is rebuilt from its recipe (which names only code already
    importable here) and its ``state_dict`` (read with ``weights_only=True``). Any other
    PyTorch model in MLflow is a pickle, and unpickling runs whatever code its author put
    in it: it is refused unless ``trust_pickled`` is set (``--trust-pickled-model``),
    which warns once per process and is recorded on the run (tag ``mcp.trust_pickled_model``).
    """

    local = _download(uri)
    extra = local / "extra_files"
    if (extra / RECIPE_FILE).is_file() and (extra / STATE_FILE).is_file():
        try:
            recipe = json.loads((extra / RECIPE_FILE).read_text())
        except ValueError:
            raise McpError(f"model {uri!r}: {RECIPE_FILE} is not valid JSON") from None
        if not isinstance(recipe, dict):
            raise McpError(f"model {uri!r}: {RECIPE_FILE} must hold a JSON object")
        model = model_from_recipe(recipe)
        state = read_state_dict(extra / STATE_FILE, f"model {uri!r}")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise McpError(f"model {uri!r}: weights do not match its recipe {recipe.get('name')!r}: "
                           f"{str(exc).splitlines()[0][:200]}") from None
        return model.to(device).eval()
    _require_pytorch(local, uri)
    if not trust_pickled:
        raise McpError(f"model {uri!r} was not logged by mcp: loading it means unpickling it, which runs any code "
                       f"its author put in the file, so it is refused; log its state_dict instead, or pass "
                       f"--trust-pickled-model true if you trust whoever logged it")
    _warn_pickle_once(uri)
    model = _mlflow_pytorch_load(uri, allow_pickle=True)
    if not getattr(model, "mcp_recipe", None):
        raise McpError(f"model {uri!r} has no mcp recipe (the architecture mcp rebuilds it from); "
                       f"build it with mcp.models.create_model")
    return model.to(device).eval()


def read_recipe(uri: str) -> dict[str, Any] | None:
    """The recipe mcp logged beside the model ``uri`` names (its architecture, structural
    edits and recorded data settings), read without loading any weights; None when the
    model has none (it was not logged by mcp) or cannot be found."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{uri.rstrip('/')}/extra_files/{RECIPE_FILE}")
        recipe = json.loads(Path(path).read_text())
    except (MlflowException, OSError, ValueError):
        return None
    return recipe if isinstance(recipe, dict) else None


def foreign_state_dict(uri: str, trust_pickled: bool = False) -> dict[str, torch.Tensor]:
    """The weights of a PyTorch model in MLflow that mcp did not log, read without running
    code from it: MLflow 3's pt2 archive, which MLflow checks is free of pickles before
    torch.export loads it; a pickled model only with ``trust_pickled``. (A model mcp
    logged gives its own state_dict.)"""
    import mlflow

    local = _download(uri)
    if (local / "extra_files" / STATE_FILE).is_file():
        return read_state_dict(local / "extra_files" / STATE_FILE, f"model {uri!r}")
    _require_pytorch(local, uri)
    pt2 = any(local.glob("data/*.pt2"))
    if not pt2 and not trust_pickled:
        raise McpError(f"model {uri!r} was not logged by mcp: it is a pickled PyTorch model, and unpickling runs any "
                       f"code its author put in the file, so it is refused; log it in MLflow's pt2 format "
                       f"(serialization_format='pt2'), or pass --trust-pickled-model true if you trust whoever "
                       f"logged it")
    if pt2 and not trust_pickled and not hasattr(mlflow.pytorch, "_validate_pt2_archive_is_pickle_free"):
        raise McpError(f"model {uri!r}: MLflow {mlflow.__version__} cannot check that a pt2 archive holds no pickled "
                       f"code (newer MLflow can); upgrade MLflow, or pass --trust-pickled-model true")
    if not pt2:
        _warn_pickle_once(uri)
    module = _mlflow_pytorch_load(uri, allow_pickle=trust_pickled)  # not allowed: MLflow verifies the pt2 archive
    return {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


_WARNED: set[str] = set()
_ALLOW_PICKLE = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"


def _download(uri: str) -> Path:
    """The model's artifact folder, or one clear line."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except (MlflowException, OSError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise McpError(f"cannot load model {uri!r}: {msg[:200]}") from None


def _mlflow_pytorch_load(uri: str, allow_pickle: bool) -> nn.Module:
    """``mlflow.pytorch.load_model`` with MLflow's own pickle switch set for this call only:
    on when the user opted in, off otherwise (MLflow then loads a pt2 archive only after
    checking it holds no pickles, and refuses a pickle)."""
    import mlflow

    before = os.environ.get(_ALLOW_PICKLE)
    os.environ[_ALLOW_PICKLE] = "true" if allow_pickle else "false"
    try:
        model = mlflow.pytorch.load_model(uri, map_location="cpu")  # gated: --trust-pickled-model (else pt2 only)
    except Exception as exc:  # noqa: BLE001 - a refused archive, a broken file, a pickle's own code
        raise McpError(f"cannot load model {uri!r}: {type(exc).__name__}: "
                       f"{(str(exc).strip().splitlines() or [''])[0][:240]}") from None
    finally:
        if before is None:
            os.environ.pop(_ALLOW_PICKLE, None)
        else:
            os.environ[_ALLOW_PICKLE] = before
    if not isinstance(model, nn.Module):
        raise McpError(f"model {uri!r} loaded as a {type(model).__name__}, not a torch.nn.Module")
    return model


def _warn_pickle_once(uri: str) -> None:
    if "pickle" not in _WARNED:
        _WARNED.add("pickle")
        import click

        click.echo(f"warning: unpickling {uri} (--trust-pickled-model): this runs code from the model file",
                   err=True)


def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A ``state_dict`` file read with ``weights_only=True``: tensors and plain containers
    only, so no code runs; anything else is one clear line."""
    state = load_weights_only(
        path, pickled=f"{what}: {path.name} holds pickled Python objects, not only tensors; refused because "
                      f"unpickling them could run code (save model.state_dict() instead)",
        corrupt=f"{what}: {path.name} is not a PyTorch state_dict file ({{error}})")
    if not isinstance(state, dict):
        raise McpError(f"{what}: {path.name} holds a {type(state).__name__}, not a state_dict")
    return state


def _require_pytorch(local: Path, uri: str) -> None:
    flavors = _flavors(local)
    if "pytorch" not in flavors:
        raise McpError(f"model {uri!r} is not a PyTorch model (flavors: {', '.join(flavors) or 'none'}); "
                       f"an ONNX export names the version it came from in its tag source_model")


def _flavors(local: Path) -> list[str]:
    import yaml

    mlmodel = local / "MLmodel"
    if not mlmodel.is_file():
        return []
    return sorted((yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}))


def list_versions(name: str) -> list[tuple[str, dict[str, str], list[str]]]:
    """(version, tags, aliases) of every version of registered model ``name``, oldest first."""
    from mlflow import MlflowClient

    versions = MlflowClient().search_model_versions(f"name='{name}'")
    return [(v.version, dict(v.tags), list(v.aliases)) for v in sorted(versions, key=lambda v: int(v.version))]


def version_info(uri: str) -> tuple[dict[str, str], list[str]] | None:
    """(tags, aliases) of the registered version ``models:/<name>/<version>`` names."""
    from mlflow import MlflowClient

    name, _, version = uri.removeprefix("models:/").partition("/")
    if not uri.startswith("models:/") or not version.isdigit():
        return None
    v = MlflowClient().get_model_version(name, version)
    return dict(v.tags), list(v.aliases)


@mlflow_write
def set_version_tags(uri: str, tags: Mapping[str, str]) -> None:
    """Set ``tags`` on the registered version ``uri`` (``models:/<name>/<version>``); any
    other URI names no version, and nothing is set."""
    from mlflow import MlflowClient

    if not uri.startswith(schema.MODELS_SCHEME):
        return
    name, version, _ = schema.parse_models_uri(pin_version(uri))
    if not (version or "").isdigit():
        return
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def source_run_id(uri: str) -> str | None:
    """The run that logged the model ``uri`` names (``runs:/`` or ``models:/`` URIs)."""
    from mlflow import MlflowClient

    if uri.startswith("runs:/"):
        return uri.removeprefix("runs:/").split("/", 1)[0]
    if uri.startswith("models:/"):
        name, _, version = pin_version(uri).removeprefix("models:/").partition("/")
        if version.isdigit():
            return MlflowClient().get_model_version(name, version).run_id
    return None


def _provenance(uri: str) -> tuple[str | None, str | None, bool]:
    """(stage, parent URI, holds the ``baseline`` alias) of a ``models:/<name>/<version>``
    (its version tags) or a ``runs:/`` URI (its run's tags); LookupError when neither
    exists in this store."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        run_id = None
        if uri.startswith(schema.MODELS_SCHEME):
            name, version, alias = schema.parse_models_uri(pin_version(uri))
            if alias is not None:
                raise LookupError(f"{uri}: no version has alias {alias!r}")
            if version is None:  # MLflow 3's logged model (models:/m-<id>): the run that logged it
                run_id = client.get_logged_model(name).source_run_id
                if not run_id:
                    raise LookupError(f"{uri} was logged by no run")
            else:
                v = client.get_model_version(name, version)
                return v.tags.get(schema.STAGE), v.tags.get("parent_model") or None, schema.BASELINE in v.aliases
        elif uri.startswith("runs:/"):
            run_id = uri.removeprefix("runs:/").split("/", 1)[0]
        if run_id is not None:
            tags = client.get_run(run_id).data.tags
            return tags.get(schema.STAGE), tags.get(schema.PARENT_MODEL) or None, False
    except MlflowException as exc:
        raise LookupError(f"{uri} is not in this tracking store ({type(exc).__name__})") from None
    raise LookupError(f"{uri} is neither a models:/ nor a runs:/ URI, so no lineage is recorded for it")


def lineage_root(uri: str, max_depth: int = 100) -> tuple[str | None, str]:
    """The baseline the model ``uri`` descends from: follow ``parent_model`` links (version
    tags; a run's ``mcp.parent_model``) up to the version or run that a train or import
    stage made, that holds the ``baseline`` alias, or a student distilled from scratch.
    Returns (its URI, "") or (None, why the lineage has no baseline)."""
    seen: list[str] = []
    current = pin_version(uri)
    while len(seen) < max_depth:
        if current in seen:
            return None, f"its lineage loops at {current}"
        seen.append(current)
        try:
            stage, parent, aliased = _provenance(current)
        except LookupError as exc:
            return None, str(exc)
        if aliased or stage in schema.ROOT_STAGES or (stage == "distill" and not parent):
            return current, ""
        if stage is None:
            return None, f"{current} was not made by an mcp stage"
        if not parent:
            return None, f"{current} ({stage}) records no parent model"
        current = pin_version(parent)
    return None, f"its lineage is longer than {max_depth} models"


def deployable_onnx(uri: str, dst: str | Path) -> tuple[Path | None, str]:
    """The deployable ONNX model the stage that made ``uri`` built (a quantized model's
    QDQ / INT8 form, logged as ``onnx/model.onnx``) and its ``mcp.deploy_format``;
    (None, "") when that stage built none (the model is float: export it)."""
    import mlflow
    from mlflow import MlflowClient

    run_id = source_run_id(uri)
    if run_id is None:
        return None, ""
    tags = MlflowClient().get_run(run_id).data.tags
    if schema.DEPLOY_FORMAT not in tags:
        return None, ""
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="onnx/model.onnx", dst_path=str(dst))
    return Path(path), tags[schema.DEPLOY_FORMAT]


def load_payload(uri: str, device: str = "cpu") -> nn.Module:
    """The model ``uri`` names with its weights decoded from the encoded payload its stage
    logged (``compressed/model.mcpz``: codebooks, grids, Huffman-coded streams), not from
    its float32 state: the architecture from its recipe, every tensor from the payload
    (:func:`mcp.quantization.codec.decode_into`). A model whose stage encoded none is an
    error that says so."""
    import mlflow
    from mlflow.exceptions import MlflowException

    model = load_model(uri, "cpu")
    run_id = source_run_id(uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="compressed/model.mcpz",
                                                       dst_path=tmp) if run_id else None
        except (MlflowException, OSError):
            path = None
        if path is None:
            raise McpError(f"model {uri!r} has no encoded payload (compressed/model.mcpz): only mcp quantize and "
                           f"mcp search log one")
        decode_into(model, Path(path).read_bytes())
    return model.to(device).eval()


class _OnceFilter(logging.Filter):
    """Let a log message that would repeat on every call through once per process; none
    at all where ``idle()`` says it has nothing to tell on this machine."""

    def __init__(self, fragment: str, idle=None):
        super().__init__()
        self.fragment, self.seen, self.idle = fragment, False, idle

    def filter(self, record: logging.LogRecord) -> bool:
        if self.fragment not in record.getMessage():
            return True
        if self.seen or (self.idle is not None and self.idle()):
            return False
        self.seen = True
        return True


def _no_gpu() -> bool:
    import torch

    return not torch.cuda.is_available()


# MLflow loads the logged model here to check its input example, and warns that the CUDA the
# model declares is missing from this onnxruntime build: on a machine with no GPU that says
# nothing (CPU is all there is; a server with onnxruntime-gpu uses CUDA); with a GPU, once.
_PROVIDER_WARNING = _OnceFilter("are unavailable in this onnxruntime build", idle=_no_gpu)


@mlflow_write
def log_onnx_model(path: str | Path, example: np.ndarray, outputs: np.ndarray):
    """Log an ONNX file with MLflow's ONNX flavor (signature, input example; one file,
    no external data) into the active run, so pyfunc and `mlflow models serve` load it."""
    import mlflow
    import onnx
    import onnxruntime
    from mlflow.models import infer_signature

    # The model declares CUDA then CPU for whoever serves it; MLflow warns on every log where
    # CUDA is missing: see _PROVIDER_WARNING.
    onnx_logger = logging.getLogger("mlflow.onnx")
    if _PROVIDER_WARNING not in onnx_logger.filters:
        onnx_logger.addFilter(_PROVIDER_WARNING)

    return mlflow.onnx.log_model(
        onnx.load(str(path)), name=ONNX_ARTIFACT_PATH, signature=infer_signature(example, outputs),
        input_example=example, save_as_external_data=False,
        pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}",
                          f"mlflow=={mlflow.__version__}"])
