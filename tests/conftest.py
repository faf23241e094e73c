"""Every test runs against a temporary MLflow store in a temporary working directory,
never the user's ``mlflow.db``."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MCP_DEPLOY_TIMING_S", "0.02")  # each registered model's deployed latency: timed briefly
os.environ.setdefault("MCP_CACHE_DIR", tempfile.mkdtemp(prefix="mcp-test-cache-"))  # kernel timings: not the user's
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs test files in parallel processes (addopts: -n 2): one thread each, and
    # the same for the processes they start, or two multi-threaded torch processes thrash
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    work = tmp_path_factory.mktemp("mlflow-work")
    old_cwd, old_uri = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.chdir(work)
    try:
        import mlflow

        mlflow.set_tracking_uri(uri)
        yield uri
    finally:
        os.chdir(old_cwd)
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri


@pytest.fixture
def experiment(request, mlflow_store, monkeypatch):
    """A fresh MLflow experiment per test, so run queries see only that test's runs."""
    import mlflow

    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.nodeid)[-200:]
    experiment_id = mlflow.set_experiment(name).experiment_id
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    yield experiment_id
    if mlflow.active_run():
        mlflow.end_run()


_EMPTY_STORE: list[Path] = []


def _empty_store() -> Path:
    """An empty MLflow SQLite store with its tables created, made once per session."""
    if not _EMPTY_STORE:
        from mlflow import MlflowClient

        path = Path(tempfile.mkdtemp(prefix="mcp-empty-store-")) / "empty.db"
        MlflowClient(f"sqlite:///{path}").search_experiments()
        _EMPTY_STORE.append(path)
    return _EMPTY_STORE[0]


def pytest_sessionfinish(session, exitstatus):
    """The session's empty store goes with the session (one folder in /tmp per run otherwise)."""
    for path in _EMPTY_STORE:
        shutil.rmtree(path.parent, ignore_errors=True)


@contextlib.contextmanager
def separate_store(path: Path, monkeypatch):
    """Switch MLflow to a fresh SQLite store at ``path`` (a model registry of its own),
    with an experiment of its own; switch back, active experiment included, afterwards."""
    import mlflow
    from mlflow.tracking.fluent import _get_experiment_id

    old_uri, old_experiment = mlflow.get_tracking_uri(), _get_experiment_id()
    shutil.copyfile(_empty_store(), path)  # creating MLflow's tables takes a second or more; copying, none
    uri = f"sqlite:///{path}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("tests")
    try:
        yield uri
    finally:
        if mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(old_uri)
        if old_experiment is not None:
            mlflow.set_experiment(experiment_id=old_experiment)


@pytest.fixture
def own_store(tmp_path, monkeypatch):
    """A tracking store (and so a model registry) of the test's own, for tests whose
    registered baselines would change what other tests find."""
    with separate_store(tmp_path / "own.db", monkeypatch) as uri:
        yield uri


def runs_of(experiment_id: str):
    from mlflow import MlflowClient

    return MlflowClient().search_runs([experiment_id], run_view_type=3)  # ALL


@pytest.fixture
def cli():
    """Invoke the click CLI in-process; returns click's Result."""
    from click.testing import CliRunner

    from mcp.cli import main

    def invoke(*args: str):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


PYTHON = sys.executable
