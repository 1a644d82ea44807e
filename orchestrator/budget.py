"""Hard budget caps: per job (``policy.max_usd``), per sweep (``budget_usd``), global per month.

Why a separate pure module: the rule must be the same before a launch and while running, and it
must be checkable without a daemon. The invariant it protects: *recorded spend never exceeds a
cap*. Two checks enforce it:

- **Before a launch**: spent + what running attempts are still expected to spend (committed) +
  this attempt's estimate must fit under every cap that applies, or the job waits, with the
  reason in its events (or fails, when even an idle budget could not hold it).
- **While running**: an attempt whose spend, at its hourly rate, would cross a cap before the
  daemon can next act (the horizon: a poll interval plus the stop grace, plus margin) is stopped
  now: checkpointed and ended as ``stopped_budget``, resumable if the cap is raised.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Cap:
    scope: str  # "job j1234567", "sweep s1234567", "monthly budget"
    limit_usd: float
    spent_usd: float  # recorded in the ledger
    running_usd: float = 0.0  # accrued by live attempts, not yet recorded
    committed_usd: float = 0.0  # what live attempts are still expected to spend

    @property
    def headroom(self) -> float:
        return self.limit_usd - self.spent_usd - self.running_usd - self.committed_usd


def launch_refusal(caps: list[Cap], est_usd: float | None) -> tuple[str, bool] | None:
    """(why the launch does not fit, whether it never can) or None when it fits every cap.

    "Never" means the estimate is over the cap's limit minus what is already recorded, so
    waiting for running attempts to finish cannot help.
    """
    need = est_usd or 0.0
    for cap in caps:
        if need > cap.headroom + 1e-12:
            never = need > cap.limit_usd - cap.spent_usd + 1e-12
            why = (
                f"{cap.scope}: ${cap.limit_usd:.2f} cap, ${cap.spent_usd:.2f} spent"
                + (f", ${cap.running_usd + cap.committed_usd:.2f} held by running attempts" if not never else "")
                + f"; this attempt is expected to cost ${need:.2f}"
            )
            return why, never
    return None


def must_stop(cap: Cap, rate_usd_per_h: float, horizon_s: float) -> bool:
    """Would running on at ``rate`` for ``horizon_s`` more seconds cross the cap?"""
    if rate_usd_per_h <= 0:
        return False
    upcoming = rate_usd_per_h * horizon_s / 3600.0
    return cap.spent_usd + cap.running_usd + upcoming > cap.limit_usd


def month_start(now: float) -> float:
    """00:00 UTC on the first day of ``now``'s month (the monthly budget's window)."""
    t = time.gmtime(now)
    return float(calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)))
