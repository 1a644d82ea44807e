"""``tunefleet login [URL] [--token T]`` and ``tunefleet logout``: the team server this CLI talks to.

``login`` checks the token with ``GET /api/v1/whoami`` before it stores anything, then writes the
URL and token to ``$TUNEFLEET_HOME/credentials.json``, created with mode 0600 (never readable by
others, not even for a moment). ``TUNEFLEET_SERVER`` and ``TUNEFLEET_TOKEN`` win over it.
``logout`` deletes the file; commands then use this machine's store again (unless the environment
names a server).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from orchestrator.cli_base import CliError, _escape, app, console, err


@app.command()
def login(
    url: Annotated[str | None, typer.Argument(help="The server, e.g. https://tunefleet.example.com "
                                                   "(default: $TUNEFLEET_SERVER).")] = None,
    token: Annotated[str | None, typer.Option(help="API token (default: $TUNEFLEET_TOKEN, else asked for, "
                                                   "not echoed).")] = None,
) -> None:
    """Check an API token against a team server and remember both for every command."""
    from orchestrator.client import Client, normalize_url, save_login

    url = url or os.environ.get("TUNEFLEET_SERVER", "").strip()
    if not url:
        raise CliError("usage: tunefleet login URL [--token TOKEN] (or set TUNEFLEET_SERVER)", 2)
    url = normalize_url(url)
    token = (token or os.environ.get("TUNEFLEET_TOKEN", "")).strip()
    if not token:
        if not sys.stdin.isatty():
            raise CliError("no token: pass --token, set TUNEFLEET_TOKEN, or run tunefleet login in a terminal", 2)
        import getpass

        token = getpass.getpass("API token: ").strip()
        if not token:
            raise CliError("no token given; nothing was stored", 2)
    me = Client(url, token).request("GET", "/whoami")
    path = save_login(url, token)
    console.print(f"logged in to {_escape(url)} as {_escape(str(me.get('name')))} "
                  f"({_escape(str(me.get('role')))}, team {_escape(str(me.get('team')))})", highlight=False)
    err.print(f"credentials in {_escape(str(path))} (mode 0600)", highlight=False)


@app.command()
def logout() -> None:
    """Forget the stored login: commands use this machine's store again."""
    from orchestrator.client import credentials_path, forget_login

    if forget_login():
        console.print(f"logged out (removed {_escape(str(credentials_path()))})", highlight=False)
    else:
        console.print("not logged in")
    if os.environ.get("TUNEFLEET_SERVER"):
        err.print("note: TUNEFLEET_SERVER is still set; commands still go to that server", highlight=False)
