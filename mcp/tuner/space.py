"""Search spaces: YAML data -> validated space -> one trial's sampled configuration.

A space is a YAML file: one shipped with the package (:mod:`mcp.tuner.spaces`, named by
its name: ``default``, ``structured``, ``lenet``, ``resnet``, ``resnet_latency``, ``transformer``) or any
file of your own::

    models: [lenet300_100, lenet5]     # which models it is for (the default file has none)
    prune:
      ratio: [0.0, 0.95]               # per-layer (or per-group) prune ratio range
      granularity: [unstructured]      # choices
      criterion: [magnitude]           # choices
      drop_blocks: [0, 3]              # optional: whole blocks removed first (integer range)
      heads: [0.0, 0.5]                # optional, structured: share of whole heads removed per attention module
      schedule: [gradual, one_shot]    # optional, unstructured: how a trial prunes (default one_shot); gradual
                                       # and iterative train in float32 while the ratios rise (Zhu and
                                       # Gupta's cubic ramp, Han et al.'s steps), then quantize
      epochs: [6, 12]                  # with gradual or iterative: those epochs (integer range; the ratios
                                       # are reached at half of them)
      lr: [0.005, 0.02]                # and their learning rate (log-uniform; default: finetune.lr)
    quantize:
      bits: [2, 3, 4, 5, 6, 8]         # per-layer (or per-group) bit-width choices
      encoding: [codebook, grid]       # optional, per layer (or group): a k-means codebook of 2^bits
                                       # centroids, Huffman-coded where it pays (storage), or a uniform grid
                                       # (INT8 containers in ONNX); the first is what uniform starts take
      kmeans_init: [linear, density]   # optional: the codebooks' initialisation, per trial
      share_biases: [false, true]      # optional: codebook layers' biases get 2^bits centroids of their own
    finetune:
      epochs: [2, 4]                   # integer range
      lr: [0.001, 0.02]                # log-uniform range
    layers:                            # optional per-layer overrides
      fc3: {ratio: [0.0, 0.5], bits: [6, 8], encoding: [grid]}
    groups:                            # optional: layers sampled together (deep nets)
      stage1: ["layer1.*"]
    starts: [uniform, global]          # optional: the study's starting trials (default uniform): one ratio in
                                       # every layer, and one magnitude threshold over all of them (Deep
                                       # Compression's allocation), per bit-width, at the least pruning that fits

Unknown keys, unknown layers, empty ranges and bits outside 2-8 are errors that name
the bad value.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from mcp.config import CRITERIA, GRANULARITIES, read_config_file
from mcp.errors import ConfigError
from mcp.quantization.names import KMEANS_INITS

SPACES_DIR = Path(__file__).resolve().parent / "spaces"  # the shipped spaces (package data)
TOP_KEYS = {"models", "prune", "quantize", "finetune", "layers", "groups", "description", "starts"}
STARTS = ("uniform", "global")  # a study's starting trials: one ratio everywhere; one magnitude threshold
SECTION_KEYS = {"prune": {"ratio", "granularity", "criterion", "round_to", "drop_blocks", "heads", "schedule",
                          "epochs", "lr"},
                "quantize": {"bits", "encoding", "kmeans_init", "share_biases"}, "finetune": {"epochs", "lr"}}
LAYER_KEYS = {"ratio", "bits", "encoding"}
ENCODINGS = ("grid", "codebook")  # a uniform grid (INT8 containers in ONNX), or a k-means codebook (storage)
SCHEDULES = ("one_shot", "gradual", "iterative")  # how a trial prunes (mcp.pruning.schedules)
# A start (uniform recipe, Deep Compression's allocation) removing less than this share of the
# weights prunes at once where the space allows it. A judgement from two ends: at 97% (MNIST,
# LeNet-300-100, 4-bit codebooks) pruning at once lost 6.5 points to pruning over 80 float32
# epochs (docs/results.md); on the digits at 10% of float32 (starts at 0-79%) one-shot starts
# lose nothing against gradual ones and take a fraction of the time (benchmarks/main_job.py).
GRADUAL_FROM = 0.9


@dataclass(frozen=True)
class Space:
    source: str
    ratio: tuple[float, float]
    bits: tuple[int, ...]
    granularity: tuple[str, ...]
    criterion: tuple[str, ...]
    epochs: tuple[int, int]
    lr: tuple[float, float]
    units: dict[str, tuple[str, ...]] = field(default_factory=dict)  # sampled unit -> its layers
    ratio_of: dict[str, tuple[float, float]] = field(default_factory=dict)  # unit -> its ratio range
    bits_of: dict[str, tuple[int, ...]] = field(default_factory=dict)  # unit -> its bit choices
    round_to: tuple[int, ...] = (1,)  # structured: channel counts kept at multiples of one of these
    drop_blocks: tuple[int, int] = (0, 0)  # depth: how many whole blocks to remove, least important first
    heads: tuple[float, float] = (0.0, 0.0)  # share of whole heads removed, sampled per attention module
    attention: dict[str, int] = field(default_factory=dict)  # attention module -> its heads (heads.<name> params)
    encoding_of: dict[str, tuple[str, ...]] = field(default_factory=dict)  # unit -> its encodings (default: grid)
    kmeans_init: tuple[str, ...] = ("linear",)  # the codebooks' initialisation choices
    schedule: tuple[str, ...] = ("one_shot",)  # how a trial prunes: at once, or while fine-tuning in float32
    prune_epochs: tuple[int, int] = (0, 0)  # a gradual or iterative trial's float32 epochs
    share_biases: tuple[bool, ...] = (False,)  # whether codebook layers' biases take codebooks of their own
    prune_lr: tuple[float, float] = (0.0, 0.0)  # a gradual or iterative trial's float32 learning rate range
    starts: tuple[str, ...] = ("uniform",)  # the starting trials: uniform, and global (Deep Compression's allocation)

    @property
    def gradual(self) -> bool:
        """Whether a trial may prune while it trains (its ratios rising over ``prune_epochs``)."""
        return any(s != "one_shot" for s in self.schedule)

    def encodings_of(self, unit: str) -> tuple[str, ...]:
        return self.encoding_of.get(unit, ("grid",))

    @property
    def codebooks(self) -> bool:
        """Whether any layer may take a codebook (a storage format, not INT8-deployable)."""
        return any("codebook" in self.encodings_of(u) for u in self.units)


@dataclass(frozen=True)
class TrialConfig:
    ratios: dict[str, float]
    bits: dict[str, int]
    granularity: str
    criterion: str
    epochs: int
    lr: float
    round_to: int = 1
    drop_blocks: int = 0
    heads: dict[str, float] = field(default_factory=dict)  # attention module -> share of its heads removed
    encodings: dict[str, str] = field(default_factory=dict)  # layer -> grid or codebook (absent: grid)
    kmeans_init: str = "linear"
    schedule: str = "one_shot"  # one_shot: pruned at once; gradual, iterative: over prune_epochs of float32 training
    prune_epochs: int = 0
    share_biases: bool = False  # codebook layers' biases in codebooks of their own (else float32)
    prune_lr: float = 0.0  # the learning rate of those prune_epochs

    @property
    def codebook_layers(self) -> tuple[str, ...]:
        return tuple(n for n, e in self.encodings.items() if e == "codebook")


def _range(where: str, value: Any, low: float, high: float, kind: type) -> tuple:
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise ConfigError(f"{where}={value!r} must be a [low, high] range")
    try:
        lo, hi = kind(value[0]), kind(value[1])
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={value!r} must hold two numbers") from None
    if lo > hi:
        raise ConfigError(f"{where}={value!r} is an empty range (low above high)")
    if lo < low or hi > high or (kind is float and high == 1.0 and hi >= 1.0):
        allowed = f"[{low}, {high})" if kind is float and high == 1.0 else f"[{low}, {high}]"
        raise ConfigError(f"{where}={value!r} is outside {allowed}")
    return lo, hi


def _bits(where: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{where}={value!r} must be a non-empty list of bit-widths")
    for b in value:
        if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8:
            raise ConfigError(f"{where}: bits {b!r} are outside the allowed bit-widths 2-8")
    return tuple(sorted(set(value)))


def _choices(where: str, value: Any, allowed: Sequence[str]) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{where}={value!r} must be a non-empty list; choose from: {', '.join(allowed)}")
    bad = [v for v in value if v not in allowed]
    if bad:
        raise ConfigError(f"{where}: {bad[0]!r} is not allowed; choose from: {', '.join(allowed)}")
    return tuple(value)


def _unknown(where: str, keys: Any, allowed: set[str]) -> None:
    extra = sorted(set(keys) - allowed)
    if extra:
        raise ConfigError(f"unknown key {extra[0]!r} in {where}; allowed keys: {', '.join(sorted(allowed))}")


def read_space_file(path: str | Path) -> dict[str, Any]:
    return read_config_file(path)


def space_file_for(model: str) -> Path:
    """The family file whose ``models`` lists ``model``, else ``default.yaml``."""
    for path in sorted(SPACES_DIR.glob("*.yaml")):
        if path.name != "default.yaml" and model in (read_space_file(path).get("models") or []):
            return path
    return SPACES_DIR / "default.yaml"


def space_names() -> list[str]:
    """The names of the shipped spaces (``default``, ``structured``, ...)."""
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def resolve_space(space: str | Path, model: str = "") -> Path:
    """The YAML file of ``space``: a shipped space's name (``default``, ``structured``, ...),
    else a path to a YAML file; empty: the family file of ``model`` (:func:`space_file_for`)."""
    text = str(space).strip()
    if not text:
        return space_file_for(model)
    if text in space_names():
        return SPACES_DIR / f"{text}.yaml"
    path = Path(text).expanduser()
    if not path.is_file():
        hint = f" (did you mean {path.stem!r}?)" if path.stem in space_names() else ""
        raise ConfigError(f"search space {text!r} does not exist: name a YAML file or a shipped space: "
                          f"{', '.join(space_names())}{hint}")
    return path


def build_space(data: Mapping[str, Any], layers: Sequence[str], source: str = "space",
                attention: Mapping[str, int] | None = None) -> Space:
    """Validate ``data`` against the model's prunable ``layers`` (in execution order) and
    its ``attention`` modules (name -> heads: ``prune.heads`` samples how many each loses)."""
    _unknown(source, data, TOP_KEYS)
    sections = {}
    for name, keys in SECTION_KEYS.items():
        section = data.get(name) or {}
        if not isinstance(section, Mapping):
            raise ConfigError(f"{source}: {name} must be a mapping")
        _unknown(f"{source}: {name}", section, keys)
        sections[name] = section
    prune, quant, tune = sections["prune"], sections["quantize"], sections["finetune"]
    ratio = _range(f"{source}: prune.ratio", prune.get("ratio", [0.0, 0.9]), 0.0, 1.0, float)
    bits = _bits(f"{source}: quantize.bits", quant.get("bits", [4, 8]))
    granularity = _choices(f"{source}: prune.granularity", prune.get("granularity", ["unstructured"]), GRANULARITIES)
    criterion = _choices(f"{source}: prune.criterion", prune.get("criterion", ["magnitude"]), CRITERIA)
    round_to = prune.get("round_to", [1])
    if (not isinstance(round_to, (list, tuple)) or not round_to
            or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in round_to)):
        raise ConfigError(f"{source}: prune.round_to={round_to!r} must be a non-empty list of whole numbers, 1 or more")
    if max(round_to) > 1 and "structured" not in granularity:
        raise ConfigError(f"{source}: prune.round_to={round_to!r} rounds channel counts: it needs granularity "
                          f"structured")
    drop_blocks = _range(f"{source}: prune.drop_blocks", prune.get("drop_blocks", [0, 0]), 0, 1000, int)
    heads = _range(f"{source}: prune.heads", prune.get("heads", [0.0, 0.0]), 0.0, 1.0, float)
    if heads[1] > 0 and granularity != ("structured",):
        raise ConfigError(f"{source}: prune.heads={list(heads)} removes whole attention heads: it needs granularity "
                          f"[structured] alone (got {list(granularity)})")
    if heads[1] > 0 and not attention:
        raise ConfigError(f"{source}: prune.heads={list(heads)} removes attention heads, but this model has no "
                          f"attention module (one with a qkv Linear and num_heads, as timm's ViT, DeiT)")
    encodings = _choices(f"{source}: quantize.encoding", quant.get("encoding", ["grid"]), ENCODINGS)
    kmeans_init = _choices(f"{source}: quantize.kmeans_init", quant.get("kmeans_init", ["linear"]), KMEANS_INITS)
    share_biases = quant.get("share_biases", [False])
    if (not isinstance(share_biases, (list, tuple)) or not share_biases
            or any(not isinstance(v, bool) for v in share_biases)):
        raise ConfigError(f"{source}: quantize.share_biases={share_biases!r} must be a non-empty list of true "
                          f"and/or false")
    if True in share_biases and "codebook" not in encodings and not any(
            "codebook" in (v or {}).get("encoding", ()) for v in (data.get("layers") or {}).values()
            if isinstance(v, Mapping)):
        raise ConfigError(f"{source}: quantize.share_biases={list(share_biases)} gives codebook layers' biases "
                          f"codebooks: no layer may take encoding codebook")
    epochs = _range(f"{source}: finetune.epochs", tune.get("epochs", [1, 3]), 0, 1000, int)
    schedule = _choices(f"{source}: prune.schedule", prune.get("schedule", ["one_shot"]), SCHEDULES)
    gradual = any(s != "one_shot" for s in schedule)
    for key in ("epochs", "lr"):
        if key in prune and not gradual:
            raise ConfigError(f"{source}: prune.{key}={prune[key]!r} is for a gradual or iterative schedule: "
                              f"prune.schedule {list(schedule)} has none")
    prune_epochs = _range(f"{source}: prune.epochs", prune.get("epochs", [10, 10]), 1, 1000, int) if gradual else (0, 0)
    if gradual and granularity != ("unstructured",):
        raise ConfigError(f"{source}: prune.schedule {list(schedule)} prunes while it trains in a trial: it needs "
                          f"granularity [unstructured] alone (got {list(granularity)})")
    lr = _range(f"{source}: finetune.lr", tune.get("lr", [0.001, 0.01]), 1e-7, 10.0, float)
    prune_lr = _range(f"{source}: prune.lr", prune.get("lr", list(lr)), 1e-7, 10.0, float) if gradual else (0.0, 0.0)
    starts = _choices(f"{source}: starts", data.get("starts", ["uniform"]), STARTS)
    if "global" in starts and granularity[0] != "unstructured":
        raise ConfigError(f"{source}: starts {list(starts)}: a global start shares one magnitude threshold between "
                          f"layers' weights; it needs granularity unstructured first (got {list(granularity)})")

    groups = data.get("groups") or {}
    if not isinstance(groups, Mapping):
        raise ConfigError(f"{source}: groups must map a group name to a list of layer patterns")
    units: dict[str, tuple[str, ...]] = {}
    grouped: set[str] = set()
    for group, patterns in groups.items():
        if not isinstance(patterns, (list, tuple)) or not patterns:
            raise ConfigError(f"{source}: group {group!r} must list layer names or patterns")
        exact = [str(p) for p in patterns if not any(c in str(p) for c in "*?[")]
        missing = [p for p in exact if p not in layers]
        if missing:
            raise ConfigError(f"{source}: group {group!r} names unknown layer {missing[0]!r}; "
                              f"this model's layers: {', '.join(layers)}")
        members = tuple(n for n in layers if any(fnmatch.fnmatchcase(n, str(p)) for p in patterns))
        # a pattern group that matches nothing (a stage this model lacks) is skipped
        units[str(group)] = tuple(n for n in members if n not in grouped)
        grouped.update(members)
    for n in layers:
        if n not in grouped:
            units[n] = (n,)
    units = {u: members for u, members in units.items() if members}

    ratio_of = {u: ratio for u in units}
    bits_of = {u: bits for u in units}
    encoding_of = {u: encodings for u in units}
    overrides = data.get("layers") or {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{source}: layers must map layer (or group) names to {{ratio, bits, encoding}}")
    for name, values in overrides.items():
        if name not in units:
            raise ConfigError(f"{source}: unknown layer {name!r}; choose from: {', '.join(units)}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: layers.{name} must be a mapping with ratio and/or bits")
        _unknown(f"{source}: layers.{name}", values, LAYER_KEYS)
        if "ratio" in values:
            ratio_of[name] = _range(f"{source}: layers.{name}.ratio", values["ratio"], 0.0, 1.0, float)
        if "bits" in values:
            bits_of[name] = _bits(f"{source}: layers.{name}.bits", values["bits"])
        if "encoding" in values:
            encoding_of[name] = _choices(f"{source}: layers.{name}.encoding", values["encoding"], ENCODINGS)
    if "codebook" in {e for choices in encoding_of.values() for e in choices} and granularity != ("unstructured",):
        raise ConfigError(f"{source}: quantize.encoding codebook shares the weights a layer keeps; it needs "
                          f"granularity [unstructured] alone (got {list(granularity)})")
    return Space(source, ratio, bits, granularity, criterion, epochs, lr, units, ratio_of, bits_of,
                 tuple(sorted(set(round_to))), drop_blocks, heads, dict(attention or {}) if heads[1] > 0 else {},
                 encoding_of, kmeans_init, schedule, prune_epochs, tuple(dict.fromkeys(share_biases)), prune_lr,
                 tuple(dict.fromkeys(starts)))


def sample(trial, space: Space) -> TrialConfig:
    """Ask an Optuna trial for one configuration of ``space``."""
    ratios: dict[str, float] = {}
    bits: dict[str, int] = {}
    encodings: dict[str, str] = {}
    for unit, members in space.units.items():
        lo, hi = space.ratio_of[unit]
        r = trial.suggest_float(f"ratio.{unit}", lo, hi) if hi > lo else lo
        choices = space.bits_of[unit]
        b = trial.suggest_categorical(f"bits.{unit}", list(choices)) if len(choices) > 1 else choices[0]
        kinds = space.encodings_of(unit)
        e = trial.suggest_categorical(f"encoding.{unit}", list(kinds)) if len(kinds) > 1 else kinds[0]
        for layer in members:
            ratios[layer], bits[layer], encodings[layer] = float(r), int(b), str(e)
    granularity = (trial.suggest_categorical("granularity", list(space.granularity))
                   if len(space.granularity) > 1 else space.granularity[0])
    criterion = (trial.suggest_categorical("criterion", list(space.criterion))
                 if len(space.criterion) > 1 else space.criterion[0])
    lo, hi = space.epochs
    epochs = trial.suggest_int("epochs", lo, hi) if hi > lo else lo
    lr_lo, lr_hi = space.lr
    lr = trial.suggest_float("lr", lr_lo, lr_hi, log=True) if lr_hi > lr_lo else lr_lo
    round_to = (trial.suggest_categorical("round_to", list(space.round_to)) if len(space.round_to) > 1
                else space.round_to[0])
    lo, hi = space.drop_blocks
    drop = trial.suggest_int("drop_blocks", lo, hi) if hi > lo else lo
    heads = {}
    for name, count in space.attention.items():  # whole heads removed, a whole number per module
        least, most = head_span(space, name)
        removed = trial.suggest_int(f"heads.{name}", least, most) if most > least else least
        heads[name] = removed / count
    init = (trial.suggest_categorical("kmeans_init", list(space.kmeans_init))
            if len(space.kmeans_init) > 1 and "codebook" in encodings.values() else space.kmeans_init[0])
    shared = (trial.suggest_categorical("share_biases", list(space.share_biases))
              if len(space.share_biases) > 1 and "codebook" in encodings.values() else space.share_biases[0])
    schedule = (trial.suggest_categorical("schedule", list(space.schedule)) if len(space.schedule) > 1
                else space.schedule[0])
    lo, hi = space.prune_epochs
    prune_epochs = 0 if schedule == "one_shot" else trial.suggest_int("prune_epochs", lo, hi) if hi > lo else lo
    lo, hi = space.prune_lr
    prune_lr = 0.0 if schedule == "one_shot" else trial.suggest_float("prune_lr", lo, hi, log=True) if hi > lo else lo
    return TrialConfig(ratios, bits, granularity, criterion, epochs, lr,
                       int(round_to) if granularity == "structured" else 1, int(drop), heads, encodings, init,
                       schedule, int(prune_epochs), bool(shared), float(prune_lr))


def start_schedule(space: Space, sparsity: float) -> str:
    """The schedule a start (a uniform recipe, Deep Compression's allocation) that removes
    ``sparsity`` of the weights takes: at once (``one_shot``, where the space allows it)
    below :data:`GRADUAL_FROM`, where pruning at once costs little and float32 epochs
    would be spent for nothing; else the space's first schedule."""
    return "one_shot" if "one_shot" in space.schedule and sparsity < GRADUAL_FROM else space.schedule[0]


def first_schedule(space: Space, sparsity: float = 1.0) -> tuple[str, int]:
    """The schedule a start that removes ``sparsity`` takes (:func:`start_schedule`),
    over the space's most epochs when it prunes while it trains."""
    schedule = start_schedule(space, sparsity)
    return schedule, 0 if schedule == "one_shot" else space.prune_epochs[1]


def first_prune_lr(space: Space, sparsity: float = 1.0) -> float:
    """The float32 learning rate such a start prunes at: the geometric mean of the range."""
    return 0.0 if start_schedule(space, sparsity) == "one_shot" else math.sqrt(space.prune_lr[0] * space.prune_lr[1])


def uniform(space: Space, ratio: float, bits: int, epochs: int, lr: float) -> TrialConfig:
    """The same ratio and bit-width in every layer (the baseline a search must beat)."""
    layers = [n for members in space.units.values() for n in members]
    return TrialConfig({n: ratio for n in layers}, {n: bits for n in layers}, space.granularity[0],
                       space.criterion[0], epochs, lr, space.round_to[0] if space.granularity[0] == "structured" else 1,
                       space.drop_blocks[0], least_heads(space), first_encodings(space), space.kmeans_init[0],
                       *first_schedule(space, ratio), space.share_biases[0], first_prune_lr(space, ratio))


def first_encodings(space: Space) -> dict[str, str]:
    """Every layer at its unit's first encoding: what uniform starts take."""
    return {n: space.encodings_of(u)[0] for u, members in space.units.items() for n in members}


def allowed_bits(choices: Sequence[int], bits: int) -> int:
    """The bit-width a unit allowing ``choices`` takes for ``bits``: itself, else the next
    wider choice, else its widest."""
    return bits if bits in choices else min((b for b in choices if b > bits), default=max(choices))


def clipped_ratio(space: Space, unit: str, ratio: float) -> float:
    lo, hi = space.ratio_of[unit]
    return min(max(ratio, lo), hi)


def uniform_where_allowed(space: Space, ratio: float, bits: int, epochs: int, lr: float,
                          drop_blocks: int | None = None) -> TrialConfig:
    """Uniform where the space allows it: every unit at ``ratio`` clipped to its range and
    at ``bits`` (or the next wider bit-width it allows): the closest a space that caps a
    layer (a ResNet's stem, say) comes to one ratio and one bit-width everywhere; with
    ``drop_blocks`` blocks removed first (default: the fewest the space allows)."""
    ratios, widths = {}, {}
    for unit, members in space.units.items():
        for n in members:
            ratios[n], widths[n] = clipped_ratio(space, unit, ratio), allowed_bits(space.bits_of[unit], bits)
    return TrialConfig(ratios, widths, space.granularity[0], space.criterion[0], epochs, lr,
                       space.round_to[0] if space.granularity[0] == "structured" else 1,
                       space.drop_blocks[0] if drop_blocks is None else drop_blocks, least_heads(space),
                       first_encodings(space), space.kmeans_init[0], *first_schedule(space, ratio),
                       space.share_biases[0], first_prune_lr(space, ratio))


def head_span(space: Space, name: str) -> tuple[int, int]:
    """The fewest and most whole heads module ``name`` may lose: ``prune.heads``' shares of
    its heads, rounded inwards (at least one head is always left)."""
    count = space.attention[name]
    return math.ceil(space.heads[0] * count - 1e-9), min(math.floor(space.heads[1] * count + 1e-9), count - 1)


def least_heads(space: Space, most: bool = False) -> dict[str, float]:
    """Each attention module at the fewest (``most``: the most) heads removed that the space
    allows, as the share of its heads that :class:`mcp.pruning.PruneSpec` takes."""
    return {name: head_span(space, name)[int(most)] / count for name, count in space.attention.items()}
