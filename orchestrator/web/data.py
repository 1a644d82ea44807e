"""What the dashboard's pages show, as plain values: built from the store with the same views the
CLI and the API use (``orchestrator.views``, ``orchestrator.queue``), filtered by what the viewer
may see (``orchestrator.api.auth.Access``). Charts are specs for ``static/charts.js``:
``{title, x: {kind}, y: {kind, label}, series: [{label, points, dashed?, step?}], hlines: [{label, y}]}``.
"""

from __future__ import annotations

import time
from typing import Any

from infra.config import Config
from orchestrator.api.auth import Access, Caller
from orchestrator.queue import job_summaries, job_summary, with_eval
from orchestrator.store import JobRow

QUEUE_LIMIT = 500


def queue(store, access: Access, caller: Caller, *, state: str | None = None, owner: str | None = None,
          sweep: str | None = None) -> list[dict[str, Any]]:
    """The jobs the viewer may see, newest first, each with its cap and sweep; filtered."""
    from orchestrator.states import JobState

    states = [JobState(state)] if state in {s.value for s in JobState} else None
    team = None if caller.admin else caller.user.team
    jobs = [j for j in store.list_jobs(states=states, owner=owner or None, team=team, limit=QUEUE_LIMIT)
            if access.sees(caller, j.owner) and (not sweep or j.sweep_id == sweep)]
    rows = job_summaries(store, jobs)
    for row, job in zip(rows, jobs, strict=True):
        row["cap_usd"] = (job.spec.get("policy") or {}).get("max_usd")
        row["sweep_id"] = job.sweep_id
        row["owner"] = job.owner
        row["terminal"] = job.terminal
    return rows


def story(store, config: Config, job: JobRow) -> dict[str, Any]:
    """A job's story: its status, each attempt (where, at what price, how long, why it ended, from
    which step it resumed), its committed checkpoints, its estimate and cap, its timeline."""
    from infra.storage import StorageError, open_store

    now = time.time()
    summary = with_eval(store, job_summary(store, job, now))
    events = store.events(job.id)
    records = {e.attempt_id: e.data for e in events if e.kind == "attempt_created"}
    spent: dict[str, float] = {}
    for r in store.spend_rows(job.id):
        if r.get("attempt_id"):
            spent[r["attempt_id"]] = spent.get(r["attempt_id"], 0.0) + r["usd"]
    attempts = []
    for a in store.attempts_for(job.id):
        rec = records.get(a.id) or {}
        offer = rec.get("offer") or {}
        end = a.ended_at or now
        attempts.append({
            "seq": a.seq, "id": a.id, "provider": a.provider, "offer_id": a.offer_id, "state": a.state.value,
            "gpu": offer.get("gpu"), "gpu_count": offer.get("gpu_count"), "usd_per_hour": a.usd_per_hour,
            "interruptible": offer.get("interruptible"), "created_at": a.created_at, "started_at": a.started_at,
            "ended_at": a.ended_at, "seconds": max(0.0, end - (a.started_at or a.created_at)),
            "start_step": a.start_step, "end_step": a.end_step, "usd": round(spent.get(a.id, 0.0), 6),
            "end_code": a.end_code.value if a.end_code else None, "end_reason": a.end_reason,
            "why": rec.get("why"), "est_usd": rec.get("est_usd"), "live": a.live,
        })
    checkpoints: list[dict[str, Any]] = []
    store_uri = (job.spec.get("checkpoint") or {}).get("store") or config.default_store
    try:
        ckpt = open_store(store_uri)
        checkpoints = [{"step": r.step, "uri": r.uri, "created_at": r.created_at, "bytes": sum(f.size for f in r.files)}
                       for r in ckpt.list_checkpoints(job.id)]
    except (StorageError, OSError, ValueError):
        checkpoints = []
    first = attempts[0] if attempts else None
    if summary.get("eval_loss") is None:  # still training: the latest eval the daemon has seen
        evals = [p["eval_loss"] for p in store.metrics(job.id) if p["eval_loss"] is not None]
        summary["eval_loss"] = evals[-1] if evals else None
    return {
        "job": summary, "spec": job.spec, "owner": job.owner, "sweep_id": job.sweep_id,
        "cap_usd": (job.spec.get("policy") or {}).get("max_usd"),
        "est_usd": first["est_usd"] if first else None, "attempts": attempts, "checkpoints": checkpoints,
        "events": [{"ts": e.ts, "kind": e.kind, "message": e.message} for e in events[-200:]],
        "terminal": job.terminal,
    }


def loss_chart(store, job: JobRow) -> dict[str, Any]:
    """The job's loss curve: training loss per attempt (a resumed attempt starts its own line at the
    step it resumed from) and eval loss as its own dashed series, from what the daemon recorded."""
    series: dict[str, list[list[float]]] = {}
    evals: list[list[float]] = []
    seqs = {a.id: a.seq for a in store.attempts_for(job.id)}
    for p in store.metrics(job.id):
        if p["loss"] is not None:
            series.setdefault(f"train loss (attempt {seqs.get(p['attempt_id'], '?')})", []).append([p["step"], p["loss"]])
        if p["eval_loss"] is not None and (not evals or evals[-1] != [p["step"], p["eval_loss"]]):
            evals.append([p["step"], p["eval_loss"]])
    out = [{"label": k, "points": v} for k, v in series.items()]
    if evals:
        out.append({"label": "eval loss", "points": evals, "dashed": True})
    return {"title": "", "x": {"kind": "step"}, "y": {"kind": "loss", "label": "loss"}, "series": out,
            "hlines": []}


def spend(store, config: Config, access: Access, caller: Caller) -> dict[str, Any]:
    """Spend the viewer may see, by day, provider, user and team, against each budget that applies
    to it; a cumulative chart; and what owned GPUs saved against the cheapest rented alternative."""
    from orchestrator.budget import month_start

    now = time.time()
    rows = [r for r in store.spend_rows() if access.sees(caller, r.get("owner"))]
    start = month_start(now)
    teams = {u.name: u.team for u in store.list_users()}

    def group(key) -> list[dict[str, Any]]:
        out: dict[str, float] = {}
        for r in rows:
            k = key(r)
            out[k] = out.get(k, 0.0) + r["usd"]
        return [{"key": k, "usd": round(v, 6)} for k, v in sorted(out.items())]

    budgets: list[dict[str, Any]] = []
    if config.budget_monthly_usd is not None and caller.admin:
        budgets.append({"scope": "everything", "limit": config.budget_monthly_usd,
                        "spent": sum(r["usd"] for r in store.spend_rows() if r["ts"] >= start)})
    for t in store.list_teams():
        if t["monthly_usd"] is not None and (caller.admin or t["name"] == caller.user.team):
            budgets.append({"scope": f"team {t['name']}", "limit": t["monthly_usd"],
                            "spent": store.spend_by(team=t["name"], since=start)})
    for u in store.list_users():
        if u.monthly_usd is not None and (caller.admin or u.team == caller.user.team):
            budgets.append({"scope": f"user {u.name}", "limit": u.monthly_usd,
                            "spent": store.spend_by(owner=u.name, since=start)})
    total, points = 0.0, []
    for r in sorted(rows, key=lambda r: r["ts"]):
        if not points:
            points.append([r["ts"], 0.0])  # a staircase from nothing, up to now
        total += r["usd"]
        points.append([r["ts"], round(total, 6)])
    if points:
        points.append([max(now, points[-1][0]), round(total, 6)])
    chart = {"title": "", "x": {"kind": "time"}, "y": {"kind": "usd", "label": "USD"},
             "series": [{"label": "recorded spend", "points": points, "step": True}],
             "hlines": [{"label": f"{b['scope']} monthly budget", "y": b["limit"]} for b in budgets]}
    return {
        "total_usd": round(sum(r["usd"] for r in rows), 6),
        "month_usd": round(sum(r["usd"] for r in rows if r["ts"] >= start), 6),
        "by_day": group(lambda r: time.strftime("%Y-%m-%d", time.gmtime(r["ts"]))),
        "by_provider": group(lambda r: r["provider"]),
        "by_user": group(lambda r: r.get("owner") or "(no account)"),
        "by_team": group(lambda r: teams.get(r.get("owner") or "", "(no team)")),
        "budgets": budgets, "chart": chart, "owned": owned_savings(store, access, caller),
    }


def owned_savings(store, access: Access, caller: Caller) -> dict[str, Any]:
    """Attempts on owned GPUs (``local``) against the cheapest rented offer each was placed over:
    that offer's price for the hours the attempt ran, minus what the attempt cost."""
    now = time.time()
    rows = []
    for job in store.list_jobs(limit=2000):
        if not access.sees(caller, job.owner):
            continue
        records = {e.attempt_id: e.data for e in store.events(job.id) if e.kind == "attempt_created"}
        for a in store.attempts_for(job.id):
            alt = (records.get(a.id) or {}).get("rented_alt")
            if a.provider != "local" or not alt or not a.started_at:
                continue
            hours = max(0.0, (a.ended_at or now) - a.started_at) / 3600.0
            cost = a.usd_per_hour * hours
            rented = float(alt["usd_per_hour"]) * hours
            rows.append({"attempt": a.id, "hours": round(hours, 4), "cost_usd": round(cost, 6),
                         "rented": f"{alt['provider']} {alt.get('gpu') or ''} at ${alt['usd_per_hour']:.2f}/h".strip(),
                         "rented_usd": round(rented, 6), "saved_usd": round(rented - cost, 6)})
    return {"attempts": rows, "saved_usd": round(sum(r["saved_usd"] for r in rows), 6)}


def sweeps(store, caller: Caller) -> list[dict[str, Any]]:
    return store.list_sweeps() if caller.admin else store.list_sweeps(team=caller.user.team)


def sweep_chart(store, sweep_id: str) -> dict[str, Any]:
    """Each trial's eval loss at every rung it completed: the successive-halving picture (the
    trials that stop at the first rung are single points; the survivors are lines)."""
    from orchestrator.queue import final_eval_loss

    by_trial: dict[int, list[list[float]]] = {}
    for t in store.trials(sweep_id):
        if t["state"].value != "succeeded":
            continue
        loss = final_eval_loss(store, t["job_id"])
        if loss is not None:
            by_trial.setdefault(t["trial"], []).append([t["step"], loss])
    series = [{"label": f"trial {k}", "points": sorted(v)} for k, v in sorted(by_trial.items())]
    return {"title": "Eval loss by trial at each rung", "x": {"kind": "step"},
            "y": {"kind": "loss", "label": "eval loss"}, "series": series, "hlines": []}
