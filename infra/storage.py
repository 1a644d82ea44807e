"""Checkpoint storage with object-storage semantics: a local folder (the embedded default) and S3.

Why this shape: a spot machine can vanish mid-upload, so a checkpoint is only *committed* once a
manifest listing every file (size + sha256) has been written, and the manifest is always written
last. Readers trust only committed checkpoints and verify checksums on download, so a half-written
or corrupted checkpoint is never resumed from. Every backend implements the same handful of object
primitives (put/get/list/delete by key); all checkpoint logic lives once, in ``CheckpointStore``.

Layout under the store root (a folder, or ``s3://bucket/prefix``)::

    <job_id>/checkpoints/<step:010d>/<files...>
    <job_id>/checkpoints/<step:010d>/MANIFEST.json      <- written last = committed
    <job_id>/final/<files...> + MANIFEST.json           <- the final adapter/model
    <job_id>/progress.json                              <- small status object from the payload
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 20


class StorageError(Exception):
    """A storage operation failed; the message says what and how to fix it."""


class CorruptCheckpoint(StorageError):
    """A committed checkpoint whose files do not match its manifest."""


class ObjectMissing(StorageError):
    """The key does not exist (as opposed to: the store could not be reached or refused us)."""

    code = "NoSuchKey"


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the checkpoint folder, with forward slashes
    size: int
    sha256: str


@dataclass(frozen=True)
class CheckpointRef:
    """A committed checkpoint: only ever built from a manifest that was read back."""

    job_id: str
    step: int
    uri: str
    files: tuple[FileEntry, ...]
    created_at: float
    meta: dict[str, Any]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _iter_files(folder: Path) -> Iterator[Path]:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            yield p


def is_permanent(exc: BaseException) -> bool:
    """A store fault that no retry fixes (access denied, no such bucket, a corrupt checkpoint).
    Anything else (a timeout, a 503, a full disk) may pass, and is worth another try later."""
    return isinstance(exc, StorageError) and not getattr(exc, "transient", False)


class CheckpointStore(ABC):
    """One interface for every backend. Subclasses implement only the object primitives."""

    uri: str
    #: How often a payload reads its control object (``<job>/control.json``) here, in seconds:
    #: a local stat-and-read is cheap; on object storage it is a request, so less often.
    control_poll_s: float = 0.5

    # ---- object primitives (keys are '/'-separated, relative to the store root) ----
    @abstractmethod
    def put_file(self, key: str, src: Path) -> None:
        """Upload a local file; the object appears whole or not at all."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write a small object; appears whole or not at all."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes | None:
        """Read a small object; None when it does not exist."""

    @abstractmethod
    def get_file(self, key: str, dest: Path) -> None:
        """Download an object to a local path (raises StorageError when missing)."""

    @abstractmethod
    def list_keys(self, prefix: str) -> list[tuple[str, int]]:
        """Every (key, size) under prefix, sorted by key."""

    @abstractmethod
    def delete_keys(self, keys: list[str]) -> None:
        """Delete objects; missing ones are ignored (safe to repeat)."""

    def local_path(self, key: str) -> Path | None:
        """The folder or file holding ``key`` on this machine, for a store that is a local folder
        (None for object storage, or when nothing is there)."""
        return None

    def presign_get(self, key: str, expires_s: int) -> str:
        """A URL anyone holding it may GET ``key`` with for ``expires_s`` (no credentials needed).
        A local folder answers with its file:// URI: only this machine can read it."""
        return self.key_uri(key)

    def presign_put(self, key: str, expires_s: int) -> str | None:
        """A URL anyone holding it may PUT ``key`` with (a JSON body, ``Content-Type:
        application/json``) for ``expires_s``; None where the store cannot hand one out (a folder)."""
        return None

    @abstractmethod
    def key_uri(self, key: str) -> str:
        """The user-facing URI of a key or prefix."""

    # ---- checkpoints, written once for every backend ----
    @staticmethod
    def _ckpt_prefix(job_id: str, step: int) -> str:
        return f"{job_id}/checkpoints/{step:010d}/"

    def commit_checkpoint(
        self, job_id: str, step: int, local_dir: Path, meta: dict[str, Any] | None = None
    ) -> CheckpointRef:
        """Upload every file of ``local_dir`` and then, last, the manifest that commits them."""
        return self._commit_folder(self._ckpt_prefix(job_id, step), job_id, step, local_dir, meta)

    def commit_final(
        self, job_id: str, local_dir: Path, meta: dict[str, Any] | None = None
    ) -> CheckpointRef:
        """Upload the final adapter/model (same commit protocol as checkpoints)."""
        step = int((meta or {}).get("step", 0))
        return self._commit_folder(f"{job_id}/final/", job_id, step, local_dir, meta)

    def _commit_folder(
        self, prefix: str, job_id: str, step: int, local_dir: Path, meta: dict[str, Any] | None
    ) -> CheckpointRef:
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StorageError(f"cannot commit {local_dir}: not a folder")
        entries = []
        for path in _iter_files(local_dir):
            rel = path.relative_to(local_dir).as_posix()
            if rel == MANIFEST:
                continue
            entries.append(FileEntry(rel, path.stat().st_size, sha256_file(path)))
            self.put_file(prefix + rel, path)
        created = time.time()
        manifest = {
            "format": MANIFEST_FORMAT,
            "job_id": job_id,
            "step": step,
            "created_at": created,
            "files": [e.__dict__ for e in entries],
            "meta": meta or {},
        }
        self.put_bytes(prefix + MANIFEST, json.dumps(manifest, indent=1).encode())
        return CheckpointRef(job_id, step, self.key_uri(prefix), tuple(entries), created, meta or {})

    def _read_manifest(self, prefix: str, job_id: str) -> CheckpointRef | None:
        raw = self.get_bytes(prefix + MANIFEST)
        if raw is None:
            return None
        try:
            m = json.loads(raw)
            files = tuple(FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in m["files"])
            return CheckpointRef(
                job_id=job_id,
                step=int(m["step"]),
                uri=self.key_uri(prefix),
                files=files,
                created_at=float(m["created_at"]),
                meta=dict(m.get("meta") or {}),
            )
        except (ValueError, KeyError, TypeError):
            return None  # an unreadable manifest commits nothing

    def list_checkpoints(self, job_id: str) -> list[CheckpointRef]:
        """Committed checkpoints of a job, oldest first. Folders without a manifest are ignored."""
        refs = []
        for key, _size in self.list_keys(f"{job_id}/checkpoints/"):
            if key.endswith("/" + MANIFEST):
                ref = self._read_manifest(key[: -len(MANIFEST)], job_id)
                if ref is not None:
                    refs.append(ref)
        refs.sort(key=lambda r: r.step)
        return refs

    def latest_checkpoint(self, job_id: str) -> CheckpointRef | None:
        refs = self.list_checkpoints(job_id)
        return refs[-1] if refs else None

    def final(self, job_id: str) -> CheckpointRef | None:
        return self._read_manifest(f"{job_id}/final/", job_id)

    def download(self, ref: CheckpointRef, dest: Path) -> Path:
        """Download a committed checkpoint into ``dest`` and verify every file's size and sha256.

        Raises CorruptCheckpoint if anything does not match; ``dest`` is then removed.
        """
        dest = Path(dest)
        prefix = self._prefix_of(ref)
        dest.mkdir(parents=True, exist_ok=True)
        try:
            for entry in ref.files:
                target = dest / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.get_file(prefix + entry.path, target)
                except StorageError as exc:
                    # only a missing file makes the checkpoint corrupt; access denied, a missing
                    # bucket or exhausted retries are the store's problem and say so
                    if getattr(exc, "code", None) != ObjectMissing.code:
                        raise
                    raise CorruptCheckpoint(f"{ref.uri}: {entry.path} is missing ({exc})") from exc
                size = target.stat().st_size
                if size != entry.size:
                    raise CorruptCheckpoint(
                        f"{ref.uri}: {entry.path} has {size} bytes, manifest says {entry.size}"
                    )
                if sha256_file(target) != entry.sha256:
                    raise CorruptCheckpoint(f"{ref.uri}: {entry.path} fails its sha256 check")
        except CorruptCheckpoint:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        return dest

    def _prefix_of(self, ref: CheckpointRef) -> str:
        if ref.uri.rstrip("/").endswith("/final"):
            return f"{ref.job_id}/final/"
        return self._ckpt_prefix(ref.job_id, ref.step)

    def apply_retention(self, job_id: str, keep: int) -> list[int]:
        """Keep the newest ``keep`` committed checkpoints; delete older ones and stale leftovers.

        Only folders older than the newest committed checkpoint are touched, so an upload in
        progress (always newer) is never deleted. The manifest goes first: a folder being deleted
        is uncommitted before any of its files disappear. Returns the deleted steps.
        """
        keep = max(1, keep)
        committed = self.list_checkpoints(job_id)
        if not committed:
            return []
        kept = {r.step for r in committed[-keep:]}
        newest = committed[-1].step
        by_step: dict[int, list[str]] = {}
        for key, _size in self.list_keys(f"{job_id}/checkpoints/"):
            part = key[len(f"{job_id}/checkpoints/") :].split("/", 1)[0]
            if part.isdigit():
                by_step.setdefault(int(part), []).append(key)
        deleted = []
        for step, keys in sorted(by_step.items()):
            if step in kept or step >= newest:
                continue
            manifest = [k for k in keys if k.endswith("/" + MANIFEST)]
            self.delete_keys(manifest)
            self.delete_keys([k for k in keys if k not in manifest])
            deleted.append(step)
        return deleted

    def probe(self) -> None:
        """Write, read back and delete one small object under the store's root: proof that this
        store exists and these credentials may write there. Raises StorageError saying what failed."""
        key = f".tunefleet-probe/{os.getpid()}-{time.time_ns()}"
        self.put_bytes(key, b"tunefleet")
        try:
            if self.get_bytes(key) != b"tunefleet":
                raise StorageError(f"{self.key_uri(key)}: wrote an object but could not read it back")
        finally:
            self.delete_keys([key])

    # ---- small status objects ----
    def write_json(self, job_id: str, name: str, obj: dict[str, Any]) -> None:
        self.put_bytes(f"{job_id}/{name}", json.dumps(obj).encode())

    def read_json(self, job_id: str, name: str) -> dict[str, Any] | None:
        raw = self.get_bytes(f"{job_id}/{name}")
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


class LocalFolderStore(CheckpointStore):
    """A folder with object-storage semantics: every object is written to a temp file and renamed."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()
        self._root_str = str(self.root)
        self._root_prefix = self._root_str.rstrip(os.sep) + os.sep

    def _path(self, key: str) -> Path:
        # normpath, not resolve(): no filesystem round trip per object (the daemon asks a lot)
        path = os.path.normpath(os.path.join(self._root_str, key))
        if path != self._root_str and not path.startswith(self._root_prefix):
            raise StorageError(f"key {key!r} escapes the store root {self.root}")
        return Path(path)

    def _atomic_write(self, dest: Path, writer) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                writer(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, key: str, src: Path) -> None:
        def copy(f):
            with open(src, "rb") as s:
                shutil.copyfileobj(s, f, _CHUNK)

        self._atomic_write(self._path(key), copy)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(self._path(key), lambda f: f.write(data))

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def get_file(self, key: str, dest: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise ObjectMissing(f"{self.key_uri(key)} does not exist")
        shutil.copyfile(src, dest)

    def list_keys(self, prefix: str) -> list[tuple[str, int]]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        out = []
        for p in base.rglob("*"):
            if p.is_file() and not p.name.startswith(".tmp-"):
                out.append((p.relative_to(self.root).as_posix(), p.stat().st_size))
        out.sort()
        return out

    def delete_keys(self, keys: list[str]) -> None:
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            # prune empty parent folders up to the root
            parent = path.parent
            while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent

    def key_uri(self, key: str) -> str:
        return self.root.as_uri() + "/" + key

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.exists() else None


SUPPORTED_SCHEMES = ("file", "s3")


def open_store(uri: str, session=None) -> CheckpointStore:
    """The store for a URI: ``file:///abs/path`` (or a plain path) or ``s3://bucket/prefix``.
    ``session``: the boto3 session an S3 store takes its credentials from (default: the chain)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        # a file URI is percent-encoded (Path.as_uri() writes a space as %20): decode it
        path = unquote(parsed.path) if parsed.scheme == "file" else uri
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{uri}: a file:// URI needs an absolute path (file:///path)")
        return LocalFolderStore(path)
    if parsed.scheme == "s3":
        try:  # imported here: importing infra.storage must not import boto3
            from infra.s3 import S3Store
        except ImportError as exc:
            raise StorageError(f"{uri}: the S3 store needs boto3 (pip install 'tunefleet[s3]'): {exc}") from None
        return S3Store(uri, session=session)
    raise StorageError(
        f"unknown storage scheme {parsed.scheme!r} in {uri!r} (use file:///path or s3://bucket/prefix)"
    )
