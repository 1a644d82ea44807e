"""The team server over real HTTP on 127.0.0.1: ``tunefleet server`` started as its own process on a
fresh home, users and tokens made with the store, requests made with httpx.

Two teams: alice and carol in team "ml", bob in team "nlp", and ann, an admin. Each sees what they
should and nothing else (a matrix over every job endpoint and caller), a revoked token fails at
once, bad input gets validate's own messages, and no token ever shows up in a response, the
metrics or the server's log.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.server_load import JOB, ServerProcess
from orchestrator.store import Store
from tests.test_cli import tf

REPO = Path(__file__).resolve().parent.parent
DATA = (REPO / "examples" / "data" / "alpaca-tiny.jsonl").read_bytes()


class Server(ServerProcess):
    """One ``tunefleet server --no-daemon`` process on a home of its own, and clients for it."""

    def __init__(self, home: Path, *args: str, **kw) -> None:
        super().__init__(home, *args, **kw)
        self.home = home

    def client(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url + "/api/v1", headers=headers, timeout=30)


def body(yaml_text: str = JOB, files: dict[str, bytes] | None = None, **extra) -> dict:
    files = {"data/train.jsonl": DATA} if files is None else files
    return {"yaml": yaml_text, "files": {k: base64.b64encode(v).decode() for k, v in files.items()}, **extra}


def make_accounts(home: Path) -> dict[str, str]:
    """Teams ml and nlp: alice and carol (members of ml), bob (nlp), ann (an admin, in ml); each
    user's token."""
    tokens = {}
    with Store(home / "state.db") as store:
        store.create_team("ml")
        store.create_team("nlp")
        for name, team, role in (("alice", "ml", "member"), ("carol", "ml", "member"), ("bob", "nlp", "member"),
                                 ("ann", "ml", "admin")):
            store.create_user(name, team, role)
            tokens[name] = store.create_token(name)[1]
    return tokens


def two_teams(home: Path) -> tuple[Server, dict[str, str], dict[str, str]]:
    """``make_accounts`` on ``home``, a server over it (no rate limit: that has a test of its own),
    and one job each for alice (team ml) and bob (team nlp), through the API: (server, tokens, jobs)."""
    tokens = make_accounts(home)
    server = Server(home, "--rate", "0")
    try:
        jobs = {}
        for who in ("alice", "bob"):
            r = server.client(tokens[who]).post("/jobs", json=body())
            assert r.status_code == 201, r.text
            jobs[who] = r.json()["id"]
    except BaseException:
        server.stop()
        raise
    return server, tokens, jobs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    home = tmp_path_factory.mktemp("server-home")
    server, tokens, jobs = two_teams(home)
    try:
        yield {"server": server, "tokens": tokens, "jobs": jobs, "home": home}
    finally:
        server.stop()


def test_each_caller_lists_what_they_may_see(world):
    s, t, jobs = world["server"], world["tokens"], world["jobs"]
    seen = {who: {j["id"] for j in s.client(t[who]).get("/jobs").json()} for who in t}
    assert seen["alice"] == seen["carol"] == {jobs["alice"]}  # team ml sees ml's jobs
    assert seen["bob"] == {jobs["bob"]}
    assert seen["ann"] >= {jobs["alice"], jobs["bob"]}  # an admin sees all
    me = s.client(t["carol"]).get("/whoami").json()
    assert me == {"name": "carol", "team": "ml", "role": "member"}


# every job endpoint: (method, path template, json body)
ENDPOINTS = [
    ("GET", "/jobs/{id}", None),
    ("GET", "/jobs/{id}/events", None),
    ("GET", "/jobs/{id}/logs", None),
    ("POST", "/jobs/{id}/preempt", {"hard": False}),
    ("POST", "/jobs/{id}/resume", {}),
    ("POST", "/jobs/{id}/cancel", None),
]
# caller -> expected status on alice's job: read endpoints / act endpoints (None: the state decides)
EXPECTED = {
    "alice": (200, None),  # hers: reads work; acts pass the permission check (the job's state decides)
    "carol": (200, 403),  # her teammate's: sees it, may not act on it
    "bob": (404, 404),  # another team's: as if it did not exist
    "ann": (200, None),  # an admin
    "anonymous": (401, 401),
    "forged": (401, 401),
}


# (cancelling alice's job as alice or an admin would end it for the other cases: tested below)
MATRIX = [(c, *e) for c in EXPECTED for e in ENDPOINTS if not (e[1].endswith("/cancel") and c in ("alice", "ann"))]


@pytest.mark.parametrize("caller, method, path, payload", MATRIX, ids=[f"{c} {m} {p}" for c, m, p, _ in MATRIX])
def test_access_matrix_on_alices_job(world, caller, method, path, payload):
    s, t, job = world["server"], world["tokens"], world["jobs"]["alice"]
    token = {"anonymous": None, "forged": "tf_" + "A" * 43}.get(caller, t.get(caller))
    r = s.client(token).request(method, path.format(id=job), json=payload)
    read, act = EXPECTED[caller]
    want = read if method == "GET" else act
    if want is None:  # allowed: a queued job cannot be preempted or resumed, and says why (409)
        assert r.status_code == 409, r.text
    else:
        assert r.status_code == want, r.text
    if r.status_code == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    if r.status_code == 404:
        assert "no job" in r.json()["detail"]


def test_cancel_own_job_and_not_another_teams(world):
    s, t = world["server"], world["tokens"]
    job = s.client(t["alice"]).post("/jobs", json=body()).json()["id"]
    assert s.client(t["bob"]).post(f"/jobs/{job}/cancel").status_code == 404
    assert s.client(t["carol"]).post(f"/jobs/{job}/cancel").status_code == 403
    r = s.client(t["alice"]).post(f"/jobs/{job}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert s.client(t["alice"]).get(f"/jobs/{job}").json()["state"] == "cancelled"


def test_a_revoked_token_fails_at_once(world):
    s = world["server"]
    with Store(world["home"] / "state.db") as store:
        row, token = store.create_token("carol", note="short-lived")
    assert s.client(token).get("/whoami").status_code == 200
    with Store(world["home"] / "state.db") as store:
        store.revoke_token(row.id)
    assert s.client(token).get("/whoami").status_code == 401


def test_bad_job_file_gets_validates_messages_and_queues_nothing(world, tmp_path):
    s, t = world["server"], world["tokens"]
    bad = JOB.replace("max_steps: 10", "max_steps: -3\npolicy:\n  spot: sometimes")
    before = len(s.client(t["ann"]).get("/jobs").json())
    r = s.client(t["alice"]).post("/jobs", json=body(bad))
    assert r.status_code == 422
    got = {(p["loc"], p["line"]): p["message"] for p in r.json()["detail"]}
    # the CLI's validate on the same file says the same things at the same keys and lines
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_bytes(DATA)
    (tmp_path / "job.yaml").write_text(bad)
    cli = tf(world["home"], "validate", str(tmp_path / "job.yaml")).stderr
    for (loc, line), message in got.items():
        assert f"job.yaml:{line}: {loc}: {message}" in cli, cli
    assert {loc for loc, _ in got} == {"max_steps", "policy.spot"}
    assert len(s.client(t["ann"]).get("/jobs").json()) == before


def test_a_job_may_not_read_the_servers_files_or_write_its_disk(world):
    s, t = world["server"], world["tokens"]
    server_file = JOB.replace("data/train.jsonl", str(REPO / "examples" / "data" / "alpaca-tiny.jsonl"))
    r = s.client(t["alice"]).post("/jobs", json=body(server_file, files={}))
    assert r.status_code == 422 and "not among the uploaded files" in r.text
    escape = s.client(t["alice"]).post("/jobs", json=body(files={"../../etc/x.jsonl": DATA}))
    assert escape.status_code == 422 and "relative path inside" in escape.text
    store = s.client(t["alice"]).post("/jobs", json=body(JOB + "checkpoint:\n  store: file:///tmp/elsewhere\n"))
    assert store.status_code == 422 and "checkpoint.store" in store.text


def one_user_server(tmp_path: Path, *args: str) -> tuple[Server, str]:
    """A server of its own (started with ``args``) and the token of its one user."""
    home = tmp_path / "home"
    home.mkdir()
    with Store(home / "state.db") as store:
        store.create_team("t")
        store.create_user("u", "t")
        token = store.create_token("u")[1]
    return Server(home, *args), token


def test_body_size_limit_and_rate_limit(tmp_path):
    server, token = one_user_server(tmp_path, "--max-body-mb", "1", "--rate", "1", "--burst", "3")
    try:
        c = server.client(token)
        big = c.post("/jobs", json=body(files={"data/train.jsonl": b"x" * (2 << 20)}))
        assert big.status_code == 413
        codes = [c.get("/whoami") for _ in range(8)]
        limited = [r for r in codes if r.status_code == 429]
        assert limited and int(limited[0].headers["retry-after"]) >= 1
        assert codes[0].status_code == 200
    finally:
        server.stop()


def test_health_metrics_openapi_and_no_secret_anywhere(world):
    s, t = world["server"], world["tokens"]
    assert httpx.get(s.url + "/healthz").json()["ok"] is True
    placed = s.client(t["bob"]).post("/jobs", json=body()).json()["id"]
    with Store(world["home"] / "state.db") as store:  # what the daemon would write: a launch, a provider in backoff
        store.create_attempt(placed, provider="local", offer_id="cpu", usd_per_hour=0.0, start_step=0)
        store.set_provider_health("vast", state="backoff", reason="HTTP 503", failures=3)
    metrics = httpx.get(s.url + "/metrics").text
    assert 'tunefleet_live_attempts{provider="local"} 1' in metrics
    assert "tunefleet_placement_seconds_count 1" in metrics and 'tunefleet_placement_seconds{quantile="0.5"}' in metrics
    assert 'tunefleet_provider_up{provider="vast"} 0' in metrics
    assert 'tunefleet_provider_failures{provider="vast"} 3' in metrics
    assert 'tunefleet_jobs{state="queued"}' in metrics
    assert 'tunefleet_http_requests_total{method="POST",route="/api/v1/jobs",status="201"}' in metrics
    paths = httpx.get(s.url + "/openapi.json").json()["paths"]
    assert {"/api/v1/jobs", "/api/v1/jobs/{job_id}", "/api/v1/jobs/{job_id}/logs"} <= set(paths)
    everything = metrics + s.log_path.read_text(errors="replace")
    everything += s.client(t["alice"]).get("/jobs").text + s.client("tf_" + t["alice"][3:-2] + "xx").get("/jobs").text
    for token in t.values():
        assert token not in everything and token[3:20] not in everything


def test_logs_stream_as_server_sent_events(world):
    s, t, job = world["server"], world["tokens"], world["jobs"]["alice"]
    with s.client(t["alice"]).stream("GET", f"/jobs/{job}/logs") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    assert text.startswith("event: end\n") and json.loads(text.split("data: ")[1])["state"] == "queued"


# Any JSON value, nested a little: what a fuzzed request body is made of.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=JSON_VALUES)
def test_fuzzed_bodies_never_500_and_never_half_queue(world, payload):
    s, t = world["server"], world["tokens"]
    for data in (payload, {"yaml": payload}, {"yaml": json.dumps(payload), "files": {}}):
        before = len(s.client(t["ann"]).get("/jobs", params={"limit": 100000}).json())
        r = s.client(t["alice"]).post("/jobs", json=data)
        assert r.status_code in (201, 422), (r.status_code, r.text)
        after = len(s.client(t["ann"]).get("/jobs", params={"limit": 100000}).json())
        assert after == before + (r.status_code == 201)


def test_a_chunked_body_past_the_limit_is_413_not_500(tmp_path):
    server, token = one_user_server(tmp_path, "--max-body-mb", "1")
    try:
        def chunks():  # no Content-Length: the limit is counted as the body streams in
            yield b'{"yaml": "'
            for _ in range(40):
                yield b"x" * (64 << 10)
            yield b'"}'

        r = server.client(token).post("/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "--max-body-mb" in r.json()["detail"]
    finally:
        server.stop()
