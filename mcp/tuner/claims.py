"""Atomic claims that let many workers share one study: a small table beside Optuna's own
in the study's storage, whose primary key makes each claim an ``INSERT`` only one worker
can win (SQLite and PostgreSQL alike; no check-then-act).

What is claimed, by key:

- ``ticket-<i>``, i < the study's trial total: the right to run one trial. A study never
  starts more trials than its total; the ticket of a trial that failed (or whose worker
  died) is released so that its retry, or a fresh trial, takes its place.
- ``run-<n>``: trial ``n`` itself, for the moment two workers pop the same queued trial
  (SQLite does not lock the row Optuna reads before it marks it running).
- ``once:<what>``: work done once per study whoever asks first (training the baseline, the
  uniform starting trials, rebuilding and registering the winners). The others wait for
  it and read its result. A claim whose worker stopped beating is taken over, also by a
  compare-and-set on the beat it last wrote.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from mcp.errors import McpError

TABLE = "mcp_claims"


def engine_kwargs(url: str) -> dict[str, Any]:
    """How the study's database is opened, by Optuna's storage and by the claims alike:
    many workers on one SQLite file wait for its lock; an unreachable PostgreSQL server
    fails in seconds."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": 10}}
    return {}


class Heartbeat:
    """Call ``beat()`` every ``interval`` seconds in a daemon thread (at once, too, when
    ``first``) until :meth:`stop`; a failed beat is retried at the next interval (the
    work itself reports real faults)."""

    def __init__(self, beat: Callable[[], None], interval: float, name: str, first: bool = True):
        self._stop = threading.Event()

        def loop() -> None:
            if not first and self._stop.wait(interval):
                return
            while True:
                try:
                    beat()
                except Exception:  # noqa: BLE001 - a missed beat is retried at the next interval
                    pass
                if self._stop.wait(interval):
                    return

        self._thread = threading.Thread(target=loop, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _table(metadata):
    import sqlalchemy as sa

    return sa.Table(TABLE, metadata,
                    sa.Column("study", sa.String(512), primary_key=True),
                    sa.Column("key", sa.String(256), primary_key=True),
                    sa.Column("owner", sa.String(256), nullable=False),
                    sa.Column("beat", sa.Double, nullable=False),  # the owner's last heartbeat: the database's clock, s
                    sa.Column("done", sa.Boolean, nullable=False, default=False),
                    sa.Column("value", sa.Text, nullable=False, default=""))


class Claims:
    """One worker's view of a study's claims. Its heartbeat thread keeps the worker's open
    claims fresh; ``grace`` seconds without a beat make them stale (the worker died)."""

    def __init__(self, url: str, study: str, heartbeat: float, grace: float):
        import sqlalchemy as sa

        self.study, self.heartbeat, self.grace = study, heartbeat, grace
        self.note = ""  # what a once-claim holds while its work runs: this worker's MLflow run
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.engine = sa.create_engine(url, **engine_kwargs(url))
        self.table = _table(sa.MetaData())
        for attempt in range(5):  # workers starting together all create it: one wins, the rest see it
            try:
                self.table.metadata.create_all(self.engine, checkfirst=True)
                break
            except sa.exc.SQLAlchemyError:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        self._offset = 0.0  # the database's clock minus this host's: hosts' clocks may differ, the server's is one
        if url.startswith("postgresql"):
            with self.engine.connect() as conn:
                self._offset = float(conn.execute(sa.text("SELECT EXTRACT(EPOCH FROM clock_timestamp())")).scalar()) \
                    - time.time()
        self._beat = Heartbeat(self._beat_once, heartbeat, "mcp-claims-heartbeat", first=False)

    def now(self) -> float:
        """Seconds since the epoch by the database's clock (SQLite: this host's, the only one)."""
        return time.time() + self._offset

    # -- the primitives: each one statement, atomic in the database ------------------------------------------

    def claim(self, key: str, value: str = "") -> bool:
        """Insert the claim; False when another worker holds it."""
        import sqlalchemy as sa

        try:
            with self.engine.begin() as conn:
                conn.execute(self.table.insert().values(study=self.study, key=key, owner=self.owner,
                                                        beat=self.now(), done=False, value=value))
            return True
        except sa.exc.IntegrityError:
            return False

    def get(self, key: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(self.table.select().where(self.table.c.study == self.study,
                                                         self.table.c.key == key)).mappings().first()
        return dict(row) if row else None

    def rows(self, prefix: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            result = conn.execute(self.table.select().where(self.table.c.study == self.study,
                                                            self.table.c.key.startswith(prefix)))
            return [dict(r) for r in result.mappings()]

    def _update(self, key: str, where: dict[str, Any], **values) -> bool:
        c = self.table.c
        cond = [c.study == self.study, c.key == key] + [getattr(c, k) == v for k, v in where.items()]
        with self.engine.begin() as conn:
            return conn.execute(self.table.update().where(*cond).values(**values)).rowcount == 1

    def set_value(self, key: str, value: str) -> bool:
        return self._update(key, {"owner": self.owner}, value=value, beat=self.now())

    def finish(self, key: str, value: str) -> bool:
        return self._update(key, {"owner": self.owner}, value=value, done=True, beat=self.now())

    def release(self, key: str, row: dict[str, Any] | None = None) -> bool:
        """Delete a claim: ours, or ``row`` as read (compare-and-delete: nobody took it since)."""
        c = self.table.c
        cond = [c.study == self.study, c.key == key]
        cond += [c.owner == row["owner"], c.beat == row["beat"]] if row else [c.owner == self.owner]
        with self.engine.begin() as conn:
            return conn.execute(self.table.delete().where(*cond)).rowcount == 1

    def take_over(self, row: dict[str, Any]) -> bool:
        """Take a stale claim: only if nobody beat it or took it since ``row`` was read."""
        return self._update(row["key"], {"owner": row["owner"], "beat": row["beat"], "done": False},
                            owner=self.owner, beat=self.now())

    def stale(self, row: dict[str, Any]) -> bool:
        return not row["done"] and self.now() - row["beat"] > self.grace

    # -- heartbeat --------------------------------------------------------------------------------------------

    def _beat_once(self) -> None:
        c = self.table.c
        with self.engine.begin() as conn:
            conn.execute(self.table.update().where(c.study == self.study, c.owner == self.owner,
                                                   c.done.is_(False)).values(beat=self.now()))

    def close(self) -> None:
        self._beat.stop()
        self.engine.dispose()

    # -- work done once per study -----------------------------------------------------------------------------

    def once(self, what: str, work: Callable[[], Any], poll: float = 0.5,
             waiting: Callable[[dict[str, Any]], None] | None = None,
             taken_over: Callable[[str], None] | None = None) -> tuple[Any, bool]:
        """Run ``work()`` if this worker is the first to ask (or the one that asked died),
        and record its JSON result; otherwise wait for the worker doing it and return its
        result. While it works, the claim holds ``self.note`` (the worker's run); taking
        over a dead worker's claim calls ``taken_over(its note)`` first. Returns (result,
        whether this worker did the work)."""
        key = f"once:{what}"
        said = False
        while True:
            row = self.get(key)  # read first: a failed INSERT is an error line in PostgreSQL's log
            mine = row is None and self.claim(key, self.note)
            if not mine:
                row = row or self.get(key)
                if row is None:
                    continue  # released just now (its worker failed): ask again
                if row["done"]:
                    return json.loads(row["value"]), False
                mine = self.stale(row) and self.take_over(row)
                if mine:
                    self.set_value(key, self.note)
                    if taken_over is not None and row["value"]:
                        taken_over(row["value"])
                else:
                    if waiting is not None and not said:
                        waiting(row)
                        said = True
                    time.sleep(poll)
                    continue
            try:
                result = work()
            except BaseException:
                self.release(key)  # another worker (or the next call) does it
                raise
            if not self.finish(key, json.dumps(result)):
                raise McpError(f"another worker took over {what!r} of study {self.study!r} while this one did it "
                               f"(its heartbeat stopped for more than {self.grace:g} s)")
            return result, True
