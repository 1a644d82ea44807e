"""The spine end to end, with real parts: the CLI, the daemon, an embedded Ray instance, the real
training payload (4-bit QLoRA on the tiny Llama) and the local checkpoint store.

Two identical jobs run side by side; one is interrupted with SIGTERM (grace), the other with
SIGKILL. Both must be resumed by the daemon from their newest committed checkpoint and finish, and
because the runs are deterministic their final adapters must be bitwise equal to each other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_cli import EXAMPLE, tf

pytestmark = pytest.mark.slow

MAX_STEPS = 300  # long enough that a preempt requested at step 50 lands before the end on a busy machine
SAVE_STEPS = 25


def _job_file(tmp_path: Path) -> Path:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["max_steps"] = MAX_STEPS
    doc["save_steps"] = SAVE_STEPS
    doc["datasets"][0]["path"] = str((EXAMPLE.parent / doc["datasets"][0]["path"]).resolve())
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _is_subsequence(needles: list[str], haystack: list[str]) -> bool:
    it = iter(haystack)
    return all(any(n == h for h in it) for n in needles)


def test_submit_daemon_preempt_resume_succeed(tmp_path, model_cache):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text("poll_interval_s: 0.5\nray_num_cpus: 2\n")
    job_file = _job_file(tmp_path)
    soft = json.loads(tf(home, "submit", str(job_file), "--json", check=True).stdout)["id"]
    hard = json.loads(tf(home, "submit", str(job_file), "--json", check=True).stdout)["id"]

    env = {**os.environ, "TUNEFLEET_HOME": str(home), "HF_HUB_OFFLINE": "1", "TUNEFLEET_MODEL_CACHE": str(model_cache)}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "daemon", "--until-idle", "--max-seconds", "600"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    preempted: dict[str, int] = {}
    deadline = time.monotonic() + 600
    try:
        while daemon.poll() is None:
            assert time.monotonic() < deadline, "daemon did not finish in time"
            for job_id, mode in ((soft, []), (hard, ["--hard"])):
                if job_id in preempted:
                    continue
                s = json.loads(tf(home, "status", job_id, "--json", check=True).stdout)
                if s["state"] == "running" and s["step"] >= 2 * SAVE_STEPS:
                    tf(home, "preempt", job_id, *mode, check=True)
                    preempted[job_id] = s["step"]
            time.sleep(0.5)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        out = daemon.stdout.read()
    assert daemon.returncode == 0, out
    assert set(preempted) == {soft, hard}, f"jobs finished before they could be preempted: {out}"

    final_adapters = {}
    for job_id in (soft, hard):
        s = json.loads(tf(home, "status", job_id, "--json", check=True).stdout)
        assert s["state"] == "succeeded", s
        assert s["attempts"] == 2
        assert s["step"] == MAX_STEPS
        adapter_dir = Path(s["adapter_uri"].removeprefix("file://"))
        assert (adapter_dir / "MANIFEST.json").is_file()
        final_adapters[job_id] = adapter_dir / "adapter_model.safetensors"

        events = json.loads(tf(home, "events", job_id, "--json", check=True).stdout)
        kinds = [e["kind"] for e in events]
        assert _is_subsequence(
            ["submitted", "attempt_created", "launched", "attempt_running", "running", "preempt_requested",
             "preempt_delivered", "attempt_preempted", "preempted", "requeued", "attempt_created",
             "launched", "attempt_running", "running", "attempt_succeeded", "succeeded"],
            kinds,
        ), kinds
        assert kinds.count("attempt_created") == 2  # never launched twice

    soft_attempts = _attempts(home, soft)
    hard_attempts = _attempts(home, hard)
    # SIGTERM: the payload saved where it stopped, so the resume point is the step reached.
    assert soft_attempts[0]["exit_code"] == 75
    assert soft_attempts[1]["start_step"] == soft_attempts[0]["end_step"] >= preempted[soft]
    # SIGKILL: resume from the newest committed checkpoint: at most one interval lost.
    assert hard_attempts[0]["exit_code"] == -9
    lost = hard_attempts[0]["end_step"] - hard_attempts[1]["start_step"]
    assert 0 <= lost <= SAVE_STEPS
    assert hard_attempts[1]["start_step"] % SAVE_STEPS == 0 and hard_attempts[1]["start_step"] > 0

    from safetensors.torch import load_file

    a, b = (load_file(str(p)) for p in final_adapters.values())
    assert a.keys() == b.keys() and a
    assert all((a[k] == b[k]).all() for k in a), "interrupted runs diverged"

    logs = tf(home, "logs", soft, check=True).stdout
    assert "attempt 1" in logs and "attempt 2" in logs
    assert f"resume from step {soft_attempts[1]['start_step']}" in logs

    from orchestrator.store import Store

    with Store(home / "state.db") as store:  # measured throughput now calibrates later estimates
        assert store.calibration("tunefleet/tiny-llama", "qlora")["cpu"] > 0

    records = [json.loads(line) for line in (home / "logs" / "daemon.log").read_text().splitlines()]
    launched = [r for r in records if r.get("event") == "attempt launched"]
    assert {r["job_id"] for r in launched} == {soft, hard}
    assert all("attempt_id" in r for r in launched)


def _attempts(home: Path, job_id: str) -> list[dict]:
    from orchestrator.store import Store

    with Store(home / "state.db") as store:
        return [
            {"exit_code": a.exit_code, "start_step": a.start_step, "end_step": a.end_step, "state": a.state.value}
            for a in store.attempts_for(job_id)
        ]


def test_cancel_stops_a_running_attempt(tmp_path, model_cache):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text("poll_interval_s: 0.5\nstop_grace_s: 30\n")
    doc = yaml.safe_load(_job_file(tmp_path).read_text())
    doc["max_steps"] = 5000  # far longer than the test waits
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(doc))
    job_id = json.loads(tf(home, "submit", str(tmp_path / "long.yaml"), "--json", check=True).stdout)["id"]
    env = {**os.environ, "TUNEFLEET_HOME": str(home), "TUNEFLEET_MODEL_CACHE": str(model_cache)}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "daemon", "--until-idle", "--max-seconds", "300"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while json.loads(tf(home, "status", job_id, "--json", check=True).stdout)["step"] < 5:
            assert time.monotonic() < deadline and daemon.poll() is None
            time.sleep(0.5)
        assert "cancel requested" in tf(home, "cancel", job_id, check=True).stdout
        assert daemon.wait(timeout=120) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    status = json.loads(tf(home, "status", job_id, "--json", check=True).stdout)
    assert status["state"] == "cancelled"
    assert _attempts(home, job_id)[0]["state"] == "cancelled"
    kinds = [e["kind"] for e in json.loads(tf(home, "events", job_id, "--json", check=True).stdout)]
    assert _is_subsequence(["running", "cancel_requested", "attempt_cancelled", "cancelled"], kinds), kinds
