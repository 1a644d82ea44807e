"""The payload's only channel to the daemon: the checkpoint store. Progress, heartbeat, control, uploads.

Why its own module, and why every store call here runs off the training thread: the store may be
object storage across the internet, and a 40-second outage must not stall training, fail the
attempt, or count against the job. So:

- ``Beacon`` (one background thread) writes ``progress.json`` (step, loss, tokens/s, checkpoint)
  at most twice a second and a heartbeat every ``HEARTBEAT_S`` even when nothing changes (the
  daemon bills an attempt to its last sign of life); and it reads ``control.json`` every
  ``store.control_poll_s``: the daemon's word to this attempt (stop now, with why; or the time by
  which it must stop on its own: its budget lease). The training loop only reads flags.
- ``Uploader`` (one background thread) commits checkpoints in order, retrying a store that does not
  answer with backoff for as long as it takes, until a newer checkpoint supersedes the one it
  retries (the newer one carries all the progress) or the final drain's deadline passes. A
  permanent fault (access denied, no such bucket) is not retried.
- ``find_resume_point`` waits out an unreachable store at start-up, up to ``STORE_WAIT_S``.
When the store stays unreachable, the payload exits ``EXIT_STORE_UNAVAILABLE`` (69): an
infrastructure fault the daemon retries without charging it to the job's failures.

Fencing: before it launches an attempt the daemon writes ``<job>/lease.json`` naming it. Every
attempt checks the lease before each checkpoint commit, before retention deletes anything, before
the final commit and on each control read; once the lease names another attempt, this one is
*fenced*: it writes nothing more (no checkpoint, no progress, no deletion) and exits
``EXIT_FENCED``. So two payloads of one job (a machine the daemon could not reach, thought gone and
replaced) never delete each other's checkpoints. A check and the write after it are not atomic:
the window is the few milliseconds between them, not the attempt's life.

Imports only ``infra`` and the standard library.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from infra.storage import CorruptCheckpoint, is_permanent

HEARTBEAT_S = float(os.environ.get("TUNEFLEET_HEARTBEAT_S", "30"))
STORE_WAIT_S = float(os.environ.get("TUNEFLEET_STORE_WAIT_S", "300"))
RETRY_MAX_S = 30.0


LEASE = "lease.json"


class StoreUnavailable(Exception):
    """The checkpoint store did not answer for longer than this payload could wait."""


class Fenced(Exception):
    """The job's lease names another attempt: this one must not write to the job's store again."""


def check_lease(store, job_id: str, attempt_id: str) -> None:
    """Raise Fenced when the job's lease names an attempt other than ``attempt_id`` (no lease: a
    payload run by hand, or by a daemon from before leases; nothing to check against)."""
    doc = store.read_json(job_id, LEASE)
    holder = (doc or {}).get("attempt_id")
    if holder and holder != attempt_id:
        raise Fenced(f"attempt {holder} now holds job {job_id}'s lease; attempt {attempt_id} is fenced off")


def write_lease(store, job_id: str, attempt_id: str) -> None:
    """Name ``attempt_id`` the job's current attempt (the daemon, before it launches it)."""
    store.write_json(job_id, LEASE, {"attempt_id": attempt_id, "written_at": time.time()})


def _say(message: str) -> None:
    print(f"[tunefleet] {message}", file=sys.stderr, flush=True)


def retry_store(what: str, fn, *, deadline_s: float | None = None, superseded=None, deadline=None):
    """``fn()``, retried with exponential backoff while the store's faults may pass.

    Raises the fault itself when it is permanent, and ``StoreUnavailable`` once ``deadline_s`` has
    passed (or the monotonic time ``deadline()`` returns, which may move: a drain sets it). Returns
    None, giving up quietly, when ``superseded()`` says the work is no longer wanted."""
    fixed = None if deadline_s is None else time.monotonic() + deadline_s
    delay = 1.0
    while True:
        try:
            return fn()
        except Exception as exc:
            if is_permanent(exc) or isinstance(exc, CorruptCheckpoint | Fenced):
                raise
            if superseded is not None and superseded():
                _say(f"{what}: superseded by a newer checkpoint while the store was failing ({exc})")
                return None
            limit = min(x for x in (fixed, deadline() if deadline else None, float("inf")) if x is not None)
            if time.monotonic() + delay > limit:
                raise StoreUnavailable(f"{what}: the checkpoint store kept failing; last error: {exc}") from exc
            _say(f"{what} failed ({exc}); retrying in {delay:.0f} s")
            time.sleep(delay)
            delay = min(RETRY_MAX_S, delay * 2)


class Beacon:
    """``progress.json`` out, ``control.json`` in, on one background thread (see the module doc)."""

    def __init__(self, store, job_id: str, attempt_id: str):
        self.store, self.job_id, self.attempt_id = store, job_id, attempt_id
        self.doc: dict[str, Any] = {"attempt_id": attempt_id, "state": "starting", "step": 0}
        self.stop_reason: str | None = None  # set once the daemon said stop (or the budget lease ran out)
        self.fenced: str | None = None  # set once another attempt holds the job's lease: write nothing more
        self.run_until: float | None = None
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._closing = threading.Event()
        self._written = 0.0
        self._read = 0.0
        self._version = self._sent = 0
        self._thread = threading.Thread(target=self._loop, name="tf-beacon", daemon=True)

    def start(self) -> Beacon:
        self._read_control()  # a payload started after it was replaced is fenced before it writes
        self._read = time.time()
        self._thread.start()
        return self

    def update(self, force: bool = False, **fields: Any) -> None:
        """Record progress; the beacon writes it within half a second (``force``: at once)."""
        with self._lock:
            self.doc.update(fields)
            self._version += 1
        if force:
            self._dirty.set()

    def fence(self, why: str) -> None:
        if self.fenced is None:
            self.fenced = why
            _say(f"fenced: {why}; stopping without writing anything more")

    def should_stop(self) -> str | None:
        """Why this attempt must save and stop now, or None (cheap: no I/O)."""
        if self.fenced is not None:
            return self.fenced
        if self.stop_reason is None and self.run_until is not None and time.time() >= self.run_until:
            self.stop_reason = "its budget lease ran out (the daemon did not extend it)"
        return self.stop_reason

    def _loop(self) -> None:
        every = float(getattr(self.store, "control_poll_s", 1.0))
        while not self._closing.is_set():
            self._dirty.wait(0.5)
            self._dirty.clear()
            now = time.time()
            with self._lock:
                changed = self._version != self._sent
            if changed or now - self._written >= HEARTBEAT_S:
                self.flush()
            if now - self._read >= every:
                self._read = now
                self._read_control()

    def flush(self) -> None:
        """Write progress.json now (the heartbeat: ``updated_at``). Never raises."""
        if self.fenced is not None:
            return  # progress.json belongs to the attempt holding the lease
        with self._lock:
            self.doc["updated_at"] = time.time()
            doc, version = dict(self.doc), self._version
        try:
            self.store.write_json(self.job_id, "progress.json", doc)
            self._written = time.time()
            with self._lock:
                self._sent = version
        except Exception as exc:  # progress is advisory; checkpoints are what matter
            _say(f"progress write failed: {exc}")

    def _read_control(self) -> None:
        try:
            check_lease(self.store, self.job_id, self.attempt_id)
            doc = self.store.read_json(self.job_id, "control.json")
        except Fenced as exc:
            self.fence(str(exc))
            return
        except Exception as exc:  # an unreachable store: keep training (the lease still holds)
            _say(f"control read failed: {exc}")
            return
        if not doc or doc.get("attempt_id") != self.attempt_id:
            return  # nothing said to this attempt (a control object of an earlier attempt is not ours)
        until = doc.get("run_until")
        self.run_until = float(until) if isinstance(until, (int, float)) else None
        if doc.get("stop") and self.stop_reason is None:
            self.stop_reason = f"the daemon said stop ({doc.get('stop')}: {doc.get('reason')})"
            _say(self.stop_reason)

    def close(self) -> None:
        self._closing.set()
        self._dirty.set()
        self._thread.join(timeout=5)
        self.flush()


class Uploader:
    """Commits checkpoints in the background, in order, so training never waits for the network.

    Each checkpoint folder is first hard-linked into a staging folder (instant, and immune to the
    Trainer rotating the original away); one worker thread uploads and commits them oldest first
    and applies retention, riding out store outages (see the module doc). ``drain`` waits for
    everything queued, with a deadline: before the final adapter, and when told to stop.
    """

    def __init__(self, store, job_id: str, keep: int, progress: Beacon, staging: Path):
        self.store, self.job_id, self.keep, self.progress = store, job_id, keep, progress
        self.staging = staging
        self.pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-upload")
        self.futures: list = []
        self.committed: list[int] = []
        self.upload_s = 0.0
        self.newest = -1
        self._deadline: float | None = None  # set by drain: no retry starts after it

    def submit(self, step: int, folder: Path, meta: dict[str, Any]) -> None:
        snap = self.staging / f"checkpoint-{step}"
        shutil.rmtree(snap, ignore_errors=True)
        try:
            shutil.copytree(folder, snap, copy_function=os.link)
        except OSError:  # another filesystem: copy instead
            shutil.rmtree(snap, ignore_errors=True)
            shutil.copytree(folder, snap)
        self.newest = max(self.newest, step)
        self.futures.append(self.pool.submit(self._commit, step, snap, meta))

    def _commit(self, step: int, snap: Path, meta: dict[str, Any]) -> None:
        t0 = time.monotonic()

        attempt_id = self.progress.attempt_id

        def commit():
            check_lease(self.store, self.job_id, attempt_id)
            ref = self.store.commit_checkpoint(self.job_id, step, snap, meta={**meta, "attempt_id": attempt_id})
            check_lease(self.store, self.job_id, attempt_id)  # retention deletes: only while still current
            self.store.apply_retention(self.job_id, self.keep)
            return ref

        try:
            if self.progress.fenced is not None:
                raise Fenced(self.progress.fenced)
            ref = retry_store(f"committing checkpoint {step}", commit, superseded=lambda: self.newest > step,
                              deadline=lambda: self._deadline)
        except Fenced as exc:
            self.progress.fence(str(exc))
            ref = None
        finally:
            self.upload_s += time.monotonic() - t0
        shutil.rmtree(snap, ignore_errors=True)
        if ref is None:
            return
        self.committed.append(step)
        self.progress.update(force=True, checkpoint_step=ref.step, checkpoint_uri=ref.uri)
        _say(f"committed checkpoint {ref.step} -> {ref.uri}")

    def drain(self, timeout_s: float) -> None:
        """Wait for every queued commit; re-raise the first upload error (a lost checkpoint is
        fatal), and StoreUnavailable when the store kept failing past ``timeout_s``."""
        self._deadline = time.monotonic() + timeout_s
        done, pending = cf.wait(self.futures, timeout=timeout_s + RETRY_MAX_S)
        if pending:
            raise StoreUnavailable(f"{len(pending)} checkpoint upload(s) still running after {timeout_s:.0f} s")
        for fut in done:
            fut.result()
        self.futures = []


def find_resume_point(store, job_id: str, work_dir: Path) -> tuple[Path | None, int]:
    """Download the newest committed checkpoint that verifies; fall back to older ones. An
    unreachable store is waited for (``STORE_WAIT_S``): resuming from scratch would throw work away."""
    refs = retry_store("listing checkpoints", lambda: store.list_checkpoints(job_id), deadline_s=STORE_WAIT_S)
    for ref in reversed(refs):
        dest = work_dir / f"checkpoint-{ref.step}"
        shutil.rmtree(dest, ignore_errors=True)
        try:
            retry_store(f"downloading checkpoint {ref.step}", lambda ref=ref, dest=dest: store.download(ref, dest),
                        deadline_s=STORE_WAIT_S)
        except CorruptCheckpoint as exc:
            _say(f"skipping checkpoint {ref.step}: {exc}")
            continue
        return dest, ref.step
    return None, 0
