"""The placement policies compared. Every one sees the same offers at the same moments.

- ``tunefleet``: ``orchestrator.decide.decide`` exactly as the daemon calls it (the job spec, its
  Estimate, the offers free now, the offers lost in the last 60 s, the money spent, the steps
  committed): it places, or runs late when no offer can meet the deadline (as the daemon does).
- ``cheapest_per_hour``: what SkyPilot's and dstack's optimizers do. The same hard constraints
  (VRAM, GPU count, restricted data, spot policy: rank's own checks, with the deadline taken
  out), then the lowest $/h.
- ``on_demand``: never interruptible: decide with ``policy.spot: never`` (the cheapest expected
  cost among on-demand and owned offers that meet the deadline, or late).
- ``local_only``: queue for the owned GPUs (only owned offers are ranked, no deadline), first
  come first served; a job the owned GPUs cannot hold never runs.
- ``lower_bound``: each job once, never interrupted (reclaims do not touch it), on the offer
  with the lowest true cost (price x (start-up + real hours)) among those free when it is placed
  — at its arrival unless nothing could hold it then — that finish by its deadline (the
  cheapest of all when none does).
"""

from __future__ import annotations

import copy

from providers.base import Offer

from .sim import Policy


class Tunefleet(Policy):
    name = "tunefleet"

    def choose(self, job, offers, now_epoch, avoid):
        d = self.decide(job, job.info.spec, offers, now_epoch, avoid)
        return d.placement.offer if d.launches else None


class CheapestPerHour(Policy):
    name = "cheapest_per_hour"

    def choose(self, job, offers, now_epoch, avoid):
        viable = [p.offer for p in self.rank(job.info.spec_no_deadline, job.info.est, offers, now=now_epoch,
                                             avoid=avoid, spent_usd=job.spent, done_steps=job.committed)
                  if p.viable]
        fresh = [o for o in viable if (o.provider, o.offer_id) not in avoid]  # lost ones: last resort, as rank
        return min(fresh or viable, key=lambda o: (o.usd_per_hour, o.provider, o.offer_id)) if viable else None


class OnDemand(Tunefleet):
    name = "on_demand"

    def __init__(self) -> None:
        super().__init__()
        self._specs: dict[str, dict] = {}

    def choose(self, job, offers, now_epoch, avoid):
        spec = self._specs.get(job.info.track.id)
        if spec is None:
            spec = copy.deepcopy(job.info.spec)
            spec["policy"]["spot"] = "never"
            self._specs[job.info.track.id] = spec
        d = self.decide(job, spec, offers, now_epoch, avoid)
        return d.placement.offer if d.launches else None


class LocalOnly(Policy):
    name = "local_only"

    def choose(self, job, offers, now_epoch, avoid):
        owned = [o for o in offers if o.owned]  # the queue for the owned GPUs: nothing else is offered
        if not owned:
            return None
        placements = self.rank(job.info.spec_no_deadline, job.info.est, owned, now=now_epoch, avoid=avoid,
                               spent_usd=job.spent, done_steps=job.committed)
        return placements[0].offer if placements and placements[0].viable else None


class LowerBound(Policy):
    name = "lower_bound"
    interruptions = False

    def choose(self, job, offers, now_epoch, avoid):
        info = job.info
        best: tuple | None = None
        pick: Offer | None = None
        for p in self.rank(info.spec_no_deadline, info.est, offers, now=now_epoch):
            if not p.viable:
                break
            o = p.offer
            hours = o.startup_s / 3600.0 + info.true_hours(o)
            finish = now_epoch + hours * 3600.0
            late = info.deadline_epoch is not None and finish > info.deadline_epoch
            key = (late, o.usd_per_hour * hours, finish, o.provider, o.offer_id)
            if best is None or key < best:
                best, pick = key, o
        return pick


class TunefleetWithoutReclaims(Tunefleet):
    """Diagnostic, not a policy one can have: tunefleet's choices in a world where nothing is ever
    reclaimed. Its distance to the lower bound is what the choices cost; the rest of tunefleet's
    distance is what interruptions cost (the rework, the restarts, and re-placing lost jobs)."""

    name = "tunefleet_without_reclaims"
    interruptions = False


POLICIES = (Tunefleet, CheapestPerHour, OnDemand, LocalOnly, LowerBound)
