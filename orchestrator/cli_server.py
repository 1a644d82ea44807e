"""``tunefleet server``: the team server (the dashboard and the HTTP API on uvicorn) over this
machine's store; ``tunefleet dashboard``: the same for one person, with a login made for them.

By default it also runs the daemon beside it, as a child process it starts and stops with itself
(the daemon is the one loop that places and watches; ``--no-daemon`` when it runs elsewhere against
the same store). TLS: uvicorn's own ``--ssl-certfile``/``--ssl-keyfile``, or a reverse proxy in
front (then keep the default ``--host 127.0.0.1``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli_base import CliError, _config, _store, app, err

DAEMON_STOP_S = 60.0


@app.command()
def server(
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8477,
    daemon: Annotated[bool, typer.Option("--daemon/--no-daemon", help="Run the daemon beside the server.")] = True,
    max_body_mb: Annotated[int, typer.Option(help="Largest request body (a job with its files), MiB.",
                                             min=1, max=4096)] = 64,
    rate: Annotated[float, typer.Option(help="Requests a second per token (0: no limit).", min=0)] = 20.0,
    burst: Annotated[int, typer.Option(help="Requests at once per token.", min=1)] = 40,
    ssl_certfile: Annotated[Path | None, typer.Option(help="Serve HTTPS with this certificate (PEM).")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="...and this private key (PEM).")] = None,
) -> None:
    """Serve the dashboard (/) and the API (/api/v1, /openapi.json, /healthz, /metrics) to the team, behind tokens."""
    _serve(host, port, daemon, max_body_mb, rate, burst, ssl_certfile, ssl_keyfile)


@app.command()
def dashboard(
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8477,
    daemon: Annotated[bool, typer.Option("--daemon/--no-daemon", help="Run the daemon beside the server.")] = True,
) -> None:
    """The dashboard on this machine's store, for one person: makes a local admin account if there is
    none, prints a login token valid for 12 hours, and serves (as `tunefleet server`)."""
    import time

    config = _config()
    with _store(config) as store:
        admins = [u for u in store.list_users() if u.role == "admin" and not u.disabled]
        if admins:
            name = admins[0].name
        else:
            if "local" not in {t["name"] for t in store.list_teams()}:
                store.create_team("local")
            name = "admin" if "admin" not in {u.name for u in store.list_users()} else "local-admin"
            store.create_user(name, "local", "admin")
        _, token = store.create_token(name, expires_at=time.time() + 12 * 3600, note="tunefleet dashboard login")
    err.print(f"open http://{host}:{port}/login and paste this token (user {name}, valid 12 h): ")
    print(token, flush=True)
    _serve(host, port, daemon, 64, 20.0, 40, None, None)


def _serve(host: str, port: int, daemon: bool, max_body_mb: int, rate: float, burst: int,
           ssl_certfile: Path | None, ssl_keyfile: Path | None) -> None:
    import uvicorn

    from orchestrator.api.app import create_app

    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise CliError("give both --ssl-certfile and --ssl-keyfile, or neither", 2)
    config = _config()
    with _store(config) as store:
        api = create_app(config, store, max_body_bytes=max_body_mb << 20, rate=rate, burst=burst)
        child = _start_daemon() if daemon else None
        scheme = "https" if ssl_certfile else "http"
        err.print(f"tunefleet server on {scheme}://{host}:{port} (store {config.database_shown}; daemon "
                  f"{'pid ' + str(child.pid) if child else 'not started here'})")
        try:
            uvicorn.run(api, host=host, port=port, log_level="info", access_log=True,
                        ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
                        ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None)
        finally:
            if child is not None:
                _stop_daemon(child)


def _start_daemon() -> subprocess.Popen:
    """``tunefleet daemon --standby``: with a second replica on the same store, this one's daemon
    waits to take over. It gets SIGTERM (and stops in order) if the server dies without stopping it."""
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "daemon", "--standby"], env=os.environ.copy(),
                            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the daemon outlives a killed server; stop it by its pid


def _stop_daemon(child: subprocess.Popen) -> None:
    """SIGTERM (the daemon stops in order), then SIGKILL past ``DAEMON_STOP_S``."""
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout=DAEMON_STOP_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
