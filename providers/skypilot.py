"""Managed clouds through SkyPilot: quotes from SkyPilot's own catalog, read in-process, offline.

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

Quirks handled: ``device_memory`` is GiB per GPU (``SizeInMiB / 1024``); it is None for a whole
cloud whose ``GpuInfo`` is not a Python literal (GCP, Azure) and 1024x too small for RunPod (its
fetcher stores GB in ``SizeInMiB``), so it falls back to ``jobs.gpus`` or is scaled back.
``require_price`` is accepted and ignored by SkyPilot; rows without a price are dropped here.

Hazard (expected interruptions per hour) of spot capacity is an assumption per cloud, to be
calibrated from real runs: AWS ~0.05/h (GPU families sit in the Spot Advisor's ">20 %/month"
band, and large GPU spot instances are reclaimed within a day often enough); GCP ~0.1/h (spot VMs
get 30 s notice and GPU spot capacity is reclaimed more often than the 5-15 %/day Google once
quoted for preemptible VMs on average); the rest 0.1/h. On-demand: 0.

Launching (``launchable = True``): one SkyPilot cluster per attempt, named ``tf-<attempt>``, so a
restarted daemon finds it (``handle_for``). ``build_task`` makes a real ``sky.Task`` pinned to the
offer (``infra=cloud/region``, SkyPilot's accelerator name and instance type, spot or not, a
``max_hourly_cost`` just above the quoted price) whose setup installs ``tunefleet[train]`` and whose
run is ``python -m jobs.train``; the job spec and ids go in ``envs``, store credentials in
``secrets`` (never ``envs``). ``launch`` only submits ``sky.launch(..., down=True)`` (autodown a few
minutes after the job ends, so a lost daemon leaks nothing) and keeps the request id; ``poll``
resolves it without waiting and maps SkyPilot's states with ``map_state``. Every SDK call goes
through ``_SkySDK`` and has a deadline (SkyPilot's HTTP reads have none). Vast offers are refused:
SkyPilot 0.14.1's Vast path can rent a different GPU than the one asked for; tunefleet rents Vast
directly.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shlex
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from typing_extensions import override

from infra.logging import get_logger
from jobs.gpus import GPUS, canonical_gpu
from providers.base import (
    LaunchFailed,
    LaunchRequest,
    NoCapacity,
    Offer,
    PriceSource,
    Provider,
    ProviderError,
    ProviderNotConfigured,
    RunState,
    RunStatus,
    TransientError,
)

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

EXIT_SETUP_FAILED = 3  # not a payload code (0, 1, 2, 75): provisioning or setup failed
RUN_COMMAND = "python -m jobs.train"  # reads TUNEFLEET_* from the task's envs
DEFAULT_PACKAGE = "tunefleet[train]"
PRICE_HEADROOM = 1.05  # max_hourly_cost: the offer's price plus a little, never a surprise
VAST_REFUSAL = (
    "refusing to rent Vast.ai through SkyPilot: SkyPilot 0.14.1's Vast path can rent a different GPU than the "
    'offer chosen (it quotes its query, gpu_name="A100 SXM4", and vastai 1.9.1 drops every filter after the first '
    "quote, so SkyPilot rents the first offer returned, at any price, on demand even when spot was asked); "
    "tunefleet rents Vast directly (the 'vast' provider), checking that what it rented is the offer chosen"
)
LAUNCH_PENDING, LAUNCH_SUCCEEDED, LAUNCH_FAILED = "pending", "succeeded", "failed"
LAUNCH_CANCELLED, LAUNCH_UNKNOWN = "cancelled", "unknown"
_MISSING = object()
_TASK_NAME = re.compile(r"[a-zA-Z0-9]+(?:[._-]{1,2}[a-zA-Z0-9]+)*")  # sky.task._VALID_NAME_REGEX
_NO_INSTANCE = {"", "none", "nan"}

log = get_logger(component="skypilot")
T = TypeVar("T")

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


def _num(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _vram_gib(accelerator: str, device_memory: float | None) -> float | None:
    if device_memory is not None and device_memory >= 1.0:
        return round(device_memory, 1)
    if device_memory is not None and device_memory > 0:  # RunPod: GB stored as MiB
        return round(device_memory * 1024.0, 1)
    info = GPUS.get(canonical_gpu(accelerator))
    return info.vram_gb if info else None


class SkyPilotProvider(Provider):
    """Quotes from SkyPilot's catalog for the clouds it knows; one SkyPilot cluster per attempt.
    See the module docstring."""

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
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, float, list[Row]]] = {}  # cloud -> (read at, mtime, rows)
        self._stuck: dict[str, threading.Thread] = {}

    def _targets(self) -> tuple[list[str], str]:
        """Clouds to quote. Never Vast: SkyPilot 0.14.1 can rent a different Vast GPU than asked,
        so tunefleet's own Vast provider rents there (and launch refuses a Vast offer anyway)."""
        if self.clouds is not None:
            return [c for c in self.clouds if c != "vast"], "configured"
        enabled = enabled_clouds()
        if enabled:
            return [c for c in enabled if c != "vast"], "enabled by `sky check`"
        return [c for c in clouds_with_catalog() if c != "vast"], "launching needs `sky check` (not run)"

    @override
    def check(self) -> tuple[bool, str]:
        version = sky_version()
        if version is None:
            return False, INSTALL_HINT
        try:
            targets, how = self._targets()
            have = set(clouds_with_catalog())
        except OSError as exc:
            return False, f"cannot read SkyPilot's state under {runtime_dir()}: {exc}"
        ready = [c for c in targets if c in have]
        missing = [c for c in targets if c not in have]
        if not ready:
            wanted = f" for {', '.join(targets)}" if targets else ""
            return False, (f"no SkyPilot catalog offline{wanted} under {catalog_dir()}: "
                           "run `sky show-gpus` once with network access, or write one")
        reason = f"SkyPilot {version} catalog for {', '.join(ready)}; {how}"
        if missing:
            reason += f"; no catalog for {', '.join(missing)}"
        return True, reason

    @override
    def offers(self, spec: dict[str, Any], estimate: Estimate | None = None) -> list[Offer]:
        """One offer per (cloud, region, instance type) and on-demand/spot with exactly the job's
        GPU count, whatever its VRAM: the scheduler rejects the small ones and says by how much.
        Raises ProviderUnavailable when SkyPilot is missing or no cloud could be read (no catalog
        offline, or every read failed or timed out)."""
        if sky_version() is None:
            raise ProviderNotConfigured(INSTALL_HINT)
        resources = spec.get("resources") or {}
        if resources.get("device") == "cpu":
            return []
        gpus = max(1, int(resources.get("gpus", 1) or 1))
        rows = self._rows()
        out: dict[str, Offer] = {}
        for cloud, (mtime, cloud_rows) in rows.items():
            date = datetime.fromtimestamp(mtime, UTC).date().isoformat()
            for row in cloud_rows:
                for offer in self._row_offers(cloud, row, date):
                    if offer.gpu_count == gpus:
                        out.setdefault(offer.offer_id, offer)
        return sorted(out.values(), key=lambda o: (o.usd_per_hour, o.offer_id))

    def _row_offers(self, cloud: str, row: Row, date: str) -> list[Offer]:
        instance, accelerator, count, vcpus, memory, device_memory, price, spot, region = row
        vram = _vram_gib(accelerator, device_memory)
        if vram is None:
            return []  # unknown VRAM: cannot tell the job fits
        base: dict[str, Any] = dict(
            provider=self.name, gpu=canonical_gpu(accelerator, vram), gpu_count=int(count), vram_gb=vram,
            region=region, startup_s=STARTUP_S.get(cloud, DEFAULT_STARTUP_S),
            cpus=int(vcpus) if isinstance(vcpus, int | float) and vcpus == vcpus else 0,
            ram_gb=float(memory) if isinstance(memory, int | float) and memory == memory else 0.0,
            price_source=PriceSource.CATALOG, price_date=date,
            extra=(("cloud", cloud), ("instance_type", instance), ("accelerator", accelerator),
                   ("vcpus", vcpus), ("memory_gib", memory)),
        )
        found = []
        if price is not None and price > 0:
            found.append(Offer(offer_id=f"{cloud}/{region}/{instance}", usd_per_hour=price, **base))
        if spot is not None and spot > 0:
            found.append(Offer(offer_id=f"{cloud}/{region}/{instance}:spot", usd_per_hour=spot, interruptible=True,
                               hazard_per_hour=SPOT_HAZARD_PER_HOUR.get(cloud, DEFAULT_SPOT_HAZARD), **base))
        return found

    def _rows(self) -> dict[str, tuple[float, list[Row]]]:
        """Catalog rows per readable cloud, from cache or read under one shared deadline."""
        targets, _ = self._targets()
        have = set(clouds_with_catalog())
        skipped = {c: f"no catalog offline under {catalog_dir()}" for c in targets if c not in have}
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
        if not rows:
            detail = "; ".join(f"{c}: {why}" for c, why in sorted(skipped.items())) or "no cloud has a catalog"
            raise ProviderNotConfigured(f"no SkyPilot catalog could be read offline ({detail})")
        return rows

    # ---- attempts: one SkyPilot cluster per attempt ----
    def build_task(self, request: LaunchRequest, offer: Offer) -> Any:
        """The ``sky.Task`` that runs this attempt, pinned to ``offer``; checked by SkyPilot's own
        YAML schema (``Task.from_yaml_config(task.to_yaml_config())``). Raises LaunchFailed."""
        cloud, region, instance, accelerator = _offer_target(offer)
        try:
            import sky
        except ImportError as exc:
            raise LaunchFailed(INSTALL_HINT) from exc
        secrets = {str(k): str(v) for k, v in request.secrets.items()}
        envs = {k: v for k, v in request.payload_env().items() if k not in secrets}  # secrets never in envs
        try:
            resources = sky.Resources(
                infra=f"{cloud}/{region}", accelerators=f"{accelerator}:{offer.gpu_count}", instance_type=instance,
                use_spot=offer.interruptible, disk_size=self.disk_size_gb,
                max_hourly_cost=round(offer.usd_per_hour * PRICE_HEADROOM, 4),
                autostop={"idle_minutes": self.autodown_idle_minutes, "down": True},
            )
            task = sky.Task(name=task_name(request.attempt_id), setup=self._setup_script(), run=RUN_COMMAND,
                            envs=envs, secrets=secrets)
            task.set_resources(resources)
            sky.Task.from_yaml_config(task.to_yaml_config())  # SkyPilot's schema; secrets are not redacted here
        except Exception as exc:  # noqa: BLE001 - SkyPilot raises ValueError, its own errors, schema errors
            raise LaunchFailed(f"SkyPilot refused the task for {offer.offer_id}: {type(exc).__name__}: "
                               f"{str(exc)[:300]}") from exc
        return task

    def _setup_script(self) -> str:
        return "set -e\npython -m pip install --upgrade pip\n" f"python -m pip install {shlex.quote(self.package)}\n"

    @override
    def launch(self, request: LaunchRequest, offer: Offer) -> dict[str, Any]:
        """Submit ``sky.launch`` and return at once; ``poll`` resolves the request. The cluster
        autodowns ``autodown_idle_minutes`` after its job ends, so a lost daemon leaks nothing."""
        task = _deadline(lambda: self.build_task(request, offer), self.launch_timeout_s, "building the SkyPilot task")
        cluster = cluster_name(request.attempt_id)
        try:
            request_id = self._sdk.launch(task, cluster, idle_minutes=self.autodown_idle_minutes,
                                          timeout=self.launch_timeout_s)
        except ProviderError:
            raise
        except Exception as exc:  # noqa: BLE001 - one place turns SkyPilot's errors into ours
            raise _launch_error(exc, offer) from exc
        log.info("skypilot launch submitted", cluster=cluster, request_id=request_id, offer=offer.offer_id)
        return {"cluster": cluster, "request_id": str(request_id), "cloud": _offer_target(offer)[0],
                "spot": bool(offer.interruptible)}

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


# ---- launching: names, the SDK seam, the one state map ----
def cluster_name(attempt_id: str) -> str:
    """``tf-<attempt>`` in lowercase letters, digits and '-' (valid on every cloud, and for
    SkyPilot's ``[a-zA-Z]([-_.a-zA-Z0-9]*[a-zA-Z0-9])?``). '.' becomes '-'; any other change, or a
    name over 60 characters, adds a hash of the attempt id so two attempts never share a name."""
    slug = re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", attempt_id.lower())).strip("-")
    name = f"tf-{slug}" if slug else "tf"
    if not re.fullmatch(r"[a-z0-9.]+", attempt_id) or len(name) > 60:
        name = f"{name[:52].rstrip('-')}-{hashlib.sha1(attempt_id.encode()).hexdigest()[:6]}"
    return name


def task_name(attempt_id: str) -> str:
    """The attempt id itself when SkyPilot accepts it as a task name, else the cluster's slug."""
    return attempt_id if _TASK_NAME.fullmatch(attempt_id) else cluster_name(attempt_id)[3:]


def _offer_target(offer: Offer) -> tuple[str, str, str | None, str]:
    """(cloud, region, instance type or None, SkyPilot's accelerator name) of one of our offers."""
    if offer.provider != "skypilot":
        raise LaunchFailed(f"offer {offer.offer_id} is from {offer.provider}, not skypilot")
    cloud = str(offer.detail("cloud") or offer.offer_id.split("/", 1)[0]).lower()
    if cloud == "vast":
        raise LaunchFailed(VAST_REFUSAL)
    accelerator = offer.detail("accelerator")
    if not accelerator or not offer.region:
        raise LaunchFailed(f"offer {offer.offer_id} lacks SkyPilot's accelerator name or region")
    instance = str(offer.detail("instance_type") or "")
    return cloud, offer.region, (None if instance.lower() in _NO_INSTANCE else instance), str(accelerator)


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


_TRANSIENT_NAMES = {"ApiServerConnectionError", "ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout"}


def _is_transient(exc: BaseException) -> bool:
    """Reaching SkyPilot failed (not the request itself): by class name, as sky is imported lazily."""
    return isinstance(exc, OSError | TimeoutError) or type(exc).__name__ in _TRANSIENT_NAMES


def _launch_error(exc: BaseException, offer: Offer) -> ProviderError:
    name = type(exc).__name__
    text = f"SkyPilot launch of {offer.offer_id}: {name}: {str(exc)[:300]}"
    if name == "ResourcesUnavailableError":
        return NoCapacity(text)
    if _is_transient(exc):
        return TransientError(text, retry_after_s=30.0)
    return LaunchFailed(text)


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


def _run(cloud: str, box: dict[str, Any]) -> None:
    """Thread body: fill ``box`` with rows or a one-line error, never a traceback."""
    try:
        box["rows"] = list_cloud(cloud)
    except BaseException as exc:  # noqa: BLE001 - SkyPilot raises anything, SystemExit included
        box["error"] = f"SkyPilot could not read the {cloud} catalog: {type(exc).__name__}: {str(exc)[:200]}"
