"""The job file: what a user writes, and the validated object everything else reads.

Why this module exists: a fine-tuning job can wait in a queue, rent a GPU and run for
hours before it touches a setting that was never going to work (``adapter: qlora`` on an
unquantized base, a dataset path with a typo, a checkpoint store nobody can write to).
Every such mistake found *here*, on the user's laptop and before a cent is spent, is a
failed cloud run that never happens. So the loader is deliberately thorough and
deliberately chatty: it reports **every** problem in the file at once, each with the line
it is on and, for typos, the key that was probably meant.

A job file is YAML with Axolotl's key names (``base_model``, ``adapter``, ``lora_r``,
``micro_batch_size`` ...) so existing configs mostly carry over, plus tunefleet's own
sections: ``resources`` (what hardware), ``policy`` (what it may cost, where it may run)
and ``checkpoint`` (where progress survives a preemption).

Pydantic validates at the edge; everything downstream takes a :class:`JobSpec` and never
re-checks. The spec travels to the GPU machine as :meth:`JobSpec.to_payload_dict` and is
rebuilt there with :meth:`JobSpec.from_payload_dict`.

This module imports only pydantic, yaml and the standard library: the CLI imports it on
every start, and the orchestrator must never pull in torch.
"""

from __future__ import annotations

import math
import os
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from infra.config import did_you_mean, unknown_provider

__all__ = [
    "BUILTIN_TINY_MODEL",
    "DEFAULT_SAVE_EVERY",
    "SUPPORTED_STORE_SCHEMES",
    "Checkpoint",
    "DatasetSpec",
    "JobFileError",
    "JobSpec",
    "Policy",
    "Problem",
    "Resources",
    "load_job_file",
    "load_job_text",
]

#: The small model bundled with tunefleet, so the demo and the tests need no download.
BUILTIN_TINY_MODEL = "tunefleet/tiny-llama"

#: Checkpoint stores tunefleet can write to. Anything else is refused at load time rather
#: than at the first save, hours into a run.
SUPPORTED_STORE_SCHEMES: tuple[str, ...] = ("file", "s3")

#: Steps between checkpoints when neither ``save_steps`` nor ``checkpoint.interval`` is given.
DEFAULT_SAVE_EVERY = 50
MAX_STEPS = 10_000_000  # far beyond any fine-tune; keeps every count a small integer downstream
MAX_PRIORITY = 1_000_000
MAX_CHECKPOINT_INTERVAL_S = 7 * 24 * 3600.0  # a week: anything longer is a typo for a step count

_STORE_HINT = "use file:///path or s3://bucket/prefix"
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_URI_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# owner/name, as on the Hugging Face hub ("tatsu-lab/alpaca").
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_DATASET_SUFFIXES = (".jsonl", ".json")
# Error type of the model-level rule check; the loader replaces these with its own, finer report.
_RULE_ERROR = "job_rule"
# A job file is a few dozen values. Anything that expands past this is an alias bomb or junk,
# and validating it would take the CLI down with it.
_MAX_NODES = 100_000


# ---------------------------------------------------------------------------------------------
# Field types that pydantic's unions would report badly
# ---------------------------------------------------------------------------------------------
# ``float | Literal["auto"]`` as a plain union makes pydantic report one error per member with
# locations like ``gpu_vram_gb.literal['auto']``. These validators give one clear message.

def _invalid(kind: str, message: str) -> PydanticCustomError:
    """A validation error with our own wording (passed as context: braces in it stay literal)."""
    return PydanticCustomError(kind, "{reason}", {"reason": message})


_TRUE_WORDS = frozenset({"true", "yes", "on", "y", "t", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "n", "f", "0"})


def _validate_vram(value: object) -> float | Literal["auto"]:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = None
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number) or number <= 0 or number > 4096:
        raise _invalid("vram", "should be 'auto' or the GPU memory in GB, a number from 1 to 4096 (e.g. 24)")
    return number


def _validate_bf16(value: object) -> bool | Literal["auto"]:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word == "auto":
            return "auto"
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    raise _invalid("bf16", "should be true, false or 'auto'")


VramGB = Annotated[float | Literal["auto"], PlainValidator(_validate_vram)]
Bf16 = Annotated[bool | Literal["auto"], PlainValidator(_validate_bf16)]


def _frozen_config() -> ConfigDict:
    return ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------
# Pure checks, shared by the models (always on) and the loader
# ---------------------------------------------------------------------------------------------


def _dataset_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be a dataset, judged from the string alone (no filesystem)."""
    if not path.strip():
        return "dataset path is empty"
    if _URI_SCHEME_RE.match(path):
        return (
            f"only local JSONL datasets are supported for now (got {path!r}); "
            "download it and give the local path"
        )
    if not path.lower().endswith(_DATASET_SUFFIXES):
        if _HUB_ID_RE.fullmatch(path) and not os.path.splitext(path)[1]:
            return (
                f"only local JSONL datasets are supported for now ({path!r} looks like a Hugging Face "
                "hub id); download it and give the local path"
            )
        return f"dataset file must end in .jsonl or .json (got {path!r})"
    return None


def _store_problem(store: str) -> str | None:
    """Why ``store`` is not a checkpoint store URI we can write to."""
    if "://" not in store:
        if store.startswith("/"):
            return f"{store!r} has no storage scheme (use file://{store} for a local folder)"
        return f"{store!r} is not a storage URI ({_STORE_HINT})"
    try:
        parsed = urlparse(store)
    except ValueError as exc:
        return f"cannot parse storage URI {store!r}: {exc} ({_STORE_HINT})"
    scheme = parsed.scheme.lower()
    if scheme not in SUPPORTED_STORE_SCHEMES:
        shown = scheme or store.split("://", 1)[0]
        return f"unknown storage scheme {shown!r} in {store!r} ({_STORE_HINT})"
    if scheme == "s3" and not parsed.netloc:
        return f"s3 store needs a bucket name: s3://bucket/prefix (got {store!r})"
    if scheme == "file" and (parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/")):
        return f"file store needs an absolute path: file:///abs/path (got {store!r})"
    return None


_UNKNOWN: Any = object()  # a rule input that is missing a valid value: rules depending on it are skipped


def _rule_violations(get: Callable[[str], Any]) -> list[tuple[str, str]]:
    """Cross-field rules as ``(loc, message)`` pairs; ``f"{loc}: {message}"`` reads as a sentence.

    ``get(name)`` returns a field's validated value, or ``_UNKNOWN`` when the field itself is
    invalid (its own error is reported elsewhere). Kept apart from the model so that the loader
    can evaluate the rules even when unrelated fields fail, and report everything together.
    """
    out: list[tuple[str, str]] = []
    adapter = get("adapter")
    q4 = get("load_in_4bit")
    q8 = get("load_in_8bit")

    if q4 is True and q8 is True:
        out.append(("load_in_8bit", "load_in_4bit and load_in_8bit are both true: pick one"))
    if adapter == "qlora" and q4 is False:
        out.append(
            (
                "adapter",
                "qlora needs load_in_4bit: true (QLoRA trains LoRA adapters on a 4-bit base)",
            )
        )
    if adapter == "lora" and q4 is True:
        out.append(
            (
                "adapter",
                "lora with load_in_4bit: true is QLoRA: use adapter: qlora "
                "(or drop load_in_4bit to train LoRA on the full-precision base)",
            )
        )
    if adapter is None:
        for key, fix in (("load_in_4bit", "adapter: qlora"), ("load_in_8bit", "adapter: lora")):
            if get(key) is True:
                out.append(
                    (
                        key,
                        f"true needs an adapter: a quantized model cannot be fully "
                        f"fine-tuned (set {fix}, or drop {key})",
                    )
                )

    modules = get("lora_target_modules")
    if (
        adapter in ("lora", "qlora")
        and isinstance(modules, list)
        and get("lora_target_linear") is True
    ):
        out.append(
            (
                "lora_target_linear",
                "lora_target_modules and lora_target_linear: true both choose the LoRA target "
                "layers: give one",
            )
        )

    max_steps = get("max_steps")
    warmup = get("warmup_steps")
    if isinstance(max_steps, int) and isinstance(warmup, int) and warmup > max_steps:
        out.append(
            (
                "warmup_steps",
                f"warmup_steps ({warmup}) is more than max_steps ({max_steps}): lower warmup_steps",
            )
        )

    strategy = get("strategy")
    gpus = get("resources.gpus")
    if strategy in ("ddp", "fsdp") and isinstance(gpus, int) and gpus < 2:
        out.append(
            (
                "strategy",
                f"{strategy} runs one process per GPU and resources.gpus is {gpus}: ask for 2 or more "
                "GPUs, or leave strategy out (auto)",
            )
        )
    if strategy == "fsdp" and (q4 is True or q8 is True):
        out.append(
            (
                "strategy",
                "fsdp with a quantized base (load_in_4bit/load_in_8bit) is not supported: use "
                "strategy: ddp (each GPU holds the small 4-bit base) or leave strategy out",
            )
        )

    evals = get("eval_datasets")
    val = get("val_set_size")
    if isinstance(evals, list) and evals and isinstance(val, float) and val > 0:
        out.append(
            (
                "eval_datasets",
                "eval_datasets and val_set_size both choose the eval data: give one (eval_datasets to "
                "measure on other files, val_set_size to hold out a share of datasets)",
            )
        )

    save_steps = get("save_steps")
    interval = get("checkpoint.interval")
    if isinstance(save_steps, int) and isinstance(interval, int) and save_steps != interval:
        out.append(
            (
                "save_steps",
                f"save_steps and checkpoint.interval disagree ({save_steps} vs {interval}): give one",
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------------------


class DatasetSpec(BaseModel):
    """One training dataset: a local JSONL file and how to turn its rows into text."""

    model_config = _frozen_config()

    path: str
    type: Literal["completion", "alpaca", "chat_template"] = "completion"
    #: Column holding the text (completion, default "text") or the messages (chat_template,
    #: default "messages"). Ignored for alpaca, whose columns are fixed.
    field: str | None = None

    @field_validator("path")
    @classmethod
    def _path_is_local_jsonl(cls, value: str) -> str:
        problem = _dataset_path_problem(value)
        if problem:
            raise _invalid("dataset_path", problem)
        return value

    @property
    def text_field(self) -> str:
        """The column to read: ``field``, or the default for this dataset type."""
        if self.field:
            return self.field
        return "messages" if self.type == "chat_template" else "text"


class StagedInput(BaseModel):
    """One local input (a dataset file, a model folder) uploaded to the job's store at submit
    (``jobs.inputs``): where, its content address, and the facts the daemon's estimate needs once
    the user's copy is gone. Written by ``submit``, not by hand."""

    model_config = _frozen_config()

    uri: str = Field(min_length=1, max_length=2048)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    kind: Literal["file", "folder"]
    size: int = Field(ge=0, le=2**50)
    files: int = Field(ge=1, le=1_000_000)
    examples: int | None = Field(None, ge=0)
    chars: int | None = Field(None, ge=0)
    config: dict[str, Any] | None = None


class Resources(BaseModel):
    """What the job needs to run. ``gpus: 0`` means CPU only.

    ``device: auto`` uses the GPU an attempt lands on, or the CPU when it has none; the scheduler
    places a job that asks for GPUs on a CPU only when it says ``device: cpu``. The payload with
    ``device: cuda`` refuses to run without a GPU.
    """

    model_config = _frozen_config()

    gpus: int = Field(1, ge=0, le=64)
    gpu_vram_gb: VramGB = "auto"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    cpus: int = Field(1, ge=1, le=4096)
    #: Machines to train on. Only 1 today: accepted (so a job file can say it) and left out of the payload.
    nodes: int = Field(1, exclude=True)

    @field_validator("nodes")
    @classmethod
    def _one_node(cls, value: int) -> int:
        if value != 1:
            raise _invalid("nodes", f"{value} nodes: multi-node training is not supported yet; use one machine "
                                    "(nodes: 1) with up to 64 GPUs (resources.gpus)")
        return value


class Policy(BaseModel):
    """Limits on where the job may run and what it may cost."""

    model_config = _frozen_config()

    max_usd: float | None = Field(None, gt=0, le=10_000_000)
    max_usd_per_hour: float | None = Field(None, gt=0, le=100_000)
    spot: Literal["allow", "never", "only"] = "allow"
    #: ``restricted`` data stays on premises (the local provider).
    data: Literal["open", "restricted"] = "open"
    providers: list[str] | None = Field(None, min_length=1, max_length=50)
    #: Owned capacity first whenever it can do the job (default: only when it costs at most
    #: ``owned_tolerance`` (config) more than the best rented offer).
    prefer_owned: bool = False
    #: ISO 8601. A time without a zone is taken as UTC; stored tz-aware, in UTC.
    deadline: datetime | None = None

    @field_validator("deadline")
    @classmethod
    def _deadline_in_utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Checkpoint(BaseModel):
    """Where progress is saved so that a preempted job resumes instead of restarting."""

    model_config = _frozen_config()

    #: URI of the store; ``None`` means the orchestrator's default local folder (filled later).
    store: str | None = None
    #: Steps between checkpoints; same meaning as the top-level ``save_steps``.
    interval: int | None = Field(None, gt=0, le=MAX_STEPS)
    #: Seconds of training between checkpoints; ``None``: not time-based. When set, a checkpoint is
    #: saved at the first step end where at least ``interval_s`` seconds (monotonic clock) have
    #: passed since the last save, or since training started in this attempt; the step interval
    #: (``interval``/``save_steps``) still applies too, so it stays a ceiling on the steps between
    #: checkpoints. The orchestrator can set it from a placement's hazard (Young/Daly).
    interval_s: float | None = Field(None, gt=0, le=MAX_CHECKPOINT_INTERVAL_S)
    #: How many committed checkpoints to keep.
    keep: int = Field(3, ge=1, le=1000)
    #: Another job (same store) whose newest checkpoint seeds this one when it has none of its own:
    #: how a successive-halving sweep continues a promising trial for more steps.
    resume_from: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")

    @field_validator("store")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is not None:
            problem = _store_problem(value)
            if problem:
                raise _invalid("store_uri", problem)
        return value


def gang_shape(strategy: str, gpus: int, adapter: str | None) -> tuple[int, str]:
    """(processes, strategy) a job is planned for: one process per GPU unless ``single``; ``auto``
    is DDP for an adapter, FSDP for a full fine-tune (and ``single`` on one GPU or none)."""
    world = 1 if strategy == "single" else max(1, gpus)
    if world == 1 and strategy == "auto":
        return 1, "single"
    if strategy == "auto":
        return world, "ddp" if adapter else "fsdp"
    return world, strategy


#: The keys whose entries are dataset files (checked, staged and fetched alike).
DATASET_KEYS = ("datasets", "eval_datasets")

_SECTIONS: dict[str, type[BaseModel]] = {"resources": Resources, "checkpoint": Checkpoint, "policy": Policy}


class JobSpec(BaseModel):
    """A validated fine-tuning job. Build it with :func:`load_job_file`, not by hand."""

    model_config = _frozen_config()

    name: str | None = None
    #: A Hugging Face id, a local directory, or the built-in ``tunefleet/tiny-llama``.
    base_model: str
    #: ``None`` is a full fine-tune.
    adapter: Literal["qlora", "lora"] | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False

    # LoRA settings; allowed but ignored without an adapter.
    lora_r: int = Field(8, gt=0, le=4096)
    lora_alpha: int = Field(16, gt=0, le=1_000_000)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        None, min_length=1, max_length=200)
    lora_target_linear: bool = False

    sequence_len: int = Field(512, ge=8, le=262144)
    sample_packing: bool = False
    micro_batch_size: int = Field(1, gt=0, le=65536)
    gradient_accumulation_steps: int = Field(1, gt=0, le=65536)
    num_epochs: float = Field(1.0, gt=0, le=10_000)
    #: When set, wins over ``num_epochs``.
    max_steps: int | None = Field(None, gt=0, le=MAX_STEPS)
    learning_rate: float = Field(2e-4, gt=0, le=1)
    lr_scheduler: Literal[
        "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"
    ] = "cosine"
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    weight_decay: float = Field(0.0, ge=0, le=100)
    max_grad_norm: float = Field(1.0, gt=0, le=1e6)
    optimizer: Literal[
        "adamw_torch",
        "adamw_torch_fused",
        "paged_adamw_32bit",
        "paged_adamw_8bit",
        "adamw_bnb_8bit",
        "adamw_8bit",
        "sgd",
        "adafactor",
    ] = "adamw_torch"
    seed: int = Field(42, ge=0, le=2**32 - 1)  # what numpy and torch accept

    datasets: list[DatasetSpec] = Field(min_length=1)
    #: Data to measure eval loss on (not trained on), instead of holding out ``val_set_size``.
    eval_datasets: list[DatasetSpec] | None = Field(None, min_length=1, max_length=100)
    #: Fraction of the data held out for eval loss.
    val_set_size: float = Field(0.0, ge=0, lt=1)
    save_steps: int | None = Field(None, gt=0, le=MAX_STEPS)
    logging_steps: int = Field(1, gt=0, le=MAX_STEPS)
    bf16: Bf16 = "auto"
    gradient_checkpointing: bool = False
    #: How a job on several GPUs uses them (one process per GPU, one machine): ``ddp`` replicates
    #: the model and splits each batch (LoRA/QLoRA: the base is small next to the GPU); ``fsdp``
    #: shards weights, gradients and optimizer state (a full fine-tune too big for one GPU);
    #: ``single`` trains in one process on one device; ``auto`` is ``ddp`` for an adapter and
    #: ``fsdp`` for a full fine-tune when ``resources.gpus > 1``, else ``single``.
    strategy: Literal["auto", "single", "ddp", "fsdp"] = "auto"
    priority: int = Field(0, ge=-MAX_PRIORITY, le=MAX_PRIORITY)

    resources: Resources = Field(default_factory=Resources)
    policy: Policy = Field(default_factory=Policy)
    checkpoint: Checkpoint = Field(default_factory=Checkpoint)
    #: Local inputs staged to the store at submit (original path -> where it went); see jobs.inputs.
    inputs: dict[str, StagedInput] = Field(default_factory=dict, max_length=1000)

    @field_validator("name")
    @classmethod
    def _name_chars(cls, value: str | None) -> str | None:
        if value is not None and not _NAME_RE.fullmatch(value):
            raise _invalid(
                "job_name", "name must be 1-64 characters of letters, digits, '.', '_' or '-'"
            )
        return value

    @field_validator("base_model")
    @classmethod
    def _base_model_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise _invalid("base_model", "base_model is empty")
        return value

    @model_validator(mode="after")
    def _cross_field_rules(self) -> JobSpec:
        def get(key: str) -> Any:
            if "." in key:
                section, name = key.split(".", 1)
                return getattr(getattr(self, section), name)
            return getattr(self, key)

        violations = _rule_violations(get)
        if violations:
            raise _invalid(_RULE_ERROR, "; ".join(f"{loc}: {msg}" for loc, msg in violations))
        return self

    @property
    def world_size(self) -> int:
        """Processes the job is planned for: one per GPU it asks for, unless ``strategy: single``."""
        return gang_shape(self.strategy, self.resources.gpus, self.adapter)[0]

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step, whatever the attempt's process count: micro batch x
        accumulation x the planned processes (``world_size``). An attempt on fewer or more
        processes changes its accumulation to keep this (``jobs.gang.plan``)."""
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size

    @property
    def distributed_strategy(self) -> str:
        """``strategy`` with ``auto`` resolved for ``world_size`` processes: single, ddp or fsdp."""
        return gang_shape(self.strategy, self.resources.gpus, self.adapter)[1]

    @property
    def save_every(self) -> int:
        """Steps between checkpoints: ``checkpoint.interval``, else ``save_steps``, else 50."""
        return self.checkpoint.interval or self.save_steps or DEFAULT_SAVE_EVERY

    @property
    def display_name(self) -> str:
        """``name``, or one made from the base model and the method, e.g. ``tiny-llama-qlora``."""
        if self.name:
            return self.name
        stem = self.base_model.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "job"
        suffix = f"-{self.adapter or 'full'}"
        return stem[: 64 - len(suffix)] + suffix

    def to_payload_dict(self) -> dict[str, Any]:
        """JSON-safe dict (datetimes as ISO strings) to ship to the machine that trains."""
        return self.model_dump(mode="json")

    @classmethod
    def from_payload_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        """Rebuild a spec from :meth:`to_payload_dict` output (validates again; no file checks)."""
        return cls.model_validate(data)


# ---------------------------------------------------------------------------------------------
# Problems and the error that carries them
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a job file.

    ``loc`` is the dotted key path (``policy.spot``, ``datasets[0].path``), ``""`` for the whole
    file; ``line`` is 1-based, ``None`` when unknown.
    """

    loc: str
    message: str
    line: int | None = None

    def render(self, source: str) -> str:
        """``job.yaml:12: policy.spot: Input should be ...``."""
        where = f"{source}:{self.line}" if self.line is not None else source
        return f"{where}: {self.loc}: {self.message}" if self.loc else f"{where}: {self.message}"


class JobFileError(Exception):
    """A job file that cannot run, with every problem found in it."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        super().__init__(source, problems)
        self.source = source
        self.problems = problems

    def __str__(self) -> str:
        return "\n".join(p.render(self.source) for p in self.problems)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

_MISSING = "required key is missing"
_NOT_A_MAPPING = "a job file is a YAML mapping of keys like base_model: ..., datasets: ..."

_Path = tuple[str | int, ...]


MAX_JOB_FILE_BYTES = 1 << 20  # a job file is a page of settings; data goes in datasets: files


def load_job_file(path: str | os.PathLike[str], *, check_files: bool = True, known_providers=None,
                  now: float | None = None, warnings: list[str] | None = None) -> JobSpec:
    """Read and validate a job file. Relative paths inside it are relative to its folder.

    ``check_files``: also check that datasets and a local model exist, read every dataset line
    against its format, and check ``lora_target_modules`` against the model's architecture.
    ``known_providers``: the provider names ``policy.providers`` may use. ``now``: a deadline must
    be after it. ``warnings``: collects what is worth saying but not an error (examples that will
    be cut or dropped).

    Raises :class:`JobFileError` (and nothing else) listing every problem found.
    """
    source = os.fspath(path)
    try:
        size = os.path.getsize(source)
    except OSError:
        size = 0  # reported by the read below
    if size > MAX_JOB_FILE_BYTES:
        raise JobFileError(source, [Problem("", f"the job file is {size / 2**20:.1f} MiB; a job file is at most "
                                                f"{MAX_JOB_FILE_BYTES >> 20} MiB of settings (data goes in datasets: files)")])
    try:
        raw = Path(source).read_bytes()
    except FileNotFoundError:
        raise JobFileError(source, [Problem("", "job file not found")]) from None
    except IsADirectoryError:
        raise JobFileError(source, [Problem("", "is a directory, not a job file")]) from None
    except (OSError, ValueError) as exc:
        raise JobFileError(source, [Problem("", f"cannot read job file: {exc}")]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise JobFileError(source, [Problem("", "job file is not UTF-8 text", line)]) from None
    base_dir = os.path.dirname(os.path.abspath(source))
    return load_job_text(text, base_dir=base_dir, source_name=source, check_files=check_files,
                         known_providers=known_providers, now=now, warnings=warnings)


def load_job_text(
    text: str,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    source_name: str = "<job>",
    check_files: bool = True,
    known_providers=None,
    now: float | None = None,
    warnings: list[str] | None = None,
) -> JobSpec:
    """Validate job-file text. ``base_dir`` (default: the current folder) anchors relative paths.
    The other arguments are :func:`load_job_file`'s.

    Raises :class:`JobFileError` (and nothing else) listing every problem found.
    """
    if isinstance(text, str) and len(text.encode("utf-8", "surrogatepass")) > MAX_JOB_FILE_BYTES:
        raise JobFileError(source_name, [Problem("", f"the job text is over {MAX_JOB_FILE_BYTES >> 20} MiB; "
                                                     "a job file is a page of settings")])
    try:
        return _load(text, base_dir, source_name, check_files, known_providers, now, warnings)
    except JobFileError:
        raise
    except RecursionError:
        raise JobFileError(source_name, [Problem("", "the document is nested too deeply")]) from None
    except Exception as exc:  # the contract is "only JobFileError"; keep the cause visible
        raise JobFileError(
            source_name, [Problem("", f"internal error while validating: {type(exc).__name__}: {exc}")]
        ) from exc


def _load(text: str, base_dir: str | os.PathLike[str] | None, source: str, check_files: bool,
          known_providers=None, now: float | None = None, warnings: list[str] | None = None) -> JobSpec:
    if not isinstance(text, str):
        raise JobFileError(source, [Problem("", "job file text must be a string")])
    data, lines, duplicates = _parse_yaml(text, source)
    if not isinstance(data, dict) or not data:
        raise JobFileError(source, [Problem("", _NOT_A_MAPPING, lines.get(()))])

    problems: list[tuple[_Path, str]] = []
    base = os.path.abspath(os.fspath(base_dir) if base_dir is not None else os.getcwd())
    if check_files:
        data = _check_files(data, base, problems)

    pydantic_errors: list[Any] = []
    spec: JobSpec | None = None
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        pydantic_errors = exc.errors(include_url=False, include_context=False, include_input=True)

    rule_problems = [(_split_loc(loc), msg) for loc, msg in _rule_violations(_raw_getter(data))]
    for err in pydantic_errors:
        if err["type"] == _RULE_ERROR and rule_problems:
            continue  # reported below, one problem per rule, each at its own key
        problems.append(_describe(err))
    problems.extend(rule_problems)
    if check_files:
        problems.extend(_check_contents(data, warnings if warnings is not None else []))
    if known_providers is not None:
        problems.extend(_check_providers(data, tuple(known_providers)))
    if now is not None and spec is not None and spec.policy.deadline is not None \
            and spec.policy.deadline.timestamp() <= now:
        past = f"{spec.policy.deadline.isoformat()} is already past; set a later deadline, or remove it"
        problems.append((("policy", "deadline"), past))

    if problems or duplicates or spec is None:
        raise JobFileError(source, _finish(problems, lines, duplicates))
    return spec


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[_Path, int], list[Problem]]:
    """YAML text to (data, line map, duplicate-key problems), or JobFileError for bad syntax."""
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None, {}, []
        lines, duplicates = _walk_nodes(node)
        if _expanded_size(node) > _MAX_NODES:
            raise JobFileError(
                source,
                [
                    Problem(
                        "",
                        f"the document expands to more than {_MAX_NODES} values "
                        "(recursive or repeated YAML aliases?); a job file is small",
                    )
                ],
            )
        try:
            data = loader.construct_document(node)
        except (ValueError, TypeError, OverflowError) as exc:  # e.g. "!!int abc", "2026-13-45"
            raise JobFileError(source, [Problem("", f"invalid YAML value: {exc}")]) from None
        return data, lines, duplicates
    except yaml.YAMLError as exc:
        raise JobFileError(source, [_yaml_problem(exc, text)]) from None
    finally:
        if loader is not None:
            loader.dispose()


def _yaml_problem(exc: yaml.YAMLError, text: str) -> Problem:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = mark.line + 1 if mark is not None else None
    if isinstance(exc, yaml.MarkedYAMLError):
        what = " ".join(s for s in (exc.context, exc.problem) if s) or "invalid YAML"
    elif isinstance(exc, yaml.reader.ReaderError):
        what = f"unacceptable character #x{exc.character:04x}" if isinstance(exc.character, int) else str(exc)
        line = text.count("\n", 0, exc.position) + 1
    else:
        what = str(exc)
    return Problem("", f"invalid YAML: {what}", line)


def _walk_nodes(root: yaml.Node) -> tuple[dict[_Path, int], list[Problem]]:
    """Map key paths to 1-based lines, and find duplicate keys (which YAML silently merges).

    Mapping keys are recorded by their scalar text, sequence items by index. The root is
    recorded under ``()``. Aliased nodes are walked once, under the first path that reaches them.
    """
    lines: dict[_Path, int] = {(): root.start_mark.line + 1}
    duplicates: list[Problem] = []
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, _Path]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                    continue  # complex keys are refused later; "<<" is a merge
                key, line = key_node.value, key_node.start_mark.line + 1
                if key in first_line:
                    duplicates.append(
                        Problem(
                            _render_loc(path + (key,)),
                            f"duplicate key {key!r} (first on line {first_line[key]}): keep one",
                            line,
                        )
                    )
                    continue
                first_line[key] = line
                lines.setdefault(path + (key,), line)
                stack.append((value_node, path + (key,)))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines.setdefault(path + (index,), item.start_mark.line + 1)
                stack.append((item, path + (index,)))
    return lines, duplicates


def _expanded_size(root: yaml.Node) -> int:
    """Number of values the document holds once aliases are expanded (cycles count as huge)."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in in_progress or depth > 500:
            return _MAX_NODES + 1  # a recursive alias: no finite expansion
        in_progress.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                total += size(k, depth + 1) + size(v, depth + 1)
                if total > _MAX_NODES:
                    break
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                total += size(item, depth + 1)
                if total > _MAX_NODES:
                    break
        in_progress.discard(key)
        sizes[key] = total
        return total

    return size(root, 0)


def _check_files(data: dict[Any, Any], base: str, problems: list[tuple[_Path, str]]) -> dict[Any, Any]:
    """Check that local paths exist; return a copy of ``data`` with them made absolute.

    Only well-formed entries are checked: anything malformed is left for the model to report.
    """
    data = dict(data)
    for key in DATASET_KEYS:
        datasets = data.get(key)
        if isinstance(datasets, list):
            data[key] = [_check_dataset(item, key, index, base, problems) for index, item in enumerate(datasets)]

    base_model = data.get("base_model")
    if isinstance(base_model, str) and base_model.startswith(("/", ".", "~")):
        absolute = _resolve(base, base_model)
        if os.path.isdir(absolute):
            data["base_model"] = absolute
        else:
            message = f"local model directory not found: {base_model} (looked in {absolute})"
            problems.append((("base_model",), message))
    return data


def _check_dataset(item: Any, key: str, index: int, base: str, problems: list[tuple[_Path, str]]) -> Any:
    if not isinstance(item, dict) or not isinstance(item.get("path"), str):
        return item
    given = item["path"]
    if _dataset_path_problem(given) is not None:
        return item  # DatasetSpec reports it
    absolute = _resolve(base, given)
    if os.path.isfile(absolute):
        return {**item, "path": absolute}
    if os.path.isdir(absolute):
        message = f"dataset path is a folder, not a file: {given} ({absolute})"
    else:
        message = f"dataset file not found: {given} (looked in {absolute})"
    problems.append(((key, index, "path"), message))
    return item


def _check_contents(data: Mapping[Any, Any], warnings: list[str]) -> list[tuple[_Path, str]]:
    """Dataset rows against their format, and LoRA target modules against the architecture, for
    entries that are otherwise well-formed (anything malformed is the model's to report)."""
    from jobs import checks

    problems: list[tuple[_Path, str]] = []
    seq = data.get("sequence_len", 512)
    seq = seq if isinstance(seq, int) and not isinstance(seq, bool) and 8 <= seq <= 262144 else None
    base_model = data.get("base_model")
    exact = base_model == BUILTIN_TINY_MODEL
    entries = [(key, i, item) for key in DATASET_KEYS if isinstance(data.get(key), list)
               for i, item in enumerate(data[key])]
    for key, i, item in entries:
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not os.path.isfile(item["path"]):
            continue
        kind = item.get("type", "completion")
        if kind not in ("completion", "alpaca", "chat_template"):
            continue
        field = item.get("field") if isinstance(item.get("field"), str) and item.get("field") else (
            "messages" if kind == "chat_template" else "text")
        report = checks.check_dataset(item["path"], kind, field, seq or 512, exact_tokens=exact)
        loc: _Path = (key, i, "path")
        for message in report.problems:
            problems.append((loc, f"{os.path.basename(item['path'])} {message}"))
        if report.more_problems:
            problems.append((loc, f"{os.path.basename(item['path'])}: and {report.more_problems} more lines like these"))
        if seq is not None and not report.problems:
            error, warning = checks.length_verdict(report, seq)
            if error:
                problems.append((loc, error))
            if warning:
                warnings.append(f"{key}[{i}] {os.path.basename(item['path'])}: {warning}")
    modules = data.get("lora_target_modules")
    if isinstance(base_model, str) and data.get("adapter") in ("lora", "qlora") and isinstance(modules, list) \
            and all(isinstance(m, str) for m in modules):
        known = checks.known_modules(base_model, BUILTIN_TINY_MODEL)
        if known is not None:
            arch, names = known
            for m in checks.unknown_modules(modules, names):
                why = f"{m!r} is not a module of this {arch} model{did_you_mean(m, names)}; it has {', '.join(names)}"
                problems.append((("lora_target_modules", modules.index(m)), why))
    return problems


def _check_providers(data: Mapping[Any, Any], known: tuple[str, ...]) -> list[tuple[_Path, str]]:
    policy = data.get("policy")
    names = policy.get("providers") if isinstance(policy, dict) else None
    out: list[tuple[_Path, str]] = []
    for i, name in enumerate(names if isinstance(names, list) else ()):
        if isinstance(name, str) and name not in known:
            out.append((("policy", "providers", i), unknown_provider(name, known)))
    return out


def _resolve(base: str, path: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


# --- turning pydantic errors into problems -----------------------------------------------------


def _describe(err: Mapping[str, Any]) -> tuple[_Path, str]:
    loc: _Path = tuple(err.get("loc", ()))
    kind = err.get("type")
    if kind == "extra_forbidden" and loc:
        key = loc[-1]
        return loc, _unknown_key_message(str(key), _fields_at(loc[:-1]))
    if kind == "invalid_key" and loc:
        return (*loc[:-1], str(loc[-1])), "not a valid key: keys are names like base_model"
    if kind == "missing":
        return loc, _MISSING
    msg = str(err.get("msg") or "is invalid")
    if kind in _NUMBER_ERRORS and (allowed := _allowed_range(loc)):
        msg = f"{msg}; allowed: {allowed}"
    if kind in _OWN_ERRORS or not _short(err.get("input")):
        return loc, msg
    return loc, f"{msg} (got {err.get('input')!r})"


# pydantic's messages for a number it could not take say what went wrong, not what is allowed
_NUMBER_ERRORS = frozenset({"int_parsing_size", "int_from_float", "int_parsing", "int_type", "float_parsing",
                            "float_type", "finite_number"})


def _allowed_range(loc: _Path) -> str | None:
    """"at least A and at most B" for a bounded numeric field at ``loc`` (from its Field constraints)."""
    model: Any = JobSpec
    info = None
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        model = _model_in(info.annotation)
    if info is None:
        return None
    parts = []
    for m in info.metadata:
        if getattr(m, "ge", None) is not None:
            parts.append(f"at least {m.ge}")
        if getattr(m, "gt", None) is not None:
            parts.append(f"more than {m.gt}")
        if getattr(m, "le", None) is not None:
            parts.append(f"at most {m.le}")
    return " and ".join(parts) or None


_OWN_ERRORS = frozenset({"dataset_path", "store_uri", "job_name", "vram", "bf16", "base_model", "nodes",
                         _RULE_ERROR})


def _short(value: object) -> bool:
    return isinstance(value, (int, float, str, bool)) and len(repr(value)) <= 40


def _unknown_key_message(key: str, fields: list[str]) -> str:
    return f"unknown key {key!r}{did_you_mean(key, fields)}"


def _fields_at(loc: _Path) -> list[str]:
    """Field names of the model found at ``loc`` (``()`` is the job itself)."""
    model: Any = JobSpec
    for part in loc:
        if isinstance(part, int):
            continue  # list item: model already unwrapped below
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return []
        model = _model_in(model.model_fields[part].annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _model_in(annotation: Any) -> Any:
    """The BaseModel inside ``X``, ``list[X]`` or ``X | None``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


# --- evaluating the cross-field rules on raw data -------------------------------------------------


@lru_cache(maxsize=None)
def _field_adapter(dotted: str) -> Any:
    from pydantic import TypeAdapter

    model: type[BaseModel] = JobSpec
    name = dotted
    if "." in dotted:
        section, name = dotted.split(".", 1)
        model = _SECTIONS[section]
    info = model.model_fields[name]
    if not info.metadata:
        return TypeAdapter(info.annotation)
    return TypeAdapter(Annotated[(info.annotation, *info.metadata)])  # type: ignore[misc]


def _raw_getter(data: Mapping[Any, Any]) -> Callable[[str], Any]:
    """``get`` for :func:`_rule_violations` over unvalidated data: each field validated alone."""

    def get(dotted: str) -> Any:
        container: Any = data
        name = dotted
        if "." in dotted:
            section, name = dotted.split(".", 1)
            container = data.get(section, {})
            if not isinstance(container, Mapping):
                return _UNKNOWN
            default: Any = _SECTIONS[section].model_fields[name].default
        else:
            default = JobSpec.model_fields[dotted].default
        if name not in container:
            return default
        try:
            return _field_adapter(dotted).validate_python(container[name])
        except (ValidationError, ValueError, TypeError, RecursionError):
            return _UNKNOWN

    return get


# --- locations and lines ------------------------------------------------------------------------


def _split_loc(dotted: str) -> _Path:
    return tuple(dotted.split("."))


def _render_loc(loc: _Path) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _line_of(loc: _Path, lines: Mapping[_Path, int], *, missing: bool) -> int | None:
    """Line of the key at ``loc``; for a missing key, the line of the key that holds it."""
    path = tuple(loc[:-1]) if missing else tuple(loc)
    while path:
        normalized = tuple(p if isinstance(p, int) and not isinstance(p, bool) else str(p) for p in path)
        if normalized in lines:
            return lines[normalized]
        if missing:
            return None
        path = path[:-1]  # a union tag or similar: fall back to the enclosing key
    return None


def _finish(
    problems: list[tuple[_Path, str]], lines: Mapping[_Path, int], duplicates: list[Problem]
) -> list[Problem]:
    out: list[Problem] = list(duplicates)
    seen: set[tuple[str, str]] = set()
    for loc, message in problems:
        missing = message == _MISSING
        rendered = _render_loc(loc)
        if (rendered, message) in seen:
            continue
        seen.add((rendered, message))
        out.append(Problem(rendered, message, _line_of(loc, lines, missing=missing)))
    out.sort(key=lambda p: (p.line is None, p.line or 0))
    return out
