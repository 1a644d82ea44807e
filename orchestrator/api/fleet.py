"""``/api/v1``: providers, estimate, offers, and sweeps (start, list, leaderboard).

Thin routes over :mod:`orchestrator.views_fleet`, the functions the CLI prints with ``--json``:
``GET /providers`` is ``tunefleet providers --json``, ``POST /estimate`` and ``POST /offers`` take
the body of ``POST /jobs`` (the job file as text, its local files as base64), validate it exactly
as a submit does (the same 422s) and return ``tunefleet estimate --json`` and ``tunefleet offers
--json [--all]``; nothing is queued and the uploaded copies are deleted. ``POST /sweeps`` is
``tunefleet sweep SWEEP.yaml``: the caller owns the sweep and its trial jobs, whose spend counts
against their and their team's monthly caps. ``GET /sweeps/ID`` is ``tunefleet sweep status ID
--json`` for the owner's team (an admin: any; a sweep started on the server machine without an
account is an admin's); anyone else gets the 404 of a sweep that does not exist. A sweep id is
matched whole (no prefixes over HTTP; ``GET /sweeps`` lists the ids one may see).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.api.auth import Caller, authenticate
from orchestrator.api.jobs import MAX_FILES, SubmitBody, _only_uploaded, _unpack, job_problems

from orchestrator.sweep import SWEEP_BASE

SWEEP_FILE = "sweep.yaml"  # where an uploaded sweep file is written, beside its base job

router = APIRouter()
Auth = Annotated[Caller, Depends(authenticate)]


@contextmanager
def _uploaded_spec(body: SubmitBody, config) -> Iterator[Any]:
    """The job of ``body``, validated as ``POST /jobs`` validates it (422 with validate's messages),
    its files in a temporary folder for as long as the block runs."""
    from jobs.spec import JobFileError, load_job_text
    from providers.registry import PROVIDERS

    folder = Path(tempfile.mkdtemp(prefix="tunefleet-quote-"))
    try:
        _unpack(body.files, folder)
        try:
            spec = load_job_text(body.yaml, base_dir=folder, source_name="job.yaml", known_providers=PROVIDERS,
                                 now=time.time(), warnings=[])
        except JobFileError as exc:
            raise HTTPException(422, job_problems(exc, folder)) from None
        _only_uploaded(spec, folder, config)
        yield spec
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@router.get("/providers", tags=["fleet"])
def providers(request: Request, caller: Auth) -> list[dict[str, Any]]:
    """Every provider: enabled or not and why, launchable, how the daemon last found it, and the
    interruption hazards learned there (``tunefleet providers --json``)."""
    from orchestrator.views_fleet import providers_view

    rows, _ = providers_view(request.app.state.config, request.app.state.store)
    return rows


@router.post("/estimate", tags=["fleet"])
def estimate(body: SubmitBody, request: Request, caller: Auth) -> dict[str, Any]:
    """VRAM, tokens, and hours on each GPU model for a job, before anything is rented
    (``tunefleet estimate --json``). Nothing is queued."""
    from orchestrator.views_fleet import calibrated_estimate, estimate_view

    store = request.app.state.store
    with _uploaded_spec(body, request.app.state.config) as spec:
        return estimate_view(spec, calibrated_estimate(spec, store))


@router.post("/offers", tags=["fleet"])
def offers(body: SubmitBody, request: Request, caller: Auth,
           all: Annotated[bool, Query(description="Also list rejected offers and placeholder prices.")] = False
           ) -> dict[str, Any]:
    """Every provider's offers for a job, ranked by expected cost of the completed job, and what the
    daemon would do with it now (``tunefleet offers --json [--all]``). Nothing is queued."""
    from orchestrator.views_fleet import calibrated_estimate, offers_view

    store, config = request.app.state.store, request.app.state.config
    with _uploaded_spec(body, config) as spec:
        est = calibrated_estimate(spec, store)
        return offers_view(config, store, spec, est, all).to_dict()


class SweepBody(BaseModel):
    """A sweep to start: the sweep file's text, its base job's text, and the local files the base
    job names (keyed as it names them, relative to the base job)."""

    model_config = ConfigDict(extra="forbid")

    yaml: str = Field(min_length=1, max_length=1 << 20,
                      description=f"The sweep file's text; its base: must be {SWEEP_BASE!r} (the job in 'base').")
    base: str = Field(min_length=1, max_length=1 << 20, description="The base job file's text (YAML or JSON).")
    files: dict[str, str] = Field(default_factory=dict, max_length=MAX_FILES,
                                  description="Relative path as the base job names it -> the file's bytes, base64.")


@router.post("/sweeps", status_code=201, tags=["sweeps"])
def start_sweep(body: SweepBody, request: Request, caller: Auth) -> dict[str, Any]:
    """Validate a sweep and every trial, then queue its first rung (``tunefleet sweep SWEEP.yaml``):
    ``{"id": SWEEP}``. The caller owns the sweep and its trials; nothing is queued on any error."""
    import yaml

    from infra.storage import StorageError
    from jobs.inputs import InputError
    from jobs.spec import JobFileError, load_job_text
    from orchestrator.queue import submit_sweep
    from orchestrator.sweep import SweepError
    from providers.registry import PROVIDERS

    config = request.app.state.config
    reserved = {SWEEP_BASE, SWEEP_FILE} & set(body.files)
    if reserved:
        raise HTTPException(422, [{"loc": f"files.{n}", "line": None,
                                   "message": "this name is the sweep's own; rename the file"} for n in sorted(reserved)])
    try:
        doc = yaml.safe_load(body.yaml)
    except yaml.YAMLError:
        doc = None
    if not isinstance(doc, dict) or doc.get("base") != SWEEP_BASE:
        raise HTTPException(422, [{"loc": "base", "line": None,
                                   "message": f"the sweep's base: must be {SWEEP_BASE!r}, with the base job's text "
                                              "in the request's 'base' (tunefleet sweep does this for you)"}])
    folder = Path(tempfile.mkdtemp(prefix="tunefleet-sweep-"))
    try:
        _unpack(body.files, folder)
        try:
            spec = load_job_text(body.base, base_dir=folder, source_name=SWEEP_BASE, known_providers=PROVIDERS,
                                 now=time.time(), warnings=[])
        except JobFileError as exc:
            raise HTTPException(422, job_problems(exc, folder, "base.")) from None
        _only_uploaded(spec, folder, config)
        (folder / SWEEP_BASE).write_text(body.base)
        (folder / SWEEP_FILE).write_text(body.yaml)
        try:
            sweep_id = submit_sweep(request.app.state.store, folder / SWEEP_FILE, config, owner=caller.user.name)
        except (SweepError, InputError) as exc:
            # the messages name the upload folder: show the names the caller sent instead
            raise HTTPException(422, f"{str(exc).replace(str(folder) + '/', '')}\nnothing was queued") from None
        except StorageError as exc:
            raise HTTPException(503, f"staging the sweep's inputs: {exc}; nothing was queued") from None
        return {"id": sweep_id}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@router.get("/report", tags=["fleet"], response_class=HTMLResponse)
def report(request: Request, caller: Auth) -> HTMLResponse:
    """``tunefleet report``'s self-contained HTML page, over what the caller may see: their team's
    sweeps, jobs and spend (an admin: everything)."""
    from orchestrator.report import build_report

    access = request.app.state.access
    page = build_report(request.app.state.store, request.app.state.config,
                        sees=lambda owner: access.sees(caller, owner))
    return HTMLResponse(page)


@router.get("/sweeps", tags=["sweeps"])
def list_sweeps(request: Request, caller: Auth) -> list[dict[str, Any]]:
    """The sweeps the caller may see (their team's; an admin: all), newest first."""
    store = request.app.state.store
    return store.list_sweeps() if caller.admin else store.list_sweeps(team=caller.user.team)


@router.get("/sweeps/{sweep_id}", tags=["sweeps"])
def sweep_status(sweep_id: str, request: Request, caller: Auth) -> dict[str, Any]:
    """A sweep's leaderboard (``tunefleet sweep status ID --json``)."""
    from orchestrator.store import StoreError
    from orchestrator.views_fleet import sweep_view

    store, access = request.app.state.store, request.app.state.access
    missing = HTTPException(404, f"no sweep {sweep_id!r}")  # never the store's candidates: other teams' ids
    try:
        found = store.get_sweep(sweep_id)
    except StoreError:
        raise missing from None
    if found["id"] != sweep_id or not access.sees(caller, found.get("owner")):
        raise missing
    try:
        return sweep_view(store, sweep_id)
    except StoreError:
        raise missing from None
