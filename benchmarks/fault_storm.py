"""Fault storm: the real daemon drains 1,000 jobs from providers that inject every fault class at 10 %.

    python -m benchmarks.fault_storm [--jobs 1000] [--rate 0.1] [--seed 0] [--json]

Two providers behind the real protocol (``benchmarks.fault_provider``): each call draws its fate —
offers that fail or hang, launches that find no capacity, fail, hang or time out, polls that answer
unknown, hang or stick in unknown, machines reclaimed with and without warning, cancels that fail
or hang. The same jobs then run against the same providers with no faults: the baseline, measured
in the same run. Half the jobs carry a ``policy.max_usd`` cap that they reach before they finish,
so budget stops happen under the storm too; a monthly budget caps the whole run.

Time is compressed (``time_scale`` 0.01, 0.3 s call deadlines, 1 s unknown deadline) so a job's
life takes seconds; every rule is the daemon's own. Reported, per run:
- jobs by end state (and refusals by reason code), attempts per job (mean, max);
- ticks that took longer than the loop's wait budget (slow calls leaking into the loop: target 0)
  and calls that passed their deadline (they were waited out off the loop);
- overspend: recorded spend over each job's cap plus over the monthly budget (target $0.00);
- the provider's own bill (machine-seconds it rented) next to the daemon's ledger.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import structlog

from benchmarks.fault_provider import FAULTS, FaultProvider, Faults
from infra.config import Config
from jobs.spec import load_job_file
from orchestrator.budget import month_start
from orchestrator.daemon import Daemon
from orchestrator.queue import submit_spec
from orchestrator.store import Store

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "qlora-tiny.yaml"
PRICE = 360.0  # $/h of one simulated machine: 10 cents a second, so caps are reached in seconds
CAP = 0.6  # policy.max_usd of the capped half: about 6 machine-seconds
MONTHLY = 10_000.0


def _spec(steps: int, cap: float | None):
    s = load_job_file(EXAMPLE)
    pol = s.policy.model_copy(update={"data": "open", "max_usd": cap})
    return s.model_copy(update={"max_steps": steps, "save_steps": 10, "policy": pol})


def run(jobs: int, rate: float, seed: int, max_seconds: float = 2400.0) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="tf-storm-"))
    try:
        config = Config(home=tmp, default_store=(tmp / "ckpt").as_uri(), poll_interval_s=0.0, call_timeout_s=0.3,
                        stop_grace_s=0.3, unknown_timeout_s=1.0, launch_timeout_s=3.0, provider_disable_s=0.5,
                        time_scale=0.01, budget_monthly_usd=MONTHLY,
                        provider_limits=(("storm-a", 40), ("storm-b", 40)))
        store = Store(config.db_path)
        for gpu in ("cpu",):  # estimates say "instant": admission never refuses; the caps decide
            store.record_throughput(base_model="tunefleet/tiny-llama", method="qlora", gpu=gpu, gpu_count=1,
                                    tokens_per_s=1e9)
        faults = Faults({f: rate for f in FAULTS})
        provs = {name: FaultProvider(faults, seed=seed + i, name=name, usd_per_hour=PRICE * (1 + i / 5),
                                     steps_per_poll=5, hang_s=0.6, offers_per_call=8)
                 for i, name in enumerate(("storm-a", "storm-b"))}
        ids = []
        for i in range(jobs):
            cap = CAP if i % 2 else None
            steps = 200 if cap else 40  # the capped half would run ~2x past its cap
            ids.append((submit_spec(store, _spec(steps, cap), config), cap))
        daemon = Daemon(store, config, dict(provs))
        t0 = time.monotonic()
        daemon.run(until_idle=True, max_seconds=max_seconds)
        wall = time.monotonic() - t0
        states = Counter(store.get_job(j).state.value for j, _ in ids)
        refusals = Counter()
        attempts = []
        overspend = 0.0
        for job_id, cap in ids:
            row = store.get_job(job_id)
            attempts.append(len(store.attempts_for(job_id)))
            if cap is not None:
                overspend += max(0.0, row.cost_usd - cap)
            if row.state.value == "failed":
                code = next((e.data.get("code") for e in reversed(store.events(job_id)) if e.kind == "failed"), None)
                refusals[code or "?"] += 1
        month = store.spend_since(month_start(time.time()))
        overspend += max(0.0, month - MONTHLY)
        now = time.time()
        bill = sum(m.billed_usd(now) for p in provs.values() for m in p.machines.values())
        injected = Counter()
        for p in provs.values():
            injected.update(p.injected)
        result = {
            "jobs": jobs, "fault_rate": rate, "wall_s": round(wall, 1), "ticks": daemon.ticks_run,
            "states": dict(sorted(states.items())), "failed_by_code": dict(sorted(refusals.items())),
            "attempts_per_job_mean": round(sum(attempts) / len(attempts), 2), "attempts_per_job_max": max(attempts),
            "slow_ticks": daemon.slow_ticks, "calls_past_deadline": daemon.calls.timeouts,
            "overspend_usd": round(overspend, 6), "ledger_usd": round(store.spend_total(), 4),
            "provider_bill_usd": round(bill, 4),
            "still_running_machines": sum(len(p.running()) for p in provs.values()),
            "injected": dict(sorted(injected.items())),
        }
        daemon.calls.shutdown()
        store.close()
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    runs = {"storm": run(args.jobs, args.rate, args.seed), "no_faults": run(args.jobs, 0.0, args.seed)}
    if args.json:
        print(json.dumps(runs, indent=1))
        return
    keys = ["wall_s", "states", "failed_by_code", "attempts_per_job_mean", "attempts_per_job_max", "slow_ticks",
            "calls_past_deadline", "overspend_usd", "ledger_usd", "provider_bill_usd", "still_running_machines"]
    print(f"fault storm: {args.jobs} jobs, every fault class at {args.rate:.0%} per call, seed {args.seed}")
    for key in keys:
        print(f"  {key:24s} storm: {runs['storm'][key]!s:40s} no faults: {runs['no_faults'][key]}")
    print(f"  injected: {runs['storm']['injected']}")


if __name__ == "__main__":
    main()
