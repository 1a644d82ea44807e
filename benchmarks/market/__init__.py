"""Prove the scheduler: a GPU-market simulation that compares placement policies side by side.

    python -m benchmarks.market [--trace FILE] [--seed N] [--json] [--plot FILE] [--seeds K] [--gen-seeds K]
    python -m benchmarks.market --generate FILE [--gen-seed N] [--set KEY=VALUE ...]

A discrete-event simulator (``sim``) plays a market trace (``trace``) over days: machines of
several providers are listed and unlisted, prices move, interruptible offers are reclaimed (with a
warning, or without: the work since the last checkpoint is lost), owned GPUs are idle or busy with
the team's other work, and fine-tuning jobs arrive with sizes, GPU counts, deadlines, data
sensitivity and checkpoint intervals. The world disagrees with what policies are told: hosts are
reclaimed at their advertised hazard times a heavy-tailed factor, GPU models train at the table's
speed times a per-model truth, reclaim waves sweep a region or a GPU model, marketplace bids are
outbid when their price rises, launches fail, and checkpoint writes cost billed time. Seven
policies (``policies``) run on the same trace and the same draws: ``tunefleet`` and
``tunefleet_no_learning`` (``orchestrator.decide.decide``, called as the daemon calls it, with the
throughput measured so far), ``cheapest_effective`` (lowest $ per unit of throughput that meets the
deadline: a careful SkyPilot/dstack user), ``cheapest_per_hour`` (lowest $/h), ``on_demand`` (never
interruptible), ``local_only`` (queue for the owned GPUs) and ``lower_bound`` (a provable bound of
each job's cost). Figures per policy, ratios, target checks and an SVG plot come from ``report``.

Trace file format (JSON, ``"format": "tunefleet-market-trace/2"``; times in hours from hour 0;
format 1 files still load, with every field marked (2) at its default: the world obeys the model)::

    {
      "format": "tunefleet-market-trace/2",
      "t0": 1796083200.0,          # epoch seconds of hour 0: rank's now = t0 + 3600 * hours
      "horizon_h": 408.0,          # the run stops here; unfinished jobs are not completed
      "reclaim_hold_h": 2.0,       # mean hours a reclaimed machine stays taken (exponential)
      "hazard_noise": 0.3,         # per seed: true hazard x lognormal(sigma, mean 1)
      "outbid_k": 2.0,             # (2) outbid probability per price step up = min(1, k x rise fraction)
      "speed_truth": {"L4": 0.8},  # (2) per GPU model: real / jobs.gpus throughput
      "waves": [                   # (2) correlated reclaims
        {"t_h": 96.8, "scope": {"region": "US"}, "share": 0.5}   # scope: provider, gpu and/or region
      ],
      "params": {...},             # the generator's parameters and seed, for the record
      "grounding": {...},          # what each parameter rests on, in words
      "machines": [                # one attempt at a time per machine
        {"id": "vast-7", "windows": [[0.0, 13.2], [20.9, 51.0]],   # listed (owned: idle) spans
         "hazard_factor": 4.2}     # (2) true hazard = advertised x this
      ],
      "offers": [                  # ways to rent a machine; each is a providers.base.Offer
        {"id": "vast/100007:bid", "machine": "vast-7", "provider": "vast", "offer_id": "100007:bid",
         "gpu": "RTX4090", "gpu_count": 1, "vram_gb": 24.0, "interruptible": true,
         "hazard_per_hour": 0.21,   # advertised: what the scheduler sees
         "warning_prob": 0.0,       # chance a reclaim comes with a usable SIGTERM notice
         "region": "EU", "on_premises": false, "owned": false, "startup_s": 290.0,
         "prices": [[0.0, 0.31], [3.7, 0.29]],   # step function: $/h from that hour on
         "launch_fail_prob": 0.02,  # (2) a launch fails after its start-up
         "bid": true}               # (2) a marketplace bid: outbid when its price rises
      ],
      "jobs": [
        {"id": "j001", "arrival_h": 1.7, "deadline_h": 9.4,   # absolute hours, or null
         "speed_factor": 1.04,      # real hours = estimated hours x this / speed_truth[gpu]
         "checkpoint_write_s": 14.2,  # (2) one save + upload, billed wall time
         "spec": {...}}             # the daemon's payload (JobSpec.to_payload_dict), no deadline
      ]
    }

Random outcomes are not in the file: reclaims (per offer), wave hits (per wave and machine),
outbids (per bid and price step) and launch failures (per offer, job and launch number) are drawn
from ``--seed``, so every policy meets the same ones. The shipped
``benchmarks/traces/default.json`` is ``--generate`` with the defaults and ``--gen-seed 0``. More
in ``benchmarks/market/README.md``.
"""

from .run import run_all
from .trace import MarketParams, Trace, generate, load, save

__all__ = ["MarketParams", "Trace", "generate", "load", "run_all", "save"]
