"""The CLI as a client of ``tunefleet server`` (issue 12): the same commands, output, ``--json`` and
exit codes through the API as on the server's own store.

One real server (``tests.test_server.Server``) on a fresh home; the embedded CLI runs with
``TUNEFLEET_HOME`` = that home (it sees every job), the client CLI with ``TUNEFLEET_SERVER`` and an
admin's token (who sees every job too) on a home of its own, so each answer can be compared byte
for byte.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.states import AttemptState
from orchestrator.store import Store
from tests.test_server import DATA, JOB, Server, body



def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("TUNEFLEET_SERVER", "TUNEFLEET_TOKEN")}
    full.update({"HF_HUB_OFFLINE": "1", "COLUMNS": "200", **env})
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=full, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    home = tmp_path_factory.mktemp("server-home")
    client_home = tmp_path_factory.mktemp("client-home")
    tokens = {}
    with Store(home / "state.db") as store:
        store.create_team("ml")
        for name, role in (("alice", "member"), ("ann", "admin")):
            store.create_user(name, "ml", role)
            tokens[name] = store.create_token(name)[1]
    server = Server(home, "--rate", "0")
    try:
        jobs = []
        for _ in range(3):
            r = server.client(tokens["alice"]).post("/jobs", json=body())
            assert r.status_code == 201, r.text
            jobs.append(r.json()["id"])
        embedded = {"TUNEFLEET_HOME": str(home)}
        client = {"TUNEFLEET_HOME": str(client_home), "TUNEFLEET_SERVER": server.url,
                  "TUNEFLEET_TOKEN": tokens["ann"]}
        yield {"server": server, "tokens": tokens, "jobs": jobs, "home": home, "embedded": embedded,
               "client": client, "client_home": client_home}
    finally:
        server.stop()


def both(w, *args: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    return run(w["embedded"], *args), run(w["client"], *args)


@pytest.mark.parametrize("args", [("status", "--json"), ("status", "J", "--json"), ("status", "P", "--json"),
                                  ("events", "J", "--json"), ("spend", "--json"), ("spend", "--by", "day", "--json"),
                                  ("status",), ("status", "J"), ("spend",), ("logs", "J"), ("status", "nope"),
                                  ("spend", "--by", "week")])
def test_same_output_both_ways(world, args):
    job = world["jobs"][0]
    args = tuple(job if a == "J" else job[:8] if a == "P" else a for a in args)
    local, remote = both(world, *args)
    assert (remote.returncode, remote.stdout, remote.stderr) == (local.returncode, local.stdout, local.stderr), args


def test_cancel_preempt_resume_refuse_alike(world):
    job = world["jobs"][1]
    for args in (("preempt", job), ("preempt", job, "--json"), ("resume", job), ("resume", job, "--max-usd", "-1")):
        local, remote = both(world, *args)
        assert local.returncode != 0
        assert (remote.returncode, remote.stderr) == (local.returncode, local.stderr), args
    out = run(world["client"], "cancel", job, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"id": job, "state": "cancelled", "cancel_requested": False} or \
        json.loads(out.stdout)["state"] == "cancelled"
    local, remote = both(world, "cancel", job)  # cancelled already: refused the same way
    assert local.returncode == remote.returncode == 1
    assert remote.stderr == local.stderr


def test_submit_with_relative_and_absolute_dataset_paths(world, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "abs.jsonl").write_bytes(DATA)
    (tmp_path / "jobs" / "data").mkdir(parents=True)
    (tmp_path / "jobs" / "data" / "train.jsonl").write_bytes(DATA)
    job_file = tmp_path / "jobs" / "job.yaml"
    job_file.write_text(JOB + f"eval_datasets:\n  - path: {elsewhere / 'abs.jsonl'}\n    type: alpaca\n"
                              f"  - path: ../elsewhere/abs.jsonl  # the same file, named another way\n"
                              f"    type: alpaca\n")
    assert run(world["embedded"], "validate", str(job_file)).returncode == 0
    out = run(world["client"], "submit", str(job_file), "--json")
    assert out.returncode == 0, out.stderr
    job_id = json.loads(out.stdout)["id"]
    local, remote = both(world, "status", job_id, "--json")
    assert remote.stdout == local.stdout and json.loads(remote.stdout)["state"] == "queued"
    plain = run(world["client"], "submit", str(job_file))
    assert plain.returncode == 0 and plain.stdout.strip().startswith("j"), plain.stderr


def test_submission_rewrites_paths_the_server_cannot_take(tmp_path):
    from jobs.spec import load_job_file
    from orchestrator.client import submission

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_bytes(DATA)
    (tmp_path / "sub").mkdir()
    job_file = tmp_path / "sub" / "job.yaml"
    text = JOB.replace("data/train.jsonl", "../data/train.jsonl") + \
        f"eval_datasets:\n  - {{path: '{tmp_path / 'data' / 'train.jsonl'}', type: alpaca}}\n"
    job_file.write_text(text)
    sent, files = submission(job_file, load_job_file(job_file))
    assert len(sent.splitlines()) == len(text.splitlines())
    assert "../" not in sent and str(tmp_path) not in sent
    assert set(files) == {"_inputs/0/train.jsonl", "_inputs/1/train.jsonl"}
    assert "path: _inputs/0/train.jsonl" in sent and "{path: '_inputs/1/train.jsonl', type: alpaca}" in sent


def test_bad_job_file_exits_2_with_validates_lines(world, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: tunefleet/tiny-llama\nadapter: nope\nmax_steps: -3\ndatasets:\n  - path: missing.jsonl\n")
    v = run(world["client"], "validate", str(bad))
    s = run(world["client"], "submit", str(bad))
    assert v.returncode == s.returncode == 2
    assert s.stderr == v.stderr and "missing.jsonl" in s.stderr


def test_revoked_token_says_login_and_never_shows_the_token(world):
    with Store(world["home"] / "state.db") as store:
        row, token = store.create_token("alice")
        store.revoke_token(row.id)
    env = {**world["client"], "TUNEFLEET_TOKEN": token}
    for args in (("status",), ("status", "--json"), ("cancel", world["jobs"][2])):
        out = run(env, *args)
        assert out.returncode == 2, out
        assert "tunefleet login" in out.stderr
        assert token not in out.stderr + out.stdout


def test_unreachable_server_exits_1(world):
    out = run({**world["client"], "TUNEFLEET_SERVER": "http://127.0.0.1:9"}, "status")
    assert out.returncode == 1 and "server unreachable at http://127.0.0.1:9" in out.stderr
    assert world["tokens"]["ann"] not in out.stderr


def test_member_acts_only_on_own_jobs_and_gets_exit_1(world):
    env = {**world["client"], "TUNEFLEET_TOKEN": world["tokens"]["alice"]}
    out = run(env, "status", "--json")
    assert out.returncode == 0
    assert set(world["jobs"]) <= {j["id"] for j in json.loads(out.stdout)}


def test_login_writes_0600_file_and_logout_removes_it(world, tmp_path):
    home = tmp_path / "h"
    env = {"TUNEFLEET_HOME": str(home)}
    bad = run(env, "login", world["server"].url, "--token", "tf_not_a_token")
    assert bad.returncode == 2 and "tf_not_a_token" not in bad.stderr
    assert not (home / "credentials.json").exists()
    out = run(env, "login", world["server"].url, "--token", world["tokens"]["ann"])
    assert out.returncode == 0, out.stderr
    assert "as ann" in out.stdout
    creds = home / "credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert json.loads(creds.read_text()) == {"url": world["server"].url, "token": world["tokens"]["ann"]}
    listed = run(env, "status", "--json")  # the stored login, no env
    assert listed.returncode == 0 and world["jobs"][0] in {j["id"] for j in json.loads(listed.stdout)}
    page = run(env, "report", "--out", str(tmp_path / "r.html"))  # through the server, with the stored login
    assert page.returncode == 0 and world["jobs"][0] in (tmp_path / "r.html").read_text()
    assert run(env, "logout").returncode == 0
    assert not creds.exists()
    after = run(env, "status", "--json")  # this machine's (empty) store again
    assert after.returncode == 0 and json.loads(after.stdout) == []


def test_login_file_is_never_world_readable(tmp_path, monkeypatch):
    from orchestrator import client

    monkeypatch.setenv("TUNEFLEET_HOME", str(tmp_path))
    old = os.umask(0)
    try:
        path = client.save_login("http://x", "tf_secret")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert client.stored_login() == {"url": "http://x", "token": "tf_secret"}
    assert not list(Path(tmp_path).glob(".credentials*"))


def test_logs_read_the_servers_stream_like_the_local_file(world, tmp_path):
    r = world["server"].client(world["tokens"]["alice"]).post("/jobs", json=body())
    job_id = r.json()["id"]
    log = tmp_path / "attempt.log"
    log.write_text("step 1 loss 2.5\nstep 2 loss 2.1\nünïcode [bold]not markup[/]\n")
    with Store(world["home"] / "state.db") as store:
        att = store.create_attempt(job_id, provider="local", offer_id="o", usd_per_hour=0.0, start_step=0)
        store.transition_attempt(att.id, AttemptState.RUNNING, kind="attempt_running", message="running",
                                 log_path=str(log))
    for args in (("logs", job_id), ("logs", job_id[:7], "--attempt", "1"), ("logs", job_id, "--attempt", "2")):
        local, remote = both(world, *args)
        assert (remote.returncode, remote.stdout, remote.stderr) == (local.returncode, local.stdout, local.stderr)
        assert "step 2 loss 2.1" in remote.stdout or remote.returncode == 1
    out = run(world["client"], "preempt", job_id, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"id": job_id, "attempt_id": att.id, "mode": "soft", "seq": 1}


def test_large_upload_goes_through_the_progress_path(world, tmp_path):
    data = tmp_path / "big.jsonl"
    data.write_bytes(DATA * (1 + (9 << 20) // len(DATA)))
    job_file = tmp_path / "job.yaml"
    job_file.write_text(JOB.replace("data/train.jsonl", "big.jsonl"))
    out = run(world["client"], "submit", str(job_file))
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    local, remote = both(world, "status", job_id, "--json")
    assert remote.returncode == 0 and remote.stdout == local.stdout


def test_rate_limited_once_waits_retry_after_then_goes_on(tmp_path):
    with Store(tmp_path / "state.db") as store:
        store.create_team("ml")
        store.create_user("ann", "ml", "admin")
        token = store.create_token("ann")[1]
    server = Server(tmp_path, "--rate", "0.5", "--burst", "1")
    try:
        env = {"TUNEFLEET_HOME": str(tmp_path / "client"), "TUNEFLEET_SERVER": server.url, "TUNEFLEET_TOKEN": token}
        job = server.client(token).post("/jobs", json=body())
        assert job.status_code == 201, job.text
        out = run(env, "status", job.json()["id"], "--json")  # two requests: the id's resolution, then the job
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["id"] == job.json()["id"]
        assert " 429 " in server.log_path.read_text()  # it was limited, waited, and went on
    finally:
        server.stop()


def test_follow_and_watch_end_with_the_job(world, tmp_path):
    from orchestrator.states import JobState

    job_id = world["server"].client(world["tokens"]["alice"]).post("/jobs", json=body()).json()["id"]
    log = tmp_path / "attempt.log"
    log.write_text("step 1 loss 2.5\nthe end\n")
    with Store(world["home"] / "state.db") as store:
        att = store.create_attempt(job_id, provider="local", offer_id="o", usd_per_hour=0.0, start_step=0)
        store.transition_attempt(att.id, AttemptState.FAILED, kind="attempt_failed", message="boom",
                                 log_path=str(log))
        store.transition_job(job_id, JobState.FAILED, kind="failed", message="boom", reason="boom")
    local, remote = both(world, "logs", job_id, "--follow")
    assert (remote.returncode, remote.stdout) == (local.returncode, local.stdout) and "the end" in remote.stdout
    watched = run(world["client"], "status", job_id, "--watch")
    assert watched.returncode == 0, watched.stderr
    assert "reason:     boom" in watched.stdout


def test_the_client_never_shows_its_token_in_a_repr():
    from orchestrator.client import Client

    assert "tf_secret" not in repr(Client("http://127.0.0.1:1", "tf_secret"))


def test_report_through_the_server_is_the_server_machines_for_an_admin_and_a_members_own_teams(world, tmp_path):
    import re

    def page(env: dict[str, str], name: str) -> str:
        out = run(env, "report", "--out", str(tmp_path / name))
        assert out.returncode == 0, out.stderr
        return (tmp_path / name).read_text()

    def facts(html: str) -> tuple:
        """What does not move with the second it was drawn (charts are drawn in hours before now)."""
        return (re.search(r"Jobs: \d+; spend this month \$[\d.]+", html).group(0), re.findall(r"<h3>.*?</h3>", html),
                re.search(r"<table>.*?</table>", html).group(0))

    assert facts(page(world["client"], "admin.html")) == facts(page(world["embedded"], "local.html"))
    with Store(world["home"] / "state.db") as store:
        store.create_team("nlp2")
        store.create_user("bea", "nlp2", "member")
        bea = store.create_token("bea")[1]
    other = page({**world["client"], "TUNEFLEET_TOKEN": bea}, "other.html")
    assert "Jobs: 0;" in other and not any(j in other for j in world["jobs"])
