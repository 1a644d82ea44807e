"""Figures per policy, the ratios and target checks, a text table, and a self-contained SVG plot."""

from __future__ import annotations

import math
from html import escape
from typing import Any

from .policies import POLICIES
from .sim import RunResult

ORDER = tuple(cls.name for cls in POLICIES)
REFERENCES = ("lower_bound", "cheapest_effective")  # each policy's cost is compared with these two
SAME_JOBS_EXCLUDED = ("local_only",)  # it completes only what the owned GPUs hold: left out of the common set
TARGET_VS_CHEAPEST_EFFECTIVE = 0.90  # tunefleet's same-jobs cost <= 0.90 x cheapest_effective's
TARGET_MISSES_VS_CHEAPEST_EFFECTIVE = 0.5  # tunefleet's deadline misses <= 0.5 x cheapest_effective's
TARGET_VS_LOWER_BOUND = 1.25  # tunefleet's same-jobs cost <= 1.25 x the lower bound's


def _r(x: float | None, n: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, n)


def _done(res: RunResult) -> set[str]:
    return {j.info.track.id for j in res.jobs if j.finished_h is not None}


def _cost(res: RunResult, ids: set[str]) -> float:
    return sum(j.spent for j in res.jobs if j.info.track.id in ids)


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
        "checkpoint_write_hours": _r(sum(j.write_h for j in jobs), 3),
        "interruption_cost_usd": _r(sum(j.lost_usd for j in jobs), 2),
        "preemptions": res.reclaims_hit,
        "preemptions_with_warning": res.reclaims_warned,
        "preemptions_by_wave": res.wave_reclaims,
        "preemptions_by_outbid": res.outbids,
        "launch_failures": res.launch_failures,
        "failed_too_many_preemptions": sum(1 for j in jobs if j.failed and j.failed.startswith("preempted")),
        "failed_too_many_launch_failures": sum(1 for j in jobs if j.failed and j.failed.startswith("launch")),
        "dropped_deadline_passed": sum(1 for j in jobs if j.failed and j.failed.startswith("deadline")),
        "cost_per_a100_hour_completed": _r(total / work_done if work_done else math.inf),
        "rank_calls": res.rank_calls,
    }


def summarize(results: dict[str, RunResult]) -> dict[str, Any]:
    """Per policy figures; the ratios against the lower bound and cheapest_effective, both per
    completed job and on the same jobs; the target checks."""
    names = [n for n in ORDER if n in results] + [n for n in results if n not in ORDER]
    pol = {name: figures(results[name]) for name in names}
    done = {name: _done(results[name]) for name in names}
    sets = [done[n] for n in names if n not in SAME_JOBS_EXCLUDED]
    common = set.intersection(*sets) if sets else set()
    for name in names:
        f = pol[name]
        basis = common if done[name] >= common else done[name] & common
        f["same_jobs_basis"] = "common" if basis is common else f"own completed within common ({len(basis)})"
        f["same_jobs_cost_usd"] = _r(_cost(results[name], basis), 2)
        for ref in REFERENCES:
            if ref not in results:
                continue
            c, rc = f["cost_per_completed_job"], pol[ref]["cost_per_completed_job"]
            f[f"ratio_vs_{ref}"] = _r(c / rc) if c is not None and rc else None
            ref_cost = _cost(results[ref], basis)
            f[f"ratio_vs_{ref}_same_jobs"] = _r(_cost(results[name], basis) / ref_cost) if ref_cost > 0 else None
    same = {"set": "the jobs every policy except " + ", ".join(SAME_JOBS_EXCLUDED) + " completed "
                   "(for an excluded policy: those of them it completed)",
            "excluded": list(SAME_JOBS_EXCLUDED), "jobs": len(common), "of": len(next(iter(results.values())).jobs)}
    return {"policies": pol, "same_jobs": same, "checks": checks(pol)}


def checks(pol: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    t, ce = pol.get("tunefleet"), pol.get("cheapest_effective")
    lb, nl = pol.get("lower_bound"), pol.get("tunefleet_no_learning")
    if t and ce:
        v = t.get("ratio_vs_cheapest_effective_same_jobs")
        out.append({"check": f"tunefleet same-jobs cost <= {TARGET_VS_CHEAPEST_EFFECTIVE:.2f}x cheapest_effective",
                    "value": v, "target": TARGET_VS_CHEAPEST_EFFECTIVE,
                    "met": v is not None and v <= TARGET_VS_CHEAPEST_EFFECTIVE})
        bound = TARGET_MISSES_VS_CHEAPEST_EFFECTIVE * ce["deadline_misses"]
        out.append({"check": f"tunefleet deadline misses <= {TARGET_MISSES_VS_CHEAPEST_EFFECTIVE:g}x "
                             "cheapest_effective's",
                    "value": t["deadline_misses"], "target": bound, "met": t["deadline_misses"] <= bound})
    if t and lb:
        v = t.get("ratio_vs_lower_bound_same_jobs")
        out.append({"check": f"tunefleet same-jobs cost <= {TARGET_VS_LOWER_BOUND:.2f}x lower bound",
                    "value": v, "target": TARGET_VS_LOWER_BOUND, "met": v is not None and v <= TARGET_VS_LOWER_BOUND})
    if t and nl:
        tc, nc = t["same_jobs_cost_usd"], nl["same_jobs_cost_usd"]
        ratio = _r(tc / nc) if nc else None
        out.append({"check": "tunefleet beats or ties tunefleet_no_learning (same-jobs cost and deadline misses)",
                    "value": {"cost_ratio": ratio, "misses": t["deadline_misses"]},
                    "target": {"cost_ratio": 1.0, "misses": nl["deadline_misses"]},
                    "met": tc <= nc * (1 + 1e-9) and t["deadline_misses"] <= nl["deadline_misses"]})
    return out


COLUMNS = [("policy", None, "{}"), ("total $", "total_cost_usd", "{:.2f}"),
           ("$/completed job", "cost_per_completed_job", "{:.2f}"), ("completed", "completed", "{}"),
           ("deadline misses", "deadline_misses", "{}"), ("mean completion h", "mean_completion_hours", "{:.1f}"),
           ("work redone h", "work_redone_hours", "{:.1f}"), ("preemptions", "preemptions", "{}"),
           ("launch failures", "launch_failures", "{}"),
           ("x LB", "ratio_vs_lower_bound", "{:.3f}"), ("x LB same jobs", "ratio_vs_lower_bound_same_jobs", "{:.3f}"),
           ("x CE", "ratio_vs_cheapest_effective", "{:.3f}"),
           ("x CE same jobs", "ratio_vs_cheapest_effective_same_jobs", "{:.3f}")]


def table(summary: dict[str, Any]) -> str:
    rows = [[h for h, _, _ in COLUMNS]]
    for name, f in summary["policies"].items():
        row = [name]
        for _, k, fmt in COLUMNS[1:]:
            v = f.get(k)
            if k == "completed":
                row.append(f"{v}/{f['jobs']}")
            elif k == "deadline_misses":
                row.append(f"{v}/{f['jobs_with_deadline']}")
            else:
                row.append("-" if v is None else fmt.format(v))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    same = summary.get("same_jobs")
    out = "\n".join(lines)
    if same:
        out += (f"\nLB = lower_bound, CE = cheapest_effective; 'same jobs' = the {same['jobs']} of {same['of']} jobs "
                f"every policy except {', '.join(same['excluded'])} completed")
    for c in summary["checks"]:
        out += f"\n[{'met' if c['met'] else 'MISSED'}] {c['check']}: {c['value']} (target {c['target']})"
    return out


COLORS = {"tunefleet": "#1f77b4", "tunefleet_no_learning": "#17becf", "cheapest_effective": "#d62728",
          "cheapest_per_hour": "#ff7f0e", "on_demand": "#2ca02c", "local_only": "#9467bd", "lower_bound": "#7f7f7f"}


def svg(summary: dict[str, Any], title: str) -> str:
    """One scatter plot: cost per completed job (x) against deadline misses (y), a labelled point per policy."""
    pol = summary["policies"]
    pts = [(n, f["cost_per_completed_job"], f["deadline_misses"]) for n, f in pol.items()
           if f["cost_per_completed_job"] is not None]
    w, h, left, right, top, bottom = 760, 480, 70, 30, 50, 60
    xmax = max([x for _, x, _ in pts] + [1e-9]) * 1.12
    ymax = max([y for _, _, y in pts] + [1]) * 1.12
    pw, ph = w - left - right, h - top - bottom

    def px(x: float) -> float:
        return left + pw * x / xmax

    def py(y: float) -> float:
        return top + ph * (1 - y / ymax)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
             'font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w / 2}" y="24" text-anchor="middle" font-size="14">{escape(title)}</text>']
    for g in range(6):
        x, y = xmax * g / 5, ymax * g / 5
        parts.append(f'<line x1="{px(x):.1f}" y1="{top}" x2="{px(x):.1f}" y2="{top + ph}" stroke="#eee"/>')
        parts.append(f'<text x="{px(x):.1f}" y="{top + ph + 16}" text-anchor="middle" font-size="10">{x:.3g}</text>')
        parts.append(f'<line x1="{left}" y1="{py(y):.1f}" x2="{left + pw}" y2="{py(y):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end" font-size="10">{y:.3g}</text>')
    parts.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#333"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#333"/>')
    parts.append(f'<text x="{left + pw / 2}" y="{h - 18}" text-anchor="middle">cost per completed job (USD)</text>')
    parts.append(f'<text x="18" y="{top + ph / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 18 {top + ph / 2})">deadline misses (jobs)</text>')
    for k, (n, x, y) in enumerate(sorted(pts, key=lambda p: (p[1], p[2]))):
        cx, cy = px(x), py(y)
        dy = -8 if k % 2 == 0 else 16  # alternate labels above and below: close points stay readable
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="{COLORS.get(n, "#555")}">'
                     f'<title>{escape(n)}: ${x:.2f} per job, {y} misses</title></circle>')
        right_side = cx > left + 0.6 * pw  # labels of points on the right run leftwards, inside the frame
        tx, anchor = (cx - 7, "end") if right_side else (cx + 7, "start")
        parts.append(f'<text x="{tx:.1f}" y="{cy + dy:.1f}" text-anchor="{anchor}" font-size="11">'
                     f'{escape(n)} (${x:.2f}, {y})</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
