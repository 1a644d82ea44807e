"""A provider whose attempts finish the moment they are launched: for benchmarking the daemon alone.

    from benchmarks.instant_provider import InstantProvider
    Daemon(store, config, {"instant": InstantProvider()})

It offers one owned, on-premises machine at price 0 (so every policy, local checkpoint store and
budget accepts it). ``launch`` does what a payload does at the end of a successful run, through the
same checkpoint-store API: it commits a tiny final adapter (``commit_final``, meta ``step``) and
writes ``progress.json`` with the attempt id, the step, the adapter's URI and ``exit_code`` 0
(``jobs.train``'s last progress and ``_report_exit``).
``poll`` then says EXITED 0, so the daemon's success check (final adapter committed) passes.

``tokens_per_s``: also report a throughput figure in ``progress.json``, as the real payload does on
every step (``jobs.train``'s ``on_step_end``); the daemon then records it for calibration
(``Daemon._record_throughput``). Off by default, so a drain measures the bare placement path.

Counters (``launches``, ``polls``, ``launch_s``) let a benchmark subtract what the provider itself
costs (the store writes above: a few small files, each fsynced) from the daemon's time.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from infra.storage import CheckpointStore, open_store
from providers.base import LaunchRequest, Offer, PriceSource, Provider, RunState, RunStatus

OFFER_ID = "instant-0"


class InstantProvider(Provider):
    name = "instant"
    launchable = True

    def __init__(self, *, tokens_per_s: float | None = None) -> None:
        self.tokens_per_s = tokens_per_s
        self._adapter = Path(tempfile.mkdtemp(prefix="tunefleet-instant-adapter-"))
        (self._adapter / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}\n')
        self._stores: dict[str, CheckpointStore] = {}
        self.launches = 0
        self.polls = 0
        self.launch_s = 0.0  # wall time spent inside launch() (the checkpoint-store writes)

    def check(self) -> tuple[bool, str]:
        return True, "instant: attempts finish as soon as they are launched"

    def offers(self, spec: dict[str, Any], estimate: Any = None) -> list[Offer]:
        gpus = int((spec.get("resources") or {}).get("gpus", 0) or 0)
        return [Offer(
            provider=self.name, offer_id=OFFER_ID, gpu="H100" if gpus else "cpu", gpu_count=gpus,
            vram_gb=80.0 if gpus else 0.0, usd_per_hour=0.0, region="bench",
            on_premises=True, owned=True, startup_s=0.0, price_source=PriceSource.COST_MODEL,
        )]

    def _store(self, uri: str) -> CheckpointStore:
        store = self._stores.get(uri)
        if store is None:
            store = self._stores[uri] = open_store(uri)
        return store

    def launch(self, request: LaunchRequest, offer: Offer) -> dict[str, Any]:
        t0 = time.perf_counter()
        steps = int(request.spec.get("max_steps") or 1)
        store = self._store(request.store_uri)
        ref = store.commit_final(request.job_id, self._adapter, meta={"step": steps})
        doc: dict[str, Any] = {  # what jobs.train writes last: the adapter's URI, then its exit code
            "attempt_id": request.attempt_id, "state": "succeeded", "step": steps, "total_steps": steps,
            "adapter_uri": ref.uri, "exit_code": 0, "updated_at": time.time(),
        }
        if self.tokens_per_s:
            doc["tokens_per_s"] = float(self.tokens_per_s)
        store.write_json(request.job_id, "progress.json", doc)
        self.launches += 1
        self.launch_s += time.perf_counter() - t0
        return {"attempt_id": request.attempt_id, "job_id": request.job_id}

    def poll(self, handle: dict[str, Any]) -> RunStatus:
        self.polls += 1
        return RunStatus(RunState.EXITED, exit_code=0, detail="instant")

    def handle_for(self, attempt_id: str) -> dict[str, Any] | None:
        return {"attempt_id": attempt_id, "job_id": attempt_id.rsplit(".", 1)[0]}

    def cancel(self, handle: dict[str, Any], grace_s: float = 0.0) -> None:
        return None

    def release(self, handle: dict[str, Any]) -> None:
        return None
