"""A hypothesis state machine drives the real daemon through a random storm of provider faults,
cancels, daemon deaths and store outages, and checks after every step what must always hold:

- never two live attempts for one job;
- attempts per job within the bounds (max_attempts, and each counter within its own bound);
- recorded spend never over a cap: each job's policy.max_usd and the monthly budget;
and at the end: every job is terminal or queued with a stated reason within a bounded number of
ticks, and ``run(until_idle=True)`` returns.

The daemon, its store and its decisions are the real ones; the provider is
``benchmarks.fault_provider`` (its machines run a simulated payload that talks through the real
checkpoint store, here S3 on a moto server behind the fault-injecting proxy). A "kill -9" abandons
the daemon object mid-flight (its threads are left to finish, their answers never read) and starts
a new one on the same store and provider, as a restarted process would.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import Counter as Tally
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from benchmarks.fault_provider import FAULTS, Faults
from infra.storage import StorageError
from orchestrator.budget import month_start
from orchestrator.outcomes import END_RULES, Counter
from orchestrator.store import InvalidTransition, Store
from tests import daemon_world as w
from tests.faulty_proxy import FaultyProxy, Rule
from tests.s3_fixtures import aws_env, new_bucket, shared_moto_endpoint

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _quiet_daemon_logs():
    with w.quiet_logs():
        yield

RATE = 0.06  # each fault class, per call
MONTHLY = 3.0
SETTLE_TICKS = 3000  # "a bounded number of ticks" for every job to end or wait with a reason
SETTLE_S = 120.0  # ...and a wall-clock deadline on that, so a hang fails instead of stalling CI


class DaemonUnderFaults(RuleBasedStateMachine):
    @initialize(seed=st.integers(0, 2**16))
    def start(self, seed):
        self.tmp = Path(tempfile.mkdtemp(prefix="tf-sm-"))
        endpoint = shared_moto_endpoint()
        host, port = endpoint.removeprefix("http://").split(":")
        self.proxy = FaultyProxy(host, int(port)).start()
        self.env = aws_env(AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s", AWS_DEFAULT_REGION="us-east-1",
                           AWS_ENDPOINT_URL=self.proxy.endpoint, TUNEFLEET_S3_DEADLINE_S="0.3")
        self.env.__enter__()
        uri = f"s3://{new_bucket(endpoint)}/jobs"
        self.cfg = w.config(self.tmp, uri, budget_monthly_usd=MONTHLY, max_preemptions=6)
        self.store = Store(self.cfg.db_path)
        w.calibrate_fast(self.store)
        self.prov = w.provider(Faults({f: RATE for f in FAULTS}), seed=seed, usd_per_hour=720.0, hang_s=0.5)
        self.daemon = w.daemon(self.store, self.cfg, self.prov)
        self.jobs: list[str] = []
        self.outage: Rule | None = None
        self.kills = 0

    # ---- what happens ----
    @rule(steps=st.sampled_from([20, 40, 80]), cap=st.one_of(st.none(), st.floats(0.4, 2.0)))
    def submit(self, steps, cap):
        queued = len(self.store.list_jobs(limit=100_000))
        try:
            self.jobs.append(w.submit(self.store, self.cfg, max_steps=steps, save_steps=10, max_usd=cap))
        except StorageError:  # submit uploads the job's inputs: only a store outage refuses it ...
            assert self.outage is not None
            assert len(self.store.list_jobs(limit=100_000)) == queued  # ... and then nothing is queued

    @rule(n=st.integers(1, 8))
    def tick(self, n):
        for _ in range(n):
            self.daemon.tick()

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def cancel(self, data):
        job = data.draw(st.sampled_from(self.jobs))
        try:
            self.store.request_cancel(job)
        except InvalidTransition:
            pass  # already over

    @rule()
    def kill_daemon(self):
        """kill -9: the daemon's memory is gone; its in-flight calls finish unheard."""
        self.kills += 1
        self.daemon = w.daemon(self.store, self.cfg, self.prov)

    @precondition(lambda self: self.outage is None)
    @rule()
    def store_outage(self):
        self.outage = self.proxy.add(Rule(action="error", status=503, code="ServiceUnavailable"))

    @precondition(lambda self: self.outage is not None)
    @rule()
    def store_back(self):
        self.proxy.clear()
        self.outage = None

    # ---- what must always hold ----
    @invariant()
    def one_live_attempt_per_job(self):
        live = Tally(a.job_id for a in self.store.live_attempts())
        assert all(n == 1 for n in live.values()), live

    @invariant()
    def attempts_within_bounds(self):
        for job in self.jobs:
            attempts = self.store.attempts_for(job)
            assert len(attempts) <= self.cfg.max_attempts
            for counter in Counter:
                counted = sum(1 for a in attempts if a.end_code is not None and END_RULES[a.end_code].counter is counter)
                bound = int(getattr(self.cfg, counter.value))
                assert counted <= bound + 1, (job, counter, counted)

    @invariant()
    def spend_within_caps(self):
        for job_id in self.jobs:
            job = self.store.get_job(job_id)
            cap = (job.spec.get("policy") or {}).get("max_usd")
            if cap is not None:
                assert job.cost_usd <= cap + 1e-9, (job_id, job.cost_usd, cap)
        assert self.store.spend_since(month_start(time.time())) <= MONTHLY + 1e-9

    def teardown(self):
        try:
            if self.outage is not None:
                self.proxy.clear()
            deadline = time.monotonic() + SETTLE_S
            for _ in range(SETTLE_TICKS):
                self.daemon.tick()
                if all(w.settled(self.store, j) for j in self.jobs) and not self.store.live_attempts():
                    break
                assert time.monotonic() < deadline, "jobs did not settle in time"
            unsettled = [self.store.get_job(j) for j in self.jobs if not w.settled(self.store, j)]
            assert not unsettled and not self.store.live_attempts(), unsettled
            self.spend_within_caps()
            t0 = time.monotonic()
            self.daemon.run(until_idle=True, max_seconds=SETTLE_S)
            assert time.monotonic() - t0 < SETTLE_S and self.daemon.idle()  # it exited because it was idle
            ledger = self.store.spend_total()
            assert abs(ledger - sum(self.store.get_job(j).cost_usd for j in self.jobs)) < 1e-6
        finally:
            self.daemon.calls.shutdown()
            self.store.close()
            self.proxy.stop()
            self.env.__exit__(None, None, None)
            shutil.rmtree(self.tmp, ignore_errors=True)


TestDaemonUnderFaults = DaemonUnderFaults.TestCase
TestDaemonUnderFaults.settings = settings(
    max_examples=int(os.environ.get("TUNEFLEET_SM_EXAMPLES", "6")), stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much], derandomize=True,
)


def _spend_run(tmp: Path, price: float, caps: list[float | None], monthly: float | None, rate: float, seed: int):
    cfg = w.config(tmp, budget_monthly_usd=monthly)
    store = Store(cfg.db_path)
    w.calibrate_fast(store)
    prov = w.provider(Faults({f: rate for f in FAULTS}), seed=seed, usd_per_hour=price, steps_per_poll=1)
    d = w.daemon(store, cfg, prov)
    jobs = [w.submit(store, cfg, max_steps=100000, save_steps=50, max_usd=c) for c in caps]
    d.run(until_idle=True, max_seconds=120)
    return store, cfg, jobs, d


@settings(max_examples=int(os.environ.get("TUNEFLEET_BUDGET_EXAMPLES", "6")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(price=st.floats(180.0, 720.0), caps=st.lists(st.one_of(st.none(), st.floats(0.4, 1.5)), min_size=1, max_size=3),
       monthly=st.one_of(st.none(), st.floats(0.8, 3.0)), rate=st.sampled_from([0.0, 0.05]), seed=st.integers(0, 999))
def test_recorded_spend_never_exceeds_a_cap_with_the_real_daemon(price, caps, monthly, rate, seed):
    """The budget property against the real daemon (its measured horizon, its control object, its
    stops on a provider whose calls fail and hang), not a model of a daemon that always stops in time.
    Jobs never finish on their own here: only a cap ends them."""
    if monthly is None and all(c is None for c in caps):
        caps = [1.0, *caps[1:]]
    tmp = Path(tempfile.mkdtemp(prefix="tf-budget-"))
    try:
        store, cfg, jobs, d = _spend_run(tmp, price, caps, monthly, rate, seed)
        try:
            for job_id, cap in zip(jobs, caps, strict=True):
                job = store.get_job(job_id)
                assert job.terminal or w.settled(store, job_id), job
                if cap is not None:
                    assert job.cost_usd <= cap + 1e-9, (job.cost_usd, cap)
            if monthly is not None:
                assert store.spend_since(month_start(time.time())) <= monthly + 1e-9
            assert store.spend_total() > 0  # something ran and was billed
            assert any(store.get_job(j).state.value == "stopped_budget" for j in jobs) or monthly is not None
        finally:
            d.calls.shutdown()
            store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
