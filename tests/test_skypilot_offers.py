"""SkyPilot provider: offers come from SkyPilot's own catalog code reading a catalog written here.

SkyPilot resolves its catalog and state paths when ``sky`` is imported, so every scenario that
reaches SkyPilot runs in its own Python process with HOME and SKY_RUNTIME_DIR pointing at a fresh
temporary folder (marked slow: ``import sky`` costs seconds). Nothing is downloaded: the catalog
files carry no ``.meta`` md5, so SkyPilot treats them as user-edited.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import providers.skypilot as sp
import providers.skypilot.offers as sp_offers  # where sky_version and list_cloud are looked up
from providers.base import PriceSource, ProviderUnavailable
from tests.skypilot_catalog import sample_rows, write_catalog

REPO = Path(__file__).resolve().parent.parent
MARK = "@@RESULT@@"
PRELUDE = """  # every scenario starts with this
import json, sys, time
from types import SimpleNamespace
from providers.skypilot import SkyPilotProvider
def offers(p, gpus, vram):
    return [o.to_dict() for o in p.offers({"resources": {"gpus": gpus}}, SimpleNamespace(vram_gb=vram))]
"""


def run_scenario(home: Path, body: str, timeout: float = 60.0) -> Any:
    """Run ``body`` in a fresh interpreter with SkyPilot rooted at ``home``; it sets ``result``."""
    script = PRELUDE + textwrap.dedent(body)
    script += f"\nprint({MARK!r} + json.dumps(result))\n"
    env = {**os.environ, "HOME": str(home), "SKY_RUNTIME_DIR": str(home), "PYTHONPATH": str(REPO)}
    env.pop("SKYPILOT_API_SERVER_ENDPOINT", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith(MARK))
    return json.loads(line[len(MARK):])


def by_id(offers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["offer_id"]: o for o in offers}


def test_import_does_not_import_sky():
    code = "import sys, providers.skypilot; assert 'sky' not in sys.modules, 'sky imported'; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_not_installed_says_how_to_install(monkeypatch):
    monkeypatch.setattr(sp_offers, "sky_version", lambda: None)
    p = sp.SkyPilotProvider()
    assert p.check() == (False, "SkyPilot is not installed: pip install 'tunefleet[sky]'")
    with pytest.raises(ProviderUnavailable, match="not installed"):
        p.offers({"resources": {"gpus": 1}}, SimpleNamespace(vram_gb=10))


def test_no_catalog_no_network_is_fast_and_never_touches_sky(tmp_path):
    """No catalog: the clouds of the shipped snapshot are quoted from it (see
    test_skypilot_snapshot.py); a cloud outside it is disabled with the reason and offers() raises
    ProviderUnavailable. Either way fast, and sky is never imported (it would try a download with
    no timeout)."""
    result = run_scenario(tmp_path, """
    p, q, r = SkyPilotProvider(), SkyPilotProvider(clouds=["aws", "lambda"]), SkyPilotProvider(clouds=["oci"])
    t = time.monotonic()
    errors, clouds = [], []
    for prov in (p, q, r):
        try:
            clouds.append(sorted({(o["extra"]["cloud"], o["price_source"]) for o in offers(prov, 1, 10)}))
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    result = {"check": [p.check(), q.check(), r.check()], "errors": errors, "clouds": clouds,
              "s": time.monotonic() - t, "sky": "sky" in sys.modules}
    """)
    assert result["sky"] is False
    assert result["s"] < 3
    (ok_p, why_p), (ok_q, why_q), (ok_r, why_r) = result["check"]
    assert ok_p and "quoting aws, azure, gcp, lambda, runpod from the shipped snapshot" in why_p
    assert ok_q and "quoting aws, lambda from the shipped snapshot" in why_q
    assert not ok_r and "no SkyPilot catalog offline for oci" in why_r
    assert result["clouds"] == [[[c, "snapshot"] for c in ("aws", "azure", "gcp", "lambda", "runpod")],
                                [["aws", "snapshot"], ["lambda", "snapshot"]]]
    # not set up here (a ProviderUnavailable the daemon does not wait for)
    assert len(result["errors"]) == 1
    assert result["errors"][0].startswith("ProviderNotConfigured: no SkyPilot catalog could be read offline")
    assert "oci: no catalog offline" in result["errors"][0]


def test_a_hung_catalog_read_is_abandoned_not_waited_for(tmp_path, monkeypatch):
    """SkyPilot downloads catalogs with no timeout: a read that never returns costs timeout_s once,
    and is not started again while it is still stuck. (Only AWS is asked for: the other clouds would
    be quoted from the shipped snapshot, which test_skypilot_snapshot.py covers.)"""
    write_catalog(tmp_path, {"aws": sample_rows()["aws"]})
    monkeypatch.setenv("SKY_RUNTIME_DIR", str(tmp_path))
    release = threading.Event()
    calls: list[str] = []

    def hang(cloud: str) -> list[Any]:
        calls.append(cloud)
        release.wait(30)
        return []

    monkeypatch.setattr(sp_offers, "list_cloud", hang)
    p = sp.SkyPilotProvider(clouds=["aws"], timeout_s=0.5)
    try:
        for _ in range(2):
            t = time.monotonic()
            with pytest.raises(ProviderUnavailable, match="aws"):
                p.offers({"resources": {"gpus": 1}}, SimpleNamespace(vram_gb=10))
            assert time.monotonic() - t < 2
        assert calls == ["aws"]
        assert "has not returned" in p.skipped["aws"]
    finally:
        release.set()


def test_a_failing_cloud_is_skipped_with_its_reason(tmp_path, monkeypatch):
    rows = sample_rows()
    write_catalog(tmp_path, {"aws": rows["aws"], "lambda": rows["lambda"]})
    monkeypatch.setenv("SKY_RUNTIME_DIR", str(tmp_path))

    def fake(cloud: str) -> list[sp.Row]:
        if cloud == "aws":
            raise RuntimeError("boom")
        return [("gpu_1x_a100_sxm4", "A100", 1.0, 30.0, 200.0, 40.0, 1.29, None, "us-east-1")]

    monkeypatch.setattr(sp_offers, "list_cloud", fake)
    p = sp.SkyPilotProvider()
    offers = p.offers({"resources": {"gpus": 1}}, SimpleNamespace(vram_gb=10))
    catalog = [o.offer_id for o in offers if o.price_source is PriceSource.CATALOG]
    assert catalog == ["lambda/us-east-1/gpu_1x_a100_sxm4"]
    # AWS has a catalog here (it failed to read): never quoted from the snapshot instead
    assert {o.detail("cloud") for o in offers if o.price_source is PriceSource.SNAPSHOT} == {"azure", "gcp", "runpod"}
    assert p.skipped == {"aws": "SkyPilot could not read the aws catalog: RuntimeError: boom"}


@pytest.mark.slow
def test_offers_come_from_skypilots_catalog(tmp_path):
    write_catalog(tmp_path, sample_rows())
    result = run_scenario(tmp_path, """
    p = SkyPilotProvider()
    only = SkyPilotProvider(clouds=["lambda", "gcp"])
    def catalog(p, gpus, vram):  # SkyPilot's catalog only: gcp and azure come from the snapshot here
        return [o for o in offers(p, gpus, vram) if o["price_source"] == "catalog"]
    result = {"check": p.check(), "one_20": catalog(p, 1, 20), "one_30": catalog(p, 1, 30),
              "eight_30": catalog(p, 8, 30), "eight_60": catalog(p, 8, 60), "cpu": p.offers(
              {"resources": {"device": "cpu", "gpus": 0}}, None), "only_check": only.check(),
              "only": offers(only, 1, 20), "only_skipped": only.skipped, "quoted": p.quoted}
    """)
    ok, why = result["check"]
    assert ok and why.startswith("SkyPilot 0.14.1 catalog for aws, lambda, runpod")
    assert "launching needs `sky check` (not run)" in why

    one = by_id(result["one_20"])
    # Both AWS regions of g5.xlarge: SkyPilot keeps only the cheapest unless all_regions=True.
    assert {"aws/us-east-1/g5.xlarge", "aws/us-west-2/g5.xlarge", "aws/us-east-1/g5.xlarge:spot",
            "aws/us-west-2/g5.xlarge:spot", "aws/us-east-1/g6.xlarge", "lambda/us-east-1/gpu_1x_a10",
            "runpod/US/1x_RTX4090_SECURE", "runpod/US/1x_RTX4090_SECURE:spot"} <= set(one)
    g5 = one["aws/us-east-1/g5.xlarge"]
    assert (g5["gpu"], g5["gpu_count"], g5["vram_gb"], g5["usd_per_hour"]) == ("A10G", 1, 24.0, 1.006)
    assert (g5["interruptible"], g5["hazard_per_hour"], g5["on_premises"]) == (False, 0.0, False)
    assert g5["price_source"] == PriceSource.CATALOG.value and g5["region"] == "us-east-1"
    assert g5["extra"]["cloud"] == "aws" and g5["extra"]["instance_type"] == "g5.xlarge"
    assert 240 <= g5["startup_s"] <= 600
    spot = one["aws/us-west-2/g5.xlarge:spot"]
    assert (spot["usd_per_hour"], spot["interruptible"], spot["hazard_per_hour"]) == (0.4512, True, 0.05)
    assert one["aws/us-east-1/g6.xlarge"]["gpu"] == "L4"
    assert one["runpod/US/1x_RTX4090_SECURE"]["vram_gb"] == 24.0  # RunPod's GB-in-MiB field, scaled back
    assert not any(o["interruptible"] for o in result["one_20"] if o["extra"]["cloud"] == "lambda")
    assert all(o["gpu_count"] == 1 for o in result["one_20"])

    # VRAM does not filter: a 30 GB job sees the 24 GB cards too, and the scheduler rejects them
    # with the reason (so `offers --all` can say "needs 30 GB per GPU, has 24 GB").
    assert set(by_id(result["one_30"])) == set(one)
    big = {k for k, o in by_id(result["one_30"]).items() if o["vram_gb"] >= 30}
    assert big == {"lambda/us-east-1/gpu_1x_a100_sxm4", "lambda/us-west-1/gpu_1x_h100_pcie",
                   "runpod/US/1x_A100-80GB_SECURE", "runpod/US/1x_A100-80GB_SECURE:spot"}
    assert by_id(result["one_30"])["runpod/US/1x_A100-80GB_SECURE"]["gpu"] == "A100-80GB"
    assert by_id(result["one_30"])["lambda/us-east-1/gpu_1x_a100_sxm4"]["gpu"] == "A100"

    # Eight GPUs: the whole instance's price; p5 has no spot price in the catalog, so no spot offer.
    eight = by_id(result["eight_30"])
    assert set(eight) == {"aws/us-east-1/p4d.24xlarge", "aws/us-east-1/p4d.24xlarge:spot",
                          "aws/us-east-1/p5.48xlarge", "lambda/us-east-1/gpu_8x_a100_80gb_sxm4"}
    assert eight["aws/us-east-1/p4d.24xlarge"]["usd_per_hour"] == 32.7726
    assert eight["aws/us-east-1/p5.48xlarge"]["gpu"] == "H100"
    assert {k for k, o in by_id(result["eight_60"]).items() if o["vram_gb"] >= 60} == {
        "aws/us-east-1/p5.48xlarge", "lambda/us-east-1/gpu_8x_a100_80gb_sxm4"}
    prices = [o["usd_per_hour"] for o in result["one_20"]]
    assert prices == sorted(prices)
    assert result["cpu"] == []

    assert result["quoted"] == ["azure", "gcp"]  # no catalog, no `sky check`: the snapshot quotes them

    # gcp has no catalog here and `sky check` did not enable it: quoted from the snapshot, not skipped
    ok, why = result["only_check"]
    assert ok and "catalog for lambda" in why and "quoting gcp from the shipped snapshot" in why
    assert {(o["extra"]["cloud"], o["price_source"]) for o in result["only"]} == {
        ("lambda", "catalog"), ("gcp", "snapshot")}
    assert result["only_skipped"] == {}


@pytest.mark.slow
def test_default_clouds_are_those_sky_check_enabled(tmp_path):
    """The enabled-clouds row is written by SkyPilot's own state code; we read it without sky."""
    write_catalog(tmp_path, sample_rows())
    result = run_scenario(tmp_path, """
    from sky import global_user_state
    from sky.clouds import cloud
    global_user_state.set_enabled_clouds(["AWS", "Kubernetes"], cloud.CloudCapability.COMPUTE, "default")
    import providers.skypilot as sp
    p = SkyPilotProvider()
    result = {"enabled": sp.enabled_clouds(), "check": p.check(), "clouds": sorted(
              {(o["extra"]["cloud"], o["price_source"]) for o in offers(p, 1, 20)})}
    """)
    assert result["enabled"] == ["aws"]  # Kubernetes has no price catalog
    ok, why = result["check"]
    assert ok and why.startswith("SkyPilot 0.14.1 catalog for aws; enabled by `sky check`; quoting azure, gcp ")
    # lambda and runpod have catalogs here but `sky check` did not enable them: neither read nor quoted
    assert result["clouds"] == [["aws", "catalog"], ["azure", "snapshot"], ["gcp", "snapshot"]]


def test_vast_is_never_quoted_through_skypilot():
    p = sp.SkyPilotProvider(clouds=["aws", "vast"])
    assert p._targets()[0] == ["aws"]
