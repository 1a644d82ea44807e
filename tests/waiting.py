"""One way for a test to wait for something it cannot be told about: poll with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(cond: Callable[[], Any], timeout: float, what: str, on_fail: Callable[[], str] = lambda: "",
             every: float = 0.05) -> Any:
    """``cond()``'s first truthy value, polled every ``every`` s; AssertionError after ``timeout`` s
    naming ``what`` (and ``on_fail()``, e.g. a log tail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}\n{on_fail()}")
        time.sleep(every)
