"""The real daemon against a provider that fails the way real ones do: every error has its action,
every wait its deadline, every cap holds. In-process, time compressed (``tests/daemon_world.py``)."""

from __future__ import annotations

import time

import pytest

from benchmarks.fault_provider import Faults
from infra.storage import open_store
from orchestrator.budget import next_month_start
from orchestrator.states import AttemptState, EndReason, JobState
from orchestrator.store import Store
from tests import daemon_world as w
from tests.faulty_proxy import Rule
from tests.s3_fixtures import aws_env, moto_server, new_bucket, s3_proxy  # noqa: F401 - fixtures



@pytest.fixture(autouse=True, scope="module")
def _quiet_daemon_logs():
    with w.quiet_logs():
        yield


@pytest.fixture
def world(tmp_path):
    cfg = w.config(tmp_path)
    store = Store(cfg.db_path)
    yield tmp_path, cfg, store
    store.close()


def codes(store: Store, job_id: str) -> list[EndReason | None]:
    return [a.end_code for a in store.attempts_for(job_id)]


def test_no_capacity_places_again_at_once_and_charges_nothing(world):
    _, cfg, store = world
    prov = w.provider(Faults({"launch_no_capacity": 1.0}))
    d = w.daemon(store, cfg, prov)
    job = w.submit(store, cfg)
    d.tick()
    # every offer said "no capacity" within the same pass; none counted as a failure or billed
    assert codes(store, job) == [EndReason.NO_CAPACITY] * 3
    assert store.spend_total(job) == 0
    row = store.get_job(job)
    assert row.state is JobState.QUEUED and row.wait_code == "busy" and "blocked" in row.reason
    assert row.wait_until is not None  # looked at again when the first block ends
    prov.faults = Faults.none()
    d.run(until_idle=True, max_seconds=60)
    assert store.get_job(job).state is JobState.SUCCEEDED
    assert codes(store, job)[-1] is EndReason.FINISHED


def test_transient_errors_back_the_provider_off_and_never_count_against_the_job(world):
    _, cfg, store = world
    prov = w.provider(Faults({"launch_transient": 1.0}))
    d = w.daemon(store, cfg, prov)
    job = w.submit(store, cfg)
    before = time.time()
    d.tick()
    health = store.provider_health()["faulty"]
    assert health["state"] == "backoff" and health["until"] >= before + 0.2  # the provider's retry-after
    assert "HTTP 503" in health["reason"]
    # a 503 may hide a rental whose answer was lost: the attempt is looked for by name first
    assert [e.kind for e in store.events(job)].count("launch_unanswered") == 1
    for _ in range(50):
        if not store.live_attempts():
            break
        d.tick()
    assert codes(store, job) == [EndReason.PROVIDER_ERROR]  # not found: never rented, not counted
    assert store.get_job(job).state is JobState.QUEUED
    deadline = time.monotonic() + 30  # five in a row and the provider is disabled a while, and said so
    while time.monotonic() < deadline and store.provider_health()["faulty"]["state"] != "disabled":
        d.tick()
        time.sleep(0.02)
    assert store.provider_health()["faulty"]["state"] == "disabled"
    ended = [c for c in codes(store, job) if c is not None]  # (the newest may still be looked for by name)
    assert len(ended) >= 4 and all(c is EndReason.PROVIDER_ERROR for c in ended)
    assert store.get_job(job).state in (JobState.QUEUED, JobState.LAUNCHING)  # never failed for it
    prov.faults = Faults.none()
    d.run(until_idle=True, max_seconds=60)
    assert store.get_job(job).state is JobState.SUCCEEDED


def test_a_provider_that_always_fails_to_launch_fails_the_job_with_the_last_error(world):
    _, cfg, store = world
    d = w.daemon(store, cfg, w.provider(Faults({"launch_failed": 1.0})))
    job = w.submit(store, cfg)
    d.run(until_idle=True, max_seconds=60)
    row = store.get_job(job)
    assert row.state is JobState.FAILED and "image pull failed" in row.reason
    assert codes(store, job) == [EndReason.LAUNCH_FAILED] * cfg.max_launch_failures
    assert store.spend_total(job) == 0


def test_a_cancel_while_launching_ends_the_job_and_until_idle_exits(world):
    _, cfg, store = world
    prov = w.provider(Faults({"launch_hang": 1.0}), hang_s=2.0)
    d = w.daemon(store, cfg, prov)
    job = w.submit(store, cfg)
    d.tick()
    assert store.get_job(job).state is JobState.LAUNCHING
    store.request_cancel(job)
    d.run(until_idle=True, max_seconds=60)
    assert store.get_job(job).state is JobState.CANCELLED
    assert d.idle()
    assert all(a.state.terminal for a in store.attempts_for(job))
    assert not prov.running()  # whatever the lost launch rented was found by name and destroyed


def test_an_attempt_stuck_in_unknown_is_lost_after_its_deadline_and_its_machine_cancelled(world):
    _, cfg, store = world
    from dataclasses import replace

    cfg = replace(cfg, max_preemptions=1)
    prov = w.provider(Faults({"stuck_unknown": 1.0}))
    d = w.daemon(store, cfg, prov)
    job = w.submit(store, cfg)
    d.run(until_idle=True, max_seconds=60)
    row = store.get_job(job)
    assert row.state is JobState.FAILED and "lost" in row.reason
    assert codes(store, job) == [EndReason.LOST, EndReason.LOST]
    assert any(e.kind == "unknown" for e in store.events(job))
    assert not prov.running()


def test_a_dead_daemon_bills_nothing_for_a_payload_that_died_with_it(world):
    _, cfg, store = world
    prov = w.provider(Faults.none(), usd_per_hour=3600.0, steps_per_poll=1)
    now = [time.time()]
    d = w.daemon(store, cfg, prov)
    d.clock = lambda: now[0]
    job = w.submit(store, cfg, max_steps=1000)
    while store.get_job(job).state is not JobState.RUNNING:
        d.tick()
    for _ in range(3):
        d.tick()
    att = store.live_attempts()[0]
    seen = store.get_attempt(att.id).last_seen_at
    # the daemon dies (it ticks no more); its payload dies with it; a new daemon starts 2,000 s later
    for m in prov.machines.values():  # gone with it, as an embedded Ray's actors are
        m.state, m.ended = "destroyed", now[0]
    now[0] += 2000.0
    d2 = w.daemon(store, cfg, prov)
    d2.clock = lambda: now[0]
    for _ in range(50):  # it reads the payload's last word (progress, newest checkpoint) first
        d2.tick()
        if store.get_attempt(att.id).state.terminal:
            break
    ended = store.get_attempt(att.id)
    assert ended.end_code is EndReason.LOST
    billed = store.spend_total(job)
    assert billed <= 3600.0 * (seen + 2 * d2._tick_s() - att.created_at) / 3600.0  # to its last sign of life
    assert billed < 1.0  # not the 2,000 s the daemon was down ($2,000 at this rate)
    assert store.get_job(job).state in (JobState.QUEUED, JobState.LAUNCHING)  # resumed, not stopped by budget


def test_a_monthly_budget_that_is_spent_waits_for_the_first_and_one_too_big_fails(world):
    from dataclasses import replace

    _, cfg, store = world
    other = w.submit(store, cfg)
    store.request_cancel(other)
    store.add_spend(other, None, provider="faulty", usd=0.99)
    cfg = replace(cfg, budget_monthly_usd=1.0)
    d = w.daemon(store, cfg, w.provider(Faults.none()))
    job = w.submit(store, cfg)
    d.run(until_idle=True, max_seconds=60)
    row = store.get_job(job)
    assert row.state is JobState.QUEUED and row.wait_code == "budget_reset"
    assert row.wait_until == next_month_start(time.time()) and "reset" in row.reason
    d = w.daemon(store, replace(cfg, budget_monthly_usd=0.0001), w.provider(Faults.none()))
    d.run(until_idle=True, max_seconds=60)
    row = store.get_job(job)
    assert row.state is JobState.FAILED and "can never fit" in row.reason and "monthly budget" in row.reason


def test_a_job_that_can_never_run_fails_at_once_with_the_reason(world):
    _, cfg, store = world
    d = w.daemon(store, cfg, w.provider(Faults.none(), gpu=None))  # rents CPU machines only
    greedy = w.submit(store, cfg)
    row = store.get_job(greedy)
    spec = dict(row.spec, resources={**row.spec["resources"], "gpus": 1, "device": "cuda"})
    cuda = store.submit(spec, name="cuda")  # wants a GPU; only CPUs exist here
    cheap = w.submit(store, cfg, max_usd=0.000001)
    d.run(until_idle=True, max_seconds=60)
    assert store.get_job(greedy).state is JobState.SUCCEEDED
    assert store.get_job(cheap).state is JobState.FAILED and "policy.max_usd" in store.get_job(cheap).reason
    assert store.attempts_for(cheap) == []
    failed = store.get_job(cuda)
    assert failed.state is JobState.FAILED and "CPU only" in failed.reason
    assert store.attempts_for(cuda) == []
    assert [e.data.get("code") for e in store.events(cuda) if e.kind == "failed"] == ["no_offer"]


def test_an_answer_that_lands_just_after_the_daemon_looked_is_waited_for_not_skipped(world):
    """The one provider that fits answers in the instant between the daemon's look at its call (not
    done yet) and the decision; the answer is taken on the next look, and the job is never refused
    for lack of an offer that was on its way (a race the chaos test once hit on a loaded machine)."""
    import threading

    _, cfg, store = world
    fits = w.provider(Faults.none(), name="fits")
    dear = w.provider(Faults.none(), name="dear", usd_per_hour=1000.0)  # every offer over the job's cap
    d = w.Daemon(store, cfg, {"fits": fits, "dear": dear})
    gate = threading.Event()
    answer = fits.offers

    def slow_offers(spec, estimate=None):
        gate.wait(10)
        return answer(spec, estimate)

    fits.offers = slow_offers
    take = d.calls.take

    def take_then_finish(key):
        out = take(key)
        if key[:2] == ("offers", "fits") and not out[0] and not gate.is_set():
            gate.set()  # the worker finishes right after the look, before the decision
            d.calls.get(key).future.result(timeout=10)
        return out

    d.calls.take = take_then_finish
    job = w.submit(store, cfg, max_usd_per_hour=100.0)
    d.tick()
    assert gate.is_set()  # the race happened
    row = store.get_job(job)
    assert row.state is JobState.QUEUED, row.reason  # not refused for want of the offer on its way
    d.run(until_idle=True, max_seconds=60)
    assert store.get_job(job).state is JobState.SUCCEEDED
    assert {a.provider for a in store.attempts_for(job)} == {"fits"}


def test_a_payload_killed_between_a_commit_and_its_progress_write_ends_at_that_checkpoint(world):
    """progress.json trails the newest checkpoint when the machine dies right after a commit: the
    attempt's end step and the job's checkpoint are the store's, so the next attempt never starts
    past where the last one is recorded to have ended."""
    _, cfg, store = world
    prov = w.provider(Faults({"killed_after_commit": 1.0}), steps_per_poll=3)
    d = w.daemon(store, cfg, prov)
    job = w.submit(store, cfg, max_steps=40, save_steps=10)
    deadline = time.monotonic() + 60
    while not store.attempts_for(job) or not store.attempts_for(job)[0].state.terminal:
        assert time.monotonic() < deadline
        d.tick()
    first = store.attempts_for(job)[0]
    assert first.end_code is EndReason.PREEMPTED
    progress = store.get_job(job)
    assert (first.end_step, progress.checkpoint_step) == (10, 10)  # progress.json still said step 9
    assert progress.checkpoint_uri and progress.checkpoint_uri.rstrip("/").endswith("10")
    prov.faults = Faults.none()
    d.run(until_idle=True, max_seconds=60)
    attempts = store.attempts_for(job)
    assert store.get_job(job).state is JobState.SUCCEEDED
    assert attempts[1].start_step == first.end_step == 10


def test_one_jobs_broken_store_fails_that_job_alone(world, moto_server):  # noqa: F811
    _, cfg, store = world
    with aws_env(AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s", AWS_DEFAULT_REGION="us-east-1",
                 AWS_ENDPOINT_URL=moto_server, TUNEFLEET_S3_DEADLINE_S="1"):
        d = w.daemon(store, cfg, w.provider(Faults.none()))
        broken = store.submit(dict(store.get_job(w.submit(store, cfg)).spec,
                                   checkpoint={"store": "s3://tunefleet-no-such-bucket/x", "keep": 3}), name="broken")
        d.run(until_idle=True, max_seconds=60)
    healthy = [j for j in store.list_jobs() if j.id != broken]
    assert [j.state for j in healthy] == [JobState.SUCCEEDED]
    row = store.get_job(broken)
    assert row.state is JobState.FAILED and "tunefleet-no-such-bucket" in row.reason and "does not exist" in row.reason


def test_a_store_outage_makes_that_job_wait_and_it_finishes_after(world, moto_server, s3_proxy):  # noqa: F811
    _, cfg, store = world
    bucket = new_bucket(moto_server)
    with aws_env(AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s", AWS_DEFAULT_REGION="us-east-1",
                 AWS_ENDPOINT_URL=s3_proxy.endpoint, TUNEFLEET_S3_DEADLINE_S="0.5"):
        d = w.daemon(store, cfg, w.provider(Faults.none()))
        healthy = w.submit(store, cfg)
        job = store.submit(dict(store.get_job(healthy).spec, checkpoint={"store": f"s3://{bucket}/x", "keep": 3}),
                           name="outage")
        outage = s3_proxy.add(Rule(action="error", status=503, code="ServiceUnavailable"))
        for _ in range(400):
            d.tick()
            if store.get_job(healthy).terminal and store.get_job(job).wait_code == "store_unavailable":
                break
        assert store.get_job(healthy).state is JobState.SUCCEEDED
        row = store.get_job(job)
        assert row.state is JobState.QUEUED and row.wait_code == "store_unavailable" and outage.fired
        s3_proxy.clear()
        d.run(until_idle=True, max_seconds=90)
        assert store.get_job(job).state is JobState.SUCCEEDED


def test_sigterm_to_a_budget_stop_and_a_cancel_are_told_apart(world):
    """A budget stop ends stopped_budget (not cancelled, not preempted), through the control object."""
    _, cfg, store = world
    prov = w.provider(Faults.none(), usd_per_hour=360.0, steps_per_poll=1)
    w.calibrate_fast(store)
    d = w.daemon(store, cfg, prov)
    job = w.submit(store, cfg, max_steps=100000, max_usd=0.5)
    d.run(until_idle=True, max_seconds=90)
    row = store.get_job(job)
    assert row.state is JobState.STOPPED_BUDGET, row
    att = store.attempts_for(job)[-1]
    assert att.end_code is EndReason.BUDGET_STOP and att.state is AttemptState.CANCELLED
    assert att.exit_code == 76  # the payload saw the control object, saved and left
    # status shows the checkpoint the stop saved: the newest committed one, where a resume starts
    from infra.storage import open_store

    latest = open_store(row.spec["checkpoint"]["store"]).latest_checkpoint(job)
    assert latest is not None and row.checkpoint_step == latest.step == att.end_step
    assert 0 < store.spend_total(job) <= 0.5
    assert [e.kind for e in store.events(job)].count("budget_stop") == 1


@pytest.mark.slow
def test_sigterm_stops_the_daemon_in_order_whatever_ray_installed(tmp_path):
    """Ray's ray.init replaces SIGTERM's handler with one that exits 15; the daemon installs its
    own after its providers opened, so systemd's stop is an orderly exit 0."""
    import os
    import signal
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text("ray_num_cpus: 1\nray_num_gpus: 0\n")
    env = {**os.environ, "TUNEFLEET_HOME": str(home), "HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "daemon"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = home / "logs" / "daemon.log"
    deadline = time.monotonic() + 180
    try:
        while not (log.is_file() and "daemon started" in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "daemon stopped" in out and "SIGTERM received" not in out


def test_a_provider_down_at_restart_leaves_the_attempt_unknown_and_its_orphan_is_destroyed_later(tmp_path):
    """A daemon restarted while its provider is unreachable neither fails nor duplicates the
    running attempt: it stays live as unknown. Past unknown_timeout_s it ends lost (the payload, if
    it still runs, is fenced by the next attempt's lease) and its machine is remembered as an
    orphan; once the provider answers again, the reconciler destroys that machine and says so."""
    with w.quiet_logs(), Store(tmp_path / "state.db") as store:
        cfg = w.config(tmp_path, unknown_timeout_s=2.0)
        prov = w.provider(Faults.none(), steps_per_poll=1)
        job_id = w.submit(store, cfg, max_steps=10_000, save_steps=50)
        first = w.daemon(store, cfg, prov)
        first._open_providers()
        for _ in range(200):
            first.tick()
            att = next(iter(store.live_attempts()), None)
            if att is not None and att.state is AttemptState.RUNNING:
                break
        assert att is not None and att.state is AttemptState.RUNNING
        first.calls.shutdown()
        lease = open_store(cfg.default_store).read_json(job_id, "lease.json")
        assert lease["attempt_id"] == att.id  # written before the launch

        prov.down = True  # the provider is unreachable when the daemon comes back
        second = w.daemon(store, cfg, prov)
        second._open_providers()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0:  # well within unknown_timeout_s
            second.tick()
        (live,) = store.live_attempts()
        assert live.id == att.id and live.unknown_since is not None  # unknown, not failed
        assert [a.id for a in store.attempts_for(job_id)] == [att.id]  # and not launched twice
        assert prov.machines[att.id].state == "running"
        while store.live_attempts() and time.monotonic() - t0 < 20:
            second.tick()
        (ended,) = store.attempts_for(job_id)
        assert ended.end_code == "lost" and "once the provider answers" in (ended.end_reason or "")
        assert [o["attempt_id"] for o in store.orphans()] == [att.id]

        prov.down = False  # back: the job runs again, and the old machine is destroyed
        prov.fail_destroys = 1  # the first destroy fails and is tried again
        while time.monotonic() - t0 < 60 and (prov.machines[att.id].state != "destroyed" or store.orphans()
                                               or len(store.attempts_for(job_id)) < 2):
            second.tick()
        second.calls.shutdown()
        assert prov.machines[att.id].state == "destroyed" and store.orphans() == []
        kinds = [e.kind for e in store.events(job_id) if e.attempt_id == att.id]
        assert "unknown" in kinds and "orphan_destroyed" in kinds
        attempts = store.attempts_for(job_id)
        assert len(attempts) == 2 and attempts[1].live
        assert open_store(cfg.default_store).read_json(job_id, "lease.json")["attempt_id"] == attempts[1].id


def test_a_machine_named_like_ours_that_this_store_never_launched_is_left_alone(tmp_path):
    """Another tunefleet home on the same account: its tf-* machine is reported as foreign, never
    destroyed; once it is gone, status stops naming it."""
    from providers.base import LaunchRequest

    with w.quiet_logs(), Store(tmp_path / "state.db") as store:
        cfg = w.config(tmp_path)
        prov = w.provider(Faults.none())
        offer = prov.offers({"resources": {"gpus": 1}})[0]
        prov._rent(LaunchRequest(job_id="jforeign", attempt_id="jforeign.1", spec={"max_steps": 10},
                                 store_uri=cfg.default_store, gpus=1, cpus=1, log_path="-"), offer)
        d = w.daemon(store, cfg, prov)
        d._open_providers()
        t0 = time.monotonic()
        for _ in range(20):  # a provider this store never launched on is not even asked
            d.tick()
        assert store.orphans() == [] and not store.ever_launched_on(prov.name)
        own = w.submit(store, cfg, max_steps=10, save_steps=5)
        while not store.get_job(own).terminal and time.monotonic() - t0 < 20:
            d.tick()
        assert store.get_job(own).state is JobState.SUCCEEDED
        d._listed.clear()  # list again now rather than in RECONCILE_S
        while not store.orphans() and time.monotonic() - t0 < 30:
            d.tick()
        (o,) = store.orphans()
        assert o["resource_id"] == "jforeign.1" and "not destroyed" in o["last_error"]
        for _ in range(20):
            d.tick()
        assert prov.machines["jforeign.1"].state != "destroyed"
        prov._destroy({"attempt_id": "jforeign.1"})  # its owner destroyed it
        d._listed.clear()  # list again now rather than in RECONCILE_S
        while store.orphans() and time.monotonic() - t0 < 40:
            d.tick()
        d.calls.shutdown()
        assert store.orphans() == []
