"""The daemon's view of each provider: ok, backing off after transient errors, or disabled a while.

Why its own piece: the action for a provider's error is about the provider, not the job (one
rate-limited Vast answer should pause every job's use of Vast, not fail one job), and a user must
be able to see it: every change is written to the store, where ``tunefleet providers`` reads it.

- **Transient** (rate limit, 5xx, a call past its deadline): ask nothing new for ``retry_after_s``
  when the provider says, else exponentially longer (5 s, 10 s, ... 5 min) with jitter. Five in a
  row and the provider is disabled.
- **Unavailable** (no credentials, refused key, could not connect at start-up): disabled for
  ``disable_s``, then tried again.
- **Success** of a kind of call (offers, launch, poll) clears the backoff; the count of
  consecutive failures is kept per kind, so a provider that answers offers but fails every launch
  is still disabled after five failed launches.
Polls and cancels of attempts already running still go to a provider that backs off: only new
work (offers, launches) waits.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

BACKOFF_BASE_S = 5.0
BACKOFF_MAX_S = 300.0
DISABLE_AFTER = 5  # consecutive transient failures


class HealthState(StrEnum):
    OK = "ok"
    BACKOFF = "backoff"
    DISABLED = "disabled"


@dataclass
class _Entry:
    state: HealthState = HealthState.OK
    until: float = 0.0
    reason: str = ""
    failures: int = 0  # consecutive transient failures of the kind of call that failed last
    outage: bool = False  # disabled because it did not answer (worth waiting for), not by configuration


class Health:
    def __init__(self, store, *, disable_s: float = 300.0, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, scale: float = 1.0) -> None:
        self.store = store
        self.scale = scale
        self.disable_s = disable_s
        self.clock = clock
        self.rng = rng or random.Random()
        self._entries: dict[str, _Entry] = {}
        self._streaks: dict[tuple[str, str], int] = {}  # (provider, kind of call) -> failures in a row

    def _entry(self, name: str) -> _Entry:
        return self._entries.setdefault(name, _Entry())

    def _save(self, name: str, e: _Entry) -> None:
        try:
            self.store.set_provider_health(name, state=e.state.value, reason=e.reason,
                                           until=e.until or None, failures=e.failures)
        except Exception:  # noqa: BLE001 - what a user reads; never worth stopping the daemon over
            pass

    def usable(self, name: str) -> bool:
        """May new work (offers, launches) go to this provider now?"""
        e = self._entries.get(name)
        return e is None or e.state is HealthState.OK or self.clock() >= e.until

    def down(self) -> dict[str, tuple[str, float | None]]:
        """Providers backing off after transient errors: name -> (why, until). Worth waiting for."""
        now = self.clock()
        return {n: (f"{'backing off' if e.state is HealthState.BACKOFF else 'down'}: {e.reason}", e.until)
                for n, e in self._entries.items()
                if (e.state is HealthState.BACKOFF or (e.state is HealthState.DISABLED and e.outage)) and now < e.until}

    def disabled(self) -> dict[str, str]:
        """Providers switched off (unreachable or refusing us, or misconfigured): name -> why."""
        now = self.clock()
        return {n: f"{e.reason} (tried again in {e.until - now:.0f} s)" for n, e in self._entries.items()
                if e.state is HealthState.DISABLED and not e.outage and now < e.until}

    def transient(self, name: str, reason: str, retry_after_s: float | None = None, *, kind: str = "call") -> float:
        """Back the provider off; returns until when."""
        e = self._entry(name)
        streak = self._streaks[(name, kind)] = self._streaks.get((name, kind), 0) + 1
        e.failures = streak
        if e.failures >= DISABLE_AFTER:
            return self.unavailable(name, f"{e.failures} transient errors in a row; last: {reason}", outage=True)
        wait = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (e.failures - 1)) * self.scale
        wait = max(wait * (0.5 + self.rng.random() / 2), retry_after_s or 0.0)  # jitter, never under retry-after
        e.state, e.until, e.reason = HealthState.BACKOFF, self.clock() + wait, reason
        self._save(name, e)
        return e.until

    def unavailable(self, name: str, reason: str, *, outage: bool = False) -> float:
        """Disable the provider for ``disable_s``. ``outage``: it could not be reached (jobs that
        might run there wait for it); otherwise it refuses us or is not set up (they do not)."""
        e = self._entry(name)
        e.state, e.until, e.reason, e.outage = HealthState.DISABLED, self.clock() + self.disable_s, reason, outage
        e.failures = max(e.failures, 1)
        self._save(name, e)
        return e.until

    def success(self, name: str, *, kind: str = "call") -> None:
        self._streaks.pop((name, kind), None)
        e = self._entries.get(name)
        if e is None:
            e = self._entries[name] = _Entry(reason="answering")
            self._save(name, e)
        elif e.state is not HealthState.OK:
            self._entries[name] = e = _Entry(reason="answering again",
                                             failures=max((n for (p, _), n in self._streaks.items() if p == name), default=0))
            self._save(name, e)
