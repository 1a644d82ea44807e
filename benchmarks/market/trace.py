"""Market traces: the file format, loading and saving, and the generator of the default trace.

A trace is the world every policy faces: which machines are listed when, what each offer costs
over time, its interruptibility and advertised hazard, and which jobs arrive when. Format 2 also
records where the world disagrees with what policies are told: each machine's true hazard factor
(true hazard = advertised x factor), each GPU model's real throughput against the ``jobs.gpus``
table, correlated reclaim waves, marketplace bids outbid when their price rises, launches that
fail, and what each checkpoint costs to write. It holds no random outcome of a run: reclaims,
outbids and launch failures are drawn at run time from these figures and ``--seed``
(``benchmarks.market.sim``), identically for every policy. Format 1 files still load, as a world
that obeys the advertised figures (factors 1, no waves, no outbids, no launch failures, free
checkpoints). The format is documented in ``benchmarks/market/README.md`` and in the package
docstring.

Grounding of the generator (``GROUNDING`` repeats this per parameter, and it is written into the
trace file): prices per GPU-hour come from ``shared/reference/providers.md`` (Vast.ai medians,
RunPod, Lambda, AWS list prices) and ``providers/snapshots/vast.json`` (bid/on-demand ratios);
hazards from ``providers/vast.py`` (host reliability -> -ln(r)/24 per hour) and
``providers/skypilot.py`` (AWS spot 0.05/h, RunPod 0.1/h); start-up times from the same two
modules; owned GPUs at ``providers/local.py``'s power cost (350 W x $0.15/kWh); throughput from
``jobs/estimate.py`` (``shared/reference/training.md``).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jobs.estimate import Estimate, estimate
from jobs.gpus import GPUS
from jobs.spec import JobSpec

FORMAT = "tunefleet-market-trace/2"
FORMAT_V1 = "tunefleet-market-trace/1"  # still loads: true = advertised everywhere
OUTBID_K = 2.0  # outbid probability per price step up = min(1, OUTBID_K x rise / launched price)
WAVE_SCOPE_KEYS = frozenset({"provider", "gpu", "region"})
T0 = 1_796_083_200.0  # 2026-12-01T00:00:00Z: hour 0 of every trace unless the file says otherwise
DEFAULT_TRACE = Path(__file__).resolve().parent.parent / "traces" / "default.json"
# A path that cannot exist (nothing lives under /dev/null): the estimate falls back to max_steps.
DATASET_PLACEHOLDER = "/dev/null/market/{job}.jsonl"


# ------------------------------------------------------------------------------------------------
# The format
# ------------------------------------------------------------------------------------------------
@dataclass
class MachineTrack:
    """One machine (or one cloud instance slot): it holds one attempt at a time.

    ``windows`` are the [start_h, end_h) spans when it is listed for rent (for an owned GPU:
    idle, not used by the team's other work). Every offer of the machine shares them.
    """

    id: str
    windows: list[list[float]]
    # true hazard / advertised hazard of every offer of this machine (format 2; 1 = as advertised)
    hazard_factor: float = 1.0


@dataclass
class OfferTrack:
    """One way to rent a machine (on-demand or interruptible), with its price over time.

    ``prices`` is a step function [[t_h, usd_per_hour], ...] sorted by time; the first point is
    at or before the machine's first window. ``hazard_per_hour`` is what the provider advertises
    (what the scheduler sees); ``warning_prob`` is the chance a reclaim comes with a notice long
    enough to save a checkpoint (SIGTERM), else the attempt loses the work since its last one.
    Format 2: ``launch_fail_prob`` is the chance a launch on it fails (after its start-up, which is
    billed), and ``bid`` marks a marketplace bid, outbid when its price steps above the price an
    attempt launched at.
    """

    id: str  # unique in the trace: "<provider>/<offer_id>"
    machine: str
    provider: str
    offer_id: str
    gpu: str
    gpu_count: int
    vram_gb: float
    interruptible: bool
    hazard_per_hour: float
    warning_prob: float
    region: str
    on_premises: bool
    owned: bool
    startup_s: float
    prices: list[list[float]]
    launch_fail_prob: float = 0.0
    bid: bool = False


@dataclass
class JobTrack:
    """One fine-tuning job. ``spec`` is the payload dict (``JobSpec.to_payload_dict``) with
    ``policy.deadline`` left out: it is ``deadline_h`` (absolute trace hours, or None) and is
    filled in as an ISO time when the trace is loaded. ``speed_factor`` is the job's own part of
    the truth the estimate does not know: real hours = estimated hours x speed_factor / the GPU
    model's ``speed_truth``. ``checkpoint_write_s`` (format 2) is the wall time one checkpoint
    save + upload takes, billed, every time the job saves."""

    id: str
    arrival_h: float
    deadline_h: float | None
    speed_factor: float
    spec: dict[str, Any]
    checkpoint_write_s: float = 0.0


@dataclass
class WaveTrack:
    """A correlated reclaim wave: at ``t_h`` each machine with an interruptible offer in ``scope``
    (a dict of ``provider``, ``gpu`` and/or ``region``, all of which must match) is taken with
    probability ``share`` (then held ~``reclaim_hold_h``), and the interruptible attempt it runs,
    if any, is reclaimed."""

    t_h: float
    scope: dict[str, str]
    share: float

    def matches(self, offer: OfferTrack) -> bool:
        return offer.interruptible and all(getattr(offer, k) == v for k, v in self.scope.items())


@dataclass
class Trace:
    horizon_h: float  # the simulation stops here; unfinished jobs count as not completed
    machines: list[MachineTrack]
    offers: list[OfferTrack]
    jobs: list[JobTrack]
    t0: float = T0  # epoch seconds of hour 0 (rank's ``now`` = t0 + 3600 x hours)
    reclaim_hold_h: float = 2.0  # mean time a reclaimed machine stays taken (someone else has it)
    hazard_noise: float = 0.3  # sigma of the per-seed log-normal factor on top of each machine's hazard_factor
    params: dict[str, Any] = field(default_factory=dict)  # generator parameters, for the record
    grounding: dict[str, str] = field(default_factory=dict)
    # format 2: what policies are not told (empty / 0 in a format 1 file: the world obeys the model)
    speed_truth: dict[str, float] = field(default_factory=dict)  # GPU model -> real / tabled throughput
    waves: list[WaveTrack] = field(default_factory=list)
    outbid_k: float = 0.0  # outbid probability per price step up of a bid = min(1, k x rise fraction)
    source_format: str = FORMAT  # the format of the file it was loaded from (not written)

    def epoch(self, hours: float) -> float:
        return self.t0 + hours * 3600.0

    def iso(self, hours: float) -> str:
        return datetime.fromtimestamp(self.epoch(hours), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def job_spec(self, job: JobTrack) -> dict[str, Any]:
        """The spec the daemon would hold: the payload with its deadline as an ISO time."""
        spec = json.loads(json.dumps(job.spec))
        spec.setdefault("policy", {})["deadline"] = None if job.deadline_h is None else self.iso(job.deadline_h)
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "t0": self.t0,
            "horizon_h": self.horizon_h,
            "reclaim_hold_h": self.reclaim_hold_h,
            "hazard_noise": self.hazard_noise,
            "outbid_k": self.outbid_k,
            "speed_truth": self.speed_truth,
            "waves": [asdict(w) for w in self.waves],
            "params": self.params,
            "grounding": self.grounding,
            "machines": [asdict(m) for m in self.machines],
            "offers": [asdict(o) for o in self.offers],
            "jobs": [asdict(j) for j in self.jobs],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trace:
        """Format 2, or format 1 as a world that obeys the advertised figures (every factor 1, no
        waves, no outbids, no launch failures, free checkpoints): the new fields take their
        defaults, and a format 1 file that carries any of them is refused."""
        fmt = d.get("format")
        if fmt not in (FORMAT, FORMAT_V1):
            raise ValueError(f"not a market trace: format is {fmt!r}, expected {FORMAT!r} (or {FORMAT_V1!r})")
        if fmt == FORMAT_V1:
            extra = [k for k in ("speed_truth", "waves", "outbid_k") if k in d]
            extra += [f"machines[].{k}" for k in ("hazard_factor",) if any(k in m for m in d["machines"])]
            extra += [f"offers[].{k}" for k in ("launch_fail_prob", "bid") if any(k in o for o in d["offers"])]
            extra += [f"jobs[].{k}" for k in ("checkpoint_write_s",) if any(k in j for j in d["jobs"])]
            if extra:
                raise ValueError(f"format {FORMAT_V1!r} has no {', '.join(extra)}: say {FORMAT!r}")
        trace = cls(
            horizon_h=float(d["horizon_h"]),
            machines=[MachineTrack(**m) for m in d["machines"]],
            offers=[OfferTrack(**o) for o in d["offers"]],
            jobs=[JobTrack(**j) for j in d["jobs"]],
            t0=float(d.get("t0", T0)),
            reclaim_hold_h=float(d.get("reclaim_hold_h", 2.0)),
            hazard_noise=float(d.get("hazard_noise", 0.3)),
            params=dict(d.get("params") or {}),
            grounding=dict(d.get("grounding") or {}),
            speed_truth={str(k): float(v) for k, v in (d.get("speed_truth") or {}).items()},
            waves=[WaveTrack(float(w["t_h"]), dict(w["scope"]), float(w["share"])) for w in d.get("waves") or []],
            outbid_k=float(d.get("outbid_k", 0.0)),
            source_format=fmt,
        )
        trace.validate()
        return trace

    def validate(self) -> None:
        """Raise ValueError on anything the simulator would trip over, with the culprit named."""
        machines = {m.id for m in self.machines}
        if len(machines) != len(self.machines):
            raise ValueError("duplicate machine ids")
        for m in self.machines:
            for w in m.windows:
                if len(w) != 2 or not 0 <= w[0] < w[1]:
                    raise ValueError(f"machine {m.id}: bad window {w}")
            if not (math.isfinite(m.hazard_factor) and m.hazard_factor > 0):
                raise ValueError(f"machine {m.id}: hazard_factor must be > 0")
        ids = set()
        for o in self.offers:
            if o.id in ids:
                raise ValueError(f"duplicate offer id {o.id}")
            if o.id != f"{o.provider}/{o.offer_id}":
                raise ValueError(f"offer {o.id}: id must be provider/offer_id ({o.provider}/{o.offer_id})")
            ids.add(o.id)
            if o.machine not in machines:
                raise ValueError(f"offer {o.id}: unknown machine {o.machine}")
            if not o.prices or any(p[1] <= 0 for p in o.prices):
                raise ValueError(f"offer {o.id}: prices must be a non-empty list of [t_h, usd>0]")
            if any(a[0] > b[0] for a, b in zip(o.prices, o.prices[1:], strict=False)):
                raise ValueError(f"offer {o.id}: prices not sorted by time")
            if o.hazard_per_hour < 0 or not 0 <= o.warning_prob <= 1:
                raise ValueError(f"offer {o.id}: hazard must be >= 0 and warning_prob in [0, 1]")
            if o.gpu not in GPUS:
                raise ValueError(f"offer {o.id}: GPU {o.gpu!r} has no throughput figure in jobs.gpus")
            if not 0 <= o.launch_fail_prob <= 1:
                raise ValueError(f"offer {o.id}: launch_fail_prob must be in [0, 1]")
            if o.bid and not o.interruptible:
                raise ValueError(f"offer {o.id}: a bid is interruptible")
        seen = set()
        for j in self.jobs:
            if j.id in seen:
                raise ValueError(f"duplicate job id {j.id}")
            seen.add(j.id)
            if j.deadline_h is not None and j.deadline_h <= j.arrival_h:
                raise ValueError(f"job {j.id}: deadline before arrival")
            if j.speed_factor <= 0:
                raise ValueError(f"job {j.id}: speed_factor must be > 0")
            if not (math.isfinite(j.checkpoint_write_s) and j.checkpoint_write_s >= 0):
                raise ValueError(f"job {j.id}: checkpoint_write_s must be >= 0")
        for gpu, f in self.speed_truth.items():
            if gpu not in GPUS or not (math.isfinite(f) and f > 0):
                raise ValueError(f"speed_truth {gpu!r}: must name a jobs.gpus model, with a factor > 0")
        for w in self.waves:
            if not 0 <= w.t_h <= self.horizon_h or not 0 <= w.share <= 1:
                raise ValueError(f"wave at {w.t_h}: t_h must be in [0, horizon_h] and share in [0, 1]")
            if not w.scope or set(w.scope) - WAVE_SCOPE_KEYS:
                raise ValueError(f"wave at {w.t_h}: scope must name some of {sorted(WAVE_SCOPE_KEYS)}")
        if not (math.isfinite(self.outbid_k) and self.outbid_k >= 0):
            raise ValueError("outbid_k must be >= 0")


def save(trace: Trace, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(trace.to_dict(), f, separators=(",", ":"))
        f.write("\n")


def load(path: str | Path) -> Trace:
    with open(path, encoding="utf-8") as f:
        return Trace.from_dict(json.load(f))


# ------------------------------------------------------------------------------------------------
# The generator
# ------------------------------------------------------------------------------------------------
@dataclass
class MarketParams:
    """Everything the generator draws from. Defaults make the shipped default trace."""

    days: float = 14.0  # jobs arrive over this many days
    drain_days: float = 3.0  # then the market runs on so queued work can finish
    jobs_per_day: float = 12.0
    # --- marketplace (Vast-like): machines sampled from the listings of one GPU model each
    vast_machines: dict[str, int] = field(default_factory=lambda: {"RTX4090": 28, "A100-80GB": 10, "H100": 8})
    vast_listed_mean_h: float = 18.0  # a listing stays up this long on average ...
    vast_unlisted_mean_h: float = 10.0  # ... then the machine is rented by others / taken down
    vast_price_step_h: float = 4.0  # bids move every few hours; on-demand asks 3x less often
    # --- clouds through SkyPilot: identical instance slots per (cloud, instance type)
    cloud_slots: int = 3
    spot_listed_mean_h: float = 24.0  # spot capacity comes and goes
    spot_unlisted_mean_h: float = 6.0
    # --- owned GPUs: two RTX 4090s, used by the team's other work part of the time
    local_gpus: int = 2
    local_idle_mean_h: float = 8.0
    local_busy_mean_h: float = 4.0
    # --- jobs
    a100_hours: tuple[float, float] = (1.0, 20.0)  # log-uniform uninterrupted A100-80GB hours
    deadline_share: float = 0.7
    # deadline = arrival + factor x the job's hours on A100-80GBs (restricted jobs: on the owned GPU)
    deadline_factor: tuple[float, float] = (1.0, 3.0)
    restricted_share: float = 0.2
    spot_never_share: float = 0.1
    lora_share: float = 0.2  # the rest QLoRA
    multi_gpu_share: float = 0.1  # open jobs asking 2, 4 or 8 GPUs (weights 0.6/0.3/0.1)
    checkpoint_minutes: tuple[float, float] = (10.0, 30.0)  # of training on A100s between checkpoints
    speed_sigma: float = 0.1  # the job's own real vs estimated throughput, log-normal sigma
    # --- run-time draws recorded in the trace
    reclaim_hold_h: float = 2.0
    hazard_noise: float = 0.3
    # --- format 2: where the world disagrees with what policies are told
    host_bad_share: float = 0.15  # hosts far worse than their score: factor log-uniform in host_bad_factor
    host_bad_factor: tuple[float, float] = (3.0, 10.0)
    host_good_share: float = 0.1  # hosts better than their score
    host_good_factor: tuple[float, float] = (0.3, 0.7)
    host_sigma: float = 0.2  # the rest: log-normal around 1
    speed_truth_sigma: float = 0.15  # per GPU model: real / tabled throughput, log-normal (clipped at 2 sigma)
    waves_per_week: float = 3.0  # correlated reclaim waves
    wave_share: tuple[float, float] = (0.3, 0.8)  # share of the machines in scope a wave takes
    outbid_k: float = OUTBID_K
    launch_fail_max: float = 0.05  # most offers: launch failure probability uniform in [0, this]
    launch_fail_bad_share: float = 0.08  # bad hosts ...
    launch_fail_bad: tuple[float, float] = (0.3, 0.6)  # ... fail this often
    checkpoint_fixed_s: float = 10.0  # one save: write, fsync, marker ...
    upload_gbps: tuple[float, float] = (0.2, 2.0)  # ... plus its bytes at this upload speed (log-uniform per job)


# Published per-GPU prices (USD/h, on demand) from shared/reference/providers.md.
VAST_ON_DEMAND = {"RTX4090": (0.35, 0.88), "A100-80GB": (1.0, 1.45), "H100": (2.0, 2.9)}
CLOUD_CATALOG = [
    # (cloud, region, instance, gpu, count, on-demand $/h for the instance, spot?, listed share)
    ("aws", "us-east-1", "g5.xlarge", "A10G", 1, 1.006, True, 1.0),
    ("aws", "us-east-1", "g6.xlarge", "L4", 1, 0.805, True, 1.0),
    ("aws", "us-east-1", "p4de.24xlarge", "A100-80GB", 8, 3.43 * 8, True, 1.0),
    ("aws", "us-east-1", "p5.48xlarge", "H100", 8, 6.88 * 8, True, 1.0),
    ("runpod", "US", "1x_H100_SXM_SECURE", "H100", 1, 3.49, True, 1.0),
    ("runpod", "US", "1x_A100-80GB_SECURE", "A100-80GB", 1, 1.59, True, 1.0),
    ("runpod", "US", "1x_RTX4090_SECURE", "RTX4090", 1, 0.74, True, 1.0),
    ("runpod", "US", "1x_L4_SECURE", "L4", 1, 0.68, True, 1.0),
    ("lambda", "us-east-1", "gpu_1x_h100_sxm5", "H100", 1, 4.29, False, 0.5),
    ("lambda", "us-west-1", "gpu_1x_a10", "A10", 1, 1.29, False, 0.8),
    ("lambda", "us-east-1", "gpu_8x_a100_80gb_sxm4", "A100-80GB", 8, 2.79 * 8, False, 0.5),
]
CLOUD_STARTUP_S = {"aws": 300.0, "runpod": 240.0, "lambda": 300.0}  # providers/skypilot.py STARTUP_S
CLOUD_SPOT_HAZARD = {"aws": 0.05, "runpod": 0.1}  # providers/skypilot.py SPOT_HAZARD_PER_HOUR
CLOUD_SPOT_WARNING = {"aws": 0.9, "runpod": 0.0}  # AWS: 2-minute notice; RunPod: none usable
CLOUD_SPOT_DISCOUNT = (0.35, 0.55)  # spot price as a share of on-demand
CLOUD_LAUNCH_FAIL_MAX = 0.03  # a cloud's launches fail less often than a marketplace host's
LOCAL_USD_PER_HOUR = 350.0 / 1000 * 0.15  # providers/local.py CostModel: 350 W at $0.15/kWh
MODELS = [  # (base_model, weight); sizes from the name, as jobs.estimate reads them
    ("meta-llama/Llama-3.2-1B", 0.10), ("meta-llama/Llama-3.2-3B", 0.20), ("mistralai/Mistral-7B-v0.3", 0.20),
    ("meta-llama/Llama-3.1-8B", 0.30), ("Qwen/Qwen2.5-14B", 0.20),
]
MULTI_GPU = ((2, 0.6), (4, 0.3), (8, 0.1))
# Bytes a checkpoint holds per trained parameter (training.md: a 7B QLoRA checkpoint is an adapter
# of ~134 MB plus an optimizer state of ~268 MB): an adapter in fp32 (4) plus Adam's two moments
# (8); a full fine-tune's 16-bit weights (2), fp32 master copy (4) and moments (8).
CHECKPOINT_BYTES_ADAPTER = 12.0
CHECKPOINT_BYTES_FULL = 14.0

GROUNDING = {
    "vast_on_demand": "providers.md: RTX 4090 ~0.68-0.88 (RunPod community 0.34, snapshot 0.35), "
                      "A100 80GB ~1.17-1.21, H100 SXM ~2.40 median; drawn uniform in a band around them",
    "vast_bid_ratio": "providers/snapshots/vast.json: min_bid/dph_total is 0.46-0.89 (median ~0.66); "
                      "drawn uniform in [0.45, 0.90]",
    "vast_hazard": "providers/vast.py: -ln(reliability)/24 (reliability 0.95-0.999, as in the snapshot) "
                   "plus, for bids, an outbid rate log-uniform 0.05-0.5/h, higher for lower bids "
                   "(the brief's range; providers/vast/offers.py advertises the same curve by bid depth)",
    "vast_startup": "providers/vast.py: 180 s + an 8 GB image over the host's inet_down (100-2000 Mbps)",
    "vast_listing": "assumption: listings last ~18 h, machines away ~10 h; bids move every ~4 h, asks ~12 h "
                    "(providers.md: prices 'move daily')",
    "marketplace_vs_cloud": "providers.md: marketplaces undercut clouds by 30-50 % (Vast A100 1.17 vs RunPod "
                            "secure 1.59, Lambda 2.79, AWS 3.43; H100 2.40 vs 3.49/4.29)",
    "cloud_on_demand": "providers.md: AWS g5.xlarge 1.006, g6.xlarge ~0.81, p4de 3.43/GPU, p5 6.88/GPU; "
                       "RunPod secure H100 3.49, A100 1.59, 4090 0.74, L4 0.68; Lambda H100 4.29, A10 1.29, "
                       "8x A100 2.79/GPU",
    "cloud_spot": "assumption: spot at 35-55 % of on-demand (AWS and GCP advertise up to 90 % off); hazard "
                  "providers/skypilot.py (AWS 0.05/h, RunPod 0.1/h); AWS gives a 2-minute notice "
                  "(providers.md), RunPod none usable",
    "cloud_startup": "providers/skypilot.py STARTUP_S: AWS 300 s, RunPod 240 s, Lambda 300 s",
    "local": "providers/local.py CostModel: 350 W x $0.15/kWh = $0.0525/GPU-h, start-up 15 s; two RTX 4090s "
             "busy with other work ~1/3 of the time (assumption)",
    "jobs": "brief: 1-14B models, QLoRA mostly (80 %), 1-20 A100-hours (log-uniform), deadlines 1-3x the "
            "job's hours from arrival on the fastest GPU it may use (30 % none), 20 % restricted data, "
            "checkpoints every 10-30 min of A100 work; throughput jobs/estimate.py (training.md)",
    "multi_gpu": "assumption: 10 % of open jobs ask 2, 4 or 8 GPUs (weights 0.6/0.3/0.1), with the same "
                 "total work; a job asking N GPUs is shown only offers with exactly N, as live providers "
                 "filter (providers/vast.py num_gpus, SkyPilot's accelerator count)",
    "speed": "assumption: the job's own real throughput differs from its estimate by a log-normal factor "
             "(sigma 0.1); each GPU model's real throughput differs from the jobs.gpus table by a log-normal "
             "factor (sigma 0.15, clipped at 2 sigma): training.md gives only ranges (RTX 4090 0.5-0.7x A100, L4/A10G "
             "0.25-0.35x, H100 2-3x)",
    "host_hazard": "assumption: reliability scores say little about the worst hosts. True hazard = advertised x "
                   "a per-machine factor: 75 % log-normal around 1 (sigma 0.2), 15 % 3-10x worse, 10 % "
                   "0.3-0.7x (log-uniform); a cloud's spot pool shares one factor; then the per-seed "
                   "log-normal noise (hazard_noise) on top",
    "waves": "assumption: 3 correlated reclaim waves a week at uniform times (a region, a marketplace GPU model, or a cloud's "
             "spot pool), each taking 30-80 % of the machines in scope at once and holding them ~2 h",
    "outbids": "assumption: a marketplace bid running at its launch price is outbid when the bid price steps "
               "up, with probability min(1, 2 x rise / launched price): a 10 % rise outbids 1 attempt in 5, "
               "50 % or more outbids every one (Vast: a higher bid takes the machine)",
    "launch_failures": "assumption: most offers fail 0-5 % of launches (image pull, driver, host trouble), 8 % "
                       "of marketplace hosts 30-60 %; clouds 0-3 %; owned GPUs never. A failed launch bills its "
                       "start-up; the daemon blocks the offer 300 s (orchestrator/outcomes.py LAUNCH_FAILED) "
                       "and fails the job at max_launch_failures (infra/config.py: 3)",
    "checkpoint_write": "training.md: a 7B QLoRA checkpoint is ~134 MB adapter + ~268 MB optimizer, i.e. ~12 "
                        "bytes per trained parameter (adapter fp32 + Adam moments; full fine-tunes ~14 bytes a "
                        "parameter); one save = 10 s (write, fsync, marker) + those bytes over a 0.2-2 Gbps "
                        "upload (log-uniform per job), billed each time",
    "reclaims": "run time: Poisson at the true hazard = advertised x the machine's hazard_factor x log-normal("
                "sigma 0.3, mean 1) per seed; a reclaimed machine stays taken ~2 h (exponential)",
}


def _windows(rnd: random.Random, horizon: float, up_mean: float, down_mean: float,
             start_up: float) -> list[list[float]]:
    """Alternating up/down spans over [0, horizon]; up first with probability ``start_up``."""
    out, t, up = [], 0.0, rnd.random() < start_up
    while t < horizon:
        d = rnd.expovariate(1.0 / (up_mean if up else down_mean))
        if up:
            out.append([round(t, 4), round(min(horizon, t + d), 4)])
        t += d
        up = not up
    return [w for w in out if w[1] > w[0]]


def _walk(rnd: random.Random, base: float, horizon: float, step_h: float, sigma: float) -> list[list[float]]:
    """A mean-reverting log random walk around ``base``, stepping every ~``step_h`` hours."""
    pts, t, x = [[0.0, round(base, 4)]], 0.0, 0.0
    while True:
        t += rnd.expovariate(1.0 / step_h)
        if t >= horizon:
            return pts
        x = 0.7 * x + rnd.gauss(0.0, sigma)
        pts.append([round(t, 4), round(base * math.exp(x), 4)])


def _log_uniform(rnd: random.Random, lo_hi: tuple[float, float] | list[float]) -> float:
    lo, hi = lo_hi
    return math.exp(rnd.uniform(math.log(lo), math.log(hi)))


def _host_factor(world: random.Random, p: MarketParams) -> float:
    """Heavy-tailed: most hosts near their advertised hazard, some far worse, a few better."""
    u = world.random()
    if u < p.host_bad_share:
        f = _log_uniform(world, p.host_bad_factor)
    elif u < p.host_bad_share + p.host_good_share:
        f = _log_uniform(world, p.host_good_factor)
    else:
        f = math.exp(world.gauss(0.0, p.host_sigma))
    return round(f, 4)


def _launch_fail(world: random.Random, p: MarketParams, most: float) -> float:
    if world.random() < p.launch_fail_bad_share:
        return round(world.uniform(*p.launch_fail_bad), 4)
    return round(world.uniform(0.0, most), 4)


def _market(rnd: random.Random, world: random.Random, p: MarketParams,
            horizon: float) -> tuple[list[MachineTrack], list[OfferTrack]]:
    """Machines and offers. ``rnd`` draws what policies see; ``world`` what they do not (hazard
    factors, launch failures), so the visible market of a seed does not move when those change."""
    machines: list[MachineTrack] = []
    offers: list[OfferTrack] = []
    # Marketplace: each machine has an on-demand ask and an interruptible bid.
    n = 0
    for gpu, count in p.vast_machines.items():
        lo, hi = VAST_ON_DEMAND[gpu]
        for _ in range(count):
            n += 1
            mid = f"vast-{n}"
            gpus = rnd.choices([1, 2, 4], weights=[0.8, 0.12, 0.08])[0]
            windows = _windows(rnd, horizon, p.vast_listed_mean_h, p.vast_unlisted_mean_h, 0.65)
            machines.append(MachineTrack(mid, windows, hazard_factor=_host_factor(world, p)))
            per_gpu = rnd.uniform(lo, hi)
            u = rnd.random()  # where the bid sits: 0 = deepest discount, 1 = shallowest
            ratio = 0.45 + 0.45 * u
            outbid = 0.5 * (0.05 / 0.5) ** min(1.0, max(0.0, u + rnd.gauss(0.0, 0.15)))
            reliability = rnd.uniform(0.95, 0.999)
            host = -math.log(reliability) / 24.0
            inet = math.exp(rnd.uniform(math.log(100), math.log(2000)))
            common = dict(machine=mid, provider="vast", gpu=gpu, gpu_count=gpus, vram_gb=GPUS[gpu].vram_gb,
                          region=rnd.choice(["US", "EU", "CA", "AS"]), on_premises=False, owned=False,
                          startup_s=round(180.0 + 8000.0 * 8.0 / inet, 1),
                          launch_fail_prob=_launch_fail(world, p, p.launch_fail_max))
            ask = per_gpu * gpus
            offers.append(OfferTrack(id=f"vast/{100000 + n}", offer_id=f"{100000 + n}", interruptible=False,
                                     hazard_per_hour=round(host, 6), warning_prob=0.0,
                                     prices=_walk(rnd, ask, horizon, p.vast_price_step_h * 3, 0.04), **common))
            offers.append(OfferTrack(id=f"vast/{100000 + n}:bid", offer_id=f"{100000 + n}:bid", interruptible=True,
                                     hazard_per_hour=round(host + outbid, 6), warning_prob=0.0, bid=True,
                                     prices=_walk(rnd, ask * ratio, horizon, p.vast_price_step_h, 0.08), **common))
    # Clouds through SkyPilot: identical slots; on-demand always there, spot capacity comes and goes.
    for cloud, region, instance, gpu, count, price, spot, listed in CLOUD_CATALOG:
        pool_factor = _host_factor(world, p)  # a spot pool is one market: its slots share a factor
        for k in range(p.cloud_slots if count == 1 else 1):
            base = dict(provider="skypilot", gpu=gpu, gpu_count=count, vram_gb=GPUS[gpu].vram_gb,
                        region=f"{cloud}/{region}", on_premises=False, owned=False,
                        startup_s=CLOUD_STARTUP_S[cloud])
            mid = f"{cloud}/{region}/{instance}#{k}"
            if listed >= 1.0:
                windows = [[0.0, horizon]]
            else:  # sold out part of the time (Lambda)
                windows = _windows(rnd, horizon, 24.0 * listed, 24.0 * (1 - listed), listed)
            machines.append(MachineTrack(mid, windows))
            oid = f"{cloud}/{region}/{instance}#{k}"
            offers.append(OfferTrack(id=f"skypilot/{oid}", machine=mid, offer_id=oid, interruptible=False,
                                     hazard_per_hour=0.0, warning_prob=0.0, prices=[[0.0, price]],
                                     launch_fail_prob=round(world.uniform(0.0, CLOUD_LAUNCH_FAIL_MAX), 4), **base))
            if spot:
                smid = mid + ":spot"
                machines.append(MachineTrack(smid, _windows(rnd, horizon, p.spot_listed_mean_h,
                                                            p.spot_unlisted_mean_h, 0.8), hazard_factor=pool_factor))
                disc = rnd.uniform(*CLOUD_SPOT_DISCOUNT)
                offers.append(OfferTrack(id=f"skypilot/{oid}:spot", machine=smid, offer_id=f"{oid}:spot",
                                         interruptible=True, hazard_per_hour=CLOUD_SPOT_HAZARD[cloud],
                                         warning_prob=CLOUD_SPOT_WARNING[cloud],
                                         prices=_walk(rnd, price * disc, horizon, 12.0, 0.04),
                                         launch_fail_prob=round(world.uniform(0.0, CLOUD_LAUNCH_FAIL_MAX), 4),
                                         **{**base, "startup_s": CLOUD_STARTUP_S[cloud]}))
    # Owned GPUs: idle windows between the team's other work.
    for i in range(p.local_gpus):
        mid = f"local-{i}"
        machines.append(MachineTrack(mid, _windows(rnd, horizon, p.local_idle_mean_h, p.local_busy_mean_h, 0.7)))
        offers.append(OfferTrack(id=f"local/local-RTX4090x1#{i}", machine=mid, provider="local",
                                 offer_id=f"local-RTX4090x1#{i}",
                                 gpu="RTX4090", gpu_count=1, vram_gb=24.0, interruptible=False,
                                 hazard_per_hour=0.0, warning_prob=0.0, region="embedded", on_premises=True,
                                 owned=True, startup_s=15.0, prices=[[0.0, round(LOCAL_USD_PER_HOUR, 4)]]))
    return machines, offers


def checkpoint_gb(est: Estimate) -> float:
    """One checkpoint's size: the trained parameters' state (see CHECKPOINT_BYTES_*). The adapter's
    parameter count comes back out of the estimate's weights (jobs.estimate: qlora 0.55 GB and lora
    2 GB per billion base parameters, 16 bytes per adapter parameter, 0.5 GB overhead)."""
    p = est.model.params_b
    if est.method in ("qlora", "lora"):
        base = p * (0.55 if est.method == "qlora" else 2.0) + 0.5
        trained_b = max(0.0, (est.weights_gb - base) / 16.0)
        return trained_b * CHECKPOINT_BYTES_ADAPTER
    return p * CHECKPOINT_BYTES_FULL


def _job(rnd: random.Random, world: random.Random, p: MarketParams, i: int, arrival: float,
         local_gpu: str) -> JobTrack:
    model = rnd.choices([m for m, _ in MODELS], weights=[w for _, w in MODELS])[0]
    restricted = rnd.random() < p.restricted_share
    lora = rnd.random() < p.lora_share
    seq = rnd.choice([1024, 2048, 4096])
    mb = 4096 // seq
    ga = rnd.choice([4, 8])
    gpus = 1
    if not restricted and world.random() < p.multi_gpu_share:  # restricted work stays on the owned GPUs
        gpus = world.choices([n for n, _ in MULTI_GPU], weights=[w for _, w in MULTI_GPU])[0]
    payload: dict[str, Any] = {
        "name": f"j{i:03d}", "base_model": model, "adapter": "lora" if lora else "qlora",
        "load_in_4bit": not lora, "lora_r": rnd.choice([8, 16, 32]), "lora_target_linear": True,
        "sequence_len": seq, "sample_packing": True, "micro_batch_size": mb, "gradient_accumulation_steps": ga,
        "max_steps": 1, "save_steps": 1, "gradient_checkpointing": True,
        "datasets": [{"path": DATASET_PLACEHOLDER.format(job=f"j{i:03d}"), "type": "alpaca"}],
        "resources": {"gpus": gpus},
        # rented machines write checkpoints to object storage (rank refuses them a local folder)
        "checkpoint": {"store": f"s3://tunefleet-checkpoints/market/j{i:03d}"},
        "policy": {"spot": "never" if rnd.random() < p.spot_never_share else "allow",
                   "data": "restricted" if restricted else "open"},
    }
    est = estimate(payload)
    if restricted and est.vram_gb > GPUS[local_gpu].vram_gb:  # restricted work is sized for the owned GPUs
        payload.update(adapter="qlora", load_in_4bit=True)
        est = estimate(payload)
    a100_h = math.exp(rnd.uniform(*map(math.log, p.a100_hours)))  # the job's work, on one A100
    steps = max(10, round(a100_h * 3600.0 * est.tokens_per_s_a100 / est.tokens_per_step))
    ckpt_h = rnd.uniform(*p.checkpoint_minutes) / 60.0  # of training on the job's A100s
    payload["max_steps"] = steps
    one_step_h = est.hours("A100-80GB", gpus) or 0.0  # est was made with max_steps 1: one step on the job's A100s
    payload["save_steps"] = max(1, min(steps, round(ckpt_h / one_step_h))) if one_step_h else steps
    payload = JobSpec.from_payload_dict(payload).to_payload_dict()  # the daemon's own payload shape
    payload["policy"].pop("deadline", None)
    est = estimate(payload)
    deadline = None
    if rnd.random() < p.deadline_share:
        fastest = GPUS[local_gpu].rel_speed if restricted else 1.0  # restricted: only the owned GPUs
        hours = (est.hours("A100-80GB", gpus) or 0.0) / fastest
        deadline = round(arrival + rnd.uniform(*p.deadline_factor) * hours, 4)
    speed = math.exp(rnd.gauss(0.0, p.speed_sigma))
    write_s = p.checkpoint_fixed_s + checkpoint_gb(est) * 8.0 / _log_uniform(world, p.upload_gbps)
    return JobTrack(id=f"j{i:03d}", arrival_h=round(arrival, 4), deadline_h=deadline,
                    speed_factor=round(speed, 4), spec=payload, checkpoint_write_s=round(write_s, 2))


def _waves(world: random.Random, p: MarketParams, offers: list[OfferTrack], horizon: float) -> list[WaveTrack]:
    """A few correlated waves a week, each over one scope: a marketplace region, a marketplace GPU
    model, or one cloud's spot pool (region and GPU model)."""
    spot = [o for o in offers if o.interruptible]
    kinds = [
        sorted({(("region", o.region),) for o in spot if o.provider == "vast"}),
        sorted({(("provider", o.provider), ("gpu", o.gpu)) for o in spot if o.provider == "vast"}),
        sorted({(("region", o.region), ("gpu", o.gpu)) for o in spot if o.provider != "vast"}),
    ]
    kinds = [k for k in kinds if k]
    if not kinds:
        return []
    n = round(p.waves_per_week * horizon / 168.0)  # as many as the rate says, at uniform times
    times = sorted(world.uniform(0.0, horizon) for _ in range(n))
    return [WaveTrack(round(t, 4), dict(world.choice(world.choice(kinds))), round(world.uniform(*p.wave_share), 3))
            for t in times]


def generate(params: MarketParams | None = None, seed: int = 0) -> Trace:
    """A market and a job stream drawn from ``params`` with ``seed`` (same inputs, same trace).

    What policies see is drawn from one stream, what they are not told (hazard factors, GPU speed
    truth, waves, launch failures, checkpoint costs, multi-GPU jobs) from a second one."""
    p = params or MarketParams()
    rnd = random.Random(seed)
    world = random.Random(f"{seed}/world")
    horizon = (p.days + p.drain_days) * 24.0
    machines, offers = _market(rnd, world, p, horizon)
    jobs, t, i = [], 0.0, 0
    while True:
        t += rnd.expovariate(p.jobs_per_day / 24.0)
        if t >= p.days * 24.0:
            break
        i += 1
        jobs.append(_job(rnd, world, p, i, t, "RTX4090"))
    speed_truth = {gpu: round(math.exp(p.speed_truth_sigma * max(-2.0, min(2.0, world.gauss(0.0, 1.0)))), 4)
                   for gpu in sorted({o.gpu for o in offers})}  # clipped at 2 sigma
    waves = _waves(world, p, offers, horizon)
    recorded = json.loads(json.dumps(asdict(p)))  # as the file holds it (tuples become lists)
    recorded["seed"] = seed
    trace = Trace(horizon_h=horizon, machines=machines, offers=offers, jobs=jobs, reclaim_hold_h=p.reclaim_hold_h,
                  hazard_noise=p.hazard_noise, params=recorded, grounding=dict(GROUNDING),
                  speed_truth=speed_truth, waves=waves, outbid_k=p.outbid_k)
    trace.validate()
    return trace
