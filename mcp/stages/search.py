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
import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from mcp.config import SearchConfig
from mcp.errors import McpError
from mcp.tuner.objective import (BATCH_LATENCY_KEY, SearchProblem, best_trials, enqueue_uniform, latency_key,
                                  make_objective, rebuild, start_note, tie_break, trial_table)
from mcp.tuner.claims import Claims, Heartbeat
from mcp.tuner.study import (
    SIZE_KEY,
    STALE_HEARTBEATS,
    check_search,
    open_study,
    remember_base,
    within_budget,
)
from mcp.tracking import schema

STATE_TAG = schema.TRIAL_STATE


@dataclass
class SearchResult:
    run_id: str
    study_name: str
    budget_bytes: float | None
    trials: list[dict[str, Any]]
    winners: list[dict[str, Any]]
    baseline: Any = None  # mcp.stages.common.Baseline: what the winners' *_vs_baseline figures compare with
    uniform_warning: str = ""  # why the study could not start from a (strictly) uniform trial


def run_search(cfg: SearchConfig, show_progress: bool | None = None) -> SearchResult:
    from mcp import tracking
    from mcp.evaluation.metrics import size_bytes_fp32
    from mcp.stages.common import (
        find_base_model,
        lineage,
        lineage_baseline,
        setup_data,
        study_storage,
        tag_baseline,
    )
    from mcp.training import evaluate

    device, splits, loaders = setup_data(cfg)
    cfg = cfg.replace(storage=study_storage(cfg.storage))
    base, base_uri = find_base_model(cfg.model, cfg.model_uri, cfg.dataset, splits, cfg.trust_pickled_model)
    arch, registered = lineage(base, base_uri, cfg.model, cfg.dataset)
    if arch != cfg.model and not cfg.study_name:  # an imported model: its own study, not the zoo model's
        cfg = cfg.replace(study_name=f"{arch}-{cfg.dataset}-{cfg.mode}")
    checked = check_search(cfg, splits, loaders, base)
    space, space_path, budget = checked.space, checked.space_path, checked.budget
    study = open_study(cfg, checked, base_uri if base is not None else "")
    check_tracking_store(study, cfg)
    claims = Claims(cfg.storage, cfg.name(), heartbeat=cfg.heartbeat, grace=STALE_HEARTBEATS * cfg.heartbeat)

    params = {**cfg.to_dict(), **{f"data_{k}": v for k, v in splits.summary().items()}, "device_resolved": device,
              "space_file": str(space_path), "budget_bytes": budget or 0, "study_trials_before": len(study.trials)}
    tags = {schema.MODEL: arch, schema.DATASET: cfg.dataset, schema.PARENT_MODEL: base_uri,
            schema.STUDY_NAME: cfg.name(), schema.SEARCH_MODE: cfg.mode}
    try:
        made_with = study.user_attrs.get(TRACKING_RUN_ATTR)  # a worker joining a study joins its experiment
        joined = tracking.runs.experiment_of(made_with) if made_with else None
        with tracking.stage_run("search", params, tags, run_name=f"search-{cfg.name()}",
                                study_experiment_id=joined) as run:
            remember_tracking_store(study, run.info.run_id)
            claims.note = run.info.run_id  # what a worker that takes over this one's work ends KILLED
            tracking.runs.set_tag(schema.SPACE, space_path.read_text())
            if base is None:  # the first worker trains the baseline; the others wait for it and start from it
                base, base_uri = _agreed_baseline(cfg, claims, splits, show_progress)
                remember_base(study, cfg, base_uri)
                tracking.runs.set_tag(schema.PARENT_MODEL, base_uri)
            parent_accuracy = evaluate(base.to(device), loaders[2], device)["accuracy"]
            ref = lineage_baseline(base, base_uri, loaders[2], device, parent_accuracy, cfg.trust_pickled_model)
            tag_baseline(ref)
            tracking.log_metrics({"parent_test_accuracy": parent_accuracy,
                                  "baseline_test_accuracy": ref.test_accuracy})
            context = _Context(cfg, space, base, base_uri, splits, loaders, device, budget, study, checked.calib,
                               size_bytes_fp32(base), registered, ref, parent_accuracy)
            claims.once("tickets-of-earlier-trials", lambda: _ticket_earlier_trials(study, claims))
            warning, _ = claims.once("uniform-start", lambda: _start_uniform(context),  # one worker queues them
                                     taken_over=took_over(cfg, "queue the uniform starting trials"))
            _optimize(context, claims, show_progress)
            trials = trial_table(study, cfg.budget_on)
            winners = _final(context, claims, trials, show_progress)
            _log_study(context, trials, winners)
            return SearchResult(run.info.run_id, cfg.name(), budget, trials, winners, ref, warning)
    finally:
        claims.close()


TRACKING_RUN_ATTR = "mcp_tracking_run"  # the study's user attribute: a run of the store it was made with


def check_tracking_store(study, cfg: SearchConfig) -> None:
    """Refuse a study made with another tracking store: its trials' runs are not in this one."""
    from mcp import tracking

    made_with = study.user_attrs.get(TRACKING_RUN_ATTR)
    if made_with and not tracking.runs.run_exists(made_with):
        raise McpError(f"study {cfg.name()!r} in {cfg.storage!r} was made with another tracking store (run "
                       f"{made_with} is not in {tracking.runs.tracking_uri()!r}); set MLFLOW_TRACKING_URI to that "
                       f"store, or use --study-name or --storage to start a new study")


def remember_tracking_store(study, run_id: str) -> None:
    if not study.user_attrs.get(TRACKING_RUN_ATTR):
        study.set_user_attr(TRACKING_RUN_ATTR, run_id)


def _agreed_baseline(cfg: SearchConfig, claims, splits, show_progress: bool | None):
    """Train and register the baseline once for all the study's workers: the first to ask
    trains it; the others wait and start from the version it registered."""
    import click

    from mcp.stages.common import find_base_model
    from mcp.stages.train import run_baseline

    trained: list = []

    def train() -> str:
        model, uri = run_baseline(cfg, show_progress)
        trained.append(model)
        return uri

    uri, mine = claims.once("baseline", train, taken_over=took_over(cfg, "train the baseline"),
                            waiting=lambda row: click.echo(f"study {cfg.name()!r}: waiting for worker {row['owner']} "
                                                           f"to train the baseline", err=True))
    if mine:
        return trained[0], uri
    base, _ = find_base_model(cfg.model, uri, cfg.dataset, splits, cfg.trust_pickled_model)
    return base, uri


def _sweep(study, name: str, claims, storage: str, heartbeat: float) -> None:
    """Trials a killed worker left running: Optuna fails them (and queues each once more);
    their MLflow runs, and the killed worker's study run, end KILLED, never RUNNING. The
    tickets of failed trials (and of a worker that died holding one before its trial
    started) are released, so that the study still reaches its total."""
    import datetime

    import click
    import optuna

    from mcp.tuner.study import fail_stale_trials

    def warn(trial, what: str) -> None:
        ended = end_dead_runs(trial.user_attrs.get("mlflow_run_id", ""))
        click.echo(f"warning: trial {trial.number} of study {name!r} was left running by a worker that stopped; "
                   f"it is {what}" + (f" (runs ended KILLED: {', '.join(ended)})" if ended else ""), err=True)

    for trial in fail_stale_trials(study, storage, heartbeat, claims.claim):
        warn(trial, "failed and queued once more")
    # A worker killed before its trial's first heartbeat leaves a running trial Optuna never
    # calls stale; the claim on the trial (kept fresh by the worker's own heartbeat) tells.
    # Twice the grace: Optuna's own check (which also queues the trial again) comes first.
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        row = claims.get(f"run-{trial.number}")
        since = claims.now() - row["beat"] if row else (datetime.datetime.now() - trial.datetime_start).total_seconds()
        if since > 2 * claims.grace and claims.claim(f"fail-{trial.number}"):
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            warn(trial, "failed")
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    for row in claims.rows("ticket-"):
        if row["value"] == "" and claims.stale(row):
            claims.release(row["key"], row)
        elif row["value"] and states.get(int(row["value"])) == optuna.trial.TrialState.FAIL:
            claims.release(row["key"], row)


def end_dead_runs(run_id: str) -> list[str]:
    """End KILLED what a dead worker left RUNNING: ``run_id``, the search runs above it (up
    to the worker's own top run) and every run still RUNNING below those."""
    from mcp import tracking

    return tracking.runs.mark_killed(run_id, up_through_stage="search")


def took_over(cfg: SearchConfig, what: str):
    """What a worker does when it takes over work a dead worker had claimed: end that
    worker's runs KILLED, and say so in one line."""
    import click

    def taken_over(dead_run: str) -> None:
        ended = end_dead_runs(dead_run)
        click.echo(f"warning: the worker that was to {what} for study {cfg.name()!r} stopped; this one does it"
                   + (f" (runs ended KILLED: {', '.join(ended)})" if ended else ""), err=True)

    return taken_over


def _start_uniform(ctx: _Context) -> str:
    """Seed a new study with the uniform configuration(s) that fill the budget; when no
    strictly uniform one can be seeded, say why in one warning line and a run tag (the
    study then starts from the closest uniform-where-allowed configuration, if any).
    Returns the warning ('' when none)."""
    import click

    from mcp import tracking

    start = enqueue_uniform(ctx.study, ctx.problem, ctx.cfg.mode == "max-accuracy", limit=ctx.cfg.trials)
    if start.queued:
        tracking.runs.set_tag(schema.UNIFORM_START, start.describe())
        click.echo(f"study {ctx.cfg.name()!r}: {start_note(start, ctx.cfg.trials, ctx.cfg.sampler)}", err=True)
    if start.warning:
        click.echo(f"warning: {start.warning}", err=True)
        tracking.runs.set_tag(schema.UNIFORM_WARNING, start.warning)
    return start.warning


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
    registered: str  # the registered model winners become versions of
    baseline: Any = None  # mcp.stages.common.Baseline of the starting model's lineage
    parent_accuracy: float = 0.0  # the starting model's test accuracy

    @property
    def problem(self) -> SearchProblem:
        cfg = self.cfg
        return SearchProblem(self.space, self.base, tuple(self.splits.input_shape), self.loaders, self.device,
                             self.calib, self.budget, cfg.budget_on, cfg.fill_budget, cfg.mode == "pareto",
                             cfg.latency, cfg.distill, cfg.seed, float(self.base_fp32), cfg.budget_ms,
                             cfg.budget_batch)


def _optimize(ctx: _Context, claims, show_progress: bool | None) -> None:
    """Run trials until the study has ``--trials`` in all, however many workers share it:
    each trial needs a ticket (``ticket-<i>``, i < the total) that only one worker can
    claim. Then wait for the other workers' running trials, so that every worker chooses
    the winners from the same finished study."""
    import contextlib
    import time

    import click
    import optuna

    from mcp import tracking
    from mcp.tuner.progress import TrialProgress

    cfg, study = ctx.cfg, ctx.study
    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    def done() -> int:
        return len(study.get_trials(deepcopy=False, states=done_states))

    progress = TrialProgress(cfg.name(), cfg.trials, done(), ctx.budget, cfg.budget_on, cfg.budget_ms,
                             latency_key(cfg.budget_batch), show_progress)

    class RunLog:
        def metrics(self, values: dict[str, float], step: int | None = None) -> None:
            tracking.log_metrics(values, step=step)

        def state(self, state: str) -> None:
            tracking.runs.set_tag(STATE_TAG, state)

    @contextlib.contextmanager
    def trial_run(trial):
        with tracking.stage_run("search", {"trial": trial.number, **trial.params},
                                {schema.STUDY_NAME: cfg.name(), schema.TRIAL_NUMBER: str(trial.number)},
                                run_name=f"trial-{trial.number}") as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            yield RunLog()

    objective = make_objective(ctx.problem, trial_run)
    started, attempts, waited = time.monotonic(), 0, False
    poll = min(2.0, cfg.heartbeat)
    while True:
        _sweep(study, cfg.name(), claims, cfg.storage, cfg.heartbeat)
        out_of_time = bool(cfg.timeout) and time.monotonic() - started > cfg.timeout
        ticket = None if out_of_time or attempts >= cfg.trials else _take_ticket(claims, cfg.trials)
        if ticket is not None:
            attempts += 1  # a worker tries at most --trials trials per call, whatever fails
            finished = _run_trial(ctx, claims, ticket, objective)
            if finished is not None:
                progress.trial(study._storage.get_trial(finished._trial_id), done())
            continue
        if not _unfinished(study, claims):
            break
        if not waited and show_progress is not False:
            click.echo(f"study {cfg.name()!r}: waiting for other workers' running trials", err=True)
            waited = True
        time.sleep(poll)
    progress.close()


def _ticket_earlier_trials(study, claims) -> int:
    """A study made before tickets existed: its finished trials hold tickets, so that the
    total counts them. Returns how many (0 for a new study)."""
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                      optuna.trial.TrialState.PRUNED))
    for i, trial in enumerate(done):
        claims.claim(f"ticket-{i}", str(trial.number))
    return len(done)


def _unfinished(study, claims) -> bool:
    """Whether some worker still works on the study: a trial runs, or a ticket is held for a
    trial not yet asked for (or one that failed and is about to be freed)."""
    import optuna

    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    if optuna.trial.TrialState.RUNNING in states.values():
        return True
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return any(not row["value"] or states.get(int(row["value"])) not in done for row in claims.rows("ticket-"))


def _take_ticket(claims, total: int) -> str | None:
    """Claim the lowest free ticket below the study's total, or None when all are held."""
    held = {row["key"] for row in claims.rows("ticket-")}
    for i in range(total):
        key = f"ticket-{i}"
        if key not in held and claims.claim(key):
            return key
    return None


def _run_trial(ctx: _Context, claims, ticket: str, objective):
    """Ask Optuna for the next trial (a queued one first), run it under ``ticket`` and tell
    Optuna how it ended; the trial when it finished (complete, pruned or infeasible), else None."""
    import warnings

    import click
    import optuna

    from mcp.tuner.study import _storage

    study, cfg = ctx.study, ctx.cfg
    # Optuna says heartbeats are meant for study.optimize: this loop beats the trial itself
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used", category=UserWarning)
    try:
        for _ in range(5):
            trial = study.ask()
            if claims.claim(f"run-{trial.number}"):
                break
            # two workers popped the same queued trial at once (SQLite reads without locking): the other runs it
        else:
            claims.release(ticket)
            return None
        claims.set_value(ticket, str(trial.number))
    except BaseException:  # a signal (or a lost database) before the trial started: its ticket is free again
        claims.release(ticket)
        raise
    # beat the trial in Optuna's storage, as study.optimize does: a worker that dies leaves a trial seen as stale
    storage = _storage(cfg.storage, cfg.heartbeat)
    beat = Heartbeat(lambda: storage.record_heartbeat(trial._trial_id), cfg.heartbeat, "mcp-trial-heartbeat")
    try:
        values = objective(trial)
    except optuna.TrialPruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True)
        return trial
    except (RuntimeError, ValueError, McpError) as exc:
        study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        claims.release(ticket)  # another trial takes its place
        click.echo(f"warning: trial {trial.number} of study {cfg.name()!r} failed: "
                   f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]}", err=True)
        return None
    except BaseException:  # Ctrl-C, SIGTERM: the trial ends FAIL (its run KILLED) and its ticket is free again
        try:
            study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        finally:
            claims.release(ticket)
        raise
    finally:
        beat.stop()
    study.tell(trial, values, skip_if_finished=True)
    return trial


def _final(ctx: _Context, claims, trials: list[dict[str, Any]], show_progress: bool | None) -> list[dict[str, Any]]:
    """Choose, rebuild, register, export and benchmark the winners once for the finished
    study, whichever worker gets there first; the others wait and report the same ones."""
    import click

    cfg = ctx.cfg
    what = (f"winners-of-{len(trials)}-trials-final-epochs-{cfg.final_epochs}-register-{cfg.register}-"
            f"export-{cfg.export}-benchmark-{cfg.benchmark}" + (f"-finalists-{cfg.finalists}" if cfg.finalists > 1
                                                                else ""))

    def work() -> list[dict[str, Any]]:
        winners = _winners(ctx, trials)
        _deploy(ctx, winners, show_progress)
        return winners

    winners, _ = claims.once(what, work, taken_over=took_over(cfg, "register the winners"),
                             waiting=lambda row: click.echo(f"study {cfg.name()!r}: waiting for worker "
                                                            f"{row['owner']} to register the winners", err=True))
    return winners


def _winners(ctx: _Context, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rebuild, fine-tune, test and register the best feasible trial (max-accuracy; the
    ``--finalists`` best, ordered by their validation accuracy once rebuilt) or each
    feasible Pareto-front trial (pareto); the first within the budget gets ``challenger``."""
    from mcp.evaluation.benchmark import non_dominated

    done = [t for t in trials if t["state"] == "complete" and t["feasible"]]
    if not done:
        return []
    if ctx.cfg.mode == "max-accuracy":
        chosen = best_trials(done, ctx.cfg.finalists, ctx.cfg.budget_ms, ctx.cfg.budget_batch)
    else:
        points = [(-t["val_accuracy"], t["size_bytes"]) + ((t["latency_ms_p50_cpu"],) if ctx.cfg.latency else ())
                  for t in done]
        chosen = sorted((done[i] for i in non_dominated(points)), key=lambda t: -t["val_accuracy"])
    registered = _registered_winners(ctx)
    winners = [registered.get(t["number"]) or _rebuild(ctx, t) for t in chosen]
    if len(winners) > 1:  # finalists: ranked again on the validation split after the full fine-tuning
        winners.sort(key=lambda w: (-w["val_accuracy"], _tie_break(ctx, w)))
    for w in winners:  # a winner registered by an earlier call gets today's figures too
        w.update(_figures(ctx, w["onnx_test_accuracy"], w["size_bytes_compressed"]))
    first = next((w for w in winners if w["within_budget"]), None)  # the most accurate that still fits
    if first is not None and first["registered_name"]:
        from mcp import tracking

        tracking.models.set_alias(first["registered_name"], "challenger", first["version"])
        first["alias"] = "challenger"
    return winners


def _tie_break(ctx: _Context, row: dict[str, Any]) -> tuple[float, float]:
    return tie_break(row, ctx.cfg.budget_ms, ctx.cfg.budget_batch)


WINNER_KEYS = ("test_accuracy", "val_accuracy", "size_bytes_compressed", "size_bytes_onnx", "onnx_test_accuracy",
               "compression_ratio", "sparsity")
LATENCY_KEYS = (latency_key(1), BATCH_LATENCY_KEY)  # a winner's deployed latency, where measured


def _kept(metrics: Mapping[str, float]) -> dict[str, float]:
    """What a winner carries of its run's metrics."""
    return {**{k: metrics[k] for k in WINNER_KEYS}, **{k: metrics[k] for k in LATENCY_KEYS if k in metrics}}


def _figures(ctx: _Context, accuracy: float, size: float) -> dict[str, float]:
    """A winner against its parent (the starting model) and its lineage's baseline: the
    drops are of its ONNX Runtime accuracy, as `mcp quantize` measures them."""
    return {"compression_ratio": ctx.base_fp32 / size, "accuracy_drop": ctx.parent_accuracy - accuracy,
            "parent_test_accuracy": ctx.parent_accuracy, **ctx.baseline.figures(accuracy, size)}


def _registered_winners(ctx: _Context) -> dict[int, dict[str, Any]]:
    """Winners an earlier call (or another worker) of this study already rebuilt and
    registered with the same --final-epochs, by trial number: resuming, or a study shared
    by many workers, does not register the same trial twice."""
    from mcp import tracking

    cfg = ctx.cfg
    if not cfg.register:
        return {}
    name = ctx.registered
    found = {}
    for version, tags, _ in tracking.models.list_versions(name):
        if (tags.get(schema.STAGE) == "search" and tags.get("study") == cfg.name()
                and tags.get("final_epochs_option") == str(cfg.final_epochs) and tags.get("trial", "").isdigit()):
            metrics = tracking.runs.run_metrics(tags["source_run"])
            found[int(tags["trial"])] = {
                "trial": int(tags["trial"]), "run_id": tags["source_run"], "registered_name": name,
                "version": str(version),
                "alias": None, "deploy_format": tags.get("deploy_format", ""), "reused": True,
                "within_budget": tags.get("within_budget", "true") == "true", **_kept(metrics)}
    return found


def _rebuild(ctx: _Context, t: dict[str, Any]) -> dict[str, Any]:
    """Prune, fine-tune (``--final-epochs``), test and register one trial's configuration;
    ``within_budget`` says whether the result still fits (longer fine-tuning can move a
    few weights onto or off zero)."""
    from mcp import tracking
    from mcp.pruning.depth import removed_blocks
    from mcp.stages.common import DEPLOY_KEYS, data_recipe, log_and_register

    cfg = ctx.cfg
    with tracking.stage_run("search", {"trial": t["number"], **t["params"]},
                            {schema.STUDY_NAME: cfg.name(), schema.TRIAL_NUMBER: str(t["number"]),
                             schema.PARENT_MODEL: ctx.base_uri}, run_name=f"winner-trial-{t['number']}") as run:
        rebuilt = rebuild(ctx.problem, t, cfg.final_epochs)
        tc, tuned, model, metrics = rebuilt.config, rebuilt.tuned, rebuilt.model, rebuilt.metrics
        deploy_format = _log_deployable(ctx, tuned, t["number"], metrics)
        metrics.update(_figures(ctx, metrics["onnx_test_accuracy"], metrics["size_bytes_compressed"]))
        within = within_budget(metrics[SIZE_KEY[cfg.budget_on]], ctx.budget) and (
            not cfg.budget_ms or metrics[latency_key(cfg.budget_batch)] <= cfg.budget_ms)
        tracking.log_metrics(metrics)
        tracking.runs.set_tag(schema.WITHIN_BUDGET, str(within).lower())
        for key, value in ctx.baseline.run_tags().items():
            tracking.runs.set_tag(key, value)
        reg_name = ctx.registered if cfg.register else None
        version_tags = {schema.STAGE: "search", "source_run": run.info.run_id, "parent_model": ctx.base_uri,
                        "study": cfg.name(), "trial": t["number"], "mode": cfg.mode,
                        "ratios": json.dumps({k: round(v, 4) for k, v in tc.ratios.items()}),
                        "bits": json.dumps(tc.bits), "method": "qat", "deploy_format": deploy_format,
                        **({"dropped_blocks": ",".join(removed_blocks(model))} if tc.drop_blocks else {}),
                        "budget_on": cfg.budget_on, "within_budget": str(within).lower(),
                        "final_epochs_option": str(cfg.final_epochs),
                        **{k: f"{metrics[k]:.6g}" for k in ("test_accuracy", "val_accuracy", "size_bytes_compressed",
                                                             "size_bytes_onnx", "onnx_test_accuracy", "sparsity")
                           + DEPLOY_KEYS if k in metrics},
                        **ctx.baseline.version_tags(metrics)}
        quantization = {"method": "qat", "bits": tc.bits, "act_bits": 0, "symmetric": True, "per_channel": True,
                        "observer": "minmax", "coding": "fixed", "reduce_range": False}
        _, version = log_and_register(model, next(iter(ctx.loaders[2]))[0][:4],
                                      {**data_recipe(ctx.splits),
                                       "quantization": quantization, "search": {"study": cfg.name(),
                                                                                "trial": t["number"]}},
                                      reg_name, None, version_tags)
    return {"trial": t["number"], "run_id": run.info.run_id, "registered_name": reg_name, "version": version,
            "alias": None, "deploy_format": deploy_format, "within_budget": within, "reused": False,
            **_kept(metrics)}


def _log_deployable(ctx: _Context, tuned, number: int, metrics: dict[str, float]) -> str:
    """Log the winner's deployable ONNX (INT8 weights + DequantizeLinear, as `mcp quantize`
    logs for QAT; under a latency budget, float32 with INT8 where it runs faster) as
    ``onnx/model.onnx`` with its ``mcp.deploy_format`` tag, so `mcp export` and `mcp
    benchmark` use it; add its size, ONNX Runtime test accuracy and deployed latency (next
    to the baseline's and the starting model's) to ``metrics``."""
    from mcp import tracking
    from mcp.deploy import ort_evaluate, ort_session
    from mcp.deploy.deployable import DEPLOY_NOTES
    from mcp.stages.common import deployment_figures

    shape = tuple(ctx.splits.input_shape)
    with tempfile.TemporaryDirectory() as tmp:
        path, fmt = tuned.onnx(shape, tmp)
        metrics["size_bytes_onnx"] = float(path.stat().st_size)
        metrics["onnx_test_accuracy"] = ort_evaluate(ort_session(path), ctx.loaders[2])["accuracy"]
        metrics.update(deployment_figures(tuned.model, shape, path, ctx.baseline.model, (ctx.base, ctx.base_uri),
                                          f"search trial {number}'s model"))
        if ctx.cfg.budget_ms and ctx.cfg.budget_batch > 1:  # a throughput budget's own figure
            from mcp.tuner.trial import onnx_latency

            metrics[BATCH_LATENCY_KEY] = onnx_latency(path, shape, seconds=1.0, batch=ctx.cfg.budget_batch)
        tracking.log_artifact(path, "onnx")
    tracking.runs.set_tag(schema.DEPLOY_FORMAT, fmt)
    tracking.runs.set_tag(schema.DEPLOY_NOTE, DEPLOY_NOTES[fmt])
    return fmt


def _deploy(ctx: _Context, winners: list[dict[str, Any]], show_progress: bool | None) -> None:
    """Export each winner (nested `export` runs) and benchmark them against the starting
    model (a nested `benchmark` run)."""
    from mcp.config import BenchmarkConfig, DataOptions, ExportConfig
    from mcp.stages.benchmark import run_benchmark
    from mcp.stages.export import run_export

    cfg = ctx.cfg
    data = {k: getattr(cfg, k) for k in DataOptions.defaults()}
    uris = [schema.version_uri(w['registered_name'], w['version']) if w["registered_name"] else
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
                                              baseline=ctx.base_uri, seconds=1.0,
                                              trust_pickled_model=cfg.trust_pickled_model, **data),
                              show_progress)
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
        tracking.log_metrics({f"best_{k}": float(best[k]) for k in (
            "test_accuracy", "size_bytes_compressed", "size_bytes_onnx", "compression_ratio",
            "compression_ratio_vs_baseline", "accuracy_drop", "accuracy_drop_vs_baseline")})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trials.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["number", "state", "val_accuracy", "size_bytes_compressed", "size_bytes_onnx",
                             "latency_ms_p50_cpu", "batch_latency_ms_p50_cpu", "feasible", "params", "ratios",
                             "mlflow_run_id"])
            for t in trials:
                writer.writerow([t["number"], t["state"], t["val_accuracy"], t["size_bytes_compressed"],
                                 t["size_bytes_onnx"] or "", t["latency_ms_p50_cpu"] or "",
                                 t["batch_latency_ms_p50_cpu"] or "", t["feasible"],
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
    warnings.filterwarnings("ignore", message="Target and region quantiles select the same set")
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
