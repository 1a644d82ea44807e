"""Chaos: over many job lifecycles on the local provider, ``kill -9`` the daemon at random points and
restart it; every job must end succeeded with its events consistent, no attempt launched twice and
its spend recorded once.

The daemon joins a real ``ray start --head`` cluster, so the attempts (detached Ray actors running
the real training payload) outlive each killed daemon and the next daemon has to *adopt* them:
this is the recovery path a crashed production daemon takes. How each daemon dies is drawn by a
seeded RNG (``TUNEFLEET_CHAOS_SEED`` replays another schedule; see MODES): SIGKILL from outside after
a random delay or as soon as the store shows a new attempt being created or ending, or SIGKILL
from inside, right after a given store transaction commits (intent -> launch, launch -> the
payload's start, an attempt's end -> its job's next state). Daemons are killed until every job has
ended or MAX_KILLS have died; then one ``--until-idle`` daemon finishes the queue.

Everything checked at the end is read back from the store, the checkpoint store, the attempt logs
and Ray itself; nothing depends on how long anything took.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from tests.ray_head import ray_head
from tests.test_cli import EXAMPLE, tf

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")
SEED = int(os.environ.get("TUNEFLEET_CHAOS_SEED", "1337"))
N_JOBS = 6
STEPS = (60, 70, 80)  # each job draws one: jobs end at different times
SAVE_STEPS = 20
MAX_KILLS = 12  # kill until every job has ended or this many daemons have been killed
USD_PER_HOUR = 36.0  # the price of the local CPU: local_cpu_watts 1000 x usd_per_kwh 36
FINAL_RUN_S = 120  # the last daemon's --max-seconds: a deadline against hangs, not an assertion

TERMINAL_ATTEMPT = {"succeeded", "preempted", "failed", "cancelled"}
CLEANUP = {"orphan_found", "orphan_destroyed"}  # the reconciler's events: may follow an attempt's end
ATTEMPT_END_KINDS = tuple(f"attempt_{s}" for s in sorted(TERMINAL_ATTEMPT)) + ("launch_failed",)

# How a daemon dies (weights). Each daemon draws a delay of 0.5-6 s; "delay": SIGKILL from outside
# then. "watch_*": SIGKILL from outside as soon as the store shows a new attempt_created / attempt
# end event (polled, so it lands a little after the commit), or at the delay. "crash_*": the daemon
# SIGKILLs *itself* the instant that store transaction has committed, before its next line runs:
# the exact windows between two transactions (intent -> launch, launch -> the payload's start, an
# attempt's end -> its job's next state); SIGKILL from outside at the delay if it never gets there.
MODES = {"delay": 3, "watch_created": 1, "watch_end": 1, "crash_created": 1, "crash_launched": 1, "crash_end": 2}

# ``tunefleet daemon``, unmodified, behind a hook that kills the process with SIGKILL right after the
# store transaction named by TUNEFLEET_CHAOS_CRASH_AFTER commits (the first one of that kind).
_DAEMON = r"""
import os, signal, sys
from orchestrator.store import Store

point = os.environ.get("TUNEFLEET_CHAOS_CRASH_AFTER")

def _die(what):
    sys.stderr.write(f"chaos: SIGKILL right after {what}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)

if point == "created":
    _create = Store.create_attempt
    def create_attempt(self, *a, **k):
        row = _create(self, *a, **k)
        _die(f"attempt_created {row.id}")
    Store.create_attempt = create_attempt
elif point in ("launched", "end"):
    _transition = Store.transition_attempt
    def transition_attempt(self, *a, **k):
        row = _transition(self, *a, **k)
        if (point == "launched" and k.get("kind") == "launched") or (point == "end" and row.state.terminal):
            _die(f"{k.get('kind')} {row.id}")
        return row
    Store.transition_attempt = transition_attempt

sys.argv = ["tunefleet", *sys.argv[1:]]
from orchestrator.cli import main
main()
"""


@pytest.fixture
def ray_cluster():
    """A CPU-only ``ray start --head`` on 127.0.0.1, stopped afterwards, always (only what this test
    started): the killed daemons leave their attempt actors (and payloads) running on it."""
    with ray_head(num_cpus=2, num_gpus=0, prefix="tfchaos") as address:
        yield address


class _Watch:
    """Reads the store the way an operator would, through its own SQLite connection (WAL: never
    blocks the daemon). Only reads."""

    def __init__(self, db: Path):
        self.conn = sqlite3.connect(db, timeout=10, isolation_level=None)

    def last_event_id(self, kinds: tuple[str, ...]) -> int:
        q = f"SELECT COALESCE(MAX(id), 0) FROM events WHERE kind IN ({', '.join('?' * len(kinds))})"
        return int(self.conn.execute(q, kinds).fetchone()[0])

    def close(self) -> None:
        self.conn.close()


def _job_file(tmp_path: Path, i: int, steps: int) -> Path:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["max_steps"] = steps
    doc["save_steps"] = SAVE_STEPS
    doc["datasets"][0]["path"] = str((EXAMPLE.parent / doc["datasets"][0]["path"]).resolve())
    doc["policy"]["max_usd"] = 50.0  # spend is real ($36/h) but must never stop a job here
    path = tmp_path / f"job{i}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _lock_holder(home: Path) -> str:
    try:
        return (home / "daemon.lock").read_text().strip()
    except FileNotFoundError:
        return ""


def _wait(cond, timeout: float, what: str, on_fail=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}\n{on_fail()}")
        time.sleep(0.02)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except FileNotFoundError:
        return f"({path} does not exist)"


def _leaked_actors(address: str, names: list[str]) -> list[str]:
    """The attempt actors still registered on the cluster (every attempt's actor must be released)."""
    code = (
        "import json, sys, ray\n"
        f"ray.init(address={address!r}, namespace='tunefleet', log_to_driver=False)\n"
        "alive = []\n"
        "for n in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        ray.get_actor(n, namespace='tunefleet')\n"
        "    except ValueError:\n"
        "        continue\n"
        "    alive.append(n)\n"
        "print(json.dumps(alive))\n"
    )
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(names)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kill_9_daemon_at_random_points_loses_nothing(tmp_path, ray_cluster, model_cache):
    t0 = time.monotonic()
    rng = random.Random(SEED)
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text(
        f"ray_address: {ray_cluster}\npoll_interval_s: 0.3\nlocal_cpu_watts: 1000\nusd_per_kwh: {USD_PER_HOUR}\n"
    )
    (home / "models").symlink_to(model_cache)  # what the daemon hands its payloads as the model cache

    job_ids = []
    for i in range(N_JOBS):
        out = tf(home, "submit", str(_job_file(tmp_path, i, rng.choice(STEPS))), "--json", check=True).stdout
        job_ids.append(json.loads(out)["id"])

    env = {**os.environ, "TUNEFLEET_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "TUNEFLEET_MODEL_CACHE": str(model_cache)}
    daemon_argv = [sys.executable, "-c", _DAEMON, "daemon"]
    watch = _Watch(home / "state.db")
    from orchestrator.store import Store

    store = Store(home / "state.db")
    kills: list[dict] = []
    lock_refused = False
    finals = 0
    try:
        # ---- kill -9 the daemon at random points until the jobs are done (at most MAX_KILLS) ----
        for i in range(MAX_KILLS):
            if all(store.get_job(j).terminal for j in job_ids):
                break
            mode = "delay" if i == 0 else rng.choices(list(MODES), weights=list(MODES.values()))[0]
            delay = rng.uniform(0.5, 6.0)
            seen = {"watch_created": watch.last_event_id(("attempt_created",)),
                    "watch_end": watch.last_event_id(ATTEMPT_END_KINDS)}
            run_env = dict(env)
            if mode.startswith("crash_"):
                run_env["TUNEFLEET_CHAOS_CRASH_AFTER"] = mode.removeprefix("crash_")
            out_path = tmp_path / f"daemon-{i}.out"
            with open(out_path, "wb") as out:
                proc = subprocess.Popen(daemon_argv, env=run_env, stdout=out, stderr=subprocess.STDOUT)
            started = time.monotonic()
            if i == 0:
                # one daemon per home: a second one started while this one holds the lock exits 1
                _wait(lambda: _lock_holder(home) == str(proc.pid), 60, "the daemon to take the lock",
                      lambda: _tail(out_path))
                second = tf(home, "daemon", "--until-idle")
                assert second.returncode == 1, (second.returncode, second.stdout, second.stderr)
                assert "already running" in second.stderr, second.stderr
                assert _lock_holder(home) == str(proc.pid), "the refused daemon must not take the lock"
                assert proc.poll() is None, f"the refusal disturbed the running daemon:\n{_tail(out_path)}"
                lock_refused = True
            if mode == "delay":
                time.sleep(max(0.0, delay - (time.monotonic() - started)))
            else:
                kinds = ("attempt_created",) if mode == "watch_created" else ATTEMPT_END_KINDS
                deadline = started + delay  # nothing to catch by then: kill it anyway
                while proc.poll() is None and time.monotonic() < deadline:
                    if mode in seen and watch.last_event_id(kinds) > seen[mode]:
                        break
                    time.sleep(0.0005)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                how = "killed"
            else:
                how = "crashed itself"
                assert mode.startswith("crash_") and proc.returncode == -signal.SIGKILL, (
                    f"daemon {i} ({mode}) exited on its own with {proc.returncode}:\n{_tail(out_path)}")
            proc.wait(timeout=30)
            live = store.live_attempts()
            kills.append({
                "mode": mode, "how": how, "after_s": round(time.monotonic() - started, 2),
                "live": [a.id for a in live], "unlaunched": [a.id for a in live if a.handle is None],
            })

        # ---- a last daemon runs the queue to completion ----
        # (--until-idle also exits when the only queued jobs wait for capacity that Ray has not
        # handed back yet, so a queued job gets another run; a job stuck active does not)
        final_deadline = time.monotonic() + FINAL_RUN_S
        while finals == 0 or (any(store.get_job(j).state.value == "queued" for j in job_ids)
                              and time.monotonic() < final_deadline and finals < 4):
            final_out = tmp_path / f"daemon-final-{finals}.out"
            with open(final_out, "wb") as out:
                final = subprocess.run(
                    daemon_argv + ["--until-idle", "--max-seconds", str(max(10, final_deadline - time.monotonic()))],
                    env=env, stdout=out, stderr=subprocess.STDOUT, timeout=FINAL_RUN_S + 60,
                )
            finals += 1
            assert final.returncode == 0, _tail(final_out)

        # ---- what the store says ----
        jobs = {j: store.get_job(j) for j in job_ids}
        attempts = {j: store.attempts_for(j) for j in job_ids}
        events = {j: store.events(j) for j in job_ids}
        spend = store.spend_rows()
    finally:
        watch.close()
        store.close()

    adopted = sorted({a for k in kills for a in k["live"]})
    report = {
        "seed": SEED,
        "kills": kills,
        "final_daemons": finals,
        "adopted_attempts": adopted,
        # (seq, state, why it ended, whether its payload ever started: its log exists)
        "attempts": {j: [(a.seq, a.state.value, a.end_reason and a.end_reason.splitlines()[0],
                          (home / "logs" / f"{a.id}.log").exists()) for a in attempts[j]] for j in job_ids},
        "jobs": {j: (jobs[j].state.value, jobs[j].reason) for j in job_ids},
        "runtime_s": round(time.monotonic() - t0, 1),
    }
    print("chaos report:", json.dumps(report))

    def story(j: str) -> str:
        return "\n".join(f"  {e.id} {e.kind} {e.attempt_id or ''} {json.dumps(e.data)[:160]}" for e in events[j])

    # every job finished, and succeeded
    for j in job_ids:
        assert jobs[j].state.value == "succeeded", f"job {j} ended {jobs[j].state.value}:\n{story(j)}\n{report}"

    from infra.config import load_config
    from infra.storage import open_store

    ckpt = open_store(load_config(home).default_store)
    spend_by_attempt: dict[str, list[dict]] = defaultdict(list)
    for row in spend:
        spend_by_attempt[row["attempt_id"]].append(row)

    for j in job_ids:
        job, atts, evs = jobs[j], attempts[j], events[j]
        # attempts: seq 1..n, no gap, named after their ids, all finished, the last one succeeded
        assert [a.seq for a in atts] == list(range(1, len(atts) + 1)), story(j)
        assert job.attempts_count == len(atts)
        assert all(a.id == f"{j}.{a.seq}" for a in atts)
        assert all(a.state.value in TERMINAL_ATTEMPT for a in atts), story(j)
        assert atts[-1].state.value == "succeeded" and all(a.state.value != "succeeded" for a in atts[:-1]), story(j)

        created: dict[str, int] = {}
        ended: dict[str, int] = {}
        for a in atts:
            mine = [e for e in evs if e.attempt_id == a.id]
            c = [e for e in mine if e.kind == "attempt_created"]
            launched = [e for e in mine if e.kind == "launched"]
            terminal = [e for e in mine if e.data.get("to") in TERMINAL_ATTEMPT]
            assert len(c) == 1, f"{a.id}: {len(c)} attempt_created events\n{story(j)}"
            assert len(launched) <= 1, f"{a.id} launched {len(launched)} times\n{story(j)}"
            assert len(terminal) == 1, f"{a.id}: {len(terminal)} terminal events\n{story(j)}"
            assert terminal[0].data["to"] == a.state.value
            # after its end, only the reconciler speaks of it: a machine a killed daemon left behind
            # (an exited payload's Ray actor it never released) is found and destroyed
            after = [e.kind for e in mine if e.id > terminal[0].id]
            assert set(after) <= CLEANUP, f"{a.id}: events after its end\n{story(j)}"
            assert after.count("orphan_found") == after.count("orphan_destroyed"), story(j)
            if launched:
                assert c[0].id < launched[0].id < terminal[0].id
            created[a.id], ended[a.id] = c[0].id, terminal[0].id
        # never two live attempts of one job: each attempt ended before the next was created
        for prev, nxt in zip(atts, atts[1:], strict=False):
            assert ended[prev.id] < created[nxt.id], f"{prev.id} still live when {nxt.id} was created\n{story(j)}"

        # the job's own transitions form one chain queued -> ... -> succeeded, ending the story
        state = "queued"
        for e in evs:
            if e.kind == "attempt_created":  # create_attempt moves the job queued -> launching
                assert state == "queued", f"job {j}: {e.attempt_id} created while the job was {state}\n{story(j)}"
                state = "launching"
            elif e.attempt_id is None and "from" in e.data and "to" in e.data:
                assert e.data["from"] == state, (
                    f"job {j}: {e.kind} from {e.data['from']}, but it was {state}\n{story(j)}")
                state = e.data["to"]
        assert state == "succeeded"
        # (the reconciler may still speak afterwards: a machine a killed daemon left, found and destroyed)
        told = [e for e in evs if e.kind not in CLEANUP]
        assert [e.kind for e in told].count("succeeded") == 1 and told[-1].kind == "succeeded", story(j)

        # spend: exactly one ledger row per finished attempt (the price is > 0), the one its end recorded
        for a in atts:
            rows = spend_by_attempt.get(a.id, [])
            assert len(rows) == 1, f"{a.id}: {len(rows)} spend rows {rows}\n{story(j)}"
            term = next(e for e in evs if e.attempt_id == a.id and e.data.get("to") in TERMINAL_ATTEMPT)
            assert rows[0]["usd"] == pytest.approx(term.data.get("spend_usd")), (rows, term.data)
            assert rows[0]["job_id"] == j and rows[0]["usd"] > 0 and a.usd_per_hour == USD_PER_HOUR
        job_rows = [r for r in spend if r["job_id"] == j]
        assert len(job_rows) == len(atts)
        assert job.cost_usd == pytest.approx(sum(r["usd"] for r in job_rows), rel=1e-9, abs=1e-12)
        assert job.cost_usd > 0

        # the adapter is committed where the job says
        final_ref = ckpt.final(j)
        assert final_ref is not None, f"job {j}: no final adapter in the checkpoint store"
        assert job.adapter_uri == final_ref.uri
        assert final_ref.step == job.step == job.spec["max_steps"], (final_ref, job.step)

        # each attempt's payload was started at most once (its log is opened in append mode)
        for a in atts:
            starts = _tail(home / "logs" / f"{a.id}.log", 10**7).count(f"attempt {a.id}: device=")
            assert starts <= 1, f"{a.id}: payload started {starts} times"
        assert _tail(home / "logs" / f"{atts[-1].id}.log", 10**7).count(f"attempt {atts[-1].id}: device=") == 1

    assert not [r for r in spend if r["job_id"] not in job_ids or r["attempt_id"] is None], spend

    # every attempt's actor was released: a leaked one would hold a CPU of the cluster forever
    names = [a.id for j in job_ids for a in attempts[j]]
    leaked = _leaked_actors(ray_cluster, names)
    if leaked:  # Ray forgets a killed actor's name asynchronously: ask once more before failing
        time.sleep(5)
        leaked = _leaked_actors(ray_cluster, leaked)
    assert leaked == [], f"attempt actors never released: {leaked}"

    # the chaos did what it was meant to: kills landed while attempts were running (adopted after)
    assert lock_refused and len(kills) >= 3, report
    assert adopted, f"no kill caught a live attempt: nothing was adopted\n{report}"
