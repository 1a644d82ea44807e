"""The SkyPilot SDK seam: ``_SkySDK``, the only code that calls SkyPilot's client API, and ``_deadline``.

Separate so that every call into SkyPilot, each under a deadline (SkyPilot's HTTP reads have
none), sits in one short file that tests replace as a whole; ``sky`` is imported inside each call,
never at import time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from infra.logging import get_logger
from providers.base import TransientError

log = get_logger(component="skypilot")
T = TypeVar("T")


_TRANSIENT_NAMES = {"ApiServerConnectionError", "ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout"}


def _is_transient(exc: BaseException) -> bool:
    """Reaching SkyPilot failed (not the request itself): by class name, as sky is imported lazily."""
    return isinstance(exc, OSError | TimeoutError) or type(exc).__name__ in _TRANSIENT_NAMES


def _deadline(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run ``fn`` in a daemon thread; its result, its exception, or TransientError after
    ``timeout_s`` (SkyPilot's HTTP reads have no timeout: every wait here has one)."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=body, daemon=True, name=f"sky-{what[:20]}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TransientError(f"SkyPilot did not answer within {timeout_s:g} s ({what})", retry_after_s=30.0)
    if "error" in box:
        raise box["error"]
    return box["value"]


class _SkySDK:
    """The only code that calls SkyPilot's client API (the seam tests stand in at). Each method
    makes one SkyPilot call, or submits a request and resolves it with ``sky.get``, under a
    deadline, and hands back what SkyPilot returned or raised: the provider interprets it.
    ``launch`` only submits. Verified against skypilot 0.14.1: ``sky.launch(task, cluster_name,
    retry_until_up, idle_minutes_to_autostop, dryrun, down, ...) -> RequestId``;
    ``sky.api_status(request_ids) -> [RequestPayload(status='PENDING'|'WAITING'|'RUNNING'|
    'SUCCEEDED'|'FAILED'|'CANCELLED', ...)]`` ([] when the local API server is not running; never
    starts it); ``sky.get(request_id)`` (re-raises the request's exception);
    ``sky.status(cluster_names, refresh) -> [StatusResponse]`` (dict-like: ``name``, ``status`` a
    ``sky.ClusterStatus``, ``cluster_ever_up``, ``handle``...); ``sky.job_status(cluster_name,
    job_ids) -> {job_id: sky.JobStatus | None}``; ``sky.down(cluster_name, purge)``;
    ``sky.api_cancel(request_ids)``."""

    def launch(self, task: Any, cluster: str, *, idle_minutes: int, timeout: float) -> str:
        """Submit; if the deadline passes first, a request submitted later is cancelled and its
        cluster downed, so a launch the caller gave up on cannot run unseen."""
        lock = threading.Lock()
        box: dict[str, Any] = {}

        def submit() -> None:
            import sky

            try:
                rid = sky.launch(task, cluster_name=cluster, retry_until_up=False,
                                 idle_minutes_to_autostop=idle_minutes, down=True)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                with lock:
                    box["error"] = exc
                return
            with lock:
                box["rid"] = rid
                abandoned = box.get("abandoned", False)
            if abandoned:
                try:
                    sky.api_cancel(rid)
                    sky.down(cluster)
                except Exception as exc:  # noqa: BLE001 - autodown remains
                    log.warning("cleanup of an abandoned skypilot launch failed", cluster=cluster, error=str(exc))

        thread = threading.Thread(target=submit, daemon=True, name=f"sky-launch-{cluster}")
        thread.start()
        thread.join(timeout)
        with lock:
            if "rid" in box:
                return str(box["rid"])
            if "error" in box:
                raise box["error"]
            box["abandoned"] = True
        raise TransientError(f"SkyPilot did not accept the launch of {cluster} within {timeout:g} s", retry_after_s=30.0)

    def request_status(self, request_id: str, *, timeout: float) -> str | None:
        """The request's status (a RequestStatus value), or None when the server does not know it."""

        def ask() -> str | None:
            import sky

            found = [r for r in sky.api_status([request_id]) if r.request_id.startswith(request_id)]
            return found[0].status if found else None

        return _deadline(ask, timeout, f"request {request_id}")

    def get(self, request_id: str, *, timeout: float) -> Any:
        """``sky.get``: a finished request's result, or its own exception re-raised."""

        def ask() -> Any:
            import sky

            return sky.get(request_id)

        return _deadline(ask, timeout, f"get {request_id}")

    def status(self, cluster: str, *, timeout: float) -> Any:
        """The cluster's record (refreshed from the cloud when it is spot or autostops), or None."""

        def ask() -> Any:
            import sky

            records = sky.get(sky.status([cluster], refresh=sky.StatusRefreshMode.AUTO))
            return next((r for r in records if r.get("name") == cluster), None)

        return _deadline(ask, timeout, f"status {cluster}")

    def clusters(self, *, timeout: float) -> list[Any]:
        """Every cluster record SkyPilot knows (not refreshed from the clouds: names are enough)."""

        def ask() -> list[Any]:
            import sky

            return list(sky.get(sky.status(None, refresh=sky.StatusRefreshMode.NONE)))

        return _deadline(ask, timeout, "status of every cluster")

    def job_status(self, cluster: str, job_id: int | None, *, timeout: float) -> dict[int | None, Any]:
        """``{job id: JobStatus or None}`` for ``job_id`` (the cluster's last job when None)."""

        def ask() -> dict[int | None, Any]:
            import sky

            return sky.get(sky.job_status(cluster, [job_id] if job_id is not None else None))

        return _deadline(ask, timeout, f"job status {cluster}")

    def down(self, cluster: str, *, timeout: float) -> None:
        """Submit ``sky.down`` and wait for it; a down still running at the deadline is left to
        the server, which finishes what it accepted. Raises what the request raised
        (``ClusterDoesNotExist`` for a cluster already gone)."""

        def submit() -> str:
            import sky

            return sky.down(cluster)

        def wait(rid: str) -> None:
            import sky

            sky.get(rid)

        rid = _deadline(submit, timeout, f"down {cluster}")
        try:
            _deadline(lambda: wait(rid), timeout, f"down {cluster}")
        except TransientError:
            log.info("skypilot down still running on the server", cluster=cluster, request_id=str(rid))

    def cancel_request(self, request_id: str, *, timeout: float) -> None:
        def ask() -> None:
            import sky

            sky.get(sky.api_cancel(request_id))

        _deadline(ask, timeout, f"cancel {request_id}")
