"""Cost-capped hyperparameter sweeps: grid and random search, ``all`` or successive halving.

Why successive halving: most trials of a sweep are visibly worse after a small share of their
steps. Training every trial for ``min_steps``, keeping the best ``1/eta`` by evaluation loss and
continuing only those (from their own checkpoints, as new jobs seeded with
``checkpoint.resume_from``) spends the budget on the promising ones. The sweep's ``budget_usd`` is a
hard cap, enforced by the daemon like every other cap (``orchestrator.budget``).

A sweep file::

    name: lr-and-rank
    base: qlora-tiny.yaml          # a job file (relative to this file)
    overrides: {val_set_size: 0.1} # keys set on the base first (halving ranks by eval loss)
    search:
      learning_rate: {values: [1.0e-3, 3.0e-3, 1.0e-2]}   # grid
      lora_r: {values: [4, 8, 16]}
      lora_alpha: {log_uniform: [8, 64], int: true}        # random
    trials: 9                      # random search: how many; grid: at most this many (default: all)
    max_trials: 256                # a sweep over this many trials is refused unless raised here
    strategy: successive_halving   # or: all
    halving: {min_steps: 40, eta: 3}
    budget_usd: 5.0
    max_parallel: 2
    seed: 0
"""

from __future__ import annotations

import difflib
import math
import random
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from jobs.spec import JobFileError, JobSpec, load_job_file

DEFAULT_MAX_TRIALS = 256  # a sweep of more trials is refused unless its file raises max_trials
MAX_TRIALS_CEILING = 10_000
MAX_SWEEP_FILE_BYTES = 1 << 20
SWEEP_BASE = "base.yaml"  # the name a sweep sent to a team server gives its base job (orchestrator.api.fleet)

class SweepError(ValueError):
    """A sweep file that cannot run; the message says what and how to fix it."""


class Param(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    values: list[Any] | None = Field(None, min_length=1, max_length=10_000)
    uniform: tuple[float, float] | None = None
    log_uniform: tuple[float, float] | None = None
    int: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> Param:
        kinds = [k for k in ("values", "uniform", "log_uniform") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of values (grid), uniform or log_uniform (random)")
        if self.log_uniform is not None and min(self.log_uniform) <= 0:
            raise ValueError("log_uniform bounds must be > 0")
        return self

    @property
    def grid(self) -> bool:
        return self.values is not None

    def sample(self, rnd: random.Random) -> Any:
        if self.uniform is not None:
            value = rnd.uniform(*self.uniform)
        else:
            lo, hi = self.log_uniform  # type: ignore[misc]
            value = math.exp(rnd.uniform(math.log(lo), math.log(hi)))
        return int(round(value)) if self.int else value


class Halving(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    min_steps: int = Field(gt=0)
    eta: int = Field(3, ge=2)


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    base: str
    overrides: dict[str, Any] = Field(default_factory=dict)  # applied to the base job first
    search: dict[str, Param] = Field(min_length=1)
    trials: int | None = Field(None, gt=0, le=MAX_TRIALS_CEILING)
    max_trials: int = Field(DEFAULT_MAX_TRIALS, ge=1, le=MAX_TRIALS_CEILING)
    strategy: Literal["all", "successive_halving"] = "all"
    halving: Halving | None = None
    budget_usd: float = Field(gt=0, le=10_000_000, allow_inf_nan=False)
    max_parallel: int = Field(2, ge=1, le=256)
    seed: int = Field(0, ge=0, le=2**32 - 1)

    @model_validator(mode="after")
    def _halving_needs_settings(self) -> SweepSpec:
        if self.strategy == "successive_halving" and self.halving is None:
            raise ValueError("strategy successive_halving needs halving: {min_steps: N, eta: 3}")
        return self


def _set(doc: dict[str, Any], dotted: str, value: Any) -> None:
    node = doc
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def load_sweep(path: Path) -> tuple[SweepSpec, dict[str, Any]]:
    """The validated sweep and its base job (payload dict). Raises SweepError with every problem."""
    try:
        size = Path(path).stat().st_size
        if size > MAX_SWEEP_FILE_BYTES:
            raise SweepError(f"{path}: the sweep file is {size / 2**20:.1f} MiB; a sweep file is at most 1 MiB")
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SweepError(f"{path}: cannot read the sweep file ({exc})") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep file is a YAML mapping (name, base, search, budget_usd, ...)")
    try:
        sweep = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(str(err["loc"][-1]), list(SweepSpec.model_fields), n=1)
                msg = f"unknown key{f' (did you mean {close[0]!r}?)' if close else ''}"
            lines.append(f"{path}: {loc}: {msg}")
        raise SweepError("\n".join(lines)) from None
    grid = _grid_size(sweep)
    n_trials = trial_count(sweep)
    if n_trials > sweep.max_trials:
        why = f"the grid has {grid} combinations" if sweep.trials is None else f"trials: {sweep.trials}"
        raise SweepError(f"{path}: search: {n_trials} trials ({why}) is over max_trials {sweep.max_trials}: set "
                         f"trials: to sample fewer, or raise max_trials (up to {MAX_TRIALS_CEILING}) if you mean it")
    base_path = (Path(path).parent / sweep.base).resolve()
    try:
        from providers.registry import PROVIDERS

        base = load_job_file(base_path, known_providers=PROVIDERS, now=time.time()).to_payload_dict()
    except JobFileError as exc:
        raise SweepError(f"{path}: base job {base_path}:\n{exc}") from None
    if sweep.overrides:
        base = trial_spec(base, sweep.overrides)
    job_keys = set(JobSpec.model_fields)
    for key in sweep.search:
        if key.split(".")[0] not in job_keys:
            close = difflib.get_close_matches(key.split(".")[0], sorted(job_keys), n=1)
            raise SweepError(f"{path}: search.{key}: not a job key{f' (did you mean {close[0]!r}?)' if close else ''}")
    if sweep.strategy == "successive_halving":
        if not base.get("val_set_size"):
            raise SweepError(f"{path}: successive_halving ranks trials by eval loss: set val_set_size "
                             "(e.g. 0.1) in the base job")
        if not base.get("max_steps"):
            raise SweepError(f"{path}: successive_halving needs max_steps in the base job (the last rung)")
        if sweep.halving.min_steps >= base["max_steps"]:
            raise SweepError(f"{path}: halving.min_steps {sweep.halving.min_steps} must be under the base "
                             f"job's max_steps {base['max_steps']}")
    return sweep, base


def _grid_size(sweep: SweepSpec) -> int:
    return math.prod(len(p.values) for p in sweep.search.values() if p.values is not None)


def trial_count(sweep: SweepSpec) -> int:
    """How many trials ``expand`` makes: ``trials`` (at most the grid when every parameter is a
    grid), else the whole grid. Counted without building them."""
    grid = _grid_size(sweep)
    n = sweep.trials or grid
    return min(n, grid) if all(p.grid for p in sweep.search.values()) else n


def expand(sweep: SweepSpec) -> list[dict[str, Any]]:
    """Every trial's parameters: the grid's product (in ``itertools.product`` order, cycled), with
    random parameters sampled per trial. Only the trials asked for are built, not the whole grid."""
    grid_keys = sorted(k for k, p in sweep.search.items() if p.grid)
    random_keys = sorted(k for k, p in sweep.search.items() if not p.grid)
    grid = _grid_size(sweep)
    trials = []
    for i in range(trial_count(sweep)):
        params: dict[str, Any] = {}
        rest = i % grid
        for key in reversed(grid_keys):  # mixed radix: the last key varies fastest, as in product()
            values = sweep.search[key].values
            rest, idx = divmod(rest, len(values))
            params[key] = values[idx]
        params = {key: params[key] for key in grid_keys}
        rnd = random.Random(f"{sweep.seed}:{i}")
        for key in random_keys:
            params[key] = sweep.search[key].sample(rnd)
        trials.append(params)
    return trials


def rungs(sweep: SweepSpec, max_steps: int, save_every: int) -> list[int]:
    """Steps at the end of each rung: min_steps x eta^k, rounded to checkpoints, ending at max_steps."""
    if sweep.strategy != "successive_halving":
        return [max_steps]
    out, steps = [], sweep.halving.min_steps
    while steps < max_steps:
        aligned = max(save_every, int(round(steps / save_every)) * save_every)
        if not out or aligned > out[-1]:
            out.append(min(aligned, max_steps))
        steps *= sweep.halving.eta
    if not out or out[-1] != max_steps:
        out.append(max_steps)
    return out


def trial_spec(base: dict[str, Any], params: dict[str, Any], *, max_steps: int | None = None,
               resume_from: str | None = None, store_uri: str | None = None) -> dict[str, Any]:
    """A trial's job: the base with its parameters applied, validated like any job file."""
    doc = {**base, "policy": dict(base.get("policy") or {}), "checkpoint": dict(base.get("checkpoint") or {})}
    for key, value in params.items():
        _set(doc, key, value)
    if max_steps is not None:
        doc["max_steps"] = max_steps
    if resume_from is not None:
        doc["checkpoint"]["resume_from"] = resume_from
    if store_uri is not None and not doc["checkpoint"].get("store"):
        doc["checkpoint"]["store"] = store_uri
    try:
        return JobSpec.from_payload_dict(doc).to_payload_dict()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SweepError(f"trial with {params}: {problems}") from None


def survivors(results: list[tuple[str, float | None]], eta: int) -> list[str]:
    """The best ceil(n/eta) job ids by eval loss (lower is better); trials without one are out."""
    scored = sorted((loss, job_id) for job_id, loss in results if loss is not None and math.isfinite(loss))
    keep = max(1, math.ceil(len(results) / eta)) if scored else 0
    return [job_id for _, job_id in scored[:keep]]
