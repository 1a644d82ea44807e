"""One job on several devices of one machine: how many processes, how each splits the batch, how
they start, agree and end.

Why a launcher of our own rather than ``torchrun``: the payload's contract with the orchestrator
(exit codes, SIGTERM means "save and leave", ``progress.json`` written last) must hold for the
whole gang. ``torchrun`` gives its workers 30 s after a signal before it kills them, which is
shorter than a large checkpoint's save, and it reports only that "a worker failed". Here:

- :func:`plan` (pure) decides the process count and each process's micro batch and accumulation so
  that the *global* batch (``JobSpec.global_batch``: micro batch x accumulation x the GPUs the job
  asked for) is the same on any process count: a job resumed on 1 process after 2, or on 4 after
  2, takes the same optimizer steps over the same examples. When it cannot (the global batch does
  not divide), it refuses with the reason (:class:`PlanError`, exit 3: another machine may fit).
- :func:`launch` starts one ``python -m jobs.train`` per rank with the ``torch.distributed``
  environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT`` on 127.0.0.1), forwards SIGTERM
  to every rank with no deadline of its own (the provider's grace period is the deadline), and
  turns the ranks' exit codes into one: rank 0's, unless another rank failed first (its code and
  error are the cause). Ranks die with the launcher (``PR_SET_PDEATHSIG``).
- :class:`Rank` is what a rank needs: who it is, a barrier, rank 0's object broadcast, and
  :meth:`Rank.agree`, the all-reduce by which every rank stops and saves at the same step, so a
  save stays collective however the signals and the store's stop request reach the ranks.

Only rank 0 talks to the store (progress, uploads, the final commit); the others train and write
their share of each checkpoint (their RNG state, FSDP shards) into the shared work folder.

Backends: gloo on CPU (also how the tests run 2 ranks without a GPU), NCCL for CUDA tensors with
gloo beside it for the small control messages. FSDP (torch's FSDP2 through accelerate) on CPU
needs :func:`enable_cpu_fsdp`: accelerate 1.15 only shards on accelerators and silently falls back
to DDP on CPU.

Imports only the standard library at module level: the launcher must not pay for torch.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.exits import EXIT_FAILED, EXIT_FENCED, EXIT_OK, EXIT_PREEMPTED, EXIT_STOPPED

#: Seconds the other ranks get to notice that one failed (a broken collective) before the
#: launcher stops them: SIGTERM, then SIGKILL after ``KILL_AFTER_S`` more.
FAILURE_GRACE_S = float(os.environ.get("TUNEFLEET_GANG_FAILURE_GRACE_S", "30"))
KILL_AFTER_S = 15.0
#: A collective that waits longer than this is a dead peer, not a slow one (a save, an eval).
COLLECTIVE_TIMEOUT_S = float(os.environ.get("TUNEFLEET_GANG_TIMEOUT_S", "1800"))
_RESUMABLE = (EXIT_OK, EXIT_PREEMPTED, EXIT_STOPPED, EXIT_FENCED)


class PlanError(Exception):
    """The job cannot run on this many processes (the daemon may place it elsewhere)."""


@dataclass(frozen=True)
class Plan:
    """How one attempt runs: ``processes`` ranks, each with ``micro_batch`` examples per forward
    pass and ``accumulation`` passes per optimizer step: micro_batch x accumulation x processes
    == ``global_batch`` always."""

    processes: int
    strategy: str  # single | ddp | fsdp
    micro_batch: int
    accumulation: int
    global_batch: int

    def describe(self) -> str:
        if self.processes == 1:
            return (f"1 process, micro batch {self.micro_batch} x accumulation {self.accumulation} "
                    f"= global batch {self.global_batch}")
        return (f"{self.processes} processes ({self.strategy}), micro batch {self.micro_batch} x accumulation "
                f"{self.accumulation} x {self.processes} = global batch {self.global_batch}")


def plan(spec: Any, device: str, visible_gpus: int = 0, processes: int | None = None) -> Plan:
    """The attempt's plan for ``spec`` on ``device`` ("cuda"/"cpu") with ``visible_gpus`` GPUs.

    Processes: ``processes`` when given (an operator's or a test's override); on CUDA one per GPU the
    job asked for, but no more than are visible; on CPU one, unless the spec names ``ddp`` or
    ``fsdp`` (then as many CPU ranks as GPUs asked for: the gloo stand-in for a GPU machine).
    The micro batch is the spec's, or the largest smaller one that splits the global batch evenly.
    """
    want = spec.world_size
    if processes is not None:
        n = int(processes)
        if n < 1:
            raise PlanError(f"processes must be at least 1, got {n}")
    elif device == "cuda":
        n = max(1, min(want, visible_gpus))
    else:
        n = want if spec.strategy in ("ddp", "fsdp") else 1
    if n == 1:
        strategy = "single"
    else:
        strategy = spec.distributed_strategy
        if strategy == "single":  # an override asked for several processes
            strategy = "ddp" if spec.adapter else "fsdp"
    if strategy == "fsdp" and (spec.load_in_4bit or spec.load_in_8bit):
        raise PlanError("fsdp cannot shard a quantized base: use strategy: ddp")
    g = spec.global_batch
    if g % n:
        raise PlanError(
            f"the job's global batch of {g} examples (micro_batch_size {spec.micro_batch_size} x "
            f"gradient_accumulation_steps {spec.gradient_accumulation_steps} x {spec.world_size} planned "
            f"process(es)) does not split over {n} processes; a machine with a number of GPUs that "
            f"divides {g} can resume it")
    micro = next(m for m in range(min(spec.micro_batch_size, g // n), 0, -1) if (g // n) % m == 0)
    return Plan(processes=n, strategy=strategy, micro_batch=micro, accumulation=g // n // micro, global_batch=g)


# --------------------------------------------------------------------------------------------
# The launcher (parent process)
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def launch(argv: list[str], processes: int, work_dir: Path,
           say=lambda m: print(f"[tunefleet] {m}", file=sys.stderr, flush=True)) -> tuple[int, str | None]:
    """Run ``python -m jobs.train ARGV`` as ``processes`` ranks sharing ``work_dir``; return the
    gang's exit code and the error to report (None when it ended as it should)."""
    gang_dir = work_dir / "gang"
    gang_dir.mkdir(parents=True, exist_ok=True)
    for old in gang_dir.glob("rank-*.json"):
        old.unlink()
    port = _free_port()
    terminated = {"at": None}
    procs: list[subprocess.Popen] = []

    def forward(signum, frame):  # noqa: ARG001
        if terminated["at"] is None:
            terminated["at"] = time.monotonic()
            say(f"SIGTERM: passing it to {len(procs)} ranks")
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        for rank in range(processes):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(processes),
                       RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(processes),
                       TUNEFLEET_GANG_DIR=str(gang_dir))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "jobs.train", *argv, "--work-dir", str(work_dir),
                 "--processes", str(processes)],
                env=env, preexec_fn=_die_with_parent))
        say(f"started {processes} ranks (pids {', '.join(str(p.pid) for p in procs)}), rendezvous 127.0.0.1:{port}")
        return _wait(procs, gang_dir, terminated, say)
    finally:
        for p in procs:  # never leave a rank behind
            if p.poll() is None:
                p.kill()
                p.wait()
        signal.signal(signal.SIGTERM, previous)


def _wait(procs: list[subprocess.Popen], gang_dir: Path, terminated: dict, say) -> tuple[int, str | None]:
    first_failure: tuple[int, int] | None = None  # (rank, code) of the first rank that failed
    failed_at: float | None = None
    stopping = False
    while True:
        codes = [p.poll() for p in procs]
        for rank, code in enumerate(codes):
            if code is not None and code not in _RESUMABLE and first_failure is None:
                first_failure, failed_at = (rank, code), time.monotonic()
                say(f"rank {rank} exited {code}; the others get {FAILURE_GRACE_S:.0f} s to stop")
        if all(c is not None for c in codes):
            break
        if failed_at is not None and not stopping and time.monotonic() - failed_at > FAILURE_GRACE_S:
            stopping = True
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        if stopping and time.monotonic() - failed_at > FAILURE_GRACE_S + KILL_AFTER_S:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    codes = [p.returncode for p in procs]
    reports = [_read_report(gang_dir, r) for r in range(len(procs))]
    code, error = codes[0], reports[0].get("error")
    if code not in _RESUMABLE and first_failure is not None and first_failure[0] != 0:
        rank = first_failure[0]
        code, error = first_failure[1], reports[rank].get("error") or f"rank {rank} exited {first_failure[1]}"
        error = f"rank {rank}: {error}"
    if code < 0:  # killed by a signal
        error = error or f"rank 0 killed by signal {-code}"
        code = EXIT_FAILED
    if terminated["at"] is not None and code not in (EXIT_OK, EXIT_PREEMPTED, EXIT_STOPPED, EXIT_FENCED):
        say(f"ranks ended {codes} while being preempted: reporting preempted (the last committed checkpoint stands)")
        code, error = EXIT_PREEMPTED, None
    return code, error


def _read_report(gang_dir: Path, rank: int) -> dict[str, Any]:
    try:
        return json.loads((gang_dir / f"rank-{rank}.json").read_text())
    except (OSError, ValueError):
        return {}


def write_report(code: int, error: str | None) -> None:
    """A rank's last word for the launcher: its exit code and error (rank-N.json)."""
    gang_dir = os.environ.get("TUNEFLEET_GANG_DIR")
    if not gang_dir:
        return
    path = Path(gang_dir) / f"rank-{os.environ.get('RANK', '0')}.json"
    try:
        path.write_text(json.dumps({"code": code, "error": error}))
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# Inside a rank
# --------------------------------------------------------------------------------------------


class Rank:
    """This process's place in the gang. With one process every method is a no-op."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1")) if os.environ.get("TUNEFLEET_GANG_DIR") else 1
        self.rank = int(os.environ.get("RANK", "0")) if self.world > 1 else 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0")) if self.world > 1 else 0
        self.main = self.rank == 0
        self._control = None  # the process group that carries control messages (gloo)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def init(self, device: str) -> None:
        """Join the gang (before accelerate looks: it reuses an initialized process group)."""
        if not self.distributed:
            return
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        if device == "cuda":
            torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend="cpu:gloo,cuda:nccl", init_method="env://", timeout=timeout,
                                    device_id=torch.device("cuda", self.local_rank))
        else:
            dist.init_process_group(backend="gloo", init_method="env://", timeout=timeout)
            _load_onto_indexed_cpu()
        self._control = dist.group.WORLD

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self._control)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj``, on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag true on every rank if it is true on any: the gang stops (or saves) together."""
        if not self.distributed:
            return tuple(bool(f) for f in flags)
        import torch
        import torch.distributed as dist

        t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control)
        return tuple(bool(v) for v in t.tolist())

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _load_onto_indexed_cpu() -> None:
    """Let ``torch.load(map_location="cpu:N")`` work. A CPU rank's Trainer device is ``cpu:N``,
    and resuming loads the optimizer state onto it, which torch's own deserializers refuse ("don't
    know how to restore data location ... cpu:0"): a DDP gang on CPU could not resume."""
    import torch.serialization as ser

    def restore(storage, location: str):
        return storage if location.startswith("cpu:") else None

    if not getattr(ser, "_tunefleet_indexed_cpu", False):
        ser.register_package(99, lambda obj: None, restore)
        ser._tunefleet_indexed_cpu = True


def enable_cpu_fsdp() -> None:
    """Let accelerate run FSDP2 over gloo on CPU: it only shards on accelerators and otherwise falls
    back to DDP without a word, so a CPU gang would not test the sharded path at all. The
    accelerator state keeps the FSDP plugin it was given (``Accelerator.prepare`` then wraps the
    model with torch's ``fully_shard``)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState, "_tunefleet_cpu_fsdp", False):
        return
    original_init = AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    AcceleratorState.__init__ = init
    AcceleratorState._tunefleet_cpu_fsdp = True


def full_state_dict(model: Any, device: str) -> dict[str, Any]:
    """The unsharded weights of an FSDP model, gathered on every rank (a collective), as CPU tensors
    of their own. On CUDA they are offloaded as they are gathered; on CPU that "offload" is a no-op
    and the tensors would alias all-gather buffers FSDP frees at once (safetensors then fails with
    "invalid python storage"), so they are copied."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    on_cuda = device == "cuda"
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=on_cuda))
    return full if on_cuda else {k: v.detach().clone() for k, v in full.items()}
