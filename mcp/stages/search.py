"""`mcp search`: an Optuna study over per-layer prune ratios and bit-widths.

Every trial is a nested MLflow run under the study's run, tagged with its state
(complete, pruned, infeasible, failed). A trial's compressed size is measured by
encoding its pruned and quantized weights before any fine-tuning; over the budget, it
is rejected there (and told to the sampler as a violated constraint). The winners (the
best feasible trial, or the feasible Pareto front) are rebuilt, fine-tuned, measured on
the test split and registered with the alias ``challenger``.
"""

from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mcp.config import SearchConfig
from mcp.errors import ConfigError, McpError

STATE_TAG = "mcp.trial_state"
SIZE_KEY = {"compressed": "size_bytes_compressed", "onnx": "size_bytes_onnx"}  # what --budget-on measures
# Filling aims this far under the budget: fine-tuning moves a few weights onto or off zero,
# which changes the encoded size by some bytes (measured: -10 to +2 at 20 KB)
FILL_SLACK = 0.002


@dataclass
class SearchResult:
    run_id: str
    study_name: str
    budget_bytes: float | None
    trials: list[dict[str, Any]]
    winners: list[dict[str, Any]]


def load_space(cfg: SearchConfig, model, input_shape):
    from mcp.pruning.pruner import layers_in_order
    from mcp.search.space import build_space, read_space_file, space_file_for

    path = Path(cfg.space) if cfg.space else space_file_for(cfg.model)
    if not path.is_file():
        raise ConfigError(f"search space {str(path)!r} does not exist")
    layers = [n for n, _ in layers_in_order(model, input_shape)]
    return build_space(read_space_file(path), layers, path.name), path


SETTINGS_ATTR = "mcp_settings"  # the study's user attribute: what its trial values were measured under


def study_settings(cfg: SearchConfig, checked: "Checked") -> dict[str, Any]:
    """What makes two calls' trials comparable: the space (its file's content), what the
    budget measures and its bytes, and the pareto objectives."""
    import hashlib

    return {"space_sha256": hashlib.sha256(checked.space_path.read_bytes()).hexdigest()[:16],
            "space_file": checked.space_path.name, "budget_on": cfg.budget_on,
            "budget_bytes": round(checked.budget or 0), "latency": cfg.latency}


def open_study(cfg: SearchConfig, checked: "Checked", base_uri: str = ""):
    """Create the study, or load it to resume (same name and storage). Resuming one
    created under other settings (space, budget, objectives) or from another starting
    model is refused in one line: its trial values would not compare."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def constraints(trial) -> list[float]:  # <= 0: within the budget
        return [float(trial.user_attrs.get("budget_excess", 0.0))]

    # Optuna 5 takes constraints from trial.set_constraint; older versions from the sampler's constraints_func
    budget = checked.budget
    constraint = constraints if budget and not hasattr(optuna.trial.Trial, "set_constraint") else None
    if cfg.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=cfg.seed, constraints_func=constraint,
                                                population_size=max(4, min(50, cfg.trials)))
    else:
        sampler = optuna.samplers.TPESampler(seed=cfg.seed, constraints_func=constraint,
                                             n_startup_trials=min(10, max(2, cfg.trials // 3)))
    pruner = {"median": optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
              "halving": optuna.pruners.SuccessiveHalvingPruner(),
              "none": optuna.pruners.NopPruner()}[cfg.pruner]
    directions = ["maximize"] if cfg.mode == "max-accuracy" else ["maximize", "minimize"] + (
        ["minimize"] if cfg.latency else [])
    try:
        study = optuna.create_study(storage=cfg.storage, sampler=sampler, pruner=pruner, study_name=cfg.name(),
                                    directions=directions, load_if_exists=True)
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
        for key in ("space_sha256", "budget_on", "budget_bytes", "latency"):
            if stored.get(key) == settings[key]:
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
    from mcp.evaluation.metrics import size_bytes_fp32
    from mcp.pruning import PruneSpec, Pruning
    from mcp.search import uniform
    from mcp.search.trial import smallest_size
    from mcp.stages.common import probe_model
    from mcp.stages.prune import calibration_batches

    probe = probe_model(base, cfg.model, splits)
    space, space_path = load_space(cfg, probe, splits.input_shape)
    for granularity in space.granularity:  # every criterion x granularity the space allows must work here
        for criterion in space.criterion:
            tc = uniform(space, 0.0, max(space.bits), 0, space.lr[0])
            Pruning(probe, splits.input_shape, PruneSpec(criterion=criterion, scope="layerwise",
                                                         granularity=granularity, ratios=tc.ratios), [], "cpu")
    calib = calibration_batches(loaders[0], cfg.calib_batches)
    fp32 = size_bytes_fp32(probe)
    budget = cfg.budget_mb * 1e6 if cfg.budget_mb else (cfg.budget_ratio * fp32 if cfg.budget_ratio else None)
    if budget:
        reachable = smallest_size(probe, splits.input_shape, space, calib, "cpu", cfg.seed, cfg.budget_on)
        if reachable > budget:
            hint = ("; the ONNX file stores pruned zeros densely and bits below 8 in INT8, so use a structured "
                    "space such as search_spaces/structured.yaml or --budget-on compressed"
                    if cfg.budget_on == "onnx" else "")
            raise ConfigError(f"budget {budget:,.0f} B is below the smallest size space {space_path.name!r} can "
                              f"reach ({reachable:,.0f} B measured as {cfg.budget_on}, every layer at its highest "
                              f"ratio and fewest bits){hint}; raise --budget-mb/--budget-ratio or widen the space")
    return Checked(space, space_path, calib, budget)


def check_storage(url: str) -> None:
    """Connect to the Optuna storage now (creating its tables), or fail in one line."""
    import optuna

    try:
        optuna.storages.get_storage(url)
    except Exception as exc:  # noqa: BLE001 - storage URLs fail in many ways (SQLAlchemy, Optuna)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise McpError(f"cannot open Optuna storage {url!r}: {first[:200]}") from None


def run_search(cfg: SearchConfig, show_progress: bool | None = None) -> SearchResult:
    from mcp import tracking
    from mcp.evaluation.metrics import size_bytes_fp32
    from mcp.stages.common import find_base_model, setup_data, train_baseline

    device, splits, loaders = setup_data(cfg)
    base, base_uri = find_base_model(cfg.model, cfg.model_uri, cfg.dataset, splits)
    checked = check_search(cfg, splits, loaders, base)
    space, space_path, budget = checked.space, checked.space_path, checked.budget
    study = open_study(cfg, checked, base_uri if base is not None else "")

    params = {**cfg.to_dict(), **{f"data_{k}": v for k, v in splits.summary().items()}, "device_resolved": device,
              "space_file": str(space_path), "budget_bytes": budget or 0, "study_trials_before": len(study.trials)}
    tags = {"mcp.model": cfg.model, "mcp.dataset": cfg.dataset, "mcp.parent_model": base_uri,
            "mcp.study_name": cfg.name(), "mcp.search_mode": cfg.mode}
    with tracking.stage_run("search", params, tags, run_name=f"search-{cfg.name()}") as run:
        tracking.runs.set_tag("mcp.space", space_path.read_text())
        if base is None:
            base, base_uri = train_baseline(cfg, show_progress)
            remember_base(study, cfg, base_uri)
        context = _Context(cfg, space, base, base_uri, splits, loaders, device, budget, study, checked.calib,
                           size_bytes_fp32(base))
        if not study.trials:
            _enqueue_uniform(context)
        _optimize(context, show_progress)
        trials = _trial_table(study, cfg.budget_on)
        winners = _winners(context, trials)
        _log_study(context, trials, winners)
        _deploy(context, winners, show_progress)
        return SearchResult(run.info.run_id, cfg.name(), budget, trials, winners)


@dataclass
class _Context:
    cfg: SearchConfig
    space: Any
    base: torch.nn.Module
    base_uri: str
    splits: Any
    loaders: Any
    device: str
    budget: float | None
    study: Any
    calib: list  # the pruning criteria's calibration batches, fixed for the whole study
    base_fp32: int  # the starting model's float32 size, for compression ratios


def _optimize(ctx: _Context, show_progress: bool | None) -> None:
    import optuna
    from tqdm.auto import tqdm

    from mcp import tracking
    from mcp.evaluation.metrics import count_params
    from mcp.search import sample
    from mcp.search.trial import fill_budget, finetune_quantized, measure_sizes, prune_candidate
    from mcp.training import evaluate

    cfg, shape, calib, on = ctx.cfg, ctx.splits.input_shape, ctx.calib, ctx.cfg.budget_on
    teacher = ctx.base if cfg.distill else None
    bar = tqdm(total=cfg.trials, desc=f"search {cfg.name()}", unit="trial",
               disable=None if show_progress is None else not show_progress)
    multi = cfg.mode == "pareto"

    def objective(trial):
        tc = sample(trial, ctx.space)
        outcome: list[Any] = []
        with tracking.stage_run("search", {"trial": trial.number, **trial.params},
                                {"mcp.study_name": cfg.name(), "mcp.trial_number": str(trial.number)},
                                run_name=f"trial-{trial.number}") as trial_run:
            trial.set_user_attr("mlflow_run_id", trial_run.info.run_id)
            try:
                if ctx.budget and cfg.fill_budget:
                    target = ctx.budget * (1 - FILL_SLACK)
                    tc = fill_budget(ctx.base, shape, ctx.space, tc, target, calib, ctx.device, cfg.seed,
                                     on=on) or tc  # None: even the highest ratios are over; rejected below
                trial.set_user_attr("ratios", tc.ratios)
                model = prune_candidate(ctx.base, shape, tc, calib, ctx.device)
                sizes = measure_sizes(model, shape, tc, cfg.seed, onnx=on == "onnx")
                size = sizes[SIZE_KEY[on]]
                excess = size - ctx.budget if ctx.budget else -1.0
                _constrain(trial, "budget_excess", excess)
                for key, value in sizes.items():
                    trial.set_user_attr(key, value)
                tracking.log_metrics({**sizes, **count_params(model)})
                if excess > 0:  # over the budget: rejected before any fine-tuning
                    _constrain(trial, "budget_excess_final", excess)
                    tracking.runs.set_tag(STATE_TAG, "infeasible")
                    trial.set_user_attr("state", "infeasible")
                    outcome = ([0.0, float(size)] + ([1e9] if cfg.latency else [])) if multi else [0.0]
                else:
                    def report(epoch: int, val_accuracy: float) -> None:
                        tracking.log_metrics({"val_accuracy": val_accuracy}, step=epoch)
                        if not multi:
                            trial.report(val_accuracy, epoch)
                            if trial.should_prune():
                                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

                    tuned = finetune_quantized(model, shape, tc, ctx.loaders, ctx.device, cfg.seed, report,
                                               distiller())
                    val = evaluate(tuned.model, ctx.loaders[1], ctx.device)["accuracy"]
                    # weights that QAT moved onto or off zero change the encoded size a little: measure again
                    sizes["size_bytes_compressed"] = float(len(tuned.payload))
                    size = sizes[SIZE_KEY[on]]
                    trial.set_user_attr("size_bytes_compressed", sizes["size_bytes_compressed"])
                    tracking.log_metrics({"val_accuracy_final": val, **sizes,
                                          "compression_ratio": ctx.base_fp32 / sizes["size_bytes_compressed"]})
                    excess = size - ctx.budget if ctx.budget else -1.0
                    state = "infeasible" if excess > 0 else "complete"  # over after fine-tuning: infeasible after all
                    _constrain(trial, "budget_excess_final", excess)
                    trial.set_user_attr("state", state)
                    outcome = [val, float(size)] if multi else [val]
                    if cfg.latency:
                        latency = _latency(tuned, shape)
                        trial.set_user_attr("latency_ms_p50_cpu", latency)
                        tracking.log_metrics({"latency_ms_p50_cpu": latency})
                        outcome.append(latency)
                    tracking.runs.set_tag(STATE_TAG, state)
            except optuna.TrialPruned:
                tracking.runs.set_tag(STATE_TAG, "pruned")
                trial.set_user_attr("state", "pruned")
                outcome = ["pruned"]
            except Exception:
                tracking.runs.set_tag(STATE_TAG, "failed")
                trial.set_user_attr("state", "failed")
                raise
            finally:
                bar.update(1)
        if outcome == ["pruned"]:
            raise optuna.TrialPruned()
        return tuple(outcome) if multi else outcome[0]

    def distiller():  # distillation from the starting model, T=4, alpha=0.9
        if teacher is None:
            return None
        from mcp.distillation import Distiller, DistillSpec

        return Distiller(teacher, DistillSpec()).to(ctx.device)

    ctx.study.optimize(objective, n_trials=cfg.trials, timeout=cfg.timeout or None, catch=(RuntimeError, ValueError,
                                                                                           McpError))
    bar.close()


def _constrain(trial, key: str, excess: float) -> None:
    """Bytes over the budget (<= 0: within) as an Optuna constraint (set once per key) and
    as the user attribute ``budget_excess`` (the latest; what the table and older Optuna read)."""
    trial.set_user_attr("budget_excess", float(excess))
    if hasattr(trial, "set_constraint"):
        trial.set_constraint(key, float(excess))


def _latency(tuned, shape) -> float:
    """CPU p50 (ms) at batch 1, one thread, of the trial's deployable ONNX model, timed in
    a process of its own for at least half a second."""
    from mcp.evaluation.benchmark import measure_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path, _ = tuned.onnx(shape, tmp)
        return float(measure_onnx(path, shape, "cpu", 1, batch=8, warmup=20, iters=100, seconds=0.5)["p50_ms"])


def _enqueue_uniform(ctx: _Context) -> None:
    """Start a new study from the uniform configurations that fill the budget (one ratio in
    every layer, one bit-width for each of the space's two smallest; the longest fine-tuning):
    the search begins where the usual recipe ends, and must beat it to change the winner."""
    from mcp.search.trial import uniform_at_budget

    space = ctx.space
    if ctx.budget is None or ctx.cfg.mode != "max-accuracy" or len(space.granularity) * len(space.criterion) > 1:
        return
    all_bits = sorted({b for choices in space.bits_of.values() for b in choices})
    queued = 0
    for bits in all_bits:
        if queued == 2 or not all(bits in space.bits_of[u] for u in space.units):
            continue
        ratio = uniform_at_budget(ctx.base, ctx.splits.input_shape, space, bits, ctx.budget * (1 - FILL_SLACK),
                                  ctx.calib, ctx.device, ctx.cfg.seed, on=ctx.cfg.budget_on)
        if ratio is None:
            continue
        params: dict[str, Any] = {}
        for unit in space.units:
            lo, hi = space.ratio_of[unit]
            if hi > lo:
                params[f"ratio.{unit}"] = ratio
            if len(space.bits_of[unit]) > 1:
                params[f"bits.{unit}"] = bits
        if space.epochs[1] > space.epochs[0]:
            params["epochs"] = space.epochs[1]
        if space.lr[1] > space.lr[0]:
            params["lr"] = (space.lr[0] * space.lr[1]) ** 0.5
        ctx.study.enqueue_trial(params)
        queued += 1


def _trial_table(study, budget_on: str) -> list[dict[str, Any]]:
    rows = []
    for t in study.trials:
        state = t.user_attrs.get("state") or t.state.name.lower()
        if t.state.name == "FAIL":
            state = "failed"
        values = t.values or []
        rows.append({"number": t.number, "state": state, "val_accuracy": values[0] if values else None,
                     "size_bytes_compressed": t.user_attrs.get("size_bytes_compressed"),
                     "size_bytes_onnx": t.user_attrs.get("size_bytes_onnx"),
                     "size_bytes": t.user_attrs.get(SIZE_KEY[budget_on]),
                     "latency_ms_p50_cpu": t.user_attrs.get("latency_ms_p50_cpu"),
                     "feasible": t.user_attrs.get("budget_excess", 1.0) <= 0, "params": dict(t.params),
                     "ratios": t.user_attrs.get("ratios"),
                     "mlflow_run_id": t.user_attrs.get("mlflow_run_id")})
    return rows


def _winners(ctx: _Context, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rebuild, fine-tune, test and register the best feasible trial (max-accuracy) or each
    feasible Pareto-front trial (pareto); the most accurate one gets ``challenger``."""
    from mcp.evaluation.benchmark import non_dominated

    done = [t for t in trials if t["state"] == "complete" and t["feasible"]]
    if not done:
        return []
    if ctx.cfg.mode == "max-accuracy":
        chosen = [max(done, key=lambda t: (t["val_accuracy"], -t["size_bytes"]))]
    else:
        points = [(-t["val_accuracy"], t["size_bytes"]) + ((t["latency_ms_p50_cpu"],) if ctx.cfg.latency else ())
                  for t in done]
        chosen = sorted((done[i] for i in non_dominated(points)), key=lambda t: -t["val_accuracy"])
    registered = _registered_winners(ctx)
    winners = [registered.get(t["number"]) or _rebuild(ctx, t) for t in chosen]
    first = next((w for w in winners if w["within_budget"]), None)  # the most accurate that still fits
    if first is not None and first["registered_name"]:
        from mcp import tracking

        tracking.models.set_alias(first["registered_name"], "challenger", first["version"])
        first["alias"] = "challenger"
    return winners


WINNER_KEYS = ("test_accuracy", "val_accuracy", "size_bytes_compressed", "size_bytes_onnx", "onnx_test_accuracy",
               "compression_ratio", "sparsity")


def _registered_winners(ctx: _Context) -> dict[int, dict[str, Any]]:
    """Winners an earlier call (or another worker) of this study already rebuilt and
    registered with the same --final-epochs, by trial number: resuming, or a study shared
    by many workers, does not register the same trial twice."""
    from mcp import tracking

    cfg = ctx.cfg
    if not cfg.register:
        return {}
    name = tracking.registered_name(cfg.model, cfg.dataset)
    found = {}
    for version, tags, _ in tracking.models.list_versions(name):
        if (tags.get("mcp.stage") == "search" and tags.get("study") == cfg.name()
                and tags.get("final_epochs_option") == str(cfg.final_epochs) and tags.get("trial", "").isdigit()):
            metrics = tracking.runs.run_metrics(tags["source_run"])
            found[int(tags["trial"])] = {
                "trial": int(tags["trial"]), "run_id": tags["source_run"], "registered_name": name,
                "version": str(version),
                "alias": None, "deploy_format": tags.get("deploy_format", ""), "reused": True,
                "within_budget": tags.get("within_budget", "true") == "true", **{k: metrics[k] for k in WINNER_KEYS}}
    return found


def _rebuild(ctx: _Context, t: dict[str, Any]) -> dict[str, Any]:
    """Prune, fine-tune (``--final-epochs``), test and register one trial's configuration;
    ``within_budget`` says whether the result still fits (longer fine-tuning can move a
    few weights onto or off zero)."""
    import optuna

    from mcp import tracking
    from mcp.search import TrialConfig, sample
    from mcp.search.trial import finetune_quantized, prune_candidate
    from mcp.stages.common import final_metrics, log_and_register
    from mcp.training import evaluate

    cfg, shape = ctx.cfg, ctx.splits.input_shape
    tc = sample(optuna.trial.FixedTrial(t["params"]), ctx.space)
    if t.get("ratios"):  # the ratios the trial used (its samples moved to fill the budget)
        tc = TrialConfig(dict(t["ratios"]), tc.bits, tc.granularity, tc.criterion, tc.epochs, tc.lr)
    with tracking.stage_run("search", {"trial": t["number"], **t["params"]},
                            {"mcp.study_name": cfg.name(), "mcp.trial_number": str(t["number"]),
                             "mcp.parent_model": ctx.base_uri}, run_name=f"winner-trial-{t['number']}") as run:
        model = prune_candidate(ctx.base, shape, tc, ctx.calib, ctx.device)
        tuned = finetune_quantized(model, shape, tc, ctx.loaders, ctx.device, cfg.seed,
                                   epochs=cfg.final_epochs or tc.epochs)
        model = tuned.model
        test = evaluate(model, ctx.loaders[2], ctx.device)
        val = evaluate(model, ctx.loaders[1], ctx.device)
        metrics = {"test_accuracy": test["accuracy"], "test_loss": test["loss"], "val_accuracy": val["accuracy"],
                   "size_bytes_compressed": float(len(tuned.payload)), **final_metrics(model, shape, ctx.device)}
        metrics["compression_ratio"] = ctx.base_fp32 / metrics["size_bytes_compressed"]
        deploy_format = _log_deployable(tuned, shape, ctx.loaders[2], metrics)
        within = not ctx.budget or metrics[SIZE_KEY[cfg.budget_on]] <= ctx.budget
        tracking.log_metrics(metrics)
        tracking.runs.set_tag("mcp.within_budget", str(within).lower())
        reg_name = tracking.registered_name(cfg.model, cfg.dataset) if cfg.register else None
        version_tags = {"mcp.stage": "search", "source_run": run.info.run_id, "parent_model": ctx.base_uri,
                        "study": cfg.name(), "trial": t["number"], "mode": cfg.mode,
                        "ratios": json.dumps({k: round(v, 4) for k, v in tc.ratios.items()}),
                        "bits": json.dumps(tc.bits), "method": "qat", "deploy_format": deploy_format,
                        "budget_on": cfg.budget_on, "within_budget": str(within).lower(),
                        "final_epochs_option": str(cfg.final_epochs),
                        **{k: f"{metrics[k]:.6g}" for k in ("test_accuracy", "val_accuracy", "size_bytes_compressed",
                                                             "size_bytes_onnx", "onnx_test_accuracy",
                                                             "compression_ratio", "sparsity")}}
        quantization = {"method": "qat", "bits": tc.bits, "act_bits": 0, "symmetric": True, "per_channel": True,
                        "observer": "minmax", "coding": "fixed", "reduce_range": False}
        _, version = log_and_register(model, next(iter(ctx.loaders[2]))[0][:4],
                                      {"dataset": cfg.dataset, "class_names": ctx.splits.class_names,
                                       "quantization": quantization, "search": {"study": cfg.name(),
                                                                                "trial": t["number"]}},
                                      reg_name, None, version_tags)
    return {"trial": t["number"], "run_id": run.info.run_id, "registered_name": reg_name, "version": version,
            "alias": None, "deploy_format": deploy_format, "within_budget": within, "reused": False,
            **{k: metrics[k] for k in WINNER_KEYS}}


def _log_deployable(tuned, shape, test_loader, metrics: dict[str, float]) -> str:
    """Log the winner's deployable ONNX (INT8 weights + DequantizeLinear, as `mcp quantize`
    logs for QAT) as ``onnx/model.onnx`` with its ``mcp.deploy_format`` tag, so `mcp export`
    and `mcp benchmark` use it; add its size and ONNX Runtime test accuracy to ``metrics``."""
    from mcp import tracking
    from mcp.export import ort_evaluate, ort_session
    from mcp.stages.quantize import DEPLOY_NOTES

    with tempfile.TemporaryDirectory() as tmp:
        path, fmt = tuned.onnx(shape, tmp)
        metrics["size_bytes_onnx"] = float(path.stat().st_size)
        metrics["onnx_test_accuracy"] = ort_evaluate(ort_session(path), test_loader)["accuracy"]
        tracking.log_artifact(path, "onnx")
    tracking.runs.set_tag("mcp.deploy_format", fmt)
    tracking.runs.set_tag("mcp.deploy_note", DEPLOY_NOTES[fmt])
    return fmt


def _deploy(ctx: _Context, winners: list[dict[str, Any]], show_progress: bool | None) -> None:
    """Export each winner (nested `export` runs) and benchmark them against the starting
    model (a nested `benchmark` run)."""
    from mcp.config import BenchmarkConfig, DataOptions, ExportConfig
    from mcp.stages.benchmark import run_benchmark
    from mcp.stages.export import run_export

    cfg = ctx.cfg
    data = {k: getattr(cfg, k) for k in DataOptions.defaults()}
    uris = [f"models:/{w['registered_name']}/{w['version']}" if w["registered_name"] else
            f"runs:/{w['run_id']}/model" for w in winners]
    if cfg.export:
        for w, uri in zip(winners, uris):
            earlier = _exported_version(w, uri) if w.get("reused") else None
            if earlier is not None:  # a reused winner whose ONNX version exists: not exported twice
                w["onnx_version"] = earlier
                continue
            exported = run_export(ExportConfig(model=cfg.model, model_uri=uri, register=cfg.register, **data),
                                  show_progress)
            w["onnx_version"] = exported.registered_version
            w["size_bytes_onnx"] = exported.metrics["size_bytes_onnx"]
    if cfg.benchmark and winners:
        bench = run_benchmark(BenchmarkConfig(model=cfg.model, models=",".join([ctx.base_uri, *uris]),
                                              baseline=ctx.base_uri, seconds=1.0, **data), show_progress)
        for w, row in zip(winners, bench.rows[1:]):
            w.update({k: row[k] for k in ("latency_ms_p50_cpu", "speedup_p50_cpu", "throughput_ips_cpu")})


def _exported_version(winner: dict[str, Any], uri: str) -> str | None:
    """The ``format=onnx`` version `mcp export` registered for ``uri``, if any."""
    from mcp import tracking

    for version, tags, _ in tracking.models.list_versions(winner["registered_name"]):
        if tags.get("format") == "onnx" and tags.get("source_model") == uri:
            return str(version)
    return None


def _log_study(ctx: _Context, trials: list[dict[str, Any]], winners: list[dict[str, Any]]) -> None:
    from mcp import tracking

    counts = {s: sum(t["state"] == s for t in trials) for s in ("complete", "pruned", "infeasible", "failed")}
    tracking.log_metrics({f"trials_{k}": float(v) for k, v in counts.items()} | {"trials_total": float(len(trials))})
    if winners:
        best = winners[0]
        tracking.log_metrics({f"best_{k}": float(best[k]) for k in ("test_accuracy", "size_bytes_compressed",
                                                                   "size_bytes_onnx", "compression_ratio")})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trials.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["number", "state", "val_accuracy", "size_bytes_compressed", "size_bytes_onnx",
                             "latency_ms_p50_cpu", "feasible", "params", "ratios", "mlflow_run_id"])
            for t in trials:
                writer.writerow([t["number"], t["state"], t["val_accuracy"], t["size_bytes_compressed"],
                                 t["size_bytes_onnx"] or "", t["latency_ms_p50_cpu"] or "", t["feasible"],
                                 json.dumps(t["params"]),
                                 json.dumps(t["ratios"] or {}), t["mlflow_run_id"] or ""])
        tracking.log_artifact(path)
        _log_plots(ctx, Path(tmp))


def _log_plots(ctx: _Context, tmp: Path) -> None:
    """Optuna's own plots (matplotlib), where the study has enough trials for them."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis
    from optuna.exceptions import ExperimentalWarning

    warnings.filterwarnings("ignore", category=ExperimentalWarning)

    from mcp import tracking

    multi = ctx.cfg.mode == "pareto"
    warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator")
    plots = {"param_importances.png": lambda: vis.plot_param_importances(
        ctx.study, target=(lambda t: -t.values[0]) if multi else None, target_name="val_accuracy")}
    if multi:
        plots["pareto_front.png"] = lambda: vis.plot_pareto_front(
            ctx.study, target_names=["val_accuracy", SIZE_KEY[ctx.cfg.budget_on]]
            + (["latency_ms_p50_cpu"] if ctx.cfg.latency else []))
    else:
        plots["optimization_history.png"] = lambda: vis.plot_optimization_history(ctx.study)
    for name, draw in plots.items():
        try:
            draw()
            path = tmp / name
            plt.gcf().set_size_inches(8, 5)
            plt.savefig(path, dpi=110, bbox_inches="tight")
            tracking.log_artifact(path, "plots")
        except (ValueError, RuntimeError, ZeroDivisionError):  # too few finished trials for this plot
            pass
        finally:
            plt.close("all")
