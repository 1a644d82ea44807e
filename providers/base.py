"""The one protocol every source of capacity implements: offers, launch, poll, cancel.

Why this shape (after dstack's ``Compute`` and SkyPilot's clouds): a small required core with its
contracts written here, so the daemon treats every provider the same; offers are frozen values the
scheduler can rank without calling anyone; raw provider states are mapped to ``RunState`` by each
provider, once; and one error tree tells the daemon what to do next.

Contracts:
- ``offers`` may block on the network but must honour its own timeout; it raises only
  ``ProviderError`` subclasses.
- ``launch`` returns quickly with a JSON-safe handle; the daemon polls. The attempt id is the
  resource's name/tag, so a restarted daemon can find what it launched (``handle_for``).
- ``poll`` never blocks for long; it reports ``RunState.UNKNOWN`` rather than raising on a
  transient fault.
- ``cancel`` and ``signal`` are idempotent: safe to call twice or on something already gone.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobs.estimate import Estimate


class PriceSource(StrEnum):
    LIVE = "live"
    CATALOG = "catalog"
    SNAPSHOT = "snapshot"
    COST_MODEL = "cost_model"


@dataclass(frozen=True)
class Offer:
    """One place a job could run, at a price. Plain values; provider detail in ``extra``."""

    provider: str
    offer_id: str
    gpu: str  # GPU model, or "cpu"
    gpu_count: int
    vram_gb: float  # per GPU (0 for CPU)
    usd_per_hour: float
    interruptible: bool = False
    hazard_per_hour: float = 0.0  # expected interruptions per hour
    region: str = "local"
    on_premises: bool = False  # data never leaves
    owned: bool = False  # the team's own hardware, priced at its marginal (power) cost
    startup_s: float = 0.0
    cpus: int = 0  # vCPUs of the machine (0: not reported)
    ram_gb: float = 0.0  # host memory (0: not reported); a CPU placement needs the whole job in it
    available: bool = True  # False: the capacity exists but is taken now (owned GPUs busy): wait for it
    price_source: PriceSource = PriceSource.COST_MODEL
    price_date: str | None = None  # for snapshot/catalog prices: when they were published
    # snapshot prices someone checked against the provider's own list (False: a placeholder or a
    # recollection, shown only with --all and never ranked above a checked price)
    price_verified: bool = True
    # Managed fine-tuning APIs price the whole job (per token), not the hour: then usd_total is the
    # price of the job and hours the provider's own duration estimate; usd_per_hour is derived.
    usd_total: float | None = None
    hours: float | None = None
    extra: tuple[tuple[str, Any], ...] = ()  # provider detail (inet speed, datacenter, ...)

    def detail(self, key: str, default: Any = None) -> Any:
        """One ``extra`` value (the last given for ``key``), without building a dict: rank asks for
        every offer."""
        for k, v in reversed(self.extra):
            if k == key:
                return v
        return default

    @property
    def placeholder(self) -> bool:
        return self.price_source is PriceSource.SNAPSHOT and not self.price_verified

    @property
    def provenance(self) -> str:
        """Where the price comes from, as users read it: live, catalog DATE, snapshot (verified
        DATE), placeholder, or cost model (owned hardware)."""
        if self.price_source is PriceSource.SNAPSHOT:
            return f"snapshot (verified {self.price_date})" if self.price_verified else "placeholder"
        if self.price_source is PriceSource.CATALOG:
            return f"catalog {self.price_date}" if self.price_date else "catalog"
        return "cost model" if self.price_source is PriceSource.COST_MODEL else str(self.price_source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "offer_id": self.offer_id,
            "gpu": self.gpu,
            "gpu_count": self.gpu_count,
            "vram_gb": self.vram_gb,
            "usd_per_hour": self.usd_per_hour,
            "interruptible": self.interruptible,
            "hazard_per_hour": self.hazard_per_hour,
            "region": self.region,
            "on_premises": self.on_premises,
            "owned": self.owned,
            "startup_s": self.startup_s,
            "cpus": self.cpus,
            "ram_gb": self.ram_gb,
            "available": self.available,
            "price_source": str(self.price_source),
            "price_date": self.price_date,
            "price_verified": self.price_verified,
            "provenance": self.provenance,
            "usd_total": self.usd_total,
            "hours": self.hours,
            "extra": dict(self.extra),
        }


@dataclass(frozen=True)
class Resource:
    """A machine (instance, cluster, actor) a provider holds that tunefleet started, as the
    reconciler sees it: found by its ``tf-<attempt>`` name or label."""

    provider: str
    resource_id: str  # what ``destroy`` takes
    name: str  # its name or label: ``resource_name(attempt id)`` for the attempt that made it
    attempt_id: str | None  # read from its name; None when the name does not say
    detail: str = ""


class RunState(StrEnum):
    """What a provider can tell about a launched attempt, mapped from its raw states."""

    PENDING = "pending"  # accepted, waiting for capacity or still starting
    RUNNING = "running"
    EXITED = "exited"  # the payload exited; see exit_code
    LOST = "lost"  # the capacity is gone (spot reclaimed, node died): a preemption
    UNKNOWN = "unknown"  # could not tell this time (transient); ask again later


@dataclass(frozen=True)
class RunStatus:
    state: RunState
    exit_code: int | None = None
    detail: str = ""
    # For LOST: "preempted" when the provider knows the capacity was reclaimed (outbid, spot
    # notice), "lost" when it just vanished. The daemon maps it through one table
    # (orchestrator.outcomes); None lets the daemon decide.
    cause: str | None = None
    # For LOST and EXITED: when the provider says the machine stopped costing money (epoch
    # seconds), where it knows; the daemon bills to the later of this and the last sign of life.
    ended_at: float | None = None


@dataclass(frozen=True)
class LaunchRequest:
    """Everything a provider needs to start one attempt of the payload."""

    job_id: str
    attempt_id: str
    spec: dict[str, Any]  # the validated job spec, JSON-safe (JobSpec.to_payload_dict())
    store_uri: str
    gpus: int
    cpus: int
    log_path: str
    env: dict[str, str] = field(default_factory=dict)
    # Credentials the payload needs (e.g. for the checkpoint store). Providers pass them through
    # their secret channel (SkyPilot ``secrets``, never ``envs``); nobody logs or stores them.
    secrets: dict[str, str] = field(default_factory=dict, repr=False)

    def payload_env(self) -> dict[str, str]:
        """The environment that runs ``python -m jobs.train`` for this attempt (secrets excluded)."""
        import json

        return {
            "TUNEFLEET_JOB_ID": self.job_id,
            "TUNEFLEET_ATTEMPT_ID": self.attempt_id,
            "TUNEFLEET_STORE": self.store_uri,
            "TUNEFLEET_SPEC_JSON": json.dumps(self.spec),
            **self.env,
        }


def scrub_provider_keys(env: dict[str, str]) -> dict[str, str]:
    """``env`` without any provider's API key (``*_API_KEY``: Vast.ai, Together, SiliconFlow, ...):
    a payload rents nothing, so it never holds a key that can."""
    return {k: v for k, v in env.items() if not k.upper().endswith("_API_KEY")}


# ---- one error tree; the daemon maps each class to an action ----
class ProviderError(Exception):
    """Base of every error a provider raises."""


class ProviderUnavailable(ProviderError):
    """Unreachable or refusing us now (could not connect): skip this provider for a while."""


class ProviderNotConfigured(ProviderUnavailable):
    """Not set up on this machine (no credentials, SDK or catalog; a refused key): nothing changes
    until someone configures it, so no job waits for it."""


class NoCapacity(ProviderError):
    """The offer is gone or cannot be had now: try the next offer."""


class LaunchFailed(ProviderError):
    """The launch itself failed for a reason that retrying the same offer will not fix."""


class TransientError(ProviderError):
    """Retry later (rate limit, 5xx, timeout)."""

    def __init__(self, message: str, retry_after_s: float = 5.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Provider(abc.ABC):
    """A source of capacity. Subclasses implement the five abstract methods and nothing else.

    ``launchable`` says whether the daemon may place attempts here yet; a provider that only
    quotes prices (its launch path not built) still answers ``offers`` for ``tunefleet offers``.
    """

    name: str
    launchable: bool = True
    # Hosts run by third parties who can read a machine's environment (a marketplace): attempts
    # there get only scoped, expiring store credentials (infra.credentials), never static keys
    # unless the config opts in.
    marketplace: bool = False

    @abc.abstractmethod
    def check(self) -> tuple[bool, str]:
        """(enabled, reason). Never raises."""

    @abc.abstractmethod
    def offers(self, spec: dict[str, Any], estimate: Estimate) -> list[Offer]:
        """Offers that could run this job. The provider may pre-filter obvious misfits (too
        little VRAM) but must not apply the job's policy: the scheduler does, with reasons.
        Raises ProviderUnavailable / TransientError only."""

    @abc.abstractmethod
    def launch(self, request: LaunchRequest, offer: Offer) -> dict[str, Any]:
        """Start an attempt; return a JSON-safe handle at once. Raises NoCapacity/LaunchFailed."""

    @abc.abstractmethod
    def poll(self, handle: dict[str, Any]) -> RunStatus:
        """The attempt's state now. Never raises for transient faults: returns UNKNOWN."""

    @abc.abstractmethod
    def cancel(self, handle: dict[str, Any], grace_s: float = 0.0) -> None:
        """Stop the attempt and release its capacity. Idempotent."""

    def open(self) -> None:  # noqa: B027 - optional hook
        """Connect now, from the daemon's main thread, before offers are asked from worker threads."""

    def handle_for(self, attempt_id: str) -> dict[str, Any] | None:
        """Rebuild a handle from the attempt id alone (used after a daemon crash). Optional."""
        return None

    def signal(self, handle: dict[str, Any], hard: bool) -> bool:
        """Deliver a preemption drill (SIGTERM with grace, or SIGKILL). Optional; False = unsupported."""
        return False

    def resource_name(self, attempt_id: str) -> str:
        """The name or label the machine of ``attempt_id`` carries here (see ``list_resources``)."""
        return attempt_id

    def list_resources(self) -> list[Resource] | None:
        """Every machine this provider holds that tunefleet started (named ``tf-<attempt>``), for
        the reconciler; None when this provider cannot list them. Raises ProviderError subclasses."""
        return None

    def destroy(self, resource_id: str) -> None:
        """Destroy one machine ``list_resources`` named. Idempotent; raises ProviderError."""
        raise LaunchFailed(f"{self.name} cannot destroy machines by id")

    def release(self, handle: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Free bookkeeping after the daemon has recorded an attempt's end. Idempotent."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Disconnect at daemon exit. Must not stop attempts that should outlive the daemon."""
