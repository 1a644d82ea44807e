"""Run every policy on one trace with one seed."""

from __future__ import annotations

from typing import Any

from .policies import DIAGNOSTICS, POLICIES, capacity_bound
from .report import SAME_JOBS_EXCLUDED, figures, summarize
from .sim import MAX_LAUNCH_FAILURES, MAX_PREEMPTIONS, Market, RunResult
from .trace import Trace


def run_all(trace: Trace, seed: int = 0, max_preemptions: int = MAX_PREEMPTIONS,
            diagnostics: bool = False, max_launch_failures: int = MAX_LAUNCH_FAILURES,
            ) -> tuple[dict[str, RunResult], dict[str, Any]]:
    """Every policy on ``trace`` with the draws of ``seed``: (raw results, summary).

    With ``diagnostics`` the summary also holds ``diagnostics``: tunefleet's choices in a world
    with no reclaims (to split its distance to the lower bound into what its choices cost and what
    interruptions cost) and the old greedy "bound" (``greedy_no_reclaims``), each with its cost
    against the lower bound on the jobs it completed; and ``lower_bound_capacity``, the
    capacity-aware bound (``policies.capacity_bound``) of the same-jobs set, with each policy's
    cost of those jobs against it.
    """
    market = Market(trace, seed)
    results = {}
    for cls in POLICIES:
        pol = cls()
        results[pol.name] = pol.simulate(market, max_preemptions, max_launch_failures)
    summary = summarize(results)
    if diagnostics:
        lb = {j.info.track.id: j.spent for j in results["lower_bound"].jobs}
        diag = {}
        for cls in DIAGNOSTICS:
            pol = cls()
            res = pol.simulate(market, max_preemptions, max_launch_failures)
            f = figures(res)
            done = [j for j in res.jobs if j.finished_h is not None]
            base = sum(lb[j.info.track.id] for j in done)
            f["ratio_vs_lower_bound_same_jobs"] = round(sum(j.spent for j in done) / base, 4) if base else None
            own = summary["policies"].get(pol.name.removesuffix("_without_reclaims"))
            if own and pol.name.endswith("_without_reclaims") and own["cost_per_completed_job"]:
                # what interruptions cost that policy in all, as a share of its cost per completed job
                f["share_lost_to_interruptions"] = round(1 - f["cost_per_completed_job"] / own["cost_per_completed_job"], 4)
            diag[pol.name] = f
        # the capacity-aware bound, on the jobs every policy but local_only completed
        common = set.intersection(*[{j.info.track.id for j in res.jobs if j.finished_h is not None}
                                    for name, res in results.items() if name not in SAME_JOBS_EXCLUDED])
        cb = capacity_bound(market, common)
        diag["lower_bound_capacity"] = {
            "jobs": len(common), "cost_usd": None if cb is None else round(cb, 2),
            "per_job_bounds_usd": round(sum(lb[k] for k in common), 2),
            "ratio_same_jobs": {name: round(sum(j.spent for j in res.jobs if j.info.track.id in common) / cb, 4)
                                for name, res in results.items() if name not in SAME_JOBS_EXCLUDED} if cb else None,
        }
        summary["diagnostics"] = diag
    return results, summary
