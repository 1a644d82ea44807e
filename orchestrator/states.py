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


class EndReason(StrEnum):
    """Why an attempt ended: one code per cause, stored by value (``attempts.end_code``).

    Every place that ends an attempt names one of these; ``orchestrator.outcomes.END_RULES`` maps
    each to what happens to the attempt and to its job, so no code reads the free-text reason.
    """

    FINISHED = "finished"  # the payload exited 0 with its final adapter committed
    PREEMPTED = "preempted"  # reclaimed (spot, outbid, a drill): resumable from the newest checkpoint
    LOST = "lost"  # capacity vanished without a word (node lost, died with the daemon, unknown too long)
    PAYLOAD_FAILED = "payload_failed"  # the training itself failed (exit 1)
    BAD_INPUT = "bad_input"  # the payload rejected its input (exit 2): retrying cannot help
    SETUP_FAILED = "setup_failed"  # the machine could not run the payload (missing packages, no GPU)
    STORE_UNAVAILABLE = "store_unavailable"  # the checkpoint store could not be reached: not the job's fault
    LAUNCH_FAILED = "launch_failed"  # the provider refused or botched the launch
    NO_CAPACITY = "no_capacity"  # the offer was gone by the time we asked for it
    PROVIDER_ERROR = "provider_error"  # the provider was unreachable or rate-limited while launching
    TIMED_OUT = "timed_out"  # not running within launch_timeout_s
    BUDGET_STOP = "budget_stop"  # stopped (saved first) to keep recorded spend under a cap
    CANCELLED = "cancelled"  # the user cancelled the job
    FENCED = "fenced"  # another attempt holds the job's lease: this one stopped without writing (exit 77)
