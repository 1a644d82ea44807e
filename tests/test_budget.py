"""Hard caps: recorded spend never exceeds a cap; a job that cannot fit is told why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.budget import Cap, Shortfall, launch_refusal, month_start, must_stop, next_month_start, usd
from tests.test_cli import EXAMPLE, tf

money = st.floats(0, 1000, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(limit=money, spent=money, running=money, committed=money, est=money)
def test_a_launch_that_fits_keeps_everything_under_the_cap(limit, spent, running, committed, est):
    cap = Cap("job", limit, spent, running, committed)
    refusal = launch_refusal([cap], est)
    if refusal is None:
        assert spent + running + committed + est <= limit + 1e-9
    else:
        assert "job" in refusal.why and usd(limit) in refusal.why
        assert (refusal.kind is Shortfall.NEVER) == (est > limit - spent + 1e-12)
        assert refusal.until is None
    monthly = launch_refusal([Cap("monthly budget", limit, spent, running, committed, resets_at=1e9)], est)
    if monthly is not None and est > limit - spent + 1e-12:  # a cap that resets: wait for it unless too big
        assert monthly.kind is (Shortfall.RESET if est <= limit + 1e-12 else Shortfall.NEVER)
        assert monthly.until == (1e9 if monthly.kind is Shortfall.RESET else None)


@settings(max_examples=300, deadline=None)
@given(limit=st.floats(1, 1000), rate=st.floats(0.01, 500), horizon=st.floats(1, 600),
       ticks=st.lists(st.floats(0.1, 1.0), min_size=1, max_size=200))
def test_stopping_at_the_horizon_never_overruns(limit, rate, horizon, ticks):
    """Simulate a daemon that checks at irregular intervals (each <= 1 s <= horizon) and, once a
    check says stop, has the attempt gone within the rest of the horizon (the daemon's horizon is
    two polls + the stop grace, so a stop decided one poll late still ends in time): recorded spend
    stays under the cap."""
    spent, t = 0.0, 0.0
    for dt in ticks:
        cap = Cap("job", limit, spent, rate * t / 3600)
        if must_stop(cap, rate, horizon):
            stop_after = horizon - 1.0  # the previous check was at most 1 s ago
            spent += rate * (t + stop_after) / 3600
            break
        t += dt
    else:
        spent += rate * t / 3600
    if rate * horizon / 3600 <= limit:  # a cap smaller than one horizon cannot be honoured by anyone
        assert spent <= limit + 1e-9


def test_money_shows_enough_digits_to_tell_small_amounts_apart():
    assert usd(0.0001) == "$0.00010" and usd(0.0) == "$0.00" and usd(0.00012) == "$0.00012"
    assert usd(0.05) == "$0.050" and usd(0.456) == "$0.46" and usd(12.345) == "$12.35"
    assert usd(1234.5) == "$1,234.50" and usd(0.0001) != usd(0.0)


def test_month_window():
    t = 1_795_000_000.0  # 2026-11-17
    start = month_start(t)
    assert time.gmtime(start)[:6] == (2026, 11, 1, 0, 0, 0)
    assert time.gmtime(next_month_start(t))[:6] == (2026, 12, 1, 0, 0, 0)
    assert time.gmtime(next_month_start(1_796_083_200.0 + 20 * 86400))[:3] == (2027, 1, 1)  # from December


@pytest.mark.slow
def test_running_attempt_is_stopped_at_its_cap_and_resumes_when_raised(tmp_path, model_cache):
    home = tmp_path / "home"
    home.mkdir()
    # the CPU costs $0.50 a second here, so the cap is reached within seconds
    (home / "config.yaml").write_text(
        "poll_interval_s: 0.5\nstop_grace_s: 2\nlocal_cpu_watts: 100000\nusd_per_kwh: 18\n"
    )
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["datasets"][0]["path"] = str((EXAMPLE.parent / doc["datasets"][0]["path"]).resolve())
    doc["policy"]["max_usd"] = 8.0
    doc["save_steps"] = 20
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    job_id = json.loads(tf(home, "submit", str(tmp_path / "job.yaml"), "--json", check=True).stdout)["id"]

    from orchestrator.store import Store

    with Store(home / "state.db") as store:  # an optimistic throughput and checkpoint: the estimate fits the cap
        store.record_throughput(base_model="tunefleet/tiny-llama", method="qlora", gpu="cpu", gpu_count=1,
                                tokens_per_s=1e7)
        store.record_exposure(attempt_id="calibration", provider="(calibration)", gpu="cpu", gpu_count=1, host="",
                              offer_id="-", interruptible=False, advertised=0.0, hours=0.0, interrupted=False,
                              base_model="tunefleet/tiny-llama", method="qlora", checkpoint_s=1e-6)
    env = {**os.environ, "TUNEFLEET_HOME": str(home), "TUNEFLEET_MODEL_CACHE": str(model_cache)}
    daemon = [sys.executable, "-m", "orchestrator.cli", "daemon", "--until-idle", "--max-seconds", "300"]
    proc = subprocess.run(daemon, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = json.loads(tf(home, "status", job_id, "--json", check=True).stdout)
    assert status["state"] == "stopped_budget", status
    with Store(home / "state.db") as store:
        assert 0 < store.spend_total(job_id) <= 8.0  # never over the cap
    events = json.loads(tf(home, "events", job_id, "--json", check=True).stdout)
    assert [e["kind"] for e in events if e["kind"] in ("budget_stop", "stopped_budget")] == ["budget_stop", "stopped_budget"]

    # raising the cap resumes it from where it stopped, and it finishes
    tf(home, "resume", job_id, "--max-usd", "1000", check=True)
    proc = subprocess.run(daemon, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = json.loads(tf(home, "status", job_id, "--json", check=True).stdout)
    assert status["state"] == "succeeded", status
    assert status["attempts"] == 2
    with Store(home / "state.db") as store:
        assert store.spend_total(job_id) <= 1000.0
    spend = json.loads(tf(home, "spend", "--json", check=True).stdout)
    assert spend["groups"][0]["key"] == job_id and spend["total_usd"] == pytest.approx(status["cost_usd"], rel=1e-6)


def test_a_job_bigger_than_the_monthly_budget_is_refused_with_the_reason(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text("budget_monthly_usd: 0.000001\nlocal_cpu_watts: 100000\nusd_per_kwh: 18\n")
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["datasets"][0]["path"] = str((EXAMPLE.parent / doc["datasets"][0]["path"]).resolve())
    del doc["policy"]["max_usd"]  # only the monthly budget applies
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    job_id = json.loads(tf(home, "submit", str(tmp_path / "job.yaml"), "--json", check=True).stdout)["id"]
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "daemon", "--until-idle", "--max-seconds", "120"],
        env={**os.environ, "TUNEFLEET_HOME": str(home)}, capture_output=True, text=True, timeout=200,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = json.loads(tf(home, "status", job_id, "--json", check=True).stdout)
    assert status["state"] == "failed" and "monthly budget" in status["reason"]
    assert status["attempts"] == 0 and status["cost_usd"] == 0
