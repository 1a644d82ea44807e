"""The HTML report is self-contained and shows what was recorded."""

from __future__ import annotations

from infra.config import Config
from orchestrator.report import build_report, line_chart
from orchestrator.states import AttemptState
from orchestrator.store import Store


def test_report_draws_spend_against_the_budget_and_escapes_names(tmp_path):
    config = Config(home=tmp_path, default_store=(tmp_path / "ckpt").as_uri(), budget_monthly_usd=50.0)
    with Store(config.db_path) as store:
        spec = {"checkpoint": {"store": config.default_store}}
        job = store.submit(spec, name="<script>alert(1)</script>")
        att = store.create_attempt(job, provider="local", offer_id="local-cpu", usd_per_hour=1.0, start_step=0)
        store.transition_attempt(att.id, AttemptState.RUNNING, kind="attempt_running", message="up")
        store.transition_attempt(att.id, AttemptState.SUCCEEDED, kind="attempt_succeeded", message="done",
                                 spend_usd=12.5)
        page = build_report(store, config)
    assert page.startswith("<!doctype html>") and "<script" not in page.replace("&lt;script", "")
    assert "http://" not in page and "https://" not in page  # no external assets
    assert "monthly budget" in page and "$12.50 of $50.00" in page
    assert page.count("<svg") >= 2  # spend and local usage have data


def test_line_chart_without_data_says_so():
    assert "no data yet" in line_chart("t", [("a", [])], xlabel="x", ylabel="y")
    svg = line_chart("t", [("a", [(0, 1.0), (1, 2.0)])], xlabel="x", ylabel="y", hlines=[("cap", 3.0)])
    assert svg.count("<polyline") == 1 and "cap" in svg and svg.count("<circle") == 2
