"""The payload trains every adapter kind and dataset format, for real, on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.storage import open_store
from jobs.spec import load_job_file

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(tmp_path: Path, spec: dict, model_cache: Path) -> tuple[int, str]:
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--spec", str(tmp_path / "spec.json"),
         "--store", (tmp_path / "store").as_uri(), "--job-id", "j1", "--attempt-id", "a1"],
        env={**os.environ, "TUNEFLEET_MODEL_CACHE": str(model_cache)},
        capture_output=True, text=True, timeout=300,
    )
    return proc.returncode, proc.stderr


def test_lora_on_chat_data_trains_only_the_adapter(tmp_path, model_cache):
    spec = load_job_file(EXAMPLES / "lora-chat-tiny.yaml").to_payload_dict()
    code, log = _run(tmp_path, spec, model_cache)
    assert code == 0, log[-3000:]
    store = open_store((tmp_path / "store").as_uri())
    final = store.final("j1")
    assert final is not None and final.step == 30
    names = {f.path for f in final.files}
    assert "adapter_model.safetensors" in names and "model.safetensors" not in names
    assert [c.step for c in store.list_checkpoints("j1")] == [10, 20, 30]
    meta = json.loads((Path(final.uri.removeprefix("file://")) / "tunefleet_training.json").read_text())
    assert meta["step"] == 30 and meta["final_loss"] > 0


def test_full_fine_tune_with_eval_split_saves_the_whole_model(tmp_path, model_cache):
    spec = load_job_file(EXAMPLES / "qlora-tiny.yaml").to_payload_dict()
    spec.update(adapter=None, load_in_4bit=False, max_steps=12, save_steps=6, val_set_size=0.1, learning_rate=1e-3)
    code, log = _run(tmp_path, spec, model_cache)
    assert code == 0, log[-3000:]
    store = open_store((tmp_path / "store").as_uri())
    final = store.final("j1")
    assert final is not None and final.step == 12
    assert "model.safetensors" in {f.path for f in final.files}
    assert final.meta["eval_loss"] is not None and final.meta["eval_loss"] > 0
    import re

    n_train, n_eval = map(int, re.search(r"(\d+) train / (\d+) eval examples", log).groups())
    assert n_eval == round(0.1 * (n_train + n_eval)) > 0  # 10 % held out, none trained on


def test_eval_datasets_measure_eval_loss_on_their_own_files(tmp_path, model_cache):
    rows = (EXAMPLES / "data" / "alpaca-tiny.jsonl").read_text().splitlines()
    (tmp_path / "held-out.jsonl").write_text("\n".join(rows[:12]) + "\n")
    spec = load_job_file(EXAMPLES / "qlora-tiny.yaml").to_payload_dict()
    spec.update(max_steps=6, save_steps=6, val_set_size=0.0,
                eval_datasets=[{"path": str(tmp_path / "held-out.jsonl"), "type": "alpaca"}])
    code, log = _run(tmp_path, spec, model_cache)
    assert code == 0, log[-3000:]
    import re

    n_train, n_eval = map(int, re.search(r"(\d+) train / (\d+) eval examples", log).groups())
    assert (n_train, n_eval) == (len(rows), 12)  # every example of datasets trained on, the file's 12 measured
    final = open_store((tmp_path / "store").as_uri()).final("j1")
    assert final.meta["eval_loss"] is not None and final.meta["eval_loss"] > 0
