"""Job and attempt states, and why an attempt ended.

Stored in SQLite by value; every comparison in the code goes through these enums, never raw strings.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    LAUNCHING = "launching"
    RUNNING = "running"
    PREEMPTED = "preempted"  # briefly, between a lost attempt and the job going back to queued
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    STOPPED_BUDGET = "stopped_budget"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_JOB_STATES


TERMINAL_JOB_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.STOPPED_BUDGET}
)
ACTIVE_JOB_STATES = frozenset({JobState.LAUNCHING, JobState.RUNNING, JobState.PREEMPTED})


class AttemptState(StrEnum):
    LAUNCHING = "launching"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PREEMPTED = "preempted"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self not in (AttemptState.LAUNCHING, AttemptState.RUNNING)


LIVE_ATTEMPT_STATES = frozenset({AttemptState.LAUNCHING, AttemptState.RUNNING})
