"""A job submitted from a folder that is then deleted runs on a rented machine that is really
somewhere else, is outbid without warning, and finishes on the team's own GPU, bitwise equal to
an uninterrupted run.

Real parts: the CLI and daemon, the real Vast.ai provider over HTTP, an embedded Ray instance for
the team's own machine, the real payload, S3 (moto server on 127.0.0.1) for inputs, code and
checkpoints, and moto's STS for the attempt's credentials. The only stand-in is Vast itself: a stub
server speaking Vast's API (tests/vast_stub.py). When an instance is rented it runs the container's
command (tunefleet's real bootstrap script) in a ``Sandbox`` (tests/sandbox.py): its own HOME and
working folder, the rental's environment and nothing else, and a Python with tunefleet's
dependencies but not tunefleet. When the instance is outbid its processes get SIGKILL.

Set-up: job A holds the only local GPU; job B, which must finish well before a CPU could finish it,
goes to Vast. Both are submitted from a folder deleted right after. Once A is done and B has
committed checkpoints, B is outbid; the daemon records the preemption, avoids the lost offer, and
resumes B from its newest S3 checkpoint on the local GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.s3_fixtures import aws_env, new_bucket, running_moto
from tests.sandbox import Sandbox
from tests.test_cli import EXAMPLE
from tests.vast_stub import VastStub, offer_row

pytestmark = pytest.mark.slow

SECRET = "tunefleet-test-secret-do-not-log"
STEPS = 600


def _job(folder: Path, name: str, store: str, **changes) -> Path:
    """A job file in the user's folder, its dataset next to it (a relative path)."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(EXAMPLE.parent / "data" / "alpaca-tiny.jsonl", folder / "data" / "train.jsonl")
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["datasets"][0]["path"] = "data/train.jsonl"
    doc["resources"] = {"gpus": 1, "device": "auto"}
    doc["policy"] = {"max_usd": 50.0, "spot": "allow", "data": "open"}
    doc["checkpoint"] = {"store": store, "keep": 3}
    doc.update(changes)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_preempted_on_vast_resumes_on_the_local_gpu(tmp_path, model_cache):
    with running_moto() as endpoint:
        bucket = new_bucket(endpoint)
        store = f"s3://{bucket}/jobs"
        aws = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing-key-id",
               "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
        machines: dict[int, Sandbox] = {}

        def runner(instance_id: int, env: dict[str, str], script: str):
            """The rented machine: run the container's command there, with the rental's env only."""
            machines[instance_id] = Sandbox(tmp_path / f"vast-{instance_id}")
            return machines[instance_id].start(["bash", "-c", script], env, tmp_path / f"vast-{instance_id}.log")

        def stopper(instance_id: int) -> None:
            machines[instance_id].kill()  # an outbid instance is paused without warning

        stub = VastStub(offers={"on-demand": [offer_row(1001, "RTX 4090", dph_total=0.40)], "bid": []},
                        api_key="vast-test-key", runner=runner, stopper=stopper)
        with stub:
            home = tmp_path / "home"
            home.mkdir()
            (home / "config.yaml").write_text("poll_interval_s: 0.5\nray_num_cpus: 3\nray_num_gpus: 1\n")
            env = {**os.environ, **aws, "TUNEFLEET_HOME": str(home), "VAST_URL": stub.url,
                   "VAST_API_KEY": "vast-test-key", "TUNEFLEET_MODEL_CACHE": str(model_cache),
                   "HOME": str(tmp_path / "user"), "SKY_RUNTIME_DIR": str(tmp_path / "user")}
            (tmp_path / "user").mkdir()

            def cli(*args: str) -> subprocess.CompletedProcess:
                proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env,
                                      capture_output=True, text=True, timeout=120)
                assert proc.returncode == 0, proc.stderr
                return proc

            folder = tmp_path / "user-job"
            # A: local only, short; it takes the local GPU first (higher priority)
            a = json.loads(cli("submit", str(_job(folder, "a", store, max_steps=40, save_steps=20,
                                                    priority=10, policy={"providers": ["local"], "data": "open"})),
                               "--json").stdout)["id"]
            # B: long; a CPU could never make its deadline, a GPU easily can
            deadline = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 2 * 3600))
            b = json.loads(cli("submit", str(_job(folder, "b", store, max_steps=STEPS, save_steps=50,
                                                    policy={"providers": ["vast", "local"], "data": "open",
                                                            "deadline": deadline})), "--json").stdout)["id"]
            shutil.rmtree(folder)  # nothing the jobs need stays in the user's folder
            from orchestrator.store import Store

            with Store(home / "state.db") as db:  # measured: this model crawls on a CPU here
                db.record_throughput(base_model="tunefleet/tiny-llama", method="qlora", gpu="cpu", gpu_count=1,
                                     tokens_per_s=5.0)

            daemon = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "daemon", "--until-idle",
                                       "--max-seconds", "600"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
            try:
                deadline_s = time.monotonic() + 500
                outbid = None
                while daemon.poll() is None:
                    assert time.monotonic() < deadline_s, "daemon did not finish"
                    sa = json.loads(cli("status", a, "--json").stdout)
                    sb = json.loads(cli("status", b, "--json").stdout)
                    if not outbid and sa["state"] == "succeeded" and (sb["checkpoint_step"] or 0) >= 100:
                        assert sb["provider"] == "vast" and sb["state"] == "running", (
                            sb, cli("events", b).stdout[-3000:],
                            [p.read_text()[-2000:] for p in tmp_path.glob("vast-*.log")])
                        (instance_id,) = stub.instances
                        stub.outbid(instance_id)
                        outbid = instance_id
                    time.sleep(0.5)
            finally:
                if daemon.poll() is None:
                    daemon.kill()
                out = daemon.stdout.read()
                for m in machines.values():
                    m.kill()
            assert daemon.returncode == 0, out[-3000:]
            assert outbid, "B finished on Vast before it could be outbid"

            sb = json.loads(cli("status", b, "--json").stdout)
            assert sb["state"] == "succeeded" and sb["step"] == STEPS and sb["provider"] == "local"
            assert sb["adapter_uri"].startswith(f"s3://{bucket}/jobs/{b}/final")
            with Store(home / "state.db") as db:
                attempts = db.attempts_for(b)
            assert [(x.provider, x.state.value) for x in attempts] == [("vast", "preempted"), ("local", "succeeded")]
            assert attempts[0].offer_id == "1001"
            # resumed from the newest checkpoint the Vast attempt committed to S3. Killed without warning,
            # it loses the interval in progress plus a checkpoint still uploading in the background.
            assert attempts[1].start_step >= 100 and attempts[1].start_step % 50 == 0
            assert attempts[0].end_step - attempts[1].start_step <= 2 * 50
            kinds = [e["kind"] for e in json.loads(cli("events", b, "--json").stdout)]
            assert kinds.count("attempt_created") == 2 and "preempted" in kinds and "requeued" in kinds
            # Vast: exactly the chosen ask was rented; the paused instance was destroyed, not left billing
            rents = stub.calls("PUT", "/api/v0/asks/")
            assert [r.path for r in rents] == ["/api/v0/asks/1001/"]
            assert stub.destroyed == [outbid]
            # the rented machine got scoped, expiring STS credentials: never the daemon's own keys,
            # never a provider's API key; and the code and inputs came from the store
            rented = rents[0].body["env"]
            assert rented["AWS_SESSION_TOKEN"] and rented["AWS_ACCESS_KEY_ID"] != aws["AWS_ACCESS_KEY_ID"]
            assert float(rented["TUNEFLEET_CREDENTIALS_EXPIRE_AT"]) > time.time()
            assert SECRET not in json.dumps(rented) and "vast-test-key" not in json.dumps(rented)
            assert rented["TUNEFLEET_WHEEL_URL"].startswith(f"{endpoint}/{bucket}/jobs/code/")
            machine_log = (tmp_path / f"vast-{outbid}.log").read_text()
            assert "installing tunefleet-0.1.0+c" in machine_log and "sha256" in machine_log, machine_log[-3000:]
            daemon_log = (home / "logs" / "daemon.log").read_text()
            for secret in (SECRET, rented["AWS_SECRET_ACCESS_KEY"], rented["AWS_SESSION_TOKEN"]):
                assert secret not in daemon_log and secret not in out
                assert secret not in json.dumps(json.loads(cli("events", b, "--json").stdout))

            # bitwise equal to an uninterrupted run of the same queued spec, on this machine
            with Store(home / "state.db") as db:
                queued = db.get_job(b).spec
            ref_store = tmp_path / "ref-store"
            ref = subprocess.run(
                [sys.executable, "-m", "jobs.train"], capture_output=True, text=True, timeout=600,
                env={**env, "TUNEFLEET_SPEC_JSON": json.dumps(queued), "TUNEFLEET_STORE": ref_store.as_uri(),
                     "TUNEFLEET_JOB_ID": "ref", "TUNEFLEET_ATTEMPT_ID": "ref.1"})
            assert ref.returncode == 0, ref.stderr[-3000:]
            from infra.storage import open_store

            with aws_env(**aws):
                theirs = open_store(store).final(b)
            ours = open_store(ref_store.as_uri()).final("ref")
            weights = {f.path: f.sha256 for f in ours.files if f.path.endswith(".safetensors")}
            assert weights and weights == {f.path: f.sha256 for f in theirs.files if f.path.endswith(".safetensors")}
