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


def test_a_succeeded_job_shows_its_final_eval_loss_perplexity_and_eval_points_and_one_without_eval_does_not(
        tmp_path):
    import math

    from infra.storage import open_store
    from orchestrator.states import JobState

    config = Config(home=tmp_path, default_store=(tmp_path / "ckpt").as_uri())
    ckpt = open_store(config.default_store)
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with Store(config.db_path) as store:
        spec = {"checkpoint": {"store": config.default_store}}
        evaluated, plain = store.submit(spec, name="with-eval"), store.submit(spec, name="no-eval")
        for job, eval_loss in ((evaluated, 0.6931), (plain, None)):
            meta = {"step": 20, "history": [[10, 2.5], [20, 1.5]]}
            if eval_loss is not None:
                meta |= {"eval_loss": eval_loss, "eval_history": [[10, 0.9], [20, eval_loss]]}
            ref = ckpt.commit_final(job, tmp_path / "final", meta)
            store.transition_job(job, JobState.RUNNING, kind="running", message="test")
            store.transition_job(job, JobState.SUCCEEDED, kind="succeeded", message="test", adapter_uri=ref.uri,
                                 step=20, data={"eval_loss": eval_loss} if eval_loss is not None else {})
        page = build_report(store, config)
    rows = {name: row for row in page.split("<tr>") for name in ("with-eval", "no-eval") if f">{name}<" in row}
    assert f"<td>{0.6931:.4f}</td><td>{math.exp(0.6931):.2f}</td>" in rows["with-eval"]  # 0.6931, 2.00
    assert "0.69" not in rows["no-eval"] and rows["no-eval"].count("&ndash;") == 2
    # the loss chart: both jobs' training loss, and the evaluated job's eval points (dashed, marked)
    chart = page.split("<h3>")[1]
    assert "Loss per job" in chart and f"{evaluated} with-eval eval" in chart and f"{plain} no-eval eval" not in chart
    assert chart.count("<polyline") == 3 and chart.count('stroke-dasharray="6,3"') == 1
