"""``/api/v1/jobs/{id}/spec`` and ``/store``: what ``pull``, ``export`` and ``eval`` read, through the server.

Why read objects through the server instead of handing out the store's credentials: a team member
should get their team's adapters and nothing else. Every read is checked: the caller must see the
job (its team, or an admin), and the key must be the job's own (``JOB/...``: its checkpoints and
final adapter) or one of the inputs staged for it (``inputs/SHA/...``, named in its spec). The
client (``orchestrator.client_store.ServerStore``) builds a read-only ``CheckpointStore`` from these
three routes. Manifests, ``download``'s size and sha256 checks and the staged-input checks then run
on the user's machine exactly as they do against the store itself, so a corrupt copy is caught
where it lands.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from orchestrator.api.auth import Caller, authenticate
from orchestrator.api.jobs import _visible_job

router = APIRouter()
Auth = Annotated[Caller, Depends(authenticate)]


def _job_store(request: Request, job):
    from infra.storage import open_store

    uri = (job.spec.get("checkpoint") or {}).get("store") or request.app.state.config.default_store
    return open_store(uri)


def _readable(job, key: str) -> bool:
    """The job's own objects, and the inputs staged for it; nothing else in the store."""
    from jobs.inputs import PREFIX

    if ".." in key.split("/") or key.startswith("/") or "\\" in key:
        return False
    if key.startswith(f"{job.id}/"):
        return True
    staged = {f"{PREFIX}{ref.get('sha256')}/" for ref in (job.spec.get("inputs") or {}).values()}
    return any(key.startswith(p) for p in staged)


@router.get("/jobs/{job_id}/spec", tags=["artifacts"])
def job_spec(job_id: str, request: Request, caller: Auth) -> dict[str, Any]:
    """The job as queued (its spec, with staged inputs), its state, and the root URI of its checkpoint
    store (what the store names its objects by)."""
    job = _visible_job(request, caller, job_id)
    return {"id": job.id, "state": job.state.value, "spec": job.spec,
            "store_root": _job_store(request, job).key_uri("")}


@router.get("/jobs/{job_id}/store", tags=["artifacts"])
def list_objects(job_id: str, request: Request, caller: Auth,
                 prefix: Annotated[str, Query(description="JOB/... or inputs/SHA/...")]) -> list[tuple[str, int]]:
    """Every (key, size) under ``prefix`` in the job's store: only its own objects and staged inputs."""
    job = _visible_job(request, caller, job_id)
    if not _readable(job, prefix):
        raise HTTPException(404, f"no objects of job {job_id} under {prefix!r}")
    return _job_store(request, job).list_keys(prefix)


@router.get("/jobs/{job_id}/store/{key:path}", tags=["artifacts"], response_class=FileResponse)
def get_object(job_id: str, key: str, request: Request, caller: Auth) -> FileResponse:
    """One object of the job's store, as bytes (404 when missing or not the job's)."""
    from infra.storage import ObjectMissing, StorageError

    job = _visible_job(request, caller, job_id)
    if not _readable(job, key):
        raise HTTPException(404, f"no object {key!r} of job {job_id}")
    store = _job_store(request, job)
    local = store.local_path(key)
    if local is not None and local.is_file():
        return FileResponse(local, media_type="application/octet-stream")
    fd, tmp = tempfile.mkstemp(prefix="tunefleet-object-")
    os.close(fd)
    try:
        store.get_file(key, Path(tmp))
    except StorageError as exc:
        os.unlink(tmp)
        if getattr(exc, "code", None) == ObjectMissing.code:
            raise HTTPException(404, f"no object {key!r} of job {job_id}") from None
        raise HTTPException(503, f"the checkpoint store: {exc}") from None
    return FileResponse(tmp, media_type="application/octet-stream", background=BackgroundTask(os.unlink, tmp))
