"""The team server under load: 200 clients polling job status for 60 s (targets: 0 errors, p99 of a
status read under 100 ms).

    python -m benchmarks.server_load [--json] [--clients 200] [--seconds 60] [--interval 1.0] [--warmup 5]

A real ``tunefleet server --no-daemon --rate 0`` is started on 127.0.0.1 (a free port) on a
temporary TUNEFLEET_HOME (SQLite). Users in four teams, a token each, and ten queued jobs per user
are made through the real ``Store`` API. Then ``--clients`` concurrent clients (asyncio + httpx,
loopback only, one token each, round robin over the users) each make one request every
``--interval`` seconds (jittered start; a client that falls behind goes on at once): 75 % status
reads of one of its team's jobs (``GET /api/v1/jobs/{id}``), 24 % listings (``GET /api/v1/jobs``,
the newest 50 its team may see) and 1 % submits (``POST /api/v1/jobs``, a 20-example dataset in
the body). ``--interval 0`` makes every client ask again as soon as it is answered (saturation).

Reported: throughput (answered requests a second), p50 and p99 latency per kind (status, list,
submit), and errors (any status but 200/201, or no answer). Throughput is the requests started in
the counted window that were answered, over its length. Latency and throughput are counted after
the first ``--warmup`` seconds (each client opens its connection then); the p99 over the whole run
is reported beside it. Errors are counted over the whole run.

Baseline, measured in the same run on the same SQLite file once the server is idle: the same
status reads (``job_summary`` with its eval loss, what ``GET /jobs/{id}`` returns) made directly
against the store in-process by the same number of concurrent workers (threads), at the same
pace, for the same time. The ratios server/direct for p50 and throughput are what HTTP, the token
check, JSON and the server's thread pool cost on top of the store.

Postgres is not supported yet as a store; its column says so.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "qlora-tiny.yaml"
DATA = b"".join((ROOT / "examples" / "data" / "alpaca-tiny.jsonl").read_bytes().splitlines(keepends=True)[:20])
JOB = """\
base_model: tunefleet/tiny-llama
adapter: qlora
load_in_4bit: true
max_steps: 10
datasets:
  - path: data/train.jsonl
    type: alpaca
"""
TEAMS = 4
JOBS_PER_USER = 10
MIX = (("status", 0.75), ("list", 0.24), ("submit", 0.01))
TARGET_ERRORS = 0
TARGET_STATUS_P99_MS = 100.0


# ---------------------------------------------------------------- set-up
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed(home: Path, users: int) -> dict[str, Any]:
    """Teams, users with a token each, and ``JOBS_PER_USER`` queued jobs per user."""
    from jobs.spec import load_job_file
    from orchestrator.store import Store

    doc = load_job_file(EXAMPLE).to_payload_dict()
    doc["checkpoint"]["store"] = (home / "checkpoints").as_uri()
    tokens: dict[str, str] = {}
    team_of: dict[str, str] = {}
    jobs_of_team: dict[str, list[str]] = {}
    with Store(home / "state.db") as store:
        for t in range(TEAMS):
            store.create_team(f"team{t}")
        for u in range(users):
            name, team = f"user{u}", f"team{u % TEAMS}"
            store.create_user(name, team, "member")
            tokens[name] = store.create_token(name)[1]
            team_of[name] = team
            for j in range(JOBS_PER_USER):
                jobs_of_team.setdefault(team, []).append(store.submit(doc, name=f"{name}-{j}", owner=name))
    return {"tokens": tokens, "team_of": team_of, "jobs_of_team": jobs_of_team}


class ServerProcess:
    """``tunefleet server --no-daemon ARGS`` (``--daemon`` with ``daemon=True``) on 127.0.0.1 over
    ``home``, a process of its own (the tests start theirs with it too)."""

    def __init__(self, home: Path, *args: str, env: dict[str, str] | None = None, daemon: bool = False) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home / "server.log"
        env = {**os.environ, "TUNEFLEET_HOME": str(home), "HF_HUB_OFFLINE": "1", **(env or {})}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.cli", "server", "--daemon" if daemon else "--no-daemon",
                 "--host", "127.0.0.1", "--port", str(self.port), *args],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited {self.proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not come up in 60 s")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------- figures
def pct(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of ``values``, or None for none."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


def latency(samples: list[tuple[float, float]], warmup: float) -> dict[str, Any]:
    """Figures of (seconds since the start, latency) samples, those after ``warmup``; and the p99 of all."""
    values = [dt for at, dt in samples if at >= warmup]
    return {"n": len(values), "p50_ms": _ms(pct(values, 0.50)), "p99_ms": _ms(pct(values, 0.99)),
            "max_ms": _ms(max(values)) if values else None,
            "p99_ms_with_warmup": _ms(pct([dt for _, dt in samples], 0.99))}


def _pace(interval: float, rnd: random.Random):
    """A client's schedule: a jittered start, then one request every ``interval`` seconds; one that
    falls behind goes on at once (and does not try to catch up)."""
    nxt = time.perf_counter() + rnd.uniform(0, interval)
    while True:
        now = time.perf_counter()
        yield max(0.0, nxt - now)
        nxt = max(nxt + interval, now)


# ---------------------------------------------------------------- the load
async def load(url: str, world: dict[str, Any], clients: int, seconds: float, interval: float,
               warmup: float, seed_: int = 0) -> dict[str, Any]:
    import httpx

    users = sorted(world["tokens"])
    submit_body = {"yaml": JOB, "files": {"data/train.jsonl": base64.b64encode(DATA).decode()}}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k, _ in MIX}
    errors: dict[str, int] = {}
    kinds, weights = [k for k, _ in MIX], [w for _, w in MIX]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url + "/api/v1", limits=limits, timeout=30) as http:
        start = time.perf_counter()
        stop_at = start + seconds

        async def client(i: int) -> None:
            rnd = random.Random(seed_ * 100_003 + i)
            user = users[i % len(users)]
            headers = {"Authorization": f"Bearer {world['tokens'][user]}"}
            jobs = world["jobs_of_team"][world["team_of"][user]]
            for wait in _pace(interval, rnd):
                if wait:
                    await asyncio.sleep(wait)
                if time.perf_counter() >= stop_at:
                    return
                kind = rnd.choices(kinds, weights)[0]
                t0 = time.perf_counter()
                try:
                    if kind == "status":
                        r = await http.get(f"/jobs/{rnd.choice(jobs)}", headers=headers)
                    elif kind == "list":
                        r = await http.get("/jobs", headers=headers)
                    else:
                        r = await http.post("/jobs", json=submit_body, headers=headers)
                    dt = time.perf_counter() - t0
                    if r.status_code not in (200, 201):
                        key = f"{kind} {r.status_code}"
                        errors[key] = errors.get(key, 0) + 1
                        continue
                    times[kind].append((t0 - start, dt))
                except httpx.HTTPError as exc:
                    key = f"{kind} {type(exc).__name__}"
                    errors[key] = errors.get(key, 0) + 1

        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - start
        server_side = _server_means((await http.get(url + "/metrics")).text)
    answered = sum(len(v) for v in times.values())
    counted = sum(1 for v in times.values() for at, _ in v if at >= warmup)
    return {"requests": answered + sum(errors.values()), "answered": answered, "errors": sum(errors.values()),
            "error_kinds": errors, "elapsed_s": round(elapsed, 2),
            "throughput_rps": round(counted / (seconds - warmup), 1),
            "kinds": {k: latency(v, warmup) for k, v in times.items()}, "server_mean_ms": server_side}


def _server_means(metrics: str) -> dict[str, float]:
    """Mean seconds the server spent per request, by route, as its own /metrics says (whole run,
    from the request reaching the app to its answer: the thread pool's queue included, the
    socket and the client not)."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in metrics.splitlines():
        for prefix, into in (("tunefleet_http_request_seconds_sum{", sums), ("tunefleet_http_request_seconds_count{", counts)):
            if line.startswith(prefix):
                labels, _, value = line[len(prefix):].partition("} ")
                route = labels.split('route="', 1)[1].rsplit('"', 1)[0]
                into[route] = float(value)
    return {r: round(sums[r] / counts[r] * 1000, 2) for r in sorted(sums)
            if counts.get(r) and r not in ("/metrics", "/healthz", "(unmatched)")}


def direct(db: Path, world: dict[str, Any], workers: int, seconds: float, interval: float,
           warmup: float, seed_: int = 0) -> dict[str, Any]:
    """The same status reads, in-process on the same SQLite file, by ``workers`` threads at the
    same pace."""
    from orchestrator.queue import job_summary, with_eval
    from orchestrator.store import Store

    users = sorted(world["tokens"])
    times: list[list[tuple[float, float]]] = [[] for _ in range(workers)]
    errors: list[int] = [0] * workers
    with Store(db) as store:
        start = time.perf_counter()
        stop_at = start + seconds

        def worker(i: int) -> None:
            rnd = random.Random(seed_ * 100_003 + i)
            jobs = world["jobs_of_team"][world["team_of"][users[i % len(users)]]]
            for wait in _pace(interval, rnd):
                if wait:
                    time.sleep(wait)
                if time.perf_counter() >= stop_at:
                    return
                t0 = time.perf_counter()
                try:
                    with_eval(store, job_summary(store, store.get_job(rnd.choice(jobs))))
                except Exception:  # counted, as the server's errors are
                    errors[i] += 1
                    continue
                times[i].append((t0 - start, time.perf_counter() - t0))

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    flat = [x for ts in times for x in ts]
    counted = sum(1 for at, _ in flat if at >= warmup)
    return {"requests": len(flat) + sum(errors), "errors": sum(errors), "elapsed_s": round(elapsed, 2),
            "throughput_rps": round(counted / (seconds - warmup), 1), "status": latency(flat, warmup)}


# ---------------------------------------------------------------- main
def run(clients: int, seconds: float, interval: float, warmup: float) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="tunefleet-load-"))
    try:
        t0 = time.perf_counter()
        world = seed(home, users=max(TEAMS, min(clients, 20)))
        seed_s = time.perf_counter() - t0
        server = ServerProcess(home, "--rate", "0")
        try:
            sqlite = asyncio.run(load(server.url, world, clients, seconds, interval, warmup))
        finally:
            server.stop()
        base = direct(home / "state.db", world, clients, seconds, interval, warmup)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    status = sqlite["kinds"]["status"]
    p50_ratio = (round(status["p50_ms"] / base["status"]["p50_ms"], 2)
                 if status["p50_ms"] and base["status"]["p50_ms"] else None)
    tput_ratio = round(sqlite["throughput_rps"] / base["throughput_rps"], 3) if base["throughput_rps"] else None
    return {
        "clients": clients, "seconds": seconds, "interval_s": interval, "warmup_s": warmup,
        "mix": dict(MIX), "users": len(world["tokens"]), "teams": TEAMS,
        "seeded_jobs": sum(len(v) for v in world["jobs_of_team"].values()), "seed_s": round(seed_s, 2),
        "backends": {"sqlite": sqlite, "postgres": "not yet"},
        "direct": base,
        "ratio_server_over_direct": {"status_p50": p50_ratio, "throughput": tput_ratio},
        "targets": {"errors": TARGET_ERRORS, "status_p99_ms": TARGET_STATUS_P99_MS},
        "targets_met": {"errors": sqlite["errors"] <= TARGET_ERRORS,
                        "status_p99": status["p99_ms"] is not None and status["p99_ms"] < TARGET_STATUS_P99_MS},
        "cpus": os.cpu_count(), "load_avg": round(os.getloadavg()[0], 2),
    }


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--interval", type=float, default=1.0,
                    help="seconds between a client's requests (0: ask again as soon as answered)")
    ap.add_argument("--warmup", type=float, default=5.0,
                    help="seconds at the start not counted in latency and throughput (at most a fifth of the run)")
    ap.add_argument("--json", action="store_true")
    ns = ap.parse_args(argv)
    if ns.clients < 1 or ns.seconds <= 0 or ns.interval < 0 or ns.warmup < 0:
        ap.error("--clients >= 1, --seconds > 0, --interval >= 0, --warmup >= 0")
    warmup = min(ns.warmup, ns.seconds / 5)
    r = run(ns.clients, ns.seconds, ns.interval, warmup)
    if ns.json:
        print(json.dumps(r))
        return 0
    s, d = r["backends"]["sqlite"], r["direct"]
    pace = f"one request every {ns.interval:g} s each" if ns.interval else "each asking again as soon as answered"
    print(f"tunefleet server --no-daemon --rate 0 on 127.0.0.1: {r['clients']} clients for {r['seconds']:g} s "
          f"(the first {r['warmup_s']:g} s not counted), {pace}; "
          f"{r['users']} users in {r['teams']} teams, {r['seeded_jobs']} jobs seeded; mix "
          + ", ".join(f"{k} {w:.0%}" for k, w in MIX))
    print(f"{'':<28} {'SQLite':>22} {'Postgres':>10}")
    print(f"{'throughput (answered/s)':<28} {s['throughput_rps']:>22.1f} {'not yet':>10}")
    for kind in ("status", "list", "submit"):
        k = s["kinds"][kind]
        cell = f"{_f(k['p50_ms'])} / {_f(k['p99_ms'])} ms (n={k['n']})"
        print(f"{kind + ' p50 / p99':<28} {cell:>22} {'not yet':>10}")
    st = s["kinds"]["status"]
    print(f"{'status p99 with warm-up':<28} {_f(st['p99_ms_with_warmup']) + ' ms':>22} {'not yet':>10}")
    print(f"{'errors (whole run)':<28} {s['errors']:>22} {'not yet':>10}" + (f"  {s['error_kinds']}" if s["errors"] else ""))
    print("server-side mean per route (its /metrics): "
          + ", ".join(f"{r} {ms:.1f} ms" for r, ms in s["server_mean_ms"].items()))
    print(f"baseline, same run: the same status reads on the store in-process, {r['clients']} threads, same pace: "
          f"p50 {_f(d['status']['p50_ms'], '.2f')} ms, p99 {_f(d['status']['p99_ms'], '.2f')} ms, "
          f"{d['throughput_rps']:.1f}/s, {d['errors']} errors")
    ratio = r["ratio_server_over_direct"]
    print(f"ratio server / direct: status p50 {_f(ratio['status_p50'], '.2f')}x, "
          f"throughput {_f(ratio['throughput'], '.3f')}x")
    met = r["targets_met"]
    print(f"targets: {TARGET_ERRORS} errors: {'met' if met['errors'] else 'NOT met'}; status p99 < "
          f"{TARGET_STATUS_P99_MS:g} ms: {'met' if met['status_p99'] else 'NOT met'}")
    print(f"load average {r['load_avg']} on {r['cpus']} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
