"""The placement policies compared. Every one sees the same offers at the same moments.

- ``tunefleet``: the daemon's ``orchestrator.decide.decide``, called as the daemon calls it, with
  the job re-estimated from the throughput measured so far (speed learning), the hazards and
  launch failure rates learned from every attempt (``orchestrator.learning``), each placement's
  own checkpoint interval and the job's measured checkpoint cost.
- ``tunefleet_no_learning``: decide with the advertised hazards and the job's own ``save_steps``
  interval, plus speed learning.
- ``cheapest_effective``: what a careful SkyPilot/dstack user gets: the same hard constraints
  (rank's own checks with the deadline taken out), then the lowest price x (start-up + hours at
  the measured-or-tabled throughput) among the offers that meet the deadline uninterrupted; if
  none does, the lowest of all (it runs late). Speed learning as tunefleet's.
- ``cheapest_per_hour``: what SkyPilot's and dstack's optimizers do by default: the same hard
  constraints, then the lowest $/h.
- ``on_demand``: never interruptible: decide with ``policy.spot: never``.
- ``local_only``: queue for the owned GPUs (only owned offers are ranked, no deadline), first
  come first served; a job the owned GPUs cannot hold never runs.
- ``lower_bound``: not a schedule but a provable bound per job (``LowerBound``): no policy pays
  less for a job it completes.

Speed learning is the daemon's: after each attempt the measured tokens/s of that GPU model for
that (base model, adapter method) is recorded; the calibration is the median of the last 20 per
GPU model, per GPU (``orchestrator/store/ledger.py`` ``calibration()``), fed to
``jobs.estimate.estimate(spec, calibration)`` when the job is placed. Each policy keeps its own.
"""

from __future__ import annotations

import copy
import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from jobs.estimate import MULTI_GPU_EFFICIENCY, Estimate, estimate
from jobs.gpus import GPUS
from orchestrator import scheduler
from orchestrator.learning import Exposure, MarketModel
from orchestrator.scheduler import RejectCode
from providers.base import Offer

from .sim import (
    MAX_LAUNCH_FAILURES,
    MAX_PREEMPTIONS,
    Choice,
    JobRun,
    Market,
    Outcome,
    Policy,
    RunResult,
)

CALIBRATION_LAST = 20  # orchestrator/store/ledger.py calibration(): the last 20 runs per GPU model


def _key(o: Offer) -> tuple[str, str]:
    return o.provider, o.offer_id


class SpeedLearning(Policy):
    """Learns throughput as the daemon does: per (base_model, method), per GPU model, the median of
    the last 20 measured tokens/s per GPU (the attempt's tokens/s / its GPU count)."""

    def __init__(self) -> None:
        super().__init__()
        self.measured: dict[tuple[str, str], dict[str, list[float]]] = {}
        self._version: dict[tuple[str, str], int] = {}
        self._job_key: dict[str, tuple[str, str]] = {}
        self._estimates: dict[str, tuple[int, Estimate]] = {}

    @staticmethod
    def model_key(spec: Mapping[str, Any]) -> tuple[str, str]:
        return str(spec["base_model"]), str(spec.get("adapter") or "full")

    def calibration(self, base_model: str, method: str) -> dict[str, float]:
        out = {}
        for gpu, values in (self.measured.get((base_model, method)) or {}).items():
            v = sorted(values)
            mid = len(v) // 2
            out[gpu] = v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2
        return out

    def estimate(self, job: JobRun) -> Estimate:
        jid = job.info.track.id
        key = self._job_key.get(jid)
        if key is None:
            key = self._job_key[jid] = self.model_key(job.info.spec)
        version = self._version.get(key, 0)
        if version == 0:
            return job.info.est
        cached = self._estimates.get(jid)
        if cached is None or cached[0] != version:
            cached = self._estimates[jid] = (version, estimate(job.info.spec, self.calibration(*key)))
        return cached[1]

    def observe(self, outcome: Outcome) -> None:
        key = self._job_key.get(outcome.job)
        if key is None or outcome.tokens_per_s is None or outcome.tokens_per_s <= 0:
            return
        values = self.measured.setdefault(key, {}).setdefault(outcome.offer.gpu, [])
        values.append(outcome.tokens_per_s / max(1, outcome.offer.gpu_count))
        del values[:-CALIBRATION_LAST]
        self._version[key] = self._version.get(key, 0) + 1


class TunefleetNoLearning(SpeedLearning):
    """Today's tunefleet: decide() with the advertised hazards and the job's own checkpoint
    interval (``adaptive_interval`` off where decide knows it), plus speed learning."""

    name = "tunefleet_no_learning"

    def offers_view(self, offers: list[Offer], now_epoch: float) -> list[Offer]:
        """The offers as decide sees them (here: as advertised)."""
        return offers

    def usage_options(self) -> dict[str, Any]:
        """Extra ``orchestrator.decide.Usage`` fields (dropped where decide does not know them)."""
        return {"adaptive_interval": False}

    def interval(self, decision: Any, job: JobRun) -> float | None:
        """Hours of training between checkpoints for this attempt (None: the job's save_steps)."""
        return None

    def checkpoint_cost(self, job: JobRun) -> float | None:
        """Seconds one checkpoint takes, as decide is told (None: estimated from its size)."""
        return None

    def choose(self, job, offers, now_epoch, avoid, blocked=None):
        d = self.decide(job, job.info.spec, self.offers_view(offers, now_epoch), now_epoch, avoid, blocked,
                        est=self.estimate(job), checkpoint_s=self.checkpoint_cost(job), **self.usage_options())
        if not d.launches:
            return None
        interval = self.interval(d, job)
        return d.placement.offer if interval is None else Choice(d.placement.offer, interval)


class Tunefleet(TunefleetNoLearning):
    """tunefleet as the daemon runs it: decide() with the hazards learned from every attempt so far
    (``orchestrator.learning.MarketModel``, fed as the daemon's ``_record_exposure`` feeds it), each
    placement's own checkpoint interval (Young/Daly, ``placement.interval_h``), and the measured
    cost of a checkpoint once the job has written one (the payload's ``checkpoint_s``)."""

    name = "tunefleet"

    def __init__(self) -> None:
        super().__init__()
        self.market = MarketModel()
        self.checkpoint_s: dict[str, float] = {}  # job -> its last measured save + upload, seconds

    def usage_options(self) -> dict[str, Any]:
        return {"market": self.market}

    def interval(self, decision: Any, job: JobRun) -> float | None:
        return decision.placement.interval_h

    def checkpoint_cost(self, job: JobRun) -> float | None:
        return self.checkpoint_s.get(job.info.track.id)

    def observe(self, outcome: Outcome) -> None:
        super().observe(outcome)
        if outcome.checkpoint_write_s:
            self.checkpoint_s[outcome.job] = outcome.checkpoint_write_s
        o = outcome.offer
        advertised = float(o.detail("hazard_advertised", o.hazard_per_hour)) if o.interruptible else 0.0
        self.market.observe(Exposure(o.provider, o.gpu, outcome.host, advertised, outcome.hours,
                                     outcome.interrupted, outcome.warned, launch_failed=outcome.launch_failed))


class CheapestEffective(SpeedLearning):
    name = "cheapest_effective"

    def choose(self, job, offers, now_epoch, avoid, blocked=None):
        info = job.info
        est = self.estimate(job)
        offers = self.unblocked(offers, blocked)
        viable = [p.offer for p in self.rank(info.spec_no_deadline, est, offers, now=now_epoch, avoid=avoid,
                                             spent_usd=job.spent, done_steps=job.committed) if p.viable]
        fresh = [o for o in viable if _key(o) not in avoid] or viable  # lost ones: last resort, as rank
        if not fresh:
            return None
        left = max(0.0, 1.0 - job.committed / info.steps) if info.steps else 1.0
        scored = []
        for o in fresh:
            hours = o.startup_s / 3600.0 + (est.hours(o.gpu, o.gpu_count or 1) or math.inf) * left
            finish = now_epoch + hours * 3600.0
            late = info.deadline_epoch is not None and finish > info.deadline_epoch
            scored.append((late, o.usd_per_hour * hours, finish, o.provider, o.offer_id, o))
        return min(scored, key=lambda s: s[:5])[-1]


class CheapestPerHour(Policy):
    name = "cheapest_per_hour"

    def choose(self, job, offers, now_epoch, avoid, blocked=None):
        offers = self.unblocked(offers, blocked)
        viable = [p.offer for p in self.rank(job.info.spec_no_deadline, job.info.est, offers, now=now_epoch,
                                             avoid=avoid, spent_usd=job.spent, done_steps=job.committed)
                  if p.viable]
        fresh = [o for o in viable if _key(o) not in avoid]  # lost ones: last resort, as rank
        return min(fresh or viable, key=lambda o: (o.usd_per_hour, o.provider, o.offer_id)) if viable else None


class OnDemand(Policy):
    name = "on_demand"

    def __init__(self) -> None:
        super().__init__()
        self._specs: dict[str, dict] = {}

    def choose(self, job, offers, now_epoch, avoid, blocked=None):
        spec = self._specs.get(job.info.track.id)
        if spec is None:
            spec = copy.deepcopy(job.info.spec)
            spec["policy"]["spot"] = "never"
            self._specs[job.info.track.id] = spec
        d = self.decide(job, spec, offers, now_epoch, avoid, blocked)
        return d.placement.offer if d.launches else None


class LocalOnly(Policy):
    name = "local_only"

    def choose(self, job, offers, now_epoch, avoid, blocked=None):
        owned = [o for o in self.unblocked(offers, blocked) if o.owned]  # the queue for the owned GPUs
        if not owned:
            return None
        placements = self.rank(job.info.spec_no_deadline, job.info.est, owned, now=now_epoch, avoid=avoid,
                               spent_usd=job.spent, done_steps=job.committed)
        return placements[0].offer if placements and placements[0].viable else None


# ------------------------------------------------------------------------------------------------
# The lower bound
# ------------------------------------------------------------------------------------------------
# rank's rejections that are facts about the job and the offer: an offer rejected for one of these
# can never run the job. Anything else (NEVER_FINISHES, JOB_CAP, DEADLINE, BUSY) depends on hazards,
# money or time, which a policy may judge otherwise, so the bound keeps those offers.
HARD = frozenset({RejectCode.PROVIDER_NOT_ALLOWED, RejectCode.DATA_RESTRICTED, RejectCode.SPOT_POLICY,
                  RejectCode.PRICE_CAP, RejectCode.LOCAL_STORE, RejectCode.CPU_ONLY, RejectCode.GPU_COUNT,
                  RejectCode.VRAM, RejectCode.HOST_RAM, RejectCode.CPUS})


@dataclass(frozen=True)
class JobBound:
    cost: float  # no policy pays less for this job if it completes it (math.inf: nothing can hold it)
    work_offer: str | None  # the offer of min (lowest price x true hours)
    startup_offer: str | None  # the offer of min (lowest price x start-up)
    earliest_finish_h: float  # no policy completes it earlier (math.inf: never)


def _listed_spans(windows: list[list[float]], lo: float, hi: float) -> list[tuple[float, float]]:
    """The listed spans clipped to [lo, hi], as closed intervals (a launch at either end counts)."""
    return [(max(a, lo), min(b, hi)) for a, b in windows if max(a, lo) <= min(b, hi)]


def _lowest_price(prices: list[list[float]], spans: list[tuple[float, float]]) -> float:
    """The lowest price in effect at any moment of ``spans``. Each price holds on the closed span
    from its time to the next one's (the first one from the start of time), so a launch at the
    instant a price changes is covered whichever of the two it paid."""
    best = math.inf
    for k, (t, p) in enumerate(prices):
        start = -math.inf if k == 0 else t
        end = prices[k + 1][0] if k + 1 < len(prices) else math.inf
        if p < best and any(start <= b and a <= end for a, b in spans):
            best = p
    return best


def _eligible(market: Market) -> dict[str, list[tuple[int, float, float]]]:
    """Per job, the offers that could ever run it: (offer, lowest price, first moment listed), for
    offers with exactly its GPU count, listed at some moment of [arrival, horizon] and passing
    rank's hard constraints with the deadline taken out (judged at the lowest price: a price cap
    passes it)."""
    if "eligible" in market.cache:
        return market.cache["eligible"]
    trace = market.trace
    windows = {m.id: m.windows for m in trace.machines}
    out: dict[str, list[tuple[int, float, float]]] = {}
    market.cache["eligible"] = out
    for info in market.jobs:
        arrival = info.track.arrival_h
        cands: list[tuple[int, float, float]] = []
        for i, track in enumerate(market.tracks):
            if track.gpu_count != info.gpus:
                continue
            spans = _listed_spans(windows[track.machine], arrival, trace.horizon_h)
            if spans:
                cands.append((i, _lowest_price(track.prices, spans), min(a for a, _ in spans)))
        if cands:
            offers = [replace(market.offer_at[i][0], usd_per_hour=p) for i, p, _ in cands]
            placements = {_key(p.offer): p for p in
                          scheduler.rank(info.spec_no_deadline, info.est, offers, now=trace.epoch(arrival))}
            cands = [c for c, o in zip(cands, offers, strict=True)
                     if placements[_key(o)].viable or placements[_key(o)].code not in HARD]
        out[info.track.id] = cands
    return out


def job_bounds(market: Market, eligible: dict[str, list[tuple[int, float, float]]] | None = None,
               ) -> dict[str, JobBound]:
    """The lower bound of every job's cost and completion time (see ``LowerBound``)."""
    eligible = _eligible(market) if eligible is None else eligible
    out: dict[str, JobBound] = {}
    for info in market.jobs:
        cands = eligible[info.track.id]
        if not cands:
            out[info.track.id] = JobBound(math.inf, None, None, math.inf)
            continue
        offer = {i: market.offer_at[i][0] for i, _, _ in cands}
        work = min((p * info.true_hours(offer[i]), market.tracks[i].id) for i, p, _ in cands)
        startup = min((p * offer[i].startup_s / 3600.0, market.tracks[i].id) for i, p, _ in cands)
        first_training = min(t + offer[i].startup_s / 3600.0 for i, _, t in cands)
        fastest = min(info.true_hours(offer[i]) for i, _, _ in cands)
        out[info.track.id] = JobBound(work[0] + startup[0], work[1], startup[1], first_training + fastest)
    return out


def _speed(market: Market, offer: int) -> float:
    """Work units (A100-80GB hours of a job with speed factor 1) an offer's machine trains per hour."""
    o = market.offer_at[offer][0]
    n = max(1, o.gpu_count)
    return (GPUS[o.gpu].rel_speed * n * (MULTI_GPU_EFFICIENCY if n > 1 else 1.0)
            * market.trace.speed_truth.get(o.gpu, 1.0))


def capacity_bound(market: Market, job_ids: set[str]) -> float | None:
    """A lower bound of what any policy pays, in total, for the jobs ``job_ids`` if it completes all
    of them: the per-job bounds cannot see that two jobs cannot both have the cheapest machine.

    Every job's work is w_j units (its A100-80GB hours at its own speed factor); an offer's machine
    trains s_m units an hour (the table's relative speed, the GPU count's efficiency, the model's
    speed truth: the simulator's own, and separable, so hours = w_j / s_m); one machine runs one
    attempt at a time, so its training hours over the run are at most ``horizon - its first
    listing``, i.e. s_m x that in units; and an offer bills every hour at >= its lowest price while
    listed over the run, i.e. >= q = p_min / s_m per unit. Whatever a policy does, the units it
    trains for these jobs form a flow from each job (>= w_j, on offers it may use) to machines
    (within their capacity) that costs at most what it was billed for that training; so the
    minimum-cost such flow (jobs grouped by the offers they may use) is a lower bound of the
    training bill. The start-up of each job's completing attempt is billed on top (the per-job
    start-up term). The larger of this and the sum of the per-job bounds is returned (both are
    bounds); None when the relaxation finds the work cannot fit (then no policy can complete all)."""
    eligible = _eligible(market)
    bounds = job_bounds(market, eligible)
    trace = market.trace
    jobs = [info for info in market.jobs if info.track.id in job_ids]
    if not jobs:
        return 0.0
    per_job = sum(bounds[info.track.id].cost for info in jobs)
    windows = {m.id: m.windows for m in trace.machines}
    startup_total = 0.0
    classes: dict[frozenset[int], float] = {}
    lowest: dict[int, float] = {}
    for info in jobs:
        cands = eligible[info.track.id]
        if not cands:
            return None
        startup_total += min(p * market.offer_at[i][0].startup_s / 3600.0 for i, p, _ in cands)
        i0 = cands[0][0]
        w = info.true_hours(market.offer_at[i0][0]) * _speed(market, i0)
        for i, _, _ in cands:  # the separability the flow rests on
            if not math.isclose(info.true_hours(market.offer_at[i][0]) * _speed(market, i), w, rel_tol=1e-9):
                raise ValueError(f"job {info.track.id}: hours on {market.tracks[i].id} are not work / speed")
            if i not in lowest:
                spans = _listed_spans(windows[market.tracks[i].machine], 0.0, trace.horizon_h)
                lowest[i] = _lowest_price(market.tracks[i].prices, spans)
        key = frozenset(i for i, _, _ in cands)
        classes[key] = classes.get(key, 0.0) + w
    # the flow network: source -> class (its work) -> machine (cost per unit) -> sink (capacity)
    machines = sorted({market.offer_machine[i] for key in classes for i in key})
    cls_list = list(classes.items())
    n_cls = len(cls_list)
    node = {m: 1 + n_cls + k for k, m in enumerate(machines)}
    sink = 1 + n_cls + len(machines)
    edges: list[tuple[int, int, float, float]] = []
    for c, (key, work) in enumerate(cls_list):
        edges.append((0, 1 + c, work, 0.0))
        per_machine: dict[int, float] = {}
        for i in key:
            m = market.offer_machine[i]
            q = lowest[i] / _speed(market, i)
            per_machine[m] = min(per_machine.get(m, math.inf), q)
        for m, q in per_machine.items():
            edges.append((1 + c, node[m], math.inf, q))
    for m in machines:
        first = min((a for a, _ in windows[market.machine_ids[m]]), default=trace.horizon_h)
        speed = _speed(market, market.machine_offers[m][0])
        edges.append((node[m], sink, speed * max(0.0, trace.horizon_h - first), 0.0))
    need = sum(classes.values())
    flow_cost = _min_cost_flow(sink + 1, edges, 0, sink, need)
    if flow_cost is None:
        return None
    return max(per_job, startup_total + flow_cost)


def _min_cost_flow(n: int, edges: list[tuple[int, int, float, float]], s: int, t: int,
                   need: float) -> float | None:
    """Successive shortest paths with Dijkstra on reduced costs (all costs >= 0). Real capacities:
    each augmentation saturates an edge or meets the demand. None if ``need`` cannot be sent."""
    graph: list[list[list]] = [[] for _ in range(n)]
    for u, v, cap, cost in edges:
        graph[u].append([v, cap, cost, len(graph[v])])
        graph[v].append([u, 0.0, -cost, len(graph[u]) - 1])
    pot = [0.0] * n
    sent, total, eps = 0.0, 0.0, 1e-12 * max(1.0, need)
    while sent < need - eps:
        dist = [math.inf] * n
        prev: list[tuple[int, int] | None] = [None] * n
        dist[s] = 0.0
        heap = [(0.0, s)]
        while heap:
            d, u = heapq.heappop(heap)
            if d > dist[u]:
                continue
            for k, (v, cap, cost, _) in enumerate(graph[u]):
                if cap <= eps:
                    continue
                nd = d + cost + pot[u] - pot[v]
                if nd < dist[v] - 1e-15:
                    dist[v], prev[v] = nd, (u, k)
                    heapq.heappush(heap, (nd, v))
        if dist[t] == math.inf:
            return None
        for v in range(n):
            if dist[v] < math.inf:
                pot[v] += dist[v]
        push, v = need - sent, t
        while v != s:
            u, k = prev[v]
            push = min(push, graph[u][k][1])
            v = u
        v = t
        while v != s:
            u, k = prev[v]
            e = graph[u][k]
            e[1] -= push
            graph[v][e[3]][1] += push
            total += push * e[2]
            v = u
        sent += push
    return total


class LowerBound:
    """A provable lower bound per job, not a schedule.

    For a job J arriving at time a, let O be the offers that could hold it at all: exactly its
    GPU count, passing rank's hard constraints with the deadline taken out (``HARD``), and listed
    at some moment of [a, horizon]. For o in O let p(o) be its lowest price in effect while listed
    in that span, H(o) its true uninterrupted training hours (the simulator's own: the GPU model's
    speed truth and the job's speed factor, no checkpoint writes) and S(o) its start-up hours. Then

        bound(J) = min_o p(o) x H(o) + min_o p(o) x S(o)

    Why no policy pays less for a job it completes: every attempt is launched at some moment t of
    [a, horizon] on an offer listed then, so it is on some o in O (the simulator shows nothing
    else, and every policy's choice passes rank's hard checks) and is billed at its launch price,
    which is >= p(o), for every hour it runs. Each step of J is trained at least once, by some
    attempt: the attempts' training fractions f_i on offers o_i sum to >= 1 (work redone only
    adds), and training a fraction f on o takes f x H(o) billed hours (checkpoint writes only
    add). So the training is billed >= sum_i f_i p(o_i) H(o_i) >= min_o p(o) H(o). The attempt
    that completes J ran its whole start-up (and a reload if it resumed), billed >= p(o) S(o) >=
    min_o p(o) S(o), on top of its training. Failed launches, earlier start-ups, rework and
    saves only add. Unlimited capacity and no interruptions are implied: the bound needs neither.

    ``earliest_finish_h`` bounds completion the same way: training starts no earlier than
    min_o (first moment o is listed after a, + S(o)) and takes >= min_o H(o). A job that cannot
    finish by the horizon counts as not completed; a deadline it must miss counts as a miss (so the
    bound's deadline misses are those no policy can avoid).
    """

    name = "lower_bound"
    interruptions = False

    def simulate(self, market: Market, max_preemptions: int = MAX_PREEMPTIONS,
                 max_launch_failures: int = MAX_LAUNCH_FAILURES) -> RunResult:
        bounds = job_bounds(market)
        jobs = []
        for info in market.jobs:
            b = bounds[info.track.id]
            jr = JobRun(info)
            if b.earliest_finish_h <= market.trace.horizon_h:
                jr.spent, jr.finished_h, jr.committed = b.cost, b.earliest_finish_h, info.steps
            else:
                jr.failed = "no offer can complete it by the horizon"
            jobs.append(jr)
        return RunResult(self.name, jobs, 0, horizon_h=market.trace.horizon_h, extra={"bounds": bounds})


# ------------------------------------------------------------------------------------------------
# Diagnostics (not in POLICIES)
# ------------------------------------------------------------------------------------------------
class GreedyNoReclaims(Policy):
    """The old "lower bound", kept as a diagnostic: each job once, never interrupted (reclaims,
    waves and outbids pass it by; launch failures and checkpoint writes do not), on the offer with
    the lowest true cost (price x (start-up + real hours)) among those free when it is placed that
    finish by its deadline (the cheapest of all when none does). It is not a bound: it places
    greedily at each instant, and a policy that waits for cheaper capacity can beat it."""

    name = "greedy_no_reclaims"
    interruptions = False

    def choose(self, job, offers, now_epoch, avoid, blocked=None):
        info = job.info
        best: tuple | None = None
        pick: Offer | None = None
        for p in self.rank(info.spec_no_deadline, info.est, self.unblocked(offers, blocked), now=now_epoch):
            if not p.viable:
                break
            o = p.offer
            hours = o.startup_s / 3600.0 + info.true_hours(o)
            finish = now_epoch + hours * 3600.0
            late = info.deadline_epoch is not None and finish > info.deadline_epoch
            key = (late, o.usd_per_hour * hours, finish, o.provider, o.offer_id)
            if best is None or key < best:
                best, pick = key, o
        return pick


class TunefleetWithoutReclaims(Tunefleet):
    """Diagnostic, not a policy one can have: tunefleet's choices in a world where nothing is ever
    reclaimed (no hazard reclaims, waves or outbids). Its distance to the lower bound is what the
    choices cost; the rest of tunefleet's distance is what interruptions cost."""

    name = "tunefleet_without_reclaims"
    interruptions = False


class CheapestEffectiveWithoutReclaims(CheapestEffective):
    """Diagnostic: cheapest_effective's choices in a world where nothing is ever reclaimed. Its cost
    against cheapest_effective's is what interruptions cost that policy in all (rework, restarts,
    re-placing), so 1 minus the ratio is about the most any hazard-aware ranking can save against it
    while choosing among the same offers."""

    name = "cheapest_effective_without_reclaims"
    interruptions = False


POLICIES = (Tunefleet, TunefleetNoLearning, CheapestEffective, CheapestPerHour, OnDemand, LocalOnly, LowerBound)
DIAGNOSTICS = (TunefleetWithoutReclaims, CheapestEffectiveWithoutReclaims, GreedyNoReclaims)
