"""Prove the scheduler: a GPU-market simulation that compares placement policies side by side.

    python -m benchmarks.market [--trace FILE] [--seed N] [--json] [--plot FILE] [--seeds K]
    python -m benchmarks.market --generate FILE [--gen-seed N] [--set KEY=VALUE ...]

A discrete-event simulator (``sim``) plays a market trace (``trace``) over days: machines of
several providers are listed and unlisted, prices move, interruptible offers are reclaimed at
their hazard (with a warning, or without: the work since the last checkpoint is lost), owned GPUs
are idle or busy with the team's other work, and fine-tuning jobs arrive with sizes, deadlines,
data sensitivity and checkpoint intervals. Five policies (``policies``) run on the same trace and
the same reclaims: ``tunefleet`` (``orchestrator.decide.decide``, called as the daemon calls it, so a
job that cannot meet its deadline runs late),
``cheapest_per_hour`` (same hard constraints, lowest $/h: SkyPilot's and dstack's optimizers),
``on_demand`` (never interruptible), ``local_only`` (queue for the owned GPUs) and
``lower_bound`` (each job once, never interrupted, on the cheapest offer that could hold it when
placed). Figures per policy, ratios, target checks and an SVG plot come from ``report``.

Trace file format (JSON, ``"format": "tunefleet-market-trace/1"``; times in hours from hour 0)::

    {
      "format": "tunefleet-market-trace/1",
      "t0": 1796083200.0,          # epoch seconds of hour 0: rank's now = t0 + 3600 * hours
      "horizon_h": 408.0,          # the run stops here; unfinished jobs are not completed
      "reclaim_hold_h": 2.0,       # mean hours a reclaimed machine stays taken (exponential)
      "hazard_noise": 0.3,         # true hazard = advertised x lognormal(sigma, mean 1)
      "params": {...},             # the generator's parameters and seed, for the record
      "grounding": {...},          # what each parameter rests on, in words
      "machines": [                # one attempt at a time per machine
        {"id": "vast-7", "windows": [[0.0, 13.2], [20.9, 51.0]]}   # listed (owned: idle) spans
      ],
      "offers": [                  # ways to rent a machine; each is a providers.base.Offer
        {"id": "vast/100007:bid", "machine": "vast-7", "provider": "vast", "offer_id": "100007:bid",
         "gpu": "RTX4090", "gpu_count": 1, "vram_gb": 24.0, "interruptible": true,
         "hazard_per_hour": 0.21,   # advertised: what the scheduler sees
         "warning_prob": 0.0,       # chance a reclaim comes with a usable SIGTERM notice
         "region": "EU", "on_premises": false, "owned": false, "startup_s": 290.0,
         "prices": [[0.0, 0.31], [3.7, 0.29]]}   # step function: $/h from that hour on
      ],
      "jobs": [
        {"id": "j001", "arrival_h": 1.7, "deadline_h": 9.4,   # absolute hours, or null
         "speed_factor": 1.04,      # real hours = estimated hours x this (unknown to policies)
         "spec": {...}}             # the daemon's payload (JobSpec.to_payload_dict), no deadline
      ]
    }

Reclaims are not in the file: each offer's reclaims are a Poisson process at its true hazard,
drawn from ``--seed`` (one random stream per offer), so every policy meets the same ones. The
shipped ``benchmarks/traces/default.json`` is ``--generate`` with the defaults and
``--gen-seed 0``. More in ``benchmarks/market/README.md``.
"""

from .run import run_all
from .trace import MarketParams, Trace, generate, load, save

__all__ = ["MarketParams", "Trace", "generate", "load", "run_all", "save"]
