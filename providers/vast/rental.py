"""Vast.ai rentals: the HTTP calls, renting one ask, checking what came back, and tearing it down.

Separate from quoting (``offers.py``) because this is the half that spends money and holds
secrets: its checks (rent exactly the ask chosen, destroy anything else) read best on their own.

Renting (``launchable = True``), in the request shapes of vastai 1.9.1 (``vastai/api/instances.py``):
``PUT /api/v0/asks/{ask}/`` with the body ``build_create_instance_payload`` builds (``client_id: "me"``,
``image``, ``env`` as ``{NAME: value}``, ``price`` = the bid for an interruptible rental and ``null``
for on-demand, ``disk``, ``label``, ``onstart``, ``runtype``, ``args``, ...) -> ``{"success": true,
"new_contract": ID}``; ``GET /api/v0/instances/{id}/?owner=me`` -> ``{"instances": row}``;
``DELETE /api/v0/instances/{id}/``; the instance list is the SDK's ``GET /api/v1/instances/`` (paged by
``next_token``, filtered by ``select_filters``), with its answer re-checked here.

- We rent exactly the chosen ask, then read the instance back and compare it with the offer (GPU
  model, GPU count, machine, interruptible or not, the price paid). Anything else — what SkyPilot
  0.14.1 with vastai 1.9.1 can do, renting whatever comes first — is destroyed at once and the
  launch fails. A rental we cannot read back is destroyed too: never keep what we did not check.
- The container runs the payload as its main process (``runtype: "args"``, entrypoint ``bash``,
  args ``["-c", script]``), so it exits with the payload and Vast reports ``exited``; an ssh-type
  instance would keep running (and billing) after training ends. The script installs
  ``package_spec`` (default ``tunefleet[train]``; a PEP 508 ``tunefleet[train] @ https://.../x.whl``
  for a wheel) and ``exec``s ``python -m jobs.train``, which reads the ``TUNEFLEET_*`` env.
- Secrets: Vast has no secret channel, so ``request.secrets`` travel in the instance env with the
  payload env. Anyone who can read the instance (its host, and ``show instance``'s ``extra_env``)
  can read them: give attempts short-lived, narrowly scoped credentials. They are never logged,
  never put in a handle or an error message; the instance rows that echo them are never logged.
- An outbid interruptible instance is paused (``stopped``), not deleted: ``poll`` (``status.py``)
  reports it LOST (a preemption) and ``release`` destroys it, so a paused disk does not keep billing.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from typing_extensions import override

from infra.logging import get_logger
from jobs.gpus import canonical_gpu
from providers.base import (
    LaunchFailed,
    LaunchRequest,
    NoCapacity,
    Offer,
    PriceSource,
    Provider,
    ProviderError,
    ProviderNotConfigured,
    Resource,
    TransientError,
)
from providers.remote import bootstrap_script
from providers.vast.offers import _read_key

# A public CUDA image with Python and pip; the onstart script installs tunefleet into it.
DEFAULT_IMAGE = "pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime"
DEFAULT_PACKAGE = "tunefleet[train,s3]"  # only when the daemon shipped no wheel (see providers.remote)
LABEL_PREFIX = "tf-"  # every instance tunefleet rents is labelled tf-<attempt id>: the reconciler's mark


def label_for(attempt_id: str) -> str:
    return f"{LABEL_PREFIX}{attempt_id}"
PRICE_SLACK = 0.05  # a rental may cost at most 5 % (+ 1 cent) above the chosen price
LIST_PAGES_MAX = 40  # handle_for reads at most 40 pages of 25 instances
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # Vast reads keys like "-p 22:22" as docker options

log = get_logger(component="vast")


class VastRental(Provider):
    """The renting half of ``VastProvider`` (a mixin: ``VastProvider.__init__`` sets what it reads)."""

    _api_key_arg: str | None
    url: str
    timeout_s: float
    disk_gb: float
    image: str
    package_spec: str
    verify_tries: int
    verify_wait_s: float

    # ---- renting: HTTP ----
    def _key(self) -> str:
        key = _read_key(self._api_key_arg)
        if key is None:
            raise ProviderNotConfigured("no Vast.ai API key (set VAST_API_KEY or ~/.config/vastai/vast_api_key)")
        return key

    def _call(self, method: str, path: str, *, json_body: Any = None,
              params: dict[str, str] | None = None) -> _Answer:
        """One request with a timeout. Raises _Unreachable (key-free reason) when nothing came back."""
        import requests

        key = self._key()
        try:
            resp = requests.request(
                method, f"{self.url}{path}", json=json_body, params=params,
                headers={"Authorization": f"Bearer {key}"}, timeout=self.timeout_s,
            )
        except requests.Timeout:
            raise _Unreachable(f"Vast.ai {method} timed out after {self.timeout_s:g} s") from None
        except requests.RequestException as exc:
            raise _Unreachable(f"could not reach Vast.ai at {self.url} ({type(exc).__name__})") from None
        try:
            data = resp.json()
        except ValueError:
            data = None
        return _Answer(resp.status_code, data, resp.headers.get("Retry-After"), key)

    def _show(self, instance_id: int) -> dict[str, Any] | None:
        """The instance row, or None when Vast says it is gone. Raises _Unreachable / TransientError."""
        ans = self._call("GET", f"/api/v0/instances/{instance_id}/", params={"owner": "me"})
        if ans.status == 404:
            return None
        ans.raise_for_status("show instance", ())
        if not isinstance(ans.data, dict) or "instances" not in ans.data:
            raise TransientError("Vast.ai show instance answer has no 'instances'")
        row = ans.data["instances"]
        if row is None:
            return None
        if not isinstance(row, dict):
            raise TransientError("Vast.ai show instance answer is malformed")
        return row

    def _destroy(self, instance_id: int) -> None:
        """DELETE the instance; gone already is fine. Raises TransientError / ProviderError."""
        try:
            ans = self._call("DELETE", f"/api/v0/instances/{instance_id}/", json_body={})
        except _Unreachable as exc:
            raise TransientError(f"could not destroy Vast.ai instance {instance_id}: {exc.reason}") from None
        if ans.status == 404:
            return
        ans.raise_for_status(f"destroy instance {instance_id}", ())
        log.info("destroyed Vast.ai instance", instance_id=instance_id)

    def _destroy_quietly(self, instance_id: int) -> str:
        """Destroy (two tries); '' on success, else why it failed (safe to show)."""
        why = ""
        for _ in range(2):
            try:
                self._destroy(instance_id)
                return ""
            except ProviderError as exc:
                why = str(exc)
        log.error("could not destroy a Vast.ai instance: it may still bill", instance_id=instance_id, reason=why)
        return why

    def _find(self, attempt_id: str) -> list[dict[str, Any]]:
        """Instances labelled for ``attempt_id`` (``tf-<attempt>``, or the bare id older daemons
        used), through the SDK's ``show instances``: ``GET /api/v1/instances/``."""
        labels = [label_for(attempt_id), attempt_id]
        return self._list({"label": {"in": labels}}, lambda r: r.get("label") in labels)

    def _list(self, select: dict[str, Any] | None, keep) -> list[dict[str, Any]]:
        params = {
            "order_by": json.dumps([{"col": "id", "dir": "asc"}]),
            "limit": "25",
        }
        if select is not None:
            params["select_filters"] = json.dumps(select)
        found: list[dict[str, Any]] = []
        for _ in range(LIST_PAGES_MAX):
            try:
                ans = self._call("GET", "/api/v1/instances/", params=params)
            except _Unreachable as exc:
                raise TransientError(f"could not list Vast.ai instances: {exc.reason}") from None
            ans.raise_for_status("list instances", ())
            if not isinstance(ans.data, dict) or not isinstance(ans.data.get("instances") or [], list):
                raise TransientError("Vast.ai instance list is malformed")
            # the server's filter is not trusted: the label is checked here
            rows = ans.data.get("instances") or []
            found += [r for r in rows if isinstance(r, dict) and keep(r)]
            token = ans.data.get("next_token")
            if not token:
                return found
            params["after_token"] = str(token)
        raise TransientError(f"Vast.ai instance list longer than {LIST_PAGES_MAX} pages")

    # ---- the reconciler's view: every machine tunefleet rented here ----
    def list_resources(self) -> list[Resource]:
        """Every instance whose label says tunefleet rented it (``tf-<attempt>``). Raises
        TransientError when Vast cannot be asked."""
        rows = self._list(None, lambda r: isinstance(r.get("label"), str) and r["label"].startswith(LABEL_PREFIX))
        return [Resource(self.name, str(r["id"]), r["label"], r["label"][len(LABEL_PREFIX):],
                         f"{r.get('num_gpus')}x {r.get('gpu_name')} {r.get('actual_status')}")
                for r in rows if isinstance(r.get("id"), int) and not isinstance(r.get("id"), bool)]

    def resource_name(self, attempt_id: str) -> str:
        return label_for(attempt_id)

    def destroy(self, resource_id: str) -> None:
        """Destroy one instance by id (gone already is fine). Raises TransientError / ProviderError."""
        self._destroy(int(resource_id))

    # ---- renting: the request ----
    def onstart_script(self) -> str:
        """The container's command: tunefleet's one bootstrap (``providers/bootstrap.sh``)."""
        return bootstrap_script()

    def rent_body(self, request: LaunchRequest, offer: Offer) -> dict[str, Any]:
        """The body vastai 1.9.1's ``build_create_instance_payload`` sends, for this attempt.

        ``price`` is the bid for an interruptible offer and ``None`` (on-demand) otherwise. The env
        holds the payload env and the secrets (Vast has no other channel; see the module doc)."""
        payload_env = request.payload_env()
        if "TUNEFLEET_WHEEL_URL" not in request.secrets and "TUNEFLEET_PACKAGE" not in request.secrets:
            payload_env["TUNEFLEET_PACKAGE"] = self.package_spec  # nothing shipped: install from the index
        clash = sorted(set(payload_env) & set(request.secrets))
        bad = sorted(n for n in [*payload_env, *request.secrets] if not _ENV_NAME.match(n))
        if clash or bad:
            raise LaunchFailed(f"unusable env names for Vast.ai (clashing: {clash}, malformed: {bad})")
        return {
            "client_id": "me",
            "image": self.image,
            "env": {**payload_env, **request.secrets},
            "price": offer.usd_per_hour if offer.interruptible else None,
            "disk": self.disk_gb,
            "label": label_for(request.attempt_id),
            "extra": None,
            "onstart": "bash",  # runtype args: onstart is the entrypoint, args its arguments
            "image_login": None,
            "python_utf8": False,
            "lang_utf8": False,
            "use_jupyter_lab": False,
            "jupyter_dir": None,
            "force": False,
            "cancel_unavail": True,  # fail now rather than create a stopped instance
            "template_hash_id": None,
            "user": None,
            "runtype": "args",
            "args": ["-c", self.onstart_script()],
        }

    @override
    def launch(self, request: LaunchRequest, offer: Offer) -> dict[str, Any]:
        if offer.provider != self.name:
            raise LaunchFailed(f"not a Vast.ai offer: {offer.provider}:{offer.offer_id}")
        if offer.price_source is not PriceSource.LIVE:
            raise NoCapacity(f"Vast.ai offer {offer.offer_id} is a {offer.price_source} price, not a live ask")
        ask = offer.offer_id.removesuffix(":bid")
        if not ask.isdigit():
            raise LaunchFailed(f"Vast.ai offer id {offer.offer_id!r} is not an ask id")
        body = self.rent_body(request, offer)
        secrets = tuple(request.secrets.values())
        try:
            ans = self._call("PUT", f"/api/v0/asks/{ask}/", json_body=body)
        except _Unreachable as exc:
            # the rental may have happened without an answer: find it by label and destroy it
            try:
                stray = [r.get("id") for r in self._find(request.attempt_id)]
            except ProviderError:
                stray = []
            for iid in stray:
                if isinstance(iid, int):
                    self._destroy_quietly(iid)
            raise TransientError(f"renting Vast.ai ask {ask}: {exc.reason} (any instance labelled "
                                 f"{request.attempt_id} found was destroyed)", retry_after_s=10.0) from None
        if ans.status in (404, 410) or (ans.status == 400 and ans.code() == "no_such_ask"):
            raise NoCapacity(f"Vast.ai ask {ask} is no longer available{ans.snippet(secrets)}")
        ans.raise_for_status(f"rent ask {ask}", secrets)
        data = ans.data if isinstance(ans.data, dict) else {}
        if data.get("success") is not True:
            raise NoCapacity(f"Vast.ai did not rent ask {ask}{ans.snippet(secrets)}")
        iid = data.get("new_contract")
        if isinstance(iid, bool) or not isinstance(iid, int):
            raise LaunchFailed(f"Vast.ai rented ask {ask} but named no instance (no 'new_contract')")
        bid = offer.usd_per_hour if offer.interruptible else None
        log.info("rented a Vast.ai instance; verifying it", instance_id=iid, ask_id=int(ask), bid=bid, gpu=offer.gpu)
        self._verify(iid, offer, bid)
        return {"instance_id": iid, "ask_id": int(ask), "bid": bid, "gpu": offer.gpu, "num_gpus": offer.gpu_count}

    def _verify(self, iid: int, offer: Offer, bid: float | None) -> None:
        """Read the instance back; destroy it and raise unless it is the offer chosen at its price."""
        row: dict[str, Any] | None = None
        why = "it was not found"
        for i in range(self.verify_tries):
            if i:
                time.sleep(self.verify_wait_s)
            try:
                row = self._show(iid)
            except (_Unreachable, ProviderError) as exc:
                why = str(exc)
                continue
            if row is not None:
                break
        if row is None:
            gone = self._destroy_quietly(iid)
            raise TransientError(f"could not verify Vast.ai instance {iid} ({why}); "
                                 + (f"destroying it failed: {gone}" if gone else "destroyed it"), retry_after_s=30.0)
        problems = rental_mismatch(row, offer, bid)
        if problems:
            gone = self._destroy_quietly(iid)
            got, chosen = describe_rental(row), describe_offer(offer)
            log.error("Vast.ai rented something else; destroying it", instance_id=iid, problems=problems)
            raise LaunchFailed(
                f"Vast.ai rented {got} instead of the chosen {chosen} ({'; '.join(problems)}); "
                + (f"destroying instance {iid} failed: {gone}" if gone else f"destroyed it (instance {iid})")
            )

    # ---- after the launch (poll is in status.py) ----
    @override
    def cancel(self, handle: dict[str, Any], grace_s: float = 0.0) -> None:
        """Destroy the instance (a cancelled job needs no last checkpoint, so no grace). Idempotent;
        raises TransientError when Vast cannot be reached (the daemon asks again)."""
        iid = _instance_id(handle)
        if iid is not None:
            self._destroy(iid)

    @override
    def release(self, handle: dict[str, Any]) -> None:
        """Destroy what is left (a paused instance's disk still bills). Never raises: a failure is
        logged with the instance id, for a person to clean up."""
        iid = _instance_id(handle)
        if iid is not None:
            self._destroy_quietly(iid)

    @override
    def handle_for(self, attempt_id: str) -> dict[str, Any] | None:
        """The newest instance labelled ``attempt_id``; None when there is none. Raises
        TransientError when Vast cannot be asked (None would read as 'never launched')."""
        rows = [r for r in self._find(attempt_id) if isinstance(r.get("id"), int) and not isinstance(r.get("id"), bool)]
        if not rows:
            return None
        if len(rows) > 1:
            log.warning("several Vast.ai instances carry one attempt's label; adopting the newest",
                        attempt_id=attempt_id, instance_ids=[r["id"] for r in rows])
        row = max(rows, key=lambda r: r["id"])
        bid = row.get("bid_price") if row.get("is_bid") is True else None
        ask = row.get("ask_contract_id") or row.get("ask_id")
        gpu_name = row.get("gpu_name")
        return {
            "instance_id": row["id"],
            "ask_id": ask if isinstance(ask, int) else None,
            "bid": bid if isinstance(bid, int | float) else None,
            "gpu": canonical_gpu(gpu_name, _gpu_ram_gb(row)) if isinstance(gpu_name, str) else None,
            "num_gpus": row.get("num_gpus"),
        }


# ---- helpers for renting ----
class _Unreachable(Exception):
    """Internal: nothing came back from Vast.ai; ``reason`` is safe to show."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class _Answer:
    status: int
    data: Any
    retry_after: str | None
    key: str = field(repr=False)  # only to mask it in Vast's messages

    def code(self) -> str:
        return str(self.data.get("error") or "") if isinstance(self.data, dict) else ""

    def snippet(self, secrets: tuple[str, ...]) -> str:
        """Vast's own short message (``msg``/``error``), with the key and any secret masked."""
        if not isinstance(self.data, dict):
            return ""
        text = str(self.data.get("msg") or self.data.get("error") or "")
        for secret in (self.key, *secrets):
            if secret:
                text = text.replace(secret, "***")
        text = text.strip()[:120]
        return f": {text}" if text else ""

    def raise_for_status(self, what: str, secrets: tuple[str, ...]) -> None:
        if 200 <= self.status < 300:
            return
        if self.status in (401, 403):
            raise ProviderNotConfigured(f"Vast.ai rejected the API key (HTTP {self.status}) on {what}")
        if self.status == 429 or self.status >= 500:
            try:
                wait = float(self.retry_after) if self.retry_after else 10.0
            except ValueError:
                wait = 10.0
            raise TransientError(f"HTTP {self.status} from Vast.ai on {what}", retry_after_s=max(1.0, wait))
        raise LaunchFailed(f"HTTP {self.status} from Vast.ai on {what}{self.snippet(secrets)}")


def _instance_id(handle: dict[str, Any]) -> int | None:
    iid = handle.get("instance_id") if isinstance(handle, dict) else None
    return iid if isinstance(iid, int) and not isinstance(iid, bool) else None


def _gpu_ram_gb(row: dict[str, Any]) -> float | None:
    ram = row.get("gpu_ram")
    return ram / 1000.0 if isinstance(ram, int | float) and not isinstance(ram, bool) else None


def _price(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def rental_mismatch(row: dict[str, Any], offer: Offer, bid: float | None) -> list[str]:
    """Why the instance Vast rented is not the offer chosen at the price chosen; [] when it is.

    Checked: GPU model (canonical, with the instance's VRAM when it reports one), GPU count, the
    machine (when both sides name one), interruptible or not (``is_bid``, when reported), and the
    price paid: ``bid_price`` for a bid (else ``dph_total``), ``dph_total`` on demand, at most
    ``PRICE_SLACK`` above the chosen price. A field needed and missing is a mismatch."""
    problems: list[str] = []
    gpu_name = row.get("gpu_name")
    if not isinstance(gpu_name, str) or not gpu_name.strip():
        problems.append("no GPU model reported")
    else:
        ram = _gpu_ram_gb(row)
        got = canonical_gpu(gpu_name, ram if ram is not None else offer.vram_gb)
        if got != offer.gpu:
            problems.append(f"GPU {got}, not {offer.gpu}")
    if row.get("num_gpus") != offer.gpu_count:
        problems.append(f"{row.get('num_gpus')} GPUs, not {offer.gpu_count}")
    machine, chosen_machine = row.get("machine_id"), offer.detail("machine_id")
    if machine is not None and chosen_machine is not None and machine != chosen_machine:
        problems.append(f"machine {machine}, not {chosen_machine}")
    is_bid = row.get("is_bid")
    if isinstance(is_bid, bool) and is_bid != offer.interruptible:
        problems.append("interruptible, not on-demand" if is_bid else "on-demand, not interruptible")
    chosen = bid if bid is not None else offer.usd_per_hour
    paid = _price(row.get("bid_price")) if bid is not None else None
    paid = paid if paid is not None else _price(row.get("dph_total"))
    if paid is None:
        problems.append("no price reported")
    elif paid > chosen * (1 + PRICE_SLACK) + 0.01:
        problems.append(f"${paid:.4f}/h, not ${chosen:.4f}/h")
    return problems


def describe_rental(row: dict[str, Any]) -> str:
    gpu_name = row.get("gpu_name")
    gpu = canonical_gpu(gpu_name, _gpu_ram_gb(row)) if isinstance(gpu_name, str) else "an unknown GPU"
    is_bid = row.get("is_bid")
    kind = "interruptible" if is_bid is True else "on-demand" if is_bid is False else ""
    price = _price(row.get("bid_price")) if is_bid is True else None
    price = price if price is not None else _price(row.get("dph_total"))
    return " ".join(x for x in (f"{row.get('num_gpus')}x {gpu}", kind, f"at ${price:.4f}/h" if price else "") if x)


def describe_offer(offer: Offer) -> str:
    kind = "interruptible" if offer.interruptible else "on-demand"
    return f"{offer.gpu_count}x {offer.gpu} {kind} at ${offer.usd_per_hour:.4f}/h (ask {offer.offer_id})"
