"""The daemon's plumbing for faults: calls off the loop with deadlines, and provider health."""

from __future__ import annotations

import random
import threading
import time

from orchestrator.calls import Calls, CallTimeout
from orchestrator.health import BACKOFF_BASE_S, DISABLE_AFTER, Health


class _Store:
    def __init__(self):
        self.rows = {}

    def set_provider_health(self, name, **row):
        self.rows[name] = row


def test_a_key_in_flight_is_never_started_twice_and_a_late_call_is_a_timeout():
    calls = Calls()
    release = threading.Event()
    started = []

    def slow():
        started.append(1)
        release.wait(5)
        return "late"

    first = calls.start("p", ("poll", "a1"), slow, timeout_s=0.05)
    again = calls.start("p", ("poll", "a1"), slow, timeout_s=0.05)
    assert first is again
    assert calls.take(("poll", "a1")) == (False, None, None)  # within its deadline: no news
    calls.settle([("poll", "a1")], timeout_s=5)  # returns at the deadline, not after 5 s
    done, result, err = calls.take(("poll", "a1"))
    assert done and result is None and isinstance(err, CallTimeout) and calls.timeouts == 1
    release.set()
    assert len(started) == 1
    # once taken, the key may run again, and a quick answer comes back as it is
    calls.start("p", ("poll", "a1"), lambda: 42, timeout_s=5)
    calls.settle([("poll", "a1")], timeout_s=5)
    assert calls.take(("poll", "a1")) == (True, 42, None)
    calls.shutdown()


def test_an_error_is_handed_back_not_raised():
    calls = Calls()
    calls.start("p", "k", lambda: 1 / 0, timeout_s=5)
    calls.settle(["k"], timeout_s=5)
    done, result, err = calls.take("k")
    assert done and isinstance(err, ZeroDivisionError)
    calls.shutdown()


def test_one_hung_lane_does_not_hold_up_another():
    calls = Calls(workers_per_lane=1)
    stuck = threading.Event()
    calls.start("slow", "a", stuck.wait, 10, timeout_s=0.1)
    calls.start("slow", "b", lambda: "queued behind a", timeout_s=0.1)
    calls.start("fast", "c", lambda: "fine", timeout_s=5)
    calls.settle(["c"], timeout_s=5)
    assert calls.take("c") == (True, "fine", None)
    time.sleep(0.15)
    assert isinstance(calls.take("b")[2], CallTimeout)  # its deadline counts from when it was asked
    stuck.set()
    calls.shutdown()


def test_backoff_honours_retry_after_grows_and_disables_after_a_streak():
    now = [1000.0]
    store = _Store()
    h = Health(store, disable_s=300, clock=lambda: now[0], rng=random.Random(1))
    assert h.usable("vast")
    until = h.transient("vast", "HTTP 429", retry_after_s=42, kind="launch")
    assert until == 1042 and not h.usable("vast") and store.rows["vast"]["state"] == "backoff"
    assert "vast" in h.down() and "vast" not in h.disabled()
    waits = []
    for _ in range(DISABLE_AFTER - 2):
        now[0] = h._entries["vast"].until
        waits.append(h.transient("vast", "HTTP 503", kind="launch") - now[0])
    assert waits == sorted(waits) and waits[-1] >= BACKOFF_BASE_S  # exponential (with jitter)
    # an answer of another kind clears the backoff but not the launch streak
    h.success("vast", kind="offers")
    assert h.usable("vast")
    h.transient("vast", "HTTP 503", kind="launch")
    assert store.rows["vast"]["state"] == "disabled" and not h.usable("vast")
    assert "vast" in h.down()  # five in a row: an outage, worth waiting for
    h.success("vast", kind="launch")
    assert h.usable("vast") and store.rows["vast"]["state"] == "ok"


def test_a_provider_not_set_up_is_disabled_and_not_waited_for():
    now = [0.0]
    h = Health(_Store(), disable_s=300, clock=lambda: now[0])
    h.unavailable("skypilot", "no catalog", outage=False)
    assert "skypilot" in h.disabled() and "skypilot" not in h.down() and not h.usable("skypilot")
    now[0] = 301
    assert h.usable("skypilot")  # asked again later
