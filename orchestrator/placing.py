"""Placing queued jobs: ask the providers for offers (off the loop), ``decide``, and launch.

Jobs are looked at in the queue's order (priority, then oldest). A job that is waiting is looked
at again every ``RECHECK_S``, at the time its wait names (a backoff, a budget reset), or as soon as
an attempt ends (capacity came back); it never holds up the jobs behind it.

For one job: every provider it may use that is not backing off is asked for offers, and the store
for the job's newest checkpoint, each on its own worker with a deadline. Once all have answered (or
passed their deadline: that provider is backed off and the decision is made without it), the
answers go through ``orchestrator.decide.decide``. A launch is recorded before it is asked for, then
asked for off the loop; a provider that says "no capacity" gets the job placed again at once on the
next offer, and no attempt is charged.
"""

from __future__ import annotations

import json
from typing import Any

from infra.storage import StorageError
from jobs.estimate import estimate
from jobs.spec import MAX_CHECKPOINT_INTERVAL_S
from orchestrator.calls import CallTimeout
from orchestrator.decide import Code, Decision, JobView, Usage, Verdict, decide
from orchestrator.learning import MarketModel
from orchestrator.states import JobState
from orchestrator.store import InvalidTransition, JobRow
from providers.base import LaunchRequest, ProviderNotConfigured, ProviderUnavailable, TransientError
from providers.registry import OFFERS_TIMEOUT_S  # a provider that has not answered with offers by then is backed off

BATCH = 50  # queued jobs considered per tick
RECHECK_S = 10.0  # how often a job waiting for capacity or budget is looked at again
TRIES_PER_PASS = 3  # a job whose launch said "no capacity" is placed again at once, this often per pass
SETTLE_S = 3.0  # after an attempt ends, providers' views of free capacity may lag this long


class PlacingMixin:
    """Part of ``orchestrator.daemon.Daemon``."""

    def _estimate(self, job: JobRow):
        if job.id not in self._estimates:
            try:
                method = job.spec.get("adapter") or "full"
                self._estimates[job.id] = estimate(job.spec, self.store.calibration(job.spec["base_model"], method))
            except Exception as exc:  # noqa: BLE001 - an estimate is advice; never let it block placement
                self.log.warning("no estimate", job_id=job.id, error=str(exc))
                self._estimates[job.id] = None
        return self._estimates[job.id]

    def _place(self) -> None:
        now = self.clock()
        self._avoid = {k: t for k, t in self._avoid.items() if t > now}
        self._blocked = {k: t for k, t in self._blocked.items() if t > now}
        if self._freed:  # an attempt ended: capacity came back, so every waiting job is due now
            self._checked.clear()
            self._freed = False
        batch = self.store.next_queued(now, limit=BATCH + len(self._checked))
        settling = now - self._freed_at < self.config.scaled(SETTLE_S)  # right after an attempt ended, look every tick
        fresh = [j for j in batch if j.wait_code is None][:BATCH]
        due = [j for j in batch if j.wait_code is not None
               and (settling or (j.wait_until is not None and now >= j.wait_until)
                    or now - self._checked.get(j.id, 0.0) >= self.config.scaled(RECHECK_S))]
        live = self.store.live_attempts()
        counts: dict[str, int] = {}
        for a in live:
            counts[a.provider] = counts.get(a.provider, 0) + 1
        for job in fresh + due:
            try:
                for _ in range(TRIES_PER_PASS + 1):  # after the last try, one more decision says why it waits
                    if not self._place_one(job, live, counts):
                        break
                    job = self.store.get_job(job.id)
                    if job.state is not JobState.QUEUED or job.not_before > self.clock():
                        break
            except (StorageError, OSError, CallTimeout) as exc:
                self._store_trouble(job, exc)
            except Exception as exc:  # noqa: BLE001 - one job's trouble must not stop the queue
                self.log.exception("placing a job failed", job_id=job.id, error=str(exc))
                self.store.set_waiting(job.id, Code.ERROR, f"placing it failed: {type(exc).__name__}: {exc}",
                                       self.clock() + self.config.scaled(60.0))

    def _checkpoint_cost(self, job: JobRow) -> float | None:
        """The measured seconds of one checkpoint for the job's model and method (None: not yet),
        read once and forgotten when an attempt measures a new one (``_record_exposure``)."""
        key = (job.spec["base_model"], job.spec.get("adapter") or "full")
        if key not in self._ckpt_cost:
            self._ckpt_cost[key] = self.store.checkpoint_cost(*key)
        return self._ckpt_cost[key]

    def _market_model(self) -> MarketModel:
        """What attempts have shown about hazards: read from the store once, then kept up to date
        by each attempt's end (``_record_exposure``)."""
        if self._market is None:
            self._market = MarketModel(self.store.exposure_tallies())
        return self._market

    @staticmethod
    def _shape(job: JobRow, est: Any) -> str:
        """What a provider's answer depends on: jobs of one shape share one offers call."""
        s = job.spec
        return json.dumps([s.get("resources"), s.get("base_model"), s.get("adapter"),
                           None if est is None else [round(est.vram_gb, 2), est.tokens]], sort_keys=True)

    def _ask_offers(self, job: JobRow, est: Any) -> tuple[list[Any], list[str]]:
        """Start the offers calls this job needs (one per provider it may use that is not backing
        off, unless a fresh answer for its shape is cached) and the read of its newest checkpoint.
        Returns (call keys, checkpoint read last; the providers asked or cached)."""
        allowed = (job.spec.get("policy") or {}).get("providers")
        shape = self._shape(job, est)
        now = self.clock()
        keys: list[Any] = []
        names = []
        for name, prov in sorted(self.providers.items()):
            if (allowed and name not in allowed) or not self.health.usable(name) or name in self._unopened:
                continue
            names.append(name)
            hit = self._offer_cache.get((name, shape))
            if hit is not None and hit[0] > now:
                continue
            key = ("offers", name, shape)
            keys.append(key)
            self.calls.start(name, key, prov.offers, job.spec, est, timeout_s=OFFERS_TIMEOUT_S)
        keys.append(("latest", job.id))
        self.calls.start("store", keys[-1], self._ckpt_store(job).latest_checkpoint, job.id,
                         timeout_s=self.config.call_timeout_s)
        return keys, names

    def _forget_offers(self, provider: str) -> None:
        """Its capacity changed (a launch, an end): its cached answers are stale."""
        self._offer_cache = {k: v for k, v in self._offer_cache.items() if k[0] != provider}

    def _place_one(self, job: JobRow, live: list, counts: dict[str, int]) -> bool:
        """Decide for one job and act; True when it launched (or tried to) and may be tried again."""
        self._checked[job.id] = self.clock()
        est = self._estimate(job)
        keys, names = self._ask_offers(job, est)
        self._wait(keys)
        ttl = self.clock() + self.config.scaled(RECHECK_S)
        asking = False
        for key in keys[:-1]:  # keep every answer that came, even if another is still awaited
            name = key[1]
            done, result, err = self.calls.take(key)
            if not done:  # within its deadline (an overdue call comes back done, as a CallTimeout)
                asking = True  # judged by this take alone: a call that finishes just after it is
                # still in flight, taken next time, never skipped as if it had been taken
            elif err is None:
                self._offer_cache[(name, key[2])] = (ttl, list(result))
                self.health.success(name, kind="offers")
            else:
                self._offers_failed(name, err)
        read = self.calls.get(keys[-1])  # the checkpoint read: taken below only once it is done
        if asking or (read is not None and not read.done and not read.overdue(self.calls.clock())):
            return False  # still asking: decided when every answer is in (or late)
        shape = self._shape(job, est)
        offers: list[Any] = []
        for name in names:
            hit = self._offer_cache.get((name, shape))
            if hit is not None:
                offers += hit[1]
        done, latest, err = self.calls.take(keys[-1])
        if err is not None:
            raise err if isinstance(err, (StorageError, OSError, CallTimeout)) else StorageError(f"checkpoint store: {err}")
        now = self.clock()
        usage = Usage(live=dict(counts), limits=dict(self.config.provider_limits), down=self.health.down(),
                      disabled=self.health.disabled(),
                      launchable=frozenset(self.providers), avoid=self._avoid, blocked=self._blocked,
                      sweep_full=bool(job.sweep_id) and self._sweep_full(job.sweep_id, live),
                      owned_tolerance=self.config.owned_tolerance, market=self._market_model())
        self._store_tries.pop(job.id, None)  # its store answered
        done_steps = latest.step if latest else 0
        caps = self.caps.for_launch(job, now, live, self._sweep)
        ckpt_s = self._checkpoint_cost(job)
        d = decide(JobView(job.id, job.spec, job.cost_usd, done_steps, ckpt_s), est, offers, caps, usage, now)
        if d.launches:
            return self._launch(job, d, done_steps, live, counts)
        if d.verdict is Verdict.WAIT:
            if self.store.set_waiting(job.id, d.code, d.text, d.until, data={"offers": len(d.placements)}):
                self.log.warning("job waiting", job_id=job.id, code=str(d.code), reason=d.text)
            return False
        self.store.transition_job(job.id, JobState.FAILED, kind="failed", message=f"refused: {d.text}",
                                  reason=d.text, data={"code": str(d.code)})
        self.log.warning("job refused", job_id=job.id, code=str(d.code), reason=d.text)
        return False

    def _offers_failed(self, name: str, err: BaseException) -> None:
        if isinstance(err, ProviderUnavailable):
            self.health.unavailable(name, str(err), outage=not isinstance(err, ProviderNotConfigured))
        elif isinstance(err, TransientError):
            self.health.transient(name, str(err), err.retry_after_s, kind="offers")
        elif isinstance(err, CallTimeout):
            self.health.transient(name, f"offers: {err}", kind="offers")
        else:  # a bug in one provider is a warning, not a crash
            self.health.transient(name, f"offers failed: {type(err).__name__}: {err}", kind="offers")

    def _sweep_full(self, sweep_id: str, live: list) -> bool:
        sweep = self.store.get_sweep(sweep_id)
        running = sum(1 for a in live if self._sweep(a.job_id) == sweep_id)
        return running >= int(sweep["spec"]["sweep"]["max_parallel"])

    def _store_trouble(self, job: JobRow, exc: BaseException) -> None:
        """The job's checkpoint store failed: its problem alone. Transient: back the job off.
        Permanent (no such bucket, access denied): fail it with the reason, which says the fix."""
        if getattr(exc, "transient", False) or isinstance(exc, CallTimeout):
            tries = self._store_tries[job.id] = self._store_tries.get(job.id, 0) + 1
            wait = self.config.scaled(min(600.0, 15.0 * 2 ** (tries - 1)))
            self.store.set_waiting(job.id, Code.STORE_UNAVAILABLE, f"checkpoint store unavailable: {exc}",
                                   self.clock() + wait, data={"retry_in_s": wait, "attempt": tries})
            self.log.warning("job's store unavailable", job_id=job.id, error=str(exc))
            return
        try:
            self.store.transition_job(job.id, JobState.FAILED, kind="failed", message=f"checkpoint store: {exc}",
                                      reason=f"checkpoint store: {exc}", data={"code": "store_failed"})
        except InvalidTransition:
            pass
        self.log.error("job failed: its checkpoint store refused us", job_id=job.id, error=str(exc))

    def _launch(self, job: JobRow, d: Decision, start_step: int, live: list, counts: dict[str, int]) -> bool:
        placement = d.placement
        offer = placement.offer
        record = {"offer": offer.to_dict(), "why": placement.reason, "est_usd": placement.est_usd,
                  "est_hours": placement.est_hours, "risk": placement.risk, "interval_h": placement.interval_h,
                  "viable_offers": sum(p.viable for p in d.placements), "decision": str(d.code),
                  "rented_alt": _rented_alternative(d.placements, offer)}
        try:
            att = self.store.create_attempt(job.id, provider=offer.provider, offer_id=offer.offer_id,
                                            usd_per_hour=offer.usd_per_hour, start_step=start_step, data=record)
        except InvalidTransition:
            return False  # cancelled or moved by someone else meanwhile
        self._records[att.id] = record
        if d.verdict is Verdict.LATE:
            self.store.add_event(job.id, "late", d.text, attempt_id=att.id,
                                 data={"offer": offer.offer_id, "finish_at": placement.finish_at})
        self._checked.pop(job.id, None)
        ckpt = self._ckpt_store(job)
        log_path = str(self.config.attempt_log(att.id))
        request = LaunchRequest(
            job_id=job.id, attempt_id=att.id, spec=_with_interval(job.spec, placement.interval_h), store_uri=ckpt.uri,
            gpus=offer.gpu_count,
            cpus=int((job.spec.get("resources") or {}).get("cpus", 1)), log_path=log_path,
        )
        prov = self.providers[offer.provider]
        key = ("launch", att.id)
        # lease, store credentials and code first (orchestrator.remote), then the provider's launch
        self.calls.start(offer.provider, key, self._launch_call, prov, request, offer, ckpt,
                         timeout_s=self.config.call_timeout_s)
        counts[offer.provider] = counts.get(offer.provider, 0) + 1
        live.append(att)
        self._forget_offers(offer.provider)
        self._wait([key])
        self._harvest_launch(self.store.get_attempt(att.id), job)
        return True


def _with_interval(spec: dict[str, Any], interval_h: float | None) -> dict[str, Any]:
    """The spec this attempt runs: with the placement's checkpoint interval (time-based, Young/Daly
    for its hazard) when it is shorter than the job's own; the job's step interval stays a ceiling."""
    if interval_h is None:
        return spec
    ckpt = dict(spec.get("checkpoint") or {})
    mine = ckpt.get("interval_s")
    ckpt["interval_s"] = round(min(interval_h * 3600.0, mine or float("inf"), MAX_CHECKPOINT_INTERVAL_S), 1)
    return {**spec, "checkpoint": ckpt}


def _rented_alternative(placements, chosen) -> dict | None:
    """On owned capacity: the cheapest viable rented offer it was chosen over (by the expected cost
    of the whole job), so the dashboard can say what owning saved. None elsewhere, or with none."""
    if chosen.provider != "local":
        return None
    rented = [p for p in placements if p.viable and p.offer.provider != "local" and p.est_usd is not None]
    if not rented:
        return None
    alt = min(rented, key=lambda p: p.est_usd)
    return {"provider": alt.offer.provider, "offer_id": alt.offer.offer_id, "gpu": alt.offer.gpu,
            "usd_per_hour": alt.offer.usd_per_hour, "est_usd": alt.est_usd}
