"""Providers are asked together; one that fails, hangs or is missing never takes the others down."""

from __future__ import annotations

import json
import threading

import pytest

from infra.config import load_config
from providers.base import Offer, Provider, ProviderUnavailable, RunState, RunStatus
from providers.registry import UnknownProvider, build_providers, check_names, gather_offers
from tests.test_cli import EXAMPLE, tf


class _Stub(Provider):
    launchable = False

    def __init__(self, name, behaviour, release: threading.Event | None = None):
        self.name, self.behaviour, self.release = name, behaviour, release

    def check(self):
        return True, "stub"

    def offers(self, spec, estimate):
        if self.behaviour == "raise":
            raise ProviderUnavailable("API said no")
        if self.behaviour == "bug":
            raise KeyError("dph_total")
        if self.behaviour == "hang":
            self.release.wait(10)
            return []
        return [Offer(provider=self.name, offer_id="1", gpu="L4", gpu_count=1, vram_gb=24, usd_per_hour=0.7)]

    def launch(self, request, offer):
        raise NotImplementedError

    def poll(self, handle):
        return RunStatus(RunState.UNKNOWN)

    def cancel(self, handle, grace_s=0.0):
        return None


def test_one_failing_or_hanging_provider_degrades_to_a_warning():
    release = threading.Event()
    providers = {n: _Stub(n, b, release) for n, b in
                 [("good", "ok"), ("down", "raise"), ("buggy", "bug"), ("slow", "hang"), ("also", "ok")]}
    try:
        result = gather_offers(providers, {}, None, timeout_s=1.0)
    finally:
        release.set()
    assert sorted(o.provider for o in result.offers) == ["also", "good"]
    assert result.problems["down"] == "API said no"
    assert "KeyError" in result.problems["buggy"]
    assert "no answer within 1 s" in result.problems["slow"]


def test_unknown_provider_names_get_a_suggestion():
    with pytest.raises(UnknownProvider, match="did you mean 'vast'"):
        check_names(["vasst"])
    check_names(["local", "vast", "skypilot", "together", "siliconflow"])


def test_daemon_only_gets_providers_that_can_launch(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFLEET_HOME", str(tmp_path))
    built, broken = build_providers(load_config(), launchable_only=True, light=True)
    assert set(built) == {"local", "vast", "skypilot"} and not broken
    assert all(p.launchable for p in built.values())


@pytest.fixture
def offline_home(tmp_path, monkeypatch):
    """No credentials anywhere: HOME and SkyPilot's runtime dir are empty temp folders."""
    for var in ("VAST_API_KEY", "TOGETHER_API_KEY", "SILICONFLOW_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("SKY_RUNTIME_DIR", str(tmp_path / "user"))
    (tmp_path / "user").mkdir()
    return tmp_path / "home"


def test_providers_command_explains_each_provider(offline_home):
    rows = json.loads(tf(offline_home, "providers", "--json", check=True).stdout)
    by_name = {r["provider"]: r for r in rows}
    assert list(by_name) == ["local", "vast", "skypilot", "together", "siliconflow"]
    assert by_name["local"]["enabled"] and by_name["local"]["launchable"]
    assert not by_name["vast"]["enabled"] and "VAST_API_KEY" in by_name["vast"]["reason"]
    assert "snapshot" in by_name["vast"]["reason"]
    assert not by_name["together"]["enabled"] and "TOGETHER_API_KEY" in by_name["together"]["reason"]
    # no SkyPilot catalog here: the clouds are quoted from the shipped snapshot, never launched from
    sky = by_name["skypilot"]["reason"]
    assert by_name["skypilot"]["enabled"] and "snapshot" in sky and "never launched from" in sky and "sky check" in sky
    assert [n for n, r in by_name.items() if r["launchable"]] == ["local", "vast", "skypilot"]


def test_offers_command_ranks_snapshot_prices_without_any_account(offline_home, tmp_path):
    job = tmp_path / "open.yaml"
    text = EXAMPLE.read_text().replace("data: restricted", "data: open")
    text = text.replace("checkpoint:\n", "checkpoint:\n  store: s3://team-ckpt/tunefleet\n")
    text = text.replace("path: data/", f"path: {EXAMPLE.parent}/data/")
    job.write_text(text)
    out = json.loads(tf(offline_home, "offers", str(job), "--json", "--all", check=True).stdout)
    rows = out["offers"]
    viable = [r for r in rows if r["viable"]]
    assert {r["provider"] for r in viable} >= {"local", "vast", "siliconflow"}
    for r in rows:
        for key in ("provider", "gpu", "usd_per_hour", "est_hours", "est_usd", "viable", "reason", "code"):
            assert key in r
    # checked prices before placeholders; then by expected $ of the completed job, owned capacity
    # counted at 1/(1 + owned_tolerance) of its cost
    ranked = [(r["provenance"] == "placeholder", r["est_usd"] / (1.25 if r["owned"] else 1.0))
              for r in viable if r["est_usd"] is not None]
    assert ranked == sorted(ranked) and ranked
    assert any(r["provenance"] == "placeholder" for r in viable)  # SiliconFlow's PLACEHOLDER snapshot
    assert any(r["provenance"].startswith("snapshot (verified ") for r in viable)  # Vast's
    assert any(r["price_source"] == "snapshot" and r["price_date"] for r in rows)
    assert all(r["reason"] and r["code"] for r in rows if not r["viable"])
    # snapshot quotes and APIs this machine cannot launch on are listed, but not launchable now
    assert not any(r["launchable_now"] for r in rows if r["price_source"] == "snapshot")
    # what the daemon would do: the best offer it can launch on now (the idle local machine)
    decision = out["decision"]
    assert decision["verdict"] == "place" and decision["provider"] == "local"
    assert decision["offer_id"] == next(r["offer_id"] for r in viable if r["launchable_now"])
    # the default: viable offers with a checked price, in the same order; placeholders counted
    default = json.loads(tf(offline_home, "offers", str(job), "--json", check=True).stdout)
    checked = [r["offer_id"] for r in viable if r["provenance"] != "placeholder"]
    assert [r["offer_id"] for r in default["offers"]] == checked
    assert default["hidden_placeholder_offers"] == len(viable) - len(checked) > 0
    # restricted data: nothing off premises is viable
    restricted = json.loads(tf(offline_home, "offers", str(EXAMPLE), "--json", check=True).stdout)["offers"]
    assert restricted and all(r["on_premises"] for r in restricted)


def test_offers_all_shows_every_offer_with_why_a_70b_full_fine_tune_cannot_run(offline_home, tmp_path):
    """Every offer the providers know of is listed with its reason, and the verdict is a refusal
    that names the sizes (not "viable on the local CPU for $0.44")."""
    job = tmp_path / "huge.yaml"
    text = EXAMPLE.read_text().replace("data: restricted", "data: open").replace(
        "base_model: tunefleet/tiny-llama", "base_model: meta-llama/Llama-3.1-70B")
    text = text.replace("adapter: qlora\nload_in_4bit: true\n", "").replace("path: data/", f"path: {EXAMPLE.parent}/data/")
    text = text.replace("checkpoint:\n", "checkpoint:\n  store: s3://team-ckpt/tunefleet\n")
    text = text.replace("gpus: 0 ", "gpus: 1 ")
    job.write_text(text)
    out = json.loads(tf(offline_home, "offers", str(job), "--json", "--all", check=True).stdout)
    rows = out["offers"]
    assert not any(r["viable"] for r in rows)
    assert {r["provider"] for r in rows} >= {"local", "vast"}  # GPU offers are listed, not filtered away
    vram = [r for r in rows if r["code"] == "vram"]
    assert vram and all("GB per GPU" in r["reason"] for r in vram)
    cpu = next(r for r in rows if r["offer_id"] == "local-cpu")
    assert cpu["code"] == "cpu_only" and "device: cpu" in cpu["reason"]
    assert out["decision"]["verdict"] == "refuse"


def test_estimate_command(offline_home):
    out = json.loads(tf(offline_home, "estimate", str(EXAMPLE), "--json", check=True).stdout)
    assert out["estimate"]["method"] == "qlora" and out["estimate"]["steps"] == 400
    gpus = {g["gpu"]: g for g in out["gpus"]}
    assert gpus["H100"]["hours"] < gpus["T4"]["hours"]


def test_unknown_provider_in_a_job_is_refused_and_queues_nothing(offline_home, tmp_path):
    job = tmp_path / "typo.yaml"
    job.write_text(EXAMPLE.read_text().replace("data: restricted", "data: restricted\n  providers: [locl]")
                   .replace("path: data/", f"path: {EXAMPLE.parent}/data/"))
    for command in ("submit", "offers"):
        proc = tf(offline_home, command, str(job))
        assert proc.returncode == 2 and "did you mean 'local'" in proc.stderr, proc.stderr
    assert json.loads(tf(offline_home, "status", "--json", check=True).stdout) == []
