"""The public Python API: each operation on an ``nn.Module`` and data, returning the
compressed model and its measurements. These are the same core functions the CLI stages
(and so the MLproject entry points) call; the stages add only tracking and registration.

``data`` is either ``(train, val, test)`` DataLoaders (the input shape is read from the
first batch) or a dataset name of :mod:`mcp.data` (``"digits"``, ``"synthetic"``, ...),
loaded with its seeded splits.

    import mcp
    pruned = mcp.prune(model, (train, val, test), sparsity=0.5, granularity="structured",
                       schedule="gradual", epochs=10)
    quantized = mcp.quantize(pruned.model, (train, val, test), method="qat", bits=4, epochs=5)
    print(quantized.metrics["test_accuracy"], quantized.metrics["size_bytes_compressed"])
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import optuna
import torch
from torch import nn

from mcp import tracking
from mcp.config import SearchConfig
from mcp.data import DataSplits, load_dataset, make_loaders
from mcp.deploy.deployable import ParityRules, export_deployable
from mcp.deploy.runtimes import check_choice
from mcp.stages.common import timing_seconds
from mcp.distillation import Distiller, DistillSpec
from mcp.distillation.train import distill_model
from mcp.errors import ConfigError
from mcp.evaluation.metrics import model_metrics
from mcp.pruning import PruneSpec
from mcp.pruning.finetune import prune_and_finetune
from mcp.quantization import QuantSpec
from mcp.quantization.methods import quant_method
from mcp.quantization.quantize import quantize_model
from mcp.tracking import schema
from mcp.training import FineTune, evaluate, resolve_device
from mcp.tuner.objective import SearchProblem, SearchWarning, rebuild
from mcp.tuner.space import resolve_space
from mcp.tuner.study import check_search, forget_storage, open_study
from mcp.tuner.worker import Plan, Quiet, working


@dataclass
class Data:
    """Loaders, input shape and class count of the data an operation runs on."""

    loaders: tuple[Any, Any, Any]
    input_shape: tuple[int, ...]
    num_classes: int | None = None

    def classes_of(self, model: nn.Module) -> int:
        """The class count: the data's, else the model's output width."""
        if self.num_classes:
            return int(self.num_classes)
        param = next(model.parameters(), None)
        with torch.no_grad():
            was = model.training
            model.eval()
            out = model(torch.zeros(2, *self.input_shape, device=param.device if param is not None else "cpu"))
            model.train(was)
        return int(out.shape[-1])


def as_data(data: Any, *, batch_size: int = 32, seed: int = 0, input_shape: str = "", data_dir: str = "data",
            device: str = "cpu", augment: str = "auto", split_file: str = "") -> Data:
    """``(train, val, test)`` DataLoaders, a :class:`Data`, a :class:`mcp.data.DataSplits`
    (from :func:`mcp.data.load_dataset`), or a dataset name (loaded with ``data_dir``,
    ``input_shape``, ``augment`` and ``split_file``, see :mod:`mcp.data.split`)."""
    if isinstance(data, Data):
        return data

    if isinstance(data, str):
        data = load_dataset(data, data_dir, False, input_shape or None, 0, 0.1, augment, split_file)
    if isinstance(data, DataSplits):
        loaders = make_loaders(data, batch_size, 0, seed, pin_memory=device == "cuda")
        return Data(tuple(loaders), tuple(data.input_shape), data.num_classes)
    if isinstance(data, Sequence) and len(data) == 3:
        x, _ = next(iter(data[0]))
        return Data(tuple(data), tuple(x.shape[1:]))
    raise ConfigError(f"data={type(data).__name__} is not allowed; give (train, val, test) DataLoaders, "
                      f"load_dataset's splits or a dataset name")


def _params(values: Mapping[str, Any]) -> dict[str, Any]:
    """The call's settings as run params (plain values only; models and data are not params)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()
            if k not in ("model", "data", "teacher", "student", "track", "progress")
            and isinstance(v, (str, int, float, bool, tuple, list, dict, type(None)))}


def _tracked(stage: str, params: Mapping[str, Any], model: nn.Module, track: bool, call, data: "Data"):
    """Run ``call(callbacks)``; with ``track``, as an MLflow run (nested in the active run,
    when there is one) that logs the settings, per-epoch curves, the measurements and the
    resulting model (see :func:`load`), and ends FAILED or KILLED when the call fails or
    is interrupted."""
    if not track:
        return call([])

    arch = str((getattr(model, "mcp_recipe", None) or {}).get("name") or type(model).__name__)
    with tracking.stage_run(stage, dict(params), {schema.MODEL: arch, schema.API: "true"},
                            run_name=f"{stage}-{arch}") as run:
        outcome = call([tracking.EpochLogger()])
        tracking.log_metrics(outcome.metrics)
        result = getattr(outcome, "model", None) or outcome.student
        outcome.model_uri = tracking.models.log_weights(result, data.input_shape, data.classes_of(result))
        outcome.run_id = run.info.run_id
    return outcome


def load(source: str, model: nn.Module | None = None, *, device: str = "cpu") -> nn.Module:
    """The model an ``mcp`` call or stage made, rebuilt in this process (in eval mode), with
    the outputs it had: ``source`` is the ``model_uri`` or ``run_id`` of a tracked API call
    (``mcp.prune(...).model_uri``), a registered version (``models:/<name>/<version>`` or
    ``models:/<name>@<alias>``) or a ``runs:/`` URI. Nothing is unpickled: the architecture
    comes from the recipe logged beside the weights. A model of your own class needs
    ``model``, an instance built as you built the original (``mcp.load(uri, model=MyNet())``):
    ``mcp`` applies the channels and blocks pruning removed to a copy of it, then loads the
    weights."""
    return tracking.models.load_api(source, model, device)


def _device(device: str) -> str:
    return resolve_device(device)


def _finetune(epochs: int, lr: float, optimizer: str, momentum: float, weight_decay: float, scheduler: str,
              seed: int):
    return FineTune(epochs=epochs, optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
                    scheduler=scheduler, seed=seed)


def _step_logger(track: bool):
    """Each pruning step's measurements, logged with ``step=k`` on the call's run."""
    if not track:
        return None

    return lambda k, values: tracking.log_metrics(values, step=k)


def _teacher_loss(teacher: nn.Module | None, device: str, temperature: float, alpha: float):
    if teacher is None:
        return None

    return Distiller(teacher, DistillSpec(temperature, alpha)).to(device)


def prune(model: nn.Module, data: Any, *, sparsity: float = 0.5, criterion: str = "magnitude",
          scope: str = "global", granularity: str = "unstructured", schedule: str = "one_shot",
          steps: int = 10, initial_sparsity: float = 0.0, prune_epochs: int | None = None,
          ratios: Mapping[str, float] | None = None, ignored_layers: Sequence[str] = (), keep_first: bool = False,
          keep_last: bool = False, norm: int = 1, hessian: str = "fisher", round_to: int = 1, drop_blocks: int = 0,
          head_ratio: float = 0.0, calib_batches: int = 8, bn_l1: float = 0.0, epochs: int = 10, lr: float = 0.01, optimizer: str = "sgd", momentum: float = 0.9,
          weight_decay: float = 5e-4, scheduler: str = "cosine", teacher: nn.Module | None = None,
          temperature: float = 4.0, alpha: float = 0.9, seed: int = 0, device: str = "auto",
          progress: bool | None = False, track: bool = True):
    """Prune a copy of ``model`` on a schedule while fine-tuning it (``mcp prune``).
    Returns :class:`mcp.pruning.finetune.PruneOutcome` (``.model``, ``.metrics``, ``.run_id``).
    With ``track``, the call is an MLflow run (see :func:`_tracked`)."""
    params = _params(locals())

    dev = _device(device)
    d = as_data(data, seed=seed, device=dev)
    spec = PruneSpec(criterion=criterion, scope=scope, granularity=granularity, schedule=schedule,
                     sparsity=sparsity, initial_sparsity=initial_sparsity, steps=steps, ratios=dict(ratios or {}),
                     keep_first=keep_first, keep_last=keep_last, ignored_layers=tuple(ignored_layers), norm=norm,
                     hessian=hessian, round_to=round_to, drop_blocks=drop_blocks, head_ratio=head_ratio)
    span = prune_epochs if prune_epochs is not None else max(1, epochs // 2)
    return _tracked("prune", params, model, track, lambda callbacks: prune_and_finetune(
        model, d.loaders, d.input_shape, spec, _finetune(epochs, lr, optimizer, momentum, weight_decay, scheduler, seed),
        prune_epochs=span, calib_batches=calib_batches, bn_l1=bn_l1, device=dev,
        batch_loss=_teacher_loss(teacher, dev, temperature, alpha), callbacks=callbacks,
        on_step=_step_logger(track), progress=progress), d)


def quantize(model: nn.Module, data: Any, *, method: str = "ptq_int8", bits: int = 0,
             layer_bits: Mapping[str, int] | None = None, act_bits: int = 0, symmetric: bool = True,
             per_channel: bool = True, observer: str = "minmax", kmeans_init: str = "linear",
             share_biases: bool | str = "auto", reduce_range: bool = True, ignored_layers: Sequence[str] = (),
             precision: str = "int8", calib_batches: int = 16, epochs: int = 10, lr: float = 0.005, optimizer: str = "sgd",
             momentum: float = 0.9, weight_decay: float = 0.0, scheduler: str = "cosine",
             teacher: nn.Module | None = None, temperature: float = 4.0, alpha: float = 0.9, opset: int = 17,
             out_dir: str | Path | None = None, seed: int = 0, device: str = "auto", progress: bool | None = False,
             track: bool = True, runtime: str = "onnxruntime"):
    """Quantize a copy of ``model`` by a registered method (``mcp quantize``): encoded for
    its honest size and built into its deployable ONNX file (in ``out_dir``, a temporary
    folder by default). Returns :class:`mcp.quantization.quantize.QuantizeOutcome`.
    ``precision="speed"`` puts INT8 in the layers that ``runtime`` runs faster (``auto``:
    a file for each installed runtime, the fastest kept; ``outcome.runtime`` names it).
    ``deep_compression`` prunes in the prune stage first: call :func:`prune`, then
    ``quantize(..., method="huffman")``. With ``track``, the call is an MLflow run."""
    params = _params(locals())

    if quant_method(method).prunes_first:
        raise ConfigError(f"method={method!r} prunes first; call mcp.prune, then mcp.quantize(method='huffman')")
    check_choice("runtime", runtime)
    dev = _device(device)
    d = as_data(data, seed=seed, device=dev)
    spec = QuantSpec(method=method, bits=bits, layer_bits=dict(layer_bits or {}), act_bits=act_bits,
                     symmetric=symmetric, per_channel=per_channel, observer=observer, kmeans_init=kmeans_init,
                     ignored_layers=tuple(ignored_layers), share_biases=share_biases, reduce_range=reduce_range,
                     precision=precision, seed=seed)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="mcp-quantize-"))
    return _tracked("quantize", params, model, track, lambda callbacks: quantize_model(
        model, d.loaders, d.input_shape, spec, out, _finetune(epochs, lr, optimizer, momentum, weight_decay, scheduler,
                                                              seed),
        calib_batches=calib_batches, opset=opset, device=dev, batch_loss=_teacher_loss(teacher, dev, temperature, alpha),
        callbacks=callbacks, progress=progress, runtime=runtime), d)


def distill(teacher: nn.Module, student: nn.Module, data: Any, *, temperature: float = 4.0, alpha: float = 0.9,
            hint_layers: str = "", hint_weight: float = 1.0, label_smoothing: float = 0.0, epochs: int = 20,
            lr: float = 0.05, optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 5e-4,
            scheduler: str = "cosine", seed: int = 0, device: str = "auto", progress: bool | None = False,
            track: bool = True):
    """Train ``student`` (in place) on ``teacher``'s softened outputs (``mcp distill``).
    Returns :class:`mcp.distillation.train.DistillOutcome`. With ``track``, the call is an
    MLflow run."""
    params = _params(locals())

    dev = _device(device)
    d = as_data(data, seed=seed, device=dev)
    return _tracked("distill", params, student, track, lambda callbacks: distill_model(
        teacher, student, d.loaders, d.input_shape, DistillSpec(temperature, alpha, hint_layers, hint_weight,
                                                                label_smoothing),
        _finetune(epochs, lr, optimizer, momentum, weight_decay, scheduler, seed), device=dev, callbacks=callbacks,
        progress=progress), d)


def export(model: nn.Module, data: Any, path: str | Path, *, opset: int = 17, optimize: bool = True,
           atol: float = 1e-3, min_agreement: float = 0.99, max_accuracy_drop: float = 0.005,
           lossy_min_agreement: float = 0.95, parity_samples: int = 256, runtime: str = "onnxruntime", seed: int = 0):
    """Export ``model`` to the ONNX file ``path``, run ONNX's checker and the parity check
    against PyTorch in ``runtime`` (failing loudly; ``auto``: the fastest installed runtime
    that passes, see :mod:`mcp.deploy.runtimes`), and measure it (``mcp export``). A model from
    :func:`quantize` is deployed as its ``onnx_path`` already: give ``deployed=`` to
    :func:`mcp.deploy.deployable.export_deployable` for those. Returns
    :class:`mcp.deploy.deployable.Deployment` (its ``path`` is ``path``)."""
    check_choice("runtime", runtime)
    d = as_data(data, seed=seed)
    target = Path(path)
    rules = ParityRules(atol, min_agreement, max_accuracy_drop, lossy_min_agreement)
    with tempfile.TemporaryDirectory() as tmp:
        done = export_deployable(model.cpu().eval(), d.input_shape, d.loaders[0], d.loaders[2], Path(tmp),
                                 opset=opset, optimize=optimize, rules=rules, parity_samples=parity_samples,
                                 what=str(target), runtime=runtime, timing_s=timing_seconds())
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(done.path, target)
    done.path = target
    return done


def measure(model: nn.Module, data: Any, *, device: str = "auto", seed: int = 0) -> dict[str, float]:
    """The glossary metrics of a model: test accuracy and loss, params, sparsity, MACs,
    float32 size, CPU (and GPU) latency and throughput."""
    dev = _device(device)
    d = as_data(data, seed=seed, device=dev)
    test = evaluate(model.to(dev), d.loaders[2], dev)
    return {"test_accuracy": test["accuracy"], "test_loss": test["loss"], **model_metrics(model, d.input_shape, dev)}


@dataclass
class SearchOutcome:
    """What :func:`search` found: the study, its trials (rows of
    :func:`mcp.tuner.objective.trial_table`) and the winner rebuilt and fine-tuned (None
    when no trial was feasible; in pareto mode the most accurate of the front, the front
    itself in ``front``)."""

    study: Any  # optuna.Study
    trials: list[dict[str, Any]]
    winner: Any = None  # mcp.tuner.objective.Rebuilt: .model, .config, .metrics, .number
    front: list[dict[str, Any]] | None = None  # pareto: the feasible non-dominated trials

    @property
    def model(self) -> nn.Module | None:
        return self.winner.model if self.winner is not None else None

    @property
    def metrics(self) -> dict[str, float]:
        return self.winner.metrics if self.winner is not None else {}


def search(model: nn.Module, data: Any, *, space: str | Path = "", budget_bytes: float | None = None,
           budget_on: str = "compressed", trials: int = 20, pareto: bool = False, latency: bool = False,
           fill_budget: bool = True, distill: bool = False, calib_batches: int = 8, sampler: str = "tpe",
           final_epochs: int = 0, final_prune_epochs: int = 0, storage: str | None = None, study_name: str | None = None, heartbeat: float = 30.0,
           deployable: str = "any", seed: int = 0, device: str = "auto",
           progress: bool | None = False) -> SearchOutcome:
    """An Optuna study over per-layer prune ratios and bit-widths of ``model`` from a search
    space under ``budget_bytes`` (untracked), run by the same worker as ``mcp search``:
    ``trials`` is the study's total, shared by every call (in any process, on any machine)
    that names the same ``storage`` (an SQLAlchemy URL) and ``study_name``; without
    ``storage`` the study lives in a temporary file for this call. ``space``: a shipped
    space's name (``"default"``, ``"structured"``, ``"lenet"``, ``"resnet"``,
    ``"resnet_latency"``, ``"transformer"``) or a path to a YAML file; empty: the model family's space.
    Returns a :class:`SearchOutcome`: the study, its trials, and the best feasible trial
    rebuilt from ``model`` and fine-tuned for ``final_epochs`` (0: its trial's epochs; pruned
    again over ``final_prune_epochs`` where its trial pruned gradually), ``.model`` and
    ``.metrics``. ``deployable="int8"`` keeps the search to uniform grids
    (INT8 in ONNX Runtime) where the space also offers k-means codebooks. ``progress``: one
    line per trial (None: a bar on a terminal, lines elsewhere; False: quiet)."""
    if not pareto and not budget_bytes:
        raise ConfigError(f"budget_bytes={budget_bytes!r}: a max-accuracy search needs a size budget in bytes "
                          f"(or pareto=True for the accuracy/size front)")
    dev = _device(device)
    d = as_data(data, seed=seed, device=dev)
    arch = str((getattr(model, "mcp_recipe", None) or {}).get("name") or type(model).__name__)
    path = resolve_space(space, arch)
    scratch = None if storage else tempfile.mkdtemp(prefix="mcp-search-")
    url = storage or f"sqlite:///{scratch}/study.db"
    cfg = SearchConfig(space=str(path), mode="pareto" if pareto else "max-accuracy", budget_on=budget_on,
                       budget_mb=(budget_bytes or 0) / 1e6, budget_ratio=0.0, latency=latency, trials=trials,
                       sampler=sampler, storage=url, heartbeat=heartbeat, fill_budget=fill_budget, distill=distill,
                       final_epochs=final_epochs, final_prune_epochs=final_prune_epochs, calib_batches=calib_batches, seed=seed, deployable=deployable,
                       study_name=study_name or f"{arch}-{'pareto' if pareto else 'max-accuracy'}")
    try:
        checked = check_search(cfg, SimpleNamespace(input_shape=d.input_shape, num_classes=d.classes_of(model)),
                               d.loaders, model)
        study = open_study(cfg, checked)
        problem = SearchProblem.of(cfg, checked, model.to(dev), d.input_shape, d.loaders, dev)

        def say(line: str) -> None:
            if line.startswith("warning: "):
                warnings.warn(line.removeprefix("warning: "), SearchWarning, stacklevel=4)
            elif progress is not False:
                print(line, file=sys.stderr, flush=True)

        quiet = Quiet(say)
        with working(problem, Plan.of(cfg), study, quiet, progress) as worker:
            rows, winners, _ = worker.run()
            front = worker.chosen(rows) if pareto else None
        best = winners[0]["trial"] if winners else None
        winner = quiet.models.get(best) if best is not None else None
        if best is not None and winner is None:  # another worker rebuilt it: this call rebuilds it too
            winner = rebuild(problem, next(t for t in rows if t["number"] == best), final_epochs, final_prune_epochs)
        if scratch is not None:  # the study outlives its temporary file, in memory
            memory = optuna.storages.InMemoryStorage()
            optuna.copy_study(from_study_name=cfg.name(), from_storage=url, to_storage=memory)
            study = optuna.load_study(study_name=cfg.name(), storage=memory)
    finally:
        if scratch is not None:
            forget_storage(url)
            shutil.rmtree(scratch, ignore_errors=True)
    return SearchOutcome(study, rows, winner, front)
