"""The reconciler: no machine is left running (and billing) without a live attempt.

Why: a launch whose answer was lost, a destroy that failed, an attempt ended while its provider
could not be reached, a daemon that died between two steps: each can leave a machine behind, and a
rented GPU bills by the hour whether or not anything reads its results. So, at start-up and every
``RECONCILE_S`` after, every open provider is asked (off the loop, with a deadline) for the
machines tunefleet started there (named ``tf-<attempt>``: ``Provider.list_resources``), on every
provider this store ever launched on (asking another is pointless, and SkyPilot's client would
start a local API server to answer). A machine
whose attempt is in this store and not live is an *orphan*: recorded in the store (``orphans``),
told as an event on its job, and destroyed. A destroy that fails is tried again, backing off, until
the provider confirms it; after ``ESCALATE_TRIES`` failures ``tunefleet status`` names the machine
so that a person looks. A machine named like ours whose attempt this store has never seen (another
tunefleet home sharing the account?) is not destroyed: it is listed in ``status`` as foreign.

An attempt ended without the provider confirming its machine gone (``unknown_timeout_s`` passed,
a cancel never confirmed) is recorded as an orphan at once (``attempt:<id>``), destroyed through
its handle once its provider answers again.
"""

from __future__ import annotations

from typing import Any

from orchestrator.store import AttemptNotFound, AttemptRow
from providers.base import Resource

RECONCILE_S = 300.0  # every provider's machines are listed this often (and at start-up)
RETRY_S = 30.0  # a failed destroy is tried again after this, doubling per failure ...
RETRY_MAX_S = 1800.0  # ... up to this
ESCALATE_TRIES = 3  # failed destroys before `status` names the machine for a person
FOREIGN = "not in this daemon's store: not destroyed (another tunefleet home using this account?)"


class ReconcileMixin:
    """Part of ``orchestrator.daemon.Daemon``."""

    def _reconcile(self) -> None:
        now = self.clock()
        for name, prov in self.providers.items():
            key = ("list", name)
            done, found, err = self.calls.take(key)
            if done:
                if err is not None:
                    self.log.warning("could not list a provider's machines", provider=name, error=str(err)[:300])
                elif found is not None:
                    self._judge(name, prov, found)
                continue
            if (self.calls.get(key) is not None or name in self._unopened or not self.health.usable(name)
                    or now - self._listed.get(name, float("-inf")) < self.config.scaled(RECONCILE_S)):
                continue
            self._listed[name] = now
            if not self.store.ever_launched_on(name):
                continue  # nothing of ours can be there; and asking may start things (SkyPilot's API server)
            self.calls.start(name, key, prov.list_resources, timeout_s=self.config.call_timeout_s)
        self._destroy_orphans(now)

    def _judge(self, name: str, prov, found: list[Resource]) -> None:
        """Record every listed machine that no live attempt owns (see the module doc), and close
        the orphans of this provider that the listing no longer shows: nothing left to destroy."""
        ids, names = {r.resource_id for r in found}, {r.name for r in found}
        for o in self.store.orphans():
            if o["provider"] != name or self.calls.get(("destroy", name, o["resource_id"])) is not None:
                continue
            by_attempt = o["resource_id"].startswith("attempt:")
            if (prov.resource_name(o["attempt_id"]) not in names) if by_attempt else (o["resource_id"] not in ids):
                self.store.orphan_tried(name, o["resource_id"], None)
                self.log.info("an orphan machine is gone", provider=name, resource=o["resource_id"])
        owned = {prov.resource_name(a.id) for a in self.store.live_attempts() if a.provider == name}
        for res in found:
            if res.name in owned:
                continue
            att = self._attempt(res.attempt_id)
            if att is None:
                if self.store.record_orphan(name, res.resource_id, res.attempt_id, f"{res.name}: {res.detail}"):
                    self.store.orphan_tried(name, res.resource_id, FOREIGN)
                    self.log.warning("a machine named like ours that this store does not know", provider=name,
                                     resource=res.resource_id, name=res.name)
                continue
            if att.live:
                continue  # (live again since the listing began: a restart adopted it)
            if self.store.record_orphan(name, res.resource_id, att.id, f"{res.name}: {res.detail}"):
                self.store.add_event(att.job_id, "orphan_found", f"{name} still holds {res.name} "
                                     f"({res.detail}) though attempt {att.seq} ended; destroying it",
                                     attempt_id=att.id, data={"provider": name, "resource": res.resource_id})
                self.log.warning("orphan machine found; destroying it", provider=name, resource=res.resource_id,
                                 attempt_id=att.id)

    def _attempt(self, attempt_id: str | None) -> AttemptRow | None:
        if not attempt_id:
            return None
        try:
            return self.store.get_attempt(attempt_id)
        except AttemptNotFound:
            return None

    def _destroy_orphans(self, now: float) -> None:
        for o in self.store.orphans():
            if o["last_error"] == FOREIGN:
                continue
            provider, rid = o["provider"], o["resource_id"]
            key = ("destroy", provider, rid)
            done, _, err = self.calls.take(key)
            if done:
                self.store.orphan_tried(provider, rid, None if err is None else str(err)[:300])
                self._tell(o, err)
                continue
            prov = self.providers.get(provider)
            if prov is None or self.calls.get(key) is not None or provider in self._unopened \
                    or not self.health.usable(provider):
                continue
            wait = min(self.config.scaled(RETRY_S) * 2 ** max(0, o["tries"] - 1), self.config.scaled(RETRY_MAX_S))
            if o["tries"] and now - (o["last_try_at"] or 0.0) < wait:
                continue
            fn, arg = self._destroyer(prov, o)
            if fn is None:
                self.store.orphan_tried(provider, rid, "no handle to destroy it by")
                continue
            self.calls.start(provider, key, fn, arg, timeout_s=self.config.call_timeout_s)

    def _destroyer(self, prov, orphan: dict[str, Any]):
        rid = orphan["resource_id"]
        if not rid.startswith("attempt:"):
            return prov.destroy, rid
        att = self._attempt(orphan["attempt_id"])
        return (prov.cancel, att.handle) if att is not None and att.handle else (None, None)

    def _tell(self, orphan: dict[str, Any], err: BaseException | None) -> None:
        att = self._attempt(orphan["attempt_id"])
        what = f"{orphan['provider']} {orphan['resource_id']}"
        if err is None:
            self.log.info("orphan machine destroyed", machine=what)
            if att is not None:
                self.store.add_event(att.job_id, "orphan_destroyed", f"destroyed {what}", attempt_id=att.id)
            return
        self.log.error("could not destroy an orphan machine; it may still bill", machine=what, error=str(err)[:300])
        if att is not None and orphan["tries"] + 1 == ESCALATE_TRIES:
            self.store.add_event(att.job_id, "orphan_escalated", f"{what} could not be destroyed after "
                                 f"{ESCALATE_TRIES} tries ({err}); it may still bill: see tunefleet status",
                                 attempt_id=att.id)

    def _orphan_from_end(self, att: AttemptRow, why: str) -> None:
        """An attempt ends without its machine confirmed gone: destroy it once the provider answers."""
        self.store.record_orphan(att.provider, f"attempt:{att.id}", att.id, why)
