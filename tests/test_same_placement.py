"""`tunefleet offers`, the daemon and the market simulator give the same placement for the same
inputs: all three call ``orchestrator.decide.decide``.

The inputs: one job file, and Vast.ai's live offers from a stub server speaking Vast's API (several
on-demand and interruptible asks at different prices and reliabilities, so the choice is not
trivial). The CLI is run as a user runs it; the daemon is the real one, in-process, renting from
the stub; the simulator's ``tunefleet`` policy is asked about the same offers at the same moment.
"""

from __future__ import annotations

import json
import os
import time

import yaml

from benchmarks.market.policies import Tunefleet
from benchmarks.market.sim import JobInfo, JobRun
from benchmarks.market.trace import JobTrack
from infra.config import load_config
from jobs.estimate import estimate
from jobs.spec import load_job_file
from orchestrator.daemon import Daemon
from orchestrator.queue import submit_spec
from orchestrator.store import Store
from providers.vast import VastProvider
from tests.s3_fixtures import aws_env, moto_server, new_bucket  # noqa: F401 - fixture
from tests.test_cli import EXAMPLE, tf
from tests.vast_stub import VastStub, offer_row

KEY = "vast-same-placement-key"


def test_offers_the_daemon_and_the_simulator_choose_the_same_offer(tmp_path, moto_server, monkeypatch):  # noqa: F811
    asks = {
        "on-demand": [offer_row(201, "RTX A6000", gpu_ram=49140, dph_total=0.26, reliability=0.99),
                      offer_row(202, "A100 SXM4", gpu_ram=81920, dph_total=0.35, reliability=0.995),
                      offer_row(203, "H100 SXM", gpu_ram=81559, dph_total=2.60, reliability=0.999)],
        "bid": [offer_row(204, "RTX 4090", dph_total=0.55, min_bid=0.45, reliability=0.96),
                offer_row(205, "A100 SXM4", gpu_ram=81920, dph_total=1.40, min_bid=0.70, reliability=0.97)],
    }
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["datasets"][0]["path"] = str((EXAMPLE.parent / doc["datasets"][0]["path"]).resolve())
    doc.update(max_steps=2000, base_model="meta-llama/Llama-3.1-8B", sequence_len=1024,  # estimated by size;
               sample_packing=True)  # never run here
    doc["resources"] = {"gpus": 1, "device": "auto"}
    doc["policy"] = {"providers": ["vast"], "data": "open", "spot": "allow", "max_usd": 50.0}
    home = tmp_path / "home"
    home.mkdir()
    with VastStub(offers=asks, api_key=KEY, runner=lambda *a: None) as stub:
        env = {"VAST_URL": stub.url, "VAST_API_KEY": KEY, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_server}
        with aws_env(**{k: v for k, v in env.items() if k.startswith("AWS_")}):
            doc["checkpoint"] = {"store": f"s3://{new_bucket(moto_server)}/jobs", "keep": 3}
            job_file = tmp_path / "job.yaml"
            job_file.write_text(yaml.safe_dump(doc))

            # 1. the CLI, as a user runs it
            os.environ.update({k: v for k, v in env.items() if not k.startswith("AWS_")})
            try:
                out = json.loads(tf(home, "offers", str(job_file), "--json", check=True).stdout)
            finally:
                for k in ("VAST_URL", "VAST_API_KEY"):
                    os.environ.pop(k, None)
            cli_choice = (out["decision"]["provider"], out["decision"]["offer_id"])
            assert out["decision"]["verdict"] == "place" and cli_choice[0] == "vast"
            viable = [r for r in out["offers"] if r["viable"]]
            assert len(viable) >= 3  # a real choice among several...
            cheapest_per_hour = min(viable, key=lambda r: r["usd_per_hour"])
            assert cheapest_per_hour["offer_id"] != cli_choice[1], viable  # ...and not simply the lowest $/h

            # 2. the daemon, renting from the same Vast
            monkeypatch.setenv("TUNEFLEET_HOME", str(home))
            config = load_config(home)
            store = Store(config.db_path)
            spec = load_job_file(job_file)
            job_id = submit_spec(store, spec, config)
            vast = VastProvider(api_key=KEY, url=stub.url)
            daemon = Daemon(store, config, {"vast": vast})
            daemon.tick()
            (attempt,) = store.attempts_for(job_id)
            assert (attempt.provider, attempt.offer_id) == cli_choice
            assert [r.path for r in stub.calls("PUT", "/api/v0/asks/")] == [f"/api/v0/asks/{cli_choice[1].split(':')[0]}/"]
            daemon.calls.shutdown()
            store.close()

            # 3. the simulator's tunefleet policy, on the same offers at the same moment
            payload = spec.to_payload_dict()
            payload["checkpoint"]["store"] = doc["checkpoint"]["store"]
            est = estimate(payload)
            offers = vast.offers(payload, est)
            info = JobInfo(JobTrack(job_id, 0.0, None, 1.0, payload), payload, payload, est, est.steps, 50, None, 0.0)
            chosen = Tunefleet().choose(JobRun(info), offers, time.time(), frozenset())
            assert (chosen.provider, chosen.offer_id) == cli_choice
