"""Which daemon runs the queue: exactly one per store at a time; others wait as standbys.

Why a lock the operating system or the database releases, not a lease row we renew: a daemon
killed with SIGKILL cannot clean up, so its leadership must end with the process itself.

* **SQLite** (one machine): an exclusive ``flock`` on ``<home>/daemon.lock``. The kernel drops it
  when the process dies.
* **Postgres** (server replicas on several machines): a session-level advisory lock
  (``pg_try_advisory_lock``) held on a dedicated connection for the daemon's life. Postgres
  drops it when that session ends, and a killed process's session ends when its socket closes.
  The leader checks on every tick that the session is still there (``held()``). If it is not,
  for example after a network cut, it stops at once. A standby may already have taken over by
  then.

A standby tries once every poll interval (``wait_for``). After the leader dies it takes over
within one interval, plus the time Postgres needs to see the connection close. The new leader
starts as every daemon does, by adopting live attempts from the store: an attempt is recorded
before its launch, so a leader that died mid-launch leaves a record to reconcile, not a second
launch.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from infra.config import Config
from infra.urls import redact_url

DAEMON_LOCK_NAME = "tunefleet-daemon"


class DaemonLocked(RuntimeError):
    """Another daemon already runs on this state store."""


class LeaderLock(Protocol):
    """What a daemon holds while it runs the queue."""

    def try_acquire(self) -> bool:
        """Take the lock if it is free (never waits). True if we hold it now."""

    def acquire(self) -> None:
        """Take the lock or raise DaemonLocked, saying who holds it."""

    def held(self) -> bool:
        """Do we still hold it? (On Postgres: is our session alive.) Cheap; called every tick."""

    def release(self) -> None:
        """Let it go (safe to call twice)."""


def holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class DaemonLock:
    """An exclusive ``flock`` on ``<home>/daemon.lock``; released by the kernel if we die."""

    def __init__(self, home: Path):
        self.path = home / "daemon.lock"
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        if self.fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return True

    def acquire(self) -> None:
        if not self.try_acquire():
            try:
                holder = self.path.read_text(errors="replace").strip() or "another process"
            except OSError:
                holder = "another process"
            raise DaemonLocked(
                f"a tunefleet daemon is already running on {self.path.parent} (pid {holder}); "
                "stop it first, point TUNEFLEET_HOME at another folder, or start this one with --standby"
            )

    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class PgDaemonLock:
    """A Postgres advisory lock on a connection of its own (autocommit, never pooled)."""

    def __init__(self, url: str):
        from orchestrator.store.engines import lock_key

        self.url = url
        self.where = redact_url(url)
        self.key = lock_key(DAEMON_LOCK_NAME)
        self._conn = None

    def _connect(self):
        import psycopg

        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10,
                                         application_name=f"tunefleet-daemon {holder_id()}")
            self._conn.execute("SET statement_timeout = '10s'")
        return self._conn

    def try_acquire(self) -> bool:
        import psycopg

        try:
            got = bool(self._connect().execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()[0])
        except psycopg.Error:
            self._close()
            return False  # Postgres unreachable: not the leader; a standby tries again next interval
        if not got:
            self._close()  # a standby holds no session open between tries
        return got

    def acquire(self) -> None:
        if not self.try_acquire():
            raise DaemonLocked(
                f"a tunefleet daemon already holds the daemon lock on {self.where} ({self.holder() or 'unknown'}); "
                "stop it first, or start this one with --standby to take over when it stops"
            )

    def holder(self) -> str | None:
        """The ``application_name`` of the session that holds the lock, if Postgres can tell."""
        import psycopg

        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as c:
                row = c.execute(
                    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                    " WHERE l.locktype = 'advisory' AND l.granted"
                    " AND ((l.classid::bigint << 32) | l.objid::bigint) = %s",
                    (self.key,),
                ).fetchone()
        except psycopg.Error:
            return None
        return None if row is None else str(row[0])

    def held(self) -> bool:
        import psycopg

        if self._conn is None:
            return False
        try:
            self._conn.execute("SELECT 1").fetchone()
            return True
        except psycopg.Error:
            self._close()
            return False

    def release(self) -> None:
        import psycopg

        if self._conn is not None and not self._conn.broken:
            try:
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
            except psycopg.Error:
                pass  # closing the session releases it anyway
        self._close()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def daemon_lock(config: Config) -> LeaderLock:
    """The lock for this config's store: the file lock for SQLite, the advisory lock for Postgres."""
    if config.database_url:
        return PgDaemonLock(config.database_url)
    return DaemonLock(config.home)


def wait_for(lock: LeaderLock, stop: threading.Event, interval_s: float,
             on_try: Callable[[int], None] | None = None) -> bool:
    """Standby: try every ``interval_s`` until we hold the lock (True) or ``stop`` is set (False)."""
    tries = 0
    while not stop.is_set():
        tries += 1
        if lock.try_acquire():
            return True
        if on_try is not None:
            on_try(tries)
        stop.wait(interval_s)
    return False
