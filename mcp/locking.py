"""Locks between processes on one machine, for the moments that must not run twice at
once (creating a SQLite store's tables: MLflow's, Optuna's)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on a folder (no lock file left behind), where the OS has it."""
    import os

    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def sqlite_lock(url: str):
    """For a SQLite file URL: :func:`folder_lock` on its folder, so that processes opening a
    new store together do not run the same table migrations at once (which fails, or
    half-migrates the file). A no-op for other databases and in-memory SQLite."""
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
    if not path or path == ":memory:":
        return contextlib.nullcontext()
    return folder_lock(Path(path).resolve().parent)
