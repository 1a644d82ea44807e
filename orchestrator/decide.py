"""One decision function: where, and whether, a queued job runs now.

    decide(job, estimate, offers, caps, usage, now) -> Decision

Pure: no network, no database, no clock of its own. The daemon, ``tunefleet offers`` and the
market simulator all call it, so the same inputs give the same placement everywhere. Every rule
about placing a job lives here; ``orchestrator.scheduler.rank`` prices and orders the offers.

Offers are ranked at their *learned* hazards and launch failure rates where ``usage.market`` has
observed their provider, GPU model or host (``orchestrator.learning``); the advertised hazard stays
in the offer's extra.

The verdicts, each with a reason *code* (``Code``) and a line of text:

- **place** on the best ready offer: viable for the job (``rank``), launchable (not a snapshot
  quote, from a provider this caller can launch on), its provider neither down nor at its
  concurrency limit, the offer not blocked after a failure; and the expected cost fits every cap.
- **late**: no offer can meet the deadline, so run on the best one that ignores only the deadline
  (late beats never).
- **wait**, with ``until`` where there is one: the job's sweep is at ``max_parallel``; capacity that
  fits exists but is busy, blocked or behind a provider that is backing off or did not answer;
  running attempts hold the budget; this month's budget is spent (until the 1st, UTC): the global
  one, or, for a job with an owner, that user's or their team's (an admin's ``tunefleet admin
  user|team set-budget`` lets it be placed at its next look, within ``RECHECK_S``).
- **refuse** (the job fails at once, with the reason and the fix): ``policy.max_usd`` is below the
  expected cost of every offer that could run it; the job is bigger than a whole cap; only price
  quotes fit (no provider that can launch offers such capacity); or nothing known can run it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from orchestrator.budget import Cap, Shortfall, launch_refusal
from orchestrator.learning import MarketModel
from orchestrator.scheduler import OWNED_TOLERANCE, Placement, RejectCode, rank
from providers.base import Offer, PriceSource


class Verdict(StrEnum):
    PLACE = "place"
    LATE = "late"
    WAIT = "wait"
    REFUSE = "refuse"


class Code(StrEnum):
    CHEAPEST = "cheapest"  # place: the lowest expected cost of a completed job
    LATE = "late"  # late: no offer meets the deadline
    SWEEP_FULL = "sweep_full"  # wait: the sweep runs max_parallel trials already
    BUSY = "busy"  # wait: fitting capacity exists; none is free, launchable and unblocked now
    PROVIDERS_DOWN = "providers_down"  # wait: providers that might fit are backing off or did not answer
    NOTHING_OFFERED = "nothing_offered"  # wait: no provider offered anything for this job now
    BUDGET_HELD = "budget_held"  # wait: running attempts hold the budget
    BUDGET_RESET = "budget_reset"  # wait: this month's budget (global, user's, team's) is spent; resets on the 1st (UTC)
    JOB_CAP = "job_cap"  # refuse: policy.max_usd is below every offer that could run it
    BUDGET_CAP = "budget_cap"  # refuse: bigger than a whole sweep or monthly budget
    QUOTE_ONLY = "quote_only"  # refuse: only price quotes fit; nothing launchable does
    NO_OFFER = "no_offer"  # refuse: no known offer can run it
    # the daemon's own reasons to wait, beside decide's
    STORE_UNAVAILABLE = "store_unavailable"  # wait: the job's checkpoint store did not answer
    ERROR = "error"  # wait: something unexpected went wrong placing it (in the daemon's log)


@dataclass(frozen=True)
class JobView:
    """What decide needs to know about a job (plain values: a store row, a simulator's job)."""

    id: str
    spec: dict[str, Any]
    spent_usd: float = 0.0
    done_steps: int = 0
    checkpoint_s: float | None = None  # one checkpoint's measured save + upload (None: estimated)


@dataclass(frozen=True)
class Usage:
    """The state of the world around the job, as the caller knows it."""

    live: Mapping[str, int] = field(default_factory=dict)  # provider -> live attempts
    limits: Mapping[str, int] = field(default_factory=dict)  # provider -> most attempts at once
    # providers backing off after transient errors, or that did not answer: (why, until). Worth waiting for.
    down: Mapping[str, tuple[str, float | None]] = field(default_factory=dict)
    # providers switched off by configuration (no credentials, no catalog, not installed): not
    # worth waiting for; named in a refusal so the user knows what to set up.
    disabled: Mapping[str, str] = field(default_factory=dict)
    launchable: frozenset[str] | None = None  # providers the caller can launch on (None: all)
    avoid: Mapping[tuple[str, str], float] = field(default_factory=dict)  # offer -> until: ranks last
    blocked: Mapping[tuple[str, str], float] = field(default_factory=dict)  # offer -> until: not used
    sweep_full: bool = False
    owned_tolerance: float = OWNED_TOLERANCE
    # what attempts have shown about hazards (orchestrator.learning); None: advertised figures only
    market: MarketModel | None = None
    adaptive_interval: bool = True  # False: every offer checkpoints at the job's own interval


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    code: Code
    text: str
    placement: Placement | None = None  # the offer to launch on (place, late)
    placements: tuple[Placement, ...] = ()  # every offer as ranked (for `tunefleet offers`)
    until: float | None = None  # wait: when to look again for this reason (None: when things change)
    ready: frozenset[tuple[str, str]] = frozenset()  # offers that could be launched on now

    @property
    def launches(self) -> bool:
        return self.verdict in (Verdict.PLACE, Verdict.LATE)

    def to_dict(self) -> dict[str, Any]:
        p = self.placement
        return {"verdict": str(self.verdict), "code": str(self.code), "text": self.text, "until": self.until,
                "provider": p.offer.provider if p else None, "offer_id": p.offer.offer_id if p else None,
                "est_usd": p.est_usd if p else None, "est_hours": p.est_hours if p else None,
                "interval_h": p.interval_h if p else None}


def _key(o: Offer) -> tuple[str, str]:
    return o.provider, o.offer_id


def _hold(o: Offer, usage: Usage, now: float) -> str | None:
    """Why a viable offer cannot be launched on now (None: it can). "quote" means never by this caller."""
    if o.price_source is PriceSource.SNAPSHOT or (usage.launchable is not None and o.provider not in usage.launchable):
        return "quote"
    if o.provider in usage.down:
        return "down"
    limit = usage.limits.get(o.provider)
    if limit is not None and usage.live.get(o.provider, 0) >= limit:
        return "full"
    if usage.blocked.get(_key(o), 0.0) > now:
        return "blocked"
    return None


def _rank(job: JobView, estimate: Any, offers: list[Offer], usage: Usage, now: float,
          spec: dict[str, Any] | None = None) -> list[Placement]:
    avoid = [k for k, until in usage.avoid.items() if until > now]
    return rank(spec or job.spec, estimate, offers, now=now, avoid=avoid, spent_usd=job.spent_usd,
                done_steps=job.done_steps, owned_tolerance=usage.owned_tolerance, checkpoint_s=job.checkpoint_s,
                adaptive_interval=usage.adaptive_interval)


def decide(job: JobView, estimate: Any, offers: Iterable[Offer], caps: list[Cap], usage: Usage,
           now: float) -> Decision:
    """Place, run late, wait or refuse; see the module docstring for every rule."""
    offers = list(offers) if usage.market is None else usage.market.apply(offers)
    placements = _rank(job, estimate, offers, usage, now)
    if usage.sweep_full:
        return Decision(Verdict.WAIT, Code.SWEEP_FULL, "its sweep already runs max_parallel trials",
                        placements=tuple(placements))
    ready = [p for p in placements if p.viable and _hold(p.offer, usage, now) is None]
    ready_keys = frozenset(_key(p.offer) for p in ready)
    if ready:
        return _fund(ready[0], Verdict.PLACE, Code.CHEAPEST, caps, placements, ready_keys)
    judged = placements
    policy = job.spec.get("policy") or {}
    if policy.get("deadline") is not None and any(p.code is RejectCode.DEADLINE for p in placements):
        relaxed = _rank(job, estimate, offers, usage, now, {**job.spec, "policy": {**policy, "deadline": None}})
        late = [p for p in relaxed if p.viable and _hold(p.offer, usage, now) is None]
        if late:
            return _fund(late[0], Verdict.LATE, Code.LATE, caps, placements,
                         frozenset(_key(p.offer) for p in late))
        judged = relaxed
    allowed = policy.get("providers")
    down = {n: v for n, v in usage.down.items() if not allowed or n in allowed}
    return _no_ready_offer(judged, offers, usage, down, now, tuple(placements), allowed)


def _fund(chosen: Placement, verdict: Verdict, code: Code, caps: list[Cap], placements: list[Placement],
          ready: frozenset[tuple[str, str]]) -> Decision:
    """The chosen offer, if its expected cost fits every cap; else why the job waits or is refused."""
    refusal = launch_refusal(caps, chosen.est_usd)
    o = chosen.offer
    if refusal is None:
        where = f"{o.provider}/{o.offer_id}"
        text = (f"on {where}: {chosen.reason}" if verdict is Verdict.PLACE
                else f"no offer can meet the deadline; running late on {where} ({chosen.reason})")
        return Decision(verdict, code, text, chosen, tuple(placements), ready=ready)
    if refusal.kind is Shortfall.HELD:
        return Decision(Verdict.WAIT, Code.BUDGET_HELD, f"budget: {refusal.why}", None, tuple(placements))
    if refusal.kind is Shortfall.RESET:
        return Decision(Verdict.WAIT, Code.BUDGET_RESET,
                        f"budget: {refusal.why}; waiting for it to reset", None, tuple(placements),
                        until=refusal.until)
    return Decision(Verdict.REFUSE, Code.BUDGET_CAP, f"can never fit: {refusal.why}", None, tuple(placements))


def _no_ready_offer(judged: list[Placement], offers: list[Offer], usage: Usage,
                    down: Mapping[str, tuple[str, float | None]], now: float,
                    placements: tuple[Placement, ...], allowed: list[str] | None) -> Decision:
    holds = [(p, _hold(p.offer, usage, now)) for p in judged if p.viable]
    waiting = [(p, why) for p, why in holds if why not in (None, "quote")]
    busy = [p for p in judged if p.code is RejectCode.BUSY]
    if waiting or busy:
        untils = [usage.blocked.get(_key(p.offer), 0.0) for p, why in waiting if why == "blocked"]
        untils += [usage.down[p.offer.provider][1] or 0.0 for p, why in waiting if why == "down"]
        untils = [u for u in untils if u > now]
        parts = [f"{p.offer.provider}/{p.offer.offer_id} {why}" for p, why in waiting[:3]]
        parts += [f"{p.offer.provider}/{p.offer.offer_id} busy" for p in busy[:3]]
        code = Code.PROVIDERS_DOWN if waiting and all(why == "down" for _, why in waiting) and not busy else Code.BUSY
        return Decision(Verdict.WAIT, code, "capacity that fits is not free now: " + "; ".join(parts),
                        placements=placements, until=min(untils) if untils and not busy else None)
    if down:
        why = "; ".join(f"{name}: {reason}" for name, (reason, _) in sorted(down.items()))
        untils = [u for _, u in down.values() if u is not None and u > now]
        return Decision(Verdict.WAIT, Code.PROVIDERS_DOWN, f"no offer fits among those answering; waiting for {why}",
                        placements=placements, until=min(untils) if untils else None)
    if not offers:
        text = "no provider offers capacity for this job now"
        off = [(n, why) for n, why in sorted(usage.disabled.items()) if not allowed or n in allowed]
        relevant = set(allowed or usage.launchable or ())
        if off and relevant and relevant <= {n for n, _ in off}:
            return Decision(Verdict.REFUSE, Code.NO_OFFER, "no provider it may use is set up here: " + "; ".join(
                f"{n} ({why})" for n, why in off), placements=placements)
        if off:
            text += "; disabled here: " + "; ".join(f"{n} ({why})" for n, why in off)
        if allowed and usage.launchable is not None and not set(allowed) & usage.launchable:
            text += (f" (policy.providers: {', '.join(allowed)}; this daemon runs "
                     f"{', '.join(sorted(usage.launchable)) or 'none'})")
        return Decision(Verdict.WAIT, Code.NOTHING_OFFERED, text, placements=placements)
    quotes = [p for p, why in holds if why == "quote"]
    if quotes:
        names = sorted({p.offer.provider for p in quotes})
        return Decision(Verdict.REFUSE, Code.QUOTE_ONLY,
                        f"only price quotes fit ({len(quotes)} from {', '.join(names)}): no provider this daemon "
                        "can launch on offers such capacity; configure that provider's credentials "
                        "(`tunefleet providers` says how) and submit again", placements=placements)
    capped = [p for p in judged if p.code is RejectCode.JOB_CAP and p.est_usd is not None]
    if capped:
        cheapest = min(capped, key=lambda p: p.est_usd or 0.0)
        cap = (cheapest.offer.provider, cheapest.offer.offer_id)
        return Decision(Verdict.REFUSE, Code.JOB_CAP,
                        f"policy.max_usd is below every offer that could run it: the cheapest, {cap[0]}/{cap[1]}, "
                        f"{cheapest.reason}; raise policy.max_usd (tunefleet resume --max-usd, or in the job file)",
                        placements=placements)
    off = [(n, why) for n, why in sorted(usage.disabled.items()) if not allowed or n in allowed]
    note = ("; disabled here: " + "; ".join(f"{n} ({why})" for n, why in off)) if off else ""
    return Decision(Verdict.REFUSE, Code.NO_OFFER, "no known offer can run it: " + _summary(judged) + note,
                    placements=placements)


def _summary(placements: list[Placement], most: int = 4) -> str:
    """One example per rejection code, with how many offers share it: the reasons that matter."""
    by_code: dict[Any, list[Placement]] = {}
    for p in placements:
        by_code.setdefault(p.code, []).append(p)
    parts = []
    for _code, group in sorted(by_code.items(), key=lambda kv: -len(kv[1]))[:most]:
        p = group[0]
        more = f" (and {len(group) - 1} more like it)" if len(group) > 1 else ""
        parts.append(f"{p.offer.provider}/{p.offer.offer_id}: {p.reason}{more}")
    return "; ".join(parts)
