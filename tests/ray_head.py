"""A real ``ray start --head`` on 127.0.0.1 for a test, stopped by what the test started.

Ray's own forced stop would end every Ray on the machine, a user's own cluster included. Here the
head is started in a process group of its own, and stopped by signalling that group and any
process whose command line names this head's temp folder: nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(*, num_cpus: int, num_gpus: int, prefix: str = "tfray") -> Iterator[str]:
    """Yields the head's address ``127.0.0.1:PORT``."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    temp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths have a length limit
    port = _free_port()
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={num_cpus}",
         f"--num-gpus={num_gpus}", "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed ({proc.returncode}):\n{out[-3000:]}")
        yield f"127.0.0.1:{port}"
    finally:
        _stop(proc.pid, temp)
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


def _ours(temp: str) -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if temp in " ".join(p.info["cmdline"] or ()):
                found.append(p)
    return found


def _stop(pgid: int, temp: str) -> None:
    """SIGTERM to the head's process group and to every process naming its temp folder, then
    SIGKILL to whatever is left after 5 s (only test heads: nothing of theirs needs longer)."""
    import psutil

    procs = _ours(temp)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    for p in alive + _ours(temp):
        with contextlib.suppress(psutil.Error):
            p.kill()
    deadline = time.monotonic() + 10
    while _ours(temp) and time.monotonic() < deadline:
        time.sleep(0.2)
