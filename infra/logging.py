"""structlog set up once: JSON lines into a file for machines, readable lines on a terminal.

Why: the daemon runs for weeks; its log file must be greppable by job and attempt id
(``log.bind(job_id=..., attempt_id=...)``), while a person at a terminal wants short lines.
Secrets never reach a log: values of keys that look like credentials are masked here, once.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

import structlog

_SECRET_KEY = re.compile(r"(secret|token|password|api_key|apikey|credential|access_key)", re.I)


def _mask_secrets(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in list(event):
        if _SECRET_KEY.search(key):
            event[key] = "***"
    return event


class _Tee:
    """Sends each rendered record to the JSON file and, re-rendered, to the console."""

    def __init__(self, file, console: bool):
        self.file = file
        self.console = console
        self.pretty = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        self.json = structlog.processors.JSONRenderer()

    def __call__(self, logger: Any, name: str, event: dict[str, Any]) -> str:
        if self.file is not None:
            self.file.write(self.json(logger, name, dict(event)) + "\n")
            self.file.flush()
        if self.console:
            return self.pretty(logger, name, event)
        raise structlog.DropEvent


def configure_logging(log_file: Path | None = None, *, console: bool = True, level: int = logging.INFO) -> None:
    fh = None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log_file, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _mask_secrets,
            _Tee(fh, console),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(**bind: Any):
    return structlog.get_logger("tunefleet").bind(**bind)
