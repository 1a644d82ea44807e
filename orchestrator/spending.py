"""What attempts cost, as the providers bill it, and the caps that bound it (for the daemon and the CLI).

- **From launch**: an attempt accrues from the moment the daemon asked for the capacity
  (``created_at``): providers bill the start-up on every attempt.
- **To the last sign of life**: an attempt that ends while the daemon watches it is billed to now
  (its machine was there until the daemon let it go). One found dead (the daemon was down, the node
  vanished) is billed to its last sign of life: the last poll that saw it, or its payload's
  heartbeat in the store, plus one tick of slack. A dead daemon bills nothing for payloads that
  died with it.
- **Caps**: the job's ``policy.max_usd``, its sweep's ``budget_usd``, the monthly budget, and for a
  job with an owner that user's and their team's monthly budgets, each with what is recorded, what
  live attempts have accrued and what they are still expected to spend (``Caps.applying``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from orchestrator.budget import Cap, headroom, month_start, next_month_start, usd
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
    ``applying`` is the one place that says which caps bound a job and what each holds: the launch
    check (``for_launch``), the stop check (``stop_reason``) and the payload's lease (``run_until``)
    all read it, so a cap added there is enforced by all three.
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

    def _cap(self, scope: str, kind: str, limit: float, spent: float, mine: list[AttemptRow], now: float,
             resets_at: float | None = None, hint: str | None = None) -> Cap:
        running, committed = self._held(mine, now)
        return Cap(scope, limit, spent, running, committed, resets_at=resets_at,
                   rate_usd_per_h=sum(a.usd_per_hour for a in mine), kind=kind, hint=hint)

    def monthly(self, now: float, live: list[AttemptRow]) -> Cap | None:
        if self.monthly_limit is None:
            return None
        return self._cap("monthly budget", "monthly", self.monthly_limit, self.store.spend_since(month_start(now)),
                         list(live), now, resets_at=next_month_start(now))

    def sweep(self, sweep_id: str, now: float, live: list[AttemptRow], sweep_of: Callable[[str], str | None]) -> Cap:
        sweep = self.store.get_sweep(sweep_id)
        mine = [a for a in live if sweep_of(a.job_id) == sweep_id]
        return self._cap(f"sweep {sweep_id} budget_usd", "sweep", sweep["budget_usd"],
                         self.store.sweep_spend(sweep_id), mine, now)

    def accounts(self, owner: str | None, now: float, live: list[AttemptRow]) -> list[Cap]:
        """The owner's own monthly cap and their team's (shared by its users), where set; none for a
        job without an owner (the embedded one-person default) or whose owner is gone. Spend is this
        calendar month's (UTC, like the monthly budget), by the ledger rows' owner."""
        if owner is None:
            return []
        from orchestrator.store import UserNotFound

        try:
            user = self.store.get_user(owner)
        except UserNotFound:
            return []
        start, resets = month_start(now), next_month_start(now)
        caps: list[Cap] = []
        if user.monthly_usd is not None:
            caps.append(self._cap(
                f"user {owner}'s monthly budget", "user", user.monthly_usd,
                self.store.spend_by(owner=owner, since=start), [a for a in live if a.owner == owner], now,
                resets_at=resets, hint=f"to raise it: tunefleet admin user set-budget {owner} --monthly-usd N"))
        team_usd = self.store.team_budget(user.team)
        if team_usd is not None:
            members = {u.name for u in self.store.list_users(user.team)}
            caps.append(self._cap(
                f"team {user.team}'s monthly budget", "team", team_usd,
                self.store.spend_by(team=user.team, since=start), [a for a in live if a.owner in members], now,
                resets_at=resets,
                hint=f"to raise it: tunefleet admin team set-budget {user.team} --monthly-usd N"))
        return caps

    def applying(self, job: JobRow, now: float, live: list[AttemptRow], sweep_of: Callable[[str], str | None],
                 *, own: bool = True) -> list[Cap]:
        """Every cap that bounds ``job`` now, each with what is recorded under it, what the live
        attempts it bounds have accrued and are still committed to, and their hourly rate: the
        job's ``policy.max_usd`` (``own``), its sweep's ``budget_usd``, the monthly budget, and its
        owner's and its owner's team's monthly budgets."""
        caps: list[Cap] = []
        max_usd = (job.spec.get("policy") or {}).get("max_usd")
        if own and max_usd is not None:
            caps.append(self._cap(f"job {job.id} policy.max_usd", "job", max_usd, job.cost_usd,
                                  [a for a in live if a.job_id == job.id], now))
        if job.sweep_id:
            caps.append(self.sweep(job.sweep_id, now, live, sweep_of))
        monthly = self.monthly(now, live)
        if monthly is not None:
            caps.append(monthly)
        caps += self.accounts(job.owner, now, live)
        return caps

    def for_launch(self, job: JobRow, now: float, live: list[AttemptRow],
                   sweep_of: Callable[[str], str | None]) -> list[Cap]:
        """The caps a new attempt of ``job`` must fit under (the job's own cap is checked by rank)."""
        return self.applying(job, now, live, sweep_of, own=False)

    def headroom(self, job: JobRow, now: float, live: list[AttemptRow],
                 sweep_of: Callable[[str], str | None]) -> tuple[float, Cap | None]:
        """What ``job`` may still spend: the least headroom over every cap that applies to it."""
        return headroom(self.applying(job, now, live, sweep_of))


def _with(live: list[AttemptRow], att: AttemptRow) -> list[AttemptRow]:
    return live if any(a.id == att.id for a in live) else [*live, att]


def _crossing(cap: Cap) -> str:
    """Why an attempt is stopped for this cap (the text of its ``budget_stop`` event)."""
    if cap.kind == "job":
        return f"{usd(cap.spent_usd + cap.running_usd)} of its {usd(cap.limit_usd)} cap spent"
    if cap.kind == "sweep":
        return f"the sweep's {usd(cap.limit_usd)} budget would be crossed"
    if cap.kind == "monthly":
        return f"the monthly budget {usd(cap.limit_usd)} would be crossed"
    return (f"{cap.scope} {usd(cap.limit_usd)} would be crossed "
            f"({usd(cap.spent_usd + cap.running_usd)} this month)")


def stop_reason(job: JobRow, att: AttemptRow, now: float, horizon_s: float, live: list[AttemptRow],
                caps: Caps, sweep_of: Callable[[str], str | None]) -> str | None:
    """Why this live attempt must be told to stop now so that recorded spend stays under every cap:
    running on for ``horizon_s`` (until the daemon can act again and the attempt has stopped), with
    every live attempt under that cap, would cross it. None: it may run on."""
    from orchestrator.budget import must_stop

    if att.usd_per_hour <= 0:
        return None
    for cap in caps.applying(job, now, _with(live, att), sweep_of):
        if must_stop(cap, cap.rate_usd_per_h, horizon_s):
            return _crossing(cap)
    return None


def run_until(job: JobRow, att: AttemptRow, now: float, horizon_s: float, live: list[AttemptRow],
              caps: Caps, sweep_of: Callable[[str], str | None]) -> float | None:
    """The payload's budget lease: the time at which it stops itself even if the daemon is gone.
    Half a horizon after the daemon itself would have told it to stop (so the daemon's own stop,
    with its event, comes first while it runs), leaving the other half to save and exit."""
    if att.usd_per_hour <= 0:
        return None
    ends = [now + (cap.limit_usd - cap.spent_usd - cap.running_usd) / cap.rate_usd_per_h * 3600.0 - horizon_s / 2
            for cap in caps.applying(job, now, _with(live, att), sweep_of)
            if cap.rate_usd_per_h > 0]
    return min(ends) if ends else None
