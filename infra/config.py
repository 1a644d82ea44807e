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
    # remote attempts (README: "Remote attempts"): what a rented machine gets
    store_role_arn: null              # assume this role (with a session policy) for each attempt's
                                      # store credentials; null: GetFederationToken as yourself
    credential_duration_s: 3600       # lifetime of an attempt's credentials, 1-12 h (renewed at half-life)
    untrusted_hosts: refuse_static_keys   # or forward_static_keys: where the store has no STS (R2,
                                      # MinIO), hand the daemon's own keys to marketplace hosts
    remote_package: null              # null: ship the daemon's own tunefleet as a wheel; or a pip
                                      # requirement of a released version, e.g. "tunefleet[train]==0.2.0"
    remote_image: null                # the CUDA/PyTorch image Vast machines start from
    database_url: null                # a team server's shared store on Postgres, e.g.
                                      # postgresql://tunefleet:PASSWORD@db.internal/tunefleet (also
                                      # TUNEFLEET_DATABASE_URL); null: the SQLite file $TUNEFLEET_HOME/state.db

Every setting has a type and a range (``Settings``); a bad one is refused at every command's start
with the key, the value and what is allowed. ``TUNEFLEET_HOME`` must be a folder we can write.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from infra.urls import redact_url

PROVIDER_NAMES = ("local", "vast", "skypilot", "together", "siliconflow")  # every provider tunefleet knows
MAX_CONFIG_BYTES = 1 << 20


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of ``choices``, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_provider(name: str, known: Iterable[str] = PROVIDER_NAMES) -> str:
    """The one message for a provider name tunefleet does not know (job files, config, CLI)."""
    known = tuple(known)
    return f"unknown provider {name!r}{did_you_mean(name, known)}; known: {', '.join(known)}"


class ConfigError(ValueError):
    """The config file or the environment is wrong; the message names the key, the value and the fix."""


def tunefleet_home() -> Path:
    return Path(os.environ.get("TUNEFLEET_HOME") or "~/.tunefleet").expanduser().resolve()


@dataclass(frozen=True)
class Config:
    """The settings every part reads (plain values; ``Settings`` validates them at the edge)."""

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
    local_gpu_purchase_usd: float = 2000.0
    local_gpu_lifetime_hours: float = 26280.0
    local_gpu_watts: float = 350.0
    local_cpu_watts: float = 65.0
    usd_per_kwh: float = 0.15
    launch_timeout_s: float = 900.0
    budget_monthly_usd: float | None = None
    provider_limits: tuple[tuple[str, int], ...] = ()  # provider -> most attempts at once
    store_role_arn: str | None = None
    credential_duration_s: int = 3600
    untrusted_hosts: str = "refuse_static_keys"
    remote_package: str | None = None
    remote_image: str | None = None
    database_url: str | None = None

    def scaled(self, seconds: float) -> float:
        """One of the daemon's built-in waits, in this config's time (``time_scale``)."""
        return seconds * self.time_scale

    def provider_limit(self, provider: str) -> int | None:
        return dict(self.provider_limits).get(provider)

    @property
    def db_path(self) -> Path:
        return self.home / "state.db"

    @property
    def database(self) -> str | Path:
        """What ``Store()`` opens: ``database_url`` (Postgres) if set, else the SQLite file."""
        return self.database_url or self.db_path

    @property
    def database_shown(self) -> str:
        """Where the store is, fit to print (a Postgres password is masked)."""
        return redact_url(self.database_url) if self.database_url else str(self.db_path)

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    def attempt_log(self, attempt_id: str) -> Path:
        return self.logs_dir / f"{attempt_id}.log"


DAY = 86400.0


class Settings(BaseModel):
    """``config.yaml`` as a user may write it: every key typed and bounded."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    ray_address: str | None = Field(None, pattern=r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")
    ray_num_cpus: int | None = Field(None, ge=1, le=4096)
    ray_num_gpus: int | None = Field(None, ge=0, le=1024)
    default_store: str | None = None
    poll_interval_s: float = Field(1.0, ge=0.05, le=3600)
    max_preemptions: int = Field(20, ge=0, le=10_000)
    max_failures: int = Field(2, ge=1, le=1000)
    max_launch_failures: int = Field(3, ge=1, le=1000)
    max_attempts: int = Field(50, ge=1, le=100_000)
    stop_grace_s: float = Field(60.0, ge=0, le=DAY)
    unknown_timeout_s: float = Field(600.0, ge=1, le=7 * DAY)
    call_timeout_s: float = Field(60.0, ge=0.1, le=3600)
    provider_disable_s: float = Field(300.0, ge=1, le=DAY)
    owned_tolerance: float = Field(0.25, ge=0, le=10)
    time_scale: float = Field(1.0, gt=0, le=1000)
    local_gpu_purchase_usd: float = Field(2000.0, ge=0, le=10_000_000)
    local_gpu_lifetime_hours: float = Field(26280.0, gt=0, le=1_000_000)
    local_gpu_watts: float = Field(350.0, ge=0, le=100_000)
    local_cpu_watts: float = Field(65.0, ge=0, le=100_000)
    usd_per_kwh: float = Field(0.15, ge=0, le=100)
    launch_timeout_s: float = Field(900.0, ge=1, le=7 * DAY)
    budget_monthly_usd: float | None = Field(None, ge=0, le=1e9)
    provider_limits: dict[str, Annotated[int, Field(ge=0, le=10_000)]] = Field(default_factory=dict)
    store_role_arn: str | None = Field(None, max_length=600,
                                       pattern=r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]+$")
    credential_duration_s: int = Field(3600, ge=3600, le=43200)  # refreshed at half-life, before botocore's 15-min window
    untrusted_hosts: Literal["refuse_static_keys", "forward_static_keys"] = "refuse_static_keys"
    remote_package: str | None = Field(None, min_length=1, max_length=500, pattern=r"^tunefleet\b[^\s;]*$")
    remote_image: str | None = Field(None, min_length=1, max_length=300, pattern=r"^[A-Za-z0-9_./:@-]+$")
    database_url: str | None = Field(None, max_length=2000)

    @field_validator("database_url")
    @classmethod
    def _database(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("use postgresql://USER:PASSWORD@HOST:PORT/DATABASE, or leave it unset for the "
                             "SQLite file in TUNEFLEET_HOME")
        return value

    @field_validator("default_store")
    @classmethod
    def _store(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parsed = urlparse(value)
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise ValueError("an s3 store needs a bucket: s3://bucket/prefix")
            return value
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost") or not unquote(parsed.path).startswith("/"):
                raise ValueError("a file store needs an absolute path: file:///abs/path")
            return value
        if not parsed.scheme and value.startswith("/"):
            return Path(value).as_uri()
        raise ValueError("use file:///absolute/path or s3://bucket/prefix")

    @field_validator("provider_limits")
    @classmethod
    def _known_providers(cls, value: dict[str, int]) -> dict[str, int]:
        for name in value:
            if name not in PROVIDER_NAMES:
                raise ValueError(unknown_provider(name))
        return value


def _check_home(home: Path) -> None:
    if home.exists() and not home.is_dir():
        raise ConfigError(f"TUNEFLEET_HOME={home} is a file; point it at a folder (it is created if missing)")
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"TUNEFLEET_HOME={home}: cannot create it ({exc.strerror}); point it at a folder "
                          "you can write") from None
    if not os.access(home, os.W_OK | os.X_OK):
        raise ConfigError(f"TUNEFLEET_HOME={home} is not writable by this user; point it at a folder you can write")


def load_config(home: Path | None = None) -> Config:
    home = (home or tunefleet_home()).resolve()
    _check_home(home)
    path = home / "config.yaml"
    raw: dict[str, Any] = {}
    if path.is_file():
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size / 2**20:.1f} MiB is not a config file (at most 1 MiB)")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: must be a mapping of settings, e.g. poll_interval_s: 1.0")
        raw = {k: v for k, v in loaded.items() if v is not None} if all(isinstance(k, str) for k in loaded) else loaded
    source = {key: str(path) for key in raw}
    if os.environ.get("TUNEFLEET_RAY_ADDRESS"):
        raw["ray_address"] = os.environ["TUNEFLEET_RAY_ADDRESS"]
        source["ray_address"] = "TUNEFLEET_RAY_ADDRESS"
    if os.environ.get("TUNEFLEET_DATABASE_URL"):
        raw["database_url"] = os.environ["TUNEFLEET_DATABASE_URL"]
        source["database_url"] = "TUNEFLEET_DATABASE_URL"
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(_explain(err, path, source) for err in exc.errors())) from None
    values = settings.model_dump()
    values["provider_limits"] = tuple(sorted(values["provider_limits"].items()))
    values["default_store"] = values["default_store"] or (home / "checkpoints").as_uri()
    return Config(home=home, **values)


def _explain(err: dict[str, Any], path: Path, source: dict[str, str]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    key = str(err["loc"][0]) if err["loc"] else ""
    where = source.get(key, str(path))
    if err["type"] == "extra_forbidden":
        return (f"{where}: unknown setting {key!r}{did_you_mean(key, Settings.model_fields)}; "
                f"known: {', '.join(sorted(Settings.model_fields))}")
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if key == "database_url" and isinstance(value, str):
        value = redact_url(value)  # never print a password, even a mistyped one
    return f"{where}: {loc}: {value!r} is not allowed: {msg}"
