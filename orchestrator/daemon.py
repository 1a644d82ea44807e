"""The queue daemon: the only stateful loop. Reconcile running attempts, then place queued jobs.

Why it is shaped this way:
- Every decision is written to the store *before* it is acted on (an attempt row before the
  launch), and every transition appends an event, so a daemon killed at any point can be
  restarted and finish the story: attempts are named after their ids, so it finds them again.
- It learns how an attempt is doing only from the provider (is it alive? exit code?) and from
  the checkpoint store (``progress.json``, committed checkpoints, the final adapter), so local
  and remote attempts look the same to it.
- Exit codes: 0 = done (only if the final adapter is committed), 75 = preempted after saving,
  killed by a signal or capacity lost = preempted (resume from the newest committed checkpoint),
  2 = bad input (no retry), anything else = failure (bounded retries).
- One daemon per home: an exclusive lock file.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.config import Config
from infra.logging import get_logger
from infra.storage import CheckpointStore, StorageError, open_store
from jobs.estimate import estimate
from orchestrator.budget import Cap, launch_refusal, month_start, must_stop
from orchestrator.scheduler import rank
from orchestrator.sweep import survivors, trial_spec
from orchestrator.states import AttemptState, JobState
from orchestrator.store import AttemptRow, InvalidTransition, JobRow, Store
from providers.base import LaunchRequest, PriceSource, Provider, ProviderError, RunState, RunStatus
from providers.registry import build_providers, gather_offers

EXIT_PREEMPTED = 75  # mirrors jobs.train.EXIT_PREEMPTED (the payload's side of the contract)
EXIT_BAD_INPUT = 2
BATCH = 50  # queued jobs considered per tick
RECHECK_S = 10.0  # how often a job waiting for capacity or budget is looked at again
SETTLE_S = 3.0  # after an attempt ends, providers' views of free capacity may lag this long
_SIGNAL_EXITS = {-signal.SIGKILL: "SIGKILL", -signal.SIGTERM: "SIGTERM", 137: "SIGKILL", 143: "SIGTERM"}


class DaemonLocked(RuntimeError):
    """Another daemon already runs on this state store."""


class DaemonLock:
    """An exclusive ``flock`` on ``<home>/daemon.lock``; released by the kernel if we die."""

    def __init__(self, home: Path):
        self.path = home / "daemon.lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise DaemonLocked(
                f"a tunefleet daemon is already running on {self.path.parent} (pid {holder}); "
                "stop it first, or point TUNEFLEET_HOME at another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class _Outcome:
    state: AttemptState
    reason: str
    job_state: JobState | None = None  # set when the job's fate is not implied by the attempt's


def classify_exit(code: int | None) -> _Outcome:
    """Map a payload exit code to what it means for the attempt (one total function)."""
    if code == 0:
        return _Outcome(AttemptState.SUCCEEDED, "payload finished")
    if code == EXIT_PREEMPTED:
        return _Outcome(AttemptState.PREEMPTED, "payload saved a checkpoint and exited after SIGTERM")
    if code in _SIGNAL_EXITS:
        return _Outcome(AttemptState.PREEMPTED, f"payload killed by {_SIGNAL_EXITS[code]}")
    if code == EXIT_BAD_INPUT:
        return _Outcome(AttemptState.FAILED, "payload rejected its input (exit 2)")
    return _Outcome(AttemptState.FAILED, f"payload failed with exit code {code}")


def _log_tail(path: str | None, lines: int = 12) -> str:
    if not path or not os.path.isfile(path):
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 8192))
        text = f.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


class Daemon:
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
        self._stores: dict[str, CheckpointStore] = {}
        self._waiting: dict[str, str] = {}  # job id -> reason it is waiting (event written once)
        self._checked: dict[str, float] = {}  # job id -> when placement was last tried
        self._freed = False  # an attempt ended since the last placement pass
        self._freed_at = 0.0
        self._pool = None  # one thread pool for asking providers, for the daemon's lifetime
        self._avoid: dict[tuple[str, str], float] = {}  # (provider, offer) -> until
        self._estimates: dict[str, Any] = {}  # job id -> Estimate (None when it cannot be made)
        self.stop = threading.Event()

    # ---- helpers ----
    def _ckpt_store(self, job: JobRow) -> CheckpointStore:
        uri = (job.spec.get("checkpoint") or {}).get("store") or self.config.default_store
        if uri not in self._stores:
            self._stores[uri] = open_store(uri)
        return self._stores[uri]

    def _handle(self, att: AttemptRow) -> dict[str, Any] | None:
        prov = self.providers.get(att.provider)
        if att.handle:
            return att.handle
        return prov.handle_for(att.id) if prov else None

    def _progress(self, job: JobRow, att: AttemptRow) -> dict[str, Any] | None:
        try:
            doc = self._ckpt_store(job).read_json(job.id, "progress.json")
        except StorageError:
            return None
        return doc if doc and doc.get("attempt_id") == att.id else None

    # ---- the loop ----
    def run(self, *, until_idle: bool = False, max_seconds: float | None = None) -> None:
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        for name, prov in list(self.providers.items()):
            try:
                prov.open()
            except ProviderError as exc:
                self.log.error("provider unavailable", provider=name, reason=str(exc))
                del self.providers[name]
        self.log.info("daemon started", providers=sorted(self.providers), until_idle=until_idle)
        while not self.stop.is_set():
            self.tick()
            if until_idle and self.idle():
                self.log.info("nothing queued or running; exiting (--until-idle)")
                break
            if deadline is not None and time.monotonic() > deadline:
                self.log.warning("max run time reached; exiting", max_seconds=max_seconds)
                break
            self.stop.wait(self.config.poll_interval_s)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self.log.info("daemon stopped; running attempts are left running and adopted on restart")

    def idle(self) -> bool:
        if self.store.live_attempts() or self._freed or self.clock() - self._freed_at < SETTLE_S:
            return False  # capacity was just freed: let the providers' views settle and look again
        return all(job_id in self._waiting for job_id in self.store.queued_ids())

    def tick(self) -> None:
        self._finish_ended_attempts()
        for att in self.store.live_attempts():
            try:
                self._reconcile(att)
            except Exception as exc:  # one bad attempt must not stop the daemon
                self.log.exception("reconcile failed", job_id=att.job_id, attempt_id=att.id, error=str(exc))
        try:
            self._advance_sweeps()
        except Exception as exc:  # a sweep's bookkeeping must not stop the queue
            self.log.exception("sweep step failed", error=str(exc))
        self._place()

    # ---- sweeps: successive halving moves a sweep to its next rung when a rung is done ----
    def _eval_loss(self, job_id: str) -> float | None:
        job = self.store.get_job(job_id)
        final = self._ckpt_store(job).final(job_id)
        loss = (final.meta if final else {}).get("eval_loss")
        return float(loss) if isinstance(loss, (int, float)) else None

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
                self.store.update_sweep(sweep_id, state="done" if best else "failed",
                                        best_job_id=best[0] if best else None,
                                        reason=None if best else "no trial finished")
                self.log.info("sweep done", sweep_id=sweep_id, best=best)
                continue
            keep = survivors(results, plan["sweep"]["halving"]["eta"])
            if not keep:
                self.store.update_sweep(sweep_id, state="failed", reason=f"no trial finished rung {rung} with an eval loss")
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

    # ---- reconcile one live attempt ----
    def _reconcile(self, att: AttemptRow) -> None:
        log = self.log.bind(job_id=att.job_id, attempt_id=att.id)
        job = self.store.get_job(att.job_id)
        prov = self.providers.get(att.provider)
        handle = self._handle(att)
        if prov is None or handle is None:
            why = (f"provider {att.provider} is not configured in this daemon" if prov is None
                   else "the launch was never recorded and the provider cannot find it")
            self._end(att, job, _Outcome(AttemptState.FAILED, why), None, log)
            return
        if job.cancel_requested:
            prov.cancel(handle, grace_s=self.config.stop_grace_s)
            self._end(att, job, _Outcome(AttemptState.CANCELLED, "cancelled by the user"), None, log)
            return
        over = self._budget_overrun(att, job)
        if over is not None:
            self.store.add_event(job.id, "budget_stop", f"stopping: {over}", attempt_id=att.id,
                                 data={"usd_per_hour": att.usd_per_hour})
            log.warning("budget stop", reason=over)
            prov.cancel(handle, grace_s=self.config.stop_grace_s)  # SIGTERM: save, commit, leave
            self._end(att, job, _Outcome(AttemptState.CANCELLED, f"stopped by budget: {over}",
                                         JobState.STOPPED_BUDGET), None, log, self._progress(job, att))
            return
        if att.preempt_request:
            hard = att.preempt_request == "hard"
            delivered = prov.signal(handle, hard=hard)
            self.store.clear_preempt_request(att.id)
            self.store.add_event(
                job.id, "preempt_delivered" if delivered else "preempt_not_delivered",
                f"{'SIGKILL' if hard else 'SIGTERM'} {'sent to' if delivered else 'could not reach'} the payload",
                attempt_id=att.id, data={"hard": hard},
            )
            log.info("preempt drill", hard=hard, delivered=delivered)

        status = prov.poll(handle)
        progress = self._progress(job, att)
        if progress:
            self.store.update_progress(
                job.id,
                step=int(progress.get("step") or 0),
                total_steps=progress.get("total_steps"),
                loss=progress.get("loss"),
                checkpoint_step=progress.get("checkpoint_step"),
                checkpoint_uri=progress.get("checkpoint_uri"),
            )
        if progress and progress.get("exit_code") is not None and status.state is not RunState.EXITED:
            # A remote payload's last word is in the store; the provider only sees a machine.
            status = RunStatus(RunState.EXITED, exit_code=int(progress["exit_code"]), detail="reported by the payload")
        if (status.state is RunState.PENDING and att.state is AttemptState.LAUNCHING
                and self.clock() - att.created_at > self.config.launch_timeout_s):
            # capacity never came (or the start was lost): give it back and try elsewhere
            prov.cancel(handle, grace_s=0)
            self._end(att, job, _Outcome(AttemptState.PREEMPTED, f"not running after "
                                         f"{self.config.launch_timeout_s:.0f} s (launch_timeout_s)"), None, log)
            return
        if status.state in (RunState.RUNNING, RunState.PENDING) and att.state is AttemptState.LAUNCHING:
            if status.state is RunState.RUNNING:
                self.store.transition_attempt(
                    att.id, AttemptState.RUNNING, kind="attempt_running",
                    message=f"running on {att.provider} ({status.detail})",
                    expect=[AttemptState.LAUNCHING],
                )
                self.store.transition_job(
                    job.id, JobState.RUNNING, kind="running", message=f"attempt {att.seq} running",
                    expect=[JobState.LAUNCHING],
                )
                log.info("attempt running", detail=status.detail)
            return
        if status.state is RunState.EXITED:
            self._end(att, job, classify_exit(status.exit_code), status.exit_code, log, progress)
        elif status.state is RunState.LOST:
            self._end(att, job, _Outcome(AttemptState.PREEMPTED, status.detail or "capacity lost"), None, log, progress)

    def _finish_ended_attempts(self) -> None:
        """An active job whose attempts have all ended: a daemon died between ending the attempt
        and moving the job on. Release the attempt's machine and finish the job's half of _end."""
        live = {a.job_id for a in self.store.live_attempts()}
        for job in self.store.list_jobs([JobState.LAUNCHING, JobState.RUNNING, JobState.PREEMPTED]):
            att = self.store.latest_attempt(job.id)
            if job.id in live or att is None or att.live:
                continue
            log = self.log.bind(job_id=job.id, attempt_id=att.id)
            log.warning("finishing a job whose attempt ended before a crash", state=att.state.value)
            prov, handle = self.providers.get(att.provider), self._handle(att)
            if prov is not None and handle is not None:
                prov.release(handle)
            reason = (att.end_reason or "").split("\n--- last lines", 1)[0]
            job_state = (JobState.STOPPED_BUDGET if att.state is AttemptState.CANCELLED
                         and reason.startswith("stopped by budget") else None)
            latest = self._ckpt_store(job).latest_checkpoint(job.id)
            end_step = att.end_step if att.end_step is not None else att.start_step
            self._job_after_end(att, job, _Outcome(att.state, reason, job_state), att.exit_code,
                                att.end_reason or reason, latest, end_step)

    def _end(
        self, att: AttemptRow, job: JobRow, outcome: _Outcome, exit_code: int | None, log, progress=None
    ) -> None:
        now = self.clock()
        ckpt_store = self._ckpt_store(job)
        latest = ckpt_store.latest_checkpoint(job.id)
        final = ckpt_store.final(job.id) if outcome.state is AttemptState.SUCCEEDED else None
        if outcome.state is AttemptState.SUCCEEDED and final is None:
            outcome = _Outcome(AttemptState.FAILED, "payload exited 0 but no final adapter was committed")
        end_step = int((progress or {}).get("step") or (latest.step if latest else att.start_step))
        held_h = max(0.0, now - (att.started_at or att.created_at)) / 3600
        spend = att.usd_per_hour * held_h if att.usd_per_hour > 0 else None
        reason = outcome.reason
        if outcome.state is AttemptState.FAILED and (tail := _log_tail(att.log_path)):
            reason = f"{reason}\n--- last lines of {att.log_path} ---\n{tail}"
        self.store.transition_attempt(
            att.id, outcome.state, kind=f"attempt_{outcome.state.value}",
            message=outcome.reason,
            data={"exit_code": exit_code, "end_step": end_step,
                  "checkpoint_step": latest.step if latest else None},
            exit_code=exit_code, end_reason=reason, end_step=end_step, spend_usd=spend,
        )
        self._record_throughput(att, job, progress)
        prov = self.providers.get(att.provider)
        handle = self._handle(att)
        if prov is not None and handle is not None:
            prov.release(handle)
        log.info("attempt ended", state=outcome.state.value, reason=outcome.reason, exit_code=exit_code, end_step=end_step)
        self._job_after_end(att, job, outcome, exit_code, reason, latest, end_step, final)

    def _job_after_end(self, att, job, outcome: _Outcome, exit_code, reason, latest, end_step, final=None) -> None:
        """The job's half of an attempt's end. ``final``: the committed final adapter, if already read."""
        self._freed, self._freed_at = True, self.clock()
        if final is None and outcome.state is AttemptState.SUCCEEDED:
            final = self._ckpt_store(job).final(job.id)
        job = self.store.get_job(job.id)  # a cancel may have been requested meanwhile
        if job.cancel_requested and outcome.state is not AttemptState.SUCCEEDED:
            outcome = _Outcome(AttemptState.CANCELLED, "cancelled by the user")
        if outcome.job_state is JobState.STOPPED_BUDGET:
            self.store.transition_job(
                job.id, JobState.STOPPED_BUDGET, kind="stopped_budget", message=outcome.reason,
                data={"end_step": end_step, "checkpoint_step": latest.step if latest else None},
                reason=outcome.reason,
            )
        elif outcome.state is AttemptState.SUCCEEDED:
            meta = final.meta if final else {}
            self.store.transition_job(
                job.id, JobState.SUCCEEDED, kind="succeeded",
                message=f"finished at step {final.step}; adapter at {final.uri}",
                data={"step": final.step, "adapter_uri": final.uri, "final_loss": meta.get("final_loss")},
                adapter_uri=final.uri, step=final.step,
                loss=meta.get("final_loss"), reason=None,
            )
        elif outcome.state is AttemptState.CANCELLED:
            self.store.transition_job(job.id, JobState.CANCELLED, kind="cancelled", message="cancelled by the user")
        elif outcome.state is AttemptState.PREEMPTED:
            self._requeue_after_preemption(att, job, outcome, latest, end_step)
        else:
            self._retry_or_fail(att, job, reason, exit_code)

    def _record_throughput(self, att: AttemptRow, job: JobRow, progress: dict[str, Any] | None) -> None:
        """Feed what this attempt measured back into later estimates (``jobs.estimate`` calibration)."""
        tps = (progress or {}).get("tokens_per_s")
        if not tps or tps <= 0:
            return
        offer = self._launch_record(att).get("offer") or {}
        if not offer.get("gpu"):
            return
        self.store.record_throughput(
            base_model=job.spec["base_model"], method=job.spec.get("adapter") or "full",
            gpu=offer["gpu"], gpu_count=max(1, int(offer.get("gpu_count") or 1)),
            tokens_per_s=float(tps), attempt_id=att.id,
        )
        self._estimates.pop(job.id, None)

    def _requeue_after_preemption(self, att, job, outcome, latest, end_step) -> None:
        preemptions = sum(1 for a in self.store.attempts_for(job.id) if a.state is AttemptState.PREEMPTED)
        resume = latest.step if latest else 0
        if job.state is not JobState.PREEMPTED:  # already there if a daemon died right after
            self.store.transition_job(
                job.id, JobState.PREEMPTED, kind="preempted",
                message=f"attempt {att.seq} preempted at step {end_step}: {outcome.reason}",
                data={"attempt": att.seq, "end_step": end_step, "checkpoint_step": resume},
                reason=outcome.reason,
            )
        self._avoid[(att.provider, att.offer_id)] = self.clock() + 60
        if preemptions > self.config.max_preemptions:
            self.store.transition_job(
                job.id, JobState.FAILED, kind="failed",
                message=f"preempted {preemptions} times (max_preemptions {self.config.max_preemptions})",
                reason="too many preemptions",
            )
            return
        backoff = min(60.0, 2.0 ** min(preemptions - 1, 6)) if preemptions > 1 else 0.0
        self.store.transition_job(
            job.id, JobState.QUEUED, kind="requeued",
            message=f"will resume from committed checkpoint at step {resume}" if resume
            else "no committed checkpoint yet; will start from step 0",
            data={"resume_from_step": resume, "backoff_s": backoff},
            not_before=self.clock() + backoff,
        )

    def _retry_or_fail(self, att, job, reason: str, exit_code: int | None) -> None:
        failures = sum(1 for a in self.store.attempts_for(job.id) if a.state is AttemptState.FAILED)
        if exit_code == EXIT_BAD_INPUT or failures >= self.config.max_failures:
            why = "bad input" if exit_code == EXIT_BAD_INPUT else f"{failures} failed attempts"
            self.store.transition_job(
                job.id, JobState.FAILED, kind="failed", message=f"{why}: {reason}", reason=reason,
            )
            return
        self._avoid[(att.provider, att.offer_id)] = self.clock() + 60
        self.store.transition_job(
            job.id, JobState.QUEUED, kind="requeued",
            message=f"attempt {att.seq} failed; retrying ({failures}/{self.config.max_failures})",
            data={"backoff_s": 5.0}, not_before=self.clock() + 5.0,
        )

    # ---- queued jobs (a queued job's cancel is finished by Store.request_cancel itself) ----
    # ---- budgets ----
    def _horizon_s(self) -> float:
        """How long an attempt may run before the daemon can next stop it (and it has stopped)."""
        return 2 * self.config.poll_interval_s + self.config.stop_grace_s + 5.0

    def _accrued(self, att: AttemptRow, now: float) -> float:
        return att.usd_per_hour * max(0.0, now - (att.started_at or att.created_at)) / 3600.0

    def _launch_record(self, att: AttemptRow) -> dict[str, Any]:
        """What the daemon wrote when it created this attempt (offer, estimate): its one record."""
        created = next((e for e in self.store.events(att.job_id)
                        if e.kind == "attempt_created" and e.attempt_id == att.id), None)
        return created.data if created else {}

    def _committed(self, att: AttemptRow, now: float) -> float:
        est = self._launch_record(att).get("est_usd") or 0.0
        return max(0.0, est - self._accrued(att, now))

    def _monthly_cap(self, now: float, exclude: str | None = None) -> Cap | None:
        limit = self.config.budget_monthly_usd
        if limit is None:
            return None
        live = [a for a in self.store.live_attempts() if a.id != exclude]
        return Cap("monthly budget", limit, self.store.spend_since(month_start(now)),
                   running_usd=sum(self._accrued(a, now) for a in live),
                   committed_usd=sum(self._committed(a, now) for a in live))

    def _sweep_cap(self, sweep_id: str, now: float) -> Cap:
        sweep = self.store.get_sweep(sweep_id)
        live = [a for a in self.store.live_attempts() if self.store.get_job(a.job_id).sweep_id == sweep_id]
        return Cap(f"sweep {sweep_id} budget_usd", sweep["budget_usd"], self.store.sweep_spend(sweep_id),
                   running_usd=sum(self._accrued(a, now) for a in live),
                   committed_usd=sum(self._committed(a, now) for a in live))

    def _budget_overrun(self, att: AttemptRow, job: JobRow) -> str | None:
        """Why this running attempt must stop now to keep recorded spend under a cap, or None."""
        if att.usd_per_hour <= 0:
            return None
        now = self.clock()
        horizon = self._horizon_s()
        max_usd = (job.spec.get("policy") or {}).get("max_usd")
        if max_usd is not None:
            cap = Cap(f"job {job.id} policy.max_usd", max_usd, job.cost_usd, self._accrued(att, now))
            if must_stop(cap, att.usd_per_hour, horizon):
                return f"${cap.spent_usd + cap.running_usd:.2f} of its ${max_usd:.2f} cap spent"
        if job.sweep_id:
            sweep_cap = self._sweep_cap(job.sweep_id, now)
            sweep_cap = Cap(sweep_cap.scope, sweep_cap.limit_usd, sweep_cap.spent_usd, sweep_cap.running_usd)
            rate = sum(a.usd_per_hour for a in self.store.live_attempts()
                       if self.store.get_job(a.job_id).sweep_id == job.sweep_id)
            if must_stop(sweep_cap, rate, horizon):
                return f"the sweep's ${sweep_cap.limit_usd:.2f} budget would be crossed"
        monthly = self._monthly_cap(now)
        if monthly is not None:
            monthly = Cap(monthly.scope, monthly.limit_usd, monthly.spent_usd, monthly.running_usd)
            # every live attempt keeps accruing over the horizon: stop the ones that push it over
            rate = sum(a.usd_per_hour for a in self.store.live_attempts())
            if must_stop(monthly, rate, horizon):
                return f"the monthly budget ${monthly.limit_usd:.2f} would be crossed"
        return None

    def _offer_pool(self):
        import concurrent.futures as cf

        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(max_workers=max(1, len(self.providers)), thread_name_prefix="offers")
        return self._pool

    def _estimate(self, job: JobRow):
        if job.id not in self._estimates:
            try:
                method = job.spec.get("adapter") or "full"
                self._estimates[job.id] = estimate(job.spec, self.store.calibration(job.spec["base_model"], method))
            except Exception as exc:  # an estimate is advice; never let it block placement
                self.log.warning("no estimate", job_id=job.id, error=str(exc))
                self._estimates[job.id] = None
        return self._estimates[job.id]

    def _place(self) -> None:
        now = self.clock()
        self._avoid = {k: t for k, t in self._avoid.items() if t > now}
        # Jobs already waiting for capacity are looked at again every RECHECK_S, not every tick,
        # and never hold up the jobs behind them: read past them until BATCH fresh ones.
        if self._freed:  # an attempt ended: capacity came back, so every waiting job is due now
            self._checked.clear()
            self._freed = False
        batch = self.store.next_queued(now, limit=BATCH + len(self._waiting))
        fresh = [j for j in batch if j.id not in self._waiting][:BATCH]
        settling = now - self._freed_at < SETTLE_S  # right after an attempt ended, look every tick
        due = [j for j in batch if j.id in self._waiting
               and (settling or now - self._checked.get(j.id, 0.0) >= RECHECK_S)]
        for job in fresh + due:
            self._checked[job.id] = now
            log = self.log.bind(job_id=job.id)
            if job.sweep_id and self._sweep_full(job.sweep_id):
                continue
            allowed = (job.spec.get("policy") or {}).get("providers")
            providers = {n: p for n, p in self.providers.items()
                         if (not allowed or n in allowed) and not self._provider_full(n)}
            est = self._estimate(job)
            result = gather_offers(providers, job.spec, est, pool=self._offer_pool())
            # a snapshot price is a quote, not something that can be rented (no credentials)
            rentable = [o for o in result.offers if o.price_source is not PriceSource.SNAPSHOT]
            latest = self._ckpt_store(job).latest_checkpoint(job.id)
            placements = rank(
                job.spec, est, rentable, now=now, avoid=self._avoid, spent_usd=job.cost_usd,
                done_steps=latest.step if latest else 0,
            )
            viable = [p for p in placements if p.viable]
            policy = job.spec.get("policy") or {}
            if not viable and policy.get("deadline") and any("deadline" in p.reason for p in placements):
                # Late beats never: run it on the best offer that ignores only the deadline, and say so.
                relaxed = {**job.spec, "policy": {**policy, "deadline": None}}
                late = [p for p in rank(relaxed, est, rentable, now=now, avoid=self._avoid,
                                        spent_usd=job.cost_usd, done_steps=latest.step if latest else 0) if p.viable]
                if late:
                    if self._waiting.get(job.id) != "late":
                        self.store.add_event(job.id, "late", "no offer can meet the deadline; running on the best "
                                             "one anyway", data={"offer": late[0].offer.offer_id,
                                                                 "finish_at": late[0].finish_at})
                        self._waiting[job.id] = "late"
                    viable = late[:1]
            if not viable:
                reasons = [f"{p.offer.provider}/{p.offer.offer_id}: {p.reason}" for p in placements[:5]]
                reasons += [f"{name}: {why}" for name, why in sorted(result.problems.items())]
                why = "no viable offer: " + ("; ".join(reasons) if reasons else "no provider offered capacity")
                if self._waiting.get(job.id) != why:
                    self._waiting[job.id] = why
                    self.store.add_event(job.id, "waiting", why, data={"offers": len(placements)})
                    log.warning("job waiting", reason=why)
                continue
            chosen = viable[0]
            caps = [c for c in (self._monthly_cap(now),) if c is not None]
            if job.sweep_id:
                caps.append(self._sweep_cap(job.sweep_id, now))
            refusal = launch_refusal(caps, chosen.est_usd)
            if refusal is not None:
                why, never = refusal
                if never:
                    self.store.transition_job(job.id, JobState.FAILED, kind="failed",
                                              message=f"can never fit: {why}", reason=why)
                elif self._waiting.get(job.id) != why:
                    self._waiting[job.id] = why
                    self.store.add_event(job.id, "waiting", f"budget: {why}")
                    log.warning("job waiting for budget", reason=why)
                continue
            self._waiting.pop(job.id, None)
            self._checked.pop(job.id, None)
            self._launch(job, chosen, log, latest.step if latest else 0, len(viable))

    def _provider_full(self, provider: str) -> bool:
        limit = self.config.provider_limit(provider)
        return limit is not None and sum(1 for a in self.store.live_attempts() if a.provider == provider) >= limit

    def _sweep_full(self, sweep_id: str) -> bool:
        sweep = self.store.get_sweep(sweep_id)
        running = sum(1 for a in self.store.live_attempts() if self.store.get_job(a.job_id).sweep_id == sweep_id)
        return running >= int(sweep["spec"]["sweep"]["max_parallel"])

    def _launch(self, job: JobRow, placement, log, start_step: int, n_viable: int) -> None:
        offer = placement.offer
        try:
            att = self.store.create_attempt(
                job.id, provider=offer.provider, offer_id=offer.offer_id,
                usd_per_hour=offer.usd_per_hour, start_step=start_step,
                data={"offer": offer.to_dict(), "why": placement.reason, "est_usd": placement.est_usd,
                      "est_hours": placement.est_hours, "risk": placement.risk, "viable_offers": n_viable},
            )
        except InvalidTransition:
            return  # cancelled or moved by someone else meanwhile
        log = log.bind(attempt_id=att.id)
        log_path = str(self.config.attempt_log(att.id))
        resources = job.spec.get("resources") or {}
        request = LaunchRequest(
            job_id=job.id,
            attempt_id=att.id,
            spec=job.spec,
            store_uri=self._ckpt_store(job).uri,
            gpus=offer.gpu_count,
            cpus=int(resources.get("cpus", 1)),
            log_path=log_path,
            secrets=store_secrets(self._ckpt_store(job).uri),
        )
        prov = self.providers[offer.provider]
        try:
            handle = prov.launch(request, offer)
        except ProviderError as exc:
            self.store.transition_attempt(
                att.id, AttemptState.FAILED, kind="launch_failed", message=str(exc), end_reason=str(exc)
            )
            self._avoid[(offer.provider, offer.offer_id)] = self.clock() + 60
            self.store.transition_job(
                job.id, JobState.QUEUED, kind="requeued", message=f"launch failed: {exc}",
                not_before=self.clock() + 5.0,
            )
            log.warning("launch failed", error=str(exc))
            return
        self.store.transition_attempt(
            att.id, AttemptState.LAUNCHING, kind="launched",
            message=f"launched on {offer.provider} ({offer.offer_id}), resuming from step {att.start_step}",
            data={"handle": handle}, handle=handle, log_path=log_path,
        )
        log.info("attempt launched", provider=offer.provider, offer=offer.offer_id, start_step=att.start_step)


_S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
           "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def store_secrets(store_uri: str) -> dict[str, str]:
    """What a payload elsewhere needs to reach the checkpoint store: the daemon's own S3 settings."""
    if not store_uri.startswith("s3://"):
        return {}
    return {k: os.environ[k] for k in _S3_ENV if os.environ.get(k)}


def launchable_providers(config: Config) -> dict[str, Provider]:
    """The providers this daemon places on: every one whose launch path exists."""
    providers, broken = build_providers(config, launchable_only=True)
    for name, why in broken.items():
        get_logger(component="daemon").warning("provider unavailable", provider=name, reason=why)
    return providers
