"""Managed fine-tuning providers: Together (per-token job prices, live estimate-price) and
SiliconFlow (per-GPU-hour snapshot prices).

Together is exercised over real HTTP: a ThreadingHTTPServer on 127.0.0.1 speaks the endpoints the
provider uses (``GET /v1/files``, ``POST /v1/fine-tunes/estimate-price``, shapes as in the together
SDK 3.1.1), records every request, and can fail on demand (500, garbage, slow, 401). The provider
is pointed at it with TOGETHER_BASE_URL. Nothing of ours is mocked.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from jobs.estimate import estimate
from jobs.spec import load_job_file, load_job_text
from providers.base import LaunchFailed, LaunchRequest, PriceSource, RunState
from providers.siliconflow import SiliconFlowProvider
from providers.together import TogetherProvider

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
LORA_EXAMPLE = EXAMPLES / "lora-chat-tiny.yaml"
QLORA_EXAMPLE = EXAMPLES / "qlora-tiny.yaml"
DATASET = EXAMPLES / "data" / "chat-tiny.jsonl"
TOGETHER_SNAPSHOT = json.loads((ROOT / "providers" / "snapshots" / "together.json").read_text())
SILICONFLOW_SNAPSHOT = json.loads((ROOT / "providers" / "snapshots" / "siliconflow.json").read_text())

LLAMA_8B = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"  # in Together's list, LoRA + full
LLAMA_8B_HF = "meta-llama/Llama-3.1-8B-Instruct"  # the Hugging Face id users write; an alias
MIXTRAL = "mistralai/Mixtral-8x7B-Instruct-v0.1"  # in the list, LoRA only
KEY = "tk-secret-0123456789abcdef"
ESTIMATE_PATH = "/v1/fine-tunes/estimate-price"


# ---- specs ----
def _spec(src: Path = LORA_EXAMPLE, *, base_model: str | None = LLAMA_8B, full: bool = False,
          epochs: int | None = None, gpus: int | None = None) -> dict:
    text = src.read_text()
    if base_model is not None:
        text = text.replace("base_model: tunefleet/tiny-llama", f"base_model: {base_model}")
    if full:
        drop = ("adapter", "lora_", "load_in")
        lines = [ln for ln in text.splitlines() if not ln.split(":")[0].strip().startswith(drop)]
        text = "\n".join(lines) + "\n"
    if epochs is not None:
        text = text.replace("max_steps: 30\n", f"num_epochs: {epochs}\n")
    if gpus is not None:
        text = text.replace("gpus: 0 ", f"gpus: {gpus} ").replace("gpus: 0\n", f"gpus: {gpus}\n")
    return load_job_text(text, base_dir=str(src.parent)).to_payload_dict()


def _snapshot_rate(params_b: float, kind: str) -> float:
    tier = next(t for t in sorted(TOGETHER_SNAPSHOT["tiers"], key=lambda t: t["max_params_b"])
                if params_b <= t["max_params_b"])
    return tier[kind]


def _model_params(model_id: str) -> float:
    return next(m["params_b"] for m in TOGETHER_SNAPSHOT["models"] if m["id"] == model_id)


# ---- the fake Together API ----
class FakeTogether:
    def __init__(self) -> None:
        self.key = KEY
        self.requests: list[dict] = []
        self.files: list[dict] = []
        self.estimate: dict = {
            "estimation_available": True,
            "estimated_total_price": 1.2345,
            "estimated_train_token_count": 5000,
            "estimated_eval_token_count": 0,
            "allowed_to_proceed": True,
            "user_limit": 100.0,
        }
        self.mode = "ok"  # ok | 500 | garbage | junk_price | slow | 401
        self.fail_paths = {ESTIMATE_PATH}
        self.delay_s = 1.0
        self.lock = threading.Lock()

    def upload(self, path: Path, file_id: str = "file-abc123", **over) -> None:
        self.files.append({"id": file_id, "object": "file", "filename": path.name, "bytes": path.stat().st_size,
                           "purpose": "fine-tune", "created_at": 1_700_000_000, "FileType": "jsonl", **over})

    def posts(self) -> list[dict]:
        return [r for r in self.requests if r["method"] == "POST"]


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, payload: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _json(self, code: int, obj: object) -> None:
        self._send(code, json.dumps(obj).encode())

    def _handle(self) -> None:
        state: FakeTogether = self.server.state  # type: ignore[attr-defined]
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        with state.lock:
            state.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                   "body": json.loads(raw) if raw else None})
        path = self.path.split("?", 1)[0]
        if state.mode != "ok" and path in state.fail_paths:
            if state.mode == "slow":
                time.sleep(state.delay_s)
                return self._json(200, state.estimate)
            if state.mode == "500":
                return self._json(500, {"error": {"message": "internal error"}})
            if state.mode == "garbage":
                return self._send(200, b"<html>upstream proxy error</html>", "text/html")
            if state.mode == "junk_price":
                return self._json(200, {"estimation_available": True, "estimated_total_price": "lots"})
            if state.mode == "401":
                return self._json(401, {"error": {"message": "invalid api key"}})
        if self.headers.get("Authorization") != f"Bearer {state.key}":
            return self._json(401, {"error": {"message": "invalid api key"}})
        if self.command == "GET" and path == "/v1/files":
            return self._json(200, {"object": "list", "data": state.files})
        if self.command == "POST" and path == ESTIMATE_PATH:
            return self._json(200, state.estimate)
        return self._json(404, {"error": {"message": f"no route {self.command} {path}"}})

    do_GET = _handle
    do_POST = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a client that timed out and left
        pass


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("TOGETHER_API_KEY", "TOGETHER_BASE_URL", "SILICONFLOW_API_KEY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def together_api(monkeypatch):
    server = _Server(("127.0.0.1", 0), _Handler)
    server.state = FakeTogether()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("TOGETHER_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
    yield server.state
    server.shutdown()
    server.server_close()


def _no_key_in(provider: TogetherProvider, *things: object) -> None:
    for thing in things:
        assert KEY not in repr(thing)
    assert KEY not in repr(provider.check())


# ---- Together: support ----
def test_lora_on_listed_model_is_priced_from_the_snapshot_without_a_key(together_api):
    spec = _spec(base_model=LLAMA_8B_HF)  # the HF id maps to Together's model
    est = estimate(spec)
    provider = TogetherProvider()
    offers = provider.offers(spec, est)

    assert len(offers) == 1
    o = offers[0]
    rate = _snapshot_rate(_model_params(LLAMA_8B), "lora")
    assert o.usd_total == pytest.approx(est.tokens * rate / 1e6)
    assert o.detail("billed_tokens") == est.tokens
    assert o.detail("rate_per_mtok") == pytest.approx(rate)
    assert o.detail("together_model") == LLAMA_8B
    assert o.price_source is PriceSource.SNAPSHOT
    assert o.price_date == TOGETHER_SNAPSHOT["as_of"]
    assert (o.provider, o.offer_id) == ("together", f"together:{LLAMA_8B}:lora")
    assert (o.gpu, o.gpu_count, o.vram_gb) == ("managed", 0, 0.0)
    assert not o.interruptible and o.hazard_per_hour == 0 and not o.on_premises
    assert o.hours == pytest.approx(est.hours("H100", 8))
    assert o.startup_s > 0
    assert o.usd_per_hour == pytest.approx(o.usd_total / (o.hours + o.startup_s / 3600))
    date = TOGETHER_SNAPSHOT["as_of"]
    assert provider.check() == (False, f"no TOGETHER_API_KEY: quoting PLACEHOLDER per-token prices ({date}, "
                                       "recalled, not verified; shown with offers --all only)")
    assert o.placeholder and o.provenance == "placeholder"  # the snapshot says it is a recollection
    assert together_api.requests == []  # no key: nothing is sent anywhere
    assert provider.unsupported_reason(spec) is None
    assert not provider.launchable


def test_live_estimate_price_is_used_with_a_key(together_api, monkeypatch):
    monkeypatch.setenv("TOGETHER_API_KEY", KEY)
    together_api.upload(DATASET, "file-abc123")
    spec = _spec(epochs=3)
    est = estimate(spec)
    provider = TogetherProvider()
    [o] = provider.offers(spec, est)

    assert o.price_source is PriceSource.LIVE
    assert o.usd_total == pytest.approx(1.2345)
    assert o.detail("billed_tokens") == 5000
    assert o.detail("rate_per_mtok") == pytest.approx(1.2345 / 5000 * 1e6)
    [post] = together_api.posts()
    assert post["path"] == ESTIMATE_PATH
    assert post["headers"]["Authorization"] == f"Bearer {KEY}"
    body = post["body"]
    assert body["training_file"] == "file-abc123"
    assert body["model"] == LLAMA_8B
    assert body["n_epochs"] == 3
    assert body["n_evals"] == 0
    assert body["training_method"] == {"method": "sft", "train_on_inputs": "auto"}
    assert body["training_type"]["type"] == "Lora"
    assert (body["training_type"]["lora_r"], body["training_type"]["lora_alpha"]) == (8, 16)
    ok, why = provider.check()
    assert ok, why
    _no_key_in(provider, o)


def test_qlora_maps_to_together_lora(together_api, monkeypatch):
    monkeypatch.setenv("TOGETHER_API_KEY", KEY)
    together_api.upload(EXAMPLES / "data" / "alpaca-tiny.jsonl", "file-alpaca")
    spec = _spec(QLORA_EXAMPLE, base_model="Qwen/Qwen2.5-7B-Instruct")
    [o] = TogetherProvider().offers(spec, estimate(spec))
    assert o.offer_id == "together:Qwen/Qwen2.5-7B-Instruct:lora"
    assert o.detail("qlora_as_lora") is True
    [post] = together_api.posts()
    assert post["body"]["training_type"]["type"] == "Lora"
    assert post["body"]["training_file"] == "file-alpaca"


def test_unsupported_model_gets_no_offer_and_a_reason():
    spec = load_job_file(LORA_EXAMPLE).to_payload_dict()  # tunefleet/tiny-llama
    provider = TogetherProvider()
    assert provider.offers(spec, estimate(spec)) == []
    reason = provider.unsupported_reason(spec)
    assert reason and "tunefleet/tiny-llama" in reason and "list" in reason
    assert provider.last_unsupported == reason


def test_full_fine_tune_only_where_the_list_allows_it():
    provider = TogetherProvider()
    mixtral = _spec(base_model=MIXTRAL, full=True)
    assert mixtral.get("adapter") is None
    assert provider.offers(mixtral, estimate(mixtral)) == []
    assert "only LoRA" in provider.unsupported_reason(mixtral)

    lora_mixtral = _spec(base_model=MIXTRAL)
    assert len(provider.offers(lora_mixtral, estimate(lora_mixtral))) == 1

    llama_full = _spec(full=True)
    est = estimate(llama_full)
    [o] = provider.offers(llama_full, est)
    assert o.offer_id == f"together:{LLAMA_8B}:full"
    assert o.usd_total == pytest.approx(est.tokens * _snapshot_rate(_model_params(LLAMA_8B), "full") / 1e6)


def test_more_epochs_cost_proportionally_more():
    provider = TogetherProvider()
    one, three = _spec(epochs=1), _spec(epochs=3)
    e1, e3 = estimate(one), estimate(three)
    [o1], [o3] = provider.offers(one, e1), provider.offers(three, e3)
    assert o3.usd_total / o1.usd_total == pytest.approx(e3.tokens / e1.tokens)
    assert o3.usd_total / o1.usd_total == pytest.approx(3.0, rel=0.01)
    assert (o1.detail("n_epochs"), o3.detail("n_epochs")) == (1, 3)


def test_bigger_model_tier_costs_more_per_token():
    provider = TogetherProvider()
    small, big = _spec(), _spec(base_model="meta-llama/Llama-3.3-70B-Instruct")
    [s], [b] = provider.offers(small, estimate(small)), provider.offers(big, estimate(big))
    assert s.detail("billed_tokens") == b.detail("billed_tokens")
    assert b.detail("rate_per_mtok") > s.detail("rate_per_mtok")
    assert b.detail("size_tier") != s.detail("size_tier")


# ---- Together: robustness ----
@pytest.mark.parametrize("mode", ["500", "garbage", "junk_price", "slow", "401"])
def test_api_failures_fall_back_to_the_snapshot(together_api, monkeypatch, mode):
    monkeypatch.setenv("TOGETHER_API_KEY", KEY)
    together_api.upload(DATASET)
    together_api.mode = mode
    spec = _spec()
    est = estimate(spec)
    provider = TogetherProvider(timeout_s=0.3)
    t0 = time.monotonic()
    [o] = provider.offers(spec, est)
    assert time.monotonic() - t0 < 0.9  # the timeout held
    assert o.price_source is PriceSource.SNAPSHOT
    assert o.usd_total == pytest.approx(est.tokens * _snapshot_rate(_model_params(LLAMA_8B), "lora") / 1e6)
    assert "live estimate failed" in o.detail("price_basis")
    assert len(together_api.posts()) == 1  # it did ask
    ok, why = provider.check()
    assert not ok and "degraded" in why and TOGETHER_SNAPSHOT["as_of"] in why
    _no_key_in(provider, o, why)


def test_whole_api_down_or_unreachable(together_api, monkeypatch):
    monkeypatch.setenv("TOGETHER_API_KEY", KEY)
    together_api.mode, together_api.fail_paths = "500", {"/v1/files", ESTIMATE_PATH}
    spec = _spec()
    provider = TogetherProvider(timeout_s=0.5)
    [o] = provider.offers(spec, estimate(spec))
    assert o.price_source is PriceSource.SNAPSHOT
    ok, why = provider.check()
    assert not ok and "HTTP 500" in why

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    gone = TogetherProvider(base_url=dead, timeout_s=0.5)
    [o2] = gone.offers(spec, estimate(spec))
    assert o2.price_source is PriceSource.SNAPSHOT
    ok, why = gone.check()
    assert not ok and "unreachable" in why
    _no_key_in(gone, o2, why)


def test_dataset_not_uploaded_means_no_estimate_call(together_api, monkeypatch):
    monkeypatch.setenv("TOGETHER_API_KEY", KEY)
    together_api.upload(DATASET, bytes=1)  # same name, different content: not our file
    spec = _spec()
    provider = TogetherProvider()
    [o] = provider.offers(spec, estimate(spec))
    assert o.price_source is PriceSource.SNAPSHOT
    assert "not uploaded" in o.detail("price_basis")
    assert together_api.posts() == []
    assert [r["path"] for r in together_api.requests] == ["/v1/files"]
    assert provider.check()[0] is True  # the API works; only the quote is from the snapshot


def test_estimate_unavailable_is_not_a_failure(together_api, monkeypatch):
    monkeypatch.setenv("TOGETHER_API_KEY", KEY)
    together_api.upload(DATASET)
    together_api.estimate = {"estimation_available": False, "unavailable_reason": "train_file_not_validated"}
    spec = _spec()
    provider = TogetherProvider(training_files={str(DATASET): "file-given"})
    [o] = provider.offers(spec, estimate(spec))
    assert o.price_source is PriceSource.SNAPSHOT
    assert "train_file_not_validated" in o.detail("price_basis")
    assert together_api.posts()[0]["body"]["training_file"] == "file-given"  # given id, no lookup
    assert "/v1/files" not in [r["path"] for r in together_api.requests]
    assert provider.check()[0] is True


def test_launch_is_not_built_yet():
    provider = TogetherProvider()
    spec = _spec()
    [o] = provider.offers(spec, estimate(spec))
    req = LaunchRequest("j1", "a1", spec, "file:///tmp/x", gpus=0, cpus=1, log_path=os.devnull)
    with pytest.raises(LaunchFailed, match="not built yet"):
        provider.launch(req, o)
    assert provider.poll({}).state is RunState.UNKNOWN
    provider.cancel({})
    provider.cancel({})


# ---- SiliconFlow ----
def test_siliconflow_offers_filter_by_vram():
    provider = SiliconFlowProvider()
    prices = {g["gpu"]: g for g in SILICONFLOW_SNAPSHOT["gpus"]}

    small = _spec()  # 8B LoRA: ~18 GB, every GPU type fits
    est = estimate(small)
    offers = provider.offers(small, est)
    assert sorted(o.gpu for o in offers) == sorted(prices)
    mid = _spec(base_model="Qwen/Qwen2.5-14B-Instruct")  # ~31 GB: only the 80 GB types
    mid_est = estimate(mid)
    assert 24 < mid_est.vram_gb < 80
    fitting = {g for g, p in prices.items() if p["vram_gb"] >= mid_est.vram_gb}
    assert fitting and fitting != set(prices)
    assert {o.gpu for o in provider.offers(mid, mid_est)} == fitting
    big = _spec(base_model="meta-llama/Llama-3.3-70B-Instruct")  # ~148 GB per GPU: nothing fits
    assert provider.offers(big, estimate(big)) == []
    assert "GB" in provider.last_unsupported

    for o in offers:
        assert o.provider == "siliconflow" and not o.interruptible and o.hazard_per_hour == 0 and not o.on_premises
        assert o.gpu_count == 1  # resources.gpus: 0 still rents one GPU
        assert o.usd_per_hour == pytest.approx(prices[o.gpu]["usd_per_gpu_hour"])
        assert o.price_source is PriceSource.SNAPSHOT and o.price_date == SILICONFLOW_SNAPSHOT["as_of"]
        assert o.usd_total is None


def test_siliconflow_gpu_count():
    provider = SiliconFlowProvider()
    two = _spec(gpus=2)
    offers = provider.offers(two, estimate(two))
    assert offers and all(o.gpu_count == 2 for o in offers)
    for o in offers:
        assert o.usd_per_hour == pytest.approx(2 * o.detail("usd_per_gpu_hour"))
    too_many = _spec(gpus=SILICONFLOW_SNAPSHOT["max_gpus_per_job"] + 1)
    assert provider.offers(too_many, estimate(too_many)) == []
    assert "at most" in provider.last_unsupported


def test_siliconflow_snapshot_and_check(monkeypatch):
    for snap in (SILICONFLOW_SNAPSHOT, TOGETHER_SNAPSHOT):
        assert snap["source"].strip() and snap["as_of"]
    date = SILICONFLOW_SNAPSHOT["as_of"]
    ok, why = SiliconFlowProvider().check()
    assert not ok and "no SILICONFLOW_API_KEY" in why and date in why
    monkeypatch.setenv("SILICONFLOW_API_KEY", "sf-secret")
    ok, why = SiliconFlowProvider().check()
    assert ok and date in why and "sf-secret" not in why
    assert not SiliconFlowProvider.launchable
    with pytest.raises(LaunchFailed):
        SiliconFlowProvider().launch(LaunchRequest("j", "a", {}, "", 1, 1, os.devnull), None)  # type: ignore[arg-type]
