"""``SkyPilotProvider``: the constructor and the attributes it sets, assembled from its parts.

Separate so that the settings every part reads are defined in one place: ``offers.py`` quotes,
``launch.py`` submits, ``status.py`` polls and tears down, all through ``sdk.py``.
"""

from __future__ import annotations

import threading

from providers.base import Provider, RunStatus
from providers.skypilot.launch import DEFAULT_PACKAGE, SkyPilotLaunch
from providers.skypilot.offers import Row, SkyPilotOffers
from providers.skypilot.sdk import _SkySDK
from providers.skypilot.status import SkyPilotStatus


class SkyPilotProvider(SkyPilotOffers, SkyPilotLaunch, SkyPilotStatus, Provider):
    """Quotes from SkyPilot's catalog for the clouds it knows; one SkyPilot cluster per attempt.
    See the docstrings of ``providers.skypilot`` and its modules."""

    name = "skypilot"
    launchable = True

    def __init__(
        self, *, clouds: list[str] | None = None, timeout_s: float = 10.0, package: str = DEFAULT_PACKAGE,
        disk_size_gb: int = 256, autodown_idle_minutes: int = 5, launch_timeout_s: float = 60.0,
        poll_timeout_s: float = 20.0, down_timeout_s: float = 60.0, sdk: _SkySDK | None = None,
    ) -> None:
        """``package``: what setup pip-installs on the cluster, e.g. a wheel URL or
        ``"tunefleet[train] @ git+https://..."``. ``autodown_idle_minutes``: the cluster is torn down
        this long after its job ends (time for the daemon to read the end before it vanishes).
        ``launch_timeout_s`` bounds submitting (a local API server may start first: ~15 s);
        ``poll_timeout_s`` each status call; ``down_timeout_s`` waiting for a teardown."""
        self.clouds = [c.lower() for c in clouds] if clouds is not None else None
        self.timeout_s = timeout_s
        self.package = package
        self.disk_size_gb = disk_size_gb
        self.autodown_idle_minutes = autodown_idle_minutes
        self.launch_timeout_s = launch_timeout_s
        self.poll_timeout_s = poll_timeout_s
        self.down_timeout_s = down_timeout_s
        self._sdk = sdk or _SkySDK()
        self._state_lock = threading.Lock()  # not self._lock: a catalog read holds that for seconds
        self._launched: dict[str, int | None] = {}  # cluster -> job id, once its launch request succeeded
        self._final: dict[str, RunStatus] = {}  # cluster -> its EXITED status (a cluster autodowns after)
        self.skipped: dict[str, str] = {}  # cloud -> why its offers are missing from the last call
        self.quoted: list[str] = []  # clouds the last call quoted from the shipped snapshot
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, float, list[Row]]] = {}  # cloud -> (read at, mtime, rows)
        self._stuck: dict[str, threading.Thread] = {}
