"""A time-based checkpoint interval (``checkpoint.interval_s``) and the measured cost of a checkpoint
(``checkpoint_s`` in progress.json): the inputs of a Young/Daly interval, tau* = sqrt(2 C / lambda).

The rule (what the orchestrator relies on): with ``interval_s`` set, a checkpoint is saved at the
first step end at least ``interval_s`` seconds after the last save (or the start of training in this
attempt), and still at every multiple of the step interval; a fenced attempt saves nothing. Checked
in-process with a fake monotonic clock (exact, instant), and end to end with the real payload, where
a tiny ``interval_s`` makes every step end due for a save (a training step takes far longer than a
millisecond), so which checkpoints exist does not depend on how fast the machine is.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from infra.storage import LocalFolderStore
from jobs.channel import Beacon
from jobs.spec import JobFileError, JobSpec, load_job_text
from tests.test_payload import (  # noqa: F401 - fixtures shared with the payload tests
    EXIT_BAD_INPUT,
    EXIT_OK,
    REPO,
    committed_steps,
    env,
    payload_dict,
    run_payload,
    scratch,
)

# ---- the spec ----------------------------------------------------------------------------------

MINIMAL = """\
base_model: tunefleet/tiny-llama
datasets:
  - path: data/train.jsonl
"""


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "hello"}\n')
    return tmp_path


def _load(text: str, base_dir: Path) -> JobSpec:
    return load_job_text(textwrap.dedent(text), base_dir=base_dir, source_name="job.yaml")


def test_interval_s_loads_and_round_trips_through_the_payload_dict(job_dir):
    spec = _load(MINIMAL + "save_steps: 100\ncheckpoint:\n  interval_s: 90.5\n", job_dir)
    assert spec.checkpoint.interval_s == 90.5
    assert spec.save_every == 100  # the step interval is untouched
    doc = spec.to_payload_dict()
    assert doc["checkpoint"]["interval_s"] == 90.5
    again = JobSpec.from_payload_dict(json.loads(json.dumps(doc)))
    assert again == spec and again.checkpoint.interval_s == 90.5
    # absent means not time-based, and a payload dict from before the field still loads
    plain = _load(MINIMAL, job_dir)
    assert plain.checkpoint.interval_s is None
    old = plain.to_payload_dict()
    del old["checkpoint"]["interval_s"]
    assert JobSpec.from_payload_dict(old) == plain


@pytest.mark.parametrize("value", ["0", "-30", "0.0", "691200", ".inf", ".nan", "soon"])
def test_interval_s_must_be_a_positive_number_of_seconds_up_to_a_week(job_dir, value):
    with pytest.raises(JobFileError) as info:
        _load(MINIMAL + f"checkpoint:\n  interval_s: {value}\n", job_dir)
    (problem,) = info.value.problems
    assert problem.loc == "checkpoint.interval_s" and problem.line == 5
    if value in ("0", "-30", "0.0"):
        assert "greater than 0" in problem.message


def test_payload_dict_with_interval_s_zero_is_refused(job_dir):
    doc = _load(MINIMAL, job_dir).to_payload_dict()
    doc["checkpoint"]["interval_s"] = 0
    with pytest.raises(ValidationError, match="greater than 0"):
        JobSpec.from_payload_dict(doc)


# ---- the callback, in-process, on a fake monotonic clock -----------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingUploader:
    def __init__(self) -> None:
        self.submitted: list[tuple[int, float]] = []

    def submit(self, step, folder, meta, save_s=0.0):
        self.submitted.append((step, save_s))


@pytest.fixture
def harness(tmp_path, monkeypatch):
    """A StoreCallback driven by hand the way the Trainer drives it: on_step_end, then (when it
    asked) on_save. ``step(n, at=t, by_steps=...)`` ends step n at clock time t and returns whether
    a checkpoint was saved; ``save_takes`` is how long the Trainer's save takes."""
    from transformers import TrainerControl, TrainerState

    from jobs import train

    monkeypatch.setattr(train.PREEMPTION, "training", False)
    monkeypatch.setattr(train.PREEMPTION, "requested", False)
    clock = Clock()
    uploader = RecordingUploader()
    progress = Beacon(LocalFolderStore(tmp_path / "store"), "j", "a1")  # not started: no I/O

    class Harness:
        def __init__(self, interval_s):
            self.clock, self.uploader, self.progress = clock, uploader, progress
            self.save_takes = 0.0
            self.cb = train._make_callback(uploader, "a1", progress, 100.0, interval_s=interval_s, clock=clock)
            self.state = TrainerState(max_steps=1000)
            self.control = TrainerControl()
            self.cb.on_train_begin(None, self.state, self.control)

        def step(self, n: int, at: float, by_steps: bool = False) -> bool:
            self.clock.now = at
            self.state.global_step = n
            self.control.should_save = by_steps  # what the Trainer's step rule (save_steps) says
            self.cb.on_step_end(None, self.state, self.control)
            if not self.control.should_save:
                return False
            self.clock.now += self.save_takes
            self.cb.on_save(type("Args", (), {"output_dir": str(tmp_path)})(), self.state, self.control)
            self.control.should_save = False
            return True

    return Harness


def test_time_based_save_at_the_first_step_end_after_interval_s_since_the_last_save(harness):
    h = harness(interval_s=60.0)  # training begins at t=1000
    h.save_takes = 5.0
    assert not h.step(1, at=1030)
    assert not h.step(2, at=1059.9)
    assert h.step(3, at=1060)  # 60 s after the start of training: save (ends at 1065)
    assert not h.step(4, at=1120)  # 55 s after the last save ended
    assert h.step(5, at=1125.5)
    assert [s for s, _ in h.uploader.submitted] == [3, 5]
    assert [c for _, c in h.uploader.submitted] == [5.0, 5.0]  # what the save took, measured


def test_the_step_interval_still_saves_and_restarts_the_time_interval(harness):
    h = harness(interval_s=60.0)
    assert h.step(10, at=1010, by_steps=True)  # a multiple of save_steps: saved though early
    assert not h.step(11, at=1069)  # 59 s after that save
    assert h.step(12, at=1070)
    assert [s for s, _ in h.uploader.submitted] == [10, 12]


def test_without_interval_s_only_the_step_rule_saves(harness):
    h = harness(interval_s=None)
    assert not h.step(1, at=1_000_000)
    assert h.step(2, at=2_000_000, by_steps=True)
    assert [s for s, _ in h.uploader.submitted] == [2]


def test_a_fenced_attempt_saves_nothing_however_long_ago_the_last_save(harness):
    h = harness(interval_s=60.0)
    h.progress.fence("attempt a2 holds the lease")
    assert not h.step(1, at=5000)
    assert not h.step(2, at=6000, by_steps=True)
    assert h.control.should_training_stop
    assert h.uploader.submitted == []


def test_checkpoint_s_is_the_median_save_plus_commit_and_absent_until_one_commits(tmp_path):
    from jobs.train import TimedUploader

    store = LocalFolderStore(tmp_path / "store")
    progress = Beacon(store, "j", "a1")  # not started: progress.doc is what would be written
    uploader = TimedUploader(store, "j", 10, progress, tmp_path / "staging")
    assert "checkpoint_s" not in progress.doc
    # save seconds chosen so that median, mean and last differ whatever the commits took here
    for step, save_s in ((1, 1000.0), (2, 1100.0), (3, 5000.0)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "weights.bin").write_bytes(bytes([step]) * 1024)
        uploader.submit(step, folder, {"loss": 1.0}, save_s=save_s)
        uploader.drain(timeout_s=60)
        assert progress.doc["checkpoint_step"] == step
    assert [r.step for r in store.list_checkpoints("j")] == [1, 2, 3]
    assert 1100.0 < progress.doc["checkpoint_s"] < 2000.0  # the median: 1100 s + one commit
    assert len(uploader.checkpoint_s) == 3

    progress.fence("attempt a2 holds the lease")  # nothing committed: nothing measured or said
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"x")
    uploader.submit(4, folder, {}, save_s=1.0)
    uploader.drain(timeout_s=60)
    assert len(uploader.checkpoint_s) == 3 and [r.step for r in store.list_checkpoints("j")] == [1, 2, 3]


# ---- the real payload --------------------------------------------------------------------------


@pytest.mark.slow
def test_payload_with_a_tiny_interval_s_commits_by_time_before_the_step_interval(env, scratch, tmp_path):  # noqa: F811
    spec = payload_dict(max_steps=6, save_steps=6)  # the step rule alone: one checkpoint, at 6
    spec["checkpoint"] = {**spec["checkpoint"], "keep": 100, "interval_s": 0.001}
    spec_path = tmp_path / "timed.json"
    spec_path.write_text(json.dumps(spec))
    store_root = tmp_path / "store"
    rc, p = run_payload(env, spec_path, store_root, "timed", "a1", scratch)
    assert rc == EXIT_OK, p.log()[-3000:]
    # every step takes far more than a millisecond: each step end is due for a save
    assert committed_steps(store_root, "timed") == [1, 2, 3, 4, 5, 6]
    assert LocalFolderStore(store_root).final("timed") is not None
    doc = p.progress()
    assert doc["state"] == "succeeded" and doc["checkpoint_step"] == 6
    assert isinstance(doc["checkpoint_s"], float) and doc["checkpoint_s"] > 0


@pytest.mark.slow
def test_payload_without_interval_s_saves_exactly_at_multiples_of_save_steps(env, scratch, tmp_path):  # noqa: F811
    spec = payload_dict(max_steps=9, save_steps=3)
    spec["checkpoint"] = {**spec["checkpoint"], "keep": 100}
    assert spec["checkpoint"]["interval_s"] is None
    spec_path = tmp_path / "steps.json"
    spec_path.write_text(json.dumps(spec))
    store_root = tmp_path / "store"
    rc, p = run_payload(env, spec_path, store_root, "steps", "a1", scratch)
    assert rc == EXIT_OK, p.log()[-3000:]
    assert committed_steps(store_root, "steps") == [3, 6, 9]
    doc = p.progress()
    assert doc["checkpoint_step"] == 9
    assert isinstance(doc["checkpoint_s"], float) and doc["checkpoint_s"] > 0


@pytest.mark.slow
def test_payload_refuses_interval_s_zero_as_bad_input(env, tmp_path):  # noqa: F811
    spec = payload_dict()
    spec["checkpoint"] = {**spec["checkpoint"], "interval_s": 0}
    spec_path = tmp_path / "bad.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--spec", str(spec_path), "--store", (tmp_path / "store").as_uri(),
         "--job-id", "bad", "--attempt-id", "a1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-3000:]
    assert "interval_s" in proc.stderr and "greater than 0" in proc.stderr
    assert LocalFolderStore(tmp_path / "store").list_checkpoints("bad") == []
