"""What attempts cost, as the providers bill it, and the caps that bound it (for the daemon and the CLI).

- **From launch**: an attempt accrues from the moment the daemon asked for the capacity
  (``created_at``): providers bill the start-up on every attempt.
- **To the last sign of life**: an attempt that ends while the daemon watches it is billed to now
  (its machine was there until the daemon let it go). One found dead (the daemon was down, the node
  vanished) is billed to its last sign of life: the last poll that saw it, or its payload's
  heartbeat in the store, plus one tick of slack. A dead daemon bills nothing for payloads that
  died with it.
- **Caps**: the job's ``policy.max_usd``, its sweep's ``budget_usd`` and the monthly budget, each
  with what is recorded, what live attempts have accrued and what they are still expected to spend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from orchestrator.budget import Cap, month_start, next_month_start, usd
from orchestrator.store import AttemptRow, JobRow


def accrued(att: AttemptRow, now: float) -> float:
    """What a live attempt has cost so far: its rate from launch to now."""
    return att.usd_per_hour * max(0.0, now - att.billing_start) / 3600.0


def last_sign_of_life(att: AttemptRow, heartbeat: float | None) -> float:
    return max(att.billing_start, att.last_seen_at or 0.0, heartbeat or 0.0)


def billed_until(att: AttemptRow, now: float, heartbeat: float | None, *, watched: bool, slack_s: float,
                 provider_end: float | None = None) -> float:
    """When an ending attempt stops costing money. ``provider_end``: when the provider says it
    stopped billing (a reclaim's time, a destroy's confirmation): that, exactly. ``watched``: the
    daemon saw the end happen (it destroyed the machine just now, or the machine is still there)."""
    if provider_end is not None:
        return max(att.billing_start, min(now, provider_end))
    if watched:
        return now
    return min(now, last_sign_of_life(att, heartbeat) + slack_s)


def spend(att: AttemptRow, until: float) -> float:
    return att.usd_per_hour * max(0.0, until - att.billing_start) / 3600.0


class Caps:
    """Builds the caps that apply to a job, from the store, for one moment ``now``.

    ``committed(att)``: what a live attempt was expected to cost when launched (its launch record).
    """

    def __init__(self, store, monthly_limit: float | None, committed: Callable[[AttemptRow], float]):
        self.store = store
        self.monthly_limit = monthly_limit
        self.committed = committed

    def _held(self, live: Iterable[AttemptRow], now: float) -> tuple[float, float]:
        running = committed = 0.0
        for a in live:
            got = accrued(a, now)
            running += got
            committed += max(0.0, self.committed(a) - got)
        return running, committed

    def monthly(self, now: float, live: list[AttemptRow]) -> Cap | None:
        if self.monthly_limit is None:
            return None
        running, committed = self._held(live, now)
        return Cap("monthly budget", self.monthly_limit, self.store.spend_since(month_start(now)),
                   running, committed, resets_at=next_month_start(now))

    def sweep(self, sweep_id: str, now: float, live: list[AttemptRow], sweep_of: Callable[[str], str | None]) -> Cap:
        sweep = self.store.get_sweep(sweep_id)
        mine = [a for a in live if sweep_of(a.job_id) == sweep_id]
        running, committed = self._held(mine, now)
        return Cap(f"sweep {sweep_id} budget_usd", sweep["budget_usd"], self.store.sweep_spend(sweep_id),
                   running, committed)

    def for_launch(self, job: JobRow, now: float, live: list[AttemptRow],
                   sweep_of: Callable[[str], str | None]) -> list[Cap]:
        """The caps a new attempt of ``job`` must fit under (the job's own cap is checked by rank)."""
        caps = [c for c in (self.monthly(now, live),) if c is not None]
        if job.sweep_id:
            caps.append(self.sweep(job.sweep_id, now, live, sweep_of))
        return caps


def stop_reason(job: JobRow, att: AttemptRow, now: float, horizon_s: float, live: list[AttemptRow],
                caps: Caps, sweep_of: Callable[[str], str | None]) -> str | None:
    """Why this live attempt must be told to stop now so that recorded spend stays under every cap:
    running on for ``horizon_s`` (until the daemon can act again and the attempt has stopped) would
    cross it. None: it may run on."""
    from orchestrator.budget import must_stop

    if att.usd_per_hour <= 0:
        return None
    max_usd = (job.spec.get("policy") or {}).get("max_usd")
    if max_usd is not None:
        cap = Cap(f"job {job.id} policy.max_usd", max_usd, job.cost_usd, accrued(att, now))
        if must_stop(cap, att.usd_per_hour, horizon_s):
            return f"{usd(cap.spent_usd + cap.running_usd)} of its {usd(max_usd)} cap spent"
    if job.sweep_id:
        mine = [a for a in live if sweep_of(a.job_id) == job.sweep_id]
        cap = caps.sweep(job.sweep_id, now, live, sweep_of)
        if must_stop(Cap(cap.scope, cap.limit_usd, cap.spent_usd, cap.running_usd),
                     sum(a.usd_per_hour for a in mine), horizon_s):
            return f"the sweep's {usd(cap.limit_usd)} budget would be crossed"
    monthly = caps.monthly(now, live)
    if monthly is not None and must_stop(Cap(monthly.scope, monthly.limit_usd, monthly.spent_usd, monthly.running_usd),
                                         sum(a.usd_per_hour for a in live), horizon_s):
        return f"the monthly budget {usd(monthly.limit_usd)} would be crossed"
    return None


def run_until(job: JobRow, att: AttemptRow, now: float, horizon_s: float, live: list[AttemptRow],
              caps: Caps, sweep_of: Callable[[str], str | None]) -> float | None:
    """The payload's budget lease: the time at which it stops itself even if the daemon is gone.
    Half a horizon after the daemon itself would have told it to stop (so the daemon's own stop,
    with its event, comes first while it runs), leaving the other half to save and exit."""
    if att.usd_per_hour <= 0:
        return None
    ends: list[float] = []

    def until(cap: Cap, rate: float) -> None:
        if rate > 0:
            left = cap.limit_usd - cap.spent_usd - cap.running_usd
            ends.append(now + left / rate * 3600.0 - horizon_s / 2)

    max_usd = (job.spec.get("policy") or {}).get("max_usd")
    if max_usd is not None:
        until(Cap("job", max_usd, job.cost_usd, accrued(att, now)), att.usd_per_hour)
    if job.sweep_id:
        until(caps.sweep(job.sweep_id, now, live, sweep_of),
              sum(a.usd_per_hour for a in live if sweep_of(a.job_id) == job.sweep_id))
    monthly = caps.monthly(now, live)
    if monthly is not None:
        until(monthly, sum(a.usd_per_hour for a in live))
    return min(ends) if ends else None
