"""What each command shows and does, as plain values: the one source the CLI and the HTTP API share.

Why: ``tunefleet status --json`` on this machine and ``GET /api/v1/jobs/ID`` on the team server
must say the same thing in the same shape, and ``cancel`` must refuse the same way through both.
Each function takes an open store (and the config where a command needs it), does the command's
store work, and returns the dict the CLI prints with ``--json`` and the API returns as its body.
Refusals are :class:`ViewError` with the message and the CLI's exit code (2: bad input, 1: the
state does not allow it; the API maps them to 422 and 409).

Stdlib + store only, so the CLI stays fast.
"""

from __future__ import annotations

import math
import time
from typing import Any

from infra.config import Config


class ViewError(Exception):
    """A refused command: ``message`` for the user, ``code`` 2 (bad input) or 1 (not now)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def events_view(store, job_id: str, after_id: int = 0) -> list[dict[str, Any]]:
    """The job's timeline (``tunefleet events --json``)."""
    return [
        {"id": e.id, "ts": e.ts, "kind": e.kind, "attempt_id": e.attempt_id, "message": e.message, "data": e.data}
        for e in store.events(job_id, after_id)
    ]


def cancel_job(store, job_id: str) -> dict[str, Any]:
    """Cancel at once if queued; a running attempt is stopped by the daemon (``tunefleet cancel``)."""
    from orchestrator.store import InvalidTransition

    try:
        row = store.request_cancel(job_id)
    except InvalidTransition as exc:
        raise ViewError(str(exc)) from None
    return {"id": job_id, "state": row.state.value, "cancel_requested": row.cancel_requested}


def preempt_job(store, job_id: str, *, hard: bool = False, seq: int | None = None) -> dict[str, Any]:
    """Ask the daemon to interrupt the running attempt (``tunefleet preempt``)."""
    from orchestrator.store import InvalidTransition

    try:
        att = store.request_preempt(job_id, hard=hard, seq=seq)
    except InvalidTransition as exc:
        raise ViewError(str(exc)) from None
    return {"id": job_id, "attempt_id": att.id, "mode": "hard" if hard else "soft", "seq": att.seq}


def resume_job(store, job_id: str, max_usd: float | None = None) -> dict[str, Any]:
    """Queue a job stopped by its budget again, optionally raising its cap (``tunefleet resume``)."""
    from orchestrator.budget import usd
    from orchestrator.store import InvalidTransition

    row = store.get_job(job_id)
    spec = dict(row.spec)
    if max_usd is not None:
        if not math.isfinite(max_usd) or max_usd > 10_000_000:
            raise ViewError(f"--max-usd must be a finite amount of dollars up to 10,000,000, not {max_usd}", 2)
        if max_usd <= row.cost_usd:
            raise ViewError(f"--max-usd {usd(max_usd)} is not above the {usd(row.cost_usd)} already spent", 2)
        spec["policy"] = {**(spec.get("policy") or {}), "max_usd": max_usd}
    try:
        row = store.resume_stopped(job_id, spec)
    except InvalidTransition as exc:
        raise ViewError(str(exc)) from None
    return {"id": job_id, "state": row.state.value, "max_usd": (spec.get("policy") or {}).get("max_usd")}


SPEND_GROUPS = ("job", "sweep", "provider", "day")


def spend_view(store, config: Config, by: str = "job", rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The spend ledger grouped ``by`` job, sweep, provider or day (``tunefleet spend --json``);
    ``rows`` narrows it to what the caller may see (default: every row)."""
    from orchestrator.budget import month_start

    if by not in SPEND_GROUPS:
        raise ViewError(f"--by must be job, sweep, provider or day, not {by!r}", 2)
    rows = store.spend_rows() if rows is None else rows
    start = month_start(time.time())
    month = sum(r["usd"] for r in rows if r["ts"] >= start)
    groups: dict[str, float] = {}
    for r in rows:
        key = {"job": r["job_id"], "sweep": r["sweep_id"] or "-", "provider": r["provider"],
               "day": time.strftime("%Y-%m-%d", time.gmtime(r["ts"]))}[by]
        groups[key] = groups.get(key, 0.0) + r["usd"]
    return {"by": by, "groups": [{"key": k, "usd": round(v, 6)} for k, v in sorted(groups.items())],
            "total_usd": round(sum(groups.values()), 6), "this_month_usd": round(month, 6),
            "monthly_budget_usd": config.budget_monthly_usd}
