"""What every ``tunefleet`` command shares: the Typer app, the consoles, the error that sets the exit
code, and the few helpers that read config, the store and job files. Stdlib, typer and rich only:
the CLI must start fast."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from infra.config import Config, ConfigError, load_config

app = typer.Typer(
    name="tunefleet",
    help="Run LLM fine-tuning jobs on the cheapest capacity that can do them, and survive preemption.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


class CliError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _config() -> Config:
    try:
        return load_config()
    except ConfigError as exc:
        raise CliError(str(exc), 2) from None


def _store(config: Config):
    from orchestrator.store import Store

    config.home.mkdir(parents=True, exist_ok=True)
    return Store(config.database)


def _emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=1, default=str) + "\n")


def _job_id(store, prefix: str) -> str:
    from orchestrator.store import JobNotFound

    try:
        return store.resolve_job_id(prefix)
    except JobNotFound as exc:
        raise CliError(str(exc)) from None


# ---------------------------------------------------------------- validate / submit
def _load(path: Path):
    """The one validation pass of ``validate``, ``submit``, ``estimate`` and ``offers``: the job
    file, what it points at (datasets read line by line, the model's modules), known providers, a
    deadline still ahead. Warnings (examples that will be cut or dropped) go to stderr."""
    import time

    from jobs.spec import JobFileError, load_job_file
    from providers.registry import PROVIDERS

    warnings: list[str] = []
    try:
        spec = load_job_file(path, known_providers=PROVIDERS, now=time.time(), warnings=warnings)
    except JobFileError as exc:
        n = len(exc.problems)
        raise CliError(f"{path}: {n} problem{'s' if n != 1 else ''}; nothing was queued\n{exc}", 2) from None
    for line in warnings:
        err.print(f"[yellow]warning[/]: {path}: {_escape(line)}", highlight=False)
    return spec


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)



def _check_store(uri: str) -> None:
    """An S3 checkpoint store must exist and take our writes before a job that needs it is queued."""
    if not uri.startswith("s3://"):
        return
    from infra.storage import StorageError, is_permanent, open_store

    try:
        open_store(uri).probe()
    except StorageError as exc:
        raise CliError(f"checkpoint.store {uri}: {exc}; nothing was queued", 2 if is_permanent(exc) else 1) from None
