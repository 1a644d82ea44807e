"""Hard budget caps: per job (``policy.max_usd``), per sweep (``budget_usd``), global per month,
and per user and per team per month (``users.monthly_usd``, ``teams.monthly_usd``: jobs with an owner).

Why a separate pure module: the rule must be the same before a launch and while running, and it
must be checkable without a daemon. The invariant it protects: *recorded spend never exceeds a
cap*. Two checks enforce it:

- **Before a launch**: spent + what running attempts are still expected to spend (committed) +
  this attempt's estimate must fit under every cap that applies, or the job waits, with the
  reason in its events (or fails, when even an idle budget could not hold it).
- **While running**: an attempt whose spend, at its hourly rate, would cross a cap before the
  daemon can next act and the attempt has stopped (the horizon: the daemon's measured tick length,
  twice, plus the stop grace and how often the payload looks at its control object) is told to
  stop now: it saves, commits and exits, and ends as ``stopped_budget``, resumable if the cap is
  raised.

Spend accrues from the launch (providers bill the start-up on every attempt) to the attempt's
last sign of life.
"""

from __future__ import annotations

import calendar
import math
import time
from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class Cap:
    scope: str  # "job j1234567", "sweep s1234567", "monthly budget", "user alice's monthly budget"
    limit_usd: float
    spent_usd: float  # recorded in the ledger
    running_usd: float = 0.0  # accrued by live attempts, not yet recorded
    committed_usd: float = 0.0  # what live attempts are still expected to spend
    resets_at: float | None = None  # when ``spent_usd`` starts again from 0 (the monthly budgets)
    rate_usd_per_h: float = 0.0  # what the live attempts it bounds cost together, per hour
    kind: str = ""  # "job", "sweep", "monthly", "user", "team"
    hint: str | None = None  # how to raise it, told to a job that waits for it (accounts' caps)

    @property
    def headroom(self) -> float:
        return self.limit_usd - self.spent_usd - self.running_usd - self.committed_usd


def headroom(caps: list[Cap]) -> tuple[float, Cap | None]:
    """What may still be spent under every cap at once: the smallest headroom (limit minus what is
    recorded, accrued by live attempts and committed to them) and the cap that gives it; (inf,
    None) when no cap applies."""
    if not caps:
        return math.inf, None
    tight = min(caps, key=lambda c: c.headroom)
    return tight.headroom, tight


class Shortfall(StrEnum):
    HELD = "held"  # running attempts hold the money: wait for them to end
    RESET = "reset"  # this period's budget is spent: wait for ``resets_at``
    NEVER = "never"  # more than the whole cap: no wait can help


@dataclass(frozen=True)
class Refusal:
    cap: Cap
    kind: Shortfall
    why: str

    @property
    def until(self) -> float | None:
        return self.cap.resets_at if self.kind is Shortfall.RESET else None


def usd(amount: float) -> str:
    """Dollars with enough digits to tell $0.0001 from $0.00: cents from $1 up, two significant
    digits below ("$0.00012"), at most 8 decimals."""
    if amount == 0 or not math.isfinite(amount):
        return f"${amount:.2f}"
    if abs(amount) >= 1:
        return f"${amount:,.2f}"
    decimals = min(8, max(2, 1 - math.floor(math.log10(abs(amount)))))
    return f"${amount:.{decimals}f}"


def launch_refusal(caps: list[Cap], est_usd: float | None) -> Refusal | None:
    """Why a launch expected to cost ``est_usd`` does not fit, or None when it fits every cap.

    HELD: it would fit once running attempts end. RESET: it fits a whole period of a cap that
    resets (the month), not what is left of this one. NEVER: it is over the cap's limit minus what
    is recorded, and the cap never resets (or it is over even a whole period).
    """
    need = est_usd or 0.0
    for cap in caps:
        if need <= cap.headroom + 1e-12:
            continue
        if need <= cap.limit_usd - cap.spent_usd + 1e-12:
            kind = Shortfall.HELD
        elif cap.resets_at is not None and need <= cap.limit_usd + 1e-12:
            kind = Shortfall.RESET
        else:
            kind = Shortfall.NEVER
        why = (
            f"{cap.scope}: {usd(cap.limit_usd)} cap, {usd(cap.spent_usd)} spent"
            + (" this month" if cap.resets_at is not None else "")
            + (f", {usd(cap.running_usd + cap.committed_usd)} held by running attempts" if kind is Shortfall.HELD else "")
            + f"; this attempt is expected to cost {usd(need)}"
            + (f"; {cap.hint}" if cap.hint and kind is not Shortfall.HELD else "")
        )
        return Refusal(cap, kind, why)
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


def next_month_start(now: float) -> float:
    """00:00 UTC on the first day of the month after ``now``'s (when the monthly budget resets)."""
    t = time.gmtime(now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))
