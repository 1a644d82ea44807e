"""The dashboard's routes: server-rendered pages (Jinja2) and the fragments htmx polls for.

Why server-rendered, with htmx and uPlot vendored (``static/vendor``): nothing to build at install
time, and every page is the same views the CLI and the API use, through the same visibility and
permission checks (``orchestrator.api.auth.Access``). A job another team owns answers 404 here too.
Live parts of a page are fragments the page polls every ``POLL_S`` seconds: the queue's rows, a
job's state, attempts, checkpoints and loss chart, and its log tail.

Actions (cancel, preempt, resume) are POST forms with the session's CSRF token, and answer with
a redirect back to the job (so a reload never repeats them). Members act on their own jobs only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from orchestrator.web import data
from orchestrator.web.session import COOKIE, Viewer, check_csrf, is_https, safe_next, viewer

HERE = Path(__file__).resolve().parent
POLL_S = 2
MAX_YAML_BYTES = 1 << 20
LOG_TAIL_BYTES = 64 << 10

router = APIRouter(include_in_schema=False)
Who = Annotated[Viewer, Depends(viewer)]


def _env():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters.update(usd=usd, dur=duration, clock=clock, num=num)
    return env


_ENV = None


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    global _ENV
    if _ENV is None:
        _ENV = _env()
    who = context.get("who")
    page = _ENV.get_template(name).render(path=request.url.path, poll_s=POLL_S, who=who,
                                          csrf=who.csrf if who else "", **{k: v for k, v in context.items() if k != "who"})
    return HTMLResponse(page, status_code=status, headers={"Cache-Control": "no-store"})


# -------------------------------------------------------------------- formatting (Jinja filters)
def usd(value: float | None) -> str:
    """Dollars as the CLI writes them (``orchestrator.budget.usd``); a dash for none."""
    from orchestrator.budget import usd as dollars

    return "–" if value is None else dollars(float(value))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = int(round(float(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def clock(ts: float | None) -> str:
    return "–" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(ts)))


def num(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{float(value):.{digits}g}"


# -------------------------------------------------------------------- login
@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/") -> HTMLResponse:
    return render(request, "login.html", next=safe_next(next), error=None)


@router.post("/login")
def login(request: Request, token: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "/") -> Response:
    opened = request.app.state.store.open_session(token.strip())
    if opened is None:
        return render(request, "login.html", status=401, next=safe_next(next),
                      error="That token is not valid (revoked, expired, or mistyped). "
                            "An admin makes one with: tunefleet admin token create USER")
    cookie, _, _ = opened
    resp = RedirectResponse(safe_next(next), status_code=303)
    resp.set_cookie(COOKIE, cookie, httponly=True, samesite="strict", secure=is_https(request), path="/",
                    max_age=12 * 3600)
    return resp


@router.post("/logout")
def logout(request: Request, who: Who, csrf: Annotated[str, Form()] = "") -> Response:
    check_csrf(request, who, csrf)
    request.app.state.store.end_session(request.cookies.get(COOKIE))
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(COOKIE, path="/")
    return resp


# -------------------------------------------------------------------- queue
def _filters(state: str | None, owner: str | None, sweep: str | None) -> dict[str, str]:
    return {k: v for k, v in (("state", state), ("owner", owner), ("sweep", sweep)) if v}


@router.get("/", response_class=HTMLResponse)
def queue_page(request: Request, who: Who, state: str | None = None, owner: str | None = None,
               sweep: str | None = None) -> HTMLResponse:
    from orchestrator.states import JobState

    app = request.app.state
    rows = data.queue(app.store, app.access, who.caller, state=state, owner=owner, sweep=sweep)
    owners = sorted(u.name for u in app.store.list_users() if who.caller.admin or u.team == who.caller.user.team)
    return render(request, "queue.html", who=who, rows=rows, filters=_filters(state, owner, sweep),
                  states=[s.value for s in JobState], owners=owners, sweeps=data.sweeps(app.store, who.caller))


@router.get("/ui/queue", response_class=HTMLResponse)
def queue_rows(request: Request, who: Who, state: str | None = None, owner: str | None = None,
               sweep: str | None = None) -> HTMLResponse:
    app = request.app.state
    rows = data.queue(app.store, app.access, who.caller, state=state, owner=owner, sweep=sweep)
    return render(request, "_queue_rows.html", who=who, rows=rows, filters=_filters(state, owner, sweep))


# -------------------------------------------------------------------- a job
def _job(request: Request, who: Viewer, job_id: str):
    from orchestrator.store import JobNotFound

    app = request.app.state
    try:
        job = app.store.get_job(app.store.resolve_job_id(job_id) if len(job_id) < 8 else job_id)
    except JobNotFound:
        job = None
    if job is None or not app.access.sees(who.caller, job.owner):
        raise HTTPException(404, f"no job {job_id!r}")
    return job


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, who: Who, job_id: str, done: str | None = None,
             error: str | None = None) -> HTMLResponse:
    app = request.app.state
    job = _job(request, who, job_id)
    return render(request, "job.html", who=who, s=data.story(app.store, app.config, job),
                  chart=data.loss_chart(app.store, job), acts=app.access.acts(who.caller, job.owner),
                  done=done, error=error)


@router.get("/ui/jobs/{job_id}", response_class=HTMLResponse)
def job_live(request: Request, who: Who, job_id: str) -> HTMLResponse:
    app = request.app.state
    job = _job(request, who, job_id)
    return render(request, "_job_live.html", who=who, s=data.story(app.store, app.config, job),
                  chart=data.loss_chart(app.store, job))


@router.get("/ui/jobs/{job_id}/log", response_class=HTMLResponse)
def job_log(request: Request, who: Who, job_id: str) -> HTMLResponse:
    app = request.app.state
    job = _job(request, who, job_id)
    parts = []
    for a in app.store.attempts_for(job.id):
        path = Path(a.log_path or app.config.attempt_log(a.id))
        try:
            with open(path, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                f.seek(max(0, size - LOG_TAIL_BYTES))
                text = f.read().decode(errors="replace")
        except OSError:
            text = ""
        parts.append({"seq": a.seq, "provider": a.provider, "text": text, "cut": size > LOG_TAIL_BYTES if text else False})
    return render(request, "_log.html", who=who, parts=parts[-3:], terminal=job.terminal)


@router.post("/jobs/{job_id}/{action}")
def job_action(request: Request, who: Who, job_id: str, action: str, csrf: Annotated[str, Form()] = "",
               max_usd: Annotated[str, Form()] = "", hard: Annotated[str, Form()] = "") -> Response:
    from urllib.parse import quote

    from orchestrator.views import ViewError, cancel_job, preempt_job, resume_job

    check_csrf(request, who, csrf)
    app = request.app.state
    job = _job(request, who, job_id)
    if action not in ("cancel", "preempt", "resume"):
        raise HTTPException(404, f"no action {action!r}")
    if not app.access.acts(who.caller, job.owner):
        raise HTTPException(403, f"job {job.id} is {job.owner}'s: members act on their own jobs only")
    try:
        if action == "cancel":
            out = cancel_job(app.store, job.id)
        elif action == "preempt":
            out = preempt_job(app.store, job.id, hard=bool(hard))
        else:
            try:
                cap = float(max_usd) if max_usd.strip() else None
            except ValueError:
                raise ViewError(f"the new cap must be a number of dollars, not {max_usd!r}", 2) from None
            out = resume_job(app.store, job.id, cap)
    except ViewError as exc:
        return RedirectResponse(f"/jobs/{job.id}?error={quote(exc.message)}", status_code=303)
    said = out.get("message") or f"{action} requested"
    return RedirectResponse(f"/jobs/{job.id}?done={quote(str(said))}", status_code=303)


# -------------------------------------------------------------------- spend, sweeps, offers
@router.get("/spend", response_class=HTMLResponse)
def spend_page(request: Request, who: Who) -> HTMLResponse:
    app = request.app.state
    return render(request, "spend.html", who=who, d=data.spend(app.store, app.config, app.access, who.caller))


@router.get("/sweeps", response_class=HTMLResponse)
def sweeps_page(request: Request, who: Who) -> HTMLResponse:
    return render(request, "sweeps.html", who=who, sweeps=data.sweeps(request.app.state.store, who.caller))


@router.get("/sweeps/{sweep_id}", response_class=HTMLResponse)
def sweep_page(request: Request, who: Who, sweep_id: str) -> HTMLResponse:
    from orchestrator.store import StoreError
    from orchestrator.views_fleet import sweep_view

    app = request.app.state
    try:
        found = app.store.get_sweep(sweep_id)
    except StoreError:
        found = None
    if found is None or found["id"] != sweep_id or not app.access.sees(who.caller, found.get("owner")):
        raise HTTPException(404, f"no sweep {sweep_id!r}")
    summary = sweep_view(app.store, sweep_id)
    return render(request, "sweep.html", who=who, w=summary, chart=data.sweep_chart(app.store, sweep_id))


@router.get("/offers", response_class=HTMLResponse)
def offers_form(request: Request, who: Who) -> HTMLResponse:
    from orchestrator.views_fleet import learned_rows

    return render(request, "offers.html", who=who, text="", result=None, problems=None,
                  hazards=learned_rows(request.app.state.store))


@router.post("/offers", response_class=HTMLResponse)
async def offers_quote(request: Request, who: Who, csrf: Annotated[str, Form()] = "",
                       text: Annotated[str, Form()] = "", file: UploadFile | None = None) -> HTMLResponse:
    import asyncio

    check_csrf(request, who, csrf)
    if file is not None and file.filename:
        raw = await file.read(MAX_YAML_BYTES + 1)
        text = raw.decode(errors="replace")
    if len(text.encode()) > MAX_YAML_BYTES:
        text, problems = "", [{"loc": "file", "line": None, "message": "a job file is at most 1 MiB"}]
        return render(request, "offers.html", status=422, who=who, text=text, result=None, problems=problems,
                      hazards=[])
    return await asyncio.to_thread(_quote, request, who, text)


def _quote(request: Request, who: Viewer, text: str) -> HTMLResponse:
    import tempfile

    from jobs.spec import JobFileError, load_job_text
    from orchestrator.api.jobs import job_problems
    from orchestrator.views_fleet import calibrated_estimate, learned_rows, offers_view
    from providers.registry import PROVIDERS

    app = request.app.state
    hazards = learned_rows(app.store)
    with tempfile.TemporaryDirectory(prefix="tunefleet-offers-") as folder:
        try:
            # a pasted job names no files here: datasets are not read, only the job's shape is priced
            spec = load_job_text(text, base_dir=Path(folder), source_name="job.yaml", known_providers=PROVIDERS,
                                 now=time.time(), warnings=[], check_files=False)
        except JobFileError as exc:
            return render(request, "offers.html", status=422, who=who, text=text, result=None,
                          problems=job_problems(exc, Path(folder)), hazards=hazards)
        est = calibrated_estimate(spec, app.store)
        result = offers_view(app.config, app.store, spec, est, False).to_dict()  # as `tunefleet offers`
    return render(request, "offers.html", who=who, text=text, result=result, problems=None, hazards=hazards)
