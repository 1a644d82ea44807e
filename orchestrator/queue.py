"""Submitting jobs and summarizing them: the few store operations the CLI, the demo and tests share.

Stdlib + store only, so the CLI stays fast.
"""

from __future__ import annotations

import time
from typing import Any

from infra.config import Config


def submit_spec(store, spec, config: Config, priority: int | None = None, progress=None,
                owner: str | None = None) -> str:
    """Queue a validated JobSpec. The checkpoint store is fixed at submit time (default filled in),
    so every attempt of the job, wherever it runs, reads and writes the same place; the job's local
    inputs are uploaded there first (``jobs.inputs``), so nothing it needs stays in the user's
    folder. Raises ``InputError``/``StorageError`` before anything is queued. ``owner``: the user
    it is queued for (None: the embedded default, no account)."""
    doc = spec.to_payload_dict()
    doc["checkpoint"]["store"] = doc["checkpoint"].get("store") or config.default_store
    doc = stage_inputs(doc, progress)
    extra = {} if owner is None else {"owner": owner}
    return store.submit(doc, name=spec.display_name, priority=spec.priority if priority is None else priority,
                        **extra)


def stage_inputs(doc: dict[str, Any], progress=None) -> dict[str, Any]:
    """``doc`` with its local inputs uploaded to its checkpoint store (content-addressed)."""
    from infra.storage import open_store
    from jobs.inputs import local_inputs, stage

    if not local_inputs(doc):
        return doc
    return stage(doc, open_store(doc["checkpoint"]["store"]), progress)


def job_summaries(store, jobs, now: float | None = None) -> list[dict[str, Any]]:
    """``job_summary`` of each job, with their attempts read in one query (``tunefleet status --json``)."""
    now = now or time.time()
    attempts = store.attempts_for_jobs([j.id for j in jobs])
    return [job_summary(store, j, now, attempts=attempts[j.id]) for j in jobs]


def job_summary(store, job, now: float | None = None, *, attempts: list | None = None) -> dict[str, Any]:
    """The machine-readable status of one job (``tunefleet status JOB --json``). ``owner`` is there
    only for a job that has one, so an embedded store's output keeps its shape. ``attempts``: the
    job's, when the caller has read them already."""
    now = now or time.time()
    attempts = store.attempts_for(job.id) if attempts is None else attempts
    live = next((a for a in attempts if a.live), None)
    cost = job.cost_usd
    if live is not None and live.usd_per_hour > 0:  # accrues from the launch, as providers bill
        cost += live.usd_per_hour * max(0.0, now - live.billing_start) / 3600
    started = min((a.started_at for a in attempts if a.started_at), default=None)
    ended = max((a.ended_at or now for a in attempts), default=None) if job.terminal else now
    last = attempts[-1] if attempts else None
    summary = {
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
        "wait_code": job.wait_code,  # why a queued job waits (see README: "Why a job waits")
        "wait_until": job.wait_until,  # when it is looked at again for that reason (null: when things change)
        "created_at": job.created_at,
    }
    owner = getattr(job, "owner", None)
    if owner is not None:
        summary["owner"] = owner
    return summary


def submit_sweep(store, path, config: Config, *, owner: str | None = None) -> str:
    """Validate a sweep file and every one of its trials, then queue the first rung.

    Nothing is queued unless every trial's job validates (``SweepError`` says which and why).
    ``owner`` (a team server's user) owns the sweep and its trial jobs.
    """
    from orchestrator.sweep import expand, load_sweep, rungs, trial_spec

    sweep, base = load_sweep(path)
    params = expand(sweep)
    base = stage_inputs({**base, "checkpoint": {**(base.get("checkpoint") or {}),
                                                "store": (base.get("checkpoint") or {}).get("store") or config.default_store}})
    save_every = (base.get("checkpoint") or {}).get("interval") or base.get("save_steps") or 50
    steps = rungs(sweep, int(base.get("max_steps") or 0), int(save_every)) if base.get("max_steps") else [0]
    first = steps[0] or None
    specs = [trial_spec(base, p, max_steps=first, store_uri=config.default_store) for p in params]
    plan = {"sweep": sweep.model_dump(mode="json"), "base": base, "trials": params, "rungs": steps}
    sweep_id = store.create_sweep(sweep.name, plan, sweep.budget_usd, owner=owner)
    for i, (p, spec) in enumerate(zip(params, specs, strict=True)):
        store.add_trial(sweep_id, trial=i, rung=0, params=p, spec=spec, name=f"{sweep.name}/t{i}/r0")
    return sweep_id


def final_eval_loss(store, job_id: str) -> float | None:
    """A succeeded job's final eval loss, from its "succeeded" event (the adapter's manifest holds
    the same; the event saves a round trip to object storage). None without one."""
    for e in reversed(store.events(job_id)):
        if e.kind == "succeeded":
            loss = e.data.get("eval_loss")
            return float(loss) if isinstance(loss, (int, float)) else None
    return None


def with_eval(store, summary: dict[str, Any]) -> dict[str, Any]:
    """One job's summary with its final eval loss and perplexity (exp of it), for ``status JOB``."""
    import math

    loss = final_eval_loss(store, summary["id"]) if summary["state"] == "succeeded" else None
    return {**summary, "eval_loss": loss,
            "perplexity": math.exp(loss) if loss is not None and loss < 700 else None}


def sweep_summary(store, sweep_id: str) -> dict[str, Any]:
    """The leaderboard of a sweep: one row per trial, at its best *completed* rung (the furthest
    one it finished; a trial promoted and then stopped keeps the eval loss and adapter it had), with
    the furthest rung it reached and that attempt's state beside it."""
    from infra.storage import open_store

    sweep = store.get_sweep(sweep_id)
    rows: dict[int, dict[str, Any]] = {}
    for t in store.trials(sweep["id"]):  # by rung, then trial
        job = store.get_job(t["job_id"])
        row = rows.setdefault(t["trial"], {"trial": t["trial"], "params": t["params"], "cost_usd": 0.0,
                                           "rung": None, "job_id": None, "steps": None, "eval_loss": None,
                                           "adapter_uri": None})
        row["cost_usd"] += t["cost_usd"]
        row.update(reached_rung=t["rung"], state=job.state.value)
        if job.state.value == "succeeded":
            final = open_store(job.spec["checkpoint"]["store"]).final(job.id)
            row.update(rung=t["rung"], job_id=job.id, steps=job.step, adapter_uri=job.adapter_uri,
                       eval_loss=(final.meta.get("eval_loss") if final else None))
        elif row["job_id"] is None:  # nothing completed yet: show the attempt in progress
            row.update(job_id=job.id, steps=job.step)
    board = sorted(rows.values(), key=lambda r: (r["rung"] is None, -(r["rung"] or 0), r["eval_loss"] is None,
                                                 r["eval_loss"] or 0.0, r["trial"]))
    best = store.get_job(sweep["best_job_id"]) if sweep["best_job_id"] else None
    return {
        "id": sweep["id"],
        "name": sweep["name"],
        "state": sweep["state"],
        "strategy": sweep["spec"]["sweep"]["strategy"],
        "rung": sweep["rung"],
        "rungs": sweep["spec"]["rungs"],
        "budget_usd": sweep["budget_usd"],
        "spent_usd": round(store.sweep_spend(sweep["id"]), 6),
        "best_job_id": sweep["best_job_id"],
        "best_adapter_uri": best.adapter_uri if best else None,
        "reason": sweep["reason"],
        "trials": [{**r, "cost_usd": round(r["cost_usd"], 6)} for r in board],
        **({"owner": sweep["owner"]} if sweep.get("owner") else {}),  # only on a team server, as job_summary
    }
