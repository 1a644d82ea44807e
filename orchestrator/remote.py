"""Getting an attempt ready for where it runs, and keeping a long one's credentials fresh.

Runs off the loop, inside the launch call (``PlacingMixin._launch``), in this order:

1. **The lease.** ``<job>/lease.json`` names the new attempt before any machine exists, so every
   earlier payload of the job still running somewhere is fenced (``jobs.channel``): it commits,
   deletes and reports nothing more.
2. **Store credentials** (``infra.credentials``): on premises, the daemon's own environment, as
   before; elsewhere, STS credentials scoped to the job's prefix and its inputs, expiring; the
   daemon's static keys only on a host we trust, or on a marketplace with the config's opt-in.
   A refusal is ``ProviderNotConfigured``: that provider cannot take this store's jobs until
   someone configures it, and ``providers`` says why.
3. **The code** (``providers.remote``): for a machine that is not ours, the wheel of this very
   tunefleet and its pins, uploaded once per store, reached through presigned URLs.

Credentials and URLs travel in ``LaunchRequest.secrets`` (SkyPilot's secret channel; Vast's env),
never in events or logs. An attempt holding STS credentials gets new ones written to the store at
half their life (``infra.credentials.refresh_key``), which the payload picks up by itself.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from infra.credentials import (
    CredentialError,
    for_attempt,
    mint,
    refresh_doc,
    refresh_key,
)
from infra.storage import CheckpointStore, StorageError
from jobs.channel import write_lease
from orchestrator.states import AttemptState
from orchestrator.store import AttemptRow, JobRow
from providers.base import (
    LaunchRequest,
    Offer,
    Provider,
    ProviderNotConfigured,
    TransientError,
)
from providers.remote import bootstrap_env, build_bundle


class LeaseNotWritten(Exception):
    """The job's store did not take the lease: nothing was launched; the store's trouble, not the
    provider's (the job is placed again, and waits for its store if it is still down)."""


class RemoteMixin:
    """Part of ``orchestrator.daemon.Daemon``."""

    def _launch_call(self, prov: Provider, request: LaunchRequest, offer: Offer, store: CheckpointStore
                     ) -> dict[str, Any]:
        """Lease, credentials and code for this attempt, then the provider's launch (a worker
        thread: reads config only). Returns the provider's handle, plus when the credentials expire."""
        try:
            write_lease(store, request.job_id, request.attempt_id)
        except StorageError as exc:
            raise LeaseNotWritten(f"could not write job {request.job_id}'s lease to its store: {exc}") from None
        cfg = self.config
        try:
            creds = for_attempt(request.store_uri, request.job_id, trusted_host=not prov.marketplace,
                                on_premises=offer.on_premises, untrusted_hosts=cfg.untrusted_hosts,
                                duration_s=cfg.credential_duration_s, role_arn=cfg.store_role_arn,
                                reads=_reads(request.spec))
        except CredentialError as exc:
            raise ProviderNotConfigured(f"store credentials for {prov.name}: {exc}") from None
        secrets = {**request.secrets, **creds.env}
        if not offer.on_premises:
            try:
                secrets.update(bootstrap_env(store, None if cfg.remote_package else build_bundle(),
                                             package=cfg.remote_package, job_id=request.job_id))
            except StorageError as exc:
                raise TransientError(f"could not upload tunefleet's wheel to the store: {exc}",
                                     retry_after_s=30.0) from None
        handle = prov.launch(dataclasses.replace(request, secrets=secrets), offer)
        if creds.expires_at is not None:
            handle = {**handle, "credentials_expire_at": round(creds.expires_at, 1)}
        return handle

    # ---- long attempts: credentials renewed at half their life ----
    def _keep_credentials(self, att: AttemptRow, job: JobRow) -> None:
        """Start (or harvest) the renewal of this attempt's STS credentials once half their life
        is gone. Wall-clock time: STS expiry is real time whatever the daemon's clock says."""
        if att.state not in (AttemptState.LAUNCHING, AttemptState.RUNNING):
            return
        key = ("credentials", att.id)
        done, expires, err = self.calls.take(key)
        if done:
            if err is None:
                self._creds_until[att.id] = float(expires)
                self.store.add_event(job.id, "credentials_renewed", "store credentials renewed",
                                     attempt_id=att.id, data={"expires_at": round(float(expires), 1)})
            else:
                self.log.warning("could not renew an attempt's store credentials; trying again",
                                 attempt_id=att.id, error=str(err)[:300])
            return
        until = self._creds_until.get(att.id) or (att.handle or {}).get("credentials_expire_at")
        if not isinstance(until, int | float) or self.calls.get(key) is not None:
            return
        if time.time() < until - self.config.credential_duration_s / 2:
            return
        # the job's store as the loop keeps it (one client per store, as the launch uses)
        self.calls.start("store", key, self._renew_credentials, self._ckpt_store(job), job.spec, job.id, att.id,
                         timeout_s=self.config.call_timeout_s)

    def _renew_credentials(self, store: CheckpointStore, spec: dict[str, Any], job_id: str, attempt_id: str) -> float:
        creds = mint(store.uri, job_id, duration_s=self.config.credential_duration_s,
                     role_arn=self.config.store_role_arn, reads=_reads(spec))
        store.put_bytes(refresh_key(job_id, attempt_id), refresh_doc(creds))
        return float(creds.expires_at or time.time())


def _reads(spec: dict[str, Any]) -> tuple[str, ...]:
    """Other jobs an attempt may read from: the job a sweep's rung resumes from."""
    resume_from = (spec.get("checkpoint") or {}).get("resume_from")
    return (resume_from,) if resume_from else ()
