"""Together AI's managed fine-tuning: a price for the whole job, from its per-token rates.

Together trains the model itself on its own GPUs; tunefleet only chooses it when it is the cheapest
way to get the job done. So this provider answers one question, "what would Together charge for
this job?", and answers it only for what Together actually does:

- LoRA (``adapter: lora``) on a model in Together's fine-tuning list. ``adapter: qlora`` maps to
  Together's LoRA: same adapters and rank, trained on the 16-bit base (Together has no 4-bit base
  option), so the result is at least as good and the price is the LoRA price.
- Full fine-tuning (no ``adapter``) only on models the list marks as full-tunable.
- Anything else gets no offer, and ``unsupported_reason(spec)`` says why (for ``tunefleet offers``).

Price. Together bills ``n_epochs x training-file tokens (+ n_evals x validation tokens)`` at a rate
per 1M tokens set by model-size tier and by LoRA vs full, with no minimum charge
(docs.together.ai/docs/fine-tuning-pricing). Without a live quote the price is
``estimate.tokens`` (which already counts epochs or max_steps) x the tier's rate from the shipped
snapshot ``snapshots/together.json`` (``PriceSource.SNAPSHOT``, dated). Together has no
``max_steps``: a job that sets it would be run as whole epochs (``extra['n_epochs']``, what the
live quote asks about), so for such jobs the live quote can exceed the snapshot one.

Live quote. ``POST /v1/fine-tunes/estimate-price`` (together SDK 3.1.1,
``resources/fine_tuning.py`` + ``types/fine_tuning_estimate_price_params.py``) *requires*
``training_file``: the id of a file already uploaded to Together. Quoting must not upload the
user's data (``tunefleet offers`` is read-only, and ``policy.data`` is judged later by the
scheduler), so a live quote is asked for only when the job has exactly one dataset and its file id
is known: given to the constructor (``training_files``) or found in ``GET /v1/files`` as a
fine-tune file with the same name and size. Otherwise the snapshot rate is used and the offer says
so (``extra['price_basis']``). Any API failure (unreachable, timeout, 4xx/5xx, malformed answer)
falls back to the snapshot price and is reported by ``check()``; ``offers`` never raises for it.

Duration. Together sizes its own hardware; ``hours`` is our estimate of its training time on 8 x
H100 (``estimate.hours("H100", 8)``), and the queue before training (~15 min) is ``startup_s``. The
scheduler adds the two, so the queue is not counted twice. ``gpu`` is ``"managed"`` and
``gpu_count`` 0: nothing is rented per GPU, and the scheduler skips GPU-count and VRAM checks for
managed offers. ``usd_per_hour`` is the job price spread over queue + training, for display and
the ``max_usd_per_hour`` policy only; the scheduler ranks by ``usd_total``.

Launching (upload, ``POST /v1/fine-tunes``, polling events) is a later issue: ``launchable`` is
False and ``launch`` raises ``LaunchFailed``.
"""

from __future__ import annotations

import difflib
import http.client
import json
import math
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from providers.base import (
    LaunchFailed,
    LaunchRequest,
    Offer,
    PriceSource,
    Provider,
    ProviderUnavailable,
    RunState,
    RunStatus,
)

if TYPE_CHECKING:
    from jobs.estimate import Estimate

DEFAULT_BASE_URL = "https://api.together.xyz"
SNAPSHOT_PATH = Path(__file__).parent / "snapshots" / "together.json"
QUEUE_S = 900.0  # typical wait in Together's queue before training starts
REF_GPU, REF_GPU_COUNT = "H100", 8  # what we assume Together trains on, for the duration only
MAX_EPOCHS = 20  # Together accepts n_epochs 1..20
_MAX_BODY = 8 * 1024 * 1024


class _ApiError(Exception):
    """The Together API could not give an answer this time (never carries the key)."""


# ---- the shipped price snapshot ----
@dataclass(frozen=True)
class _Model:
    id: str
    params_b: float
    lora: bool
    full: bool
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class _Tier:
    name: str
    max_params_b: float
    lora: float  # USD per 1M billed tokens
    full: float


@dataclass(frozen=True)
class _Snapshot:
    as_of: str
    source: str
    verified: bool  # someone checked these prices against the provider's own list (else a placeholder)
    minimum_usd: float
    tiers: tuple[_Tier, ...]
    models: tuple[_Model, ...]

    def find(self, base_model: str) -> _Model | None:
        key = base_model.strip().lower()
        for m in self.models:
            if key == m.id.lower() or key in (a.lower() for a in m.aliases):
                return m
        return None

    def tier(self, params_b: float) -> _Tier | None:
        return next((t for t in sorted(self.tiers, key=lambda t: t.max_params_b) if params_b <= t.max_params_b), None)

    def close_names(self, base_model: str) -> list[str]:
        names = [m.id for m in self.models] + [a for m in self.models for a in m.aliases]
        return difflib.get_close_matches(base_model, names, n=2, cutoff=0.6)


def load_snapshot(path: Path = SNAPSHOT_PATH) -> _Snapshot:
    """Read the price snapshot; ProviderUnavailable when it is missing or malformed."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return _Snapshot(
            as_of=str(raw["as_of"]),
            source=str(raw["source"]),
            verified=bool(raw.get("verified")),
            minimum_usd=float(raw.get("minimum_charge_usd", 0.0)),
            tiers=tuple(
                _Tier(str(t["name"]), float(t["max_params_b"]), float(t["lora"]), float(t["full"]))
                for t in raw["tiers"]
            ),
            models=tuple(
                _Model(str(m["id"]), float(m["params_b"]), bool(m["lora"]), bool(m["full"]),
                       tuple(str(a) for a in m.get("aliases", ())))
                for m in raw["models"]
            ),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProviderUnavailable(f"Together price snapshot {path} is unreadable: {exc}") from exc


# ---- what Together would run for a job ----
@dataclass(frozen=True)
class _Plan:
    model: _Model
    training_type: str  # "Lora" | "Full" (Together's names)
    tier: _Tier
    rate: float  # USD per 1M billed tokens
    n_epochs: int  # what Together would be asked to run (it has no max_steps)
    qlora_as_lora: bool


def _n_epochs(spec: dict[str, Any], estimate: Estimate | None) -> int | None:
    """Whole epochs Together would run: ceil(num_epochs), or enough epochs to cover max_steps."""
    if not spec.get("max_steps"):
        return max(1, math.ceil(float(spec.get("num_epochs") or 1)))
    if estimate is None or not estimate.examples:
        return None  # unknown without the dataset
    batch = max(1, int(spec.get("micro_batch_size") or 1) * int(spec.get("gradient_accumulation_steps") or 1))
    n_train = max(1, round(estimate.examples * (1 - float(spec.get("val_set_size") or 0))))
    return max(1, math.ceil(int(spec["max_steps"]) / math.ceil(n_train / batch)))


class TogetherProvider(Provider):
    """Quotes Together AI's managed LoRA / full fine-tuning per job. See the module docstring."""

    name = "together"
    launchable = False

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout_s: float = 10.0,
        snapshot_path: str | os.PathLike[str] | None = None,
        training_files: dict[str, str] | None = None,
        cache_ttl_s: float = 120.0,
    ) -> None:
        """``api_key``/``base_url`` default to TOGETHER_API_KEY / TOGETHER_BASE_URL. ``timeout_s``
        bounds every request. ``training_files`` maps a local dataset path to the id of that file
        already uploaded to Together (else it is looked up by name and size in ``GET /v1/files``)."""
        self.api_key = api_key if api_key is not None else (os.environ.get("TOGETHER_API_KEY") or None)
        base = (base_url or os.environ.get("TOGETHER_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.base_url = base[: -len("/v1")] if base.endswith("/v1") else base
        self.timeout_s = float(timeout_s)
        self.snapshot_path = Path(snapshot_path) if snapshot_path else SNAPSHOT_PATH
        self.training_files = {os.path.abspath(k): v for k, v in (training_files or {}).items()}
        self.cache_ttl_s = float(cache_ttl_s)
        self._snap: _Snapshot | None = None
        self._lock = threading.Lock()  # one live fetch at a time; guards the cache and outcome
        self._cache: dict[str, tuple[float, Any]] = {}
        self._outcome: tuple[float, str | None] | None = None  # (when, error or None) of the last API call
        self.last_unsupported: str | None = None

    # ---- snapshot and support ----
    def _snapshot(self) -> _Snapshot:
        if self._snap is None:
            self._snap = load_snapshot(self.snapshot_path)
        return self._snap

    def _plan(self, spec: dict[str, Any], estimate: Estimate | None) -> _Plan | str:
        snap = self._snapshot()
        base_model = str(spec.get("base_model", ""))
        adapter = spec.get("adapter") or None
        model = snap.find(base_model)
        if model is None:
            near = snap.close_names(base_model)
            hint = f"; did you mean {' or '.join(near)}?" if near else ""
            return (f"Together fine-tunes only the models in its list (snapshot {snap.as_of}); "
                    f"{base_model!r} is not one of them{hint}")
        if adapter in ("lora", "qlora"):
            if not model.lora:
                return f"Together does not offer LoRA fine-tuning for {model.id}"
            training_type = "Lora"
        elif adapter is None:
            if not model.full:
                return f"Together offers only LoRA fine-tuning for {model.id}, not full fine-tuning"
            training_type = "Full"
        else:
            return f"Together has no equivalent of adapter {adapter!r}"
        tier = snap.tier(model.params_b)
        if tier is None:
            return f"no published Together rate tier for a {model.params_b:g}B model in the snapshot ({snap.as_of})"
        n_epochs = _n_epochs(spec, estimate)
        if n_epochs is not None and n_epochs > MAX_EPOCHS:
            return f"the job needs {n_epochs} epochs; Together runs at most {MAX_EPOCHS}"
        return _Plan(model, training_type, tier, tier.lora if training_type == "Lora" else tier.full,
                     n_epochs or 1, adapter == "qlora")

    def unsupported_reason(self, spec: dict[str, Any], estimate: Estimate | None = None) -> str | None:
        """Why Together would make no offer for this job (None: it would). No network."""
        try:
            plan = self._plan(spec, estimate)
        except ProviderUnavailable as exc:
            return str(exc)
        return plan if isinstance(plan, str) else None

    # ---- health ----
    @override
    def check(self) -> tuple[bool, str]:
        try:
            snap = self._snapshot()
        except ProviderUnavailable as exc:
            return False, str(exc)
        published = (f"quoting per-token prices from a snapshot verified {snap.as_of}" if snap.verified else
                     f"quoting PLACEHOLDER per-token prices ({snap.as_of}, recalled, not verified; "
                     "shown with offers --all only)")
        if not self.api_key:
            return False, f"no TOGETHER_API_KEY: {published}"
        with self._lock:
            outcome = self._outcome
            if outcome is None or time.monotonic() - outcome[0] > self.cache_ttl_s:
                try:
                    self._files()  # a cheap authenticated call: is the API there, is the key good?
                except _ApiError:
                    pass
                outcome = self._outcome
        error = outcome[1] if outcome else None
        if error:
            return False, f"Together API degraded ({error}): {published}"
        return True, (f"Together API reachable at {self.base_url}: live estimates for datasets already "
                      f"uploaded, else {published}")

    # ---- offers ----
    @override
    def offers(self, spec: dict[str, Any], estimate: Estimate) -> list[Offer]:
        plan = self._plan(spec, estimate)
        if isinstance(plan, str):
            self.last_unsupported = plan
            return []
        self.last_unsupported = None
        snap = self._snapshot()
        billed = int(estimate.tokens)
        usd = max(snap.minimum_usd, billed * plan.rate / 1e6)
        rate = plan.rate
        source, price_date = PriceSource.SNAPSHOT, snap.as_of
        basis = f"published {plan.tier.name} {plan.training_type} rate (snapshot {snap.as_of})"
        if self.api_key:
            with self._lock:
                live, note = self._live_quote(spec, plan)
            if live is not None:
                usd, billed = live
                rate = usd / billed * 1e6 if billed else plan.rate
                source, price_date = PriceSource.LIVE, None
                basis = "Together estimate-price API"
            else:
                basis += f"; {note}"

        train_h = estimate.hours(REF_GPU, REF_GPU_COUNT)
        if train_h is None:  # no throughput figure: fall back to the tokens at the A100 rate
            train_h = estimate.tokens / max(estimate.tokens_per_s_a100, 1e-9) / 3600.0
        wall_h = QUEUE_S / 3600.0 + train_h
        extra: list[tuple[str, Any]] = [
            ("billed_tokens", billed),
            ("rate_per_mtok", round(rate, 6)),
            ("together_model", plan.model.id),
            ("training_type", plan.training_type),
            ("n_epochs", plan.n_epochs),
            ("size_tier", plan.tier.name),
            ("price_basis", basis),
        ]
        if plan.qlora_as_lora:
            extra.append(("qlora_as_lora", True))
        return [Offer(
            provider=self.name,
            offer_id=f"together:{plan.model.id}:{plan.training_type.lower()}",
            gpu="managed",
            gpu_count=0,
            vram_gb=0.0,
            usd_per_hour=usd / wall_h,
            interruptible=False,
            hazard_per_hour=0.0,
            region="together",
            on_premises=False,
            startup_s=QUEUE_S,
            price_source=source,
            price_date=price_date,
            price_verified=source is not PriceSource.SNAPSHOT or snap.verified,
            usd_total=usd,
            hours=train_h,
            extra=tuple(extra),
        )]

    # ---- the live quote (called with self._lock held) ----
    def _live_quote(self, spec: dict[str, Any], plan: _Plan) -> tuple[tuple[float, int] | None, str]:
        """((usd, billed tokens), "") from estimate-price, or (None, why the snapshot rate is used)."""
        try:
            file_id, why = self._training_file(spec)
            if file_id is None:
                return None, why
            body = self._estimate_body(spec, plan, file_id)
            answer = self._cached("estimate:" + json.dumps(body, sort_keys=True),
                                  lambda: self._call("POST", "/v1/fine-tunes/estimate-price", body))
            if not isinstance(answer, dict) or "estimation_available" not in answer:
                raise self._fail("malformed estimate-price answer")
            if answer["estimation_available"] is False:
                return None, f"Together cannot estimate yet ({answer.get('unavailable_reason', 'no reason given')})"
            price = answer.get("estimated_total_price")
            if isinstance(price, bool) or not isinstance(price, (int, float)) or not math.isfinite(price) or price < 0:
                raise self._fail("estimate-price answer has no usable estimated_total_price")
            tokens = 0
            for key in ("estimated_train_token_count", "estimated_eval_token_count"):
                v = answer.get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
                    tokens += int(v)
            return (float(price), tokens), ""
        except _ApiError as exc:
            return None, f"live estimate failed ({exc})"

    def _estimate_body(self, spec: dict[str, Any], plan: _Plan, file_id: str) -> dict[str, Any]:
        """Body of POST /v1/fine-tunes/estimate-price, as the together SDK 3.1.1 builds it."""
        if plan.training_type == "Lora":
            r = int(spec.get("lora_r") or 8)
            modules = spec.get("lora_target_modules")
            training_type: dict[str, Any] = {
                "type": "Lora",
                "lora_r": r,
                "lora_alpha": int(round(float(spec.get("lora_alpha") or 2 * r))),
                "lora_dropout": float(spec.get("lora_dropout") or 0.0),
                "lora_trainable_modules": ",".join(modules) if modules else "all-linear",
            }
        else:
            training_type = {"type": "Full"}
        return {
            "training_file": file_id,
            "model": plan.model.id,
            "n_epochs": plan.n_epochs,
            "n_evals": 0,
            "training_method": {"method": "sft", "train_on_inputs": "auto"},
            "training_type": training_type,
        }

    def _training_file(self, spec: dict[str, Any]) -> tuple[str | None, str]:
        datasets = spec.get("datasets") or []
        if len(datasets) != 1:
            return None, f"Together trains on one uploaded file and this job has {len(datasets)} datasets"
        path = os.path.abspath(str(datasets[0]["path"]))
        if path in self.training_files:
            return self.training_files[path], ""
        try:
            size = os.path.getsize(path)
        except OSError:
            return None, f"dataset {path} is not readable here"
        name = os.path.basename(path)
        files = [
            f for f in self._files()
            if f.get("filename") == name and f.get("bytes") == size and f.get("purpose", "fine-tune") == "fine-tune"
            and isinstance(f.get("id"), str)
        ]
        if not files:
            return None, f"{name} is not uploaded to Together yet (no live estimate without a file id)"
        files.sort(key=lambda f: f.get("created_at") or 0, reverse=True)
        return files[0]["id"], ""

    def _files(self) -> list[dict[str, Any]]:
        answer = self._cached("files", lambda: self._call("GET", "/v1/files"))
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list):
            raise self._fail("malformed /v1/files answer")
        return [f for f in data if isinstance(f, dict)]

    def _cached(self, key: str, fetch: Any) -> Any:
        hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < self.cache_ttl_s:
            return hit[1]
        value = fetch()
        self._cache[key] = (time.monotonic(), value)
        return value

    def _fail(self, message: str) -> _ApiError:
        message = self._redact(message)
        self._cache.clear()
        self._outcome = (time.monotonic(), message)
        return _ApiError(message)

    def _redact(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One request with a timeout; JSON back, or _ApiError (the key never in its message)."""
        req = urllib.request.Request(
            self.base_url + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Accept": "application/json", "Content-Type": "application/json", "User-Agent": "tunefleet"},
        )
        # unredirected: a redirect to another host never gets the key
        req.add_unredirected_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read(_MAX_BODY)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in (401, 403):
                raise self._fail(f"TOGETHER_API_KEY rejected: HTTP {exc.code} from {path}") from None
            if exc.code == 429:
                raise self._fail(f"rate limited: HTTP 429 from {path}") from None
            raise self._fail(f"HTTP {exc.code} from {path}") from None
        except TimeoutError:
            raise self._fail(f"no answer from {path} within {self.timeout_s:g} s") from None
        except urllib.error.URLError as exc:
            raise self._fail(f"{self.base_url} unreachable: {exc.reason}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise self._fail(f"connection to {self.base_url} failed: {type(exc).__name__}") from None
        try:
            value = json.loads(raw)
        except ValueError:
            raise self._fail(f"malformed JSON from {path}") from None
        self._outcome = (time.monotonic(), None)
        return value

    # ---- attempts: not built yet ----
    @override
    def launch(self, request: LaunchRequest, offer: Offer) -> dict[str, Any]:
        raise LaunchFailed(
            "launching on Together is not built yet: tunefleet only quotes its prices "
            "(upload the data and start the job with Together's own CLI meanwhile)"
        )

    @override
    def poll(self, handle: dict[str, Any]) -> RunStatus:
        return RunStatus(RunState.UNKNOWN, detail="Together jobs are not launched by tunefleet yet")

    @override
    def cancel(self, handle: dict[str, Any], grace_s: float = 0.0) -> None:
        return None
