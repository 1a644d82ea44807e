"""Command line: run every policy on a trace and print the figures, the checks and a plot."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from .report import ORDER, svg, table
from .run import run_all
from .sim import MAX_PREEMPTIONS
from .trace import DEFAULT_TRACE, MarketParams, generate, load, save

GEN_SMALL = {"days": 5.0, "drain_days": 2.0}  # --gen-seeds markets: a third of the default's length
RANGE_KEYS = ("ratio_vs_lower_bound_same_jobs", "ratio_vs_cheapest_effective_same_jobs", "deadline_misses")


def _params(pairs: list[str], base: dict[str, Any] | None = None) -> MarketParams:
    known = {f.name for f in fields(MarketParams)}
    kw: dict[str, Any] = dict(base or {})
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        try:
            kw[key] = json.loads(raw)
        except ValueError:
            kw[key] = raw
    return MarketParams(**kw)


def _ranges(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Per policy, the [min, max] of each ratio over several runs; and how often each check was met."""
    out: dict[str, Any] = {"runs": len(summaries), "policies": {}, "checks_met": {}}
    for name in ORDER:
        per = {}
        for key in RANGE_KEYS:
            vals = [s["policies"][name].get(key) for s in summaries if name in s["policies"]]
            vals = [v for v in vals if v is not None]
            per[key] = [min(vals), max(vals)] if vals else None
        out["policies"][name] = per
    for s in summaries:
        for c in s["checks"]:
            out["checks_met"][c["check"]] = out["checks_met"].get(c["check"], 0) + bool(c["met"])
    return out


def _print_ranges(title: str, ranges: dict[str, Any]) -> None:
    print(f"{title} ({ranges['runs']} runs): [min, max] of x lower bound (same jobs), x cheapest_effective "
          "(same jobs), deadline misses")
    for name, per in ranges["policies"].items():
        cells = []
        for key in RANGE_KEYS:
            r = per[key]
            cells.append("-" if r is None else (f"{r[0]}-{r[1]}" if key == "deadline_misses"
                                                 else f"{r[0]:.3f}-{r[1]:.3f}"))
        print(f"  {name:<22} " + "   ".join(f"{c:>13}" for c in cells))
    for check, n in ranges["checks_met"].items():
        print(f"  met {n}/{ranges['runs']}: {check}")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.market",
        description="GPU-market simulation: tunefleet's scheduler against other placement policies.")
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="trace file (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the run's draws (reclaims, waves, outbids, launch failures), shared by every policy")
    ap.add_argument("--seeds", type=int, default=1, metavar="K",
                    help="also run seeds SEED..SEED+K-1 on the trace and print the range of the ratios")
    ap.add_argument("--gen-seeds", type=int, default=0, metavar="K",
                    help="also generate held-out markets with generator seeds 1..K (small: "
                         + ", ".join(f"{k}={v:g}" for k, v in GEN_SMALL.items())
                         + ", and any --set) and print the range of the ratios")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--plot", type=Path, default=None,
                    help="SVG plot file (default without --json: build/market-<trace>-seed<N>.svg)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--max-preemptions", type=int, default=MAX_PREEMPTIONS)
    ap.add_argument("--generate", type=Path, metavar="FILE", help="write a new trace to FILE and exit")
    ap.add_argument("--gen-seed", type=int, default=0, help="seed of --generate")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="generator parameter for --generate and --gen-seeds (JSON value), e.g. --set days=3")
    args = ap.parse_args(argv)

    if args.generate:
        trace = generate(_params(args.set), seed=args.gen_seed)
        save(trace, args.generate)
        print(f"wrote {args.generate}: {len(trace.jobs)} jobs, {len(trace.offers)} offers on "
              f"{len(trace.machines)} machines, {len(trace.waves)} waves, {trace.horizon_h:g} h")
        return None

    if not args.trace.is_file():
        raise SystemExit(f"no trace at {args.trace}; make one with --generate FILE")
    try:
        trace = load(args.trace)
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{args.trace}: not a usable market trace: {exc!r}") from None
    t0 = time.perf_counter()
    _, summary = run_all(trace, seed=args.seed, max_preemptions=args.max_preemptions, diagnostics=True)
    elapsed = time.perf_counter() - t0
    seeds = [summary]
    for s in range(args.seed + 1, args.seed + args.seeds):
        seeds.append(run_all(trace, seed=s, max_preemptions=args.max_preemptions)[1])
    held_out = []
    if args.gen_seeds > 0:
        params = _params(args.set, GEN_SMALL)
        for g in range(1, args.gen_seeds + 1):
            held_out.append(run_all(generate(params, seed=g), seed=args.seed, max_preemptions=args.max_preemptions)[1])

    plot = args.plot
    if plot is None and not args.json and not args.no_plot:
        plot = Path("build") / f"market-{args.trace.stem}-seed{args.seed}.svg"
    if plot is not None and not args.no_plot:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot.write_text(svg(summary, f"{args.trace.name}, seed {args.seed}: {len(trace.jobs)} jobs over "
                                     f"{trace.horizon_h / 24:g} days"), encoding="utf-8")

    out = {
        "trace": str(args.trace),
        "format": trace.source_format,
        "seed": args.seed,
        "jobs": len(trace.jobs),
        "horizon_hours": trace.horizon_h,
        "policies": summary["policies"],
        "same_jobs": summary["same_jobs"],
        "checks": summary["checks"],
        "targets_met": all(c["met"] for c in summary["checks"]),
        "diagnostics": summary["diagnostics"],
        "seconds": round(elapsed, 2),
        "plot": None if plot is None or args.no_plot else str(plot),
    }
    if args.seeds > 1:
        out["seeds"] = {"seeds": list(range(args.seed, args.seed + args.seeds)), **_ranges(seeds)}
    if held_out:
        out["gen_seeds"] = {"generator_seeds": list(range(1, args.gen_seeds + 1)),
                            "params": {**GEN_SMALL, **{p.partition("=")[0]: p.partition("=")[2] for p in args.set}},
                            **_ranges(held_out)}
    if args.json:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        return out
    print(f"market simulation: {args.trace} ({len(trace.jobs)} jobs, {len(trace.offers)} offers, "
          f"{len(trace.waves)} waves, {trace.horizon_h / 24:g} days), seed {args.seed}, {elapsed:.1f} s")
    print(table(summary))
    diag = summary["diagnostics"]
    t = summary["policies"]["tunefleet"]
    cap = diag.pop("lower_bound_capacity")
    for name, f in diag.items():
        print(f"diagnostic {name}: ${f['cost_per_completed_job']:.2f} per completed job, "
              f"{f['ratio_vs_lower_bound_same_jobs']:.3f}x the lower bound on the jobs it completed, "
              f"{f['deadline_misses']} deadline misses"
              + (f"; interruptions cost that policy {f['share_lost_to_interruptions']:.1%} of its cost per completed job"
                 if f.get("share_lost_to_interruptions") is not None else ""))
    diag["lower_bound_capacity"] = cap
    if cap["cost_usd"]:
        print(f"diagnostic lower_bound_capacity (one machine, one attempt at a time; not a target): "
              f"${cap['cost_usd']:.2f} for the {cap['jobs']} same jobs (per-job bounds: "
              f"${cap['per_job_bounds_usd']:.2f}); x that: "
              + ", ".join(f"{n} {r:.3f}" for n, r in cap["ratio_same_jobs"].items() if n != "lower_bound"))
    print(f"tunefleet lost ${t['interruption_cost_usd']:.2f} to rework, restarts and failed launches, and spent "
          f"{t['checkpoint_write_hours']:.1f} h writing checkpoints")
    if args.seeds > 1:
        _print_ranges(f"seeds {args.seed}..{args.seed + args.seeds - 1}", out["seeds"])
    if held_out:
        _print_ranges(f"held-out markets, generator seeds 1..{args.gen_seeds}", out["gen_seeds"])
    if out["plot"]:
        print(f"plot: {out['plot']}")
    return out
