"""What a rented machine needs besides the job: the exact tunefleet the daemon runs, and the one
bootstrap script that installs it there and starts the payload.

Why a wheel of our own: no tunefleet of this version exists on the package index, and a remote
attempt must run the same code (payload, checkpoint format, exit codes) as the daemon that reads
its results. So the daemon builds a wheel from the installed package itself (an editable checkout
or site-packages alike: the files Python imports, not a build of some source tree), addressed by
its content, uploads it with its pins to ``<store>/code/<sha256>/``, and hands the machine
presigned URLs for both. The bootstrap (``bootstrap.sh``) downloads them with the image's own
Python, checks the sha256, installs the wheel on top of the image's PyTorch with the daemon's pins
(``constraints.txt`` without torch), and execs ``python -m jobs.train``. A released version can be
pinned instead (config ``remote_package``); then the machine installs it from the index.

The wheel is deterministic (sorted entries, fixed timestamps): the same code gives the same bytes,
so it is uploaded once per store and reused by every attempt.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import importlib.util
import io
import os
import re
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PACKAGES = ("orchestrator", "providers", "jobs", "infra")
BOOTSTRAP_PATH = Path(__file__).resolve().parent / "bootstrap.sh"
CODE_PREFIX = "code/"
URL_TTL_S = 6 * 3600  # presigned URLs: long enough for a slow image pull and a queue at the host
_NOT_SHIPPED = re.compile(r"^(torch|nvidia-.*|triton|tunefleet)$", re.I)  # the image provides torch
_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class CodeBundle:
    """The wheel and its pins, in memory (a few hundred kB)."""

    wheel_name: str
    wheel: bytes
    wheel_sha256: str
    constraints: bytes
    constraints_sha256: str
    version: str


def bootstrap_script() -> str:
    return BOOTSTRAP_PATH.read_text(encoding="utf-8")


def _package_files() -> list[tuple[str, Path]]:
    files: list[tuple[str, Path]] = []
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"package {pkg} is not importable here")
        root = Path(next(iter(spec.submodule_search_locations)))
        for dirpath, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
            for name in sorted(names):
                if name.endswith((".pyc", ".pyo")) or name.startswith("."):
                    continue
                path = Path(dirpath) / name
                files.append((f"{pkg}/{path.relative_to(root).as_posix()}", path))
    return sorted(files)


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _metadata(version: str) -> tuple[str, str]:
    """(METADATA, entry_points.txt) of the installed distribution, at ``version``."""
    # a checkout also holds setuptools' tunefleet.egg-info (PKG-INFO): prefer the installed METADATA
    dists = sorted(md.distributions(name="tunefleet"), key=lambda d: d.read_text("METADATA") is None)
    if not dists:
        raise RuntimeError("tunefleet is not installed here (pip install -e .)")
    dist = dists[0]
    meta = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    if "Requires-Dist" not in meta:
        raise RuntimeError(f"tunefleet's metadata lists no requirements ({dist}); reinstall it")
    meta = re.sub(r"(?m)^Version: .*$", f"Version: {version}", meta, count=1)
    # the long description (the README) is not needed on a training machine
    head, _, _ = meta.partition("\n\n")
    return head + "\n", dist.read_text("entry_points.txt") or ""


def constraints_text() -> str:
    """The daemon's pins without torch: the project's ``constraints.txt`` when this tunefleet runs
    from a checkout, else the installed versions of tunefleet's own requirements."""
    spec = importlib.util.find_spec("orchestrator")
    checkout = Path(next(iter(spec.submodule_search_locations))).parent / "constraints.txt" if spec else None
    if checkout is not None and checkout.is_file():
        lines = checkout.read_text(encoding="utf-8").splitlines()
    else:
        lines = []
        for req in md.requires("tunefleet") or []:
            name = re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0]
            try:
                lines.append(f"{name}=={md.version(name)}")
            except md.PackageNotFoundError:
                continue
    keep = []
    for line in lines:
        name = re.split(r"[\s<>=!~;\[(]", line.strip(), maxsplit=1)[0]
        if name and not line.lstrip().startswith("#") and not _NOT_SHIPPED.match(name):
            keep.append(line.strip())
    return "\n".join(sorted(set(keep), key=str.lower)) + "\n"


@lru_cache(maxsize=1)
def _bundle_for(key: tuple[tuple[str, int, int], ...]) -> CodeBundle:  # noqa: ARG001 - the cache key
    return _build()


def build_bundle() -> CodeBundle:
    """The wheel of the running tunefleet (rebuilt only when a file changed: size or mtime)."""
    key = tuple((arc, p.stat().st_size, p.stat().st_mtime_ns) for arc, p in _package_files())
    return _bundle_for(key)


def _build() -> CodeBundle:
    files = [(arc, path.read_bytes()) for arc, path in _package_files()]
    content = hashlib.sha256()
    for arc, data in files:
        content.update(f"{arc}\0{len(data)}\0".encode())
        content.update(data)
    base = md.version("tunefleet")
    version = f"{base.split('+')[0]}+c{content.hexdigest()[:12]}"
    dist_info = f"tunefleet-{version}.dist-info"
    meta, entry_points = _metadata(version)
    extra = [(f"{dist_info}/METADATA", meta.encode()),
             (f"{dist_info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: tunefleet\nRoot-Is-Purelib: true\n"
                                    b"Tag: py3-none-any\n")]
    if entry_points:
        extra.append((f"{dist_info}/entry_points.txt", entry_points.encode()))
    entries = files + extra
    record = "".join(f"{arc},{_digest(data)},{len(data)}\n" for arc, data in entries) + f"{dist_info}/RECORD,,\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for arc, data in [*entries, (f"{dist_info}/RECORD", record.encode())]:
            info = zipfile.ZipInfo(arc, date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    wheel = buf.getvalue()
    pins = constraints_text().encode()
    return CodeBundle(wheel_name=f"tunefleet-{version}-py3-none-any.whl", wheel=wheel,
                      wheel_sha256=hashlib.sha256(wheel).hexdigest(), constraints=pins,
                      constraints_sha256=hashlib.sha256(pins).hexdigest(), version=version)


def stage_code(store, bundle: CodeBundle) -> str:
    """Upload the bundle to ``<store>/code/<wheel sha256>/`` unless it is there; its key prefix."""
    prefix = f"{CODE_PREFIX}{bundle.wheel_sha256}/"
    if store.get_bytes(prefix + "READY") is None:
        store.put_bytes(prefix + bundle.wheel_name, bundle.wheel)
        store.put_bytes(prefix + "constraints.txt", bundle.constraints)
        store.put_bytes(prefix + "READY", bundle.version.encode())  # last: the upload is complete
    return prefix


def bootstrap_env(store, bundle: CodeBundle | None, *, package: str | None = None, job_id: str | None = None,
                  ttl_s: int = URL_TTL_S) -> dict[str, str]:
    """The variables ``bootstrap.sh`` reads, for one attempt. They hold presigned URLs (a grant to
    read our code, and to write the job's ``progress.json`` once, for ``ttl_s``): providers pass
    them with the secrets, never in logs. ``job_id``: give the bootstrap a URL to report a setup
    failure through (tunefleet, and so the store client, is not installed yet when it fails)."""
    report = store.presign_put(f"{job_id}/progress.json", ttl_s) if job_id else None
    extra = {"TUNEFLEET_REPORT_URL": report} if report else {}
    if package:
        return {"TUNEFLEET_PACKAGE": package, **extra}
    if bundle is None:
        raise ValueError("no code bundle and no remote_package")
    prefix = stage_code(store, bundle)
    return {
        **extra,
        "TUNEFLEET_WHEEL_URL": store.presign_get(prefix + bundle.wheel_name, ttl_s),
        "TUNEFLEET_WHEEL_SHA256": bundle.wheel_sha256,
        "TUNEFLEET_WHEEL_NAME": bundle.wheel_name,
        "TUNEFLEET_CONSTRAINTS_URL": store.presign_get(prefix + "constraints.txt", ttl_s),
        "TUNEFLEET_CONSTRAINTS_SHA256": bundle.constraints_sha256,
    }
