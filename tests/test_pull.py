"""``tunefleet pull``: the final adapter or a checkpoint, every file checked against its manifest;
a missing job, an unfinished job, a corrupted file or an occupied folder is a clear error that
writes nothing. Runs the real CLI against a real store and a real checkpoint folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra.config import load_config
from infra.storage import open_store
from jobs.spec import load_job_file
from orchestrator.queue import submit_spec
from orchestrator.states import JobState
from orchestrator.store import Store
from tests.s3_fixtures import moto_server, s3_bucket  # noqa: F401 - fixtures
from tests.test_cli import EXAMPLE, tf


@pytest.fixture
def world(tmp_path):
    """A job in a store whose checkpoints live in a local folder: two checkpoints and a final adapter."""
    home = tmp_path / "home"
    home.mkdir()
    ckpt_uri = (tmp_path / "ckpt").as_uri()
    (home / "config.yaml").write_text(f"default_store: {ckpt_uri}\n")
    cfg = load_config(home)
    with Store(cfg.db_path) as store:
        job_id = submit_spec(store, load_job_file(EXAMPLE), cfg)
    ckpt = open_store(ckpt_uri)
    for step in (10, 20):
        d = tmp_path / f"c{step}"
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(bytes(range(256)) * step)
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        ckpt.commit_checkpoint(job_id, step, d)
    final = tmp_path / "final"
    (final / "sub").mkdir(parents=True)
    (final / "adapter_model.safetensors").write_bytes(b"\x01\x02" * 5000)
    (final / "adapter_config.json").write_text('{"r": 8}')
    (final / "sub" / "tokenizer.json").write_text("{}")
    return home, tmp_path, ckpt, job_id, final


def _succeed(home: Path, job_id: str, ckpt, final: Path) -> None:
    ref = ckpt.commit_final(job_id, final, {"step": 20, "loss": 1.25})
    with Store(home / "state.db") as store:
        store.transition_job(job_id, JobState.RUNNING, kind="running", message="test")
        store.transition_job(job_id, JobState.SUCCEEDED, kind="succeeded", message="test", adapter_uri=ref.uri, step=20)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_pull_downloads_the_final_adapter_verified_with_its_training_facts(world, tmp_path, monkeypatch):
    home, _, ckpt, job_id, final = world
    _succeed(home, job_id, ckpt, final)
    out = json.loads(tf(home, "pull", job_id, str(tmp_path / "got"), "--json", check=True).stdout)
    got = _tree(tmp_path / "got")
    facts = json.loads(got.pop("tunefleet_pull.json"))
    assert got == _tree(final)  # every file, byte for byte, sub-folders included
    assert facts["job_id"] == job_id and facts["step"] == 20 and facts["final"] and facts["meta"]["loss"] == 1.25
    assert out["dir"] == str((tmp_path / "got").resolve()) and out["files"] == 3
    # the default folder name (in the working directory), and a text line for people
    monkeypatch.chdir(tmp_path)
    proc = tf(home, "pull", job_id[:5], check=True)
    assert f"{job_id}-adapter" in proc.stdout and "sha256 checked" in proc.stdout
    assert (tmp_path / f"{job_id}-adapter" / "adapter_config.json").is_file()


def test_pull_a_checkpoint_by_step_from_an_unfinished_job(world, tmp_path):
    home, _, _, job_id, _ = world
    tf(home, "pull", job_id, str(tmp_path / "s10"), "--step", "10", check=True)
    assert (tmp_path / "s10" / "adapter_model.safetensors").read_bytes() == bytes(range(256)) * 10
    proc = tf(home, "pull", job_id, str(tmp_path / "s15"), "--step", "15")
    assert proc.returncode != 0 and "no committed checkpoint at step 15" in proc.stderr and "10, 20" in proc.stderr
    assert not (tmp_path / "s15").exists()


def test_an_unfinished_or_unknown_job_is_a_clear_error_that_writes_nothing(world, tmp_path):
    home, _, _, job_id, _ = world
    proc = tf(home, "pull", job_id, str(tmp_path / "got"))
    assert proc.returncode != 0
    assert "queued" in proc.stderr and "only a succeeded job has a final adapter" in proc.stderr
    assert "--step" in proc.stderr and "10, 20" in proc.stderr  # what can be pulled instead
    assert not (tmp_path / "got").exists()
    proc = tf(home, "pull", "jnosuch", str(tmp_path / "got"))
    assert proc.returncode != 0 and "jnosuch" in proc.stderr and not (tmp_path / "got").exists()


def test_a_corrupted_file_fails_the_pull_and_leaves_nothing(world, tmp_path):
    home, root, ckpt, job_id, final = world
    _succeed(home, job_id, ckpt, final)
    stored = root / "ckpt" / job_id / "final" / "adapter_model.safetensors"
    data = bytearray(stored.read_bytes())
    data[100] ^= 0xFF  # same size, one byte flipped
    stored.write_bytes(bytes(data))
    proc = tf(home, "pull", job_id, str(tmp_path / "got"))
    assert proc.returncode != 0 and "sha256" in proc.stderr and "nothing was written" in proc.stderr
    assert not (tmp_path / "got").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".got.")]  # no staging left behind
    assert stored.read_bytes() == bytes(data)  # the store is left as it was


def test_an_occupied_folder_is_never_overwritten(world, tmp_path):
    home, _, ckpt, job_id, final = world
    _succeed(home, job_id, ckpt, final)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep me")
    proc = tf(home, "pull", job_id, str(tmp_path / "busy"))
    assert proc.returncode == 2 and "never overwrites" in proc.stderr
    assert _tree(tmp_path / "busy") == {"mine.txt": b"keep me"}
    (tmp_path / "empty").mkdir()  # an empty folder made for it is fine
    tf(home, "pull", job_id, str(tmp_path / "empty"), check=True)
    assert (tmp_path / "empty" / "adapter_config.json").read_text() == '{"r": 8}'


def test_export_of_the_adapter_to_s3_writes_every_file_once_and_never_over_objects(world, moto_server, s3_bucket):
    """No --merge: the PEFT folder (no model is loaded), uploaded under an empty s3:// prefix."""
    from tests.s3_fixtures import aws_env, raw_client

    home, _, ckpt, job_id, final = world
    _succeed(home, job_id, ckpt, final)
    dest = f"s3://{s3_bucket}/models/{job_id}"
    with aws_env(AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s", AWS_DEFAULT_REGION="us-east-1",
                 AWS_ENDPOINT_URL=moto_server):
        out = json.loads(tf(home, "export", job_id, dest, "--json", check=True).stdout)
        assert out["kind"] == "adapter" and out["dest"] == dest
        listed = raw_client(moto_server).list_objects_v2(Bucket=s3_bucket, Prefix=f"models/{job_id}/")
        keys = sorted(o["Key"].removeprefix(f"models/{job_id}/") for o in listed["Contents"])
        assert keys == sorted(out["files"]) == sorted(_tree(final))
        body = raw_client(moto_server).get_object(Bucket=s3_bucket, Key=f"models/{job_id}/adapter_config.json")
        assert json.loads(body["Body"].read()) == {"r": 8, "base_model_name_or_path": "tunefleet/tiny-llama"}
        again = tf(home, "export", job_id, dest)
        assert again.returncode == 2 and "never overwrites" in again.stderr


def test_status_of_a_succeeded_job_shows_its_eval_loss_and_perplexity(world):
    import math

    home, _, ckpt, job_id, final = world
    ref = ckpt.commit_final(job_id, final, {"step": 20, "eval_loss": 0.5})
    with Store(home / "state.db") as store:
        assert json.loads(tf(home, "status", job_id, "--json", check=True).stdout)["eval_loss"] is None  # queued
        store.transition_job(job_id, JobState.RUNNING, kind="running", message="test")
        store.transition_job(job_id, JobState.SUCCEEDED, kind="succeeded", message="test", adapter_uri=ref.uri,
                             step=20, data={"eval_loss": 0.5})
    s = json.loads(tf(home, "status", job_id, "--json", check=True).stdout)
    assert s["eval_loss"] == 0.5 and s["perplexity"] == pytest.approx(math.exp(0.5))
    assert "perplexity 1.65" in tf(home, "status", job_id, check=True).stdout


# -------------------------------------------------------------------- through a team server
@pytest.fixture
def served(world, tmp_path):
    """``world`` behind a real ``tunefleet server``: ann (an admin) sees the job; bob (another team,
    a member) does not (it was queued on the server machine without an account: an admin's)."""
    from tests.test_server import Server, make_accounts

    home = world[0]
    tokens = make_accounts(home)
    server = Server(home, "--rate", "0")
    try:
        yield server, tokens
    finally:
        server.stop()


def _as(server, token: str, home: Path, *args: str):
    from tests.test_cli_client import run

    return run({"TUNEFLEET_HOME": str(home), "TUNEFLEET_SERVER": server.url, "TUNEFLEET_TOKEN": token}, *args)


def test_pull_through_the_server_gets_the_same_verified_files_and_answers(world, served, tmp_path):
    from tests.test_cli_client import run

    home, _, ckpt, job_id, final = world
    server, tokens = served
    _succeed(home, job_id, ckpt, final)
    client_home = tmp_path / "client"
    client_home.mkdir()
    local = run({"TUNEFLEET_HOME": str(home)}, "pull", job_id[:6], str(tmp_path / "here"), "--json")
    remote = _as(server, tokens["ann"], client_home, "pull", job_id[:6], str(tmp_path / "there"), "--json")
    assert local.returncode == remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout) == {**json.loads(local.stdout), "dir": str((tmp_path / "there").resolve())}
    assert _tree(tmp_path / "there") == _tree(tmp_path / "here")  # the facts file too: same source URI
    # a checkpoint by step
    local = run({"TUNEFLEET_HOME": str(home)}, "pull", job_id, str(tmp_path / "l10"), "--step", "10")
    remote = _as(server, tokens["ann"], client_home, "pull", job_id, str(tmp_path / "r10"), "--step", "10")
    assert remote.returncode == 0 and remote.stdout.replace("r10", "l10") == local.stdout
    assert (tmp_path / "r10" / "adapter_model.safetensors").read_bytes() == bytes(range(256)) * 10
    # the refusals, byte for byte
    for args in (("pull", job_id, str(tmp_path / "s15"), "--step", "15"), ("pull", "jnosuch", str(tmp_path / "n")),
                 ("pull", job_id, str(tmp_path / "here"))):
        local = run({"TUNEFLEET_HOME": str(home)}, *args)
        remote = _as(server, tokens["ann"], client_home, *args)
        assert local.returncode != 0
        assert (remote.returncode, remote.stdout, remote.stderr) == (local.returncode, local.stdout, local.stderr), args


def test_pull_through_the_server_catches_a_corrupt_copy_and_writes_nothing(world, served, tmp_path):
    home, root, ckpt, job_id, final = world
    server, tokens = served
    _succeed(home, job_id, ckpt, final)
    stored = root / "ckpt" / job_id / "final" / "adapter_model.safetensors"
    data = bytearray(stored.read_bytes())
    data[7] ^= 0xFF
    stored.write_bytes(bytes(data))
    proc = _as(server, tokens["ann"], tmp_path, "pull", job_id, str(tmp_path / "got"))
    assert proc.returncode == 1 and "fails its sha256 check" in proc.stderr and "nothing was written" in proc.stderr
    assert not (tmp_path / "got").exists()


def test_the_store_routes_serve_only_what_the_caller_may_see_of_that_job(world, served, tmp_path):
    home, root, ckpt, job_id, final = world
    server, tokens = served
    _succeed(home, job_id, ckpt, final)
    ann, bob = server.client(tokens["ann"]), server.client(tokens["bob"])
    spec = ann.get(f"/jobs/{job_id}/spec").json()
    assert spec["store_root"] == ckpt.key_uri("") and spec["state"] == "succeeded"
    [staged] = spec["spec"]["inputs"].values()  # the dataset, staged at submit
    manifest = f"inputs/{staged['sha256']}/MANIFEST.json"
    assert ann.get(f"/jobs/{job_id}/store/{manifest}").status_code == 200
    assert ann.get(f"/jobs/{job_id}/store/{job_id}/final/adapter_config.json").content == b'{"r": 8}'
    assert [k for k, _ in ann.get(f"/jobs/{job_id}/store", params={"prefix": f"{job_id}/final/"}).json()]
    # another team's member: the job does not exist for them
    for path in (f"/jobs/{job_id}/spec", f"/jobs/{job_id}/store/{job_id}/final/adapter_config.json"):
        r = bob.get(path)
        assert r.status_code == 404 and job_id in r.text
    # nothing outside the job's own objects and its staged inputs, however the key is spelled
    other = ckpt.commit_final("jother00", final, {"step": 1})
    assert other.uri.endswith("jother00/final/")
    for key in ("jother00/final/adapter_config.json", f"{job_id}/../jother00/final/adapter_config.json",
                "inputs/" + "0" * 64 + "/MANIFEST.json", f"{job_id}%2F..%2Fjother00/final/adapter_config.json"):
        r = ann.get(f"/jobs/{job_id}/store/{key}")
        assert r.status_code == 404, (key, r.status_code)
    assert ann.get(f"/jobs/{job_id}/store", params={"prefix": "jother00/"}).status_code == 404
    assert ann.get(f"/jobs/{job_id}/store", params={"prefix": ""}).status_code == 404
