"""The training payload (``python -m jobs.train``) as real subprocesses: exit codes, checkpoints,
preemption by SIGTERM, loss by SIGKILL, and resumption that reproduces an uninterrupted run
bit for bit. Nothing is downloaded: the tiny model is built in code (``model_cache`` fixture).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.storage import MANIFEST, CorruptCheckpoint, LocalFolderStore
from jobs.spec import load_job_file

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "qlora-tiny.yaml"

MAX_STEPS = 120
SAVE = 20
KEEP = 3
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_PREEMPTED = 0, 1, 2, 75
WAIT_S = 300  # generous upper bound for one payload process on a loaded 2-core machine


# ---- helpers -----------------------------------------------------------------------------------


def payload_dict(**changes) -> dict:
    spec = load_job_file(EXAMPLE).to_payload_dict()
    spec.update(max_steps=MAX_STEPS, save_steps=SAVE)
    spec["checkpoint"] = {**spec["checkpoint"], "keep": KEEP}
    spec["resources"] = {**spec["resources"], "cpus": 1}
    spec.update(changes)
    return spec


@dataclass
class Payload:
    """One payload process (an attempt) and where it writes."""

    proc: subprocess.Popen
    log_path: Path
    store_root: Path
    job_id: str

    @property
    def store(self) -> LocalFolderStore:
        return LocalFolderStore(self.store_root)

    def progress(self) -> dict:
        return self.store.read_json(self.job_id, "progress.json") or {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"payload did not finish in {WAIT_S}s; log tail:\n{self.log()[-3000:]}")


def start_payload(env, spec_path: Path, store_root: Path, job_id: str, attempt: str, scratch: Path) -> Payload:
    log_path = scratch / f"{job_id}-{attempt}.log"
    cmd = [
        sys.executable, "-m", "jobs.train",
        "--spec", str(spec_path),
        "--store", store_root.as_uri(),
        "--job-id", job_id,
        "--attempt-id", attempt,
        "--work-dir", str(scratch / f"work-{job_id}-{attempt}"),
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return Payload(proc, log_path, store_root, job_id)


def run_payload(env, spec_path, store_root, job_id, attempt, scratch) -> tuple[int, Payload]:
    p = start_payload(env, spec_path, store_root, job_id, attempt, scratch)
    return p.wait(), p


def poll_until(p: Payload, ready, what: str) -> dict:
    """Poll progress.json until ready(progress) holds; fail if the process ends first."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        doc = p.progress()
        if ready(doc):
            return doc
        if p.proc.poll() is not None:
            pytest.fail(
                f"payload exited ({p.proc.returncode}) before {what}; last progress {doc}; "
                f"log tail:\n{p.log()[-3000:]}"
            )
        time.sleep(0.01)
    p.proc.kill()
    p.proc.wait()
    pytest.fail(f"timed out waiting for {what}")


def adapter_tensors(store_root: Path, job_id: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(store_root / job_id / "final" / "adapter_model.safetensors"))


def assert_bitwise_equal(got: dict, want: dict) -> None:
    import torch

    assert want, "reference adapter has no tensors"
    assert set(got) == set(want)
    different = [
        k for k in want if got[k].dtype != want[k].dtype or got[k].shape != want[k].shape
        or not torch.equal(got[k], want[k])
    ]
    assert not different, f"{len(different)}/{len(want)} adapter tensors differ, e.g. {different[:3]}"


def committed_steps(store_root: Path, job_id: str) -> list[int]:
    return [r.step for r in LocalFolderStore(store_root).list_checkpoints(job_id)]


def ckpt_dir(store_root: Path, job_id: str, step: int) -> Path:
    return store_root / job_id / "checkpoints" / f"{step:010d}"


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("payload")


@pytest.fixture(scope="module")
def env(model_cache, scratch) -> dict:
    return payload_env(model_cache, scratch)


def payload_env(model_cache: Path, scratch: Path) -> dict:
    """The environment a payload process gets: offline, no GPU, its own home under ``scratch``."""
    home = scratch / "home"
    home.mkdir()
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(home / "hf"),
        "TUNEFLEET_HOME": str(home),
        "TUNEFLEET_MODEL_CACHE": str(model_cache),
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="module")
def spec_path(scratch) -> Path:
    path = scratch / "spec.json"
    path.write_text(json.dumps(payload_dict()))
    return path


@dataclass
class Reference:
    rc: int
    store_root: Path
    job_id: str
    log: str
    progress: dict
    tensors: dict


@pytest.fixture(scope="module")
def reference(env, spec_path, scratch) -> Reference:
    """One uninterrupted run, shared by every test that compares against it."""
    store_root = scratch / "ref-store"
    rc, p = run_payload(env, spec_path, store_root, "ref", "a1", scratch)
    tensors = adapter_tensors(store_root, "ref") if rc == 0 else {}
    return Reference(rc, store_root, "ref", p.log(), p.progress(), tensors)


@dataclass
class Killed:
    store_root: Path  # pristine copy of the store right after the SIGKILL; copy it before use
    job_id: str
    reached: int  # the step in progress.json after the kill


@pytest.fixture(scope="module")
def killed(env, spec_path, scratch) -> Killed:
    """A run SIGKILLed mid-training after at least two checkpoints were committed."""
    store_root = scratch / "killed-store"
    p = start_payload(env, spec_path, store_root, "kill", "a1", scratch)

    def ready(doc):
        # two commits have landed and at least one save interval of training is left. A wide window
        # on purpose: a poller slowed down by a busy machine cannot miss it (waiting for the moment
        # step == checkpoint_step could, and then the run finished before the kill)
        return (
            doc.get("state") == "running"
            and (doc.get("checkpoint_step") or 0) >= 2 * SAVE
            and (doc.get("step") or 0) <= MAX_STEPS - SAVE
        )

    poll_until(p, ready, "two committed checkpoints")
    p.proc.send_signal(signal.SIGKILL)
    rc = p.wait()
    assert rc == -signal.SIGKILL, p.log()[-3000:]
    doc = p.progress()
    assert doc.get("state") == "running"  # nobody got to say anything else
    reached = int(doc["step"])
    assert reached < MAX_STEPS, "the run finished before it could be killed mid-training"
    return Killed(store_root, "kill", reached)


def fresh_copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


# ---- 1. the reference run ----------------------------------------------------------------------


def test_uninterrupted_run_commits_checkpoints_and_final(reference):
    assert reference.rc == EXIT_OK, reference.log[-3000:]
    save_steps = list(range(SAVE, MAX_STEPS + 1, SAVE))
    assert committed_steps(reference.store_root, "ref") == save_steps[-KEEP:]
    for step in save_steps[:-KEEP]:
        assert not ckpt_dir(reference.store_root, "ref", step).exists(), f"retention left step {step}"

    final = reference.store_root / "ref" / "final"
    assert (final / MANIFEST).is_file()
    assert (final / "adapter_model.safetensors").is_file()
    store = LocalFolderStore(reference.store_root)
    ref = store.final("ref")
    assert ref is not None and ref.meta["step"] == MAX_STEPS
    assert "adapter_model.safetensors" in {f.path for f in ref.files}

    assert reference.progress["state"] == "succeeded"
    assert reference.progress["step"] == MAX_STEPS
    assert reference.progress["resumed_from_step"] == 0
    assert "resume from step 0" in reference.log

    # training moved the adapter: LoRA B starts at zero, so equality checks below are not vacuous
    assert any(k.endswith("lora_B.weight") and bool(t.abs().sum() > 0) for k, t in reference.tensors.items())


# ---- 2. SIGTERM: preempted, resumable, no step lost ---------------------------------------------


def test_sigterm_commits_current_step_and_resume_is_bitwise_identical(env, spec_path, scratch, reference):
    assert reference.rc == EXIT_OK
    store_root = scratch / "term-store"
    p = start_payload(env, spec_path, store_root, "term", "a1", scratch)
    poll_until(p, lambda d: (d.get("step") or 0) >= int(0.4 * MAX_STEPS), "40% of the steps")
    p.proc.send_signal(signal.SIGTERM)
    rc = p.wait()
    log = p.log()
    assert rc == EXIT_PREEMPTED, log[-3000:]

    doc = p.progress()
    stopped = doc["step"]
    assert doc["state"] == "preempted"
    assert 0.4 * MAX_STEPS <= stopped < MAX_STEPS, f"stopped at {stopped}: not mid-run"
    store = LocalFolderStore(store_root)
    newest = store.latest_checkpoint("term")
    assert newest is not None and newest.step == stopped  # the step reached is the step saved
    assert newest.meta["attempt_id"] == "a1"
    assert store.final("term") is None
    assert f"preempted at step {stopped}" in log

    rc2, p2 = run_payload(env, spec_path, store_root, "term", "a2", scratch)
    log2 = p2.log()
    assert rc2 == EXIT_OK, log2[-3000:]
    assert f"resume from step {stopped}" in log2
    doc2 = p2.progress()
    assert doc2["attempt_id"] == "a2"
    assert doc2["state"] == "succeeded" and doc2["step"] == MAX_STEPS
    assert doc2["resumed_from_step"] == stopped
    assert store.final("term").meta["resumed_from_step"] == stopped
    assert_bitwise_equal(adapter_tensors(store_root, "term"), reference.tensors)


# ---- 3. SIGKILL: resume from the newest committed checkpoint ------------------------------------


def test_sigkill_resumes_from_newest_committed_and_is_bitwise_identical(
    env, spec_path, scratch, reference, killed, tmp_path
):
    assert reference.rc == EXIT_OK
    store_root = fresh_copy(killed.store_root, tmp_path / "store")
    store = LocalFolderStore(store_root)
    newest = store.latest_checkpoint(killed.job_id)
    assert newest is not None
    assert killed.reached - SAVE <= newest.step <= killed.reached
    assert store.final(killed.job_id) is None

    rc, p = run_payload(env, spec_path, store_root, killed.job_id, "a2", scratch)
    log = p.log()
    assert rc == EXIT_OK, log[-3000:]
    assert f"resume from step {newest.step}" in log
    assert p.progress()["resumed_from_step"] == newest.step
    assert p.progress()["state"] == "succeeded"
    assert_bitwise_equal(adapter_tensors(store_root, killed.job_id), reference.tensors)


# ---- 4. half-written and corrupt checkpoints are never resumed from -----------------------------


def test_half_written_and_corrupt_checkpoints_are_skipped(env, spec_path, scratch, reference, killed, tmp_path):
    assert reference.rc == EXIT_OK
    job = killed.job_id
    store_root = fresh_copy(killed.store_root, tmp_path / "store")
    store = LocalFolderStore(store_root)
    refs = store.list_checkpoints(job)
    assert len(refs) >= 2, [r.step for r in refs]
    newest, older = refs[-1], refs[-2]

    # a newer checkpoint whose upload never finished: every file, but no manifest
    half = ckpt_dir(store_root, job, newest.step + SAVE)
    shutil.copytree(ckpt_dir(store_root, job, newest.step), half, dirs_exist_ok=True)
    (half / MANIFEST).unlink()
    # the newest committed one loses half of a file its manifest lists
    assert "optimizer.pt" in {f.path for f in newest.files}
    victim = ckpt_dir(store_root, job, newest.step) / "optimizer.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])

    # preconditions: the half-written one is invisible, the corrupt one is listed but fails to verify
    assert store.latest_checkpoint(job).step == newest.step
    with pytest.raises(CorruptCheckpoint):
        store.download(store.latest_checkpoint(job), tmp_path / "probe")

    rc, p = run_payload(env, spec_path, store_root, job, "a3", scratch)
    log = p.log()
    assert rc == EXIT_OK, log[-3000:]
    assert f"skipping checkpoint {newest.step}" in log
    assert f"resume from step {older.step}" in log
    assert p.progress()["resumed_from_step"] == older.step
    assert_bitwise_equal(adapter_tensors(store_root, job), reference.tensors)
    # what is committed at the end is whole again (the corrupt step was trained and committed anew)
    for ref in store.list_checkpoints(job):
        store.download(ref, tmp_path / f"verify-{ref.step}")


# ---- 5. bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, says",
    [
        ({"datasets": [{"path": "/nonexistent/tunefleet/missing.jsonl", "type": "alpaca", "field": None}]},
         "missing.jsonl"),
        ({"load_in_4bit": False}, "load_in_4bit"),  # qlora without a 4-bit base: invalid spec
    ],
    ids=["missing-dataset", "invalid-spec"],
)
def test_bad_input_exits_2_and_commits_nothing(env, scratch, tmp_path, changes, says):
    spec_path = tmp_path / "bad.json"
    spec_path.write_text(json.dumps(payload_dict(**changes)))
    store_root = tmp_path / "store"
    rc, p = run_payload(env, spec_path, store_root, "bad", "a1", tmp_path)
    log = p.log()
    assert rc == EXIT_BAD_INPUT, log[-3000:]
    assert "bad input" in log and says in log
    store = LocalFolderStore(store_root)
    assert store.list_checkpoints("bad") == []
    assert store.list_keys("bad/checkpoints/") == []
    assert store.final("bad") is None
