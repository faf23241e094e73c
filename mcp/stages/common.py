"""Pieces every stage shares: data + device set-up, final metrics, logging and registering."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mcp import tracking
from mcp.config import (
    DATA_RECORDED,
    PARENT,
    URI_SCHEMES,
    BenchmarkConfig,
    DataOptions,
    DistillConfig,
    ImportConfig,
    PipelineConfig,
    RecoveryOptions,
    SplitConfig,
    StartModel,
    TrainConfig,
)
from mcp.data import load_dataset, make_loaders
from mcp.deploy.onnx import export_onnx
from mcp.distillation import Distiller, DistillSpec
from mcp.errors import McpError
from mcp.evaluation.metrics import count_params, size_bytes_fp32
from mcp.evaluation import ort_bench  # its timing is what tests fake: called through the module
from mcp.models import create_model, model_names
from mcp.tracking import schema
from mcp.training import evaluate, resolve_device
from mcp.training.setup import FineTune
from mcp.tuner.study import default_storage


def load_splits(cfg: DataOptions):
    """The train/val/test splits that ``cfg``'s data options name (no loaders, no device)."""
    return load_dataset(cfg.dataset, cfg.data_dir, cfg.download, cfg.input_shape or None,
                        cfg.num_classes, cfg.val_fraction, cfg.augment, cfg.split_file)


def setup_data(cfg: DataOptions):
    """(device, splits, (train, val, test) loaders): fails on bad input before any run starts."""
    device = resolve_device(cfg.device)
    splits = load_splits(cfg)
    loaders = make_loaders(splits, cfg.batch_size, cfg.workers, cfg.seed, pin_memory=device == "cuda")
    return device, splits, loaders


def data_recipe(splits) -> dict[str, Any]:
    """What a model made on ``splits`` records of its data (recipe keys): the dataset and
    its classes, and the settings that load the same splits again (``data``: dataset,
    folder, input shape, augmentation, split, the test set's fingerprint)."""
    return {"dataset": splits.name, "class_names": splits.class_names, "data": splits.record()}


def log_and_register(model: nn.Module, example: torch.Tensor, extra_recipe: Mapping[str, Any],
                     registered: str | None, alias: str | None, tags: Mapping[str, Any]) -> tuple[str, str | None]:
    """Log the model into the active run; register it when ``registered`` is a name.
    Returns (model URI of the logged model, registered version or None). The recipe's
    recorded data (``extra_recipe["data"]``, see :func:`data_recipe`) also tags the run
    and the version: the test set's fingerprint, and the data settings as JSON."""
    data = extra_recipe.get("data")
    if data:
        tracking.runs.set_tag(schema.TEST_FINGERPRINT, data["test_fingerprint"])
        tags = {**tags, "test_fingerprint": data["test_fingerprint"], "data": json.dumps(data, sort_keys=True)}
        if data.get("split_file"):  # the user's split, kept with the model it made
            tracking.log_artifact(data["split_file"], "data")
    info = tracking.log_model(model, example, extra_recipe)
    if not registered:
        return info.model_uri, None
    version = tracking.register_model(info.model_uri, registered, alias, tags)
    return info.model_uri, str(version.version)


def model_ref_of(cls: type, values: Mapping[str, Any]) -> str:
    """The model whose recorded data a stage of config ``cls`` reuses, from its given
    ``values``: the model it starts from (``model_uri``), a distillation's student or
    teacher given as a model reference, a benchmark's first model or registered model.
    '' when there is none (a zoo model's name is ``<model>-<dataset>``: the dataset is
    part of the name)."""
    def ref(value: Any) -> str:
        text = str(value or "").strip()
        return "" if not text or text in model_names() else text

    if issubclass(cls, (TrainConfig, ImportConfig)):
        return ""  # they are where data settings are given
    if issubclass(cls, (StartModel, PipelineConfig, SplitConfig)):
        return ref(values.get("model_uri"))
    if issubclass(cls, DistillConfig):
        return ref(values.get("student")) or ref(values.get("teacher"))
    if issubclass(cls, BenchmarkConfig):
        first = next((r for r in (ref(v) for v in str(values.get("models") or "").split(",")) if r), "")
        registered = str(values.get("registered_model") or "").strip()
        return first or ref(values.get("baseline")) or (f"{registered}@{schema.BASELINE}" if registered else "")
    return ""


def with_recorded_data(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (the options given) completed with the data settings the starting model
    recorded (see :func:`model_ref_of`): a registered model remembers its dataset, folder,
    input shape, augmentation, validation share and split file, and a stage started from
    it uses them unless told otherwise. Precedence: defaults < recorded < config file <
    command line. A recorded folder or split file that is no longer there is one line
    naming it and the option that overrides it."""
    out = dict(values)
    ref = model_ref_of(cls, values)
    if not ref:
        return out
    uri = reference_uri(ref, str(values.get("dataset") or ""))
    recipe = tracking.models.read_recipe(uri) or {}
    recorded = dict(recipe.get("data") or ({"dataset": recipe["dataset"]} if recipe.get("dataset") else {}))
    if not recorded:
        return out
    if out.get("dataset") not in (None, "", recorded.get("dataset")):
        return out  # another dataset: none of the recorded settings apply
    for key in DATA_RECORDED:
        if out.get(key) in (None, "", 0) and recorded.get(key) not in (None, ""):
            out[key] = recorded[key]
            for name, option in (("data_dir", "--data-dir"), ("split_file", "--split-file")):
                if key == name and out[key] and not Path(str(out[key])).exists():
                    raise McpError(f"{uri} was made on {recorded.get('dataset')} data with {name} "
                                   f"{str(out[key])!r}, which does not exist here; pass {option} with where "
                                   f"it is now")
    return out


class DeploymentWarning(UserWarning):
    """A compressed model that runs slower in ONNX Runtime than the model it started from."""


SLOWER_MARGIN = 0.05  # deployed latency above the starting model's by more than this share is "slower"
DEPLOY_KEYS = ("latency_ms_p50_cpu", "baseline_latency_ms_p50_cpu", "speedup_p50_cpu_vs_baseline",
               "parent_latency_ms_p50_cpu", "speedup_p50_cpu_vs_parent")


def timing_seconds() -> float:
    """How long each deployed model is timed at registration (``MCP_DEPLOY_TIMING_S``, default 0.3 s)."""
    try:
        return max(0.01, float(os.environ.get("MCP_DEPLOY_TIMING_S", "0.3")))
    except ValueError:
        raise McpError(f"MCP_DEPLOY_TIMING_S={os.environ['MCP_DEPLOY_TIMING_S']!r} is not a number of seconds") from None


_TIMED_LATER: contextvars.ContextVar[bool] = contextvars.ContextVar("mcp_timed_later", default=False)


@contextlib.contextmanager
def timed_by_the_benchmark():
    """Within it, a stage logs no deployment figures of its own (:func:`deployment_figures`
    returns none, unless it must decide on them): the pipeline's benchmark step times every
    model it made, each in a process of its own, and :func:`log_deployment_figures` gives
    each stage's run and registered version the figures from those timings. The same file
    is not timed twice in one command."""
    token = _TIMED_LATER.set(True)
    try:
        yield
    finally:
        _TIMED_LATER.reset(token)


def deployment_figures(model: nn.Module, shape: Sequence[int], deployed: Path | None, baseline: nn.Module | None,
                       parent: tuple[nn.Module, str] | None, what: str,
                       refuse: tuple[str, str] | None = None, runtime: str = "onnxruntime") -> dict[str, float]:
    """What the model costs at deployment: the CPU p50 (batch 1, one thread, in ``runtime``,
    ONNX Runtime by default) of its deployed ONNX file (``deployed``; None: its float32 export), of the float32
    baseline's export and of the starting model's deployed file (``parent``: the model
    and its URI), timed side by side in a process of its own. A baseline that is the parent (the same
    model: the parent is the lineage's baseline, or stands in for it) is timed once, as the
    parent, and both figures are that one time. Says in one line (a
    :class:`DeploymentWarning`) when the model deploys slower than its starting model;
    with ``refuse`` (a prefix and a hint) raises that line as an :class:`McpError`
    instead, for a model whose only purpose was speed. Within :func:`timed_by_the_benchmark`
    it times nothing and returns no figures, unless ``refuse`` asks for a decision or the
    model deploys in another runtime than ONNX Runtime."""
    if _TIMED_LATER.get() and refuse is None and runtime == "onnxruntime":
        return {}
    seconds = timing_seconds()
    same = baseline is not None and parent is not None and baseline is parent[0]  # one model, timed once
    with tempfile.TemporaryDirectory() as tmp:
        paths = [deployed or export_onnx(model, shape, Path(tmp) / "model.onnx")]
        if baseline is not None and not same:
            paths.append(export_onnx(baseline, shape, Path(tmp) / "baseline.onnx"))
        if parent is not None:
            found = deployable_of(parent[1], Path(tmp)) if parent[1] else None
            paths.append(found[0] if found else export_onnx(parent[0], shape, Path(tmp) / "parent.onnx"))
        times = ort_bench.compare([str(p) for p in paths], tuple(shape), 1, seconds, runtimes=[runtime] * len(paths))
    return _figures(times[0], (times[-1] if same else times[1]) if baseline is not None else None,
                    times[-1] if parent is not None else None, what, refuse, runtime)


def _figures(own: float, base: float | None, parent: float | None, what: str,
             refuse: tuple[str, str] | None = None, runtime: str = "onnxruntime") -> dict[str, float]:
    """The deployment figures (:data:`DEPLOY_KEYS`) of a model timed at ``own`` ms beside
    its baseline's and its starting model's times (None: not compared); says (or with
    ``refuse`` raises) that it deploys slower than its starting model."""
    figures = {"latency_ms_p50_cpu": own}
    if base is not None:
        figures.update(baseline_latency_ms_p50_cpu=base, speedup_p50_cpu_vs_baseline=base / own)
    if parent is not None:
        figures.update(parent_latency_ms_p50_cpu=parent, speedup_p50_cpu_vs_parent=parent / own)
        if own > (1 + SLOWER_MARGIN) * parent:
            line = (f"{what} deploys slower than the model it started from: {own:.3f} ms against "
                    f"{parent:.3f} ms in {'ONNX Runtime' if runtime == 'onnxruntime' else runtime} (CPU p50, "
                    f"batch 1, one thread)")
            if refuse:
                raise McpError(f"{refuse[0]}: {line}; {refuse[1]}")
            warnings.warn(line, DeploymentWarning, stacklevel=3)
    return figures


def log_deployment_figures(rows: Sequence[Mapping[str, Any]], parents: Mapping[str, str], baseline: str,
                           what: Mapping[str, str]) -> None:
    """Give each benchmarked model's stage run (and its registered version, as tags) the
    deployment figures it did not time itself within :func:`timed_by_the_benchmark`:
    its p50 from the benchmark's ``rows`` (batch 1, one thread, ONNX Runtime), beside the
    baseline's (``baseline``: its URI) and its starting model's (``parents``: URI -> URI);
    a model with none of them logged already. ``what``: how a warning names each model."""
    by_uri = {r["uri"]: r for r in rows}
    for row in rows:
        run_id = tracking.models.source_run_id(row["uri"])
        if not run_id or "latency_ms_p50_cpu" in tracking.runs.run_metrics(run_id):
            continue
        parent = by_uri.get(parents.get(row["uri"], ""))
        base = by_uri.get(baseline) if parent is not None else None
        figures = _figures(row["latency_ms_p50_cpu"], base["latency_ms_p50_cpu"] if base else None,
                           parent["latency_ms_p50_cpu"] if parent else None, what.get(row["uri"], row["label"]))
        tracking.runs.log_run_metrics(run_id, figures)
        tracking.models.set_version_tags(row["uri"], {k: f"{v:.6g}" for k, v in figures.items()})


def reference_uri(ref: str, dataset: str) -> str:
    """The URI a model reference means: a model name is ``models:/<model>-<dataset>@baseline``,
    ``<name>@<alias>`` is ``models:/<name>@<alias>``, a URI is itself."""
    if ref in model_names():
        return schema.alias_uri(schema.registered_name(ref, dataset), schema.BASELINE)
    return ref if ref.startswith(URI_SCHEMES) else schema.MODELS_SCHEME + ref


def resolve_model_ref(ref: str, dataset: str, splits,
                      trust_pickled: bool = False) -> tuple[nn.Module | None, str, str]:
    """Load the model ``ref`` names (see :func:`mcp.config.check_model_ref`) and check it
    fits the dataset. Returns (model, URI, architecture name); the model is None when
    ``ref`` is a model name whose ``<model>-<dataset>@baseline`` is still to be trained."""
    uri = reference_uri(ref, dataset)
    if ref in model_names() and not tracking.alias_exists(tracking.registered_name(ref, dataset), "baseline"):
        return None, uri, ref
    loaded = tracking.load_model(uri, trust_pickled=trust_pickled)
    uri = tracking.models.pin_version(uri)
    recipe = loaded.mcp_recipe
    if tuple(recipe["input_shape"]) != tuple(splits.input_shape) or recipe["num_classes"] != splits.num_classes:
        raise McpError(f"model {uri!r} expects input {recipe['input_shape']} and {recipe['num_classes']} classes; "
                       f"dataset {dataset!r} gives {list(splits.input_shape)} and {splits.num_classes}")
    warn_other_test_set(uri, recipe, splits)
    return loaded, uri, recipe["name"]


class TestSetWarning(UserWarning):
    """A model compared with figures measured on another test set than the one it was made with."""


def other_test_set(recipe: Mapping[str, Any], splits) -> str:
    """'' when the model ``recipe`` describes was made with ``splits``' test set (or does
    not say), else a clause saying which test set it was made with."""
    made = (recipe.get("data") or {}).get("test_fingerprint")
    if not made or made == splits.test_fingerprint:
        return ""
    size = (recipe.get("data") or {}).get("test_size")
    return (f"it was made with test set {made}" + (f" ({size:,} images)" if isinstance(size, int) else "")
            + f", this run tests on {splits.test_fingerprint} ({len(splits.test):,} images)")


def warn_other_test_set(uri: str, recipe: Mapping[str, Any], splits) -> None:
    """One warning line when a model is measured on another test set than its own: its
    training may have seen these test images, and figures against it compare different
    images."""
    clause = other_test_set(recipe, splits)
    if clause:
        warnings.warn(f"{uri}: {clause}; its figures here are on other images than its own, and its training may "
                      f"have seen some of them (give the model's own data settings, or none, to use its test set)",
                      TestSetWarning, stacklevel=2)


def study_storage(storage: str) -> str:
    """``--storage``, or when empty the study's place beside the tracking store
    (:func:`mcp.tuner.study.default_storage`)."""
    if storage:
        return storage

    return default_storage(tracking.runs.tracking_uri())


def find_base_model(model: str, model_uri: str, dataset: str, splits,
                    trust_pickled: bool = False) -> tuple[nn.Module | None, str]:
    """The model a compression stage starts from: ``model_uri``, else the registered
    ``<model>-<dataset>@baseline``. (None, its URI) when no baseline exists yet."""
    loaded, uri, _ = resolve_model_ref(model_uri or model, dataset, splits, trust_pickled)
    return loaded, uri


def probe_model(base: nn.Module | None, model: str, splits) -> nn.Module:
    """A copy of the starting model (or, when its baseline is still to be trained, a fresh
    one of the same architecture) to check a stage's settings on before any run starts."""
    return copy.deepcopy(base) if base is not None else create_model(model, splits.num_classes, splits.input_shape)


def recovery_teacher(cfg: RecoveryOptions, base: nn.Module | None, base_uri: str,
                     splits) -> tuple[nn.Module | None, str]:
    """The teacher of distillation-as-recovery: (model or None, its URI); ("", None) when
    ``distill_from`` is empty. 'parent' is the model the stage starts from (``base``),
    None while that baseline is still to be trained."""
    if not cfg.distill_from:
        return None, ""
    if cfg.distill_from == PARENT:
        return base, base_uri
    teacher, uri, _ = resolve_model_ref(cfg.distill_from, cfg.dataset, splits, cfg.trust_pickled_model)
    if teacher is None:
        raise McpError(f"distill_from={cfg.distill_from!r}: {uri} does not exist; train it first "
                       f"(mcp train --model {cfg.distill_from} --dataset {cfg.dataset})")
    return teacher, uri


def recovery_loss(cfg: RecoveryOptions, teacher: nn.Module | None, device: str):
    """The Trainer's ``batch_loss`` for distillation-as-recovery (None: plain CE)."""
    if teacher is None:
        return None

    return Distiller(teacher, DistillSpec(cfg.distill_temperature, cfg.distill_alpha)).to(device)


def deployable_of(uri: str, tmp: Path) -> tuple[Path, str] | None:
    """The deployable ONNX file (and its format) the stage that made ``uri`` built and
    logged, for a quantized model; None for a float model (the export builds its file)."""
    (tmp / "deployed").mkdir(parents=True, exist_ok=True)
    path, fmt = tracking.models.deployable_onnx(uri, tmp / "deployed")
    return (path, fmt) if path is not None else None


def lineage(base: nn.Module | None, base_uri: str, model: str, dataset: str) -> tuple[str, str]:
    """(architecture name, registered name) of what a stage makes from its starting model:
    a new version of the registered model ``base_uri`` belongs to, else of
    ``<architecture>-<dataset>``. An imported model keeps its own name; a baseline still
    to be trained is the zoo ``model``'s."""
    arch = str(base.mcp_recipe.get("name", model)) if base is not None else model
    return arch, schema.registered_name_of(base_uri) or schema.registered_name(arch, dataset)


def finetune_of(cfg: Any) -> FineTune:
    """The fine-tuning settings of a stage config that trains (epochs, optimizer, LR, ...)."""
    return FineTune(epochs=cfg.epochs, optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                    weight_decay=cfg.weight_decay, scheduler=cfg.scheduler, seed=cfg.seed)


# --- Figures against the parent and against the baseline -------------------------------------------

FIGURES = ("compression_ratio", "compression_ratio_vs_baseline", "accuracy_drop", "accuracy_drop_vs_baseline")


@dataclass(frozen=True)
class Baseline:
    """The baseline a stage's ``*_vs_baseline`` figures compare with: the version its
    lineage starts from (see :func:`mcp.tracking.models.lineage_root`), measured on the
    stage's own test split. When the lineage has none, the parent stands in and
    ``fallback`` says why."""

    uri: str
    parent_uri: str
    test_accuracy: float
    size_bytes_fp32: float
    params_total: float
    fallback: str = ""
    model: nn.Module | None = field(default=None, compare=False, repr=False)  # to time its float32 export

    @property
    def is_parent(self) -> bool:
        return self.uri == self.parent_uri

    def figures(self, accuracy: float, size: float, by_params: bool = False) -> dict[str, float]:
        """Metrics against this baseline for a model of ``accuracy`` and ``size`` (the
        same accuracy and the same size the stage's ``accuracy_drop`` and
        ``compression_ratio`` use: non-zero parameters with ``by_params``, else bytes)."""
        reference = self.params_total if by_params else self.size_bytes_fp32
        return {"baseline_test_accuracy": self.test_accuracy, "baseline_size_bytes_fp32": self.size_bytes_fp32,
                "accuracy_drop_vs_baseline": self.test_accuracy - accuracy,
                "compression_ratio_vs_baseline": reference / max(float(size), 1.0)}

    def run_tags(self) -> dict[str, str]:
        return {schema.BASELINE_MODEL: self.uri, **({schema.BASELINE_FALLBACK: self.fallback} if self.fallback else {})}

    def version_tags(self, metrics: Mapping[str, float], keys: tuple[str, ...] = FIGURES) -> dict[str, str]:
        """Short-key version tags: the baseline's URI, why the parent stands in (if it
        does), and the figures against both."""
        return {schema.BASELINE_MODEL_KEY: self.uri,
                **({schema.BASELINE_FALLBACK_KEY: self.fallback} if self.fallback else {}),
                **{k: f"{metrics[k]:.6g}" for k in keys if k in metrics}}


def lineage_baseline(parent: nn.Module, parent_uri: str, test_loader, device: str,
                     parent_accuracy: float | None = None, trust_pickled: bool = False) -> Baseline:
    """The :class:`Baseline` of what a stage makes from ``parent`` (loaded from
    ``parent_uri``): the lineage's baseline, loaded and tested on ``test_loader``, or the
    parent itself (``parent_accuracy`` saves testing it again) when it is the baseline or
    when the lineage has none (a ``runs:/`` URI of a foreign run, say): then ``fallback``
    says why, and the run and the version carry it as a tag."""
    def measured(model: nn.Module, uri: str, accuracy: float | None, fallback: str = "") -> Baseline:
        if accuracy is None:
            accuracy = evaluate(model.to(device), test_loader, device)["accuracy"]
        return Baseline(uri, parent_uri, float(accuracy), float(size_bytes_fp32(model)),
                        float(count_params(model)["params_total"]), fallback, model)

    def parent_instead(why: str) -> Baseline:
        return measured(parent, parent_uri, parent_accuracy,
                        f"no registered baseline in the lineage of {parent_uri or 'the model'} ({why}): "
                        f"the figures vs baseline are vs the parent")

    if not parent_uri:
        return parent_instead("it has no URI")
    root, why = tracking.models.lineage_root(parent_uri)
    if root is None:
        return parent_instead(why)
    if root == parent_uri:
        return measured(parent, parent_uri, parent_accuracy)
    try:
        model = tracking.load_model(root, trust_pickled=trust_pickled)
    except McpError as exc:
        return parent_instead(f"{root} does not load: {exc}")
    recipe, mine = getattr(model, "mcp_recipe", {}), getattr(parent, "mcp_recipe", {})
    if (list(recipe.get("input_shape", [])), recipe.get("num_classes")) != (
            list(mine.get("input_shape", [])), mine.get("num_classes")):
        return parent_instead(f"{root} takes other inputs or classes")
    return measured(model, root, None)


def tag_baseline(ref: Baseline) -> None:
    """Tag the active run with the baseline its figures compare with (and any fallback)."""
    for key, value in ref.run_tags().items():
        tracking.runs.set_tag(key, value)


def figures_line(metrics: Mapping[str, float], ref: Baseline | None, parent: str = "parent",
                 ratio: str = "compression_ratio", drop: str = "accuracy_drop") -> str:
    """'14.2x vs baseline, 3.6x vs parent; accuracy drop 0.59 points vs baseline, 0.20 vs
    parent', the same figure once when the parent is the baseline, and the parent's alone
    (saying so) when the lineage has no baseline."""
    r, d = metrics[ratio], 100 * metrics[drop]
    if ref is None or ref.fallback:
        why = " (no baseline in its lineage: see tag mcp.baseline_fallback)" if ref is not None else ""
        return f"{r:.1f}x vs {parent}; accuracy drop {d:.2f} points vs {parent}{why}"
    if ref.is_parent:
        return f"{r:.1f}x vs baseline (the {parent}); accuracy drop {d:.2f} points vs baseline (the {parent})"
    rb, db = metrics[f"{ratio}_vs_baseline"], 100 * metrics[f"{drop}_vs_baseline"]
    return f"{rb:.1f}x vs baseline, {r:.1f}x vs {parent}; accuracy drop {db:.2f} points vs baseline, {d:.2f} vs {parent}"
