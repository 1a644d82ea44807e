"""The parts that let an attempt run somewhere else, each on its own and with real pieces: inputs
staged to S3 (moto over HTTP) and fetched back verified, the wheel of this tunefleet installed by
the real bootstrap script in a sandbox that has the dependencies but not tunefleet, STS credentials
scoped to one job, and the lease that fences a stale attempt off the job's store."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import zipfile
from io import BytesIO
from pathlib import Path

import pytest

from infra.credentials import (
    AttemptCredentials,
    CredentialError,
    allows,
    for_attempt,
    mint,
    refresh_doc,
    refresh_key,
    refreshable_session,
)
from infra.storage import LocalFolderStore, open_store
from jobs.channel import Beacon, Fenced, Uploader, check_lease, write_lease
from jobs.estimate import estimate
from jobs.inputs import InputError, listing, local_inputs, materialize, stage
from jobs.spec import JobSpec, load_job_file
from providers.remote import bootstrap_script, build_bundle, constraints_text
from tests.s3_fixtures import (  # noqa: F401 - fixture
    aws_env,
    moto_server,  # noqa: F401 - fixture
    s3_bucket,
)
from tests.sandbox import Sandbox
from tests.test_cli import EXAMPLE

AWS = {"AWS_ACCESS_KEY_ID": "AKIATUNEFLEETDAEMON01", "AWS_SECRET_ACCESS_KEY": "daemon-secret-do-not-ship",
       "AWS_DEFAULT_REGION": "us-east-1"}


def _job_folder(tmp_path: Path) -> Path:
    """A copy of the example job with its dataset and a small local model folder next to it."""
    folder = tmp_path / "job"
    (folder / "data").mkdir(parents=True)
    shutil.copy(EXAMPLE.parent / "data" / "alpaca-tiny.jsonl", folder / "data" / "train.jsonl")
    model = folder / "model"
    (model / ".git").mkdir(parents=True)
    (model / ".git" / "HEAD").write_text("ref: main\n")  # not an input
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
                                                   "num_hidden_layers": 2, "vocab_size": 260}))
    (model / "weights.bin").write_bytes(bytes(range(256)) * 64)
    return folder


def _spec(folder: Path) -> dict:
    import yaml

    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["datasets"] = [{"path": "data/train.jsonl", "type": "alpaca"}]
    (folder / "job.yaml").write_text(yaml.safe_dump(doc))
    spec = load_job_file(folder / "job.yaml").to_payload_dict()
    spec["base_model"] = str(folder / "model")  # a local model folder (not loaded here)
    return spec


# ---- inputs ----
def test_inputs_are_staged_once_by_content_and_come_back_verified(tmp_path, moto_server, s3_bucket):
    with aws_env(**AWS, AWS_ENDPOINT_URL=moto_server):
        store = open_store(f"s3://{s3_bucket}/runs")
        folder = _job_folder(tmp_path)
        spec = _spec(folder)
        before = estimate(spec)
        staged = stage(spec, store)
        data = str(folder / "data" / "train.jsonl")
        assert set(staged["inputs"]) == {data, str(folder / "model")}
        ds, model = staged["inputs"][data], staged["inputs"][str(folder / "model")]
        sha = listing(Path(data))[0]
        assert ds["uri"] == f"s3://{s3_bucket}/runs/inputs/{sha}/" and ds["kind"] == "file" and ds["files"] == 1
        assert model["kind"] == "folder" and model["files"] == 2 and model["config"]["hidden_size"] == 64
        JobSpec.from_payload_dict(staged)  # the queued spec is a valid spec
        assert local_inputs(staged) == []  # nothing left to stage
        keys = store.list_keys("inputs/")
        # a second job on the same files uploads nothing new: same addresses, same objects
        again = stage(spec, store)
        assert again["inputs"] == staged["inputs"] and store.list_keys("inputs/") == keys
        assert not any(".git" in k for k, _ in keys)

        shutil.rmtree(folder)  # the user's folder is gone after submit
        assert estimate(staged).steps == before.steps and estimate(staged).examples == before.examples
        assert estimate(staged).model.source == "config.json"  # from the staged copy of config.json
        ready = materialize(staged, store, tmp_path / "cache")
        assert Path(ready["datasets"][0]["path"]).read_bytes() == (EXAMPLE.parent / "data" / "alpaca-tiny.jsonl").read_bytes()
        assert (Path(ready["base_model"]) / "weights.bin").read_bytes() == bytes(range(256)) * 64
        assert not (Path(ready["base_model"]) / ".git").exists()

        # an object changed in the store is refused, not trained on
        store.put_bytes(f"inputs/{sha}/train.jsonl", b'{"instruction": "x", "output": "y"}\n')
        with pytest.raises(InputError, match="does not match its sha256"):
            materialize(staged, store, tmp_path / "cache2")
        store.delete_keys([k for k, _ in store.list_keys(f"inputs/{sha}/")])
        with pytest.raises(InputError, match="not in the store"):
            materialize(staged, store, tmp_path / "cache3")


def test_a_local_folder_store_is_read_in_place(tmp_path):
    folder = _job_folder(tmp_path)
    store = LocalFolderStore(tmp_path / "store")
    staged = stage(_spec(folder), store)
    shutil.rmtree(folder)
    ready = materialize(staged, store, tmp_path / "cache")
    assert ready["datasets"][0]["path"].startswith(str(tmp_path / "store" / "inputs"))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_submit_stages_inputs_and_validate_does_not(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from orchestrator.store import Store

    home = tmp_path / "home"
    monkeypatch.setenv("TUNEFLEET_HOME", str(home))
    folder = _job_folder(tmp_path)
    _spec(folder)
    runner = CliRunner()
    assert runner.invoke(app, ["validate", str(folder / "job.yaml")]).exit_code == 0
    assert not (home / "checkpoints" / "inputs").exists()
    res = runner.invoke(app, ["submit", str(folder / "job.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    job_id = json.loads(res.output)["id"]
    shutil.rmtree(folder)
    with Store(home / "state.db") as db:
        spec = db.get_job(job_id).spec
    (ref,) = spec["inputs"].values()
    assert ref["uri"].startswith((home / "checkpoints" / "inputs").as_uri())
    assert Path(materialize(spec, open_store(spec["checkpoint"]["store"]))["datasets"][0]["path"]).is_file()


# ---- code: the wheel and the bootstrap ----
def test_the_wheel_is_this_tunefleet_deterministic_and_pinned():
    a, b = build_bundle(), build_bundle()
    assert a.wheel == b.wheel and a.wheel_sha256 == b.wheel_sha256
    names = zipfile.ZipFile(BytesIO(a.wheel)).namelist()
    for module in ("jobs/train.py", "jobs/inputs.py", "infra/storage.py", "providers/bootstrap.sh",
                   "providers/snapshots/vast.json", "orchestrator/cli.py"):
        assert module in names
    assert not any("__pycache__" in n for n in names)
    meta = zipfile.ZipFile(BytesIO(a.wheel)).read(f"tunefleet-{a.version}.dist-info/METADATA").decode()
    assert f"Version: {a.version}" in meta and 'extra == "train"' in meta and "+c" in a.version
    pins = constraints_text().splitlines()
    assert "transformers==" in "\n".join(pins) and not any(p.startswith(("torch==", "tunefleet")) for p in pins)


def _shop(tmp_path: Path):
    bundle = build_bundle()
    shop = tmp_path / "shop"
    shop.mkdir()
    (shop / bundle.wheel_name).write_bytes(bundle.wheel)
    (shop / "constraints.txt").write_bytes(bundle.constraints)
    return bundle, {
        "TUNEFLEET_WHEEL_URL": (shop / bundle.wheel_name).as_uri(), "TUNEFLEET_WHEEL_SHA256": bundle.wheel_sha256,
        "TUNEFLEET_WHEEL_NAME": bundle.wheel_name, "TUNEFLEET_CONSTRAINTS_URL": (shop / "constraints.txt").as_uri(),
        "TUNEFLEET_CONSTRAINTS_SHA256": bundle.constraints_sha256,
    }


def test_the_bootstrap_installs_the_shipped_wheel_where_tunefleet_was_not(tmp_path):
    machine = Sandbox(tmp_path / "machine")
    probe = [str(machine.python), "-c", "import jobs"]
    assert subprocess.run(probe, env=machine.env({}), cwd=machine.work, capture_output=True).returncode != 0
    _, env = _shop(tmp_path)
    # the payload starts and judges its input: no store given -> bad input (2), from the installed copy
    proc = machine.start(["bash", "-c", bootstrap_script()], env, tmp_path / "boot.log")
    assert proc.wait(timeout=300) == 2, (tmp_path / "boot.log").read_text()[-2000:]
    where = subprocess.run([str(machine.python), "-c", "import jobs; print(jobs.__file__)"], env=machine.env({}),
                           cwd=machine.work, capture_output=True, text=True)
    assert where.stdout.startswith(str(machine.venv)), where  # installed there, not the checkout
    log = (tmp_path / "boot.log").read_text()
    assert "installing tunefleet-" in log and "no checkpoint store" in log


def test_the_bootstrap_refuses_a_wheel_that_is_not_the_one_shipped(tmp_path):
    machine = Sandbox(tmp_path / "machine")
    bundle, env = _shop(tmp_path)
    env["TUNEFLEET_WHEEL_SHA256"] = "0" * 64
    proc = machine.start(["bash", "-c", bootstrap_script()], env, tmp_path / "boot.log")
    assert proc.wait(timeout=120) == 3  # EXIT_SETUP_FAILED: the daemon tries another machine
    assert "sha256 mismatch" in (tmp_path / "boot.log").read_text()
    # a released version that the index cannot give: also a setup failure, said so
    proc = machine.start(["bash", "-c", bootstrap_script()], {"TUNEFLEET_PACKAGE": "tunefleet[train]==99.0"},
                         tmp_path / "boot2.log")
    assert proc.wait(timeout=120) == 3
    assert "pip could not install tunefleet[train]==99.0" in (tmp_path / "boot2.log").read_text()


def test_a_setup_failure_is_reported_through_the_store_where_the_daemon_reads_exits(tmp_path, moto_server,
                                                                                     s3_bucket):
    """tunefleet is not installed when the bootstrap fails, so it reports exit 3 through a presigned
    PUT of the job's progress.json: the daemon sees 'setup_failed' (try another machine), not a
    container that exited without a word."""
    from providers.remote import bootstrap_env

    machine = Sandbox(tmp_path / "machine")
    with aws_env(**AWS, AWS_ENDPOINT_URL=moto_server):
        store = open_store(f"s3://{s3_bucket}/runs")
        env = {**bootstrap_env(store, None, package="tunefleet[train]==99.0", job_id="jboot"),
               "TUNEFLEET_ATTEMPT_ID": "jboot.3"}
        proc = machine.start(["bash", "-c", bootstrap_script()], env, tmp_path / "boot.log")
        assert proc.wait(timeout=120) == 3
        doc = store.read_json("jboot", "progress.json")
    assert doc["attempt_id"] == "jboot.3" and doc["exit_code"] == 3 and doc["state"] == "failed"
    assert "pip could not install tunefleet[train]==99.0" in doc["error"]
    from orchestrator.outcomes import classify_exit
    from orchestrator.states import EndReason

    assert classify_exit(doc["exit_code"])[0] is EndReason.SETUP_FAILED


# ---- credentials ----
def test_attempt_credentials_are_scoped_to_the_job_and_expire(moto_server):
    with aws_env(**AWS, AWS_ENDPOINT_URL=moto_server):
        creds = mint("s3://team-ckpt/runs", "j0001", duration_s=3600, reads=("j0000",))
        assert creds.kind == "sts" and creds.expires_at > time.time()
        assert creds.env["AWS_ACCESS_KEY_ID"] != AWS["AWS_ACCESS_KEY_ID"] and creds.env["AWS_SESSION_TOKEN"]
        assert AWS["AWS_SECRET_ACCESS_KEY"] not in json.dumps(creds.env)
        p = creds.policy
        for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
            assert allows(p, action, "team-ckpt", "runs/j0001/checkpoints/0000000050/adapter.safetensors")
            assert not allows(p, action, "team-ckpt", "runs/j0002/checkpoints/0000000050/adapter.safetensors")
            assert not allows(p, action, "other-bucket", "runs/j0001/progress.json")
        assert allows(p, "s3:GetObject", "team-ckpt", "runs/inputs/abc/train.jsonl")
        assert not allows(p, "s3:PutObject", "team-ckpt", "runs/inputs/abc/train.jsonl")  # inputs: read only
        assert allows(p, "s3:GetObject", "team-ckpt", "runs/j0000/checkpoints/x")  # the rung it resumes from
        assert not allows(p, "s3:PutObject", "team-ckpt", "runs/j0000/checkpoints/x")
        assert allows(p, "s3:ListBucket", "team-ckpt", "runs/j0001/checkpoints/")
        assert not allows(p, "s3:ListBucket", "team-ckpt", "runs/")
        assert not allows(p, "s3:ListBucket", "team-ckpt", "runs/j0002/")


def test_without_sts_a_marketplace_host_gets_nothing_unless_the_config_opts_in(moto_server):
    from tests.s3_fixtures import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # a store without STS (R2, MinIO)
    with aws_env(**AWS, AWS_ENDPOINT_URL=moto_server, AWS_ENDPOINT_URL_STS=dead):
        with pytest.raises(CredentialError, match="untrusted_hosts: forward_static_keys") as info:
            for_attempt("s3://team-ckpt/runs", "j1", trusted_host=False, on_premises=False)
        assert AWS["AWS_SECRET_ACCESS_KEY"] not in str(info.value)
        opted = for_attempt("s3://team-ckpt/runs", "j1", trusted_host=False, on_premises=False,
                            untrusted_hosts="forward_static_keys")
        assert opted.kind == "static" and opted.env["AWS_SECRET_ACCESS_KEY"] == AWS["AWS_SECRET_ACCESS_KEY"]
        assert for_attempt("s3://team-ckpt/runs", "j1", trusted_host=True, on_premises=False).kind == "static"
        assert for_attempt("file:///tmp/x", "j1", trusted_host=False, on_premises=False).env == {}


def test_a_payload_renews_its_credentials_from_the_store(moto_server, s3_bucket):
    with aws_env(**AWS, AWS_ENDPOINT_URL=moto_server):
        uri = f"s3://{s3_bucket}/runs"
        first = mint(uri, "j7", duration_s=3600)
        # what the daemon writes at half-life (moto's STS hands out one fixed key: make the next distinct)
        renewed = AttemptCredentials(env={**first.env, "AWS_ACCESS_KEY_ID": "ASIARENEWEDKEY000001"}, kind="sts",
                                     expires_at=time.time() + 7200)
        open_store(uri).put_bytes(refresh_key("j7", "j7.1"), refresh_doc(renewed))
        env = {**first.env, "TUNEFLEET_CREDENTIALS_EXPIRE_AT": str(time.time() + 60)}  # inside botocore's window
        session = refreshable_session(uri, "j7", "j7.1", env)
        frozen = session.get_credentials().get_frozen_credentials()
        assert frozen.access_key == renewed.env["AWS_ACCESS_KEY_ID"] != first.env["AWS_ACCESS_KEY_ID"]
        assert refreshable_session(uri, "j7", "j7.1", dict(first.env, TUNEFLEET_CREDENTIALS_EXPIRE_AT="")) is None


# ---- fencing ----
def test_a_fenced_attempt_commits_reports_and_deletes_nothing(tmp_path):
    store = LocalFolderStore(tmp_path / "store")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "adapter.bin").write_bytes(b"a" * 100)
    write_lease(store, "j1", "j1.1")
    old = Beacon(store, "j1", "j1.1").start()
    up = Uploader(store, "j1", keep=1, progress=old, staging=tmp_path / "staging")
    up.submit(10, ckpt, {})
    up.drain(timeout_s=30)
    assert [r.step for r in store.list_checkpoints("j1")] == [10]
    assert store.list_checkpoints("j1")[0].meta["attempt_id"] == "j1.1"

    write_lease(store, "j1", "j1.2")  # the daemon launched a new attempt: j1.1 is fenced off
    new = Beacon(store, "j1", "j1.2").start()
    new.update(force=True, step=10)
    new.flush()
    up.submit(20, ckpt, {})  # the stale attempt's next commit, with retention keep=1
    up.drain(timeout_s=30)
    assert old.fenced and "j1.2" in old.fenced and old.should_stop()
    assert [r.step for r in store.list_checkpoints("j1")] == [10]  # nothing written, nothing deleted
    old.update(force=True, step=999)
    old.flush()
    assert store.read_json("j1", "progress.json")["attempt_id"] == "j1.2"
    with pytest.raises(Fenced):
        check_lease(store, "j1", "j1.1")
    check_lease(store, "j1", "j1.2")
    old.close()
    new.close()


@pytest.mark.slow
def test_a_local_payload_holds_no_provider_api_key(tmp_path, monkeypatch):
    """The local provider starts the payload with the Ray worker's environment (which is the
    daemon's) minus every ``*_API_KEY``: a payload rents nothing, so it never holds a key that can."""
    import os

    from providers.base import LaunchRequest, RunState
    from providers.local import LocalRayProvider

    dump = tmp_path / "env.txt"
    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!/bin/sh\nenv > {dump}\n")
    fake_python.chmod(0o755)
    monkeypatch.setenv("VAST_API_KEY", "vast-key-of-the-daemon")
    monkeypatch.setenv("TOGETHER_API_KEY", "together-key-of-the-daemon")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    prov = LocalRayProvider(num_cpus=1, num_gpus=0, python=str(fake_python))
    prov.open()
    try:
        (offer,) = [o for o in prov.offers({"resources": {"gpus": 0, "cpus": 1}}) if o.gpu == "cpu"]
        request = LaunchRequest(job_id="jenv", attempt_id="jenv.1", spec={}, store_uri=(tmp_path / "s").as_uri(),
                                gpus=0, cpus=1, log_path=str(tmp_path / "log"))
        handle = prov.launch(request, offer)
        deadline = time.monotonic() + 120
        while prov.poll(handle).state is not RunState.EXITED and time.monotonic() < deadline:
            time.sleep(0.2)
        env = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
        assert env["TUNEFLEET_JOB_ID"] == "jenv" and env["TUNEFLEET_ATTEMPT_ID"] == "jenv.1"
        assert not [k for k in env if k.endswith("_API_KEY")]
        assert os.environ["VAST_API_KEY"] == "vast-key-of-the-daemon"  # the daemon keeps its own
        prov.release(handle)
    finally:
        prov.close()


def test_status_names_the_machines_the_reconciler_could_not_destroy(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from orchestrator.store import Store

    home = tmp_path / "home"
    monkeypatch.setenv("TUNEFLEET_HOME", str(home))
    home.mkdir()
    with Store(home / "state.db") as db:
        db.record_orphan("vast", "7001", "j1.1", "tf-j1.1: 1x RTX4090 running")
        for _ in range(3):
            db.orphan_tried("vast", "7001", "HTTP 503 from Vast.ai on destroy instance 7001")
        db.record_orphan("vast", "7002", "j2.1", "tf-j2.1")
        db.orphan_tried("vast", "7002", None)  # destroyed: not named
    res = CliRunner().invoke(app, ["status"])
    assert res.exit_code == 0
    assert "1 machine with no live attempt" in res.output and "vast 7001 (attempt j1.1" in res.output
    assert "NEEDS A PERSON: 3 destroys failed, last: HTTP 503" in res.output and "7002" not in res.output


def test_the_daemon_renews_an_attempts_credentials_at_half_life(tmp_path, moto_server, s3_bucket):
    """Past half their life, the daemon mints new scoped credentials and writes them where the
    payload's session reads them; before that it leaves them alone."""
    from tests import daemon_world as w

    with aws_env(**AWS, AWS_ENDPOINT_URL=moto_server), w.quiet_logs():
        uri = f"s3://{s3_bucket}/runs"
        cfg = w.config(tmp_path, uri)
        from orchestrator.store import Store

        with Store(cfg.db_path) as db:
            d = w.daemon(db, cfg, w.provider(w.Faults.none()))
            job = db.get_job(w.submit(db, cfg))
            att = db.create_attempt(job.id, provider="faulty", offer_id="faulty-0", usd_per_hour=1.0, start_step=0)
            fresh = db.update_attempt(att.id, handle={"attempt_id": att.id,
                                                      "credentials_expire_at": time.time() + 3000})
            d._keep_credentials(fresh, job)  # 3000 s of 3600 left: not yet
            assert d.calls.get(("credentials", att.id)) is None
            old = db.update_attempt(att.id, handle={"attempt_id": att.id,
                                                    "credentials_expire_at": time.time() + 1000})
            deadline = time.monotonic() + 30
            while "credentials_renewed" not in [e.kind for e in db.events(job.id)]:
                assert time.monotonic() < deadline
                d._keep_credentials(old, job)
                time.sleep(0.05)
            doc = json.loads(open_store(uri).get_bytes(refresh_key(job.id, att.id)))
            assert doc["AWS_SESSION_TOKEN"] and doc["expires_at"] == pytest.approx(d._creds_until[att.id], abs=1)
            d.calls.shutdown()


def test_eval_datasets_travel_like_datasets(tmp_path):
    folder = _job_folder(tmp_path)
    shutil.copy(folder / "data" / "train.jsonl", folder / "data" / "eval.jsonl")
    with open(folder / "data" / "eval.jsonl", "a") as f:
        f.write('{"instruction": "held out", "output": "yes"}\n')  # other content: its own address
    spec = _spec(folder)
    spec["eval_datasets"] = [{"path": str(folder / "data" / "eval.jsonl"), "type": "alpaca"}]
    store = LocalFolderStore(tmp_path / "store")
    staged = stage(spec, store)
    assert str(folder / "data" / "eval.jsonl") in staged["inputs"]
    shutil.rmtree(folder)
    ready = materialize(staged, store, tmp_path / "cache")
    got = Path(ready["eval_datasets"][0]["path"])
    assert got.is_file() and got.read_text().endswith('{"instruction": "held out", "output": "yes"}\n')
    assert ready["eval_datasets"][0]["path"] != ready["datasets"][0]["path"]
