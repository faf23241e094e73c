"""One schema for what mcp writes to MLflow: run tag keys, aliases, registered-model names
and ``models:/`` URIs. Every stage names them from here, so a key is spelled once.

Run tags carry the ``mcp.`` prefix; registered versions carry the same facts under short
keys (``parent_model``, ``deploy_format``, ...) because the registry shows them beside the
version, where the prefix would only add noise."""

from __future__ import annotations

# Run tags
STAGE = "mcp.stage"  # train, prune, sensitivity, quantize, distill, export, search, benchmark, pipeline
PARENT_MODEL = "mcp.parent_model"  # the model URI a stage started from
MODEL = "mcp.model"  # architecture name
DATASET = "mcp.dataset"
DEPLOY_FORMAT = "mcp.deploy_format"  # onnx_fp32, onnx_int8_weights, onnx_qdq_int8, onnx_dynamic_int8
DEPLOY_NOTE = "mcp.deploy_note"
RUNTIME = "mcp.runtime"  # where the deployed file runs: onnxruntime, openvino, openvino-bf16 (mcp.deploy.runtimes)
RUNTIME_SETTINGS = "mcp.runtime_settings"  # how: threads, streams, precision, as the runtime is told them
QUANT_METHOD = "mcp.quant_method"
BITS = "mcp.bits"
TEACHER = "mcp.teacher"
DISTILL_FROM = "mcp.distill_from"
COMPARE = "mcp.compare"
STUDY_NAME = "mcp.study_name"
SEARCH_MODE = "mcp.search_mode"
SPACE = "mcp.space"
TRIAL_NUMBER = "mcp.trial_number"
TRIAL_STATE = "mcp.trial_state"  # complete, pruned, infeasible, failed
WITHIN_BUDGET = "mcp.within_budget"
LABEL = "mcp.label"
CHAMPION = "mcp.champion"
RESUMED_FROM_RUN = "mcp.resumed_from_run"
TRUST_PICKLED_MODEL = "mcp.trust_pickled_model"  # the user let a pickled model run its code
SOURCE = "mcp.source"  # where an imported model came from: a zoo name or package.module:factory
WEIGHTS = "mcp.weights"  # the weights file an imported model was loaded from
API = "mcp.api"  # the run is a call of the Python API (mcp.prune, ...)
BASELINE_MODEL = "mcp.baseline_model"  # the baseline the run's *_vs_baseline figures compare with
BASELINE_FALLBACK = "mcp.baseline_fallback"  # why the parent stands in: its lineage has no registered baseline
UNIFORM_START = "mcp.uniform_start"  # the uniform trial(s) a new study was seeded with
UNIFORM_WARNING = "mcp.uniform_warning"  # why no (strictly) uniform trial could be seeded
TEST_FINGERPRINT = "mcp.test_fingerprint"  # of the test set a registered model was measured on (mcp.data.split)

# What a stage made is compared with the model it started from (its parent: ``compression_ratio``,
# ``accuracy_drop``) and with the baseline its lineage starts from (``*_vs_baseline``): the version
# that a train or import stage registered, or that holds the ``baseline`` alias, found by following
# ``parent_model`` links. Versions carry the same facts under short keys.
BASELINE_MODEL_KEY = "baseline_model"
BASELINE_FALLBACK_KEY = "baseline_fallback"
ROOT_STAGES = ("train", "import")  # stages whose versions start a lineage

# Aliases of registered versions
BASELINE = "baseline"
CHALLENGER = "challenger"
CHAMPION_ALIAS = "champion"

MODELS_SCHEME = "models:/"


def registered_name(model: str, dataset: str) -> str:
    """Registry naming convention: ``<model>-<dataset>``."""
    return f"{model}-{dataset}"


def version_uri(name: str, version: str | int) -> str:
    """``models:/<name>/<version>``."""
    return f"{MODELS_SCHEME}{name}/{version}"


def alias_uri(name: str, alias: str) -> str:
    """``models:/<name>@<alias>``."""
    return f"{MODELS_SCHEME}{name}@{alias}"


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, version or None, alias or None) of a ``models:/`` URI; ValueError otherwise."""
    if not uri.startswith(MODELS_SCHEME):
        raise ValueError(f"{uri!r} is not a models:/ URI")
    rest = uri.removeprefix(MODELS_SCHEME)
    if "@" in rest:
        name, _, alias = rest.partition("@")
        return name, None, alias
    name, _, version = rest.partition("/")
    return name, (version or None), None


def registered_name_of(uri: str) -> str | None:
    """The registered model a ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` URI
    names, else None (MLflow 3's logged models, ``models:/m-<id>``, are not registered)."""
    if not uri.startswith(MODELS_SCHEME):
        return None
    name, version, alias = parse_models_uri(uri)
    return name if (version or alias) else None
