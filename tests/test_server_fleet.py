"""The read API beyond jobs, over real HTTP: providers, estimate, offers and sweeps answer with what
the CLI prints with ``--json`` for the same input, behind the same tokens and the same 422s; and the
server load benchmark's smoke mode runs clean.

alice and carol are in team "ml", bob in "nlp", ann is an admin. One sweep's trial jobs are alice's
(her team sees it, bob gets 404); another was queued on the server machine without an account (an
admin's only).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from orchestrator.store import Store
from tests.test_cli import tf
from tests.test_cli_client import run
from tests.test_server import DATA, JOB, JSON_VALUES, REPO, Server, body, make_accounts

SWEEP = REPO / "examples" / "sweep-tiny.yaml"


def _sweep(home: Path) -> str:
    """A sweep started on the server machine itself, without an account (an admin's)."""
    return json.loads(tf(home, "sweep", str(SWEEP), "--json", check=True).stdout)["id"]


def as_client(server, token: str, home: Path, *args: str):
    """The CLI as the server's client, with ``token``, on a home of its own."""
    return run({"TUNEFLEET_HOME": str(home), "TUNEFLEET_SERVER": server.url, "TUNEFLEET_TOKEN": token}, *args)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    home = tmp_path_factory.mktemp("fleet-home")
    tokens = make_accounts(home)
    job_dir = tmp_path_factory.mktemp("fleet-job")
    (job_dir / "data").mkdir()
    (job_dir / "data" / "train.jsonl").write_bytes(DATA)
    (job_dir / "job.yaml").write_text(JOB)
    server = Server(home, "--rate", "0")
    try:
        started = as_client(server, tokens["alice"], tmp_path_factory.mktemp("alice"), "sweep", str(SWEEP), "--json")
        assert started.returncode == 0, started.stderr
        sweeps = {"alice": json.loads(started.stdout)["id"], "nobody": _sweep(home)}
        yield {"server": server, "tokens": tokens, "home": home, "sweeps": sweeps, "job": job_dir / "job.yaml"}
    finally:
        server.stop()


def cli_json(home: Path, *args: str):
    return json.loads(tf(home, *args, "--json", check=True).stdout)


def timeless(obj):
    """``obj`` without what depends on the moment it was computed (an offer's finish time)."""
    if isinstance(obj, dict):
        return {k: timeless(v) for k, v in obj.items() if k != "finish_at"}
    if isinstance(obj, list):
        return [timeless(v) for v in obj]
    return obj


def test_providers_is_the_clis(fleet):
    s, t = fleet["server"], fleet["tokens"]
    r = s.client(t["bob"]).get("/providers")
    assert r.status_code == 200, r.text
    assert r.json() == cli_json(fleet["home"], "providers")
    assert {row["provider"] for row in r.json()} >= {"local"}


def test_estimate_is_the_clis(fleet):
    s, t = fleet["server"], fleet["tokens"]
    r = s.client(t["alice"]).post("/estimate", json=body())
    assert r.status_code == 200, r.text
    assert r.json() == cli_json(fleet["home"], "estimate", str(fleet["job"]))
    assert r.json()["estimate"]["examples"] > 0


@pytest.mark.parametrize("show_all", [False, True], ids=["default", "all"])
def test_offers_is_the_clis(fleet, show_all):
    s, t = fleet["server"], fleet["tokens"]
    r = s.client(t["carol"]).post("/offers", json=body(), params={"all": show_all} if show_all else None)
    assert r.status_code == 200, r.text
    cli = cli_json(fleet["home"], "offers", str(fleet["job"]), *(["--all"] if show_all else []))
    assert timeless(r.json()) == timeless(cli)
    assert r.json()["decision"]["verdict"] == cli["decision"]["verdict"]
    if show_all:
        assert len(r.json()["offers"]) >= len(s.client(t["carol"]).post("/offers", json=body()).json()["offers"])


def test_estimate_and_offers_queue_nothing_and_keep_no_upload(fleet):
    s, t = fleet["server"], fleet["tokens"]
    before = len(s.client(t["ann"]).get("/jobs", params={"limit": 100000}).json())
    for path in ("/estimate", "/offers"):
        assert s.client(t["alice"]).post(path, json=body()).status_code == 200
    assert len(s.client(t["ann"]).get("/jobs", params={"limit": 100000}).json()) == before


def test_sweep_status_is_the_clis_for_those_who_may_see_it(fleet):
    s, t, sweeps, home = fleet["server"], fleet["tokens"], fleet["sweeps"], fleet["home"]
    mine = sweeps["alice"]
    cli = cli_json(home, "sweep", "status", mine)
    for who in ("alice", "carol", "ann"):  # hers, her teammate's, an admin
        r = s.client(t[who]).get(f"/sweeps/{mine}")
        assert r.status_code == 200, (who, r.text)
        assert r.json() == cli
    assert len(cli["trials"]) == 4 and cli["id"] == mine


def test_a_sweep_started_through_the_server_is_its_starters(fleet):
    s, t, sweeps, home = fleet["server"], fleet["tokens"], fleet["sweeps"], fleet["home"]
    mine = sweeps["alice"]
    with Store(home / "state.db") as store:
        assert store.get_sweep(mine)["owner"] == "alice"
        trials = store.trials(mine)
        assert len(trials) == 4 and {store.get_job(x["job_id"]).owner for x in trials} == {"alice"}
        # its inputs were uploaded and staged: the trial jobs name nothing on the client's disk
        spec = store.get_job(trials[0]["job_id"]).spec
        assert all(not d["path"].startswith(str(REPO)) for d in spec["datasets"])
    seen = {who: {x["id"] for x in s.client(t[who]).get("/sweeps").json()} for who in ("alice", "carol", "bob", "ann")}
    assert seen["alice"] == seen["carol"] == {mine}  # her team's; the machine's own sweep is an admin's
    assert seen["bob"] == set() and seen["ann"] == {mine, sweeps["nobody"]}


def test_sweep_status_through_the_cli_client_is_byte_identical(fleet, tmp_path):
    s, t, sweeps, home = fleet["server"], fleet["tokens"], fleet["sweeps"], fleet["home"]
    for args in (("sweep", "status", sweeps["alice"][:4], "--json"), ("sweep", "status", sweeps["alice"]),
                 ("sweep", "status", "sdeadbee")):
        local = run({"TUNEFLEET_HOME": str(home)}, *args)
        remote = as_client(s, t["ann"], tmp_path, *args)
        assert (remote.returncode, remote.stdout, remote.stderr) == (local.returncode, local.stdout, local.stderr), args
    other = as_client(s, t["bob"], tmp_path, "sweep", "status", sweeps["alice"])
    assert other.returncode == 1 and f"no sweep {sweeps['alice']!r}" in other.stderr


def test_bad_sweeps_get_422_and_queue_nothing(fleet, tmp_path):
    s, t, home = fleet["server"], fleet["tokens"], fleet["home"]
    sweep_text = SWEEP.read_text().replace("base: qlora-tiny.yaml", "base: base.yaml")
    good_files = {"data/train.jsonl": body()["files"]["data/train.jsonl"]}
    cases = [
        ({"yaml": SWEEP.read_text(), "base": JOB, "files": good_files}, "base"),  # base: not the uploaded one
        ({"yaml": sweep_text, "base": JOB.replace("max_steps: 10", "max_step: 10"), "files": good_files},
         "base.max_step"),
        ({"yaml": sweep_text, "base": JOB, "files": {}}, "base.datasets"),  # the dataset was not uploaded
        ({"yaml": sweep_text.replace("learning_rate:", "learning_rat:"), "base": JOB, "files": good_files},
         "learning_rat"),
        ({"yaml": sweep_text, "base": JOB, "files": {**good_files, "base.yaml": "eA=="}}, "files.base.yaml"),
    ]
    with Store(home / "state.db") as store:
        before = (len(store.list_sweeps()), len(store.list_jobs()))
        for payload, where in cases:
            r = s.client(t["alice"]).post("/sweeps", json=payload)
            assert r.status_code == 422, (where, r.text)
            assert where in r.text and "tunefleet-sweep-" not in r.text, (where, r.text)
        assert (len(store.list_sweeps()), len(store.list_jobs())) == before
    # the CLI says it before sending anything, with the local file's own messages
    bad = tmp_path / "sweep.yaml"
    bad.write_text(SWEEP.read_text().replace("base: qlora-tiny.yaml", f"base: {SWEEP.parent / 'qlora-tiny.yaml'}")
                   .replace("budget_usd: 1.0", "budget_usd: -1"))
    out = as_client(s, t["alice"], tmp_path, "sweep", str(bad))
    assert out.returncode == 2 and "budget_usd" in out.stderr and "nothing was queued" in out.stderr


def test_another_teams_sweep_is_404_like_one_that_does_not_exist(fleet):
    s, t, sweeps = fleet["server"], fleet["tokens"], fleet["sweeps"]
    gone = s.client(t["bob"]).get("/sweeps/sdeadbee")
    theirs = s.client(t["bob"]).get(f"/sweeps/{sweeps['alice']}")
    assert gone.status_code == theirs.status_code == 404
    assert theirs.json()["detail"] == f"no sweep {sweeps['alice']!r}"
    # a sweep queued without an account is an admin's; a prefix names no sweep and leaks no candidates
    assert s.client(t["alice"]).get(f"/sweeps/{sweeps['nobody']}").status_code == 404
    assert s.client(t["ann"]).get(f"/sweeps/{sweeps['nobody']}").status_code == 200
    prefix = s.client(t["bob"]).get("/sweeps/s")
    assert prefix.status_code == 404 and sweeps["alice"] not in prefix.text and sweeps["nobody"] not in prefix.text


@pytest.mark.parametrize("method, path", [("GET", "/providers"), ("POST", "/estimate"), ("POST", "/offers"),
                                          ("GET", "/sweeps/{sweep}")])
def test_401_without_a_valid_token(fleet, method, path):
    s = fleet["server"]
    for token in (None, "tf_" + "A" * 43):
        r = s.client(token).request(method, path.format(sweep=fleet["sweeps"]["alice"]),
                                    json=body() if method == "POST" else None)
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("path", ["/estimate", "/offers"])
def test_bad_job_file_gets_validates_messages(fleet, tmp_path, path):
    s, t = fleet["server"], fleet["tokens"]
    bad = JOB.replace("max_steps: 10", "max_steps: -3\npolicy:\n  spot: sometimes")
    r = s.client(t["alice"]).post(path, json=body(bad))
    assert r.status_code == 422
    assert r.json() == s.client(t["alice"]).post("/jobs", json=body(bad)).json()  # the same 422 as a submit
    got = {(p["loc"], p["line"]): p["message"] for p in r.json()["detail"]}
    assert {loc for loc, _ in got} == {"max_steps", "policy.spot"}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_bytes(DATA)
    (tmp_path / "job.yaml").write_text(bad)
    cli = tf(fleet["home"], "validate", str(tmp_path / "job.yaml")).stderr
    for (loc, line), message in got.items():
        assert f"job.yaml:{line}: {loc}: {message}" in cli, cli
    # and what a submit refuses for the server's own files, these refuse too
    server_file = JOB.replace("data/train.jsonl", str(REPO / "examples" / "data" / "alpaca-tiny.jsonl"))
    r = s.client(t["alice"]).post(path, json=body(server_file, files={}))
    assert r.status_code == 422 and "not among the uploaded files" in r.text


def test_openapi_lists_the_fleet_routes(fleet):
    import httpx

    paths = httpx.get(fleet["server"].url + "/openapi.json").json()["paths"]
    assert {"/api/v1/providers", "/api/v1/estimate", "/api/v1/offers", "/api/v1/sweeps/{sweep_id}"} <= set(paths)


def test_server_load_benchmark_smoke():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.server_load", "--seconds", "3", "--warmup", "1", "--clients", "10",
                           "--json"], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert set(r["backends"]) == {"sqlite", "postgres"}
    for backend, served in r["backends"].items():
        assert served["errors"] == 0, (backend, served["error_kinds"])
        assert served["answered"] > 0 and served["throughput_rps"] > 0
        assert set(served["kinds"]) == {"status", "list", "submit"}
        for k in ("n", "p50_ms", "p99_ms"):
            assert k in served["kinds"]["status"]
        assert served["kinds"]["status"]["n"] > 0
        assert r["direct"][backend]["errors"] == 0 and r["direct"][backend]["status"]["n"] > 0
        assert set(r["ratio_server_over_direct"][backend]) == {"status_p50", "throughput"}
        met = r["targets_met"][backend]
        assert set(met) == {"errors", "status_p99"} and met["errors"] is True


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=JSON_VALUES)
def test_fuzzed_sweep_bodies_never_500_and_never_half_queue(fleet, payload):
    """Also with a valid base job and its files: only the sweep text is fuzzed there."""
    s, t, home = fleet["server"], fleet["tokens"], fleet["home"]
    files = {"data/train.jsonl": body()["files"]["data/train.jsonl"]}
    doc = payload if isinstance(payload, dict) else {"search": payload}
    sweep_text = json.dumps({**doc, "base": "base.yaml"})
    with Store(home / "state.db") as store:
        for data in (payload, {"yaml": payload, "base": JOB}, {"yaml": sweep_text, "base": JOB, "files": files}):
            before = (len(store.list_sweeps()), len(store.list_jobs()))
            r = s.client(t["alice"]).post("/sweeps", json=data)
            assert r.status_code in (201, 422), (r.status_code, r.text)
            assert r.status_code == 201 or (len(store.list_sweeps()), len(store.list_jobs())) == before
