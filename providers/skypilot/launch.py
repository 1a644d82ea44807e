"""SkyPilot launches: the ``sky.Task`` pinned to an offer, submitting it, and the names it runs under.

Separate from quoting (``offers.py``) and from following a launch (``status.py``): this is the
one place that decides what runs on the cluster and which SkyPilot errors mean "no capacity".

Launching (``launchable = True``): one SkyPilot cluster per attempt, named ``tf-<attempt>``, so a
restarted daemon finds it (``handle_for``). ``build_task`` makes a real ``sky.Task`` pinned to the
offer (``infra=cloud/region``, SkyPilot's accelerator name and instance type, spot or not, a
``max_hourly_cost`` just above the quoted price) whose run is tunefleet's one bootstrap
(``providers/bootstrap.sh``: install the wheel the daemon shipped, then ``python -m jobs.train``);
the job spec and ids go in ``envs``; store credentials and the code's presigned URLs in
``secrets`` (never ``envs``). ``launch`` only submits ``sky.launch(..., down=True)`` (autodown a few
minutes after the job ends, so a lost daemon leaks nothing) and keeps the request id; ``poll``
resolves it without waiting and maps SkyPilot's states with ``map_state`` (both in ``status.py``).
Every SDK call goes through ``_SkySDK`` (``sdk.py``) and has a deadline (SkyPilot's HTTP reads have
none). Vast offers are refused: SkyPilot 0.14.1's Vast path can rent a different GPU than the one
asked for; tunefleet rents Vast directly.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from infra.logging import get_logger
from providers.base import (
    LaunchFailed,
    LaunchRequest,
    NoCapacity,
    Offer,
    PriceSource,
    Provider,
    ProviderError,
    TransientError,
)
from providers.remote import bootstrap_script
from providers.skypilot.offers import INSTALL_HINT
from providers.skypilot.sdk import _deadline, _is_transient

if TYPE_CHECKING:
    from providers.skypilot.sdk import _SkySDK

DEFAULT_PACKAGE = "tunefleet[train,s3]"  # only when the daemon shipped no wheel (see providers.remote)
PRICE_HEADROOM = 1.05  # max_hourly_cost: the offer's price plus a little, never a surprise
VAST_REFUSAL = (
    "refusing to rent Vast.ai through SkyPilot: SkyPilot 0.14.1's Vast path can rent a different GPU than the "
    'offer chosen (it quotes its query, gpu_name="A100 SXM4", and vastai 1.9.1 drops every filter after the first '
    "quote, so SkyPilot rents the first offer returned, at any price, on demand even when spot was asked); "
    "tunefleet rents Vast directly (the 'vast' provider), checking that what it rented is the offer chosen"
)
_TASK_NAME = re.compile(r"[a-zA-Z0-9]+(?:[._-]{1,2}[a-zA-Z0-9]+)*")  # sky.task._VALID_NAME_REGEX
_NO_INSTANCE = {"", "none", "nan"}

log = get_logger(component="skypilot")


class SkyPilotLaunch(Provider):
    """The launching part of ``SkyPilotProvider`` (a mixin: ``SkyPilotProvider.__init__`` sets what
    it reads)."""

    package: str
    disk_size_gb: int
    autodown_idle_minutes: int
    launch_timeout_s: float
    _sdk: _SkySDK

    # ---- attempts: one SkyPilot cluster per attempt ----
    def build_task(self, request: LaunchRequest, offer: Offer) -> Any:
        """The ``sky.Task`` that runs this attempt, pinned to ``offer``; checked by SkyPilot's own
        YAML schema (``Task.from_yaml_config(task.to_yaml_config())``). Raises LaunchFailed."""
        cloud, region, instance, accelerator = _offer_target(offer)
        try:
            import sky
        except ImportError as exc:
            raise LaunchFailed(INSTALL_HINT) from exc
        secrets = {str(k): str(v) for k, v in request.secrets.items()}
        envs = {k: v for k, v in request.payload_env().items() if k not in secrets}  # secrets never in envs
        if "TUNEFLEET_WHEEL_URL" not in secrets and "TUNEFLEET_PACKAGE" not in secrets:
            envs["TUNEFLEET_PACKAGE"] = self.package  # nothing shipped: the bootstrap installs this
        try:
            resources = sky.Resources(
                infra=f"{cloud}/{region}", accelerators=f"{accelerator}:{offer.gpu_count}", instance_type=instance,
                use_spot=offer.interruptible, disk_size=self.disk_size_gb,
                max_hourly_cost=round(offer.usd_per_hour * PRICE_HEADROOM, 4),
                autostop={"idle_minutes": self.autodown_idle_minutes, "down": True},
            )
            task = sky.Task(name=task_name(request.attempt_id), run=bootstrap_script(), envs=envs, secrets=secrets)
            task.set_resources(resources)
            sky.Task.from_yaml_config(task.to_yaml_config())  # SkyPilot's schema; secrets are not redacted here
        except Exception as exc:  # noqa: BLE001 - SkyPilot raises ValueError, its own errors, schema errors
            raise LaunchFailed(f"SkyPilot refused the task for {offer.offer_id}: {type(exc).__name__}: "
                               f"{str(exc)[:300]}") from exc
        return task

    @override
    def launch(self, request: LaunchRequest, offer: Offer) -> dict[str, Any]:
        """Submit ``sky.launch`` and return at once; ``poll`` resolves the request. The cluster
        autodowns ``autodown_idle_minutes`` after its job ends, so a lost daemon leaks nothing."""
        task = _deadline(lambda: self.build_task(request, offer), self.launch_timeout_s, "building the SkyPilot task")
        cluster = cluster_name(request.attempt_id)
        try:
            request_id = self._sdk.launch(task, cluster, idle_minutes=self.autodown_idle_minutes,
                                          timeout=self.launch_timeout_s)
        except ProviderError:
            raise
        except Exception as exc:  # noqa: BLE001 - one place turns SkyPilot's errors into ours
            raise _launch_error(exc, offer) from exc
        log.info("skypilot launch submitted", cluster=cluster, request_id=request_id, offer=offer.offer_id)
        return {"cluster": cluster, "request_id": str(request_id), "cloud": _offer_target(offer)[0],
                "spot": bool(offer.interruptible)}


# ---- launching: names ----
def cluster_name(attempt_id: str) -> str:
    """``tf-<attempt>`` in lowercase letters, digits and '-' (valid on every cloud, and for
    SkyPilot's ``[a-zA-Z]([-_.a-zA-Z0-9]*[a-zA-Z0-9])?``). '.' becomes '-'; any other change, or a
    name over 60 characters, adds a hash of the attempt id so two attempts never share a name."""
    slug = re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", attempt_id.lower())).strip("-")
    name = f"tf-{slug}" if slug else "tf"
    if not re.fullmatch(r"[a-z0-9.]+", attempt_id) or len(name) > 60:
        name = f"{name[:52].rstrip('-')}-{hashlib.sha1(attempt_id.encode()).hexdigest()[:6]}"
    return name


def task_name(attempt_id: str) -> str:
    """The attempt id itself when SkyPilot accepts it as a task name, else the cluster's slug."""
    return attempt_id if _TASK_NAME.fullmatch(attempt_id) else cluster_name(attempt_id)[3:]


def _offer_target(offer: Offer) -> tuple[str, str, str | None, str]:
    """(cloud, region, instance type or None, SkyPilot's accelerator name) of one of our offers."""
    if offer.provider != "skypilot":
        raise LaunchFailed(f"offer {offer.offer_id} is from {offer.provider}, not skypilot")
    cloud = str(offer.detail("cloud") or offer.offer_id.split("/", 1)[0]).lower()
    if cloud == "vast":
        raise LaunchFailed(VAST_REFUSAL)
    if offer.price_source is PriceSource.SNAPSHOT:  # decide() never sends one; refuse anyway
        raise LaunchFailed(f"offer {offer.offer_id} is a quote from the shipped SkyPilot catalog snapshot, not "
                           "launchable: run `sky check` so SkyPilot's own catalog prices this cloud")
    accelerator = offer.detail("accelerator")
    if not accelerator or not offer.region:
        raise LaunchFailed(f"offer {offer.offer_id} lacks SkyPilot's accelerator name or region")
    instance = str(offer.detail("instance_type") or "")
    return cloud, offer.region, (None if instance.lower() in _NO_INSTANCE else instance), str(accelerator)


def _launch_error(exc: BaseException, offer: Offer) -> ProviderError:
    name = type(exc).__name__
    text = f"SkyPilot launch of {offer.offer_id}: {name}: {str(exc)[:300]}"
    if name == "ResourcesUnavailableError":
        return NoCapacity(text)
    if _is_transient(exc):
        return TransientError(text, retry_after_s=30.0)
    return LaunchFailed(text)
