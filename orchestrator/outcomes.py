"""Every way an attempt can end, and every error a provider can raise, mapped to one action.

Why one module of tables: the daemon must never decide what an outcome means by reading message
text, and the answer must be the same wherever an attempt ends (a poll, a failed launch, a restart
that finds a dead payload). Two tables:

- ``END_RULES``: an attempt's ``EndReason`` -> the attempt's final state, what happens to the job
  (succeed, requeue, retry within a bound, fail, cancel, stop for budget), which per-job bound it
  counts against, and how long the offer it ran on is avoided (ranked last) or blocked (not used).
- ``ERROR_ACTIONS``: a ``ProviderError`` class -> what the daemon does about the provider and the
  job: try the next offer at once (no capacity), back the provider off (transient), disable it for
  a while (unavailable), or count a launch failure.

``classify_exit`` maps the payload's exit codes (``jobs.exits``) to end reasons; providers map
their raw states to ``RunState`` (and, where they know better, an ``EndReason``) once, in their
own module.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from enum import StrEnum

from jobs import exits
from orchestrator.states import AttemptState, EndReason
from providers.base import (
    LaunchFailed,
    NoCapacity,
    ProviderError,
    ProviderNotConfigured,
    ProviderUnavailable,
    TransientError,
)


class JobAction(StrEnum):
    SUCCEED = "succeed"
    REQUEUE = "requeue"  # place again (from the newest checkpoint); bounded by ``counter`` if it has one
    RETRY = "retry"  # like REQUEUE, but the counter's bound ends the job as failed
    FAIL = "fail"
    CANCEL = "cancel"
    STOP_BUDGET = "stop_budget"


class Counter(StrEnum):
    """The per-job bounds (``infra.config.Config``): each attempt counts against at most one."""

    PREEMPTIONS = "max_preemptions"
    FAILURES = "max_failures"
    LAUNCH_FAILURES = "max_launch_failures"


@dataclass(frozen=True)
class EndRule:
    attempt_state: AttemptState
    action: JobAction
    counter: Counter | None = None
    avoid_s: float = 0.0  # the offer ranks last for this long (it may still be the only one)
    block_s: float = 0.0  # the offer is not used for this long
    job_backoff_s: float = 0.0  # the job is not placed again for this long (doubles per repeat)


END_RULES: dict[EndReason, EndRule] = {
    EndReason.FINISHED: EndRule(AttemptState.SUCCEEDED, JobAction.SUCCEED),
    EndReason.PREEMPTED: EndRule(AttemptState.PREEMPTED, JobAction.REQUEUE, Counter.PREEMPTIONS, avoid_s=60),
    EndReason.LOST: EndRule(AttemptState.PREEMPTED, JobAction.REQUEUE, Counter.PREEMPTIONS, avoid_s=60),
    EndReason.STORE_UNAVAILABLE: EndRule(AttemptState.PREEMPTED, JobAction.REQUEUE, Counter.PREEMPTIONS,
                                         job_backoff_s=30),
    EndReason.PAYLOAD_FAILED: EndRule(AttemptState.FAILED, JobAction.RETRY, Counter.FAILURES, avoid_s=60,
                                      job_backoff_s=5),
    EndReason.BAD_INPUT: EndRule(AttemptState.FAILED, JobAction.FAIL),
    EndReason.SETUP_FAILED: EndRule(AttemptState.FAILED, JobAction.RETRY, Counter.LAUNCH_FAILURES, block_s=300),
    EndReason.LAUNCH_FAILED: EndRule(AttemptState.FAILED, JobAction.RETRY, Counter.LAUNCH_FAILURES, block_s=300),
    EndReason.TIMED_OUT: EndRule(AttemptState.FAILED, JobAction.RETRY, Counter.LAUNCH_FAILURES, block_s=300),
    EndReason.NO_CAPACITY: EndRule(AttemptState.FAILED, JobAction.REQUEUE, block_s=120),
    EndReason.PROVIDER_ERROR: EndRule(AttemptState.FAILED, JobAction.REQUEUE),
    EndReason.BUDGET_STOP: EndRule(AttemptState.CANCELLED, JobAction.STOP_BUDGET),
    EndReason.CANCELLED: EndRule(AttemptState.CANCELLED, JobAction.CANCEL),
    # a payload this daemon still watched found the lease taken (two daemons, or a relaunch raced
    # it): it wrote nothing, so the job is placed again; nothing of the job's is charged for it
    EndReason.FENCED: EndRule(AttemptState.FAILED, JobAction.REQUEUE),
}
assert set(END_RULES) == set(EndReason), "every end reason needs a rule"


class ErrorAction(StrEnum):
    NEXT_OFFER = "next_offer"  # place again at once on the next offer; the failed one is blocked a while
    BACKOFF_PROVIDER = "backoff_provider"  # ask this provider nothing for retry_after_s (or exponential)
    DISABLE_PROVIDER = "disable_provider"  # unreachable or refusing us: off for a while, said in `providers`
    COUNT_LAUNCH_FAILURE = "count_launch_failure"  # against max_launch_failures, then the job fails


ERROR_ACTIONS: dict[type[ProviderError], tuple[ErrorAction, EndReason]] = {
    NoCapacity: (ErrorAction.NEXT_OFFER, EndReason.NO_CAPACITY),
    TransientError: (ErrorAction.BACKOFF_PROVIDER, EndReason.PROVIDER_ERROR),
    ProviderUnavailable: (ErrorAction.DISABLE_PROVIDER, EndReason.PROVIDER_ERROR),  # ...as an outage
    ProviderNotConfigured: (ErrorAction.DISABLE_PROVIDER, EndReason.PROVIDER_ERROR),  # ...until configured
    LaunchFailed: (ErrorAction.COUNT_LAUNCH_FAILURE, EndReason.LAUNCH_FAILED),
}


def error_action(exc: BaseException) -> tuple[ErrorAction, EndReason]:
    """The action for an exception raised by a provider call. Anything that is not a
    ``ProviderError`` (a bug in a provider, a call past its deadline) counts as a launch failure:
    retrying it blindly could loop forever, and the count bounds it."""
    for cls in type(exc).__mro__:
        if cls in ERROR_ACTIONS:
            return ERROR_ACTIONS[cls]
    return ErrorAction.COUNT_LAUNCH_FAILURE, EndReason.LAUNCH_FAILED


_SIGNALS = {-signal.SIGKILL: "SIGKILL", -signal.SIGTERM: "SIGTERM", 137: "SIGKILL", 143: "SIGTERM"}
_EXITS: dict[int, tuple[EndReason, str]] = {
    exits.EXIT_OK: (EndReason.FINISHED, "payload finished"),
    exits.EXIT_PREEMPTED: (EndReason.PREEMPTED, "payload saved a checkpoint and exited after SIGTERM"),
    exits.EXIT_STOPPED: (EndReason.BUDGET_STOP, "payload saved a checkpoint and stopped as told"),
    exits.EXIT_BAD_INPUT: (EndReason.BAD_INPUT, "payload rejected its input (exit 2)"),
    exits.EXIT_SETUP_FAILED: (EndReason.SETUP_FAILED, "payload could not run on this machine (exit 3)"),
    exits.EXIT_STORE_UNAVAILABLE: (EndReason.STORE_UNAVAILABLE,
                                   "payload could not reach the checkpoint store (exit 69)"),
    exits.EXIT_FENCED: (EndReason.FENCED, "another attempt holds the job's lease; the payload stopped "
                                          "without writing (exit 77)"),
    127: (EndReason.SETUP_FAILED, "the payload could not be started (exit 127)"),
}


def classify_exit(code: int | None) -> tuple[EndReason, str]:
    """A payload exit code -> (end reason, a line saying so). One total function."""
    if code in _SIGNALS:
        return EndReason.PREEMPTED, f"payload killed by {_SIGNALS[code]}"
    if code is None:
        return EndReason.LOST, "the payload ended without an exit code"
    if code in _EXITS:
        return _EXITS[code]
    return EndReason.PAYLOAD_FAILED, f"payload failed with exit code {code}"
