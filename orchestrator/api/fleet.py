"""``/api/v1``: providers, estimate, offers and sweeps, read-only.

Thin routes over :mod:`orchestrator.views_fleet`, the functions the CLI prints with ``--json``:
``GET /providers`` is ``tunefleet providers --json``, ``POST /estimate`` and ``POST /offers`` take
the body of ``POST /jobs`` (the job file as text, its local files as base64), validate it exactly
as a submit does (the same 422s) and return ``tunefleet estimate --json`` and ``tunefleet offers
--json [--all]``; nothing is queued and the uploaded copies are deleted. ``GET /sweeps/ID`` is
``tunefleet sweep status ID --json`` for a caller who may see every trial job of the sweep (an
admin always; a sweep queued on the server machine without an account is an admin's); anyone else
gets the 404 of a sweep that does not exist. A sweep id is matched whole (no prefixes over HTTP).
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

from orchestrator.api.auth import Caller, authenticate
from orchestrator.api.jobs import SubmitBody, _only_uploaded, _unpack

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
            raise HTTPException(422, [{"loc": p.loc, "line": p.line, "message": p.message} for p in exc.problems]) \
                from None
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


@router.get("/sweeps/{sweep_id}", tags=["sweeps"])
def sweep_status(sweep_id: str, request: Request, caller: Auth) -> dict[str, Any]:
    """A sweep's leaderboard (``tunefleet sweep status ID --json``)."""
    from orchestrator.store import StoreError
    from orchestrator.views_fleet import sweep_owners, sweep_view

    store, access = request.app.state.store, request.app.state.access
    missing = HTTPException(404, f"no sweep {sweep_id!r}")  # never the store's candidates: other teams' ids
    try:
        found = store.get_sweep(sweep_id)["id"]
    except StoreError:
        raise missing from None
    if found != sweep_id:
        raise missing
    if not caller.admin:
        owners = sweep_owners(store, sweep_id)
        if not owners or not all(access.sees(caller, o) for o in owners):
            raise missing
    try:
        return sweep_view(store, sweep_id)
    except StoreError:
        raise missing from None
