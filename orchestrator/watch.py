"""Watching live attempts: every tick, ask each provider and the store how each attempt is doing, and act.

For each live attempt the loop starts (off the loop, with deadlines) a poll of its provider and a
read of its payload's ``progress.json``, waits a bounded moment, then acts on what came back:

- a launch still in flight is left alone until it answers or passes its deadline (then the provider
  is asked for the attempt by name; found: adopted; not found: the launch timed out);
- a cancel, a budget stop or a preemption drill is carried out (a stop through the control object:
  the payload saves, commits and exits; after the grace, the provider destroys the resource);
- a poll that saw it alive is a sign of life (billing follows these); RUNNING moves it on; PENDING
  past ``launch_timeout_s`` is cancelled; UNKNOWN past ``unknown_timeout_s`` is treated as lost and
  its resource cancelled; EXITED and LOST end it through ``ending``.
"""

from __future__ import annotations

from typing import Any

from infra.storage import StorageError
from orchestrator import spending
from orchestrator.calls import CallTimeout
from orchestrator.outcomes import ErrorAction, classify_exit, error_action
from orchestrator.remote import LeaseNotWritten
from orchestrator.states import AttemptState, EndReason, JobState
from orchestrator.store import AttemptRow, InvalidTransition, JobRow
from providers.base import ProviderNotConfigured, RunState, RunStatus, TransientError

LEASE_REFRESH_S = 30.0  # the budget lease in the control object is rewritten at most this often
CANCEL_TRIES = 3  # the budget horizon allows this many cancel calls (each up to call_timeout_s) to fail first


class WatchMixin:
    """Part of ``orchestrator.daemon.Daemon``."""

    def _watch(self) -> None:
        live = self.store.live_attempts()
        keys: list[Any] = []
        for att in live:
            try:
                keys += self._ask(att)
            except Exception as exc:  # noqa: BLE001 - one attempt's trouble must not stop the others
                self.log.exception("could not ask about an attempt", attempt_id=att.id, error=str(exc))
        self._wait(keys)
        for att in live:
            try:
                self._watch_one(att, live)
            except Exception as exc:  # noqa: BLE001
                self.log.exception("watching an attempt failed", job_id=att.job_id, attempt_id=att.id,
                                   error=str(exc))
        seen, self._seen = self._seen, {}
        try:
            self.store.mark_seen(seen)
        except Exception as exc:  # noqa: BLE001 - bookkeeping; the next tick writes again
            self.log.warning("could not record signs of life", error=str(exc))

    def _ask(self, att: AttemptRow) -> list[Any]:
        """Start this tick's poll and progress read of one attempt (unless already in flight)."""
        job = self.store.get_job(att.job_id)
        ckpt = self._ckpt_store(job)
        keys: list[Any] = [("progress", att.id)]
        self.calls.start("store", keys[0], ckpt.read_json, job.id, "progress.json",
                         timeout_s=self.config.call_timeout_s)
        prov = self.providers.get(att.provider)
        if (prov is not None and att.handle and att.provider not in self._unopened
                and self.calls.get(("launch", att.id)) is None):
            keys.append(("poll", att.id))
            self.calls.start(att.provider, keys[-1], prov.poll, att.handle, timeout_s=self.config.call_timeout_s)
        return keys

    def _read_progress(self, att: AttemptRow, job: JobRow) -> dict[str, Any] | None:
        done, doc, err = self.calls.take(("progress", att.id))
        if done and err is None and isinstance(doc, dict) and doc.get("attempt_id") == att.id:
            before = self._progress.get(att.id)
            self._progress[att.id] = doc
            beat = doc.get("updated_at")
            if isinstance(beat, (int, float)) and (before is None or beat != before.get("updated_at")):
                self._seen[att.id] = max(self._seen.get(att.id, 0.0), min(float(beat), self.clock()))
            if doc != before:
                self.store.update_progress(
                    job.id, step=int(doc.get("step") or 0), total_steps=doc.get("total_steps"),
                    loss=doc.get("loss"), checkpoint_step=doc.get("checkpoint_step"),
                    checkpoint_uri=doc.get("checkpoint_uri"), attempt_id=att.id,
                    eval_loss=doc.get("eval_loss") if isinstance(doc.get("eval_loss"), (int, float)) else None,
                )
        elif done and err is not None and not isinstance(err, (StorageError, CallTimeout, OSError)):
            self.log.warning("progress read failed", job_id=job.id, error=str(err))
        return self._progress.get(att.id)

    def _watch_one(self, att: AttemptRow, live: list[AttemptRow]) -> None:
        job = self.store.get_job(att.job_id)
        progress = self._read_progress(att, job)
        if self.calls.get(("launch", att.id)) is not None:
            self._harvest_launch(att, job)
            return
        if att.provider in self._unopened:  # cannot ask it anything: unknown, with its deadline
            self._unknown(att, job, f"provider {att.provider} is not open: {self.health.down().get(att.provider)}")
            return
        if not att.handle:
            att = self._find_handle(att, job)
            if att is None or not att.handle:
                return
        now = self.clock()
        if job.cancel_requested:
            self._stop_then_end(att, job, EndReason.CANCELLED, "cancelled by the user",
                                grace_s=self.config.stop_grace_s)
            return
        if att.stop_requested_at is not None:
            if self._stop_overdue(att, job, now):
                self._stop_then_end(att, job, EndReason.BUDGET_STOP, f"stopped by budget: {att.stop_reason}"
                                    " (the payload did not stop within the grace; its machine was destroyed)",
                                    grace_s=0.0)
                return
        else:
            why = spending.stop_reason(job, att, now, self._horizon_s(att, job), live, self.caps, self._sweep)
            if why is not None:
                att = self._request_stop(att, job, why)
        self._keep_control(att, job, now, live)
        self._keep_credentials(att, job)
        if att.preempt_request:
            self._drill(att, job)
        status = self._status_now(att, progress)
        if status is not None:
            self._act(att, job, status, progress, now)

    # ---- the control object and budget stops ----
    def _horizon_s(self, att: AttemptRow, job: JobRow) -> float:
        """How long this attempt may run on before the daemon can next act and it has stopped: the
        loop's measured period (to notice, and to see it gone), the payload's control check, the
        stop grace, and ``CANCEL_TRIES`` cancel calls at their deadline, plus a second. The hard cap
        holds as long as the provider confirms a destroy within those tries."""
        control = getattr(self._ckpt_store(job), "control_poll_s", 1.0)
        cancel = CANCEL_TRIES * self.config.call_timeout_s  # a cancel that fails is tried again each tick
        return 2 * self._tick_s() + control + self.config.stop_grace_s + cancel + 1.0

    def _request_stop(self, att: AttemptRow, job: JobRow, why: str) -> AttemptRow:
        now = self.clock()
        self.store.add_event(job.id, "budget_stop", f"stopping: {why}", attempt_id=att.id,
                             data={"usd_per_hour": att.usd_per_hour})
        self.log.warning("budget stop", job_id=job.id, attempt_id=att.id, reason=why)
        return self.store.update_attempt(att.id, stop_reason=why, stop_requested_at=now)

    def _stop_overdue(self, att: AttemptRow, job: JobRow, now: float) -> bool:
        """The payload was told to stop and had its grace: long enough to see the control object,
        save, commit and exit."""
        control = getattr(self._ckpt_store(job), "control_poll_s", 1.0)
        return now - (att.stop_requested_at or now) > self.config.stop_grace_s + control + self._tick_s()

    def _keep_control(self, att: AttemptRow, job: JobRow, now: float, live: list[AttemptRow]) -> None:
        """Keep ``<job>/control.json`` saying what the payload must know: stop now (with why), or
        the time by which it stops on its own (its budget lease, in case this daemon is gone)."""
        done, _, err = self.calls.take(("control", att.id))
        if done and err is not None:
            self._control.pop(att.id, None)  # write it again
        if self.calls.get(("control", att.id)) is not None:
            return
        want: dict[str, Any] = {"attempt_id": att.id, "stop": None, "run_until": None}
        if att.stop_requested_at is not None:
            want.update(stop="budget", reason=att.stop_reason)
        else:
            until = spending.run_until(job, att, now, self._horizon_s(att, job), live, self.caps, self._sweep)
            want["run_until"] = None if until is None else round(until, 1)
        have = self._control.get(att.id)
        if have is not None and have.get("stop") == want["stop"]:
            old, new = have.get("run_until"), want["run_until"]
            if old == new or (old is not None and new is not None and abs(old - new) < LEASE_REFRESH_S
                              and now - have.get("written_at", 0.0) < LEASE_REFRESH_S):
                return
        if have is None and want["stop"] is None and want["run_until"] is None:
            self._control[att.id] = {**want, "written_at": now}  # nothing to say yet
            return
        doc = {**want, "written_at": now}
        self._control[att.id] = doc
        self.calls.start("store", ("control", att.id), self._ckpt_store(job).write_json, job.id, "control.json",
                         doc, timeout_s=self.config.call_timeout_s)

    def _stop_then_end(self, att: AttemptRow, job: JobRow, reason: EndReason, text: str, *, grace_s: float) -> None:
        """Cancel the attempt's resource (after ``grace_s`` for the payload to save, where the
        provider supports it) off the loop; end the attempt once the provider confirmed, or once
        trying has taken longer than ``unknown_timeout_s`` (said in the end reason)."""
        now = self.clock()
        first = self._cancelling.setdefault(att.id, now)  # (also: a LOST that follows is our own doing)
        since = att.stop_requested_at or first
        done, _, err, call = self.calls.take_call(("cancel", att.id))
        if not done:
            prov = self.providers.get(att.provider)
            if prov is None:
                err = RuntimeError(f"provider {att.provider} is not configured in this daemon")
            elif self.calls.get(("cancel", att.id)) is None:
                self.calls.start(att.provider, ("cancel", att.id), prov.cancel, att.handle, grace_s=grace_s,
                                 timeout_s=grace_s + self.config.call_timeout_s)
                return
            else:
                return
        if err is not None and now - since < self.config.unknown_timeout_s:
            self.log.warning("cancel failed; trying again", attempt_id=att.id, error=str(err))
            return
        note = f" (the provider did not confirm the cancel: {err})" if err is not None else ""
        confirmed = call.finished_at if err is None and call is not None else None  # billing stopped then
        if err is not None:  # the reconciler keeps trying to destroy it (orchestrator.reconcile)
            self._orphan_from_end(att, f"cancel not confirmed: {err}")
        self._end(att, job, reason, text + note, watched=True, ended_at=confirmed)

    def _drill(self, att: AttemptRow, job: JobRow) -> None:
        prov = self.providers.get(att.provider)
        hard = att.preempt_request == "hard"
        done, delivered, err = self.calls.take(("signal", att.id))
        if not done:
            if prov is not None and self.calls.get(("signal", att.id)) is None:
                self.calls.start(att.provider, ("signal", att.id), prov.signal, att.handle, hard=hard,
                                 timeout_s=self.config.call_timeout_s)
            return
        delivered = bool(delivered) and err is None
        self.store.clear_preempt_request(att.id)
        self.store.add_event(
            job.id, "preempt_delivered" if delivered else "preempt_not_delivered",
            f"{'SIGKILL' if hard else 'SIGTERM'} {'sent to' if delivered else 'could not reach'} the payload",
            attempt_id=att.id, data={"hard": hard},
        )

    # ---- launches and handles ----
    def _harvest_launch(self, att: AttemptRow, job: JobRow) -> None:
        """Act on a launch call that answered (or passed its deadline)."""
        done, handle, err, call = self.calls.take_call(("launch", att.id))
        if not done:
            return
        # the provider bills from when the launch call ran, not from when it waited for a worker
        billed_from = call.ran_at if call is not None and call.ran_at is not None else att.created_at
        if err is None:
            self.health.success(att.provider, kind="launch")
            self.store.transition_attempt(
                att.id, AttemptState.LAUNCHING, kind="launched",
                message=f"launched on {att.provider} ({att.offer_id}), resuming from step {att.start_step}",
                data={"handle": handle}, handle=handle, log_path=str(self.config.attempt_log(att.id)),
                billed_from=billed_from,
            )
            self.log.info("attempt launched", job_id=job.id, attempt_id=att.id, provider=att.provider)
            return
        if isinstance(err, LeaseNotWritten):  # nothing launched; the job's store is the trouble
            self.log.warning("launch not tried: the job's lease could not be written", job_id=job.id, error=str(err))
            self._end(att, job, EndReason.PROVIDER_ERROR, str(err), watched=False, billed=False)
            return
        action, reason = error_action(err)
        if isinstance(err, (CallTimeout, TransientError)):
            # the machine may have been rented and the answer lost: look for it by name first
            self.health.transient(att.provider, f"launch: {err}", getattr(err, "retry_after_s", None), kind="launch")
            self.store.add_event(job.id, "launch_unanswered", f"the launch call gave {err}; looking for the "
                                 "attempt by name", attempt_id=att.id,
                                 data={"timeout": isinstance(err, CallTimeout), "error": str(err)[:300]})
            self.store.update_attempt(att.id, billed_from=billed_from)
            return
        if action is ErrorAction.BACKOFF_PROVIDER:
            self.health.transient(att.provider, str(err), getattr(err, "retry_after_s", None), kind="launch")
        elif action is ErrorAction.DISABLE_PROVIDER:
            self.health.unavailable(att.provider, str(err), outage=not isinstance(err, ProviderNotConfigured))
        else:
            self.health.success(att.provider, kind="launch")  # it answered: a refusal of this offer, not an outage
        self.log.warning("launch failed", job_id=job.id, attempt_id=att.id, action=action.value, error=str(err))
        self._end(att, job, reason, f"launch failed ({action.value}): {err}", watched=False, billed=False)

    def _find_handle(self, att: AttemptRow, job: JobRow) -> AttemptRow | None:
        """An attempt with no recorded handle (the daemon died between intent and launch, or the
        launch call never answered): ask the provider for it by name. Not there: never launched."""
        prov = self.providers.get(att.provider)
        if prov is None:
            self._unknown(att, job, f"provider {att.provider} is not configured in this daemon")
            return None
        done, handle, err = self.calls.take(("handle_for", att.id))
        if not done:
            self.calls.start(att.provider, ("handle_for", att.id), prov.handle_for, att.id,
                             timeout_s=self.config.call_timeout_s)
            return None
        if err is not None:
            self._unknown(att, job, f"could not ask {att.provider} for the attempt: {err}")
            return None
        if handle is None:  # never rented: a launch that timed out counts, a refused or lost one does not
            self._end(att, job, EndReason.TIMED_OUT if self._launch_timed_out(job, att) else EndReason.PROVIDER_ERROR,
                      "the launch was never confirmed and the provider has no such attempt", watched=False, billed=False)
            return None
        self.store.add_event(job.id, "adopted", f"found on {att.provider} by name", attempt_id=att.id,
                             data={"handle": handle})
        return self.store.update_attempt(att.id, handle=handle)

    def _launch_timed_out(self, job: JobRow, att: AttemptRow) -> bool:
        return any(e.kind == "launch_unanswered" and e.attempt_id == att.id and e.data.get("timeout")
                   for e in self.store.events(job.id))

    # ---- status ----
    def _status_now(self, att: AttemptRow, progress: dict[str, Any] | None) -> RunStatus | None:
        """This tick's news about the attempt: the poll's answer, or the payload's own exit code
        (a remote payload's last word is in the store; its provider only sees a machine)."""
        done, status, err = self.calls.take(("poll", att.id))
        if done and err is not None:
            if isinstance(err, CallTimeout):
                self.health.transient(att.provider, f"poll: {err}", kind="poll")
            status = RunStatus(RunState.UNKNOWN, detail=f"poll failed: {type(err).__name__}: {err}")
        elif not done:
            status = None
        code = (progress or {}).get("exit_code")
        if isinstance(code, int) and (status is None or status.state is not RunState.EXITED):
            status = RunStatus(RunState.EXITED, exit_code=code, detail="reported by the payload")
        return status

    def _act(self, att: AttemptRow, job: JobRow, status: RunStatus, progress: dict[str, Any] | None,
             now: float) -> None:
        if status.state in (RunState.RUNNING, RunState.PENDING):
            self._seen[att.id] = now
            if status.state is RunState.RUNNING and att.state is AttemptState.LAUNCHING:
                self.store.transition_attempt(att.id, AttemptState.RUNNING, kind="attempt_running",
                                              message=f"running on {att.provider} ({status.detail})",
                                              expect=[AttemptState.LAUNCHING])
                try:
                    self.store.transition_job(job.id, JobState.RUNNING, kind="running", message=f"attempt {att.seq} running",
                                              expect=[JobState.LAUNCHING])
                except InvalidTransition:
                    pass
            elif (status.state is RunState.PENDING and att.state is AttemptState.LAUNCHING
                  and now - att.created_at > self.config.launch_timeout_s):
                self._stop_then_end(att, job, EndReason.TIMED_OUT, f"not running after "
                                    f"{self.config.launch_timeout_s:.0f} s (launch_timeout_s)", grace_s=0.0)
            return
        if status.state is RunState.UNKNOWN:
            self._unknown(att, job, status.detail or "the provider could not tell")
            return
        if status.state is RunState.EXITED:
            if status.detail != "reported by the payload" and status.ended_at is None:
                self._seen[att.id] = now  # the provider sees the machine: it bills until we destroy it
            if not self._last_word(att, job, progress):
                return
            reason, text = classify_exit(status.exit_code)
            final = None
            if reason is EndReason.FINISHED:
                final = self._final(att, job, progress)
                if final is None:
                    return  # still reading the store (or it said no: then _final ended it)
            self._end(att, job, reason, text, exit_code=status.exit_code, watched=False, final=final,
                      ended_at=status.ended_at)
            return
        if not self._last_word(att, job, progress):
            return
        cause = EndReason.PREEMPTED if status.cause == "preempted" else EndReason.LOST
        # gone because this daemon destroyed it (a cancel it started): it cost money until then
        ours = att.id in self._cancelling or self.calls.get(("cancel", att.id)) is not None
        ended = status.ended_at
        if ours and ended is None:  # our destroy's confirmation, when it came back already
            done, _, err, call = self.calls.take_call(("cancel", att.id))
            ended = call.finished_at if done and err is None and call is not None else None
        self._end(att, job, cause, status.detail or "capacity lost", watched=ours, ended_at=ended)

    def _last_word(self, att: AttemptRow, job: JobRow, progress: dict[str, Any] | None) -> bool:
        """Before ending an attempt whose payload did not report its own exit (killed, reclaimed,
        or its exit seen by the poll first): read progress.json and the newest committed checkpoint
        once more, so its end step and checkpoint are the store's last word. The payload writes
        progress at most twice a second, and after a checkpoint commits, so a kill can leave
        progress.json steps behind the newest checkpoint. True once read (or past the read's
        deadline); False while the reads are in flight (the attempt is looked at again next tick)."""
        if (progress or {}).get("exit_code") is not None or att.id in self._newest:
            return True
        key = ("newest", att.id)
        if att.id not in self._reread:
            self._reread.add(att.id)
            ckpt = self._ckpt_store(job)
            self.calls.start("store", ("progress", att.id), ckpt.read_json, job.id, "progress.json",
                             timeout_s=self.config.call_timeout_s)
            self.calls.start("store", key, ckpt.latest_checkpoint, job.id, timeout_s=self.config.call_timeout_s)
            return False
        done, ref, err = self.calls.take(key)
        if not done and self.calls.get(key) is not None:
            return False
        found = ref if err is None and ref is not None else None
        self._newest[att.id] = None if found is None else found.step
        if found is not None and found.step > (job.checkpoint_step or 0):  # status shows it, too
            self.store.update_progress(job.id, step=max(job.step, found.step), total_steps=job.total_steps,
                                       loss=job.loss, checkpoint_step=found.step, checkpoint_uri=found.uri)
        return True

    def _unknown(self, att: AttemptRow, job: JobRow, why: str) -> None:
        """The provider cannot tell: note since when; past ``unknown_timeout_s`` the attempt is
        lost, once its machine is destroyed (billed until then, as the provider bills it)."""
        now = self.clock()
        if att.unknown_since is None:
            self.store.update_attempt(att.id, unknown_since=now)
            self.store.add_event(job.id, "unknown", f"state unknown: {why}", attempt_id=att.id)
            return
        if now - att.unknown_since < self.config.unknown_timeout_s:
            return
        text = f"state unknown for {now - att.unknown_since:.0f} s (unknown_timeout_s): {why}"
        if self.providers.get(att.provider) is None or not att.handle or att.provider in self._unopened:
            # Nothing to destroy it with now. The job may run again at once: the new attempt takes
            # the job's lease, so this one (if it still runs) is fenced and writes nothing more, and
            # the reconciler destroys its machine once its provider answers again.
            self._orphan_from_end(att, f"ended while {att.provider} could not be reached")
            self._end(att, job, EndReason.LOST, text + "; its machine is destroyed once the provider answers",
                      watched=False)
            return
        # destroy its machine (confirmed, or tried for unknown_timeout_s more), billed to then:
        # nobody could tell it was gone, and a provider bills until it is destroyed
        self._stop_then_end(att, job, EndReason.LOST, text, grace_s=0.0)

    def _final(self, att: AttemptRow, job: JobRow, progress: dict[str, Any] | None) -> dict[str, Any] | None:
        """The committed final adapter's facts, from the payload's last progress (written only after
        the commit) or, failing that, read from the store. None while the read is in flight."""
        p = progress or {}
        if p.get("state") == "succeeded" and p.get("adapter_uri"):
            return {"uri": p["adapter_uri"], "step": p.get("step"), "loss": p.get("final_loss", p.get("loss")),
                    "eval_loss": p.get("eval_loss")}
        done, ref, err = self.calls.take(("final", att.id))
        if not done:
            self.calls.start("store", ("final", att.id), self._ckpt_store(job).final, job.id,
                             timeout_s=self.config.call_timeout_s)
            return None
        if err is not None:
            self._unknown(att, job, f"could not read the final adapter: {err}")
            return None
        if ref is None:
            self._end(att, job, EndReason.PAYLOAD_FAILED, "payload exited 0 but no final adapter was committed",
                      exit_code=0, watched=False)
            return None
        return {"uri": ref.uri, "step": ref.step, "loss": ref.meta.get("final_loss"),
                "eval_loss": ref.meta.get("eval_loss")}
