"""Jobs in the store: submit, find, list, the queue's order, state changes, progress, cancel, waiting."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any

from orchestrator.states import ACTIVE_JOB_STATES, JobState
from orchestrator.store.base import StoreBase
from orchestrator.store.rows import (
    InvalidAccount,
    InvalidTransition,
    JobNotFound,
    JobRow,
    UserNotFound,
    as_job_states,
    dump_dict,
    job_row,
    like_escape,
    random_job_id,
)

# Columns that transition_job may set besides the state. The names are interpolated into SQL,
# so they come only from this whitelist.
JOB_FIELDS = frozenset(
    {"reason", "step", "total_steps", "loss", "checkpoint_step", "checkpoint_uri", "adapter_uri", "not_before",
     "cost_usd", "wait_code", "wait_until"}
)


class JobsMixin(StoreBase):
    # -- jobs ---------------------------------------------------------------------------------

    def submit(
        self,
        spec: dict[str, Any],
        *,
        name: str,
        priority: int = 0,
        sweep_id: str | None = None,
        owner: str | None = None,
    ) -> str:
        """Queue a new job; returns its id. Event "submitted".

        ``owner`` is the user who submits it (UserNotFound if there is no such user, InvalidAccount
        if they are disabled); None is the one-person embedded default, with no account. Its
        attempts and spend rows copy it.
        """
        spec_json = dump_dict(spec, "spec")
        data = {"name": name, "priority": priority, "sweep_id": sweep_id}
        if owner is not None:  # only then, so an embedded job's event reads as it always did
            data["owner"] = owner
        data_json = dump_dict(data, "data")
        now = self._now()
        with self._write() as c:
            if owner is not None:
                self._check_owner(c, owner)
            job_id = self._insert_job(c, spec_json, name, priority, sweep_id, now, owner=owner)
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
    def _check_owner(c: sqlite3.Connection, owner: str) -> None:
        """The owner of a new job must be an enabled user (inside the caller's transaction)."""
        r = c.execute("SELECT disabled_at FROM users WHERE name = ?", (owner,)).fetchone()
        if r is None:
            raise UserNotFound(f"no user {owner!r}")
        if r[0] is not None:
            raise InvalidAccount(f"user {owner!r} is disabled")

    @staticmethod
    def _insert_job(
        c: sqlite3.Connection, spec_json: str, name: str, priority: int, sweep_id: str | None, now: float,
        *, owner: str | None = None,
    ) -> str:
        """Insert a queued job under a fresh random id (inside the caller's transaction)."""
        job_id = StoreBase._free_id(c, "jobs", random_job_id, "job")
        c.execute(
            "INSERT INTO jobs (id, name, state, priority, spec_json, created_at, updated_at, sweep_id, owner)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, name, JobState.QUEUED.value, int(priority), spec_json, now, now, sweep_id, owner),
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
                (like_escape(prefix) + "%",),
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
        self,
        states: Iterable[JobState] | None = None,
        limit: int | None = None,
        *,
        owner: str | None = None,
        team: str | None = None,
    ) -> list[JobRow]:
        """Jobs, newest first (rowid breaks ties between equal created_at).

        ``owner``: only that user's jobs; ``team``: only jobs whose owner is in that team (jobs
        with no owner are in no team). Both: both must hold. An unknown user or team matches
        nothing (a filter, not a lookup: no error).
        """
        sql = "SELECT * FROM jobs"
        where: list[str] = []
        params: list[Any] = []
        if states is not None:
            wanted = sorted(s.value for s in as_job_states(states))
            if not wanted:
                return []
            where.append(f"state IN ({', '.join('?' * len(wanted))})")
            params.extend(wanted)
        more, more_params = self._owned_by(owner, team)
        where += more
        params += more_params
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, rowid DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        with self._read() as c:
            return [job_row(r) for r in c.execute(sql, params)]

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
        return [job_row(r) for r in rows]

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
        checkpoint_uri, adapter_uri, not_before, cost_usd, wait_code, wait_until.
        The event's data is ``{"from": old, "to": new}`` updated with ``data``.

        **Cancel is a state, not a flag:** a job with a cancel pending that would go back to
        queued becomes cancelled instead, in this same transaction (event "cancelled"), so no
        job ever sits in the queue with a cancel nobody will act on.
        """
        to = JobState(to)
        expected = None if expect is None else as_job_states(expect)
        unknown = set(fields) - JOB_FIELDS
        if unknown:
            raise TypeError(f"transition_job() cannot set {sorted(unknown)}")
        extra = dump_dict(data if data is not None else {}, "data")
        now = self._now()
        with self._write() as c:
            job = self._fetch_job(c, job_id)
            self._check_job_transition(job, to, expected)
            if to is JobState.QUEUED and job.cancel_requested:
                to, kind, message = JobState.CANCELLED, "cancelled", f"cancelled by the user ({message})"
                fields = {"reason": "cancelled by the user"}
            elif to is not JobState.QUEUED:
                fields = {"wait_code": None, "wait_until": None, **fields}
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

    def update_progress(
        self,
        job_id: str,
        *,
        step: int,
        total_steps: int | None,
        loss: float | None,
        checkpoint_step: int | None = None,
        checkpoint_uri: str | None = None,
        attempt_id: str | None = None,
        eval_loss: float | None = None,
    ) -> None:
        """Record training progress. No event: the daemon calls this every tick.

        step, total_steps and loss are stored as given, even if step goes down (a resumed
        attempt may briefly report a step below the last one). The checkpoint columns change
        only when a value is passed: None means "no new checkpoint", not "forget it".

        With ``attempt_id``, the point also joins the job's loss curve (``metrics``): when the step
        moved on by at least a 400th of the run since the attempt's last point, or a new eval loss
        came, so an attempt keeps a few hundred points however long it trains.
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
            if attempt_id is not None and (loss is not None or eval_loss is not None):
                last = c.execute("SELECT step, (SELECT eval_loss FROM metrics WHERE job_id = ? AND attempt_id = ?"
                                 " AND eval_loss IS NOT NULL ORDER BY id DESC LIMIT 1) FROM metrics"
                                 " WHERE job_id = ? AND attempt_id = ? ORDER BY id DESC LIMIT 1",
                                 (job_id, attempt_id, job_id, attempt_id)).fetchone()
                stride = max(1, int(total_steps or 0) // 400)
                new_eval = eval_loss is not None and (last is None or last[1] != eval_loss)
                if last is None or new_eval or int(step) >= last[0] + stride:
                    c.execute("INSERT INTO metrics (job_id, attempt_id, ts, step, loss, eval_loss)"  # an eval
                              " VALUES (?, ?, ?, ?, ?, ?)",  # loss only where a new one came: the eval points
                              (job_id, attempt_id, now, int(step), loss, eval_loss if new_eval else None))

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        """The job's loss curve as the daemon recorded it, oldest first: {attempt_id, ts, step, loss,
        eval_loss}; across attempts, so a resumed job's curve shows where each attempt began."""
        with self._read() as c:
            rows = c.execute("SELECT attempt_id, ts, step, loss, eval_loss FROM metrics WHERE job_id = ?"
                             " ORDER BY id", (job_id,)).fetchall()
        return [{"attempt_id": r[0], "ts": r[1], "step": r[2], "loss": r[3], "eval_loss": r[4]} for r in rows]

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
                    (JobState.CANCELLED.value, "cancelled by the user", now, job_id),
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

    def set_waiting(self, job_id: str, code: str, message: str, until: float | None,
                    data: dict[str, Any] | None = None) -> bool:
        """Record why a queued job waits and until when (``reason``, ``wait_code``, ``wait_until``).

        Event "waiting" only when the code or the message changed, so a job looked at every few
        seconds does not flood its log. No-op (False) when the job is no longer queued.
        """
        data_json = dump_dict({"code": code, "until": until, **(data or {})}, "data")
        now = self._now()
        with self._write() as c:
            job = self._fetch_job(c, job_id)
            if job.state is not JobState.QUEUED:
                return False
            changed = job.wait_code != code or job.reason != message
            c.execute("UPDATE jobs SET reason = ?, wait_code = ?, wait_until = ? WHERE id = ?",
                      (message, code, until, job_id))
            if changed:
                self._insert_event(c, job_id=job_id, attempt_id=None, kind="waiting", message=message,
                                   data_json=data_json, ts=now)
            return changed

    def queued_ids(self) -> list[str]:
        with self._read() as c:
            return [r[0] for r in c.execute("SELECT id FROM jobs WHERE state = 'queued'")]

    def resume_stopped(self, job_id: str, spec: dict[str, Any]) -> JobRow:
        """Queue a job stopped by its budget again, with its (raised) spec. The one way out of
        ``stopped_budget``: every other terminal state stays final."""
        spec_json = dump_dict(spec, "spec")
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
