"""``tunefleet report``: one self-contained HTML file with the pictures people want to look at.

Loss curves per trial (every sweep) and per job (training loss, and eval loss where the job held
data out), each recent job's final eval loss and perplexity, spend over time against the budgets,
and how busy the team's own machines were. Inline SVG, no JavaScript and no third-party assets:
the file can be mailed or attached to a ticket and opens anywhere.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from typing import Any

from infra.storage import StorageError, open_store
from orchestrator.budget import month_start
from orchestrator.queue import job_summary, with_eval

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]
W, H, PAD = 640, 300, 48


def _scale(lo: float, hi: float, a: float, b: float):
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def line_chart(title: str, series: list[tuple[str, list[tuple[float, float]]]], *, xlabel: str, ylabel: str,
               hlines: list[tuple[str, float]] = (), step: bool = False, markers: bool = True,
               dashed: frozenset[str] = frozenset()) -> str:
    """An SVG line chart; ``step`` draws a staircase (cumulative spend); series whose label is in
    ``dashed`` are drawn dashed (eval loss beside training loss)."""
    points = [p for _, pts in series for p in pts]
    if not points:
        return f"<h3>{html.escape(title)}</h3><p class=empty>no data yet</p>"
    xs = [p[0] for p in points]
    ys = [p[1] for p in points] + [y for _, y in hlines]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys + [0.0]) if step else min(ys), max(ys)
    if y1 == y0:
        y1 = y0 + 1.0
    sx, sy = _scale(x0, x1, PAD, W - 12), _scale(y0, y1, H - PAD, 16)
    out = [f'<h3>{html.escape(title)}</h3><svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img">',
           f'<rect x="{PAD}" y="16" width="{W - PAD - 12}" height="{H - PAD - 16}" fill="#fafafa" stroke="#ccc"/>']
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        out.append(f'<text x="{PAD - 4}" y="{sy(yv) + 4:.1f}" font-size="10" text-anchor="end">{yv:.3g}</text>')
        xv = x0 + (x1 - x0) * i / 4
        out.append(f'<text x="{sx(xv):.1f}" y="{H - PAD + 14}" font-size="10" text-anchor="middle">{xv:.3g}</text>')
    out.append(f'<text x="{(W + PAD) / 2}" y="{H - 8}" font-size="11" text-anchor="middle">{html.escape(xlabel)}</text>')
    out.append(f'<text x="12" y="{H / 2}" font-size="11" transform="rotate(-90 12 {H / 2})" '
               f'text-anchor="middle">{html.escape(ylabel)}</text>')
    for label, y in hlines:
        out.append(f'<line x1="{PAD}" x2="{W - 12}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#d62728" '
                   f'stroke-dasharray="5,4"/><text x="{W - 14}" y="{sy(y) - 4:.1f}" font-size="10" '
                   f'text-anchor="end" fill="#d62728">{html.escape(label)}</text>')
    legend = []
    for i, (label, pts) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        pts = sorted(pts, key=lambda p: p[0])  # stable: keeps the order of points at the same x
        if step:
            path, prev = [], None
            for x, y in pts:
                if prev is not None:
                    path.append((x, prev))
                path.append((x, y))
                prev = y
            pts = path
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        dash = ' stroke-dasharray="6,3"' if label in dashed else ""
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6"{dash} points="{coords}"/>')
        if markers and not step and len(pts) <= 60:  # few points (eval losses): mark them, a lone one included
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>' for x, y in pts]
        legend.append(f'<span style="color:{color}">&#9632;</span> {html.escape(label)}')
    out.append("</svg>")
    out.append(f'<div class=legend>{" &nbsp; ".join(legend)}</div>')
    return "".join(out)


def _final_meta(job) -> dict[str, Any]:
    try:
        ref = open_store(job.spec["checkpoint"]["store"]).final(job.id)
    except (StorageError, KeyError):
        return {}
    return ref.meta if ref else {}


def build_report(store, config, now: float | None = None,
                 sees: Callable[[str | None], bool] | None = None) -> str:
    """The report's HTML. ``sees(owner)``: on a team server, only the sweeps, jobs and spend of the
    owners the caller may see (their team's; an admin's is everything)."""
    now = now or time.time()
    seen = sees or (lambda _owner: True)
    sweep_ids = [s for s in store.sweep_ids() if seen(store.get_sweep(s).get("owner"))]
    sections = []
    # 1. loss curves: every sweep's trials (rungs joined), then recent standalone jobs
    for sweep_id in sweep_ids:
        sweep = store.get_sweep(sweep_id)
        by_trial: dict[int, list[tuple[float, float]]] = {}
        for t in store.trials(sweep_id):
            meta = _final_meta(store.get_job(t["job_id"]))
            by_trial.setdefault(t["trial"], []).extend((float(s), float(v)) for s, v in meta.get("eval_history", []))
        series = [(f"trial {k} {_params(store, sweep_id, k)}", pts) for k, pts in sorted(by_trial.items())]
        sections.append(line_chart(f"Sweep {sweep['name']} ({sweep_id}): eval loss per trial", series,
                                   xlabel="step", ylabel="eval loss"))
    jobs = [j for j in store.list_jobs(limit=200) if not j.sweep_id and seen(j.owner)][:10]
    series, evals = [], set()
    for job in jobs:
        meta = _final_meta(job)
        if meta.get("history"):
            series.append((f"{job.id} {job.name}", [(float(s), float(v)) for s, v in meta["history"]]))
        if meta.get("eval_history"):
            evals.add(f"{job.id} {job.name} eval")
            series.append((f"{job.id} {job.name} eval", [(float(s), float(v)) for s, v in meta["eval_history"]]))
    sections.append(line_chart("Loss per job (latest 10; eval loss dashed)", series, xlabel="step", ylabel="loss",
                               dashed=frozenset(evals)))
    sections.append(_jobs_table(store, jobs))
    # 2. spend over time against the budgets
    rows = [r for r in store.spend_rows() if seen(r.get("owner"))]
    total, pts = 0.0, []
    for r in rows:
        total += r["usd"]
        pts.append(((r["ts"] - now) / 3600.0, total))
    hlines = []
    if config.budget_monthly_usd is not None:
        hlines.append(("monthly budget", config.budget_monthly_usd))
    for sweep_id in sweep_ids:
        sweep = store.get_sweep(sweep_id)
        hlines.append((f"sweep {sweep['name']} budget", sweep["budget_usd"]))
    sections.append(line_chart("Cumulative spend", [("recorded spend", pts)], xlabel="hours ago (0 = now)",
                               ylabel="USD", hlines=hlines, step=True))
    # 3. the team's own machines: attempts running at once on the local provider
    events = []
    for job in store.list_jobs(limit=2000):
        if not seen(job.owner):
            continue
        for a in store.attempts_for(job.id):
            if a.provider == "local" and a.started_at:
                events += [(a.started_at, 1), (a.ended_at or now, -1)]
    busy, curve = 0, []
    for ts, delta in sorted(events):
        curve.append(((ts - now) / 3600.0, busy))
        busy += delta
        curve.append(((ts - now) / 3600.0, busy))
    sections.append(line_chart("Local capacity in use (attempts running at once)", [("local attempts", curve)],
                               xlabel="hours ago (0 = now)", ylabel="attempts", markers=False))
    if sees is None:
        month, n_jobs = store.spend_since(month_start(now)), sum(store.count_jobs_by_state().values())
    else:
        month = sum(r["usd"] for r in rows if r["ts"] >= month_start(now))
        n_jobs = sum(1 for j in store.list_jobs() if seen(j.owner))
    head = (f"<p>Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(now))}. "
            f"Jobs: {n_jobs}; spend this month ${month:.2f}"
            + (f" of ${config.budget_monthly_usd:.2f}" if config.budget_monthly_usd is not None else "") + ".</p>")
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>tunefleet report</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:720px;margin:2em auto;color:#222}"
        "h3{margin-top:2em}.legend{font-size:12px;margin:4px 0 0 48px}.empty{color:#888}"
        "table{border-collapse:collapse;font-size:13px}td,th{padding:2px 10px;text-align:left}"
        "td:nth-child(n+4){text-align:right}"
        "</style></head><body><h1>tunefleet report</h1>" + head + "".join(sections) + "</body></html>"
    )


def _jobs_table(store, jobs) -> str:
    """The latest jobs, one row each: state, step, and a succeeded job's final eval loss and
    perplexity (``with_eval``: the reader ``status JOB`` uses); a dash where the job had no eval."""
    if not jobs:
        return "<h3>Jobs (latest 10)</h3><p class=empty>no jobs yet</p>"
    rows = []
    for job in jobs:
        s = with_eval(store, job_summary(store, job))
        loss = f"{s['eval_loss']:.4f}" if s["eval_loss"] is not None else "&ndash;"
        ppl = f"{s['perplexity']:.2f}" if s["perplexity"] is not None else "&ndash;"
        steps = f"{s['step']}/{s['total_steps']}" if s["total_steps"] else str(s["step"])
        rows.append(f"<tr><td>{html.escape(s['id'])}</td><td>{html.escape(str(s['name'] or ''))}</td>"
                    f"<td>{html.escape(s['state'])}</td><td>{steps}</td><td>{loss}</td><td>{ppl}</td></tr>")
    return ("<h3>Jobs (latest 10)</h3><table><tr><th>job</th><th>name</th><th>state</th><th>step</th>"
            "<th>final eval loss</th><th>perplexity</th></tr>" + "".join(rows) + "</table>")


def _params(store, sweep_id: str, trial: int) -> str:
    t = next((t for t in store.trials(sweep_id) if t["trial"] == trial), None)
    if t is None:
        return ""
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items())
