"""Many `mcp search` workers on one study: SQLite on one machine (default suite), and a
real PostgreSQL server with a real `mlflow server` on it (CI installs PostgreSQL)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

STUDY = "tiny_mlp-synthetic-max-accuracy"
SPACE = """
prune: {ratio: [0.3, 0.9]}
quantize: {bits: [2, 4, 8]}
finetune: {epochs: [8, 10], lr: [0.005, 0.02]}  # trials long enough to overlap
"""


def _env(tracking_uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _search_args(space: Path, storage: str, trials: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mcp", "search", "--model", "tiny_mlp", "--dataset", "synthetic",
            "--input-shape", "3x8x8", "--num-classes", "4", "--budget-ratio", "0.3", "--pruner", "none",
            "--space", str(space), "--trials", str(trials), "--heartbeat", "2", "--benchmark", "false",
            *(["--storage", storage] if storage else []), *extra]


def run_workers(n: int, tmp: Path, tracking_uri: str, storage: str, trials: int, timeout: float = 600) -> list:
    """Start ``n`` workers at the same moment on one study (no baseline and, for a fresh
    storage, no Optuna tables yet); wait for all of them."""
    space = tmp / "space.yaml"
    space.write_text(SPACE)
    workers = []
    for i in range(n):
        log = open(tmp / f"worker{i}.log", "w")
        workers.append((subprocess.Popen(_search_args(space, storage, trials), env=_env(tracking_uri), cwd=tmp,
                                         stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.time() + timeout
    for proc, log in workers:
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return [(proc.returncode, (tmp / f"worker{i}.log").read_text()) for i, (proc, _) in enumerate(workers)]


def check_one_study(tracking_uri: str, storage: str, trials: int, workers: int) -> None:
    """What many workers on one study must leave: exactly ``trials`` finished trials, each
    with one MLflow run of the same state, nothing RUNNING, no parameters tried twice, one
    baseline and one winner registered once (and its ONNX once), ``challenger`` on the best
    feasible trial."""
    import mlflow
    import optuna
    from mlflow import MlflowClient

    study = optuna.load_study(study_name=STUDY, storage=storage)
    trials_ = study.get_trials()
    assert len(trials_) == trials, [(t.number, t.state.name) for t in trials_]
    assert {t.state for t in trials_} == {optuna.trial.TrialState.COMPLETE}
    params = [json.dumps(t.params, sort_keys=True) for t in trials_]
    assert len(set(params)) == len(params), "two trials ran the same parameters"

    client = MlflowClient(tracking_uri)
    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    finally:
        mlflow.set_tracking_uri(old)
    assert not [r.info.run_name for r in runs if r.info.status != "FINISHED"]
    studies = [r for r in runs if r.info.run_name == f"search-{STUDY}"]
    assert len(studies) == workers
    # every worker's runs in one experiment, the registered model's, which the first to start created
    shared = client.get_experiment_by_name("tiny_mlp-synthetic")
    assert shared is not None and {r.info.experiment_id for r in runs} == {shared.experiment_id}
    ran = {r.data.tags["mlflow.parentRunId"] for r in runs if r.info.run_name.startswith("trial-")}
    assert ran == {r.info.run_id for r in studies}, "a worker ran no trial"
    for t in trials_:
        mine = [r for r in runs if r.info.run_name == f"trial-{t.number}"]
        assert [r.info.run_id for r in mine] == [t.user_attrs["mlflow_run_id"]]
        assert mine[0].data.tags["mcp.trial_state"] in ("complete", "infeasible")
        assert (mine[0].data.tags["mcp.trial_state"] == "complete") == (t.user_attrs["budget_excess"] <= 0)

    versions = client.search_model_versions("name='tiny_mlp-synthetic'")
    by_stage: dict[str, list] = {}
    for v in versions:
        by_stage.setdefault(v.tags.get("mcp.stage") or v.tags.get("format", "?"), []).append(v)
    assert len(by_stage.get("train", [])) == 1, "each worker trained its own baseline"
    assert len(by_stage.get("search", [])) == 1, "the winner was registered more than once"
    assert len([v for v in versions if v.tags.get("format") == "onnx"]) == 1
    (winner,) = by_stage["search"]
    feasible = [t for t in trials_ if t.user_attrs["budget_excess"] <= 0]
    best = max(feasible, key=lambda t: (t.value, -t.user_attrs["size_bytes_compressed"]))
    assert winner.tags["trial"] == str(best.number)
    assert client.get_model_version_by_alias("tiny_mlp-synthetic", "challenger").version == winner.version
    assert len([r for r in runs if r.info.run_name.startswith("winner-trial-")]) == 1


@pytest.mark.slow  # two worker processes, 16 s: the default suite keeps the in-process sharing tests
def test_two_workers_started_together_on_fresh_sqlite_share_one_study(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    results = run_workers(2, tmp_path, tracking_uri, "", trials=6)
    for code, log in results:
        assert code == 0, log[-3000:]
    assert (tmp_path / "optuna.db").is_file()  # the study beside the tracking database
    check_one_study(tracking_uri, f"sqlite:///{tmp_path / 'optuna.db'}", trials=6, workers=2)
    # the other worker waited for the baseline and for the winner, rather than making its own
    assert sum("waiting for worker" in log for _, log in results) >= 1


def test_the_study_lives_beside_the_tracking_store_and_refuses_another_one(tmp_path, own_store, monkeypatch):
    from conftest import separate_store
    from mcp.config import SearchConfig, TrainConfig
    from mcp.errors import ConfigError, McpError
    from mcp.tuner.study import default_storage
    from mcp.stages.search import run_search
    from mcp.stages.train import run_train

    assert default_storage("sqlite:////data/runs/mlflow.db") == "sqlite:////data/runs/optuna.db"
    assert default_storage("sqlite:///mlflow.db") == "sqlite:///optuna.db"
    assert default_storage("file:///data/mlruns") == "sqlite:////data/optuna.db"
    for uri in ("http://tracking:5000", "postgresql://u@db/mlflow", "databricks"):
        with pytest.raises(ConfigError, match=f"the tracking URI is '{uri}'; pass --storage"):
            default_storage(uri)

    tiny = dict(model="tiny_mlp", dataset="synthetic", input_shape="3x8x8", num_classes=4)
    run_train(TrainConfig(epochs=1, **tiny), show_progress=False)
    space = tmp_path / "space.yaml"
    space.write_text(SPACE.replace("epochs: [8, 10]", "epochs: [1, 1]"))
    cfg = SearchConfig(space=str(space), trials=1, pruner="none", register=False, export=False, benchmark=False,
                       **tiny)
    run_search(cfg, show_progress=False)  # no --storage: optuna.db beside own.db
    beside = f"sqlite:///{tmp_path / 'optuna.db'}"
    import optuna

    assert len(optuna.load_study(study_name=cfg.name(), storage=beside).trials) == 1
    (tmp_path / "other").mkdir()
    with separate_store(tmp_path / "other" / "mlflow.db", monkeypatch):  # another tracking store, same study
        run_train(TrainConfig(epochs=1, **tiny), show_progress=False)
        with pytest.raises(McpError, match=r"was made with another tracking store \(run \w+ is not in"):
            run_search(cfg.replace(storage=beside, trials=2), show_progress=False)
    assert len(optuna.load_study(study_name=cfg.name(), storage=beside).trials) == 1


# -- signals and kill -9 ------------------------------------------------------------------------------------------


def _runs(tracking_uri: str) -> list:
    import mlflow

    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        return mlflow.search_runs(search_all_experiments=True, output_format="list")
    finally:
        mlflow.set_tracking_uri(old)


def _wait_for(condition, proc, log: Path, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        found = condition()
        if found is not None:
            return found
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    pytest.fail(f"the worker never got there: {log.read_text()[-3000:]}")


def _running_trial(storage: str):
    """The number of a trial that runs (after the first), with its MLflow run open."""
    import optuna

    try:
        study = optuna.load_study(study_name=STUDY, storage=storage)
    except KeyError:
        return None
    running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    return running[0].number if running and running[0].number >= 1 and "mlflow_run_id" in running[0].user_attrs \
        else None


def test_workers_sharing_a_study_sample_apart_and_a_lone_worker_keeps_the_seed(tmp_path):
    """Workers whose samplers were seeded alike proposed the same parameters when they asked
    together (CI: two of nine trials of three workers on PostgreSQL ran the same ones). The
    first worker (slot 0) samples with the study's seed; a second one reseeds; a worker
    alone again takes slot 0."""
    import optuna

    from mcp.tuner.worker import Plan, Quiet, StudyWorker

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    plan = Plan("shared", storage, trials=4, heartbeat=5.0)

    def load():
        return optuna.create_study(study_name="shared", storage=storage, load_if_exists=True,
                                   sampler=optuna.samplers.TPESampler(seed=0))

    def first_ratio(study) -> float:
        return study.ask().suggest_float("ratio", 0.0, 1.0)

    alone = first_ratio(optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0)))
    first, second = StudyWorker(None, plan, load(), Quiet()), StudyWorker(None, plan, load(), Quiet())
    try:
        assert (first.slot, second.slot) == (0, 1)
        assert first_ratio(first.study) == alone  # the seeded stream, as in a study of one worker
        assert first_ratio(second.study) != alone  # without the reseed: the same value
    finally:
        second.close()
        first.close()
    again = StudyWorker(None, plan, load(), Quiet())
    try:
        assert again.slot == 0
    finally:
        again.close()


STOP_IN_A_DATABASE_CALL = """
import os, signal, sys, time
import sqlalchemy
from mcp.tracking import runs

engine = sqlalchemy.create_engine(f"sqlite:///{sys.argv[1]}", connect_args={"timeout": 1})
with engine.begin() as conn:
    conn.execute(sqlalchemy.text("CREATE TABLE t (x INTEGER)"))
# the signal arrives while SQLAlchemy runs the INSERT: the handler runs at once, inside its frames
sqlalchemy.event.listen(engine, "before_cursor_execute", lambda *a: os.kill(os.getpid(), signal.SIGINT))
signal.signal(signal.SIGINT, runs.on_stop_signal)
try:
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("INSERT INTO t VALUES (1)"))
    print("committed", flush=True)
    for _ in range(500):  # the held stop raises here, within a few hundredths of a second
        time.sleep(0.01)
    print("not stopped", flush=True)
except KeyboardInterrupt:
    print("stopped", flush=True)
"""


def test_a_stop_signal_that_lands_in_a_database_call_waits_for_it_to_commit(tmp_path):
    """Ctrl-C landing between a statement and its commit (Optuna's storage, the claims) must
    not leave the SQLite file locked by a transaction nobody ends: the unwinding that fails
    the trial and ends its runs KILLED would wait a minute on its own process's lock. The
    stop waits until the database call returns, then acts. In a process of its own: a
    signal's handler runs on the process's alternate signal stack, which pytest's
    faulthandler sets, and in a test process that had run OpenVINO's CPU plugin that stack
    was no longer mapped (gdb: ``sigaltstack`` pointing at unmapped memory), so the signal
    crashed the test process."""
    import sqlalchemy

    db = tmp_path / "db.sqlite"
    done = subprocess.run([sys.executable, "-c", STOP_IN_A_DATABASE_CALL, str(db)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.stdout.split() == ["committed", "stopped"], done.stderr[-2000:]
    other = sqlalchemy.create_engine(f"sqlite:///{db}", connect_args={"timeout": 1})
    with other.begin() as conn:  # nothing holds the file's lock
        conn.execute(sqlalchemy.text("INSERT INTO t VALUES (2)"))
        assert [r[0] for r in conn.execute(sqlalchemy.text("SELECT x FROM t ORDER BY x"))] == [1, 2]
    other.dispose()


@pytest.mark.slow  # two worker processes (~20 s each); test_untrusted_models has a fast SIGTERM test of a stage
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_worker_ends_its_runs_killed_and_the_same_command_resumes(tmp_path, signum):
    """SIGTERM (a scheduler, `docker stop`) or SIGINT during a trial: exit non-zero, the
    trial failed and its runs KILLED at once, not RUNNING; the same command then runs the
    study up to its total."""
    import optuna

    space = tmp_path / "space.yaml"
    space.write_text(SPACE.replace("epochs: [8, 10]", "epochs: [80, 80]"))  # a trial takes a second or two
    tracking_uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    args = _search_args(space, "", 2, "--register", "false", "--export", "false")
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(args, env=_env(tracking_uri), cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
        stopped = _wait_for(lambda: _running_trial(storage), worker, log)
        worker.send_signal(signum)
        assert worker.wait(timeout=60) != 0
    study = optuna.load_study(study_name=STUDY, storage=storage)
    assert study.trials[stopped].state == optuna.trial.TrialState.FAIL
    assert optuna.trial.TrialState.RUNNING not in {t.state for t in study.trials}
    runs = {r.info.run_id: r for r in _runs(tracking_uri)}
    trial_run = runs[study.trials[stopped].user_attrs["mlflow_run_id"]]
    assert trial_run.info.status == "KILLED"
    assert runs[trial_run.data.tags["mlflow.parentRunId"]].info.status == "KILLED"
    assert not [r.info.run_name for r in runs.values() if r.info.status == "RUNNING"]

    again = subprocess.run(args, env=_env(tracking_uri), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    study = optuna.load_study(study_name=STUDY, storage=storage)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 2 + ["FAIL"]
    assert not [r.info.run_name for r in _runs(tracking_uri) if r.info.status == "RUNNING"]


def test_a_trial_that_stopped_beating_is_failed_queued_once_more_and_its_runs_end_killed(tmp_path, own_store,
                                                                                        capsys):
    """What the next worker does about a worker that died mid-trial (the real kill -9 is
    the slow test in test_search.py): Optuna's heartbeat makes the trial stale, and the
    sweep fails it, queues it once more, frees its ticket and ends its runs KILLED."""
    import mlflow
    import optuna

    from mcp.stages.search import Runs
    from mcp.tuner.claims import Claims
    from mcp.tuner.study import _storage
    from mcp.tuner.worker import Plan, sweep, take_ticket

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=_storage(storage, 1.0))
    dead = Claims(storage, "s", heartbeat=1.0, grace=3.0)
    ticket = take_ticket(dead, 1)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    assert dead.claim(f"run-{trial.number}") and dead.set_value(ticket, str(trial.number))
    study_run = mlflow.start_run(run_name="search-s", tags={"mcp.stage": "search"})
    trial_run = mlflow.start_run(run_name="trial-0", nested=True, tags={"mcp.stage": "search"})
    trial.set_user_attr("mlflow_run_id", trial_run.info.run_id)
    _storage(storage, 1.0).record_heartbeat(trial._trial_id)  # it beat once, then its worker died
    dead.close()
    mlflow.end_run("RUNNING")  # (leave both runs as a killed process leaves them)
    mlflow.end_run("RUNNING")
    time.sleep(4.2)  # three heartbeats of silence (SQLite's clock has whole seconds)

    alive = Claims(storage, "s", heartbeat=1.0, grace=3.0)
    sweep(study, Plan("s", storage, 1, heartbeat=1.0), alive, Runs(None))
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]  # queued once more
    assert study.trials[1].params == study.trials[0].params
    assert "warning: trial 0 of study 's' was left running by a worker that stopped" in capsys.readouterr().err
    client = mlflow.MlflowClient()
    assert client.get_run(trial_run.info.run_id).info.status == "KILLED"
    assert client.get_run(study_run.info.run_id).info.status == "KILLED"
    assert take_ticket(alive, 1) == "ticket-0"  # the retry gets the ticket: the study still reaches its total
    alive.close()


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_failed_and_its_ticket_freed(tmp_path,
                                                                                             own_store):
    """Optuna only calls a trial stale once it has beaten; a worker killed between asking
    for the trial and its first beat is found by its claim on the trial going silent."""
    import optuna

    from mcp.stages.search import Runs
    from mcp.tuner.claims import Claims
    from mcp.tuner.study import _storage
    from mcp.tuner.worker import Plan, sweep, take_ticket

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=_storage(storage, 1.0))  # opened before the clock starts
    dead = Claims(storage, "s", heartbeat=60, grace=1.0)
    alive = Claims(storage, "s", heartbeat=60, grace=1.0)
    ticket = take_ticket(dead, 2)
    trial = study.ask()
    assert dead.claim(f"run-{trial.number}") and dead.set_value(ticket, str(trial.number))
    dead.close()  # the worker is gone: nothing beats its claims any more
    sweep(study, Plan("s", storage, 1, heartbeat=1.0), alive, Runs(None))
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING  # not silent long enough yet
    time.sleep(2.1)  # twice the grace
    sweep(study, Plan("s", storage, 1, heartbeat=1.0), alive, Runs(None))
    assert study.trials[0].state == optuna.trial.TrialState.FAIL
    assert take_ticket(alive, 2) == "ticket-0"  # its ticket is free again: the study still reaches its total
    assert take_ticket(alive, 2) == "ticket-1" and take_ticket(alive, 2) is None
    alive.close()


def _claim(storage: str, prefix: str):
    import sqlalchemy as sa

    engine = sa.create_engine(storage)
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.text("select key, done from mcp_claims where key like :p"),
                               {"p": prefix + "%"}).first()
    except sa.exc.OperationalError:  # not created yet
        return None
    finally:
        engine.dispose()
    return row if row is not None and not row[1] else None


@pytest.mark.slow
def test_a_worker_killed_while_registering_the_winner_is_taken_over_and_registers_once(tmp_path):
    """kill -9 during the winner's final fine-tuning: the next worker sees the claim go
    stale, ends the dead worker's runs KILLED, and registers the winner, once."""
    from mlflow import MlflowClient

    space = tmp_path / "space.yaml"
    space.write_text(SPACE.replace("epochs: [8, 10]", "epochs: [1, 1]"))
    tracking_uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    args = _search_args(space, "", 2, "--final-epochs", "400", "--export", "false")
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(args, env=_env(tracking_uri), cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
        _wait_for(lambda: _claim(storage, "once:winners"), worker, log)
        time.sleep(2.0)  # into the fine-tuning
        worker.kill()
        worker.wait()
    assert [r for r in _runs(tracking_uri) if r.info.run_name.startswith("winner-trial-")
            and r.info.status == "RUNNING"]
    time.sleep(7)  # three heartbeats (2 s) of silence: its claim is stale

    again = subprocess.run(args, env=_env(tracking_uri), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "the worker that was to register the winners for study" in again.stderr
    runs = _runs(tracking_uri)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    assert len([r for r in runs if r.info.run_name.startswith("winner-trial-")
                and r.info.status == "KILLED"]) == 1
    versions = MlflowClient(tracking_uri).search_model_versions("name='tiny_mlp-synthetic'")
    assert len([v for v in versions if v.tags.get("mcp.stage") == "search"]) == 1


# -- PostgreSQL and an MLflow tracking server -------------------------------------------------------------------


@contextlib.contextmanager
def _servers(tmp_path: Path):
    """PostgreSQL and an MLflow server on it; where they cannot start, the test says why
    (a skip, or a failure where CI requires them: MCP_REQUIRE_POSTGRES=1)."""
    from servers import Unavailable, mlflow_server, postgres_server

    try:
        with postgres_server() as pg, mlflow_server(f"{pg}/mlflow", tmp_path / "artifacts") as url:
            yield pg, url
    except Unavailable as exc:
        if os.environ.get("MCP_REQUIRE_POSTGRES"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.mark.slow
def test_three_workers_on_postgresql_and_a_tracking_server_share_one_study(tmp_path):
    with _servers(tmp_path) as (pg, url):
        storage = f"{pg}/optuna"
        results = run_workers(3, tmp_path, url, storage, trials=9)
        for code, log in results:
            assert code == 0, log[-3000:]
        check_one_study(url, storage, trials=9, workers=3)
        # with a tracking server there is no local place for the study: --storage is required, in one line
        space = tmp_path / "space.yaml"
        alone = subprocess.run(_search_args(space, "", 9), env=_env(url), cwd=tmp_path, capture_output=True,
                               text=True, timeout=300)
        assert alone.returncode == 2 and alone.stderr.count("\n") == 1, alone.stderr[-2000:]
        assert f"the tracking URI is '{url}'; pass --storage" in alone.stderr


# -- the artifact store fails --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _full_disk(tmp_path: Path):
    """A 16 KiB tmpfs: logging a model to it runs out of space (ENOSPC) for real."""
    mount = tmp_path / "full"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.parametrize("fault", ["disk full", "not a folder"])
def test_an_artifact_store_that_cannot_be_written_ends_the_run_failed_and_registers_nothing(
        tmp_path, own_store, cli, fault):
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    with contextlib.ExitStack() as stack:
        if fault == "disk full":
            where, message = stack.enter_context(_full_disk(tmp_path)) / "artifacts", "No space left on device"
        else:
            (tmp_path / "a-file").write_text("")
            where, message = tmp_path / "a-file" / "artifacts", "Not a directory"
        experiment = client.create_experiment(f"broken-{fault}", artifact_location=where.as_uri())
        mlflow.set_experiment(experiment_id=experiment)  # own_store sets its own back afterwards
        result = cli("train", "--model", "tiny_mlp", "--dataset", "synthetic", "--input-shape", "3x8x8",
                     "--num-classes", "4", "--epochs", "1")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines() if hasattr(result, "stderr") else result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], result.output[-2000:]
    (run,) = client.search_runs([experiment])
    assert run.info.status == "FAILED"
    assert client.search_model_versions("name='tiny_mlp-synthetic'") == []


def test_a_claims_table_the_search_cannot_use_is_one_line_and_the_run_ends_failed(tmp_path, own_store, cli):
    """A database error under a search (here a foreign `mcp_claims` table in the study's
    storage) is one `error: database:` line, not a traceback, and leaves no run RUNNING."""
    import sqlite3

    from mlflow import MlflowClient

    db = tmp_path / "optuna.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE mcp_claims (something_else TEXT)")
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    result = cli("search", "--model", "tiny_mlp", "--dataset", "synthetic", "--input-shape", "3x8x8",
                 "--num-classes", "4", "--budget-ratio", "0.3", "--space", space, "--trials", "1",
                 "--storage", f"sqlite:///{db}")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and lines[-1].startswith("error: database: "), result.output[-2000:]
    assert "mcp_claims" in lines[-1]
    # the worker meets the table when it takes its slot (mcp.tuner.worker.take_slot), before or after a run began
    runs = MlflowClient().search_runs([r.experiment_id for r in MlflowClient().search_experiments()])
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
