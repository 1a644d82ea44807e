"""Who is calling, and what they may see and do.

- A request carries ``Authorization: Bearer tf_…``; the store looks the token up by its sha256
  (``Store.authenticate``): a revoked or expired token, or a disabled user, fails at once. No
  token, or a bad one: 401 with ``WWW-Authenticate: Bearer`` and no hint of which part was wrong.
- Visibility: an admin sees every job; a member sees the jobs of their team (owners in the same
  team) and acts (cancel, preempt, resume) on their own. A job with no owner (queued on the server
  machine without an account, the one-person path) is an admin's. A job the caller may not see
  is answered exactly like a job that does not exist (404), so ids of other teams' jobs leak nothing.
- Rate limits: a token bucket per token (``rate`` requests a second, ``burst`` at once); past it,
  429 with ``Retry-After``. In memory, per server process.

The token itself is never logged, echoed or put in an error body.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from dataclasses import dataclass

from fastapi import HTTPException, Request

from orchestrator.store import UserNotFound, UserRow

ADMIN = "admin"


@dataclass(frozen=True)
class Caller:
    """The authenticated user of one request, and the teams of the job owners it has looked up."""

    user: UserRow

    @property
    def admin(self) -> bool:
        return self.user.role == ADMIN


class Access:
    """Visibility and permission checks against the store (owner -> team looked up, then cached
    briefly: a user's team changes rarely and a stale answer lasts seconds)."""

    def __init__(self, store, ttl_s: float = 5.0) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._teams: dict[str, tuple[float, str | None]] = {}
        self._lock = threading.Lock()

    def team_of(self, owner: str | None) -> str | None:
        if owner is None:
            return None
        now = time.monotonic()
        with self._lock:
            hit = self._teams.get(owner)
            if hit is not None and now - hit[0] < self.ttl_s:
                return hit[1]
        try:
            team = self.store.get_user(owner).team
        except UserNotFound:
            team = None
        with self._lock:
            self._teams[owner] = (now, team)
        return team

    def sees(self, caller: Caller, owner: str | None) -> bool:
        if caller.admin:
            return True
        if owner is None:
            return False
        return owner == caller.user.name or self.team_of(owner) == caller.user.team

    def acts(self, caller: Caller, owner: str | None) -> bool:
        return caller.admin or (owner is not None and owner == caller.user.name)


class RateLimiter:
    """A token bucket per key: ``rate`` a second, up to ``burst`` at once."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 if the request may go ahead, else the seconds until it may."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


def unauthorized() -> HTTPException:
    return HTTPException(401, "a valid API token is required: Authorization: Bearer tf_… "
                              "(tunefleet admin token create USER)", headers={"WWW-Authenticate": "Bearer"})


def authenticate(request: Request) -> Caller:
    """The caller of ``request`` (FastAPI dependency); 401 or 429 otherwise."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized()
    state = request.app.state
    user = state.store.authenticate(token.strip())
    if user is None:
        raise unauthorized()
    wait = state.limiter.take(hashlib.sha256(token.strip().encode()).hexdigest())
    if wait > 0:
        raise HTTPException(429, f"too many requests for this token; retry in {math.ceil(wait)} s",
                            headers={"Retry-After": str(max(1, math.ceil(wait)))})
    return Caller(user)
