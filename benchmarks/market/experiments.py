"""The experiments behind the market README's reading of the targets: what limits tunefleet.

    python -m benchmarks.market.experiments [--runs N] [--json]

Each experiment runs ``tunefleet``, ``tunefleet_no_learning`` and ``cheapest_effective`` on N
generated markets (generator seeds 11.., the default parameters unless the experiment changes
them; reclaim seed 0) and prints the mean same-jobs cost ratios and the summed deadline misses:

- ``as generated``: the default world (15 % of hosts 3-10x worse than advertised).
- ``advertised right``: every host exactly as advertised (no host factors).
- ``advertised wrong``: 35 % of hosts 4-12x worse than advertised.
- ``no deadline slack``: tunefleet without the scheduler's slack for table-speed GPUs.
- ``open jobs off owned GPUs``: tunefleet keeps jobs that may run anywhere off the two owned GPUs,
  leaving them to restricted jobs (which may run nowhere else).

and, for the default world, why tunefleet's deadline misses happen (restricted jobs waiting for
the owned GPUs, late from the start, interrupted, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from orchestrator import scheduler

from .policies import CheapestEffective, Tunefleet, TunefleetNoLearning
from .sim import Market
from .trace import MarketParams, generate


class OpenJobsOffOwned(Tunefleet):
    name = "tunefleet"

    def choose(self, job, offers, now_epoch, avoid, blocked=None):
        if job.info.spec["policy"].get("data") != "restricted":
            offers = [o for o in offers if not o.owned]
        return super().choose(job, offers, now_epoch, avoid, blocked)


@contextlib.contextmanager
def no_slack() -> Iterator[None]:
    saved = scheduler.SLACK_TABLE, scheduler.SLACK_MEASURED
    scheduler.SLACK_TABLE = scheduler.SLACK_MEASURED = 0.0
    try:
        yield
    finally:
        scheduler.SLACK_TABLE, scheduler.SLACK_MEASURED = saved


def _same_jobs_cost(results: dict[str, Any]) -> dict[str, float]:
    common = set.intersection(*[{j.info.track.id for j in r.jobs if j.finished_h is not None}
                                for r in results.values()])
    return {name: sum(j.spent for j in r.jobs if j.info.track.id in common) for name, r in results.items()}


def _misses(res) -> int:
    return sum(1 for j in res.jobs if j.info.track.deadline_h is not None
               and (j.finished_h is None or j.finished_h > j.info.track.deadline_h))


def _why_missed(res) -> Counter:
    out: Counter = Counter()
    for j in res.jobs:
        dl = j.info.track.deadline_h
        if dl is None or (j.finished_h is not None and j.finished_h <= dl):
            continue
        restricted = j.info.spec["policy"].get("data") == "restricted"
        waited = (j.started_h if j.started_h is not None else dl) - j.info.track.arrival_h > 0.1
        key = ("restricted" if restricted else "open") + (", waited for capacity" if waited else "") + (
            ", interrupted" if j.preemptions else "")
        out[key] += 1
    return out


def experiment(params: MarketParams, runs: int, tunefleet_cls=Tunefleet, ctx=contextlib.nullcontext) -> dict:
    rows, why = [], Counter()
    for g in range(11, 11 + runs):
        market = Market(generate(params, g), 0)
        with ctx():
            results = {cls.name: cls().simulate(market) for cls in (tunefleet_cls, TunefleetNoLearning,
                                                                    CheapestEffective)}
        cost = _same_jobs_cost(results)
        rows.append((cost["tunefleet"] / cost["cheapest_effective"],
                     cost["tunefleet_no_learning"] / cost["cheapest_effective"],
                     *(_misses(results[n]) for n in ("tunefleet", "tunefleet_no_learning", "cheapest_effective"))))
        why += _why_missed(results["tunefleet"])
    mean = statistics.mean
    return {"runs": runs,
            "tunefleet_vs_cheapest_effective": round(mean(r[0] for r in rows), 4),
            "tunefleet_vs_cheapest_effective_range": [round(min(r[0] for r in rows), 4),
                                                      round(max(r[0] for r in rows), 4)],
            "no_learning_vs_cheapest_effective": round(mean(r[1] for r in rows), 4),
            "tunefleet_vs_no_learning": round(mean(r[0] / r[1] for r in rows), 4),
            "misses": {"tunefleet": sum(r[2] for r in rows), "tunefleet_no_learning": sum(r[3] for r in rows),
                       "cheapest_effective": sum(r[4] for r in rows)},
            "tunefleet_misses_why": dict(why.most_common())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=6, help="generated markets per experiment (default 6)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    base = MarketParams()
    plan = {
        "as generated": (base, Tunefleet, contextlib.nullcontext),
        "advertised right": (replace(base, host_bad_share=0.0, host_good_share=0.0, host_sigma=0.0), Tunefleet,
                             contextlib.nullcontext),
        "advertised wrong": (replace(base, host_bad_share=0.35, host_bad_factor=(4.0, 12.0)), Tunefleet,
                             contextlib.nullcontext),
        "no deadline slack": (base, Tunefleet, no_slack),
        "open jobs off owned GPUs": (base, OpenJobsOffOwned, contextlib.nullcontext),
    }
    out = {name: experiment(p, args.runs, cls, ctx) for name, (p, cls, ctx) in plan.items()}
    if args.json:
        print(json.dumps(out))
        return out
    print(f"{'experiment':26} {'T/CE':>7} {'T/CE range':>15} {'NL/CE':>7} {'T/NL':>7}  misses T/NL/CE")
    for name, r in out.items():
        m = r["misses"]
        lo, hi = r["tunefleet_vs_cheapest_effective_range"]
        print(f"{name:26} {r['tunefleet_vs_cheapest_effective']:7.4f} {lo:7.3f}-{hi:<7.3f} "
              f"{r['no_learning_vs_cheapest_effective']:7.4f} {r['tunefleet_vs_no_learning']:7.4f}  "
              f"{m['tunefleet']}/{m['tunefleet_no_learning']}/{m['cheapest_effective']}")
    print("tunefleet's deadline misses in the default world, by cause:",
          ", ".join(f"{k}: {v}" for k, v in out["as generated"]["tunefleet_misses_why"].items()))
    return out


if __name__ == "__main__":
    main()
