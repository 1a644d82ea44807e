"""Vast.ai run status: the one map from an instance's ``actual_status`` to ``RunStatus``, and ``poll``.

Separate from renting because it is pure reading: the state table below is what a reader checks
when an attempt is reported LOST or EXITED, and it changes when Vast adds a state, not when
renting does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from typing_extensions import override

from providers.base import Provider, ProviderError, RunState, RunStatus
from providers.vast.rental import _instance_id, _Unreachable


class VastStatus(Provider):
    """The polling part of ``VastProvider`` (a mixin; ``_show`` comes from ``VastRental``)."""

    _show: Callable[[int], dict[str, Any] | None]

    # ---- after the launch ----
    @override
    def poll(self, handle: dict[str, Any]) -> RunStatus:
        iid = _instance_id(handle)
        if iid is None:
            return RunStatus(RunState.LOST, detail="the handle names no Vast.ai instance")
        try:
            row = self._show(iid)
        except (_Unreachable, ProviderError) as exc:
            return RunStatus(RunState.UNKNOWN, detail=str(exc))
        return map_status(row)


# Vast's ``actual_status`` -> ours. ``stopped``: an outbid interruptible instance is paused, not
# deleted; ``offline``: its host dropped out. Both lose the capacity: a preemption.
_STATES: dict[str, RunState] = {
    "running": RunState.RUNNING,
    "loading": RunState.PENDING,
    "created": RunState.PENDING,
    "scheduling": RunState.PENDING,
    "stopped": RunState.LOST,
    "paused": RunState.LOST,
    "offline": RunState.LOST,
    "exited": RunState.EXITED,
}


def map_status(row: dict[str, Any] | None) -> RunStatus:
    """One total mapping from a show-instance row (None: gone) to a RunStatus; UNKNOWN otherwise."""
    if row is None:
        return RunStatus(RunState.LOST, detail="the Vast.ai instance is gone")
    raw = row.get("actual_status")
    if raw is None:  # Vast reports null until a host takes the instance
        return RunStatus(RunState.PENDING, detail="not scheduled on a host yet")
    state = _STATES.get(raw, RunState.UNKNOWN) if isinstance(raw, str) else RunState.UNKNOWN
    if state is RunState.LOST:
        return RunStatus(state, detail=f"paused: outbid or host lost (actual_status={raw})")
    if state is RunState.EXITED:  # Vast does not report the exit code; the payload's is in the store
        return RunStatus(state, exit_code=None, detail="the container exited")
    return RunStatus(state, detail=f"actual_status={raw!s:.40}")
