"""Write a SkyPilot schema-v8 catalog by hand, so SkyPilot's own catalog code reads it offline.

Layout (SkyPilot 0.14.1): ``<runtime_dir>/.sky/catalogs/v8/<cloud>/vms.csv`` and
``<runtime_dir>/.sky/catalogs/v8/common/accelerators.csv``. No ``.meta/*.md5`` is written, so
SkyPilot treats the files as user-edited and never re-downloads them.

``GpuInfo`` is a Python-literal dict (SkyPilot parses it with ``ast.literal_eval`` and reads
``Gpus[0].MemoryInfo.SizeInMiB`` for the per-GPU device memory). The RunPod rows reproduce what
SkyPilot's RunPod fetcher really writes: the VRAM in GB in the ``SizeInMiB`` field.

Prices are published on-demand list prices (``shared/reference/providers.md``); spot prices are
typical recent figures and only need to be plausible.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

VMS_HEADER = ["InstanceType", "AcceleratorName", "AcceleratorCount", "vCPUs", "MemoryGiB", "GpuInfo",
              "Price", "SpotPrice", "Region", "AvailabilityZone"]
CLOUD_NAMES = {"aws": "AWS", "lambda": "Lambda", "runpod": "RunPod", "gcp": "GCP", "vast": "Vast"}


def gpu_info(name: str, count: int, size_in_mib: float) -> str:
    """The ``GpuInfo`` cell as SkyPilot's fetchers write it (JSON with single quotes)."""
    gpus = [{"Name": name, "Manufacturer": "NVIDIA", "Count": float(count), "MemoryInfo": {"SizeInMiB": size_in_mib}}]
    return repr({"Gpus": gpus, "TotalGpuMemoryInMiB": size_in_mib * count})


def vm(instance: str, gpu: str, count: int, vcpus: float, mem_gib: float, vram_mib: float,
       price: float, spot: float | None, region: str, zone: str = "") -> dict[str, Any]:
    return {
        "InstanceType": instance, "AcceleratorName": gpu, "AcceleratorCount": float(count), "vCPUs": vcpus,
        "MemoryGiB": mem_gib, "GpuInfo": gpu_info(gpu, count, vram_mib), "Price": price,
        "SpotPrice": "" if spot is None else spot, "Region": region, "AvailabilityZone": zone,
    }


def sample_rows() -> dict[str, list[dict[str, Any]]]:
    """AWS (on-demand + spot), Lambda (no spot) and RunPod (secure + interruptible)."""
    return {
        "aws": [
            vm("g5.xlarge", "A10G", 1, 4, 16, 24576, 1.006, 0.4038, "us-east-1", "use1-az1"),
            vm("g5.xlarge", "A10G", 1, 4, 16, 24576, 1.006, 0.4512, "us-west-2", "usw2-az1"),
            vm("g6.xlarge", "L4", 1, 4, 16, 22888, 0.8048, 0.3219, "us-east-1", "use1-az1"),
            vm("p4d.24xlarge", "A100", 8, 96, 1152, 40960, 32.7726, 12.1178, "us-east-1", "use1-az1"),
            vm("p5.48xlarge", "H100", 8, 192, 2048, 81920, 55.04, None, "us-east-1", "use1-az1"),
        ],
        "lambda": [
            vm("gpu_1x_a10", "A10", 1, 30, 200, 24576, 1.29, None, "us-east-1"),
            vm("gpu_1x_a100_sxm4", "A100", 1, 30, 200, 40960, 1.29, None, "us-east-1"),
            vm("gpu_1x_h100_pcie", "H100", 1, 26, 200, 81920, 3.29, None, "us-west-1"),
            vm("gpu_8x_a100_80gb_sxm4", "A100-80GB", 8, 240, 1800, 81920, 22.32, None, "us-east-1"),
        ],
        "runpod": [
            vm("1x_RTX4090_SECURE", "RTX4090", 1, 6, 41, 24, 0.74, 0.44, "US", "US-TX-3"),
            vm("1x_A100-80GB_SECURE", "A100-80GB", 1, 8, 117, 80, 1.59, 0.99, "US", "US-TX-3"),
        ],
    }


def write_catalog(runtime_dir: Path, rows: dict[str, list[dict[str, Any]]]) -> Path:
    """Write ``vms.csv`` for each cloud in ``rows`` and ``common/accelerators.csv``; return the v8 dir."""
    root = Path(runtime_dir) / ".sky" / "catalogs" / "v8"
    clouds_by_gpu: dict[str, set[str]] = {}
    for cloud, vms in rows.items():
        folder = root / cloud
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "vms.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=VMS_HEADER)
            writer.writeheader()
            for row in vms:
                writer.writerow({k: row.get(k, "") for k in VMS_HEADER})
                clouds_by_gpu.setdefault(row["AcceleratorName"], set()).add(CLOUD_NAMES.get(cloud, cloud))
    (root / "common").mkdir(parents=True, exist_ok=True)
    with open(root / "common" / "accelerators.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["AcceleratorName", "Clouds"])
        for gpu, clouds in sorted(clouds_by_gpu.items()):
            writer.writerow([gpu, repr(sorted(clouds))])
    return root
