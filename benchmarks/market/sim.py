"""The discrete-event simulator: one market trace, one seed, every policy in turn.

Time is in hours from the trace's hour 0. Events, in time order: a machine is listed or
unlisted, an offer's price moves, an offer is reclaimed (then its machine stays taken for a
while), a reclaim wave sweeps a scope, a hold ends, a job arrives, an attempt finishes (or its
launch fails), a requeued job's back-off or an offer's block ends. After each event that could
let a waiting job start, the policy is asked to place the waiting jobs, oldest first (the
daemon's order), on the offers listed, not held and not occupied right now, with exactly the
job's GPU count (live providers filter by count; a 1-GPU job is never shown an 8-GPU machine).
Every offer shown carries its machine's id in ``Offer.extra`` as ``("host", "<machine id>")``.

The world is not the scheduler's model (trace format 2, ``benchmarks.market.trace``):

- **Reclaims** of each offer are a Poisson process at its *true* hazard: the advertised one
  times the machine's ``hazard_factor`` times a per-seed log-normal noise. Drawn once per seed
  with one random stream per offer, so every policy meets the same ones.
- **Waves**: at a wave's time each machine in its scope is taken with probability ``share``
  (one stream per wave and machine, drawn whether or not anything runs there) and held; the
  interruptible attempt it runs is reclaimed.
- **Outbids**: when a marketplace bid's price steps up above the price an attempt launched at,
  the attempt is outbid with probability min(1, ``outbid_k`` x rise / launched price), from one
  uniform draw per (offer, price step), the same for every policy.
- **Speed**: an attempt trains at the ``jobs.gpus`` table's speed times the GPU model's
  ``speed_truth``, divided by the job's ``speed_factor``.
- **Launch failures**: a launch fails with the offer's ``launch_fail_prob``, drawn per (offer,
  job, launch number). It takes and bills the offer's start-up, then the daemon's rules apply:
  the offer is blocked for ``LAUNCH_BLOCK_S`` (``orchestrator/outcomes.py``, LAUNCH_FAILED), the
  job is requeued at once, and it fails at ``max_launch_failures`` (``infra/config.py``).
- **Checkpoint writes** cost wall time: each save pauses training for the job's
  ``checkpoint_write_s``, billed. Saves happen at multiples of the job's ``save_steps``, or,
  when the policy returns ``Choice(offer, interval_h)``, after every ``interval_h`` hours of
  training from the attempt's start. A save in progress when the machine is lost is lost.

A reclaim (any kind) comes with a warning (probability ``warning_prob``: SIGTERM, the payload
saves at the step it is on, nothing lost) or without (everything since the last completed save
is lost). Each new attempt pays its offer's start-up and, when it resumes from a checkpoint, a
reload; it is billed from launch to its end at the price it was launched at. An unlisted machine
keeps the attempt it runs (a rental is not withdrawn). Owned GPUs have no hazard; the team's
other work only delays fleet jobs, it never preempts them.

The daemon's mechanics apply to every policy: after a preemption the job is requeued with the
daemon's back-off, the lost offer is avoided for 60 s, and a job preempted more than
``max_preemptions`` times fails (``infra/config.py``: 20). After every attempt ends, and after
every failed launch, the policy's ``observe`` hook gets an ``Outcome``.
"""

from __future__ import annotations

import copy
import dataclasses
import heapq
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from infra.config import Config
from jobs.estimate import Estimate, estimate
from orchestrator import decide as deciding
from orchestrator import scheduler
from orchestrator.outcomes import END_RULES
from orchestrator.states import EndReason
from providers.base import Offer, PriceSource

from .trace import JobTrack, Trace

# ``deciding.decide`` and ``scheduler.rank`` are looked up at call time: tests wrap them.
_CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}
AVOID_S = END_RULES[EndReason.PREEMPTED].avoid_s  # a lost offer ranks last for 60 s
LAUNCH_BLOCK_S = END_RULES[EndReason.LAUNCH_FAILED].block_s  # an offer whose launch failed: not used for 300 s
MAX_PREEMPTIONS = int(_CONFIG_DEFAULTS["max_preemptions"])  # 20
MAX_LAUNCH_FAILURES = int(_CONFIG_DEFAULTS["max_launch_failures"])  # 3


def reload_hours(params_b: float) -> float:
    """Resuming: download the checkpoint (~0.4 GB for a 7B QLoRA, training.md) and reload the base
    model; ~1 min plus 15 s per billion parameters (assumption; the scheduler assumes 2 min)."""
    return (1.0 + 0.25 * params_b) / 60.0


def daemon_backoff_h(preemptions: int) -> float:
    """orchestrator/ending.py: 0 after the first preemption, then 2^(n-1) s, at most 60 s."""
    return (min(60.0, 2.0 ** min(preemptions - 1, 6)) if preemptions > 1 else 0.0) / 3600.0


# ------------------------------------------------------------------------------------------------
# What a policy tells the simulator, and what it hears back
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    """Where to launch, and optionally how often to checkpoint there: ``interval_h`` hours of
    training between saves (time-based, counted from the attempt's start) replaces the job's
    ``save_steps`` for this attempt when not None. ``choose`` may return a bare ``Offer`` instead."""

    offer: Offer
    interval_h: float | None = None

    @property
    def provider(self) -> str:
        return self.offer.provider

    @property
    def offer_id(self) -> str:
        return self.offer.offer_id


@dataclass(frozen=True)
class Outcome:
    """One ended attempt (or failed launch), as the daemon would record it.

    ``offer`` is the ``providers.base.Offer`` it launched on (at its launch price, the advertised
    hazard); ``host`` the machine id (also in ``offer.extra``); ``hours`` the wall hours from
    launch to end; ``interrupted`` any reclaim (hazard, wave or outbid), ``warned`` whether it came
    with a usable notice; ``launch_failed`` a launch that failed after its start-up;
    ``tokens_per_s`` what the payload measured over all its GPUs (None if it never trained);
    ``checkpoint_write_s`` one save's measured seconds (None before its first completed save)."""

    job: str
    offer: Offer
    host: str
    hours: float
    interrupted: bool
    warned: bool
    launch_failed: bool
    tokens_per_s: float | None
    checkpoint_write_s: float | None


def _key(o: Offer) -> tuple[str, str]:
    return o.provider, o.offer_id


# ------------------------------------------------------------------------------------------------
# The market, shared by every policy of one run
# ------------------------------------------------------------------------------------------------
LIST, UNLIST, PRICE, RECLAIM, WAVE, HOLD_END = range(6)


@dataclass(frozen=True)
class Reclaim:
    t: float
    offer: int
    warning: bool
    hold_h: float


@dataclass(frozen=True)
class WaveHit:
    t: float
    wave: int
    machine: int
    offers: frozenset[int]  # its interruptible offers in the wave's scope
    warning: bool
    hold_h: float


class Market:
    """The trace turned into arrays and one sorted event list, plus the random draws of one seed."""

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
        self.index = {(o.provider, o.offer_id): i for i, o in enumerate(trace.offers)}
        # one Offer value per (offer, price point): what a provider would answer at that time
        self.offer_at: list[list[Offer]] = []
        for o in trace.offers:
            base = Offer(provider=o.provider, offer_id=o.offer_id, gpu=o.gpu, gpu_count=o.gpu_count,
                         vram_gb=o.vram_gb, usd_per_hour=o.prices[0][1], interruptible=o.interruptible,
                         hazard_per_hour=o.hazard_per_hour, region=o.region, on_premises=o.on_premises,
                         owned=o.owned, startup_s=o.startup_s,
                         price_source=PriceSource.COST_MODEL if o.owned else PriceSource.LIVE,
                         extra=(("host", o.machine),))
            self.offer_at.append([replace(base, usd_per_hour=p) for _, p in o.prices])
        hold_mean = trace.reclaim_hold_h

        def hold(rnd: random.Random) -> float:
            return rnd.expovariate(1.0 / hold_mean) if hold_mean > 0 else 0.0

        factor = {m.id: m.hazard_factor for m in trace.machines}
        self.true_hazard: list[float] = []
        self.reclaims: list[Reclaim] = []
        sigma = trace.hazard_noise
        for i, o in enumerate(trace.offers):
            rnd = random.Random(f"{seed}/{o.id}")  # one stream per offer: the same for every policy
            true = o.hazard_per_hour * factor[o.machine] * math.exp(rnd.gauss(0.0, sigma) - sigma * sigma / 2)
            self.true_hazard.append(true)
            t = 0.0
            while true > 0:
                t += rnd.expovariate(true)
                if t >= trace.horizon_h:
                    break
                warn = rnd.random() < o.warning_prob
                self.reclaims.append(Reclaim(t, i, warn, hold(rnd)))
        # waves: one stream per (wave, machine), drawn whether or not anything runs there
        self.wave_hits: list[WaveHit] = []
        for k, w in enumerate(trace.waves):
            for m, mid in enumerate(self.machine_ids):
                scoped = frozenset(i for i in self.machine_offers[m] if w.matches(self.tracks[i]))
                if not scoped:
                    continue
                rnd = random.Random(f"{seed}/wave{k}/{mid}")
                if rnd.random() < w.share:
                    warn = rnd.random() < max(self.tracks[i].warning_prob for i in scoped)
                    self.wave_hits.append(WaveHit(w.t_h, k, m, scoped, warn, hold(rnd)))
        # outbids: per bid and price step, (uniform draw, warning, hold), the same for every policy
        self.outbid_draws: dict[int, list[tuple[float, bool, float]]] = {}
        for i, o in enumerate(trace.offers):
            if o.bid:
                rnd = random.Random(f"{seed}/{o.id}/outbid")
                self.outbid_draws[i] = [(rnd.random(), rnd.random() < o.warning_prob, hold(rnd)) for _ in o.prices]
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
        by_wave: dict[int, list[WaveHit]] = {}
        for h in self.wave_hits:
            by_wave.setdefault(h.wave, []).append(h)
            events.append((h.t + h.hold_h, HOLD_END, h.machine, 0, None))
        for k, hits in by_wave.items():
            events.append((trace.waves[k].t_h, WAVE, k, 0, hits))
        events.sort(key=lambda e: (e[0], e[1], e[2], e[3]))
        self.events = events
        self.jobs = [JobInfo.build(trace, j) for j in sorted(trace.jobs, key=lambda j: (j.arrival_h, j.id))]
        self.cache: dict[str, Any] = {}  # what is derived from the market once (the bounds' eligible offers)

    def launch_fails(self, offer: int, job: str, launch: int) -> bool:
        """Whether launch number ``launch`` (1-based, counting every launch of the job) of ``job``
        on ``offer`` fails: one draw per (offer, job, launch number), so runs are reproducible and
        policies that launch the same job on the same offer meet the same luck."""
        p = self.tracks[offer].launch_fail_prob
        return p > 0 and random.Random(f"{self.seed}/{self.tracks[offer].id}/{job}/{launch}").random() < p


@dataclass
class JobInfo:
    """What every policy knows about a job (and the truth, which only the simulator uses:
    ``track.speed_factor``, ``speed_truth``, ``write_h``)."""

    track: JobTrack
    spec: dict[str, Any]  # as the daemon holds it
    spec_no_deadline: dict[str, Any]  # the same hard constraints, no deadline (for baselines)
    est: Estimate  # from the published table, before any calibration
    steps: int
    save_steps: int
    deadline_epoch: float | None
    a100_hours: float
    write_h: float = 0.0  # one checkpoint save + upload, hours (the truth)
    speed_truth: Mapping[str, float] = field(default_factory=dict)  # GPU model -> real / tabled throughput
    gpus: int = 1  # the GPU count the job asks for: it is shown offers with exactly that many

    @classmethod
    def build(cls, trace: Trace, j: JobTrack) -> JobInfo:
        spec = trace.job_spec(j)
        bare = copy.deepcopy(spec)
        bare["policy"]["deadline"] = None
        est = estimate(spec)
        save = (spec.get("checkpoint") or {}).get("interval") or spec.get("save_steps") or 50
        gpus = int((spec.get("resources") or {}).get("gpus", 1) or 1)
        return cls(j, spec, bare, est, est.steps, int(save),
                   None if j.deadline_h is None else trace.epoch(j.deadline_h), est.hours("A100-80GB") or 0.0,
                   j.checkpoint_write_s / 3600.0, trace.speed_truth, gpus)

    def true_hours(self, offer: Offer) -> float:
        """Uninterrupted training hours on this offer, without checkpoint writes (the truth)."""
        h = self.est.hours(offer.gpu, offer.gpu_count or 1)
        assert h is not None, offer.gpu
        return h * self.track.speed_factor / self.speed_truth.get(offer.gpu, 1.0)


# ------------------------------------------------------------------------------------------------
# One policy's run
# ------------------------------------------------------------------------------------------------
class AttemptLog(NamedTuple):
    offer: str  # the trace's offer id, provider/offer_id
    start: float
    end: float
    cost: float
    how: str  # finished | reclaimed[ (wave)| (outbid)][, warned] | launch failed | horizon
    from_step: int
    to_step: int  # the steps committed when it ended
    saves: int = 0  # checkpoints completed in this attempt


@dataclass
class JobRun:
    info: JobInfo
    committed: int = 0
    spent: float = 0.0
    attempts: int = 0  # launches, failed ones included
    preemptions: int = 0
    launch_failures: int = 0
    not_before: float = 0.0
    started_h: float | None = None
    finished_h: float | None = None
    failed: str | None = None  # "preempted too often" | "launch failed N times" | ...
    redone_h: float = 0.0
    overhead_h: float = 0.0  # start-up and reload hours paid by every attempt after the first, and failed launches
    write_h: float = 0.0  # checkpoint save hours paid
    lost_usd: float = 0.0  # what the redone work, the extra start-ups/reloads and failed launches cost
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
    restart: bool  # not the job's first launch: its start-up and reload are restart overhead
    from_step: int
    failing: bool = False  # its launch fails at ``finish`` (after the start-up)
    save_first: int = 0  # the first step it saves at (>= the job's steps: none)
    save_every: int = 1
    write_h: float = 0.0
    alive: bool = True

    def progress(self, now: float) -> tuple[float, int, int, float]:
        """At ``now``: (step reached, last step saved, saves completed, hours spent saving)."""
        steps = self.job.info.steps
        s, first, every, step_h, c = self.from_step, self.save_first, self.save_every, self.step_h, self.write_h
        w = max(0.0, now - self.start - self.startup_h)
        if self.failing:
            return float(s), s, 0, 0.0
        t1 = (first - s) * step_h
        if first >= steps or w < t1:
            return min(float(steps), s + w / step_h), s, 0, 0.0
        w -= t1
        n_saves = (steps - 1 - first) // every + 1
        period = every * step_h + c
        k = min(int(w // period) if period > 0 else 0, n_saves - 1)
        phase = w - k * period
        at = first + k * every
        if phase < c:  # saving checkpoint ``at``: training stands at it, the save is not done yet
            return float(at), (first + (k - 1) * every if k else s), k, k * c + phase
        return min(float(steps), at + (phase - c) / step_h), at, k + 1, (k + 1) * c


@dataclass
class RunResult:
    policy: str
    jobs: list[JobRun]
    rank_calls: int
    reclaims_hit: int = 0
    reclaims_warned: int = 0
    wave_reclaims: int = 0
    outbids: int = 0
    launch_failures: int = 0
    horizon_h: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Policy:
    """Where to put a waiting job now, or None to keep it waiting.

    ``choose`` returns an ``Offer`` (one of those shown), a ``Choice(offer, interval_h)``, or
    None. ``observe`` hears every ended attempt and failed launch. ``simulate`` runs the policy
    on a market (a bound overrides it)."""

    name = "policy"
    interruptions = True  # False: reclaims, waves and outbids never end this policy's attempts (diagnostics)

    def __init__(self) -> None:
        self.rank_calls = 0

    def rank(self, spec, est, offers, **kw):
        self.rank_calls += 1
        return scheduler.rank(spec, est, offers, **kw)

    def estimate(self, job: JobRun) -> Estimate:
        """The estimate this policy places the job with (the published table; learners override)."""
        return job.info.est

    def decide(self, job: JobRun, spec: dict[str, Any], offers: list[Offer], now_epoch: float,
               avoid: frozenset, blocked: Mapping[tuple[str, str], float] | None = None,
               est: Estimate | None = None, checkpoint_s: float | None = None, **usage: Any) -> Any:
        """``orchestrator.decide.decide`` exactly as the daemon calls it, with what the simulator
        knows: the offers free now, the ones lost in the last 60 s, the ones blocked after a failed
        launch (until when, epoch seconds), the money spent, the steps committed (no budget caps:
        the traces carry none). ``usage`` adds ``Usage`` fields this version of decide knows."""
        self.rank_calls += 1
        known = {f.name for f in dataclasses.fields(deciding.Usage)}
        extra = {k: v for k, v in usage.items() if k in known}
        u = deciding.Usage(avoid={k: now_epoch + AVOID_S for k in avoid}, blocked=dict(blocked or {}), **extra)
        view = deciding.JobView(job.info.track.id, spec, job.spent, job.committed, checkpoint_s)
        return deciding.decide(view, job.info.est if est is None else est, offers, [], u, now_epoch)

    @staticmethod
    def unblocked(offers: list[Offer], blocked: Mapping[tuple[str, str], float] | None) -> list[Offer]:
        """The offers a policy that does not call decide may use: blocked ones are not used (the daemon's rule)."""
        return [o for o in offers if _key(o) not in blocked] if blocked else offers

    def gives_up(self, job: JobRun, now_epoch: float) -> bool:
        return False

    def observe(self, outcome: Outcome) -> None:
        """Called after every attempt ends and after every failed launch."""

    def choose(self, job: JobRun, offers: list[Offer], now_epoch: float, avoid: frozenset,
               blocked: Mapping[tuple[str, str], float] | None = None) -> Offer | Choice | None:
        raise NotImplementedError

    def simulate(self, market: Market, max_preemptions: int = MAX_PREEMPTIONS,
                 max_launch_failures: int = MAX_LAUNCH_FAILURES) -> RunResult:
        return Simulator(market, self, max_preemptions, max_launch_failures).run()


class Simulator:
    def __init__(self, market: Market, policy: Policy, max_preemptions: int = MAX_PREEMPTIONS,
                 max_launch_failures: int = MAX_LAUNCH_FAILURES):
        self.m = market
        self.policy = policy
        self.max_preemptions = max_preemptions
        self.max_launch_failures = max_launch_failures

    def run(self) -> RunResult:
        m, trace, pol = self.m, self.m.trace, self.policy
        n_mach = len(m.machine_ids)
        listed = [False] * n_mach
        hold_until = [0.0] * n_mach
        occupied: list[Attempt | None] = [None] * n_mach
        price_idx = [0] * len(m.tracks)
        available: dict[int, Offer] = {}
        avoid: dict[tuple[str, str], float] = {}
        blocked: dict[tuple[str, str], float] = {}  # until, trace hours
        jobs = [JobRun(info) for info in m.jobs]
        waiting: list[JobRun] = []
        heap: list[tuple[float, int, int, Any]] = []  # (t, kind, seq, payload)
        seq = 0
        ARRIVE, FINISH, WAKE, FREE = 0, 1, 2, 3
        for jr in jobs:
            heapq.heappush(heap, (jr.info.track.arrival_h, ARRIVE, seq, jr))
            seq += 1
        result = RunResult(pol.name, jobs, 0, horizon_h=trace.horizon_h)
        open_jobs = len(jobs)

        def push(t: float, kind: int, payload: Any) -> None:
            nonlocal seq
            heapq.heappush(heap, (t, kind, seq, payload))
            seq += 1

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

        def end_attempt(att: Attempt, now: float, how: str, interrupted: bool = False, warned: bool = False,
                        saved: int | None = None) -> None:
            att.alive = False
            jr, info = att.job, att.job.info
            cost = att.price * (now - att.start)
            jr.spent += cost
            if att.failing:  # a failed launch: all of it is overhead
                paid = now - att.start
                jr.overhead_h += paid
                jr.lost_usd += cost
            elif att.restart:  # the start-up and reload actually paid (a reclaim may cut them short)
                paid = min(now - att.start, att.startup_h)
                jr.overhead_h += paid
                jr.lost_usd += paid * att.price
            _, _, saves, write_h = att.progress(now)
            jr.write_h += write_h
            jr.log.append(AttemptLog(m.tracks[att.offer].id, att.start, now, cost, how, att.from_step,
                                     jr.committed if saved is None else saved, saves))
            occupied[att.machine] = None
            offer = m.offer_at[att.offer][0]
            trained = not att.failing and now - att.start > att.startup_h
            pol.observe(Outcome(
                job=info.track.id, offer=replace(offer, usd_per_hour=att.price), host=m.machine_ids[att.machine],
                hours=now - att.start, interrupted=interrupted, warned=interrupted and warned,
                launch_failed=att.failing,
                tokens_per_s=info.est.tokens / (att.step_h * info.steps * 3600.0) if trained else None,
                checkpoint_write_s=att.write_h * 3600.0 if saves else None))

        def start(jr: JobRun, offer_i: int, now: float, interval_h: float | None) -> None:
            offer = available[offer_i]
            info = jr.info
            full_h = info.true_hours(offer)
            step_h = full_h / info.steps
            jr.attempts += 1
            failing = m.launch_fails(offer_i, info.track.id, jr.attempts)
            resume = jr.committed > 0
            c = jr.committed
            if failing:
                startup_h = offer.startup_s / 3600.0
                first, every, finish = info.steps, 1, now + startup_h
            else:
                startup_h = offer.startup_s / 3600.0 + (reload_hours(info.est.model.params_b) if resume else 0.0)
                if interval_h is not None:  # time-based: every interval_h hours of training from here
                    every = max(1, math.ceil(interval_h / step_h - 1e-9))
                    first = c + every
                else:  # the job's save_steps: at its multiples, as the Trainer saves
                    every = max(1, info.save_steps)
                    first = (c // every + 1) * every
                n_saves = (info.steps - 1 - first) // every + 1 if first < info.steps else 0
                finish = now + startup_h + (info.steps - c) * step_h + n_saves * info.write_h
            mach = m.offer_machine[offer_i]
            att = Attempt(jr, offer_i, mach, now, offer.usd_per_hour, startup_h, step_h, finish,
                          restart=jr.attempts > 1, from_step=c, failing=failing, save_first=first,
                          save_every=every, write_h=info.write_h)
            occupied[mach] = att
            refresh(mach, now)
            if jr.started_h is None:
                jr.started_h = now
            push(finish, FINISH, att)

        def requeue(jr: JobRun, now: float, backoff_h: float) -> None:
            jr.not_before = now + backoff_h
            waiting.append(jr)
            if backoff_h > 0:
                push(jr.not_before, WAKE, None)

        def preempt(att: Attempt, warning: bool, now: float, kind: str = "") -> None:
            nonlocal open_jobs
            jr = att.job
            reached, saved, _, _ = att.progress(now)
            kept = max(jr.committed, saved, int(reached) if warning else 0)  # SIGTERM: saves the step it is on
            jr.redone_h += (reached - kept) * att.step_h
            jr.lost_usd += (reached - kept) * att.step_h * att.price
            jr.committed = kept
            end_attempt(att, now, "reclaimed" + kind + (", warned" if warning else ""), interrupted=True,
                        warned=warning)
            jr.preemptions += 1
            result.reclaims_hit += 1
            result.reclaims_warned += warning
            avoid[_key(m.offer_at[att.offer][0])] = now + AVOID_S / 3600.0
            if jr.preemptions > self.max_preemptions:
                jr.failed = f"preempted {jr.preemptions} times"
                open_jobs -= 1
                return
            requeue(jr, now, daemon_backoff_h(jr.preemptions))

        def launch_failed(att: Attempt, now: float) -> None:
            nonlocal open_jobs
            jr = att.job
            end_attempt(att, now, "launch failed")
            jr.launch_failures += 1
            result.launch_failures += 1
            key = _key(m.offer_at[att.offer][0])
            blocked[key] = max(blocked.get(key, 0.0), now + LAUNCH_BLOCK_S / 3600.0)
            push(blocked[key], WAKE, None)
            if jr.launch_failures >= self.max_launch_failures:
                jr.failed = f"launch failed {jr.launch_failures} times"
                open_jobs -= 1
                return
            requeue(jr, now, 0.0)  # LAUNCH_FAILED has no job back-off: the next offer, at once

        def place(now: float) -> None:
            nonlocal open_jobs
            if not waiting or not available:
                return
            now_epoch = trace.epoch(now)
            live_avoid = frozenset(k for k, t in avoid.items() if t > now)
            live_blocked = {k: trace.epoch(t) for k, t in blocked.items() if t > now}
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
                want = jr.info.gpus
                offers = [o for o in available.values() if o.gpu_count == want]  # exact count, as providers filter
                if not offers:
                    keep.append(jr)
                    continue
                choice = pol.choose(jr, offers, now_epoch, live_avoid, live_blocked)
                if choice is None:
                    keep.append(jr)
                    continue
                offer, interval = (choice.offer, choice.interval_h) if isinstance(choice, Choice) else (choice, None)
                idx = m.index.get(_key(offer))
                if idx is None or idx not in available or m.tracks[idx].gpu_count != want:
                    raise ValueError(f"{pol.name} chose {_key(offer)}, which it was not shown")
                if _key(offer) in live_blocked:
                    raise ValueError(f"{pol.name} chose {_key(offer)}, blocked after a failed launch")
                if interval is not None and not interval > 0:
                    raise ValueError(f"{pol.name}: interval_h must be > 0, got {interval!r}")
                start(jr, idx, now, interval)
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
                    new = m.offer_at[a][b].usd_per_hour
                    price_idx[a] = b
                    if a in available:
                        available[a] = m.offer_at[a][b]
                        dirty = new < old
                    mach = m.offer_machine[a]
                    att = occupied[mach]
                    if (att is not None and att.offer == a and pol.interruptions and a in m.outbid_draws
                            and new > old and new > att.price and trace.outbid_k > 0):
                        u, warn, hold_h = m.outbid_draws[a][b]
                        if u < min(1.0, trace.outbid_k * (new / att.price - 1.0)):  # outbid
                            hold_until[mach] = max(hold_until[mach], now + hold_h)
                            push(now + hold_h, FREE, mach)
                            preempt(att, warn, now, " (outbid)")
                            result.outbids += 1
                            refresh(mach, now)
                            dirty = True
                elif kind == RECLAIM:
                    mach = m.offer_machine[a]
                    hold_until[mach] = max(hold_until[mach], now + payload.hold_h)
                    att = occupied[mach]
                    if att is not None and att.offer == a and pol.interruptions:
                        preempt(att, payload.warning, now)
                        dirty = True
                    refresh(mach, now)
                elif kind == WAVE:
                    for hit in payload:
                        mach = hit.machine
                        hold_until[mach] = max(hold_until[mach], now + hit.hold_h)
                        att = occupied[mach]
                        if att is not None and att.offer in hit.offers and pol.interruptions:
                            preempt(att, hit.warning, now, " (wave)")
                            result.wave_reclaims += 1
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
                        if att.failing:
                            launch_failed(att, now)
                        else:
                            att.job.committed = att.job.info.steps
                            end_attempt(att, now, "finished")
                            att.job.finished_h = now
                            open_jobs -= 1
                        refresh(att.machine, now)
                        dirty = True
                elif kind == FREE:
                    dirty = refresh(payload, now)
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
