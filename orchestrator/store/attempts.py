"""Attempts in the store: the intent before a launch, state changes with their spend, preemption drills,
and the daemon's bookkeeping of each live attempt (last sign of life, unknown since, stop asked)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from orchestrator.states import LIVE_ATTEMPT_STATES, AttemptState, EndReason, JobState
from orchestrator.store.jobs import JobsMixin
from orchestrator.store.rows import AttemptRow, InvalidTransition, as_attempt_states, attempt_row, dump_dict

# Columns that transition_attempt may set besides the state (names interpolated into SQL: whitelist).
ATTEMPT_FIELDS = frozenset(
    {"handle", "started_at", "ended_at", "exit_code", "end_reason", "end_code", "end_step", "log_path",
     "last_seen_at", "unknown_since", "stop_reason", "stop_requested_at", "billed_from"}
)
_BOOKKEEPING = frozenset({"handle", "last_seen_at", "unknown_since", "stop_reason", "stop_requested_at", "billed_from"})
PREEMPT_MODES = ("soft", "hard")  # ordered: a request only ever escalates


class AttemptsMixin(JobsMixin):
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
        extra = json.loads(dump_dict(data if data is not None else {}, "data"))
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
                " created_at, start_step, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?,"
                " (SELECT owner FROM jobs WHERE id = ?))",
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
                    job_id,
                ),
            )
            c.execute(
                "UPDATE jobs SET state = ?, attempts_count = attempts_count + 1, updated_at = ?,"
                " reason = CASE WHEN wait_code IS NULL THEN reason END, wait_code = NULL, wait_until = NULL"
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
        exit_code, end_reason, end_code (an EndReason), end_step, log_path, last_seen_at,
        unknown_since, stop_reason, stop_requested_at. Terminal attempt states are final.
        Moving to a terminal state sets ended_at = now unless given; moving to running sets
        started_at = now unless given or already set. The job's own state is not touched:
        the caller decides what the attempt's end means for the job.
        """
        to = AttemptState(to)
        expected = None if expect is None else as_attempt_states(expect)
        unknown = set(fields) - ATTEMPT_FIELDS
        if unknown:
            raise TypeError(f"transition_attempt() cannot set {sorted(unknown)}")
        columns: dict[str, Any] = {}
        for key, value in fields.items():
            if key == "handle":
                columns["handle_json"] = None if value is None else dump_dict(value, "handle")
            else:
                columns[key] = value
        extra = json.loads(dump_dict(data if data is not None else {}, "data"))
        if "end_code" in columns and columns["end_code"] is not None:
            columns["end_code"] = EndReason(columns["end_code"]).value
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
                    "INSERT INTO spend (ts, job_id, attempt_id, provider, usd, kind, owner)"
                    " VALUES (?, ?, ?, ?, ?, ?, (SELECT owner FROM jobs WHERE id = ?))",
                    (now, att.job_id, attempt_id, att.provider, spend_usd, "compute", att.job_id),
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

    def ever_launched_on(self, provider: str) -> bool:
        """Whether any attempt was ever placed on ``provider`` (the reconciler lists only those)."""
        with self._read() as c:
            return c.execute("SELECT 1 FROM attempts WHERE provider = ? LIMIT 1", (provider,)).fetchone() is not None

    def attempts_for_jobs(self, job_ids: list[str]) -> dict[str, list[AttemptRow]]:
        """The attempts of many jobs at once (each job's by seq; [] for a job with none): one query
        where a listing would otherwise make one per job."""
        out: dict[str, list[AttemptRow]] = {j: [] for j in job_ids}
        ids = sorted(set(job_ids))
        with self._read() as c:
            for i in range(0, len(ids), 500):  # well under every database's limit on parameters
                part = ids[i:i + 500]
                for r in c.execute(f"SELECT * FROM attempts WHERE job_id IN ({', '.join('?' * len(part))})"
                                   " ORDER BY job_id, seq", part):
                    out[r["job_id"]].append(attempt_row(r))
        return out

    def attempts_for(self, job_id: str) -> list[AttemptRow]:
        """All attempts of a job, by seq."""
        with self._read() as c:
            rows = c.execute(
                "SELECT * FROM attempts WHERE job_id = ? ORDER BY seq", (job_id,)
            ).fetchall()
        return [attempt_row(r) for r in rows]

    def live_attempts(self) -> list[AttemptRow]:
        """Attempts in launching or running, across all jobs: what the daemon must watch."""
        live = sorted(s.value for s in LIVE_ATTEMPT_STATES)
        with self._read() as c:
            rows = c.execute(
                f"SELECT * FROM attempts WHERE state IN ({', '.join('?' * len(live))})"
                " ORDER BY created_at, job_id, seq",
                live,
            ).fetchall()
        return [attempt_row(r) for r in rows]

    def count_preemptions(self) -> int:
        """Attempts that ended interrupted (reclaimed or preempted), over the whole history (a
        counter for the server's metrics)."""
        with self._read() as c:
            return int(c.execute(
                "SELECT COUNT(*) FROM attempts WHERE state = ? OR end_code = ?",
                (AttemptState.PREEMPTED.value, EndReason.PREEMPTED.value),
            ).fetchone()[0])

    def placement_seconds(self, last: int = 1000) -> list[float]:
        """Seconds from submit to the first attempt, for the ``last`` jobs that got one (newest
        first): how long the queue makes a job wait to be placed (the server's metrics)."""
        with self._read() as c:
            rows = c.execute(
                "SELECT a.created_at - j.created_at FROM attempts a JOIN jobs j ON j.id = a.job_id"
                " WHERE a.seq = 1 ORDER BY a.created_at DESC LIMIT ?",
                (int(last),),
            ).fetchall()
        return [max(0.0, float(r[0])) for r in rows]

    def latest_attempt(self, job_id: str) -> AttemptRow | None:
        """The job's attempt with the highest seq, or None if it never had one."""
        with self._read() as c:
            r = c.execute(
                "SELECT * FROM attempts WHERE job_id = ? ORDER BY seq DESC LIMIT 1", (job_id,)
            ).fetchone()
        return None if r is None else attempt_row(r)

    def request_preempt(self, job_id: str, *, hard: bool, seq: int | None = None) -> AttemptRow:
        """Ask the daemon to stop the job's live attempt: "soft" (checkpoint first) or "hard".

        ``seq``: only that attempt; if it is no longer live (a preempt already ended it and the
        job moved on), InvalidTransition, so a repeated request never hits the next attempt.
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
            att = attempt_row(r)
            if seq is not None and att.seq != seq:
                raise InvalidTransition(f"attempt {seq} of job {job_id} is not running (attempt {att.seq} is); "
                                        "not preempting another attempt")
            if att.preempt_request in PREEMPT_MODES and PREEMPT_MODES.index(
                att.preempt_request
            ) > PREEMPT_MODES.index(mode):
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

    def update_attempt(self, attempt_id: str, **fields: Any) -> AttemptRow:
        """Set bookkeeping columns of a live attempt, without an event: ``last_seen_at``,
        ``unknown_since``, ``handle``, ``stop_reason``, ``stop_requested_at`` (the daemon's
        memory across restarts). A terminal attempt is left as it is (InvalidTransition)."""
        unknown = set(fields) - _BOOKKEEPING
        if unknown:
            raise TypeError(f"update_attempt() cannot set {sorted(unknown)}")
        columns = {("handle_json" if k == "handle" else k): (dump_dict(v, "handle") if k == "handle" and v is not None
                                                              else v) for k, v in fields.items()}
        with self._write() as c:
            att = self._fetch_attempt(c, attempt_id)
            if att.state.terminal:
                raise InvalidTransition(f"attempt {attempt_id} is already {att.state.value}")
            if columns:
                c.execute(f"UPDATE attempts SET {', '.join(f'{k} = ?' for k in columns)} WHERE id = ?",
                          (*columns.values(), attempt_id))
            return self._fetch_attempt(c, attempt_id)

    def mark_seen(self, seen: dict[str, float]) -> None:
        """Record signs of life of live attempts in one transaction: ``last_seen_at`` only moves
        forward, and a sign of life ends an ``unknown_since`` spell."""
        if not seen:
            return
        live = sorted(s.value for s in LIVE_ATTEMPT_STATES)
        with self._write() as c:
            c.executemany(
                "UPDATE attempts SET last_seen_at = CASE WHEN COALESCE(last_seen_at, 0) > ? THEN last_seen_at ELSE ? END,"
                f" unknown_since = NULL WHERE id = ? AND state IN ({', '.join('?' * len(live))})",
                [(float(ts), float(ts), attempt_id, *live) for attempt_id, ts in seen.items()],
            )
