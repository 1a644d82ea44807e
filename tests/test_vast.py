"""Tests for providers.vast against a real HTTP server that speaks Vast's search API.

The server answers ``POST /api/v0/bundles/`` (the request vastai 1.9.1 sends for
``search offers``) with canned offers per ``type``, and records every request, so the query the
provider builds is checked field by field, as the server sees it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from jobs.estimate import Estimate, ModelShape
from providers.base import (
    LaunchFailed,
    LaunchRequest,
    NoCapacity,
    Offer,
    PriceSource,
    ProviderUnavailable,
    RunState,
    RunStatus,
    TransientError,
)
from providers.remote import bootstrap_script
from providers.vast import SNAPSHOT_PATH, VastProvider, hazard_per_hour, map_status, outbid_per_hour
from tests.vast_stub import VastStub, offer_row

KEY = "vk-test-SECRET-0123456789abcdef"
SNAPSHOT_DATE = json.loads(SNAPSHOT_PATH.read_text())["date"]


def machine(id_: int, gpu_name: str, num_gpus: int, gpu_ram: int, dph: float, bid: float, rel: float,
            **more: Any) -> dict[str, Any]:
    return {
        "id": id_, "machine_id": id_ * 10, "gpu_name": gpu_name, "num_gpus": num_gpus, "gpu_ram": gpu_ram,
        "gpu_total_ram": gpu_ram * num_gpus, "dph_total": dph, "min_bid": bid, "reliability": rel,
        "inet_down": 1000.0, "inet_up": 800.0, "geolocation": "Texas, US", "hosting_type": 0,
        "verified": True, "rentable": True, "score": 100.0, **more,
    }


FAST_4090 = machine(101, "RTX 4090", 1, 24564, 0.40, 0.30, 0.99, hosting_type=1)
FLAKY_4090 = machine(102, "RTX 4090", 1, 24564, 0.33, 0.25, 0.96, inet_down=50.0, geolocation="Poland, PL")
A100_80 = machine(103, "A100 SXM4", 1, 81920, 1.20, 0.85, 0.999, datacenter=True, hosting_type=0)
TWO_GPUS = machine(104, "RTX 4090", 2, 24564, 0.80, 0.60, 0.99)  # a server that ignored num_gpus
GOOD = [FAST_4090, FLAKY_4090, A100_80, TWO_GPUS]


class VastServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict[str, Any]] = []
        self.mode = "ok"  # ok | 500 | garbage | nooffers | sleep | 401
        self.offers: dict[str, list[Any]] = {"on-demand": GOOD, "bid": GOOD}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def bodies(self) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests]


class Handler(BaseHTTPRequestHandler):
    server: VastServer

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        mode = self.server.mode
        if self.path != "/api/v0/bundles/":
            return self._send(404, b'{"error": "not found"}')
        if mode == "sleep":
            time.sleep(1.0)
            try:
                self._send(200, b'{"offers": []}')
            except OSError:  # the client gave up, as it should
                pass
            return None
        if mode == "401":
            return self._send(401, b'{"success": false, "error": "invalid_api_key"}')
        if mode == "500":  # a careless server echoing the credentials it got
            return self._send(500, f"Internal error for {self.headers.get('Authorization')}".encode(), "text/plain")
        if mode == "garbage":
            return self._send(200, b"<html>not json{")
        if mode == "nooffers":
            return self._send(200, b'{"success": true}')
        offers = self.server.offers.get(str((body or {}).get("type")), [])
        return self._send(200, json.dumps({"offers": offers}).encode())


@pytest.fixture
def server() -> Iterator[VastServer]:
    srv = VastServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    monkeypatch.delenv("VAST_URL", raising=False)
    return home


def estimate(vram_gb: float) -> Estimate:
    shape = ModelShape(7.0, 4096, 32, 128_000, "model name")
    return Estimate(method="qlora", model=shape, vram_gb=vram_gb, weights_gb=5.0, activations_gb=vram_gb - 5.0,
                    examples=1000, tokens=1_000_000, steps=100, tokens_per_step=10_000.0, tokens_per_s_a100=2400.0)


def spec(gpus: int = 1) -> dict[str, Any]:
    return {"base_model": "meta-llama/Llama-2-7b-hf", "resources": {"gpus": gpus, "gpu_vram_gb": "auto"}}


def live(server: VastServer, **kw: Any) -> VastProvider:
    return VastProvider(api_key=KEY, url=server.url, **kw)


def string_values(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from string_values(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from string_values(v)


# --- the request -------------------------------------------------------------------------------


def test_query_is_vast_search_shape_field_by_field(server: VastServer) -> None:
    VastProvider(api_key=KEY, url=server.url, min_reliability=0.97).offers(spec(gpus=2), estimate(20.5))
    assert [r["path"] for r in server.requests] == ["/api/v0/bundles/", "/api/v0/bundles/"]
    types = [b["type"] for b in server.bodies()]
    assert sorted(types) == ["bid", "on-demand"]
    for req in server.requests:
        body = req["body"]
        assert req["headers"]["Authorization"] == f"Bearer {KEY}"
        assert body["num_gpus"] == {"eq": 2} and type(body["num_gpus"]["eq"]) is int
        assert body["gpu_ram"] == {"gte": 20500}  # MB per GPU
        assert body["reliability"] == {"gte": 0.97}
        assert body["verified"] == {"eq": True}
        assert body["rentable"] == {"eq": True}
        assert body["external"] == {"eq": False}
        assert isinstance(body["limit"], int) and body["limit"] > 0
        assert isinstance(body["allocated_storage"], float)
        price_field = "min_bid" if body["type"] == "bid" else "dph_total"
        assert body["order"] == [[price_field, "asc"]]
        # structured values only: every filter is {op: number|bool}, and no string holds a quote
        for name in ("num_gpus", "gpu_ram", "reliability", "verified", "rentable", "external"):
            (value,) = body[name].values()
            assert isinstance(value, int | float | bool)
        for value in string_values(body):
            assert '"' not in value and "'" not in value and " " not in value, value


def test_gpu_count_at_least_one_and_key_from_files(server: VastServer, clean_env: Path) -> None:
    (clean_env / ".vast_api_key").write_text("legacy-key\n")
    VastProvider(url=server.url).offers(spec(gpus=0), estimate(6.0))
    assert server.requests[-1]["headers"]["Authorization"] == "Bearer legacy-key"
    assert server.requests[-1]["body"]["num_gpus"] == {"eq": 1}
    keydir = clean_env / ".config" / "vastai"
    keydir.mkdir(parents=True)
    (keydir / "vast_api_key").write_text("config-key")
    VastProvider(url=server.url).offers(spec(), estimate(6.0))
    assert server.requests[-1]["headers"]["Authorization"] == "Bearer config-key"


def test_url_and_key_from_environment(server: VastServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAST_URL", server.url)
    monkeypatch.setenv("VAST_API_KEY", "env-key")
    offers = VastProvider().offers(spec(), estimate(20.0))
    assert offers and server.requests[0]["headers"]["Authorization"] == "Bearer env-key"


# --- mapping -----------------------------------------------------------------------------------


def test_offers_are_mapped(server: VastServer) -> None:
    prov = live(server)
    offers = {o.offer_id: o for o in prov.offers(spec(), estimate(20.0))}
    assert set(offers) == {"101", "102", "103", "101:bid", "102:bid", "103:bid"}  # 104 has 2 GPUs
    today = datetime.now(UTC).date().isoformat()
    for o in offers.values():
        assert o.provider == "vast" and o.price_source is PriceSource.LIVE and o.price_date == today
        assert o.gpu_count == 1 and not o.on_premises
        assert o.interruptible == o.offer_id.endswith(":bid")
    fast, fast_bid = offers["101"], offers["101:bid"]
    assert fast.gpu == "RTX4090" and fast.vram_gb == pytest.approx(24.564)
    assert fast.usd_per_hour == pytest.approx(0.40) and fast_bid.usd_per_hour == pytest.approx(0.30)
    assert offers["103"].gpu == "A100-80GB" and offers["103"].vram_gb == pytest.approx(81.92)
    assert fast.region == "Texas, US" and offers["102"].region == "Poland, PL"
    assert fast.detail("datacenter") is True and offers["102"].detail("datacenter") is False
    assert offers["103"].detail("datacenter") is True
    assert fast.detail("reliability") == 0.99 and fast.detail("machine_id") == 1010
    assert fast.detail("inet_down_mbps") == 1000.0 and fast.detail("inet_up_mbps") == 800.0
    assert offers["102"].startup_s > fast.startup_s >= 180.0  # 50 Mb/s pulls the image slowly
    # hazard: lower reliability -> higher; interruptible above on-demand of the same machine
    assert offers["102"].hazard_per_hour > fast.hazard_per_hour > offers["103"].hazard_per_hour > 0
    for oid in ("101", "102", "103"):  # plus the outbid rate at the bid's depth below the machine's ask
        depth = offers[f"{oid}:bid"].usd_per_hour / offers[oid].usd_per_hour
        assert offers[f"{oid}:bid"].hazard_per_hour == pytest.approx(offers[oid].hazard_per_hour
                                                                      + outbid_per_hour(depth))


def test_a_deeper_bid_is_outbid_more_often() -> None:
    ratios = [0.3, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    rates = [outbid_per_hour(r) for r in ratios]
    assert rates == sorted(rates, reverse=True)
    assert rates[0] == rates[1] == pytest.approx(0.5) and rates[-1] == rates[-2] == pytest.approx(0.05)
    assert 0.05 < outbid_per_hour(None) < 0.5  # depth unknown: the snapshot's median depth
    assert hazard_per_hour(0.99, True, 0.5) > hazard_per_hour(0.99, True, 0.85) > hazard_per_hour(0.99, False)


def test_hazard_model_is_monotone() -> None:
    rel = [0.5, 0.9, 0.95, 0.97, 0.99, 0.999, 1.0]
    od = [hazard_per_hour(r, False) for r in rel]
    assert od == sorted(od, reverse=True) and len(set(od)) == len(od) and od[-1] == 0.0
    assert all(hazard_per_hour(r, True) > h for r, h in zip(rel, od, strict=True))


def test_vram_filter_applies_to_live_answers(server: VastServer) -> None:
    offers = live(server).offers(spec(), estimate(40.0))
    assert {o.offer_id for o in offers} == {"103", "103:bid"}


def test_malformed_offers_are_skipped(server: VastServer) -> None:
    bad = [
        "not an object",
        {"id": 201, "gpu_name": "RTX 4090"},  # fields missing
        {**FAST_4090, "id": 202, "dph_total": "0.5", "min_bid": None},  # price not a number
        {**FAST_4090, "id": 203, "reliability": 1.7},
        {**FAST_4090, "id": None},
    ]
    server.offers = {"on-demand": [*bad[:3], FLAKY_4090, *bad[3:]], "bid": [bad[1], FAST_4090]}
    prov = live(server)
    offers = prov.offers(spec(), estimate(20.0))
    assert sorted(o.offer_id for o in offers) == ["101:bid", "102"]
    ok, why = prov.check()
    assert ok and "live" in why


# --- degrading ---------------------------------------------------------------------------------


def assert_snapshot(offers: list[Any], gpus: int = 1) -> None:
    """Snapshot offers: the job's GPU count, any VRAM (the scheduler rejects the small ones with
    the reason, so `offers --all` shows every offer Vast is known to have)."""
    assert offers
    for o in offers:
        assert o.price_source is PriceSource.SNAPSHOT and o.price_date == SNAPSHOT_DATE
        assert o.gpu_count == gpus
        assert o.detail("reliability") >= 0.95
    assert any(o.interruptible for o in offers) and any(not o.interruptible for o in offers)


def test_no_key_uses_snapshot_and_says_why(server: VastServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAST_URL", server.url)
    prov = VastProvider()
    offers = prov.offers(spec(), estimate(20.0))
    assert_snapshot(offers)
    assert {o.gpu for o in offers} >= {"RTX4090", "A100-80GB", "H100"}
    eight = prov.offers(spec(gpus=8), estimate(70.0))
    assert_snapshot(eight, gpus=8)
    assert {o.gpu for o in eight} == {"A100-80GB", "H100", "RTX4090"}
    assert server.requests == []
    assert prov.check() == (
        False,
        "no Vast.ai API key (set VAST_API_KEY or ~/.config/vastai/vast_api_key); "
        f"showing snapshot prices (verified {SNAPSHOT_DATE}; ids are made up: quotes only)",
    )


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("500", "HTTP 500"), ("garbage", "malformed JSON"), ("nooffers", "no 'offers' list"), ("sleep", "timed out")],
)
def test_failures_degrade_to_snapshot(server: VastServer, mode: str, reason: str,
                                      capfd: pytest.CaptureFixture[str]) -> None:
    server.mode = mode
    prov = live(server, timeout_s=0.3)
    started = time.monotonic()
    offers = prov.offers(spec(), estimate(20.0))
    assert time.monotonic() - started < 1.0  # one failed request, not one per offer type
    assert len(server.requests) == 1
    assert_snapshot(offers)
    ok, why = prov.check()
    assert not ok and why.startswith("degraded: ") and reason in why and SNAPSHOT_DATE in why
    assert KEY not in why
    out, err = capfd.readouterr()
    assert KEY not in out + err


def test_unreachable_api_degrades() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    prov = VastProvider(api_key=KEY, url=f"http://127.0.0.1:{port}", timeout_s=0.5)
    assert_snapshot(prov.offers(spec(), estimate(20.0)))
    ok, why = prov.check()
    assert not ok and "could not reach Vast.ai" in why and KEY not in why


def test_every_offer_malformed_degrades(server: VastServer) -> None:
    server.offers = {"on-demand": [{"id": 1}, {"id": 2}], "bid": []}
    prov = live(server)
    assert_snapshot(prov.offers(spec(), estimate(20.0)))
    assert "malformed" in prov.check()[1]


def test_rejected_key(server: VastServer, capfd: pytest.CaptureFixture[str]) -> None:
    server.mode = "401"
    prov = live(server)
    assert_snapshot(prov.offers(spec(), estimate(20.0)))
    ok, why = prov.check()
    assert not ok and "rejected the API key" in why and KEY not in why
    # check() alone probes with a one-offer search
    fresh = live(server)
    ok, why = fresh.check()
    assert not ok and "rejected the API key" in why
    assert server.requests[-1]["body"]["limit"] == 1
    out, err = capfd.readouterr()
    assert KEY not in out + err


def test_check_probes_a_live_api(server: VastServer) -> None:
    ok, why = live(server).check()
    assert ok and server.url in why and KEY not in why
    assert len(server.requests) == 1 and server.requests[0]["body"]["type"] == "on-demand"


# --- cache -------------------------------------------------------------------------------------


def test_offers_are_cached_per_query(server: VastServer) -> None:
    prov = live(server)
    first = prov.offers(spec(), estimate(20.0))
    second = prov.offers(spec(), estimate(20.0))
    assert first == second and len(server.requests) == 2  # one per offer type
    prov.offers(spec(), estimate(40.0))  # another query
    assert len(server.requests) == 4
    nocache = live(server, cache_ttl_s=0.0)
    nocache.offers(spec(), estimate(20.0))
    nocache.offers(spec(), estimate(20.0))
    assert len(server.requests) == 8


def test_concurrent_callers_search_once(server: VastServer) -> None:
    prov = live(server)
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(len(prov.offers(spec(), estimate(20.0)))))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert results == [6, 6, 6, 6] and len(server.requests) == 2


# --- renting, against tests/vast_stub.py ---------------------------------------------------------

SECRETS = {"AWS_SECRET_ACCESS_KEY": "aws-SECRET-value-42", "HF_TOKEN": "hf-SECRET-token-77"}
ATTEMPT = "job-1-a1"


@pytest.fixture
def stub() -> Iterator[VastStub]:
    asks = [offer_row(101, "RTX 4090", dph_total=0.40, min_bid=0.30),
            offer_row(103, "A100 SXM4", gpu_ram=81920, dph_total=1.20, min_bid=0.85)]
    with VastStub(offers={"on-demand": asks, "bid": asks}, api_key=KEY) as s:
        yield s


def renter(stub: VastStub, **kw: Any) -> VastProvider:
    return VastProvider(api_key=KEY, url=stub.url, verify_wait_s=0.0, cache_ttl_s=0.0, **kw)


def request(attempt_id: str = ATTEMPT, secrets: dict[str, str] | None = None) -> LaunchRequest:
    return LaunchRequest(job_id="job-1", attempt_id=attempt_id, spec=spec(), store_uri="s3://bucket/runs", gpus=1,
                         cpus=4, log_path="/tmp/x.log", env={"HF_HOME": "/cache"},
                         secrets=dict(SECRETS if secrets is None else secrets))


def pick(prov: VastProvider, offer_id: str) -> Offer:
    (offer,) = [o for o in prov.offers(spec(), estimate(20.0)) if o.offer_id == offer_id]
    return offer


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in (KEY, *SECRETS.values()):
            assert secret not in text


def test_bid_rental_rents_the_ask_at_the_bid(stub: VastStub, capfd: pytest.CaptureFixture[str]) -> None:
    prov = renter(stub)
    assert prov.launchable is True
    offer = pick(prov, "101:bid")
    handle = prov.launch(request(), offer)
    (put,) = stub.calls("PUT")
    assert put.path == "/api/v0/asks/101/" and put.headers["Authorization"] == f"Bearer {KEY}"
    body = put.body
    assert body["price"] == pytest.approx(0.30) == offer.usd_per_hour  # the scheduler's bid
    assert body["label"] == f"tf-{ATTEMPT}" and body["client_id"] == "me" and body["disk"] == prov.disk_gb
    assert body["image"] == "pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime"
    assert body["runtype"] == "args" and body["onstart"] == "bash" and body["args"][0] == "-c"
    assert body["args"][1] == bootstrap_script()  # the one bootstrap, shared with SkyPilot
    env = body["env"]
    # no wheel shipped with this request: the bootstrap installs the package named instead
    assert env["TUNEFLEET_PACKAGE"] == "tunefleet[train,s3]"
    assert env["TUNEFLEET_JOB_ID"] == "job-1" and env["TUNEFLEET_ATTEMPT_ID"] == ATTEMPT
    assert env["TUNEFLEET_STORE"] == "s3://bucket/runs" and json.loads(env["TUNEFLEET_SPEC_JSON"]) == spec()
    assert env["HF_HOME"] == "/cache" and all(env[k] == v for k, v in SECRETS.items())
    iid = handle["instance_id"]
    assert stub.env_of(iid)["HF_TOKEN"] == SECRETS["HF_TOKEN"]  # the machine gets them
    assert handle == {"instance_id": iid, "ask_id": 101, "bid": pytest.approx(0.30), "gpu": "RTX4090", "num_gpus": 1}
    # verified right after the rent, through show instance
    show = stub.calls("GET", f"/api/v0/instances/{iid}/")
    assert show and show[0].query == {"owner": "me"} and stub.requests.index(show[0]) > stub.requests.index(put)
    assert stub.destroyed == [] and prov.poll(handle).state is RunState.RUNNING
    out, err = capfd.readouterr()
    assert_no_secret(json.dumps(handle), out, err)


def test_on_demand_rental_sends_no_price(stub: VastStub) -> None:
    prov = renter(stub, image="my/image:1", package_spec="tunefleet[train] @ https://example.com/t.whl")
    handle = prov.launch(request(), pick(prov, "103"))
    (put,) = stub.calls("PUT")
    assert put.path == "/api/v0/asks/103/" and "price" in put.body and put.body["price"] is None
    assert put.body["image"] == "my/image:1"
    assert put.body["env"]["TUNEFLEET_PACKAGE"] == "tunefleet[train] @ https://example.com/t.whl"
    assert handle["bid"] is None and handle["gpu"] == "A100-80GB" and handle["ask_id"] == 103
    assert stub.instances[handle["instance_id"]]["is_bid"] is False


def test_wrong_gpu_is_refused_and_destroyed(stub: VastStub, capfd: pytest.CaptureFixture[str]) -> None:
    stub.wrong_gpu = "RTX 3090"  # what SkyPilot's dropped filters can rent
    prov = renter(stub)
    chosen = r"rented 1x RTX3090 .*instead of the chosen 1x RTX4090.*destroyed it"
    with pytest.raises(LaunchFailed, match=chosen) as info:
        prov.launch(request(), pick(prov, "101:bid"))
    (delete,) = stub.calls("DELETE")
    assert stub.destroyed == [7001] and delete.path == "/api/v0/instances/7001/" and stub.instances == {}
    out, err = capfd.readouterr()
    assert_no_secret(str(info.value), out, err)


@pytest.mark.parametrize(
    ("offer_id", "change", "why"),
    [
        ("101:bid", {"ignore_bid": True}, "on-demand, not interruptible"),  # the spot request sent on demand
        ("101:bid", {"rent_overrides": {"num_gpus": 2}}, "2 GPUs, not 1"),
        ("101", {"rent_overrides": {"machine_id": 999}}, "machine 999, not 1010"),
        ("101:bid", {"rent_overrides": {"bid_price": 0.90, "dph_total": 0.90}}, r"\$0.9000/h, not \$0.3000/h"),
        ("101", {"rent_overrides": {"is_bid": True}}, "interruptible, not on-demand"),
        ("103", {"rent_overrides": {"gpu_ram": 40960}}, "GPU A100, not A100-80GB"),
        ("101", {"rent_overrides": {"gpu_name": None}}, "no GPU model reported"),
        ("101", {"rent_overrides": {"dph_total": None}}, "no price reported"),
    ],
)
def test_any_other_rental_is_destroyed(stub: VastStub, offer_id: str, change: dict[str, Any], why: str) -> None:
    for name, value in change.items():
        setattr(stub, name, value)
    prov = renter(stub)
    with pytest.raises(LaunchFailed, match=why):
        prov.launch(request(), pick(prov, offer_id))
    assert stub.destroyed == [7001] and stub.instances == {}


def test_unverifiable_rental_is_destroyed(stub: VastStub) -> None:
    stub.fail("GET", "/api/v0/instances/", 503, times=3)
    with pytest.raises(TransientError, match="could not verify Vast.ai instance 7001.*destroyed it"):
        renter(stub).launch(request(), pick(renter(stub), "101"))
    assert stub.destroyed == [7001]


@pytest.mark.parametrize(
    ("status", "body", "headers", "error", "match"),
    [
        (200, {"success": False, "msg": "no longer available"}, {}, NoCapacity, "did not rent ask 101: no longer"),
        (200, {"success": True}, {}, LaunchFailed, "no 'new_contract'"),
        (404, {"success": False, "error": "no_such_ask"}, {}, NoCapacity, "no longer available"),
        (400, {"success": False, "error": "invalid_args", "msg": "bad env aws-SECRET-value-42"}, {},
         LaunchFailed, r"HTTP 400 .*bad env \*\*\*"),
        (429, {"success": False}, {"Retry-After": "7"}, TransientError, "HTTP 429"),
        (502, {"success": False}, {}, TransientError, "HTTP 502"),
        (401, {"success": False, "error": "invalid_api_key"}, {}, ProviderUnavailable, "rejected the API key"),
    ],
)
def test_rent_answers(stub: VastStub, status: int, body: dict[str, Any], headers: dict[str, str],
                      error: type[Exception], match: str) -> None:
    prov = renter(stub)
    offer = pick(prov, "101")
    stub.fail("PUT", "/api/v0/asks/", status, body=body, headers=headers)
    with pytest.raises(error, match=match) as info:
        prov.launch(request(), offer)
    assert_no_secret(str(info.value))
    if status == 429:
        assert info.value.retry_after_s == 7.0  # type: ignore[attr-defined]
    assert stub.instances == {}


def test_an_ask_rented_already_is_no_capacity(stub: VastStub) -> None:
    prov = renter(stub)
    offer = pick(prov, "101")
    prov.launch(request("a1"), offer)
    with pytest.raises(NoCapacity, match="ask 101 is no longer available"):
        prov.launch(request("a2"), offer)


def test_a_lost_rent_answer_is_found_and_destroyed(stub: VastStub) -> None:
    prov = renter(stub)
    offer = pick(prov, "101")
    stub.rent_answer_delay_s = 1.0  # the rental happens; its answer comes after the client gave up
    with pytest.raises(TransientError, match="timed out"):
        VastProvider(api_key=KEY, url=stub.url, timeout_s=0.3).launch(request(), offer)
    assert stub.destroyed == [7001]
    (listing,) = stub.calls("GET", "/api/v1/instances/")
    assert json.loads(listing.query["select_filters"]) == {"label": {"in": [f"tf-{ATTEMPT}", ATTEMPT]}}


def test_launch_refuses_what_it_cannot_rent(stub: VastStub, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot_offer = VastProvider().offers(spec(), estimate(20.0))[0]  # no key: from the snapshot
    with pytest.raises(NoCapacity, match="snapshot price"):
        renter(stub).launch(request(), snapshot_offer)
    live_offer = pick(renter(stub), "101")
    with pytest.raises(LaunchFailed, match="clashing: \\['TUNEFLEET_STORE'\\]"):
        renter(stub).launch(request(secrets={"TUNEFLEET_STORE": "x"}), live_offer)
    with pytest.raises(LaunchFailed, match="malformed: \\['-p 22:22'\\]"):
        renter(stub).launch(request(secrets={"-p 22:22": "1"}), live_offer)
    with pytest.raises(ProviderUnavailable, match="no Vast.ai API key"):
        VastProvider(url=stub.url).launch(request(), live_offer)
    assert stub.calls("PUT") == []


# --- poll / cancel / release / handle_for ---


@pytest.mark.parametrize(
    ("raw", "state"),
    [("loading", RunState.PENDING), ("created", RunState.PENDING), (None, RunState.PENDING),
     ("running", RunState.RUNNING), ("stopped", RunState.LOST), ("offline", RunState.LOST),
     ("exited", RunState.EXITED), ("frobnicating", RunState.UNKNOWN), (42, RunState.UNKNOWN)],
)
def test_status_mapping_is_total(raw: Any, state: RunState) -> None:
    status = map_status({"actual_status": raw})
    assert status.state is state
    assert status.exit_code is None
    assert map_status(None).state is RunState.LOST


def test_poll_follows_the_instance(stub: VastStub) -> None:
    prov = renter(stub)
    stub.status_on_rent = "loading"
    handle = prov.launch(request(), pick(prov, "101:bid"))
    iid = handle["instance_id"]
    assert prov.poll(handle).state is RunState.PENDING
    stub.set_status(iid, "running")
    assert prov.poll(handle).state is RunState.RUNNING
    stub.fail("GET", f"/api/v0/instances/{iid}/", 503)
    assert prov.poll(handle).state is RunState.UNKNOWN  # transient: ask again later
    stub.set_status(iid, "frobnicating")
    assert prov.poll(handle).state is RunState.UNKNOWN
    stub.set_status(iid, "exited")
    assert prov.poll(handle) == RunStatus(RunState.EXITED, exit_code=None, detail="the container exited")
    stub.outbid(iid)
    lost = prov.poll(handle)
    assert lost.state is RunState.LOST and lost.detail.startswith("paused: outbid or host lost")
    del stub.instances[iid]
    assert prov.poll(handle).state is RunState.LOST  # 404
    stub.gone_as_null = True
    assert prov.poll(handle).state is RunState.LOST  # {"instances": null}
    assert prov.poll({}).state is RunState.LOST
    url = stub.url
    stub.stop()  # nothing listens there now
    assert VastProvider(api_key=KEY, url=url, timeout_s=0.5).poll(handle).state is RunState.UNKNOWN


def test_cancel_is_idempotent_and_release_destroys_a_paused_instance(stub: VastStub) -> None:
    prov = renter(stub)
    first = prov.launch(request("a1"), pick(prov, "101:bid"))
    prov.cancel(first, grace_s=30.0)
    prov.cancel(first)  # gone already: 404 is fine
    assert stub.destroyed == [first["instance_id"]] and len(stub.calls("DELETE")) == 2
    prov.cancel({})
    second = prov.launch(request("a2"), pick(prov, "103:bid"))
    stub.fail("DELETE", "/api/v0/instances/", 503)
    with pytest.raises(TransientError):
        prov.cancel(second)  # the daemon asks again
    stub.outbid(second["instance_id"])  # paused, its disk still billing
    prov.release(second)
    assert stub.destroyed == [first["instance_id"], second["instance_id"]] and stub.instances == {}
    prov.release(second)  # again: fine
    stub.fail("DELETE", "/api/v0/instances/", 500, times=2)
    prov.release({"instance_id": 12345})  # never raises


def test_handle_for_finds_the_instance_by_label(stub: VastStub) -> None:
    prov = renter(stub)
    launched = prov.launch(request("job-1-a1"), pick(prov, "101:bid"))
    prov.launch(request("job-1-a2"), pick(prov, "103"))
    assert prov.handle_for("job-1-a1") == launched
    (listing,) = stub.calls("GET", "/api/v1/instances/")
    assert json.loads(listing.query["select_filters"]) == {"label": {"in": ["tf-job-1-a1", "job-1-a1"]}}
    assert prov.handle_for("job-1-a9") is None
    stub.ignore_list_filters = True  # a server ignoring the filter: labels are checked here
    assert prov.handle_for("job-1-a1") == launched and prov.handle_for("job-1-a9") is None
    stub.fail("GET", "/api/v1/instances/", 503)
    with pytest.raises(TransientError):
        prov.handle_for("job-1-a1")  # None would read as "never launched"


def test_handle_for_reads_every_page(stub: VastStub) -> None:
    for iid in range(1, 61):  # 60 rows, the newest one ours: three pages of 25
        stub.instances[iid] = {"id": iid, "label": ATTEMPT if iid in (5, 60) else "other", "gpu_name": "RTX 4090",
                               "num_gpus": 1, "is_bid": False, "dph_total": 0.4}
    stub.ignore_list_filters = True
    handle = renter(stub).handle_for(ATTEMPT)
    assert handle is not None and handle["instance_id"] == 60 and handle["gpu"] == "RTX4090"
    assert len(stub.calls("GET", "/api/v1/instances/")) == 3


# --- the stub's runner: a local process plays the rented machine ---


def test_runner_plays_the_machine(stub: VastStub) -> None:
    procs: dict[int, subprocess.Popen[bytes]] = {}
    seen: dict[int, tuple[dict[str, str], str]] = {}

    def runner(iid: int, env: dict[str, str], script: str) -> subprocess.Popen[bytes]:
        seen[iid] = (env, script)
        slow = env["TUNEFLEET_ATTEMPT_ID"].endswith("slow")
        code = "import time; time.sleep(60)" if slow else "import sys; sys.exit(3)"
        procs[iid] = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env})
        return procs[iid]

    stub.runner, stub.stopper = runner, lambda iid: procs[iid].kill()
    try:
        prov = renter(stub)
        quick = prov.launch(request("a-quick"), pick(prov, "101"))
        env, script = seen[quick["instance_id"]]
        assert env["HF_TOKEN"] == SECRETS["HF_TOKEN"] and "exec \"$PY\" -m jobs.train" in script
        procs[quick["instance_id"]].wait(timeout=10)
        deadline = time.monotonic() + 10
        while prov.poll(quick).state is not RunState.EXITED and time.monotonic() < deadline:
            time.sleep(0.05)
        assert prov.poll(quick) == RunStatus(RunState.EXITED, exit_code=None, detail="the container exited")
        assert stub.exit_codes[quick["instance_id"]] == 3

        slow = prov.launch(request("a-slow"), pick(prov, "103:bid"))
        stub.outbid(slow["instance_id"])  # stopper kills the process; the instance is paused, not exited
        assert procs[slow["instance_id"]].wait(timeout=10) != 0
        deadline = time.monotonic() + 10
        while slow["instance_id"] not in stub.exit_codes and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stub.instances[slow["instance_id"]]["actual_status"] == "stopped"
        assert prov.poll(slow).state is RunState.LOST
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(timeout=10)
