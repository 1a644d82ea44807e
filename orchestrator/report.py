"""``tunefleet report``: one self-contained HTML file with the pictures people want to look at.

Loss curves per trial (every sweep) and per job (training loss, and eval loss where the job held
data out), each recent job's final eval loss and perplexity, spend over time against the budgets,
and how busy the team's own machines were. The charts are uPlot, drawn by the dashboard's
``static/charts.js`` from a JSON spec per chart; both scripts and uPlot's CSS are inlined, so the
file still needs no network: it can be mailed or attached to a ticket and opens anywhere. Without
JavaScript each chart is a small table of its series' latest values.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infra.storage import StorageError, open_store
from orchestrator.budget import month_start
from orchestrator.queue import job_summary, with_eval

# the dashboard's static folder (package data): a path, not an import of orchestrator.web and what it imports
STATIC = Path(__file__).resolve().parent / "web" / "static"
X_KINDS, Y_KINDS = ("time", "step", "hours"), ("usd", "loss", "count")


def chart_spec(title: str, series: list[tuple[str, list[tuple[float, float]]]], *, x: str, y: str,
               ylabel: str = "", hlines: list[tuple[str, float]] = (), step: bool = False,
               dashed: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The JSON spec ``static/charts.js`` draws (its header documents the format). ``x``/``y``: the
    axes' kinds (``time`` is unix seconds); ``step`` draws every series as a staircase (cumulative
    spend); series whose label is in ``dashed`` are dashed (eval loss beside training loss);
    ``hlines``: labelled reference lines (budgets)."""
    if x not in X_KINDS or y not in Y_KINDS:
        raise ValueError(f"chart axes: x is one of {X_KINDS}, y one of {Y_KINDS}; not {x!r}, {y!r}")
    out = []
    for label, pts in series:
        points = [[float(a), float(b)] for a, b in sorted(pts, key=lambda p: p[0])]  # stable at equal x
        item: dict[str, Any] = {"label": label, "points": points}
        if label in dashed:
            item["dashed"] = True
        if step:
            item["step"] = True
        out.append(item)
    return {"title": title, "x": {"kind": x}, "y": {"kind": y, "label": ylabel}, "series": out,
            "hlines": [{"label": label, "y": float(v)} for label, v in hlines]}


def chart(title: str, series: list[tuple[str, list[tuple[float, float]]]], **kw: Any) -> str:
    """A chart's HTML: its heading, then a ``div.tf-chart`` holding the spec (``chart_spec``'s
    arguments) for charts.js, and for a reader without JavaScript a small table of each series'
    latest value. The heading is the page's, so the spec drawn carries no title."""
    spec = chart_spec(title, series, **kw)
    head = f"<h3>{html.escape(title)}</h3>"
    if not any(s["points"] for s in spec["series"]):
        return head + "<p class=empty>no data yet</p>"
    spec["title"] = ""
    attr = html.escape(json.dumps(spec, separators=(",", ":"), allow_nan=False), quote=True)
    xk, yk = spec["x"]["kind"], spec["y"]["kind"]
    rows = [f"<tr><td>{html.escape(s['label'])}</td><td>{len(s['points'])}</td>"
            f"<td>{_fmt_x(xk, s['points'][-1][0])}</td><td>{_fmt_y(yk, s['points'][-1][1])}</td></tr>"
            for s in spec["series"] if s["points"]]
    rows += [f"<tr><td>{html.escape(h['label'])}</td><td></td><td></td><td>{_fmt_y(yk, h['y'])}</td></tr>"
             for h in spec["hlines"]]
    return (head + f"<div class=tf-chart data-spec=\"{attr}\"></div><noscript><table class=tf-data>"
            "<tr><th>series</th><th>points</th><th>latest at</th><th>value</th></tr>" + "".join(rows)
            + "</table></noscript>")


def _fmt_x(kind: str, v: float) -> str:
    if kind == "time":
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(v))
    return f"{v:g} h" if kind == "hours" else f"{v:.0f}"


def _fmt_y(kind: str, v: float) -> str:
    if kind == "usd":  # as charts.js: cents from $1 up, two significant digits below
        a = abs(v)
        decimals = 2 if a >= 1 or a == 0 else min(10, max(2, 1 - math.floor(math.log10(a))))
        return ("-" if v < 0 else "") + f"${a:,.{decimals}f}"
    return f"{v:.3g}" if kind == "loss" else f"{v:g}"


def _inline_assets() -> str:
    """uPlot's CSS and script and charts.js, inlined: the report stays one file that draws offline."""
    def read(name: str) -> str:
        return (STATIC / name).read_text(encoding="utf-8")

    css = read("vendor/uPlot.min.css").replace("</style", "<\\/style")
    scripts = [read(n).replace("</script", "<\\/script") for n in ("vendor/uPlot.iife.min.js", "charts.js")]
    return f"<style>{css}</style>" + "".join(f"<script>{js}</script>" for js in scripts)


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
        sections.append(chart(f"Sweep {sweep['name']} ({sweep_id}): eval loss per trial", series,
                              x="step", y="loss", ylabel="eval loss"))
    jobs = [j for j in store.list_jobs(limit=200) if not j.sweep_id and seen(j.owner)][:10]
    series, evals = [], set()
    for job in jobs:
        meta = _final_meta(job)
        if meta.get("history"):
            series.append((f"{job.id} {job.name}", [(float(s), float(v)) for s, v in meta["history"]]))
        if meta.get("eval_history"):
            evals.add(f"{job.id} {job.name} eval")
            series.append((f"{job.id} {job.name} eval", [(float(s), float(v)) for s, v in meta["eval_history"]]))
    sections.append(chart("Loss per job (latest 10; eval loss dashed)", series, x="step", y="loss", ylabel="loss",
                          dashed=frozenset(evals)))
    sections.append(_jobs_table(store, jobs))
    # 2. spend over time (clock times) against the budgets: the running total after each spend
    # row, held until now
    rows = [r for r in store.spend_rows() if seen(r.get("owner"))]
    total, pts = 0.0, []
    for r in sorted(rows, key=lambda r: r["ts"]):
        total += r["usd"]
        pts.append((r["ts"], round(total, 9)))
    if pts and pts[-1][0] < now:
        pts.append((now, pts[-1][1]))
    hlines = []
    if config.budget_monthly_usd is not None:
        hlines.append(("monthly budget", config.budget_monthly_usd))
    for sweep_id in sweep_ids:
        sweep = store.get_sweep(sweep_id)
        hlines.append((f"sweep {sweep['name']} budget", sweep["budget_usd"]))
    sections.append(chart("Cumulative spend", [("recorded spend", pts)], x="time", y="usd", ylabel="USD",
                          hlines=hlines, step=True))
    # 3. the team's own machines: attempts running at once on the local provider
    events = []
    for job in store.list_jobs(limit=2000):
        if not seen(job.owner):
            continue
        for a in store.attempts_for(job.id):
            if a.provider == "local" and a.started_at:
                events += [(a.started_at, 1), (a.ended_at or now, -1)]
    busy, at = 0, {}  # clock time -> attempts running once that instant's starts and ends are counted
    for ts, delta in sorted(events):
        busy += delta
        at[ts] = busy
    curve = sorted(at.items())
    if curve and curve[-1][0] < now:
        curve.append((now, curve[-1][1]))
    sections.append(chart("Local capacity in use (attempts running at once)", [("local attempts", curve)],
                          x="time", y="count", ylabel="attempts", step=True))
    if sees is None:
        month, n_jobs = store.spend_since(month_start(now)), sum(store.count_jobs_by_state().values())
    else:
        month = sum(r["usd"] for r in rows if r["ts"] >= month_start(now))
        n_jobs = sum(1 for j in store.list_jobs() if seen(j.owner))
    head = (f"<p>Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(now))}. "
            f"Jobs: {n_jobs}; spend this month ${month:.2f}"
            + (f" of ${config.budget_monthly_usd:.2f}" if config.budget_monthly_usd is not None else "") + ".</p>")
    return (
        "<!doctype html><html><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width, initial-scale=1'><title>tunefleet report</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 12px;color:#222}"
        "h3{margin-top:2em}.empty{color:#888}.tf-chart{width:100%;min-height:200px}"
        "table{border-collapse:collapse;font-size:13px}td,th{padding:2px 10px;text-align:left}"
        "td:nth-child(n+4){text-align:right}"
        "</style>" + _inline_assets() + "</head><body><h1>tunefleet report</h1>" + head + "".join(sections)
        + "</body></html>"
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
