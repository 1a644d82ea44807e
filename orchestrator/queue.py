"""Submitting jobs and summarizing them: the few store operations the CLI, the demo and tests share.

Stdlib + store only, so the CLI stays fast.
"""

from __future__ import annotations

import time
from typing import Any

from infra.config import Config


def submit_spec(store, spec, config: Config, priority: int | None = None) -> str:
    """Queue a validated JobSpec. The checkpoint store is fixed at submit time (default filled in),
    so every attempt of the job, wherever it runs, reads and writes the same place."""
    doc = spec.to_payload_dict()
    doc["checkpoint"]["store"] = doc["checkpoint"].get("store") or config.default_store
    return store.submit(doc, name=spec.display_name, priority=spec.priority if priority is None else priority)


def job_summary(store, job, now: float | None = None) -> dict[str, Any]:
    """The machine-readable status of one job (``tunefleet status JOB --json``)."""
    now = now or time.time()
    attempts = store.attempts_for(job.id)
    live = next((a for a in attempts if a.live), None)
    cost = job.cost_usd
    if live is not None and live.usd_per_hour > 0:
        cost += live.usd_per_hour * max(0.0, now - (live.started_at or live.created_at)) / 3600
    started = min((a.started_at for a in attempts if a.started_at), default=None)
    ended = max((a.ended_at or now for a in attempts), default=None) if job.terminal else now
    last = attempts[-1] if attempts else None
    return {
        "id": job.id,
        "name": job.name,
        "state": job.state.value,
        "provider": last.provider if last else None,
        "step": job.step,
        "total_steps": job.total_steps,
        "loss": job.loss,
        "attempts": len(attempts),
        "cost_usd": round(cost, 6),
        "checkpoint": job.checkpoint_uri,
        "checkpoint_step": job.checkpoint_step,
        "adapter_uri": job.adapter_uri,
        "elapsed_s": round(ended - started, 1) if started and ended else 0.0,
        "reason": job.reason,
        "created_at": job.created_at,
    }
