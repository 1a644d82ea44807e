"""SiliconFlow: a managed cloud that rents GPUs by the hour, quoted from a shipped price snapshot.

SiliconFlow runs fine-tuning on its own GPUs behind an OpenAI-style fine-tuning API and bills GPU
time. tunefleet does not launch there yet (``launchable`` is False; ``launch`` raises
``LaunchFailed``), but its prices take part in ``tunefleet offers`` so users can compare.

Prices come from ``snapshots/siliconflow.json`` (USD per GPU-hour, on demand, with its source and
date): ``PriceSource.SNAPSHOT``. The snapshot says where its figures come from; read its
``source`` before trusting a quote. No API call is made to quote, so the API key only matters for
launching, later; ``check()`` reports whether it is set.

Offers: one per GPU type in the snapshot whose VRAM holds the job (``estimate.vram_gb`` per GPU),
for ``resources.gpus`` GPUs (at least 1, at most the snapshot's ``max_gpus_per_job``). On demand:
not interruptible, hazard 0; off premises (the data leaves).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from jobs.gpus import canonical_gpu
from providers.base import (
    LaunchFailed,
    LaunchRequest,
    Offer,
    PriceSource,
    Provider,
    ProviderUnavailable,
    RunState,
    RunStatus,
)

if TYPE_CHECKING:
    from jobs.estimate import Estimate

SNAPSHOT_PATH = Path(__file__).parent / "snapshots" / "siliconflow.json"


@dataclass(frozen=True)
class _GpuPrice:
    gpu: str  # canonical (jobs.gpus)
    vram_gb: float
    usd_per_gpu_hour: float


@dataclass(frozen=True)
class _Snapshot:
    as_of: str
    source: str
    verified: bool  # someone checked these prices against the provider's own list (else a placeholder)
    region: str
    startup_s: float
    max_gpus: int
    gpus: tuple[_GpuPrice, ...]


def _prices(snap: _Snapshot) -> str:
    if snap.verified:
        return f"GPU prices from a snapshot verified {snap.as_of}"
    return f"PLACEHOLDER GPU prices ({snap.as_of}, not SiliconFlow's own list; shown with offers --all only)"


def load_snapshot(path: Path = SNAPSHOT_PATH) -> _Snapshot:
    """Read the price snapshot; ProviderUnavailable when it is missing or malformed."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return _Snapshot(
            as_of=str(raw["as_of"]),
            source=str(raw["source"]),
            verified=bool(raw.get("verified")),
            region=str(raw.get("region", "siliconflow")),
            startup_s=float(raw.get("startup_s", 300.0)),
            max_gpus=int(raw.get("max_gpus_per_job", 8)),
            gpus=tuple(
                _GpuPrice(canonical_gpu(str(g["gpu"]), float(g["vram_gb"])), float(g["vram_gb"]),
                          float(g["usd_per_gpu_hour"]))
                for g in raw["gpus"]
            ),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProviderUnavailable(f"SiliconFlow price snapshot {path} is unreadable: {exc}") from exc


class SiliconFlowProvider(Provider):
    """SiliconFlow's on-demand GPUs at snapshot prices. Quotes only; see the module docstring."""

    name = "siliconflow"
    launchable = False

    def __init__(self, *, api_key: str | None = None, snapshot_path: str | os.PathLike[str] | None = None) -> None:
        self.api_key = api_key if api_key is not None else (os.environ.get("SILICONFLOW_API_KEY") or None)
        self.snapshot_path = Path(snapshot_path) if snapshot_path else SNAPSHOT_PATH
        self._snap: _Snapshot | None = None
        self.last_unsupported: str | None = None

    def _snapshot(self) -> _Snapshot:
        if self._snap is None:
            self._snap = load_snapshot(self.snapshot_path)
        return self._snap

    @override
    def check(self) -> tuple[bool, str]:
        try:
            snap = self._snapshot()
        except ProviderUnavailable as exc:
            return False, str(exc)
        if not self.api_key:
            return False, (f"no SILICONFLOW_API_KEY (needed only to launch, not built yet): "
                           f"quoting {_prices(snap)}")
        return True, f"SILICONFLOW_API_KEY set; {_prices(snap)} (launching is not built yet)"

    def _count(self, spec: dict[str, Any]) -> int:
        return max(1, int((spec.get("resources") or {}).get("gpus", 1)))

    def unsupported_reason(self, spec: dict[str, Any], estimate: Estimate) -> str | None:
        """Why no GPU type in the snapshot fits this job (None: at least one does)."""
        snap = self._snapshot()
        count = self._count(spec)
        if count > snap.max_gpus:
            return f"the job asks for {count} GPUs; SiliconFlow rents at most {snap.max_gpus} per job (snapshot)"
        if not any(g.vram_gb >= estimate.vram_gb for g in snap.gpus):
            biggest = max((g.vram_gb for g in snap.gpus), default=0)
            return f"the job needs ~{estimate.vram_gb:.0f} GB per GPU; SiliconFlow's largest has {biggest:g} GB"
        return None

    @override
    def offers(self, spec: dict[str, Any], estimate: Estimate) -> list[Offer]:
        snap = self._snapshot()
        self.last_unsupported = self.unsupported_reason(spec, estimate)
        if self.last_unsupported:
            return []
        count = self._count(spec)
        return [
            Offer(
                provider=self.name,
                offer_id=f"siliconflow:{g.gpu}x{count}",
                gpu=g.gpu,
                gpu_count=count,
                vram_gb=g.vram_gb,
                usd_per_hour=g.usd_per_gpu_hour * count,
                interruptible=False,
                hazard_per_hour=0.0,
                region=snap.region,
                on_premises=False,
                startup_s=snap.startup_s,
                price_source=PriceSource.SNAPSHOT,
                price_date=snap.as_of,
                price_verified=snap.verified,
                extra=(("usd_per_gpu_hour", g.usd_per_gpu_hour), ("price_source_note", snap.source)),
            )
            for g in snap.gpus
            if g.vram_gb >= estimate.vram_gb
        ]

    @override
    def launch(self, request: LaunchRequest, offer: Offer) -> dict[str, Any]:
        raise LaunchFailed("launching on SiliconFlow is not built yet: tunefleet only quotes its prices")

    @override
    def poll(self, handle: dict[str, Any]) -> RunStatus:
        return RunStatus(RunState.UNKNOWN, detail="SiliconFlow jobs are not launched by tunefleet yet")

    @override
    def cancel(self, handle: dict[str, Any], grace_s: float = 0.0) -> None:
        return None
