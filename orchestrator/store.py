"""The durable job queue and state store: one SQLite file, ``<home>/state.db``.

Why it is shaped this way:

* **One file, many processes.** The daemon and any number of CLI invocations open the same
  database at once. WAL mode lets readers keep reading while one writer commits, and
  ``busy_timeout`` makes a second writer wait for the lock instead of failing at once with
  "database is locked".
* **Every state change is exactly one ``BEGIN IMMEDIATE`` transaction**, and the event that
  describes it is appended in that same transaction. IMMEDIATE takes the write lock at BEGIN,
  so the read-check-write of a compare-and-set (``expect=``) cannot interleave with another
  process. A deferred transaction that reads first and then upgrades to a writer can fail with
  "database is locked" *despite* the busy timeout, so no write here starts deferred.
* **Crash consistency comes from SQLite, not from us.** A commit is atomic; a transaction cut
  short by SIGKILL is rolled back the next time anyone opens the file. So after a crash the
  state never shows an attempt without its "attempt_created" event, or a spend row that was
  not added to ``jobs.cost_usd``. ``synchronous=NORMAL`` in WAL mode keeps every committed
  transaction across a *process* crash; only an OS crash or power loss can drop the last few
  commits, and even then the file is not corrupted. In return a commit needs no fsync, which
  matters because the daemon writes progress on every tick.
* **Intent before launch.** ``create_attempt`` records the attempt, and moves the job to
  launching, *before* anyone asks a provider for a machine. If the daemon dies in between,
  the next daemon finds an attempt in ``launching``, maybe with no handle, and knows it has
  to reconcile a machine that may have leaked. Without the record it would never know.
* **Stdlib only** (sqlite3, json, time, uuid, dataclasses): the CLI imports this module, and
  the CLI has to start fast.
* **States are stored by their enum value.** Code older than the database cannot parse a state
  value it has never seen, so adding a state value is a schema change: bump ``SCHEMA_VERSION``.
  An older tunefleet then refuses the file with a clear message instead of crashing halfway.
* ``events`` and ``spend`` are append-only. The API has no update or delete for them, and
  triggers reject raw UPDATE/DELETE too.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.states import (
    ACTIVE_JOB_STATES,
    LIVE_ATTEMPT_STATES,
    AttemptState,
    JobState,
)

__all__ = [
    "SCHEMA_VERSION",
    "MIGRATIONS",
    "StoreError",
    "JobNotFound",
    "AttemptNotFound",
    "InvalidTransition",
    "JobRow",
    "AttemptRow",
    "EventRow",
    "Store",
]

# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------

# MIGRATIONS[i] takes the schema from version i to version i + 1. Scripts are split into
# statements with sqlite3.complete_statement (a trigger body with inner ";" stays whole) and
# run one statement at a time inside the migration's transaction. Keep one statement per line
# group: two statements may not share a line.
MIGRATIONS: list[str] = [
    # 0 -> 1: the initial schema.
    """
    CREATE TABLE jobs (
        id               TEXT PRIMARY KEY,
        name             TEXT NOT NULL,
        state            TEXT NOT NULL,
        priority         INTEGER NOT NULL DEFAULT 0,
        spec_json        TEXT NOT NULL,
        created_at       REAL NOT NULL,
        updated_at       REAL NOT NULL,
        sweep_id         TEXT NULL,
        step             INTEGER NOT NULL DEFAULT 0,
        total_steps      INTEGER NULL,
        loss             REAL NULL,
        cost_usd         REAL NOT NULL DEFAULT 0,
        checkpoint_step  INTEGER NULL,
        checkpoint_uri   TEXT NULL,
        adapter_uri      TEXT NULL,
        reason           TEXT NULL,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        attempts_count   INTEGER NOT NULL DEFAULT 0,
        not_before       REAL NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_state_priority_created ON jobs (state, priority, created_at);

    CREATE TABLE attempts (
        id              TEXT PRIMARY KEY,
        job_id          TEXT NOT NULL REFERENCES jobs (id),
        seq             INTEGER NOT NULL,
        provider        TEXT NOT NULL,
        offer_id        TEXT NOT NULL,
        state           TEXT NOT NULL,
        handle_json     TEXT NULL,
        usd_per_hour    REAL NOT NULL DEFAULT 0,
        created_at      REAL NOT NULL,
        started_at      REAL NULL,
        ended_at        REAL NULL,
        exit_code       INTEGER NULL,
        end_reason      TEXT NULL,
        start_step      INTEGER NOT NULL DEFAULT 0,
        end_step        INTEGER NULL,
        log_path        TEXT NULL,
        preempt_request TEXT NULL,
        UNIQUE (job_id, seq)
    );
    CREATE INDEX attempts_state ON attempts (state);

    CREATE TABLE events (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        ts         REAL NOT NULL,
        job_id     TEXT NOT NULL,
        attempt_id TEXT NULL,
        kind       TEXT NOT NULL,
        message    TEXT NOT NULL,
        data_json  TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_job_id ON events (job_id, id);
    CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    BEGIN
        SELECT RAISE(ABORT, 'events are append-only');
    END;
    CREATE TRIGGER events_no_delete BEFORE DELETE ON events
    BEGIN
        SELECT RAISE(ABORT, 'events are append-only');
    END;

    CREATE TABLE spend (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        ts         REAL NOT NULL,
        job_id     TEXT NOT NULL,
        attempt_id TEXT NULL,
        provider   TEXT NOT NULL,
        usd        REAL NOT NULL,
        kind       TEXT NOT NULL
    );
    CREATE INDEX spend_job_id ON spend (job_id);
    CREATE TRIGGER spend_no_update BEFORE UPDATE ON spend
    BEGIN
        SELECT RAISE(ABORT, 'spend is append-only');
    END;
    CREATE TRIGGER spend_no_delete BEFORE DELETE ON spend
    BEGIN
        SELECT RAISE(ABORT, 'spend is append-only');
    END;
    """,
    # v2: throughput measured by finished attempts, to calibrate estimates of later jobs
    """
    CREATE TABLE throughput (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        ts             REAL NOT NULL,
        base_model     TEXT NOT NULL,
        method         TEXT NOT NULL,
        gpu            TEXT NOT NULL,
        gpu_count      INTEGER NOT NULL,
        tokens_per_s   REAL NOT NULL,
        attempt_id     TEXT NULL
    );
    CREATE INDEX throughput_model ON throughput (base_model, method, gpu);
    """,
    # v3: sweeps and their trials (one job per trial per rung)
    """
    CREATE TABLE sweeps (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        spec_json   TEXT NOT NULL,
        state       TEXT NOT NULL,
        budget_usd  REAL NOT NULL,
        rung        INTEGER NOT NULL DEFAULT 0,
        best_job_id TEXT NULL,
        reason      TEXT NULL,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL
    );
    CREATE TABLE trials (
        sweep_id    TEXT NOT NULL REFERENCES sweeps (id),
        trial       INTEGER NOT NULL,
        rung        INTEGER NOT NULL,
        job_id      TEXT NOT NULL REFERENCES jobs (id),
        params_json TEXT NOT NULL,
        PRIMARY KEY (sweep_id, trial, rung)
    );
    """,
    # v4: the queue's own order, so picking the next jobs never sorts the whole queue
    """
    CREATE INDEX jobs_queue ON jobs (state, priority DESC, created_at, id);
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)
assert SCHEMA_VERSION == 4

_BUSY_TIMEOUT_MS = 10_000

# Columns that transition_job / transition_attempt may set besides the state. The names are
# interpolated into SQL, so they come only from these whitelists.
_JOB_FIELDS = frozenset(
    {
        "reason",
        "step",
        "total_steps",
        "loss",
        "checkpoint_step",
        "checkpoint_uri",
        "adapter_uri",
        "not_before",
        "cost_usd",
    }
)
_ATTEMPT_FIELDS = frozenset(
    {"handle", "started_at", "ended_at", "exit_code", "end_reason", "end_step", "log_path"}
)
_PREEMPT_MODES = ("soft", "hard")  # ordered: a request only ever escalates
_MAX_ID_TRIES = 32


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class StoreError(Exception):
    """Anything the store refuses to do. Callers catch this one class."""


class JobNotFound(StoreError):
    """No job has that id (or no unique job has that prefix)."""


class AttemptNotFound(StoreError):
    """No attempt has that id."""


class InvalidTransition(StoreError):
    """The row is not in a state that allows the change; nothing was written."""


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobRow:
    """One row of ``jobs``, decoded: state as JobState, spec parsed from spec_json."""

    id: str
    name: str
    state: JobState
    priority: int
    spec: dict[str, Any]
    created_at: float
    updated_at: float
    sweep_id: str | None
    step: int
    total_steps: int | None
    loss: float | None
    cost_usd: float
    checkpoint_step: int | None
    checkpoint_uri: str | None
    adapter_uri: str | None
    reason: str | None
    cancel_requested: bool
    attempts_count: int
    not_before: float

    @property
    def terminal(self) -> bool:
        return self.state.terminal


@dataclass(frozen=True, slots=True)
class AttemptRow:
    """One row of ``attempts``: one try at running a job on one machine."""

    id: str
    job_id: str
    seq: int
    provider: str
    offer_id: str
    state: AttemptState
    handle: dict[str, Any] | None
    usd_per_hour: float
    created_at: float
    started_at: float | None
    ended_at: float | None
    exit_code: int | None
    end_reason: str | None
    start_step: int
    end_step: int | None
    log_path: str | None
    preempt_request: str | None  # None, "soft" or "hard"

    @property
    def live(self) -> bool:
        return self.state in LIVE_ATTEMPT_STATES


@dataclass(frozen=True, slots=True)
class EventRow:
    """One row of the append-only ``events`` log."""

    id: int
    ts: float
    job_id: str
    attempt_id: str | None
    kind: str
    message: str
    data: dict[str, Any]


def _job_row(r: sqlite3.Row) -> JobRow:
    return JobRow(
        id=r["id"],
        name=r["name"],
        state=JobState(r["state"]),
        priority=r["priority"],
        spec=json.loads(r["spec_json"]),
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        sweep_id=r["sweep_id"],
        step=r["step"],
        total_steps=r["total_steps"],
        loss=r["loss"],
        cost_usd=r["cost_usd"],
        checkpoint_step=r["checkpoint_step"],
        checkpoint_uri=r["checkpoint_uri"],
        adapter_uri=r["adapter_uri"],
        reason=r["reason"],
        cancel_requested=bool(r["cancel_requested"]),
        attempts_count=r["attempts_count"],
        not_before=r["not_before"],
    )


def _attempt_row(r: sqlite3.Row) -> AttemptRow:
    handle_json = r["handle_json"]
    return AttemptRow(
        id=r["id"],
        job_id=r["job_id"],
        seq=r["seq"],
        provider=r["provider"],
        offer_id=r["offer_id"],
        state=AttemptState(r["state"]),
        handle=None if handle_json is None else json.loads(handle_json),
        usd_per_hour=r["usd_per_hour"],
        created_at=r["created_at"],
        started_at=r["started_at"],
        ended_at=r["ended_at"],
        exit_code=r["exit_code"],
        end_reason=r["end_reason"],
        start_step=r["start_step"],
        end_step=r["end_step"],
        log_path=r["log_path"],
        preempt_request=r["preempt_request"],
    )


def _event_row(r: sqlite3.Row) -> EventRow:
    return EventRow(
        id=r["id"],
        ts=r["ts"],
        job_id=r["job_id"],
        attempt_id=r["attempt_id"],
        kind=r["kind"],
        message=r["message"],
        data=json.loads(r["data_json"]),
    )


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _random_job_id() -> str:
    """``"j"`` + 7 lowercase hex digits: short enough to type, 268M values to collide in."""
    return "j" + uuid.uuid4().hex[:7]


def _dump_dict(value: Any, what: str) -> str:
    """Serialize a dict to JSON, or raise TypeError *before* anything is written.

    NaN/Infinity are refused too: they are not JSON, and other tools reading the database
    (jq, a web UI) would choke on them.
    """
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be a dict, not {type(value).__name__}")
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} is not JSON-serializable: {e}") from None


def _split_sql(script: str) -> Iterator[str]:
    """Split a migration script into single statements.

    Uses sqlite3.complete_statement, so a trigger body's inner ";" does not end the statement.
    We cannot use executescript(): it commits any open transaction first, and a migration has
    to run inside the same transaction that checks and bumps the schema version.
    """
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf.strip()
            buf = ""
    rest = "\n".join(
        ln for ln in buf.splitlines() if ln.strip() and not ln.strip().startswith("--")
    )
    if rest.strip():
        raise StoreError(f"incomplete SQL statement in migration: {rest.strip()[:80]!r}")


def _as_job_states(states: Iterable[JobState | str]) -> frozenset[JobState]:
    return frozenset(JobState(s) for s in states)


def _as_attempt_states(states: Iterable[AttemptState | str]) -> frozenset[AttemptState]:
    return frozenset(AttemptState(s) for s in states)


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# --------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------


class Store:
    """The state store. One SQLite connection per object; safe to share between threads.

    The connection is opened with ``check_same_thread=False`` and every use of it goes
    through one lock. A connection sees its own uncommitted writes, so without the lock a
    reader thread could see half of another thread's transaction, or run its statement
    inside it. Other processes are kept apart by SQLite's own locking.
    """

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(
                str(self.path),
                timeout=_BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,  # autocommit; we issue BEGIN IMMEDIATE / COMMIT ourselves
                check_same_thread=False,
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot open state database {self.path}: {e}") from e
        self._conn.row_factory = sqlite3.Row
        try:
            self._open()
        except BaseException:
            self._conn.close()
            raise

    # -- lifecycle ----------------------------------------------------------------------------

    def _open(self) -> None:
        c = self._conn
        try:
            c.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            # Check the version before anything that could write: switching the journal mode
            # or migrating a file that a newer tunefleet wrote could damage it.
            version = self._schema_version()
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

    def _schema_version(self) -> int:
        has_meta = self._conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        if not has_meta:
            return 0
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return 0 if row is None else int(row[0])

    def _refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, but this tunefleet only knows "
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
            version = self._schema_version()
            self._refuse_newer(version)
            for script in MIGRATIONS[version:]:
                for statement in _split_sql(script):
                    c.execute(statement)
            c.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )

    def close(self) -> None:
        """Close the connection. Safe to call twice."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions -------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
                c.execute("COMMIT")
            except BaseException:
                # Also covers a failed COMMIT: never leave the shared connection inside an
                # open transaction, or every later BEGIN on it would fail.
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._conn

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
        cur = c.execute(
            "INSERT INTO events (ts, job_id, attempt_id, kind, message, data_json) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (ts, job_id, attempt_id, kind, message, data_json),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    @staticmethod
    def _fetch_job(c: sqlite3.Connection, job_id: str) -> JobRow:
        r = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if r is None:
            raise JobNotFound(f"no job {job_id!r}")
        return _job_row(r)

    @staticmethod
    def _fetch_attempt(c: sqlite3.Connection, attempt_id: str) -> AttemptRow:
        r = c.execute("SELECT * FROM attempts WHERE id = ?", (attempt_id,)).fetchone()
        if r is None:
            raise AttemptNotFound(f"no attempt {attempt_id!r}")
        return _attempt_row(r)

    # -- jobs ---------------------------------------------------------------------------------

    def submit(
        self,
        spec: dict[str, Any],
        *,
        name: str,
        priority: int = 0,
        sweep_id: str | None = None,
    ) -> str:
        """Queue a new job; returns its id. Event "submitted"."""
        spec_json = _dump_dict(spec, "spec")
        data_json = _dump_dict({"name": name, "priority": priority, "sweep_id": sweep_id}, "data")
        now = self._now()
        with self._write() as c:
            job_id = self._insert_job(c, spec_json, name, priority, sweep_id, now)
            self._insert_event(
                c,
                job_id=job_id,
                attempt_id=None,
                kind="submitted",
                message=f"submitted {name!r} (priority {priority})",
                data_json=data_json,
                ts=now,
            )
        return job_id

    @staticmethod
    def _insert_job(
        c: sqlite3.Connection, spec_json: str, name: str, priority: int, sweep_id: str | None, now: float
    ) -> str:
        """Insert a queued job under a fresh random id (inside the caller's transaction)."""
        for _ in range(_MAX_ID_TRIES):
            job_id = _random_job_id()
            if c.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                break
        else:
            raise StoreError(f"could not find a free job id in {_MAX_ID_TRIES} tries")
        c.execute(
            "INSERT INTO jobs (id, name, state, priority, spec_json, created_at, updated_at, sweep_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, name, JobState.QUEUED.value, int(priority), spec_json, now, now, sweep_id),
        )
        return job_id

    def get_job(self, job_id: str) -> JobRow:
        """The job with exactly this id; JobNotFound if none."""
        with self._read() as c:
            return self._fetch_job(c, job_id)

    def resolve_job_id(self, prefix: str) -> str:
        """An exact job id, or the one job whose id starts with ``prefix``.

        For the CLI: users type ``tunefleet logs j3f``. No match, or several, raise
        JobNotFound with a message that lists up to 5 candidates.
        """
        prefix = prefix.strip().lower()
        if not prefix:
            raise JobNotFound("empty job id")
        with self._read() as c:
            if c.execute("SELECT 1 FROM jobs WHERE id = ?", (prefix,)).fetchone():
                return prefix
            rows = c.execute(
                "SELECT id FROM jobs WHERE id LIKE ? ESCAPE '\\' ORDER BY id LIMIT 6",
                (_like_escape(prefix) + "%",),
            ).fetchall()
        ids = [r[0] for r in rows]
        if len(ids) == 1:
            return ids[0]
        if not ids:
            raise JobNotFound(f"no job id starts with {prefix!r}")
        more = ", ..." if len(ids) > 5 else ""
        raise JobNotFound(
            f"job id prefix {prefix!r} is ambiguous; it matches {', '.join(ids[:5])}{more}"
        )

    def list_jobs(
        self, states: Iterable[JobState] | None = None, limit: int | None = None
    ) -> list[JobRow]:
        """Jobs, newest first (rowid breaks ties between equal created_at)."""
        sql = "SELECT * FROM jobs"
        params: list[Any] = []
        if states is not None:
            wanted = sorted(s.value for s in _as_job_states(states))
            if not wanted:
                return []
            sql += f" WHERE state IN ({', '.join('?' * len(wanted))})"
            params.extend(wanted)
        sql += " ORDER BY created_at DESC, rowid DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        with self._read() as c:
            return [_job_row(r) for r in c.execute(sql, params)]

    def count_jobs_by_state(self) -> dict[JobState, int]:
        """Number of jobs per state; every JobState is a key, with 0 where there are none."""
        counts = {s: 0 for s in JobState}
        with self._read() as c:
            for state, n in c.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
                counts[JobState(state)] = n
        return counts

    def next_queued(self, now: float, limit: int) -> list[JobRow]:
        """Queued jobs that may start now: not_before <= now, no pending cancel.

        Order: priority DESC, then oldest first, then id, so the order is total and the
        scheduler is deterministic.
        """
        with self._read() as c:
            rows = c.execute(
                "SELECT * FROM jobs WHERE state = ? AND not_before <= ? AND cancel_requested = 0"
                " ORDER BY priority DESC, created_at ASC, id ASC LIMIT ?",
                (JobState.QUEUED.value, now, int(limit)),
            ).fetchall()
        return [_job_row(r) for r in rows]

    def transition_job(
        self,
        job_id: str,
        to: JobState,
        *,
        kind: str,
        message: str,
        data: dict[str, Any] | None = None,
        expect: Iterable[JobState] | None = None,
        **fields: Any,
    ) -> JobRow:
        """Compare-and-set the job's state, set ``fields``, and append one event.

        Raises InvalidTransition, writing nothing, if the job is terminal (terminal states are
        final, even to themselves) or if ``expect`` is given and the current state is not in
        it. ``fields`` may be: reason, step, total_steps, loss, checkpoint_step,
        checkpoint_uri, adapter_uri, not_before, cost_usd.
        The event's data is ``{"from": old, "to": new}`` updated with ``data``.
        """
        to = JobState(to)
        expected = None if expect is None else _as_job_states(expect)
        unknown = set(fields) - _JOB_FIELDS
        if unknown:
            raise TypeError(f"transition_job() cannot set {sorted(unknown)}")
        extra = _dump_dict(data if data is not None else {}, "data")
        now = self._now()
        with self._write() as c:
            job = self._fetch_job(c, job_id)
            self._check_job_transition(job, to, expected)
            assignments = ", ".join(f"{k} = ?" for k in fields)
            c.execute(
                f"UPDATE jobs SET state = ?, updated_at = ?{', ' if fields else ''}{assignments}"
                " WHERE id = ?",
                (to.value, now, *fields.values(), job_id),
            )
            event_data = {"from": job.state.value, "to": to.value, **json.loads(extra)}
            self._insert_event(
                c,
                job_id=job_id,
                attempt_id=None,
                kind=kind,
                message=message,
                data_json=json.dumps(event_data, separators=(",", ":")),
                ts=now,
            )
            return self._fetch_job(c, job_id)

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

    def update_progress(
        self,
        job_id: str,
        *,
        step: int,
        total_steps: int | None,
        loss: float | None,
        checkpoint_step: int | None = None,
        checkpoint_uri: str | None = None,
    ) -> None:
        """Record training progress. No event: the daemon calls this every tick.

        step, total_steps and loss are stored as given, even if step goes down (a resumed
        attempt may briefly report a step below the last one). The checkpoint columns change
        only when a value is passed: None means "no new checkpoint", not "forget it".
        """
        now = self._now()
        sets = ["step = ?", "total_steps = ?", "loss = ?", "updated_at = ?"]
        params: list[Any] = [int(step), total_steps, loss, now]
        if checkpoint_step is not None:
            sets.append("checkpoint_step = ?")
            params.append(int(checkpoint_step))
        if checkpoint_uri is not None:
            sets.append("checkpoint_uri = ?")
            params.append(checkpoint_uri)
        with self._write() as c:
            cur = c.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*params, job_id))
            if cur.rowcount == 0:
                raise JobNotFound(f"no job {job_id!r}")

    def request_cancel(self, job_id: str) -> JobRow:
        """Cancel a job.

        Queued: cancelled at once (event "cancelled"). Active: cancel_requested is set (event
        "cancel_requested") and the daemon tears the attempt down and finishes the job; asking
        again changes nothing and adds no event. Terminal: InvalidTransition.
        """
        now = self._now()
        with self._write() as c:
            job = self._fetch_job(c, job_id)
            if job.state.terminal:
                raise InvalidTransition(f"job {job_id} is already {job.state.value}")
            if job.state is JobState.QUEUED:
                c.execute(
                    "UPDATE jobs SET state = ?, cancel_requested = 1, reason = ?, updated_at = ?"
                    " WHERE id = ?",
                    (JobState.CANCELLED.value, "cancelled by user", now, job_id),
                )
                self._insert_event(
                    c,
                    job_id=job_id,
                    attempt_id=None,
                    kind="cancelled",
                    message="cancelled while queued",
                    data_json=json.dumps({"from": job.state.value, "to": "cancelled"}),
                    ts=now,
                )
            elif not job.cancel_requested:
                assert job.state in ACTIVE_JOB_STATES, job.state
                c.execute(
                    "UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?",
                    (now, job_id),
                )
                self._insert_event(
                    c,
                    job_id=job_id,
                    attempt_id=None,
                    kind="cancel_requested",
                    message=f"cancel requested while {job.state.value}",
                    data_json=json.dumps({"state": job.state.value}),
                    ts=now,
                )
            return self._fetch_job(c, job_id)

    # -- attempts -----------------------------------------------------------------------------

    def create_attempt(
        self,
        job_id: str,
        *,
        provider: str,
        offer_id: str,
        usd_per_hour: float,
        start_step: int,
        data: dict[str, Any] | None = None,
    ) -> AttemptRow:
        """Record the intent to launch, BEFORE asking the provider for anything.

        One transaction: a new attempt (seq = previous max + 1, state launching), the job's
        attempts_count + 1, the job queued -> launching, and event "attempt_created". A job
        that is not queued, or has a cancel pending, raises InvalidTransition and nothing is
        written.
        """
        extra = json.loads(_dump_dict(data if data is not None else {}, "data"))
        now = self._now()
        with self._write() as c:
            job = self._fetch_job(c, job_id)
            self._check_job_transition(job, JobState.LAUNCHING, frozenset({JobState.QUEUED}))
            if job.cancel_requested:
                raise InvalidTransition(f"job {job_id} has a cancel pending; not launching it")
            seq = c.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM attempts WHERE job_id = ?", (job_id,)
            ).fetchone()[0]
            attempt_id = f"{job_id}.{seq}"
            c.execute(
                "INSERT INTO attempts (id, job_id, seq, provider, offer_id, state, usd_per_hour,"
                " created_at, start_step) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    attempt_id,
                    job_id,
                    seq,
                    provider,
                    offer_id,
                    AttemptState.LAUNCHING.value,
                    float(usd_per_hour),
                    now,
                    int(start_step),
                ),
            )
            c.execute(
                "UPDATE jobs SET state = ?, attempts_count = attempts_count + 1, updated_at = ?"
                " WHERE id = ?",
                (JobState.LAUNCHING.value, now, job_id),
            )
            event_data = {
                "seq": seq,
                "provider": provider,
                "offer_id": offer_id,
                "usd_per_hour": float(usd_per_hour),
                "start_step": int(start_step),
                **extra,
            }
            self._insert_event(
                c,
                job_id=job_id,
                attempt_id=attempt_id,
                kind="attempt_created",
                message=f"attempt {seq} on {provider} offer {offer_id} from step {start_step}",
                data_json=json.dumps(event_data, separators=(",", ":")),
                ts=now,
            )
            return self._fetch_attempt(c, attempt_id)

    def transition_attempt(
        self,
        attempt_id: str,
        to: AttemptState,
        *,
        kind: str,
        message: str,
        data: dict[str, Any] | None = None,
        expect: Iterable[AttemptState] | None = None,
        spend_usd: float | None = None,
        **fields: Any,
    ) -> AttemptRow:
        """Compare-and-set an attempt's state, set ``fields``, and append one event.

        ``spend_usd`` (only when moving to a terminal state) records what the attempt cost in the
        same transaction, so a daemon killed at any moment records each attempt's spend exactly
        once: either the attempt ended with its spend, or it is still live and will end again.

        ``fields`` may be: handle (a dict, or None to clear it), started_at, ended_at,
        exit_code, end_reason, end_step, log_path. Terminal attempt states are final.
        Moving to a terminal state sets ended_at = now unless given; moving to running sets
        started_at = now unless given or already set. The job's own state is not touched:
        the caller decides what the attempt's end means for the job.
        """
        to = AttemptState(to)
        expected = None if expect is None else _as_attempt_states(expect)
        unknown = set(fields) - _ATTEMPT_FIELDS
        if unknown:
            raise TypeError(f"transition_attempt() cannot set {sorted(unknown)}")
        columns: dict[str, Any] = {}
        for key, value in fields.items():
            if key == "handle":
                columns["handle_json"] = None if value is None else _dump_dict(value, "handle")
            else:
                columns[key] = value
        extra = json.loads(_dump_dict(data if data is not None else {}, "data"))
        if spend_usd is not None:
            spend_usd = float(spend_usd)
            if not math.isfinite(spend_usd) or spend_usd < 0 or not to.terminal:
                raise ValueError(f"spend_usd must be finite, >= 0 and only on a terminal move, not {spend_usd!r}")
        now = self._now()
        with self._write() as c:
            att = self._fetch_attempt(c, attempt_id)
            if att.state.terminal:
                raise InvalidTransition(
                    f"attempt {attempt_id} is already {att.state.value}; "
                    f"cannot move it to {to.value}"
                )
            if expected is not None and att.state not in expected:
                want = ", ".join(sorted(s.value for s in expected)) or "nothing"
                raise InvalidTransition(
                    f"attempt {attempt_id} is {att.state.value}, expected {want}; "
                    f"not moving it to {to.value}"
                )
            if to.terminal and "ended_at" not in columns:
                columns["ended_at"] = now
            if to is AttemptState.RUNNING and "started_at" not in columns and att.started_at is None:
                columns["started_at"] = now
            assignments = "".join(f", {k} = ?" for k in columns)
            c.execute(
                f"UPDATE attempts SET state = ?{assignments} WHERE id = ?",
                (to.value, *columns.values(), attempt_id),
            )
            c.execute("UPDATE jobs SET updated_at = ? WHERE id = ?", (now, att.job_id))
            if spend_usd:
                c.execute("UPDATE jobs SET cost_usd = cost_usd + ? WHERE id = ?", (spend_usd, att.job_id))
                c.execute(
                    "INSERT INTO spend (ts, job_id, attempt_id, provider, usd, kind) VALUES (?, ?, ?, ?, ?, ?)",
                    (now, att.job_id, attempt_id, att.provider, spend_usd, "compute"),
                )
                extra = {**extra, "spend_usd": spend_usd}
            event_data = {"from": att.state.value, "to": to.value, **extra}
            self._insert_event(
                c,
                job_id=att.job_id,
                attempt_id=attempt_id,
                kind=kind,
                message=message,
                data_json=json.dumps(event_data, separators=(",", ":")),
                ts=now,
            )
            return self._fetch_attempt(c, attempt_id)

    def get_attempt(self, attempt_id: str) -> AttemptRow:
        """The attempt with this id; AttemptNotFound if none."""
        with self._read() as c:
            return self._fetch_attempt(c, attempt_id)

    def attempts_for(self, job_id: str) -> list[AttemptRow]:
        """All attempts of a job, by seq."""
        with self._read() as c:
            rows = c.execute(
                "SELECT * FROM attempts WHERE job_id = ? ORDER BY seq", (job_id,)
            ).fetchall()
        return [_attempt_row(r) for r in rows]

    def live_attempts(self) -> list[AttemptRow]:
        """Attempts in launching or running, across all jobs: what the daemon must watch."""
        live = sorted(s.value for s in LIVE_ATTEMPT_STATES)
        with self._read() as c:
            rows = c.execute(
                f"SELECT * FROM attempts WHERE state IN ({', '.join('?' * len(live))})"
                " ORDER BY created_at, job_id, seq",
                live,
            ).fetchall()
        return [_attempt_row(r) for r in rows]

    def latest_attempt(self, job_id: str) -> AttemptRow | None:
        """The job's attempt with the highest seq, or None if it never had one."""
        with self._read() as c:
            r = c.execute(
                "SELECT * FROM attempts WHERE job_id = ? ORDER BY seq DESC LIMIT 1", (job_id,)
            ).fetchone()
        return None if r is None else _attempt_row(r)

    def request_preempt(self, job_id: str, *, hard: bool) -> AttemptRow:
        """Ask the daemon to stop the job's live attempt: "soft" (checkpoint first) or "hard".

        A request only escalates: a pending "hard" stays hard if "soft" is asked afterwards.
        Event "preempt_requested". No live attempt: InvalidTransition.
        """
        mode = "hard" if hard else "soft"
        now = self._now()
        live = sorted(s.value for s in LIVE_ATTEMPT_STATES)
        with self._write() as c:
            self._fetch_job(c, job_id)
            r = c.execute(
                f"SELECT * FROM attempts WHERE job_id = ? AND state IN ({', '.join('?' * len(live))})"
                " ORDER BY seq DESC LIMIT 1",
                (job_id, *live),
            ).fetchone()
            if r is None:
                raise InvalidTransition(f"job {job_id} has no running attempt")
            att = _attempt_row(r)
            if att.preempt_request in _PREEMPT_MODES and _PREEMPT_MODES.index(
                att.preempt_request
            ) > _PREEMPT_MODES.index(mode):
                mode = att.preempt_request
            c.execute("UPDATE attempts SET preempt_request = ? WHERE id = ?", (mode, att.id))
            self._insert_event(
                c,
                job_id=job_id,
                attempt_id=att.id,
                kind="preempt_requested",
                message=f"{mode} preemption requested for attempt {att.seq}",
                data_json=json.dumps({"mode": mode, "requested": "hard" if hard else "soft"}),
                ts=now,
            )
            return self._fetch_attempt(c, att.id)

    def clear_preempt_request(self, attempt_id: str) -> None:
        """The daemon acted on a preempt request: clear it (event "preempt_request_cleared").

        Clearing an attempt with no request is a no-op and adds no event.
        """
        now = self._now()
        with self._write() as c:
            att = self._fetch_attempt(c, attempt_id)
            if att.preempt_request is None:
                return
            c.execute("UPDATE attempts SET preempt_request = NULL WHERE id = ?", (attempt_id,))
            self._insert_event(
                c,
                job_id=att.job_id,
                attempt_id=attempt_id,
                kind="preempt_request_cleared",
                message=f"{att.preempt_request} preempt request cleared",
                data_json=json.dumps({"mode": att.preempt_request}),
                ts=now,
            )

    # -- events -------------------------------------------------------------------------------

    def add_event(
        self,
        job_id: str,
        kind: str,
        message: str,
        *,
        attempt_id: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> int:
        """Append a free-form event to a job's log; returns its id.

        The job must exist, and the attempt, if given, must belong to it: an event that
        points nowhere would be invisible in ``tunefleet logs``.
        """
        data_json = _dump_dict(data if data is not None else {}, "data")
        now = self._now()
        with self._write() as c:
            self._fetch_job(c, job_id)
            if attempt_id is not None:
                att = self._fetch_attempt(c, attempt_id)
                if att.job_id != job_id:
                    raise StoreError(f"attempt {attempt_id} belongs to {att.job_id}, not {job_id}")
            return self._insert_event(
                c,
                job_id=job_id,
                attempt_id=attempt_id,
                kind=kind,
                message=message,
                data_json=data_json,
                ts=now,
            )

    def events(self, job_id: str, after_id: int = 0) -> list[EventRow]:
        """A job's events with id > after_id, oldest first (poll with the last id seen)."""
        with self._read() as c:
            rows = c.execute(
                "SELECT * FROM events WHERE job_id = ? AND id > ? ORDER BY id",
                (job_id, int(after_id)),
            ).fetchall()
        return [_event_row(r) for r in rows]

    # -- spend --------------------------------------------------------------------------------

    def add_spend(
        self,
        job_id: str,
        attempt_id: str | None,
        *,
        provider: str,
        usd: float,
        kind: str = "compute",
    ) -> None:
        """Record money spent, and add it to jobs.cost_usd in the same transaction.

        No event: the daemon accrues spend every tick, and the spend table is its own
        append-only ledger. usd must be finite and >= 0, so cost_usd only grows and a
        budget check can never be undercut by a bad value.
        """
        usd = float(usd)
        if not math.isfinite(usd) or usd < 0:
            raise ValueError(f"spend must be a finite, non-negative amount, not {usd!r}")
        now = self._now()
        with self._write() as c:
            cur = c.execute(
                "UPDATE jobs SET cost_usd = cost_usd + ?, updated_at = ? WHERE id = ?",
                (usd, now, job_id),
            )
            if cur.rowcount == 0:
                raise JobNotFound(f"no job {job_id!r}")
            c.execute(
                "INSERT INTO spend (ts, job_id, attempt_id, provider, usd, kind)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (now, job_id, attempt_id, provider, usd, kind),
            )

    def record_throughput(
        self, *, base_model: str, method: str, gpu: str, gpu_count: int, tokens_per_s: float,
        attempt_id: str | None = None,
    ) -> None:
        """Remember what an attempt achieved, so later estimates of the same model use it."""
        if not (tokens_per_s > 0 and tokens_per_s < float("inf")):
            raise ValueError(f"tokens_per_s must be a positive number, got {tokens_per_s!r}")
        with self._write() as c:
            c.execute(
                "INSERT INTO throughput (ts, base_model, method, gpu, gpu_count, tokens_per_s, attempt_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (self._now(), base_model, method, gpu, int(gpu_count), float(tokens_per_s), attempt_id),
            )

    def calibration(self, base_model: str, method: str, last: int = 20) -> dict[str, float]:
        """Median measured tokens/s per GPU, by GPU model, over the last ``last`` runs of each.

        Reads at most ``last`` rows per GPU through the (base_model, method, gpu) index: the
        daemon asks for every new job, so this must not grow with the history.
        """
        out: dict[str, float] = {}
        with self._read() as c:
            gpus = [r[0] for r in c.execute(
                "SELECT DISTINCT gpu FROM throughput WHERE base_model = ? AND method = ?", (base_model, method))]
            for gpu in gpus:
                values = sorted(
                    tps / max(1, count)
                    for count, tps in c.execute(
                        "SELECT gpu_count, tokens_per_s FROM throughput WHERE base_model = ? AND method = ?"
                        " AND gpu = ? ORDER BY id DESC LIMIT ?",
                        (base_model, method, gpu, last),
                    )
                )
                mid = len(values) // 2
                out[gpu] = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
        return out

    def queued_ids(self) -> list[str]:
        with self._read() as c:
            return [r[0] for r in c.execute("SELECT id FROM jobs WHERE state = 'queued'")]

    def spend_since(self, ts: float) -> float:
        """Everything recorded in the ledger since ``ts`` (the monthly budget's window)."""
        with self._read() as c:
            row = c.execute("SELECT COALESCE(SUM(usd), 0) FROM spend WHERE ts >= ?", (ts,)).fetchone()
        return float(row[0])

    def spend_rows(self) -> list[dict[str, Any]]:
        """The whole ledger, oldest first, joined with each job's sweep (for ``tunefleet spend``)."""
        with self._read() as c:
            rows = c.execute(
                "SELECT s.ts, s.job_id, s.attempt_id, s.provider, s.usd, s.kind, j.sweep_id"
                " FROM spend s LEFT JOIN jobs j ON j.id = s.job_id ORDER BY s.id"
            ).fetchall()
        keys = ("ts", "job_id", "attempt_id", "provider", "usd", "kind", "sweep_id")
        return [dict(zip(keys, tuple(r), strict=True)) for r in rows]

    def resume_stopped(self, job_id: str, spec: dict[str, Any]) -> JobRow:
        """Queue a job stopped by its budget again, with its (raised) spec. The one way out of
        ``stopped_budget``: every other terminal state stays final."""
        spec_json = _dump_dict(spec, "spec")
        now = self._now()
        with self._write() as c:
            job = self._fetch_job(c, job_id)
            if job.state is not JobState.STOPPED_BUDGET:
                raise InvalidTransition(f"job {job_id} is {job.state.value}; only a job stopped by its budget can be resumed")
            c.execute(
                "UPDATE jobs SET state = ?, spec_json = ?, updated_at = ?, reason = NULL, not_before = 0 WHERE id = ?",
                (JobState.QUEUED.value, spec_json, now, job_id),
            )
            self._insert_event(
                c, job_id=job_id, attempt_id=None, kind="resumed",
                message="budget raised; queued again, will resume from its newest checkpoint",
                data_json=json.dumps({"from": job.state.value, "to": "queued",
                                      "max_usd": (spec.get("policy") or {}).get("max_usd")}),
                ts=now,
            )
            return self._fetch_job(c, job_id)

    # -- sweeps -------------------------------------------------------------------------------

    def create_sweep(self, name: str, spec: dict[str, Any], budget_usd: float) -> str:
        spec_json = _dump_dict(spec, "spec")
        now = self._now()
        with self._write() as c:
            for _ in range(_MAX_ID_TRIES):
                sweep_id = "s" + uuid.uuid4().hex[:7]
                if c.execute("SELECT 1 FROM sweeps WHERE id = ?", (sweep_id,)).fetchone() is None:
                    break
            else:
                raise StoreError("could not find a free sweep id")
            c.execute(
                "INSERT INTO sweeps (id, name, spec_json, state, budget_usd, created_at, updated_at)"
                " VALUES (?, ?, ?, 'running', ?, ?, ?)",
                (sweep_id, name, spec_json, float(budget_usd), now, now),
            )
        return sweep_id

    def add_trial(
        self, sweep_id: str, *, trial: int, rung: int, params: dict[str, Any], spec: dict[str, Any],
        name: str, priority: int = 0,
    ) -> str:
        """Queue one trial's job for one rung, and link it to the sweep, in one transaction."""
        spec_json = _dump_dict(spec, "spec")
        params_json = _dump_dict(params, "params")
        now = self._now()
        with self._write() as c:
            job_id = self._insert_job(c, spec_json, name, priority, sweep_id, now)
            c.execute(
                "INSERT INTO trials (sweep_id, trial, rung, job_id, params_json) VALUES (?, ?, ?, ?, ?)",
                (sweep_id, trial, rung, job_id, params_json),
            )
            self._insert_event(
                c, job_id=job_id, attempt_id=None, kind="submitted",
                message=f"sweep {sweep_id} trial {trial} rung {rung}",
                data_json=json.dumps({"sweep_id": sweep_id, "trial": trial, "rung": rung, "params": params}),
                ts=now,
            )
        return job_id

    def get_sweep(self, sweep_id: str) -> dict[str, Any]:
        with self._read() as c:
            row = c.execute("SELECT * FROM sweeps WHERE id = ?", (sweep_id,)).fetchone()
            if row is None:
                ids = [r[0] for r in c.execute("SELECT id FROM sweeps WHERE id LIKE ?", (sweep_id + "%",))]
                if len(ids) != 1:
                    raise StoreError(f"no sweep {sweep_id!r}" + (f" (candidates: {', '.join(ids[:5])})" if ids else ""))
                row = c.execute("SELECT * FROM sweeps WHERE id = ?", (ids[0],)).fetchone()
        d = dict(row)
        d["spec"] = json.loads(d.pop("spec_json"))
        return d

    def sweep_ids(self) -> list[str]:
        with self._read() as c:
            return [r[0] for r in c.execute("SELECT id FROM sweeps ORDER BY created_at")]

    def active_sweeps(self) -> list[str]:
        with self._read() as c:
            return [r[0] for r in c.execute("SELECT id FROM sweeps WHERE state = 'running' ORDER BY created_at")]

    def trials(self, sweep_id: str) -> list[dict[str, Any]]:
        """Every trial job of a sweep, with its rung, params and job state, by rung then trial."""
        with self._read() as c:
            rows = c.execute(
                "SELECT t.trial, t.rung, t.job_id, t.params_json, j.state, j.cost_usd, j.step"
                " FROM trials t JOIN jobs j ON j.id = t.job_id WHERE t.sweep_id = ? ORDER BY t.rung, t.trial",
                (sweep_id,),
            ).fetchall()
        return [
            {"trial": r[0], "rung": r[1], "job_id": r[2], "params": json.loads(r[3]), "state": JobState(r[4]),
             "cost_usd": r[5], "step": r[6]}
            for r in rows
        ]

    def update_sweep(self, sweep_id: str, *, state: str | None = None, rung: int | None = None,
                     best_job_id: str | None = None, reason: str | None = None) -> None:
        sets = {"state": state, "rung": rung, "best_job_id": best_job_id, "reason": reason}
        sets = {k: v for k, v in sets.items() if v is not None}
        with self._write() as c:
            assignments = ", ".join(f"{k} = ?" for k in sets)
            c.execute(f"UPDATE sweeps SET {assignments}{', ' if sets else ''}updated_at = ? WHERE id = ?",
                      (*sets.values(), self._now(), sweep_id))

    def sweep_spend(self, sweep_id: str) -> float:
        with self._read() as c:
            row = c.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM jobs WHERE sweep_id = ?", (sweep_id,)).fetchone()
        return float(row[0])

    def spend_total(self, job_id: str | None = None) -> float:
        """Sum of the spend ledger, for one job or for everything."""
        with self._read() as c:
            if job_id is None:
                row = c.execute("SELECT COALESCE(SUM(usd), 0.0) FROM spend").fetchone()
            else:
                row = c.execute(
                    "SELECT COALESCE(SUM(usd), 0.0) FROM spend WHERE job_id = ?", (job_id,)
                ).fetchone()
        return float(row[0])
