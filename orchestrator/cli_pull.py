"""``tunefleet pull``: a finished job's adapter (or one of its checkpoints) on this machine, verified.

Why a command: after ``succeeded`` the adapter sits at a URI in the checkpoint store, and getting
it out by hand means knowing the store's layout and trusting a copy nobody checked. ``pull`` reads
the committed manifest, downloads every file it lists and checks each one's size and sha256
(``CheckpointStore.download``) into a temporary folder beside the destination, then renames it into
place: a corrupt or interrupted pull leaves nothing behind, and an existing folder is never
overwritten.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli_base import CliError, JsonOpt, _config, _emit_json, _job_id, _store, app, console
from orchestrator.states import JobState

META_FILE = "tunefleet_pull.json"  # what was pulled: the job, the step, the source and its training facts


@app.command()
def pull(
    job: str,
    dest: Annotated[Path | None, typer.Argument(help="Folder to create (default: ./<job id>-adapter).")] = None,
    step: Annotated[int | None, typer.Option("--step", help="A committed checkpoint's step instead of "
                                             "the final adapter (any job state).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Download a finished job's adapter (or checkpoint --step N), every file checked against its manifest."""
    import json

    from infra.storage import CorruptCheckpoint, StorageError, open_store

    config = _config()
    with _store(config) as store:
        job_id = _job_id(store, job)
        row = store.get_job(job_id)
    uri = (row.spec.get("checkpoint") or {}).get("store") or config.default_store
    target = Path(dest) if dest is not None else Path(f"{job_id}-adapter" if step is None else f"{job_id}-step{step}")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise CliError(f"{target} already exists and is not empty: pull never overwrites; name another folder", 2)
    try:
        ckpt = open_store(uri)
        if step is None:
            ref = ckpt.final(job_id)
            if ref is None:
                steps = [r.step for r in ckpt.list_checkpoints(job_id)]
                hint = f"; committed checkpoints: steps {', '.join(map(str, steps))} (pull --step N)" if steps else ""
                why = ("it succeeded but its final adapter is not in the store" if row.state is JobState.SUCCEEDED
                       else f"it is {row.state.value}, and only a succeeded job has a final adapter")
                raise CliError(f"{job_id} has no final adapter at {uri}: {why}{hint}")
        else:
            refs = {r.step: r for r in ckpt.list_checkpoints(job_id)}
            ref = refs.get(step)
            if ref is None:
                have = ", ".join(map(str, sorted(refs))) or "none"
                raise CliError(f"{job_id} has no committed checkpoint at step {step} (committed: {have})")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            with console.status(f"pulling {len(ref.files)} files ({ref.size / 1e6:.1f} MB) from {ref.uri}",
                                spinner="dots") if not json_out else contextlib.nullcontext():
                ckpt.download(ref, staging / "data")
            facts = {"job_id": job_id, "step": ref.step, "source": ref.uri, "files": len(ref.files),
                     "bytes": ref.size, "final": step is None, "meta": ref.meta,
                     "base_model": row.spec.get("base_model"), "adapter": row.spec.get("adapter")}
            (staging / "data" / META_FILE).write_text(json.dumps(facts, indent=1, default=str) + "\n")
            if target.exists():
                target.rmdir()  # an empty folder the user made for it
            os.replace(staging / "data", target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except CorruptCheckpoint as exc:
        raise CliError(f"{exc}; nothing was written (the checkpoint in the store is left as it is)") from None
    except StorageError as exc:
        raise CliError(f"checkpoint store {uri}: {exc}; nothing was written") from None
    out: dict[str, Any] = {**facts, "dir": str(target.resolve())}
    if json_out:
        _emit_json(out)
        return
    what = "final adapter" if step is None else f"checkpoint at step {ref.step}"
    console.print(f"{job_id}: {what} ({len(ref.files)} files, {ref.size / 1e6:.1f} MB, sha256 checked) -> {target}")

