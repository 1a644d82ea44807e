"""Daemon leadership (orchestrator.leader): one daemon per store, standbys wait, a lost lock stops the
leader. Real Postgres (embedded), real ``tunefleet daemon`` processes, real ``flock``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from orchestrator.leader import DaemonLock, PgDaemonLock
from orchestrator.store import Store
from tests.waiting import wait_for


def _daemon(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    (home / "config.yaml").write_text("poll_interval_s: 0.2\n")
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "daemon", *args],
                            env={**os.environ, "TUNEFLEET_HOME": str(home), "HF_HUB_OFFLINE": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _cut_daemon_sessions(url: str) -> None:
    """End the daemon-lock sessions on this database: what a network cut or a DBA's kill does."""
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                  " WHERE application_name LIKE 'tunefleet-daemon %' AND datname = current_database()")


def test_pg_lock_is_exclusive_names_its_holder_and_frees_on_release(postgres):
    url = postgres.database()
    first, second = PgDaemonLock(url), PgDaemonLock(url)
    try:
        assert first.try_acquire() and first.held()
        assert not second.try_acquire() and not second.held()
        assert (second.holder() or "").startswith("tunefleet-daemon ")
        with pytest.raises(Exception, match="--standby"):
            second.acquire()
        first.release()
        assert not first.held()
        assert second.try_acquire()
    finally:
        first.release()
        second.release()


def test_a_leader_whose_session_is_killed_knows_it_at_once(postgres):
    url = postgres.database()
    lock, other = PgDaemonLock(url), PgDaemonLock(url)
    try:
        assert lock.try_acquire()
        _cut_daemon_sessions(url)
        assert not lock.held()
        assert other.try_acquire()  # and the lock is free for a standby
    finally:
        lock.release()
        other.release()


def test_the_daemon_stops_when_it_loses_the_lock(tmp_path, postgres):
    url = postgres.database()
    proc = _daemon(tmp_path, env={"TUNEFLEET_DATABASE_URL": url})
    try:
        with Store(url) as store:
            wait_for(lambda: store.daemon_leader() is not None, 60, "the daemon to lead")
            assert store.daemon_leader()["holder"].endswith(f":{proc.pid}")
        _cut_daemon_sessions(url)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, out
    assert "lost the daemon lock" in out


def test_a_second_daemon_is_refused_unless_standby_and_a_standby_takes_over(tmp_path, postgres):
    url = postgres.database()
    env = {"TUNEFLEET_DATABASE_URL": url}
    holder = PgDaemonLock(url)
    assert holder.try_acquire()
    try:
        refused = _daemon(tmp_path, env=env)
        out, _ = refused.communicate(timeout=60)
        assert refused.returncode == 1 and "already holds the daemon lock" in out and "--standby" in out
        assert "PASSWORD" not in out

        standby = _daemon(tmp_path, "--standby", "--until-idle", env=env)
        try:
            with Store(url) as store:
                wait_for(lambda: (tmp_path / "logs" / "daemon.log").exists()
                      and "standby: another daemon holds the lock" in (tmp_path / "logs" / "daemon.log").read_text(),
                      60, "the standby to wait")
                assert standby.poll() is None and store.daemon_leader() is None
                holder.release()
                out, _ = standby.communicate(timeout=60)  # takes over, finds nothing to do, exits (--until-idle)
                assert standby.returncode == 0, out
                assert store.daemon_leader()["holder"].endswith(f":{standby.pid}")
        finally:
            if standby.poll() is None:
                standby.kill()
                standby.wait()
    finally:
        holder.release()


def test_standby_on_sqlite_waits_for_the_flock(tmp_path):
    holder = DaemonLock(tmp_path)
    holder.acquire()
    standby = _daemon(tmp_path, "--standby", "--until-idle")
    try:
        log = tmp_path / "logs" / "daemon.log"
        wait_for(lambda: log.exists() and "standby: another daemon holds the lock" in log.read_text(), 60,
              "the standby to wait")
        assert standby.poll() is None
        holder.release()
        out, _ = standby.communicate(timeout=60)
        assert standby.returncode == 0, out
        with Store(tmp_path / "state.db") as store:
            assert store.daemon_leader()["holder"].endswith(f":{standby.pid}")
    finally:
        holder.release()
        if standby.poll() is None:
            standby.kill()
            standby.wait()
