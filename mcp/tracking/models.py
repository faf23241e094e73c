"""Logging, registering and loading models.

A model is logged with MLflow's PyTorch flavor (so ``mlflow.pytorch.load_model`` and
pyfunc serving work) and, beside it, the recipe that rebuilds its architecture plus
its ``state_dict``. :func:`load_model` prefers recipe + state_dict, which survives
code changes that break pickles and checks that weights and architecture match.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from mcp.errors import McpError

RECIPE_FILE = "mcp_recipe.json"
STATE_FILE = "mcp_state_dict.pt"
ARTIFACT_PATH = "model"
ONNX_ARTIFACT_PATH = "onnx_model"


def registered_name(model: str, dataset: str) -> str:
    """Registry naming convention: ``<model>-<dataset>``."""
    return f"{model}-{dataset}"


def _requirements() -> list[str]:
    import mlflow
    import torchvision

    return [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}",
            f"mlflow=={mlflow.__version__}"]


def log_model(model: nn.Module, example: torch.Tensor, extra_recipe: Mapping[str, Any] | None = None):
    """Log ``model`` (moved to CPU, eval mode) into the active run; returns MLflow's ModelInfo."""
    import mlflow
    from mlflow.models import infer_signature

    recipe = dict(getattr(model, "mcp_recipe", {}) or {})
    if not recipe:
        raise ValueError("model has no mcp_recipe; build it with mcp.models.create_model")
    recipe.update(extra_recipe or {})
    model = model.to("cpu").eval()
    x = example.to("cpu")
    with torch.no_grad():
        y = model(x)
    signature = infer_signature(x.numpy(), y.numpy())
    with tempfile.TemporaryDirectory() as tmp:
        recipe_path, state_path = Path(tmp) / RECIPE_FILE, Path(tmp) / STATE_FILE
        recipe_path.write_text(json.dumps(recipe, indent=2))
        torch.save(model.state_dict(), state_path)
        return mlflow.pytorch.log_model(
            model, name=ARTIFACT_PATH, signature=signature, input_example=x.numpy(),
            extra_files=[str(recipe_path), str(state_path)], pip_requirements=_requirements(),
        )


def register_model(model_uri: str, name: str, alias: str | None, tags: Mapping[str, Any]):
    """Register ``model_uri`` as a new version of ``name`` with ``tags`` and move ``alias`` to it."""
    import mlflow
    from mlflow import MlflowClient

    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, version.version)
    return version


def alias_version(name: str, alias: str) -> str | None:
    """The version ``alias`` points at, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def set_alias(name: str, alias: str, version: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias(name, alias, version)


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

    if not uri.startswith("models:/") or "@" not in uri:
        return uri
    name, _, alias = uri.removeprefix("models:/").partition("@")
    try:
        return f"models:/{name}/{MlflowClient().get_model_version_by_alias(name, alias).version}"
    except MlflowException:
        return uri


def load_model(uri: str, device: str = "cpu") -> nn.Module:
    """Load a model logged by mcp from a ``runs:/``, ``models:/`` or local URI, in eval mode."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from mcp.models import model_from_recipe

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except (MlflowException, OSError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise McpError(f"cannot load model {uri!r}: {msg[:200]}") from None
    extra = local / "extra_files"
    if (extra / RECIPE_FILE).is_file() and (extra / STATE_FILE).is_file():
        recipe = json.loads((extra / RECIPE_FILE).read_text())
        model = model_from_recipe(recipe)
        state = torch.load(extra / STATE_FILE, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise McpError(f"model {uri!r}: weights do not match its recipe {recipe.get('name')!r}: "
                           f"{str(exc).splitlines()[0][:200]}") from None
    else:
        flavors = _flavors(local)
        if "pytorch" not in flavors:
            raise McpError(f"model {uri!r} is not a PyTorch model (flavors: {', '.join(flavors) or 'none'}); "
                           f"an ONNX export names the version it came from in its tag source_model")
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
    return model.to(device).eval()


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
    if "mcp.deploy_format" not in tags:
        return None, ""
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="onnx/model.onnx", dst_path=str(dst))
    return Path(path), tags["mcp.deploy_format"]


def log_onnx_model(path: str | Path, example: np.ndarray, outputs: np.ndarray):
    """Log an ONNX file with MLflow's ONNX flavor (signature, input example; one file,
    no external data) into the active run, so pyfunc and `mlflow models serve` load it."""
    import mlflow
    import onnx
    import onnxruntime
    from mlflow.models import infer_signature

    return mlflow.onnx.log_model(
        onnx.load(str(path)), name=ONNX_ARTIFACT_PATH, signature=infer_signature(example, outputs),
        input_example=example, save_as_external_data=False,
        pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}",
                          f"mlflow=={mlflow.__version__}"])
