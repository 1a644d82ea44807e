"""Figures per policy, the ratios and target checks, a text table, and a self-contained SVG plot."""

from __future__ import annotations

import math
from html import escape
from typing import Any

from .sim import RunResult

ORDER = ("tunefleet", "cheapest_per_hour", "on_demand", "local_only", "lower_bound")
TARGET_VS_LOWER_BOUND = 1.10  # tunefleet's cost per completed job <= 1.10 x the lower bound's
TARGET_VS_CHEAPEST = 0.75  # ... <= 0.75 x cheapest_per_hour's, with no more deadline misses


def _r(x: float | None, n: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, n)


def figures(res: RunResult) -> dict[str, Any]:
    jobs = res.jobs
    done = [j for j in jobs if j.finished_h is not None]
    total = sum(j.spent for j in jobs)
    with_deadline = [j for j in jobs if j.info.track.deadline_h is not None]
    misses = [j for j in with_deadline if j.finished_h is None or j.finished_h > j.info.track.deadline_h]
    work_done = sum(j.info.a100_hours for j in done)
    return {
        "total_cost_usd": _r(total, 2),
        "completed": len(done),
        "jobs": len(jobs),
        "cost_per_completed_job": _r(total / len(done) if done else math.inf),
        "deadline_misses": len(misses),
        "jobs_with_deadline": len(with_deadline),
        "never_completed": len(jobs) - len(done),
        "mean_completion_hours": _r(sum(j.finished_h - j.info.track.arrival_h for j in done) / len(done)
                                    if done else None, 3),
        "work_redone_hours": _r(sum(j.redone_h for j in jobs), 3),
        "restart_overhead_hours": _r(sum(j.overhead_h for j in jobs), 3),
        "interruption_cost_usd": _r(sum(j.lost_usd for j in jobs), 2),
        "preemptions": res.reclaims_hit,
        "preemptions_with_warning": res.reclaims_warned,
        "failed_too_many_preemptions": sum(1 for j in jobs if j.failed and j.failed.startswith("preempted")),
        "dropped_deadline_passed": sum(1 for j in jobs if j.failed and j.failed.startswith("deadline")),
        "cost_per_a100_hour_completed": _r(total / work_done if work_done else math.inf),
        "rank_calls": res.rank_calls,
    }


def summarize(results: dict[str, RunResult]) -> dict[str, Any]:
    """Per policy figures, the ratios against the lower bound and cheapest_per_hour, the checks."""
    pol = {name: figures(results[name]) for name in ORDER if name in results}
    lb = pol.get("lower_bound", {}).get("cost_per_completed_job")
    cph = pol.get("cheapest_per_hour", {}).get("cost_per_completed_job")
    lb_cost = {j.info.track.id: j.spent for j in results["lower_bound"].jobs} if "lower_bound" in results else {}
    for name, f in pol.items():
        c = f["cost_per_completed_job"]
        f["ratio_vs_lower_bound"] = _r(c / lb) if c is not None and lb else None
        f["ratio_vs_cheapest_per_hour"] = _r(c / cph) if c is not None and cph else None
        # the lower bound's cost on exactly the jobs this policy completed: a like-for-like ratio
        done = [j for j in results[name].jobs if j.finished_h is not None]
        same = sum(lb_cost.get(j.info.track.id, 0.0) for j in done)
        f["ratio_vs_lower_bound_same_jobs"] = _r(f["total_cost_usd"] / same) if same else None
    checks = []
    t, c = pol.get("tunefleet"), pol.get("cheapest_per_hour")
    if t and lb:
        checks.append({"check": f"tunefleet cost per completed job <= {TARGET_VS_LOWER_BOUND:.2f}x lower bound",
                       "value": t["ratio_vs_lower_bound"], "target": TARGET_VS_LOWER_BOUND,
                       "met": t["ratio_vs_lower_bound"] is not None
                       and t["ratio_vs_lower_bound"] <= TARGET_VS_LOWER_BOUND})
    if t and c:
        checks.append({"check": f"tunefleet cost per completed job <= {TARGET_VS_CHEAPEST:.2f}x cheapest_per_hour",
                       "value": t["ratio_vs_cheapest_per_hour"], "target": TARGET_VS_CHEAPEST,
                       "met": t["ratio_vs_cheapest_per_hour"] is not None
                       and t["ratio_vs_cheapest_per_hour"] <= TARGET_VS_CHEAPEST})
        checks.append({"check": "tunefleet deadline misses <= cheapest_per_hour's",
                       "value": t["deadline_misses"], "target": c["deadline_misses"],
                       "met": t["deadline_misses"] <= c["deadline_misses"]})
    return {"policies": pol, "checks": checks}


def table(summary: dict[str, Any]) -> str:
    cols = [("policy", "{}"), ("total $", "{:.2f}"), ("$/completed job", "{:.2f}"), ("completed", "{}"),
            ("deadline misses", "{}"), ("mean completion h", "{:.1f}"), ("work redone h", "{:.1f}"),
            ("preemptions", "{}"), ("$/A100-h done", "{:.3f}"), ("x lower bound", "{:.3f}"),
            ("x cheapest/h", "{:.3f}")]
    keys = [None, "total_cost_usd", "cost_per_completed_job", "completed", "deadline_misses",
            "mean_completion_hours", "work_redone_hours", "preemptions", "cost_per_a100_hour_completed",
            "ratio_vs_lower_bound", "ratio_vs_cheapest_per_hour"]
    rows = [[h for h, _ in cols]]
    for name, f in summary["policies"].items():
        row = [name]
        for (_, fmt), k in zip(cols[1:], keys[1:], strict=True):
            v = f[k]
            if k == "completed":
                row.append(f"{v}/{f['jobs']}")
            elif k == "deadline_misses":
                row.append(f"{v}/{f['jobs_with_deadline']}")
            else:
                row.append("-" if v is None else fmt.format(v))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    out = "\n".join(lines)
    for c in summary["checks"]:
        out += f"\n[{'met' if c['met'] else 'MISSED'}] {c['check']}: {c['value']} (target {c['target']})"
    return out


COLORS = {"tunefleet": "#1f77b4", "cheapest_per_hour": "#ff7f0e", "on_demand": "#2ca02c",
          "local_only": "#9467bd", "lower_bound": "#7f7f7f"}


def svg(summary: dict[str, Any], title: str) -> str:
    """Two bar charts side by side: cost per completed job, and deadline misses, per policy."""
    pol = summary["policies"]
    names = list(pol)
    w, h, pad, gap = 900, 420, 60, 40
    panel_w = (w - 2 * pad - gap) / 2
    top, bottom = 70, h - 90
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
             'font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w / 2}" y="24" text-anchor="middle" font-size="15">{escape(title)}</text>']
    panels = [("cost per completed job (USD)", "cost_per_completed_job", "{:.2f}"),
              ("deadline misses (jobs)", "deadline_misses", "{}")]
    for k, (label, key, fmt) in enumerate(panels):
        x0 = pad + k * (panel_w + gap)
        vals = [pol[n][key] if pol[n][key] is not None else 0.0 for n in names]
        vmax = max(vals + [1e-9]) * 1.15
        parts.append(f'<text x="{x0 + panel_w / 2}" y="52" text-anchor="middle" font-size="13">{escape(label)}</text>')
        for g in range(5):
            v = vmax * g / 4
            y = bottom - (bottom - top) * g / 4
            parts.append(f'<line x1="{x0 - 4}" y1="{y:.1f}" x2="{x0 + panel_w}" y2="{y:.1f}" stroke="#ddd"/>')
            parts.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{v:.3g}</text>')
        parts.append(f'<line x1="{x0}" y1="{bottom}" x2="{x0 + panel_w}" y2="{bottom}" stroke="#333"/>')
        parts.append(f'<line x1="{x0}" y1="{top}" x2="{x0}" y2="{bottom}" stroke="#333"/>')
        if key == "cost_per_completed_job":  # the two cost targets, as dashed lines
            for ref, factor, text in (("lower_bound", TARGET_VS_LOWER_BOUND, "lower bound"),
                                      ("cheapest_per_hour", TARGET_VS_CHEAPEST, "cheapest/h")):
                base = pol.get(ref, {}).get(key)
                if base is None:
                    continue
                y = bottom - (bottom - top) * min(base * factor, vmax) / vmax
                parts.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + panel_w}" y2="{y:.1f}" stroke="#d62728" '
                             f'stroke-dasharray="5,4"/>')
                parts.append(f'<text x="{x0 + panel_w}" y="{y - 3:.1f}" text-anchor="end" font-size="9" '
                             f'fill="#d62728">target: {factor:g} x {text}</text>')
        bw = panel_w / len(names)
        for i, (n, v) in enumerate(zip(names, vals, strict=True)):
            bh = (bottom - top) * v / vmax
            x = x0 + i * bw + bw * 0.15
            parts.append(f'<rect x="{x:.1f}" y="{bottom - bh:.1f}" width="{bw * 0.7:.1f}" height="{bh:.1f}" '
                         f'fill="{COLORS.get(n, "#555")}"><title>{escape(n)}: {fmt.format(v)}</title></rect>')
            parts.append(f'<text x="{x + bw * 0.35:.1f}" y="{bottom - bh - 4:.1f}" text-anchor="middle" '
                         f'font-size="10">{fmt.format(v)}</text>')
            parts.append(f'<text x="{x + bw * 0.35:.1f}" y="{bottom + 14}" text-anchor="end" font-size="10" '
                         f'transform="rotate(-30 {x + bw * 0.35:.1f} {bottom + 14})">{escape(n)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
