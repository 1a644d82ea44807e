"""``/api/v1``: jobs (submit, list, show, events, logs, cancel, preempt, resume), spend, whoami.

Thin routes: each authenticates (``auth.authenticate``), checks what the caller may see or do
(``auth.Access``), and calls the same function the CLI calls (``orchestrator.views``,
``orchestrator.queue``), so a job's JSON here is what ``tunefleet status JOB --json`` prints.

Submitting from another machine: the job file travels as text (YAML, or JSON) with the local
files it names (datasets, a model folder) as base64 in ``files``, keyed by the path the file uses.
They are validated exactly as ``tunefleet validate`` does (same messages, key paths and lines,
as 422), then staged into the job's checkpoint store by content and the copies deleted; nothing is
queued unless everything is valid. A job may not name files on the server itself, nor a checkpoint
store on the server's disk other than the server's own default.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.api.auth import Caller, authenticate
from orchestrator.views import SPEND_GROUPS, ViewError, cancel_job, events_view, preempt_job, resume_job, spend_view

router = APIRouter()
Auth = Annotated[Caller, Depends(authenticate)]
MAX_FILES = 1000


class SubmitBody(BaseModel):
    """A job to queue: its file as text (``yaml``, YAML or JSON) and the local files it names."""

    model_config = ConfigDict(extra="forbid")

    yaml: str = Field(min_length=1, max_length=1 << 20, description="The job file's text (YAML or JSON).")
    files: dict[str, str] = Field(default_factory=dict, max_length=MAX_FILES,
                                  description="Relative path as the job file names it -> the file's bytes, base64.")
    priority: int | None = Field(None, ge=-1_000_000, le=1_000_000)


class PreemptBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hard: bool = False
    attempt: int | None = Field(None, ge=1)


class ResumeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_usd: float | None = None


def _refused(exc: ViewError) -> HTTPException:
    return HTTPException(422 if exc.code == 2 else 409, exc.message)


def _visible_job(request: Request, caller: Caller, job_id: str, *, act: bool = False):
    """The job if the caller may see it (and, with ``act``, act on it); 404 otherwise, 403 for a
    job of the caller's team that is not theirs to act on."""
    from orchestrator.store import JobNotFound

    store, access = request.app.state.store, request.app.state.access
    try:
        job = store.get_job(job_id)
    except JobNotFound:
        raise HTTPException(404, f"no job {job_id!r}") from None
    if not access.sees(caller, job.owner):
        raise HTTPException(404, f"no job {job_id!r}")
    if act and not access.acts(caller, job.owner):
        raise HTTPException(403, f"job {job_id} is {job.owner}'s: members act on their own jobs only")
    return job


@router.get("/whoami", tags=["accounts"])
def whoami(caller: Auth) -> dict[str, Any]:
    """The token's user: name, team, role."""
    u = caller.user
    return {"name": u.name, "team": u.team, "role": u.role}


@router.post("/jobs", status_code=201, tags=["jobs"])
def submit(body: SubmitBody, request: Request, caller: Auth) -> dict[str, Any]:
    """Validate a job file and queue it (``tunefleet submit``): ``{"id": JOB}``."""
    from jobs.spec import JobFileError, load_job_text
    from orchestrator.queue import submit_spec
    from providers.registry import PROVIDERS

    config = request.app.state.config
    folder = Path(tempfile.mkdtemp(prefix="tunefleet-submit-"))
    try:
        _unpack(body.files, folder)
        warnings: list[str] = []
        try:
            spec = load_job_text(body.yaml, base_dir=folder, source_name="job.yaml", known_providers=PROVIDERS,
                                 now=time.time(), warnings=warnings)
        except JobFileError as exc:
            raise HTTPException(422, job_problems(exc, folder)) from None
        _only_uploaded(spec, folder, config)
        from infra.storage import StorageError
        from jobs.inputs import InputError

        try:
            job_id = submit_spec(request.app.state.store, spec, config, body.priority, owner=caller.user.name)
        except InputError as exc:
            raise HTTPException(422, f"{exc}; nothing was queued") from None
        except StorageError as exc:
            raise HTTPException(503, f"staging the job's inputs: {exc}; nothing was queued") from None
        return {"id": job_id, "warnings": warnings}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def job_problems(exc, folder: Path, loc_prefix: str = "") -> list[dict[str, Any]]:
    """A JobFileError as the 422 body: validate's key paths, lines and messages, with the upload's
    temporary folder taken out (the caller knows the files by the names they sent)."""
    inside = str(folder) + os.sep
    return [{"loc": loc_prefix + p.loc, "line": p.line, "message": p.message.replace(inside, "")}
            for p in exc.problems]


def _unpack(files: dict[str, str], folder: Path) -> None:
    """Write the uploaded files under ``folder``; 422 for a path that would leave it, or bad base64."""
    for name, data in files.items():
        rel = PurePosixPath(name)
        if not name or rel.is_absolute() or ".." in rel.parts or "\\" in name or "\0" in name:
            raise HTTPException(422, [{"loc": f"files.{name}", "line": None,
                                       "message": "a relative path inside the job's folder (no '..', not absolute)"}])
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(422, [{"loc": f"files.{name}", "line": None, "message": "not valid base64"}]) \
                from None
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(raw)


def _only_uploaded(spec, folder: Path, config) -> None:
    """Refuse what would read or write the server's own disk: inputs not uploaded with the request
    and a ``file://`` checkpoint store other than the server's default."""
    root = str(folder.resolve()) + os.sep
    problems = []
    for key in ("datasets", "eval_datasets"):
        for i, d in enumerate(getattr(spec, key) or []):
            if not os.path.realpath(d.path).startswith(root):
                problems.append({"loc": f"{key}[{i}].path", "line": None,
                                 "message": f"{d.path} is not among the uploaded files: send it in files"})
    base = spec.base_model
    if os.path.isabs(base) and not os.path.realpath(base).startswith(root):
        problems.append({"loc": "base_model", "line": None,
                         "message": "a local model folder must be uploaded in files (or use a Hugging Face id)"})
    store = spec.checkpoint.store
    if store is not None and not store.startswith("s3://") and store != config.default_store:
        problems.append({"loc": "checkpoint.store", "line": None,
                         "message": "on a team server a job's store is the server's default or an s3:// URI"})
    if problems:
        raise HTTPException(422, problems)


@router.get("/jobs", tags=["jobs"])
def list_jobs(request: Request, caller: Auth,
              state: Annotated[list[str] | None, Query(description="Only jobs in these states.")] = None,
              owner: Annotated[str | None, Query(description="Only this user's jobs.")] = None,
              limit: Annotated[int, Query(ge=1, le=100_000)] = 50) -> list[dict[str, Any]]:
    """The jobs the caller may see, newest first (``tunefleet status --json``)."""
    from orchestrator.queue import job_summaries
    from orchestrator.states import JobState

    store, access = request.app.state.store, request.app.state.access
    try:
        states = [JobState(s) for s in state] if state else None
    except ValueError:
        raise HTTPException(422, f"state must be one of {', '.join(s.value for s in JobState)}") from None
    team = None if caller.admin else caller.user.team
    rows = store.list_jobs(states=states, limit=limit, owner=owner, team=team)
    return job_summaries(store, [j for j in rows if access.sees(caller, j.owner)])


@router.get("/jobs/{job_id}", tags=["jobs"])
def show_job(job_id: str, request: Request, caller: Auth) -> dict[str, Any]:
    """One job's status with its final eval loss (``tunefleet status JOB --json``)."""
    from orchestrator.queue import job_summary, with_eval

    store = request.app.state.store
    return with_eval(store, job_summary(store, _visible_job(request, caller, job_id)))


@router.get("/jobs/{job_id}/events", tags=["jobs"])
def job_events(job_id: str, request: Request, caller: Auth,
               after: Annotated[int, Query(ge=0, description="Only events after this id.")] = 0) -> list[dict[str, Any]]:
    """The job's timeline (``tunefleet events --json``)."""
    _visible_job(request, caller, job_id)
    return events_view(request.app.state.store, job_id, after)


@router.get("/jobs/{job_id}/logs", tags=["jobs"])
async def job_logs(job_id: str, request: Request, caller: Auth,
                   follow: bool = False, attempt: Annotated[int | None, Query(ge=1)] = None) -> StreamingResponse:
    """The payload's output as server-sent events: ``attempt`` (JSON: seq, provider, state) before
    each attempt's lines, ``log`` (a chunk of text), and ``end`` when there is no more (with
    ``follow``: when the job has ended and its last log is read)."""
    _visible_job(request, caller, job_id)
    store, config = request.app.state.store, request.app.state.config
    return StreamingResponse(_log_events(store, config, job_id, follow, attempt, request),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _log_events(store, config, job_id: str, follow: bool, seq: int | None, request: Request):
    import json

    sent: dict[str, int] = {}  # attempt id -> bytes sent
    while True:
        attempts = [a for a in await asyncio.to_thread(store.attempts_for, job_id) if seq is None or a.seq == seq]
        for a in attempts:
            if a.id not in sent:
                sent[a.id] = 0
                yield _sse("attempt", json.dumps({"seq": a.seq, "id": a.id, "provider": a.provider,
                                                  "state": a.state.value}))
            path = Path(a.log_path or config.attempt_log(a.id))
            chunk = await asyncio.to_thread(_read_from, path, sent[a.id])
            if chunk:
                sent[a.id] += len(chunk)
                yield _sse("log", chunk.decode(errors="replace"))
        job = await asyncio.to_thread(store.get_job, job_id)
        done = job.terminal and all(not _more(Path(a.log_path or config.attempt_log(a.id)), sent.get(a.id, 0))
                                    for a in attempts)
        if not follow or done or await request.is_disconnected():
            yield _sse("end", json.dumps({"state": job.state.value}))
            return
        await asyncio.sleep(0.5)


def _read_from(path: Path, offset: int, limit: int = 1 << 20) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(limit)
    except OSError:
        return b""


def _more(path: Path, offset: int) -> bool:
    try:
        return path.stat().st_size > offset
    except OSError:
        return False


def _sse(event: str, data: str) -> str:
    return f"event: {event}\n" + "".join(f"data: {line}\n" for line in data.split("\n")) + "\n"


@router.post("/jobs/{job_id}/cancel", tags=["jobs"])
def cancel(job_id: str, request: Request, caller: Auth) -> dict[str, Any]:
    """Cancel at once if queued; the daemon stops a running attempt (``tunefleet cancel --json``)."""
    _visible_job(request, caller, job_id, act=True)
    try:
        return cancel_job(request.app.state.store, job_id)
    except ViewError as exc:
        raise _refused(exc) from None


@router.post("/jobs/{job_id}/preempt", tags=["jobs"])
def preempt(job_id: str, request: Request, caller: Auth, body: PreemptBody | None = None) -> dict[str, Any]:
    """Interrupt the running attempt as a spot reclaim would (``tunefleet preempt --json``)."""
    body = body or PreemptBody()
    _visible_job(request, caller, job_id, act=True)
    try:
        return preempt_job(request.app.state.store, job_id, hard=body.hard, seq=body.attempt)
    except ViewError as exc:
        raise _refused(exc) from None


@router.post("/jobs/{job_id}/resume", tags=["jobs"])
def resume(job_id: str, request: Request, caller: Auth, body: ResumeBody | None = None) -> dict[str, Any]:
    """Queue a job stopped by its budget again, optionally with a new cap (``tunefleet resume --json``)."""
    body = body or ResumeBody()
    _visible_job(request, caller, job_id, act=True)
    try:
        return resume_job(request.app.state.store, job_id, body.max_usd)
    except ViewError as exc:
        raise _refused(exc) from None


@router.get("/spend", tags=["spend"])
def spend(request: Request, caller: Auth,
          by: Annotated[str, Query(description=f"One of {', '.join(SPEND_GROUPS)}.")] = "job") -> dict[str, Any]:
    """The spend ledger the caller may see (theirs and their team's; an admin: all), grouped
    (``tunefleet spend --json``)."""
    store, access = request.app.state.store, request.app.state.access
    rows = [r for r in store.spend_rows() if access.sees(caller, r.get("owner"))]
    try:
        return spend_view(store, request.app.state.config, by, rows)
    except ViewError as exc:
        raise _refused(exc) from None
