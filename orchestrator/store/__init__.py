"""The durable job queue and state store: one SQLite file, ``<home>/state.db``.

Why it is shaped this way:

* **One file, many processes.** The daemon and any number of CLI invocations open the same
  database at once. WAL mode lets readers keep reading while one writer commits, and
  ``busy_timeout`` makes a second writer wait for the lock instead of failing at once with
  "database is locked".
* **Every state change is exactly one ``BEGIN IMMEDIATE`` transaction**, and the event that
  describes it is appended in that same transaction. IMMEDIATE takes the write lock at BEGIN,
  so the read-check-write of a compare-and-set (``expect=``) cannot interleave with another
  process. A deferred transaction that reads first and then upgrades to a writer can fail with
  "database is locked" *despite* the busy timeout, so no write here starts deferred.
* **Crash consistency comes from SQLite, not from us.** A commit is atomic; a transaction cut
  short by SIGKILL is rolled back the next time anyone opens the file. So after a crash the
  state never shows an attempt without its "attempt_created" event, or a spend row that was
  not added to ``jobs.cost_usd``. ``synchronous=NORMAL`` in WAL mode keeps every committed
  transaction across a *process* crash; only an OS crash or power loss can drop the last few
  commits, and even then the file is not corrupted. In return a commit needs no fsync, which
  matters because the daemon writes progress on every tick.
* **Intent before launch.** ``create_attempt`` records the attempt, and moves the job to
  launching, *before* anyone asks a provider for a machine. If the daemon dies in between,
  the next daemon finds an attempt in ``launching``, maybe with no handle, and knows it has
  to reconcile a machine that may have leaked. Without the record it would never know.
* **Stdlib only** (sqlite3, json, time, uuid, dataclasses): the CLI imports this module, and
  the CLI has to start fast.
* **States are stored by their enum value.** Code older than the database cannot parse a state
  value it has never seen, so adding a state value is a schema change: bump ``SCHEMA_VERSION``.
  An older tunefleet then refuses the file with a clear message instead of crashing halfway.
* ``events`` and ``spend`` are append-only. The API has no update or delete for them, and
  triggers reject raw UPDATE/DELETE too.

The parts: ``schema`` (migrations), ``rows`` (errors and decoded rows), ``base`` (connection,
transactions, upgrade), ``jobs``, ``attempts`` and ``ledger`` (events, spend, throughput, sweeps,
provider health), ``accounts`` (teams, users, API tokens, spend by owner). ``Store`` is all of them;
import everything from here.
"""

from __future__ import annotations

from orchestrator.store.accounts import AccountsMixin
from orchestrator.store.ledger import LedgerMixin
from orchestrator.store.rows import (
    AccountExists,
    AttemptNotFound,
    AttemptRow,
    EventRow,
    InvalidAccount,
    InvalidTransition,
    JobNotFound,
    JobRow,
    StoreError,
    TeamNotFound,
    TokenNotFound,
    TokenRow,
    UserNotFound,
    UserRow,
)
from orchestrator.store.schema import MIGRATIONS, SCHEMA_VERSION
from orchestrator.store.schema import split_sql as _split_sql  # noqa: F401 - tests run it

__all__ = [
    "SCHEMA_VERSION",
    "MIGRATIONS",
    "StoreError",
    "JobNotFound",
    "AttemptNotFound",
    "InvalidTransition",
    "TeamNotFound",
    "UserNotFound",
    "TokenNotFound",
    "AccountExists",
    "InvalidAccount",
    "JobRow",
    "AttemptRow",
    "EventRow",
    "UserRow",
    "TokenRow",
    "Store",
]


class Store(AccountsMixin, LedgerMixin):
    """The state store: jobs, attempts, events, spend, sweeps, accounts. Safe to share between threads
    (one SQLite connection behind a lock, or a small Postgres pool: ``StoreBase``)."""

    def schema_version(self) -> int:
        """The schema version of the open file (``SCHEMA_VERSION`` once it is open)."""
        with self._read() as c:
            return self._schema_version(c)
