"""The dashboard in a real browser: headless Chromium (the distribution's package) driven by Playwright.

A real ``tunefleet server`` with its daemon on the embedded default (a local Ray instance, the real
training payload on the tiny model) on 127.0.0.1. Jobs go in through the API; the person at the
browser logs in and does the following:
- sees the queue take a new job without reloading;
- preempts a running job with its button, and finds both attempts and the resume step on its
  timeline;
- checks that the loss chart holds the points the daemon logged;
- cancels a job with its button;
- is refused another team's job.

Every page is screenshotted at 1280 and 390 px into the folder the test prints
(``TUNEFLEET_SCREENSHOTS``, else the test's own tmp folder).

Without a browser (``/usr/bin/chromium`` or ``TUNEFLEET_CHROMIUM``) these tests are skipped with
a message; ``.ci/run`` installs Chromium when it is missing, so CI always runs them.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from orchestrator.store import Store
from tests.test_server import DATA, REPO, Server, make_accounts
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("TUNEFLEET_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
WIDTHS = (1280, 390)
SAVE = 25


def _job(max_steps: int) -> dict:
    doc = yaml.safe_load((REPO / "examples" / "qlora-tiny.yaml").read_text())
    doc.update(max_steps=max_steps, save_steps=SAVE)
    doc["datasets"][0]["path"] = "data/train.jsonl"
    return {"yaml": yaml.safe_dump(doc), "files": {"data/train.jsonl": base64.b64encode(DATA).decode()}}


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("TUNEFLEET_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {folder}")
    return folder


def _unlabelled(page) -> list[str]:
    """Form controls a screen reader could not name."""
    return page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
        .filter(el => el.type !== 'hidden' && el.offsetParent !== null)
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
        .map(el => el.outerHTML.slice(0, 80))""")


def _shoot(page, base: str, path: str, name: str, shots: Path, then=None) -> None:
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        page.goto(base + path)
        if then is not None:
            then(page)
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(300)  # charts draw after load
        page.screenshot(path=str(shots / f"{name}-{width}.png"), full_page=True)
        assert _unlabelled(page) == [], (name, width)
        # nothing wider than the screen but the tables, which scroll inside their own box
        assert page.evaluate("document.documentElement.scrollWidth") <= width + 1, (name, width)


def test_the_dashboard_in_a_real_browser(tmp_path, model_cache, shots):
    if CHROMIUM is None:
        pytest.skip("no Chromium here: install it (apt-get install chromium) to run the browser tests; "
                    ".ci/run installs it in CI")
    from playwright.sync_api import sync_playwright

    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text("poll_interval_s: 0.5\nray_num_cpus: 2\n")
    tokens = make_accounts(home)
    server = Server(home, "--rate", "0", env={"TUNEFLEET_MODEL_CACHE": str(model_cache)}, daemon=True)
    base = server.url
    try:
        api = {who: server.client(tokens[who]) for who in ("alice", "bob")}
        first = api["alice"].post("/jobs", json=_job(400)).json()["id"]
        theirs = api["bob"].post("/jobs", json=_job(20)).json()["id"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)

            # ---- log in (the token field is labelled; the cookie is HttpOnly)
            page.goto(base + "/")
            assert "/login" in page.url
            page.get_by_label("API token").fill(tokens["alice"])
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url(base + "/")
            [cookie] = [c for c in page.context.cookies() if c["name"] == "tf_session"]
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

            # ---- the queue takes a new job without a reload
            assert page.locator(f'tr[data-job="{first}"]').count() == 1
            assert page.locator(f'tr[data-job="{theirs}"]').count() == 0  # bob's: another team
            page.evaluate("window.__still_this_page = true")
            second = api["alice"].post("/jobs", json=_job(2000)).json()["id"]
            page.locator(f'tr[data-job="{second}"]').wait_for()
            assert page.evaluate("window.__still_this_page") is True

            # ---- preempt the first job with its button once it has committed a checkpoint
            with Store(home / "state.db") as store:
                wait_for(lambda: (store.get_job(first).checkpoint_step or 0) >= SAVE
                      and store.get_job(first).state.value == "running", 300, "the first job to commit a checkpoint")
            page.goto(f"{base}/jobs/{first}")
            page.get_by_role("button", name="Preempt (save and move)").click()
            page.wait_for_url(f"{base}/jobs/{first}?done=*")
            # the live part of the page shows the second attempt when the daemon has resumed the job
            page.locator('li.attempt[data-seq="2"]').wait_for(timeout=300_000)
            with Store(home / "state.db") as store:
                attempts = store.attempts_for(first)
                assert [a.seq for a in attempts] == [1, 2]
                resumed = attempts[1].start_step
                # a soft preempt saves the step it reached, and the next attempt starts from it
                assert resumed >= SAVE and resumed == attempts[0].end_step
                assert attempts[0].state.value == "preempted"
            assert page.locator('[data-testid="resume-step"]').inner_text() == str(resumed)
            assert page.locator("li.attempt").count() == 2

            # ---- the loss chart holds the points the daemon logged, drawn, with a legend per attempt
            wait_for(lambda: "train loss (attempt 2)" in (page.locator(".tf-chart .u-legend").first.inner_text()
                                                       if page.locator(".tf-chart .u-legend").count() else ""),
                  120, "the live loss chart to show the second attempt")
            spec = json.loads(page.locator(".tf-chart").first.get_attribute("data-spec"))
            with Store(home / "state.db") as store:
                logged = store.metrics(first)
            drawn = {s["label"]: s["points"] for s in spec["series"]}
            for seq, att in ((1, attempts[0]), (2, attempts[1])):
                want = [[m["step"], m["loss"]] for m in logged if m["attempt_id"] == att.id and m["loss"] is not None]
                got = drawn.get(f"train loss (attempt {seq})", [])
                assert got and want[: len(got)] == got, seq  # the page may be a poll behind the store
            legend = page.locator(".tf-chart .u-legend").first.inner_text()
            assert "train loss (attempt 1)" in legend and "train loss (attempt 2)" in legend

            # ---- cancel the second job with its button
            page.goto(f"{base}/jobs/{second}")
            page.get_by_role("button", name="Cancel").click()
            page.wait_for_url(f"{base}/jobs/{second}?done=*")
            page.locator('[data-testid="job-state"]', has_text="cancelled").wait_for(timeout=120_000)
            with Store(home / "state.db") as store:
                assert store.get_job(second).state.value == "cancelled"

            # ---- another team's job: refused like a job that does not exist
            refused = page.goto(f"{base}/jobs/{theirs}")
            assert refused.status == 404 and page.get_by_role("heading", name="Not found").is_visible()

            # ---- keyboard: the first Tab reaches the skip link, then the navigation
            page.goto(base + "/")
            page.keyboard.press("Tab")
            assert page.evaluate("document.activeElement.textContent") == "Skip to content"
            page.keyboard.press("Tab")
            page.keyboard.press("Tab")
            assert page.evaluate("document.activeElement.getAttribute('href')") == "/"

            # ---- every page at both widths
            for name, path in (("queue", "/"), ("job", f"/jobs/{first}"), ("spend", "/spend"), ("sweeps", "/sweeps")):
                _shoot(page, base, path, name, shots)

            def rank(pg) -> None:  # the offers page with a job pasted and ranked
                pg.get_by_label("Job file (YAML or JSON)").fill(_job(400)["yaml"])
                pg.get_by_role("button", name="Rank offers").click()
                pg.get_by_role("heading", name="Ranked by expected cost of the finished job").wait_for()

            _shoot(page, base, "/offers", "offers", shots, then=rank)
            page.context.clear_cookies()
            _shoot(page, base, "/login", "login", shots)
            browser.close()
    finally:
        server.stop()
    assert sorted(p.name for p in shots.glob("*.png")) == sorted(
        f"{n}-{w}.png" for n in ("queue", "job", "spend", "sweeps", "offers", "login") for w in WIDTHS)
