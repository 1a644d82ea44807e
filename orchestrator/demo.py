"""``tunefleet demo``: the whole spine, end to end, on the embedded default.

Submits the shipped QLoRA example, runs the real daemon (a subprocess, exactly as a user would run
``tunefleet daemon``) on an embedded Ray instance, interrupts the running attempt the way a spot
reclaim would (SIGTERM with grace, or SIGKILL with ``--hard``), lets the daemon resume it from the
newest committed checkpoint, waits for success and summarizes. Every wait has a deadline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from infra.config import Config
from infra.storage import open_store
from orchestrator.leader import daemon_lock
from orchestrator.queue import job_summary, submit_spec
from orchestrator.store import InvalidTransition, Store

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "qlora-tiny.yaml"
DEADLINE_S = 15 * 60


def _start_daemon(config: Config) -> subprocess.Popen | None:
    """Start ``tunefleet daemon --until-idle`` unless one already runs on this home."""
    lock = daemon_lock(config)
    if not lock.try_acquire():
        return None
    lock.release()
    config.logs_dir.mkdir(parents=True, exist_ok=True)
    log = open(config.logs_dir / "demo-daemon.out", "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "daemon", "--until-idle"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=os.environ.copy(),
    )


def run_demo(
    config: Config, *, job_file: Path | None = None, hard: bool = False, quiet: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    from jobs.spec import load_job_file
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    say = (lambda *a: None) if quiet else console.print
    spec = load_job_file(job_file or EXAMPLE)
    config.home.mkdir(parents=True, exist_ok=True)
    store = Store(config.database)
    job_id = submit_spec(store, spec, config)
    say(f"submitted [bold]{job_id}[/] ({spec.display_name}, {spec.adapter or 'full'} on {spec.base_model})")
    daemon = _start_daemon(config)
    say("daemon started (log: {})".format(config.logs_dir / "daemon.log") if daemon else "using the running daemon")

    deadline = time.monotonic() + DEADLINE_S
    interrupt_mode = "SIGKILL" if hard else "SIGTERM"
    requested_at: int | None = None
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), console=console, disable=quiet, transient=False,
    )
    task = progress.add_task("queued", total=None, info="")
    try:
        with progress:
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"demo job {job_id} did not finish within {DEADLINE_S} s")
                job = store.get_job(job_id)
                s = job_summary(store, job)
                progress.update(
                    task, completed=s["step"], total=s["total_steps"],
                    description=f"{job_id} [{s['state']}] attempt {s['attempts']}",
                    info=f"loss {s['loss']:.4f}" if s["loss"] is not None else "",
                )
                if job.terminal:
                    break
                total = job.total_steps or 0
                if requested_at is None and total and job.state.value == "running" and job.step >= total * 0.4:
                    try:
                        store.request_preempt(job_id, hard=hard)
                        requested_at = job.step
                        say(f"step {job.step}: interrupting the attempt with {interrupt_mode}, as a spot reclaim would")
                    except InvalidTransition:
                        pass
                if daemon is not None and daemon.poll() is not None and not job.terminal:
                    raise RuntimeError(
                        f"the daemon exited ({daemon.returncode}) before the job finished; see {config.logs_dir / 'demo-daemon.out'}"
                    )
                time.sleep(0.25)
    finally:
        if daemon is not None:
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.terminate()
                daemon.wait(timeout=30)

    job = store.get_job(job_id)
    attempts = store.attempts_for(job_id)
    ckpt_store = open_store(job.spec["checkpoint"]["store"])
    final = ckpt_store.final(job_id)
    meta = final.meta if final else {}
    history, eval_history = meta.get("history") or [], meta.get("eval_history") or []
    interrupted = next((a for a in attempts if a.state.value == "preempted"), None)
    resumed = next((a for a in attempts if interrupted and a.seq > interrupted.seq), None)
    summary = {
        "job_id": job_id,
        "state": job.state.value,
        "interrupt": interrupt_mode,
        "interrupted_at_step": interrupted.end_step if interrupted else None,
        "resumed_from_step": resumed.start_step if resumed else None,
        "final_step": final.step if final else job.step,
        "checkpoints": [r.step for r in ckpt_store.list_checkpoints(job_id)],
        "first_loss": history[0][1] if history else None,
        "final_loss": meta.get("final_loss"),
        "first_eval_loss": eval_history[0][1] if eval_history else None,
        "eval_loss": meta.get("eval_loss"),
        "adapter_uri": job.adapter_uri,
        "attempts": len(attempts),
        "elapsed_s": job_summary(store, job)["elapsed_s"],
        "reason": job.reason,
    }
    store.close()
    if not quiet:
        loss = summary["final_loss"]
        console.print(
            f"\n[bold]{job_id}[/] {summary['state']}: interrupted ({interrupt_mode}) at step "
            f"{summary['interrupted_at_step']}, resumed from committed checkpoint {summary['resumed_from_step']}, "
            f"finished at step {summary['final_step']}"
            + (f" with loss {loss:.4f}" if isinstance(loss, (int, float)) else "") + "\n"
            + _learned(summary) +
            f"adapter: {summary['adapter_uri']}\n"
            f"checkpoints kept: {summary['checkpoints']}\n"
            f"see the whole story: tunefleet events {job_id}"
        )
    return summary


def _learned(summary: dict[str, Any]) -> str:
    """``train loss A -> B (-x %), eval loss C -> D (-y %)``, first logged value to last, as a line."""
    parts = []
    for what, first, last in (("train loss", summary["first_loss"], summary["final_loss"]),
                              ("eval loss", summary["first_eval_loss"], summary["eval_loss"])):
        if isinstance(first, (int, float)) and isinstance(last, (int, float)) and first > 0:
            parts.append(f"{what} {first:.2f} -> {last:.2f} ({(last - first) / first:+.0%})")
    return ", ".join(parts) + "\n" if parts else ""
