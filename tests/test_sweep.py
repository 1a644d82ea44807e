"""Sweeps: expansion, successive-halving bookkeeping, and one real halving sweep end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.sweep import SweepError, SweepSpec, expand, load_sweep, rungs, survivors
from tests.test_cli import tf

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def spec(**kw) -> SweepSpec:
    doc = {"name": "s", "base": "qlora-tiny.yaml", "budget_usd": 1.0,
           "search": {"learning_rate": {"values": [1e-3, 1e-2]}, "lora_r": {"values": [4, 8, 16]}}}
    doc.update(kw)
    return SweepSpec.model_validate(doc)


def test_grid_is_the_product_and_random_is_seeded():
    grid = expand(spec())
    assert len(grid) == 6 and len({tuple(sorted(p.items())) for p in grid}) == 6
    rnd = spec(search={"learning_rate": {"log_uniform": [1e-4, 1e-2]}, "lora_r": {"values": [4, 8]}}, trials=5)
    a, b = expand(rnd), expand(rnd)
    assert a == b and len(a) == 5
    assert all(1e-4 <= p["learning_rate"] <= 1e-2 for p in a)
    assert expand(spec(search=rnd.model_dump()["search"], trials=5, seed=1)) != a


def test_rungs_are_geometric_aligned_to_checkpoints_and_end_at_max_steps():
    sh = spec(strategy="successive_halving", halving={"min_steps": 20, "eta": 3})
    assert rungs(sh, 400, 10) == [20, 60, 180, 400]
    assert rungs(sh, 400, 50) == [50, 200, 400]
    assert rungs(spec(), 400, 10) == [400]


def test_survivors_keep_the_best_fraction_by_eval_loss():
    results = [("a", 2.0), ("b", 1.0), ("c", None), ("d", 3.0), ("e", 1.5)]
    assert survivors(results, 2) == ["b", "e", "a"]
    assert survivors(results, 5) == ["b"]
    assert survivors([("a", None)], 2) == []


def test_bad_sweeps_are_refused_with_the_reason(tmp_path):
    # a base with no eval split (the shipped example holds out 10 %), for the halving case
    base = yaml.safe_load((EXAMPLES / "qlora-tiny.yaml").read_text())
    base.pop("val_set_size", None)
    base["datasets"][0]["path"] = str(EXAMPLES / base["datasets"][0]["path"])
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))

    def write(doc):
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump({"base": str(tmp_path / "base.yaml"), **doc}))
        return path

    cases = [
        ({"name": "x", "budget_usd": 1, "search": {"learnin_rate": {"values": [1]}}}, "did you mean 'learning_rate'"),
        ({"name": "x", "budget_usd": 1, "serch": {}}, "did you mean 'search'"),
        ({"name": "x", "budget_usd": -1, "search": {"lora_r": {"values": [4]}}}, "budget_usd"),
        ({"name": "x", "budget_usd": 1, "strategy": "successive_halving", "halving": {"min_steps": 10},
          "search": {"lora_r": {"values": [4]}}}, "val_set_size"),
        ({"name": "x", "budget_usd": 1, "search": {"lora_r": {"values": [0]}}}, "lora_r"),
    ]
    for doc, needle in cases:
        with pytest.raises(SweepError, match=needle):
            from orchestrator.sweep import trial_spec

            sweep, base = load_sweep(write(doc))
            for params in expand(sweep):
                trial_spec(base, params)
    home = tmp_path / "home"
    proc = tf(home, "sweep", str(write(cases[0][0])))
    assert proc.returncode == 2 and "nothing was queued" in proc.stderr
    assert json.loads(tf(home, "status", "--json", check=True).stdout) == []


@pytest.mark.slow
def test_successive_halving_sweep_end_to_end(tmp_path, model_cache):
    home = tmp_path / "home"
    home.mkdir()
    # priced local CPU ($3.60/h) so the budget is real
    (home / "config.yaml").write_text("poll_interval_s: 0.5\nlocal_cpu_watts: 1000\nusd_per_kwh: 3.6\n")
    doc = yaml.safe_load((EXAMPLES / "sweep-tiny.yaml").read_text())
    doc["base"] = str(EXAMPLES / "qlora-tiny.yaml")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(doc))
    sweep_id = json.loads(tf(home, "sweep", str(tmp_path / "sweep.yaml"), "--json", check=True).stdout)["id"]
    env = {**os.environ, "TUNEFLEET_HOME": str(home), "TUNEFLEET_MODEL_CACHE": str(model_cache)}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "daemon", "--until-idle", "--max-seconds", "600"],
                          env=env, capture_output=True, text=True, timeout=700)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads(tf(home, "sweep", "status", sweep_id, "--json", check=True).stdout)
    assert s["state"] == "done" and s["rungs"] == [20, 40, 80]
    trials = s["trials"]
    assert [t["rung"] for t in trials].count(2) == 1 and [t["rung"] for t in trials].count(1) == 1
    top = trials[0]
    assert top["rung"] == 2 and top["steps"] == 80 and top["state"] == "succeeded"
    assert s["best_job_id"] == top["job_id"] and s["best_adapter_uri"] == top["adapter_uri"]
    # the trials promoted at each rung had the lowest eval loss of that rung
    from orchestrator.store import Store

    with Store(home / "state.db") as store:
        rows = store.trials(sweep_id)
        losses = {}
        for t in rows:
            final_meta = home / "checkpoints" / t["job_id"] / "final" / "tunefleet_training.json"
            losses[(t["trial"], t["rung"])] = json.loads(final_meta.read_text())["eval_loss"]
        rung0 = sorted((loss, trial) for (trial, rung), loss in losses.items() if rung == 0)
        promoted = sorted(trial for (trial, rung) in losses if rung == 1)
        assert promoted == sorted(trial for _, trial in rung0[:2])
        spent = store.sweep_spend(sweep_id)
    assert 0 < spent <= s["budget_usd"] and s["spent_usd"] == pytest.approx(spent, abs=1e-6)  # rounded to 6 places
    # later rungs continue from the previous rung's checkpoint, not from scratch
    logs = "".join(p.read_text() for p in (home / "logs").glob("j*.log"))
    assert logs.count("seeded from job") == 3


def test_a_sweep_whose_last_rung_ran_out_of_budget_names_its_best_adapter_so_far(tmp_path):
    """Rung 0 finished (two trials, eval losses 1.0 and 2.0); the promoted trial was stopped by the
    budget at rung 1. The sweep ends done with rung 0's best, and the leaderboard keeps each trial's
    best completed rung, its eval loss and adapter, beside the rung it last reached."""
    from infra.config import load_config
    from infra.storage import open_store
    from jobs.spec import load_job_file
    from orchestrator.daemon import Daemon
    from orchestrator.queue import sweep_summary
    from orchestrator.states import JobState
    from orchestrator.store import Store

    home = tmp_path / "home"
    home.mkdir()
    cfg = load_config(home)
    base = load_job_file(EXAMPLES / "qlora-tiny.yaml").to_payload_dict()
    base["checkpoint"]["store"] = cfg.default_store
    plan = {"sweep": {"strategy": "halving", "halving": {"eta": 2}}, "base": base,
            "trials": [{"lora_r": 4}, {"lora_r": 8}], "rungs": [20, 40]}
    ckpt = open_store(cfg.default_store)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"x" * 10)

    def finish(store, job_id, eval_loss):
        ref = ckpt.commit_final(job_id, adapter, {"step": 20, "eval_loss": eval_loss})
        store.transition_job(job_id, JobState.RUNNING, kind="running", message="test")
        store.transition_job(job_id, JobState.SUCCEEDED, kind="succeeded", message="test", adapter_uri=ref.uri,
                             step=20, data={"eval_loss": eval_loss})

    with Store(cfg.db_path) as store:
        sweep_id = store.create_sweep("s", plan, 1.0)
        jobs = [store.add_trial(sweep_id, trial=i, rung=0, params=p, spec=base, name=f"s/t{i}/r0")
                for i, p in enumerate(plan["trials"])]
        finish(store, jobs[0], 1.0)
        finish(store, jobs[1], 2.0)
        daemon = Daemon(store, cfg, {})
        daemon._advance_sweeps()  # rung 0 done: trial 0 promoted
        promoted = [t for t in store.trials(sweep_id) if t["rung"] == 1]
        assert [t["trial"] for t in promoted] == [0]
        store.transition_job(promoted[0]["job_id"], JobState.RUNNING, kind="running", message="test")
        store.transition_job(promoted[0]["job_id"], JobState.STOPPED_BUDGET, kind="stopped_budget",
                             message="the sweep's budget is spent")
        daemon._advance_sweeps()
        s = sweep_summary(store, sweep_id)
    assert s["state"] == "done" and s["best_job_id"] == jobs[0], s
    assert "no trial finished the last rung" in s["reason"] and "from rung 0" in s["reason"]
    assert s["best_adapter_uri"] and s["best_adapter_uri"].rstrip("/").endswith(f"{jobs[0]}/final")
    top, second = s["trials"]
    assert (top["trial"], top["rung"], top["eval_loss"], top["job_id"]) == (0, 0, 1.0, jobs[0])
    assert (top["reached_rung"], top["state"]) == (1, "stopped_budget")  # promoted, then stopped
    assert (second["trial"], second["rung"], second["eval_loss"]) == (1, 0, 2.0)
    proc_home = home
    text = tf(proc_home, "sweep", "status", sweep_id, check=True).stdout
    assert "BEST RUNG" in text and "from rung 0" in text
