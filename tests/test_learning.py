"""The scheduler learns the market: hazards from attempts (Gamma-Poisson per provider/GPU/host),
checkpoint intervals per placement (Young/Daly), and the price of re-placing a lost job.

Pure parts are checked directly; the store, the daemon and the CLI with the real ones."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.fault_provider import Faults
from jobs.estimate import estimate
from orchestrator.decide import JobView, Usage, decide
from orchestrator.learning import Exposure, MarketModel
from orchestrator.placing import _with_interval
from orchestrator.scheduler import MIN_INTERVAL_H, expected_wall_hours, rank, young_daly
from orchestrator.states import EndReason
from orchestrator.store import Store
from providers.base import Offer, PriceSource
from tests import daemon_world as w
from tests.test_cli import tf
from tests.test_registry import offline_home  # noqa: F401 - fixture

NOW = 1_800_000_000.0
SPEC = {
    "base_model": "meta-llama/Llama-3.1-8B", "adapter": "qlora", "lora_r": 16, "sequence_len": 2048,
    "micro_batch_size": 2, "gradient_accumulation_steps": 4, "max_steps": 2000, "save_steps": 1000,
    "datasets": [{"path": "/dev/null/none.jsonl", "type": "alpaca"}], "resources": {"gpus": 1},
    "checkpoint": {"store": "s3://bucket/prefix"}, "policy": {"spot": "allow", "data": "open"},
}
EST = estimate(SPEC)


def bid(offer_id: str, host: str, usd: float = 0.8, hazard: float = 0.05, gpu: str = "A100-80GB") -> Offer:
    return Offer(provider="vast", offer_id=offer_id, gpu=gpu, gpu_count=1, vram_gb=80.0, usd_per_hour=usd,
                 interruptible=True, hazard_per_hour=hazard, startup_s=300.0, price_source=PriceSource.LIVE,
                 extra=(("machine_id", host),))


def on_demand(offer_id: str, host: str, usd: float) -> Offer:
    return Offer(provider="vast", offer_id=offer_id, gpu="A100-80GB", gpu_count=1, vram_gb=80.0, usd_per_hour=usd,
                 startup_s=300.0, price_source=PriceSource.LIVE, extra=(("machine_id", host),))


# ------------------------------------------------------------------------------------------------
# Learning hazards
# ------------------------------------------------------------------------------------------------
def test_a_host_that_fails_often_is_learned_risky_within_a_few_attempts():
    model = MarketModel()
    bad = bid("1", "bad")
    for _ in range(3):  # three attempts, each reclaimed within two hours
        model.observe(Exposure("vast", "A100-80GB", "bad", 0.05, 1.5, interrupted=True))
    learned = model.learned(bad)
    assert learned.level == "host" and learned.attempts == 3
    assert learned.hazard > 3 * 0.05  # advertised 0.05/h; it behaved like ~0.67/h (the prior still weighs in)
    # ...and rank stops preferring it over a dearer host with no record
    good = bid("2", "fresh", usd=0.82)  # 2.5 % dearer
    first = decide(JobView("j", SPEC), EST, [bad, good], [], Usage(market=model), NOW).placement.offer
    assert first.offer_id == "2"
    assert decide(JobView("j", SPEC), EST, [bad, good], [], Usage(), NOW).placement.offer.offer_id == "1"


def test_a_good_host_is_not_penalised_by_one_reclaim():
    model = MarketModel()
    for _ in range(10):  # 40 h of clean running...
        model.observe(Exposure("vast", "A100-80GB", "good", 0.05, 4.0, interrupted=False))
    model.observe(Exposure("vast", "A100-80GB", "good", 0.05, 2.0, interrupted=True))  # ...then one reclaim
    learned = model.learned(bid("1", "good"))
    assert learned.hazard <= 0.05  # 1 interruption in 42 h is no worse than advertised
    # a host seen once and reclaimed at once is suspect, but far from condemned
    model.observe(Exposure("vast", "A100-80GB", "new", 0.05, 0.5, interrupted=True))
    once = model.learned(bid("2", "new")).hazard
    assert 0.05 < once < 0.05 * 3


def test_hosts_with_no_record_take_their_group_figure_and_other_groups_stay_advertised():
    model = MarketModel()
    for i in range(30):  # the pool behaves 4x worse than advertised across many hosts
        model.observe(Exposure("vast", "A100-80GB", f"h{i}", 0.05, 5.0, interrupted=i % 1 == 0 and i < 30))
    unseen = model.learned(bid("x", "never-seen"))
    assert unseen.level == "group" and unseen.hazard > 0.05 * 2.5
    other = model.learned(bid("y", "h1", gpu="H100"))
    assert other.level == "advertised" and other.hazard == 0.05
    # apply: hazard replaced, advertised kept for the CLI; on-demand offers untouched
    od = on_demand("z", "h1", 1.5)
    applied = model.apply([bid("x", "never-seen"), od])
    assert applied[0].hazard_per_hour == pytest.approx(unseen.hazard)
    assert applied[0].detail("hazard_advertised") == 0.05 and applied[0].detail("hazard_observations") == 30
    assert applied[1].hazard_per_hour == 0 and applied[1].detail("hazard_advertised") is None


def test_a_host_whose_launches_fail_is_priced_for_the_start_ups_it_wastes():
    model = MarketModel()
    for i in range(20):  # the group launches fine...
        model.observe(Exposure("vast", "A100-80GB", f"ok{i}", 0.05, 3.0, interrupted=False))
    for _ in range(3):  # ...this host failed three launches in a row
        model.observe(Exposure("vast", "A100-80GB", "broken", 0.05, 0.0, interrupted=False, launch_failed=True))
    p_bad, n = model.launch_fail("vast", "A100-80GB", "broken")
    p_new, _ = model.launch_fail("vast", "A100-80GB", "never-seen")
    assert n == 3 and p_bad > 0.5 and p_new < 0.1  # the group moves a little (pooled), the host a lot
    assert model.learned(bid("x", "broken")).level != "host"  # failed launches say nothing of its hazard
    broken, fresh = model.apply([bid("b", "broken", usd=0.80), bid("f", "never-seen", usd=0.82)])
    placements = rank(SPEC, EST, [broken, fresh], now=NOW)
    assert placements[0].offer.offer_id == "f"
    by_id = {p.offer.offer_id: p for p in placements}
    startup_h = 300 / 3600
    assert by_id["b"].est_hours - by_id["f"].est_hours > startup_h  # more than one wasted start-up expected


def test_exposures_persist_in_the_store_once_per_attempt(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    try:
        kw = dict(provider="vast", gpu="A100-80GB", gpu_count=1, host="bad", offer_id="1", interruptible=True,
                  advertised=0.05, hours=1.5, interrupted=True, base_model="m", method="qlora", checkpoint_s=20.0)
        assert store.record_exposure(attempt_id="a1", **kw)
        assert not store.record_exposure(attempt_id="a1", **kw)  # a restarted daemon ending it again
        store.record_exposure(attempt_id="a2", **{**kw, "checkpoint_s": 40.0, "interrupted": False})
        store.record_exposure(attempt_id="a3", **{**kw, "interruptible": False, "advertised": 0.0})
        tallies = store.exposure_tallies()
        assert set(tallies) == {("vast", "A100-80GB", "bad")}  # on-demand says nothing about hazards
        t = tallies[("vast", "A100-80GB", "bad")]
        assert (t.attempts, t.interruptions, t.hours, t.expected) == (2, 1, 3.0, pytest.approx(0.15))
        assert store.checkpoint_cost("m", "qlora") in (20.0, 40.0)
        assert store.checkpoint_cost("other", "qlora") is None
        with pytest.raises(ValueError):
            store.record_exposure(attempt_id="a4", **{**kw, "hours": math.nan})
    finally:
        store.close()


# ------------------------------------------------------------------------------------------------
# Checkpoint interval per placement
# ------------------------------------------------------------------------------------------------
def test_young_daly_interval_within_its_floor_and_the_jobs_ceiling():
    c = 30 / 3600
    assert young_daly(0.5, c, ceiling_h=10.0) == pytest.approx(math.sqrt(2 * c / 0.5))
    assert young_daly(1e-6, c, ceiling_h=2.0) == 2.0  # a calm offer: the job's own interval
    assert young_daly(100.0, c, ceiling_h=2.0) == MIN_INTERVAL_H  # never more often than the floor
    assert young_daly(0.0, c, ceiling_h=2.0) == 2.0
    # the optimum really is (near) the best interval under the cost model
    lam, work = 0.3, 10.0
    best = min((expected_wall_hours(work, lam, t / 100, 0.1, c), t / 100) for t in range(5, 300))[1]
    assert young_daly(lam, c, 100.0) == pytest.approx(best, rel=0.15)


def test_each_offer_is_priced_at_its_own_interval_and_the_payload_gets_it():
    calm, risky = bid("calm", "h1", hazard=0.01), bid("risky", "h2", hazard=0.6)
    by_id = {p.offer.offer_id: p for p in rank(SPEC, EST, [calm, risky], now=NOW, checkpoint_s=20.0)}
    assert by_id["risky"].interval_h is not None
    assert by_id["calm"].interval_h is None or by_id["calm"].interval_h > by_id["risky"].interval_h
    fixed = {p.offer.offer_id: p for p in rank(SPEC, EST, [calm, risky], now=NOW, checkpoint_s=20.0,
                                                adaptive_interval=False, price_replacement=False)}
    assert fixed["risky"].est_usd > by_id["risky"].est_usd - by_id["risky"].replace_usd
    # a slow checkpoint (a full fine-tune's optimizer state) is written less often
    slow = {p.offer.offer_id: p for p in rank(SPEC, EST, [calm, risky], now=NOW, checkpoint_s=600.0)}
    assert slow["risky"].interval_h > by_id["risky"].interval_h
    spec = _with_interval(SPEC, by_id["risky"].interval_h)
    assert spec["checkpoint"]["interval_s"] == pytest.approx(by_id["risky"].interval_h * 3600, abs=0.1)
    assert SPEC["checkpoint"].get("interval_s") is None  # the job's own spec is not touched
    assert _with_interval(SPEC, None) is SPEC
    mine = {**SPEC, "checkpoint": {**SPEC["checkpoint"], "interval_s": 60.0}}
    assert _with_interval(mine, 1.0)["checkpoint"]["interval_s"] == 60.0  # the job's own is a ceiling too


# ------------------------------------------------------------------------------------------------
# Re-placement priced
# ------------------------------------------------------------------------------------------------
def test_a_cheap_risky_offer_pays_for_a_dear_fallback_and_not_for_a_cheap_one():
    risky = bid("risky", "h1", usd=0.6, hazard=0.4)
    dear = on_demand("dear", "h2", 2.0)
    placed = {p.offer.offer_id: p for p in rank(SPEC, EST, [risky, dear], now=NOW)}
    inplace = {p.offer.offer_id: p for p in rank(SPEC, EST, [risky, dear], now=NOW, price_replacement=False)}
    assert placed["risky"].fallback == "vast/dear" and placed["risky"].replace_usd > 0
    assert placed["risky"].est_usd == pytest.approx(inplace["risky"].est_usd + placed["risky"].replace_usd)
    assert "if lost" in placed["risky"].reason
    assert placed["dear"].replace_usd == 0  # nothing interrupts it
    cheap = on_demand("cheap", "h3", 0.3)
    with_cheap = {p.offer.offer_id: p for p in rank(SPEC, EST, [risky, cheap], now=NOW)}
    assert with_cheap["risky"].replace_usd == 0  # a cheaper fallback is no premium


def test_an_offer_that_leaves_somewhere_good_to_go_is_preferred():
    """The same bid, twice: once on a host whose cheap on-demand offer goes down with it (the
    fallback must be elsewhere, and elsewhere is dear), once on a host whose loss leaves that
    on-demand offer standing. The second is priced lower."""
    od, far = on_demand("od", "h1", 1.0), on_demand("far", "h3", 3.0)
    same = {p.offer.offer_id: p for p in rank(SPEC, EST, [bid("a", "h1", usd=0.6, hazard=0.4), od, far], now=NOW)}
    other = {p.offer.offer_id: p for p in rank(SPEC, EST, [bid("b", "h2", usd=0.6, hazard=0.4), od, far], now=NOW)}
    assert same["a"].fallback == "vast/far" and other["b"].fallback == "vast/od"
    assert same["a"].est_usd > other["b"].est_usd


# ------------------------------------------------------------------------------------------------
# The daemon records what happened; the CLI shows it
# ------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=False)
def world(tmp_path):
    cfg = w.config(tmp_path)
    store = Store(cfg.db_path)
    yield tmp_path, cfg, store
    store.close()


def test_the_daemon_records_every_attempt_as_an_exposure_and_learns_from_preemptions(world):
    _, cfg, store = world
    prov = w.provider(Faults({"preempt_silent": 0.35}), seed=3, interruptible=True, hazard_per_hour=0.5)
    with w.quiet_logs():
        d = w.daemon(store, cfg, prov)
        job = w.submit(store, cfg, max_steps=40, save_steps=5)
        d.run(until_idle=True, max_seconds=90)
    attempts = [a for a in store.attempts_for(job) if a.end_code is not None]
    preempted = [a for a in attempts if a.end_code in (EndReason.PREEMPTED, EndReason.LOST)]
    assert preempted, "the fault provider should have reclaimed at least one attempt"
    tallies = store.exposure_tallies()
    group = sum(t.interruptions for (p, _, _), t in tallies.items() if p == prov.name)
    assert group == len(preempted)
    assert sum(t.attempts for t in tallies.values()) == len([a for a in attempts if a.billed_from is not None])
    # and the daemon's own model already holds them (no re-read of the store needed)
    groups = {(p, g) for (p, g, _) in tallies if p == prov.name}
    assert d._market is not None
    assert sum(d._market.tallies[(p, g, "")].interruptions for p, g in groups) == len(preempted)
    # the checkpoint seconds the attempts reported are what the next decision for this model uses
    measured = store.checkpoint_cost("tunefleet/tiny-llama", "qlora")
    assert measured is not None and measured > 0
    assert d._checkpoint_cost(store.get_job(job)) == measured


def test_providers_shows_advertised_vs_learned_with_the_evidence(offline_home):
    home = offline_home
    tf(home, "status", check=True)  # creates the store
    store = Store(home / "state.db")
    try:
        for i in range(4):
            store.record_exposure(attempt_id=f"a{i}", provider="vast", gpu="RTX4090", gpu_count=1, host="77",
                                  offer_id="x", interruptible=True, advertised=0.06, hours=1.0, interrupted=True)
    finally:
        store.close()
    rows = {r["provider"]: r for r in json.loads(tf(home, "providers", "--json", check=True).stdout)}
    learned = rows["vast"]["learned"]
    group = next(x for x in learned if x["host"] == "")
    host = next(x for x in learned if x["host"] == "77")
    assert group["attempts"] == 4 and group["interruptions"] == 4
    assert host["advertised_per_hour"] == pytest.approx(0.06) and host["learned_per_hour"] > 4 * 0.06
    assert rows["local"]["learned"] == []
    text = tf(home, "providers", check=True).stdout
    assert "advertised vs learned" in text and "77" in text


def test_offers_all_shows_the_learned_hazard_beside_the_advertised_one(offline_home, tmp_path, monkeypatch):
    from providers.vast import SNAPSHOT_PATH
    from tests.test_cli import EXAMPLE

    job = tmp_path / "open.yaml"
    text = EXAMPLE.read_text().replace("data: restricted", "data: open")
    text = text.replace("checkpoint:\n", "checkpoint:\n  store: s3://team-ckpt/tunefleet\n")
    job.write_text(text.replace("path: data/", f"path: {EXAMPLE.parent}/data/"))
    before = json.loads(tf(offline_home, "offers", str(job), "--json", "--all", check=True).stdout)["offers"]
    spot = next(r for r in before if r["provider"] == "vast" and r["interruptible"] and r["viable"])
    assert spot["hazard_observations"] == 0 and spot["hazard_advertised"] == spot["hazard_per_hour"]
    listing = json.loads(SNAPSHOT_PATH.read_text())["offers"]  # the offer's machine, as Vast lists it
    machine = str(next(o["machine_id"] for o in listing if f"{o['id']}:bid" == spot["offer_id"]))
    with Store(offline_home / "state.db") as store:  # that machine was reclaimed three times in three hours
        for i in range(3):
            store.record_exposure(attempt_id=f"a{i}", provider="vast", gpu=spot["gpu"], gpu_count=spot["gpu_count"],
                                  host=machine, offer_id=spot["offer_id"], interruptible=True,
                                  advertised=spot["hazard_per_hour"], hours=1.0, interrupted=True)
    after = json.loads(tf(offline_home, "offers", str(job), "--json", "--all", check=True).stdout)["offers"]
    row = next(r for r in after if r["offer_id"] == spot["offer_id"])
    assert row["hazard_observations"] == 3 and row["hazard_advertised"] == pytest.approx(spot["hazard_per_hour"])
    assert row["hazard_per_hour"] > 2 * spot["hazard_per_hour"]
    monkeypatch.setenv("COLUMNS", "400")  # the table as a wide terminal shows it
    assert "3 obs" in tf(offline_home, "offers", str(job), "--all", check=True).stdout
