"""`mcp search`: an Optuna study over per-layer prune ratios and bit-widths, tracked.

The search itself (trials, the study's total shared by its workers, the winners) is the
core's (:mod:`mcp.tuner.worker`); this stage wires it to MLflow: the study's run, a nested
run per trial tagged with its state (complete, pruned, infeasible, failed), each winner
rebuilt in a run of its own, logged with its deployable ONNX file, registered (the best
within the budget with the alias ``challenger``), exported and benchmarked.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click

from mcp import tracking
from mcp.config import BenchmarkConfig, DataOptions, ExportConfig, SearchConfig
from mcp.deploy import check_onnx, ort_evaluate, parity, runtimes
from mcp.deploy.deployable import DEPLOY_NOTES, ParityRules, parity_batch, parity_failure
from mcp.errors import McpError
from mcp.stages.benchmark import run_benchmark
from mcp.stages.common import (
    DEPLOY_KEYS,
    Baseline,
    data_recipe,
    deployment_figures,
    find_base_model,
    lineage,
    lineage_baseline,
    log_and_register,
    setup_data,
    study_storage,
    tag_baseline,
    timing_seconds,
)
from mcp.stages.export import run_export
from mcp.stages.train import run_baseline
from mcp.tracking import schema
from mcp.tracking.tables import log_study
from mcp.training import evaluate
from mcp.tuner.objective import Rebuilt, SearchProblem, winner_metrics
from mcp.tuner.study import SIZE_KEY, check_search, open_study, remember_base
from mcp.tuner.worker import RUN_ATTR, Plan, working

STATE_TAG = schema.TRIAL_STATE
TRACKING_RUN_ATTR = "mcp_tracking_run"  # the study's user attribute: a run of the store it was made with


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
    device, splits, loaders = setup_data(cfg)
    cfg = cfg.replace(storage=study_storage(cfg.storage))
    base, base_uri = find_base_model(cfg.model, cfg.model_uri, cfg.dataset, splits, cfg.trust_pickled_model)
    arch, registered = lineage(base, base_uri, cfg.model, cfg.dataset)
    if arch != cfg.model and not cfg.study_name:  # an imported model: its own study, not the zoo model's
        cfg = cfg.replace(study_name=f"{arch}-{cfg.dataset}-{cfg.mode}")
    checked = check_search(cfg, splits, loaders, base)
    study = open_study(cfg, checked, base_uri if base is not None else "")
    made_with = study.user_attrs.get(TRACKING_RUN_ATTR)  # the run of the store the study was made with
    if made_with and not tracking.runs.run_exists(made_with):
        raise McpError(f"study {cfg.name()!r} in {cfg.storage!r} was made with another tracking store (run "
                       f"{made_with} is not in {tracking.runs.tracking_uri()!r}); set MLFLOW_TRACKING_URI to that "
                       f"store, or use --study-name or --storage to start a new study")
    params = {**cfg.to_dict(), **{f"data_{k}": v for k, v in splits.summary().items()}, "device_resolved": device,
              "space_file": str(checked.space_path), "budget_bytes": checked.budget or 0,
              "study_trials_before": len(study.trials)}
    tags = {schema.MODEL: arch, schema.DATASET: cfg.dataset, schema.PARENT_MODEL: base_uri,
            schema.STUDY_NAME: cfg.name(), schema.SEARCH_MODE: cfg.mode}
    runs = Runs(cfg, registered, show_progress)
    joined = tracking.runs.experiment_of(made_with) if made_with else None  # a worker joins the study's experiment
    with working(None, Plan.of(cfg), study, runs, show_progress) as worker, \
            tracking.stage_run("search", params, tags, run_name=f"search-{cfg.name()}",
                               study_experiment_id=joined) as run:
        if not study.user_attrs.get(TRACKING_RUN_ATTR):
            study.set_user_attr(TRACKING_RUN_ATTR, run.info.run_id)
        worker.claims.note = run.info.run_id  # what a worker that takes over this one's work ends KILLED
        tracking.runs.set_tag(schema.SPACE, checked.space_path.read_text())
        if base is None:  # the first worker trains the baseline; the others wait for it and start from it
            trained: list = []
            base_uri, mine = worker.once("baseline", lambda: trained.append(run_baseline(cfg, show_progress))
                                         or trained[0][1], "train the baseline")
            base = trained[0][0] if mine else find_base_model(cfg.model, base_uri, cfg.dataset, splits,
                                                              cfg.trust_pickled_model)[0]
            remember_base(study, cfg, base_uri)
            tracking.runs.set_tag(schema.PARENT_MODEL, base_uri)
        parent_accuracy = evaluate(base.to(device), loaders[2], device)["accuracy"]
        ref = lineage_baseline(base, base_uri, loaders[2], device, parent_accuracy, cfg.trust_pickled_model)
        tag_baseline(ref)
        tracking.log_metrics({"parent_test_accuracy": parent_accuracy, "baseline_test_accuracy": ref.test_accuracy})
        worker.problem = SearchProblem.of(cfg, checked, base, splits.input_shape, loaders, device)
        runs.start(worker.problem, base_uri, splits, ref, parent_accuracy)
        trials, winners, warning = worker.run()
        log_study(study, trials, winners, cfg.mode == "pareto", SIZE_KEY[cfg.budget_on], cfg.latency)
        return SearchResult(run.info.run_id, cfg.name(), checked.budget, trials, winners, ref, warning)


class Runs:
    """The study's recorder (:class:`mcp.tuner.worker.Recorder`) in MLflow: a nested run per
    trial and per winner, registered winners, lines on stderr."""

    def __init__(self, cfg: SearchConfig | None, registered: str = "", show_progress: bool | None = None):
        self.cfg, self.registered, self.show_progress = cfg, registered, show_progress
        self.earlier_challenger: str | None = None  # where the alias was before this call moved it

    def start(self, problem: SearchProblem, base_uri: str, splits, baseline: Baseline, parent_accuracy: float):
        self.problem, self.base_uri, self.splits = problem, base_uri, splits
        self.baseline, self.parent_accuracy = baseline, parent_accuracy

    def say(self, line: str) -> None:
        click.echo(line, err=True)

    def note(self, key: str, value: str) -> None:
        tracking.runs.set_tag({"uniform_start": schema.UNIFORM_START, "uniform_warning": schema.UNIFORM_WARNING}[key],
                              value)

    def end_dead(self, log_id: str) -> list[str]:
        """End KILLED what a dead worker left RUNNING: ``log_id``, the search runs above it (up
        to the worker's own top run) and every run still RUNNING below those."""
        return tracking.runs.mark_killed(log_id, up_through_stage="search")

    @contextlib.contextmanager
    def trial_log(self, trial):
        with tracking.stage_run("search", {"trial": trial.number, **trial.params},
                                {schema.STUDY_NAME: self.cfg.name(), schema.TRIAL_NUMBER: str(trial.number)},
                                run_name=f"trial-{trial.number}") as run:
            trial.set_user_attr(RUN_ATTR, run.info.run_id)
            yield self

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:  # a trial's TrialLog
        tracking.log_metrics(values, step=step)

    def state(self, state: str) -> None:
        tracking.runs.set_tag(STATE_TAG, state)

    def _figures(self, accuracy: float, size: float) -> dict[str, float]:
        """A winner against its parent (the starting model) and its lineage's baseline: the
        drops are of its ONNX Runtime accuracy, as `mcp quantize` measures them."""
        return {"compression_ratio": self.problem.base_fp32 / size, "accuracy_drop": self.parent_accuracy - accuracy,
                "parent_test_accuracy": self.parent_accuracy, **self.baseline.figures(accuracy, size)}

    def _record(self, trial: int, run_id: str, version: str | None, deploy_format: str, within: bool, reused: bool,
                metrics: dict[str, float]) -> dict[str, Any]:
        """A winner's record, with today's figures against its parent and its baseline."""
        kept = winner_metrics(metrics)
        return {"trial": trial, "run_id": run_id, "registered_name": self.registered if version else None,
                "version": version, "alias": None, "deploy_format": deploy_format, "within_budget": within,
                "reused": reused, **kept, **self._figures(kept["onnx_test_accuracy"], kept["size_bytes_compressed"])}

    def known_winners(self) -> dict[int, dict[str, Any]]:
        """Winners an earlier call (or another worker) of this study already rebuilt and
        registered with the same --final-epochs: resuming, or a study shared by many
        workers, does not register the same trial twice."""
        cfg = self.cfg
        return {int(tags["trial"]): {**self._record(int(tags["trial"]), tags["source_run"], str(version),
                                                    tags.get("deploy_format", ""),
                                                    tags.get("within_budget", "true") == "true", True,
                                                    tracking.runs.run_metrics(tags["source_run"])),
                                     "runtime": tags.get("runtime", "onnxruntime")}
                for version, tags, _ in (tracking.models.list_versions(self.registered) if cfg.register else ())
                if tags.get(schema.STAGE) == "search" and tags.get("study") == cfg.name()
                and tags.get("final_epochs_option") == str(cfg.final_epochs)
                and tags.get("final_prune_epochs_option", "0") == str(cfg.final_prune_epochs)
                and tags.get("trial", "").isdigit()}

    def winner(self, row: dict[str, Any], build: Callable[[], Rebuilt]) -> dict[str, Any]:
        """Rebuild, test, log and register one trial's configuration; ``within_budget`` says
        whether it still fits (longer fine-tuning moves a few weights onto or off zero)."""
        cfg, number = self.cfg, row["number"]
        with tracking.stage_run("search", {"trial": number, **row["params"]},
                                {schema.STUDY_NAME: cfg.name(), schema.TRIAL_NUMBER: str(number),
                                 schema.PARENT_MODEL: self.base_uri}, run_name=f"winner-trial-{number}") as run:
            rebuilt = build()
            deploy_format, metrics = self._log_deployable(rebuilt), rebuilt.metrics
            metrics.update(self._figures(metrics["onnx_test_accuracy"], metrics["size_bytes_compressed"]))
            within = self.problem.within(metrics)
            tracking.log_metrics(metrics)
            for key, value in {schema.WITHIN_BUDGET: str(within).lower(), **self.baseline.run_tags()}.items():
                tracking.runs.set_tag(key, value)
            shown = ("test_accuracy", "val_accuracy", "size_bytes_compressed", "size_bytes_onnx",
                     "onnx_test_accuracy", "sparsity") + DEPLOY_KEYS
            version_tags = {schema.STAGE: "search", "source_run": run.info.run_id, "parent_model": self.base_uri,
                            "study": cfg.name(), "mode": cfg.mode, **rebuilt.tags(), "deploy_format": deploy_format,
                            "runtime": rebuilt.runtime, "runtime_settings": runtimes.settings(rebuilt.runtime),
                            "budget_on": cfg.budget_on, "within_budget": str(within).lower(),
                            "final_epochs_option": str(cfg.final_epochs),
                            "final_prune_epochs_option": str(cfg.final_prune_epochs),
                            **{k: f"{metrics[k]:.6g}" for k in shown if k in metrics},
                            **self.baseline.version_tags(metrics)}
            _, version = log_and_register(rebuilt.model, next(iter(self.problem.loaders[2]))[0][:4],
                                          {**data_recipe(self.splits), "quantization": rebuilt.quantization,
                                           "search": {"study": cfg.name(), "trial": number}},
                                          self.registered if cfg.register else None, None, version_tags)
        return {**self._record(number, run.info.run_id, version, deploy_format, within, False, metrics),
                "runtime": rebuilt.runtime}

    def _log_deployable(self, rebuilt: Rebuilt) -> str:
        """Log the winner's deployable ONNX file (:meth:`Rebuilt.deploy`) as ``onnx/model.onnx``
        with its ``mcp.deploy_format`` tag, so `mcp export` and `mcp benchmark` use it, and
        add its deployed latency (next to the baseline's and the starting model's) to its
        metrics."""
        with tempfile.TemporaryDirectory() as tmp:
            path, fmt = rebuilt.deploy(self.problem, tmp, timing_seconds())  # on auto, the fastest runtime's
            runtime = rebuilt.runtime
            self._check_deployable(rebuilt, path, fmt, runtime)
            rebuilt.metrics.update(deployment_figures(rebuilt.model, self.problem.input_shape, path,
                                                      self.baseline.model, (self.problem.base, self.base_uri),
                                                      f"search trial {rebuilt.number}'s model", runtime=runtime))
            tracking.log_artifact(path, "onnx")
            payload = Path(tmp) / "model.mcpz"  # the encoded model its size is: mcp.tracking.load_payload decodes it
            payload.write_bytes(rebuilt.tuned.payload)
            tracking.log_artifact(payload, "compressed")
        codebooks = rebuilt.config.codebook_layers
        note = DEPLOY_NOTES[fmt] + (f"; {', '.join(codebooks)} in float32, decoded from their k-means codebooks"
                                    if codebooks else "")
        for key, value in {schema.DEPLOY_FORMAT: fmt, schema.DEPLOY_NOTE: note, schema.RUNTIME: runtime,
                           schema.RUNTIME_SETTINGS: runtimes.settings(runtime)}.items():
            tracking.runs.set_tag(key, value)
        return fmt

    def _check_deployable(self, rebuilt: Rebuilt, path: Path, fmt: str, runtime: str) -> None:
        """The checks `mcp export` runs on a deployable (ONNX's checker, parity with PyTorch
        in its runtime by the rules of its format), run before anything of the winner is
        registered."""
        check_onnx(path)
        session = runtimes.session(path, runtime)
        par = parity(rebuilt.model, session, parity_batch(self.problem.loaders[2], 256))
        if runtime != "onnxruntime":  # its accuracy where it will run
            rebuilt.metrics["onnx_test_accuracy"] = ort_evaluate(session, self.problem.loaders[2])["accuracy"]
        rebuilt.metrics.update(onnx_max_abs_diff=par["max_abs_diff"], onnx_agreement=par["agreement"])
        failure = parity_failure(fmt, par, ParityRules(), runtime,
                                 (rebuilt.metrics["onnx_test_accuracy"], rebuilt.metrics["test_accuracy"]))
        if failure:
            raise McpError(f"search trial {rebuilt.number}'s winner failed the deploy check ({fmt}, {runtime}): "
                           f"{failure}")

    def challenger(self, winner: dict[str, Any]) -> None:
        if winner["registered_name"]:
            self.earlier_challenger = tracking.models.alias_version(winner["registered_name"], schema.CHALLENGER)
            tracking.models.set_alias(winner["registered_name"], schema.CHALLENGER, winner["version"])
            winner["alias"] = schema.CHALLENGER

    def discard(self, winners: list[dict[str, Any]]) -> str:
        """Remove the versions these winners registered (and the ONNX versions exported from
        them), and put the challenger alias back where it was; the runs stay, as logs."""
        name = self.registered
        gone = {w["version"] for w in winners if w.get("registered_name") and w.get("version")}
        if not name or not gone:
            return "nothing was registered"
        uris = {schema.version_uri(name, v) for v in gone}
        exported = {str(v) for v, tags, _ in tracking.models.list_versions(name) if tags.get("source_model") in uris}
        for version in sorted(gone | exported, key=int, reverse=True):
            tracking.models.delete_version(name, version)
        earlier = self.earlier_challenger
        alias = ""
        if any(w.get("alias") == schema.CHALLENGER for w in winners):
            if earlier and earlier not in gone | exported:
                tracking.models.set_alias(name, schema.CHALLENGER, earlier)
                alias = f"; the {schema.CHALLENGER} alias is back on version {earlier}"
            else:
                alias = f"; {name} has no {schema.CHALLENGER} alias"
        listed = ", ".join(sorted(gone | exported, key=int))
        return (f"removed what this search registered: version(s) {listed} of {name}{alias}; the trial and winner "
                f"runs stay in the experiment as logs")

    def after(self, winners: list[dict[str, Any]]) -> None:
        """Export each winner (nested `export` runs; a reused one whose ONNX version exists is
        not exported twice) and benchmark them against the starting model (a nested
        `benchmark` run)."""
        cfg = self.cfg
        data = {k: getattr(cfg, k) for k in DataOptions.defaults()}
        uris = [schema.version_uri(w["registered_name"], w["version"]) if w["registered_name"] else
                f"runs:/{w['run_id']}/model" for w in winners]
        for w, uri in zip(winners, uris) if cfg.export else ():
            earlier = [str(v) for v, tags, _ in tracking.models.list_versions(w["registered_name"])
                       if tags.get("format") == "onnx" and tags.get("source_model") == uri] if w.get("reused") else []
            if earlier:
                w["onnx_version"] = earlier[0]
                continue
            exported = run_export(ExportConfig(model=cfg.model, model_uri=uri, register=cfg.register,
                                               runtime=w.get("runtime", "onnxruntime"), **data), self.show_progress)
            w["onnx_version"] = exported.registered_version
            w["size_bytes_onnx"] = exported.metrics["size_bytes_onnx"]
        if cfg.benchmark and winners:
            bench = run_benchmark(BenchmarkConfig(model=cfg.model, models=",".join([self.base_uri, *uris]),
                                                  baseline=self.base_uri, seconds=1.0, runtime=cfg.runtime,
                                                  trust_pickled_model=cfg.trust_pickled_model, **data),
                                  self.show_progress)
            for w, row in zip(winners, bench.rows[1:]):
                w.update({k: row[k] for k in ("latency_ms_p50_cpu", "speedup_p50_cpu", "throughput_ips_cpu")})
