"""An Optuna study of the search, apart from any tracking: its storage, sampler and pruner,
the settings it records and refuses to resume under others, the space check and the
budget. The stage (:mod:`mcp.stages.search`) makes its runs."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from mcp.config import SearchConfig
from mcp.data.calibration import calibration_batches
from mcp.errors import ConfigError, McpError
from mcp.evaluation.metrics import size_bytes_fp32
from mcp.locking import sqlite_lock
from mcp.models import create_model
from mcp.pruning import PruneSpec, Pruning
from mcp.pruning.depth import removable_blocks
from mcp.pruning.pruner import attention_modules, layers_in_order
from mcp.tuner import uniform
from mcp.tuner.claims import engine_kwargs
from mcp.tuner.space import build_space, least_heads, read_space_file, resolve_space
from mcp.tuner.trial import smallest_latency, smallest_size

SIZE_KEY = {"compressed": "size_bytes_compressed", "onnx": "size_bytes_onnx"}  # what --budget-on measures
# Filling aims this far under the budget: fine-tuning moves a few weights onto or off zero,
# which changes the encoded size by some bytes (measured: -10 to +2 at 20 KB)
FILL_SLACK = 0.002


def study_directions(pareto: bool, latency: bool) -> list[str]:
    """Accuracy up; in pareto mode also size down, and latency down when it is an objective."""
    return ["maximize", "minimize"] + (["minimize"] if latency else []) if pareto else ["maximize"]


def budget_excess(size: float, budget: float | None) -> float:
    """Bytes over the budget: <= 0 is within it (-1 when there is no budget). The one test
    of "within the budget" that trials, winners and the pipeline's champion all use."""
    return float(size) - budget if budget else -1.0


def within_budget(size: float, budget: float | None) -> bool:
    return budget_excess(size, budget) <= 0


def load_space(cfg: SearchConfig, model, input_shape):
    arch = str(getattr(model, "mcp_recipe", {}).get("name", cfg.model))  # an imported model: default.yaml
    path = resolve_space(cfg.space, arch)  # a shipped space's name, a YAML file, or the family's file
    layers = [n for n, _ in layers_in_order(model, input_shape)]
    heads = {name: m.num_heads for name, m in attention_modules(model).items()}
    space = build_space(read_space_file(path), layers, path.name, heads)
    return (int8_only(space) if cfg.deployable == "int8" else space), path


def int8_only(space):
    """``space`` with only the encodings ONNX Runtime runs as INT8 (uniform grids); a layer
    that allows nothing else is refused, naming it."""
    only = [u for u in space.units if "grid" not in space.encodings_of(u)]
    if only:
        raise ConfigError(f"{space.source}: --deployable int8 keeps uniform grids only, but {only[0]} allows only "
                          f"{', '.join(space.encodings_of(only[0]))}; add grid to its encodings or use "
                          f"--deployable any")
    return replace(space, encoding_of={u: ("grid",) for u in space.units}, share_biases=(False,))


SETTINGS_ATTR = "mcp_settings"  # the study's user attribute: what its trial values were measured under


def study_settings(cfg: SearchConfig, checked: "Checked") -> dict[str, Any]:
    """What makes two calls' trials comparable: the space (its file's content), what the
    budget measures and its bytes, and the pareto objectives."""
    import hashlib

    return {"space_sha256": hashlib.sha256(checked.space_path.read_bytes()).hexdigest()[:16],
            "space_file": checked.space_path.name, "budget_on": cfg.budget_on,
            "budget_bytes": round(checked.budget or 0), "latency": cfg.latency, "budget_ms": cfg.budget_ms,
            "budget_batch": cfg.budget_batch,
            "latency_runtime": cfg.runtime if cfg.budget_ms or cfg.latency else "",  # where latencies are timed
            "deployable": cfg.deployable}


STALE_HEARTBEATS = 3  # a running trial silent for this many heartbeats is stale (its worker died)


_STORAGES: dict[tuple[str, int], Any] = {}


def _storage(url: str, heartbeat: float):
    """Optuna's RDB storage with heartbeats: a trial whose worker was killed (kill -9, a
    lost host) stops beating, and the next worker to look fails it and enqueues it again
    once (``RetryHeartbeatStaleTrialCallback``), so the study never waits on it. Workers
    that start together on a fresh database all create Optuna's tables: the losers of
    that race retry and find them. One storage per URL and process."""
    import inspect
    import time
    import warnings

    import optuna

    key = (url, max(1, round(heartbeat)))
    if key in _STORAGES:
        return _STORAGES[key]
    # Optuna 4.9 renamed the callback (the old name warns); both requeue a stale trial once
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback
    callback = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in
                inspect.signature(optuna.storages.RDBStorage).parameters else "failed_trial_callback")
    for attempt in range(6):
        try:
            with warnings.catch_warnings(), sqlite_lock(url):
                # both are marked experimental in Optuna; a warning on every call is noise
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs(url), heartbeat_interval=key[1],
                    grace_period=max(2, round(STALE_HEARTBEATS * heartbeat)), **{callback: retry(max_retry=1)})
            break
        except Exception as exc:  # noqa: BLE001 - only the table-creation race is retried
            text = f"{type(exc).__name__} {exc}"
            if attempt == 5 or not any(s in text for s in ("IntegrityError", "already exists", "locked",
                                                           "UniqueViolation", "duplicate key")):
                raise
            time.sleep(0.3 * (attempt + 1))
    _STORAGES[key] = storage
    return storage


def forget_storage(url: str) -> None:
    """Close the storage of ``url`` this process opened (its engine's connections)."""
    for key in [k for k in _STORAGES if k[0] == url]:
        engine = getattr(_STORAGES.pop(key), "engine", None)
        if engine is not None:
            engine.dispose()


def default_storage(tracking_uri: str) -> str:
    """The study lives beside the runs it refers to: ``optuna.db`` next to a SQLite
    tracking database (or a local ``mlruns`` folder). A tracking server or any other store
    has no such place, so ``--storage`` must name the database its workers share."""
    from urllib.parse import urlparse

    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri[len('sqlite:///'):]).parent / 'optuna.db'}"
    parsed = urlparse(tracking_uri)
    if parsed.scheme in ("", "file") and not tracking_uri.startswith("databricks"):
        return f"sqlite:///{Path(parsed.path or tracking_uri).parent / 'optuna.db'}"
    raise ConfigError(f"storage='' needs a local tracking store to put the study beside, and the tracking URI is "
                      f"{tracking_uri!r}; pass --storage with the database every worker shares, e.g. "
                      f"postgresql://user:password@host/optuna")


def fail_stale_trials(study, url: str, heartbeat: float, claim: Callable[[str], bool]) -> list:
    """Fail the study's stale running trials (their worker stopped beating) and queue each
    once more, as Optuna's ``fail_stale_trials`` does, but only those this call fails, and
    each by one worker: ``claim(f"fail-<number>")`` must succeed first (on SQLite two
    workers could otherwise both fail a trial and queue it twice). Returns those trials."""
    import copy
    import warnings

    import optuna

    storage = _storage(url, heartbeat)
    study_id = storage.get_study_id_from_name(study.study_name)
    failed = []
    for trial_id in storage._get_stale_trial_ids(study_id):  # Optuna's own test of a trial's silence
        if not claim(f"fail-{storage.get_trial_number_from_id(trial_id)}"):
            continue
        try:
            if not storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        trial = copy.deepcopy(storage.get_trial(trial_id))
        callback = storage.get_heartbeat_stale_trial_callback()
        if callback is not None:
            with warnings.catch_warnings():  # experimental in Optuna: no warning on every open
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                callback(study, trial)
        failed.append(trial)
    return failed


def open_study(cfg: SearchConfig, checked: "Checked", base_uri: str = ""):
    """Create the study, or load it to resume (same name and storage). Resuming one
    created under other settings (space, budget, objectives) or from another starting
    model is refused in one line: its trial values would not compare."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def constraints(trial) -> list[float]:  # <= 0: within the budget
        return [float(trial.user_attrs.get("budget_excess", 0.0)), float(trial.user_attrs.get("latency_excess", 0.0))]

    # Optuna 5 takes constraints from trial.set_constraint; older versions from the sampler's constraints_func
    budget = checked.budget
    constraint = constraints if (budget or cfg.budget_ms) and not hasattr(optuna.trial.Trial, "set_constraint") else None
    if cfg.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=cfg.seed, constraints_func=constraint,
                                                population_size=max(4, min(50, cfg.trials)))
    else:
        sampler = optuna.samplers.TPESampler(seed=cfg.seed, constraints_func=constraint,
                                             n_startup_trials=min(10, max(2, cfg.trials // 3)))
    pruner = {"median": optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
              "halving": optuna.pruners.SuccessiveHalvingPruner(),
              "none": optuna.pruners.NopPruner()}[cfg.pruner]
    directions = study_directions(cfg.mode == "pareto", cfg.latency)
    try:
        study = optuna.create_study(storage=_storage(cfg.storage, cfg.heartbeat), sampler=sampler, pruner=pruner,
                                    study_name=cfg.name(), directions=directions, load_if_exists=True)
    except Exception as exc:  # noqa: BLE001 - storage URLs fail in many ways (SQLAlchemy, Optuna)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise McpError(f"cannot open study {cfg.name()!r} in storage {cfg.storage!r}: {first[:200]}") from None
    if [d.name.lower() for d in study.directions] != directions:
        raise McpError(f"study {cfg.name()!r} in {cfg.storage!r} was created for another mode; "
                       f"use --study-name to start a new one")
    settings = study_settings(cfg, checked)
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is None:
        study.set_user_attr(SETTINGS_ATTR, settings)
    else:
        timed = "onnxruntime" if stored.get("budget_ms") or stored.get("latency") else ""  # before runtimes
        for key in ("space_sha256", "budget_on", "budget_bytes", "latency", "budget_ms", "budget_batch",
                    "latency_runtime", "deployable"):
            if stored.get(key, {"budget_ms": 0.0, "budget_batch": 1, "latency_runtime": timed,
                                "deployable": "any"}.get(key)) == settings[key]:
                continue
            what, was, now = key, stored.get(key), settings[key]
            if key == "space_sha256":
                what, was, now = "search space", stored.get("space_file"), settings["space_file"]
                now = now if was != now else f"{now}, edited since"
            raise McpError(f"study {cfg.name()!r} in {cfg.storage!r} was run with {what} {was!r}, this call has "
                           f"{now!r}; use --study-name to start a new study, or the first call's settings to "
                           f"resume it")
    remember_base(study, cfg, base_uri)
    return study


def remember_base(study, cfg: SearchConfig, base_uri: str) -> None:
    """Record the starting model on the study, or refuse to resume from another one."""
    if not base_uri:
        return  # its baseline is still to be trained: recorded once it is
    stored = study.user_attrs.get("mcp_base_model")
    if stored is None:
        study.set_user_attr("mcp_base_model", base_uri)
    elif stored != base_uri:
        raise McpError(f"study {cfg.name()!r} in {cfg.storage!r} searched from {stored}, this call starts from "
                       f"{base_uri}; use --study-name to start a new study, or --model-uri {stored} to resume it")


@dataclass
class Checked:
    """What a search needs, worked out (and every bad input refused) before any run starts."""

    space: Any
    space_path: Path
    calib: list  # the pruning criteria's calibration batches, fixed for the whole study
    budget: float | None  # bytes, as --budget-on measures them


def check_search(cfg: SearchConfig, splits, loaders, base) -> Checked:
    """Load and validate the space against the model (``base``, or a fresh one of its
    architecture), resolve the budget and refuse one the space cannot reach."""
    probe = copy.deepcopy(base) if base is not None else create_model(cfg.model, splits.num_classes,
                                                                      splits.input_shape)
    space, space_path = load_space(cfg, probe, splits.input_shape)
    for granularity in space.granularity:  # every criterion x granularity the space allows must work here
        for criterion in space.criterion:
            tc = uniform(space, 0.0, max(space.bits), 0, space.lr[0])
            Pruning(probe, splits.input_shape, PruneSpec(criterion=criterion, scope="layerwise",
                                                         granularity=granularity, ratios=tc.ratios,
                                                         head_ratios=least_heads(space, most=True)), [], "cpu")
    if space.drop_blocks[1]:
        blocks = removable_blocks(probe, splits.input_shape)
        if len(blocks) < space.drop_blocks[1]:
            raise ConfigError(f"{space_path.name}: prune.drop_blocks={list(space.drop_blocks)} removes up to "
                              f"{space.drop_blocks[1]} blocks, but this model has {len(blocks)} removable blocks"
                              + (f" ({', '.join(blocks)})" if blocks else ""))
    calib = calibration_batches(loaders[0], cfg.calib_batches)
    fp32 = size_bytes_fp32(probe)
    budget = cfg.budget_mb * 1e6 if cfg.budget_mb else (cfg.budget_ratio * fp32 if cfg.budget_ratio else None)
    if budget:
        reachable = smallest_size(probe, splits.input_shape, space, calib, "cpu", cfg.seed, cfg.budget_on)
        if reachable > budget:
            hint = ("; the ONNX file stores pruned zeros densely and bits below 8 in INT8, so use a structured "
                    "space such as --space structured, or --budget-on compressed"
                    if cfg.budget_on == "onnx" else "")
            raise ConfigError(f"budget {budget:,.0f} B is below the smallest size space {space_path.name!r} can "
                              f"reach ({reachable:,.0f} B measured as {cfg.budget_on}, every layer at its highest "
                              f"ratio and fewest bits){hint}; raise --budget-mb/--budget-ratio or widen the space")
    if cfg.budget_ms:
        fastest = smallest_latency(probe, splits.input_shape, space, calib, "cpu", cfg.budget_batch, cfg.runtime)
        if fastest > cfg.budget_ms:
            where = {"onnxruntime": "ONNX Runtime", "auto": "the fastest runtime's"}.get(cfg.runtime, cfg.runtime)
            raise ConfigError(f"budget_ms={cfg.budget_ms:g} is below the smallest latency space {space_path.name!r} "
                              f"can reach on this CPU ({fastest:.4f} ms: {where} p50 at batch "
                              f"{cfg.budget_batch}, one thread, every layer at its highest ratio, INT8 where "
                              f"faster); raise --budget-ms or widen the "
                              f"space (higher ratios, structured granularity)")
    return Checked(space, space_path, calib, budget)


def check_storage(url: str, heartbeat: float = 30.0) -> None:
    """Connect to the Optuna storage now (creating its tables), or fail in one line."""
    try:
        _storage(url, heartbeat)
    except Exception as exc:  # noqa: BLE001 - storage URLs fail in many ways (SQLAlchemy, Optuna)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise McpError(f"cannot open Optuna storage {url!r}: {first[:200]}") from None
