"""After ``succeeded``: ``tunefleet pull`` (the adapter or a checkpoint on this machine, verified),
``export`` (as a model a server loads) and ``eval`` (eval loss, perplexity and a few completions).

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
from rich.markup import escape

from orchestrator.cli_base import CliError, JsonOpt, _config, _emit_json, _job_id, _store, app, console
from orchestrator.states import JobState

META_FILE = "tunefleet_pull.json"  # what was pulled: the job, the step, the source and its training facts


def _find(job: str, step: int | None):
    """(job row, its store, the committed folder to fetch): the final adapter, or checkpoint ``step``."""
    row, ckpt, uri = _locate(job)
    job_id = row.id
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
    return row, ckpt, ref


def _locate(job: str):
    """(job row, its checkpoint store, the store's URI): from this machine's store, or, with a team
    server configured, through the server (a read-only store of the job's own objects)."""
    from infra.storage import open_store
    from orchestrator.client import remote

    client = remote()
    if client is not None:
        from types import SimpleNamespace

        from orchestrator.client import resolve_job_id
        from orchestrator.client_store import ServerStore

        job_id = resolve_job_id(client, job)
        info = client.request("GET", f"/jobs/{job_id}/spec")
        row = SimpleNamespace(id=job_id, spec=info["spec"], state=JobState(info["state"]))
        ckpt = ServerStore(client, job_id, info["store_root"])
        return row, ckpt, (row.spec.get("checkpoint") or {}).get("store") or ckpt.uri
    config = _config()
    with _store(config) as store:
        row = store.get_job(_job_id(store, job))
    uri = (row.spec.get("checkpoint") or {}).get("store") or config.default_store
    return row, open_store(uri), uri


def _free(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise CliError(f"{target} already exists and is not empty: tunefleet never overwrites; name another folder", 2)


def _place(staged: Path, target: Path) -> None:
    """Move a finished folder into place (an empty folder made for it is replaced)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.rmdir()
    os.replace(staged, target)


@contextlib.contextmanager
def _staging(near: Path):
    """A temporary folder beside ``near`` (same filesystem: the final move is a rename), always removed."""
    near.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{near.name}.", dir=near.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _status(text: str, quiet: bool):
    return contextlib.nullcontext() if quiet else console.status(text, spinner="dots")


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

    from infra.storage import CorruptCheckpoint, StorageError

    row, ckpt, ref = _find(job, step)
    job_id = row.id
    target = Path(dest) if dest is not None else Path(f"{job_id}-adapter" if step is None else f"{job_id}-step{step}")
    _free(target)
    try:
        with _staging(target) as staging:
            with _status(f"pulling {len(ref.files)} files ({ref.size / 1e6:.1f} MB) from {ref.uri}", json_out):
                ckpt.download(ref, staging / "data")
            facts = {"job_id": job_id, "step": ref.step, "source": ref.uri, "files": len(ref.files),
                     "bytes": ref.size, "final": step is None, "meta": ref.meta,
                     "base_model": row.spec.get("base_model"), "adapter": row.spec.get("adapter")}
            (staging / "data" / META_FILE).write_text(json.dumps(facts, indent=1, default=str) + "\n")
            _place(staging / "data", target)
    except CorruptCheckpoint as exc:
        raise CliError(f"{exc}; nothing was written (the checkpoint in the store is left as it is)") from None
    except StorageError as exc:
        raise CliError(f"checkpoint store {ckpt.key_uri('')}: {exc}; nothing was written") from None
    out: dict[str, Any] = {**facts, "dir": str(target.resolve())}
    if json_out:
        _emit_json(out)
        return
    what = "final adapter" if step is None else f"checkpoint at step {ref.step}"
    console.print(f"{job_id}: {what} ({len(ref.files)} files, {ref.size / 1e6:.1f} MB, sha256 checked) -> {target}")


@app.command()
def export(
    job: str,
    dest: Annotated[str, typer.Argument(help="A folder to create, or s3://bucket/prefix (must be empty).")],
    merge: Annotated[bool, typer.Option("--merge", help="Merge the adapter into the base model: a standard "
                                        "Hugging Face model folder (else the PEFT adapter, served as a LoRA).")] = False,
    dtype: Annotated[str, typer.Option("--dtype", help="Weights of the merged model: bf16, fp16 or fp32.")] = "bf16",
    json_out: JsonOpt = False,
) -> None:
    """A succeeded job's model as a server loads it: the LoRA adapter, or (--merge) base and adapter merged."""
    from infra.storage import CorruptCheckpoint, StorageError, open_store
    from jobs.export import DTYPES, ExportError

    if dtype not in DTYPES:
        raise CliError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}", 2)
    remote = "://" in dest and not dest.startswith("file://")
    if remote:
        try:
            out_store = open_store(dest)
            if out_store.list_keys(""):
                raise CliError(f"{dest} already holds objects: tunefleet never overwrites; name another prefix", 2)
        except StorageError as exc:
            raise CliError(f"{dest}: {exc}", 2) from None
        target = Path(tempfile.gettempdir()) / "tunefleet-export"
    else:
        target = Path(dest.removeprefix("file://"))
        _free(target)
    row, ckpt, ref = _find(job, None)
    from jobs.export import export as do_export
    from jobs.export import trained_base

    try:
        with _staging(target) as staging:
            with _status(f"pulling the final adapter from {ref.uri}", json_out):
                ckpt.download(ref, staging / "adapter")
            with _status("merging into the base model" if merge else "writing the adapter", json_out):
                adapter = (staging / "adapter" / "adapter_config.json").is_file()  # else a full fine-tune's model
                source = trained_base(row.spec, ckpt) if merge and adapter else None
                done = do_export(staging / "adapter", staging / "out", base_model=row.spec["base_model"],
                                 merge=merge, dtype=dtype, source=source)
            if remote:
                with _status(f"uploading {len(done['files'])} files to {dest}", json_out):
                    for rel in done["files"]:
                        out_store.put_file(rel, staging / "out" / rel)
            else:
                _place(staging / "out", target)
    except ExportError as exc:
        raise CliError(str(exc), 2) from None
    except CorruptCheckpoint as exc:
        raise CliError(f"{exc}; nothing was written") from None
    except StorageError as exc:
        raise CliError(f"{exc}; the export is incomplete" if remote else f"{exc}; nothing was written") from None
    where = dest if remote else str(target.resolve())
    out = {"job_id": row.id, "kind": done["kind"], "dtype": done["dtype"], "dest": where, "files": done["files"],
           "base_model": row.spec["base_model"], "step": ref.step}
    if json_out:
        _emit_json(out)
        return
    console.print(f"{row.id}: {done['kind']} ({len(done['files'])} files) -> {where}")
    if done["kind"] == "merged":
        console.print(f"serve it: vllm serve {where}")
    elif done["kind"] == "adapter":
        console.print(f"serve it: vllm serve {row.spec['base_model']} --enable-lora --lora-modules {row.id}={where}")


@app.command("eval")
def eval_(
    job: str,
    prompts: Annotated[Path, typer.Option("--prompts", help="One prompt per line, or JSON lines with 'prompt'.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, max=4096)] = 64,
    json_out: JsonOpt = False,
) -> None:
    """A quick look at a succeeded job's model: its final eval loss and perplexity, and greedy
    completions of a few prompts from base + adapter."""
    import math

    from infra.storage import CorruptCheckpoint, StorageError
    from jobs.export import ExportError, complete, load_trained, read_prompts, trained_base

    try:
        texts = read_prompts(prompts)
    except ExportError as exc:
        raise CliError(str(exc), 2) from None
    row, ckpt, ref = _find(job, None)
    eval_loss = ref.meta.get("eval_loss") if isinstance(ref.meta.get("eval_loss"), (int, float)) else None
    try:
        with tempfile.TemporaryDirectory(prefix="tunefleet-eval.") as tmp:
            with _status(f"pulling the final adapter from {ref.uri}", json_out):
                ckpt.download(ref, Path(tmp) / "adapter")
            with _status(f"generating {len(texts)} completions", json_out):
                adapter = (Path(tmp) / "adapter" / "adapter_config.json").is_file()  # else a full fine-tune's model
                model, tokenizer = load_trained(Path(tmp) / "adapter", row.spec["base_model"],
                                                trained_base(row.spec, ckpt) if adapter else None)
                kind = str(((row.spec.get("datasets") or [{}])[0]).get("type") or "completion")
                outs = complete(model, tokenizer, texts, max_new_tokens, kind)
    except ExportError as exc:
        raise CliError(str(exc), 2) from None
    except (CorruptCheckpoint, StorageError) as exc:
        raise CliError(str(exc)) from None
    out = {"job_id": row.id, "step": ref.step, "loss": ref.meta.get("loss"), "eval_loss": eval_loss,
           "perplexity": math.exp(eval_loss) if eval_loss is not None and eval_loss < 700 else None,
           "completions": [{"prompt": p, "completion": c} for p, c in zip(texts, outs, strict=True)]}
    if json_out:
        _emit_json(out)
        return
    ppl = f", eval loss {eval_loss:.4f} (perplexity {out['perplexity']:.2f})" if eval_loss is not None else (
        ", no eval loss (give the job val_set_size to measure one)")
    console.print(f"[bold]{row.id}[/] at step {ref.step}{ppl}")
    for item in out["completions"]:
        text = escape(item["completion"]) if item["completion"].strip() else (
            "[dim](nothing: the model ended its answer at once)[/]")
        console.print(f"\n[bold]> {escape(item['prompt'])}[/]\n{text}")
