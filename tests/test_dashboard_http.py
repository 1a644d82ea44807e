"""The dashboard over real HTTP (no browser): login and its cookie, CSRF, who sees and does what,
and what each page says. The browser itself is exercised in tests/test_dashboard_browser.py.

One real ``tunefleet server`` on a fresh home; teams ml (alice, carol) and nlp (bob), ann an admin.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from orchestrator.states import AttemptState, JobState
from orchestrator.store import Store
from tests.test_server import body, two_teams


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    home = tmp_path_factory.mktemp("dash-home")
    server, tokens, jobs = two_teams(home)
    try:
        with Store(home / "state.db") as store:  # alice's job ran once, was preempted, and runs again
            job = jobs["alice"]
            a1 = store.create_attempt(job, provider="local", offer_id="cpu", usd_per_hour=0.5, start_step=0)
            store.transition_attempt(a1.id, AttemptState.RUNNING, kind="attempt_running", message="up")
            store.transition_job(job, JobState.RUNNING, kind="running", message="running")
            for step in (1, 5, 10, 15, 20):
                store.update_progress(job, step=step, total_steps=40, loss=3.0 - step / 20, attempt_id=a1.id,
                                      checkpoint_step=20 if step == 20 else None)
            store.transition_attempt(a1.id, AttemptState.PREEMPTED, kind="attempt_preempted", message="spot reclaim",
                                     end_step=20, end_reason="spot reclaim")
            store.transition_job(job, JobState.QUEUED, kind="requeued", message="again")
            a2 = store.create_attempt(job, provider="local", offer_id="cpu", usd_per_hour=0.5, start_step=20)
            store.transition_attempt(a2.id, AttemptState.RUNNING, kind="attempt_running", message="up")
            store.transition_job(job, JobState.RUNNING, kind="running", message="running")
            store.update_progress(job, step=25, total_steps=40, loss=1.5, attempt_id=a2.id, eval_loss=1.7)
        yield {"server": server, "tokens": tokens, "jobs": jobs, "home": home}
    finally:
        server.stop()


def browser(site) -> httpx.Client:
    return httpx.Client(base_url=site["server"].url, headers={"Accept": "text/html"}, timeout=30,
                        follow_redirects=False)


def login(site, who: str) -> tuple[httpx.Client, str]:
    """A client with a session cookie for ``who``, and the page's CSRF token."""
    c = browser(site)
    r = c.post("/login", data={"token": site["tokens"][who], "next": "/"})
    assert r.status_code == 303 and r.headers["location"] == "/", r.text
    page = c.get("/")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    return c, csrf


def test_pages_need_a_session_and_login_sets_a_strict_httponly_cookie(site):
    c = browser(site)
    r = c.get("/jobs/" + site["jobs"]["alice"])
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=%2Fjobs%2F")
    bad = c.post("/login", data={"token": "tf_" + "x" * 43, "next": "/"})
    assert bad.status_code == 401 and "not valid" in bad.text and "tf_xxx" not in bad.text
    good = c.post("/login", data={"token": site["tokens"]["alice"], "next": "https://evil.example/"})
    assert good.status_code == 303 and good.headers["location"] == "/"  # never off to another site
    cookie = good.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    assert site["tokens"]["alice"] not in good.headers["set-cookie"]
    assert c.get("/").status_code == 200
    # the cookie is not an API credential
    assert c.get("/api/v1/jobs").status_code == 401


def test_a_revoked_token_ends_its_sessions(site):
    with Store(site["home"] / "state.db") as store:
        row, token = store.create_token("carol")
    c = browser(site)
    assert c.post("/login", data={"token": token, "next": "/"}).status_code == 303
    assert c.get("/").status_code == 200
    with Store(site["home"] / "state.db") as store:
        store.revoke_token(row.id)
    assert c.get("/").status_code == 303
    poll = c.get("/ui/queue", headers={"HX-Request": "true"})  # a live fragment sends the page to the login
    assert poll.status_code == 401 and poll.headers["hx-redirect"].startswith("/login")


def test_the_queue_shows_what_each_viewer_may_see(site):
    alice, _ = login(site, "alice")
    bob, _ = login(site, "bob")
    ann, _ = login(site, "ann")
    a, b = site["jobs"]["alice"], site["jobs"]["bob"]
    rows = alice.get("/ui/queue").text
    assert a in rows and b not in rows
    assert b in bob.get("/").text and a not in bob.get("/").text
    assert a in ann.get("/").text and b in ann.get("/").text
    # filters
    assert b not in ann.get("/ui/queue", params={"owner": "alice"}).text
    assert a not in ann.get("/ui/queue", params={"state": "queued"}).text  # alice's is running
    # another team's job is a 404 page, like one that does not exist
    r = bob.get(f"/jobs/{a}")
    assert r.status_code == 404 and "Not found" in r.text and "text/html" in r.headers["content-type"]


def test_a_jobs_story_shows_both_attempts_the_resume_step_and_the_loss_curve(site):
    import json

    alice, _ = login(site, "alice")
    page = alice.get(f"/jobs/{site['jobs']['alice']}").text
    assert page.count('class="attempt attempt-') == 2
    assert 'data-testid="resume-step">20<' in page and "spot reclaim" in page
    spec = json.loads(re.search(r"data-spec='([^']+)'", page).group(1).replace("&#34;", '"'))
    labels = {s["label"]: s["points"] for s in spec["series"]}
    assert labels["train loss (attempt 1)"] == [[1, 2.95], [5, 2.75], [10, 2.5], [15, 2.25], [20, 2.0]]
    assert labels["train loss (attempt 2)"] == [[25, 1.5]] and labels["eval loss"] == [[25, 1.7]]
    assert "Cancel" in page and "$" in page


def test_actions_need_the_csrf_token_and_the_owner(site, tmp_path):
    a = site["jobs"]["alice"]
    carol, carol_csrf = login(site, "carol")  # alice's teammate: sees it, may not act on it
    page = carol.get(f"/jobs/{a}").text
    assert a in page and "/cancel" not in page
    assert carol.post(f"/jobs/{a}/cancel", data={"csrf": carol_csrf}).status_code == 403
    alice, csrf = login(site, "alice")
    assert alice.post(f"/jobs/{a}/cancel", data={"csrf": "forged"}).status_code == 403
    assert alice.post(f"/jobs/{a}/cancel").status_code == 403
    with Store(site["home"] / "state.db") as store:
        assert not store.get_job(a).cancel_requested
    # with its token the form works, and says so on the job's page
    r = alice.post(f"/jobs/{a}/preempt", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"].startswith(f"/jobs/{a}?done=")
    with Store(site["home"] / "state.db") as store:
        assert store.live_attempts()[0].preempt_request == "soft"


def test_spend_sweeps_and_offers_pages(site):
    ann, csrf = login(site, "ann")
    assert "Spend" in ann.get("/spend").text and "By provider" in ann.get("/spend").text
    assert ann.get("/sweeps").status_code == 200
    job = body()["yaml"]
    r = ann.post("/offers", data={"csrf": csrf, "text": job})
    assert r.status_code == 200 and "Ranked by expected cost" in r.text and "local" in r.text
    bad = ann.post("/offers", data={"csrf": csrf, "text": job.replace("max_steps", "max_stepz")})
    assert bad.status_code == 422 and "max_stepz" in bad.text and "max_steps" in bad.text  # did you mean
    assert ann.post("/offers", data={"text": job}).status_code == 403  # no CSRF token


def test_logout_ends_the_session(site):
    c, csrf = login(site, "alice")
    assert c.post("/logout", data={"csrf": csrf}).status_code == 303
    assert c.get("/").status_code == 303


def test_tunefleet_dashboard_logs_the_one_person_in_on_the_demos_state(tmp_path):
    """After `make demo` there are jobs and no accounts: `tunefleet dashboard` makes a local admin,
    prints a login token, and that token's session sees the jobs queued without an account."""
    import os
    import signal
    import subprocess
    import sys

    from benchmarks.server_load import _free_port

    home = tmp_path / "home"
    home.mkdir()
    with Store(home / "state.db") as store:
        job = store.submit({"base_model": "tunefleet/tiny-llama"}, name="from-the-demo")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "dashboard", "--no-daemon", "--port", str(port)],
                            env={**os.environ, "TUNEFLEET_HOME": str(home), "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        token = proc.stdout.readline().strip()
        assert token.startswith("tf_"), proc.stderr.read() if proc.poll() is not None else token
        c = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Accept": "text/html"}, timeout=30)
        for _ in range(200):
            try:
                if c.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert c.post("/login", data={"token": token, "next": "/"}).status_code == 303
        assert job in c.get("/").text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    with Store(home / "state.db") as store:
        [admin] = store.list_users()
        assert admin.role == "admin" and admin.team == "local"
        assert store.list_tokens()[0].expires_at is not None  # a login for today, not a standing key


def test_spend_page_budgets_and_what_owned_gpus_saved(site):
    home = site["home"]
    with Store(home / "state.db") as store:
        store.set_team_budget("ml", 50.0)
        job = store.submit({}, name="owned", owner="carol")
        att = store.create_attempt(job, provider="local", offer_id="gpu0", usd_per_hour=0.30, start_step=0,
                                   data={"rented_alt": {"provider": "vast", "offer_id": "v1", "gpu": "RTX_4090",
                                                        "usd_per_hour": 0.50, "est_usd": 1.0}})
        store.transition_attempt(att.id, AttemptState.RUNNING, kind="attempt_running", message="up",
                                 started_at=1_000_000.0)
        store.transition_attempt(att.id, AttemptState.SUCCEEDED, kind="attempt_succeeded", message="done",
                                 ended_at=1_000_000.0 + 2 * 3600, spend_usd=0.60)
    carol, _ = login(site, "carol")
    page = carol.get("/spend").text
    assert "team ml" in page and "$50.00" in page  # her team's budget, with its meter
    assert "vast RTX_4090 at $0.50/h" in page
    assert "$1.00" in page and "$0.40" in page  # 2 h of the rented offer, and what owning saved against it
    bob, _ = login(site, "bob")
    assert "vast RTX_4090" not in bob.get("/spend").text and "team ml" not in bob.get("/spend").text


def test_a_sweeps_page_is_its_teams(site):
    with Store(site["home"] / "state.db") as store:
        sweep = store.create_sweep("lr", {"sweep": {"strategy": "successive_halving"}, "rungs": [20, 40]}, 5.0,
                                   owner="alice")
        store.add_trial(sweep, trial=0, rung=0, params={"learning_rate": 0.01}, spec={}, name="lr/t0/r0")
    carol, _ = login(site, "carol")
    assert sweep in carol.get("/sweeps").text
    page = carol.get(f"/sweeps/{sweep}").text
    assert "learning_rate=0.01" in page and "successive_halving" in page and "$5.00" in page
    bob, _ = login(site, "bob")
    assert sweep not in bob.get("/sweeps").text and bob.get(f"/sweeps/{sweep}").status_code == 404


def test_resume_a_job_stopped_by_its_budget_with_a_new_cap(site):
    from urllib.parse import unquote

    with Store(site["home"] / "state.db") as store:
        job = store.submit({"policy": {"max_usd": 1.0}}, name="capped", owner="alice")
        store.add_spend(job, None, provider="local", usd=0.9)
        store.transition_job(job, JobState.STOPPED_BUDGET, kind="stopped_budget", message="stopped by budget")
    alice, csrf = login(site, "alice")
    page = alice.get(f"/jobs/{job}").text
    assert 'action="/jobs/%s/resume"' % job in page and "/cancel" not in page
    low = alice.post(f"/jobs/{job}/resume", data={"csrf": csrf, "max_usd": "0.5"})
    assert low.status_code == 303 and "is not above" in unquote(low.headers["location"])
    with Store(site["home"] / "state.db") as store:
        assert store.get_job(job).state is JobState.STOPPED_BUDGET  # a refused resume changes nothing
    ok = alice.post(f"/jobs/{job}/resume", data={"csrf": csrf, "max_usd": "5"})
    assert ok.status_code == 303 and "?done=" in ok.headers["location"]
    with Store(site["home"] / "state.db") as store:
        row = store.get_job(job)
        assert row.state is JobState.QUEUED and row.spec["policy"]["max_usd"] == 5.0
