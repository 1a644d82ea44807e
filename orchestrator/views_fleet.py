"""What ``tunefleet providers``, ``estimate``, ``offers`` and ``sweep status`` show, as plain values:
the dicts the CLI prints with ``--json`` and ``GET /api/v1/providers``, ``POST /api/v1/estimate``,
``POST /api/v1/offers`` and ``GET /api/v1/sweeps/ID`` return (see :mod:`orchestrator.views`).

Each function takes the config and an open store, or ``None`` where the CLI runs on a machine with
no store yet (then nothing is read from it, as before: ``providers`` on a fresh home creates none).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from infra.config import Config


# ---------------------------------------------------------------- providers
def providers_view(config: Config, store) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every provider's row (``tunefleet providers --json``), and the learned hazards it shows
    below the table (also inside each row, under ``learned``)."""
    from providers.registry import PROVIDERS, build_providers

    built, broken = build_providers(config, light=True)
    health: dict[str, dict[str, Any]] = {}
    learned: list[dict[str, Any]] = []
    if store is not None:
        health = store.provider_health()
        learned = learned_rows(store)
    now = time.time()
    rows = []
    for name in PROVIDERS:
        h = health.get(name)
        daemon = None
        if h is not None:
            active = h["state"] != "ok" and (h["until"] or 0) > now
            daemon = {"state": h["state"] if active else "ok", "until": h["until"] if active else None,
                      "reason": h["reason"], "failures": h["failures"], "seen_at": h["updated_at"]}
        if name in broken:
            rows.append({"provider": name, "enabled": False, "launchable": False, "reason": broken[name],
                         "daemon": daemon})
            continue
        prov = built[name]
        try:
            enabled, reason = prov.check()
        except Exception as exc:  # check() must not raise; if it does, report it
            enabled, reason = False, f"check failed: {exc}"
        rows.append({"provider": name, "enabled": enabled, "launchable": prov.launchable, "reason": reason,
                     "daemon": daemon})
    for r in rows:
        r["learned"] = [x for x in learned if x["provider"] == r["provider"]]
    return rows, learned


def learned_rows(store, hosts: int = 5) -> list[dict[str, Any]]:
    """Per (provider, GPU), and for its ``hosts`` riskiest hosts: the hours observed, interruptions,
    and the mean advertised vs learned hazard over those hours (``orchestrator.learning``)."""
    from orchestrator.learning import MarketModel

    model = MarketModel(store.exposure_tallies())
    out = []
    for provider, gpu, t, factor in model.groups():
        adv = t.expected / t.hours if t.hours else 0.0
        out.append({"provider": provider, "gpu": gpu, "host": "", "attempts": t.attempts, "hours": round(t.hours, 3),
                    "interruptions": t.interruptions, "advertised_per_hour": round(adv, 5),
                    "learned_per_hour": round(adv * factor, 5), "factor": round(factor, 4)})
        mine = []
        for p, g, host, h in model.hosts():
            if (p, g) != (provider, gpu) or not h.hours:
                continue
            f = model.host_factor(h, factor)
            a = h.expected / h.hours
            mine.append({"provider": p, "gpu": g, "host": host, "attempts": h.attempts, "hours": round(h.hours, 3),
                         "interruptions": h.interruptions, "advertised_per_hour": round(a, 5),
                         "learned_per_hour": round(a * f, 5), "factor": round(f, 4)})
        out += sorted(mine, key=lambda x: -x["factor"])[:hosts]
    return out


# ---------------------------------------------------------------- estimate
def calibrated_estimate(spec, store):
    """The job's estimate, calibrated by throughput measured on earlier runs in ``store``."""
    from jobs.estimate import estimate

    calibration: dict[str, float] = {}
    if store is not None:
        calibration = store.calibration(spec.base_model, spec.adapter or "full")
    return estimate(spec, calibration)


def estimate_view(spec, est) -> dict[str, Any]:
    """``tunefleet estimate --json``: the estimate, and hours on each GPU model and whether it fits."""
    from jobs.gpus import GPUS

    gpus = max(1, spec.resources.gpus)
    rows = []
    for name, info in GPUS.items():
        hours = est.hours(name, 0 if name == "cpu" else gpus)
        fits = name == "cpu" or info.vram_gb >= est.vram_gb
        rows.append({"gpu": name, "count": 0 if name == "cpu" else gpus, "vram_gb": info.vram_gb,
                     "fits": fits, "hours": round(hours, 4) if hours is not None else None})
    return {"estimate": est.to_dict(), "gpus": rows}


# ---------------------------------------------------------------- offers
@dataclass
class OffersView:
    """What ``tunefleet offers`` found: the decision, the placements shown, and the problems."""

    decision: Any
    shown: list
    hidden: int
    problems: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """``tunefleet offers --json``."""
        d = self.decision
        return {"decision": d.to_dict(),
                "offers": [{**p.to_dict(), "launchable_now": (p.offer.provider, p.offer.offer_id) in d.ready}
                           for p in self.shown],
                "hidden_placeholder_offers": self.hidden,
                "problems": self.problems}


def offers_view(config: Config, store, spec, est, show_all: bool = False) -> OffersView:
    """Every provider's offers for a job, ranked, and what the daemon would do with it now."""
    from providers.registry import build_providers, gather_offers

    doc = spec.to_payload_dict()
    doc["checkpoint"]["store"] = doc["checkpoint"].get("store") or config.default_store  # as submit fills it
    built, broken = build_providers(config, spec.policy.providers, light=True)
    result = gather_offers(built, doc, est)
    problems = {**broken, **result.problems}
    disabled = {n: why for n, why in problems.items() if n in broken or n in result.unavailable}
    down = {n: why for n, why in problems.items() if n not in disabled}
    d = decision(config, store, doc, est, result.offers, built, down, disabled)
    # the default: viable offers with a checked price; --all adds placeholders and rejections
    shown = [p for p in d.placements if show_all or (p.viable and not p.offer.placeholder)]
    hidden = sum(1 for p in d.placements if p.viable and p.offer.placeholder) if not show_all else 0
    return OffersView(d, shown, hidden, problems)


def decision(config: Config, store, spec: dict[str, Any], est, offers_list, built, problems, disabled):
    """``decide`` with the inputs the daemon would use now: the store's caps and live attempts, the
    providers' health as the daemon last saw it, and which providers can launch."""
    from orchestrator.decide import JobView, Usage, decide
    from orchestrator.learning import MarketModel
    from orchestrator.spending import Caps

    now = time.time()
    down = {name: (why, None) for name, why in problems.items()}
    disabled = dict(disabled)
    live: list = []
    caps: list = []
    market = None
    checkpoint_s = None
    if store is not None:
        market = MarketModel(store.exposure_tallies())
        checkpoint_s = store.checkpoint_cost(spec["base_model"], spec.get("adapter") or "full")
        live = store.live_attempts()
        records = {e.attempt_id: e.data for a in live for e in store.events(a.job_id)
                   if e.kind == "attempt_created" and e.attempt_id == a.id}
        cap = Caps(store, config.budget_monthly_usd,
                   lambda a: float(records.get(a.id, {}).get("est_usd") or 0.0)).monthly(now, live)
        caps = [cap] if cap is not None else []
        for name, h in store.provider_health().items():
            if h["state"] == "backoff" and (h["until"] or 0) > now:
                down.setdefault(name, (f"backing off: {h['reason']}", h["until"]))
            elif h["state"] == "disabled" and (h["until"] or 0) > now:
                disabled.setdefault(name, h["reason"])
    counts: dict[str, int] = {}
    for a in live:
        counts[a.provider] = counts.get(a.provider, 0) + 1
    usage = Usage(live=counts, limits=dict(config.provider_limits), down=down, disabled=disabled,
                  launchable=frozenset(n for n, p in built.items() if p.launchable),
                  owned_tolerance=config.owned_tolerance, market=market)
    return decide(JobView("(file)", spec, checkpoint_s=checkpoint_s), est, offers_list, caps, usage, now)


# ---------------------------------------------------------------- sweeps
def sweep_view(store, sweep_id: str) -> dict[str, Any]:
    """``tunefleet sweep status ID --json``: the sweep's leaderboard (StoreError if there is none)."""
    from orchestrator.queue import sweep_summary

    return sweep_summary(store, sweep_id)
