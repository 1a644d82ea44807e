"""The market simulator's world disagrees with the scheduler's model, as trace format 2 says: bad
hosts are reclaimed more often than advertised, waves reclaim many attempts at once, bids are
outbid when their price rises, launches fail (billed, blocked, counted), checkpoint writes cost
billed time, a job sees only offers with exactly its GPU count, and policies hear every outcome.
A format 1 trace still loads, as a world that obeys the advertised figures."""

from __future__ import annotations

import math

import pytest

from benchmarks.market.policies import (
    CheapestEffective,
    CheapestPerHour,
    Tunefleet,
    TunefleetNoLearning,
    capacity_bound,
    job_bounds,
)
from benchmarks.market.sim import (
    LAUNCH_BLOCK_S,
    MAX_LAUNCH_FAILURES,
    Choice,
    JobRun,
    Market,
    Outcome,
    Simulator,
)
from benchmarks.market.trace import (
    DEFAULT_TRACE,
    FORMAT_V1,
    JobTrack,
    MachineTrack,
    MarketParams,
    OfferTrack,
    Trace,
    WaveTrack,
    generate,
    load,
    save,
)

TINY = MarketParams(days=1.5, drain_days=1.5, jobs_per_day=10,
                    vast_machines={"RTX4090": 6, "A100-80GB": 2, "H100": 2}, cloud_slots=1, local_gpus=1)


@pytest.fixture(scope="module")
def tiny() -> Trace:
    return generate(TINY, seed=3)


@pytest.fixture(scope="module")
def spec(tiny) -> dict:
    """An open 1-GPU job that may use spot, of a few hours on an RTX 4090."""
    fits = [j for j in tiny.jobs if j.spec["policy"]["data"] == "open" and j.spec["policy"]["spot"] == "allow"
            and j.spec["resources"]["gpus"] == 1 and j.spec["adapter"] == "qlora"]
    out = dict(fits[0].spec)
    out["max_steps"], out["save_steps"] = 400, 100
    return out


def offer(oid: str, machine: str, *, price: float = 0.3, gpu: str = "RTX4090", count: int = 1,
          interruptible: bool = False, hazard: float = 0.0, region: str = "EU", startup_s: float = 120.0,
          prices: list | None = None, **kw) -> OfferTrack:
    vram = {"RTX4090": 24.0, "H100": 80.0, "L4": 24.0, "A100-80GB": 80.0}[gpu]
    return OfferTrack(id=f"vast/{oid}", machine=machine, provider="vast", offer_id=oid, gpu=gpu, gpu_count=count,
                      vram_gb=vram, interruptible=interruptible, hazard_per_hour=hazard, warning_prob=0.0,
                      region=region, on_premises=False, owned=False, startup_s=startup_s,
                      prices=prices or [[0.0, price]], **kw)


def world(offers: list[OfferTrack], jobs: list[JobTrack], horizon: float = 100.0, **kw) -> Trace:
    machines = sorted({o.machine for o in offers})
    return Trace(horizon_h=horizon, machines=[MachineTrack(m, [[0.0, horizon]]) for m in machines], offers=offers,
                 jobs=jobs, reclaim_hold_h=kw.pop("reclaim_hold_h", 0.5), hazard_noise=0.0, **kw)


def job(spec: dict, jid: str = "j1", arrival: float = 0.5, write_s: float = 0.0, **spec_kw) -> JobTrack:
    s = {**spec, "name": jid, **spec_kw}
    return JobTrack(id=jid, arrival_h=arrival, deadline_h=None, speed_factor=1.0, spec=s, checkpoint_write_s=write_s)


class Recorder(Tunefleet):
    name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.outcomes: list[Outcome] = []

    def observe(self, outcome: Outcome) -> None:
        super().observe(outcome)
        self.outcomes.append(outcome)


def test_bad_hosts_are_reclaimed_more_often_than_advertised():
    trace = load(DEFAULT_TRACE)
    market = Market(trace, seed=0)
    factor = {m.id: m.hazard_factor for m in trace.machines}
    got = {"bad": 0, "fair": 0}
    advertised = {"bad": 0.0, "fair": 0.0}
    for i, o in enumerate(trace.offers):
        f = factor[o.machine]
        kind = "bad" if f >= 3 else "fair" if 0.8 <= f <= 1.25 else None
        if kind is None or o.hazard_per_hour <= 0:
            continue
        advertised[kind] += o.hazard_per_hour * trace.horizon_h
        got[kind] += sum(1 for r in market.reclaims if r.offer == i)
        assert market.true_hazard[i] == pytest.approx(o.hazard_per_hour * f, rel=2.0)  # x the per-seed noise
    assert advertised["bad"] > 20 and advertised["fair"] > 50
    assert got["bad"] > 2.5 * advertised["bad"], (got, advertised)
    assert 0.6 * advertised["fair"] < got["fair"] < 1.6 * advertised["fair"], (got, advertised)


def test_a_job_sees_only_offers_with_exactly_its_gpu_count(spec, tiny):
    # a 2-GPU machine at half the price per hour: a 1-GPU job must not be put there, a 2-GPU job must
    offers = [offer("1", "m1", price=0.40), offer("2", "m2", price=0.20, count=2)]
    trace = world(offers, [job(spec, "one"), job(spec, "two", resources={**spec["resources"], "gpus": 2})])
    for pol in (CheapestPerHour(), CheapestEffective(), Tunefleet()):
        res = Simulator(Market(trace, 0), pol).run()
        where = {j.info.track.id: {a.offer for a in j.log} for j in res.jobs}
        assert where == {"one": {"vast/1"}, "two": {"vast/2"}}, pol.name
    # and in a generated market, for every policy
    market = Market(tiny, 5)
    for pol in (Tunefleet(), CheapestEffective(), CheapestPerHour()):
        res = Simulator(market, pol).run()
        count = {o.id: o.gpu_count for o in tiny.offers}
        for j in res.jobs:
            assert all(count[a.offer] == j.info.gpus for a in j.log), (pol.name, j.info.track.id)


def test_checkpoint_writes_add_billed_time(spec):
    o = offer("1", "m1", price=0.5)
    base = Simulator(Market(world([o], [job(spec, write_s=0.0)]), 0), Tunefleet()).run().jobs[0]
    slow = Simulator(Market(world([o], [job(spec, write_s=90.0)]), 0), Tunefleet()).run().jobs[0]
    # saves at steps 100, 200, 300 (not at the end: the final adapter is the job's output)
    assert [a.saves for a in slow.log] == [3] and slow.log[-1].how == "finished"
    assert slow.write_h == pytest.approx(3 * 90 / 3600)
    assert slow.finished_h - base.finished_h == pytest.approx(3 * 90 / 3600)
    assert slow.spent - base.spent == pytest.approx(0.5 * 3 * 90 / 3600)

    class Every(Tunefleet):  # a time-based interval instead of the job's save_steps
        def choose(self, job, offers, now_epoch, avoid, blocked=None):
            chosen = super().choose(job, offers, now_epoch, avoid, blocked)
            return None if chosen is None else Choice(chosen, interval_h=hours / 10)

    hours = slow.info.true_hours(Market(world([o], [job(spec)]), 0).offer_at[0][0])
    timed = Simulator(Market(world([o], [job(spec, write_s=90.0)]), 0), Every()).run().jobs[0]
    assert [a.saves for a in timed.log] == [9]
    assert timed.spent - base.spent == pytest.approx(0.5 * 9 * 90 / 3600)


def test_a_save_in_progress_is_lost_with_the_machine(spec):
    # reclaimed while writing the first checkpoint: back to step 0
    o = offer("1:bid", "m1", interruptible=True, hazard=0.0)
    trace = world([o], [job(spec, write_s=600.0)], waves=[], horizon=60.0)
    market = Market(trace, 0)
    info = market.jobs[0]
    step_h = info.true_hours(market.offer_at[0][0]) / info.steps
    t_save = 0.5 + 120 / 3600 + 100 * step_h  # arrival, start-up, 100 steps: the save starts
    trace.waves = [WaveTrack(round(t_save + 0.05, 6), {"region": "EU"}, 1.0)]
    res = Simulator(Market(trace, 0), Tunefleet()).run()
    first = res.jobs[0].log[0]
    assert first.how == "reclaimed (wave)" and first.to_step == 0 and first.saves == 0
    assert res.jobs[0].redone_h == pytest.approx(100 * step_h)


def test_a_launch_failure_bills_its_startup_blocks_the_offer_and_counts(spec):
    bad = offer("1", "m1", price=0.2, launch_fail_prob=1.0, startup_s=300.0)
    good = offer("2", "m2", price=0.6)
    rec = Recorder()
    res = Simulator(Market(world([bad, good], [job(spec)]), 0), rec).run()
    j = res.jobs[0]
    assert [a.how for a in j.log] == ["launch failed", "finished"]
    failed, ok = j.log
    assert failed.offer == "vast/1" and failed.end - failed.start == pytest.approx(300 / 3600)
    assert failed.cost == pytest.approx(0.2 * 300 / 3600)
    assert ok.offer == "vast/2" and ok.start == pytest.approx(failed.end)  # blocked: the next offer at once
    assert j.launch_failures == 1 and res.launch_failures == 1 and j.finished_h is not None
    assert [o.launch_failed for o in rec.outcomes] == [True, False]
    assert rec.outcomes[0].tokens_per_s is None and rec.outcomes[0].host == "m1"

    # with only the failing offer: every launch waits out the block, and the job fails at the bound
    res = Simulator(Market(world([bad], [job(spec)]), 0), Tunefleet()).run()
    j = res.jobs[0]
    assert [a.how for a in j.log] == ["launch failed"] * MAX_LAUNCH_FAILURES
    assert j.failed == f"launch failed {MAX_LAUNCH_FAILURES} times" and j.finished_h is None
    for a, b in zip(j.log, j.log[1:], strict=False):
        assert b.start == pytest.approx(a.end + LAUNCH_BLOCK_S / 3600)
    assert j.spent == pytest.approx(MAX_LAUNCH_FAILURES * 0.2 * 300 / 3600)


def test_launch_failures_are_drawn_per_offer_job_and_launch():
    trace = load(DEFAULT_TRACE)
    m0, m1 = Market(trace, 0), Market(trace, 0)
    bad = max(range(len(trace.offers)), key=lambda i: trace.offers[i].launch_fail_prob)
    p = trace.offers[bad].launch_fail_prob
    assert p >= 0.3
    draws = [m0.launch_fails(bad, f"j{k:03d}", n) for k in range(1, 60) for n in (1, 2)]
    assert draws == [m1.launch_fails(bad, f"j{k:03d}", n) for k in range(1, 60) for n in (1, 2)]
    assert abs(sum(draws) / len(draws) - p) < 0.2
    assert sum(1 for o in trace.offers if o.launch_fail_prob > 0.25) < 0.15 * len(trace.offers)


def test_a_wave_reclaims_several_attempts_at_the_same_time(spec):
    eu = [offer(f"{k}:bid", f"m{k}", interruptible=True, region="EU") for k in range(3)]
    us = offer("9:bid", "m9", interruptible=True, region="US", price=0.31)
    jobs = [job(spec, f"j{k}", arrival=0.5 + 0.01 * k) for k in range(4)]
    trace = world(eu + [us], jobs, waves=[WaveTrack(2.0, {"region": "EU"}, 1.0)], reclaim_hold_h=1.0)
    res = Simulator(Market(trace, 0), Tunefleet()).run()
    hit = [(j.info.track.id, a.offer) for j in res.jobs for a in j.log if a.how == "reclaimed (wave)"]
    assert len(hit) == 3 and {o for _, o in hit} == {o.id for o in eu}
    assert all(a.end == 2.0 for j in res.jobs for a in j.log if a.how == "reclaimed (wave)")
    assert res.wave_reclaims == 3 and all(j.finished_h is not None for j in res.jobs)
    us_log = [a for j in res.jobs for a in j.log if a.offer == us.id]
    assert us_log and all(not a.how.startswith("reclaimed") for a in us_log)
    # the machines it took are held: nothing starts on them before the holds end
    market = Market(trace, 0)
    held = {market.machine_ids[h.machine]: 2.0 + h.hold_h for h in market.wave_hits}
    for j in res.jobs:
        for a in j.log:
            m = a.offer.split("/")[1].split(":")[0]
            assert not (2.0 <= a.start < held.get(f"m{m}", 0.0)), (a, held)


def test_a_bid_is_outbid_when_its_price_rises_above_the_launch_price(spec):
    rising = offer("1:bid", "m1", interruptible=True, bid=True, prices=[[0.0, 0.2], [2.0, 0.35]])  # +75 %
    falling = offer("2:bid", "m2", interruptible=True, bid=True, prices=[[0.0, 0.21], [2.0, 0.15]])
    trace = world([rising, falling], [job(spec, "a"), job(spec, "b", arrival=0.6)], outbid_k=2.0)
    res = Simulator(Market(trace, 0), Tunefleet()).run()
    first = {j.info.track.id: j.log[0] for j in res.jobs}
    assert first["a"].offer == rising.id and first["a"].how == "reclaimed (outbid)" and first["a"].end == 2.0
    assert first["b"].offer == falling.id and first["b"].how == "finished"
    assert res.outbids == 1
    # a small rise outbids with probability min(1, k x rise): k = 0 never
    trace.outbid_k = 0.0
    res = Simulator(Market(trace, 0), Tunefleet()).run()
    assert res.outbids == 0 and all(a.how == "finished" for j in res.jobs for a in j.log)


def test_real_speed_is_the_table_times_the_gpu_truth_over_the_job_factor(spec):
    o = offer("1", "m1")
    t1 = world([o], [job(spec)])
    t2 = world([o], [job(spec)], speed_truth={"RTX4090": 0.8})
    t2.jobs[0].speed_factor = 1.25
    h1 = Simulator(Market(t1, 0), Tunefleet()).run().jobs[0]
    h2 = Simulator(Market(t2, 0), Tunefleet()).run().jobs[0]
    work1, work2 = (j.finished_h - j.started_h - 120 / 3600 for j in (h1, h2))
    assert work2 == pytest.approx(work1 * 1.25 / 0.8)


def test_policies_hear_every_outcome_and_learn_speeds(tiny):
    rec = Recorder()
    market = Market(tiny, 5)
    res = Simulator(market, rec).run()
    logs = [a for j in res.jobs for a in j.log]
    assert len(rec.outcomes) == len(logs) > 0
    assert sum(o.interrupted for o in rec.outcomes) == sum(a.how.startswith("reclaimed") for a in logs) > 0
    assert sum(o.launch_failed for o in rec.outcomes) == sum(a.how == "launch failed" for a in logs)
    assert sum(o.checkpoint_write_s is not None for o in rec.outcomes) == sum(a.saves > 0 for a in logs)
    by_id = {j.info.track.id: j for j in res.jobs}
    for out in rec.outcomes:
        assert out.offer.detail("host") == out.host and out.hours >= 0
        assert not (out.launch_failed and (out.interrupted or out.tokens_per_s is not None))
        if out.tokens_per_s is not None:  # what the payload would measure: the truth on that offer
            info = by_id[out.job].info
            assert out.tokens_per_s == pytest.approx(info.est.tokens / (info.true_hours(out.offer) * 3600))
    # every offer a policy is shown carries its host
    assert all(o.detail("host") == market.tracks[i].machine for i, at in enumerate(market.offer_at) for o in at)
    # speed learning: the median measured tokens/s per GPU, fed to the estimate
    key = next(iter(rec.measured))
    cal = rec.calibration(*key)
    gpu, tps = next(iter(cal.items()))
    jr = next(JobRun(j.info) for j in res.jobs if rec.model_key(j.info.spec) == key)
    est = rec.estimate(jr)
    assert est.calibrated[gpu] == pytest.approx(tps)
    assert est.hours(gpu) == pytest.approx(est.tokens / tps / 3600)


def test_speed_learning_keeps_the_last_20_per_gpu(tiny):
    pol = TunefleetNoLearning()
    info = Market(tiny, 0).jobs[0]
    jr = JobRun(info)
    assert pol.estimate(jr) is info.est  # nothing learned yet: the table
    o = next(at[0] for at in Market(tiny, 0).offer_at if at[0].gpu_count == 1)
    for k in range(25):
        pol.observe(Outcome(info.track.id, o, "m", 1.0, False, False, False, 1000.0 + k, None))
    values = pol.measured[pol.model_key(info.spec)][o.gpu]
    assert values == [1000.0 + k for k in range(5, 25)]
    assert pol.calibration(*pol.model_key(info.spec))[o.gpu] == pytest.approx((1014 + 1015) / 2)


def test_cheapest_effective_prices_the_job_not_the_hour(spec):
    slow = offer("1", "m1", price=0.30, gpu="L4")  # cheapest per hour, slowest per dollar
    fast = offer("2", "m2", price=0.90, gpu="H100")
    trace = world([slow, fast], [job(spec)])
    ce = Simulator(Market(trace, 0), CheapestEffective()).run().jobs[0]
    cph = Simulator(Market(trace, 0), CheapestPerHour()).run().jobs[0]
    assert [a.offer for a in ce.log] == ["vast/2"] and [a.offer for a in cph.log] == ["vast/1"]
    assert ce.spent < cph.spent


def test_a_format_1_trace_loads_as_a_world_that_obeys_the_model(tmp_path, tiny):
    d = tiny.to_dict()
    d["format"] = FORMAT_V1
    for k in ("speed_truth", "waves", "outbid_k"):
        d.pop(k)
    for m in d["machines"]:
        m.pop("hazard_factor")
    for o in d["offers"]:
        del o["launch_fail_prob"], o["bid"]
    for j in d["jobs"]:
        j.pop("checkpoint_write_s")
    d["hazard_noise"] = 0.0
    v1 = Trace.from_dict(d)
    assert v1.source_format == FORMAT_V1 and v1.speed_truth == {} and v1.waves == [] and v1.outbid_k == 0
    assert all(m.hazard_factor == 1.0 for m in v1.machines)
    assert all(o.launch_fail_prob == 0 and not o.bid for o in v1.offers)
    assert all(j.checkpoint_write_s == 0 for j in v1.jobs)
    market = Market(v1, 4)
    assert market.true_hazard == [o.hazard_per_hour for o in v1.offers]  # true = advertised
    assert market.wave_hits == [] and market.outbid_draws == {}
    res = Simulator(market, Tunefleet()).run()
    assert res.launch_failures == 0 and res.outbids == 0 and res.wave_reclaims == 0
    assert all(j.write_h == 0 for j in res.jobs)
    # saved again it is format 2, with the same world
    save(v1, tmp_path / "v2.json")
    again = load(tmp_path / "v2.json")
    assert again.source_format != FORMAT_V1 and again.to_dict() == v1.to_dict()
    # a format 1 file may not carry format 2 fields
    d["waves"] = []
    with pytest.raises(ValueError, match="format"):
        Trace.from_dict(d)


def test_the_generated_world_disagrees_with_the_model():
    trace = load(DEFAULT_TRACE)
    factors = sorted(m.hazard_factor for m in trace.machines if m.id.startswith("vast-"))
    assert factors[len(factors) // 2] == pytest.approx(1.0, abs=0.25)  # most hosts near 1 ...
    assert sum(f >= 3 for f in factors) >= 3 and sum(f < 0.75 for f in factors) >= 1  # ... some far off
    assert 0.6 < min(trace.speed_truth.values()) and max(trace.speed_truth.values()) < 1.6
    assert len({round(v, 3) for v in trace.speed_truth.values()}) > 3
    weeks = trace.horizon_h / 168
    assert 1.5 * weeks <= len(trace.waves) <= 5 * weeks
    assert all(0 < w.share < 1 for w in trace.waves)
    writes = [j.checkpoint_write_s for j in trace.jobs]
    assert min(writes) >= 10 and max(writes) < 120
    assert {j.spec["resources"]["gpus"] for j in trace.jobs} >= {1, 2}
    assert any(o.bid for o in trace.offers) and all(o.provider == "vast" for o in trace.offers if o.bid)
    assert math.isclose(trace.outbid_k, 2.0)


def test_the_capacity_bound_sees_that_two_jobs_cannot_share_the_cheapest_machine(spec):
    cheap, dear = offer("1", "m1", price=0.1, startup_s=0.0), offer("2", "m2", price=1.0, startup_s=0.0)
    probe = Market(world([cheap], [job(spec)]), 0)
    h = probe.jobs[0].true_hours(probe.offer_at[0][0])
    horizon = 1.5 * h  # the cheap machine can do 1.5 of the 2 jobs' work
    market = Market(world([cheap, dear], [job(spec, "a", arrival=0.0), job(spec, "b", arrival=0.0)],
                          horizon=horizon), 0)
    per_job = job_bounds(market)
    assert [b.cost for b in per_job.values()] == pytest.approx([0.1 * h, 0.1 * h])
    assert capacity_bound(market, {"a", "b"}) == pytest.approx(0.1 * horizon + 1.0 * (2 * h - horizon))
