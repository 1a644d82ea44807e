"""Placement: a pure function from a job, its estimate and offers to ranked placements with reasons.

Why pure: the daemon, ``tunefleet offers`` and the market simulator must get the same answer from
the same inputs, and tests must check it without a network or a database. It never trusts the
order it is given: it sorts explicitly, with a fixed tie-break.

What it ranks by: the expected cost of a *completed* job, not the hourly price. An interruptible
offer is cheap per hour, but each interruption throws away the work since the last checkpoint and
pays a restart. With interruptions arriving as a Poisson process of rate λ per hour, checkpoints
every τ hours of work and a restart overhead R hours, the expected wall time to finish W hours of
work is the classic checkpoint/restart result

    T = (W / τ) · (1/λ + R) · (e^{λτ} − 1)      (→ W as λ → 0)

and the expected cost is price × (start-up + T). A managed API that prices the whole job
(``offer.usd_total``) costs exactly that. Ties break by expected finish time.

Owned, idle hardware is already paid for: when it meets the deadline and the budget it ranks
first, whatever a rented GPU would cost (its price is its marginal power cost anyway).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from providers.base import Offer

RESTART_OVERHEAD_H = 2 / 60  # reload model + download checkpoint, on top of the offer's start-up


@dataclass(frozen=True)
class Placement:
    offer: Offer
    viable: bool
    reason: str  # why rejected, or what the estimate rests on
    work_hours: float | None = None  # uninterrupted training time left
    est_hours: float | None = None  # expected wall time: start-up + work + expected rework/restarts
    est_usd: float | None = None  # expected cost of the completed job
    finish_at: float | None = None  # expected finish, epoch seconds
    risk: float = 0.0  # probability of at least one interruption
    avoided: bool = False  # failed or was lost recently: used only when nothing else is viable

    @property
    def sort_key(self) -> tuple[Any, ...]:
        o = self.offer
        return (
            not self.viable,
            self.avoided,
            not o.owned,
            self.est_usd if self.est_usd is not None else math.inf,
            self.finish_at if self.finish_at is not None else math.inf,
            o.usd_per_hour,
            o.provider,
            o.offer_id,
        )

    def to_dict(self) -> dict[str, Any]:
        o = self.offer
        return {
            "provider": o.provider,
            "offer_id": o.offer_id,
            "gpu": o.gpu,
            "gpu_count": o.gpu_count,
            "vram_gb": o.vram_gb,
            "usd_per_hour": round(o.usd_per_hour, 4),
            "interruptible": o.interruptible,
            "hazard_per_hour": o.hazard_per_hour,
            "region": o.region,
            "on_premises": o.on_premises,
            "owned": o.owned,
            "est_hours": _round(self.est_hours),
            "est_usd": _round(self.est_usd),
            "finish_at": self.finish_at,
            "risk": round(self.risk, 4),
            "viable": self.viable,
            "reason": self.reason,
            "price_source": str(o.price_source),
            "price_date": o.price_date,
        }


def _round(x: float | None, n: int = 4) -> float | None:
    return None if x is None else round(x, n)


def expected_wall_hours(work_h: float, hazard: float, interval_h: float, restart_h: float) -> float:
    """Expected time to finish ``work_h`` hours of work under Poisson interruptions (see module doc)."""
    if work_h <= 0:
        return 0.0
    if hazard <= 0:
        return work_h
    tau = min(max(interval_h, 1e-6), work_h)
    x = hazard * tau
    if x > 50:  # would never finish
        return math.inf
    if x < 1e-6:  # series expansion: 1/λ · expm1(λτ) underflows to inf · 0 for tiny λ
        return work_h * (1.0 + x / 2 + hazard * restart_h * (1.0 + x / 2))
    return (work_h / tau) * (1.0 / hazard + restart_h) * math.expm1(x)


def _deadline(policy: dict[str, Any]) -> float | None:
    d = policy.get("deadline")
    if d is None:
        return None
    if isinstance(d, (int, float)):
        return float(d)
    return datetime.fromisoformat(str(d).replace("Z", "+00:00")).timestamp()


def _policy_rejection(spec: dict[str, Any], offer: Offer, vram_needed: float | None) -> str | None:
    policy = spec.get("policy") or {}
    resources = spec.get("resources") or {}
    allowed = policy.get("providers")
    if allowed and offer.provider not in allowed:
        return f"provider {offer.provider} is not in policy.providers ({', '.join(allowed)})"
    if policy.get("data") == "restricted" and not offer.on_premises:
        return "policy.data is restricted and this offer is off premises"
    spot = policy.get("spot", "allow")
    if spot == "never" and offer.interruptible:
        return "interruptible offer, and policy.spot is never"
    if spot == "only" and not offer.interruptible:
        return "on-demand offer, and policy.spot is only"
    cap = policy.get("max_usd_per_hour")
    if cap is not None and offer.usd_per_hour > cap:
        return f"${offer.usd_per_hour:.2f}/h is over policy.max_usd_per_hour ${cap:.2f}"
    gpus = int(resources.get("gpus", 1))
    device = resources.get("device", "auto")
    if offer.gpu == "managed":
        return None  # a managed API sizes its own hardware
    if offer.gpu_count == 0:
        if gpus > 0 and device == "cuda":
            return f"the job needs {gpus} GPU(s) (device: cuda); this offer is CPU only"
        return None
    if offer.gpu_count < gpus:
        return f"the job needs {gpus} GPUs; this offer has {offer.gpu_count}"
    want = resources.get("gpu_vram_gb", "auto")
    floor = float(want) if isinstance(want, (int, float)) else (vram_needed or 0.0)
    if offer.vram_gb and offer.vram_gb < floor:
        what = "resources.gpu_vram_gb" if isinstance(want, (int, float)) else "the estimated need"
        return f"{offer.vram_gb:g} GB per GPU is under {what} ({floor:.1f} GB)"
    return None


def rank(
    spec: dict[str, Any],
    estimate: Any,
    offers: Iterable[Offer],
    *,
    now: float,
    avoid: Iterable[tuple[str, str]] = (),
    spent_usd: float = 0.0,
    done_steps: int = 0,
) -> list[Placement]:
    """Every offer, viable ones first, by expected cost of the completed job. Never calls the network.

    ``estimate`` is a ``jobs.estimate.Estimate`` (or None: then offers are ranked by hourly price
    and only policy is checked). ``done_steps`` of work already committed are not paid again;
    ``spent_usd`` already spent counts against ``policy.max_usd``.
    """
    policy = spec.get("policy") or {}
    deadline = _deadline(policy)
    max_usd = policy.get("max_usd")
    avoid_set = frozenset(avoid)
    steps = getattr(estimate, "steps", 0) or 0
    left = max(0.0, 1.0 - done_steps / steps) if steps else 1.0
    save_every = (spec.get("checkpoint") or {}).get("interval") or spec.get("save_steps") or 50
    vram_needed = getattr(estimate, "vram_gb", None)

    placements = []
    for offer in offers:
        reason = _policy_rejection(spec, offer, vram_needed)
        if reason is not None:
            placements.append(Placement(offer, False, reason))
            continue
        placements.append(_place(offer, estimate, now, left, steps, save_every, deadline, max_usd,
                                 spent_usd, (offer.provider, offer.offer_id) in avoid_set))
    placements.sort(key=lambda p: p.sort_key)
    return placements


def _place(offer, estimate, now, left, steps, save_every, deadline, max_usd, spent_usd, avoided) -> Placement:
    startup_h = offer.startup_s / 3600.0
    if estimate is None:
        return Placement(offer, True, f"${offer.usd_per_hour:.2f}/h (no estimate)", avoided=avoided)
    if offer.hours is not None:
        work_h = offer.hours * left
    else:
        full_h = estimate.hours(offer.gpu, max(1, offer.gpu_count))
        if full_h is None:  # still usable; ranked after every offer whose cost can be estimated
            return Placement(offer, True, f"no throughput figure for GPU model {offer.gpu!r}; "
                             f"${offer.usd_per_hour:.2f}/h", avoided=avoided)
        work_h = full_h * left
    interval_h = (work_h / (steps * max(left, 1e-9))) * save_every if steps else work_h
    wall_h = expected_wall_hours(work_h, offer.hazard_per_hour, interval_h, startup_h + RESTART_OVERHEAD_H)
    if math.isinf(wall_h):
        return Placement(offer, False, "interrupted too often to ever finish between checkpoints", work_h)
    est_h = startup_h + wall_h
    est_usd = offer.usd_total * left if offer.usd_total is not None else offer.usd_per_hour * est_h
    risk = 1.0 - math.exp(-offer.hazard_per_hour * wall_h)
    finish = now + est_h * 3600.0
    common = dict(work_hours=work_h, est_hours=est_h, est_usd=est_usd, finish_at=finish, risk=risk, avoided=avoided)
    if max_usd is not None and spent_usd + est_usd > max_usd:
        spent = f" + ${spent_usd:.2f} spent" if spent_usd else ""
        return Placement(offer, False, f"expected ${est_usd:.2f}{spent} is over policy.max_usd ${max_usd:.2f}", **common)
    if deadline is not None and finish > deadline:
        late_h = (finish - deadline) / 3600.0
        return Placement(offer, False, f"expected to finish {late_h:.1f} h after the deadline", **common)
    why = f"{work_h:.2f} h of work"
    if offer.hazard_per_hour > 0:
        why += f", +{wall_h - work_h:.2f} h expected rework/restarts (risk {risk:.0%})"
    if avoided:
        why += "; recently lost, last resort"
    return Placement(offer, True, why, **common)
