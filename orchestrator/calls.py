"""Calls that may block (provider APIs, object storage) run on worker threads, never on the daemon's loop.

Why: one slow provider (a SkyPilot ``down`` that takes a minute, a Vast request that hangs, a local
cancel that waits out its grace) must not delay the polls, stops and launches of every other job,
and a budget stop must happen within a horizon the daemon can measure.

How: each *lane* (a provider's name, or ``store``) has a small thread pool. A call is started under
a *key* (``("poll", attempt_id)``); starting a key that is already in flight returns the call in
flight, so nothing is ever asked twice at once. Every call has a deadline counted from when it was
started (queueing included): a call past it is *overdue*, and the daemon treats it as a timeout.
Python cannot kill a thread, so a hung call keeps its worker; the pool is bounded, so a provider
that hangs everything ends up with its calls queued and overdue, never with unbounded threads.

The loop starts what it needs, waits a bounded moment (``settle``) for the answers, and acts on
those that came back; the rest are picked up on a later tick.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

WORKERS_PER_LANE = 4


class CallTimeout(Exception):
    """A call did not finish before its deadline (its thread may still be running)."""


@dataclass
class Call:
    key: Hashable
    lane: str
    started: float  # monotonic
    deadline: float  # monotonic
    future: cf.Future
    ran_at: float | None = None  # wall clock: when a worker started it (after any queueing)
    finished_at: float | None = None  # wall clock: when it returned or raised

    @property
    def done(self) -> bool:
        return self.future.done()

    def overdue(self, now: float) -> bool:
        return not self.future.done() and now > self.deadline

    def outcome(self) -> tuple[Any, BaseException | None]:
        """(result, None) or (None, the exception) for a finished call."""
        try:
            return self.future.result(timeout=0), None
        except BaseException as exc:  # noqa: BLE001 - handed to the caller to map through one table
            return None, exc


class Calls:
    """Keyed calls on per-lane thread pools, each with a deadline."""

    def __init__(self, workers_per_lane: int = WORKERS_PER_LANE, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.workers = workers_per_lane
        self.clock = clock
        self.wall = wall  # the caller's wall clock, for when calls ran and finished
        self._pools: dict[str, cf.ThreadPoolExecutor] = {}
        self._calls: dict[Hashable, Call] = {}
        self._lock = threading.Lock()
        self.timeouts = 0  # calls found overdue (for the daemon's figures)

    def start(self, lane: str, key: Hashable, fn: Callable[..., Any], *args: Any, timeout_s: float,
              **kwargs: Any) -> Call:
        """Run ``fn(*args, **kwargs)`` on ``lane`` unless ``key`` is already in flight."""
        with self._lock:
            existing = self._calls.get(key)
            if existing is not None:
                return existing
            pool = self._pools.get(lane)
            if pool is None:
                pool = self._pools[lane] = cf.ThreadPoolExecutor(self.workers, thread_name_prefix=f"tf-{lane}")
            now = self.clock()
            box: list[Call] = []

            def timed() -> Any:
                box[0].ran_at = self.wall()
                try:
                    return fn(*args, **kwargs)
                finally:
                    box[0].finished_at = self.wall()

            call = Call(key, lane, now, now + timeout_s, cf.Future())
            box.append(call)
            call.future = pool.submit(timed)
            self._calls[key] = call
            return call

    def get(self, key: Hashable) -> Call | None:
        with self._lock:
            return self._calls.get(key)

    def take(self, key: Hashable) -> tuple[bool, Any, BaseException | None]:
        """(finished, result, error) for ``key``, forgetting it once finished or overdue."""
        done, result, error, _ = self.take_call(key)
        return done, result, error

    def take_call(self, key: Hashable) -> tuple[bool, Any, BaseException | None, Call | None]:
        """``take``, plus the call itself (when it ran and finished, wall clock).

        Not started or still within its deadline: (False, None, None). Overdue: (True, None,
        CallTimeout). A later ``start`` of the same key runs the call again.
        """
        with self._lock:
            call = self._calls.get(key)
            if call is None:
                return False, None, None, None
            if call.done:
                del self._calls[key]
            elif call.overdue(self.clock()):
                del self._calls[key]
                self.timeouts += 1
                waited = self.clock() - call.started
                return True, None, CallTimeout(f"no answer within {waited:.1f} s"), call
            else:
                return False, None, None, None
        result, error = call.outcome()
        return True, result, error, call

    def unread(self, kinds: Iterable[str]) -> int:
        """Calls of these kinds started and not taken yet, finished or not (their answers unread)."""
        kinds = set(kinds)
        with self._lock:
            return sum(1 for k in self._calls if isinstance(k, tuple) and k and k[0] in kinds)

    def in_flight(self, lanes: Iterable[str] | None = None, kinds: Iterable[str] | None = None) -> int:
        """Calls not finished yet (optionally only in these lanes, or whose key starts with a kind)."""
        lanes = None if lanes is None else set(lanes)
        kinds = None if kinds is None else set(kinds)
        with self._lock:
            return sum(1 for k, c in self._calls.items() if not c.done
                       and (lanes is None or c.lane in lanes)
                       and (kinds is None or (isinstance(k, tuple) and k and k[0] in kinds)))

    def settle(self, keys: Iterable[Hashable], timeout_s: float) -> None:
        """Wait until every call of ``keys`` has finished or passed its deadline, at most ``timeout_s``."""
        if timeout_s <= 0:
            return
        with self._lock:
            calls = [c for k in keys if (c := self._calls.get(k)) is not None and not c.done]
        if calls:
            last = max(c.deadline for c in calls) - self.clock()
            cf.wait([c.future for c in calls], timeout=max(0.0, min(timeout_s, last)))

    def shutdown(self) -> None:
        """Stop accepting work; calls still running are abandoned (their threads end with them)."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
            self._calls.clear()
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
