"""A job's local inputs travel through its store, content-addressed, so the job runs wherever the
store can be reached and the user's job folder can be deleted right after ``submit``.

Why the store and not the launch request: the store is already the one channel between the
submitting side and the payload (design note), every attempt of the job reads the same copy, a
resumed attempt on another provider finds it there, and content addressing makes a second job on
the same dataset or model folder upload nothing. (SkyPilot's managed jobs do the same with a
workdir: upload to bucket storage before the job leaves.)

Layout under the store root (next to the jobs' own folders)::

    inputs/<sha256>/<files...>
    inputs/<sha256>/MANIFEST.json     <- written last: the input is complete once it exists

``sha256`` is the file's own sha256 for a single file, and for a folder the sha256 of its listing
(one ``"<sha256> <size> <path>\\n"`` line per file, sorted by path): equal content, equal address.
Files and folders whose name starts with ``.`` inside a model folder (``.git``, ``.cache``) are
not inputs.

The queued spec keeps what the user wrote (the names the estimate, status and calibration use) and
gains ``inputs``: ``{original path: {"uri", "sha256", "size", "files", "kind"}}`` plus the facts the
daemon needs once the folder is gone (a dataset's row count and characters, a model's
``config.json``). The payload calls :func:`materialize`: each input is downloaded (or a verified
copy in the cache reused), every file and the listing checked against the address, and the spec's
paths are pointed at the local copies. Hub model ids are not inputs and stay as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from infra.storage import CheckpointStore, ObjectMissing, StorageError, sha256_file
from jobs.spec import DATASET_KEYS

PREFIX = "inputs/"
MANIFEST = "MANIFEST.json"
FORMAT = 1
_VERIFIED = ".tunefleet-verified"
_CONFIG_MAX = 1 << 20  # a model's config.json carried in the spec: at most 1 MiB

Progress = Callable[[str, int], None]  # (what, bytes just moved)


class InputError(ValueError):
    """An input is missing, unreadable or does not match its address: the job's own problem (bad
    input, not retried), said with what and where."""


def default_cache() -> Path:
    """Where the payload keeps verified inputs: ``TUNEFLEET_INPUT_CACHE``, else ~/.cache/tunefleet/inputs."""
    explicit = os.environ.get("TUNEFLEET_INPUT_CACHE")
    return Path(explicit) if explicit else Path.home() / ".cache" / "tunefleet" / "inputs"


# ---- addresses ----
def _files(folder: Path) -> Iterator[Path]:
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                yield Path(root) / name


def listing(local: Path) -> tuple[str, list[dict[str, Any]]]:
    """(address, files) of a local file or folder: see the module doc for the address."""
    if local.is_file():
        digest = sha256_file(local)
        return digest, [{"path": local.name, "size": local.stat().st_size, "sha256": digest}]
    files = [{"path": p.relative_to(local).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in _files(local)]
    if not files:
        raise InputError(f"{local} holds no files")
    return tree_sha(files), files


def tree_sha(files: list[dict[str, Any]]) -> str:
    text = "".join(f"{f['sha256']} {f['size']} {f['path']}\n" for f in sorted(files, key=lambda f: f["path"]))
    return hashlib.sha256(text.encode()).hexdigest()


def _address(kind: str, files: list[dict[str, Any]]) -> str:
    return files[0]["sha256"] if kind == "file" else tree_sha(files)


# ---- the submitting side ----
def local_inputs(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, kind) of every local input of a validated spec (paths already absolute), not yet staged."""
    staged = doc.get("inputs") or {}
    found: list[tuple[str, str]] = []
    for item in [d for key in DATASET_KEYS for d in doc.get(key) or []]:
        path = item.get("path") if isinstance(item, dict) else None
        if isinstance(path, str) and path not in staged and os.path.isfile(path):
            found.append((path, "file"))
    model = doc.get("base_model")
    if isinstance(model, str) and model not in staged and os.path.isabs(model) and os.path.isdir(model):
        found.append((model, "folder"))
    return list(dict.fromkeys(found))


def _facts(path: str, kind: str, sequence_len: int) -> dict[str, Any]:
    """What the daemon's estimate reads from the input once the user's copy may be gone."""
    if kind == "file":
        from jobs.estimate import dataset_stats_of

        examples, chars = dataset_stats_of(path, sequence_len)
        return {"examples": examples, "chars": chars}
    cfg = Path(path) / "config.json"
    try:
        if cfg.stat().st_size <= _CONFIG_MAX:
            value = json.loads(cfg.read_text(encoding="utf-8"))
            if isinstance(value, dict):
                return {"config": value}
    except (OSError, ValueError):
        pass
    return {}


def stage(doc: dict[str, Any], store: CheckpointStore, progress: Progress | None = None) -> dict[str, Any]:
    """Upload every local input of ``doc`` to ``store`` (unless its address is there already) and
    return a copy of ``doc`` whose ``inputs`` name them. Raises InputError for an unreadable input
    and StorageError when the store refuses; then nothing in the spec changed and anything already
    uploaded is complete or invisible (its manifest is written last)."""
    out = json.loads(json.dumps(doc))
    staged: dict[str, Any] = dict(out.get("inputs") or {})
    for path, kind in local_inputs(out):
        local = Path(path)
        try:
            sha, files = listing(local)
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
        prefix = f"{PREFIX}{sha}/"
        if store.get_bytes(prefix + MANIFEST) is None:
            for f in files:
                src = local if kind == "file" else local / f["path"]
                store.put_file(prefix + f["path"], src)
                if progress is not None:
                    progress(f"{local.name}/{f['path']}" if kind == "folder" else local.name, f["size"])
            manifest = {"format": FORMAT, "kind": kind, "sha256": sha, "files": files}
            store.put_bytes(prefix + MANIFEST, json.dumps(manifest, indent=1).encode())
        elif progress is not None:
            progress(local.name, sum(f["size"] for f in files))  # there already: nothing to move
        staged[path] = {"uri": store.key_uri(prefix), "sha256": sha, "kind": kind,
                        "size": sum(f["size"] for f in files), "files": len(files),
                        **_facts(path, kind, int(out.get("sequence_len") or 512))}
    out["inputs"] = staged
    return out


def input_bytes(doc: dict[str, Any]) -> int:
    """Bytes ``stage`` would read (to size a progress bar)."""
    total = 0
    for path, kind in local_inputs(doc):
        local = Path(path)
        total += local.stat().st_size if kind == "file" else sum(p.stat().st_size for p in _files(local))
    return total


# ---- the payload's side ----
def _verified(dest: Path, sha: str) -> bool:
    try:
        return (dest / _VERIFIED).read_text() == sha
    except OSError:
        return False


def _check(folder: Path, files: list[dict[str, Any]], where: str) -> None:
    for f in files:
        target = folder / f["path"]
        if not target.is_file():
            raise InputError(f"{where}: {f['path']} is missing")
        if target.stat().st_size != f["size"] or sha256_file(target) != f["sha256"]:
            raise InputError(f"{where}: {f['path']} does not match its sha256 (corrupted or changed)")


def fetch(store: CheckpointStore, sha: str, cache: Path) -> tuple[Path, dict[str, Any]]:
    """The verified local copy of input ``sha`` (a folder holding its files) and its manifest."""
    prefix = f"{PREFIX}{sha}/"
    where = store.key_uri(prefix)
    raw = store.get_bytes(prefix + MANIFEST)
    if raw is None:
        raise InputError(f"input {where} is not in the store (deleted, or staged to another store?): "
                         "submit the job again from its files")
    try:
        manifest = json.loads(raw)
        kind, files = manifest["kind"], manifest["files"]
        if kind not in ("file", "folder") or not isinstance(files, list) or not files:
            raise ValueError
        if any(".." in str(f["path"]).split("/") or str(f["path"]).startswith("/") for f in files):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise InputError(f"input {where}: unreadable manifest") from None
    if _address(kind, files) != sha:
        raise InputError(f"input {where}: its manifest does not match its address")
    in_place = store.local_path(prefix)
    if in_place is not None:  # a folder store on this machine: verify and read it where it is
        _check(in_place, files, where)
        return in_place, manifest
    dest = cache / sha
    if _verified(dest, sha):
        return dest, manifest
    shutil.rmtree(dest, ignore_errors=True)
    part = cache / f".{sha}.part-{os.getpid()}"
    shutil.rmtree(part, ignore_errors=True)
    try:
        for f in files:
            target = part / f["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                store.get_file(prefix + f["path"], target)
            except StorageError as exc:
                if getattr(exc, "code", None) == ObjectMissing.code:
                    raise InputError(f"input {where}: {f['path']} is missing from the store") from None
                raise
        _check(part, files, where)
        (part / _VERIFIED).write_text(sha)
        part.rename(dest)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return dest, manifest


def materialize(doc: dict[str, Any], store: CheckpointStore, cache: Path | None = None,
                say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """A copy of ``doc`` whose staged inputs point at verified local copies (see the module doc)."""
    staged = doc.get("inputs") or {}
    if not staged:
        return doc
    cache = cache or default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    local: dict[str, str] = {}
    for original, ref in staged.items():
        folder, manifest = fetch(_home_of(ref, store), str(ref["sha256"]), cache)
        if manifest["kind"] == "file":
            local[original] = str(folder / manifest["files"][0]["path"])
        else:
            local[original] = str(folder)
        if say is not None:
            say(f"input {os.path.basename(original)}: {ref.get('size', 0)} bytes, sha256 {str(ref['sha256'])[:12]} "
                "verified")
    out = json.loads(json.dumps(doc))
    for item in [d for key in DATASET_KEYS for d in out.get(key) or []]:
        if item.get("path") in local:
            item["path"] = local[item["path"]]
    if out.get("base_model") in local:
        out["base_model"] = local[out["base_model"]]
    return out


def _home_of(ref: dict[str, Any], store: CheckpointStore) -> CheckpointStore:
    """The store an input was staged to: the job's own (the usual case), else the one its URI names."""
    key = f"{PREFIX}{ref['sha256']}/"
    uri = str(ref.get("uri") or "")
    if not uri or store.key_uri(key) == uri:
        return store
    if not uri.endswith(key):
        raise InputError(f"input {uri} does not end in its address {key}")
    from infra.storage import open_store

    return open_store(uri[: -len(key)].rstrip("/") or uri)


def needs_local_store(doc: dict[str, Any]) -> bool:
    """True when the job's inputs are staged in a local folder store: only this machine can read them."""
    return any(str(ref.get("uri", "")).startswith("file:") for ref in (doc.get("inputs") or {}).values())
