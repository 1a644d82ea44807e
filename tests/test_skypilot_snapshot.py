"""SkyPilot clouds offline too: with no catalog on this machine, AWS, GCP, Azure, Lambda and RunPod
are quoted from the shipped snapshot of SkyPilot's catalog (providers/snapshots/skypilot.json), as
dated quotes that are never launched from; once `sky check` enables a cloud and its catalog is on
disk, SkyPilot's own catalog prices it instead.

No catalog means SkyPilot is never imported, so these run in-process with SKY_RUNTIME_DIR pointed at
an empty temporary folder; the one scenario that reads a real catalog runs in its own interpreter
(see test_skypilot_offers.py) and is marked slow.
"""

from __future__ import annotations

import json
import re
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import pytest

import providers.skypilot as sp
import providers.skypilot.snapshot as snapshot
from jobs.estimate import estimate
from jobs.gpus import GPUS, canonical_gpu
from orchestrator.decide import Code, JobView, Usage, Verdict, decide
from providers.base import LaunchFailed, PriceSource, ProviderUnavailable
from tests.skypilot_catalog import sample_rows, write_catalog
from tests.test_skypilot_offers import by_id, run_scenario

CLOUDS = ["aws", "azure", "gcp", "lambda", "runpod"]
DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "alpaca-tiny.jsonl"
NOW = 1_800_000_000.0


def qlora(gpus: int = 1, **policy) -> dict:
    return {
        "base_model": "meta-llama/Llama-3.1-8B", "adapter": "qlora", "load_in_4bit": True, "lora_r": 16,
        "sequence_len": 1024, "micro_batch_size": 2, "gradient_accumulation_steps": 4, "max_steps": 2000,
        "save_steps": 100, "sample_packing": True, "datasets": [{"path": str(DATA), "type": "alpaca"}],
        "resources": {"gpus": gpus, "gpu_vram_gb": "auto", "device": "auto", "cpus": 1},
        "policy": policy, "checkpoint": {"store": "s3://ckpt/jobs", "interval": None, "keep": 3},
    }


@pytest.fixture
def bare(tmp_path, monkeypatch):
    """A machine where SkyPilot is installed but never set up: no catalog, no `sky check`."""
    monkeypatch.setenv("SKY_RUNTIME_DIR", str(tmp_path))
    return tmp_path


def test_the_snapshot_file_is_well_formed():
    raw = json.loads(snapshot.SNAPSHOT_PATH.read_text(encoding="utf-8"))
    assert snapshot.SNAPSHOT_PATH.stat().st_size < 1_500_000
    date.fromisoformat(raw["date"])
    assert raw["verified"] == raw["date"] and "skypilot-catalog" in raw["source"] and raw["note"]
    assert raw["columns"] == snapshot.COLUMNS
    assert sorted(raw["clouds"]) == CLOUDS
    for cloud, entry in raw["clouds"].items():
        assert re.fullmatch(r"[0-9a-f]{40}", entry["commit"]), cloud
        assert entry["catalog"].endswith(f"/{cloud}/vms.csv")
        rows = entry["rows"]
        assert len({r[8] for r in rows}) >= 3, f"{cloud}: several regions"
        assert len({(r[0], r[8]) for r in rows}) == len(rows), f"{cloud}: one row per (instance, region)"
        for instance, acc, count, vcpus, mem, vram, price, spot, region in rows:
            where = f"{cloud}/{region}/{instance}"
            gpu = canonical_gpu(acc, vram)
            assert gpu in GPUS and gpu != "cpu", f"{where}: {acc} is not a GPU jobs.gpus knows"
            assert count >= 1 and count == int(count), where
            assert vram >= 8, f"{where}: {vram} GiB per GPU (normalised, not GB-in-MiB)"
            assert abs(vram - GPUS[gpu].vram_gb) <= 0.2 * GPUS[gpu].vram_gb, f"{where}: {vram} GiB for {gpu}"
            assert price > 0 and (spot is None or 0 < spot <= price), where
            assert instance and region, where
            assert vcpus is None or vcpus > 0
            assert mem is None or mem > 0


def test_with_no_catalog_every_cloud_is_quoted_from_the_snapshot(bare):
    snap = snapshot.load_snapshot()
    p = sp.SkyPilotProvider()
    offers = p.offers(qlora(), estimate(qlora()))
    assert p.quoted == CLOUDS and p.skipped == {}
    assert {o.detail("cloud") for o in offers} == set(CLOUDS)
    for o in offers:
        assert o.provider == "skypilot" and o.gpu_count == 1
        assert (o.price_source, o.price_date, o.price_verified) == (PriceSource.SNAPSHOT, snap.date, True)
        assert o.provenance == f"snapshot (verified {snap.date})" and not o.placeholder
        assert o.gpu in GPUS and o.usd_per_hour > 0
        assert o.startup_s == sp.STARTUP_S.get(o.detail("cloud"), sp.DEFAULT_STARTUP_S)
        assert o.hazard_per_hour == (sp.SPOT_HAZARD_PER_HOUR.get(o.detail("cloud"), sp.DEFAULT_SPOT_HAZARD)
                                     if o.interruptible else 0.0)
        assert "sky check" in o.detail("price_basis")
    for cloud in CLOUDS:
        mine = [o for o in offers if o.detail("cloud") == cloud]
        assert len({o.region for o in mine}) >= 3, cloud
        assert any(not o.interruptible for o in mine), cloud
        if cloud != "lambda":  # Lambda's catalog has no spot prices
            assert any(o.interruptible for o in mine), cloud
    assert [o.usd_per_hour for o in offers] == sorted(o.usd_per_hour for o in offers)

    # The rows are SkyPilot's, normalised: RunPod's GB-in-MiB and Azure's bare GpuInfo give real VRAM.
    ids = by_id([o.to_dict() for o in offers])
    g5 = ids["aws/us-east-1/g5.xlarge"]
    assert (g5["usd_per_hour"], g5["gpu"], g5["region"]) == (1.006, "A10G", "us-east-1")
    assert ids["aws/us-east-1/g5.xlarge:spot"]["usd_per_hour"] < 1.006
    assert ids["runpod/US/1x_A100-80GB_SECURE"]["vram_gb"] == 80.0
    assert ids["azure/eastus/Standard_NC24ads_A100_v4"]["gpu"] == "A100-80GB"
    assert ids["azure/eastus/Standard_NC24ads_A100_v4"]["vram_gb"] == 80.0
    assert ids["lambda/us-east-1/gpu_1x_a100_sxm4"]["gpu"] == "A100"

    # Eight GPUs: whole 8-GPU machines only, never a 1-GPU row multiplied.
    eight = p.offers(qlora(gpus=8), None)
    assert eight and all(o.gpu_count == 8 for o in eight)
    assert "aws/us-east-1/p5.48xlarge" in {o.offer_id for o in eight}

    ok, why = p.check()
    assert ok and f"quoting aws, azure, gcp, lambda, runpod from the shipped snapshot of SkyPilot's catalog " \
                  f"({snap.date}; quotes only, never launched from)" in why
    assert "`sky check`" in why


def test_decide_never_launches_on_snapshot_quotes(bare):
    """A job that may only use SkyPilot, when only snapshot quotes fit: refused as QUOTE_ONLY, even
    though they are the cheapest offers that fit; and the provider itself refuses such an offer."""
    spec = qlora(providers=["skypilot"])
    est = estimate(spec)
    p = sp.SkyPilotProvider()
    offers = p.offers(spec, est)
    d = decide(JobView("j1", spec, 0.0), est, offers, [], Usage(), NOW)
    assert (d.verdict, d.code) == (Verdict.REFUSE, Code.QUOTE_ONLY)
    assert not d.launches and d.placement is None
    viable = [pl for pl in d.placements if pl.viable]
    assert viable and {pl.offer.price_source for pl in viable} == {PriceSource.SNAPSHOT}
    assert "skypilot" in d.text

    quote = next(o for o in offers if o.detail("cloud") == "aws")
    with pytest.raises(LaunchFailed, match="quote from the shipped SkyPilot catalog snapshot"):
        p.build_task(SimpleNamespace(attempt_id="a1", secrets={}, payload_env=dict), quote)


@pytest.mark.slow
def test_a_cloud_sky_check_enabled_with_its_catalog_is_priced_by_that_catalog(tmp_path):
    rows = sample_rows()
    write_catalog(tmp_path, {"aws": rows["aws"]})
    result = run_scenario(tmp_path, """
    from sky import global_user_state
    from sky.clouds import cloud
    global_user_state.set_enabled_clouds(["AWS"], cloud.CloudCapability.COMPUTE, "default")
    p = SkyPilotProvider()
    result = {"one": offers(p, 1, 20), "eight": offers(p, 8, 30), "check": p.check(), "quoted": p.quoted}
    """)
    aws = [o for o in result["one"] + result["eight"] if o["extra"]["cloud"] == "aws"]
    # Every AWS offer is the catalog's (its own, made-up-for-tests prices), none the snapshot's.
    assert aws and {o["price_source"] for o in aws} == {"catalog"}
    one = by_id(result["one"])
    assert one["aws/us-east-1/g5.xlarge"]["usd_per_hour"] == 1.006
    assert one["aws/us-west-2/g5.xlarge:spot"]["usd_per_hour"] == 0.4512  # the test catalog's, not the snapshot's
    assert {o["region"] for o in aws} == {"us-east-1", "us-west-2"}  # the snapshot has many more
    assert "aws/ap-northeast-1/g5.xlarge" not in one
    eight = by_id(result["eight"])
    assert eight["aws/us-east-1/p4d.24xlarge"]["usd_per_hour"] == 32.7726
    # The clouds SkyPilot is not set up for are still quoted from the snapshot.
    assert result["quoted"] == ["azure", "gcp", "lambda", "runpod"]
    assert {o["extra"]["cloud"] for o in result["one"] if o["price_source"] == "snapshot"} == {
        "azure", "gcp", "lambda", "runpod"}
    ok, why = result["check"]
    assert ok and why.startswith("SkyPilot 0.14.1 catalog for aws; enabled by `sky check`; quoting azure, gcp, ")


def test_an_unreadable_snapshot_falls_back_to_todays_behaviour(bare, monkeypatch, tmp_path):
    broken = tmp_path / "skypilot.json"
    broken.write_text('{"date": "2026-11-30", "columns": ["nope"]}', encoding="utf-8")
    monkeypatch.setattr(snapshot, "SNAPSHOT_PATH", broken)
    p = sp.SkyPilotProvider()
    with pytest.raises(ProviderUnavailable, match="no SkyPilot catalog could be read offline"):
        p.offers(qlora(), None)
    ok, why = p.check()
    assert not ok and "unreadable" in why


def test_quoting_from_the_snapshot_is_fast(bare):
    """`tunefleet offers` must not get noticeably slower: the file is parsed once, then cached."""
    snapshot._load.cache_clear()
    p = sp.SkyPilotProvider()
    t = time.perf_counter()
    p.offers(qlora(), None)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(5):
        p.offers(qlora(), None)
    again = (time.perf_counter() - t) / 5
    assert first < 0.5 and again < 0.1, (first, again)
