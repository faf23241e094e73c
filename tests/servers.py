"""Throwaway PostgreSQL and MLflow tracking servers on 127.0.0.1, for the scale-out tests
and ``benchmarks/scale_out.py``. Each raises :class:`Unavailable`, saying why, where it
cannot start."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator


class Unavailable(RuntimeError):
    """A server could not be started here; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("pg_ctl")
    return Path(which).resolve().parent if which else None


def _run_as() -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the ``postgres`` system user."""
    if os.geteuid() != 0:
        return []
    import pwd

    if shutil.which("runuser") is None:
        raise Unavailable("cannot start PostgreSQL: running as root without runuser to start it as another user")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise Unavailable("cannot start PostgreSQL: running as root and there is no 'postgres' user") from None
    return ["runuser", "-u", "postgres", "--"]


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server (trust auth, user ``mcp``, databases ``mlflow`` and ``optuna``)
    in a temporary folder; yields its base URL and removes everything afterwards."""
    bindir = _pg_bin()
    if bindir is None:
        raise Unavailable("cannot start PostgreSQL: no server binaries (pg_ctl); install the Debian package "
                          "postgresql")
    as_user = _run_as()
    root = Path(tempfile.mkdtemp(prefix="mcp-pg-"))
    data, port = root / "data", free_port()
    if as_user:
        os.chmod(root, 0o755)
        shutil.chown(root, "postgres")

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)

    started = False
    try:
        try:
            run(str(bindir / "initdb"), "-D", str(data), "-U", "mcp", "-A", "trust", "--no-sync")
            run(str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "server.log"), "-o",
                f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off", "start")
            started = True
            for db in ("mlflow", "optuna"):
                run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mcp", db)
        except subprocess.CalledProcessError as exc:
            raise Unavailable(f"PostgreSQL did not start: {(exc.stderr or exc.stdout).strip()[-1000:]}") from None
        yield f"postgresql://mcp@127.0.0.1:{port}"
    finally:
        if started:
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(backend: str, artifacts: Path, workers: int = 2) -> Iterator[str]:
    """``mlflow server`` on a free port, its runs in ``backend`` and its artifacts (proxied)
    in ``artifacts``; yields its URL once /health answers, and stops it afterwards."""
    port = free_port()
    log_path = artifacts.parent / "mlflow-server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
                                 "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port",
                                 str(port), "--workers", str(workers)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise Unavailable(f"mlflow server did not start: {log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
