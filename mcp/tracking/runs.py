"""Stage runs: start (or join, under `mlflow run`) a run, and end it FAILED on any error."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Mapping

from mcp.tracking import schema
from mcp.training.loop import Callback


def _mlflow():
    import mlflow

    return mlflow


REACH_TIMEOUT_S = 5.0
_REACHED: set[str] = set()  # servers that answered: checked once per process


def check_tracking_server(uri: str | None = None) -> None:
    """An ``http(s)://`` tracking URI must answer MLflow's ``/health`` within seconds: an
    unreachable server is one line, not minutes of retries and a traceback. Other stores
    (SQLite, a folder, ``databricks``) are left to MLflow."""
    import urllib.error
    import urllib.request

    uri = uri if uri is not None else _mlflow().get_tracking_uri()
    if not uri.startswith(("http://", "https://")) or uri in _REACHED:
        return
    from mcp.errors import McpError

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


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None,
              run_name: str | None = None) -> Iterator[Any]:
    """One MLflow run for one stage call.

    Under ``mlflow run`` the run already exists (``MLFLOW_RUN_ID``) and is joined;
    otherwise a new top-level run starts in the store ``MLFLOW_TRACKING_URI`` names
    (MLflow's default: SQLite ``mlflow.db`` in the working directory). Any exception,
    Ctrl-C included, ends the run FAILED before it propagates. Started while another
    run is active, it is a nested run of that one.
    """
    mlflow = _mlflow()
    nested = mlflow.active_run() is not None  # a stage inside a stage (baseline, compared variants)
    if not nested:
        check_tracking_server()
    tags = {schema.STAGE: stage, **(tags or {})}
    if params.get("trust_pickled_model") is True:  # the user let a pickled model run its code
        tags[schema.TRUST_PICKLED_MODEL] = "true"
    run = mlflow.start_run(run_name=run_name, nested=nested, tags=tags)
    try:
        log_params(params)
        yield run
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the CLI turns it into KeyboardInterrupt)
        mlflow.end_run(status="KILLED")
        raise
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run(status="FINISHED")


def _param_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


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


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    _mlflow().log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def set_tag(key: str, value: str) -> None:
    _mlflow().set_tag(key, value)


def active_run_id() -> str:
    return _mlflow().active_run().info.run_id


def log_text(text: str, artifact_file: str) -> None:
    _mlflow().log_text(text, artifact_file)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    _mlflow().log_artifact(str(path), artifact_path=artifact_path)


def run_metrics(run_id: str) -> dict[str, float]:
    """The latest value of every metric of a run."""
    return dict(_mlflow().get_run(run_id).data.metrics)


def mark_killed(run_id: str) -> None:
    """Mark a run that died without ending (for example the run a checkpoint came from)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")
    except MlflowException:
        pass  # the run lives in another store: nothing to mark here


class EpochLogger(Callback):
    """Log each epoch's metrics with ``step=epoch``."""

    def on_epoch_end(self, trainer, epoch: int, logs: dict[str, float]) -> None:
        log_metrics(logs, step=epoch)
