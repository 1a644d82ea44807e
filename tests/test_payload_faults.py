"""The real payload under the faults the daemon-faults issue names: a long S3 outage mid-run, and a
stop said through the control object (and a budget lease that runs out with nobody to extend it).

An outage is ridden out: training goes on, checkpoints commit once the store answers again, the
attempt exits 0 and its adapter is bitwise equal to an uninterrupted run's. A stop saves at the
step reached and exits 76, so a resumed attempt loses nothing.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faulty_proxy import FaultyProxy, Rule
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
    start_payload,
)
from tests.test_payload_s3 import _final_tensors, _store

pytestmark = pytest.mark.slow

OUTAGE_S = 12.0  # four times what one store operation retries for here (TUNEFLEET_S3_DEADLINE_S)


def test_a_long_s3_outage_mid_run_is_ridden_out_and_the_result_is_exact(env, spec_path, scratch, reference,  # noqa: F811
                                                                         tmp_path):
    with running_moto() as endpoint:
        bucket = new_bucket(endpoint)
        host, port = endpoint.removeprefix("http://").split(":")
        with FaultyProxy(host, int(port)) as proxy:
            aws = {"AWS_ENDPOINT_URL": proxy.endpoint, "AWS_ACCESS_KEY_ID": "test-key",
                   "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_EC2_METADATA_DISABLED": "true", "TUNEFLEET_S3_DEADLINE_S": "3",
                   "TUNEFLEET_S3_CONTROL_POLL_S": "1"}
            s3_env = {**env, **aws}
            uri = f"s3://{bucket}/ckpt"
            store = _store(uri, {**aws, "AWS_ENDPOINT_URL": endpoint})  # the test reads around the proxy
            log = scratch / "outage.log"
            with open(log, "wb") as f:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "jobs.train", "--spec", str(spec_path), "--store", uri,
                     "--job-id", "outage", "--attempt-id", "a1", "--work-dir", str(scratch / "outage-work")],
                    cwd=REPO, env=s3_env, stdout=f, stderr=subprocess.STDOUT,
                )
            deadline = time.monotonic() + WAIT_S
            while (store.read_json("outage", "progress.json") or {}).get("checkpoint_step") is None:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            outage = proxy.add(Rule(action="error", status=503, code="ServiceUnavailable"))
            began = time.monotonic()
            time.sleep(OUTAGE_S)
            proxy.clear()
            assert outage.fired > 0  # the payload did try the store during the outage
            assert proc.poll() is None, "the payload gave up during the outage:\n" + log.read_text()[-3000:]
            rc = proc.wait(timeout=WAIT_S)
            text = log.read_text(errors="replace")
            assert rc == 0, text[-3000:]
            # its own loop rode out what one store operation (3 s of retries) could not
            assert "retrying in" in text or "superseded by a newer checkpoint while the store was failing" in text
            assert time.monotonic() - began >= OUTAGE_S
            progress = store.read_json("outage", "progress.json")
            assert progress["exit_code"] == 0 and progress["step"] == MAX_STEPS
            assert_bitwise_equal(_final_tensors(store, "outage", tmp_path / "final"), reference.tensors)


def _control(store_root: Path, job_id: str, doc: dict) -> None:
    from infra.storage import LocalFolderStore

    LocalFolderStore(store_root).write_json(job_id, "control.json", doc)


def test_a_stop_in_the_control_object_saves_at_the_step_reached_and_exits_76(env, spec_path, scratch, reference,  # noqa: F811
                                                                              tmp_path):
    store_root = tmp_path / "store"
    # a control object of an earlier attempt is not this attempt's business
    _control(store_root, "ctl", {"attempt_id": "a0", "stop": "budget", "reason": "old"})
    p = start_payload(env, spec_path, store_root, "ctl", "a1", scratch)
    deadline = time.monotonic() + WAIT_S
    while (p.progress().get("step") or 0) < int(0.4 * MAX_STEPS):
        assert p.proc.poll() is None and time.monotonic() < deadline, p.log()[-3000:]
        time.sleep(0.05)
    _control(store_root, "ctl", {"attempt_id": "a1", "stop": "budget", "reason": "$0.99 of $1.00 spent"})
    rc = p.wait()
    assert rc == 76, p.log()[-3000:]
    reached = p.progress()["step"]
    assert p.progress()["exit_code"] == 76 and p.progress()["state"] == "stopped"
    assert 0.4 * MAX_STEPS <= reached < MAX_STEPS
    assert p.store.latest_checkpoint("ctl").step == reached  # no step lost
    assert "the daemon said stop (budget: $0.99 of $1.00 spent)" in p.log()

    # the next attempt is not stopped by its predecessor's control object, and ends exact
    p2 = start_payload(env, spec_path, store_root, "ctl", "a2", scratch)
    assert p2.wait() == 0, p2.log()[-3000:]
    assert f"resume from step {reached}" in p2.log()
    from safetensors.torch import load_file

    final = p2.store.final("ctl")
    p2.store.download(final, tmp_path / "final")
    assert_bitwise_equal(load_file(str(tmp_path / "final" / "adapter_model.safetensors")), reference.tensors)


def test_a_budget_lease_that_runs_out_stops_the_payload_without_the_daemon(env, spec_path, scratch, tmp_path):  # noqa: F811
    """The daemon writes how long the attempt may run at today's rates; if nobody extends it (the
    daemon is gone), the payload saves and stops on its own when it runs out."""
    store_root = tmp_path / "store"
    p = start_payload(env, spec_path, store_root, "lease", "a1", scratch)
    deadline = time.monotonic() + WAIT_S
    while (p.progress().get("step") or 0) < SAVE:
        assert p.proc.poll() is None and time.monotonic() < deadline, p.log()[-3000:]
        time.sleep(0.05)
    _control(store_root, "lease", {"attempt_id": "a1", "stop": None, "run_until": time.time() + 1.0})
    rc = p.wait()
    assert rc == 76, p.log()[-3000:]
    assert "budget lease ran out" in p.log()
    reached = p.progress()["step"]
    assert SAVE <= reached < MAX_STEPS and p.store.latest_checkpoint("lease").step == reached


def test_two_attempts_of_one_job_racing_the_fenced_one_stops_and_touches_nothing(env, spec_path, scratch, reference,  # noqa: F811
                                                                                  tmp_path):
    """The daemon replaced attempt a1 (it could not reach its machine) by a2 while a1 still runs.
    a2's lease fences a1 off: a1 commits, deletes and reports nothing more and exits 77; a2 resumes
    from a1's newest checkpoint and ends bitwise equal to an uninterrupted run."""
    from infra.storage import LocalFolderStore
    from jobs.channel import write_lease

    store_root = tmp_path / "store"
    store = LocalFolderStore(store_root)
    write_lease(store, "race", "a1")
    a1 = start_payload(env, spec_path, store_root, "race", "a1", scratch)
    deadline = time.monotonic() + WAIT_S
    while (a1.progress().get("checkpoint_step") or 0) < SAVE:
        assert a1.proc.poll() is None and time.monotonic() < deadline, a1.log()[-3000:]
        time.sleep(0.05)
    write_lease(store, "race", "a2")
    switched = time.time()
    a2 = start_payload(env, spec_path, store_root, "race", "a2", scratch)
    while a1.progress().get("attempt_id") != "a2":  # a2 is writing progress now
        assert a2.proc.poll() is None and time.monotonic() < deadline, a2.log()[-3000:]
        time.sleep(0.05)
    while a1.proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert a1.proc.returncode == 77, a1.log()[-3000:]
    assert "fenced" in a1.log() and "a2 now holds job race's lease" in a1.log()
    # a1's last word (its exit report) was not written over a2's progress. (Its heartbeats before
    # it saw the lease, within one control poll, may have been: progress is advisory, and the daemon
    # reads only the current attempt's.)
    last = a1.progress()
    assert not (last.get("attempt_id") == "a1" and last.get("exit_code") is not None), last
    # nothing a1 committed once fenced: a commit that passed its lease check just before the switch
    # may still land while its files upload (check-then-write: the window is that upload, < 2 s)
    late = {r.step: r.meta.get("attempt_id") for r in store.list_checkpoints("race") if r.created_at > switched + 2.0}
    assert set(late.values()) <= {"a2"}, late
    assert a2.wait() == 0, a2.log()[-3000:]
    from safetensors.torch import load_file

    store.download(store.final("race"), tmp_path / "final")
    assert_bitwise_equal(load_file(str(tmp_path / "final" / "adapter_model.safetensors")), reference.tensors)
