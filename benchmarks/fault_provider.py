"""A provider that injects the faults real providers produce, behind the real ``Provider`` protocol.

    from benchmarks.fault_provider import FaultProvider, Faults
    Daemon(store, config, {"faulty": FaultProvider(Faults.uniform(0.1), seed=7)})

The daemon under test cannot tell it from a cloud: it answers ``offers``, ``launch``, ``poll``,
``cancel``, ``signal``, ``handle_for`` and ``release`` and raises only the documented errors. What it
rents is a *simulated machine* that runs a *simulated payload*: each poll advances the payload by
``steps_per_poll`` steps, and the payload talks to the daemon the way ``jobs.train`` does, through
the real checkpoint store (``commit_checkpoint`` every ``save_steps``, ``progress.json`` with its
attempt id, step, checkpoint and heartbeat, the final adapter, its exit code; it obeys
``control.json``: saves and exits 76 when told to stop or when its budget lease runs out). It shares
no code with the daemon's decisions.

Each call draws its fate from a seeded RNG (``Faults``: one probability per fault class):
- ``offers``: transient error with retry-after, provider unavailable, a hang past any deadline;
- ``launch``: no capacity, transient error, provider unavailable, launch failed, a hang (half the
  time the machine was rented and the answer lost: the daemon must find it by name);
- ``poll``: unknown, a hang, an attempt stuck in unknown for good, a reclaim with warning (the
  payload saves at the step it is on and exits 75) or without (capacity lost: work since the last
  checkpoint is gone);
- ``cancel``: transient error, a hang.
A drill-only class, ``killed_after_commit`` (not in ``Faults.uniform``): the machine is lost the
instant a checkpoint commits, before the payload's next progress write, as a real payload (whose
progress writes trail its commits) can be.
Counters record what was injected and what the machines did (``rented_s`` per attempt: the
provider's own bill, to compare with the daemon's ledger).
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.storage import CheckpointStore, open_store
from providers.base import (
    LaunchFailed,
    LaunchRequest,
    NoCapacity,
    Offer,
    PriceSource,
    Provider,
    ProviderUnavailable,
    Resource,
    RunState,
    RunStatus,
    TransientError,
)

FAULTS = ("offers_transient", "offers_unavailable", "offers_hang", "launch_no_capacity", "launch_transient",
          "launch_unavailable", "launch_failed", "launch_hang", "poll_unknown", "poll_hang", "stuck_unknown",
          "preempt_warned", "preempt_silent", "cancel_transient", "cancel_hang")


@dataclass(frozen=True)
class Faults:
    rates: dict[str, float] = field(default_factory=dict)

    @classmethod
    def uniform(cls, p: float) -> Faults:
        return cls({f: p for f in FAULTS})

    @classmethod
    def none(cls) -> Faults:
        return cls({})

    def p(self, fault: str) -> float:
        return self.rates.get(fault, 0.0)


@dataclass
class Machine:
    """One rented machine and the payload on it."""

    attempt_id: str
    job_id: str
    store: CheckpointStore
    steps: int
    save_steps: int
    usd_per_hour: float = 0.0  # the rented offer's price
    step: int = 0
    committed: int = 0
    checkpoint_s: float | None = None  # the last commit's duration, reported as the payload does
    state: str = "running"  # running | exited | lost | destroyed
    exit_code: int | None = None
    stuck: bool = False
    reclaimed: bool = False  # taken back by the provider (billing stops then), not destroyed by us
    started: float = field(default_factory=time.time)
    ended: float | None = None  # the payload ended (or the machine was taken)
    released: float | None = None  # destroyed by a cancel or release

    def billed_s(self, now: float) -> float:
        """Seconds billed: from rental until the provider took the machine back or we destroyed it."""
        end = self.ended if self.reclaimed else self.released
        return max(0.0, (end if end is not None else now) - self.started)

    def billed_usd(self, now: float) -> float:
        """The provider's own bill for this machine."""
        return self.billed_s(now) * self.usd_per_hour / 3600.0


class FaultProvider(Provider):
    launchable = True

    def __init__(self, faults: Faults, *, seed: int = 0, name: str = "faulty", usd_per_hour: float = 36.0,
                 steps_per_poll: int = 10, hang_s: float = 1.5, interruptible: bool = True,
                 hazard_per_hour: float = 0.5, offers_per_call: int = 3, gpu: str | None = "A100-80GB") -> None:
        self.name = name
        self.faults = faults
        self.rng = random.Random(seed)
        self.usd_per_hour = usd_per_hour
        self.steps_per_poll = steps_per_poll
        self.hang_s = hang_s
        self.interruptible = interruptible
        self.hazard = hazard_per_hour
        self.offers_per_call = offers_per_call
        self.gpu = gpu  # the GPU it rents to jobs that ask for GPUs (None: CPU machines only)
        self.machines: dict[str, Machine] = {}
        self.injected: dict[str, int] = {}
        self.down = False  # the whole provider unreachable: open and listing fail, polls say unknown
        self.fail_destroys = 0  # the next this many destroys by id fail
        self._lock = threading.Lock()
        self._stores: dict[str, CheckpointStore] = {}
        self._adapter = Path(tempfile.mkdtemp(prefix="tunefleet-fault-adapter-"))
        (self._adapter / "adapter_config.json").write_text('{"r": 8}\n')
        (self._adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)

    # ---- fate ----
    def _roll(self, fault: str) -> bool:
        with self._lock:
            hit = self.rng.random() < self.faults.p(fault)
            if hit:
                self.injected[fault] = self.injected.get(fault, 0) + 1
            return hit

    def _hang(self) -> None:
        time.sleep(self.hang_s)

    def _store(self, uri: str) -> CheckpointStore:
        with self._lock:
            if uri not in self._stores:
                self._stores[uri] = open_store(uri)
            return self._stores[uri]

    # ---- Provider ----
    def check(self) -> tuple[bool, str]:
        return True, f"{self.name}: injects faults {sorted(k for k, v in self.faults.rates.items() if v)}"

    def offers(self, spec: dict[str, Any], estimate: Any = None) -> list[Offer]:
        if self._roll("offers_hang"):
            self._hang()
        if self._roll("offers_unavailable"):
            raise ProviderUnavailable(f"{self.name}: API refused the key (injected)")
        if self._roll("offers_transient"):
            raise TransientError(f"{self.name}: HTTP 429 (injected)", retry_after_s=0.2)
        gpus = int((spec.get("resources") or {}).get("gpus", 0) or 0) if self.gpu else 0
        return [Offer(provider=self.name, offer_id=f"{self.name}-{i}", gpu=self.gpu if gpus else "cpu",
                      gpu_count=gpus, vram_gb=80.0 if gpus else 0.0, usd_per_hour=self.usd_per_hour * (1 + i / 10),
                      interruptible=self.interruptible, hazard_per_hour=self.hazard if self.interruptible else 0.0,
                      on_premises=True, startup_s=0.0, price_source=PriceSource.LIVE)
                for i in range(self.offers_per_call)]

    def launch(self, request: LaunchRequest, offer: Offer) -> dict[str, Any]:
        if self._roll("launch_hang"):
            if self.rng.random() < 0.5:  # rented; the answer is lost
                self._rent(request, offer)
            self._hang()
            raise TransientError(f"{self.name}: launch timed out on our side (injected)")
        if self._roll("launch_no_capacity"):
            raise NoCapacity(f"{self.name}: offer {offer.offer_id} is gone (injected)")
        if self._roll("launch_unavailable"):
            raise ProviderUnavailable(f"{self.name}: unreachable (injected)")
        if self._roll("launch_transient"):
            raise TransientError(f"{self.name}: HTTP 503 (injected)", retry_after_s=0.2)
        if self._roll("launch_failed"):
            raise LaunchFailed(f"{self.name}: image pull failed (injected)")
        self._rent(request, offer)
        return {"attempt_id": request.attempt_id}

    def _rent(self, request: LaunchRequest, offer: Offer) -> None:
        spec = request.spec
        steps = int(spec.get("max_steps") or 100)
        save = int((spec.get("checkpoint") or {}).get("interval") or spec.get("save_steps") or 20)
        store = self._store(request.store_uri)
        m = Machine(request.attempt_id, request.job_id, store, steps, save, offer.usd_per_hour)
        try:  # resume from the newest committed checkpoint, as the payload would
            latest = store.latest_checkpoint(request.job_id)
            m.step = m.committed = latest.step if latest else 0
        except Exception:  # noqa: BLE001 - an unreachable store: start from 0 (the real payload waits; close enough)
            pass
        with self._lock:
            self.machines[request.attempt_id] = m

    def handle_for(self, attempt_id: str) -> dict[str, Any] | None:
        with self._lock:
            m = self.machines.get(attempt_id)
        return {"attempt_id": attempt_id} if m is not None and m.state != "destroyed" else None

    def open(self) -> None:
        if self.down:
            raise ProviderUnavailable(f"{self.name}: unreachable (down)")

    def list_resources(self) -> list[Resource]:
        if self.down:
            raise ProviderUnavailable(f"{self.name}: unreachable (down)")
        with self._lock:
            return [Resource(self.name, m.attempt_id, m.attempt_id, m.attempt_id, m.state)
                    for m in self.machines.values() if m.state != "destroyed" and not m.reclaimed]

    def destroy(self, resource_id: str) -> None:
        with self._lock:
            fail = self.fail_destroys > 0
            self.fail_destroys -= int(fail)
        if fail or self.down:
            raise TransientError(f"{self.name}: could not destroy {resource_id} (injected)")
        self._destroy({"attempt_id": resource_id})

    def poll(self, handle: dict[str, Any]) -> RunStatus:
        if self.down:
            return RunStatus(RunState.UNKNOWN, detail="unreachable (down)")
        with self._lock:
            m = self.machines.get(handle.get("attempt_id", ""))
        if m is None or m.state == "destroyed":
            return RunStatus(RunState.LOST, detail="no such machine")
        if m.stuck:
            return RunStatus(RunState.UNKNOWN, detail="stuck (injected)")
        if self._roll("poll_hang"):
            self._hang()
        if m.state == "running" and self._roll("stuck_unknown"):
            m.stuck = True
            return RunStatus(RunState.UNKNOWN, detail="stuck (injected)")
        if self._roll("poll_unknown"):
            return RunStatus(RunState.UNKNOWN, detail="API error (injected)")
        if m.state == "running":
            self._advance(m)
        if m.state == "exited":  # a reclaimed machine stopped billing when it was taken
            return RunStatus(RunState.EXITED, exit_code=m.exit_code, ended_at=m.ended if m.reclaimed else None)
        if m.state == "lost":
            return RunStatus(RunState.LOST, detail="reclaimed without warning (injected)", cause="preempted",
                             ended_at=m.ended)
        return RunStatus(RunState.RUNNING, detail=f"step {m.step}")

    def _advance(self, m: Machine) -> None:
        """The payload runs ``steps_per_poll`` steps, checkpointing and obeying its control object."""
        try:
            control = m.store.read_json(m.job_id, "control.json") or {}
        except Exception:  # noqa: BLE001 - an unreachable store: keep training
            control = {}
        mine = control.get("attempt_id") == m.attempt_id
        lease = control.get("run_until") if mine else None
        if mine and (control.get("stop") or (isinstance(lease, (int, float)) and time.time() >= lease)):
            self._exit(m, 76, save=True)
            return
        if self._roll("preempt_warned"):
            m.reclaimed = True
            self._exit(m, 75, save=True)
            return
        if self._roll("preempt_silent"):
            m.state, m.ended, m.reclaimed = "lost", time.time(), True
            return
        for _ in range(self.steps_per_poll):
            m.step += 1
            if m.step % m.save_steps == 0 or m.step >= m.steps:
                self._commit(m)
                if m.committed == m.step < m.steps and self._roll("killed_after_commit"):
                    m.state, m.ended, m.reclaimed = "lost", time.time(), True  # before its progress write
                    return
            if m.step >= m.steps:
                try:
                    m.store.commit_final(m.job_id, self._adapter, meta={"step": m.step, "final_loss": 1.0})
                except Exception:  # noqa: BLE001 - the real payload retries; the sim tries on the next poll
                    m.step -= 1
                    break
                self._exit(m, 0, save=False)
                return
        self._progress(m)

    def _commit(self, m: Machine) -> None:
        try:
            t0 = time.monotonic()
            m.store.commit_checkpoint(m.job_id, m.step, self._adapter, meta={"attempt_id": m.attempt_id})
            m.committed = m.step
            m.checkpoint_s = max(1e-6, time.monotonic() - t0)
        except Exception:  # noqa: BLE001 - rides out the outage; the next checkpoint carries the progress
            pass

    def _progress(self, m: Machine, **extra: Any) -> None:
        doc = {"attempt_id": m.attempt_id, "step": m.step, "total_steps": m.steps, "checkpoint_step": m.committed,
               "checkpoint_s": m.checkpoint_s, "state": "running", "updated_at": time.time(), **extra}
        try:
            m.store.write_json(m.job_id, "progress.json", doc)
        except Exception:  # noqa: BLE001
            pass

    def _exit(self, m: Machine, code: int, *, save: bool) -> None:
        if save and m.step > m.committed:
            self._commit(m)
        m.state, m.exit_code, m.ended = "exited", code, time.time()
        self._progress(m, exit_code=code, state={0: "succeeded", 75: "preempted", 76: "stopped"}.get(code, "failed"))

    def cancel(self, handle: dict[str, Any], grace_s: float = 0.0) -> None:
        if self.down:
            raise TransientError(f"{self.name}: unreachable (down)")
        if self._roll("cancel_hang"):
            self._hang()
        if self._roll("cancel_transient"):
            raise TransientError(f"{self.name}: could not destroy (injected)", retry_after_s=0.2)
        self._destroy(handle)

    def release(self, handle: dict[str, Any]) -> None:
        self._destroy(handle)

    def signal(self, handle: dict[str, Any], hard: bool) -> bool:
        with self._lock:
            m = self.machines.get(handle.get("attempt_id", ""))
        if m is None or m.state != "running":
            return False
        if hard:
            m.state, m.ended, m.reclaimed = "lost", time.time(), True
        else:
            self._exit(m, 75, save=True)
        return True

    def _destroy(self, handle: dict[str, Any]) -> None:
        with self._lock:
            m = self.machines.get(handle.get("attempt_id", ""))
        if m is not None and m.state != "destroyed":
            m.ended = m.ended or time.time()
            m.released = m.released or time.time()
            m.state = "destroyed"

    # ---- figures ----
    def running(self) -> list[Machine]:
        with self._lock:
            return [m for m in self.machines.values() if m.state == "running"]
