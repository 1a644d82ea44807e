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

and the expected cost is price × (start-up + T). Each checkpoint costs C hours to save and
upload (measured by the payload, ``checkpoint_s``; estimated before), so a segment is τ + C long:
``T = (W / τ) · (1/λ + R) · (e^{λ(τ+C)} − 1)`` (→ W·(1 + C/τ) as λ → 0). A managed API that prices
the whole job (``offer.usd_total``) costs exactly that. Ties break by expected finish time.

The checkpoint interval is chosen per offer: the Young/Daly optimum τ* = √(2·C/λ), at most the
job's own interval (``save_steps``, its hours on that offer: a ceiling) and at least
``MIN_INTERVAL_H``. Each offer is priced at its own τ*, and ``Placement.interval_h`` hands it to
the payload as a time-based interval (``checkpoint.interval_s``) when it is shorter than the
job's.

Re-placement is priced: an interrupted job does not restart on the same offer at the same price
(the machine is gone for a while). For an interruptible offer with a fallback, the next-best
viable offer on another host, the expected cost is what it costs here until the first
interruption or the end, plus, with the probability of an interruption, the remaining share of
the job at the fallback's expected cost and a reload there. So a cheap risky offer whose fallback
is dear is priced as such, and offers that leave somewhere good to go are preferred. Finish
times (the deadline check) still assume restarts in place.

Deadlines get slack: an offer that meets the deadline only if the run goes exactly as expected
(``tight``: not with ``SLACK_TABLE`` = 20 % more time on a GPU whose speed is the published table,
``SLACK_MEASURED`` = 5 % on one measured for this model) ranks after every offer with room to
spare, whatever it costs; it is still used when nothing better is free.

Owned is a tie-break, not a trump: owned hardware is priced at its marginal (power) cost, and it
wins over a rented offer when its expected cost is within ``owned_tolerance`` (default 25 %) of
the rented one, or whenever the job says ``policy.prefer_owned``. An owned CPU that needs 36 hours
does not beat a rented A100 that finishes in 10 minutes for less money.

Every rejection carries a ``RejectCode``. All of them are facts about the job and the offer
(policy, size, price) except ``BUSY``: the capacity exists but is taken now, so the job can wait
for it. ``orchestrator.decide`` reads the codes to tell "wait" from "never".
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from orchestrator.budget import usd
from orchestrator.learning import host_of
from providers.base import Offer, PriceSource

RESTART_OVERHEAD_H = 2 / 60  # reload model + download checkpoint, on top of the offer's start-up
MIN_INTERVAL_H = 5 / 60  # never checkpoint more often than this (storage churn, step granularity)
# How much slower than expected a run may turn out, for the deadline: the published throughput
# table is off by ~15 % per GPU model (training.md), a measured one by a few per cent.
SLACK_TABLE = 0.2
SLACK_MEASURED = 0.05
OWNED_TOLERANCE = 0.25  # owned capacity wins if it costs at most this much more than the best rented


class RejectCode(StrEnum):
    """Why an offer cannot take the job. Only BUSY passes with time; DEADLINE may be waived
    (a late run beats none); the others hold as long as the job and the offer are what they are."""

    PROVIDER_NOT_ALLOWED = "provider_not_allowed"
    DATA_RESTRICTED = "data_restricted"
    SPOT_POLICY = "spot_policy"
    PRICE_CAP = "price_cap"  # policy.max_usd_per_hour
    LOCAL_STORE = "local_store"  # checkpoints in a local folder, offer elsewhere
    CPU_ONLY = "cpu_only"  # the job asks for GPUs and does not say device: cpu
    GPU_COUNT = "gpu_count"
    VRAM = "vram"
    HOST_RAM = "host_ram"
    CPUS = "cpus"
    NEVER_FINISHES = "never_finishes"  # interrupted too often to ever get between two checkpoints
    JOB_CAP = "job_cap"  # policy.max_usd
    DEADLINE = "deadline"
    BUSY = "busy"  # exists, but taken now


@dataclass(slots=True)
class Placement:
    offer: Offer
    viable: bool
    why: str | None  # why rejected; for a viable offer None, and ``reason`` is built on demand
    work_hours: float | None = None  # uninterrupted training time left
    est_hours: float | None = None  # expected wall time: start-up + work + expected rework/restarts
    est_usd: float | None = None  # expected cost of the completed job
    finish_at: float | None = None  # expected finish, epoch seconds
    risk: float = 0.0  # probability of at least one interruption
    avoided: bool = False  # failed or was lost recently: used only when nothing else is viable
    code: RejectCode | None = None  # why rejected (None when viable)
    tight: bool = False  # meets the deadline only if the run goes as expected (no slack for a slow GPU)
    interval_h: float | None = None  # chosen checkpoint interval (hours of training) when shorter than the job's
    fallback: str | None = None  # provider/offer_id the job would likely be re-placed on after a loss
    replace_usd: float = 0.0  # the part of est_usd expected to be spent on the fallback

    @property
    def reason(self) -> str:
        """Why rejected, or what a viable placement's estimate rests on."""
        if self.why is not None:
            return self.why
        if self.work_hours is None or self.est_hours is None:
            text = f"{usd(self.offer.usd_per_hour)}/h (no estimate)"
        else:
            text = f"{self.work_hours:.2f} h of work"
            startup_h = self.offer.startup_s / 3600.0
            rework = self.est_hours - startup_h - self.work_hours
            if self.offer.hazard_per_hour > 0:
                text += f", +{rework:.2f} h expected rework/restarts (risk {self.risk:.0%})"
                if self.interval_h is not None:
                    text += f", checkpoint every {self.interval_h * 60:.0f} min"
                if self.fallback is not None:
                    text += f", {usd(self.replace_usd)} expected on {self.fallback} if lost"
        if self.tight:
            text += "; meets the deadline only if nothing runs slow"
        return text + ("; recently lost, last resort" if self.avoided else "")

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
            "hazard_advertised": o.detail("hazard_advertised", o.hazard_per_hour),
            "hazard_observations": o.detail("hazard_observations", 0),
            "tight": self.tight,
            "interval_h": _round(self.interval_h),
            "fallback": self.fallback,
            "replace_usd": round(self.replace_usd, 4),
            "viable": self.viable,
            "reason": self.reason,
            "code": None if self.code is None else str(self.code),
            "price_source": str(o.price_source),
            "price_date": o.price_date,
            "provenance": o.provenance,
        }


def _round(x: float | None, n: int = 4) -> float | None:
    return None if x is None else round(x, n)


def expected_wall_hours(work_h: float, hazard: float, interval_h: float, restart_h: float,
                        write_h: float = 0.0) -> float:
    """Expected time to finish ``work_h`` hours of work under Poisson interruptions, checkpointing
    every ``interval_h`` hours of work at ``write_h`` hours a checkpoint (see module doc)."""
    if work_h <= 0:
        return 0.0
    tau = work_h if interval_h >= work_h else (interval_h if interval_h > 1e-6 else 1e-6)
    if hazard <= 0:
        return work_h * (1.0 + write_h / tau)
    x = hazard * (tau + write_h)
    if x > 50:  # would never finish
        return math.inf
    if x < 1e-6:  # series expansion: 1/λ · expm1(λτ) underflows to inf · 0 for tiny λ
        return (work_h / tau) * (tau + write_h) * (1.0 + x / 2) * (1.0 + hazard * restart_h)
    return (work_h / tau) * (1.0 / hazard + restart_h) * math.expm1(x)


def young_daly(hazard: float, write_h: float, ceiling_h: float, floor_h: float = MIN_INTERVAL_H) -> float:
    """The checkpoint interval (hours of work) that minimises expected wall time: τ* ≈ √(2·C/λ)
    (Young 1974, Daly 2006), within [floor_h, ceiling_h] (the ceiling wins if they cross)."""
    if hazard <= 0 or write_h <= 0:
        return ceiling_h
    return min(ceiling_h, max(floor_h, math.sqrt(2.0 * write_h / hazard)))


def _deadline(policy: dict[str, Any]) -> float | None:
    d = policy.get("deadline")
    if d is None:
        return None
    if isinstance(d, (int, float)):
        return float(d)
    return datetime.fromisoformat(str(d).replace("Z", "+00:00")).timestamp()


class _Policy:
    """The job's constraints, read once per ``rank`` call (it runs for every offer)."""

    def __init__(self, spec: dict[str, Any], vram_needed: float | None):
        policy = spec.get("policy") or {}
        resources = spec.get("resources") or {}
        self.allowed = frozenset(policy.get("providers") or ())
        self.allowed_text = ", ".join(policy.get("providers") or ())
        self.restricted = policy.get("data") == "restricted"
        self.spot = policy.get("spot", "allow")
        self.cap = policy.get("max_usd_per_hour")
        self.prefer_owned = bool(policy.get("prefer_owned"))
        self.gpus = int(resources.get("gpus", 1))
        self.cpus = int(resources.get("cpus", 1) or 1)
        self.device = resources.get("device", "auto")
        want = resources.get("gpu_vram_gb", "auto")
        store = str((spec.get("checkpoint") or {}).get("store") or "file://")
        # A remote machine cannot read or write this host's folder: it needs object storage.
        self.store_local = store.startswith("file:") or "://" not in store
        self.explicit_vram = isinstance(want, (int, float))
        self.memory_needed = vram_needed or 0.0  # on a CPU, the whole job lives in host memory
        self.vram_floor = float(want) if self.explicit_vram else (vram_needed or 0.0)
        # a job that asks for GPUs runs on a CPU only when it says so
        self.cpu_ok = self.gpus == 0 or self.device == "cpu"

    def rejection(self, offer: Offer) -> tuple[RejectCode, str] | None:
        if self.allowed and offer.provider not in self.allowed:
            return RejectCode.PROVIDER_NOT_ALLOWED, (
                f"provider {offer.provider} is not in policy.providers ({self.allowed_text})")
        if self.restricted and not offer.on_premises:
            return RejectCode.DATA_RESTRICTED, "policy.data is restricted and this offer is off premises"
        if self.spot == "never" and offer.interruptible:
            return RejectCode.SPOT_POLICY, "interruptible offer, and policy.spot is never"
        if self.spot == "only" and not offer.interruptible:
            return RejectCode.SPOT_POLICY, "on-demand offer, and policy.spot is only"
        if self.cap is not None and offer.usd_per_hour > self.cap:
            return RejectCode.PRICE_CAP, (
                f"{usd(offer.usd_per_hour)}/h is over policy.max_usd_per_hour {usd(self.cap)}")
        if offer.gpu == "managed":
            return None  # a managed API sizes its own hardware and keeps its own checkpoints
        if self.store_local and not offer.on_premises:
            return RejectCode.LOCAL_STORE, (
                "the job's checkpoints and inputs are in a local folder (file:// store) that a rented machine "
                "cannot reach; remote capacity needs checkpoint.store: s3://bucket/prefix")
        if offer.cpus and self.cpus > offer.cpus:
            return RejectCode.CPUS, f"needs {self.cpus} CPUs (resources.cpus), has {offer.cpus}"
        if offer.gpu_count == 0:
            if not self.cpu_ok:
                return RejectCode.CPU_ONLY, (
                    f"the job asks for {self.gpus} GPU(s); this offer is CPU only (say device: cpu to allow it)")
            if offer.ram_gb and self.memory_needed > offer.ram_gb:
                return RejectCode.HOST_RAM, (
                    f"needs {self.memory_needed:.0f} GB of memory, has {offer.ram_gb:.0f} GB")
        else:
            if offer.gpu_count < self.gpus:
                return RejectCode.GPU_COUNT, f"the job needs {self.gpus} GPUs; this offer has {offer.gpu_count}"
            if offer.vram_gb and offer.vram_gb < self.vram_floor:
                what = "resources.gpu_vram_gb" if self.explicit_vram else "the estimated need"
                return RejectCode.VRAM, (
                    f"needs {self.vram_floor:.1f} GB per GPU ({what}), has {offer.vram_gb:g} GB")
        if not offer.available:
            return RejectCode.BUSY, "taken now (busy); it frees up when its current work ends"
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
    owned_tolerance: float = OWNED_TOLERANCE,
    checkpoint_s: float | None = None,
    adaptive_interval: bool = True,
    price_replacement: bool = True,
) -> list[Placement]:
    """Every offer, viable ones first, by expected cost of the completed job. Never calls the network.

    ``estimate`` is a ``jobs.estimate.Estimate`` (or None: then offers are ranked by hourly price
    and only policy is checked). ``done_steps`` of work already committed are not paid again;
    ``spent_usd`` already spent counts against ``policy.max_usd``. Owned offers rank as if they
    cost ``1 / (1 + owned_tolerance)`` of their expected cost (``policy.prefer_owned``: first).
    ``checkpoint_s``: one checkpoint's measured save + upload seconds (None: estimated from the
    checkpoint's size). ``adaptive_interval=False`` keeps the job's own interval on every offer;
    ``price_replacement=False`` prices every restart in place (both as tunefleet did before).
    """
    policy = spec.get("policy") or {}
    deadline = _deadline(policy)
    max_usd = policy.get("max_usd")
    avoid_set = frozenset(avoid)
    steps = getattr(estimate, "steps", 0) or 0
    left = max(0.0, 1.0 - done_steps / steps) if steps else 1.0
    save_every = (spec.get("checkpoint") or {}).get("interval") or spec.get("save_steps") or 50
    ckpt_frac = min(1.0, save_every / steps) if steps else 1.0  # checkpoint interval, as a fraction of the job
    own_s = (spec.get("checkpoint") or {}).get("interval_s")  # the job's own time-based interval, if any
    own_h = float(own_s) / 3600.0 if own_s else math.inf
    checker = _Policy(spec, getattr(estimate, "vram_gb", None))
    owned_discount = 1.0 / (1.0 + max(0.0, owned_tolerance))
    prefer_owned = checker.prefer_owned
    hours_cache: dict[tuple[str, int], float | None] = {}
    if checkpoint_s is None and hasattr(estimate, "checkpoint_s"):
        checkpoint_s = estimate.checkpoint_s()
    write_h = max(0.0, checkpoint_s or 0.0) / 3600.0

    def hours(gpu: str, count: int) -> float | None:
        key = (gpu, count)
        if key not in hours_cache:
            hours_cache[key] = estimate.hours(gpu, count)
        return hours_cache[key]

    viable: list[Placement] = []
    rejected: list[tuple[Any, ...]] = []
    allowed, restricted, cap, floor = checker.allowed, checker.restricted, checker.cap, checker.vram_floor
    spot_never, spot_only, gpus_needed = checker.spot == "never", checker.spot == "only", checker.gpus
    store_local, cpus_needed = checker.store_local, checker.cpus
    for i, offer in enumerate(offers):
        # fast path for the common case; the checker says why (the one place messages live)
        if (
            (allowed and offer.provider not in allowed)
            or (restricted and not offer.on_premises)
            or (spot_never and offer.interruptible)
            or (spot_only and not offer.interruptible)
            or (cap is not None and offer.usd_per_hour > cap)
            or (store_local and not offer.on_premises)
            or offer.gpu_count < gpus_needed
            or (offer.vram_gb and offer.vram_gb < floor)
            or not offer.gpu_count
            or not offer.available
            or (offer.cpus and offer.cpus < cpus_needed)
        ):
            found = checker.rejection(offer)
            if found is not None:
                code, reason = found
                rejected.append((offer.provider, offer.offer_id, i, Placement(offer, False, reason, code=code)))
                continue
        p = _place(offer, estimate, hours, now, left, ckpt_frac, deadline, max_usd,
                   spent_usd, bool(avoid_set) and (offer.provider, offer.offer_id) in avoid_set,
                   write_h, adaptive_interval, own_h)
        if p.viable:
            viable.append(p)
        else:
            rejected.append((offer.provider, offer.offer_id, i, p))
    if price_replacement and len(viable) > 1:
        _price_replacement(viable)
    keyed = []
    for i, p in enumerate(viable):  # a flat tuple sorts at C speed: not recently lost; a checked price;
        # slack for the deadline; owned by policy; cost; finish; $/h; ids (a placeholder price never
        # ranks above a checked one)
        offer = p.offer
        cost = math.inf if p.est_usd is None else p.est_usd * (owned_discount if offer.owned else 1.0)
        keyed.append((p.avoided, offer.placeholder, p.tight, prefer_owned and not offer.owned, cost,
                      math.inf if p.finish_at is None else p.finish_at, offer.usd_per_hour,
                      offer.provider, offer.offer_id, i, p))
    keyed.sort()
    rejected.sort()
    return [t[-1] for t in keyed] + [t[-1] for t in rejected]


def _place(offer, estimate, hours, now, left, ckpt_frac, deadline, max_usd, spent_usd, avoided,
           write_h=0.0, adaptive=True, own_h=math.inf) -> Placement:
    """One viable-by-policy offer: expected hours, cost, finish and risk (the hot loop of ``rank``)."""
    if estimate is None:
        return Placement(offer, True, None, avoided=avoided)
    full_h = offer.hours
    if full_h is None:
        full_h = hours(offer.gpu, offer.gpu_count or 1)
        if full_h is None:  # still usable; ranked after every offer whose cost can be estimated
            return Placement(offer, True, f"no throughput figure for GPU model {offer.gpu!r}; "
                             f"{usd(offer.usd_per_hour)}/h", avoided=avoided)
    work_h = full_h * left
    startup_h = offer.startup_s / 3600.0
    hazard = offer.hazard_per_hour
    ceiling_h = min(full_h * ckpt_frac, own_h)
    interval_h = None
    if offer.usd_total is not None:  # a managed API keeps its own checkpoints
        wall_h, risk = work_h, 0.0
    elif hazard > 0:
        tau = young_daly(hazard, write_h, ceiling_h) if adaptive else ceiling_h
        if tau < ceiling_h * 0.99:
            interval_h = tau
        wall_h = expected_wall_hours(work_h, hazard, tau, startup_h + RESTART_OVERHEAD_H, write_h)
        if wall_h == math.inf:
            return Placement(offer, False, "interrupted too often to ever finish between checkpoints", work_h,
                             code=RejectCode.NEVER_FINISHES)
        risk = 1.0 - math.exp(-hazard * wall_h)
    else:
        wall_h, risk = expected_wall_hours(work_h, 0.0, ceiling_h, 0.0, write_h), 0.0
    est_h = startup_h + wall_h
    fail = offer.detail("launch_fail_p", 0.0) if offer.extra else 0.0  # learned (orchestrator.learning)
    if fail > 0:  # expected failed launches before one runs, each a billed start-up
        est_h += startup_h * fail / (1.0 - fail)
    est_usd = offer.usd_per_hour * est_h if offer.usd_total is None else offer.usd_total * left
    finish = now + est_h * 3600.0
    if max_usd is not None and spent_usd + est_usd > max_usd:
        spent = f" + {usd(spent_usd)} spent" if spent_usd else ""
        why = f"expected {usd(est_usd)}{spent} is over policy.max_usd {usd(max_usd)}"
        return Placement(offer, False, why, work_h, est_h, est_usd, finish, risk, avoided, RejectCode.JOB_CAP)
    if deadline is not None and finish > deadline:
        why = f"expected to finish {(finish - deadline) / 3600.0:.1f} h after the deadline"
        return Placement(offer, False, why, work_h, est_h, est_usd, finish, risk, avoided, RejectCode.DEADLINE)
    tight = False
    if deadline is not None and offer.usd_total is None:
        measured = offer.gpu in (getattr(estimate, "calibrated", None) or {})
        tight = finish + wall_h * (SLACK_MEASURED if measured else SLACK_TABLE) * 3600.0 > deadline
    return Placement(offer, True, None, work_h, est_h, est_usd, finish, risk, avoided, tight=tight,
                     interval_h=interval_h)


def _host(offer: Offer) -> str:
    return f"{offer.provider}/{host_of(offer) or offer.offer_id}"


def _price_replacement(viable: list[Placement]) -> None:
    """Add to each interruptible placement the premium of its likely re-placement: with the chance
    of an interruption before the end, the share of the job still to do then costs what the
    fallback (the cheapest other viable offer on another host) costs instead of this offer's price.
    A premium, never a discount: a fallback cheaper than here changes nothing (it would be chosen
    first). It grows with the hazard and shrinks as this offer's price rises, so a worse hazard or
    price never makes an offer cheaper."""
    cands = heapq.nsmallest(3, ((p.est_usd, p.offer.provider, p.offer.offer_id, k) for k, p in enumerate(viable)
                                if p.est_usd is not None and p.work_hours and not p.avoided
                                and p.offer.price_source is not PriceSource.SNAPSHOT))
    if len(cands) < 2:
        return
    best = [(viable[c[3]], c[0]) for c in cands]  # with their own cost, before any premium
    dearest = cands[-1][0]  # a fallback costs at most this: offers dearer than it pay no premium
    for p in viable:
        o = p.offer
        if o.hazard_per_hour <= 0 or p.est_usd is None or not p.work_hours or o.usd_total is not None:
            continue
        lam, startup_h, work_h = o.hazard_per_hour, o.startup_s / 3600.0, p.work_hours
        here_usd = o.usd_per_hour * (startup_h + work_h)  # the rest of the job here, uninterrupted
        if dearest <= here_usd:
            continue
        host = _host(o)
        fb, fb_usd = next(((q, c) for q, c in best if q is not p and _host(q.offer) != host), (None, 0.0))
        if fb is None or fb_usd <= here_usd:
            continue
        run_h = startup_h + work_h
        x = lam * run_h
        if x < 1e-9:
            continue
        hit = -math.expm1(-x)  # P(an interruption before the end)
        at_hit = 1.0 / lam - run_h * math.exp(-x) / hit  # E[when | before the end]
        rest = min(1.0, max(0.0, 1.0 - max(0.0, at_hit - startup_h) / work_h))
        p.replace_usd = hit * rest * (fb_usd - here_usd)
        p.est_usd += p.replace_usd
        p.fallback = f"{fb.offer.provider}/{fb.offer.offer_id}"
