"""Tests for providers.vast against a real HTTP server that speaks Vast's search API.

The server answers ``POST /api/v0/bundles/`` (the request vastai 1.9.1 sends for
``search offers``) with canned offers per ``type``, and records every request, so the query the
provider builds is checked field by field, as the server sees it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from jobs.estimate import Estimate, ModelShape
from providers.base import LaunchFailed, LaunchRequest, PriceSource, RunState
from providers.vast import OUTBID_PER_HOUR, SNAPSHOT_PATH, VastProvider, hazard_per_hour

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
    for oid in ("101", "102", "103"):
        assert offers[f"{oid}:bid"].hazard_per_hour == pytest.approx(offers[oid].hazard_per_hour + OUTBID_PER_HOUR)


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


def assert_snapshot(offers: list[Any], gpus: int = 1, vram: float = 20.0) -> None:
    assert offers
    for o in offers:
        assert o.price_source is PriceSource.SNAPSHOT and o.price_date == SNAPSHOT_DATE
        assert o.gpu_count == gpus and o.vram_gb >= vram
        assert o.detail("reliability") >= 0.95
    assert any(o.interruptible for o in offers) and any(not o.interruptible for o in offers)


def test_no_key_uses_snapshot_and_says_why(server: VastServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAST_URL", server.url)
    prov = VastProvider()
    offers = prov.offers(spec(), estimate(20.0))
    assert_snapshot(offers)
    assert {o.gpu for o in offers} == {"RTX4090", "A100-80GB", "H100"}
    eight = prov.offers(spec(gpus=8), estimate(70.0))
    assert_snapshot(eight, gpus=8, vram=70.0)
    assert {o.gpu for o in eight} == {"A100-80GB", "H100"}
    assert server.requests == []
    assert prov.check() == (
        False,
        "no Vast.ai API key (set VAST_API_KEY or ~/.config/vastai/vast_api_key); "
        f"showing snapshot prices from {SNAPSHOT_DATE}",
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


# --- not launchable yet ------------------------------------------------------------------------


def test_quotes_only() -> None:
    offer = VastProvider().offers(spec(), estimate(20.0))[0]  # no key: from the snapshot
    prov = VastProvider(api_key=KEY)
    assert prov.name == "vast" and prov.launchable is False
    req = LaunchRequest(job_id="j", attempt_id="a", spec={}, store_uri="file:///x", gpus=1, cpus=1, log_path="/x")
    with pytest.raises(LaunchFailed, match="arrives with the SkyPilot/Vast launch work") as info:
        prov.launch(req, offer)
    assert KEY not in str(info.value)
    assert prov.poll({}).state is RunState.UNKNOWN
    assert prov.cancel({}) is None
