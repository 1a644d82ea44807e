"""Run every policy on one trace with one reclaim stream."""

from __future__ import annotations

from typing import Any

from .policies import POLICIES, TunefleetWithoutReclaims
from .report import figures, summarize
from .sim import MAX_PREEMPTIONS, Market, RunResult, Simulator
from .trace import Trace


def run_all(trace: Trace, seed: int = 0, max_preemptions: int = MAX_PREEMPTIONS,
            diagnostics: bool = False) -> tuple[dict[str, RunResult], dict[str, Any]]:
    """Every policy on ``trace`` with the reclaims of ``seed``: (raw results, summary).

    With ``diagnostics`` the summary also holds ``diagnostics.tunefleet_without_reclaims``: the
    same scheduler in a world with no reclaims, to split tunefleet's distance to the lower bound
    into what its choices cost and what interruptions cost.
    """
    market = Market(trace, seed)
    results = {}
    for cls in POLICIES:
        pol = cls()
        results[pol.name] = Simulator(market, pol, max_preemptions).run()
    summary = summarize(results)
    if diagnostics:
        res = Simulator(market, TunefleetWithoutReclaims(), max_preemptions).run()
        f = figures(res)
        lb = summary["policies"]["lower_bound"]["cost_per_completed_job"]
        f["ratio_vs_lower_bound"] = round(f["cost_per_completed_job"] / lb, 4) if lb else None
        summary["diagnostics"] = {"tunefleet_without_reclaims": f}
    return results, summary
