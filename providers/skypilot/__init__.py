"""Managed clouds through SkyPilot: quotes from SkyPilot's own catalog, read in-process, offline.

Why SkyPilot's catalog: it is the price table SkyPilot's optimizer uses, so what we quote is what
``sky launch`` would pick from. Importing this package does not import ``sky`` (it costs seconds);
every read of the catalog and every SDK call runs under a deadline, so nothing here can hang.

- ``offers.py``: the catalog (``$SKY_RUNTIME_DIR/.sky/catalogs/v8/<cloud>/vms.csv``, never handed
  to SkyPilot when absent, each cloud read in a thread), which clouds (argument, ``sky check``, or
  every catalog on disk), the quirks of its rows, spot hazard per cloud, ``check`` and ``offers``.
- ``snapshot.py``: the shipped, dated snapshot of SkyPilot's catalog (``snapshots/skypilot.json``)
  that quotes AWS, GCP, Azure, Lambda and RunPod when SkyPilot is not set up for them here (quotes
  only, never launched from), and ``build`` to refresh it from catalog files.
- ``launch.py``: one cluster per attempt, ``tf-<attempt>``; the ``sky.Task`` pinned to the offer
  (secrets in ``secrets``, never ``envs``), submitted with ``down=True`` so a lost daemon leaks
  nothing. Vast offers are refused: SkyPilot 0.14.1 can rent a different Vast GPU than asked.
- ``status.py``: ``poll`` resolves the launch request without waiting and maps SkyPilot's states
  with ``map_state``; ``cancel``, ``release``, ``handle_for``.
- ``sdk.py``: ``_SkySDK``, the only code that calls SkyPilot's client API, each call with a
  deadline (``_deadline``).
- ``provider.py``: ``SkyPilotProvider``, the constructor that the mixins above read.
"""

from providers.skypilot.launch import (
    DEFAULT_PACKAGE,
    PRICE_HEADROOM,
    VAST_REFUSAL,
    SkyPilotLaunch,
    cluster_name,
    task_name,
)
from providers.skypilot.offers import (
    CACHE_TTL_S,
    DEFAULT_SPOT_HAZARD,
    DEFAULT_STARTUP_S,
    INSTALL_HINT,
    NO_PRICE_CATALOG,
    SCHEMA,
    SPOT_HAZARD_PER_HOUR,
    STARTUP_S,
    Row,
    SkyPilotOffers,
    catalog_dir,
    clouds_with_catalog,
    enabled_clouds,
    list_cloud,
    runtime_dir,
    sky_version,
)
from providers.skypilot.provider import SkyPilotProvider
from providers.skypilot.sdk import _deadline, _SkySDK
from providers.skypilot.status import (
    EXIT_SETUP_FAILED,
    LAUNCH_CANCELLED,
    LAUNCH_FAILED,
    LAUNCH_PENDING,
    LAUNCH_SUCCEEDED,
    LAUNCH_UNKNOWN,
    SkyPilotStatus,
    map_state,
)

__all__ = [
    "CACHE_TTL_S",
    "DEFAULT_PACKAGE",
    "DEFAULT_SPOT_HAZARD",
    "DEFAULT_STARTUP_S",
    "EXIT_SETUP_FAILED",
    "INSTALL_HINT",
    "LAUNCH_CANCELLED",
    "LAUNCH_FAILED",
    "LAUNCH_PENDING",
    "LAUNCH_SUCCEEDED",
    "LAUNCH_UNKNOWN",
    "NO_PRICE_CATALOG",
    "PRICE_HEADROOM",
    "SCHEMA",
    "SPOT_HAZARD_PER_HOUR",
    "STARTUP_S",
    "VAST_REFUSAL",
    "Row",
    "SkyPilotLaunch",
    "SkyPilotOffers",
    "SkyPilotProvider",
    "SkyPilotStatus",
    "_SkySDK",  # tests stand in at this seam and compare signatures with it
    "_deadline",
    "catalog_dir",
    "clouds_with_catalog",
    "cluster_name",
    "enabled_clouds",
    "list_cloud",
    "map_state",
    "runtime_dir",
    "sky_version",
    "task_name",
]
