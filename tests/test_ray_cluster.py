"""Joining an existing Ray cluster (``ray start --head`` on 127.0.0.1), as a user with several GPU
boxes would. The head declares one *logical* GPU: the attempt must reserve it (Ray sets
CUDA_VISIBLE_DEVICES for it) and, with no physical GPU and ``device: auto``, train on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ray_head import ray_head as start_ray_head
import yaml

from tests.test_cli import EXAMPLE, tf

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture
def ray_head():
    with start_ray_head(num_cpus=2, num_gpus=1) as address:
        yield address


def test_daemon_joins_existing_cluster_and_reserves_its_gpu(tmp_path, ray_head, model_cache):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text(f"ray_address: {ray_head}\npoll_interval_s: 0.5\n")
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc.update(max_steps=30, save_steps=10, resources={"gpus": 1, "device": "auto"})
    doc["datasets"][0]["path"] = str((EXAMPLE.parent / doc["datasets"][0]["path"]).resolve())
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(doc))

    job_id = json.loads(tf(home, "submit", str(job_file), "--json", check=True).stdout)["id"]
    env = {**os.environ, "TUNEFLEET_HOME": str(home), "TUNEFLEET_MODEL_CACHE": str(model_cache)}
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "daemon", "--until-idle", "--max-seconds", "300"],
        env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    status = json.loads(tf(home, "status", job_id, "--json", check=True).stdout)
    assert status["state"] == "succeeded", status
    assert status["provider"] == "local" and status["step"] == 30

    from orchestrator.store import Store

    with Store(home / "state.db") as store:
        (attempt,) = store.attempts_for(job_id)
    assert attempt.offer_id == "local-gpux1"  # the cluster's GPU was offered and reserved
    log = Path(attempt.log_path).read_text()
    assert "CUDA_VISIBLE_DEVICES=0" in log  # set by Ray for the reserved GPU
    assert "device=cpu" in log  # no physical GPU: device auto falls back to the CPU

    # the daemon joined the cluster; it must leave it running when it exits
    alive = subprocess.run([RAY, "status", f"--address={ray_head}"], capture_output=True, text=True, timeout=120)
    assert alive.returncode == 0, alive.stderr
