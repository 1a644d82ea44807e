"""The queue daemon: the only stateful loop. Watch live attempts, then place queued jobs.

Why it is shaped this way:
- Every decision is written to the store *before* it is acted on (an attempt row before the
  launch), and every transition appends an event, so a daemon killed at any point can be
  restarted and finish the story: attempts are named after their ids, so it finds them again.
- **No provider call and no object-storage call runs on the loop** (``orchestrator.calls``): each
  runs on a worker with a deadline, the loop waits a bounded moment for the answers and acts on
  those that came back. One slow provider cannot delay the stops and polls of the others, and the
  tick length is measured, so the budget horizon is sized from what the loop really does.
- It learns how an attempt is doing only from the provider (alive? exit code?) and from the
  checkpoint store (``progress.json``, the final adapter), so local and remote attempts look the
  same to it. It talks to a payload only through the store: the control object
  (``<job>/control.json``: stop now, or by when at the latest).
- What each outcome means is read from tables (``orchestrator.outcomes``); where a queued job goes
  is ``orchestrator.decide.decide``, the same function ``tunefleet offers`` and the market
  simulator call.
- One daemon per home: an exclusive lock file. SIGTERM/SIGINT stop it in order (exit 0), whatever
  handlers Ray installed when a provider opened.

The loop's parts: ``watch`` (live attempts), ``ending`` (an attempt's end and its job's next
state), ``placing`` (queued jobs), ``spending`` (billing and caps).
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from infra.config import Config
from infra.logging import get_logger
from infra.storage import CheckpointStore, open_store
from orchestrator.calls import Calls
from orchestrator.decide import Code
from orchestrator.ending import EndingMixin
from orchestrator.health import Health
from orchestrator.leader import DaemonLock, DaemonLocked, LeaderLock  # noqa: F401 - DaemonLock*: moved, still importable here
from orchestrator.learning import MarketModel
from orchestrator.queue import final_eval_loss
from orchestrator.placing import SETTLE_S, PlacingMixin
from orchestrator.reconcile import ReconcileMixin
from orchestrator.remote import RemoteMixin
from orchestrator.spending import Caps
from orchestrator.states import JobState
from orchestrator.store import AttemptRow, JobRow, Store
from orchestrator.sweep import survivors, trial_spec
from orchestrator.watch import WatchMixin
from providers.base import Provider
from providers.registry import build_providers

IDLE_HORIZON_S = 300.0  # --until-idle waits for a job that will be looked at again within this long
TICK_WAIT_S = 1.0  # the most one tick waits for provider and store answers, in all


class LostLeadership(RuntimeError):
    """The daemon lock was lost while running (see orchestrator.leader)."""


class Daemon(WatchMixin, EndingMixin, PlacingMixin, RemoteMixin, ReconcileMixin):
    """Runs the queue. ``tick()`` is one full pass; ``run()`` loops it until told to stop."""

    def __init__(
        self,
        store: Store,
        config: Config,
        providers: dict[str, Provider],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.config = config
        self.providers = providers
        self.clock = clock
        self.log = get_logger(component="daemon")
        self.calls = Calls(wall=lambda: self.clock())
        self.health = Health(store, disable_s=config.provider_disable_s, clock=clock, scale=config.time_scale)
        self.caps = Caps(store, config.budget_monthly_usd, self._committed)
        self.stop = threading.Event()
        self._stores: dict[str, CheckpointStore] = {}
        self._estimates: dict[str, Any] = {}  # job id -> Estimate (None when it cannot be made)
        self._market: MarketModel | None = None  # learned hazards (orchestrator.learning), read on first use
        self._ckpt_cost: dict[tuple[str, str], float | None] = {}  # (model, method) -> measured checkpoint s
        self._avoid: dict[tuple[str, str], float] = {}  # (provider, offer) -> until: ranks last
        self._blocked: dict[tuple[str, str], float] = {}  # (provider, offer) -> until: not used
        self._checked: dict[str, float] = {}  # job id -> when placement was last decided
        self._freed = False  # an attempt ended since the last placement pass
        self._freed_at = 0.0
        self._records: dict[str, dict[str, Any]] = {}  # attempt id -> its launch record
        self._progress: dict[str, dict[str, Any]] = {}  # attempt id -> its payload's last progress.json
        self._control: dict[str, dict[str, Any]] = {}  # attempt id -> control object written last
        self._seen: dict[str, float] = {}  # attempt id -> sign of life this tick (flushed once)
        self._cancelling: dict[str, float] = {}  # attempt id -> when this daemon first tried to cancel it
        self._reread: set[str] = set()  # attempts ended without a word from their payload: reads started
        self._newest: dict[str, int | None] = {}  # ... and the newest committed checkpoint step those found
        self._unopened: set[str] = set()  # providers whose open() failed: tried again later
        self._creds_until: dict[str, float] = {}  # attempt id -> when its renewed store credentials expire
        self._listed: dict[str, float] = {}  # provider -> when the reconciler last listed its machines
        self._offer_cache: dict[tuple[str, str], tuple[float, list]] = {}  # (provider, job shape) -> (until, offers)
        self._store_tries: dict[str, int] = {}  # job id -> its store's unanswered reads in a row
        self._sweep_of: dict[str, str | None] = {}  # job id -> its sweep (never changes)
        self._ticks: deque[float] = deque(maxlen=60)  # measured intervals between tick starts (s)
        self._last_tick: float | None = None
        self._tick_wait_left = TICK_WAIT_S
        self.slow_ticks = 0  # ticks that took longer than TICK_WAIT_S of work (figures for benchmarks)
        self.ticks_run = 0

    # ---- helpers shared by the parts ----
    def _ckpt_store(self, job: JobRow) -> CheckpointStore:
        uri = (job.spec.get("checkpoint") or {}).get("store") or self.config.default_store
        if uri not in self._stores:
            self._stores[uri] = open_store(uri)
        return self._stores[uri]

    def _launch_record(self, att: AttemptRow) -> dict[str, Any]:
        """What the daemon wrote when it created this attempt (offer, estimate): its one record."""
        if att.id not in self._records:
            created = next((e for e in self.store.events(att.job_id)
                            if e.kind == "attempt_created" and e.attempt_id == att.id), None)
            self._records[att.id] = created.data if created else {}
        return self._records[att.id]

    def _committed(self, att: AttemptRow) -> float:
        return float(self._launch_record(att).get("est_usd") or 0.0)

    def _sweep(self, job_id: str) -> str | None:
        if job_id not in self._sweep_of:
            self._sweep_of[job_id] = self.store.get_job(job_id).sweep_id
        return self._sweep_of[job_id]

    def _forget(self, attempt_id: str) -> None:
        for cache in (self._progress, self._control, self._seen, self._cancelling, self._creds_until):
            cache.pop(attempt_id, None)
        self._reread.discard(attempt_id)
        self._newest.pop(attempt_id, None)

    def _tick_s(self) -> float:
        """How long the loop takes to come round (measured; at least the poll interval)."""
        measured = max(self._ticks) if self._ticks else 0.0
        return max(measured, self.config.poll_interval_s, 0.1)

    def _wait(self, keys: list, most_s: float | None = None) -> None:
        """Wait for these calls, out of the tick's budget of waiting (so a tick stays bounded)."""
        budget = self._tick_wait_left if most_s is None else min(most_s, self._tick_wait_left)
        if budget <= 0 or not keys:
            return
        t0 = time.monotonic()
        self.calls.settle(keys, budget)
        self._tick_wait_left -= time.monotonic() - t0

    # ---- the loop ----
    def _open_providers(self) -> None:
        """Connect each provider from the main thread (Ray wants it); one that fails is disabled for
        a while and opened again later, and its attempts are watched as unknown meanwhile."""
        for name in list(self.providers):
            self._open(name)

    def _open(self, name: str) -> bool:
        try:
            self.providers[name].open()
        except Exception as exc:  # noqa: BLE001 - any failure to open disables the provider, not the daemon
            self.health.unavailable(name, f"could not open: {exc}", outage=True)
            self.log.error("provider unavailable", provider=name, reason=str(exc))
            self._unopened.add(name)
            return False
        self._unopened.discard(name)
        return True

    def _reopen(self) -> None:
        """Try again the providers that failed to open, once their time off is over (main thread)."""
        opened = [name for name in sorted(self._unopened) if self.health.usable(name) and self._open(name)]
        for name in opened:
            self.health.success(name)
            self.log.info("provider open again", provider=name)
        if opened:
            self._install_signals()

    def _install_signals(self) -> None:
        """SIGTERM/SIGINT stop the loop in order. Installed after the providers opened: ``ray.init``
        replaces SIGTERM's handler with one that exits 15 without an orderly stop."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())

    def run(self, *, until_idle: bool = False, max_seconds: float | None = None,
            lock: LeaderLock | None = None) -> None:
        """Tick until stopped. With ``lock``, stop (LostLeadership) as soon as it is no longer held:
        another daemon may be running the queue by then."""
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        self._open_providers()
        self._install_signals()
        self.log.info("daemon started", providers=sorted(self.providers), until_idle=until_idle)
        try:
            while not self.stop.is_set():
                if lock is not None and not lock.held():
                    self.log.error("lost the daemon lock (store unreachable?); stopping: a standby may lead now")
                    raise LostLeadership("lost the daemon lock; another daemon may run the queue now")
                self.tick()
                if until_idle and self.idle():
                    self.log.info("nothing queued or running; exiting (--until-idle)")
                    break
                if deadline is not None and time.monotonic() > deadline:
                    self.log.warning("max run time reached; exiting", max_seconds=max_seconds)
                    break
                self.stop.wait(self.config.poll_interval_s)
        finally:
            self.calls.shutdown()
            self.log.info("daemon stopped; running attempts are left running and adopted on restart")

    def idle(self) -> bool:
        """Nothing running, nothing being launched, and every queued job waits for a stated reason
        that will not change within ``IDLE_HORIZON_S``: ``--until-idle`` may exit."""
        now = self.clock()
        if self.store.live_attempts() or self.calls.in_flight(kinds=("launch", "offers", "latest")):
            return False
        if self.calls.unread(("destroy",)):  # an orphan's destroy: its answer is recorded before exiting
            return False
        if self._freed or now - self._freed_at < self.config.scaled(SETTLE_S):
            return False  # capacity was just freed: let the providers' views settle and look again
        horizon = self.config.scaled(IDLE_HORIZON_S)
        soon_back = any((until or now) <= now + horizon for _, until in self.health.down().values())
        for job in self.store.list_jobs([JobState.QUEUED]):
            if job.not_before > now + horizon:
                continue
            if job.wait_code is None or job.not_before > now:
                return False  # not decided yet, or backing off briefly
            if job.wait_until is not None and job.wait_until <= now + horizon:
                return False
            if job.wait_code == Code.PROVIDERS_DOWN and soon_back:
                return False  # a provider it waits for is back within the horizon
        return True

    def tick(self) -> None:
        t0 = time.monotonic()
        self.ticks_run += 1
        if self._last_tick is not None:
            self._ticks.append(t0 - self._last_tick)
        self._last_tick = t0
        self._tick_wait_left = TICK_WAIT_S
        if self._unopened:
            self._reopen()
        self._watch()
        self._finish_ended_attempts()
        try:
            self._reconcile()
        except Exception as exc:  # noqa: BLE001 - cleaning up must not stop the queue
            self.log.exception("reconciling machines failed", error=str(exc))
        try:
            self._advance_sweeps()
        except Exception as exc:  # noqa: BLE001 - a sweep's bookkeeping must not stop the queue
            self.log.exception("sweep step failed", error=str(exc))
        self._place()
        if time.monotonic() - t0 > 2 * TICK_WAIT_S:
            self.slow_ticks += 1

    # ---- sweeps: successive halving moves a sweep to its next rung when a rung is done ----
    def _eval_loss(self, job_id: str) -> float | None:
        return final_eval_loss(self.store, job_id)

    def _end_early(self, sweep_id: str, trials: list[dict[str, Any]], rung: int, why: str) -> None:
        """A rung no trial finished (its budget ran out, or every trial failed): the sweep ends with
        the best adapter of an earlier rung if there is one (``done``), else ``failed``."""
        done = [(t["rung"], t["job_id"]) for t in trials if t["rung"] < rung and t["state"] is JobState.SUCCEEDED]
        if not done:
            self.store.update_sweep(sweep_id, state="failed", reason=why)
            self.log.warning("sweep failed", sweep_id=sweep_id, reason=why)
            return
        top = max(r for r, _ in done)
        results = [(job_id, self._eval_loss(job_id)) for r, job_id in done if r == top]
        best = survivors(results, len(results))[:1] or [results[0][0]]
        reason = f"{why}; the best adapter so far is from rung {top}"
        self.store.update_sweep(sweep_id, state="done", best_job_id=best[0], reason=reason)
        self.log.warning("sweep ended early", sweep_id=sweep_id, reason=reason, best=best[0])

    def _advance_sweeps(self) -> None:
        for sweep_id in self.store.active_sweeps():
            sweep = self.store.get_sweep(sweep_id)
            plan, rung = sweep["spec"], sweep["rung"]
            trials = self.store.trials(sweep_id)
            current = [t for t in trials if t["rung"] == rung]
            if not current or any(not t["state"].terminal for t in current):
                continue
            results = [(t["job_id"], self._eval_loss(t["job_id"]) if t["state"] is JobState.SUCCEEDED else None)
                       for t in current]
            last = rung >= len(plan["rungs"]) - 1
            if last:
                best = survivors(results, len(results) or 1)[:1] or [t["job_id"] for t in current
                                                                       if t["state"] is JobState.SUCCEEDED][:1]
                if best:
                    self.store.update_sweep(sweep_id, state="done", best_job_id=best[0], reason=None)
                    self.log.info("sweep done", sweep_id=sweep_id, best=best)
                else:
                    self._end_early(sweep_id, trials, rung, "no trial finished the last rung")
                continue
            keep = survivors(results, plan["sweep"]["halving"]["eta"])
            if not keep:
                self._end_early(sweep_id, trials, rung, f"no trial finished rung {rung} with an eval loss")
                continue
            already = {t["trial"] for t in trials if t["rung"] == rung + 1}
            by_job = {t["job_id"]: t for t in current}
            for job_id in keep:
                t = by_job[job_id]
                if t["trial"] in already:  # written before a crash: never twice
                    continue
                spec = trial_spec(plan["base"], t["params"], max_steps=plan["rungs"][rung + 1], resume_from=job_id,
                                  store_uri=self.store.get_job(job_id).spec["checkpoint"]["store"])
                self.store.add_trial(sweep_id, trial=t["trial"], rung=rung + 1, params=t["params"], spec=spec,
                                     name=f"{sweep['name']}/t{t['trial']}/r{rung + 1}")
            self.store.update_sweep(sweep_id, rung=rung + 1)
            self.log.info("sweep rung done", sweep_id=sweep_id, rung=rung, kept=keep)


def launchable_providers(config: Config) -> dict[str, Provider]:
    """The providers this daemon places on: every one whose launch path exists."""
    providers, broken = build_providers(config, launchable_only=True)
    for name, why in broken.items():
        get_logger(component="daemon").warning("provider unavailable", provider=name, reason=why)
    return providers
