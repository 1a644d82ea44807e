"""What the market has shown us: interruption hazards learned from attempts, per provider/GPU/host.

Why: a provider's advertised hazard (Vast's reliability score, a cloud's spot history, our
configured default) is a prior, not the truth. Some hosts are far worse than their score; a
cloud's GPU spot pool may be calmer than feared. Every attempt is an observation: it ran ``hours``
on an offer whose advertised hazard was λ_adv, and was interrupted (reclaimed, outbid, lost) or not.

The model is Gamma-Poisson on a *factor* f = true hazard / advertised hazard, so one host's
record carries over when its advertised figure moves (a Vast bid's hazard changes with its depth).
Interruptions are Poisson with rate f·λ_adv, so an attempt contributes ``E = λ_adv · hours``
expected interruptions and ``k`` observed ones (0 or 1). With a Gamma(a, a) prior on f (mean 1:
the advertised figure is believed until shown otherwise), the posterior mean is

    f = (a + Σk) / (a + ΣE)

pooled in two levels: a (provider, GPU model) factor with prior weight ``GROUP_PRIOR``, then each
host's factor with the group's as its prior mean and weight ``HOST_PRIOR``:

    f_group = (A_g + k_g) / (A_g + E_g)          f_host = (A_h · f_group + k_h) / (A_h + E_h)

``A`` is counted in expected interruptions: a host that ``A_h`` = 1 advertised-interruption's
worth of hours passed cleanly has as much evidence as the prior. So a host that fails three times
in its first hours is learned to be several times riskier at once, while a host with a long clean
record is not penalised much by one reclaim (its E is large). Only interruptible attempts on offers
with an advertised hazard > 0 count: an on-demand machine that vanishes is a fault, not the market.

Pure and small: ``MarketModel`` holds tallies (the store keeps the observations, see
``orchestrator.store.ledger``); ``apply`` returns offers with ``hazard_per_hour`` replaced by the
learned figure and the advertised one kept in ``extra`` for ``tunefleet offers``/``providers``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from providers.base import Offer

GROUP_PRIOR = 5.0  # prior weight of a (provider, GPU) factor, in expected interruptions: one bad host barely moves it
HOST_PRIOR = 1.0  # prior weight of a host's factor around its group's, in expected interruptions

Key = tuple[str, str, str]  # (provider, gpu, host); host "" = the (provider, gpu) group


def host_of(offer: Offer) -> str:
    """The physical machine behind an offer where the provider says (Vast's machine_id), else ""."""
    host = offer.detail("host") or offer.detail("machine_id")
    return "" if host is None else str(host)


@dataclass(frozen=True)
class Exposure:
    """One attempt as an observation: ``hours`` run on an offer advertised at ``advertised``/h."""

    provider: str
    gpu: str
    host: str
    advertised: float
    hours: float
    interrupted: bool
    warned: bool = False


@dataclass
class Tally:
    attempts: int = 0
    hours: float = 0.0
    expected: float = 0.0  # Σ advertised hazard × hours
    interruptions: int = 0
    warned: int = 0

    def add(self, e: Exposure) -> None:
        self.attempts += 1
        self.hours += e.hours
        self.expected += e.advertised * e.hours
        self.interruptions += int(e.interrupted)
        self.warned += int(e.interrupted and e.warned)


@dataclass(frozen=True)
class Learned:
    """An offer's hazard as ranked: the advertised figure, the learned one, and the evidence."""

    advertised: float
    hazard: float
    factor: float
    attempts: int  # observations behind the factor (the host's if it has any, else its group's)
    interruptions: int
    hours: float
    level: str  # "host" | "group" | "advertised" (nothing observed)

    def to_dict(self) -> dict[str, Any]:
        return {"advertised": round(self.advertised, 6), "learned": round(self.hazard, 6),
                "factor": round(self.factor, 4), "observations": self.attempts,
                "interruptions": self.interruptions, "hours": round(self.hours, 3), "level": self.level}


class MarketModel:
    """Tallies of exposures by (provider, gpu, host) and the posterior factors they imply."""

    def __init__(self, tallies: Mapping[Key, Tally] | None = None, *, group_prior: float = GROUP_PRIOR,
                 host_prior: float = HOST_PRIOR):
        self.group_prior = group_prior
        self.host_prior = host_prior
        self.tallies: dict[Key, Tally] = {}
        for (provider, gpu, host), t in (tallies or {}).items():
            self._merge((provider, gpu, host), t)

    def _merge(self, key: Key, t: Tally) -> None:
        for k in {key, (key[0], key[1], "")}:
            mine = self.tallies.setdefault(k, Tally())
            mine.attempts += t.attempts
            mine.hours += t.hours
            mine.expected += t.expected
            mine.interruptions += t.interruptions
            mine.warned += t.warned

    @staticmethod
    def counts(e: Exposure) -> bool:
        """Whether an exposure says anything about the hazard (interruptible, advertised > 0, ran)."""
        return e.advertised > 0 and e.hours >= 0

    def observe(self, e: Exposure) -> None:
        if not self.counts(e):
            return
        for k in {(e.provider, e.gpu, e.host), (e.provider, e.gpu, "")}:
            self.tallies.setdefault(k, Tally()).add(e)

    def group_factor(self, provider: str, gpu: str) -> float:
        g = self.tallies.get((provider, gpu, ""))
        if g is None:
            return 1.0
        return (self.group_prior + g.interruptions) / (self.group_prior + g.expected)

    def learned(self, offer: Offer) -> Learned:
        adv = float(offer.detail("hazard_advertised", offer.hazard_per_hour))
        group = self.tallies.get((offer.provider, offer.gpu, ""))
        if adv <= 0 or group is None:
            return Learned(adv, adv, 1.0, 0, 0, 0.0, "advertised")
        fg = self.group_factor(offer.provider, offer.gpu)
        host = host_of(offer)
        h = self.tallies.get((offer.provider, offer.gpu, host)) if host else None
        if h is None:
            return Learned(adv, adv * fg, fg, group.attempts, group.interruptions, group.hours, "group")
        f = (self.host_prior * fg + h.interruptions) / (self.host_prior + h.expected)
        return Learned(adv, adv * f, f, h.attempts, h.interruptions, h.hours, "host")

    def apply(self, offers: Iterable[Offer]) -> list[Offer]:
        """The offers with their learned hazard; the advertised one stays in ``extra``."""
        out = []
        for o in offers:
            if o.hazard_per_hour <= 0 or (o.provider, o.gpu, "") not in self.tallies:
                out.append(o)
                continue
            lrn = self.learned(o)
            if o.detail("hazard_advertised") is None:
                extra = o.extra + (("hazard_advertised", lrn.advertised), ("hazard_observations", lrn.attempts))
            else:
                extra = o.extra
            out.append(replace(o, hazard_per_hour=lrn.hazard, extra=extra))
        return out

    def groups(self) -> list[tuple[str, str, Tally, float]]:
        """(provider, gpu, tally, learned factor) for every group observed, sorted."""
        return [(p, g, t, self.group_factor(p, g)) for (p, g, h), t in sorted(self.tallies.items()) if h == ""]

    def hosts(self) -> list[tuple[str, str, str, Tally]]:
        return [(p, g, h, t) for (p, g, h), t in sorted(self.tallies.items()) if h]
