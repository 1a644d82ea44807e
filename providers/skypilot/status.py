"""SkyPilot after the launch: ``poll``, ``cancel``, ``release``, ``handle_for`` and ``map_state``.

Separate from launching because this is what the daemon calls over and over for the life of an
attempt: it resolves the launch request without waiting, reads the cluster and its job, and
``map_state`` is the one total table from SkyPilot's states to ``RunStatus``.
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from infra.logging import get_logger
from providers.base import (
    Provider,
    ProviderError,
    Resource,
    RunState,
    RunStatus,
    TransientError,
)
from providers.skypilot.launch import cluster_name
from providers.skypilot.sdk import _is_transient

if TYPE_CHECKING:
    from providers.skypilot.sdk import _SkySDK

EXIT_SETUP_FAILED = 3  # not a payload code (0, 1, 2, 75): provisioning or setup failed
LAUNCH_PENDING, LAUNCH_SUCCEEDED, LAUNCH_FAILED = "pending", "succeeded", "failed"
LAUNCH_CANCELLED, LAUNCH_UNKNOWN = "cancelled", "unknown"
_MISSING = object()

log = get_logger(component="skypilot")


class SkyPilotStatus(Provider):
    """The polling and teardown part of ``SkyPilotProvider`` (a mixin: ``SkyPilotProvider.__init__``
    sets what it reads)."""

    poll_timeout_s: float
    down_timeout_s: float
    _sdk: _SkySDK
    _state_lock: threading.Lock
    _launched: dict[str, int | None]
    _final: dict[str, RunStatus]

    @override
    def poll(self, handle: dict[str, Any]) -> RunStatus:
        cluster = handle.get("cluster") if isinstance(handle, dict) else None
        if not cluster:
            return RunStatus(RunState.UNKNOWN, detail=f"not a SkyPilot handle: {handle!r}")
        with self._state_lock:
            if cluster in self._final:
                return self._final[cluster]
        try:
            status = self._poll(cluster, handle.get("request_id"))
        except Exception as exc:  # noqa: BLE001 - poll never raises: anything unexpected is transient
            status = RunStatus(RunState.UNKNOWN, detail=f"SkyPilot: {type(exc).__name__}: {str(exc)[:200]}")
        if status.state is RunState.EXITED:
            with self._state_lock:
                self._final[cluster] = status
        return status

    def _poll(self, cluster: str, request_id: str | None) -> RunStatus:
        t = self.poll_timeout_s
        launch, error, job_id = LAUNCH_UNKNOWN, "", None
        with self._state_lock:
            launched = self._launched.get(cluster, _MISSING)
        if launched is not _MISSING:
            launch, job_id = LAUNCH_SUCCEEDED, launched
        elif request_id:
            launch, result = self._launch_state(request_id)
            if launch == LAUNCH_SUCCEEDED:
                job_id = _job_id(result)
                with self._state_lock:
                    self._launched[cluster] = job_id
            elif launch in (LAUNCH_FAILED, LAUNCH_CANCELLED):
                error = result
        if launch in (LAUNCH_PENDING, LAUNCH_FAILED, LAUNCH_CANCELLED):
            return map_state(launch=launch, launch_error=error)
        record = self._sdk.status(cluster, timeout=t)
        cluster_state = _value(record.get("status")) if record is not None else None
        job = None
        if cluster_state in ("UP", "AUTOSTOPPING"):
            try:
                statuses = self._sdk.job_status(cluster, job_id, timeout=t)
            except Exception as exc:  # noqa: BLE001 - classified by name: sky is imported lazily
                if type(exc).__name__ != "ClusterDoesNotExist":
                    raise
                cluster_state = None  # gone between the two calls
            else:  # {job id: JobStatus or None}; asked for the last job, the one key is its id
                found = statuses.get(job_id) if job_id is not None else next(iter(statuses.values()), None)
                job = _value(found)
        return map_state(
            launch=launch, cluster=cluster_state, job=job,
            ever_up=bool(record.get("cluster_ever_up")) if record is not None else False,
            init_reason=str(record.get("init_status_reason") or "") if record is not None else "",
        )

    def _launch_state(self, request_id: str) -> tuple[str, Any]:
        """(LAUNCH_*, the launch's result or its error text), never waiting on a running request.
        A finished request's own exception comes back from ``sky.get``: that is the failure to
        report; an error reaching SkyPilot propagates (``poll`` makes it UNKNOWN)."""
        t = self.poll_timeout_s
        state = _value(self._sdk.request_status(request_id, timeout=t))
        if state is None:
            return LAUNCH_UNKNOWN, None  # the server does not know it (or is not running)
        if state in ("PENDING", "WAITING", "RUNNING"):
            return LAUNCH_PENDING, None
        if state == "CANCELLED":
            return LAUNCH_CANCELLED, None
        try:
            result = self._sdk.get(request_id, timeout=t)  # finished: returns at once
        except Exception as exc:  # noqa: BLE001 - classified by name: sky is imported lazily
            if type(exc).__name__ == "RequestCancelled":
                return LAUNCH_CANCELLED, None
            if isinstance(exc, ProviderError) or _is_transient(exc) or state != "FAILED":
                raise
            return LAUNCH_FAILED, f"{type(exc).__name__}: {str(exc)[:300]}"
        if state == "FAILED":
            return LAUNCH_FAILED, "the launch request FAILED (SkyPilot recorded no error)"
        return LAUNCH_SUCCEEDED, result

    @override
    def cancel(self, handle: dict[str, Any], grace_s: float = 0.0) -> None:
        """Cancel a launch still in flight, then ``sky.down`` the cluster. Idempotent: a cluster
        that does not exist is already down. Raises TransientError when SkyPilot cannot be
        reached (the daemon retries); the server finishes a down it has accepted on its own."""
        cluster = handle.get("cluster") if isinstance(handle, dict) else None
        if not cluster:
            return
        request_id = handle.get("request_id")
        with self._state_lock:
            launched = cluster in self._launched or cluster in self._final
        if request_id and not launched:
            try:  # best effort: the down below is what releases the capacity
                self._sdk.cancel_request(request_id, timeout=self.poll_timeout_s)
            except Exception as exc:  # noqa: BLE001
                log.warning("skypilot launch request not cancelled", cluster=cluster, error=str(exc))
        try:
            self._sdk.down(cluster, timeout=self.down_timeout_s)
        except ProviderError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified by name: sky is imported lazily
            if type(exc).__name__ != "ClusterDoesNotExist":
                raise TransientError(f"SkyPilot could not tear down {cluster}: {type(exc).__name__}: "
                                     f"{str(exc)[:200]}", retry_after_s=30.0) from exc
            log.info("skypilot cluster already gone", cluster=cluster)
            return
        log.info("skypilot cluster down", cluster=cluster)

    @override
    def release(self, handle: dict[str, Any]) -> None:
        """Down the cluster after the daemon recorded the end (autodown is the backstop)."""
        try:
            self.cancel(handle)
        except ProviderError as exc:
            log.warning("skypilot down failed; autodown will remove the cluster", handle=handle, error=str(exc))
        cluster = handle.get("cluster") if isinstance(handle, dict) else None
        with self._state_lock:
            self._launched.pop(cluster, None)
            self._final.pop(cluster, None)

    # ---- the reconciler's view ----
    @override
    def list_resources(self) -> list[Resource]:
        """Every SkyPilot cluster named ``tf-*``. Raises TransientError when SkyPilot cannot be asked."""
        try:
            records = self._sdk.clusters(timeout=self.poll_timeout_s)
        except ProviderError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise TransientError(f"SkyPilot could not list clusters: {type(exc).__name__}: {str(exc)[:200]}") from exc
        out = []
        for r in records or []:
            name = r.get("name") if hasattr(r, "get") else None
            if isinstance(name, str) and name.startswith("tf-"):
                out.append(Resource(self.name, name, name, attempt_of(name), f"status {_value(r.get('status'))}"))
        return out

    @override
    def resource_name(self, attempt_id: str) -> str:
        return cluster_name(attempt_id)

    @override
    def destroy(self, resource_id: str) -> None:
        self.cancel({"cluster": resource_id, "request_id": None})

    @override
    def handle_for(self, attempt_id: str) -> dict[str, Any] | None:
        """The handle of ``tf-<attempt>``; None only when SkyPilot says no such cluster exists.
        When SkyPilot cannot be asked, the handle is returned anyway: ``poll`` finds out."""
        cluster = cluster_name(attempt_id)
        handle: dict[str, Any] = {"cluster": cluster, "request_id": None, "cloud": None, "spot": False}
        try:
            record = self._sdk.status(cluster, timeout=self.poll_timeout_s)
        except Exception as exc:  # noqa: BLE001
            log.warning("skypilot status failed; handle rebuilt from the name", cluster=cluster, error=str(exc))
            return handle
        if record is None:
            return None
        resources = getattr(record.get("handle"), "launched_resources", None)
        cloud = getattr(resources, "cloud", None)
        handle.update(cloud=str(cloud).lower() if cloud is not None else None,
                      spot=bool(getattr(resources, "use_spot", False)))
        return handle


# ---- the one state map ----
def _value(x: Any) -> str | None:
    """An enum's value (``ClusterStatus.UP`` -> 'UP'), a string as is, None as None."""
    if x is None:
        return None
    return str(getattr(x, "value", x))


def _job_id(result: Any) -> int | None:
    """``sky.launch``'s request returns (job_id, handle)."""
    if isinstance(result, tuple | list) and result and isinstance(result[0], int):
        return result[0]
    return None


def map_state(
    *, launch: str, launch_error: str = "", cluster: str | None = None, ever_up: bool = False,
    job: str | None = None, init_reason: str = "",
) -> RunStatus:
    """The one total map from what SkyPilot says to ``RunStatus``. Inputs are plain strings:
    ``launch`` is a LAUNCH_* value; ``cluster`` a ``sky.ClusterStatus`` value or None when no such
    cluster exists; ``job`` a ``sky.JobStatus`` value or None when unknown.

    Three different ends are kept apart: a failed launch or setup is EXITED with
    ``EXIT_SETUP_FAILED`` (a failure, not a preemption); a cluster gone or stopped once it was up
    is LOST (spot reclaimed: a preemption); a finished job is EXITED 0, or 1 for any failure (the
    payload's real code is in the store, where the daemon reads it)."""
    if launch == LAUNCH_FAILED:
        return RunStatus(RunState.EXITED, EXIT_SETUP_FAILED, f"setup/launch failed: {launch_error}")
    if launch == LAUNCH_CANCELLED:
        return RunStatus(RunState.EXITED, EXIT_SETUP_FAILED, "setup/launch failed: the launch request was cancelled")
    if launch == LAUNCH_PENDING:
        return RunStatus(RunState.PENDING, detail="SkyPilot is provisioning the cluster (launch request in flight)")
    if cluster is None:
        return RunStatus(RunState.LOST, detail="the cluster is gone (spot capacity reclaimed, or torn down)")
    if cluster == "STOPPED":
        return RunStatus(RunState.LOST, detail="the cluster stopped (spot capacity reclaimed)")
    if cluster in ("INIT", "PENDING"):
        if launch == LAUNCH_SUCCEEDED or ever_up:
            return RunStatus(RunState.UNKNOWN, detail=f"the cluster is INIT after it was up: {init_reason or 'unhealthy'}")
        return RunStatus(RunState.PENDING, detail=f"the cluster is {cluster}")
    if cluster not in ("UP", "AUTOSTOPPING"):
        return RunStatus(RunState.UNKNOWN, detail=f"unexpected SkyPilot cluster status {cluster}")
    if job is None:
        if launch == LAUNCH_SUCCEEDED:
            return RunStatus(RunState.UNKNOWN, detail="the cluster is up but reports no job")
        return RunStatus(RunState.PENDING, detail="the cluster is up; no job yet")
    if job in ("INIT", "PENDING", "SETTING_UP"):
        return RunStatus(RunState.PENDING, detail=f"job {job}")
    if job == "RUNNING":
        return RunStatus(RunState.RUNNING, detail=f"SkyPilot cluster {cluster}, job RUNNING")
    if job == "SUCCEEDED":
        return RunStatus(RunState.EXITED, 0, "job SUCCEEDED")
    if job == "FAILED_SETUP":
        return RunStatus(RunState.EXITED, EXIT_SETUP_FAILED, "setup/launch failed: the task's setup failed (FAILED_SETUP)")
    if job in ("FAILED", "FAILED_DRIVER", "CANCELLED"):
        return RunStatus(RunState.EXITED, 1, f"job {job} (the payload's own exit code is in the store)")
    return RunStatus(RunState.UNKNOWN, detail=f"unexpected SkyPilot job status {job}")


def attempt_of(cluster: str) -> str | None:
    """The attempt id a ``tf-<job>-<seq>`` cluster name was made from (``cluster_name``), when it
    can be read back; None for a hashed name."""
    m = re.fullmatch(r"tf-([a-z0-9]+)-(\d+)", cluster)
    return f"{m.group(1)}.{m.group(2)}" if m else None
