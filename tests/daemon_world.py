"""A small world for driving the real daemon in-process against the fault-injecting provider.

Time is compressed (``time_scale``, short call deadlines and graces) so that a job's life takes
seconds; the daemon, the store, the checkpoint store and the decisions are the real ones.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog

from benchmarks.fault_provider import FaultProvider, Faults
from infra.config import Config
from jobs.spec import load_job_file
from orchestrator.daemon import Daemon
from orchestrator.queue import submit_spec
from orchestrator.states import JobState
from orchestrator.store import Store

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "qlora-tiny.yaml"


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """The daemon's log lines off while a test drives it hard; the global config restored after
    (other tests capture structlog's warnings)."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    try:
        yield
    finally:
        structlog.configure(**saved)


def config(home: Path, store_uri: str | None = None, **changes: Any) -> Config:
    base = Config(home=home, default_store=store_uri or (home / "ckpt").as_uri(), poll_interval_s=0.0,
                  call_timeout_s=0.3, stop_grace_s=0.3, unknown_timeout_s=1.0, launch_timeout_s=3.0,
                  provider_disable_s=0.5, time_scale=0.01, max_attempts=30)
    return replace(base, **changes)


def spec(max_steps: int = 40, save_steps: int = 10, max_usd: float | None = None, **policy: Any):
    s = load_job_file(EXAMPLE)
    pol = s.policy.model_copy(update={"data": "open", "max_usd": max_usd, **policy})
    return s.model_copy(update={"max_steps": max_steps, "save_steps": save_steps, "policy": pol})


def calibrate_fast(store: Store) -> None:
    """Estimates say the job takes no time (training nor checkpoints), so any cap admits it; what it
    really costs is decided by how long it runs (the budget stop is what is under test, not the
    admission check)."""
    for gpu in ("cpu", "A100-80GB"):
        store.record_throughput(base_model="tunefleet/tiny-llama", method="qlora", gpu=gpu, gpu_count=1,
                                tokens_per_s=1e9)
    store.record_exposure(attempt_id="calibration", provider="(calibration)", gpu="cpu", gpu_count=1, host="",
                          offer_id="-", interruptible=False, advertised=0.0, hours=0.0, interrupted=False,
                          base_model="tunefleet/tiny-llama", method="qlora", checkpoint_s=1e-6)


def provider(faults: Faults, seed: int = 0, **kw: Any) -> FaultProvider:
    kw.setdefault("hang_s", 0.6)
    kw.setdefault("steps_per_poll", 2)
    return FaultProvider(faults, seed=seed, **kw)


def daemon(store: Store, cfg: Config, prov: FaultProvider) -> Daemon:
    return Daemon(store, cfg, {prov.name: prov})


def settled(store: Store, job_id: str) -> bool:
    job = store.get_job(job_id)
    return job.terminal or (job.state is JobState.QUEUED and job.wait_code is not None and bool(job.reason))


def submit(store: Store, cfg: Config, **kw: Any) -> str:
    return submit_spec(store, spec(**kw), cfg)
