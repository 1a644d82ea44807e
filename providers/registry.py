"""Every provider tunefleet knows, built from config, and asked concurrently.

Why here: the daemon, ``tunefleet offers`` and ``tunefleet providers`` need the same set, built the
same way. Each provider module is imported only when built (SkyPilot alone costs seconds), and
one provider failing or hanging degrades to a warning: the others still answer (style.md item 6).
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from infra.config import PROVIDER_NAMES, Config, unknown_provider
from providers.base import Offer, Provider, ProviderError, ProviderNotConfigured

PROVIDERS = PROVIDER_NAMES  # the config validates provider_limits against the same names
OFFERS_TIMEOUT_S = 20.0


class UnknownProvider(ValueError):
    pass


def _local(config: Config, light: bool) -> Provider:
    from providers.local import CostModel, LocalRayProvider

    cost = CostModel(
        gpu_purchase_usd=config.local_gpu_purchase_usd,
        gpu_lifetime_hours=config.local_gpu_lifetime_hours,
        gpu_watts=config.local_gpu_watts,
        cpu_watts=config.local_cpu_watts,
        usd_per_kwh=config.usd_per_kwh,
    )
    return LocalRayProvider(
        address=config.ray_address, num_cpus=config.ray_num_cpus, num_gpus=config.ray_num_gpus,
        cost=cost, light=light, model_cache=str(config.home / "models"),
    )


def _vast(config: Config, light: bool) -> Provider:
    from providers.vast import VastProvider

    return VastProvider(image=config.remote_image) if config.remote_image else VastProvider()


def _skypilot(config: Config, light: bool) -> Provider:
    from providers.skypilot import SkyPilotProvider

    return SkyPilotProvider()


def _together(config: Config, light: bool) -> Provider:
    from providers.together import TogetherProvider

    return TogetherProvider()


def _siliconflow(config: Config, light: bool) -> Provider:
    from providers.siliconflow import SiliconFlowProvider

    return SiliconFlowProvider()


_BUILDERS: dict[str, Callable[[Config, bool], Provider]] = {
    "local": _local, "vast": _vast, "skypilot": _skypilot, "together": _together, "siliconflow": _siliconflow,
}


def check_names(names: Iterable[str]) -> None:
    """Raise UnknownProvider with a did-you-mean for any name tunefleet does not know."""
    for name in names:
        if name not in _BUILDERS:
            raise UnknownProvider(unknown_provider(name, PROVIDERS))


def build_providers(
    config: Config, names: Iterable[str] | None = None, *, light: bool = False, launchable_only: bool = False
) -> tuple[dict[str, Provider], dict[str, str]]:
    """(providers built, {name: why it could not be built}). ``light``: do not start Ray."""
    wanted = list(names) if names is not None else list(PROVIDERS)
    check_names(wanted)
    built: dict[str, Provider] = {}
    broken: dict[str, str] = {}
    for name in wanted:
        try:
            provider = _BUILDERS[name](config, light)
        except ImportError as exc:
            broken[name] = f"not installed ({exc.name or exc})"
            continue
        except Exception as exc:  # a provider's constructor must not take the others down
            broken[name] = f"could not start: {exc}"
            continue
        if launchable_only and not provider.launchable:
            continue
        built[name] = provider
    return built, broken


@dataclass(frozen=True)
class OfferResult:
    offers: list[Offer]
    problems: dict[str, str]  # provider -> why it did not answer
    unavailable: frozenset[str] = frozenset()  # of those, the ones not configured here (ProviderNotConfigured)


def gather_offers(
    providers: dict[str, Provider], spec: dict[str, Any], estimate: Any, *, timeout_s: float = OFFERS_TIMEOUT_S,
) -> OfferResult:
    """Ask every provider at once; a provider that raises or overruns the deadline is reported.
    For one-shot callers (``tunefleet offers``); the daemon asks through its own call lanes."""
    offers: list[Offer] = []
    problems: dict[str, str] = {}
    unavailable: set[str] = set()
    if not providers:
        return OfferResult(offers, problems, frozenset(unavailable))
    pool = cf.ThreadPoolExecutor(max_workers=len(providers), thread_name_prefix="offers")
    try:
        futures = {pool.submit(p.offers, spec, estimate): name for name, p in providers.items()}
        done, pending = cf.wait(futures, timeout=timeout_s)
        for fut in done:
            name = futures[fut]
            try:
                offers += fut.result()
            except ProviderError as exc:
                problems[name] = str(exc)
                if isinstance(exc, ProviderNotConfigured):
                    unavailable.add(name)
            except Exception as exc:  # a bug in one provider is a warning, not a crash
                problems[name] = f"{type(exc).__name__}: {exc}"
        for fut in pending:
            problems[futures[fut]] = f"no answer within {timeout_s:.0f} s"
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return OfferResult(offers, problems, frozenset(unavailable))
