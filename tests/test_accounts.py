"""Accounts in the state store (teams, users, API tokens, ownership) and ``tunefleet admin``.

Real SQLite files under tmp_path; the CLI through the real entry point in a subprocess.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.queue import job_summary
from orchestrator.states import AttemptState, EndReason, JobState
from orchestrator.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    AccountExists,
    InvalidAccount,
    Store,
    StoreError,
    TeamNotFound,
    TokenNotFound,
    TokenRow,
    UserNotFound,
    UserRow,
)
from tests.test_cli import tf
from tests.test_store import old_schema_db


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "home" / "state.db"


@pytest.fixture
def store(store_target: str | Path, clock: Clock) -> Iterator[Store]:
    """On SQLite and on Postgres (conftest); ``db_path`` is the SQLite file of the SQLite case."""
    s = Store(store_target, clock=clock)
    yield s
    s.close()


def team_and_user(store: Store, user: str = "alice", team: str = "ml", role: str = "member") -> UserRow:
    if team not in {t["name"] for t in store.list_teams()}:
        store.create_team(team)
    return store.create_user(user, team, role)


def snapshot(store: Store) -> tuple:
    return (store.list_teams(), store.list_users(), store.list_tokens(), store.list_jobs())


# --------------------------------------------------------------------------------------------
# teams, users, tokens
# --------------------------------------------------------------------------------------------


def test_team_user_token_round_trip(store: Store, clock: Clock) -> None:
    store.create_team("ml", monthly_usd=500)
    store.create_team("nlp")
    alice = store.create_user("alice", "ml", role="admin", monthly_usd=50.0)
    assert alice == UserRow(name="alice", team="ml", role="admin", monthly_usd=50.0, created_at=clock.now,
                            disabled=False)
    bob = store.create_user("bob", "ml")
    assert bob.role == "member" and bob.monthly_usd is None
    assert store.get_user("bob") == bob
    assert store.list_teams() == [
        {"name": "ml", "monthly_usd": 500.0, "created_at": clock.now, "users": 2},
        {"name": "nlp", "monthly_usd": None, "created_at": clock.now, "users": 0},
    ]
    assert [u.name for u in store.list_users()] == ["alice", "bob"]
    assert store.list_users(team="nlp") == []
    store.set_team_budget("nlp", 10)
    store.set_team_budget("ml", None)
    assert {t["name"]: t["monthly_usd"] for t in store.list_teams()} == {"ml": None, "nlp": 10.0}
    assert store.set_user_budget("bob", 7.5).monthly_usd == 7.5
    with pytest.raises(UserNotFound):
        store.get_user("carol")
    with pytest.raises(UserNotFound):
        store.set_user_budget("carol", 1)
    with pytest.raises(TeamNotFound):
        store.set_team_budget("cv", 1)
    with pytest.raises(TeamNotFound, match="no team 'cv'"):
        store.list_users(team="cv")

    row, token = store.create_token("alice", note="laptop")
    assert token.startswith("tf_") and len(token) == 3 + 43
    assert isinstance(row, TokenRow)
    assert row.user == "alice" and row.note == "laptop" and row.prefix == token[:10]
    assert row.expires_at is None and row.revoked_at is None and row.last_used_at is None
    assert {f.name for f in dataclasses.fields(TokenRow)} == {
        "id", "user", "prefix", "created_at", "expires_at", "revoked_at", "last_used_at", "note"}
    assert token not in repr(row) and token not in str(store.list_tokens())
    assert store.authenticate(token) == alice
    assert store.list_tokens("alice")[0].last_used_at == clock.now
    assert store.list_tokens("bob") == []
    with pytest.raises(UserNotFound):
        store.list_tokens("carol")
    with pytest.raises(UserNotFound):
        store.create_token("carol")


def test_last_used_is_written_at_most_once_a_minute(store: Store, clock: Clock) -> None:
    team_and_user(store)
    _, token = store.create_token("alice")
    first = clock.now
    assert store.authenticate(token) is not None
    clock.now += 30
    assert store.authenticate(token) is not None
    assert store.list_tokens()[0].last_used_at == first  # not rewritten within the minute
    clock.now += 31
    assert store.authenticate(token) is not None
    assert store.list_tokens()[0].last_used_at == clock.now


def test_two_tokens_are_distinct_and_each_names_its_user(store: Store) -> None:
    team_and_user(store, "alice")
    team_and_user(store, "bob")
    (ra, ta), (rb, tb) = store.create_token("alice"), store.create_token("bob")
    assert ra.id != rb.id and ta != tb
    assert store.authenticate(ta).name == "alice"
    assert store.authenticate(tb).name == "bob"


def test_revoked_token_fails_at_once_even_through_another_connection(store: Store, db_path: Path,
                                                                     clock: Clock) -> None:
    team_and_user(store)
    row, token = store.create_token("alice")
    keep, other = store.create_token("alice")
    assert store.authenticate(token) is not None
    with Store(db_path, clock=clock) as admin:  # e.g. `tunefleet admin token revoke` beside a server
        revoked = admin.revoke_token(row.id)
    assert revoked.revoked_at == clock.now and revoked.revoked
    assert store.authenticate(token) is None
    assert store.authenticate(other) is not None  # only that one
    clock.now += 5
    assert store.revoke_token(row.id).revoked_at == revoked.revoked_at  # idempotent, first time kept
    with pytest.raises(TokenNotFound, match="no token 'tnope'"):
        store.revoke_token("tnope")


def test_expired_token_fails_by_the_store_clock(store: Store, clock: Clock) -> None:
    team_and_user(store)
    row, token = store.create_token("alice", expires_at=clock.now + 100)
    assert row.expires_at == clock.now + 100
    clock.now += 99
    assert store.authenticate(token) is not None
    clock.now += 1
    assert store.authenticate(token) is None
    for bad in (clock.now, clock.now - 1, math.nan, math.inf, "soon", True):
        with pytest.raises(InvalidAccount):
            store.create_token("alice", expires_at=bad)


def test_disabled_user_cannot_authenticate_get_a_token_or_submit(store: Store, clock: Clock) -> None:
    team_and_user(store)
    _, token = store.create_token("alice")
    assert store.authenticate(token) is not None
    disabled = store.disable_user("alice")
    assert disabled.disabled
    assert store.authenticate(token) is None
    assert store.disable_user("alice") == disabled  # idempotent
    before = snapshot(store)
    with pytest.raises(InvalidAccount, match="disabled"):
        store.create_token("alice")
    with pytest.raises(InvalidAccount, match="disabled"):
        store.submit({}, name="x", owner="alice")
    assert snapshot(store) == before
    with pytest.raises(UserNotFound):
        store.disable_user("nobody")


@pytest.mark.parametrize("garbage", [
    None, "", " ", "tf_", "tf_short", b"tf_" + b"a" * 43, 12345, ["tf_"], "x" * 1_000_000, "tf_" + "a" * 1_000_000,
    "tf_" + "a" * 43, "Bearer tf_" + "a" * 43, "tf_" + "a" * 42 + "\x00", "tf_" + "é" * 43, "\ud800" * 50,
])
def test_garbage_is_just_no_user(store: Store, garbage: object) -> None:
    team_and_user(store)
    store.create_token("alice")
    assert store.authenticate(garbage) is None


def test_near_misses_of_a_real_token_are_refused(store: Store) -> None:
    team_and_user(store)
    _, token = store.create_token("alice")
    for wrong in (token[:-1], token + "A", " " + token, token + "\n", token.upper() if token != token.upper()
                  else token.lower(), "tf-" + token[3:], token[:-1] + ("A" if token[-1] != "A" else "B")):
        assert store.authenticate(wrong) is None, wrong
    assert store.authenticate(token) is not None


def test_the_database_never_holds_the_plaintext_token(store: Store, db_path: Path) -> None:
    team_and_user(store)
    tokens = [store.create_token("alice", note=f"n{i}")[1] for i in range(3)]
    for t in tokens:
        store.authenticate(t)
    store.revoke_token(store.list_tokens()[0].id)
    files = [p for p in db_path.parent.iterdir() if p.name.startswith(db_path.name)]
    assert {p.name for p in files} >= {"state.db", "state.db-wal"}
    blob = b"".join(p.read_bytes() for p in files)
    for t in tokens:
        assert t.encode() not in blob
        assert t[3:].encode() not in blob  # nor its secret part
        assert hashlib.sha256(t.encode()).hexdigest().encode() in blob  # we did read where rows live
    store.close()
    blob = b"".join(p.read_bytes() for p in db_path.parent.iterdir() if p.name.startswith(db_path.name))
    for t in tokens:  # after the WAL is checkpointed into the main file as well
        assert t.encode() not in blob


# --------------------------------------------------------------------------------------------
# refusals: clear, and nothing written
# --------------------------------------------------------------------------------------------


def test_duplicates_unknown_teams_and_bad_values_are_clear_and_change_nothing(store: Store) -> None:
    store.create_team("ml", monthly_usd=100)
    store.create_user("alice", "ml")
    before = snapshot(store)
    cases = [
        (lambda: store.create_team("ml"), AccountExists, "team 'ml' already exists"),
        (lambda: store.create_team("ML"), AccountExists, "team 'ml' already exists"),
        (lambda: store.create_user("alice", "ml"), AccountExists, "user 'alice' already exists"),
        (lambda: store.create_user("Alice", "ml"), AccountExists, "user 'alice' already exists"),
        (lambda: store.create_user("bob", "nlp"), TeamNotFound, "no team 'nlp'"),
        (lambda: store.create_user("bob", "Ml"), TeamNotFound, r"did you mean 'ml'"),
        (lambda: store.create_user("bob", "ml", role="owner"), InvalidAccount, "role 'owner' is invalid"),
        (lambda: store.create_user("bob", "ml", role="Admin"), InvalidAccount, "role"),
        (lambda: store.create_user("bob", "ml", monthly_usd=-1), InvalidAccount, "monthly budget"),
        (lambda: store.create_user("bob", "ml", monthly_usd=math.nan), InvalidAccount, "monthly budget"),
        (lambda: store.create_team("cv", monthly_usd=math.inf), InvalidAccount, "monthly budget"),
        (lambda: store.create_team("cv", monthly_usd="5"), InvalidAccount, "monthly budget"),
        (lambda: store.set_team_budget("ml", -5), InvalidAccount, "monthly budget"),
        (lambda: store.create_token("alice", note="x" * 201), InvalidAccount, "note"),
        (lambda: store.submit({}, name="j", owner="nobody"), UserNotFound, "no user 'nobody'"),
    ]
    for bad in ("", "a b", "x" * 65, ".", "..", "-lead", "_x", "a/b", "a\nb", "ä", None, 5):
        cases.append((lambda bad=bad: store.create_team(bad), InvalidAccount, "team name"))
        cases.append((lambda bad=bad: store.create_user(bad, "ml"), InvalidAccount, "user name"))
    for call, exc, message in cases:
        with pytest.raises(exc, match=message):
            call()
        assert issubclass(exc, StoreError)
    assert snapshot(store) == before
    ok = "a" * 64
    store.create_team(ok)
    store.create_user("b.o_b-1", ok)  # the longest name, and every allowed character


# --------------------------------------------------------------------------------------------
# ownership
# --------------------------------------------------------------------------------------------


def test_ownership_is_recorded_on_job_attempt_and_spend(store: Store, clock: Clock) -> None:
    team_and_user(store, "alice", "ml")
    job_id = store.submit({"m": 1}, name="owned", owner="alice")
    plain_id = store.submit({"m": 1}, name="embedded")
    assert store.get_job(job_id).owner == "alice"
    assert store.get_job(plain_id).owner is None
    assert store.events(job_id)[0].data["owner"] == "alice"
    assert "owner" not in store.events(plain_id)[0].data  # an embedded job's event as it always was

    att = store.create_attempt(job_id, provider="fake", offer_id="o", usd_per_hour=1.0, start_step=0)
    plain_att = store.create_attempt(plain_id, provider="fake", offer_id="o", usd_per_hour=1.0, start_step=0)
    assert att.owner == "alice" and store.get_attempt(att.id).owner == "alice"
    assert plain_att.owner is None
    store.add_spend(job_id, att.id, provider="fake", usd=1.5)
    store.add_spend(plain_id, plain_att.id, provider="fake", usd=0.25)
    store.transition_attempt(att.id, AttemptState.RUNNING, kind="attempt_running", message="up")
    clock.now += 10
    store.transition_attempt(att.id, AttemptState.PREEMPTED, kind="attempt_preempted", message="gone",
                             spend_usd=2.0, end_code=EndReason.PREEMPTED)
    owners = [(r["job_id"], r["usd"], r["owner"]) for r in store.spend_rows()]
    assert owners == [(job_id, 1.5, "alice"), (plain_id, 0.25, None), (job_id, 2.0, "alice")]
    assert store.spend_by(owner="alice") == 3.5
    assert store.spend_by(team="ml") == 3.5
    assert store.spend_by(team="nlp") == 0.0 and store.spend_by(owner="bob") == 0.0
    assert store.spend_by(owner="alice", since=clock.now) == 2.0
    assert store.spend_by() == 3.75 == store.spend_total()
    assert store.count_preemptions() == 1
    assert store.get_job(job_id).cost_usd == 3.5


def test_list_jobs_filters_by_owner_and_team(store: Store, clock: Clock) -> None:
    team_and_user(store, "alice", "ml")
    team_and_user(store, "bob", "ml")
    team_and_user(store, "carol", "nlp")
    ids: dict[str, list[str]] = {}
    for owner in ("alice", "bob", "carol", None, "alice"):
        clock.now += 1
        ids.setdefault(str(owner), []).append(store.submit({}, name=f"j-{owner}", owner=owner))
    store.request_cancel(ids["alice"][0])

    def names(**kw) -> list[str]:
        return [j.id for j in store.list_jobs(**kw)]

    assert names(owner="alice") == ids["alice"][::-1]  # newest first
    assert names(owner="alice", states=[JobState.QUEUED]) == [ids["alice"][1]]
    assert names(owner="alice", limit=1) == [ids["alice"][1]]
    assert set(names(team="ml")) == {*ids["alice"], *ids["bob"]}
    assert names(team="nlp") == ids["carol"]
    assert names(team="ml", owner="carol") == []
    assert names(team="nobody") == [] and names(owner="nobody") == []
    assert len(names()) == 5  # no filter: every job, the unowned one too


def test_job_summary_names_the_owner_only_when_there_is_one(store: Store) -> None:
    team_and_user(store)
    owned = job_summary(store, store.get_job(store.submit({}, name="a", owner="alice")))
    plain = job_summary(store, store.get_job(store.submit({}, name="b")))
    assert owned["owner"] == "alice"
    assert "owner" not in plain
    assert set(owned) - set(plain) == {"owner"}


# --------------------------------------------------------------------------------------------
# migration
# --------------------------------------------------------------------------------------------


def test_previous_schema_is_migrated_keeping_jobs_attempts_and_spend(tmp_path: Path) -> None:
    assert SCHEMA_VERSION == len(MIGRATIONS) == 10
    db = tmp_path / "v7.db"
    conn = old_schema_db(db, 7)
    conn.execute("INSERT INTO jobs (id, name, state, spec_json, created_at, updated_at, cost_usd)"
                 " VALUES ('jold0001', 'old', 'queued', '{}', 1, 1, 0.5)")
    conn.execute("INSERT INTO attempts (id, job_id, seq, provider, offer_id, state, created_at, end_code)"
                 " VALUES ('jold0001.1', 'jold0001', 1, 'p', 'o', 'preempted', 1, 'preempted')")
    conn.execute("INSERT INTO spend (ts, job_id, attempt_id, provider, usd, kind)"
                 " VALUES (1, 'jold0001', 'jold0001.1', 'p', 0.5, 'compute')")
    conn.commit()
    conn.close()
    with Store(db) as s:
        assert s.schema_version() == SCHEMA_VERSION
        job = s.get_job("jold0001")
        assert job.name == "old" and job.owner is None and job.cost_usd == 0.5
        assert s.get_attempt("jold0001.1").owner is None
        assert s.spend_rows()[0]["owner"] is None and s.spend_by() == 0.5
        assert s.list_jobs(owner="alice") == [] and len(s.list_jobs()) == 1
        s.create_team("ml")
        s.create_user("alice", "ml")
        assert s.authenticate(s.create_token("alice")[1]).name == "alice"
        assert s.get_job(s.submit({}, name="new", owner="alice")).owner == "alice"
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (str(SCHEMA_VERSION),)
        index_names = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "jobs_owner" in index_names
        plan = " ".join(r[3] for r in c.execute("EXPLAIN QUERY PLAN SELECT * FROM jobs WHERE owner = 'a'"))
        assert "jobs_owner" in plan


def test_v8_sweeps_take_the_owner_of_their_trial_jobs(tmp_path: Path) -> None:
    db = tmp_path / "v8.db"
    conn = old_schema_db(db, 8)
    conn.execute("INSERT INTO teams (name, created_at) VALUES ('ml', 1)")
    conn.execute("INSERT INTO users (name, team, role, created_at) VALUES ('alice', 'ml', 'member', 1)")
    for sweep, owner in (("sown0001", "alice"), ("snone001", None)):
        conn.execute("INSERT INTO sweeps (id, name, spec_json, state, budget_usd, created_at, updated_at)"
                     " VALUES (?, 'sw', '{}', 'running', 5, 1, 1)", (sweep,))
        conn.execute("INSERT INTO jobs (id, name, state, spec_json, created_at, updated_at, sweep_id, owner)"
                     " VALUES (?, 't0', 'queued', '{}', 1, 1, ?, ?)", ("j" + sweep[1:], sweep, owner))
        conn.execute("INSERT INTO trials (sweep_id, trial, rung, job_id, params_json) VALUES (?, 0, 0, ?, '{}')",
                     (sweep, "j" + sweep[1:]))
    conn.commit()
    conn.close()
    with Store(db) as s:
        assert s.get_sweep("sown0001")["owner"] == "alice"
        assert s.get_sweep("snone001")["owner"] is None
        assert [w["id"] for w in s.list_sweeps(team="ml")] == ["sown0001"]
        # a new trial of an owned sweep is owned alike
        assert s.get_job(s.add_trial("sown0001", trial=1, rung=0, params={}, spec={}, name="t1")).owner == "alice"


def test_sweeps_record_their_owner_and_list_by_owner_and_team(store: Store) -> None:
    team_and_user(store)
    store.create_team("nlp")
    store.create_user("bob", "nlp")
    mine = store.create_sweep("a", {}, 5.0, owner="alice")
    theirs = store.create_sweep("b", {}, 5.0, owner="bob")
    plain = store.create_sweep("c", {}, 5.0)
    with pytest.raises(StoreError):
        store.create_sweep("d", {}, 5.0, owner="nobody")
    job = store.add_trial(mine, trial=0, rung=0, params={"lr": 1}, spec={}, name="a/t0")
    assert store.get_job(job).owner == "alice"
    assert store.get_job(store.add_trial(plain, trial=0, rung=0, params={}, spec={}, name="c/t0")).owner is None
    assert [w["id"] for w in store.list_sweeps(owner="alice")] == [mine]
    assert [w["id"] for w in store.list_sweeps(team="nlp")] == [theirs]
    assert {w["id"] for w in store.list_sweeps()} == {mine, theirs, plain}


# --------------------------------------------------------------------------------------------
# tunefleet admin
# --------------------------------------------------------------------------------------------


def _json(home: Path, *args: str):
    return json.loads(tf(home, "admin", *args, "--json", check=True).stdout)


def _refused(home: Path, *args: str, needle: str) -> None:
    proc = tf(home, "admin", *args)
    assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
    assert needle in proc.stderr, (args, proc.stderr)
    assert "Traceback" not in proc.stderr


def test_admin_cli_end_to_end(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert _json(home, "team", "create", "ml", "--monthly-usd", "200") == {"name": "ml", "monthly_usd": 200.0}
    alice = _json(home, "user", "create", "alice", "--team", "ml", "--role", "admin")
    assert alice == {"name": "alice", "team": "ml", "role": "admin", "monthly_usd": None,
                     "created_at": alice["created_at"], "disabled": False}
    tf(home, "admin", "user", "create", "bob", "--team", "ml", "--monthly-usd", "5", check=True)

    before = [_json(home, "team", "list"), _json(home, "user", "list")]
    assert before[0] == [{"name": "ml", "monthly_usd": 200.0, "created_at": before[0][0]["created_at"], "users": 2}]
    assert [(u["name"], u["role"], u["monthly_usd"]) for u in before[1]] == [("alice", "admin", None),
                                                                            ("bob", "member", 5.0)]
    _refused(home, "team", "create", "ml", needle="already exists")
    _refused(home, "team", "create", "bad name", needle="team name 'bad name' is invalid")
    _refused(home, "user", "create", "carol", "--team", "nlp", needle="no team 'nlp'")
    _refused(home, "user", "create", "carol", "--team", "ml", "--role", "boss", needle="role 'boss'")
    _refused(home, "user", "create", "carol", "--team", "ml", "--monthly-usd", "-3", needle="monthly budget")
    _refused(home, "user", "create", "carol", "--team", "ml", "--monthly-usd", "lots",
             needle="Invalid value for '--monthly-usd'")
    _refused(home, "token", "create", "carol", needle="no user 'carol'")
    _refused(home, "token", "create", "alice", "--expires-in", "soon", needle="not a duration")
    _refused(home, "token", "revoke", "tnope", needle="no token 'tnope'")
    _refused(home, "user", "list", "--team", "nlp", needle="no team 'nlp'")
    assert [_json(home, "team", "list"), _json(home, "user", "list")] == before
    assert _json(home, "token", "list") == []

    made = _json(home, "token", "create", "alice", "--expires-in", "30d", "--note", "ci")
    assert set(made) == {"id", "token", "user", "expires_at"} and made["user"] == "alice"
    assert made["token"].startswith("tf_") and abs(made["expires_at"] - (time.time() + 30 * 86400)) < 300
    plain = tf(home, "admin", "token", "create", "bob", check=True)
    token_b = plain.stdout.strip()
    assert plain.stdout == token_b + "\n" and token_b.startswith("tf_")  # the token alone on stdout
    assert "will not be shown again" in plain.stderr and token_b not in plain.stderr

    listed = _json(home, "token", "list")
    assert [(t["id"], t["user"], t["note"], t["state"]) for t in listed] == [
        (made["id"], "alice", "ci", "active"), (listed[1]["id"], "bob", "", "active")]
    assert set(listed[0]) == {"id", "user", "prefix", "created_at", "expires_at", "last_used_at", "revoked_at",
                              "note", "state"}
    assert listed[0]["prefix"] == made["token"][:10] and listed[0]["expires_at"] == made["expires_at"]
    assert [t["user"] for t in _json(home, "token", "list", "--user", "bob")] == ["bob"]
    table = tf(home, "admin", "token", "list", check=True).stdout
    assert made["id"] in table and made["token"][:10] in table
    assert made["token"] not in table and token_b not in table

    with Store(home / "state.db") as s:
        assert s.authenticate(made["token"]).name == "alice"
        assert s.authenticate(token_b).name == "bob"
    revoked = _json(home, "token", "revoke", made["id"])
    assert revoked["id"] == made["id"] and revoked["state"] == "revoked" and revoked["revoked_at"]
    assert _json(home, "token", "revoke", made["id"])["revoked_at"] == revoked["revoked_at"]  # idempotent
    assert _json(home, "user", "disable", "bob")["disabled"] is True
    with Store(home / "state.db") as s:
        assert s.authenticate(made["token"]) is None
        assert s.authenticate(token_b) is None
    users = tf(home, "admin", "user", "list", check=True).stdout
    assert "disabled" in users and "alice" in users
    assert "ml" in tf(home, "admin", "team", "list", check=True).stdout
    help_text = tf(home, "admin", "--help", check=True).stdout
    assert all(word in help_text for word in ("team", "user", "token"))


# --------------------------------------------------------------------------------------------
# browser sessions (the dashboard)
# --------------------------------------------------------------------------------------------


def test_a_session_opens_only_with_a_live_token_and_dies_with_it(store: Store, clock: Clock) -> None:
    team_and_user(store)
    row, token = store.create_token("alice", expires_at=clock.now + 3600)
    assert store.open_session("tf_garbage") is None and store.open_session(None) is None
    cookie, csrf, user = store.open_session(token)
    assert user.name == "alice" and len(csrf) >= 24 and cookie != token
    assert store.session_user(cookie) == (user, csrf)
    assert store.session_user(cookie[:-1] + ("A" if cookie[-1] != "A" else "B")) is None
    # only the cookie's hash is stored
    with store._read() as c:
        stored = json.dumps([list(r) for r in c.execute("SELECT * FROM sessions").fetchall()])
    assert cookie not in stored and hashlib.sha256(cookie.encode()).hexdigest() in stored
    # it lives no longer than its token, and ends at once when the token is revoked or logged out
    clock.now += 3601
    assert store.session_user(cookie) is None
    clock.now -= 3601
    other, _, _ = store.open_session(token)
    store.revoke_token(row.id)
    assert store.session_user(other) is None and store.open_session(token) is None
    _, fresh = store.create_token("alice")
    cookie2, _, _ = store.open_session(fresh)
    store.end_session(cookie2)
    assert store.session_user(cookie2) is None
    store.end_session("never-was-a-session-cookie")  # nothing happens


def test_a_disabled_users_sessions_stop(store: Store) -> None:
    team_and_user(store)
    cookie, _, _ = store.open_session(store.create_token("alice")[1])
    store.disable_user("alice")
    assert store.session_user(cookie) is None
