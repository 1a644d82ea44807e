"""Two server replicas on one Postgres store: one daemon leads, the other waits, and ``kill -9`` of
the leader hands the queue to the standby with no attempt launched twice.

Everything is real: an embedded Postgres (``benchmarks.postgres``), a ``ray start --head`` cluster
that the attempts run on (so they outlive the killed daemon, as a GPU machine outlives a crashed
server), two ``tunefleet server`` processes with their own TUNEFLEET_HOME (two machines that share
only the database and the checkpoint store), and the CLI as the users' client over HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from benchmarks.server_load import ServerProcess
from orchestrator.store import Store
from tests.ray_head import ray_head
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "qlora-tiny.yaml"
POLL_S = 0.5


def _tf(home: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "TUNEFLEET_HOME": str(home), "HF_HUB_OFFLINE": "1", **env})
    assert proc.returncode == 0, f"tunefleet {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def _daemon_child(server: ServerProcess) -> psutil.Process | None:
    kids = [p for p in psutil.Process(server.proc.pid).children() if "daemon" in " ".join(p.cmdline())]
    return kids[0] if kids else None


def test_kill_9_of_the_leading_replica_hands_the_queue_to_the_standby(tmp_path, postgres, model_cache):
    url = postgres.database()
    checkpoints = tmp_path / "shared-checkpoints"  # S3 in production; one folder both "machines" see here
    env = {"TUNEFLEET_DATABASE_URL": url, "TUNEFLEET_MODEL_CACHE": str(model_cache)}
    job = yaml.safe_load(EXAMPLE.read_text())
    job["max_steps"], job["save_steps"] = 60, 20
    job["datasets"][0]["path"] = str((EXAMPLE.parent / job["datasets"][0]["path"]).resolve())
    job["policy"]["max_usd"] = 50.0
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))

    with ray_head(num_cpus=2, num_gpus=0, prefix="tffail") as ray_address:
        homes = []
        for name in ("a", "b"):
            home = tmp_path / name
            home.mkdir()
            (home / "config.yaml").write_text(f"ray_address: {ray_address}\npoll_interval_s: {POLL_S}\n"
                                              f"default_store: {checkpoints.as_uri()}\n")
            homes.append(home)
        _tf(homes[0], env, "admin", "team", "create", "ml")
        _tf(homes[0], env, "admin", "user", "create", "ann", "--team", "ml", "--role", "admin")
        token = _tf(homes[0], env, "admin", "token", "create", "ann").stdout.strip()

        store = Store(url)
        a = b = None
        try:
            a = ServerProcess(homes[0], env=env, daemon=True)
            leader = wait_for(lambda: (store.daemon_leader() or {}).get("holder"), 60, "replica a's daemon to lead",
                           lambda: a.log_path.read_text(errors="replace")[-3000:])
            daemon_a = wait_for(lambda: _daemon_child(a), 10, "replica a's daemon process")
            assert leader.endswith(f":{daemon_a.pid}")
            b = ServerProcess(homes[1], env=env, daemon=True)
            wait_for(lambda: "standby: another daemon holds the lock" in b.log_path.read_text(errors="replace"), 60,
                  "replica b's daemon to wait as standby", lambda: b.log_path.read_text(errors="replace")[-3000:])
            daemon_b = _daemon_child(b)
            assert daemon_b is not None and daemon_b.is_running()

            # A user submits through replica b (the CLI as client); replica a's daemon places it.
            client = {"TUNEFLEET_SERVER": b.url, "TUNEFLEET_TOKEN": token}
            job_id = json.loads(_tf(tmp_path, client, "submit", str(job_file), "--json").stdout)["id"]
            wait_for(lambda: store.get_job(job_id).step > 0, 300, "the job to train on the cluster",
                  lambda: a.log_path.read_text(errors="replace")[-3000:])
            [attempt] = store.attempts_for(job_id)

            # The leading machine dies: its daemon and its server, SIGKILL, no clean-up.
            daemon_a.send_signal(signal.SIGKILL)
            killed_at = time.time()
            a.proc.send_signal(signal.SIGKILL)
            daemon_a.wait(10)
            a.proc.wait(10)

            took_over = wait_for(lambda: (store.daemon_leader() or {}).get("holder", "").endswith(f":{daemon_b.pid}"),
                              60, "replica b's daemon to take over",
                              lambda: b.log_path.read_text(errors="replace")[-3000:])
            assert took_over
            record = store.daemon_leader()
            print(f"standby took over {record['since'] - killed_at:+.2f} s after the kill "
                  f"(poll interval {POLL_S} s, try {record['tries']})")

            final = wait_for(lambda: store.get_job(job_id).terminal and store.get_job(job_id), 600,
                          "the job to finish under the new leader",
                          lambda: b.log_path.read_text(errors="replace")[-3000:])
            assert final.state.value == "succeeded", final.reason
            # The attempt that was running when the leader died was adopted, not launched again.
            attempts = store.attempts_for(job_id)
            assert [x.id for x in attempts] == [attempt.id], [(x.id, x.state, x.end_reason) for x in attempts]
            assert attempts[0].state.value == "succeeded"
            assert final.step == 60
            kinds = [e.kind for e in store.events(job_id)]
            assert kinds.count("attempt_created") == 1

            # Replica b keeps serving the API on the same store.
            r = httpx.get(f"{b.url}/api/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"}, timeout=10)
            assert r.status_code == 200 and r.json()["state"] == "succeeded"
            assert token not in b.log_path.read_text(errors="replace")
        finally:
            for server in (b, a):
                if server is not None:
                    server.stop()
            store.close()
