"""The schema of the state store, as a list of migrations, and the splitter that runs them.

Why migrations and not CREATE IF NOT EXISTS: a file written by an older tunefleet is brought up to
date in place, in one transaction, and a file written by a newer one is refused untouched.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

from orchestrator.store.rows import StoreError

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
    # v5: why attempts ended (a code, not text), when each started costing money and was last seen alive, how long it has
    # been unknown, a stop the daemon asked for; why a queued job waits and until when; the
    # daemon's view of each provider's health. Queued jobs with a cancel pending are cancelled.
    """
    ALTER TABLE attempts ADD COLUMN end_code TEXT NULL;
    ALTER TABLE attempts ADD COLUMN last_seen_at REAL NULL;
    ALTER TABLE attempts ADD COLUMN unknown_since REAL NULL;
    ALTER TABLE attempts ADD COLUMN stop_reason TEXT NULL;
    ALTER TABLE attempts ADD COLUMN stop_requested_at REAL NULL;
    ALTER TABLE attempts ADD COLUMN billed_from REAL NULL;
    ALTER TABLE jobs ADD COLUMN wait_code TEXT NULL;
    ALTER TABLE jobs ADD COLUMN wait_until REAL NULL;
    CREATE TABLE provider_health (
        name       TEXT PRIMARY KEY,
        state      TEXT NOT NULL,
        until      REAL NULL,
        reason     TEXT NOT NULL,
        failures   INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL
    );
    UPDATE attempts SET end_code = CASE
        WHEN state = 'succeeded' THEN 'finished'
        WHEN state = 'preempted' THEN 'preempted'
        WHEN state = 'cancelled' AND end_reason LIKE 'stopped by budget%' THEN 'budget_stop'
        WHEN state = 'cancelled' THEN 'cancelled'
        WHEN exit_code = 2 THEN 'bad_input'
        WHEN exit_code IS NULL THEN 'launch_failed'
        ELSE 'payload_failed' END
    WHERE state NOT IN ('launching', 'running');
    INSERT INTO events (ts, job_id, attempt_id, kind, message, data_json)
    SELECT updated_at, id, NULL, 'cancelled', 'cancelled (a cancel was pending while queued)',
           '{"from":"queued","to":"cancelled"}'
    FROM jobs WHERE state = 'queued' AND cancel_requested = 1;
    UPDATE jobs SET state = 'cancelled', reason = 'cancelled by the user'
    WHERE state = 'queued' AND cancel_requested = 1;
    """,
    # v6: attempts may end 'fenced' (another attempt holds the job's lease); machines found on a
    # provider with no live attempt (orphans), kept until a destroy is confirmed.
    """
    CREATE TABLE orphans (
        provider     TEXT NOT NULL,
        resource_id  TEXT NOT NULL,
        attempt_id   TEXT NULL,
        detail       TEXT NOT NULL DEFAULT '',
        found_at     REAL NOT NULL,
        tries        INTEGER NOT NULL DEFAULT 0,
        last_try_at  REAL NULL,
        last_error   TEXT NULL,
        destroyed_at REAL NULL,
        PRIMARY KEY (provider, resource_id)
    );
    """,
    # v7: every ended attempt as an observation of the market it ran in (orchestrator.learning):
    # hours on an offer with its advertised hazard, interrupted or not, and what it measured; or a
    # launch that failed on that host.
    """
    CREATE TABLE exposures (
        attempt_id    TEXT PRIMARY KEY,
        ts            REAL NOT NULL,
        provider      TEXT NOT NULL,
        gpu           TEXT NOT NULL,
        gpu_count     INTEGER NOT NULL,
        host          TEXT NOT NULL DEFAULT '',
        offer_id      TEXT NOT NULL,
        interruptible INTEGER NOT NULL,
        advertised    REAL NOT NULL,
        hours         REAL NOT NULL,
        interrupted   INTEGER NOT NULL,
        warned        INTEGER NOT NULL DEFAULT 0,
        launch_failed INTEGER NOT NULL DEFAULT 0,
        base_model    TEXT NULL,
        method        TEXT NULL,
        tokens_per_s  REAL NULL,
        checkpoint_s  REAL NULL
    );
    CREATE INDEX exposures_group ON exposures (provider, gpu, host);
    CREATE INDEX exposures_model ON exposures (base_model, method, ts);
    """,
    # v8: accounts for a team server (orchestrator.store.accounts): teams, users with a role, API
    # tokens stored as sha256 hex only; every job, attempt and spend row records its owner (NULL:
    # the one-person embedded default, which has no account).
    """
    CREATE TABLE teams (
        name        TEXT PRIMARY KEY,
        monthly_usd REAL NULL,
        created_at  REAL NOT NULL
    );
    CREATE TABLE users (
        name        TEXT PRIMARY KEY,
        team        TEXT NOT NULL REFERENCES teams (name),
        role        TEXT NOT NULL CHECK (role IN ('admin', 'member')),
        monthly_usd REAL NULL,
        created_at  REAL NOT NULL,
        disabled_at REAL NULL
    );
    CREATE INDEX users_team ON users (team);
    CREATE TABLE tokens (
        id           TEXT PRIMARY KEY,
        user_name    TEXT NOT NULL REFERENCES users (name),
        hash         TEXT NOT NULL UNIQUE,
        prefix       TEXT NOT NULL,
        created_at   REAL NOT NULL,
        expires_at   REAL NULL,
        revoked_at   REAL NULL,
        last_used_at REAL NULL,
        note         TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX tokens_user ON tokens (user_name, created_at);
    ALTER TABLE jobs ADD COLUMN owner TEXT NULL REFERENCES users (name);
    ALTER TABLE attempts ADD COLUMN owner TEXT NULL;
    ALTER TABLE spend ADD COLUMN owner TEXT NULL;
    CREATE INDEX jobs_owner ON jobs (owner, created_at);
    CREATE INDEX spend_owner_ts ON spend (owner, ts);
    """,
    # v9: sweeps record their owner too (a sweep submitted through the team server); its trial jobs
    # get the same owner. An older sweep takes the owner of its trial jobs.
    """
    ALTER TABLE sweeps ADD COLUMN owner TEXT NULL REFERENCES users (name);
    UPDATE sweeps SET owner = (SELECT MIN(j.owner) FROM trials t JOIN jobs j ON j.id = t.job_id
                               WHERE t.sweep_id = sweeps.id);
    CREATE INDEX sweeps_owner ON sweeps (owner, created_at);
    """,
    # v10: the dashboard. Browser sessions opened with an API token (stored by sha256 of the
    # cookie; a session lives no longer than its token); the loss curve of each job as the daemon
    # read it from its payloads' progress (a few hundred points an attempt at most).
    """
    CREATE TABLE sessions (
        hash        TEXT PRIMARY KEY,
        token_id    TEXT NOT NULL REFERENCES tokens (id),
        csrf        TEXT NOT NULL,
        created_at  REAL NOT NULL,
        expires_at  REAL NOT NULL,
        ended_at    REAL NULL
    );
    CREATE INDEX sessions_token ON sessions (token_id);
    CREATE TABLE metrics (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id     TEXT NOT NULL,
        attempt_id TEXT NULL,
        ts         REAL NOT NULL,
        step       INTEGER NOT NULL,
        loss       REAL NULL,
        eval_loss  REAL NULL
    );
    CREATE INDEX metrics_job ON metrics (job_id, id);
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)
assert SCHEMA_VERSION == 10


def split_sql(script: str) -> Iterator[str]:
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
