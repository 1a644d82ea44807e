"""Contract tests for the checkpoint store (infra.storage).

Every test that takes ``store`` runs against each backend in ``STORE_KINDS``; the checks use only
the ``CheckpointStore`` interface (plus the documented key layout), so a new backend (S3 through
moto, say) is covered by adding one entry to ``STORE_KINDS`` and one branch to ``_make_store``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from infra.storage import (
    MANIFEST,
    CheckpointStore,
    CorruptCheckpoint,
    LocalFolderStore,
    StorageError,
    open_store,
)

STORE_KINDS = ["local", "s3"]
JOB = "job-1"


def _make_store(kind: str, tmp_path: Path) -> CheckpointStore:
    if kind == "local":
        return LocalFolderStore(tmp_path / "store")
    if kind == "s3":  # real HTTP: a moto server on 127.0.0.1, a new bucket per test
        pytest.importorskip("moto")
        from tests.s3_fixtures import make_s3_store

        return make_s3_store()
    raise AssertionError(f"no factory for store kind {kind!r}")


@pytest.fixture(params=STORE_KINDS)
def store(request, tmp_path) -> CheckpointStore:
    return _make_store(request.param, tmp_path)


def ckpt_key(job: str, step: int, rel: str = "") -> str:
    """The documented layout: <job>/checkpoints/<step:010d>/<files...>."""
    return f"{job}/checkpoints/{step:010d}/{rel}"


BINARY = bytes(range(256)) * 64 + b"\x00\xff\x00"


def make_folder(root: Path, salt: str = "") -> dict[str, bytes]:
    """A checkpoint-like folder with nested files and a binary file; returns rel path -> bytes."""
    files = {
        "adapter_config.json": json.dumps({"r": 8, "salt": salt}).encode(),
        "optimizer.pt": BINARY + salt.encode(),
        "nested/deeper/state.bin": os.urandom(3000),
        "nested/notes.txt": f"hello {salt}\n".encode(),
        "empty.txt": b"",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def commit(store: CheckpointStore, tmp_path: Path, step: int, job: str = JOB) -> dict[str, bytes]:
    src = tmp_path / f"src-{job}-{step}"
    files = make_folder(src, salt=str(step))
    store.commit_checkpoint(job, step, src, meta={"step_note": step})
    return files


def put_uncommitted(store: CheckpointStore, tmp_path: Path, step: int, job: str = JOB) -> list[str]:
    """Upload a checkpoint's files without its manifest, like an upload cut off before commit."""
    src = tmp_path / f"partial-{job}-{step}"
    files = make_folder(src, salt=f"partial{step}")
    keys = []
    for rel in files:
        key = ckpt_key(job, step, rel)
        store.put_file(key, src / rel)
        keys.append(key)
    return keys


# ---- commit, list, download --------------------------------------------------------------------


def test_commit_then_list_and_download_round_trip(store, tmp_path):
    src = tmp_path / "src"
    files = make_folder(src)
    ref = store.commit_checkpoint(JOB, 10, src, meta={"loss": 1.5})

    listed = store.list_checkpoints(JOB)
    assert [r.step for r in listed] == [10]
    got = listed[0]
    assert got.meta == {"loss": 1.5}
    assert got.files == ref.files
    by_path = {f.path: f for f in got.files}
    assert set(by_path) == set(files)  # every file, nested ones with '/' separators; no manifest
    for rel, data in files.items():
        assert by_path[rel].size == len(data)
        assert by_path[rel].sha256 == hashlib.sha256(data).hexdigest()
    assert got.size == sum(len(d) for d in files.values())
    assert store.latest_checkpoint(JOB).step == 10

    dest = store.download(got, tmp_path / "out" / "ckpt")
    assert read_tree(dest) == files


def test_final_round_trip(store, tmp_path):
    assert store.final(JOB) is None
    src = tmp_path / "final-src"
    files = make_folder(src, salt="final")
    store.commit_final(JOB, src, meta={"step": 120, "loss": 0.5})
    ref = store.final(JOB)
    assert ref is not None and ref.step == 120 and ref.meta["loss"] == 0.5
    assert store.list_checkpoints(JOB) == []  # the final adapter is not a checkpoint
    assert read_tree(store.download(ref, tmp_path / "final-out")) == files


def test_recommit_same_step_replaces_it(store, tmp_path):
    commit(store, tmp_path, 10)
    src = tmp_path / "again"
    files = make_folder(src, salt="second")
    store.commit_checkpoint(JOB, 10, src)
    refs = store.list_checkpoints(JOB)
    assert [r.step for r in refs] == [10]
    assert read_tree(store.download(refs[0], tmp_path / "out")) == files


def test_jobs_are_separate(store, tmp_path):
    commit(store, tmp_path, 10, job="a")
    commit(store, tmp_path, 20, job="b")
    assert [r.step for r in store.list_checkpoints("a")] == [10]
    assert [r.step for r in store.list_checkpoints("b")] == [20]
    assert store.list_checkpoints("c") == []
    assert store.latest_checkpoint("c") is None


def test_commit_of_missing_folder_raises(store, tmp_path):
    with pytest.raises(StorageError):
        store.commit_checkpoint(JOB, 10, tmp_path / "nope")
    assert store.list_checkpoints(JOB) == []


# ---- only committed checkpoints count ----------------------------------------------------------


def test_folder_without_manifest_is_not_listed(store, tmp_path):
    commit(store, tmp_path, 10)
    put_uncommitted(store, tmp_path, 20)
    assert store.list_keys(ckpt_key(JOB, 20))  # the files are there...
    assert [r.step for r in store.list_checkpoints(JOB)] == [10]  # ...but not committed
    assert store.latest_checkpoint(JOB).step == 10


@pytest.mark.parametrize(
    "manifest",
    [b"{not json", b"", b"null", b"[]", b'"text"', b'{"format": 1}', b'{"step": 20, "files": [{"path": "x"}]}'],
    ids=["garbage", "empty", "null", "list", "string", "no-files", "bad-entry"],
)
def test_unreadable_manifest_commits_nothing(store, tmp_path, manifest):
    commit(store, tmp_path, 10)
    put_uncommitted(store, tmp_path, 20)
    store.put_bytes(ckpt_key(JOB, 20, MANIFEST), manifest)
    assert [r.step for r in store.list_checkpoints(JOB)] == [10]
    assert store.latest_checkpoint(JOB).step == 10


def test_unreadable_final_manifest_is_no_final(store, tmp_path):
    store.put_bytes(f"{JOB}/final/{MANIFEST}", b"{garbage")
    assert store.final(JOB) is None


# ---- download verifies -------------------------------------------------------------------------


def _corrupt(store: CheckpointStore, key: str, how: str) -> None:
    data = store.get_bytes(key)
    assert data, f"{key} should exist and be non-empty"
    if how == "truncated":
        store.put_bytes(key, data[: len(data) // 2])
    elif how == "flipped":
        mid = len(data) // 2
        store.put_bytes(key, data[:mid] + bytes([data[mid] ^ 0x01]) + data[mid + 1 :])
    elif how == "missing":
        store.delete_keys([key])
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "flipped", "missing"])
@pytest.mark.parametrize("rel", ["optimizer.pt", "nested/deeper/state.bin"])
def test_download_of_corrupt_checkpoint_raises_and_leaves_nothing(store, tmp_path, how, rel):
    commit(store, tmp_path, 10)
    ref = store.latest_checkpoint(JOB)
    _corrupt(store, ckpt_key(JOB, 10, rel), how)
    if how == "flipped":
        assert len(store.get_bytes(ckpt_key(JOB, 10, rel))) == next(f.size for f in ref.files if f.path == rel)

    dest = tmp_path / "dl" / "ckpt"
    with pytest.raises(CorruptCheckpoint) as info:
        store.download(ref, dest)
    assert rel in str(info.value)
    assert not dest.exists()
    # the corrupt checkpoint is still listed (listing trusts manifests; download is what verifies)
    assert store.latest_checkpoint(JOB).step == 10


def test_corrupt_final_download_raises(store, tmp_path):
    src = tmp_path / "final-src"
    make_folder(src)
    store.commit_final(JOB, src, meta={"step": 5})
    ref = store.final(JOB)
    _corrupt(store, f"{JOB}/final/optimizer.pt", "flipped")
    dest = tmp_path / "final-out"
    with pytest.raises(CorruptCheckpoint):
        store.download(ref, dest)
    assert not dest.exists()


# ---- retention ---------------------------------------------------------------------------------


def test_retention_keeps_newest_and_spares_uploads_in_progress(store, tmp_path):
    for step in (10, 20, 30, 40, 50, 60):
        commit(store, tmp_path, step)
    newer_partial = put_uncommitted(store, tmp_path, 70)  # an upload in progress
    put_uncommitted(store, tmp_path, 5)  # a leftover from a crashed older upload

    deleted = store.apply_retention(JOB, keep=3)

    assert sorted(deleted) == [5, 10, 20, 30]
    assert [r.step for r in store.list_checkpoints(JOB)] == [40, 50, 60]
    for step in (5, 10, 20, 30):
        assert store.list_keys(ckpt_key(JOB, step)) == [], f"step {step} left files behind"
    assert sorted(k for k, _ in store.list_keys(ckpt_key(JOB, 70))) == sorted(newer_partial)
    for step in (40, 50, 60):
        ref = next(r for r in store.list_checkpoints(JOB) if r.step == step)
        store.download(ref, tmp_path / f"kept-{step}")  # the kept ones are intact

    # idempotent: a second pass deletes nothing more
    assert store.apply_retention(JOB, keep=3) == []
    assert [r.step for r in store.list_checkpoints(JOB)] == [40, 50, 60]


def test_retention_without_committed_checkpoints_deletes_nothing(store, tmp_path):
    keys = put_uncommitted(store, tmp_path, 10)
    assert store.apply_retention(JOB, keep=1) == []
    assert sorted(k for k, _ in store.list_keys(f"{JOB}/checkpoints/")) == sorted(keys)


def test_retention_only_touches_its_job(store, tmp_path):
    for step in (10, 20, 30):
        commit(store, tmp_path, step, job="a")
        commit(store, tmp_path, step, job="b")
    store.apply_retention("a", keep=1)
    assert [r.step for r in store.list_checkpoints("a")] == [30]
    assert [r.step for r in store.list_checkpoints("b")] == [10, 20, 30]


# ---- small JSON objects ------------------------------------------------------------------------


def test_json_round_trip_and_missing(store):
    assert store.read_json(JOB, "progress.json") is None
    doc = {"step": 12, "state": "running", "loss": 1.25, "nested": {"a": [1, 2]}, "none": None}
    store.write_json(JOB, "progress.json", doc)
    assert store.read_json(JOB, "progress.json") == doc
    store.write_json(JOB, "progress.json", {"step": 13})
    assert store.read_json(JOB, "progress.json") == {"step": 13}
    assert store.read_json("other-job", "progress.json") is None


def test_read_json_of_non_object_is_none(store):
    store.put_bytes(f"{JOB}/progress.json", b"[1, 2]")
    assert store.read_json(JOB, "progress.json") is None
    store.put_bytes(f"{JOB}/progress.json", b"{half")
    assert store.read_json(JOB, "progress.json") is None


# ---- keys stay inside the root -----------------------------------------------------------------


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd-tunefleet"])
def test_keys_cannot_escape_the_root(store, tmp_path, key):
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(StorageError):
        store.put_bytes(key, b"x")
    with pytest.raises(StorageError):
        store.put_file(key, src)
    with pytest.raises(StorageError):
        store.get_bytes(key)
    assert not (tmp_path / "x").exists()
    assert not Path("/etc/passwd-tunefleet").exists()


def test_job_id_cannot_escape_the_root(store, tmp_path):
    with pytest.raises(StorageError):
        store.write_json("..", "progress.json", {"a": 1})
    assert not (tmp_path / "progress.json").exists()


# ---- open_store --------------------------------------------------------------------------------


def test_open_store_file_uri(tmp_path):
    root = tmp_path / "via-uri"
    s = open_store(f"file://{root}")
    s.write_json(JOB, "progress.json", {"step": 1})
    assert json.loads((root / JOB / "progress.json").read_bytes()) == {"step": 1}


def test_open_store_file_uri_with_localhost(tmp_path):
    root = tmp_path / "via-localhost"
    s = open_store(f"file://localhost{root}")
    s.write_json(JOB, "progress.json", {"step": 2})
    assert (root / JOB / "progress.json").is_file()


def test_open_store_plain_path(tmp_path):
    root = tmp_path / "plain"
    s = open_store(str(root))
    s.write_json(JOB, "progress.json", {"step": 3})
    assert (root / JOB / "progress.json").is_file()


def test_store_uri_reopens_the_same_store(tmp_path):
    """The URI a store reports (percent-encoded by pathlib) opens that same folder again."""
    root = tmp_path / "with space"
    first = open_store(str(root))
    first.write_json(JOB, "progress.json", {"step": 4})
    again = open_store(first.uri)
    assert again.read_json(JOB, "progress.json") == {"step": 4}


def test_open_store_unknown_scheme_names_it():
    with pytest.raises(StorageError) as info:
        open_store("ftp://x/y")
    assert "ftp" in str(info.value)


def test_open_store_file_uri_with_host_raises():
    with pytest.raises(StorageError):
        open_store("file://host/x")
