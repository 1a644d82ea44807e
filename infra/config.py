"""Where state lives and the few settings a user changes: ``$TUNEFLEET_HOME/config.yaml``.

Why a file and not flags: the daemon runs for weeks; what it joins (``ray_address``) and where
checkpoints go by default must be the same for every command that talks to the same home.

    ray_address: 127.0.0.1:6380       # join an existing cluster (default: start an embedded one)
    ray_num_cpus: 2                   # embedded cluster only
    ray_num_gpus: null                # embedded cluster only (null = detect)
    default_store: file:///data/ckpt  # default: file://$TUNEFLEET_HOME/checkpoints
    poll_interval_s: 1.0
    max_preemptions: 20               # per job, then it fails
    max_failures: 2                   # attempts that fail (not preempted) before the job fails
    max_launch_failures: 3            # launches that fail (or machines that cannot set up) before it fails
    max_attempts: 50                  # attempts of any kind per job, then it fails
    stop_grace_s: 60                  # how long a stopping attempt may take to save before it is killed
    unknown_timeout_s: 600            # an attempt whose provider cannot tell its state this long is lost
    call_timeout_s: 60                # deadline of one provider call (offers, launch, poll)
    provider_disable_s: 300           # a provider that is unreachable is left alone this long
    owned_tolerance: 0.25             # owned capacity wins if it costs at most 25 % more than rented
    time_scale: 1.0                   # simulations and tests only: multiplies the daemon's built-in
                                      # waits (offer blocks, backoffs, rechecks); keep 1 in production
    # the cost model of owned GPUs (per GPU): amortized purchase + power
    local_gpu_purchase_usd: 2000
    local_gpu_lifetime_hours: 26280   # 3 years
    local_gpu_watts: 350
    local_cpu_watts: 65               # when a job runs on the CPU
    usd_per_kwh: 0.15
    budget_monthly_usd: 500           # global cap on recorded spend per calendar month (UTC)
    provider_limits: {vast: 4, skypilot: 2}   # most attempts at once per provider
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """The config file is malformed; the message names the key and the file."""


def tunefleet_home() -> Path:
    return Path(os.environ.get("TUNEFLEET_HOME") or "~/.tunefleet").expanduser().resolve()


@dataclass(frozen=True)
class Config:
    home: Path
    ray_address: str | None = None
    ray_num_cpus: int | None = None
    ray_num_gpus: int | None = None
    default_store: str = ""
    poll_interval_s: float = 1.0
    max_preemptions: int = 20
    max_failures: int = 2
    max_launch_failures: int = 3
    max_attempts: int = 50
    stop_grace_s: float = 60.0
    unknown_timeout_s: float = 600.0
    call_timeout_s: float = 60.0
    provider_disable_s: float = 300.0
    owned_tolerance: float = 0.25
    time_scale: float = 1.0

    def scaled(self, seconds: float) -> float:
        """One of the daemon's built-in waits, in this config's time (``time_scale``)."""
        return seconds * self.time_scale
    local_gpu_purchase_usd: float = 2000.0
    local_gpu_lifetime_hours: float = 26280.0
    local_gpu_watts: float = 350.0
    local_cpu_watts: float = 65.0
    usd_per_kwh: float = 0.15
    launch_timeout_s: float = 900.0
    budget_monthly_usd: float | None = None
    provider_limits: tuple[tuple[str, int], ...] = ()  # provider -> most attempts at once

    def provider_limit(self, provider: str) -> int | None:
        return dict(self.provider_limits).get(provider)

    @property
    def db_path(self) -> Path:
        return self.home / "state.db"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    def attempt_log(self, attempt_id: str) -> Path:
        return self.logs_dir / f"{attempt_id}.log"


def load_config(home: Path | None = None) -> Config:
    home = (home or tunefleet_home()).resolve()
    path = home / "config.yaml"
    raw: dict[str, Any] = {}
    if path.is_file():
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: must be a mapping of settings")
        raw = loaded
    known = {f.name: f for f in fields(Config) if f.name != "home"}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if os.environ.get("TUNEFLEET_RAY_ADDRESS"):
        raw["ray_address"] = os.environ["TUNEFLEET_RAY_ADDRESS"]
    values: dict[str, Any] = {}
    limits = raw.pop("provider_limits", None) or {}
    if not isinstance(limits, dict) or not all(isinstance(v, int) and v >= 0 for v in limits.values()):
        raise ConfigError(f"{path}: provider_limits must map provider names to attempt counts, e.g. {{vast: 4}}")
    values["provider_limits"] = tuple(sorted((str(k), int(v)) for k, v in limits.items()))
    for key, value in raw.items():
        if value is None:
            continue
        kind = known[key].type
        try:
            if "int" in str(kind):
                values[key] = int(value)
            elif "float" in str(kind):
                values[key] = float(value)
            else:
                values[key] = str(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: {key} must be a {kind}, got {value!r}") from None
    values.setdefault("default_store", (home / "checkpoints").as_uri())
    return Config(home=home, **values)
