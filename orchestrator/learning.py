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

Launches are learned the same way: a host whose machines often fail to start (a broken driver,
a full disk, an image it cannot pull) costs a billed start-up and a delay each time. Its failure
probability is Beta-Binomial, pooled the same two levels around ``LAUNCH_FAIL_PRIOR`` (weights
``GROUP_LAUNCHES`` and ``HOST_LAUNCHES`` in launches), and ``rank`` adds the expected wasted
start-ups, ``p / (1 - p)`` of them, to an offer's time and cost.

Pure and small: ``MarketModel`` holds tallies (the store keeps the observations, see
``orchestrator.store.ledger``); ``apply`` returns offers with ``hazard_per_hour`` replaced by the
learned figure and the advertised one kept in ``extra`` for ``tunefleet offers``/``providers``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from providers.base import Offer

GROUP_PRIOR = 5.0  # prior weight of a (provider, GPU) factor, in expected interruptions: one bad host barely moves it
HOST_PRIOR = 1.0  # prior weight of a host's factor around its group's, in expected interruptions
LAUNCH_FAIL_PRIOR = 0.03  # a launch fails this often before anything is known
GROUP_LAUNCHES = 20.0  # prior weight of a (provider, GPU) launch failure rate, in launches
HOST_LAUNCHES = 2.0  # prior weight of a host's rate around its group's, in launches
MAX_LAUNCH_FAIL = 0.9  # never believe a host fails every time (it would price it at infinity)

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
    launch_failed: bool = False  # it never ran: says nothing about the hazard, only about launches


@dataclass
class Tally:
    attempts: int = 0  # attempts that ran on an interruptible offer (hazard observations)
    hours: float = 0.0
    expected: float = 0.0  # Σ advertised hazard × hours
    interruptions: int = 0
    warned: int = 0
    launches: int = 0  # every launch, on any offer
    launch_failures: int = 0

    def add(self, e: Exposure) -> None:
        self.launches += 1
        self.launch_failures += int(e.launch_failed)
        if e.launch_failed or e.advertised <= 0:
            return
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
            mine.launches += t.launches
            mine.launch_failures += t.launch_failures

    def observe(self, e: Exposure) -> None:
        """One launch and, if it ran on an offer with an advertised hazard, its exposure."""
        for k in {(e.provider, e.gpu, e.host), (e.provider, e.gpu, "")}:
            self.tallies.setdefault(k, Tally()).add(e)

    def group_factor(self, provider: str, gpu: str) -> float:
        g = self.tallies.get((provider, gpu, ""))
        if g is None:
            return 1.0
        return (self.group_prior + g.interruptions) / (self.group_prior + g.expected)

    def launch_fail(self, provider: str, gpu: str, host: str) -> tuple[float, int]:
        """(probability that a launch on this host fails, launches behind it)."""
        g = self.tallies.get((provider, gpu, ""))
        if g is None:
            return LAUNCH_FAIL_PRIOR, 0
        pg = (GROUP_LAUNCHES * LAUNCH_FAIL_PRIOR + g.launch_failures) / (GROUP_LAUNCHES + g.launches)
        h = self.tallies.get((provider, gpu, host)) if host else None
        if h is None:
            return min(MAX_LAUNCH_FAIL, pg), g.launches
        p = (HOST_LAUNCHES * pg + h.launch_failures) / (HOST_LAUNCHES + h.launches)
        return min(MAX_LAUNCH_FAIL, p), h.launches

    def learned(self, offer: Offer) -> Learned:
        adv = float(offer.detail("hazard_advertised", offer.hazard_per_hour))
        group = self.tallies.get((offer.provider, offer.gpu, ""))
        if adv <= 0 or group is None or not group.attempts:
            return Learned(adv, adv, 1.0, 0, 0, 0.0, "advertised")
        fg = self.group_factor(offer.provider, offer.gpu)
        host = host_of(offer)
        h = self.tallies.get((offer.provider, offer.gpu, host)) if host else None
        if h is None or not h.attempts:
            return Learned(adv, adv * fg, fg, group.attempts, group.interruptions, group.hours, "group")
        f = self.host_factor(h, fg)
        return Learned(adv, adv * f, f, h.attempts, h.interruptions, h.hours, "host")

    def host_factor(self, h: Tally, group_factor: float) -> float:
        """A host's posterior factor: its own record around its group's factor."""
        return (self.host_prior * group_factor + h.interruptions) / (self.host_prior + h.expected)

    def apply(self, offers: Iterable[Offer]) -> list[Offer]:
        """The offers with their learned hazard and launch failure rate; the advertised hazard stays
        in ``extra`` (``hazard_advertised``, ``hazard_observations``, ``launch_fail_p``)."""
        out = []
        for o in offers:
            if (o.provider, o.gpu, "") not in self.tallies or o.detail("launch_fail_p") is not None:
                out.append(o)
                continue
            fail, _ = self.launch_fail(o.provider, o.gpu, host_of(o))
            extra = o.extra + (("launch_fail_p", fail),)
            if o.hazard_per_hour <= 0:
                out.append(replace(o, extra=extra))
                continue
            lrn = self.learned(o)
            if o.detail("hazard_advertised") is None:
                extra += (("hazard_advertised", lrn.advertised), ("hazard_observations", lrn.attempts))
            out.append(replace(o, hazard_per_hour=lrn.hazard, extra=extra))
        return out

    def groups(self) -> list[tuple[str, str, Tally, float]]:
        """(provider, gpu, tally, learned factor) for every group observed, sorted."""
        return [(p, g, t, self.group_factor(p, g)) for (p, g, h), t in sorted(self.tallies.items())
                if h == "" and t.attempts]

    def hosts(self) -> list[tuple[str, str, str, Tally]]:
        return [(p, g, h, t) for (p, g, h), t in sorted(self.tallies.items()) if h and t.attempts]
