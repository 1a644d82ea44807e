"""Tests for orchestrator.store, on real SQLite files under tmp_path."""

from __future__ import annotations

import hashlib
import math
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import orchestrator.store as store_mod
import orchestrator.store.jobs as store_jobs_mod
from orchestrator.states import AttemptState, EndReason, JobState
from orchestrator.store import (
    SCHEMA_VERSION,
    AttemptNotFound,
    InvalidTransition,
    JobNotFound,
    Store,
    StoreError,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    """A clock that only moves when told to, so orderings by time are deterministic."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = 1.0) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "home" / "state.db"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(store_target: str | Path, clock: FakeClock) -> Iterator[Store]:
    """On SQLite and on Postgres (conftest); ``db_path`` is the SQLite file of the SQLite case."""
    s = Store(store_target, clock=clock)
    yield s
    s.close()


def fixed_ids(monkeypatch: pytest.MonkeyPatch, ids: list[str]) -> None:
    it = iter(ids)
    monkeypatch.setattr(store_jobs_mod, "random_job_id", lambda: next(it))


def raw(target: str | Path) -> Any:
    """A plain connection to the store's database, beside the store: sqlite3, or psycopg for Postgres."""
    if isinstance(target, str) and target.startswith("postgresql://"):
        import psycopg

        return psycopg.connect(target, autocommit=True)
    return sqlite3.connect(str(target), isolation_level=None)


def db_errors() -> tuple[type[BaseException], ...]:
    import psycopg

    return (sqlite3.DatabaseError, psycopg.DatabaseError)


def n_events(s: Store, job_id: str) -> int:
    return len(s.events(job_id))


def running_job(s: Store, clock: FakeClock | None = None) -> tuple[str, str]:
    """A job with a live attempt, both in running. Returns (job_id, attempt_id)."""
    job_id = s.submit({"model": "m"}, name="run")
    att = s.create_attempt(job_id, provider="fake", offer_id="o1", usd_per_hour=2.0, start_step=0)
    s.transition_attempt(att.id, AttemptState.RUNNING, kind="attempt_running", message="up")
    s.transition_job(job_id, JobState.RUNNING, kind="running", message="running")
    return job_id, att.id


# --------------------------------------------------------------------------------------------
# Opening, schema, pragmas
# --------------------------------------------------------------------------------------------


def test_open_creates_schema_in_wal_mode(store: Store, db_path: Path) -> None:
    assert db_path.exists()
    with raw(db_path) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (
            str(SCHEMA_VERSION),
        )
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"meta", "jobs", "attempts", "events", "spend"} <= tables
    # the connection's own pragmas
    conn = store._conn
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 10_000
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


def test_reopen_keeps_data_and_does_not_rerun_migrations(db_path: Path) -> None:
    with Store(db_path) as s:
        job_id = s.submit({"a": 1}, name="x")
    with Store(db_path) as s:  # would fail on CREATE TABLE if migrations ran again
        assert s.get_job(job_id).spec == {"a": 1}


def test_concurrent_first_open_of_fresh_db(tmp_path: Path) -> None:
    """Several openers racing on a brand-new file: one migrates, none fails.

    Regression: switching a fresh file to WAL returns SQLITE_BUSY without waiting for
    busy_timeout, so unretried this failed in a few percent of races.
    """
    errors: list[BaseException] = []
    for n in range(30):
        path = tmp_path / f"fresh{n}" / "state.db"
        barrier = threading.Barrier(8)

        def opener() -> None:
            barrier.wait()
            try:
                with Store(path) as s:
                    s.submit({}, name="x")
            except BaseException as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

        threads = [threading.Thread(target=opener) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with raw(path) as c:
            assert c.execute("SELECT value FROM meta").fetchall() == [(str(SCHEMA_VERSION),)]
        c.close()
    assert errors == []


def test_future_schema_version_is_refused_and_file_untouched(db_path: Path) -> None:
    with Store(db_path) as s:
        s.submit({}, name="old")
    with raw(db_path) as c:
        c.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    c.close()
    before = hashlib.sha256(db_path.read_bytes()).hexdigest()

    with pytest.raises(StoreError, match=r"(?i)newer.*upgrade tunefleet"):
        Store(db_path)

    assert hashlib.sha256(db_path.read_bytes()).hexdigest() == before
    with raw(db_path) as c:
        assert c.execute("SELECT value FROM meta").fetchone() == (str(SCHEMA_VERSION + 1),)
        assert c.execute("SELECT COUNT(*) FROM jobs").fetchone() == (1,)


def test_not_a_database_raises_store_error(tmp_path: Path) -> None:
    bad = tmp_path / "state.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        Store(bad)


def test_split_sql_keeps_trigger_bodies_whole() -> None:
    statements = list(store_mod._split_sql(store_mod.MIGRATIONS[0]))
    triggers = [s for s in statements if s.startswith("CREATE TRIGGER")]
    assert len(triggers) == 4
    assert all(t.rstrip().endswith("END;") for t in triggers)


def test_events_and_spend_are_append_only_even_in_raw_sql(store: Store, store_target: str | Path) -> None:
    job_id = store.submit({}, name="x")
    store.add_spend(job_id, None, provider="p", usd=1.0)
    c = raw(store_target)
    try:
        for sql in (
            "UPDATE events SET message = 'x'",
            "DELETE FROM events",
            "UPDATE spend SET usd = 0",
            "DELETE FROM spend",
        ):
            with pytest.raises(db_errors(), match="append-only"):
                c.execute(sql)
    finally:
        c.close()
    assert n_events(store, job_id) == 1
    assert store.spend_total(job_id) == 1.0


# --------------------------------------------------------------------------------------------
# Jobs: submit, get, list, queue order, id resolution
# --------------------------------------------------------------------------------------------


def test_submit_and_get(store: Store, clock: FakeClock) -> None:
    job_id = store.submit({"model": "llama", "lr": 1e-4}, name="ft", priority=3, sweep_id="s1")
    assert len(job_id) == 8 and job_id[0] == "j" and int(job_id[1:], 16) >= 0
    assert job_id[1:] == job_id[1:].lower()
    job = store.get_job(job_id)
    assert job.state is JobState.QUEUED
    assert (job.name, job.priority, job.sweep_id) == ("ft", 3, "s1")
    assert job.spec == {"model": "llama", "lr": 1e-4}
    assert job.created_at == job.updated_at == clock.now
    assert (job.step, job.cost_usd, job.attempts_count, job.cancel_requested) == (0, 0.0, 0, False)
    [ev] = store.events(job_id)
    assert ev.kind == "submitted" and ev.data["priority"] == 3


def test_get_missing_job_raises(store: Store) -> None:
    with pytest.raises(JobNotFound):
        store.get_job("jdeadbee")
    with pytest.raises(AttemptNotFound):
        store.get_attempt("jdeadbee.1")


def test_job_id_collision_is_retried(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    fixed_ids(monkeypatch, ["jaaaaaaa", "jaaaaaaa", "jaaaaaaa", "jbbbbbbb"])
    assert store.submit({}, name="a") == "jaaaaaaa"
    assert store.submit({}, name="b") == "jbbbbbbb"


def test_list_jobs_newest_first_filter_and_limit(store: Store, clock: FakeClock) -> None:
    ids = []
    for i in range(4):
        ids.append(store.submit({}, name=f"n{i}"))
        clock.tick()
    store.request_cancel(ids[1])
    assert [j.id for j in store.list_jobs()] == ids[::-1]
    assert [j.id for j in store.list_jobs(limit=2)] == [ids[3], ids[2]]
    assert [j.id for j in store.list_jobs([JobState.CANCELLED])] == [ids[1]]
    assert store.list_jobs([]) == []
    counts = store.count_jobs_by_state()
    assert counts[JobState.QUEUED] == 3 and counts[JobState.CANCELLED] == 1
    assert counts[JobState.RUNNING] == 0 and set(counts) == set(JobState)


def test_list_jobs_same_timestamp_still_newest_first(store: Store) -> None:
    ids = [store.submit({}, name=str(i)) for i in range(5)]  # frozen clock: equal created_at
    assert [j.id for j in store.list_jobs()] == ids[::-1]


def test_next_queued_orders_by_priority_then_age(
    store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    fixed_ids(monkeypatch, ["j0000005", "j0000004", "j0000003", "j0000002", "j0000001", "j0000009"])
    old_low = store.submit({}, name="old-low", priority=0)
    clock.tick()
    new_high = store.submit({}, name="new-high", priority=5)
    clock.tick()
    old_high = store.submit({}, name="old-high", priority=5)  # not really old: see below
    new_low = store.submit({}, name="new-low", priority=0)  # same created_at as old_high
    later = store.submit({}, name="later", priority=9)
    store.transition_job(later, JobState.QUEUED, kind="backoff", message="retry later",
                         not_before=clock.now + 60)
    clock.tick()

    order = [j.id for j in store.next_queued(clock.now, limit=10)]
    assert order == [new_high, old_high, old_low, new_low]
    assert [j.id for j in store.next_queued(clock.now, limit=2)] == [new_high, old_high]
    # not_before reached -> the priority-9 job comes first
    assert store.next_queued(clock.now + 61, limit=1)[0].id == later


def test_next_queued_ties_break_by_id(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    fixed_ids(monkeypatch, ["jccccccc", "jaaaaaaa", "jbbbbbbb"])
    for name in "abc":
        store.submit({}, name=name)  # frozen clock: same priority and created_at
    assert [j.id for j in store.next_queued(1e12, 10)] == ["jaaaaaaa", "jbbbbbbb", "jccccccc"]


def test_requeueing_a_job_with_a_cancel_pending_cancels_it_in_the_same_transaction(store: Store) -> None:
    job_id, att_id = running_job(store)
    store.request_cancel(job_id)
    store.transition_attempt(att_id, AttemptState.PREEMPTED, kind="lost", message="gone")
    row = store.transition_job(job_id, JobState.QUEUED, kind="requeued", message="again")
    assert row.state is JobState.CANCELLED and row.reason == "cancelled by the user"
    assert store.next_queued(1e12, 10) == [] and store.queued_ids() == []
    assert [e.kind for e in store.events(job_id)][-1] == "cancelled"
    with pytest.raises(InvalidTransition, match="already cancelled"):
        store.create_attempt(job_id, provider="p", offer_id="o", usd_per_hour=1, start_step=0)


def old_schema_db(db: Path, version: int) -> sqlite3.Connection:
    """A SQLite file at schema ``version``, as that tunefleet left it; an open connection to add rows."""
    from orchestrator.store import MIGRATIONS
    from orchestrator.store.schema import split_sql

    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    for script in MIGRATIONS[:version]:
        for statement in split_sql(script):
            conn.execute(statement)
    conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(version),))
    return conn


def test_v4_queued_jobs_with_a_cancel_pending_are_cancelled_by_the_migration(tmp_path: Path) -> None:
    db = tmp_path / "v4.db"
    conn = old_schema_db(db, 4)
    conn.execute("INSERT INTO jobs (id, name, state, spec_json, created_at, updated_at, cancel_requested)"
                 " VALUES ('jstuck00', 'x', 'queued', '{}', 1, 1, 1), ('jfine000', 'y', 'queued', '{}', 1, 1, 0)")
    conn.execute("INSERT INTO attempts (id, job_id, seq, provider, offer_id, state, created_at, end_reason)"
                 " VALUES ('jstuck00.1', 'jstuck00', 1, 'p', 'o', 'cancelled', 1, 'stopped by budget: $1')")
    conn.commit()
    conn.close()
    with Store(db) as s:
        assert s.get_job("jstuck00").state is JobState.CANCELLED
        assert s.get_job("jfine000").state is JobState.QUEUED
        assert [e.kind for e in s.events("jstuck00")] == ["cancelled"]
        assert s.get_attempt("jstuck00.1").end_code is EndReason.BUDGET_STOP


def test_resolve_job_id(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    fixed_ids(monkeypatch, ["jaaa1111", "jaaa2222", "jbbb3333"])
    a1, a2, b3 = (store.submit({}, name=n) for n in "xyz")
    assert store.resolve_job_id(a1) == a1  # exact
    assert store.resolve_job_id("jb") == b3  # unique prefix
    assert store.resolve_job_id(" JAAA2 ") == a2  # trimmed, case-insensitive
    with pytest.raises(JobNotFound, match=r"ambiguous.*jaaa1111, jaaa2222"):
        store.resolve_job_id("jaaa")
    with pytest.raises(JobNotFound, match="no job id starts with 'jc'"):
        store.resolve_job_id("jc")
    with pytest.raises(JobNotFound):
        store.resolve_job_id("j%")  # LIKE wildcards are literal
    with pytest.raises(JobNotFound):
        store.resolve_job_id("")


def test_resolve_ambiguous_lists_at_most_five(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    fixed_ids(monkeypatch, [f"j000000{i}" for i in range(8)])
    for i in range(8):
        store.submit({}, name=str(i))
    with pytest.raises(JobNotFound) as exc:
        store.resolve_job_id("j0")
    msg = str(exc.value)
    assert msg.count("j000000") == 5 and msg.endswith(", ...")


def test_non_json_data_is_rejected_before_writing(store: Store, db_path: Path) -> None:
    with pytest.raises(TypeError):
        store.submit({"bad": object()}, name="x")
    with pytest.raises(TypeError):
        store.submit(["not", "a", "dict"], name="x")  # type: ignore[arg-type]
    assert store.list_jobs() == []
    job_id = store.submit({}, name="ok")
    before = n_events(store, job_id)
    with pytest.raises(TypeError):
        store.add_event(job_id, "log", "m", data={"s": {1, 2}})
    with pytest.raises(TypeError):
        store.transition_job(job_id, JobState.FAILED, kind="f", message="m", data={"x": math.nan})
    with pytest.raises(TypeError):
        store.create_attempt(job_id, provider="p", offer_id="o", usd_per_hour=1, start_step=0,
                             data={"x": object()})
    assert n_events(store, job_id) == before
    job = store.get_job(job_id)
    assert job.state is JobState.QUEUED and job.attempts_count == 0


# --------------------------------------------------------------------------------------------
# Job transitions
# --------------------------------------------------------------------------------------------


def test_transition_job_sets_fields_and_appends_one_event(store: Store, clock: FakeClock) -> None:
    job_id, _ = running_job(store)
    before = n_events(store, job_id)
    clock.tick(5)
    job = store.transition_job(
        job_id, JobState.SUCCEEDED, kind="succeeded", message="done", data={"final_loss": 0.1},
        expect=[JobState.RUNNING], adapter_uri="s3://b/a", step=100, loss=0.1, reason="ok",
    )
    assert job.state is JobState.SUCCEEDED and job.updated_at == clock.now
    assert (job.adapter_uri, job.step, job.loss, job.reason) == ("s3://b/a", 100, 0.1, "ok")
    events = store.events(job_id)
    assert len(events) == before + 1
    assert events[-1].kind == "succeeded"
    assert events[-1].data == {"from": "running", "to": "succeeded", "final_loss": 0.1}


def test_transition_job_rejects_unknown_fields(store: Store) -> None:
    job_id = store.submit({}, name="x")
    with pytest.raises(TypeError, match="state"):
        store.transition_job(job_id, JobState.RUNNING, kind="k", message="m", state="failed")
    with pytest.raises(TypeError, match="attempts_count"):
        store.transition_job(job_id, JobState.RUNNING, kind="k", message="m", attempts_count=9)
    assert store.get_job(job_id).state is JobState.QUEUED


@pytest.mark.parametrize("terminal", sorted(s for s in JobState if s.terminal))
def test_terminal_job_states_are_final(store: Store, terminal: JobState) -> None:
    job_id = store.submit({}, name="x")
    store.transition_job(job_id, terminal, kind="end", message="end")
    before = store.get_job(job_id)
    n = n_events(store, job_id)
    for to in JobState:
        with pytest.raises(InvalidTransition, match=f"already {terminal.value}"):
            store.transition_job(job_id, to, kind="again", message="again")
    assert store.get_job(job_id) == before
    assert n_events(store, job_id) == n


def test_expect_mismatch_changes_nothing(store: Store, clock: FakeClock) -> None:
    job_id = store.submit({}, name="x")
    before = store.get_job(job_id)
    n = n_events(store, job_id)
    clock.tick()
    with pytest.raises(InvalidTransition, match="is queued, expected launching, running"):
        store.transition_job(job_id, JobState.SUCCEEDED, kind="k", message="m",
                             expect=(s for s in [JobState.RUNNING, JobState.LAUNCHING]), step=7)
    assert store.get_job(job_id) == before  # state, step and updated_at unchanged
    assert n_events(store, job_id) == n
    # a matching expect goes through
    store.transition_job(job_id, JobState.FAILED, kind="k", message="m", expect=[JobState.QUEUED])
    assert store.get_job(job_id).state is JobState.FAILED


def test_transition_unknown_job(store: Store) -> None:
    with pytest.raises(JobNotFound):
        store.transition_job("jnothere", JobState.FAILED, kind="k", message="m")


def test_update_progress_stores_what_is_given_without_event(store: Store) -> None:
    job_id, _ = running_job(store)
    n = n_events(store, job_id)
    store.update_progress(job_id, step=50, total_steps=100, loss=0.7,
                          checkpoint_step=50, checkpoint_uri="s3://ck/50")
    store.update_progress(job_id, step=40, total_steps=100, loss=None)  # resumed: lower step
    job = store.get_job(job_id)
    assert (job.step, job.total_steps, job.loss) == (40, 100, None)
    assert (job.checkpoint_step, job.checkpoint_uri) == (50, "s3://ck/50")  # kept
    assert n_events(store, job_id) == n
    with pytest.raises(JobNotFound):
        store.update_progress("jnothere", step=1, total_steps=None, loss=None)


# --------------------------------------------------------------------------------------------
# Attempts
# --------------------------------------------------------------------------------------------


def test_create_attempt_records_intent_and_seq_increments(store: Store, clock: FakeClock) -> None:
    job_id = store.submit({}, name="x")
    a1 = store.create_attempt(job_id, provider="vast", offer_id="o-1", usd_per_hour=1.25,
                              start_step=0, data={"gpu": "A100"})
    assert (a1.id, a1.seq, a1.state) == (f"{job_id}.1", 1, AttemptState.LAUNCHING)
    assert (a1.provider, a1.offer_id, a1.usd_per_hour, a1.created_at) == ("vast", "o-1", 1.25, clock.now)
    job = store.get_job(job_id)
    assert job.state is JobState.LAUNCHING and job.attempts_count == 1
    ev = store.events(job_id)[-1]
    assert ev.kind == "attempt_created" and ev.attempt_id == a1.id
    assert ev.data == {"seq": 1, "provider": "vast", "offer_id": "o-1", "usd_per_hour": 1.25,
                       "start_step": 0, "gpu": "A100"}

    # preempted, requeued, second attempt resumes from a checkpoint
    store.transition_attempt(a1.id, AttemptState.PREEMPTED, kind="preempted", message="spot lost")
    store.transition_job(job_id, JobState.PREEMPTED, kind="preempted", message="lost")
    store.transition_job(job_id, JobState.QUEUED, kind="requeued", message="again")
    a2 = store.create_attempt(job_id, provider="runpod", offer_id="o-2", usd_per_hour=2.0,
                              start_step=300)
    assert (a2.id, a2.seq, a2.start_step) == (f"{job_id}.2", 2, 300)
    assert store.get_job(job_id).attempts_count == 2
    assert [a.id for a in store.attempts_for(job_id)] == [a1.id, a2.id]
    assert store.latest_attempt(job_id) == a2
    assert store.latest_attempt(store.submit({}, name="fresh")) is None


@pytest.mark.parametrize("setup", ["launching", "running", "succeeded"])
def test_create_attempt_for_non_queued_job_writes_nothing(
    store: Store, db_path: Path, setup: str
) -> None:
    job_id = store.submit({}, name="x")
    if setup != "succeeded":
        store.create_attempt(job_id, provider="p", offer_id="o", usd_per_hour=1, start_step=0)
        if setup == "running":
            store.transition_job(job_id, JobState.RUNNING, kind="r", message="r")
    else:
        store.transition_job(job_id, JobState.SUCCEEDED, kind="s", message="s")
    job_before = store.get_job(job_id)
    attempts_before = store.attempts_for(job_id)
    events_before = n_events(store, job_id)

    with pytest.raises(InvalidTransition):
        store.create_attempt(job_id, provider="p", offer_id="o2", usd_per_hour=1, start_step=0)

    assert store.get_job(job_id) == job_before
    assert store.attempts_for(job_id) == attempts_before
    assert n_events(store, job_id) == events_before


def test_create_attempt_is_atomic_when_a_later_statement_fails(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the event insert (the last write) fails, the attempt insert and job update roll back."""
    job_id = store.submit({}, name="x")

    def boom(*args: object, **kwargs: object) -> int:
        raise sqlite3.OperationalError("disk I/O error (simulated)")

    monkeypatch.setattr(Store, "_insert_event", boom)
    with pytest.raises(sqlite3.OperationalError, match="simulated"):
        store.create_attempt(job_id, provider="p", offer_id="o", usd_per_hour=1, start_step=0)
    monkeypatch.undo()

    job = store.get_job(job_id)
    assert job.state is JobState.QUEUED and job.attempts_count == 0
    assert store.attempts_for(job_id) == []
    # the connection is usable again (no transaction left open) and seq restarts at 1
    att = store.create_attempt(job_id, provider="p", offer_id="o", usd_per_hour=1, start_step=0)
    assert att.seq == 1


def test_create_attempt_unknown_job(store: Store) -> None:
    with pytest.raises(JobNotFound):
        store.create_attempt("jnothere", provider="p", offer_id="o", usd_per_hour=1, start_step=0)


def test_transition_attempt_times_handle_and_fields(store: Store, clock: FakeClock) -> None:
    job_id = store.submit({}, name="x")
    att = store.create_attempt(job_id, provider="p", offer_id="o", usd_per_hour=1, start_step=0)
    clock.tick(10)
    running = store.transition_attempt(
        att.id, AttemptState.RUNNING, kind="attempt_running", message="up",
        expect=[AttemptState.LAUNCHING], handle={"instance": "i-123", "ip": "1.2.3.4"},
        log_path="/logs/a.log",
    )
    assert running.started_at == clock.now and running.ended_at is None
    assert running.handle == {"instance": "i-123", "ip": "1.2.3.4"}
    assert running.log_path == "/logs/a.log"
    assert store.live_attempts() == [running]
    clock.tick(100)
    done = store.transition_attempt(att.id, AttemptState.SUCCEEDED, kind="attempt_done",
                                    message="ok", exit_code=0, end_step=500, end_reason="finished")
    assert done.ended_at == clock.now and done.started_at == running.started_at
    assert (done.exit_code, done.end_step, done.end_reason) == (0, 500, "finished")
    assert store.live_attempts() == []
    ev = store.events(job_id)[-1]
    assert ev.attempt_id == att.id and ev.data == {"from": "running", "to": "succeeded"}


def test_transition_attempt_explicit_ended_at_is_kept(store: Store, clock: FakeClock) -> None:
    job_id = store.submit({}, name="x")
    att = store.create_attempt(job_id, provider="p", offer_id="o", usd_per_hour=1, start_step=0)
    done = store.transition_attempt(att.id, AttemptState.FAILED, kind="f", message="f",
                                    ended_at=clock.now - 30)
    assert done.ended_at == clock.now - 30
    assert done.started_at is None  # never ran


@pytest.mark.parametrize("terminal", sorted(s for s in AttemptState if s.terminal))
def test_terminal_attempt_states_are_final(store: Store, terminal: AttemptState) -> None:
    job_id = store.submit({}, name="x")
    att = store.create_attempt(job_id, provider="p", offer_id="o", usd_per_hour=1, start_step=0)
    ended = store.transition_attempt(att.id, terminal, kind="end", message="end")
    n = n_events(store, job_id)
    for to in AttemptState:
        with pytest.raises(InvalidTransition, match=f"already {terminal.value}"):
            store.transition_attempt(att.id, to, kind="again", message="again", exit_code=3)
    assert store.get_attempt(att.id) == ended
    assert n_events(store, job_id) == n


def test_transition_attempt_expect_mismatch_and_bad_fields(store: Store) -> None:
    job_id = store.submit({}, name="x")
    att = store.create_attempt(job_id, provider="p", offer_id="o", usd_per_hour=1, start_step=0)
    n = n_events(store, job_id)
    with pytest.raises(InvalidTransition, match="expected running"):
        store.transition_attempt(att.id, AttemptState.SUCCEEDED, kind="k", message="m",
                                 expect=[AttemptState.RUNNING], exit_code=0)
    with pytest.raises(TypeError, match="seq"):
        store.transition_attempt(att.id, AttemptState.RUNNING, kind="k", message="m", seq=9)
    with pytest.raises(TypeError):
        store.transition_attempt(att.id, AttemptState.RUNNING, kind="k", message="m",
                                 handle={"x": object()})
    assert store.get_attempt(att.id) == att
    assert n_events(store, job_id) == n


# --------------------------------------------------------------------------------------------
# Cancel, preempt
# --------------------------------------------------------------------------------------------


def test_request_cancel_queued_cancels_at_once(store: Store) -> None:
    job_id = store.submit({}, name="x")
    job = store.request_cancel(job_id)
    assert job.state is JobState.CANCELLED
    assert store.events(job_id)[-1].kind == "cancelled"
    assert store.next_queued(1e12, 10) == []


def test_request_cancel_running_sets_flag_only(store: Store) -> None:
    job_id, att_id = running_job(store)
    job = store.request_cancel(job_id)
    assert job.state is JobState.RUNNING and job.cancel_requested
    assert store.events(job_id)[-1].kind == "cancel_requested"
    n = n_events(store, job_id)
    store.request_cancel(job_id)  # again: idempotent, no second event
    assert n_events(store, job_id) == n
    assert store.get_attempt(att_id).state is AttemptState.RUNNING


def test_request_cancel_finished_raises(store: Store) -> None:
    job_id = store.submit({}, name="x")
    store.transition_job(job_id, JobState.SUCCEEDED, kind="s", message="s")
    with pytest.raises(InvalidTransition, match=f"^job {job_id} is already succeeded$"):
        store.request_cancel(job_id)
    with pytest.raises(JobNotFound):
        store.request_cancel("jnothere")


def test_request_preempt(store: Store) -> None:
    job_id, att_id = running_job(store)
    att = store.request_preempt(job_id, hard=False)
    assert att.id == att_id and att.preempt_request == "soft"
    ev = store.events(job_id)[-1]
    assert ev.kind == "preempt_requested" and ev.attempt_id == att_id
    assert store.request_preempt(job_id, hard=True).preempt_request == "hard"
    assert store.request_preempt(job_id, hard=False).preempt_request == "hard"  # no downgrade

    store.clear_preempt_request(att_id)
    assert store.get_attempt(att_id).preempt_request is None
    assert store.events(job_id)[-1].kind == "preempt_request_cleared"
    n = n_events(store, job_id)
    store.clear_preempt_request(att_id)  # nothing to clear: no event
    assert n_events(store, job_id) == n

    store.transition_attempt(att_id, AttemptState.PREEMPTED, kind="p", message="p")
    with pytest.raises(InvalidTransition, match=f"job {job_id} has no running attempt"):
        store.request_preempt(job_id, hard=True)
    queued = store.submit({}, name="q")
    with pytest.raises(InvalidTransition, match="no running attempt"):
        store.request_preempt(queued, hard=False)


# --------------------------------------------------------------------------------------------
# Events, spend
# --------------------------------------------------------------------------------------------


def test_add_event_and_poll_after_id(store: Store) -> None:
    job_id, att_id = running_job(store)
    other = store.submit({}, name="other")
    first = store.add_event(job_id, "log", "hello", attempt_id=att_id, data={"line": 1})
    store.add_event(other, "log", "elsewhere")
    second = store.add_event(job_id, "log", "world")
    assert second > first
    new = store.events(job_id, after_id=first)
    assert [e.id for e in new] == [second] and new[0].data == {}
    mine = store.events(job_id)
    assert [e.id for e in mine] == sorted(e.id for e in mine)
    assert all(e.job_id == job_id for e in mine)
    with pytest.raises(JobNotFound):
        store.add_event("jnothere", "log", "x")
    with pytest.raises(StoreError, match="belongs to"):
        store.add_event(other, "log", "x", attempt_id=att_id)


def test_add_spend_sums_into_cost(store: Store) -> None:
    job_id, att_id = running_job(store)
    other = store.submit({}, name="other")
    store.add_spend(job_id, att_id, provider="vast", usd=0.10)
    store.add_spend(job_id, att_id, provider="vast", usd=0.25)
    store.add_spend(job_id, None, provider="s3", usd=0.05, kind="storage")
    store.add_spend(other, None, provider="s3", usd=1.0, kind="storage")
    assert store.get_job(job_id).cost_usd == pytest.approx(0.40)
    assert store.spend_total(job_id) == pytest.approx(0.40)
    assert store.spend_total() == pytest.approx(1.40)
    assert store.spend_total("jnothere") == 0.0
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            store.add_spend(job_id, att_id, provider="vast", usd=bad)
    with pytest.raises(JobNotFound):
        store.add_spend("jnothere", None, provider="vast", usd=1.0)
    assert store.spend_total() == pytest.approx(1.40)  # nothing written by the failures


# --------------------------------------------------------------------------------------------
# Multiple processes: crash consistency, concurrency
# --------------------------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from orchestrator.states import AttemptState, JobState
    from orchestrator.store import Store

    s = Store(sys.argv[1])
    tag = sys.argv[2]
    rounds = int(sys.argv[3])  # 0 = forever
    print("ready", flush=True)
    if len(sys.argv) > 4:  # wait for the start gate so both writers overlap
        import os, time
        while not os.path.exists(sys.argv[4]):
            time.sleep(0.005)
    i = 0
    while rounds == 0 or i < rounds:
        j = s.submit({"i": i, "tag": tag, "pad": "x" * 500}, name=f"{tag}-{i}", priority=i % 3)
        for attempt in range(1 + i % 2):
            a = s.create_attempt(j, provider="fake", offer_id=f"o{i}", usd_per_hour=1.5,
                                 start_step=attempt * 10)
            s.transition_attempt(a.id, AttemptState.RUNNING, kind="attempt_running",
                                 message="up", handle={"i": i})
            s.transition_job(j, JobState.RUNNING, kind="running", message="r",
                             expect=[JobState.LAUNCHING])
            s.update_progress(j, step=10, total_steps=100, loss=0.5)
            s.add_spend(j, a.id, provider="fake", usd=0.25)
            s.add_event(j, "log", "hello", attempt_id=a.id, data={"i": i})
            if attempt == 0 and i % 2:
                s.transition_attempt(a.id, AttemptState.PREEMPTED, kind="lost", message="spot")
                s.transition_job(j, JobState.QUEUED, kind="requeued", message="again")
        s.transition_job(j, JobState.SUCCEEDED, kind="succeeded", message="done")
        i += 1
    s.close()
    """
)


def start_writer(db_path: str | Path, tag: str, rounds: int, gate: Path | None = None) -> subprocess.Popen[str]:
    args = [sys.executable, "-c", WRITER, str(db_path), tag, str(rounds)]
    if gate is not None:
        args.append(str(gate))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    """Wait for the writer's "ready" line, failing (not hanging) if it never comes."""
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], timeout)
    if not readable:
        proc.kill()
        pytest.fail(f"writer not ready after {timeout}s")
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        pytest.fail(f"writer failed to start: {proc.communicate()[1]}")


def check_invariants(target: str | Path) -> int:
    """Cross-table invariants that only hold if every write was one transaction."""
    c = raw(target)
    sqlite = isinstance(c, sqlite3.Connection)
    try:
        if sqlite:
            assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert c.execute("PRAGMA foreign_key_check").fetchall() == []
        # every attempt has exactly one attempt_created event, and vice versa
        assert c.execute(
            "SELECT a.id FROM attempts a WHERE (SELECT COUNT(*) FROM events e"
            " WHERE e.attempt_id = a.id AND e.kind = 'attempt_created') != 1"
        ).fetchall() == []
        assert c.execute(
            "SELECT e.id FROM events e WHERE e.kind = 'attempt_created'"
            " AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.id = e.attempt_id)"
        ).fetchall() == []
        # attempts_count matches, and seqs are 1..n per job
        assert c.execute(
            "SELECT j.id FROM jobs j WHERE j.attempts_count !="
            " (SELECT COUNT(*) FROM attempts a WHERE a.job_id = j.id)"
            " OR j.attempts_count != COALESCE((SELECT MAX(seq) FROM attempts a WHERE a.job_id = j.id), 0)"
        ).fetchall() == []
        # every job has its submitted event; cost_usd equals its spend rows
        assert c.execute(
            "SELECT j.id FROM jobs j WHERE (SELECT COUNT(*) FROM events e"
            " WHERE e.job_id = j.id AND e.kind = 'submitted') != 1"
        ).fetchall() == []
        assert c.execute(
            "SELECT j.id FROM jobs j WHERE ABS(j.cost_usd -"
            " (SELECT COALESCE(SUM(usd), 0) FROM spend s WHERE s.job_id = j.id)) > 1e-9"
        ).fetchall() == []
        # a launching attempt only exists while its job is launching (same transaction)
        assert c.execute(
            "SELECT a.id FROM attempts a JOIN jobs j ON j.id = a.job_id"
            " WHERE a.state = 'launching' AND j.state != 'launching'"
        ).fetchall() == []
        ids = [r[0] for r in c.execute("SELECT id FROM events ORDER BY id")]
        if sqlite:  # event ids are gap-free: AUTOINCREMENT's counter rolls back with a killed transaction
            assert ids == list(range(1, len(ids) + 1))
            seq = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
            assert seq is None or seq[0] == len(ids)
        else:  # a Postgres sequence does not roll back: ids may skip, but never repeat
            assert len(set(ids)) == len(ids)
        return c.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    finally:
        c.close()


def test_sigkill_at_random_moments_leaves_db_consistent(store_target: str | Path) -> None:
    db_path = store_target
    Store(db_path).close()
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    jobs_seen = 0
    for round_no in range(8):
        proc = start_writer(db_path, f"r{round_no}", rounds=0)
        wait_ready(proc)
        time.sleep(rng.uniform(0.02, 0.25))
        assert proc.poll() is None, f"writer died on its own: {proc.communicate()[1]}"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        # reopening runs SQLite's recovery; the store must open and work afterwards
        with Store(db_path) as s:
            s.submit({}, name=f"after-kill-{round_no}")
        count = check_invariants(db_path)
        assert count > jobs_seen + 1, f"round {round_no} wrote nothing (seed {seed})"
        jobs_seen = count


def test_two_processes_write_concurrently_without_lock_errors(tmp_path: Path, store_target: str | Path) -> None:
    db_path = store_target
    Store(db_path).close()
    gate = tmp_path / "go"
    rounds = 150
    procs = [start_writer(db_path, tag, rounds, gate) for tag in ("a", "b")]
    for p in procs:
        wait_ready(p)
    gate.touch()
    results = [p.communicate(timeout=60) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert "locked" not in err
    with Store(db_path) as s:
        jobs = s.list_jobs()
        assert len(jobs) == 2 * rounds
        assert all(j.state is JobState.SUCCEEDED for j in jobs)
        assert s.spend_total() == pytest.approx(0.25 * sum(1 + i % 2 for i in range(rounds)) * 2)
    check_invariants(db_path)


def test_threads_sharing_and_not_sharing_a_store(store_target: str | Path) -> None:
    db_path = store_target
    shared = Store(db_path)
    own = [Store(db_path) for _ in range(2)]
    errors: list[BaseException] = []
    per_thread = 30

    def work(s: Store, tag: str) -> None:
        try:
            for i in range(per_thread):
                j = s.submit({"i": i}, name=f"{tag}{i}")
                s.create_attempt(j, provider="p", offer_id="o", usd_per_hour=1, start_step=0)
                s.add_spend(j, None, provider="p", usd=1.0)
                s.events(j)
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(shared, f"s{k}-")) for k in range(2)]
    threads += [threading.Thread(target=work, args=(s, f"o{k}-")) for k, s in enumerate(own)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert len(shared.list_jobs()) == 4 * per_thread
        assert shared.spend_total() == 4 * per_thread
    finally:
        for s in (shared, *own):
            s.close()
    check_invariants(db_path)


def test_v1_database_is_migrated_to_the_current_schema_keeping_its_data(tmp_path: Path) -> None:
    import sqlite3

    from orchestrator.store import MIGRATIONS

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")  # as v1 wrote it
    conn.executescript(MIGRATIONS[0])
    conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
    conn.execute(
        "INSERT INTO jobs (id, name, state, priority, spec_json, created_at, updated_at, step)"
        " VALUES ('j0000001', 'old', 'queued', 0, '{}', 1, 1, 0)"
    )
    conn.commit()
    conn.close()
    with Store(path) as store:
        assert store.get_job("j0000001").name == "old"
        store.record_throughput(base_model="m", method="qlora", gpu="A100", gpu_count=2, tokens_per_s=4000.0)
        assert store.calibration("m", "qlora") == {"A100": 2000.0}  # per GPU
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (str(len(MIGRATIONS)),)


def test_calibration_is_the_median_of_recent_runs_per_gpu(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        for tps in (1000.0, 5000.0, 1200.0):
            store.record_throughput(base_model="m", method="lora", gpu="L4", gpu_count=1, tokens_per_s=tps)
        store.record_throughput(base_model="m", method="qlora", gpu="L4", gpu_count=1, tokens_per_s=9.0)
        store.record_throughput(base_model="other", method="lora", gpu="L4", gpu_count=1, tokens_per_s=9.0)
        assert store.calibration("m", "lora") == {"L4": 1200.0}
        assert store.calibration("nobody", "lora") == {}
        with pytest.raises(ValueError):
            store.record_throughput(base_model="m", method="lora", gpu="L4", gpu_count=1, tokens_per_s=float("nan"))


# --------------------------------------------------------------------------------------------
# Choosing the database: a path, a postgresql:// URL, or a clear error
# --------------------------------------------------------------------------------------------


def test_store_reports_its_backend(store: Store, store_backend: str) -> None:
    assert store.backend == store_backend
    assert store.schema_version() == SCHEMA_VERSION
    assert "***" in store.where or store_backend == "sqlite" or ":@" not in store.where


def test_unknown_url_scheme_is_refused_without_showing_the_password() -> None:
    with pytest.raises(StoreError, match="unknown database URL scheme") as info:
        Store("mysql://admin:hunter2@db/tunefleet")
    assert "hunter2" not in str(info.value)


def test_unreachable_postgres_is_a_store_error_without_the_password(tmp_path: Path) -> None:
    url = f"postgresql://admin:hunter2@/tunefleet?host={tmp_path}&port=1"  # no server on that socket
    with pytest.raises(StoreError, match="cannot connect") as info:
        Store(url)
    assert "hunter2" not in str(info.value)


def test_a_newer_postgres_schema_is_refused_untouched(postgres: Any) -> None:
    url = postgres.database()
    Store(url).close()
    c = raw(url)
    c.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'".replace("?", "%s"), (str(SCHEMA_VERSION + 1),))
    with pytest.raises(StoreError, match="newer tunefleet"):
        Store(url)
    assert c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION + 1)
    c.close()


def test_pg_schema_rewrites_every_migration_statement() -> None:
    """Every SQLite-only word of the migrations is rewritten, and the triggers become plpgsql."""
    from orchestrator.store.engines import pg_statements
    from orchestrator.store.schema import split_sql

    out = [sql for script in store_mod.MIGRATIONS for stmt in split_sql(script) for sql in pg_statements(stmt)]
    text = "\n".join(out)
    for word in ("AUTOINCREMENT", "RAISE(ABORT", " REAL ", "INTEGER"):
        assert word not in text, word
    assert sum("LANGUAGE plpgsql" in s for s in out) == 4
    assert any("CREATE TABLE jobs ( rowid BIGINT GENERATED ALWAYS AS IDENTITY," in s for s in out)


def test_database_url_in_config_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.config import ConfigError, load_config

    monkeypatch.delenv("TUNEFLEET_DATABASE_URL", raising=False)
    assert load_config(tmp_path).database == tmp_path / "state.db"
    monkeypatch.setenv("TUNEFLEET_DATABASE_URL", "postgresql://tf:s3cret@db.internal/tf")
    config = load_config(tmp_path)
    assert config.database == "postgresql://tf:s3cret@db.internal/tf"
    assert config.database_shown == "postgresql://tf:***@db.internal/tf"
    monkeypatch.setenv("TUNEFLEET_DATABASE_URL", "mysql://tf:s3cret@db.internal/tf")
    with pytest.raises(ConfigError, match="TUNEFLEET_DATABASE_URL: database_url: .*postgresql://USER") as info:
        load_config(tmp_path)
    assert "s3cret" not in str(info.value)


def test_attempts_for_jobs_is_attempts_for_of_each(store: Store) -> None:
    busy, _ = running_job(store)
    idle = store.submit({}, name="idle")
    got = store.attempts_for_jobs([busy, idle, busy])
    assert got == {busy: store.attempts_for(busy), idle: []}
    assert store.attempts_for_jobs([]) == {}


def test_postgres_pool_serves_many_threads_with_at_most_its_size(postgres: Any) -> None:
    from orchestrator.store.base import PG_POOL_SIZE

    url = postgres.database()
    errors: list[BaseException] = []
    peak = [0]
    with Store(url) as s:
        jobs = [s.submit({"i": i}, name=f"j{i}") for i in range(5)]

        def work() -> None:
            try:
                for _ in range(20):
                    assert len(s.list_jobs()) == 5 and s.get_job(jobs[0]).name == "j0"
                    s.add_event(jobs[1], "log", "x")
            except BaseException as e:  # noqa: BLE001 - asserted below
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(3 * PG_POOL_SIZE)]
        c = raw(url)
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            n = c.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database()"
                          " AND pid <> pg_backend_pid()").fetchone()[0]
            peak[0] = max(peak[0], n)
            time.sleep(0.005)
        c.close()
        assert errors == []
        assert len(s.events(jobs[1])) == 1 + 20 * 3 * PG_POOL_SIZE  # every write landed, once
    assert 1 <= peak[0] <= PG_POOL_SIZE


def test_progress_with_an_attempt_draws_a_thinned_loss_curve(store: Store, clock: FakeClock) -> None:
    job_id, att = running_job(store)
    for step in range(0, 2001):
        clock.tick(0.1)
        store.update_progress(job_id, step=step, total_steps=2000, loss=5.0 - step / 1000, attempt_id=att,
                              eval_loss=2.0 if step >= 1000 else None)
    curve = store.metrics(job_id)
    steps = [p["step"] for p in curve]
    assert steps == sorted(steps) and steps[0] == 0 and 390 <= len(curve) <= 410  # a 400th of the run apart
    assert {p["attempt_id"] for p in curve} == {att}
    assert [p["step"] for p in curve if p["eval_loss"] is not None][0] == 1000  # a new eval loss is kept at once
    assert curve[-1]["loss"] == pytest.approx(5.0 - curve[-1]["step"] / 1000)
    # without an attempt (a plain progress update) nothing is drawn
    other = store.submit({}, name="x")
    store.update_progress(other, step=3, total_steps=10, loss=1.0)
    assert store.metrics(other) == []


def test_the_store_imports_only_the_standard_library() -> None:
    """The CLI imports the store on every command: nothing heavy (pydantic, yaml, psycopg) comes with it."""
    code = "import sys, orchestrator.store; print(sorted(m for m in ('pydantic', 'yaml', 'psycopg') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
