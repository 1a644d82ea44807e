"""Monthly budgets per user and per team (issue 12): one more pair of caps on the same path as the
job, sweep and monthly caps (``orchestrator.spending.Caps.applying``), with the same hard stop.

Unit level on a real SQLite store with a fake clock; then the real daemon on the fault provider
(no faults) with two users of one team whose jobs stop at the team's cap.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.budget import (
    Shortfall,
    headroom,
    launch_refusal,
    month_start,
    next_month_start,
)
from orchestrator.decide import Code, Verdict
from orchestrator.spending import Caps, run_until, stop_reason
from orchestrator.store import Store
from tests.test_decide import NOW, gpu, run

RATE = 3.6  # $/h of each live attempt here: $0.001 a second


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[Store]:
    s = Store(tmp_path / "state.db", clock=clock)
    s.create_team("ml", monthly_usd=10.0)
    s.create_team("cv")
    s.create_user("alice", "ml", monthly_usd=5.0)
    s.create_user("bob", "ml")
    s.create_user("carol", "cv")
    yield s
    s.close()


def job_spec(max_usd: float | None = None) -> dict:
    return {"base_model": "tunefleet/tiny-llama", "policy": {"max_usd": max_usd}}


def submit(store: Store, owner: str | None, max_usd: float | None = None) -> str:
    return store.submit(job_spec(max_usd), name=f"job-of-{owner}", owner=owner)


def spend(store: Store, job_id: str, usd: float) -> None:
    store.add_spend(job_id, None, provider="fake", usd=usd)  # recorded now, by the store's clock


def caps_of(store: Store, committed: dict[str, float] | None = None) -> Caps:
    return Caps(store, None, lambda a: (committed or {}).get(a.id, 0.0))


def room(store: Store, job_id: str, caps: Caps | None = None) -> tuple[float, str | None]:
    left, cap = (caps or caps_of(store)).headroom(store.get_job(job_id), store._now(), store.live_attempts(),
                                                  lambda j: None)
    return left, None if cap is None else cap.scope


def test_a_users_cap_bounds_their_jobs(store: Store) -> None:
    first, second = submit(store, "alice"), submit(store, "alice")
    spend(store, first, 3.0)
    assert room(store, second) == pytest.approx((2.0, "user alice's monthly budget"))
    assert room(store, first)[0] == pytest.approx(2.0)  # all of alice's jobs share it
    spend(store, second, 2.0)
    refusal = launch_refusal(caps_of(store).for_launch(store.get_job(second), NOW, [], lambda j: None), 0.5)
    assert refusal is not None and refusal.kind is Shortfall.RESET and refusal.until == next_month_start(NOW)
    assert "user alice's monthly budget: $5.00 cap, $5.00 spent this month" in refusal.why
    assert "tunefleet admin user set-budget alice" in refusal.why


def test_a_team_cap_is_shared_by_its_users_and_held_by_their_live_attempts(store: Store, clock: Clock) -> None:
    alices, bobs = submit(store, "alice"), submit(store, "bob")
    store.set_user_budget("alice", None)
    spend(store, alices, 4.0)
    spend(store, bobs, 3.0)
    assert room(store, bobs) == pytest.approx((3.0, "team ml's monthly budget"))
    assert room(store, alices)[0] == pytest.approx(3.0)
    # a live attempt of alice's holds what it accrued and what it is still committed to
    att = store.create_attempt(alices, provider="fake", offer_id="o", usd_per_hour=RATE, start_step=0, data={})
    clock.now += 500  # $0.50 accrued
    left, scope = room(store, bobs, caps_of(store, {att.id: 2.0}))
    assert (left, scope) == (pytest.approx(3.0 - 0.5 - 1.5), "team ml's monthly budget")
    # and it is stopped before the team's cap would be crossed, bob's spend counting too
    caps = caps_of(store)
    job = store.get_job(alices)
    assert stop_reason(job, att, clock.now, 60.0, store.live_attempts(), caps, lambda j: None) is None
    clock.now += 2000  # $2.50 accrued: $0.50 left, less than a 10-minute horizon at $3.60/h
    why = stop_reason(job, att, clock.now, 600.0, store.live_attempts(), caps, lambda j: None)
    assert why is not None and "team ml's monthly budget $10.00 would be crossed" in why
    # the payload's lease ends half a horizon before the cap is reached
    lease = run_until(job, att, clock.now, 60.0, store.live_attempts(), caps, lambda j: None)
    assert lease == pytest.approx(clock.now + 0.5 / RATE * 3600 - 30.0)


def test_the_tightest_of_every_cap_wins(store: Store) -> None:
    job = submit(store, "alice", max_usd=4.0)
    caps = Caps(store, 7.0, lambda a: 0.0)
    assert room(store, job, caps) == pytest.approx((4.0, f"job {job} policy.max_usd"))
    spend(store, submit(store, "bob"), 8.0)  # the team's: $2 left
    assert room(store, job, caps) == pytest.approx((-1.0, "monthly budget"))  # the global one: -$1
    store.set_team_budget("ml", 8.5)
    scopes = [c.scope for c in caps.applying(store.get_job(job), NOW, [], lambda j: None)]
    assert scopes == [f"job {job} policy.max_usd", "monthly budget", "user alice's monthly budget",
                      "team ml's monthly budget"]
    assert room(store, job, Caps(store, None, lambda a: 0.0)) == pytest.approx((0.5, "team ml's monthly budget"))
    assert headroom([]) == (float("inf"), None)


def test_other_teams_and_jobs_without_an_owner_are_unaffected(store: Store) -> None:
    spend(store, submit(store, "alice"), 5.0)
    spend(store, submit(store, "bob"), 5.0)  # team ml: all spent
    carols, mine = submit(store, "carol"), submit(store, None)
    assert room(store, carols) == (float("inf"), None)  # team cv has no cap, nor has carol
    assert room(store, mine) == (float("inf"), None)  # the embedded one-person path: no account caps
    store.set_team_budget("cv", 1.0)
    assert room(store, carols) == pytest.approx((1.0, "team cv's monthly budget"))
    # only the global cap reaches a job without an owner
    assert room(store, mine, Caps(store, 12.0, lambda a: 0.0)) == pytest.approx((2.0, "monthly budget"))


def test_the_caps_start_again_each_calendar_month_and_when_raised(store: Store, clock: Clock) -> None:
    clock.now = month_start(NOW) - 60  # the last minute of the month before
    old = submit(store, "alice")
    spend(store, old, 5.0)
    assert room(store, old)[0] == pytest.approx(0.0)
    clock.now = NOW
    assert room(store, submit(store, "alice")) == pytest.approx((5.0, "user alice's monthly budget"))
    spend(store, old, 5.0)  # spent again this month: wait for the 1st, or for an admin
    job = store.get_job(submit(store, "alice"))
    waits = run(offers=[gpu(price=1.0)], caps=caps_of(store).for_launch(job, NOW, [], lambda j: None))
    assert (waits.verdict, waits.code, waits.until) == (Verdict.WAIT, Code.BUDGET_RESET, next_month_start(NOW))
    assert "user alice's monthly budget: $5.00 cap, $5.00 spent this month" in waits.text
    store.set_user_budget("alice", 500.0)
    placed = run(offers=[gpu(price=1.0)], caps=caps_of(store).for_launch(job, NOW, [], lambda j: None))
    assert placed.verdict is Verdict.PLACE
    store.set_user_budget("alice", 5.0)
    clock.now = next_month_start(NOW) + 1  # the month turned
    later = run(offers=[gpu(price=1.0)], caps=caps_of(store).for_launch(job, clock.now, [], lambda j: None))
    assert later.verdict is Verdict.PLACE


def test_admin_set_budget_commands(tmp_path: Path) -> None:
    from tests.test_cli import tf

    home = tmp_path / "home"
    tf(home, "admin", "team", "create", "ml", check=True)
    tf(home, "admin", "user", "create", "alice", "--team", "ml", check=True)
    team = json.loads(tf(home, "admin", "team", "set-budget", "ml", "--monthly-usd", "25", "--json", check=True).stdout)
    assert team["name"] == "ml" and team["monthly_usd"] == 25.0
    user = json.loads(tf(home, "admin", "user", "set-budget", "alice", "--monthly-usd", "5", "--json",
                         check=True).stdout)
    assert user["monthly_usd"] == 5.0 and user["team"] == "ml"
    cleared = json.loads(tf(home, "admin", "user", "set-budget", "alice", "--clear", "--json", check=True).stdout)
    assert cleared["monthly_usd"] is None
    assert "monthly budget $25.00" in tf(home, "admin", "team", "set-budget", "ml", "--monthly-usd", "25",
                                         check=True).stdout
    for args in (["team", "set-budget", "nope", "--monthly-usd", "1"], ["user", "set-budget", "alice"],
                 ["user", "set-budget", "alice", "--monthly-usd", "-1"],
                 ["user", "set-budget", "alice", "--monthly-usd", "1", "--clear"]):
        proc = tf(home, "admin", *args)
        assert proc.returncode == 2 and "nothing was changed" in proc.stderr, (args, proc.stderr)
    teams = json.loads(tf(home, "admin", "team", "list", "--json", check=True).stdout)
    assert teams[0]["monthly_usd"] == 25.0


@pytest.mark.slow
def test_a_teams_two_users_stop_at_the_team_cap_with_the_real_daemon() -> None:
    """Two users of team ml run a job each (no cap of their own); the team's $1.00 stops both,
    saved first, and what is recorded never exceeds it. Carol, in another team, is not stopped."""
    from benchmarks.fault_provider import FAULTS, Faults
    from orchestrator.placing import RECHECK_S
    from orchestrator.queue import submit_spec
    from tests import daemon_world as w

    tmp = Path(tempfile.mkdtemp(prefix="tf-team-budget-"))
    try:
        with w.quiet_logs():
            cfg = w.config(tmp)
            store = Store(cfg.db_path)
            try:
                w.calibrate_fast(store)
                store.create_team("ml", monthly_usd=1.0)
                store.create_team("cv")
                for user, team in (("alice", "ml"), ("bob", "ml"), ("carol", "cv")):
                    store.create_user(user, team)
                prov = w.provider(Faults({f: 0.0 for f in FAULTS}), usd_per_hour=360.0, steps_per_poll=1)
                d = w.daemon(store, cfg, prov)
                ml = [submit_spec(store, w.spec(max_steps=100000, save_steps=50), cfg, owner=u)
                      for u in ("alice", "bob")]
                carols = submit_spec(store, w.spec(max_steps=100000, save_steps=50, max_usd=1.5), cfg, owner="carol")
                t0 = time.monotonic()
                d.run(until_idle=True, max_seconds=120)
                took = time.monotonic() - t0
                try:
                    since = month_start(time.time())
                    team_spend = store.spend_by(team="ml", since=since)
                    print(f"team ml spent ${team_spend:.4f} of $1.00 in {took:.1f} s; carol ${store.spend_by(owner='carol'):.4f}")
                    assert 0 < team_spend <= 1.0 + 1e-9, team_spend  # stopped a horizon short of it
                    assert store.spend_by(owner="alice") > 0 and store.spend_by(owner="bob") > 0
                    for job_id in ml:
                        job = store.get_job(job_id)
                        assert job.state.value == "stopped_budget", job
                        stops = [e.message for e in store.events(job_id) if e.kind == "budget_stop"]
                        assert stops and "team ml's monthly budget $1.00 would be crossed" in stops[0], stops
                    carol = store.get_job(carols)
                    assert carol.state.value == "stopped_budget" and carol.cost_usd <= 1.5 + 1e-9
                    assert carol.cost_usd > 1.0  # the ml team's cap did not stop her
                    assert next(e.message for e in store.events(carols) if e.kind == "budget_stop").endswith(
                        "of its $1.50 cap spent")

                    # alice's own cap, below what she spent: her next job waits, saying why
                    store.set_user_budget("alice", store.spend_by(owner="alice", since=since) / 2)
                    more = submit_spec(store, w.spec(max_steps=100000, save_steps=50), cfg, owner="alice")
                    d.run(until_idle=True, max_seconds=60)
                    job = store.get_job(more)
                    assert job.state.value == "queued" and job.wait_code == "budget_reset", job
                    assert "user alice's monthly budget" in job.reason and "set-budget alice" in job.reason
                    assert job.attempts_count == 0
                    # raised (hers cleared, the team's to $1.60): placed again, and stopped at the team's cap
                    store.set_user_budget("alice", None)
                    store.set_team_budget("ml", 1.6)
                    time.sleep(2 * cfg.scaled(RECHECK_S))  # a daemon that runs on looks again by then
                    d.run(until_idle=True, max_seconds=120)
                    job = store.get_job(more)
                    assert job.state.value == "stopped_budget" and job.attempts_count == 1, job
                    team_spend = store.spend_by(team="ml", since=since)
                    print(f"after the raise: team ml spent ${team_spend:.4f} of $1.60")
                    assert 0 < team_spend <= 1.6 + 1e-9
                finally:
                    d.calls.shutdown()
            finally:
                store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
