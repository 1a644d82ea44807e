"""``tunefleet status`` with 10,000 jobs in the store vs. ``sky status`` (target: <= 0.1x SkyPilot's).

    python -m benchmarks.status_latency [--jobs 10000] [--repeat 5] [--json] [--no-sky]

A temporary TUNEFLEET_HOME is filled through the real ``Store`` API with a mix of states (queued,
launching, running, succeeded, failed after a retry, preempted and requeued, cancelled), with the
attempts, events and spend rows those transitions write. Then the installed CLI is timed as a
subprocess, wall clock, median of ``--repeat``:

- ``tunefleet status`` (the default listing: newest 50, a rich table),
- ``tunefleet status --json``,
- ``tunefleet status JOB --json`` for one job,

and, in the same run, ``sky status`` (SkyPilot's own CLI from this venv) with HOME and
SKY_RUNTIME_DIR in a temporary folder, so it sees no clusters. ``sky status`` talks to a local API
server that it starts on demand: the first call (cold) includes that start, later calls (warm)
reuse it. The server is bound to a free port of its own (``SKYPILOT_API_SERVER_LOCAL_PORT``), so
it never touches another SkyPilot server on this machine, and ``sky api stop`` on that port stops
it afterwards. Python's own start-up (``python -c pass``) is timed too, as the floor of any CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: tunefleet and sky live next to python
EXAMPLE = ROOT / "examples" / "qlora-tiny.yaml"
TARGET_RATIO = 0.1


# ---------------------------------------------------------------- a store with 10,000 jobs
def fill(home: Path, n: int) -> dict[str, Any]:
    """n jobs through the real Store API; returns counts by state and one job id to query."""
    from jobs.spec import load_job_file
    from orchestrator.states import AttemptState, JobState
    from orchestrator.store import Store

    spec = load_job_file(EXAMPLE)
    doc = spec.to_payload_dict()
    doc["checkpoint"]["store"] = (home / "checkpoints").as_uri()
    store = Store(home / "state.db")
    ids: list[str] = []
    try:
        t0 = time.perf_counter()
        for i in range(n):
            ids.append(store.submit(doc, name=f"{spec.display_name}-{i}", priority=i % 3))

        def attempt(job_id: str, provider: str, price: float, seq_note: str):
            att = store.create_attempt(job_id, provider=provider, offer_id=f"{provider}-o1", usd_per_hour=price,
                                       start_step=0, data={"offer": {"provider": provider, "gpu": "RTX4090"},
                                                           "est_usd": 0.2})
            store.transition_attempt(att.id, AttemptState.LAUNCHING, kind="launched", message=seq_note,
                                     handle={"id": att.id}, log_path=f"/tmp/{att.id}.log")
            store.transition_attempt(att.id, AttemptState.RUNNING, kind="attempt_running", message="running")
            return att

        def end(att, to: AttemptState, price: float, **fields):
            store.transition_attempt(att.id, to, kind=f"attempt_{to.value}", message="ended",
                                     spend_usd=price * 0.05 if price else None, **fields)

        # the pattern repeats every 20 jobs, so the newest 50 (the default listing) mix every state
        for i, job_id in enumerate(ids):
            kind = i % 20
            provider, price = ("vast", 0.35) if i % 2 else ("local", 0.0)
            if kind < 3:
                continue  # queued
            if kind == 3:
                att = store.create_attempt(job_id, provider=provider, offer_id="o1", usd_per_hour=price, start_step=0)
                continue  # launching
            att = attempt(job_id, provider, price, "attempt 1")
            store.transition_job(job_id, JobState.RUNNING, kind="running", message="attempt 1 running")
            store.update_progress(job_id, step=120 + i % 200, total_steps=400, loss=1.5 - (i % 100) / 100,
                                  checkpoint_step=100, checkpoint_uri=f"file:///ckpt/{job_id}/checkpoints/100/")
            if kind in (4, 5):
                continue  # running
            if kind == 6:  # preempted, back in the queue
                end(att, AttemptState.PREEMPTED, price, end_step=130)
                store.transition_job(job_id, JobState.PREEMPTED, kind="preempted", message="lost")
                store.transition_job(job_id, JobState.QUEUED, kind="requeued", message="resume at 100")
                continue
            if kind == 7:  # failed twice
                end(att, AttemptState.FAILED, price, exit_code=1, end_reason="boom")
                store.transition_job(job_id, JobState.PREEMPTED, kind="preempted", message="retry")
                store.transition_job(job_id, JobState.QUEUED, kind="requeued", message="retry")
                att = attempt(job_id, provider, price, "attempt 2")
                store.transition_job(job_id, JobState.RUNNING, kind="running", message="attempt 2 running")
                end(att, AttemptState.FAILED, price, exit_code=1, end_reason="boom")
                store.transition_job(job_id, JobState.FAILED, kind="failed", message="2 failed attempts",
                                     reason="payload failed with exit code 1")
                continue
            if kind == 8:
                store.request_cancel(job_id)
                end(att, AttemptState.CANCELLED, price)
                store.transition_job(job_id, JobState.CANCELLED, kind="cancelled", message="cancelled by the user")
                continue
            end(att, AttemptState.SUCCEEDED, price, exit_code=0, end_step=400)
            store.transition_job(job_id, JobState.SUCCEEDED, kind="succeeded", message="done", step=400,
                                 adapter_uri=f"file:///ckpt/{job_id}/final/", loss=0.9)
        fill_s = time.perf_counter() - t0
        counts = {s.value: c for s, c in store.count_jobs_by_state().items() if c}
        events = store._conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        attempts = store._conn.execute("SELECT COUNT(*) FROM attempts").fetchone()[0]
    finally:
        store.close()
    return {"fill_s": round(fill_s, 2), "states": counts, "events": events, "attempts": attempts,
            "probe_job": ids[len(ids) // 2]}


# ---------------------------------------------------------------- timing subprocesses
def timed(argv: list[str], env: dict[str, str], timeout: float) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout, cwd=ROOT, check=False)
    return time.perf_counter() - t0, proc


def median_of(argv: list[str], env: dict[str, str], repeat: int, check, timeout: float = 60.0) -> dict[str, Any]:
    times = []
    for _ in range(repeat):
        dt, proc = timed(argv, env, timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-2000:]}")
        check(proc.stdout)
        times.append(dt)
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
            "runs_s": [round(t, 4) for t in times]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _our_sky_pids(port: int, runtime_dir: Path) -> list[int]:
    """PIDs of SkyPilot processes this run started: the API server bound to our private port, and
    anything whose environment names our private SKY_RUNTIME_DIR (so cleanup touches nobody else's)."""
    port_re = re.compile(rf"--port[= ]{port}\b")
    marker = f"SKY_RUNTIME_DIR={runtime_dir}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ("sky.server.server" in cmd and port_re.search(cmd)) or marker in env:
            pids.append(int(entry.name))
    return pids


def sky_status(repeat: int, cold_timeout: float) -> dict[str, Any]:
    sky = BIN / "sky"
    if not sky.exists():
        return {"ok": False, "why": f"{sky} not found (SkyPilot is not installed in this venv)"}
    tmp = Path(tempfile.mkdtemp(prefix="tunefleet-sky-"))
    port = _free_port()
    env = {**os.environ, "HOME": str(tmp), "SKY_RUNTIME_DIR": str(tmp), "SKYPILOT_API_SERVER_LOCAL_PORT": str(port),
           "SKYPILOT_DISABLE_USAGE_COLLECTION": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("SKYPILOT_API_SERVER_ENDPOINT", None)
    out: dict[str, Any] = {"ok": False, "port": port}

    def check(stdout: str) -> None:
        if "No existing clusters" not in stdout:
            raise RuntimeError(f"sky status did not report an empty cluster list: {stdout[-500:]!r}")

    try:
        try:
            dt, proc = timed([str(sky), "status"], env, cold_timeout)
        except subprocess.TimeoutExpired:
            out["why"] = f"the first `sky status` (API server start) did not finish within {cold_timeout:.0f} s"
            return out
        if proc.returncode != 0:
            out["why"] = f"`sky status` exited {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"
            return out
        check(proc.stdout)
        out["cold_s"] = round(dt, 3)
        try:
            out["warm"] = median_of([str(sky), "status"], env, repeat, check, timeout=120.0)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            out["why"] = f"a warm `sky status` failed: {exc}"
            return out
        out["ok"] = True
        return out
    finally:
        try:
            stop_s, stop = timed([str(sky), "api", "stop"], env, 120.0)
            out["api_stop"] = {"rc": stop.returncode, "s": round(stop_s, 2)}
        except subprocess.TimeoutExpired:
            out["api_stop"] = {"rc": None, "why": "timed out"}
        left = _our_sky_pids(port, tmp)
        for pid in left:  # only the server this run started, found by its private port
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        out["server_left_after_stop"] = left
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- main
def run(n: int, repeat: int, with_sky: bool, cold_timeout: float) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="tunefleet-status-"))
    try:
        filled = fill(home, n)
        env = {**os.environ, "TUNEFLEET_HOME": str(home), "COLUMNS": "160"}
        tf = str(BIN / "tunefleet")
        probe = filled["probe_job"]

        def table_ok(stdout: str) -> None:
            if "STATE" not in stdout or stdout.count("\n") < min(n, 50):
                raise RuntimeError(f"unexpected `tunefleet status` output: {stdout[:300]!r}")

        def list_ok(stdout: str) -> None:
            rows = json.loads(stdout)
            if not isinstance(rows, list) or len(rows) != min(n, 50):
                raise RuntimeError("`tunefleet status --json` did not list the newest 50 jobs")

        def one_ok(stdout: str) -> None:
            if json.loads(stdout).get("id") != probe:
                raise RuntimeError(f"`tunefleet status {probe} --json` answered another job")

        results: dict[str, Any] = {
            "jobs": n, "store": filled,
            "python_startup": median_of([sys.executable, "-c", "pass"], env, repeat, lambda _: None),
            "tunefleet_status": median_of([tf, "status"], env, repeat, table_ok),
            "tunefleet_status_json": median_of([tf, "status", "--json"], env, repeat, list_ok),
            "tunefleet_status_job_json": median_of([tf, "status", probe, "--json"], env, repeat, one_ok),
        }
    finally:
        shutil.rmtree(home, ignore_errors=True)
    results["sky"] = sky_status(repeat, cold_timeout) if with_sky else {"ok": False, "why": "skipped (--no-sky)"}
    worst = max(results[k]["median_s"] for k in ("tunefleet_status", "tunefleet_status_json",
                                                  "tunefleet_status_job_json"))
    results["tunefleet_worst_median_s"] = worst
    sky = results["sky"]
    if sky.get("ok"):
        warm, cold = sky["warm"]["median_s"], sky["cold_s"]
        results["ratio_vs_sky_warm"] = {k: round(results[k]["median_s"] / warm, 4) for k in
                                        ("tunefleet_status", "tunefleet_status_json", "tunefleet_status_job_json")}
        results["ratio_vs_sky_cold"] = {k: round(results[k]["median_s"] / cold, 4) for k in
                                        ("tunefleet_status", "tunefleet_status_json", "tunefleet_status_job_json")}
        results["target_ratio"] = TARGET_RATIO
        results["target_met_vs_warm"] = worst / warm <= TARGET_RATIO
        results["target_met_vs_cold"] = worst / cold <= TARGET_RATIO
    results["load_avg"] = round(os.getloadavg()[0], 2)
    results["cpus"] = os.cpu_count()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-sky", action="store_true", help="time tunefleet only")
    ap.add_argument("--sky-cold-timeout", type=float, default=240.0)
    ns = ap.parse_args(argv)
    r = run(ns.jobs, ns.repeat, not ns.no_sky, ns.sky_cold_timeout)
    if ns.json:
        print(json.dumps(r))
        return 0
    s = r["store"]
    print(f"store: {r['jobs']} jobs {s['states']}, {s['attempts']} attempts, {s['events']} events "
          f"(filled in {s['fill_s']:.1f} s through the Store API)")
    print(f"median of {ns.repeat} runs, wall clock, each a fresh process:")
    print(f"  python -c pass (interpreter start-up)    {r['python_startup']['median_s'] * 1000:8.0f} ms")
    for key, label in (("tunefleet_status", "tunefleet status"), ("tunefleet_status_json", "tunefleet status --json"),
                       ("tunefleet_status_job_json", "tunefleet status JOB --json")):
        print(f"  {label:<40} {r[key]['median_s'] * 1000:8.0f} ms")
    sky = r["sky"]
    if sky.get("ok"):
        print(f"  sky status, cold (starts its API server) {sky['cold_s'] * 1000:8.0f} ms")
        print(f"  sky status, warm                         {sky['warm']['median_s'] * 1000:8.0f} ms")
        print("ratio tunefleet / sky (warm | cold):")
        for key, ratio in r["ratio_vs_sky_warm"].items():
            print(f"  {key:<40} {ratio:8.3f}x | {r['ratio_vs_sky_cold'][key]:.3f}x")
        warm_met, cold_met = r["target_met_vs_warm"], r["target_met_vs_cold"]
        print(f"target <= {TARGET_RATIO}x for every variant: vs warm {'met' if warm_met else 'NOT met'}, "
              f"vs cold {'met' if cold_met else 'NOT met'}")
    else:
        print(f"sky status not measured: {sky.get('why')}")
    if sky.get("server_left_after_stop"):
        print(f"note: `sky api stop` left server pid(s) {sky['server_left_after_stop']}; killed them")
    print(f"load average {r['load_avg']} on {r['cpus']} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
