"""``VastProvider``: the constructor and the attributes it sets, assembled from the three halves.

Separate so that the settings every part reads (URL, timeouts, disk, image, ...) are defined in
one place: ``offers.py`` quotes, ``rental.py`` rents, ``status.py`` polls.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from providers.base import Offer, Provider
from providers.vast.offers import SNAPSHOT_PATH, VastOffers
from providers.vast.rental import DEFAULT_IMAGE, DEFAULT_PACKAGE, VastRental
from providers.vast.status import VastStatus

DEFAULT_URL = "https://console.vast.ai"


class VastProvider(VastOffers, VastRental, VastStatus, Provider):
    """Vast.ai offers and rentals. See the docstrings of ``providers.vast.offers`` for prices and
    hazard and of ``providers.vast.rental`` for renting."""

    name = "vast"
    launchable = True
    marketplace = True  # a host operator can read the instance env: scoped credentials only

    def __init__(
        self,
        *,
        api_key: str | None = None,
        url: str | None = None,
        timeout_s: float = 10.0,
        min_reliability: float = 0.95,
        limit: int = 64,
        disk_gb: float = 50.0,
        cache_ttl_s: float = 60.0,
        failure_ttl_s: float = 15.0,
        snapshot_path: Path = SNAPSHOT_PATH,
        image: str = DEFAULT_IMAGE,
        package_spec: str = DEFAULT_PACKAGE,
        verify_tries: int = 3,
        verify_wait_s: float = 1.0,
    ) -> None:
        self._api_key_arg = api_key
        self.url = (url or os.environ.get("VAST_URL") or DEFAULT_URL).rstrip("/")
        self.timeout_s = timeout_s
        self.min_reliability = min_reliability
        self.limit = limit
        self.disk_gb = disk_gb
        self.cache_ttl_s = cache_ttl_s
        self.failure_ttl_s = failure_ttl_s
        self.snapshot_path = snapshot_path
        self.image = image
        self.package_spec = package_spec
        self.verify_tries = max(1, verify_tries)
        self.verify_wait_s = verify_wait_s
        self._lock = threading.Lock()
        self._cache: dict[tuple[Any, ...], tuple[float, list[Offer]]] = {}
        self._status: tuple[float, bool, str] | None = None  # (until, enabled, reason) of the last search
