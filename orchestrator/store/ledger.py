"""The append-only records in the store: events, the spend ledger, measured throughput, sweeps and
their trials, and the daemon's view of provider health."""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

from orchestrator.states import JobState
from orchestrator.store.attempts import AttemptsMixin
from orchestrator.store.rows import EventRow, JobNotFound, StoreError, dump_dict, event_row


class LedgerMixin(AttemptsMixin):
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
        data_json = dump_dict(data if data is not None else {}, "data")
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
        return [event_row(r) for r in rows]

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
            c.execute(  # the row's owner is its job's, read in this same transaction
                "INSERT INTO spend (ts, job_id, attempt_id, provider, usd, kind, owner)"
                " VALUES (?, ?, ?, ?, ?, ?, (SELECT owner FROM jobs WHERE id = ?))",
                (now, job_id, attempt_id, provider, usd, kind, job_id),
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

    def record_exposure(self, *, attempt_id: str, provider: str, gpu: str, gpu_count: int, host: str,
                        offer_id: str, interruptible: bool, advertised: float, hours: float,
                        interrupted: bool, warned: bool = False, launch_failed: bool = False,
                        base_model: str | None = None,
                        method: str | None = None, tokens_per_s: float | None = None,
                        checkpoint_s: float | None = None) -> bool:
        """One ended attempt as an observation of its market (``orchestrator.learning``). Once per
        attempt: True when recorded, False when it already was (a restarted daemon ending it again)."""
        for name, v in (("advertised", advertised), ("hours", hours)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        with self._write() as c:
            cur = c.execute(
                "INSERT INTO exposures (attempt_id, ts, provider, gpu, gpu_count, host, offer_id, interruptible,"
                " advertised, hours, interrupted, warned, launch_failed, base_model, method, tokens_per_s,"
                " checkpoint_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (attempt_id) DO NOTHING",
                (attempt_id, self._now(), provider, gpu, int(gpu_count), host or "", offer_id, int(interruptible),
                 float(advertised), float(hours), int(interrupted), int(warned), int(launch_failed), base_model,
                 method, tokens_per_s, checkpoint_s),
            )
            return cur.rowcount > 0

    def exposure_tallies(self) -> dict[tuple[str, str, str], Any]:
        """Exposures summed by (provider, gpu, host): what ``MarketModel`` starts from. Hazard sums
        count attempts that ran on interruptible offers with an advertised hazard; launch counts
        count every attempt. One GROUP BY over an index; it grows with the hosts seen, not the attempts."""
        from orchestrator.learning import Tally

        ran = "(CASE WHEN interruptible = 1 AND advertised > 0 AND launch_failed = 0 THEN 1 ELSE 0 END)"
        with self._read() as c:
            rows = c.execute(
                f"SELECT provider, gpu, host, SUM({ran}), SUM({ran} * hours),"  # noqa: S608
                f" SUM({ran} * advertised * hours), SUM({ran} * interrupted),"
                f" SUM({ran} * interrupted * warned), COUNT(*), SUM(launch_failed)"
                " FROM exposures GROUP BY provider, gpu, host").fetchall()
        return {(r[0], r[1], r[2]): Tally(int(r[3]), float(r[4]), float(r[5]), int(r[6]), int(r[7]), int(r[8]),
                                          int(r[9])) for r in rows}

    def checkpoint_cost(self, base_model: str, method: str, last: int = 20) -> float | None:
        """Median measured seconds of one checkpoint (save + upload) over the last ``last`` attempts
        of this model and method that measured one; None before any did."""
        with self._read() as c:
            rows = c.execute(
                "SELECT checkpoint_s FROM exposures WHERE base_model = ? AND method = ? AND checkpoint_s > 0"
                " ORDER BY ts DESC LIMIT ?", (base_model, method, int(last))).fetchall()
        values = sorted(float(r[0]) for r in rows)
        return values[len(values) // 2] if values else None

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

    def spend_since(self, ts: float) -> float:
        """Everything recorded in the ledger since ``ts`` (the monthly budget's window)."""
        with self._read() as c:
            row = c.execute("SELECT COALESCE(SUM(usd), 0) FROM spend WHERE ts >= ?", (ts,)).fetchone()
        return float(row[0])

    def spend_rows(self, job_id: str | None = None) -> list[dict[str, Any]]:
        """The whole ledger (or one job's rows), oldest first, joined with each job's sweep (for
        ``tunefleet spend``); ``owner`` is the row's (its job's owner when it was recorded; None: no account)."""
        sql = ("SELECT s.ts, s.job_id, s.attempt_id, s.provider, s.usd, s.kind, j.sweep_id, s.owner"
               " FROM spend s LEFT JOIN jobs j ON j.id = s.job_id")
        with self._read() as c:
            if job_id is None:
                rows = c.execute(sql + " ORDER BY s.id").fetchall()
            else:
                rows = c.execute(sql + " WHERE s.job_id = ? ORDER BY s.id", (job_id,)).fetchall()
        keys = ("ts", "job_id", "attempt_id", "provider", "usd", "kind", "sweep_id", "owner")
        return [dict(zip(keys, tuple(r), strict=True)) for r in rows]

    # -- sweeps -------------------------------------------------------------------------------

    def create_sweep(self, name: str, spec: dict[str, Any], budget_usd: float, *, owner: str | None = None) -> str:
        """A running sweep (its trials come with ``add_trial``); ``owner`` owns it and its trial jobs."""
        spec_json = dump_dict(spec, "spec")
        now = self._now()
        with self._write() as c:
            if owner is not None:
                self._check_owner(c, owner)
            sweep_id = self._free_id(c, "sweeps", lambda: "s" + uuid.uuid4().hex[:7], "sweep")
            c.execute(
                "INSERT INTO sweeps (id, name, spec_json, state, budget_usd, created_at, updated_at, owner)"
                " VALUES (?, ?, ?, 'running', ?, ?, ?, ?)",
                (sweep_id, name, spec_json, float(budget_usd), now, now, owner),
            )
        return sweep_id

    def add_trial(
        self, sweep_id: str, *, trial: int, rung: int, params: dict[str, Any], spec: dict[str, Any],
        name: str, priority: int = 0,
    ) -> str:
        """Queue one trial's job for one rung, and link it to the sweep, in one transaction."""
        spec_json = dump_dict(spec, "spec")
        params_json = dump_dict(params, "params")
        now = self._now()
        with self._write() as c:
            row = c.execute("SELECT owner FROM sweeps WHERE id = ?", (sweep_id,)).fetchone()
            if row is None:
                raise StoreError(f"no sweep {sweep_id!r}")
            job_id = self._insert_job(c, spec_json, name, priority, sweep_id, now, owner=row[0])
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

    def list_sweeps(self, *, owner: str | None = None, team: str | None = None) -> list[dict[str, Any]]:
        """Sweeps, newest first: {id, name, state, budget_usd, spent_usd, owner, created_at}; only
        ``owner``'s, or only those owned by a member of ``team``, when given."""
        sql = ("SELECT s.id, s.name, s.state, s.budget_usd, s.owner, s.created_at,"
               " (SELECT COALESCE(SUM(j.cost_usd), 0) FROM jobs j WHERE j.sweep_id = s.id) FROM sweeps s")
        where, params = self._owned_by(owner, team, "s.owner")
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._read() as c:
            rows = c.execute(sql + " ORDER BY s.created_at DESC, s.id", params).fetchall()
        return [{"id": r[0], "name": r[1], "state": r[2], "budget_usd": r[3], "spent_usd": round(float(r[6]), 6),
                 "owner": r[4], "created_at": r[5]} for r in rows]

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

    # -- the daemon that leads (orchestrator.leader), for status, /healthz and /metrics ---------

    def set_daemon_leader(self, holder: str, *, tries: int = 1) -> None:
        """Record that ``holder`` (host:pid) took the daemon lock now, after ``tries`` tries."""
        value = json.dumps({"holder": holder, "since": self._now(), "tries": int(tries)})
        with self._write() as c:
            c.execute("INSERT INTO meta (key, value) VALUES ('daemon_leader', ?)"
                      " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (value,))

    def daemon_leader(self) -> dict[str, Any] | None:
        """The last daemon to take the lock: {holder, since, tries}; None if none ever did."""
        with self._read() as c:
            row = c.execute("SELECT value FROM meta WHERE key = 'daemon_leader'").fetchone()
        return None if row is None else json.loads(row[0])

    # -- provider health (written by the daemon, read by `tunefleet providers`) ----------------

    def set_provider_health(self, name: str, *, state: str, reason: str, until: float | None = None,
                            failures: int = 0) -> None:
        """The daemon's view of one provider: ``ok``, ``backoff`` (transient errors: asked again at
        ``until``) or ``disabled`` (unreachable or refusing us, until ``until``)."""
        with self._write() as c:
            c.execute(
                "INSERT INTO provider_health (name, state, until, reason, failures, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET state = excluded.state,"
                " until = excluded.until, reason = excluded.reason, failures = excluded.failures,"
                " updated_at = excluded.updated_at",
                (name, state, until, reason, int(failures), self._now()),
            )

    def provider_health(self) -> dict[str, dict[str, Any]]:
        """Every provider the daemon has judged: name -> {state, until, reason, failures, updated_at}."""
        with self._read() as c:
            rows = c.execute("SELECT name, state, until, reason, failures, updated_at FROM provider_health").fetchall()
        return {r[0]: {"state": r[1], "until": r[2], "reason": r[3], "failures": r[4], "updated_at": r[5]}
                for r in rows}

    # -- orphans: machines on a provider that no live attempt owns ---------------------------------
    def record_orphan(self, provider: str, resource_id: str, attempt_id: str | None, detail: str = "") -> bool:
        """Note a machine to destroy; True when it is newly found (not already being destroyed)."""
        with self._write() as c:
            cur = c.execute(
                "INSERT INTO orphans (provider, resource_id, attempt_id, detail, found_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (provider, resource_id) DO UPDATE SET destroyed_at = NULL"
                " WHERE orphans.destroyed_at IS NOT NULL",
                (provider, resource_id, attempt_id, detail[:300], self._now()),
            )
            return cur.rowcount > 0

    def orphan_tried(self, provider: str, resource_id: str, error: str | None) -> None:
        """One destroy of an orphan: confirmed (``error`` None) or failed with why."""
        now = self._now()
        with self._write() as c:
            if error is None:
                c.execute("UPDATE orphans SET tries = tries + 1, last_try_at = ?, last_error = NULL, destroyed_at = ?"
                          " WHERE provider = ? AND resource_id = ?", (now, now, provider, resource_id))
            else:
                c.execute("UPDATE orphans SET tries = tries + 1, last_try_at = ?, last_error = ?"
                          " WHERE provider = ? AND resource_id = ?", (now, error[:300], provider, resource_id))

    def orphans(self, pending_only: bool = True) -> list[dict[str, Any]]:
        """Orphans (still to destroy, or all): provider, resource_id, attempt_id, detail, found_at,
        tries, last_try_at, last_error, destroyed_at."""
        cols = ("provider", "resource_id", "attempt_id", "detail", "found_at", "tries", "last_try_at",
                "last_error", "destroyed_at")
        where = " WHERE destroyed_at IS NULL" if pending_only else ""
        with self._read() as c:
            rows = c.execute(f"SELECT {', '.join(cols)} FROM orphans{where} ORDER BY found_at").fetchall()  # noqa: S608
        return [dict(zip(cols, r, strict=True)) for r in rows]

