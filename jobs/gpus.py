"""GPU models: canonical names, VRAM, and training speed relative to an A100.

Why one table: every provider spells GPUs its own way ("RTX 4090", "RTX_4090", "A100-80GB",
"A100 SXM4", "NVIDIA H100 80GB HBM3"), and the estimator and scheduler must compare them. Each
provider maps its raw name through ``canonical_gpu`` once, at the edge.

Relative throughput is for LLM fine-tuning (bf16 tensor throughput and memory bandwidth), from
published figures (``../shared/reference/training.md``): H100 ~2-3x A100; RTX 4090 ~0.5-0.7x;
L4 / A10G ~0.25-0.35x. Calibrate with measured runs when they exist (see ``jobs.estimate``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuModel:
    name: str
    vram_gb: float
    rel_speed: float  # training throughput relative to A100-80GB = 1.0


GPUS: dict[str, GpuModel] = {
    g.name: g
    for g in (
        GpuModel("H200", 141, 2.6),
        GpuModel("H100", 80, 2.4),
        GpuModel("A100-80GB", 80, 1.0),
        GpuModel("A100", 40, 0.95),
        GpuModel("L40S", 48, 0.85),
        GpuModel("A6000", 48, 0.55),
        GpuModel("RTX4090", 24, 0.6),
        GpuModel("RTX3090", 24, 0.4),
        GpuModel("A10G", 24, 0.3),
        GpuModel("A10", 24, 0.3),
        GpuModel("L4", 24, 0.28),
        GpuModel("V100", 16, 0.25),
        GpuModel("T4", 16, 0.12),
        GpuModel("cpu", 0, 0.002),
    )
}

_ALIASES = {
    "H100SXM": "H100", "H100PCIE": "H100", "H100NVL": "H100", "H10080GB": "H100", "H100SXM5": "H100",
    "A100SXM4": "A100", "A100PCIE": "A100", "A10040GB": "A100", "A100SXM440GB": "A100",
    "A10080GB": "A100-80GB", "A100SXM480GB": "A100-80GB", "A100PCIE80GB": "A100-80GB", "A100SXM80GB": "A100-80GB",
    "GEFORCERTX4090": "RTX4090", "GEFORCERTX3090": "RTX3090", "RTXA6000": "A6000",
    "TESLAV100": "V100", "TESLAT4": "T4",
}


def canonical_gpu(raw: str, vram_gb: float | None = None) -> str:
    """Map a provider's GPU name to a key of ``GPUS``; unknown names come back cleaned up.

    ``vram_gb`` disambiguates models sold in two sizes (an "A100" with 80 GB is A100-80GB).
    """
    key = re.sub(r"[^A-Z0-9]", "", raw.upper().replace("NVIDIA", ""))
    key = re.sub(r"HBM\d?E?$", "", key)
    name = _ALIASES.get(key) or next((g for g in GPUS if re.sub(r"[^A-Z0-9]", "", g.upper()) == key), None)
    if name is None:
        return raw.strip()
    if name == "A100" and vram_gb is not None and vram_gb >= 70:
        return "A100-80GB"
    return name


def gpu_info(name: str) -> GpuModel | None:
    return GPUS.get(name)
