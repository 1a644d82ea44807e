"""A job's checkpoint store read through the team server (``orchestrator.api.artifacts``).

Why a ``CheckpointStore`` and not a download command of its own: ``pull``, ``export`` and ``eval``
already read manifests, download folders with every file's size and sha256 checked, and fetch
the staged base model through that interface. Given this read-only store, they run unchanged on
a user's machine that has no credentials for the bucket. Objects are named by the real store's
own URIs (``store_root`` + key), so every message reads as it would on the server machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from infra.storage import CheckpointStore, ObjectMissing, StorageError
from orchestrator.client import Client


class ServerStore(CheckpointStore):
    """Read-only: the objects of one job (and its staged inputs) that the token's user may see."""

    control_poll_s = 2.0

    def __init__(self, client: Client, job_id: str, store_root: str) -> None:
        self.client = client
        self.job_id = job_id
        self.root = store_root if store_root.endswith("/") else store_root + "/"
        self.uri = self.root.rstrip("/")

    def _path(self, key: str) -> str:
        return f"/jobs/{self.job_id}/store/{quote(key)}"

    def get_bytes(self, key: str) -> bytes | None:
        return self.client.fetch(self._path(key))

    def get_file(self, key: str, dest: Path) -> None:
        if not self.client.download(self._path(key), Path(dest)):
            raise ObjectMissing(f"{self.key_uri(key)} does not exist")

    def list_keys(self, prefix: str) -> list[tuple[str, int]]:
        rows: Any = self.client.request("GET", f"/jobs/{self.job_id}/store", params={"prefix": prefix})
        return [(str(k), int(n)) for k, n in rows]

    def key_uri(self, key: str) -> str:
        return self.root + key

    def put_file(self, key: str, src: Path) -> None:
        raise StorageError(f"{self.key_uri(key)}: the job's store is read-only through the server")

    def put_bytes(self, key: str, data: bytes) -> None:
        raise StorageError(f"{self.key_uri(key)}: the job's store is read-only through the server")

    def delete_keys(self, keys: list[str]) -> None:
        raise StorageError(f"{self.uri}: the job's store is read-only through the server")
