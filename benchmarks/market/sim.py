"""The discrete-event simulator: one market trace, one reclaim stream, every policy in turn.

Time is in hours from the trace's hour 0. Events, in time order: a machine is listed or
unlisted, an offer's price moves, an offer is reclaimed (then its machine stays taken for a
while), a hold ends, a job arrives, an attempt finishes, a requeued job's back-off ends. After
each event that could let a waiting job start, the policy is asked to place the waiting jobs,
oldest first (the daemon's order), on the offers listed, not held and not occupied right now.

What is the same for every policy: the trace (machines, prices, jobs) and the reclaims, drawn
once per ``seed`` from each offer's true hazard (the advertised one times a log-normal factor)
and shared by all runs, so that a machine reclaimed at hour 31.2 is reclaimed at hour 31.2
whoever rents it. A reclaim hits the attempt running on that very offer; it comes with a
warning (SIGTERM: the payload saves at the current step, nothing lost) or without (everything
since the last ``save_steps`` checkpoint is lost). Each new attempt pays its offer's start-up
and, when it resumes from a checkpoint, a reload; it is billed from launch to its end at the
price it was launched at. An unlisted machine keeps the attempt it runs (a rental is not
withdrawn); only reclaims end attempts early. Owned GPUs have no hazard; the team's other work
only delays fleet jobs (they are offered when idle), it never preempts them.

The daemon's mechanics apply to every policy: after a preemption the job is requeued with the
daemon's back-off, the lost offer is avoided for 60 s, and a job preempted more than
``max_preemptions`` times fails (``infra/config.py``: 20).
"""

from __future__ import annotations

import copy
import heapq
import math
import random
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from jobs.estimate import Estimate, estimate
from orchestrator import decide as deciding  # the daemon's decision function, looked up at call time (tests wrap it)
from orchestrator import scheduler  # the real scheduler, looked up at call time (tests wrap it)
from providers.base import Offer, PriceSource

from .trace import JobTrack, Trace

AVOID_S = 60.0  # orchestrator/daemon.py: a lost offer is avoided for 60 s
MAX_PREEMPTIONS = 20  # infra/config.py default


def reload_hours(params_b: float) -> float:
    """Resuming: download the checkpoint (~0.4 GB for a 7B QLoRA, training.md) and reload the base
    model; ~1 min plus 15 s per billion parameters (assumption; the scheduler assumes 2 min)."""
    return (1.0 + 0.25 * params_b) / 60.0


def daemon_backoff_h(preemptions: int) -> float:
    """orchestrator/daemon.py: 0 after the first preemption, then 2^(n-1) s, at most 60 s."""
    return (min(60.0, 2.0 ** min(preemptions - 1, 6)) if preemptions > 1 else 0.0) / 3600.0


# ------------------------------------------------------------------------------------------------
# The market, shared by every policy of one run
# ------------------------------------------------------------------------------------------------
LIST, UNLIST, PRICE, RECLAIM, HOLD_END = range(5)


@dataclass(frozen=True)
class Reclaim:
    t: float
    offer: int
    warning: bool
    hold_h: float


class Market:
    """The trace turned into arrays and one sorted event list, plus the reclaims of one seed."""

    def __init__(self, trace: Trace, seed: int):
        self.trace = trace
        self.seed = seed
        self.machine_ids = [m.id for m in trace.machines]
        midx = {m: i for i, m in enumerate(self.machine_ids)}
        self.offer_machine = [midx[o.machine] for o in trace.offers]
        self.machine_offers: list[list[int]] = [[] for _ in trace.machines]
        for i, m in enumerate(self.offer_machine):
            self.machine_offers[m].append(i)
        self.tracks = trace.offers
        # one Offer value per (offer, price point): what a provider would answer at that time
        self.offer_at: list[list[Offer]] = []
        for o in trace.offers:
            base = Offer(provider=o.provider, offer_id=o.offer_id, gpu=o.gpu, gpu_count=o.gpu_count,
                         vram_gb=o.vram_gb, usd_per_hour=o.prices[0][1], interruptible=o.interruptible,
                         hazard_per_hour=o.hazard_per_hour, region=o.region, on_premises=o.on_premises,
                         owned=o.owned, startup_s=o.startup_s,
                         price_source=PriceSource.COST_MODEL if o.owned else PriceSource.LIVE)
            self.offer_at.append([replace(base, usd_per_hour=p) for _, p in o.prices])
        self.true_hazard: list[float] = []
        self.reclaims: list[Reclaim] = []
        sigma = trace.hazard_noise
        for i, o in enumerate(trace.offers):
            rnd = random.Random(f"{seed}/{o.id}")  # one stream per offer: the same for every policy
            true = o.hazard_per_hour * math.exp(rnd.gauss(0.0, sigma) - sigma * sigma / 2)
            self.true_hazard.append(true)
            t = 0.0
            while true > 0:
                t += rnd.expovariate(true)
                if t >= trace.horizon_h:
                    break
                warn = rnd.random() < o.warning_prob
                self.reclaims.append(Reclaim(t, i, warn, rnd.expovariate(1.0 / trace.reclaim_hold_h)))
        events: list[tuple[float, int, int, int, Any]] = []
        for m, track in enumerate(trace.machines):
            for a, b in track.windows:
                events.append((a, LIST, m, 0, None))
                events.append((b, UNLIST, m, 0, None))
        for i, o in enumerate(trace.offers):
            for k in range(1, len(o.prices)):
                events.append((o.prices[k][0], PRICE, i, k, None))
        for r in self.reclaims:
            events.append((r.t, RECLAIM, r.offer, 0, r))
            events.append((r.t + r.hold_h, HOLD_END, self.offer_machine[r.offer], 0, None))
        events.sort(key=lambda e: (e[0], e[1], e[2], e[3]))
        self.events = events
        self.jobs = [JobInfo.build(trace, j) for j in sorted(trace.jobs, key=lambda j: (j.arrival_h, j.id))]


@dataclass
class JobInfo:
    """What every policy knows about a job (and the truth, ``speed_factor``, only the simulator uses)."""

    track: JobTrack
    spec: dict[str, Any]  # as the daemon holds it
    spec_no_deadline: dict[str, Any]  # the same hard constraints, no deadline (for baselines)
    est: Estimate
    steps: int
    save_steps: int
    deadline_epoch: float | None
    a100_hours: float

    @classmethod
    def build(cls, trace: Trace, j: JobTrack) -> JobInfo:
        spec = trace.job_spec(j)
        bare = copy.deepcopy(spec)
        bare["policy"]["deadline"] = None
        est = estimate(spec)
        save = (spec.get("checkpoint") or {}).get("interval") or spec.get("save_steps") or 50
        return cls(j, spec, bare, est, est.steps, int(save),
                   None if j.deadline_h is None else trace.epoch(j.deadline_h), est.hours("A100-80GB") or 0.0)

    def true_hours(self, offer: Offer) -> float:
        h = self.est.hours(offer.gpu, offer.gpu_count or 1)
        assert h is not None, offer.gpu
        return h * self.track.speed_factor


# ------------------------------------------------------------------------------------------------
# One policy's run
# ------------------------------------------------------------------------------------------------
class AttemptLog(NamedTuple):
    offer: str  # the trace's offer id, provider/offer_id
    start: float
    end: float
    cost: float
    how: str  # finished | reclaimed | reclaimed, warned | horizon
    from_step: int
    to_step: int  # the steps committed when it ended


@dataclass
class JobRun:
    info: JobInfo
    committed: int = 0
    spent: float = 0.0
    attempts: int = 0
    preemptions: int = 0
    not_before: float = 0.0
    started_h: float | None = None
    finished_h: float | None = None
    failed: str | None = None  # "preempted too often" | "deadline passed, never placed" | ...
    redone_h: float = 0.0
    overhead_h: float = 0.0  # start-up and reload hours paid by every attempt after the first
    lost_usd: float = 0.0  # what the redone work and the extra start-ups/reloads cost
    log: list[AttemptLog] = field(default_factory=list)


@dataclass
class Attempt:
    job: JobRun
    offer: int
    machine: int
    start: float
    price: float
    startup_h: float
    step_h: float
    finish: float
    restart: bool  # not the job's first attempt: its start-up and reload are restart overhead
    from_step: int
    alive: bool = True


@dataclass
class RunResult:
    policy: str
    jobs: list[JobRun]
    rank_calls: int
    reclaims_hit: int = 0
    reclaims_warned: int = 0
    horizon_h: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Policy:
    """Where to put a waiting job now, or None to keep it waiting."""

    name = "policy"
    interruptions = True  # False: reclaims never end this policy's attempts (the lower bound)

    def __init__(self) -> None:
        self.rank_calls = 0

    def rank(self, spec, est, offers, **kw):
        self.rank_calls += 1
        return scheduler.rank(spec, est, offers, **kw)

    def decide(self, job: JobRun, spec: dict[str, Any], offers: list[Offer], now_epoch: float,
               avoid: frozenset) -> Any:
        """``orchestrator.decide.decide`` exactly as the daemon calls it, with what the simulator
        knows: the offers free now, the ones lost in the last 60 s, the money spent, the steps
        committed (no budget caps: the traces carry none)."""
        self.rank_calls += 1
        usage = deciding.Usage(avoid={k: now_epoch + AVOID_S for k in avoid})
        view = deciding.JobView(job.info.track.id, spec, job.spent, job.committed)
        return deciding.decide(view, job.info.est, offers, [], usage, now_epoch)

    def gives_up(self, job: JobRun, now_epoch: float) -> bool:
        return False

    def choose(self, job: JobRun, offers: list[Offer], now_epoch: float, avoid: frozenset) -> Offer | None:
        raise NotImplementedError


class Simulator:
    def __init__(self, market: Market, policy: Policy, max_preemptions: int = MAX_PREEMPTIONS):
        self.m = market
        self.policy = policy
        self.max_preemptions = max_preemptions

    def run(self) -> RunResult:
        m, trace, pol = self.m, self.m.trace, self.policy
        n_mach = len(m.machine_ids)
        listed = [False] * n_mach
        hold_until = [0.0] * n_mach
        occupied: list[Attempt | None] = [None] * n_mach
        price_idx = [0] * len(m.tracks)
        available: dict[int, Offer] = {}
        avoid: dict[tuple[str, str], float] = {}
        jobs = [JobRun(info) for info in m.jobs]
        waiting: list[JobRun] = []
        heap: list[tuple[float, int, int, Any]] = []  # (t, kind, seq, payload)
        seq = 0
        ARRIVE, FINISH, WAKE = 0, 1, 2
        for jr in jobs:
            heapq.heappush(heap, (jr.info.track.arrival_h, ARRIVE, seq, jr))
            seq += 1
        result = RunResult(pol.name, jobs, 0, horizon_h=trace.horizon_h)
        open_jobs = len(jobs)

        def refresh(mach: int, now: float) -> bool:
            """Recompute the availability of a machine's offers; True if one became available."""
            free = listed[mach] and now >= hold_until[mach] and occupied[mach] is None
            gained = False
            for i in m.machine_offers[mach]:
                if free:
                    if i not in available:
                        gained = True
                    available[i] = m.offer_at[i][price_idx[i]]
                else:
                    available.pop(i, None)
            return gained

        def end_attempt(att: Attempt, now: float, how: str) -> None:
            att.alive = False
            cost = att.price * (now - att.start)
            att.job.spent += cost
            if att.restart:  # the start-up and reload actually paid (a reclaim may cut them short)
                paid = min(now - att.start, att.startup_h)
                att.job.overhead_h += paid
                att.job.lost_usd += paid * att.price
            att.job.log.append(AttemptLog(m.tracks[att.offer].id, att.start, now, cost, how, att.from_step,
                                          att.job.committed))
            occupied[att.machine] = None

        def start(jr: JobRun, offer_i: int, now: float) -> None:
            nonlocal seq
            offer = available[offer_i]
            info = jr.info
            full_h = info.true_hours(offer)
            step_h = full_h / info.steps
            resume = jr.committed > 0
            startup_h = offer.startup_s / 3600.0 + (reload_hours(info.est.model.params_b) if resume else 0.0)
            finish = now + startup_h + (info.steps - jr.committed) * step_h
            mach = m.offer_machine[offer_i]
            att = Attempt(jr, offer_i, mach, now, offer.usd_per_hour, startup_h, step_h, finish,
                          restart=jr.attempts > 0, from_step=jr.committed)
            occupied[mach] = att
            refresh(mach, now)
            jr.attempts += 1
            if jr.started_h is None:
                jr.started_h = now
            heapq.heappush(heap, (finish, FINISH, seq, att))
            seq += 1

        def preempt(att: Attempt, warning: bool, now: float) -> None:
            nonlocal seq, open_jobs
            jr, info = att.job, att.job.info
            worked = max(0.0, now - att.start - att.startup_h)
            reached = min(float(info.steps), jr.committed + worked / att.step_h)
            if warning:  # SIGTERM: the payload saves at the step it is on
                kept = max(jr.committed, int(reached))
            else:
                kept = max(jr.committed, int(reached // info.save_steps) * info.save_steps)
            jr.redone_h += (reached - kept) * att.step_h
            jr.lost_usd += (reached - kept) * att.step_h * att.price
            jr.committed = kept
            end_attempt(att, now, 'reclaimed, warned' if warning else 'reclaimed')
            jr.preemptions += 1
            result.reclaims_hit += 1
            result.reclaims_warned += warning
            o = m.offer_at[att.offer][0]
            avoid[(o.provider, o.offer_id)] = now + AVOID_S / 3600.0
            if jr.preemptions > self.max_preemptions:
                jr.failed = f"preempted {jr.preemptions} times"
                open_jobs -= 1
                return
            jr.not_before = now + daemon_backoff_h(jr.preemptions)
            waiting.append(jr)
            if jr.not_before > now:
                heapq.heappush(heap, (jr.not_before, WAKE, seq, None))
                seq += 1

        def place(now: float) -> None:
            nonlocal open_jobs
            if not waiting or not available:
                return
            now_epoch = trace.epoch(now)
            live_avoid = frozenset(k for k, t in avoid.items() if t > now)
            waiting.sort(key=lambda j: (j.info.track.arrival_h, j.info.track.id))
            keep = []
            for jr in waiting:
                if jr.not_before > now or not available:
                    keep.append(jr)
                    continue
                if pol.gives_up(jr, now_epoch):
                    jr.failed = "deadline passed before it could be placed"
                    open_jobs -= 1
                    continue
                offers = list(available.values())
                choice = pol.choose(jr, offers, now_epoch, live_avoid)
                if choice is None:
                    keep.append(jr)
                    continue
                key = (choice.provider, choice.offer_id)
                idx = next(i for i, o in available.items() if (o.provider, o.offer_id) == key)
                start(jr, idx, now)
            waiting[:] = keep

        events, ei, n_ev = m.events, 0, len(m.events)
        now = 0.0
        while open_jobs > 0:
            t_market = events[ei][0] if ei < n_ev else math.inf
            t_dyn = heap[0][0] if heap else math.inf
            now = min(t_market, t_dyn)
            if now >= trace.horizon_h or now == math.inf:
                now = trace.horizon_h
                break
            dirty = False
            if t_market <= t_dyn:
                t, kind, a, b, payload = events[ei]
                ei += 1
                if kind == LIST:
                    listed[a] = True
                    dirty = refresh(a, now)
                elif kind == UNLIST:
                    listed[a] = False
                    refresh(a, now)
                elif kind == PRICE:
                    old = m.offer_at[a][price_idx[a]].usd_per_hour
                    price_idx[a] = b
                    if a in available:
                        available[a] = m.offer_at[a][b]
                        dirty = m.offer_at[a][b].usd_per_hour < old
                elif kind == RECLAIM:
                    mach = m.offer_machine[a]
                    hold_until[mach] = max(hold_until[mach], now + payload.hold_h)
                    att = occupied[mach]
                    if att is not None and att.offer == a and pol.interruptions:
                        preempt(att, payload.warning, now)
                        dirty = True
                    refresh(mach, now)
                else:  # HOLD_END
                    dirty = refresh(a, now)
            else:
                t, kind, _, payload = heapq.heappop(heap)
                if kind == ARRIVE:
                    waiting.append(payload)
                    dirty = True
                elif kind == FINISH:
                    att = payload
                    if att.alive:
                        att.job.committed = att.job.info.steps
                        end_attempt(att, now, "finished")
                        att.job.finished_h = now
                        open_jobs -= 1
                        dirty = refresh(att.machine, now)
                else:  # WAKE
                    dirty = True
            if dirty:
                place(now)
        # the horizon: bill what still runs up to now
        for att in occupied:
            if att is not None and att.alive:
                end_attempt(att, now, "horizon")
        result.rank_calls = pol.rank_calls
        return result
