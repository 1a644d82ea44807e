"""Interrupting the real payload with its checkpoints in S3 (a moto server on 127.0.0.1, real HTTP).

SIGTERM with grace: no step lost. SIGKILL: resume from the newest committed checkpoint. Either
way the final adapter, downloaded from S3, is bitwise equal to an uninterrupted run's.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.s3_fixtures import new_bucket, running_moto
from tests.test_payload import (  # noqa: F401 - fixtures shared with the local-folder tests
    MAX_STEPS,
    REPO,
    SAVE,
    WAIT_S,
    assert_bitwise_equal,
    env,
    reference,
    scratch,
    spec_path,
)

pytestmark = pytest.mark.slow
SECRET = "s3-test-secret-never-logged"


@pytest.fixture(scope="module")
def s3(env):  # noqa: F811
    with running_moto() as endpoint:
        bucket = new_bucket(endpoint)
        aws = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": SECRET,
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        yield f"s3://{bucket}/ckpt", {**env, **aws}


def _store(uri: str, s3_env: dict):
    import os

    from infra.storage import open_store

    old = {k: os.environ.get(k) for k in s3_env if k.startswith("AWS_")}
    os.environ.update({k: v for k, v in s3_env.items() if k.startswith("AWS_")})
    try:
        return open_store(uri)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _start(s3_env, spec_path, uri, job_id, attempt, scratch):  # noqa: F811
    log = scratch / f"s3-{job_id}-{attempt}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.train", "--spec", str(spec_path), "--store", uri, "--job-id", job_id,
             "--attempt-id", attempt, "--work-dir", str(scratch / f"s3work-{job_id}-{attempt}")],
            cwd=REPO, env=s3_env, stdout=f, stderr=subprocess.STDOUT,
        )
    return proc, log


def _interrupt(store, proc, job_id, sig, ready) -> int:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and proc.poll() is None:
        doc = store.read_json(job_id, "progress.json") or {}
        if ready(doc, store):
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    return proc.wait(timeout=WAIT_S)


def _final_tensors(store, job_id: str, dest: Path) -> dict:
    from safetensors.torch import load_file

    store.download(store.final(job_id), dest)
    return load_file(str(dest / "adapter_model.safetensors"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_interrupted_run_with_s3_checkpoints_ends_bitwise_equal(s3, spec_path, scratch, reference, sig, tmp_path):  # noqa: F811
    uri, s3_env = s3
    store = _store(uri, s3_env)
    job_id = f"s3-{sig.name.lower()}"
    proc, log = _start(s3_env, spec_path, uri, job_id, "a1", scratch)
    if sig == signal.SIGTERM:
        ready = lambda doc, st: (doc.get("step") or 0) >= int(0.4 * MAX_STEPS)  # noqa: E731
    else:  # mid-run, once a checkpoint is committed (the payload reports it in its progress object)
        ready = lambda doc, st: (doc.get("checkpoint_step") or 0) >= SAVE and (doc.get("step") or 0) >= 0.4 * MAX_STEPS  # noqa: E731
    rc = _interrupt(store, proc, job_id, sig, ready)
    text = log.read_text(errors="replace")
    reached = (store.read_json(job_id, "progress.json") or {}).get("step")
    newest = store.latest_checkpoint(job_id)
    assert newest is not None, text[-3000:]
    if sig == signal.SIGTERM:
        assert rc == 75, text[-3000:]
        assert newest.step == reached  # with a warning, no step is lost
    else:
        assert rc == -signal.SIGKILL, text[-3000:]
        assert newest.step >= SAVE and newest.step % SAVE == 0  # a committed interval checkpoint

    proc2, log2 = _start(s3_env, spec_path, uri, job_id, "a2", scratch)
    assert proc2.wait(timeout=WAIT_S) == 0, log2.read_text()[-3000:]
    assert f"resume from step {newest.step}" in log2.read_text()
    assert_bitwise_equal(_final_tensors(store, job_id, tmp_path / "final"), reference.tensors)
    # the secret reached boto3 through the environment, never a log or the store's progress object
    assert SECRET not in text and SECRET not in log2.read_text()
    assert SECRET not in json.dumps(store.read_json(job_id, "progress.json"))
