"""Vast.ai marketplace: live offers from its REST API, falling back to a shipped price snapshot.

Why the REST API and not SkyPilot: SkyPilot's Vast catalog holds medians that are never refreshed,
and its offer query drops every filter after a quoted value, so it can rent a different GPU than
the one asked for. We send the JSON filter the official client (vastai 1.9.1) sends, and re-check
whatever comes back.

- ``offers.py``: the search (``POST /api/v0/bundles/``), the snapshot fallback
  (``snapshots/vast.json``), prices (on-demand ``dph_total``, interruptible ``min_bid``, both for
  the whole machine), hazard (``-ln(reliability) / 24``, plus an outbid rate for a bid) and ``check``.
- ``rental.py``: renting exactly the chosen ask, reading it back and destroying anything else;
  the container runs the payload as its main process; secrets travel in the instance env (Vast has
  no secret channel); ``cancel``/``release``/``handle_for``.
- ``status.py``: Vast's ``actual_status`` -> ``RunStatus`` (an outbid instance is paused: LOST)
  and ``poll``.
- ``provider.py``: ``VastProvider``, the constructor that the three mixins above read.

No key, an unreachable or failing API, or a malformed answer never raise from quoting: offers come
from the snapshot and ``check()`` says why. The API key is never logged nor put in a message.
"""

from providers.vast.offers import (
    BASE_STARTUP_S,
    DEFAULT_INET_DOWN_MBPS,
    IMAGE_MB,
    OUTBID_PER_HOUR,
    RELIABILITY_WINDOW_H,
    SNAPSHOT_PATH,
    VastOffers,
    hazard_per_hour,
    outbid_per_hour,
    to_offer,
)
from providers.vast.provider import DEFAULT_URL, VastProvider
from providers.vast.rental import (
    DEFAULT_IMAGE,
    DEFAULT_PACKAGE,
    LIST_PAGES_MAX,
    PRICE_SLACK,
    VastRental,
    describe_offer,
    describe_rental,
    rental_mismatch,
)
from providers.vast.status import VastStatus, map_status

__all__ = [
    "BASE_STARTUP_S",
    "DEFAULT_IMAGE",
    "DEFAULT_INET_DOWN_MBPS",
    "DEFAULT_PACKAGE",
    "DEFAULT_URL",
    "IMAGE_MB",
    "LIST_PAGES_MAX",
    "OUTBID_PER_HOUR",
    "outbid_per_hour",
    "PRICE_SLACK",
    "RELIABILITY_WINDOW_H",
    "SNAPSHOT_PATH",
    "VastOffers",
    "VastProvider",
    "VastRental",
    "VastStatus",
    "describe_offer",
    "describe_rental",
    "hazard_per_hour",
    "map_status",
    "rental_mismatch",
    "to_offer",
]
