"""Draining 10,000 queued jobs through the real daemon (target: <= 60 s on this machine).

    python -m benchmarks.drain [--jobs 10000] [--json] [--throughput] [--profile] [--store-dir DIR]

The jobs (``examples/qlora-tiny.yaml``) are submitted in bulk with ``Store.submit`` in this
process (timed on its own), then a real ``Daemon`` with ``poll_interval_s`` 0 runs
``run(until_idle=True)`` against ``benchmarks.instant_provider.InstantProvider``, whose attempts
commit a tiny final adapter and exit 0 the moment they are launched. Afterwards every job must be
``succeeded`` with exactly one attempt.

Baseline, measured in the same run on a copy of the same freshly submitted database: the store
transactions the daemon cannot avoid per job - ``create_attempt``, the attempt's move to
launching with its handle, its move to succeeded, the job's move to succeeded - with nothing else
around them. The ratio daemon / baseline is the daemon's overhead over its own bookkeeping floor.

Where the time goes: the store, estimate, offer, ranking and checkpoint-store calls the daemon
makes are wrapped with timers (a fraction of a microsecond each), so the breakdown needs no
profiler; ``--profile`` adds a cProfile listing (which itself slows the run ~1.5-2x).

The state database lives in a temporary TUNEFLEET_HOME on disk, as in real use. The checkpoint
store defaults to /dev/shm when there is one: every object the provider writes there is fsynced
(a payload's job, done on another machine in real use), and on this machine's disk that is 1.5-6 ms
per attempt, which would measure the disk rather than the daemon. ``--store-dir`` changes it; the
provider's own time is reported either way.

``--throughput``: the provider also reports ``tokens_per_s`` in ``progress.json``, as the real
payload does, so every success goes through ``Daemon._record_throughput`` and the next job's
estimate reads the calibration table, which grows by one row per finished job.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import sqlite3
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "qlora-tiny.yaml"
TARGET_S = 60.0


class Timers:
    """Cumulative wall time and call counts of wrapped callables."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        fn = getattr(owner, attr)
        calls, seconds = self.calls, self.seconds
        clock = time.perf_counter

        def timed(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[label] += clock() - t0
                calls[label] += 1

        setattr(owner, attr, timed)


def _spec_doc(store_uri: str) -> tuple[dict[str, Any], str]:
    from jobs.spec import load_job_file

    spec = load_job_file(EXAMPLE)
    doc = spec.to_payload_dict()  # what orchestrator.queue.submit_spec stores
    doc["checkpoint"]["store"] = doc["checkpoint"].get("store") or store_uri
    return doc, spec.display_name


def submit_jobs(store, doc: dict[str, Any], name: str, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        store.submit(doc, name=name)
    return time.perf_counter() - t0


def baseline(db_path: Path) -> tuple[float, int]:
    """The four transactions per job the daemon must do at least, on their own."""
    from orchestrator.states import AttemptState, JobState
    from orchestrator.store import Store

    store = Store(db_path)
    try:
        ids = [j.id for j in store.next_queued(time.time(), limit=10**9)]
        t0 = time.perf_counter()
        for job_id in ids:
            att = store.create_attempt(job_id, provider="instant", offer_id="instant-0", usd_per_hour=0.0,
                                       start_step=0, data={"offer": {"provider": "instant"}})
            store.transition_attempt(att.id, AttemptState.LAUNCHING, kind="launched", message="launched",
                                     data={"handle": {"attempt_id": att.id}}, handle={"attempt_id": att.id},
                                     log_path=f"/logs/{att.id}.log")
            store.transition_attempt(att.id, AttemptState.SUCCEEDED, kind="attempt_succeeded",
                                     message="payload finished", data={"exit_code": 0}, exit_code=0,
                                     end_step=400)
            store.transition_job(job_id, JobState.SUCCEEDED, kind="succeeded", message="finished",
                                 data={"step": 400}, adapter_uri="file:///x/final/", step=400)
        return time.perf_counter() - t0, len(ids)
    finally:
        store.close()


def verify(db_path: Path, n: int) -> dict[str, Any]:
    con = sqlite3.connect(str(db_path))
    try:
        states = dict(con.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        att_states = dict(con.execute("SELECT state, COUNT(*) FROM attempts GROUP BY state").fetchall())
        not_one = con.execute(
            "SELECT COUNT(*) FROM jobs j WHERE (SELECT COUNT(*) FROM attempts a WHERE a.job_id = j.id) != 1"
        ).fetchone()[0]
        bad_count = con.execute("SELECT COUNT(*) FROM jobs WHERE attempts_count != 1").fetchone()[0]
        no_adapter = con.execute("SELECT COUNT(*) FROM jobs WHERE adapter_uri IS NULL").fetchone()[0]
    finally:
        con.close()
    ok = (states == {"succeeded": n} and att_states == {"succeeded": n} and not_one == 0
          and bad_count == 0 and no_adapter == 0)
    return {"ok": ok, "job_states": states, "attempt_states": att_states,
            "jobs_without_exactly_one_attempt": not_one, "jobs_without_adapter": no_adapter}


def instrument(daemon, store, ckpt, provider) -> Timers:
    """Wrap what the daemon calls (instance attributes or the names its modules imported)."""
    import orchestrator.decide as decide_mod
    import orchestrator.placing as placing_mod

    t = Timers()
    for attr in ("live_attempts", "next_queued", "list_jobs", "get_job", "calibration", "create_attempt",
                 "transition_attempt", "transition_job", "update_progress", "events", "attempts_for",
                 "record_throughput", "add_event", "spend_since", "set_waiting", "mark_seen", "update_attempt",
                 "get_attempt", "set_provider_health"):
        t.wrap(store, attr, f"store.{attr}")
    t.wrap(placing_mod, "estimate", "estimate")
    t.wrap(placing_mod, "decide", "decide")
    t.wrap(decide_mod, "rank", "rank (inside decide)")
    for attr in ("latest_checkpoint", "final", "read_json"):
        t.wrap(ckpt, attr, f"checkpoints.{attr}")
    t.wrap(provider, "launch", "provider.launch")
    t.wrap(provider, "poll", "provider.poll")
    t.wrap(daemon, "tick", "tick")
    return t


def run(n: int, *, store_dir: str | None, throughput: bool, profile: bool, keep: bool) -> dict[str, Any]:
    import orchestrator.decide as decide_mod
    import orchestrator.placing as placing_mod

    saved = {(placing_mod, "estimate"): placing_mod.estimate, (placing_mod, "decide"): placing_mod.decide,
             (decide_mod, "rank"): decide_mod.rank}
    try:
        return _run(n, store_dir=store_dir, throughput=throughput, profile=profile, keep=keep)
    finally:
        for (mod, attr), value in saved.items():
            setattr(mod, attr, value)


def _run(n: int, *, store_dir: str | None, throughput: bool, profile: bool, keep: bool) -> dict[str, Any]:
    from infra.config import Config
    from infra.logging import configure_logging
    from infra.storage import open_store
    from orchestrator.daemon import Daemon
    from orchestrator.store import Store

    from benchmarks.instant_provider import InstantProvider

    home = Path(tempfile.mkdtemp(prefix="tunefleet-drain-"))
    shm = Path("/dev/shm")
    ck_parent = store_dir or (str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else str(home))
    ck_root = Path(tempfile.mkdtemp(prefix="tunefleet-drain-ckpt-", dir=ck_parent))
    os.environ["TUNEFLEET_HOME"] = str(home)
    config = Config(home=home, default_store=ck_root.as_uri(), poll_interval_s=0.0)
    # as `tunefleet daemon` does, less the terminal: JSON lines into <home>/logs/daemon.log
    configure_logging(config.logs_dir / "daemon.log", console=False)
    try:
        doc, name = _spec_doc(config.default_store)
        store = Store(config.db_path)
        submit_s = submit_jobs(store, doc, name, n)
        store.close()  # checkpoints the WAL into state.db: a clean file to copy
        base_db = home / "baseline.db"
        shutil.copyfile(config.db_path, base_db)
        base_s, base_n = baseline(base_db)

        store = Store(config.db_path)
        provider = InstantProvider(tokens_per_s=1000.0 if throughput else None)
        daemon = Daemon(store, config, {"instant": provider})
        ckpt = open_store(config.default_store)
        daemon._stores[config.default_store] = ckpt  # the daemon's own cache, so its calls are timed
        timers = instrument(daemon, store, ckpt, provider)
        prof = cProfile.Profile() if profile else None
        load0 = os.getloadavg()
        c0, t0 = time.process_time(), time.perf_counter()
        if prof:
            prof.enable()
        daemon.run(until_idle=True)
        if prof:
            prof.disable()
        drain_s, drain_cpu = time.perf_counter() - t0, time.process_time() - c0
        load1 = os.getloadavg()
        store.close()
        checked = verify(config.db_path, n)
    finally:
        if not keep:
            shutil.rmtree(home, ignore_errors=True)
            shutil.rmtree(ck_root, ignore_errors=True)
            if "provider" in locals():
                shutil.rmtree(provider._adapter, ignore_errors=True)

    nested = {"rank (inside decide)", "store.calibration"}  # counted in decide / estimate already
    accounted = {k: v for k, v in timers.seconds.items() if k != "tick"}
    breakdown = {
        k: {"calls": timers.calls[k], "s": round(v, 3), "ms_per_job": round(1000 * v / n, 4),
         "share": round(v / drain_s, 4)}
        for k, v in sorted(accounted.items(), key=lambda kv: -kv[1])
    }
    other = drain_s - sum(v for k, v in accounted.items() if k not in nested)
    breakdown["other (daemon's own code, logging, threads)"] = {
        "calls": None, "s": round(other, 3), "ms_per_job": round(1000 * other / n, 4),
        "share": round(other / drain_s, 4)}
    result: dict[str, Any] = {
        "jobs": n,
        "submit_s": round(submit_s, 3),
        "submit_jobs_per_s": round(n / submit_s, 1),
        "baseline_s": round(base_s, 3),
        "baseline_jobs_per_s": round(base_n / base_s, 1),
        "baseline_txns_per_job": 4,
        "drain_s": round(drain_s, 3),
        "drain_cpu_s": round(drain_cpu, 3),
        "jobs_per_s": round(n / drain_s, 1),
        "ratio_to_baseline": round(drain_s / base_s, 2),
        "ticks": timers.calls["tick"],
        "provider_launch_s": round(provider.launch_s, 3),
        "drain_s_without_provider": round(drain_s - provider.launch_s, 3),
        "target_s": TARGET_S * n / 10_000,
        "target_met": drain_s <= TARGET_S * n / 10_000,
        "throughput_reports": throughput,
        "checkpoint_store": config.default_store,
        "load_avg_before_after": [round(load0[0], 2), round(load1[0], 2)],
        "cpus": os.cpu_count(),
        "verified": checked,
        "breakdown": breakdown,
    }
    if prof:
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("cumulative").print_stats(r"(orchestrator|providers|infra|jobs)/|instant_provider", 30)
        stats.sort_stats("tottime").print_stats(20)
        result["profile"] = out.getvalue()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--throughput", action="store_true",
                    help="the provider reports tokens_per_s like the real payload (calibration path)")
    ap.add_argument("--profile", action="store_true", help="also run the daemon under cProfile")
    ap.add_argument("--store-dir", default=None, help="parent folder of the checkpoint store (default /dev/shm)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary home")
    ns = ap.parse_args(argv)
    r = run(ns.jobs, store_dir=ns.store_dir, throughput=ns.throughput, profile=ns.profile, keep=ns.keep)
    if ns.json:
        print(json.dumps(r))
        return 0 if r["verified"]["ok"] else 1
    n = r["jobs"]
    if r["throughput_reports"]:
        print("the provider reports tokens_per_s like the payload (calibration path on)")
    print(f"submitted {n} jobs in {r['submit_s']:.2f} s "
          f"({r['submit_jobs_per_s']:.0f} jobs/s, Store.submit, one process)")
    print(f"baseline: {r['baseline_txns_per_job']} store transactions per job alone: {r['baseline_s']:.2f} s "
          f"({r['baseline_jobs_per_s']:.0f} jobs/s)")
    print(f"daemon drain: {r['drain_s']:.2f} s wall, {r['drain_cpu_s']:.2f} s CPU, {r['ticks']} ticks: "
          f"{r['jobs_per_s']:.0f} jobs/s = {r['ratio_to_baseline']:.2f}x the baseline's time")
    print(f"  of which the instant provider's own store writes: {r['provider_launch_s']:.2f} s "
          f"(checkpoint store {r['checkpoint_store']})")
    print(f"  load average before/after: {r['load_avg_before_after']} on {r['cpus']} CPUs")
    v = r["verified"]
    print(f"verified: {'ok' if v['ok'] else 'FAILED'} (jobs {v['job_states']}, attempts {v['attempt_states']}, "
          f"{v['jobs_without_exactly_one_attempt']} jobs without exactly one attempt)")
    print(f"target <= {r['target_s']:.0f} s for {n} jobs: {'met' if r['target_met'] else 'NOT met'}")
    print("where the daemon's time goes:")
    for k, b in r["breakdown"].items():
        calls = "" if b["calls"] is None else f"{b['calls']:>7} calls"
        print(f"  {k:<54} {b['s']:>8.2f} s {b['ms_per_job']:>8.3f} ms/job {100 * b['share']:>5.1f} %  {calls}")
    if "profile" in r:
        print(r["profile"])
    return 0 if v["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
