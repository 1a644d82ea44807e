"""Placement: a pure function from a job and offers to ranked placements, each with its reason.

Why pure: the daemon, ``tunefleet offers`` and a market simulator must all get the same answer from
the same inputs, and tests must be able to check it without a network or a database. It never
trusts the order it is given: it sorts explicitly, with a fixed tie-break.

This first version filters on the job's policy (allowed providers, restricted data, spot,
max $/hour, GPU count, VRAM) and ranks viable offers by hourly price, then start-up time, then id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from providers.base import Offer


@dataclass(frozen=True)
class Placement:
    offer: Offer
    viable: bool
    reason: str  # why rejected, or why it ranks where it does
    avoided: bool = False  # failed or was lost recently: used only when nothing else is viable

    @property
    def sort_key(self) -> tuple[Any, ...]:
        o = self.offer
        return (not self.viable, self.avoided, o.usd_per_hour, o.startup_s, o.provider, o.offer_id)


def _rejection(spec: dict[str, Any], offer: Offer) -> str | None:
    policy = spec.get("policy") or {}
    resources = spec.get("resources") or {}
    allowed = policy.get("providers")
    if allowed and offer.provider not in allowed:
        return f"provider {offer.provider} is not in policy.providers ({', '.join(allowed)})"
    if policy.get("data") == "restricted" and not offer.on_premises:
        return "policy.data is restricted and this offer is off premises"
    spot = policy.get("spot", "allow")
    if spot == "never" and offer.interruptible:
        return "interruptible offer, and policy.spot is never"
    if spot == "only" and not offer.interruptible:
        return "on-demand offer, and policy.spot is only"
    cap = policy.get("max_usd_per_hour")
    if cap is not None and offer.usd_per_hour > cap:
        return f"${offer.usd_per_hour:.2f}/h is over policy.max_usd_per_hour ${cap:.2f}"
    gpus = int(resources.get("gpus", 1))
    device = resources.get("device", "auto")
    if offer.gpu_count == 0:
        if gpus > 0 and device == "cuda":
            return f"the job needs {gpus} GPU(s) (device: cuda); this offer is CPU only"
    elif offer.gpu_count < gpus:
        return f"the job needs {gpus} GPUs; this offer has {offer.gpu_count}"
    vram = resources.get("gpu_vram_gb", "auto")
    if offer.gpu_count and isinstance(vram, (int, float)) and offer.vram_gb and offer.vram_gb < vram:
        return f"{offer.vram_gb:g} GB per GPU is under resources.gpu_vram_gb {vram:g}"
    return None


def rank(
    spec: dict[str, Any],
    offers: Iterable[Offer],
    *,
    avoid: Iterable[tuple[str, str]] = (),
) -> list[Placement]:
    """Every offer, viable ones first, cheapest first. Never calls the network.

    Offers in ``avoid`` (failed or lost recently) stay viable but rank after every other viable
    offer: a job is never stuck because its only machine hiccuped once.
    """
    avoid_set = frozenset(avoid)
    placements = []
    for offer in offers:
        reason = _rejection(spec, offer)
        if reason is not None:
            placements.append(Placement(offer, False, reason))
        elif (offer.provider, offer.offer_id) in avoid_set:
            placements.append(Placement(offer, True, f"${offer.usd_per_hour:.2f}/h (recently lost; last resort)", True))
        else:
            placements.append(Placement(offer, True, f"${offer.usd_per_hour:.2f}/h"))
    placements.sort(key=lambda p: p.sort_key)
    return placements
