"""Vast.ai offers: the search, the shipped snapshot it falls back to, and ``check``.

Separate from renting (``rental.py``) because quoting needs no instance at all: it reads a price
list, live or shipped, and never spends money; this is the half ``tunefleet offers`` exercises.

Why the REST API and not SkyPilot: SkyPilot's Vast catalog holds medians that are never refreshed,
and its offer query quotes values (``gpu_name="A100 SXM4"``), which vastai's parser reads as the
end of the query, silently dropping every later filter (``shared/reference/providers.md``). So we
send the JSON filter the official client (vastai 1.9.1, ``vastai/api/offers.py``) sends —
``POST /api/v0/bundles/`` with ``{"field": {"op": value}, ..., "type", "order", "limit",
"allocated_storage"}`` — built from numbers and booleans only, and re-apply the same filters to
whatever comes back, so a server that ignored one cannot slip a misfit through.

Prices: on-demand = ``dph_total``, the whole machine's $/h (all ``num_gpus`` GPUs, plus storage
for ``allocated_storage`` GiB). Interruptible = ``min_bid`` from a ``type: bid`` search, the
lowest bid that currently wins that machine, also for the whole machine.

Hazard (expected interruptions per hour): Vast's ``reliability`` r is read as the chance the host
stays up for a reference day, so ``h = -ln(r) / 24``; an interruptible rental also gets outbid.
The outbid rate rises with the bid's depth below the machine's on-demand ask (``min_bid /
dph_total``): log-linear from ``OUTBID_SHALLOW`` (0.05/h) for a bid at 90 % of the ask or more to
``OUTBID_DEEP`` (0.5/h) at 45 % or less, the span of bids in the snapshot (0.46-0.89); a bid whose
ask is not known gets the rate at the snapshot's median depth (0.66). These are priors: the
daemon learns each host's real hazard from its attempts (``orchestrator.learning``). Lower
reliability or a deeper bid -> higher hazard; bid > on-demand.

Robustness: no key, an unreachable or failing API, or a malformed answer never raise: offers come
from ``snapshots/vast.json`` (``PriceSource.SNAPSHOT``) and ``check()`` says why. The API key is
never logged nor put in a message.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from infra.logging import get_logger
from jobs.gpus import canonical_gpu
from providers.base import Offer, PriceSource, Provider, ProviderUnavailable

if TYPE_CHECKING:
    from jobs.estimate import Estimate

# providers/snapshots/vast.json: this file is one level down, in providers/vast/
SNAPSHOT_PATH = Path(__file__).resolve().parent.parent / "snapshots" / "vast.json"
RELIABILITY_WINDOW_H = 24.0  # reliability = P(host stays up for this long)
OUTBID_SHALLOW = 0.05  # outbid rate of a bid at >= 90 % of the on-demand ask, per hour
OUTBID_DEEP = 0.5  # ... and of one at <= 45 % of it
BID_RATIO_SHALLOW, BID_RATIO_DEEP, BID_RATIO_MEDIAN = 0.90, 0.45, 0.66
BASE_STARTUP_S = 180.0  # schedule, create the container, boot
IMAGE_MB = 8000.0  # a training image to pull, MB
DEFAULT_INET_DOWN_MBPS = 100.0
_TYPES = ("on-demand", "bid")

log = get_logger(component="vast")


class _Degraded(Exception):
    """Internal: the live search failed; ``reason`` is safe to show (no key in it)."""

    def __init__(self, reason: str, rejected: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.rejected = rejected


@dataclass(frozen=True)
class _Need:
    num_gpus: int
    gpu_ram_mb: int
    min_reliability: float


def _read_key(explicit: str | None) -> str | None:
    if explicit:
        return explicit.strip() or None
    env = os.environ.get("VAST_API_KEY", "").strip()
    if env:
        return env
    home = Path(os.environ.get("HOME") or Path.home())
    for path in (home / ".config" / "vastai" / "vast_api_key", home / ".vast_api_key"):
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if key:
            return key
    return None


def _num(raw: dict[str, Any], key: str, default: float | None = None) -> float:
    """A finite number from the API (bools are not numbers); KeyError/ValueError if unusable."""
    value = raw.get(key, default)
    if value is None:
        raise KeyError(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} is not a number")
    if not math.isfinite(value):
        raise ValueError(f"{key} is not finite")
    return float(value)


def outbid_per_hour(bid_ratio: float | None) -> float:
    """Expected outbids per hour of a bid at ``bid_ratio`` = bid / on-demand ask (see module doc)."""
    ratio = BID_RATIO_MEDIAN if bid_ratio is None or not math.isfinite(bid_ratio) else bid_ratio
    depth = (BID_RATIO_SHALLOW - min(max(ratio, BID_RATIO_DEEP), BID_RATIO_SHALLOW)) / (BID_RATIO_SHALLOW - BID_RATIO_DEEP)
    return OUTBID_SHALLOW * (OUTBID_DEEP / OUTBID_SHALLOW) ** depth


OUTBID_PER_HOUR = outbid_per_hour(None)  # a bid of unknown depth (the snapshot's median)


def hazard_per_hour(reliability: float, interruptible: bool, bid_ratio: float | None = None) -> float:
    """Expected interruptions per hour of a Vast host with this reliability, and for a bid, at this
    depth below the ask (see module doc)."""
    r = min(max(reliability, 1e-9), 1.0)
    return -math.log(r) / RELIABILITY_WINDOW_H + (outbid_per_hour(bid_ratio) if interruptible else 0.0)


def to_offer(raw: Any, *, interruptible: bool, source: PriceSource, price_date: str, verified: bool = True) -> Offer:
    """Map one API offer; raises KeyError/ValueError/TypeError when it is malformed."""
    if not isinstance(raw, dict):
        raise TypeError("offer is not an object")
    offer_id = raw["id"]
    if isinstance(offer_id, bool) or not isinstance(offer_id, int | str) or not str(offer_id).strip():
        raise ValueError("bad id")
    gpu_name = raw["gpu_name"]
    if not isinstance(gpu_name, str) or not gpu_name.strip():
        raise ValueError("bad gpu_name")
    num_gpus = int(_num(raw, "num_gpus"))
    vram_gb = _num(raw, "gpu_ram") / 1000.0  # MB per GPU
    price = _num(raw, "min_bid" if interruptible else "dph_total")
    ask = raw.get("dph_total") if interruptible else None  # the machine's on-demand ask, beside its min bid
    ok = isinstance(ask, int | float) and not isinstance(ask, bool) and math.isfinite(ask) and ask > 0
    bid_ratio = price / ask if ok else None
    reliability = _num(raw, "reliability")
    if num_gpus < 1 or vram_gb <= 0 or price <= 0 or not 0 < reliability <= 1:
        raise ValueError("out of range")
    inet_down = _num(raw, "inet_down", DEFAULT_INET_DOWN_MBPS)
    inet_up = _num(raw, "inet_up", 0.0)
    if "datacenter" in raw:
        datacenter = bool(raw["datacenter"])
    else:
        datacenter = raw.get("hosting_type") == 1
    region = raw.get("geolocation")
    return Offer(
        provider="vast",
        offer_id=f"{offer_id}:bid" if interruptible else f"{offer_id}",
        gpu=canonical_gpu(gpu_name, vram_gb),
        gpu_count=num_gpus,
        vram_gb=vram_gb,
        usd_per_hour=price,
        interruptible=interruptible,
        hazard_per_hour=hazard_per_hour(reliability, interruptible, bid_ratio),
        region=region if isinstance(region, str) and region else "unknown",
        on_premises=False,
        startup_s=BASE_STARTUP_S + IMAGE_MB * 8.0 / max(inet_down, 10.0),
        price_source=source,
        price_date=price_date,
        price_verified=verified,
        extra=(
            ("inet_down_mbps", inet_down),
            ("inet_up_mbps", inet_up),
            ("datacenter", datacenter),
            ("reliability", reliability),
            ("machine_id", raw.get("machine_id")),
        ),
    )


def _fits(offer: Offer, need: _Need) -> bool:
    reliability = offer.detail("reliability", 0.0)
    return (
        offer.gpu_count == need.num_gpus
        and offer.vram_gb * 1000.0 >= need.gpu_ram_mb - 0.5  # float error of MB -> GB
        and reliability >= need.min_reliability
    )


class VastOffers(Provider):
    """The quoting half of ``VastProvider`` (a mixin: ``VastProvider.__init__`` sets what it reads)."""

    _api_key_arg: str | None
    url: str
    timeout_s: float
    min_reliability: float
    limit: int
    disk_gb: float
    cache_ttl_s: float
    failure_ttl_s: float
    snapshot_path: Path
    _lock: threading.Lock
    _cache: dict[tuple[Any, ...], tuple[float, list[Offer]]]
    _status: tuple[float, bool, str] | None

    # ---- the query ----
    def search_body(self, need: _Need, offer_type: str) -> dict[str, Any]:
        """The JSON vastai 1.9.1 sends for ``search offers``: numbers and booleans, no strings
        but the type and field names."""
        return {
            "verified": {"eq": True},
            "external": {"eq": False},
            "rentable": {"eq": True},
            "num_gpus": {"eq": need.num_gpus},
            "gpu_ram": {"gte": need.gpu_ram_mb},
            "reliability": {"gte": need.min_reliability},
            "order": [["min_bid" if offer_type == "bid" else "dph_total", "asc"]],
            "type": offer_type,
            "limit": self.limit,
            "allocated_storage": self.disk_gb,
        }

    def _need(self, spec: dict[str, Any], estimate: Estimate | None) -> _Need:
        resources = spec.get("resources") or {}
        gpus = resources.get("gpus", 1)
        gpus = max(1, gpus) if isinstance(gpus, int) and not isinstance(gpus, bool) else 1
        vram = float(estimate.vram_gb) if estimate is not None else 0.0
        explicit = resources.get("gpu_vram_gb")
        if isinstance(explicit, int | float) and not isinstance(explicit, bool):
            vram = max(vram, float(explicit))
        vram = vram if math.isfinite(vram) and vram > 0 else 0.0
        return _Need(gpus, math.ceil(vram * 1000.0), self.min_reliability)

    def _post(self, key: str, body: dict[str, Any]) -> list[Any]:
        """One search; raises _Degraded with a key-free reason."""
        try:
            import requests
        except ImportError as exc:  # pragma: no cover - requests ships with the venv
            raise _Degraded("the requests package is not installed") from exc
        url = f"{self.url}/api/v0/bundles/"
        try:
            resp = requests.post(
                url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=self.timeout_s
            )
        except requests.Timeout:
            raise _Degraded(f"Vast.ai search timed out after {self.timeout_s:g} s ({self.url})") from None
        except requests.RequestException as exc:
            raise _Degraded(f"could not reach Vast.ai at {self.url} ({type(exc).__name__})") from None
        if resp.status_code in (401, 403):
            raise _Degraded(f"Vast.ai rejected the API key (HTTP {resp.status_code})", rejected=True)
        if resp.status_code != 200:
            snippet = resp.text.replace(key, "***")[:120].strip()
            raise _Degraded(f"HTTP {resp.status_code} from Vast.ai search" + (f": {snippet}" if snippet else ""))
        try:
            data = resp.json()
        except ValueError:
            raise _Degraded("Vast.ai search returned malformed JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("offers"), list):
            raise _Degraded("Vast.ai search answer has no 'offers' list")
        return data["offers"]

    def _live(self, key: str, need: _Need) -> list[Offer]:
        today = datetime.now(UTC).date().isoformat()
        result: list[Offer] = []
        for offer_type in _TYPES:
            raws = self._post(key, self.search_body(need, offer_type))
            good = 0
            for raw in raws:
                try:
                    offer = to_offer(raw, interruptible=offer_type == "bid", source=PriceSource.LIVE, price_date=today)
                except (KeyError, ValueError, TypeError) as exc:
                    log.debug("skipping a malformed Vast.ai offer", problem=type(exc).__name__)
                    continue
                good += 1
                if _fits(offer, need):
                    result.append(offer)
            if raws and not good:
                raise _Degraded(f"every {offer_type} offer in Vast.ai's answer was malformed")
        return result

    # ---- the snapshot ----
    def _snapshot(self) -> tuple[list[Offer], str]:
        """All snapshot offers (unfiltered) and the snapshot's date."""
        try:
            data = json.loads(self.snapshot_path.read_text(encoding="utf-8"))
            date = str(data["date"])
            raws = data["offers"]
            verified = bool(data.get("verified"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ProviderUnavailable(f"Vast.ai snapshot {self.snapshot_path} unreadable: {exc}") from None
        offers: list[Offer] = []
        for raw in raws:
            for bid in (False, True):
                if bid and not (isinstance(raw, dict) and raw.get("min_bid")):
                    continue
                try:
                    offers.append(to_offer(raw, interruptible=bid, source=PriceSource.SNAPSHOT, price_date=date,
                                           verified=verified))
                except (KeyError, ValueError, TypeError):
                    continue
        return offers, date

    def snapshot_date(self) -> str:
        try:
            return self._snapshot()[1]
        except ProviderUnavailable:
            return "(snapshot unreadable)"

    def _snapshot_offers(self, need: _Need) -> list[Offer]:
        """The snapshot's offers with the job's GPU count, whatever their VRAM: the scheduler says
        which are too small and by how much (``tunefleet offers --all``)."""
        offers, _ = self._snapshot()
        return [o for o in offers if _fits(o, _Need(need.num_gpus, 0, need.min_reliability))]

    # ---- Provider ----
    @override
    def check(self) -> tuple[bool, str]:
        try:
            key = _read_key(self._api_key_arg)
            if key is None:
                return False, (
                    "no Vast.ai API key (set VAST_API_KEY or ~/.config/vastai/vast_api_key); "
                    f"showing snapshot prices (verified {self.snapshot_date()}; ids are made up: quotes only)"
                )
            with self._lock:
                last = self._status
            if last is not None and last[0] > time.monotonic():
                return last[1], last[2]
            # nothing asked lately: a one-offer probe search
            probe = _Need(1, 0, self.min_reliability)
            try:
                self._post(key, {**self.search_body(probe, "on-demand"), "limit": 1})
                status = (True, f"Vast.ai API at {self.url}: live prices")
            except _Degraded as exc:
                status = self._failure_status(exc)
            self._remember(status)
            return status
        except Exception as exc:  # check never raises
            return False, f"degraded: {type(exc).__name__}"

    def _remember(self, status: tuple[bool, str]) -> None:
        ttl = self.cache_ttl_s if status[0] else self.failure_ttl_s
        with self._lock:
            self._status = (time.monotonic() + ttl, *status)

    def _failure_status(self, exc: _Degraded) -> tuple[bool, str]:
        tail = f"; showing snapshot prices (verified {self.snapshot_date()}; ids are made up: quotes only)"
        if exc.rejected:
            return False, f"{exc.reason}: check VAST_API_KEY{tail}"
        return False, f"degraded: {exc.reason}{tail}"

    @override
    def offers(self, spec: dict[str, Any], estimate: Estimate | None = None) -> list[Offer]:
        need = self._need(spec, estimate)
        key = _read_key(self._api_key_arg)
        if key is None:
            return self._snapshot_offers(need)
        cache_key = (self.url, hashlib.sha256(key.encode()).hexdigest()[:16], need, self.limit, self.disk_gb)
        with self._lock:  # held while fetching: two callers never search at once
            hit = self._cache.get(cache_key)
            if hit is not None and hit[0] > time.monotonic():
                return list(hit[1])
            try:
                offers = self._live(key, need)
                ttl = self.cache_ttl_s
                status = (True, f"Vast.ai API at {self.url}: live prices ({len(offers)} offers at last query)")
            except _Degraded as exc:
                log.warning("Vast.ai live offers unavailable; using the snapshot", reason=exc.reason)
                status = self._failure_status(exc)
                offers = self._snapshot_offers(need)
                ttl = self.failure_ttl_s
            self._status = (time.monotonic() + ttl, *status)
            self._cache[cache_key] = (time.monotonic() + ttl, offers)
            return list(offers)
