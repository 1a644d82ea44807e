"""URLs fit to print: a connection string's password never reaches a log, an error or ``--json``.

Stdlib only: the state store imports it, and the store must stay stdlib-only (CLI start-up).
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``: what logs, errors and ``--json`` may show."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable URL>"
    if password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
