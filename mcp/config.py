"""Typed, frozen stage configs.

Each stage owns one dataclass. Its fields are the single source of truth for the
CLI options (``mcp.cli`` builds click options from them), for config files
(``--config FILE``, same keys) and for the params logged on every MLflow run.
Validation raises :class:`mcp.errors.ConfigError` (a ``ValueError``) that names the
bad value and what is allowed.

The CLI builds its options from this module before anything else loads, so it imports only
light modules at its top (the names of augmentations, quantization methods, observers);
the checks that need the model, dataset or distillation registries import them when they
run, because those load torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mcp.data.augment import AUGMENTATIONS
from mcp.errors import ConfigError
from mcp.quantization.methods import quant_method, quant_method_names
from mcp.quantization.names import KMEANS_INITS, OBSERVERS

DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "step", "constant")


def option(default: Any, help: str, choices: tuple[str, ...] | None = None, flag_value: str | None = None) -> Any:
    """A config field with the metadata the CLI needs (help text, allowed choices, and
    the value a string option takes when given without one)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag_value": flag_value})


def _coerce(name: str, kind: type, value: Any) -> Any:
    """Coerce a value from a config file or the CLI to the field's type, or fail clearly."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{name}={value!r} is not a boolean; use true or false")
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{name}={value!r} is not an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r} is not an integer") from None
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r} is not a number") from None
    if value is None:
        return ""
    return str(value)


_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


@dataclass(frozen=True)
class StageConfig:
    """Base class: construction from mappings, unknown-key errors, choice checks."""

    @classmethod
    def field_types(cls) -> dict[str, type]:
        return {f.name: _TYPES[f.type] if isinstance(f.type, str) else f.type
                for f in dataclasses.fields(cls)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "StageConfig":
        types = cls.field_types()
        clean: dict[str, Any] = {}
        for raw_key, value in values.items():
            key = str(raw_key).replace("-", "_")
            if key not in types:
                allowed = ", ".join(sorted(types))
                raise ConfigError(f"unknown key {raw_key!r} in {source}; allowed keys: {allowed}")
            clean[key] = _coerce(key, types[key], value)
        return cls(**clean)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"{f.name}={value!r} is not allowed; choose one of: "
                                  f"{', '.join(c for c in choices if c)}")
        self.validate()

    def validate(self) -> None:  # overridden by stages
        pass

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "StageConfig":
        return dataclasses.replace(self, **changes)


def check_drop_blocks(value: Any) -> None:
    """Depth pruning's block count (the prune stage's option and PruneSpec's field)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"drop_blocks={value!r} must be a whole number of blocks, 0 or more")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name}={value!r} must be positive")


def _budget_batch(batch: int, budget_ms: float) -> None:
    if batch < 1 or (batch > 1 and not budget_ms):
        raise ConfigError(f"budget_batch={batch!r} must be 1 or more, and more than 1 only with a latency budget "
                          f"(--budget-ms, got {budget_ms:g})")


def _optimizer_settings(cfg: Any) -> None:
    """The checks every stage that trains shares: lr, momentum, weight decay."""
    _positive("lr", cfg.lr)
    if not 0.0 <= cfg.momentum < 1.0:
        raise ConfigError(f"momentum={cfg.momentum!r} is outside [0, 1)")
    if cfg.weight_decay < 0:
        raise ConfigError(f"weight_decay={cfg.weight_decay!r} must be 0 or more")


def _in_unit_interval(name: str, value: float, low_open: bool = False) -> None:
    ok = (0.0 < value < 1.0) if low_open else (0.0 <= value < 1.0)
    if not ok:
        interval = "(0, 1)" if low_open else "[0, 1)"
        raise ConfigError(f"{name}={value!r} is outside {interval}")


# The data settings a model records and a stage started from it reuses when they are not
# given (empty, or 0), and what they fall back to without a starting model.
DATA_FALLBACKS = {"dataset": "digits", "data_dir": "data", "augment": "auto", "val_fraction": 0.1}
DATA_RECORDED = ("dataset", "data_dir", "input_shape", "augment", "val_fraction", "num_classes", "split_file")


@dataclass(frozen=True)
class DataOptions(StageConfig):
    """Options every stage that touches data shares."""

    dataset: str = option("", "Dataset name (see `mcp datasets`). Empty: the dataset the starting model was "
                              "made on (its recorded data settings), else digits.")
    data_dir: str = option("", "Folder holding downloaded datasets, IDX files or an image folder. Empty: the "
                               "starting model's, else ./data.")
    download: bool = option(False, "Download torchvision datasets into --data-dir (needs a network).")
    input_shape: str = option("", "CxHxW, e.g. 3x32x32: synthetic data shape / imagefolder or digits resize. "
                                  "Empty: the starting model's, else the dataset's own.")
    num_classes: int = option(0, "Classes for synthetic data (0: 10). Ignored for real datasets.")
    augment: str = option("", "Train-time augmentation: random crop (shift) and/or horizontal flip. auto: the "
                              "dataset's own (none for digits, MNIST-like, IDX and grayscale image folders; "
                              "crop_flip for CIFAR and RGB image folders; flip for Fashion-MNIST). Empty: the "
                              "starting model's, else auto.", ("",) + AUGMENTATIONS)
    val_fraction: float = option(0.0, "Share of the training part held out for validation when the data has no "
                                      "val part. 0: the starting model's, else 0.1.")
    split_file: str = option("", "Your own train/val/test split: a JSON or YAML file listing sample indices (or, "
                                 "for an image folder, file paths) per part; `mcp split` writes mcp's own. Empty: "
                                 "the starting model's, else the data's own parts and mcp's seeded hold-out.")
    batch_size: int = option(32, "Mini-batch size.")
    workers: int = option(0, "DataLoader worker processes.")
    seed: int = option(0, "Random seed for weights, shuffling and augmentation.")
    device: str = option("auto", "Where to run: auto picks cuda when available.", DEVICES)
    experiment: str = option("", "MLflow experiment of the run, created when missing. Empty: MLFLOW_EXPERIMENT_NAME "
                                 "(or MLFLOW_EXPERIMENT_ID) when set, else the registered model's name, "
                                 "<model>-<dataset>. Under `mlflow run`, its --experiment-name chooses.")

    def validate(self) -> None:
        from mcp.data import dataset_names

        for name, unset in DATA_FALLBACKS.items():  # not given, and no starting model recorded it
            if getattr(self, name) in ("", 0):
                object.__setattr__(self, name, unset)
        if self.dataset not in dataset_names():
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of: {', '.join(dataset_names())}")
        _positive("batch_size", self.batch_size)
        _in_unit_interval("val_fraction", self.val_fraction, low_open=True)
        if self.workers < 0:
            raise ConfigError(f"workers={self.workers!r} must be 0 or more")
        if self.num_classes < 0 or self.num_classes == 1:
            raise ConfigError(f"num_classes={self.num_classes!r} must be 0 (default) or at least 2")
        if self.input_shape:
            from mcp.data import parse_shape

            parse_shape(self.input_shape)
        super().validate()


@dataclass(frozen=True)
class TrainConfig(DataOptions):
    """`mcp train`: train a dense baseline and register it."""

    model: str = option("lenet300_100", "Model name (see `mcp models`).")
    epochs: int = option(60, "Training epochs.")
    optimizer: str = option("sgd", "Optimizer.", OPTIMIZERS)
    lr: float = option(0.05, "Peak learning rate.")
    momentum: float = option(0.9, "SGD momentum.")
    nesterov: bool = option(True, "Nesterov momentum (SGD).")
    weight_decay: float = option(5e-4, "Weight decay (decoupled for AdamW).")
    scheduler: str = option("cosine", "Learning-rate schedule over epochs.", SCHEDULERS)
    step_size: int = option(10, "Epochs between LR drops (step schedule).")
    gamma: float = option(0.1, "LR multiplier at each drop (step schedule).")
    label_smoothing: float = option(0.0, "Label smoothing of the cross-entropy loss.")
    patience: int = option(0, "Early stopping: epochs without val-accuracy gain (0: off).")
    checkpoint_dir: str = option("checkpoints", "Where the per-epoch checkpoint is written.")
    resume: str = option("", "Checkpoint file to resume from (its settings are the defaults).")
    register: bool = option(True, "Register the model as <model>-<dataset> with alias 'baseline'.")

    def validate(self) -> None:
        super().validate()
        from mcp.models import model_names

        if self.model not in model_names():
            raise ConfigError(f"unknown model {self.model!r}; choose one of: {', '.join(model_names())}")
        _positive("epochs", self.epochs)
        _optimizer_settings(self)
        _positive("step_size", self.step_size)
        _positive("gamma", self.gamma)
        _in_unit_interval("label_smoothing", self.label_smoothing)
        if self.patience < 0:
            raise ConfigError(f"patience={self.patience!r} must be 0 (off) or more")


CRITERIA = ("magnitude", "bn_scaling", "second_order", "apoz", "regression", "sensitivity")
SCOPES = ("global", "layerwise")
GRANULARITIES = ("unstructured", "structured")
PRUNE_SCHEDULES = ("one_shot", "iterative", "gradual")
COMPARE = ("", "schedules", "criteria")


@dataclass(frozen=True)
class ModelSource(DataOptions):
    """A stage that loads models from MLflow (by URI or registered name)."""

    trust_pickled_model: bool = option(False, "Allow a PyTorch model that mcp did not log to be loaded by "
                                              "unpickling it. Unpickling runs code from the model file: only for "
                                              "models whose author you trust (warns; the run is tagged).")


@dataclass(frozen=True)
class StartModel(ModelSource):
    """A stage that starts from a trained model: a registered baseline or a model URI."""

    model: str = option("lenet300_100", "Model name; its baseline is models:/<model>-<dataset>@baseline.")
    model_uri: str = option("", "Model to start from (runs:/ or models:/ URI). Empty: the registered "
                                "baseline, trained first when there is none.")

    def validate(self) -> None:
        super().validate()
        from mcp.models import model_names

        if self.model not in model_names():
            raise ConfigError(f"unknown model {self.model!r}; choose one of: {', '.join(model_names())}")


@dataclass(frozen=True)
class SplitConfig(ModelSource):
    """`mcp split`: write the train/val/test split a dataset gets (or a registered model was made with)."""

    model_uri: str = option("", "Write the split this model was made with (its recorded data settings). Empty: the "
                                "split the data options give.")
    out: str = option("split.json", "Where to write the split file (JSON).")

    def validate(self) -> None:
        super().validate()
        if self.model_uri:
            check_model_ref("model_uri", self.model_uri)
        if not self.out.strip():
            raise ConfigError("out='' must name the file to write")


@dataclass(frozen=True)
class ImportConfig(ModelSource):
    """`mcp import`: register a model trained elsewhere as the baseline of <name>-<dataset>."""

    model: str = option("", "A zoo architecture (see `mcp models`) to load --weights into.")
    module: str = option("", "Your own model: package.module:factory, a class or function returning an nn.Module, "
                             "importable from the environment or the working directory.")
    timm: str = option("", "A timm architecture by name (pip install 'mcp-pipeline[timm]'); its weights come from "
                           "--weights, never from a download.")
    module_kwargs: str = option("", "Keyword arguments of --module (or timm.create_model): a JSON/YAML mapping, or a "
                                    ".json/.yaml file.")
    weights: str = option("", "The trained weights: a state_dict (.pt/.pth, read with weights_only=True) or "
                              ".safetensors. Empty: the factory's own initial weights.")
    model_uri: str = option("", "Or the weights of a PyTorch model already in MLflow that mcp did not log "
                                "(runs:/ or models:/): MLflow's pt2 format, checked free of pickles; a pickled one "
                                "only with --trust-pickled-model. The architecture still comes from --module, "
                                "--timm or --model.")
    name: str = option("", "Registered name <name>-<dataset>. Empty: the zoo name, or the factory's name.")
    head: str = option("", "Replace the final classifier with one for the dataset's classes (transfer): 'auto' (the "
                           "last nn.Linear to run) or the module's name, e.g. fc. Empty: the model must already give "
                           "the dataset's classes.", flag_value="auto")
    epochs: int = option(0, "Fine-tuning epochs on the dataset before registering (0: measure as it is).")
    freeze_epochs: int = option(0, "With --head: epochs at the start that train the new classifier alone.")
    optimizer: str = option("sgd", "Optimizer for fine-tuning.", OPTIMIZERS)
    lr: float = option(0.01, "Fine-tuning learning rate.")
    momentum: float = option(0.9, "SGD momentum.")
    weight_decay: float = option(5e-4, "Weight decay.")
    scheduler: str = option("cosine", "Fine-tuning LR schedule.", SCHEDULERS)
    register: bool = option(True, "Register the model as <name>-<dataset> with alias 'baseline'.")

    def validate(self) -> None:
        super().validate()
        from mcp.models import model_names

        if self.epochs < 0 or self.freeze_epochs < 0:
            raise ConfigError(f"epochs={self.epochs!r} and freeze_epochs={self.freeze_epochs!r} must be 0 or more")
        if self.weights and self.model_uri:
            raise ConfigError("give the weights once: --weights (a file) or --model-uri (a model in MLflow)")
        if self.model_uri:
            check_model_ref("model_uri", self.model_uri)
        if self.head and self.model:
            raise ConfigError("head: a zoo architecture is built for the dataset's classes already; --head replaces "
                              "the classifier of --module or --timm models")
        if self.freeze_epochs and (not self.head or self.freeze_epochs > self.epochs):
            raise ConfigError(f"freeze_epochs={self.freeze_epochs!r} needs --head and at most epochs={self.epochs}")
        _optimizer_settings(self)
        if sum(map(bool, (self.model, self.module, self.timm))) != 1:
            raise ConfigError("give exactly one of --model (a zoo architecture), --module (package.module:factory) and "
                              "--timm (a timm architecture)")
        if self.model and self.model not in model_names():
            raise ConfigError(f"unknown model {self.model!r}; choose one of: {', '.join(model_names())}")
        if self.module and ":" not in self.module:
            raise ConfigError(f"module={self.module!r} must be package.module:factory")
        if self.module_kwargs and not (self.module or self.timm):
            raise ConfigError("module_kwargs needs --module or --timm")
        if self.timm and self.factory_kwargs().get("pretrained"):
            raise ConfigError("pretrained=true would download weights; give them with --weights")
        if self.name and not all(c.isalnum() or c in "_." for c in self.name):
            raise ConfigError(f"name={self.name!r} may hold letters, digits, '_' and '.' only")
        self.factory_kwargs()

    def factory_kwargs(self) -> dict[str, Any]:
        text = self.module_kwargs.strip()
        if not text:
            return {}
        if Path(text).suffix.lower() in (".json", ".yaml", ".yml"):
            return read_config_file(text)
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"module_kwargs={text!r} is not a JSON/YAML mapping") from None
        if not isinstance(data, dict):
            raise ConfigError(f"module_kwargs={text!r} must be a mapping of argument names to values")
        return {str(k): v for k, v in data.items()}

    def source(self) -> str:
        """Where the model comes from: package.module:factory, timm:NAME or a zoo name."""
        return self.module or (f"timm:{self.timm}" if self.timm else self.model)

    def registered_model(self) -> str:
        """The model part of the registered name."""
        if self.name:
            return self.name
        return self.model or self.timm or self.module.rpartition(":")[2].split(".")[-1].lower()


URI_SCHEMES = ("runs:/", "models:/", "file:", "mlflow-artifacts:/", "s3://", "gs://", "wasbs://", "hdfs://")
PARENT = "parent"


def check_model_ref(name: str, value: str, allow_parent: bool = False) -> None:
    """A model reference: an mcp model name (its registered baseline), a registered
    ``name@alias``, or a model URI (``runs:/``, ``models:/``, ...)."""
    from mcp.models import model_names

    if (allow_parent and value == PARENT) or value in model_names() or value.startswith(URI_SCHEMES):
        return
    registered, sep, alias = value.partition("@")
    if sep and registered and alias and "/" not in value:
        return
    parent = f"'{PARENT}' (the model the stage starts from), " if allow_parent else ""
    raise ConfigError(f"{name}={value!r} is not a model reference; use {parent}a model name (its "
                      f"<model>-<dataset>@baseline), a registered <name>@<alias>, or a runs:/ or models:/ URI")


@dataclass(frozen=True)
class RecoveryOptions(StartModel):
    """A compression stage whose fine-tuning can be distillation from another model."""

    distill_from: str = option("", "Fine-tune by distillation from this model: 'parent' (the model the stage "
                                   "starts from; `--distill-from` alone), a model name, <name>@<alias> or a URI. "
                                   "Empty: plain cross-entropy.", flag_value=PARENT)
    distill_temperature: float = option(4.0, "Distillation temperature T (the KD term is scaled by T^2).")
    distill_alpha: float = option(0.9, "Weight of the distillation term; 1 - alpha weighs the labels' CE.")

    def validate(self) -> None:
        super().validate()
        if self.distill_from:
            check_model_ref("distill_from", self.distill_from, allow_parent=True)
        _positive("distill_temperature", self.distill_temperature)
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ConfigError(f"distill_alpha={self.distill_alpha!r} is outside [0, 1]")


@dataclass(frozen=True)
class PruneConfig(RecoveryOptions):
    """`mcp prune`: prune a trained model on a schedule, fine-tune it, register it."""

    criterion: str = option("magnitude", "Importance criterion.", CRITERIA)
    scope: str = option("global", "One threshold across layers, or the same ratio in every layer.", SCOPES)
    granularity: str = option("unstructured", "Single weights (masks) or whole channels (removed).",
                              GRANULARITIES)
    schedule: str = option("one_shot", "When to prune.", PRUNE_SCHEDULES)
    sparsity: float = option(0.9, "Target sparsity: share of weights (unstructured) or channels (structured).")
    initial_sparsity: float = option(0.0, "Gradual schedule: sparsity of its first step.")
    prune_steps: int = option(10, "Iterative/gradual: number of pruning steps.")
    prune_epochs: int = option(20, "Iterative/gradual: epochs over which the steps are spread.")
    epochs: int = option(40, "Fine-tuning epochs in all (the pruning span included).")
    ratios_file: str = option("", "YAML mapping of layer name to ratio (scope layerwise).")
    keep_first: bool = option(False, "Do not prune the first layer.")
    keep_last: bool = option(False, "Do not prune the last layer.")
    ignored_layers: str = option("", "Comma-separated layer names never to prune.")
    norm: int = option(1, "Magnitude criterion: 1 (L1) or 2 (L2) norm.")
    hessian: str = option("fisher", "Second-order criterion: diagonal Hessian estimate.", ("fisher", "hutchinson"))
    round_to: int = option(1, "Structured: keep every pruned layer's channel count a multiple of this (8 or 16 "
                              "suit the SIMD width of many CPU kernels; measure with mcp benchmark). 1: any count.")
    drop_blocks: int = option(0, "Depth pruning: first remove this many whole blocks (residual blocks with an "
                                 "identity shortcut), each the one whose removal raises the loss on the "
                                 "calibration batches the least. Fewer operators: what still cuts latency "
                                 "once layers are narrow. 0: none.")
    head_ratio: float = option(0.0, "Structured, layer-wise: remove whole attention heads, this share of each "
                                    "attention module's heads (timm's ViT, DeiT: a qkv Linear and num_heads), rounded "
                                    "up; the heads left keep their width. 0: heads keep their count and lose width "
                                    "with --sparsity.")
    calib_batches: int = option(8, "Training batches used by data-driven criteria.")
    bn_l1: float = option(0.0, "Network-slimming L1 penalty on BatchNorm scales during fine-tuning.")
    optimizer: str = option("sgd", "Optimizer for fine-tuning.", OPTIMIZERS)
    lr: float = option(0.01, "Fine-tuning learning rate (reduced: a fifth of training's).")
    momentum: float = option(0.9, "SGD momentum.")
    weight_decay: float = option(5e-4, "Weight decay.")
    scheduler: str = option("cosine", "Fine-tuning LR schedule.", SCHEDULERS)
    compare: str = option("", "Run all schedules or all criteria (supported at this granularity) as nested "
                              "runs and log a comparison table and plot.", COMPARE)
    register: bool = option(True, "Register the pruned model as a new version of <model>-<dataset>.")

    def validate(self) -> None:
        super().validate()
        _in_unit_interval("sparsity", self.sparsity)
        _in_unit_interval("initial_sparsity", self.initial_sparsity)
        if self.schedule == "gradual" and self.initial_sparsity > self.sparsity:
            raise ConfigError(f"initial_sparsity={self.initial_sparsity!r} is above sparsity={self.sparsity!r}")
        _positive("epochs", self.epochs)
        _positive("prune_steps", self.prune_steps)
        _optimizer_settings(self)
        _positive("calib_batches", self.calib_batches)
        check_drop_blocks(self.drop_blocks)
        if self.schedule != "one_shot" and not 0 < self.prune_epochs <= self.epochs:
            raise ConfigError(f"prune_epochs={self.prune_epochs!r} must be in [1, epochs={self.epochs}]")
        if self.norm not in (1, 2):
            raise ConfigError(f"norm={self.norm!r} is not allowed; choose 1 or 2")
        if self.bn_l1 < 0:
            raise ConfigError(f"bn_l1={self.bn_l1!r} must be 0 or more")
        if self.ratios_file and self.scope != "layerwise":
            raise ConfigError("ratios_file needs scope 'layerwise'")
        if not 0.0 <= self.head_ratio < 1.0:
            raise ConfigError(f"head_ratio={self.head_ratio!r} is outside [0, 1)")
        if self.head_ratio and (self.granularity, self.scope) != ("structured", "layerwise"):
            raise ConfigError(f"head_ratio={self.head_ratio!r} removes whole attention heads within each module: it "
                              f"needs granularity structured and scope layerwise (got {self.granularity}, {self.scope})")
        if self.round_to < 1 or (self.round_to > 1 and self.granularity != "structured"):
            raise ConfigError(f"round_to={self.round_to!r} must be 1 or more, and above 1 only with granularity "
                              f"structured")

    def ignored(self) -> list[str]:
        return [n.strip() for n in self.ignored_layers.split(",") if n.strip()]


@dataclass(frozen=True)
class SensitivityConfig(StartModel):
    """`mcp sensitivity`: prune each layer alone at a sweep of ratios; suggest per-layer ratios."""

    criterion: str = option("magnitude", "Importance criterion.", CRITERIA)
    granularity: str = option("unstructured", "Single weights or whole channels.", GRANULARITIES)
    sweep: str = option("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", "Comma-separated ratios to try in each layer.")
    target_sparsity: float = option(0.8, "Overall sparsity the suggested per-layer ratios reach.")
    calib_batches: int = option(8, "Training batches used by data-driven criteria and gradient norms.")
    norm: int = option(1, "Magnitude criterion: 1 (L1) or 2 (L2) norm.")
    hessian: str = option("fisher", "Second-order criterion: diagonal Hessian estimate.", ("fisher", "hutchinson"))

    def validate(self) -> None:
        super().validate()
        ratios = self.sweep_ratios()
        _in_unit_interval("target_sparsity", self.target_sparsity)
        if self.target_sparsity > max(ratios):
            raise ConfigError(f"target_sparsity={self.target_sparsity!r} is above the largest swept ratio "
                              f"{max(ratios)}")
        _positive("calib_batches", self.calib_batches)

    def sweep_ratios(self) -> list[float]:
        try:
            ratios = sorted({float(r) for r in self.sweep.split(",") if r.strip()})
        except ValueError:
            raise ConfigError(f"sweep={self.sweep!r} must be comma-separated numbers in (0, 1)") from None
        if not ratios or not all(0.0 < r < 1.0 for r in ratios):
            raise ConfigError(f"sweep={self.sweep!r} must be comma-separated numbers in (0, 1)")
        return ratios


QUANT_METHODS = quant_method_names()  # one module each in mcp/quantization/methods/
FINE_TUNED_METHODS = tuple(m for m in QUANT_METHODS if quant_method(m).fine_tunes)


@dataclass(frozen=True)
class QuantizeConfig(RecoveryOptions):
    """`mcp quantize`: quantize a registered model (dense or pruned), encode it, export it, register it."""

    method: str = option("ptq_int8", "Quantization method.", QUANT_METHODS)
    bits: int = option(0, "Weight bit-width, 2-8 (fixed_point, qat, kmeans, huffman, deep_compression). 0: the "
                          "method's default (8; deep_compression: 8 for convolutions, 4 for fully connected).")
    bits_file: str = option("", "YAML mapping of layer name to bits; other layers get --bits.")
    act_bits: int = option(0, "fixed_point / qat: activation bits, 2-8 (0: float activations).")
    symmetric: bool = option(True, "fixed_point / qat: symmetric weight grid (else asymmetric, zero point).")
    per_channel: bool = option(True, "fixed_point / qat: one scale per output channel (else per tensor).")
    observer: str = option("minmax", "Activation range calibration (ptq_int8, fixed_point with act_bits).",
                           OBSERVERS)
    calib_batches: int = option(16, "Training batches used for calibration.")
    reduce_range: bool = option(True, "ptq_int8 / dynamic_int8: INT8 weights in [-64, 64] (ONNX Runtime's "
                                      "reduce_range), so its u8 x s8 kernels cannot saturate.")
    precision: str = option("int8", "ptq_int8: int8 quantizes every layer; speed only the layers that the runtime "
                                    "(--runtime) runs at least 10% faster in INT8 than in float32 at their shapes on "
                                    "this CPU (timed once per shape and runtime, and cached), float32 elsewhere; "
                                    "with --runtime auto, a file for each runtime, the fastest kept.",
                            ("int8", "speed"))
    kmeans_init: str = option("linear", "k-means centroid initialisation.", KMEANS_INITS)
    share_biases: str = option("auto", "kmeans / huffman / deep_compression: share the biases too (their own "
                                       "2^bits codebook per layer). auto: where their float32 bytes would be more "
                                       "than 5% of the encoded weights'.", ("auto", "true", "false"), flag_value="true")
    ignored_layers: str = option("", "Comma-separated layer names left in float32.")
    epochs: int = option(-1, "Fine-tuning epochs (qat; centroid fine-tuning for kmeans, huffman, "
                             "deep_compression). 0: none; -1: the method's default (10; deep_compression: 30).")
    optimizer: str = option("sgd", "Optimizer for fine-tuning.", OPTIMIZERS)
    lr: float = option(0.005, "Fine-tuning learning rate.")
    momentum: float = option(0.9, "SGD momentum.")
    weight_decay: float = option(0.0, "Weight decay while fine-tuning.")
    scheduler: str = option("cosine", "Fine-tuning LR schedule.", SCHEDULERS)
    sparsity: float = option(0.965, "deep_compression: weight sparsity of its pruning step (the default: "
                                    "about 100x on MNIST's LeNet-300-100 for half a point on average, "
                                    "docs/results.md).")
    prune_schedule: str = option("gradual", "deep_compression: pruning schedule.", PRUNE_SCHEDULES)
    prune_epochs: int = option(160, "deep_compression: epochs of its pruning step: half of them prune gradually, "
                                    "the rest fine-tune (at 96.5% on MNIST, 160 lost half as much accuracy as 80 "
                                    "on the same seeds, docs/results.md).")
    ratios_file: str = option("", "deep_compression: per-layer pruning ratios (YAML), layer-wise scope.")
    opset: int = option(17, "ONNX opset of the exported model.")
    runtime: str = option("onnxruntime", "Where the deployable file is timed and recorded to run: onnxruntime, "
                                         "openvino, openvino-bf16, or auto (the fastest installed runtime, timed "
                                         "side by side). --precision speed chooses its INT8 layers on this runtime.")
    register: bool = option(True, "Register the quantized model as a new version of <model>-<dataset>.")

    def validate(self) -> None:
        if self.epochs == -1:  # resolved here, so the run logs the epochs it trained
            object.__setattr__(self, "epochs", quant_method(self.method).default_epochs)
        super().validate()
        if self.bits != 0 and not 2 <= self.bits <= 8:
            raise ConfigError(f"bits={self.bits!r} is outside the allowed bit-widths 2-8 (0: the method's default)")
        if self.act_bits and not 2 <= self.act_bits <= 8:
            raise ConfigError(f"act_bits={self.act_bits!r} must be 0 (float activations) or 2-8")
        kind = quant_method(self.method)
        if kind.int8_only and (self.bits not in (0, 8) or self.bits_file):
            raise ConfigError(f"method {self.method} is 8-bit; use fixed_point or qat for bits={self.bits}")
        if self.precision == "speed" and self.method != "ptq_int8":
            raise ConfigError(f"precision=speed (INT8 where it runs faster) is for method ptq_int8, not {self.method}")
        from mcp.deploy.runtimes import check_choice

        check_choice("runtime", self.runtime)
        if self.epochs < 0:
            raise ConfigError(f"epochs={self.epochs!r} must be 0 or more (-1: the method's default)")
        if kind.needs_epochs and self.epochs == 0:
            raise ConfigError(f"method {self.method} needs epochs >= 1 (it trains; fixed_point is the same grid "
                              f"without training)")
        if kind.prunes_first and self.prune_epochs < 1:
            raise ConfigError(f"prune_epochs={self.prune_epochs!r} must be at least 1")
        _optimizer_settings(self)
        _positive("calib_batches", self.calib_batches)
        _in_unit_interval("sparsity", self.sparsity)
        if not 13 <= self.opset <= 21:
            raise ConfigError(f"opset={self.opset!r} is outside the supported ONNX opsets 13-21")
        if self.distill_from and (self.method not in FINE_TUNED_METHODS or self.epochs == 0):
            raise ConfigError(f"distill_from needs fine-tuning: a method of {', '.join(FINE_TUNED_METHODS)} "
                              f"with epochs >= 1 (got method {self.method}, epochs {self.epochs})")

    def ignored(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in self.ignored_layers.split(",") if n.strip())


@dataclass(frozen=True)
class DistillConfig(ModelSource):
    """`mcp distill`: train a student on a teacher's softened outputs (and features); register it."""

    teacher: str = option("resnet20", "Teacher: a model name (its <model>-<dataset>@baseline, trained first when "
                                      "missing), a registered <name>@<alias>, or a runs:/ or models:/ URI.")
    student: str = option("lenet300_100", "Student: a model name (trained from scratch) or a model URI / "
                                          "<name>@<alias> (fine-tuned from its weights; zeros stay zero).")
    temperature: float = option(4.0, "Softmax temperature T of the KD term (which is scaled by T^2).")
    alpha: float = option(0.9, "Weight of the KD term; 1 - alpha weighs the cross-entropy on labels.")
    hint_layers: str = option("", "Feature (hint) loss: 'auto' (penultimate features) or comma-separated "
                                  "student_layer=teacher_layer pairs. Empty: none.")
    hint_weight: float = option(1.0, "Weight of the hint loss (mean-squared error after the adapter).")
    epochs: int = option(60, "Training epochs.")
    optimizer: str = option("sgd", "Optimizer.", OPTIMIZERS)
    lr: float = option(0.05, "Peak learning rate (lower it when the student starts from trained weights).")
    momentum: float = option(0.9, "SGD momentum.")
    weight_decay: float = option(5e-4, "Weight decay.")
    scheduler: str = option("cosine", "Learning-rate schedule over epochs.", SCHEDULERS)
    label_smoothing: float = option(0.0, "Label smoothing of the cross-entropy term.")
    register: bool = option(True, "Register the student as a new version of <student>-<dataset>.")

    def validate(self) -> None:
        super().validate()
        check_model_ref("teacher", self.teacher)
        check_model_ref("student", self.student)
        from mcp.distillation import DistillSpec

        DistillSpec(self.temperature, self.alpha, self.hint_layers, self.hint_weight, self.label_smoothing)
        _positive("epochs", self.epochs)
        _optimizer_settings(self)
        _in_unit_interval("label_smoothing", self.label_smoothing)


@dataclass(frozen=True)
class ExportConfig(StartModel):
    """`mcp export`: the deployable ONNX model of a registered version, checked, parity-tested, registered."""

    model_uri: str = option("", "Model to export: models:/<name>/<version>, models:/<name>@<alias>, runs:/... "
                                "Empty: models:/<model>-<dataset>@baseline.")
    opset: int = option(17, "ONNX opset (float models; a quantized model keeps the opset it was made with).")
    optimize: bool = option(True, "Apply ONNX Runtime's basic offline graph optimisations to float models, "
                                  "kept when they remove nodes.")
    atol: float = option(1e-3, "Parity: largest allowed |PyTorch - ONNX Runtime| logit difference "
                               "(float models).")
    min_agreement: float = option(0.99, "Parity: smallest allowed share of equal predictions (float models).")
    max_accuracy_drop: float = option(0.005, "Parity of a lossy deployable (INT8 activations, or a bf16 runtime): "
                                             "largest allowed drop of its test accuracy below the PyTorch model's "
                                             "(0.005: half a point).")
    lossy_min_agreement: float = option(0.95, "Parity of a lossy deployable: smallest allowed share of equal "
                                              "predictions.")
    parity_samples: int = option(256, "Parity: test images in the fixed batch compared.")
    runtime: str = option("onnxruntime", "Where the file is checked and will run: onnxruntime, openvino (f32), "
                                         "openvino-bf16 (the openvino extra), or auto: every installed runtime "
                                         "timed on the file, the fastest that passes its parity check recorded "
                                         "on the run and the version.")
    register: bool = option(True, "Register the ONNX model as a new version of the same name, tag format=onnx.")

    def validate(self) -> None:
        super().validate()
        from mcp.deploy.runtimes import check_choice

        if self.model_uri:
            check_model_ref("model_uri", self.model_uri)
        if not 13 <= self.opset <= 21:
            raise ConfigError(f"opset={self.opset!r} is outside the supported ONNX opsets 13-21")
        _positive("atol", self.atol)
        for name in ("min_agreement", "lossy_min_agreement"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)!r} is outside (0, 1]")
        if not 0.0 <= self.max_accuracy_drop <= 1.0:
            raise ConfigError(f"max_accuracy_drop={self.max_accuracy_drop!r} is outside [0, 1]")
        _positive("parity_samples", self.parity_samples)
        check_choice("runtime", self.runtime)

    def parity_rules(self):
        from mcp.deploy.deployable import ParityRules

        return ParityRules(self.atol, self.min_agreement, self.max_accuracy_drop, self.lossy_min_agreement)


@dataclass(frozen=True)
class BenchmarkConfig(ModelSource):
    """`mcp benchmark`: deployed ONNX models measured side by side (accuracy, latency, throughput, memory)."""

    model: str = option("lenet300_100", "With no --models and no --registered-model: every version of "
                                        "<model>-<dataset>.")
    models: str = option("", "Comma-separated models: URIs, <name>@<alias>, or model names (their baselines).")
    registered_model: str = option("", "Every (PyTorch) version of this registered model.")
    baseline: str = option("", "Reference for speedups and ratios (one of the models). Empty: the version with "
                               "alias 'baseline' when listed, else the first.")
    threads: int = option(1, "ONNX Runtime intra-op threads (and torch threads) for the CPU measurements.")
    throughput_batch: int = option(64, "Batch size of the throughput measurement.")
    warmup: int = option(20, "Warm-up runs before timing.")
    iters: int = option(200, "Timed runs at batch 1, at least (p50/p95 come from these).")
    seconds: float = option(2.0, "At most this long per timing (batch 1, then throughput); a timing stops "
                                 "sooner once its times settle (interquartile range within 10% of the median "
                                 "after 0.25 s).")
    opset: int = option(17, "ONNX opset of float models exported for the benchmark.")
    runtime: str = option("onnxruntime", "Runtime(s) the CPU figures are measured in: onnxruntime, openvino, "
                                         "openvino-bf16, a comma-separated list or all (a row per model and "
                                         "runtime, side by side), or auto (per model, the fastest runtime's row).")

    def validate(self) -> None:
        super().validate()
        from mcp.deploy.runtimes import check_choice
        from mcp.models import model_names

        check_choice("runtime", self.runtime, many=True)
        if self.model not in model_names():
            raise ConfigError(f"unknown model {self.model!r}; choose one of: {', '.join(model_names())}")
        for ref in self.model_refs():
            check_model_ref("models", ref)
        if self.baseline:
            check_model_ref("baseline", self.baseline)
        for name in ("threads", "throughput_batch", "warmup", "iters", "seconds"):
            _positive(name, getattr(self, name))
        if not 13 <= self.opset <= 21:
            raise ConfigError(f"opset={self.opset!r} is outside the supported ONNX opsets 13-21")

    def model_refs(self) -> list[str]:
        return [r.strip() for r in self.models.split(",") if r.strip()]


SEARCH_MODES = ("max-accuracy", "pareto")
SAMPLERS = ("tpe", "nsga2")
OPTUNA_PRUNERS = ("median", "halving", "none")
BUDGET_MEASURES = ("compressed", "onnx")
DEPLOYABLES = ("any", "int8")  # what a search's encodings must deploy as (mcp search --deployable)


@dataclass(frozen=True)
class SearchConfig(StartModel):
    """`mcp search`: Optuna over per-layer prune ratios and bit-widths under a size budget."""

    space: str = option("", "Search space: a shipped space's name (default, structured, lenet, resnet, "
                            "resnet_latency, transformer) or a path to a YAML file. Empty: the shipped space whose `models` "
                            "lists the model, else default.")
    mode: str = option("max-accuracy", "Best validation accuracy under the budget, or the accuracy/size "
                                       "Pareto front.", SEARCH_MODES)
    budget_mb: float = option(0.0, "Size budget in MB (10^6 bytes), measured as --budget-on says. 0: use "
                                   "--budget-ratio.")
    budget_ratio: float = option(0.1, "Size budget as a share of the baseline's float32 size (when --budget-mb "
                                      "is 0). 0 with --budget-mb 0: no budget (pareto only).")
    budget_on: str = option("compressed", "What the budget (and the pareto size objective) measures: the encoded "
                                          "payload (size_bytes_compressed: packed b-bit values, sparse indices) "
                                          "or the deployable ONNX file (size_bytes_onnx: INT8 weights, zeros "
                                          "stored densely, so only removed channels shrink it).",
                            BUDGET_MEASURES)
    budget_ms: float = option(0.0, "Latency budget (ms): the CPU p50 at batch 1, one thread, in ONNX Runtime, of "
                                   "each trial's model deployed for speed (float32, INT8 in the layers that run "
                                   "faster in INT8 here), timed in a process of its own before any fine-tuning; "
                                   "slower trials are infeasible. With or without a size budget (--budget-ratio 0 "
                                   "for none). 0: no latency budget.")
    budget_batch: int = option(1, "Images per call that --budget-ms times: 1 is a latency budget; more makes it "
                                  "a throughput budget (a batch of this many within --budget-ms, the p50 of one "
                                  "call).")
    latency: bool = option(False, "pareto: CPU latency as a third objective (ONNX Runtime p50 at batch 1, one "
                                  "thread, of each trial's deployable ONNX model, timed in a process of its own).")
    runtime: str = option("onnxruntime", "Where latencies are timed (--budget-ms, --latency) and the winners are "
                                         "checked, exported and benchmarked: onnxruntime, openvino, openvino-bf16 "
                                         "(the openvino extra), or auto: each file timed in every installed "
                                         "runtime, the fastest counts and is recorded on the winner's version.")
    deployable: str = option("any", "any: every encoding the space lists (k-means codebooks, Huffman-coded, are a "
                                    "storage and download format: decoded to float32 to run); int8: only "
                                    "uniform grids, which ONNX Runtime runs as INT8 weights.", DEPLOYABLES)
    trials: int = option(20, "Trials the study runs in all: a total that every worker of the study shares "
                             "(running the command again resumes up to it; raise it to add trials).")
    timeout: float = option(0.0, "Stop adding trials after this many seconds (0: no limit).")
    sampler: str = option("tpe", "Optuna sampler (both honour the budget as a constraint).", SAMPLERS)
    pruner: str = option("median", "Optuna pruner that stops bad trials early (max-accuracy only).",
                         OPTUNA_PRUNERS)
    storage: str = option("", "Optuna storage: any SQLAlchemy URL; every worker of a study names the same one "
                              "(PostgreSQL beyond one machine). Empty: optuna.db beside the SQLite tracking "
                              "database (required with a tracking server).")
    heartbeat: float = option(30.0, "Seconds between a running trial's heartbeats in the storage. A trial "
                                    "silent for 3 heartbeats (its worker was killed) is failed, retried once, "
                                    "and its MLflow run ends KILLED, when a worker next opens the study.")
    study_name: str = option("", "Study name (running again resumes it). Empty: <model>-<dataset>-<mode>.")
    fill_budget: bool = option(True, "Scale each trial's sampled ratios so that it just fits the budget (the "
                                     "samples then share the pruning between layers): the size budget, else the "
                                     "latency budget (by bisection on measured latency, 3% below it); false: "
                                     "over-budget trials are rejected as sampled.")
    distill: bool = option(False, "Fine-tune each trial by distillation from the starting model.")
    final_epochs: int = option(0, "Fine-tuning epochs when a winner is rebuilt (0: its trial's).")
    final_prune_epochs: int = option(0, "Float32 epochs over which a winner whose trial pruned gradually (the "
                                        "space's prune.schedule) is pruned again when it is rebuilt (0: its "
                                        "trial's).")
    finalists: int = option(1, "max-accuracy: rebuild this many of the best feasible trials (by validation "
                               "accuracy) with --final-epochs, register each, and give 'challenger' to the one "
                               "the validation split then ranks first: short trials rank configurations "
                               "noisily. 1: the best trial alone.")
    calib_batches: int = option(8, "Training batches used by data-driven pruning criteria.")
    register: bool = option(True, "Register the winner(s) as new versions with alias 'challenger'.")
    export: bool = option(True, "Export each winner to ONNX (`mcp export`: checker, parity, format=onnx version).")
    benchmark: bool = option(True, "Benchmark the starting model and the winners (`mcp benchmark`) at the end.")

    def validate(self) -> None:
        super().validate()
        if self.budget_mb < 0 or not 0.0 <= self.budget_ratio < 1.0:
            raise ConfigError(f"budget_mb={self.budget_mb!r} must be 0 or more and budget_ratio="
                              f"{self.budget_ratio!r} within [0, 1)")
        if self.budget_ms < 0:
            raise ConfigError(f"budget_ms={self.budget_ms!r} must be 0 (no latency budget) or more")
        _budget_batch(self.budget_batch, self.budget_ms)
        if self.mode == "max-accuracy" and self.budget_mb == 0 and self.budget_ratio == 0 and self.budget_ms == 0:
            raise ConfigError("mode max-accuracy needs a budget: --budget-mb, --budget-ratio or --budget-ms")
        if self.latency and self.mode != "pareto":
            raise ConfigError("latency=true is an objective of mode pareto (max-accuracy optimises accuracy alone)")
        _positive("trials", self.trials)
        _positive("heartbeat", self.heartbeat)
        for key in ("timeout", "final_epochs", "final_prune_epochs"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)!r} must be 0 or more")
        _positive("calib_batches", self.calib_batches)
        _positive("finalists", self.finalists)
        if self.finalists > 1 and self.mode != "max-accuracy":
            raise ConfigError(f"finalists={self.finalists} is for mode max-accuracy (pareto rebuilds its whole front)")
        from mcp.deploy.runtimes import check_choice

        check_choice("runtime", self.runtime)

    def name(self) -> str:
        return self.study_name or f"{self.model}-{self.dataset}-{self.mode}"


@dataclass(frozen=True)
class PipelineConfig(ModelSource):
    """`mcp pipeline` (the MLproject's `main`): baseline, prune, quantize, search, export, benchmark, promote."""

    model: str = option("lenet300_100", "Model name (see `mcp models`).")
    model_uri: str = option("", "Start from this model instead (a runs:/ or models:/ URI, e.g. an imported "
                                "models:/<name>-<dataset>@baseline). Empty: <model>-<dataset>@baseline.")
    retrain: bool = option(False, "Train a new baseline even when <model>-<dataset>@baseline exists.")
    epochs: int = option(60, "Baseline training epochs (when a baseline is trained).")
    sparsity: float = option(0.9, "Prune step: target weight sparsity (global magnitude).")
    prune_schedule: str = option("gradual", "Prune step: schedule.", PRUNE_SCHEDULES)
    prune_epochs: int = option(30, "Prune step: fine-tuning epochs (the gradual span is half of them).")
    quantize_method: str = option("qat", "Quantize step: method, applied to the pruned model.", QUANT_METHODS)
    bits: int = option(4, "Quantize step: weight bit-width (8 for ptq_int8 / dynamic_int8).")
    quantize_epochs: int = option(8, "Quantize step: fine-tuning epochs (methods that fine-tune).")
    distill: bool = option(False, "Recover by distillation from the baseline in the prune, quantize and search "
                                  "steps.")
    budget_ratio: float = option(0.1, "Search step: size budget as a share of the baseline's float32 size.")
    budget_on: str = option("compressed", "Search step: what the budget measures (see `mcp search`).",
                            BUDGET_MEASURES)
    budget_ms: float = option(0.0, "Search step: latency budget in ms as well (see `mcp search --budget-ms`); "
                                   "a model within the budget meets both. 0: none.")
    budget_batch: int = option(1, "Search step: images per call that --budget-ms times (see `mcp search "
                                  "--budget-batch`).")
    space: str = option("", "Search step: search space, a shipped space's name (default, structured, lenet, "
                            "resnet, resnet_latency, transformer) or a path to a YAML file (empty: the model family's space).")
    trials: int = option(20, "Search step: trials the study runs in all (shared by its workers).")
    storage: str = option("", "Search step: Optuna storage (SQLAlchemy URL). Empty: optuna.db beside the SQLite "
                              "tracking database.")
    study_name: str = option("", "Search step: study name. Empty: pipeline-<model>-<dataset>-v<baseline "
                                 "version>, so a new baseline starts a new study and the same one resumes it.")
    final_epochs: int = option(8, "Search step: fine-tuning epochs of the rebuilt winner.")
    finalists: int = option(1, "Search step: rebuild this many of the best trials and keep the one the validation "
                               "split then ranks first (see `mcp search --finalists`).")
    threads: int = option(1, "Benchmark step: ONNX Runtime threads for the CPU measurements.")
    seconds: float = option(1.0, "Benchmark step: at most this long per timing (sooner once its times settle).")
    runtime: str = option("onnxruntime", "Search, export and benchmark steps: where models are timed and will run "
                                         "(see `mcp search --runtime`): onnxruntime, openvino, openvino-bf16, "
                                         "auto.")
    promote: bool = option(True, "Move 'champion' to the most accurate compressed model within the budget.")

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.budget_ratio < 1.0:
            raise ConfigError(f"budget_ratio={self.budget_ratio!r} is outside (0, 1): the pipeline needs a budget")
        if self.budget_ms < 0 or (self.budget_ms and self.threads != 1):
            raise ConfigError(f"budget_ms={self.budget_ms!r} must be 0 or more, and is a one-thread latency: it needs "
                              f"threads=1 (got {self.threads})")
        _budget_batch(self.budget_batch, self.budget_ms)
        if self.model_uri:
            check_model_ref("model_uri", self.model_uri)
            if self.retrain:
                raise ConfigError("retrain=true trains <model>-<dataset>; it does not go with model_uri")
        _positive("prune_epochs", self.prune_epochs)
        if quant_method(self.quantize_method).prunes_first:
            raise ConfigError(f"quantize_method={self.quantize_method!r} prunes again; the pipeline prunes in its "
                              f"prune step: choose one of " +
                              ", ".join(m for m in QUANT_METHODS if not quant_method(m).prunes_first))
        self.stage_configs("models:/validate/1")  # each step's config validates itself on construction

    def stage_configs(self, base_uri: str, pruned_uri: str = "models:/pruned/1") -> dict[str, StageConfig]:
        """The config of each step (all validated on construction)."""
        data = {k: getattr(self, k) for k in ModelSource.defaults()}  # the data options, and trust_pickled_model
        teacher = base_uri if self.distill else ""
        fine_tuned = self.quantize_method in FINE_TUNED_METHODS
        return {
            "train": TrainConfig(model=self.model, epochs=self.epochs,
                                 **{k: v for k, v in data.items() if k in DataOptions.defaults()}),
            "prune": PruneConfig(model=self.model, model_uri=base_uri, sparsity=self.sparsity,
                                 schedule=self.prune_schedule, epochs=self.prune_epochs,
                                 prune_epochs=max(1, self.prune_epochs // 2), distill_from=teacher, **data),
            "quantize": QuantizeConfig(model=self.model, model_uri=pruned_uri, method=self.quantize_method,
                                       bits=self.bits, epochs=self.quantize_epochs if fine_tuned else 0,
                                       distill_from=teacher if fine_tuned and self.quantize_epochs else "", **data),
            "search": SearchConfig(model=self.model, model_uri=base_uri, budget_ratio=self.budget_ratio,
                                   budget_on=self.budget_on, budget_ms=self.budget_ms,
                                   budget_batch=self.budget_batch, space=self.space,
                                   trials=self.trials,
                                   storage=self.storage, study_name=self.study_name or "pipeline", distill=self.distill,
                                   final_epochs=self.final_epochs, finalists=self.finalists, benchmark=False,
                                   runtime=self.runtime, **data),
            "benchmark": BenchmarkConfig(model=self.model, threads=self.threads, seconds=self.seconds,
                                         runtime=self.runtime,
                                         **({"throughput_batch": self.budget_batch} if self.budget_batch > 1 else {}),
                                         **data),
        }


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping of option names to values."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - parser errors vary by library
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config file {str(p)!r} is not valid YAML/JSON: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of option names to values")
    return data
