"""``tunefleet``: the command line. Starts fast: torch, Ray and SkyPilot are imported only by the
commands that need them (``daemon``, ``demo``). Every command that prints a table takes ``--json``.

Exit codes: 0 ok; 1 operational error (unknown job, invalid transition, locked daemon);
2 bad input (invalid job file, bad config). Errors never change the queue.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from orchestrator.cli_base import (
    CliError,
    JsonOpt,
    _check_store,
    _config,
    _emit_json,
    _escape,
    _job_id,
    _load,
    _store,
    app,
    console,
    err,
)
from orchestrator.budget import usd
from orchestrator.client import remote, resolve_job_id
from orchestrator.queue import job_summaries, job_summary, submit_spec, with_eval
from orchestrator.states import JobState

MAX_PRIORITY = 1_000_000  # jobs.spec.MAX_PRIORITY (not imported here: the CLI starts without pydantic models)

# ---------------------------------------------------------------- validate / submit
@app.command()
def validate(job_file: Path, json_out: JsonOpt = False) -> None:
    """Check a job file and report every problem at once (with key paths and lines)."""
    spec = _load(job_file)
    if json_out:
        _emit_json({"valid": True, "spec": spec.to_payload_dict()})
    else:
        console.print(f"[green]ok[/]: {job_file} is a valid {spec.adapter or 'full'} fine-tune of {spec.base_model}")


@app.command()
def submit(
    job_file: Path,
    priority: Annotated[int | None, typer.Option(help="Higher runs first (default: the file's priority).",
                                                 min=-MAX_PRIORITY, max=MAX_PRIORITY)] = None,
    json_out: JsonOpt = False,
) -> None:
    """Validate a job file and queue it. Prints the job id."""
    spec = _load(job_file)
    client = remote()
    if client is not None:
        from orchestrator.client import submit as submit_remote

        # the server's warnings are _load's, already printed
        job_id = submit_remote(client, job_file, spec, priority,
                               lambda files, total: _upload_bar(files, total, json_out))["id"]
    else:
        config = _config()
        _check_store(spec.checkpoint.store or config.default_store)
        with _store(config) as store, _staging(spec, quiet=json_out) as progress:
            job_id = submit_spec(store, spec, config, priority, progress=progress)
    if json_out:
        _emit_json({"id": job_id})
    else:
        console.print(job_id)


@contextlib.contextmanager
def _staging(spec, *, quiet: bool):
    """A progress bar over the bytes ``submit`` uploads (the job's local inputs), when there are
    enough to wait for; the upload's known errors become one line and exit codes (nothing queued)."""
    from infra.storage import StorageError, is_permanent
    from jobs.inputs import InputError, input_bytes

    total = input_bytes(spec.to_payload_dict())
    try:
        if quiet or total < 8 << 20:
            yield None
            return
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        with Progress(TextColumn("uploading inputs {task.description}"), BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), console=err, transient=True) as bar:
            task = bar.add_task("", total=total)
            yield lambda name, n: bar.update(task, advance=n, description=name[-40:])
    except InputError as exc:
        raise CliError(f"{exc}; nothing was queued", 2) from None
    except StorageError as exc:
        raise CliError(f"uploading the job's inputs: {exc}; nothing was queued", 2 if is_permanent(exc) else 1) from None


@contextlib.contextmanager
def _upload_bar(files: int, total: int, quiet: bool):
    """Through a server: a progress bar over the request's bytes when the job's files are 8 MiB or more."""
    if quiet or files < 8 << 20:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(TextColumn("uploading inputs"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("", total=total)
        yield lambda n: bar.update(task, advance=n)


# ---------------------------------------------------------------- status
def _status_table(rows: list[dict[str, Any]]) -> Table:
    colors = {"succeeded": "green", "failed": "red", "running": "cyan", "preempted": "yellow", "cancelled": "dim"}
    cells = []
    for r in rows:
        step = f"{r['step']}/{r['total_steps']}" if r["total_steps"] else str(r["step"])
        cells.append([
            r["id"], r["name"], r["state"], r["provider"] or "-", step,
            f"{r['loss']:.4f}" if r["loss"] is not None else "-", str(r["attempts"]),
            f"{r['elapsed_s']:.0f}s", usd(r['cost_usd']),
        ])
    headers = ("ID", "NAME", "STATE", "PROVIDER", "STEP", "LOSS", "ATT", "ELAPSED", "COST")
    table = Table(box=None, header_style="bold", pad_edge=False)
    for i, col in enumerate(headers):
        width = max([len(col)] + [len(c[i]) for c in cells])
        # every column keeps its full width; only the name is shortened on a narrow terminal
        table.add_column(
            col, justify="right" if i >= 4 else "left", no_wrap=True,
            overflow="ellipsis", min_width=None if col == "NAME" else width,
        )
    for c, r in zip(cells, rows, strict=True):
        c[2] = f"[{colors.get(r['state'], 'white')}]{c[2]}[/]"
        table.add_row(*c)
    return table


@app.command()
def status(
    job: Annotated[str | None, typer.Argument(help="Job id (or a unique prefix). Omit for all jobs.")] = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Live view until the job ends.")] = False,
    limit: Annotated[int, typer.Option(help="Jobs to list (newest first).", min=1, max=100_000)] = 50,
    json_out: JsonOpt = False,
) -> None:
    """Jobs and their progress: state, step/total, loss, attempts, elapsed, cost."""
    client = remote()
    if client is not None:
        return _status_remote(client, job, watch, limit, json_out)
    config = _config()
    with _store(config) as store:
        if job is None:
            rows = job_summaries(store, store.list_jobs(limit=limit))
            if json_out:
                _emit_json(rows)
            elif rows:
                console.print(_status_table(rows), crop=False)
            else:
                console.print("no jobs yet: tunefleet submit JOB.yaml")
            _print_orphans(store.orphans())
            return
        job_id = _job_id(store, job)
        if json_out:
            _emit_json(with_eval(store, job_summary(store, store.get_job(job_id))))
            return
        if not watch:
            summary = with_eval(store, job_summary(store, store.get_job(job_id)))
            console.print(_status_table([summary]), crop=False)
            _print_detail(summary)
            return
        _watch(store, job_id)


def _status_remote(client, job: str | None, watch: bool, limit: int, json_out: bool) -> None:
    if job is None:
        rows = client.request("GET", "/jobs", params={"limit": limit})
        if json_out:
            _emit_json(rows)
        elif rows:
            console.print(_status_table(rows), crop=False)
        else:
            console.print("no jobs yet: tunefleet submit JOB.yaml")
        return
    job_id = resolve_job_id(client, job)
    summary = client.request("GET", f"/jobs/{job_id}")
    if json_out:
        _emit_json(summary)
        return
    if not watch:
        console.print(_status_table([summary]), crop=False)
        _print_detail(summary)
        return
    _watch(None, job_id, lambda: client.request("GET", f"/jobs/{job_id}"))


def _print_orphans(orphans: list[dict[str, Any]]) -> None:
    """Machines the daemon's reconciler found without a live attempt and has not destroyed yet
    (orchestrator.reconcile): they may still bill, so they are said after every job listing."""
    from orchestrator.reconcile import ESCALATE_TRIES, FOREIGN

    if not orphans:
        return
    err.print(f"[red]{len(orphans)} machine{'s' if len(orphans) != 1 else ''} with no live attempt, not destroyed "
              "yet (they may still bill):[/]", highlight=False)
    for o in orphans:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(o["found_at"]))
        if o["last_error"] == FOREIGN:
            state = FOREIGN
        elif o["tries"] >= ESCALATE_TRIES:
            state = f"NEEDS A PERSON: {o['tries']} destroys failed, last: {o['last_error']}"
        else:
            state = f"being destroyed ({o['tries']} tries{': ' + o['last_error'] if o['last_error'] else ''})"
        err.print(f"  {o['provider']} {_escape(o['resource_id'])} (attempt {o['attempt_id'] or '?'}, since {when}): "
                  f"{_escape(state)}", highlight=False)


def _print_detail(s: dict[str, Any]) -> None:
    if s["checkpoint"]:
        console.print(f"checkpoint: step {s['checkpoint_step']} at {s['checkpoint']}")
    if s["adapter_uri"]:
        console.print(f"adapter:    {s['adapter_uri']}")
    if s.get("eval_loss") is not None:
        console.print(f"eval:       loss {s['eval_loss']:.4f}, perplexity {s['perplexity']:.2f}")
    if s["reason"] and s["state"] != "succeeded":
        console.print(f"reason:     {s['reason']}")
    if s.get("wait_until"):
        console.print(f"waiting:    until {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(s['wait_until']))} "
                      f"({s['wait_code']})")


def _watch(store, job_id: str, fetch=None) -> None:
    from rich.live import Live
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), console=console,
    )
    task = progress.add_task(job_id, total=None, info="")
    with Live(progress, console=console, refresh_per_second=4):
        while True:
            s = fetch() if fetch is not None else job_summary(store, store.get_job(job_id))
            loss = f"loss {s['loss']:.4f}" if s["loss"] is not None else ""
            progress.update(
                task, completed=s["step"], total=s["total_steps"],
                description=f"{job_id} [{s['state']}]",
                info=f"{loss} att {s['attempts']} {usd(s['cost_usd'])}",
            )
            if JobState(s["state"]).terminal:
                break
            time.sleep(1.0)
    if fetch is not None:
        s = fetch()
    _print_detail(s)


# ---------------------------------------------------------------- events / logs
@app.command()
def events(job: str, json_out: JsonOpt = False) -> None:
    """The job's timeline: every transition, with its reason and figures."""
    from orchestrator.views import events_view

    client = remote()
    if client is not None:
        rows = client.request("GET", f"/jobs/{resolve_job_id(client, job)}/events")
    else:
        config = _config()
        with _store(config) as store:
            rows = events_view(store, _job_id(store, job))
    if json_out:
        _emit_json(rows)
        return
    table = Table(box=None, header_style="bold")
    for col in ("TIME", "ATTEMPT", "EVENT", "MESSAGE"):
        table.add_column(col, overflow="fold")
    for e in rows:
        table.add_row(time.strftime("%H:%M:%S", time.localtime(e["ts"])), e["attempt_id"] or "", e["kind"], e["message"])
    console.print(table)


@app.command()
def logs(
    job: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
    attempt: Annotated[int | None, typer.Option(help="Attempt number (default: every attempt in order).")] = None,
) -> None:
    """The training payload's output, one log file per attempt."""
    client = remote()
    if client is not None:
        return _logs_remote(client, job, follow, attempt)
    config = _config()
    with _store(config) as store:
        job_id = _job_id(store, job)
        attempts = [a for a in store.attempts_for(job_id) if attempt is None or a.seq == attempt]
        if not attempts and follow and attempt is None:  # a queued job: wait for its first attempt
            err.print(f"{job_id} has not started yet; waiting for its first attempt (Ctrl-C to stop)")
            while not attempts and not store.get_job(job_id).terminal:
                time.sleep(0.5)
                attempts = store.attempts_for(job_id)
        if not attempts:
            raise CliError(f"job {job_id} has no attempt{f' {attempt}' if attempt else ''} yet")
        for a in attempts[:-1] if follow else attempts:
            _print_log(a)
        if not follow:
            return
        last = attempts[-1]
        console.print(f"[bold]--- attempt {last.seq} ({last.provider}) ---[/]")
        path = Path(last.log_path or config.attempt_log(last.id))
        offset = 0
        while True:
            if path.is_file():
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                    offset += len(chunk)
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
            j = store.get_job(job_id)
            latest = store.latest_attempt(job_id)
            if j.terminal and not chunk_pending(path, offset):
                return
            if latest is not None and latest.id != last.id:  # a new attempt started: follow it
                last, offset = latest, 0
                path = Path(last.log_path or config.attempt_log(last.id))
                console.print(f"[bold]--- attempt {last.seq} ({last.provider}) ---[/]")
            time.sleep(0.5)


def _logs_remote(client, job: str, follow: bool, attempt: int | None) -> None:
    """The server's SSE log stream: an ``attempt`` event before each attempt's ``log`` chunks, then ``end``."""
    import json

    job_id = resolve_job_id(client, job)
    params: dict[str, Any] = {"follow": "true" if follow else "false"}
    if attempt is not None:
        params["attempt"] = attempt
    seen = 0
    if follow and attempt is None and not client.request("GET", f"/jobs/{job_id}").get("attempts"):
        err.print(f"{job_id} has not started yet; waiting for its first attempt (Ctrl-C to stop)")
    with client.stream(f"/jobs/{job_id}/logs", params) as events:
        for event, data in events:
            if event == "attempt":
                a = json.loads(data)
                seen += 1
                what = f"{a['provider']}" if follow else f"{a['provider']}, {a['state']}"
                console.print(f"[bold]--- attempt {a['seq']} ({what}) ---[/]")
            elif event == "log":
                sys.stdout.write(data)
                sys.stdout.flush()
            elif event == "end":
                break
    if not seen:
        raise CliError(f"job {job_id} has no attempt{f' {attempt}' if attempt else ''} yet")


def chunk_pending(path: Path, offset: int) -> bool:
    return path.is_file() and path.stat().st_size > offset


def _print_log(a) -> None:
    console.print(f"[bold]--- attempt {a.seq} ({a.provider}, {a.state.value}) ---[/]")
    path = Path(a.log_path) if a.log_path else None
    if path is None or not path.is_file():
        console.print(f"(no log file on this machine for attempt {a.id})")
        return
    sys.stdout.write(path.read_text(errors="replace"))
    sys.stdout.flush()


# ---------------------------------------------------------------- cancel / preempt
@app.command()
def cancel(job: str, json_out: JsonOpt = False) -> None:
    """Cancel a job: at once if queued; a running attempt is stopped by the daemon."""
    from orchestrator.views import ViewError, cancel_job

    client = remote()
    if client is not None:
        job_id = resolve_job_id(client, job)
        out = client.request("POST", f"/jobs/{job_id}/cancel", json_body=None)
    else:
        config = _config()
        with _store(config) as store:
            job_id = _job_id(store, job)
            try:
                out = cancel_job(store, job_id)
            except ViewError as exc:
                raise CliError(exc.message, exc.code) from None
    if json_out:
        _emit_json(out)
    else:
        console.print(f"{job_id}: " + ("cancelled" if out["state"] == JobState.CANCELLED.value else
                                       "cancel requested; the daemon stops the running attempt"))


@app.command()
def preempt(
    job: str,
    hard: Annotated[bool, typer.Option("--hard", help="SIGKILL (no warning) instead of SIGTERM with grace.")] = False,
    attempt: Annotated[int | None, typer.Option(help="Only this attempt (its number in `status`); refused if "
                                                     "another one runs by now.", min=1)] = None,
    json_out: JsonOpt = False,
) -> None:
    """Interrupt a running attempt as a spot reclaim would (drills, demos, tests). Says which attempt."""
    from orchestrator.views import ViewError, preempt_job

    client = remote()
    if client is not None:
        job_id = resolve_job_id(client, job)
        out = client.request("POST", f"/jobs/{job_id}/preempt", json_body={"hard": hard, "attempt": attempt})
    else:
        config = _config()
        with _store(config) as store:
            job_id = _job_id(store, job)
            try:
                out = preempt_job(store, job_id, hard=hard, seq=attempt)
            except ViewError as exc:
                raise CliError(exc.message, exc.code) from None
    if json_out:
        _emit_json(out)
    else:
        console.print(f"{job_id}: {'SIGKILL' if hard else 'SIGTERM'} requested for attempt {out['seq']}; "
                      "the daemon delivers it")


@app.command()
def resume(
    job: str,
    max_usd: Annotated[float | None, typer.Option(help="Raise the job's policy.max_usd to this.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Queue a job stopped by its budget again (from its newest checkpoint), optionally raising its cap."""
    from orchestrator.views import ViewError, resume_job

    client = remote()
    if client is not None:
        job_id = resolve_job_id(client, job)
        out = client.request("POST", f"/jobs/{job_id}/resume", json_body={"max_usd": max_usd})
    else:
        config = _config()
        with _store(config) as store:
            job_id = _job_id(store, job)
            try:
                out = resume_job(store, job_id, max_usd)
            except ViewError as exc:
                raise CliError(exc.message, exc.code) from None
    if json_out:
        _emit_json(out)
    else:
        console.print(f"{job_id}: queued again; it resumes from its newest checkpoint")


@app.command()
def spend(
    by: Annotated[str, typer.Option(help="Group by: job, sweep, provider or day.")] = "job",
    json_out: JsonOpt = False,
) -> None:
    """The spend ledger: what was paid, by job, sweep, provider or day, against the monthly budget."""
    from orchestrator.views import ViewError, spend_view

    client = remote()
    if client is not None:
        summary = client.request("GET", "/spend", params={"by": by})
    else:
        config = _config()
        with _store(config) as store:
            try:
                summary = spend_view(store, config, by)
            except ViewError as exc:
                raise CliError(exc.message, exc.code) from None
    total, month = summary["total_usd"], summary["this_month_usd"]
    if json_out:
        _emit_json(summary)
        return
    table = Table(box=None, header_style="bold")
    table.add_column(by.upper())
    table.add_column("USD", justify="right")
    for g in summary["groups"]:
        table.add_row(g["key"], usd(g["usd"]))
    console.print(table)
    cap = f" of {usd(summary['monthly_budget_usd'])}" if summary["monthly_budget_usd"] is not None else ""
    console.print(f"total {usd(total)}; this month {usd(month)}{cap}")


@app.command()
def sweep(
    target: Annotated[str, typer.Argument(help="SWEEP.yaml to start a sweep, or 'status'.")],
    sweep_id: Annotated[str | None, typer.Argument(help="With 'status': the sweep id (or a prefix).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Start a cost-capped sweep (tunefleet sweep SWEEP.yaml), or show its leaderboard (tunefleet sweep status ID)."""
    from orchestrator.queue import submit_sweep, sweep_summary
    from orchestrator.store import StoreError
    from orchestrator.sweep import SweepError, load_sweep

    client = remote()
    if target == "status" and not sweep_id:
        raise CliError("usage: tunefleet sweep status SWEEP_ID", 2)
    if client is not None:
        from orchestrator.client import resolve_sweep_id, sweep_submission

        if target == "status":
            summary = client.request("GET", f"/sweeps/{resolve_sweep_id(client, sweep_id)}")
            if json_out:
                _emit_json(summary)
            else:
                _print_sweep(summary)
            return
        try:
            load_sweep(Path(target))  # the same messages as without a server, before anything is sent
        except SweepError as exc:
            raise CliError(f"{exc}\nnothing was queued", 2) from None
        new_id = client.request("POST", "/sweeps", json_body=sweep_submission(Path(target)))["id"]
        if json_out:
            _emit_json({"id": new_id})
        else:
            console.print(new_id)
        return
    config = _config()
    with _store(config) as store:
        if target == "status":
            try:
                summary = sweep_summary(store, sweep_id)
            except StoreError as exc:
                raise CliError(str(exc)) from None
            if json_out:
                _emit_json(summary)
                return
            _print_sweep(summary)
            return
        _check_store(config.default_store)
        from infra.storage import StorageError, is_permanent
        from jobs.inputs import InputError

        try:
            new_id = submit_sweep(store, Path(target), config)
        except (SweepError, InputError) as exc:
            raise CliError(f"{exc}\nnothing was queued", 2) from None
        except StorageError as exc:
            raise CliError(f"uploading the sweep's inputs: {exc}; nothing was queued",
                           2 if is_permanent(exc) else 1) from None
    if json_out:
        _emit_json({"id": new_id})
    else:
        console.print(new_id)


def _print_sweep(s: dict[str, Any]) -> None:
    table = Table(box=None, header_style="bold")
    for col in ("TRIAL", "PARAMS", "BEST RUNG", "EVAL LOSS", "STEPS", "COST", "LAST RUNG", "STATE"):
        table.add_column(col, justify="right" if col in ("BEST RUNG", "EVAL LOSS", "STEPS", "COST", "LAST RUNG")
                         else "left")
    for r in s["trials"]:  # best rung: the furthest one the trial completed; last: the furthest it reached
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
        table.add_row(str(r["trial"]), params, "-" if r["rung"] is None else str(r["rung"]),
                      f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-",
                      str(r["steps"]), usd(r['cost_usd']), str(r["reached_rung"]), r["state"])
    console.print(table, crop=False)
    if s.get("reason"):
        console.print(f"[yellow]{s['reason']}[/]")
    console.print(f"{s['id']} {s['name']} ({s['state']}) {s['strategy']}, rung {s['rung'] + 1}/{len(s['rungs'])} "
                  f"(steps {s['rungs']}); spent {usd(s['spent_usd'])} of {usd(s['budget_usd'])}")
    if s["best_adapter_uri"]:
        console.print(f"best: {s['best_job_id']} -> {s['best_adapter_uri']}")


@app.command()
def report(
    out: Annotated[Path, typer.Option("--out", help="Where to write the HTML file.")] = Path("tunefleet-report.html"),
) -> None:
    """A self-contained HTML report: loss curves per trial and job, spend against budgets, local usage."""
    from orchestrator.report import build_report

    if out.is_dir():
        raise CliError(f"--out {out} is a folder; give a file name, e.g. {out / 'tunefleet-report.html'}", 2)
    if not out.parent.is_dir():
        raise CliError(f"--out {out}: the folder {out.parent} does not exist; create it first", 2)
    client = remote()
    if client is not None:
        page = client.fetch("/report")
        page = page.decode() if page is not None else ""
    else:
        config = _config()
        with _store(config) as store:
            page = build_report(store, config)
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot write {out}: {exc.strerror}") from None
    console.print(f"wrote {out} ({len(page) // 1024} KiB)")


# ---------------------------------------------------------------- providers / estimate / offers
from orchestrator import cli_offers  # noqa: E402, F401 - registers its commands here, in this order
from orchestrator import cli_pull  # noqa: E402, F401
from orchestrator import cli_admin  # noqa: E402, F401 - `tunefleet admin team|user|token ...`
from orchestrator import cli_server  # noqa: E402, F401 - `tunefleet server`
from orchestrator import cli_login  # noqa: E402, F401 - `tunefleet login|logout`


# ---------------------------------------------------------------- daemon / demo
@app.command()
def daemon(
    until_idle: Annotated[bool, typer.Option("--until-idle", help="Exit when nothing is queued or running.")] = False,
    max_seconds: Annotated[float | None, typer.Option(help="Exit after this long at most.")] = None,
    standby: Annotated[bool, typer.Option(
        "--standby", help="If another daemon runs on this store, wait and take over when it stops or dies "
                          "(a second server replica) instead of exiting.")] = False,
) -> None:
    """Run the queue: place, launch, watch, resume after preemption. SIGTERM stops it in order (exit 0)."""
    import signal
    import threading

    from infra.logging import configure_logging, get_logger
    from orchestrator.daemon import Daemon, LostLeadership, launchable_providers
    from orchestrator.leader import DaemonLocked, daemon_lock, holder_id, wait_for

    if max_seconds is not None and not max_seconds > 0:
        raise CliError(f"--max-seconds must be a positive number of seconds, not {max_seconds}", 2)
    config = _config()
    lock = daemon_lock(config)
    tries = 1
    if standby:
        configure_logging(config.logs_dir / "daemon.log", console=True)
        log = get_logger(component="daemon")
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())

        def waiting(n: int) -> None:
            nonlocal tries
            tries = n + 1
            if n == 1:
                log.info("standby: another daemon holds the lock; trying again every poll interval",
                         store=config.database_shown, poll_interval_s=config.poll_interval_s)

        if not wait_for(lock, stop, config.poll_interval_s, waiting):
            err.print("daemon stopped (standby)")
            return
        log.info("standby: took over the daemon lock", tries=tries)
    else:
        try:
            lock.acquire()
        except DaemonLocked as exc:
            raise CliError(str(exc)) from None
        configure_logging(config.logs_dir / "daemon.log", console=True)
    providers = launchable_providers(config)
    try:
        with _store(config) as store:
            store.set_daemon_leader(holder_id(), tries=tries)
            d = Daemon(store, config, providers)
            for sig in (signal.SIGTERM, signal.SIGINT):  # until the providers open; run() installs them again after
                signal.signal(sig, lambda *_: d.stop.set())
            try:
                d.run(until_idle=until_idle, max_seconds=max_seconds, lock=lock)
            except LostLeadership as exc:
                raise CliError(str(exc)) from None
            finally:
                for p in providers.values():
                    try:
                        p.close()
                    except Exception as exc:  # noqa: BLE001 - closing one provider must not hide the others
                        err.print(f"[yellow]{p.name}[/]: close failed: {exc}")
    finally:
        lock.release()
    err.print("daemon stopped")


@app.command()
def demo(
    hard: Annotated[bool, typer.Option("--hard", help="Interrupt with SIGKILL instead of SIGTERM.")] = False,
    job_file: Annotated[Path | None, typer.Option(help="Job to run (default: the shipped QLoRA example).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Submit the example QLoRA job, preempt it mid-run, let the daemon resume it, and summarize."""
    from orchestrator.demo import run_demo

    config = _config()
    summary = run_demo(config, job_file=job_file, hard=hard, quiet=json_out, console=console)
    if json_out:
        _emit_json(summary)
    if summary["state"] != "succeeded":
        raise CliError(f"demo job ended {summary['state']}: {summary.get('reason')}")


@app.callback()
def _options(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an unexpected error.")] = False,
) -> None:
    """Run LLM fine-tuning jobs on the cheapest capacity that can do them, and survive preemption."""


def main() -> None:
    """Every command's errors end as one line on stderr and the documented exit code: 2 for bad
    input, 1 for an operational error. ``--debug`` (anywhere) shows the traceback instead."""
    from rich.markup import escape

    debug = "--debug" in sys.argv[1:]
    if debug:
        sys.argv = [a for i, a in enumerate(sys.argv) if i == 0 or a != "--debug"]
    try:
        app()
    except CliError as exc:
        err.print(f"[red]error[/]: {escape(str(exc))}", highlight=False)
        sys.exit(exc.code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        from infra.config import ConfigError
        from infra.storage import StorageError
        from orchestrator.store import StoreError

        known = (ConfigError, StorageError, StoreError, OSError)
        what = str(exc) if isinstance(exc, known) else f"internal error: {type(exc).__name__}: {exc}"
        err.print(f"[red]error[/]: {escape(what)} (run with --debug for the traceback)", highlight=False)
        sys.exit(2 if isinstance(exc, ConfigError) else 1)


if __name__ == "__main__":
    main()
