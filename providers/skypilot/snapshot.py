"""A shipped, dated snapshot of SkyPilot's own GPU catalog, to quote clouds SkyPilot is not set up for.

Why: without ``$SKY_RUNTIME_DIR/.sky/catalogs/v8/<cloud>/vms.csv`` on this machine (SkyPilot downloads
it on first use, with network access) ``tunefleet offers`` could not say what AWS, GCP, Azure, Lambda
or RunPod would charge. The snapshot answers that offline. Its offers are quotes
(``PriceSource.SNAPSHOT``): the scheduler ranks them and ``orchestrator.decide`` never launches on
them. Once ``sky check`` enables a cloud and its catalog is on disk, ``offers.py`` reads SkyPilot's
catalog for that cloud instead.

File: ``providers/snapshots/skypilot.json``: ``date``/``verified``/``source``/``note`` like the other
snapshots, ``columns``, and per cloud its catalog path and commit and ``rows``, one per (instance
type, region): zones collapse to their region, the spot price is the lowest over its zones. Only GPU
rows whose accelerator ``jobs.gpus`` knows, with at least one whole GPU. ``vram_gib`` is GiB per GPU,
normalised here once: ``GpuInfo``'s ``SizeInMiB / 1024``; RunPod's fetcher writes GB in that field
(so 80 means 80); Azure's ``GpuInfo`` is a bare name, so ``jobs.gpus`` gives it. GCP's catalog prices
a GPU apart from the VM that hosts it: SkyPilot's ``list_accelerators`` adds the host VM's price, and
so does ``build`` here (same region), naming the row after the host VM.

``build`` turns catalog files (SkyPilot's own CSV format) into the snapshot; with network access,
point it at a checkout of the public skypilot-catalog repository (or ``~/.sky/catalogs/v8``) to
refresh it: ``python -m providers.skypilot.snapshot CATALOG_DIR OUT.json --date YYYY-MM-DD``.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from jobs.gpus import GPUS, canonical_gpu

SNAPSHOT_PATH = Path(__file__).resolve().parent.parent / "snapshots" / "skypilot.json"
CLOUDS = ("aws", "gcp", "azure", "lambda", "runpod")
COLUMNS = ["instance_type", "accelerator", "count", "vcpus", "memory_gib", "vram_gib", "price", "spot_price",
           "region"]
# GCP: the VM that carries N of a GPU (SkyPilot's fixed pairing for GPUs sold with their VM).
GCP_HOSTS: dict[str, dict[int, str]] = {
    "A100": {n: f"a2-highgpu-{n}g" for n in (1, 2, 4, 8)} | {16: "a2-megagpu-16g"},
    "A100-80GB": {n: f"a2-ultragpu-{n}g" for n in (1, 2, 4, 8)},
    "H100": {n: f"a3-highgpu-{n}g" for n in (1, 2, 4, 8)},
    "H100-MEGA": {8: "a3-megagpu-8g"},
    "H200": {8: "a3-ultragpu-8g"},
    "L4": {1: "g2-standard-4", 2: "g2-standard-24", 4: "g2-standard-48", 8: "g2-standard-96"},
}

Row = tuple[str, str, float, float | None, float | None, float, float, float | None, str]


class SnapshotError(Exception):
    """The snapshot file is missing or malformed (the message says which and why)."""


@dataclass(frozen=True)
class Snapshot:
    date: str
    verified: str | None
    source: str
    rows: dict[str, tuple[Row, ...]]  # cloud -> rows in COLUMNS order
    commits: dict[str, str]

    def clouds(self) -> list[str]:
        return sorted(c for c, rows in self.rows.items() if rows)


def _num(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


@lru_cache(maxsize=4)
def _load(path: str, mtime: float) -> Snapshot:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        if raw.get("columns") != COLUMNS:
            raise ValueError(f"columns are {raw.get('columns')}, expected {COLUMNS}")
        rows: dict[str, tuple[Row, ...]] = {}
        commits: dict[str, str] = {}
        for cloud, entry in raw["clouds"].items():
            commits[cloud] = str(entry.get("commit", ""))
            rows[cloud] = tuple(
                (str(r[0]), str(r[1]), float(r[2]), _num(r[3]), _num(r[4]), float(r[5]), float(r[6]), _num(r[7]),
                 str(r[8]))
                for r in entry["rows"])
        return Snapshot(date=str(raw["date"]), verified=raw.get("verified"), source=str(raw["source"]), rows=rows,
                        commits=commits)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise SnapshotError(f"SkyPilot catalog snapshot {path} is unreadable: {type(exc).__name__}: {exc}") from exc


def load_snapshot(path: Path | None = None) -> Snapshot:
    """The parsed snapshot (default ``SNAPSHOT_PATH``), read once per file version (cached);
    SnapshotError if unusable."""
    path = SNAPSHOT_PATH if path is None else path
    try:
        mtime = path.stat().st_mtime
    except OSError as exc:
        raise SnapshotError(f"SkyPilot catalog snapshot {path} is missing: {exc}") from exc
    return _load(str(path), mtime)


# ---- building the snapshot from SkyPilot's catalog files ----
def vram_gib(accelerator: str, gpu_info: str | None) -> float | None:
    """GiB per GPU from a ``GpuInfo`` cell, else ``jobs.gpus``; None if neither knows."""
    size = None
    if gpu_info:
        try:
            info = ast.literal_eval(gpu_info)
            size = _num(info["Gpus"][0]["MemoryInfo"]["SizeInMiB"])
        except (ValueError, SyntaxError, KeyError, IndexError, TypeError):
            size = None
    if size is not None and size >= 1024:
        return round(size / 1024.0, 1)
    if size is not None and size > 0:  # RunPod's fetcher: GB written in SizeInMiB
        return round(size, 1)
    info_ = GPUS.get(canonical_gpu(accelerator))
    return float(info_.vram_gb) if info_ else None


def _known(accelerator: str, vram: float | None) -> bool:
    return canonical_gpu(accelerator, vram) in GPUS and canonical_gpu(accelerator, vram) != "cpu"


def _merge(out: dict[tuple[str, str], list[Any]], row: list[Any]) -> None:
    """Zones collapse to the region: one row per (instance, region), the lowest prices over zones."""
    key = (row[0], row[8])
    have = out.get(key)
    if have is None:
        out[key] = row
        return
    have[6] = min(have[6], row[6])
    spots = [s for s in (have[7], row[7]) if s is not None]
    have[7] = min(spots) if spots else None


def rows_from_csv(cloud: str, path: Path) -> list[list[Any]]:
    """Snapshot rows from one SkyPilot ``vms.csv`` (any column order; GCP joins GPU and host VM rows)."""
    with open(path, newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    out: dict[tuple[str, str], list[Any]] = {}
    vms: dict[tuple[str, str], tuple[float, float | None, float | None, float | None]] = {}
    if cloud == "gcp":
        for r in table:
            if r.get("InstanceType") and not r.get("AcceleratorName"):
                price, spot = _num(r.get("Price")), _num(r.get("SpotPrice"))
                key = (r["InstanceType"], r["Region"])
                if price is not None and (key not in vms or price < vms[key][0]):
                    old_spot = vms.get(key, (0, None, None, None))[1]
                    spots = [s for s in (spot, old_spot) if s is not None]
                    vms[key] = (price, min(spots) if spots else None, _num(r.get("vCPUs")), _num(r.get("MemoryGiB")))
    for r in table:
        acc = (r.get("AcceleratorName") or "").strip()
        count, price, spot = _num(r.get("AcceleratorCount")), _num(r.get("Price")), _num(r.get("SpotPrice"))
        if not acc or count is None or count < 1 or price is None or price <= 0:
            continue
        vram = vram_gib(acc, r.get("GpuInfo"))
        if vram is None or not _known(acc, vram):
            continue
        instance, vcpus, mem = r.get("InstanceType") or "", _num(r.get("vCPUs")), _num(r.get("MemoryGiB"))
        if cloud == "gcp" and not instance:
            host = GCP_HOSTS.get(acc, {}).get(int(count))
            vm = vms.get((host, r["Region"])) if host else None
            if vm is None:
                continue  # a GPU whose host VM price is unknown here: its total is unknown
            instance, vcpus, mem = host, vm[2], vm[3]
            price = price + vm[0]
            spot = spot + vm[1] if spot is not None and vm[1] is not None else None
        spot = spot if spot is not None and spot > 0 else None
        _merge(out, [instance, acc, float(count), vcpus, mem, vram, round(price, 6),
                     None if spot is None else round(spot, 6), r["Region"]])
    return sorted(out.values(), key=lambda x: (x[0], x[8]))


def build(catalog_dir: Path, *, date: str, source: str, note: str, commits: dict[str, str] | None = None,
          paths: dict[str, str] | None = None, clouds: tuple[str, ...] = CLOUDS) -> dict[str, Any]:
    """The snapshot document for ``<catalog_dir>/<cloud>/vms.csv`` of each cloud present."""
    doc: dict[str, Any] = {"verified": date, "source": source, "date": date, "note": note, "columns": COLUMNS,
                           "clouds": {}}
    for cloud in clouds:
        path = Path(catalog_dir) / cloud / "vms.csv"
        if path.is_file():
            doc["clouds"][cloud] = {"catalog": (paths or {}).get(cloud, f"catalogs/v8/{cloud}/vms.csv"),
                                    "commit": (commits or {}).get(cloud, ""), "rows": rows_from_csv(cloud, path)}
    return doc


def dump(doc: dict[str, Any]) -> str:
    """Compact JSON: one line per row, so diffs of a refresh stay readable."""
    head = {k: v for k, v in doc.items() if k != "clouds"}
    lines = ["{"] + [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()] + [' "clouds": {']
    clouds = list(doc["clouds"].items())
    for i, (cloud, entry) in enumerate(clouds):
        lines.append(f"  {json.dumps(cloud)}: {{\"catalog\": {json.dumps(entry['catalog'])}, "
                     f"\"commit\": {json.dumps(entry['commit'])}, \"rows\": [")
        rows = entry["rows"]
        lines += [f"   {json.dumps(r, separators=(',', ':'))}{',' if j < len(rows) - 1 else ''}"
                  for j, r in enumerate(rows)]
        lines.append("  ]}" + ("," if i < len(clouds) - 1 else ""))
    lines += [" }", "}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m providers.skypilot.snapshot", description=__doc__.split("\n")[0])
    ap.add_argument("catalog_dir", type=Path, help="folder holding <cloud>/vms.csv (e.g. catalogs/v8)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--date", required=True, help="when the catalog files were published (YYYY-MM-DD)")
    ap.add_argument("--source", default="SkyPilot's public catalog (skypilot-catalog repository, schema v8)")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    args.out.write_text(dump(build(args.catalog_dir, date=args.date, source=args.source, note=args.note)),
                        encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
