"""The HTML report is self-contained and shows what was recorded: each chart is a JSON spec that
the inlined charts.js draws with the inlined uPlot."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import pytest

from infra.config import Config
from orchestrator.report import STATIC, build_report, chart, chart_spec
from orchestrator.states import AttemptState
from orchestrator.store import Store


def specs(page: str) -> dict[str, dict]:
    """Each drawn chart's spec, by the heading above it."""
    found = re.findall(r'<h3>([^<]*)</h3><div class=tf-chart data-spec="([^"]*)"></div>', page)
    return {html.unescape(title): json.loads(html.unescape(spec)) for title, spec in found}


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


T0 = 1_764_500_000.0  # 2025-11-30 10:53:20 UTC


def test_report_inlines_its_scripts_and_draws_cumulative_spend_in_clock_time_against_the_budget(tmp_path):
    config = Config(home=tmp_path, default_store=(tmp_path / "ckpt").as_uri(), budget_monthly_usd=50.0)
    clock = Clock(T0)
    with Store(config.db_path, clock=clock) as store:
        spec = {"checkpoint": {"store": config.default_store}}
        job = store.submit(spec, name="<script>alert(1)</script>")
        att = store.create_attempt(job, provider="local", offer_id="local-cpu", usd_per_hour=1.0, start_step=0)
        store.transition_attempt(att.id, AttemptState.RUNNING, kind="attempt_running", message="up")
        clock.t = T0 + 3600
        store.transition_attempt(att.id, AttemptState.SUCCEEDED, kind="attempt_succeeded", message="done",
                                 spend_usd=12.5)
        clock.t = T0 + 5400
        store.add_spend(job, att.id, provider="local", usd=0.0000764)
        page = build_report(store, config, now=T0 + 7200)
    assert page.startswith("<!doctype html>")
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)" in page
    # offline: uPlot, its CSS and charts.js are in the file itself, and nothing is fetched
    assert page.count("<script>") == 2 and "<script src" not in page and "<link" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    for name in ("vendor/uPlot.iife.min.js", "vendor/uPlot.min.css", "charts.js"):
        assert (STATIC / name).read_text(encoding="utf-8") in page, name
    assert "$12.50 of $50.00" in page
    charts = specs(page)
    spend = charts["Cumulative spend"]
    assert spend["x"] == {"kind": "time"} and spend["y"] == {"kind": "usd", "label": "USD"}
    # unix seconds of each spend row, the running total after it, held until the report's time
    assert spend["series"] == [{"label": "recorded spend", "step": True,
                                "points": [[T0 + 3600, 12.5], [T0 + 5400, 12.5000764], [T0 + 7200, 12.5000764]]}]
    assert spend["hlines"] == [{"label": "monthly budget", "y": 50.0}]
    local = charts["Local capacity in use (attempts running at once)"]
    assert local["x"]["kind"] == "time" and local["y"]["kind"] == "count"
    assert local["series"][0]["points"] == [[T0, 1.0], [T0 + 3600, 0.0], [T0 + 7200, 0.0]]
    # the name is in the loss chart's heading only as text: its spec has no series (no history)
    assert "Loss per job (latest 10; eval loss dashed)</h3><p class=empty>no data yet" in page


def test_a_chart_without_points_says_so_and_one_with_points_has_a_no_script_summary():
    empty = chart("t", [("a", [])], x="step", y="loss")
    assert "no data yet" in empty and "tf-chart" not in empty
    page = chart("t", [("a", [(1, 2.0), (0, 1.0)]), ("b & c", [(0, 0.25)])], x="step", y="usd", ylabel="USD",
                 hlines=[("cap", 3.0)], step=True, dashed=frozenset({"b & c"}))
    spec = specs(page)["t"]
    assert spec["series"] == [{"label": "a", "points": [[0.0, 1.0], [1.0, 2.0]], "step": True},
                              {"label": "b & c", "points": [[0.0, 0.25]], "dashed": True, "step": True}]
    assert spec["hlines"] == [{"label": "cap", "y": 3.0}] and spec["title"] == ""  # the <h3> is the title
    noscript = page.split("<noscript>")[1]
    assert "<td>a</td><td>2</td><td>1</td><td>$2.00</td>" in noscript
    assert "<td>b &amp; c</td><td>1</td><td>0</td><td>$0.25</td>" in noscript and "$3.00" in noscript
    with pytest.raises(ValueError, match="hours ago"):
        chart_spec("t", [], x="hours ago", y="usd")


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
    # the loss chart: both jobs' training loss, and the evaluated job's eval points (dashed)
    loss = specs(page)["Loss per job (latest 10; eval loss dashed)"]
    assert loss["x"] == {"kind": "step"} and loss["y"] == {"kind": "loss", "label": "loss"}
    by_label = {s["label"]: s for s in loss["series"]}
    assert set(by_label) == {f"{evaluated} with-eval", f"{evaluated} with-eval eval", f"{plain} no-eval"}
    assert by_label[f"{evaluated} with-eval eval"] == {"label": f"{evaluated} with-eval eval", "dashed": True,
                                                        "points": [[10.0, 0.9], [20.0, 0.6931]]}
    assert by_label[f"{plain} no-eval"] == {"label": f"{plain} no-eval", "points": [[10.0, 2.5], [20.0, 1.5]]}


NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is not installed: charts.js's formatting is checked under node")
def test_charts_js_formats_dollars_losses_and_clock_times_and_aligns_series_with_gaps():
    script = """
const t = require(process.argv[1]);
const f = t.fmt;
console.log(JSON.stringify({
  usd: [0.0000764, 0.5, 0.0123, 12.5, 1234.5, 0, -3.2].map(v => f.usd(v)),
  usdTicksSmall: f.usdTicks([0, 0.00002, 0.00004], 0.00002),
  usdTicksBig: f.usdTicks([0, 500, 1000, 1500], 500),
  loss: [2.34567, 0.000123456, 0.6931].map(f.loss),
  lossTicksFine: f.lossTicks([2.345, 2.346, 2.347], 0.001),
  duration: [0.75, 3.5, 52].map(f.duration),
  time: f.time(1764500000, true),
  timeTicks: f.timeTicks([1764457200, 1764460800, 1764464400], 3600, true),
  aligned: t.align([{points: [[3, 4], [1, 2], [3, 5]]}, {points: [[2, 9]]}], [{label: "cap", y: 7}]),
}));
"""
    out = subprocess.run([NODE, "-e", script, str(STATIC / "charts.js")], capture_output=True, text=True,
                         timeout=60, check=True)
    got = json.loads(out.stdout)
    assert got["usd"] == ["$0.000076", "$0.50", "$0.012", "$12.50", "$1,234.50", "$0.00", "-$3.20"]
    assert got["usdTicksSmall"] == ["$0", "$0.00002", "$0.00004"]
    assert got["usdTicksBig"] == ["$0", "$500", "$1,000", "$1,500"]
    assert got["loss"] == ["2.35", "0.000123", "0.693"]
    assert got["lossTicksFine"] == ["2.345", "2.346", "2.347"]  # 3 digits would read 2.35 three times
    assert got["duration"] == ["45m", "3h 30m", "2d 4h"]
    assert got["time"] == "2025-11-30 10:53:20 UTC"
    assert got["timeTicks"] == ["23:00\nNov 29", "00:00\nNov 30", "01:00"]  # the date where the day changes
    # one x axis for every series: sorted, unique; null where a series has no point; the last y at a
    # repeated x; a horizontal line is its y everywhere
    assert got["aligned"] == [[1, 2, 3], [2, None, 5], [None, 9, None], [7, 7, 7]]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (apt-get install chromium): the charts are drawn "
                                             "only in a browser")
def test_a_browser_draws_every_chart_of_the_report_offline(tmp_path):
    config = Config(home=tmp_path, default_store=(tmp_path / "ckpt").as_uri(), budget_monthly_usd=50.0)
    clock = Clock(T0)
    with Store(config.db_path, clock=clock) as store:
        job = store.submit({"checkpoint": {"store": config.default_store}}, name="drawn")
        att = store.create_attempt(job, provider="local", offer_id="local-cpu", usd_per_hour=1.0, start_step=0)
        store.transition_attempt(att.id, AttemptState.RUNNING, kind="attempt_running", message="up")
        clock.t = T0 + 3600
        store.transition_attempt(att.id, AttemptState.SUCCEEDED, kind="attempt_succeeded", message="done",
                                 spend_usd=0.0000764)
        page = build_report(store, config, now=T0 + 7200)
    (tmp_path / "report.html").write_text(page, encoding="utf-8")
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          (tmp_path / "report.html").as_uri()], check=False, capture_output=True, text=True,
                         timeout=120)
    dom = out.stdout
    assert len(specs(page)) == 2 and dom.count('data-tf-drawn="1"') == 2, out.stderr[-2000:]
    assert dom.count('class="uplot') == 2 and "chart failed" not in dom.split("<body>")[1].split("<script>")[0]
    # uPlot's legend names each series and each budget line
    for label in ("recorded spend", "monthly budget", "local attempts"):
        assert re.search(rf'class="u-label"[^>]*>{label}<', dom), label
