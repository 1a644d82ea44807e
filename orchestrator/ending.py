"""How an attempt ends and what that means for its job: one path, driven by ``outcomes.END_RULES``.

Why one path: an attempt can end because a poll saw the payload exit, a provider lost the machine,
a launch failed, the user cancelled, a budget stop finished, or a restarted daemon found the job's
attempt already ended before a crash. Every one of them records the attempt's end (state, end code,
spend, in one transaction) and then moves the job on by the same table, so the bounds
(``max_failures``, ``max_launch_failures``, ``max_preemptions``, ``max_attempts``) hold whatever the
cause and no outcome is recognised by reading message text.
"""

from __future__ import annotations

import os
from typing import Any

from jobs.exits import EXIT_PREEMPTED
from orchestrator import spending
from orchestrator.learning import Exposure
from orchestrator.outcomes import END_RULES, Counter, JobAction
from orchestrator.states import ACTIVE_JOB_STATES, AttemptState, EndReason, JobState
from orchestrator.store import AttemptRow, InvalidTransition, JobRow

# end codes that count against each bound
_COUNTED = {c: frozenset(r for r, rule in END_RULES.items() if rule.counter is c) for c in Counter}


def log_tail(path: str | None, lines: int = 12) -> str:
    if not path or not os.path.isfile(path):
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 8192))
        text = f.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


class EndingMixin:
    """Part of ``orchestrator.daemon.Daemon``."""

    def _end(self, att: AttemptRow, job: JobRow, reason: EndReason, text: str, *, exit_code: int | None = None,
             watched: bool = True, billed: bool = True, final: dict[str, Any] | None = None,
             ended_at: float | None = None) -> None:
        """Record the attempt's end (state, code, spend) in one transaction, release its capacity,
        and move the job on. ``watched``: the daemon saw the end happen (billed to now); otherwise
        it is billed to the attempt's last sign of life. ``ended_at``: when the provider stopped
        billing it, where known (a reclaim's time, a destroy's confirmation). ``billed=False``:
        nothing was ever rented (a launch the provider refused). ``final``: the committed adapter's
        facts (uri, step, loss, eval_loss) for a finished attempt."""
        now = self.clock()
        if att.stop_requested_at is not None and reason in (EndReason.PREEMPTED, EndReason.LOST):
            reason, text = EndReason.BUDGET_STOP, f"stopped as asked ({att.stop_reason}); {text}"
        if reason is EndReason.CANCELLED or (self.store.get_job(job.id).cancel_requested
                                               and reason is not EndReason.FINISHED):
            reason = EndReason.CANCELLED
        rule = END_RULES[reason]
        progress = self._progress.get(att.id) or {}
        beat = progress.get("updated_at") if isinstance(progress.get("updated_at"), (int, float)) else None
        heartbeat = max(beat or 0.0, self._seen.get(att.id, 0.0)) or None  # incl. this tick's signs of life
        until = spending.billed_until(att, now, heartbeat, watched=watched, slack_s=self._tick_s(),
                                      provider_end=ended_at)
        cost = spending.spend(att, until) if att.usd_per_hour > 0 and billed else None
        checkpoint_step = progress.get("checkpoint_step") if progress else job.checkpoint_step
        end_step = int(progress.get("step") or checkpoint_step or att.start_step)
        newest = self._newest.get(att.id)  # committed after the payload's last progress write, if so
        if newest is not None and newest > (checkpoint_step or 0):
            checkpoint_step, end_step = newest, max(end_step, newest)
        full = text
        if rule.attempt_state is AttemptState.FAILED and (tail := log_tail(att.log_path)):
            full = f"{text}\n--- last lines of {att.log_path} ---\n{tail}"
        try:
            self.store.transition_attempt(
                att.id, rule.attempt_state, kind=f"attempt_{rule.attempt_state.value}", message=text,
                data={"exit_code": exit_code, "end_step": end_step, "checkpoint_step": checkpoint_step,
                      "end_code": reason.value, "billed_until": until,
                      **({"final": final} if reason is EndReason.FINISHED and final else {})},
                exit_code=exit_code, end_reason=full, end_code=reason, end_step=end_step, spend_usd=cost,
            )
        except InvalidTransition:
            return  # another daemon (or this one, a moment ago) already ended it
        self._record_throughput(att, job, progress)
        try:
            self._record_exposure(att, job, reason, progress, until, exit_code)
        except Exception as exc:  # noqa: BLE001 - learning is advice: it must never hold up an end
            self.log.warning("exposure not recorded", attempt_id=att.id, error=f"{type(exc).__name__}: {exc}")
        self._release(att)
        self._forget_offers(att.provider)
        self.log.info("attempt ended", job_id=job.id, attempt_id=att.id, code=reason.value, reason=text,
                      exit_code=exit_code, end_step=end_step, spend_usd=cost)
        self._job_after_end(att, reason, full, end_step, checkpoint_step, final)

    def _release(self, att: AttemptRow) -> None:
        """Free the attempt's capacity off the loop (idempotent; the provider logs what it could not do)."""
        self._forget(att.id)
        prov = self.providers.get(att.provider)
        if prov is not None and att.handle:
            self.calls.start(att.provider, ("release", att.id), prov.release, att.handle,
                             timeout_s=self.config.call_timeout_s)

    def _bound(self, counter: Counter) -> int:
        return int(getattr(self.config, counter.value))

    def _job_after_end(self, att: AttemptRow, reason: EndReason, text: str, end_step: int,
                       checkpoint_step: int | None, final: dict[str, Any] | None = None) -> None:
        """The job's half of an attempt's end, by ``END_RULES``."""
        if att.handle:  # it held capacity: waiting jobs may fit now
            self._freed, self._freed_at = True, self.clock()
        job = self.store.get_job(att.job_id)
        if job.terminal:
            return
        rule = END_RULES[reason]
        action = rule.action
        if job.cancel_requested and action is not JobAction.SUCCEED:
            action = JobAction.CANCEL
        short = text.split("\n--- last lines", 1)[0]
        if action is JobAction.SUCCEED:
            final = final or {}
            self.store.transition_job(
                job.id, JobState.SUCCEEDED, kind="succeeded",
                message=f"finished at step {final.get('step')}; adapter at {final.get('uri')}",
                data={"step": final.get("step"), "adapter_uri": final.get("uri"),
                      "final_loss": final.get("loss"), "eval_loss": final.get("eval_loss")},
                adapter_uri=final.get("uri"), step=int(final.get("step") or end_step),
                loss=final.get("loss"), reason=None,
            )
        elif action is JobAction.CANCEL:
            self.store.transition_job(job.id, JobState.CANCELLED, kind="cancelled", message="cancelled by the user",
                                      reason="cancelled by the user")
        elif action is JobAction.STOP_BUDGET:
            self.store.transition_job(
                job.id, JobState.STOPPED_BUDGET, kind="stopped_budget", message=short,
                data={"end_step": end_step, "checkpoint_step": checkpoint_step}, reason=short,
            )
        elif action is JobAction.FAIL:
            self.store.transition_job(job.id, JobState.FAILED, kind="failed", message=f"{reason.value}: {short}",
                                      reason=text, data={"code": reason.value})
        else:
            self._requeue(att, job, reason, text, end_step, checkpoint_step)

    def _requeue(self, att: AttemptRow, job: JobRow, reason: EndReason, text: str, end_step: int,
                 checkpoint_step: int | None) -> None:
        rule = END_RULES[reason]
        now = self.clock()
        short = text.split("\n--- last lines", 1)[0]
        key = (att.provider, att.offer_id)
        if rule.avoid_s:
            self._avoid[key] = max(self._avoid.get(key, 0.0), now + self.config.scaled(rule.avoid_s))
        if rule.block_s:
            self._blocked[key] = max(self._blocked.get(key, 0.0), now + self.config.scaled(rule.block_s))
        attempts = self.store.attempts_for(job.id)
        fail_why = None
        if len(attempts) >= self.config.max_attempts:
            fail_why = f"{len(attempts)} attempts (max_attempts {self.config.max_attempts}); last: {short}"
        elif rule.counter is not None:
            count = sum(1 for a in attempts if a.end_code in _COUNTED[rule.counter])
            bound = self._bound(rule.counter)
            # preemptions are survivable up to the bound; failures end the job when they reach it
            over = count > bound if rule.counter is Counter.PREEMPTIONS else count >= bound
            if over:
                fail_why = f"{count} x {reason.value} ({rule.counter.value} {bound}); last: {short}"
        resume = checkpoint_step or 0
        if reason in (EndReason.PREEMPTED, EndReason.LOST, EndReason.STORE_UNAVAILABLE) and job.state in ACTIVE_JOB_STATES \
                and job.state is not JobState.PREEMPTED:
            self.store.transition_job(
                job.id, JobState.PREEMPTED, kind="preempted",
                message=f"attempt {att.seq} {reason.value} at step {end_step}: {short}",
                data={"attempt": att.seq, "end_step": end_step, "checkpoint_step": checkpoint_step,
                      "code": reason.value},
                reason=short,
            )
        if fail_why is not None:
            self.store.transition_job(job.id, JobState.FAILED, kind="failed", message=fail_why, reason=fail_why,
                                      data={"code": reason.value})
            return
        backoff = self.config.scaled(self._backoff(attempts, reason))
        message = (f"will resume from committed checkpoint at step {resume}" if resume
                   else "no committed checkpoint yet; will start from step 0")
        if reason not in (EndReason.PREEMPTED, EndReason.LOST):
            message = f"attempt {att.seq} ended ({reason.value}); {message}"
        self.store.transition_job(job.id, JobState.QUEUED, kind="requeued", message=message,
                                  data={"resume_from_step": resume, "backoff_s": backoff, "code": reason.value},
                                  not_before=now + backoff)
        self._checked.pop(job.id, None)

    @staticmethod
    def _backoff(attempts: list[AttemptRow], reason: EndReason) -> float:
        rule = END_RULES[reason]
        same = sum(1 for a in attempts if a.end_code is reason)
        if reason in (EndReason.PREEMPTED, EndReason.LOST):  # the first preemption resumes at once
            return min(60.0, 2.0 ** min(same - 1, 6)) if same > 1 else 0.0
        if rule.job_backoff_s:
            return min(600.0, rule.job_backoff_s * 2 ** max(0, same - 1))
        return 0.0

    def _finish_ended_attempts(self) -> None:
        """An active job whose attempts have all ended: a daemon died between ending the attempt
        and moving the job on. Finish the job's half from the recorded end code."""
        live = {a.job_id for a in self.store.live_attempts()}
        for job in self.store.list_jobs(ACTIVE_JOB_STATES):
            att = self.store.latest_attempt(job.id)
            if job.id in live or att is None or att.live:
                continue
            try:
                self.log.warning("finishing a job whose attempt ended before a crash", job_id=job.id,
                                 attempt_id=att.id, state=att.state.value)
                self._release(att)
                reason = att.end_code or _legacy_code(att)
                final = None
                if reason is EndReason.FINISHED:
                    final = self._final_from_events(job.id, att.id)
                    if final is None:
                        reason = EndReason.PAYLOAD_FAILED  # its end was recorded without the adapter's facts
                self._job_after_end(att, reason, att.end_reason or reason.value,
                                    att.end_step if att.end_step is not None else att.start_step,
                                    job.checkpoint_step, final)
            except Exception as exc:  # noqa: BLE001 - one job's trouble must not stop the others
                self.log.exception("could not finish a job after a crash", job_id=job.id, error=str(exc))

    def _final_from_events(self, job_id: str, attempt_id: str) -> dict[str, Any] | None:
        for e in reversed(self.store.events(job_id)):
            if e.attempt_id == attempt_id and e.kind == "attempt_succeeded":
                return e.data.get("final")
        return None

    def _record_throughput(self, att: AttemptRow, job: JobRow, progress: dict[str, Any] | None) -> None:
        """Feed what this attempt measured back into later estimates (``jobs.estimate`` calibration)."""
        tps = (progress or {}).get("tokens_per_s")
        if not isinstance(tps, (int, float)) or tps <= 0:
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

    def _record_exposure(self, att: AttemptRow, job: JobRow, reason: EndReason, progress: dict[str, Any],
                         until: float, exit_code: int | None) -> None:
        """Feed the attempt's hours and whether it was interrupted into the market model
        (``orchestrator.learning``), in the store and in this daemon's copy. A launch the host botched
        (failed, never came up, could not set up) counts against its launches, not its hazard; one the
        provider never made (no capacity, API down) says nothing about the host and is left out."""
        if reason in (EndReason.NO_CAPACITY, EndReason.PROVIDER_ERROR):
            return
        failed = reason in (EndReason.LAUNCH_FAILED, EndReason.TIMED_OUT, EndReason.SETUP_FAILED)
        offer = self._launch_record(att).get("offer") or {}
        if not offer.get("gpu"):
            return
        extra = offer.get("extra") or {}
        host = str(extra.get("host") or extra.get("machine_id") or "")
        advertised = extra.get("hazard_advertised", offer.get("hazard_per_hour")) or 0.0
        interruptible = bool(offer.get("interruptible"))
        interrupted = interruptible and not failed and reason in (EndReason.PREEMPTED, EndReason.LOST)
        hours = max(0.0, until - att.billing_start) / 3600.0
        ckpt = progress.get("checkpoint_s")
        tps = progress.get("tokens_per_s")
        exposure = Exposure(att.provider, str(offer["gpu"]), host, float(advertised) if interruptible else 0.0,
                            hours, interrupted, warned=interrupted and exit_code == EXIT_PREEMPTED,
                            launch_failed=failed)
        new = self.store.record_exposure(
            attempt_id=att.id, provider=att.provider, gpu=exposure.gpu, gpu_count=int(offer.get("gpu_count") or 1),
            host=host, offer_id=att.offer_id, interruptible=interruptible, advertised=exposure.advertised,
            hours=hours, interrupted=interrupted, warned=exposure.warned, launch_failed=failed,
            base_model=job.spec.get("base_model"),
            method=job.spec.get("adapter") or "full",
            tokens_per_s=float(tps) if isinstance(tps, (int, float)) and tps > 0 else None,
            checkpoint_s=float(ckpt) if isinstance(ckpt, (int, float)) and ckpt > 0 else None)
        if new and self._market is not None:
            self._market.observe(exposure)
        if new and isinstance(ckpt, (int, float)) and ckpt > 0:
            self._ckpt_cost.pop((job.spec.get("base_model"), job.spec.get("adapter") or "full"), None)


def _legacy_code(att: AttemptRow) -> EndReason:
    """An attempt ended by a tunefleet older than end codes (the v5 migration fills most)."""
    return {AttemptState.SUCCEEDED: EndReason.FINISHED, AttemptState.PREEMPTED: EndReason.PREEMPTED,
            AttemptState.CANCELLED: EndReason.CANCELLED}.get(att.state, EndReason.PAYLOAD_FAILED)
