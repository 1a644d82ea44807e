"""The daemon's queue mechanics, in-process: fast, with the benchmark's instant provider
(a provider whose attempts finish at once: the stand-in for a cloud, at the provider boundary)."""

from __future__ import annotations

import time

from benchmarks.instant_provider import InstantProvider
from infra.config import Config
from jobs.spec import load_job_file
from orchestrator.daemon import Daemon
from orchestrator.queue import submit_spec
from orchestrator.states import JobState
from orchestrator.store import Store
from tests.test_cli import EXAMPLE


def _daemon(tmp_path):
    config = Config(home=tmp_path, default_store=(tmp_path / "ckpt").as_uri(), poll_interval_s=0.0)
    store = Store(config.db_path)
    return store, config, Daemon(store, config, {"instant": InstantProvider()})


def test_jobs_behind_a_full_batch_of_waiting_jobs_still_run(tmp_path):
    store, config, daemon = _daemon(tmp_path)
    spec = load_job_file(EXAMPLE)
    stuck = spec.model_copy(update={"policy": spec.policy.model_copy(update={"providers": ["vast"]})})
    for _ in range(60):  # more than one batch, none placeable (no vast provider in this daemon)
        submit_spec(store, stuck, config)
    runnable = [submit_spec(store, spec, config) for _ in range(3)]
    for _ in range(10):
        daemon.tick()
    assert [store.get_job(j).state for j in runnable] == [JobState.SUCCEEDED] * 3
    assert not daemon.idle()  # capacity was just freed: providers' views may still be settling
    now = [time.time() + 60]
    daemon.clock = lambda: now[0]
    daemon.tick()
    assert daemon.idle()  # the rest wait, each with its reason, and --until-idle may exit
    assert store.count_jobs_by_state()[JobState.QUEUED] == 60
    waiting = [e for e in store.events(store.list_jobs([JobState.QUEUED], limit=1)[0].id) if e.kind == "waiting"]
    assert len(waiting) == 1 and waiting[0].data["code"] == "nothing_offered"
    assert "policy.providers: vast; this daemon runs instant" in waiting[0].message


def test_priority_first_then_oldest_and_one_attempt_each(tmp_path):
    store, config, daemon = _daemon(tmp_path)
    spec = load_job_file(EXAMPLE)
    low = [submit_spec(store, spec, config, priority=0) for _ in range(3)]
    high = submit_spec(store, spec, config, priority=5)
    daemon.tick()
    order = sorted((store.attempts_for(j)[0].created_at, j) for j in [*low, high])
    assert [j for _, j in order] == [high, *low]
    daemon.run(until_idle=True, max_seconds=30)
    for j in [*low, high]:
        assert store.get_job(j).state is JobState.SUCCEEDED and len(store.attempts_for(j)) == 1


def test_a_job_that_cannot_meet_its_deadline_runs_late_and_says_so(tmp_path):
    store, config, daemon = _daemon(tmp_path)
    spec = load_job_file(EXAMPLE)
    import datetime as dt

    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    late = spec.model_copy(update={"policy": spec.policy.model_copy(update={"deadline": past})})
    job_id = submit_spec(store, late, config)
    daemon.run(until_idle=True, max_seconds=30)
    assert store.get_job(job_id).state is JobState.SUCCEEDED
    assert [e.kind for e in store.events(job_id)].count("late") == 1


def test_per_provider_concurrency_limit(tmp_path):
    from dataclasses import replace

    store, config, _ = _daemon(tmp_path)
    config = replace(config, provider_limits=(("instant", 0),))
    daemon = Daemon(store, config, {"instant": InstantProvider()})
    job_id = submit_spec(store, load_job_file(EXAMPLE), config)
    daemon.tick()
    assert store.get_job(job_id).state is JobState.QUEUED and not store.attempts_for(job_id)
    daemon = Daemon(store, replace(config, provider_limits=(("instant", 1),)), {"instant": InstantProvider()})
    daemon.run(until_idle=True, max_seconds=30)
    assert store.get_job(job_id).state is JobState.SUCCEEDED


def test_config_rejects_malformed_provider_limits(tmp_path, monkeypatch):
    import pytest

    from infra.config import ConfigError, load_config

    (tmp_path / "config.yaml").write_text("provider_limits: {vast: many}\n")
    with pytest.raises(ConfigError, match="provider_limits"):
        load_config(tmp_path)
    (tmp_path / "config.yaml").write_text("provider_limits: {vast: 4}\n")
    assert load_config(tmp_path).provider_limit("vast") == 4
