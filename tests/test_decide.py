"""decide(): every placement rule in one pure function, each verdict with its reason code."""

from __future__ import annotations

import copy
from pathlib import Path

from jobs.estimate import estimate
from orchestrator.budget import Cap, next_month_start
from orchestrator.decide import Code, JobView, Usage, Verdict, decide
from providers.base import Offer, PriceSource

DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "alpaca-tiny.jsonl"
NOW = 1_800_000_000.0


def spec(**policy) -> dict:
    return {
        "base_model": "meta-llama/Llama-3.1-8B", "adapter": "qlora", "load_in_4bit": True, "lora_r": 16,
        "sequence_len": 1024, "micro_batch_size": 2, "gradient_accumulation_steps": 4, "max_steps": 2000,
        "save_steps": 100, "sample_packing": True, "datasets": [{"path": str(DATA), "type": "alpaca"}],
        "resources": {"gpus": 1, "gpu_vram_gb": "auto", "device": "auto", "cpus": 1},
        "policy": policy, "checkpoint": {"store": "s3://ckpt/jobs", "interval": None, "keep": 3},
    }


EST = estimate(spec())


def gpu(provider="vast", name="A100-80GB", price=1.2, offer_id=None, **kw) -> Offer:
    return Offer(provider=provider, offer_id=offer_id or f"{provider}-{name}-{price}", gpu=name, gpu_count=1,
                 vram_gb=80.0 if "80" in name or name == "H100" else 24.0, usd_per_hour=price,
                 price_source=kw.pop("price_source", PriceSource.LIVE), **kw)


def local_cpu(**kw) -> Offer:
    return Offer(provider="local", offer_id="local-cpu", gpu="cpu", gpu_count=0, vram_gb=0.0, usd_per_hour=0.01,
                 on_premises=True, owned=True, cpus=2, ram_gb=24.0, **kw)


def run(s=None, offers=(), caps=(), usage=None, spent=0.0):
    return decide(JobView("j1", s or spec(), spent), EST, list(offers), list(caps), usage or Usage(), NOW)


def test_places_on_the_cheapest_ready_offer_and_says_why():
    d = run(offers=[gpu(price=2.0, offer_id="dear"), gpu(price=1.0, offer_id="cheap")])
    assert (d.verdict, d.code) == (Verdict.PLACE, Code.CHEAPEST)
    assert d.placement.offer.offer_id == "cheap" and "vast/cheap" in d.text
    assert d.ready == {("vast", "cheap"), ("vast", "dear")}


def test_a_gpu_job_never_gets_the_cpu_and_only_quotes_mean_refusal():
    """The issue's case: CUDA wanted, no GPU but snapshot quotes. It fails at once, saying how to fix it."""
    quote = gpu(price=0.5, price_source=PriceSource.SNAPSHOT)
    d = run(offers=[local_cpu(), quote])
    assert (d.verdict, d.code) == (Verdict.REFUSE, Code.QUOTE_ONLY)
    assert "credentials" in d.text
    # the same quote from a provider this caller cannot launch on
    d = run(offers=[local_cpu(), gpu(provider="together", price=0.5)], usage=Usage(launchable=frozenset({"local"})))
    assert d.code is Code.QUOTE_ONLY


def test_nothing_known_can_run_a_70b_full_fine_tune():
    big = spec()
    big.update(base_model="meta-llama/Llama-3.1-70B", adapter=None, load_in_4bit=False)
    big["resources"]["device"] = "cpu"
    est = estimate(big)
    d = decide(JobView("j", big), est, [local_cpu()], [], Usage(), NOW)
    assert (d.verdict, d.code) == (Verdict.REFUSE, Code.NO_OFFER)
    assert f"needs {est.vram_gb:.0f} GB of memory, has 24 GB" in d.text
    big["resources"]["device"] = "auto"
    d = decide(JobView("j", big), est, [local_cpu(), gpu(name="H100", price=3.0)], [], Usage(), NOW)
    assert d.code is Code.NO_OFFER and "GB per GPU" in d.text and "device: cpu" in d.text


def test_capacity_that_is_busy_full_blocked_or_behind_a_down_provider_means_wait():
    busy = run(s=dict(spec(), resources={"gpus": 0, "device": "cpu", "cpus": 1}),
               offers=[local_cpu(available=False)])
    assert (busy.verdict, busy.code, busy.until) == (Verdict.WAIT, Code.BUSY, None)
    full = run(offers=[gpu()], usage=Usage(live={"vast": 2}, limits={"vast": 2}))
    assert (full.verdict, full.code) == (Verdict.WAIT, Code.BUSY) and "full" in full.text
    o = gpu(offer_id="x")
    blocked = run(offers=[o], usage=Usage(blocked={("vast", "x"): NOW + 120}))
    assert (blocked.verdict, blocked.code, blocked.until) == (Verdict.WAIT, Code.BUSY, NOW + 120)
    down = run(offers=[o], usage=Usage(down={"vast": ("backoff: HTTP 429", NOW + 30)}))
    assert (down.verdict, down.code, down.until) == (Verdict.WAIT, Code.PROVIDERS_DOWN, NOW + 30)
    # a provider that did not answer at all: wait for it, unless the job may not use it anyway
    silent = run(offers=[local_cpu()], usage=Usage(down={"vast": ("no answer within 20 s", None)}))
    assert (silent.verdict, silent.code) == (Verdict.WAIT, Code.PROVIDERS_DOWN)
    elsewhere = run(s=spec(providers=["local"]), offers=[local_cpu()], usage=Usage(down={"vast": ("x", None)}))
    assert elsewhere.verdict is Verdict.REFUSE
    # a blocked offer is skipped for the next one
    nxt = run(offers=[o, gpu(price=5.0, offer_id="y")], usage=Usage(blocked={("vast", "x"): NOW + 1}))
    assert nxt.placement.offer.offer_id == "y"
    assert run(offers=[]).code is Code.NOTHING_OFFERED


def test_a_recently_lost_offer_is_a_last_resort_not_excluded():
    lost, other = gpu(price=1.0, offer_id="lost"), gpu(price=3.0, offer_id="other")
    d = run(offers=[lost, other], usage=Usage(avoid={("vast", "lost"): NOW + 60}))
    assert d.placement.offer.offer_id == "other"
    assert run(offers=[lost], usage=Usage(avoid={("vast", "lost"): NOW + 60})).placement.offer.offer_id == "lost"


def test_late_beats_never():
    d = run(s=spec(deadline=NOW + 60), offers=[gpu()])
    assert (d.verdict, d.code) == (Verdict.LATE, Code.LATE) and "deadline" in d.text
    assert d.placement.offer.offer_id == gpu().offer_id


def test_a_job_cap_below_every_offer_is_refused_with_what_it_would_take():
    d = run(s=spec(max_usd=0.01), offers=[gpu(price=2.0), gpu(price=1.0)])
    assert (d.verdict, d.code) == (Verdict.REFUSE, Code.JOB_CAP)
    assert "vast/vast-A100-80GB-1.0" in d.text and "raise policy.max_usd" in d.text


def test_budgets_wait_for_running_attempts_or_the_month_and_refuse_what_never_fits():
    offer = gpu(price=1.0)
    cost = run(offers=[offer]).placement.est_usd
    reset = next_month_start(NOW)
    held = run(offers=[offer], caps=[Cap("monthly budget", cost * 2, 0.0, cost, cost, resets_at=reset)])
    assert (held.verdict, held.code, held.until) == (Verdict.WAIT, Code.BUDGET_HELD, None)
    spent = run(offers=[offer], caps=[Cap("monthly budget", cost * 2, cost * 1.5, resets_at=reset)])
    assert (spent.verdict, spent.code, spent.until) == (Verdict.WAIT, Code.BUDGET_RESET, reset)
    assert "reset" in spent.text
    huge = run(offers=[offer], caps=[Cap("monthly budget", cost / 2, 0.0, resets_at=reset)])
    assert (huge.verdict, huge.code) == (Verdict.REFUSE, Code.BUDGET_CAP)
    sweep = run(offers=[offer], caps=[Cap("sweep s1 budget_usd", cost * 2, cost * 1.5)])
    assert (sweep.verdict, sweep.code) == (Verdict.REFUSE, Code.BUDGET_CAP)  # a sweep's budget never resets


def test_a_full_sweep_waits():
    assert run(offers=[gpu()], usage=Usage(sweep_full=True)).code is Code.SWEEP_FULL


def test_decide_is_pure_and_ignores_offer_order():
    offers = [gpu(price=p, offer_id=f"o{i}", interruptible=i % 2 == 0, hazard_per_hour=0.1 * (i % 3))
              for i, p in enumerate([1.0, 0.8, 1.5, 0.9, 2.0])]
    s = spec(max_usd=100.0)
    before = copy.deepcopy(s)
    first = run(s=s, offers=offers)
    again = run(s=s, offers=list(reversed(offers)))
    assert first.placement.offer == again.placement.offer and first.text == again.text
    assert s == before  # the spec is not touched
