"""A job on several devices: ``jobs.gang`` plans the process count and batch split, and the payload
runs as a gang of real ranks (gloo on CPU: the stand-in for a GPU machine's NCCL) that train
together, stop together on SIGTERM, save once, and resume on another process count.

The yardstick is always the same job in one process: the global batch (micro batch x accumulation
x planned processes) is kept, so DDP and FSDP must reproduce a single process's optimization up
to float reduction order. Tolerances (measured on this machine: DDP QLoRA adapters bitwise equal,
FSDP full fine-tune weights within 1.5e-7): loss per step within 1e-3, weights within 1e-5.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.gang import PlanError, plan
from jobs.spec import JobSpec, load_job_file
from tests.test_payload import REPO, WAIT_S, Payload, committed_steps, payload_env

EXAMPLE = REPO / "examples" / "qlora-tiny.yaml"
LOSS_TOL = 1e-3
WEIGHT_TOL = 1e-5
MAX_STEPS = 16
SAVE = 5
EXIT_PREEMPTED, EXIT_SETUP_FAILED = 75, 3


def spec_dict(**changes) -> dict:
    spec = load_job_file(EXAMPLE).to_payload_dict()
    spec.update(max_steps=MAX_STEPS, save_steps=SAVE, micro_batch_size=2, gradient_accumulation_steps=1,
                lora_dropout=0.0, val_set_size=0.0)
    spec["checkpoint"] = {**spec["checkpoint"], "keep": 5}
    spec["resources"] = {**spec["resources"], "gpus": 2, "device": "cpu", "cpus": 2}
    resources = changes.pop("resources", {})
    spec["resources"].update(resources)
    spec.update(changes)
    return spec


# ---- the plan (pure) ---------------------------------------------------------------------------


def _spec(**changes) -> JobSpec:
    return JobSpec.from_payload_dict(spec_dict(**changes))


def test_plan_keeps_the_global_batch_on_any_process_count():
    spec = _spec(strategy="ddp", micro_batch_size=4, gradient_accumulation_steps=2)  # 4 x 2 x 2 GPUs = 16
    assert spec.global_batch == 16
    for n, (micro, accum) in {1: (4, 4), 2: (4, 2), 4: (4, 1), 8: (2, 1), 16: (1, 1)}.items():
        p = plan(spec, "cpu", processes=n)
        assert (p.processes, p.micro_batch, p.accumulation) == (n, micro, accum)
        assert p.micro_batch * p.accumulation * p.processes == 16
    assert plan(spec, "cpu", processes=1).strategy == "single"
    assert plan(spec, "cpu", processes=2).strategy == "ddp"


def test_plan_refuses_a_global_batch_that_does_not_split():
    spec = _spec(strategy="ddp", resources={"gpus": 3}, micro_batch_size=1)  # global batch 3
    with pytest.raises(PlanError, match="global batch of 3 .* does not split over 2 processes"):
        plan(spec, "cpu", processes=2)


def test_plan_uses_the_gpus_asked_for_and_visible():
    spec = _spec(resources={"gpus": 4, "device": "auto"})  # qlora, strategy auto
    assert plan(spec, "cuda", visible_gpus=4).processes == 4
    assert plan(spec, "cuda", visible_gpus=4).strategy == "ddp"
    two = plan(spec, "cuda", visible_gpus=2)  # a machine showing fewer: every one works, same batch
    assert (two.processes, two.accumulation * two.micro_batch * 2) == (2, spec.global_batch)
    assert plan(spec, "cpu").processes == 1  # auto on a CPU: one process, the whole global batch
    full = _spec(adapter=None, load_in_4bit=False, resources={"gpus": 4})
    assert plan(full, "cuda", visible_gpus=4).strategy == "fsdp"
    assert plan(_spec(strategy="single", resources={"gpus": 4}), "cuda", visible_gpus=4).processes == 1


def test_spec_rules_for_strategy(tmp_path):
    from jobs.spec import JobFileError

    data = (REPO / "examples" / "data" / "alpaca-tiny.jsonl").as_posix()
    path = tmp_path / "job.yaml"
    path.write_text(f"base_model: tunefleet/tiny-llama\nadapter: qlora\nload_in_4bit: true\nstrategy: fsdp\n"
                    f"datasets: [{{path: {data}, type: alpaca}}]\nresources: {{gpus: 1}}\n")
    with pytest.raises(JobFileError) as exc:
        load_job_file(path)
    text = str(exc.value)
    assert "job.yaml:4: strategy: fsdp runs one process per GPU and resources.gpus is 1" in text
    assert "fsdp with a quantized base" in text and "use strategy: ddp" in text


# ---- real gangs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gang")


@pytest.fixture(scope="module")
def env(model_cache, scratch) -> dict:
    return payload_env(model_cache, scratch)


def start(env, scratch: Path, name: str, spec: dict, store: Path, processes: int | None = None) -> Payload:
    spec_path = scratch / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "jobs.train", "--spec", str(spec_path), "--store", store.as_uri(),
           "--job-id", "job", "--attempt-id", name, "--work-dir", str(scratch / f"work-{name}")]
    if processes is not None:
        cmd += ["--processes", str(processes)]
    log_path = scratch / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return Payload(proc, log_path, store, "job")


def run(env, scratch, name, spec, store, processes=None) -> Payload:
    p = start(env, scratch, name, spec, store, processes)
    code = p.wait()
    assert code == 0, f"{name} exited {code}:\n{p.log()[-3000:]}"
    return p


def preempt(p: Payload, after_step: int, rank: int | None = None) -> int:
    """SIGTERM the launcher (``rank=None``) or one rank only, once training passed ``after_step``;
    the gang's exit code."""
    deadline = time.monotonic() + WAIT_S
    while (p.progress().get("step") or 0) < after_step:
        assert p.proc.poll() is None, f"ended before step {after_step}:\n{p.log()[-3000:]}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)
    if rank is None:
        p.proc.send_signal(signal.SIGTERM)
    else:
        pids = re.search(r"started \d+ ranks \(pids ([\d, ]+)\)", p.log())
        assert pids, p.log()[-2000:]
        os.kill(int(pids.group(1).split(", ")[rank]), signal.SIGTERM)
    return p.wait()


def final_meta(store: Path) -> dict:
    return json.loads((store / "job" / "final" / "tunefleet_training.json").read_text())


def tensors(store: Path, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(store / "job" / "final" / name))


def assert_close(got: dict, want: dict, tol: float = WEIGHT_TOL) -> float:
    assert set(got) == set(want) and want
    worst = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
    assert worst <= tol, f"weights differ by up to {worst:g} (tolerance {tol:g})"
    return worst


def assert_same_curve(got: dict, want: dict) -> None:
    a, b = dict((s, v) for s, v in got["history"]), dict((s, v) for s, v in want["history"])
    assert sorted(a) == sorted(b) == list(range(1, MAX_STEPS + 1))
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst <= LOSS_TOL, f"loss curves differ by up to {worst:g} at some step"


def copy_store(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


@pytest.mark.slow
def test_ddp_gang_matches_one_process_and_resumes_on_one_or_two(env, scratch):
    spec = spec_dict(strategy="ddp")  # QLoRA, global batch 2 x 1 x 2 = 4
    ref = scratch / "ref-store"
    run(env, scratch, "ref", spec, ref, processes=1)  # one process: micro 2 x accumulation 2

    store = scratch / "ddp-store"
    p = start(env, scratch, "ddp", spec, store)
    assert preempt(p, after_step=7) == EXIT_PREEMPTED  # SIGTERM to the launcher: every rank gets it
    assert "started 2 ranks" in p.log() and "2 processes (ddp), micro batch 2 x accumulation 1 x 2" in p.log()
    stop = p.progress()["step"]
    assert p.progress()["state"] == "preempted" and p.progress()["exit_code"] == EXIT_PREEMPTED
    steps = committed_steps(store, "job")
    # saved once at the stop step, besides the regular saves; both ranks' shares are in it
    assert steps == sorted({*range(SAVE, stop + 1, SAVE), stop}), (steps, stop)
    newest = store / "job" / "checkpoints" / f"{stop:010d}"
    assert (newest / "rng_state_0.pth").is_file() and (newest / "rng_state_1.pth").is_file()

    one = copy_store(store, scratch / "resume-one")
    run(env, scratch, "resume-on-1", spec, one, processes=1)
    two = copy_store(store, scratch / "resume-two")
    run(env, scratch, "resume-on-2", spec, two)
    for resumed in (one, two):
        assert final_meta(resumed)["resumed_from_step"] == stop
        assert_same_curve(final_meta(resumed), final_meta(ref))
        assert_close(tensors(resumed, "adapter_model.safetensors"), tensors(ref, "adapter_model.safetensors"))


@pytest.mark.slow
def test_fsdp_full_fine_tune_stops_together_and_resumes_sharded(env, scratch):
    spec = spec_dict(adapter=None, load_in_4bit=False, learning_rate=1e-3, lora_target_linear=False, strategy="fsdp")
    assert JobSpec.from_payload_dict(spec).distributed_strategy == "fsdp"
    ref = scratch / "full-ref"
    run(env, scratch, "full-ref", spec, ref, processes=1)

    store = scratch / "fsdp-store"
    p = start(env, scratch, "fsdp", spec, store)
    # SIGTERM to rank 1 alone: the gang agrees at the next step end, and rank 0 saves and reports
    assert preempt(p, after_step=7, rank=1) == EXIT_PREEMPTED
    stop = p.progress()["step"]
    assert p.progress()["state"] == "preempted"
    newest = store / "job" / "checkpoints" / f"{stop:010d}"
    assert committed_steps(store, "job")[-1] == stop
    assert (newest / "pytorch_model_fsdp_0").is_dir(), sorted(x.name for x in newest.iterdir())

    # a sharded checkpoint does not resume in one process: refused with the reason, nothing written
    alone = copy_store(store, scratch / "fsdp-alone")
    before = committed_steps(alone, "job")
    p1 = start(env, scratch, "fsdp-on-1", spec, alone, processes=1)
    assert p1.wait() == EXIT_SETUP_FAILED
    assert "resumes only under FSDP" in p1.log()
    assert committed_steps(alone, "job") == before and not (alone / "job" / "final").exists()

    run(env, scratch, "fsdp-resume", spec, store)
    meta = final_meta(store)
    assert meta["resumed_from_step"] == stop
    assert_same_curve(meta, final_meta(ref))
    assert_close(tensors(store, "model.safetensors"), tensors(ref, "model.safetensors"))
