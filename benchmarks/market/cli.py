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


def _params(pairs: list[str]) -> MarketParams:
    known = {f.name for f in fields(MarketParams)}
    kw: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        try:
            kw[key] = json.loads(raw)
        except ValueError:
            kw[key] = raw
    return MarketParams(**kw)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.market",
        description="GPU-market simulation: tunefleet's scheduler against other placement policies.")
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="trace file (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the reclaim stream, shared by every policy")
    ap.add_argument("--seeds", type=int, default=1, metavar="K",
                    help="also run seeds SEED..SEED+K-1 and print the spread of the checked ratios")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--plot", type=Path, default=None,
                    help="SVG plot file (default without --json: build/market-<trace>-seed<N>.svg)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--max-preemptions", type=int, default=MAX_PREEMPTIONS)
    ap.add_argument("--generate", type=Path, metavar="FILE", help="write a new trace to FILE and exit")
    ap.add_argument("--gen-seed", type=int, default=0, help="seed of --generate")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="generator parameter for --generate (JSON value), e.g. --set days=3")
    args = ap.parse_args(argv)

    if args.generate:
        trace = generate(_params(args.set), seed=args.gen_seed)
        save(trace, args.generate)
        print(f"wrote {args.generate}: {len(trace.jobs)} jobs, {len(trace.offers)} offers on "
              f"{len(trace.machines)} machines, {trace.horizon_h:g} h")
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
    spread = []
    for s in range(args.seed + 1, args.seed + args.seeds):
        _, other = run_all(trace, seed=s, max_preemptions=args.max_preemptions)
        spread.append((s, other))

    plot = args.plot
    if plot is None and not args.json and not args.no_plot:
        plot = Path("build") / f"market-{args.trace.stem}-seed{args.seed}.svg"
    if plot is not None and not args.no_plot:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot.write_text(svg(summary, f"{args.trace.name}, reclaim seed {args.seed}: {len(trace.jobs)} jobs over "
                                     f"{trace.horizon_h / 24:g} days"), encoding="utf-8")

    out = {
        "trace": str(args.trace),
        "seed": args.seed,
        "jobs": len(trace.jobs),
        "horizon_hours": trace.horizon_h,
        "policies": summary["policies"],
        "checks": summary["checks"],
        "targets_met": all(c["met"] for c in summary["checks"]),
        "diagnostics": summary["diagnostics"],
        "seconds": round(elapsed, 2),
        "plot": None if plot is None or args.no_plot else str(plot),
    }
    if spread:
        out["other_seeds"] = {str(s): {"checks": o["checks"],
                                       "ratio_vs_lower_bound": o["policies"]["tunefleet"]["ratio_vs_lower_bound"],
                                       "ratio_vs_cheapest_per_hour":
                                           o["policies"]["tunefleet"]["ratio_vs_cheapest_per_hour"]}
                              for s, o in spread}
    if args.json:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        return out
    print(f"market simulation: {args.trace} ({len(trace.jobs)} jobs, {len(trace.offers)} offers, "
          f"{trace.horizon_h / 24:g} days), reclaim seed {args.seed}, {elapsed:.1f} s for {len(ORDER)} policies")
    print(table(summary))
    diag = summary["diagnostics"]["tunefleet_without_reclaims"]
    t = summary["policies"]["tunefleet"]
    print(f"diagnostic: tunefleet's choices with no reclaims at all cost {diag['ratio_vs_lower_bound']:.3f}x the lower "
          f"bound; reclaims cost it ${t['interruption_cost_usd']:.2f} in rework and restarts, "
          "plus re-placing the jobs they stop")
    if spread:
        print("other reclaim seeds (tunefleet: x lower bound, x cheapest/h, misses vs cheapest/h):")
        for s, o in spread:
            t, c = o["policies"]["tunefleet"], o["policies"]["cheapest_per_hour"]
            print(f"  seed {s}: {t['ratio_vs_lower_bound']:.3f}  {t['ratio_vs_cheapest_per_hour']:.3f}  "
                  f"{t['deadline_misses']} vs {c['deadline_misses']}")
    if out["plot"]:
        print(f"plot: {out['plot']}")
    return out
