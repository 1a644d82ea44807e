"""The CLI's edges: bad input is a clear error, a non-zero exit, and changes nothing.

Runs the real ``tunefleet`` entry point in a subprocess against a real SQLite store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.daemon import DaemonLock, DaemonLocked

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "qlora-tiny.yaml"


def tf(home: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUNEFLEET_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"tunefleet {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def write_job(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def job_count(home: Path) -> int:
    return len(json.loads(tf(home, "status", "--json", check=True).stdout))


def test_submit_prints_id_and_status_reports_it(tmp_path):
    home = tmp_path / "home"
    out = json.loads(tf(home, "submit", str(EXAMPLE), "--json", check=True).stdout)
    job_id = out["id"]
    status = json.loads(tf(home, "status", job_id[:5], "--json", check=True).stdout)
    assert status["id"] == job_id
    assert status["state"] == "queued"
    assert status["step"] == 0 and status["attempts"] == 0 and status["cost_usd"] == 0
    for key in ("provider", "total_steps", "checkpoint"):
        assert key in status
    events = json.loads(tf(home, "events", job_id, "--json", check=True).stdout)
    assert [e["kind"] for e in events] == ["submitted"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("base_model: [unclosed\n", "job.yaml:2: invalid YAML"),
        ("base_model: tunefleet/tiny-llama\nlora_rr: 8\ndatasets: [{path: x.jsonl}]\n", "did you mean 'lora_r'"),
        ("base_model: tunefleet/tiny-llama\nlearning_rate: -1\ndatasets: [{path: d.jsonl}]\n", "learning_rate"),
        ("base_model: tunefleet/tiny-llama\nadapter: qlora\ndatasets: [{path: d.jsonl}]\n", "load_in_4bit"),
        ("base_model: tunefleet/tiny-llama\nadapter: lora\nlora_r: 0\nload_in_4bit: false\ndatasets: [{path: d.jsonl}]\n", "lora_r"),
        ("base_model: tunefleet/tiny-llama\ndatasets: [{path: missing.jsonl}]\n", "not found"),
        ("base_model: tunefleet/tiny-llama\ndatasets: [{path: d.jsonl}]\ncheckpoint: {store: 'ftp://x/y'}\n", "ftp"),
        ("base_model: tunefleet/tiny-llama\nmicro_batch_size: lots\ndatasets: [{path: d.jsonl}]\n", "micro_batch_size"),
    ],
    ids=["malformed-yaml", "unknown-key", "negative-lr", "qlora-no-4bit", "lora-r-0", "missing-dataset",
         "unknown-scheme", "wrong-type"],
)
def test_bad_job_files_are_refused_and_queue_nothing(tmp_path, text, expected):
    home = tmp_path / "home"
    (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n')
    tf(home, "submit", str(EXAMPLE), check=True)  # the queue already holds one job
    before = tf(home, "status", "--json", check=True).stdout
    path = write_job(tmp_path, text)
    for command in ("validate", "submit"):
        proc = tf(home, command, str(path))
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr
        assert "Traceback" not in proc.stderr
    assert "nothing was queued" in proc.stderr
    assert tf(home, "status", "--json", check=True).stdout == before


def test_every_problem_is_reported_at_once(tmp_path):
    home = tmp_path / "home"
    path = write_job(
        tmp_path,
        "base_model: tunefleet/tiny-llama\nadapter: qlora\nlora_rr: 4\nlearning_rate: -2\n"
        "datasets: [{path: nope.jsonl}]\npolicy: {spot: sometimes}\n",
    )
    proc = tf(home, "validate", str(path))
    assert proc.returncode == 2
    for needle in ("load_in_4bit", "lora_rr", "learning_rate", "nope.jsonl", "policy.spot"):
        assert needle in proc.stderr, needle
    assert "5 problems" in proc.stderr


def test_unknown_job_and_impossible_requests_are_clear_errors(tmp_path):
    home = tmp_path / "home"
    job_id = json.loads(tf(home, "submit", str(EXAMPLE), "--json", check=True).stdout)["id"]
    missing = tf(home, "status", "jzzzzzzz")
    assert missing.returncode == 1 and "jzzzzzzz" in missing.stderr and "Traceback" not in missing.stderr
    preempt = tf(home, "preempt", job_id)
    assert preempt.returncode == 1 and "no running attempt" in preempt.stderr
    # cancelling a queued job finishes it at once; cancelling again is refused
    assert json.loads(tf(home, "cancel", job_id, "--json", check=True).stdout)["state"] == "cancelled"
    again = tf(home, "cancel", job_id)
    assert again.returncode == 1 and "already cancelled" in again.stderr


def test_bad_config_is_a_clear_error(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text("ray_adress: 127.0.0.1:6379\n")
    proc = tf(home, "status")
    assert proc.returncode == 2
    assert "ray_adress" in proc.stderr and "ray_address" in proc.stderr


def test_second_daemon_on_the_same_home_is_refused(tmp_path):
    first = DaemonLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(DaemonLocked, match="already running"):
            DaemonLock(tmp_path).acquire()
        proc = tf(tmp_path, "daemon", "--until-idle")
        assert proc.returncode == 1
        assert "already running" in proc.stderr and str(os.getpid()) in proc.stderr
    finally:
        first.release()
    second = DaemonLock(tmp_path)
    second.acquire()  # free again once the first holder let go
    second.release()


def test_cli_start_does_not_import_heavy_libraries():
    code = (
        "import sys, orchestrator.cli, orchestrator.queue, jobs.spec, orchestrator.store;"
        "heavy = [m for m in ('torch', 'ray', 'sky', 'transformers', 'peft', 'trl') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
