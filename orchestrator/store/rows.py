"""The store's errors, its decoded rows, and the small helpers every part of it shares (stdlib only)."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from orchestrator.states import LIVE_ATTEMPT_STATES, AttemptState, EndReason, JobState

class StoreError(Exception):
    """Anything the store refuses to do. Callers catch this one class."""


class JobNotFound(StoreError):
    """No job has that id (or no unique job has that prefix)."""


class AttemptNotFound(StoreError):
    """No attempt has that id."""


class InvalidTransition(StoreError):
    """The row is not in a state that allows the change; nothing was written."""


class TeamNotFound(StoreError):
    """No team has that name."""


class UserNotFound(StoreError):
    """No user has that name."""


class TokenNotFound(StoreError):
    """No API token has that id."""


class AccountExists(StoreError):
    """A team or user of that name (compared case-insensitively) already exists; nothing was written."""


class InvalidAccount(StoreError):
    """A bad account value: a name, role, budget, expiry or note; or a token for a disabled user.
    Nothing was written."""


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
    wait_code: str | None = None  # why a queued job waits (orchestrator.decide.Code), None when it does not
    wait_until: float | None = None  # when it is looked at again for that reason (None: whenever things change)
    owner: str | None = None  # the user who submitted it; None: the one-person embedded default (no account)

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
    end_code: EndReason | None = None  # why it ended (the rule in orchestrator.outcomes); None while live
    last_seen_at: float | None = None  # the last sign of life: a poll that saw it, or its payload's heartbeat
    unknown_since: float | None = None  # its provider could not tell its state since then
    stop_reason: str | None = None  # the daemon asked it to save and stop (e.g. "budget: ...")
    stop_requested_at: float | None = None
    billed_from: float | None = None  # when the provider started billing it (its launch call ran); None: created_at
    owner: str | None = None  # its job's owner, copied when the attempt was created

    @property
    def billing_start(self) -> float:
        """From when this attempt costs money: its launch call, or (not known yet) its intent."""
        return self.billed_from if self.billed_from is not None else self.created_at

    @property
    def live(self) -> bool:
        return self.state in LIVE_ATTEMPT_STATES


@dataclass(frozen=True, slots=True)
class UserRow:
    """One row of ``users``: a person (or service) who owns jobs and holds API tokens."""

    name: str
    team: str
    role: str  # "admin" (sees and acts on everything) or "member" (acts on own jobs, sees the team's)
    monthly_usd: float | None  # this user's monthly cap; None: no cap of their own
    created_at: float
    disabled: bool  # a disabled user's tokens stop working at once


@dataclass(frozen=True, slots=True)
class TokenRow:
    """One API token, without its secret: neither the plaintext nor its hash ever leave the store."""

    id: str
    user: str
    prefix: str  # the plaintext's first characters, so a person can tell their tokens apart
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None  # updated at most once a minute
    note: str

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


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


def job_row(r: sqlite3.Row) -> JobRow:
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
        wait_code=r["wait_code"],
        wait_until=r["wait_until"],
        owner=r["owner"],
    )


def attempt_row(r: sqlite3.Row) -> AttemptRow:
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
        end_code=EndReason(r["end_code"]) if r["end_code"] else None,
        last_seen_at=r["last_seen_at"],
        unknown_since=r["unknown_since"],
        stop_reason=r["stop_reason"],
        stop_requested_at=r["stop_requested_at"],
        billed_from=r["billed_from"],
        owner=r["owner"],
    )


def user_row(r: sqlite3.Row) -> UserRow:
    return UserRow(
        name=r["name"],
        team=r["team"],
        role=r["role"],
        monthly_usd=r["monthly_usd"],
        created_at=r["created_at"],
        disabled=r["disabled_at"] is not None,
    )


def token_row(r: sqlite3.Row) -> TokenRow:
    return TokenRow(
        id=r["id"],
        user=r["user_name"],
        prefix=r["prefix"],
        created_at=r["created_at"],
        expires_at=r["expires_at"],
        revoked_at=r["revoked_at"],
        last_used_at=r["last_used_at"],
        note=r["note"],
    )


def event_row(r: sqlite3.Row) -> EventRow:
    return EventRow(
        id=r["id"],
        ts=r["ts"],
        job_id=r["job_id"],
        attempt_id=r["attempt_id"],
        kind=r["kind"],
        message=r["message"],
        data=json.loads(r["data_json"]),
    )



def random_job_id() -> str:
    """``"j"`` + 7 lowercase hex digits: short enough to type, 268M values to collide in."""
    return "j" + uuid.uuid4().hex[:7]


def dump_dict(value: Any, what: str) -> str:
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


def as_job_states(states: Iterable[JobState | str]) -> frozenset[JobState]:
    return frozenset(JobState(s) for s in states)


def as_attempt_states(states: Iterable[AttemptState | str]) -> frozenset[AttemptState]:
    return frozenset(AttemptState(s) for s in states)


def like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
