"""Stage runs: start (or join, under `mlflow run`) a run, and end it FAILED on any error."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from mcp.errors import McpError
from mcp.locking import sqlite_lock
from mcp.tracking import schema
from mcp.training.loop import Callback


def _mlflow():
    import mlflow

    return mlflow


_DEFERRED: list[int] = [0]  # depth of the MLflow writes under way
_STOPPED: list[int] = []  # the stop signals received: once one arrives, the process is stopping
# the code that talks to a database: a signal that lands in it waits until it returns
_DATABASE_LAYERS = ("sqlalchemy", "sqlite3", "psycopg", "psycopg2", "alembic", "optuna.storages", "mlflow.store")
RETRY_S = 0.02  # how soon a held signal looks again whether the database call has returned


def on_stop_signal(signum: int, frame: Any) -> None:
    """SIGTERM (a scheduler, `docker stop`, `kill`) and SIGINT (Ctrl-C) unwind the stage as
    KeyboardInterrupt, so its runs end KILLED. One that arrives while MLflow writes to its
    store waits for the write to end, and so does one that lands inside any database call
    (Optuna's storage, the study's claims, SQLAlchemy): interrupted between a statement and
    its commit, a SQLite file stays locked, and the unwinding that must end the trial FAIL
    and its runs KILLED waits a minute for a lock its own process holds. The signal is also
    remembered: Python drops an exception raised where the signal happened to land in a
    garbage-collection callback, and the next write raises it again."""
    _STOPPED.append(signum)
    if _DEFERRED[0] or (_in_database_call(frame) and _look_again()):
        return
    raise KeyboardInterrupt(f"signal {signum}")


def _in_database_call(frame: Any) -> bool:
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if any(module == layer or module.startswith(layer + ".") for layer in _DATABASE_LAYERS):
            return True
        frame = frame.f_back
    return False


def _look_again() -> bool:
    """Arm a timer that raises the held stop once the database call has returned (False
    where there are no interval timers: the stop then acts at once)."""
    import signal

    if not hasattr(signal, "setitimer"):
        return False
    signal.signal(signal.SIGALRM, _held_stop)
    signal.setitimer(signal.ITIMER_REAL, RETRY_S)
    return True


def _held_stop(signum: int, frame: Any) -> None:
    if _DEFERRED[0] or (_in_database_call(frame) and _look_again()):
        return  # an MLflow write under way raises it at its end; a database call is looked at again
    raise KeyboardInterrupt(f"signal {_STOPPED[0]}")


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold stop signals for the duration of an MLflow write; act on them after it (unless
    the stop is already unwinding: ending the runs KILLED is itself a write)."""
    import sys

    _DEFERRED[0] += 1
    try:
        yield
    finally:
        _DEFERRED[0] -= 1
        if not _DEFERRED[0] and _STOPPED and not isinstance(sys.exc_info()[1], KeyboardInterrupt):
            raise KeyboardInterrupt(f"signal {_STOPPED[0]}")


def mlflow_write(fn):
    """Decorate a function that writes to the tracking store: see :func:`uninterrupted`."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with uninterrupted():
            return fn(*args, **kwargs)

    return wrapper


REACH_TIMEOUT_S = 5.0
_REACHED: set[str] = set()  # servers that answered: checked once per process


def check_tracking_server(uri: str | None = None) -> None:
    """An ``http(s)://`` tracking URI must answer MLflow's ``/health`` within seconds: an
    unreachable server is one line, not minutes of retries and a traceback. A new SQLite
    store is created now, also by workers that start together on it. Other stores (a
    folder, ``databricks``) are left to MLflow."""
    import urllib.error
    import urllib.request

    uri = uri if uri is not None else _mlflow().get_tracking_uri()
    if uri in _REACHED:
        return
    if uri.startswith("sqlite:"):
        _create_sqlite_store(uri)
        _REACHED.add(uri)
        return
    if not uri.startswith(("http://", "https://")):
        return

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=REACH_TIMEOUT_S) as reply:
            if reply.status == 200:
                _REACHED.add(uri)
                return
            reason = f"HTTP {reply.status} from /health"
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code} from /health"
    except (urllib.error.URLError, OSError) as exc:
        reason = " ".join(str(getattr(exc, "reason", exc)).split())
    raise McpError(f"MLflow tracking server {uri!r} is not reachable ({reason}); start it, or set "
                   f"MLFLOW_TRACKING_URI to a reachable server or a local store (e.g. sqlite:///mlflow.db)")


def _create_sqlite_store(uri: str) -> None:
    """Open (creating) a SQLite tracking store, one process at a time: processes that
    create the same new file at once would run MLflow's table migrations together, and
    all but one fail."""
    with sqlite_lock(uri):
        _mlflow().MlflowClient(uri).search_experiments(max_results=1)


class ExperimentWarning(UserWarning):
    """An experiment option that cannot be followed (under ``mlflow run``, or a study's)."""


def experiment_name(tags: Mapping[str, str], registered_model: str = "") -> str:
    """The experiment a top-level run lands in when nothing names one: the registered model
    the run works on, ``<model>-<dataset>`` (``lenet300_100-digits``; an imported model's
    ``<name>-<dataset>``; the parent's registered name when it starts from a registered
    version), or, for a Python API call (no dataset), the model's architecture name."""
    model, dataset = tags.get(schema.MODEL, ""), tags.get(schema.DATASET, "")
    return (registered_model or schema.registered_name_of(tags.get(schema.PARENT_MODEL, ""))
            or (schema.registered_name(model, dataset) if model and dataset else model) or "mcp")


@mlflow_write
def ensure_experiment(name: str) -> str:
    """The id of the experiment ``name``, created when missing. Workers that create it at
    once all get the same one: the store refuses all but one creation, and the others read
    it back."""
    from mlflow.exceptions import MlflowException

    client = _mlflow().MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # RESOURCE_ALREADY_EXISTS: another worker created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise McpError(f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore "
                       f"--experiment-id {experiment.experiment_id}), or choose another with --experiment")
    return experiment.experiment_id


def experiment_of(run_id: str) -> str:
    """The id of the experiment ``run_id`` is in."""
    return _mlflow().MlflowClient().get_run(run_id).info.experiment_id


def _top_level_experiment(option: str, tags: Mapping[str, str], registered_model: str,
                          study_experiment_id: str | None) -> str | None:
    """The experiment id a new top-level run starts in; None leaves it to MLflow (the
    experiment ``mlflow run`` chose, or ``MLFLOW_EXPERIMENT_NAME`` / ``MLFLOW_EXPERIMENT_ID``,
    which ``mlflow.set_experiment`` also sets)."""
    import os
    import warnings

    mlflow = _mlflow()
    if os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run`: the run exists, in the experiment it chose
        if option:
            chosen = mlflow.get_experiment(experiment_of(os.environ["MLFLOW_RUN_ID"])).name
            if chosen != option:
                warnings.warn(f"--experiment {option} is not used under `mlflow run`: its run is in experiment "
                              f"{chosen!r} (choose it with mlflow run --experiment-name)", ExperimentWarning,
                              stacklevel=3)
        return None
    if study_experiment_id:  # a study's runs stay together, whichever worker starts them
        joined = mlflow.get_experiment(study_experiment_id).name
        if option and joined != option:
            warnings.warn(f"--experiment {option} is not used: the study's runs are in experiment {joined!r}, "
                          f"and this worker's join them", ExperimentWarning, stacklevel=3)
        return study_experiment_id
    if option:
        return ensure_experiment(option)
    env_name, env_id = os.environ.get("MLFLOW_EXPERIMENT_NAME"), os.environ.get("MLFLOW_EXPERIMENT_ID")
    if env_name and not env_id:
        return ensure_experiment(env_name)  # as MLflow would, but safe against workers creating it at once
    if env_name or env_id:
        return None  # MLflow's own checks: an id the store does not hold, a name the id does not match
    return ensure_experiment(experiment_name(tags, registered_model))


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None,
              run_name: str | None = None, registered_model: str = "",
              study_experiment_id: str | None = None) -> Iterator[Any]:
    """One MLflow run for one stage call.

    Under ``mlflow run`` the run already exists (``MLFLOW_RUN_ID``) and is joined;
    otherwise a new top-level run starts in the store ``MLFLOW_TRACKING_URI`` names
    (MLflow's default: SQLite ``mlflow.db`` in the working directory), in the experiment
    ``params["experiment"]`` names, else ``MLFLOW_EXPERIMENT_NAME`` / ``MLFLOW_EXPERIMENT_ID``,
    else the one named after ``registered_model`` or the tags (:func:`experiment_name`),
    created when missing; ``study_experiment_id`` (the experiment a search study's runs are
    in) overrides them all. Any exception, Ctrl-C included, ends the run FAILED before it
    propagates. Started while another run is active, it is a nested run of that one, in
    its experiment.
    """
    mlflow = _mlflow()
    nested = mlflow.active_run() is not None  # a stage inside a stage (baseline, compared variants)
    if nested:
        experiment_id = mlflow.active_run().info.experiment_id  # MLflow would take the environment's
    else:
        check_tracking_server()
        experiment_id = _top_level_experiment(str(params.get("experiment") or ""), tags or {}, registered_model,
                                              study_experiment_id)
    tags = {schema.STAGE: stage, **(tags or {})}
    if params.get("trust_pickled_model") is True:  # the user let a pickled model run its code
        tags[schema.TRUST_PICKLED_MODEL] = "true"
    run = None
    try:
        with uninterrupted():  # a signal held during the start acts here, with the run started
            run = mlflow.start_run(run_name=run_name, nested=nested, tags=tags, experiment_id=experiment_id)
        log_params(params)
        yield run
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the CLI turns it into KeyboardInterrupt)
        if run is not None:
            with uninterrupted():
                mlflow.end_run(status="KILLED")
        raise
    except BaseException:
        if run is not None:
            with uninterrupted():
                mlflow.end_run(status="FAILED")
        raise
    with uninterrupted():
        mlflow.end_run(status="FINISHED")


def _param_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


@mlflow_write
def log_params(params: Mapping[str, Any]) -> None:
    """Log params, plus the whole mapping as ``config.json``.

    Under ``mlflow run`` MLflow has already logged the entry point's parameters as typed
    (an empty string as ``''``); params are immutable, so keys it logged are kept and the
    resolved values live in ``config.json``.
    """
    mlflow = _mlflow()
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params if run else {}
    mlflow.log_params({k: _param_text(v) for k, v in params.items() if k not in existing})
    mlflow.log_dict(dict(params), "config.json")


@mlflow_write
def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    _mlflow().log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


@mlflow_write
def log_run_metrics(run_id: str, metrics: Mapping[str, float]) -> None:
    """Log ``metrics`` into the run ``run_id`` (finished or not), in one batch."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    _mlflow().MlflowClient().log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])


@mlflow_write
def set_tag(key: str, value: str) -> None:
    _mlflow().set_tag(key, value)


def active_run_id() -> str:
    return _mlflow().active_run().info.run_id


@mlflow_write
def log_text(text: str, artifact_file: str) -> None:
    _mlflow().log_text(text, artifact_file)


@mlflow_write
def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    _mlflow().log_artifact(str(path), artifact_path=artifact_path)


def run_metrics(run_id: str) -> dict[str, float]:
    """The latest value of every metric of a run."""
    return dict(_mlflow().get_run(run_id).data.metrics)


@mlflow_write
def mark_killed(run_id: str, up_through_stage: str = "") -> list[str]:
    """End KILLED what a process that died left RUNNING: ``run_id``, its ancestors while
    they are runs of ``up_through_stage`` (a dead search worker's study run above its
    trial's), and every run still RUNNING below those. A run in another store is left
    alone. Returns the names of the runs it ended."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client, ended, dead = MlflowClient(), [], []
    while run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:  # the run lives in another store: nothing to end here
            break
        if run.info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")
            ended.append(run.info.run_name)
            dead.append(run)
        above = up_through_stage and run.data.tags.get(schema.STAGE) == up_through_stage
        run_id = run.data.tags.get("mlflow.parentRunId") if above else None
    while dead:
        run = dead.pop()
        for child in client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}' "
                                                                  f"and attributes.status = 'RUNNING'"):
            client.set_terminated(child.info.run_id, status="KILLED")
            ended.append(child.info.run_name)
            dead.append(child)
    return ended


def run_exists(run_id: str) -> bool:
    """Whether the tracking store holds this run."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient().get_run(run_id)
        return True
    except MlflowException:
        return False


def tracking_uri() -> str:
    return _mlflow().get_tracking_uri()


class EpochLogger(Callback):
    """Log each epoch's metrics with ``step=epoch``, in one write per ``every_s`` seconds
    at most (and at the end of training): every write to a SQLite store is a commit of
    about 10 ms, as long as a whole epoch of a small model on the digits."""

    def __init__(self, every_s: float = 1.0):
        self.every_s = every_s
        self._pending: list = []
        self._last = time.monotonic()

    def on_epoch_end(self, trainer, epoch: int, logs: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now_ms, epoch) for k, v in logs.items()]
        if time.monotonic() - self._last >= self.every_s:
            self.flush()

    def on_fit_end(self, trainer) -> None:
        self.flush()

    @mlflow_write
    def flush(self) -> None:
        client = _mlflow().MlflowClient()
        for i in range(0, len(self._pending), 1000):  # MLflow takes at most 1,000 metrics a call
            client.log_batch(active_run_id(), metrics=self._pending[i:i + 1000])
        self._pending, self._last = [], time.monotonic()
