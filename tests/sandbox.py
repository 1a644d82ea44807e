"""A stand-in for a rented machine that shares nothing with the submitting side.

What a real rented machine has: a base image with Python and the heavy libraries (PyTorch, and
here every other dependency, pinned as ``constraints.txt`` pins them), an empty home, and the
environment its rental request carried. What it lacks: tunefleet, the submitting machine's files,
its checkout, its credentials. So a ``Sandbox`` is:

- a fresh virtualenv made from the base interpreter (no ``--system-site-packages``) whose
  site-packages holds links to the test venv's packages *minus* tunefleet's own entries (its
  dist-info and the editable-install finder): ``import jobs`` fails there until the bootstrap
  installs the shipped wheel;
- its own HOME, TMPDIR and working folder, under a root outside the checkout;
- an environment of exactly what the rental carried, plus what an image itself sets (PATH, and
  ``PIP_NO_INDEX=1``: the "image" has every dependency, so pip must never need the network).

Processes are started with ``start_new_session`` and stopped by PID (their process group).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

_OURS = ("tunefleet", "__editable__", "__editable___tunefleet")


def _link_deps(site: Path) -> None:
    """Link the test venv's packages, without tunefleet, into ``site`` (the image's own
    site-packages: tools such as dill treat modules outside ``sys.prefix`` as user code)."""
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if entry.name.startswith(_OURS) or entry.suffix == ".pth" or entry.name == "__pycache__":
            continue
        (site / entry.name).symlink_to(entry)


class Sandbox:
    """One rented machine (see the module doc)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.home = self.root / "home"
        self.work = self.root / "work"
        self.tmp = self.root / "tmp"
        for d in (self.home, self.work, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self.venv = self.root / "image-python"
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", "--without-pip", str(self.venv)], check=True)
        _link_deps(next((self.venv / "lib").glob("python3*/site-packages")))
        self.procs: list[subprocess.Popen] = []

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def env(self, carried: dict[str, str]) -> dict[str, str]:
        """What a process on this machine sees: the image's own variables, then the rental's."""
        image = {
            "PATH": f"{self.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home),
            "TMPDIR": str(self.tmp),
            "LANG": "C.UTF-8",
            "PIP_NO_INDEX": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "HF_HUB_OFFLINE": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        return {**image, **carried}

    def start(self, argv: list[str], carried: dict[str, str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, cwd=self.work, env=self.env(carried), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def kill(self) -> None:
        """SIGKILL every process this sandbox started (by process group), as a reclaimed host does."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=30)
