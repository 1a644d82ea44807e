"""The two databases the store runs on: a SQLite file (the embedded default) and Postgres (a team's).

Why one SQL text and two small engines, not an ORM: the store is a few dozen statements, written
once, in the SQL both databases share (``?`` placeholders, ``RETURNING``, ``ON CONFLICT``,
``COALESCE``, ``CASE``). An engine owns only what really differs:

* **Connecting and the write lock.** SQLite serializes writers itself (``BEGIN IMMEDIATE``).
  Postgres runs writers concurrently, and the store's writes are read-check-write sequences
  (compare-and-set on a state, "next seq", "free id") that assume they run alone. So every
  Postgres write transaction first takes one transaction-scoped advisory lock: writers queue as
  they do on SQLite, readers never wait (MVCC), and the store's invariants hold unchanged. At this
  store's write rate (a few per second per daemon tick and per API call) one writer lane is not
  the limit; the benchmark ``benchmarks/server_load.py`` measures both.
* **The schema text.** The migrations are written once in SQLite's dialect; ``pg_statements``
  rewrites each statement for Postgres (REAL -> DOUBLE PRECISION, INTEGER -> BIGINT,
  AUTOINCREMENT -> identity, a SQLite ``RAISE(ABORT)`` trigger -> a plpgsql function and a
  trigger, and a ``rowid`` identity column on ``jobs``, whose listing breaks ties by insertion
  order as SQLite's implicit rowid does).
* **Rows.** Both engines hand back rows that index by position and by column name, as
  ``sqlite3.Row`` does, so the decoding in ``rows`` is shared.

``psycopg`` is imported only when a ``postgresql://`` URL is opened: the embedded default and the
CLI stay stdlib-only.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from infra.urls import redact_url
from orchestrator.store.rows import StoreError

BUSY_TIMEOUT_S = 10.0
PG_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(PG_SCHEMES)


def lock_key(name: str) -> int:
    """A 63-bit advisory-lock key for ``name`` (stable across processes and versions)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


WRITE_LOCK = lock_key("tunefleet-store-write")


class SqliteEngine:
    """A SQLite file in WAL mode, written with ``BEGIN IMMEDIATE``."""

    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        self.busy_errors: tuple[type[BaseException], ...] = (sqlite3.OperationalError,)
        self.errors: tuple[type[BaseException], ...] = (sqlite3.Error,)

    def connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            str(self.path),
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,  # autocommit; we issue BEGIN IMMEDIATE / COMMIT ourselves
            check_same_thread=False,
        )
        conn.row_factory = sqlite3.Row
        return conn

    def begin(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")

    @staticmethod
    def in_transaction(conn: sqlite3.Connection) -> bool:
        return conn.in_transaction

    @staticmethod
    def has_table(conn: sqlite3.Connection, table: str) -> bool:
        return conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).fetchone() is not None

    @staticmethod
    def statements(statement: str) -> list[str]:
        return [statement]

    def healthy(self, conn: sqlite3.Connection) -> bool:
        return True


class PgRow(tuple):
    """A row that indexes by position and by (case-insensitive) column name, like ``sqlite3.Row``."""

    _index: dict[str, int]

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            try:
                return tuple.__getitem__(self, self._index[key.lower()])
            except KeyError:
                raise IndexError(f"No item with that key: {key!r}") from None
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


class PgCursor:
    """What the store uses of a sqlite3 cursor: fetchone, fetchall, iteration, rowcount."""

    def __init__(self, cur: Any) -> None:
        self._cur = cur

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    def fetchone(self) -> Any:
        return self._cur.fetchone() if self._cur.description else None

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall() if self._cur.description else []

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


@lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    """``?`` placeholders -> ``%s`` (and a literal ``%`` -> ``%%``). No store statement has a ``?``
    inside a string literal."""
    return sql.replace("%", "%%").replace("?", "%s")


def _pg_params(params: Sequence[Any] | None) -> Sequence[Any] | None:
    # sqlite3 stores True as 1; the store's flag columns are integers on both databases.
    if params is None:
        return None
    return tuple(int(p) if isinstance(p, bool) else p for p in params)


class PgConnection:
    """A psycopg connection that takes the store's SQL as sqlite3 does."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> PgCursor:
        cur = self.raw.cursor()
        if params is None:
            cur.execute(sql)
        else:
            cur.execute(_pg_sql(sql), _pg_params(params))
        return PgCursor(cur)

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> PgCursor:
        cur = self.raw.cursor()
        cur.executemany(_pg_sql(sql), [_pg_params(p) for p in seq])
        return PgCursor(cur)

    def close(self) -> None:
        self.raw.close()


class PostgresEngine:
    """Postgres through psycopg 3: autocommit, with explicit BEGIN and the one write lock."""

    name = "postgres"

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError as e:  # pragma: no cover - the server extra installs it
            raise StoreError(
                "database_url is a postgresql:// URL but psycopg is not installed; "
                "install tunefleet with the server extra: pip install 'tunefleet[server]'"
            ) from e
        self._psycopg = psycopg
        self.url = url
        self.path = None
        self.where = redact_url(url)
        self.busy_errors = (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled)
        self.errors = (psycopg.Error,)

    def connect(self) -> PgConnection:
        psycopg = self._psycopg
        try:
            raw = psycopg.connect(self.url, autocommit=True, connect_timeout=int(BUSY_TIMEOUT_S))
        except psycopg.Error as e:
            # psycopg's message may quote the connection string; say where without the password.
            raise StoreError(f"cannot connect to {self.where}: {_first_line(e)}") from None
        raw.row_factory = _pg_row_factory
        raw.adapters.register_loader("numeric", _numeric_loader(psycopg))
        raw.execute(f"SET lock_timeout = '{int(BUSY_TIMEOUT_S * 1000)}ms'")
        raw.execute("SET TIME ZONE 'UTC'")
        return PgConnection(raw)

    def begin(self, conn: PgConnection) -> None:
        conn.raw.execute("BEGIN")
        conn.raw.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))

    def in_transaction(self, conn: PgConnection) -> bool:
        return conn.raw.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE

    @staticmethod
    def has_table(conn: PgConnection, table: str) -> bool:
        return conn.execute("SELECT to_regclass(?) IS NOT NULL", (table,)).fetchone()[0]

    @staticmethod
    def statements(statement: str) -> list[str]:
        return pg_statements(statement)

    def healthy(self, conn: PgConnection) -> bool:
        return not conn.raw.broken and not conn.raw.closed


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _pg_row_factory(cursor: Any) -> Any:
    names = [d.name.lower() for d in cursor.description or ()]
    index: dict[str, int] = {}
    for i, n in enumerate(names):
        index.setdefault(n, i)  # a duplicate name reads as its first column, as in sqlite3.Row

    def make(values: Sequence[Any]) -> PgRow:
        row = PgRow(values)
        row._index = index
        return row

    return make


def _numeric_loader(psycopg: Any) -> type:
    """NUMERIC (what Postgres makes of SUM over integers) as int when whole, else float, as
    SQLite answers; the store never stores NUMERIC itself."""

    class Loader(psycopg.adapt.Loader):
        def load(self, data: Any) -> int | float:
            text = bytes(data).decode()
            if "." in text or "e" in text.lower() or "n" in text.lower():
                return float(text)
            return int(text)

    return Loader


# -- the schema, rewritten for Postgres -----------------------------------------------------------

_TRIGGER = re.compile(
    r"CREATE TRIGGER (\w+) BEFORE (UPDATE|DELETE) ON (\w+)\s+BEGIN\s+SELECT RAISE\(ABORT, '([^']*)'\);\s+END;?",
    re.IGNORECASE,
)
_ROWID_TABLES = ("jobs",)  # tables whose queries order by SQLite's implicit rowid


def pg_statements(statement: str) -> list[str]:
    """One migration statement (SQLite dialect) as the Postgres statements that do the same."""
    m = _TRIGGER.fullmatch(statement.strip())
    if m:
        name, event, table, message = m.groups()
        return [
            f"CREATE OR REPLACE FUNCTION {name}_fn() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN RAISE EXCEPTION '{message}'; END $$",
            f"CREATE TRIGGER {name} BEFORE {event.upper()} ON {table} FOR EACH ROW EXECUTE FUNCTION {name}_fn()",
        ]
    sql = re.sub(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
                 statement, flags=re.IGNORECASE)
    sql = re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)
    sql = re.sub(r"\bINTEGER\b", "BIGINT", sql)
    for table in _ROWID_TABLES:
        sql = re.sub(rf"^(\s*CREATE TABLE {table} \()", r"\1 rowid BIGINT GENERATED ALWAYS AS IDENTITY,", sql,
                     flags=re.IGNORECASE)
    return [sql]


def open_engine(target: str | Path) -> SqliteEngine | PostgresEngine:
    """The engine for a store target: a ``postgresql://`` URL, or a SQLite file path."""
    if is_postgres_url(target):
        return PostgresEngine(str(target))
    if isinstance(target, str) and "://" in target:
        raise StoreError(
            f"unknown database URL scheme in {redact_url(target)!r}: use postgresql://USER:PASSWORD@HOST/DB, "
            "or leave database_url unset for the SQLite file in TUNEFLEET_HOME"
        )
    return SqliteEngine(Path(target))

