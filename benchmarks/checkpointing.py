"""What checkpointing costs and what a preemption loses, measured on the real payload.

    python -m benchmarks.checkpointing [--steps 400] [--every 50] [--json]

1. Training-step overhead of checkpointing every N steps vs. not checkpointing (target <= 5 %):
   the same QLoRA job on the tiny model, run twice in this run; the payload reports the Trainer's
   own train_runtime. Uploads run in the background, so what remains is the Trainer's local save.
2. Steps lost per preemption: a SIGTERM (with warning) and a SIGKILL (none) drill mid-run; lost =
   step reached when interrupted - step the next attempt resumed from (targets: 0 and <= N).

Baselines are measured in the same run. Figures on a 2-core CPU are for the tiny model, whose
steps take milliseconds; a real model's steps take seconds, so the same save is relatively cheaper.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jobs.spec import load_job_file

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "qlora-tiny.yaml"


def _spec(steps: int, every: int) -> dict:
    spec = load_job_file(EXAMPLE).to_payload_dict()
    spec.update(max_steps=steps, save_steps=every)
    spec["checkpoint"]["keep"] = 2
    return spec


def _run(work: Path, name: str, spec: dict, interrupt: signal.Signals | None = None, at: int = 0) -> dict:
    """Run one attempt; optionally interrupt it once it reports step >= ``at``."""
    store = work / name
    spec_file = work / f"{name}.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "jobs.train", "--spec", str(spec_file), "--store", store.as_uri(),
           "--job-id", "bench", "--attempt-id"]
    log = open(work / f"{name}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen([*cmd, f"{name}-1"], env=env, stdout=log, stderr=subprocess.STDOUT)
    reached = None
    if interrupt is not None:
        progress = store / "bench" / "progress.json"
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                step = json.loads(progress.read_text()).get("step", 0)
            except (OSError, ValueError):
                step = 0
            if step >= at:
                proc.send_signal(interrupt)
                reached = step
                break
            time.sleep(0.05)
        proc.wait(timeout=300)
        if interrupt == signal.SIGTERM:  # it finished its step and saved: that is the step reached
            reached = json.loads(progress.read_text()).get("step", reached)
        proc = subprocess.Popen([*cmd, f"{name}-2"], env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.wait(timeout=600)
    log.close()
    text = (work / f"{name}.log").read_text(errors="replace")
    resumed = [int(m) for m in re.findall(r"resume from step (\d+)", text)]
    final = json.loads((store / "bench" / "final" / "tunefleet_training.json").read_text())
    return {"reached": reached, "resumed_from": resumed[-1] if resumed else 0, "final": final}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tf-ckpt-bench-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("TUNEFLEET_MODEL_CACHE", str(work / "models"))
        base = _run(work, "none", _spec(args.steps, args.steps))  # saves only at the very end
        ckpt = _run(work, "every", _spec(args.steps, args.every))
        at = int(args.steps * 0.45) + 3  # between checkpoints
        term = _run(work, "sigterm", _spec(args.steps, args.every), signal.SIGTERM, at)
        kill = _run(work, "sigkill", _spec(args.steps, args.every), signal.SIGKILL, at)
    t0, t1 = base["final"]["train_runtime_s"], ckpt["final"]["train_runtime_s"]
    n_saves = len(ckpt["final"]["checkpoints_committed"]) - 1
    result = {
        "steps": args.steps,
        "every": args.every,
        "train_s_no_checkpoints": round(t0, 3),
        "train_s_with_checkpoints": round(t1, 3),
        "extra_saves": n_saves,
        "overhead_pct": round(100 * (t1 - t0) / t0, 2),
        "background_upload_s": ckpt["final"]["checkpoint_upload_s"],
        "sigterm_steps_lost": term["reached"] - term["resumed_from"],
        "sigkill_steps_lost": kill["reached"] - kill["resumed_from"],
        "sigterm_reached": term["reached"],
        "sigkill_reached": kill["reached"],
        "targets": {"overhead_pct": 5.0, "sigterm_steps_lost": 0, "sigkill_steps_lost": args.every},
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"train time, {args.steps} steps: {t0:.2f} s without checkpoints, {t1:.2f} s with one every "
          f"{args.every} ({n_saves} extra saves) -> overhead {result['overhead_pct']:.1f} % (target <= 5 %); "
          f"uploads took {result['background_upload_s']:.2f} s in the background")
    print(f"SIGTERM at step {term['reached']}: resumed from {term['resumed_from']} -> "
          f"{result['sigterm_steps_lost']} steps lost (target 0)")
    print(f"SIGKILL at step {kill['reached']}: resumed from {kill['resumed_from']} -> "
          f"{result['sigkill_steps_lost']} steps lost (target <= {args.every})")


if __name__ == "__main__":
    main()
