"""SkyPilot quotes: the catalog read in-process and offline, which clouds to read, and ``check``.

Separate from launching and status because quoting never talks to SkyPilot's API server or a
cloud: it reads CSV files on this machine, under its own deadline, and is what ``tunefleet
offers`` exercises.

Why SkyPilot's catalog: it is the price table SkyPilot's optimizer uses, so what we quote is what
``sky launch`` would pick from. ``sky.catalog.list_accelerators(gpus_only=True, clouds=[cloud],
all_regions=True)`` reads ``$SKY_RUNTIME_DIR/.sky/catalogs/v8/<cloud>/vms.csv`` (SKY_RUNTIME_DIR
defaults to HOME) in this process: no API server. ``all_regions=True`` matters: without it SkyPilot
keeps only the cheapest region of each instance type.

Never hang: a missing catalog file is downloaded with ``requests.get`` and no timeout, and so is a
downloaded one older than 7 h (unless edited by hand: no ``.meta/*.md5`` beside it). So a cloud
whose ``vms.csv`` is absent is never handed to SkyPilot, and each cloud is read in a daemon thread
the caller waits on for at most ``timeout_s``; while that thread is still stuck, the cloud is
skipped rather than asked again. ``sky`` is imported in that thread, on first use: importing this
module does not import it (``import sky`` costs seconds).

Which clouds: the ``clouds`` argument; else those ``sky check`` last enabled (the ``config`` row
``enabled_clouds_default_compute`` of ``$SKY_RUNTIME_DIR/.sky/state.db``, read with sqlite3,
read-only); else every cloud with a catalog on disk, and ``check()`` says ``sky check`` has not run.

Clouds offline too: a cloud of the shipped snapshot (``snapshot.py``: AWS, GCP, Azure, Lambda, RunPod)
that has no catalog here and that ``sky check`` did not enable is quoted from that snapshot
(``PriceSource.SNAPSHOT``, dated, never launched from: ``orchestrator.decide`` holds snapshot offers
as quotes). With the ``clouds`` argument, only those clouds. A cloud ``sky check`` enabled whose
catalog is on disk is read from SkyPilot's catalog, never from the snapshot; one enabled whose
catalog is missing is skipped as before (``sky show-gpus`` downloads it).

Quirks handled: ``device_memory`` is GiB per GPU (``SizeInMiB / 1024``); it is None for a whole
cloud whose ``GpuInfo`` is not a Python literal (GCP, Azure) and 1024x too small for RunPod (its
fetcher stores GB in ``SizeInMiB``), so it falls back to ``jobs.gpus`` or is scaled back.
``require_price`` is accepted and ignored by SkyPilot; rows without a price are dropped here.

Hazard (expected interruptions per hour) of spot capacity is an assumption per cloud, to be
calibrated from real runs: AWS ~0.05/h (GPU families sit in the Spot Advisor's ">20 %/month"
band, and large GPU spot instances are reclaimed within a day often enough); GCP ~0.1/h (spot VMs
get 30 s notice and GPU spot capacity is reclaimed more often than the 5-15 %/day Google once
quoted for preemptible VMs on average); the rest 0.1/h. On-demand: 0.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from infra.logging import get_logger
from jobs.gpus import GPUS, canonical_gpu
from providers.base import Offer, PriceSource, Provider, ProviderNotConfigured
from providers.skypilot.snapshot import Snapshot, SnapshotError, _num, load_snapshot

if TYPE_CHECKING:
    from jobs.estimate import Estimate

SCHEMA = "v8"  # SkyPilot 0.14's catalog schema
INSTALL_HINT = "SkyPilot is not installed: pip install 'tunefleet[sky]'"
SPOT_HAZARD_PER_HOUR = {"aws": 0.05, "gcp": 0.1, "azure": 0.1, "runpod": 0.1, "vast": 0.1}
DEFAULT_SPOT_HAZARD = 0.1
STARTUP_S = {"aws": 300.0, "gcp": 300.0, "azure": 420.0, "lambda": 300.0, "runpod": 240.0, "vast": 300.0}
DEFAULT_STARTUP_S = 360.0
NO_PRICE_CATALOG = {"kubernetes", "ssh", "slurm"}  # enabled by `sky check`, but priced by nobody
CACHE_TTL_S = 3600.0  # catalogs change a few times a day at most

log = get_logger(component="skypilot")

Row = tuple[str, str, float, float | None, float | None, float | None, float | None, float | None, str]
# (instance_type, accelerator, count, vcpus, memory_gib, device_memory_gib, price, spot_price, region)


def sky_version() -> str | None:
    """The installed SkyPilot version, or None; never imports sky."""
    if importlib.util.find_spec("sky") is None:
        return None
    try:
        return importlib.metadata.version("skypilot")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def runtime_dir() -> Path:
    """Where SkyPilot keeps its state, resolved as SkyPilot does (at our call, not import)."""
    return Path(os.path.expanduser(os.environ.get("SKY_RUNTIME_DIR", "~")))


def catalog_dir() -> Path:
    return runtime_dir() / ".sky" / "catalogs" / SCHEMA


def clouds_with_catalog() -> list[str]:
    root = catalog_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "vms.csv").is_file())


def enabled_clouds() -> list[str] | None:
    """Clouds ``sky check`` enabled for compute, from the local state db; None if never run."""
    db = runtime_dir() / ".sky" / "state.db"
    if not db.is_file():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0) as conn:
            rows = conn.execute("SELECT key, value FROM config WHERE key LIKE 'enabled_clouds_%'").fetchall()
    except sqlite3.Error:
        return None
    compute = {k: v for k, v in rows if "_compute" in k}
    if not compute:
        return None
    default = "enabled_clouds_default_compute"  # other workspaces only if the default has no row
    names: set[str] = set()
    for value in [compute[default]] if default in compute else compute.values():
        try:
            names.update(str(c).lower() for c in json.loads(value))
        except (ValueError, TypeError):
            continue
    return sorted(names - NO_PRICE_CATALOG)


def list_cloud(cloud: str) -> list[Row]:
    """SkyPilot's catalog rows for one cloud. Imports sky; may block (download): call in a thread."""
    import sky.catalog

    found = sky.catalog.list_accelerators(gpus_only=True, clouds=[cloud], require_price=True, all_regions=True)
    return [
        (str(i.instance_type), str(i.accelerator_name), float(i.accelerator_count), _num(i.cpu_count),
         _num(i.memory), _num(i.device_memory), _num(i.price), _num(i.spot_price), str(i.region))
        for infos in found.values()
        for i in infos
    ]


def _vram_gib(accelerator: str, device_memory: float | None) -> float | None:
    if device_memory is not None and device_memory >= 1.0:
        return round(device_memory, 1)
    if device_memory is not None and device_memory > 0:  # RunPod: GB stored as MiB
        return round(device_memory * 1024.0, 1)
    info = GPUS.get(canonical_gpu(accelerator))
    return info.vram_gb if info else None


def _run(cloud: str, box: dict[str, Any]) -> None:
    """Thread body: fill ``box`` with rows or a one-line error, never a traceback."""
    try:
        box["rows"] = list_cloud(cloud)
    except BaseException as exc:  # noqa: BLE001 - SkyPilot raises anything, SystemExit included
        box["error"] = f"SkyPilot could not read the {cloud} catalog: {type(exc).__name__}: {str(exc)[:200]}"


class SkyPilotOffers(Provider):
    """The quoting part of ``SkyPilotProvider`` (a mixin: ``SkyPilotProvider.__init__`` sets what
    it reads)."""

    clouds: list[str] | None
    timeout_s: float
    skipped: dict[str, str]
    quoted: list[str]
    _lock: threading.Lock
    _cache: dict[str, tuple[float, float, list[Row]]]
    _stuck: dict[str, threading.Thread]

    def _targets(self) -> tuple[list[str], str]:
        """Clouds to quote. Never Vast: SkyPilot 0.14.1 can rent a different Vast GPU than asked,
        so tunefleet's own Vast provider rents there (and launch refuses a Vast offer anyway)."""
        if self.clouds is not None:
            return [c for c in self.clouds if c != "vast"], "configured"
        enabled = enabled_clouds()
        if enabled:
            return [c for c in enabled if c != "vast"], "enabled by `sky check`"
        return [c for c in clouds_with_catalog() if c != "vast"], "launching needs `sky check` (not run)"

    def _snapshot_clouds(self, have: set[str]) -> tuple[list[str], Snapshot | None, str]:
        """Clouds to quote from the shipped snapshot: in it, no catalog here, not enabled by
        ``sky check`` (and among ``clouds`` when given). Also the snapshot, or why it is unusable."""
        try:
            snap = load_snapshot()
        except SnapshotError as exc:
            log.warning("skypilot snapshot unusable", reason=str(exc))
            return [], None, str(exc)
        enabled = set(enabled_clouds() or ())
        pool = snap.clouds() if self.clouds is None else [c for c in self.clouds if c in snap.clouds()]
        return [c for c in pool if c != "vast" and c not in have and c not in enabled], snap, ""

    @override
    def check(self) -> tuple[bool, str]:
        version = sky_version()
        if version is None:
            return False, INSTALL_HINT
        try:
            targets, how = self._targets()
            have = set(clouds_with_catalog())
            quoted, snap, broken = self._snapshot_clouds(have)
        except OSError as exc:
            return False, f"cannot read SkyPilot's state under {runtime_dir()}: {exc}"
        ready = [c for c in targets if c in have]
        missing = [c for c in targets if c not in have and c not in quoted]
        parts: list[str] = []
        if ready:
            parts.append(f"SkyPilot {version} catalog for {', '.join(ready)}; {how}")
        if quoted and snap is not None:
            parts.append(f"{'' if ready else f'SkyPilot {version}: '}quoting {', '.join(quoted)} from the shipped "
                         f"snapshot of SkyPilot's catalog ({snap.date}; quotes only, never launched from): "
                         "run `sky check` with credentials, then `sky show-gpus` once with network access, "
                         "for live catalogs")
        if not parts:
            wanted = f" for {', '.join(targets)}" if targets else ""
            why = f"; {broken}" if broken else ""
            return False, (f"no SkyPilot catalog offline{wanted} under {catalog_dir()}: "
                           f"run `sky show-gpus` once with network access, or write one{why}")
        if missing:
            parts.append(f"no catalog for {', '.join(missing)}")
        return True, "; ".join(parts)

    @override
    def offers(self, spec: dict[str, Any], estimate: Estimate | None = None) -> list[Offer]:
        """One offer per (cloud, region, instance type) and on-demand/spot with exactly the job's
        GPU count, whatever its VRAM: the scheduler rejects the small ones and says by how much.
        Clouds with no catalog here that SkyPilot is not set up for come from the shipped snapshot.
        Raises ProviderUnavailable when SkyPilot is missing or no cloud could be read nor quoted."""
        if sky_version() is None:
            raise ProviderNotConfigured(INSTALL_HINT)
        resources = spec.get("resources") or {}
        if resources.get("device") == "cpu":
            return []
        gpus = max(1, int(resources.get("gpus", 1) or 1))
        quoted, snap, _ = self._snapshot_clouds(set(clouds_with_catalog()))
        rows = self._rows(quoted)
        out: dict[str, Offer] = {}
        for cloud, (mtime, cloud_rows) in rows.items():
            date = datetime.fromtimestamp(mtime, UTC).date().isoformat()
            for row in cloud_rows:
                for offer in self._row_offers(cloud, row, date):
                    if offer.gpu_count == gpus:
                        out.setdefault(offer.offer_id, offer)
        if snap is not None:
            for cloud in quoted:
                for row in snap.rows.get(cloud, ()):
                    if int(row[2]) != gpus or canonical_gpu(row[1], row[5]) not in GPUS:
                        continue  # the live path's rule too: only GPUs jobs.gpus knows
                    for offer in self._row_offers(cloud, row, snap.date, PriceSource.SNAPSHOT):
                        out.setdefault(offer.offer_id, offer)
        self.quoted = quoted
        return sorted(out.values(), key=lambda o: (o.usd_per_hour, o.offer_id))

    def _row_offers(self, cloud: str, row: Row, date: str, source: PriceSource = PriceSource.CATALOG) -> list[Offer]:
        instance, accelerator, count, vcpus, memory, device_memory, price, spot, region = row
        vram = _vram_gib(accelerator, device_memory)
        if vram is None:
            return []  # unknown VRAM: cannot tell the job fits
        extra: tuple[tuple[str, Any], ...] = (("cloud", cloud), ("instance_type", instance),
                                              ("accelerator", accelerator), ("vcpus", vcpus), ("memory_gib", memory))
        if source is PriceSource.SNAPSHOT:  # a quote: say where it comes from and how to get live prices
            extra += (("price_basis", f"SkyPilot catalog snapshot {date} (run `sky check` for live catalogs)"),)
        base: dict[str, Any] = dict(
            provider=self.name, gpu=canonical_gpu(accelerator, vram), gpu_count=int(count), vram_gb=vram,
            region=region, startup_s=STARTUP_S.get(cloud, DEFAULT_STARTUP_S),
            cpus=int(vcpus) if isinstance(vcpus, int | float) and vcpus == vcpus else 0,
            ram_gb=float(memory) if isinstance(memory, int | float) and memory == memory else 0.0,
            price_source=source, price_date=date, price_verified=True, extra=extra,
        )
        found = []
        if price is not None and price > 0:
            found.append(Offer(offer_id=f"{cloud}/{region}/{instance}", usd_per_hour=price, **base))
        if spot is not None and spot > 0:
            found.append(Offer(offer_id=f"{cloud}/{region}/{instance}:spot", usd_per_hour=spot, interruptible=True,
                               hazard_per_hour=SPOT_HAZARD_PER_HOUR.get(cloud, DEFAULT_SPOT_HAZARD), **base))
        return found

    def _rows(self, quoted: list[str] | None = None) -> dict[str, tuple[float, list[Row]]]:
        """Catalog rows per readable cloud, from cache or read under one shared deadline. Raises
        ProviderNotConfigured when none could be read and no cloud is ``quoted`` from the snapshot."""
        targets, _ = self._targets()
        have = set(clouds_with_catalog())
        skipped = {c: f"no catalog offline under {catalog_dir()}" for c in targets if c not in have
                   and c not in (quoted or ())}
        now = time.monotonic()
        rows: dict[str, tuple[float, list[Row]]] = {}
        with self._lock:
            todo: dict[str, tuple[float, threading.Thread, dict[str, Any]]] = {}
            for cloud in (c for c in targets if c in have):
                mtime = (catalog_dir() / cloud / "vms.csv").stat().st_mtime
                cached = self._cache.get(cloud)
                if cached and cached[1] == mtime and now - cached[0] < CACHE_TTL_S:
                    rows[cloud] = (mtime, cached[2])
                elif cloud in self._stuck and self._stuck[cloud].is_alive():
                    skipped[cloud] = "an earlier SkyPilot catalog read has not returned (a download with no timeout?)"
                else:
                    box: dict[str, Any] = {}
                    thread = threading.Thread(target=_run, args=(cloud, box), daemon=True, name=f"sky-{cloud}")
                    thread.start()
                    todo[cloud] = (mtime, thread, box)
            deadline = now + self.timeout_s
            for cloud, (mtime, thread, box) in todo.items():
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    self._stuck[cloud] = thread
                    skipped[cloud] = f"SkyPilot's catalog read did not return within {self.timeout_s:g} s"
                elif "error" in box:
                    skipped[cloud] = box["error"]
                else:
                    self._stuck.pop(cloud, None)
                    self._cache[cloud] = (time.monotonic(), mtime, box["rows"])
                    rows[cloud] = (mtime, box["rows"])
            self.skipped = skipped
        for cloud, why in skipped.items():
            log.warning("skypilot cloud skipped", cloud=cloud, reason=why)
        if not rows and not quoted:
            detail = "; ".join(f"{c}: {why}" for c, why in sorted(skipped.items())) or "no cloud has a catalog"
            raise ProviderNotConfigured(f"no SkyPilot catalog could be read offline ({detail})")
        return rows
