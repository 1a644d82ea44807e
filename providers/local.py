"""The team's own machines, through Ray: an embedded single-node instance, or a cluster it joins.

Why Ray: users with several GPU boxes already run ``ray start --head`` / ``ray start --address``;
Ray then does the bookkeeping of which GPU is free on which node. Each attempt is a *named, detached
actor* (name = attempt id) that reserves the GPUs the offer promised and runs the training payload
as a subprocess. Naming the actor after the attempt is what lets a restarted daemon find (adopt)
what it launched before a crash; the actor only starts the subprocess and answers quick calls, so
no call ever blocks the daemon for long.

The payload gets ``PR_SET_PDEATHSIG=SIGTERM``: if the actor's process dies (node shutdown, embedded
cluster torn down with the daemon), the payload is told it is being preempted and saves first.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import cache
from typing import Any

from jobs.gpus import canonical_gpu, gpu_info
from providers.base import (
    LaunchFailed,
    LaunchRequest,
    Offer,
    PriceSource,
    Provider,
    ProviderNotConfigured,
    ProviderUnavailable,
    Resource,
    RunState,
    RunStatus,
)

NAMESPACE = "tunefleet"
_POLL_TIMEOUT_S = 3.0


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the payload just outlives a dead actor
        pass


@cache
def _runner_class():
    """The actor class, defined on first use so importing this module does not import Ray."""
    import ray

    @ray.remote(max_restarts=0, max_task_retries=0)
    class AttemptRunner:
        """Runs one attempt's payload as a subprocess on whichever node Ray placed it."""

        def __init__(self, argv: list[str] | None = None, env: dict[str, str] | None = None,
                     log_path: str | None = None) -> None:
            self.proc = None
            self.error: str | None = None
            if argv is not None:  # part of the actor's creation: survives the daemon's death
                self.start(argv, env or {}, log_path or os.devnull)

        def start(self, argv: list[str], env: dict[str, str], log_path: str) -> int | None:
            import subprocess

            if self.proc is not None:  # idempotent
                return self.proc.pid
            try:
                os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
                from providers.base import scrub_provider_keys

                full_env = scrub_provider_keys({**os.environ, **env})  # the daemon's API keys stay with it
                full_env["TUNEFLEET_RAY_GPU_IDS"] = ",".join(str(g) for g in ray.get_gpu_ids())
                with open(log_path, "ab") as log:
                    self.proc = subprocess.Popen(
                        argv,
                        env=full_env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        preexec_fn=_set_pdeathsig,
                    )
                return self.proc.pid
            except Exception as exc:  # reported through poll
                self.error = f"could not start the payload: {exc}"
                return None

        def poll(self) -> dict[str, Any]:
            if self.error:
                return {"state": "error", "detail": self.error}
            if self.proc is None:
                return {"state": "pending"}
            rc = self.proc.poll()
            return {"state": "running" if rc is None else "exited", "exit_code": rc, "pid": self.proc.pid}

        def signal(self, signum: int) -> bool:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                os.killpg(self.proc.pid, signum)
            except ProcessLookupError:
                return False
            return True

    return AttemptRunner


@dataclass(frozen=True)
class CostModel:
    """What an owned GPU costs per hour. The scheduler is offered the *marginal* cost (power):
    the purchase is sunk, so idle hardware is a direct drain; the amortized figure is shown too."""

    gpu_purchase_usd: float = 2000.0
    gpu_lifetime_hours: float = 26280.0
    gpu_watts: float = 350.0
    cpu_watts: float = 65.0
    usd_per_kwh: float = 0.15

    def marginal(self, gpus: int) -> float:
        if gpus == 0:
            return self.cpu_watts / 1000 * self.usd_per_kwh
        return gpus * self.gpu_watts / 1000 * self.usd_per_kwh

    def amortized(self, gpus: int) -> float:
        if gpus == 0:
            return self.marginal(0)
        return gpus * self.gpu_purchase_usd / self.gpu_lifetime_hours + self.marginal(gpus)


def _nvidia_smi_gpus() -> list[tuple[str, float]]:
    """(name, VRAM GB) of this machine's GPUs without starting Ray; [] when there are none."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, _, mem = line.rpartition(",")
        try:
            gpus.append((name.strip(), float(mem) / 1024))
        except ValueError:
            continue
    return gpus


def _host_ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 0.0


class LocalRayProvider(Provider):
    """Local GPUs (or the CPU) of a Ray cluster, priced by the cost model in config."""

    name = "local"

    def __init__(
        self,
        *,
        address: str | None = None,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        cost: CostModel | None = None,
        python: str | None = None,
        light: bool = False,
        model_cache: str | None = None,
    ) -> None:
        """``light``: answer offers from an nvidia-smi inventory instead of starting an embedded
        Ray instance (for ``tunefleet offers``; the daemon needs Ray's view of what is free)."""
        self.light = light
        self.model_cache = model_cache  # where the built-in tiny model is materialized, per machine
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.cost = cost or CostModel()
        self.python = python or sys.executable
        self._ray = None
        self._reserved: dict[str, tuple[int, int]] = {}  # attempt id -> (GPUs, CPUs) it holds

    # ---- connection ----
    def _connect(self):
        if self._ray is not None:
            return self._ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        try:
            import ray
        except ImportError as exc:
            raise ProviderNotConfigured("Ray is not installed: pip install 'tunefleet[local]'") from exc
        if not ray.is_initialized():
            try:
                if self.address:
                    ray.init(address=self.address, namespace=NAMESPACE, log_to_driver=False)
                else:
                    ray.init(
                        num_cpus=self.num_cpus,
                        num_gpus=self.num_gpus,
                        include_dashboard=False,
                        namespace=NAMESPACE,
                        log_to_driver=False,
                    )
            except Exception as exc:
                where = f"the Ray cluster at {self.address}" if self.address else "an embedded Ray instance"
                raise ProviderUnavailable(f"could not connect to {where}: {exc}") from exc
        self._ray = ray
        return ray

    def open(self) -> None:
        self._connect()

    def check(self) -> tuple[bool, str]:
        """Cheap: does not start an embedded Ray instance (the daemon does that)."""
        if self._ray is not None:
            res = self._ray.cluster_resources()
            return True, f"Ray connected: {int(res.get('CPU', 0))} CPUs, {int(res.get('GPU', 0))} GPUs"
        if self.address:
            import socket

            host, _, port = self.address.rpartition(":")
            try:
                with socket.create_connection((host or "127.0.0.1", int(port)), timeout=3):
                    pass
            except (OSError, ValueError) as exc:
                return False, f"Ray cluster at {self.address} is not reachable ({exc})"
            return True, f"joins the Ray cluster at {self.address}; cost model ${self.cost.marginal(1):.3f}/GPU-h marginal"
        gpus = _nvidia_smi_gpus()
        what = f"{len(gpus)} GPU(s): {', '.join(sorted({g for g, _ in gpus}))}" if gpus else "no GPU, the CPU"
        return True, f"embedded Ray (started by the daemon); {what}; power ${self.cost.marginal(len(gpus) and 1):.3f}/h"

    # ---- offers ----
    def _inventory(self) -> dict[str, Any]:
        """This cluster's capacity: GPUs and CPUs in all and idle, the GPU model, VRAM per GPU and
        host memory (GB)."""
        if self._ray is not None or self.address or not self.light:
            ray = self._connect()
            avail = ray.available_resources()
            total = ray.cluster_resources()
            models = sorted(k.split(":", 1)[1] for k in total if k.startswith("accelerator_type:"))
            gpu = canonical_gpu(models[0]) if models else None
            info = gpu_info(gpu) if gpu else None
            # Ray's view lags actors created or killed a moment ago. An embedded instance is ours
            # alone, so what this daemon reserved is the truth; on a shared cluster, trust both.
            gpus = int(total.get("GPU", 0)) - sum(g for g, _ in self._reserved.values())
            cpus = int(total.get("CPU", 0)) - sum(c for _, c in self._reserved.values())
            if self.address:
                gpus, cpus = min(gpus, int(avail.get("GPU", 0))), min(cpus, int(avail.get("CPU", 0)))
            ram = float(total.get("memory", 0.0)) / 1e9 or _host_ram_gb()
            return {"gpus": int(total.get("GPU", 0)), "cpus": int(total.get("CPU", 0)), "gpus_free": max(0, gpus),
                    "cpus_free": max(0, cpus), "gpu": gpu, "vram": info.vram_gb if info else 0.0, "ram_gb": ram}
        gpus = _nvidia_smi_gpus()
        cpus = self.num_cpus or os.cpu_count() or 1
        count = self.num_gpus if self.num_gpus is not None else len(gpus)  # logical GPUs of the embedded instance
        gpu = canonical_gpu(gpus[0][0], gpus[0][1]) if gpus else None
        return {"gpus": count, "cpus": cpus, "gpus_free": count, "cpus_free": cpus, "gpu": gpu,
                "vram": gpus[0][1] if gpus else 0.0, "ram_gb": _host_ram_gb()}

    def offers(self, spec: dict[str, Any], estimate: Any = None) -> list[Offer]:
        """The local CPU always (the scheduler says why a GPU job may not use it), and the GPUs
        when the job asks for them and the cluster has that many. Capacity that exists but is
        taken now is offered as not available, so the job waits for it instead of failing."""
        inv = self._inventory()
        resources = spec.get("resources") or {}
        need_gpus = int(resources.get("gpus", 1))
        need_cpus = int(resources.get("cpus", 1))
        cpus_ok = need_cpus <= inv["cpus_free"]
        out = []
        if need_gpus > 0 and 0 < inv["gpus"] and need_gpus <= inv["gpus"]:
            gpu = inv["gpu"] or "gpu"
            out.append(self._offer(f"local-{gpu}x{need_gpus}", gpu, need_gpus, inv["vram"], inv,
                                   available=cpus_ok and need_gpus <= inv["gpus_free"]))
        out.append(self._offer("local-cpu", "cpu", 0, 0.0, inv, available=cpus_ok))
        return out

    def _offer(self, offer_id: str, gpu: str, count: int, vram: float, inv: dict[str, Any], *,
               available: bool) -> Offer:
        return Offer(
            provider=self.name,
            offer_id=offer_id,
            gpu=gpu,
            gpu_count=count,
            vram_gb=vram,
            usd_per_hour=self.cost.marginal(count),
            region=self.address or "embedded",
            on_premises=True,
            owned=True,
            startup_s=15.0,
            cpus=int(inv["cpus"]),
            ram_gb=round(float(inv["ram_gb"]), 1),
            available=available,
            price_source=PriceSource.COST_MODEL,
            extra=(("amortized_usd_per_hour", round(self.cost.amortized(count), 4)),),
        )

    # ---- attempts ----
    def launch(self, request: LaunchRequest, offer: Offer) -> dict[str, Any]:
        self._connect()
        runner = _runner_class()
        argv = [self.python, "-m", "jobs.train"]
        # secrets travel with the actor call (Ray's object store), never through logs
        env = {**request.payload_env(), **request.secrets}
        if self.model_cache:
            env.setdefault("TUNEFLEET_MODEL_CACHE", self.model_cache)
        try:
            runner.options(
                name=request.attempt_id,
                namespace=NAMESPACE,
                lifetime="detached",
                num_cpus=request.cpus,
                num_gpus=offer.gpu_count,
                get_if_exists=True,
            ).remote(argv, env, request.log_path)
        except Exception as exc:
            raise LaunchFailed(f"Ray could not create the attempt actor: {exc}") from exc
        self._reserved[request.attempt_id] = (offer.gpu_count, request.cpus)
        return {"actor": request.attempt_id, "namespace": NAMESPACE}

    def handle_for(self, attempt_id: str) -> dict[str, Any] | None:
        return {"actor": attempt_id, "namespace": NAMESPACE}

    def list_resources(self) -> list[Resource]:
        """Every attempt actor in tunefleet's Ray namespace (named by attempt id)."""
        self._connect()
        from ray.util import list_named_actors

        return [Resource(self.name, a["name"], a["name"], a["name"], "Ray actor")
                for a in list_named_actors(all_namespaces=True) if a.get("namespace") == NAMESPACE]

    def destroy(self, resource_id: str) -> None:
        self.signal({"actor": resource_id, "namespace": NAMESPACE}, hard=True)
        self.release({"actor": resource_id, "namespace": NAMESPACE})

    def _actor(self, handle: dict[str, Any]):
        ray = self._connect()
        try:
            return ray.get_actor(handle["actor"], namespace=handle.get("namespace", NAMESPACE))
        except ValueError:
            return None

    def poll(self, handle: dict[str, Any]) -> RunStatus:
        ray = self._connect()
        from ray.exceptions import GetTimeoutError, RayActorError

        actor = self._actor(handle)
        if actor is None:
            return RunStatus(RunState.LOST, detail="the attempt's Ray actor no longer exists")
        try:
            info = ray.get(actor.poll.remote(), timeout=_POLL_TIMEOUT_S)
        except GetTimeoutError:
            return RunStatus(RunState.PENDING, detail="waiting for Ray to place the attempt")
        except RayActorError as exc:
            return RunStatus(RunState.LOST, detail=f"the node running the attempt was lost: {exc}")
        except Exception as exc:
            return RunStatus(RunState.UNKNOWN, detail=str(exc))
        state = info.get("state")
        if state == "running":
            return RunStatus(RunState.RUNNING, detail=f"pid {info.get('pid')}")
        if state == "exited":
            return RunStatus(RunState.EXITED, exit_code=info.get("exit_code"))
        if state == "error":
            return RunStatus(RunState.EXITED, exit_code=127, detail=info.get("detail", ""))
        return RunStatus(RunState.PENDING)

    def signal(self, handle: dict[str, Any], hard: bool) -> bool:
        import signal as sig

        ray = self._connect()
        actor = self._actor(handle)
        if actor is None:
            return False
        try:
            return bool(ray.get(actor.signal.remote(int(sig.SIGKILL if hard else sig.SIGTERM)), timeout=10))
        except Exception:
            return False

    def cancel(self, handle: dict[str, Any], grace_s: float = 0.0) -> None:
        import time

        if grace_s > 0 and self.signal(handle, hard=False):
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                if self.poll(handle).state is not RunState.RUNNING:
                    break
                time.sleep(0.5)
        self.signal(handle, hard=True)
        self.release(handle)

    def release(self, handle: dict[str, Any]) -> None:
        self._reserved.pop(handle.get("actor", ""), None)
        actor = self._actor(handle)
        if actor is not None:
            try:
                self._connect().kill(actor, no_restart=True)
            except Exception:
                pass

    def close(self) -> None:
        if self._ray is not None and self._ray.is_initialized():
            self._ray.shutdown()
        self._ray = None
