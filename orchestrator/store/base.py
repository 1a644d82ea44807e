"""The store's connection, transactions and schema upgrade: what every part of the store builds on.

Why it is shaped this way (the full story is in ``orchestrator.store``): one connection per
object behind one lock; every write is one transaction that runs alone (``BEGIN IMMEDIATE`` on
SQLite, the write lock of ``engines`` on Postgres); the schema is migrated in place, in one
transaction, and a newer database is refused untouched.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from orchestrator.states import JobState
from orchestrator.store.rows import (
    AttemptNotFound,
    AttemptRow,
    InvalidTransition,
    JobNotFound,
    JobRow,
    StoreError,
    attempt_row,
    job_row,
)
from orchestrator.store.engines import BUSY_TIMEOUT_S, PostgresEngine, open_engine
from orchestrator.store.schema import MIGRATIONS, SCHEMA_VERSION, split_sql

_BUSY_TIMEOUT_MS = int(BUSY_TIMEOUT_S * 1000)
PG_POOL_SIZE = 8  # Postgres connections per Store at most (the server's request threads share them)
MAX_ID_TRIES = 32  # random ids drawn before giving up on finding a free one

class StoreBase:
    """The connections and their transactions; safe to share between threads.

    SQLite: one connection, opened with ``check_same_thread=False``, and every use of it goes
    through one lock. A connection sees its own uncommitted writes, so without the lock a reader
    thread could see half of another thread's transaction, or run its statement inside it. Other
    processes are kept apart by SQLite's own locking.

    Postgres: a pool of up to ``PG_POOL_SIZE`` connections, one per thread at a time, so the
    server's request threads read in parallel (each statement is a round trip, not a function
    call). Writers still run one at a time, on the write lock of ``engines``. A thread that already
    holds a connection (a read inside a write) gets the same one back.
    """

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        """``path``: the SQLite file, or a ``postgresql://`` URL (see ``engines``)."""
        self._engine = open_engine(path)
        self.path = self._engine.path  # the SQLite file; None on Postgres
        self.where = self._engine.where  # where the store is, fit to print (no password)
        self._clock = clock
        self._lock = threading.RLock()
        self._local = threading.local()
        self._pooled = isinstance(self._engine, PostgresEngine)
        self._idle: list[Any] = []
        self._made = 0
        self._free = threading.Condition()
        self._closed = False
        try:
            self._conn = self._engine.connect()
        except self._engine.errors as e:
            raise StoreError(f"cannot open state database {self.where}: {e}") from e
        if self._pooled:
            self._idle.append(self._conn)
            self._made = 1
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgres``."""
        return self._engine.name

    # -- lifecycle ----------------------------------------------------------------------------

    def _open(self) -> None:
        if self._pooled:
            try:
                with self._read() as c:
                    version = self._schema_version(c)
                self._refuse_newer(version)
            except self._engine.errors as e:
                raise StoreError(f"cannot open state database {self.where}: {e}") from e
            if version < SCHEMA_VERSION:
                self._migrate()
            return
        c = self._conn
        try:
            c.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            # Check the version before anything that could write: switching the journal mode
            # or migrating a file that a newer tunefleet wrote could damage it.
            version = self._schema_version(c)
            self._refuse_newer(version)
            mode = self._enable_wal()
            if str(mode).lower() != "wal":
                raise StoreError(
                    f"cannot put {self.path} in WAL mode (got {mode!r}); "
                    "is it on a network filesystem?"
                )
            c.execute("PRAGMA synchronous=NORMAL")
            c.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot open state database {self.path}: {e}") from e
        if version < SCHEMA_VERSION:
            self._migrate()

    def _enable_wal(self) -> str:
        """``PRAGMA journal_mode=WAL``, retried while another connection holds the file.

        Switching a fresh file to WAL needs an exclusive lock, and SQLite answers SQLITE_BUSY
        at once instead of calling the busy handler. So when the CLI and the daemon open a
        new database at the same moment, one of them would fail with "database is locked"
        despite busy_timeout. Once the file is in WAL mode (a persistent property of the
        file) the pragma takes no lock and this returns at once.
        """
        deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
        delay = 0.001
        while True:
            try:
                return str(self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
            except sqlite3.OperationalError as e:
                code = getattr(e, "sqlite_errorcode", sqlite3.SQLITE_BUSY) & 0xFF
                if code != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.05)

    def _schema_version(self, c: Any) -> int:
        if not self._engine.has_table(c, "meta"):
            return 0
        row = c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return 0 if row is None else int(row[0])

    def _refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.where} has schema version {version}, but this tunefleet only knows "
                f"version {SCHEMA_VERSION}: a newer tunefleet wrote it. Upgrade tunefleet; "
                "the database was not modified."
            )

    def _migrate(self) -> None:
        """Bring the schema up to date in one transaction.

        The version is read again under the write lock: two processes may open a fresh file
        at the same moment, and only one of them may create the tables.
        """
        with self._write() as c:
            c.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            version = self._schema_version(c)
            self._refuse_newer(version)
            for script in MIGRATIONS[version:]:
                for statement in split_sql(script):
                    for sql in self._engine.statements(statement):
                        c.execute(sql)
            c.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )

    def close(self) -> None:
        """Close the connections (one in use is closed when its user gives it back). Safe to call twice."""
        if not self._pooled:
            with self._lock:
                self._conn.close()
            return
        with self._free:
            self._closed = True
            idle, self._idle = self._idle, []
            self._made -= len(idle)
            self._free.notify_all()
        for c in idle:
            c.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions -------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction that runs alone: BEGIN ... COMMIT, or ROLLBACK on any exception."""
        with self._held() as c:
            self._engine.begin(c)
            try:
                yield c
                c.execute("COMMIT")
            except BaseException:
                # Also covers a failed COMMIT: never leave the shared connection inside an
                # open transaction, or every later BEGIN on it would fail.
                if self._engine.healthy(c) and self._engine.in_transaction(c):
                    c.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._held() as c:
            yield c

    @contextmanager
    def _held(self) -> Iterator[Any]:
        """This thread's connection for the block: the one it already holds, SQLite's (under the
        lock), or one of the Postgres pool."""
        held = getattr(self._local, "conn", None)
        if held is not None:
            yield held
            return
        if not self._pooled:
            with self._lock:
                self._local.conn = self._conn
                try:
                    yield self._conn
                finally:
                    self._local.conn = None
            return
        c = self._borrow()
        self._local.conn = c
        try:
            yield c
        finally:
            self._local.conn = None
            self._give_back(c)

    def _borrow(self) -> Any:
        deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
        with self._free:
            while True:
                if self._closed:
                    raise StoreError(f"the store {self.where} is closed")
                if self._idle:
                    c = self._idle.pop()
                    break
                if self._made < PG_POOL_SIZE:
                    self._made += 1
                    c = None
                    break
                if not self._free.wait(max(0.0, deadline - time.monotonic())) and time.monotonic() > deadline:
                    raise StoreError(f"all {PG_POOL_SIZE} connections to {self.where} stayed busy for "
                                     f"{_BUSY_TIMEOUT_MS // 1000} s")
        try:
            if c is not None and self._engine.healthy(c):
                return c
            if c is not None:  # lost (a server restart, a network cut): the failed call raised; this one reconnects
                c.close()
            return self._engine.connect()
        except BaseException:
            with self._free:
                self._made -= 1
                self._free.notify()
            raise

    def _give_back(self, c: Any) -> None:
        keep = self._engine.healthy(c) and not self._engine.in_transaction(c)
        with self._free:
            if keep and not self._closed:
                self._idle.append(c)
            else:
                self._made -= 1
            self._free.notify()
        if not keep or self._closed:
            c.close()

    def _now(self) -> float:
        return float(self._clock())

    def _insert_event(
        self,
        c: sqlite3.Connection,
        *,
        job_id: str,
        attempt_id: str | None,
        kind: str,
        message: str,
        data_json: str,
        ts: float,
    ) -> int:
        return int(c.execute(
            "INSERT INTO events (ts, job_id, attempt_id, kind, message, data_json) "
            "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
            (ts, job_id, attempt_id, kind, message, data_json),
        ).fetchone()[0])

    @staticmethod
    def _owned_by(owner: str | None, team: str | None, column: str = "owner") -> tuple[list[str], list[Any]]:
        """WHERE terms and their parameters for rows owned by ``owner`` and/or by a member of ``team``."""
        where: list[str] = []
        params: list[Any] = []
        if owner is not None:
            where.append(f"{column} = ?")
            params.append(owner)
        if team is not None:
            where.append(f"{column} IN (SELECT name FROM users WHERE team = ?)")
            params.append(team)
        return where, params

    @staticmethod
    def _free_id(c: sqlite3.Connection, table: str, make: Callable[[], str], what: str) -> str:
        """A fresh random id (``make()``) not yet in ``table`` (inside the caller's transaction)."""
        for _ in range(MAX_ID_TRIES):
            new_id = make()
            if c.execute(f"SELECT 1 FROM {table} WHERE id = ?", (new_id,)).fetchone() is None:
                return new_id
        raise StoreError(f"could not find a free {what} id in {MAX_ID_TRIES} tries")

    @staticmethod
    def _fetch_job(c: sqlite3.Connection, job_id: str) -> JobRow:
        r = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if r is None:
            raise JobNotFound(f"no job {job_id!r}")
        return job_row(r)

    @staticmethod
    def _fetch_attempt(c: sqlite3.Connection, attempt_id: str) -> AttemptRow:
        r = c.execute("SELECT * FROM attempts WHERE id = ?", (attempt_id,)).fetchone()
        if r is None:
            raise AttemptNotFound(f"no attempt {attempt_id!r}")
        return attempt_row(r)

    @staticmethod
    def _check_job_transition(
        job: JobRow, to: JobState, expected: frozenset[JobState] | None
    ) -> None:
        if job.state.terminal:
            raise InvalidTransition(
                f"job {job.id} is already {job.state.value}; cannot move it to {to.value}"
            )
        if expected is not None and job.state not in expected:
            want = ", ".join(sorted(s.value for s in expected)) or "nothing"
            raise InvalidTransition(
                f"job {job.id} is {job.state.value}, expected {want}; not moving it to {to.value}"
            )
