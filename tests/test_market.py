"""The market simulator (benchmarks.market): it drives the real scheduler, its lower bound is a
bound (no policy pays less for a job it completes), every policy faces the same jobs, traces
round-trip, reclaims follow the true hazard, and --json has the keys machines read. Tiny generated
traces keep it fast. The world's own rules (host factors, waves, outbids, launch failures,
checkpoint writes, exact GPU counts, format 1) are in tests/test_market_world.py."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.market import cli
from benchmarks.market.policies import POLICIES, Tunefleet, TunefleetNoLearning, capacity_bound, job_bounds
from benchmarks.market.run import run_all
from benchmarks.market.sim import Market, Simulator, reload_hours
from benchmarks.market.trace import (
    DEFAULT_TRACE,
    JobTrack,
    MachineTrack,
    MarketParams,
    OfferTrack,
    Trace,
    generate,
    load,
    save,
)
from orchestrator import decide as deciding

POLICY_NAMES = {"tunefleet", "tunefleet_no_learning", "cheapest_effective", "cheapest_per_hour", "on_demand",
                "local_only", "lower_bound"}
TINY = MarketParams(days=1.5, drain_days=1.5, jobs_per_day=10,
                    vast_machines={"RTX4090": 6, "A100-80GB": 2, "H100": 2}, cloud_slots=1, local_gpus=1)
SMALL = MarketParams(days=2.0, drain_days=1.5, jobs_per_day=12,
                     vast_machines={"RTX4090": 10, "A100-80GB": 4, "H100": 3}, cloud_slots=2)


@pytest.fixture(scope="module")
def tiny() -> Trace:
    return generate(TINY, seed=3)


@pytest.fixture(scope="module")
def tiny_run(tiny):
    return run_all(tiny, seed=5)


def test_tunefleet_places_each_attempt_where_the_real_decide_put_it(tiny, monkeypatch):
    calls: list[tuple[str, float, str | None]] = []
    real = deciding.decide

    def spy(job, est, offers, caps, usage, now):
        d = real(job, est, offers, caps, usage, now)
        said = f"{d.placement.offer.provider}/{d.placement.offer.offer_id}" if d.launches else None
        calls.append((job.spec["name"], now, said))
        return d

    monkeypatch.setattr(deciding, "decide", spy)
    result = Simulator(Market(tiny, seed=5), Tunefleet()).run()
    assert calls, "the simulator never called orchestrator.decide.decide"
    assert result.rank_calls == len(calls)
    said = {(name, now): offer for name, now, offer in calls}  # the last answer at that moment
    attempts = [(j.info.spec["name"], tiny.epoch(start), offer) for j in result.jobs for offer, start, *_ in j.log]
    assert attempts, "no attempt was placed"
    for name, now, offer in attempts:
        assert said.get((name, now)) == offer, f"{name} at {now}: ran on {offer}, rank said {said.get((name, now))}"


@pytest.mark.parametrize("which", ["default", "small-1", "small-2"])
def test_lower_bound_is_a_bound_for_every_job_every_policy_completes(which, tiny):
    """No policy pays less for a job it completes than the bound's cost for that job, nor finishes
    it earlier than the bound's earliest finish; the bound completes every job anyone completes
    and misses only deadlines everyone misses."""
    trace = load(DEFAULT_TRACE) if which == "default" else generate(SMALL, seed=int(which[-1]))
    results, summary = run_all(trace, seed=3)
    assert set(results) == POLICY_NAMES
    bounds = job_bounds(Market(trace, seed=3))
    lb = results["lower_bound"]
    assert {j.info.track.id: j.spent for j in lb.jobs if j.finished_h is not None} == {
        k: b.cost for k, b in bounds.items() if math.isfinite(b.earliest_finish_h)
        and b.earliest_finish_h <= trace.horizon_h}
    checked = 0
    for name, res in results.items():
        if name == "lower_bound":
            continue
        for j in res.jobs:
            if j.finished_h is None:
                continue
            b = bounds[j.info.track.id]
            assert j.spent >= b.cost * (1 - 1e-9), (name, j.info.track.id, j.spent, b)
            assert j.finished_h >= b.earliest_finish_h - 1e-9, (name, j.info.track.id)
            checked += 1
        pol = summary["policies"][name]
        assert pol["completed"] <= summary["policies"]["lower_bound"]["completed"], name
        assert pol["deadline_misses"] >= summary["policies"]["lower_bound"]["deadline_misses"], name
    assert checked > 100
    assert lb.reclaims_hit == 0 and all(j.redone_h == 0 for j in lb.jobs)
    # the capacity-aware bound of the jobs every policy but local_only completed: no policy pays less for them
    common = set.intersection(*[{j.info.track.id for j in res.jobs if j.finished_h is not None}
                                for name, res in results.items() if name != "local_only"])
    cap = capacity_bound(Market(trace, seed=3), common)
    assert cap is not None and cap >= sum(bounds[k].cost for k in common) * (1 - 1e-9)
    for name, res in results.items():
        if name not in ("local_only", "lower_bound"):
            assert sum(j.spent for j in res.jobs if j.info.track.id in common) >= cap * (1 - 1e-9), name


def test_every_policy_faces_the_same_jobs(tiny, tiny_run):
    results, summary = tiny_run
    expected = sorted(j.id for j in tiny.jobs)
    assert set(results) == POLICY_NAMES
    for name, res in results.items():
        assert sorted(j.info.track.id for j in res.jobs) == expected, name
        assert summary["policies"][name]["jobs"] == len(expected)
    # ... and the same reclaims: the market is built once per seed
    assert [r.t for r in Market(tiny, 5).reclaims] == [r.t for r in Market(tiny, 5).reclaims]


def test_trace_file_round_trips_to_the_same_results(tmp_path, tiny, tiny_run):
    path = tmp_path / "tiny.json"
    save(tiny, path)
    again = load(path)
    assert again.to_dict() == tiny.to_dict()
    _, summary = run_all(again, seed=5)
    assert summary == tiny_run[1]
    # the seed drives the reclaims: another seed, another stream
    assert [r.t for r in Market(again, 6).reclaims] != [r.t for r in Market(again, 5).reclaims]
    # and generation is deterministic
    assert generate(TINY, seed=3).to_dict() == tiny.to_dict()


def test_json_output_has_the_required_keys(tmp_path, tiny, capsys):
    path = tmp_path / "tiny.json"
    save(tiny, path)
    cli.main(["--trace", str(path), "--seed", "5", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert set(out["policies"]) == POLICY_NAMES
    assert list(out["policies"]) == [cls.name for cls in POLICIES]
    for name, figures in out["policies"].items():
        for key in ("cost_per_completed_job", "completed", "deadline_misses", "work_redone_hours",
                    "total_cost_usd", "mean_completion_hours", "preemptions", "launch_failures",
                    "ratio_vs_lower_bound", "ratio_vs_lower_bound_same_jobs", "ratio_vs_cheapest_effective",
                    "ratio_vs_cheapest_effective_same_jobs", "same_jobs_basis"):
            assert key in figures, (name, key)
    assert out["policies"]["lower_bound"]["ratio_vs_lower_bound_same_jobs"] == 1.0
    assert out["policies"]["cheapest_effective"]["ratio_vs_cheapest_effective_same_jobs"] == 1.0
    assert out["same_jobs"]["excluded"] == ["local_only"] and "local_only" in out["same_jobs"]["set"]
    assert {c["check"].split(" ")[0] for c in out["checks"]} == {"tunefleet"} and len(out["checks"]) == 4
    assert isinstance(out["targets_met"], bool) and out["format"] == "tunefleet-market-trace/2"


def test_gen_seeds_summarise_held_out_markets(tmp_path, tiny, capsys):
    path = tmp_path / "tiny.json"
    save(tiny, path)
    cli.main(["--trace", str(path), "--json", "--gen-seeds", "2", "--set", "days=1", "--set", "drain_days=1",
              "--seeds", "2"])
    out = json.loads(capsys.readouterr().out)
    for key in ("gen_seeds", "seeds"):
        assert out[key]["runs"] == 2
        lo, hi = out[key]["policies"]["tunefleet"]["ratio_vs_cheapest_effective_same_jobs"]
        assert 0 < lo <= hi
        assert len(out[key]["checks_met"]) == 4
    assert out["gen_seeds"]["generator_seeds"] == [1, 2]


def _one_offer_trace(job_spec: dict, warning_prob: float) -> Trace:
    """One job, one interruptible RTX 4090 reclaimed ~1.5 times an hour, listed all the time."""
    horizon = 200.0
    offer = OfferTrack(id="vast/1:bid", machine="m", provider="vast", offer_id="1:bid", gpu="RTX4090", gpu_count=1,
                       vram_gb=24.0, interruptible=True, hazard_per_hour=1.5, warning_prob=warning_prob,
                       region="EU", on_premises=False, owned=False, startup_s=120.0, prices=[[0.0, 0.3]])
    job = JobTrack(id="j1", arrival_h=0.5, deadline_h=None, speed_factor=1.0, spec=job_spec)
    return Trace(horizon_h=horizon, machines=[MachineTrack("m", [[0.0, horizon]])], offers=[offer], jobs=[job],
                 reclaim_hold_h=0.01, hazard_noise=0.0)


@pytest.mark.parametrize("warning_prob", [0.0, 1.0])
def test_a_reclaim_loses_the_work_since_the_last_checkpoint_unless_warned(tiny, warning_prob):
    open_jobs = [j for j in tiny.jobs if j.spec["policy"]["data"] == "open" and j.spec["policy"]["spot"] == "allow"
                 and j.spec["resources"]["gpus"] == 1]
    spec = max(open_jobs, key=lambda j: j.spec["max_steps"] / max(1, j.spec["save_steps"])).spec
    trace = _one_offer_trace(spec, warning_prob)
    market = Market(trace, seed=1)
    # the job's own save_steps (tunefleet proper checkpoints on a time-based interval instead)
    res = Simulator(market, TunefleetNoLearning(), max_preemptions=10_000).run()
    job = res.jobs[0]
    assert job.finished_h is not None, job.failed
    assert job.preemptions >= 2 and res.reclaims_hit == job.preemptions
    offer = market.offer_at[0][0]
    step_h = job.info.true_hours(offer) / job.info.steps
    reclaimed = [a for a in job.log if a.how.startswith("reclaimed")]
    assert len(reclaimed) == job.preemptions and job.log[-1].how == "finished"
    for a in reclaimed:
        startup = offer.startup_s / 3600 + (reload_hours(job.info.est.model.params_b) if a.from_step else 0.0)
        reached = a.from_step + max(0.0, a.end - a.start - startup) / step_h
        assert a.from_step <= a.to_step <= reached + 1e-6
        if warning_prob == 1.0:  # SIGTERM: saved at the step it was on
            assert a.how == "reclaimed, warned" and a.to_step >= int(reached) - 1
        else:  # back to the last checkpoint: a multiple of save_steps
            assert a.how == "reclaimed"
            assert a.to_step == a.from_step or a.to_step % job.info.save_steps == 0
            assert reached - a.to_step < job.info.save_steps
    if warning_prob == 1.0:
        assert job.redone_h < job.preemptions * step_h
    else:
        assert job.preemptions * step_h < job.redone_h <= job.preemptions * job.info.save_steps * step_h
    billed = sum(a.cost for a in job.log)
    assert job.spent == pytest.approx(billed)
    # billed = the work once + the work redone + restarts + the first attempt's start-up (as far as it got)
    first_h = min(job.log[0].end - job.log[0].start, offer.startup_s / 3600)
    hours = job.info.true_hours(offer) + job.redone_h + job.overhead_h + first_h
    assert billed == pytest.approx(offer.usd_per_hour * hours)
    assert job.overhead_h > 0


def test_reclaims_arrive_at_the_true_hazard(tiny):
    market = Market(tiny, seed=11)
    expected = sum(h * tiny.horizon_h for h in market.true_hazard)
    got = len(market.reclaims)
    assert expected > 50
    assert abs(got - expected) < 4 * math.sqrt(expected), (got, expected)
