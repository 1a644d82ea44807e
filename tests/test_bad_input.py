"""Every input is checked at the door: a corpus of malformed job files, datasets, settings and
arguments. Each must exit 2 with one readable message that names the key and says what is allowed
or what to do, print no traceback, and change nothing: no job queued, no checkpoint written.
``validate`` and ``submit`` give the same verdict on every job file.

The CLI runs in-process (``orchestrator.cli.main``), as a user's shell would run it.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.config import ConfigError, load_config
from jobs.spec import JobFileError, load_job_file

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ALPACA = (EXAMPLES / "data" / "alpaca-tiny.jsonl").read_text()
BASE = yaml.safe_load((EXAMPLES / "qlora-tiny.yaml").read_text())
BASE["datasets"] = [{"path": "data.jsonl", "type": "alpaca"}]


def job(**changes) -> str:
    """The shipped example with ``changes`` (dotted keys reach into sections; None deletes)."""
    doc = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return yaml.safe_dump(doc, sort_keys=False)


CHAT = "chat.jsonl"

# (id, job file text, extra files {name: text}, substrings the error must contain)
JOB_CASES: list[tuple[str, str, dict[str, str], tuple[str, ...]]] = [
    # the file itself
    ("empty file", "", {}, ("a job file is a YAML mapping",)),
    ("a list, not a mapping", "- a\n- b\n", {}, ("YAML mapping",)),
    ("yaml syntax", "base_model: [unclosed\n", {}, ("job.yaml:2: invalid YAML",)),
    ("duplicate key", job() + "seed: 8\n", {}, ("seed", "duplicate")),
    ("unknown key typo", job() + "learnig_rate: 0.1\n", {}, ("learnig_rate", "did you mean 'learning_rate'")),
    ("unknown section key", job(**{"policy.spott": "allow"}), {}, ("policy.spott", "did you mean 'spot'")),
    ("alias bomb", "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e]\n", {}, ("expands to more than",)),
    ("too big", "base_model: x\n" + "# padding\n" * 200_000, {}, ("MiB", "at most 1 MiB")),
    # numbers without bounds
    ("max_steps 1e23", job(max_steps=1e23), {}, ("max_steps", "allowed: more than 0 and at most 10000000")),
    ("max_steps zero", job(max_steps=0), {}, ("max_steps", "greater than 0")),
    ("negative learning rate", job(learning_rate=-0.001), {}, ("learning_rate", "greater than 0")),
    ("learning rate over 1", job(learning_rate=2.0), {}, ("learning_rate", "less than or equal to 1")),
    ("seed 2^32", job(seed=2**32), {}, ("seed", "4294967295")),
    ("negative seed", job(seed=-1), {}, ("seed", "greater than or equal to 0")),
    ("priority 1e29", job(priority=10**29), {}, ("priority", "1000000")),
    ("micro batch zero", job(micro_batch_size=0), {}, ("micro_batch_size", "greater than 0")),
    ("accumulation huge", job(gradient_accumulation_steps=10**9), {}, ("gradient_accumulation_steps", "65536")),
    ("epochs zero", job(num_epochs=0, max_steps=None), {}, ("num_epochs", "greater than 0")),
    ("warmup over steps", job(warmup_steps=500), {}, ("warmup_steps", "lower warmup_steps")),
    ("lora_r zero", job(lora_r=0), {}, ("lora_r", "greater than 0")),
    ("dropout one", job(lora_dropout=1.0), {}, ("lora_dropout", "less than 1")),
    ("sequence too short", job(sequence_len=4), {}, ("sequence_len", "greater than or equal to 8")),
    ("save_steps zero", job(save_steps=0), {}, ("save_steps", "greater than 0")),
    ("logging_steps zero", job(logging_steps=0), {}, ("logging_steps", "greater than 0")),
    ("max_usd nan", job(**{"policy.max_usd": float("nan")}), {}, ("policy.max_usd", "finite")),
    ("max_usd negative", job(**{"policy.max_usd": -1}), {}, ("policy.max_usd", "greater than 0")),
    ("max_usd_per_hour zero", job(**{"policy.max_usd_per_hour": 0}), {}, ("policy.max_usd_per_hour", "greater than 0")),
    ("gpus 65", job(**{"resources.gpus": 65}), {}, ("resources.gpus", "64")),
    ("cpus zero", job(**{"resources.cpus": 0}), {}, ("resources.cpus", "greater than or equal to 1")),
    ("vram zero", job(**{"resources.gpu_vram_gb": 0}), {}, ("resources.gpu_vram_gb", "from 1 to 4096")),
    ("vram words", job(**{"resources.gpu_vram_gb": "lots"}), {}, ("resources.gpu_vram_gb", "'auto'")),
    ("keep zero", job(**{"checkpoint.keep": 0}), {}, ("checkpoint.keep", "greater than or equal to 1")),
    ("interval huge", job(save_steps=None, **{"checkpoint.interval": 10**12}), {}, ("checkpoint.interval", "10000000")),
    ("save_steps and interval disagree", job(**{"checkpoint.interval": 20}), {}, ("save_steps", "give one")),
    ("device gpu", job(**{"resources.device": "gpu"}), {}, ("resources.device", "'auto', 'cuda' or 'cpu'")),
    # policy
    ("unknown provider", job(**{"policy.providers": ["locl"]}), {}, ("policy.providers", "did you mean 'local'")),
    ("empty providers", job(**{"policy.providers": []}), {}, ("policy.providers", "at least 1")),
    ("spot sometimes", job(**{"policy.spot": "sometimes"}), {}, ("policy.spot", "'allow', 'never' or 'only'")),
    ("data secret", job(**{"policy.data": "secret"}), {}, ("policy.data", "'open' or 'restricted'")),
    ("deadline past", job(**{"policy.deadline": "2020-01-01T00:00:00Z"}), {}, ("policy.deadline", "already past")),
    ("deadline words", job(**{"policy.deadline": "tomorrow"}), {}, ("policy.deadline", "datetime")),
    # where checkpoints go
    ("store ftp", job(**{"checkpoint.store": "ftp://x/y"}), {}, ("checkpoint.store", "file:///path or s3://")),
    ("store relative", job(**{"checkpoint.store": "ckpt"}), {}, ("checkpoint.store", "not a storage URI")),
    ("store s3 no bucket", job(**{"checkpoint.store": "s3:///prefix"}), {}, ("checkpoint.store", "bucket")),
    # the model
    ("base model blank", job(base_model=" "), {}, ("base_model", "empty")),
    ("local model missing", job(base_model="./no-such-model"), {}, ("base_model", "not found")),
    ("qlora without 4bit", job(load_in_4bit=False), {}, ("adapter", "load_in_4bit: true")),
    ("lora with 4bit", job(adapter="lora"), {}, ("adapter", "use adapter: qlora")),
    ("4bit and 8bit", job(load_in_8bit=True), {}, ("load_in_8bit", "pick one")),
    ("unknown target module", job(lora_target_linear=False, lora_target_modules=["q_proj", "q_projj"]), {},
     ("lora_target_modules", "did you mean 'q_proj'")),
    ("modules and linear", job(lora_target_modules=["q_proj"]), {}, ("lora_target_linear", "give one")),
    ("full fine-tune 4bit", job(adapter=None), {}, ("load_in_4bit", "needs an adapter")),
    # datasets
    ("dataset missing", job(datasets=[{"path": "nope.jsonl", "type": "alpaca"}]), {}, ("datasets[0].path", "not found")),
    ("dataset folder", job(datasets=[{"path": "sub.jsonl", "type": "alpaca"}]), {"sub.jsonl/x": ""},
     ("datasets[0].path", "a folder")),
    ("dataset hub id", job(datasets=[{"path": "tatsu-lab/alpaca", "type": "alpaca"}]), {},
     ("datasets[0].path", "download it")),
    ("dataset url", job(datasets=[{"path": "https://x/y.jsonl", "type": "alpaca"}]), {}, ("datasets[0].path", "local")),
    ("dataset suffix", job(datasets=[{"path": "data.csv", "type": "alpaca"}]), {}, ("datasets[0].path", ".jsonl")),
    ("dataset type", job(datasets=[{"path": "data.jsonl", "type": "sharegpt"}]), {},
     ("datasets[0].type", "'completion', 'alpaca' or 'chat_template'")),
    ("no datasets", job(datasets=[]), {}, ("datasets", "at least 1")),
    ("dataset empty", job(), {"data.jsonl": "\n\n"}, ("datasets[0].path", "no examples")),
    ("not json line", job(), {"data.jsonl": ALPACA + "{not json}\n"}, ("datasets[0].path", "line 201: not valid JSON")),
    ("array line", job(), {"data.jsonl": "[1, 2]\n"}, ("datasets[0].path", "line 1: each line must be a JSON object")),
    ("alpaca no output", job(), {"data.jsonl": '{"instruction": "hi"}\n'}, ("datasets[0].path", "'output'")),
    ("completion no text", job(datasets=[{"path": "data.jsonl", "type": "completion"}]),
     {"data.jsonl": '{"body": "hello"}\n'}, ("datasets[0].path", "'text'")),
    ("chat no messages", job(datasets=[{"path": CHAT, "type": "chat_template"}]), {CHAT: '{"text": "hi"}\n'},
     ("datasets[0].path", "'messages'")),
    ("chat bad role", job(datasets=[{"path": CHAT, "type": "chat_template"}]),
     {CHAT: '{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'},
     ("datasets[0].path", "'robot' is not one of")),
    ("chat no assistant", job(datasets=[{"path": CHAT, "type": "chat_template"}]),
     {CHAT: '{"messages": [{"role": "user", "content": "x"}]}\n'}, ("datasets[0].path", "no assistant turn")),
    ("chat content not text", job(datasets=[{"path": CHAT, "type": "chat_template"}]),
     {CHAT: '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}\n'},
     ("datasets[0].path", "content must be a string")),
    ("most examples dropped", job(sequence_len=16), {}, ("datasets[0].path", "would be dropped", "raise sequence_len")),
    ("not utf-8", job(), {"data.jsonl": b"\xff\xfe{}\n"}, ("datasets[0].path", "UTF-8")),
]


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("TUNEFLEET_HOME", str(h))
    for k in ("VAST_API_KEY", "TOGETHER_API_KEY", "SILICONFLOW_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    return h


def cli(capfd, *args: str) -> tuple[int, str, str]:
    """Run ``tunefleet ARGS`` in this process; (exit code, stdout, stderr)."""
    from orchestrator.cli import main

    old = sys.argv
    sys.argv = ["tunefleet", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    out, err = capfd.readouterr()
    return code, out, err


def untouched(home: Path) -> bool:
    """Nothing was queued and nothing was written to a checkpoint store."""
    if (home / "checkpoints").exists() and any((home / "checkpoints").rglob("*")):
        return False
    db = home / "state.db"
    if not db.exists():
        return True
    import sqlite3

    with sqlite3.connect(db) as c:
        return c.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0


def _write(tmp_path: Path, text: str, files: dict[str, str | bytes]) -> Path:
    (tmp_path / "data.jsonl").write_text(ALPACA)
    for name, content in files.items():
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_the_corpus_is_large_enough():
    assert len(JOB_CASES) + len(SETTING_CASES) + len(ARG_CASES) >= 60


@pytest.mark.parametrize(("case", "text", "files", "needles"), JOB_CASES, ids=[c[0] for c in JOB_CASES])
def test_a_malformed_job_file_is_refused_the_same_way_by_validate_and_submit(
        case, text, files, needles, tmp_path, home, capfd):
    path = _write(tmp_path, text, files)
    verdicts = []
    for command in ("validate", "submit"):
        code, out, err = cli(capfd, command, str(path))
        assert code == 2, (command, code, out, err)
        assert "Traceback" not in out + err
        for needle in needles:
            assert needle in err, (command, needle, err)
        verdicts.append(err.replace("nothing was queued", ""))
        assert untouched(home)
    assert verdicts[0] == verdicts[1]


def test_the_shipped_examples_pass_and_validate_says_what_it_will_cut(home, capfd, tmp_path):
    for name in ("qlora-tiny.yaml", "lora-chat-tiny.yaml"):
        code, out, err = cli(capfd, "validate", str(EXAMPLES / name))
        assert code == 0 and "ok" in out and "warning" not in err, (name, err)
    path = _write(tmp_path, job(sequence_len=48), {})
    code, out, err = cli(capfd, "validate", str(path))
    assert code == 0 and "warning" in err and "longer than sequence_len 48" in err


# ---- settings and the environment ----------------------------------------------------------------
SETTING_CASES: list[tuple[str, str, tuple[str, ...]]] = [
    ("poll zero", "poll_interval_s: 0\n", ("poll_interval_s", "0.05")),
    ("poll negative", "poll_interval_s: -1\n", ("poll_interval_s", "0.05")),
    ("power price negative", "usd_per_kwh: -5\n", ("usd_per_kwh", "greater than or equal to 0")),
    ("grace nan", "stop_grace_s: .nan\n", ("stop_grace_s", "finite")),
    ("budget negative", "budget_monthly_usd: -1\n", ("budget_monthly_usd", "greater than or equal to 0")),
    ("store garbage", "default_store: garbage\n", ("default_store", "file:///absolute/path or s3://")),
    ("store ftp", "default_store: ftp://x/y\n", ("default_store", "file:///absolute/path or s3://")),
    ("limits negative", "provider_limits: {vast: -1}\n", ("provider_limits.vast", "greater than or equal to 0")),
    ("limits unknown provider", "provider_limits: {vasst: 2}\n", ("provider_limits", "did you mean 'vast'")),
    ("limits words", "provider_limits: {vast: many}\n", ("provider_limits.vast", "integer")),
    ("unknown setting", "pol_interval_s: 1\n", ("pol_interval_s", "did you mean 'poll_interval_s'")),
    ("not a mapping", "- a\n", ("must be a mapping",)),
    ("yaml broken", "poll_interval_s: [\n", ("not valid YAML",)),
    ("cpus zero", "ray_num_cpus: 0\n", ("ray_num_cpus", "greater than or equal to 1")),
    ("bad ray address", "ray_address: not an address\n", ("ray_address", "pattern")),
]


@pytest.mark.parametrize(("case", "text", "needles"), SETTING_CASES, ids=[c[0] for c in SETTING_CASES])
def test_a_bad_setting_is_refused_at_every_command(case, text, needles, home, capfd):
    home.mkdir(parents=True)
    (home / "config.yaml").write_text(text)
    for args in (("status",), ("submit", str(EXAMPLES / "qlora-tiny.yaml")), ("spend",)):
        code, out, err = cli(capfd, *args)
        assert code == 2, (args, code, err)
        assert "Traceback" not in out + err
        for needle in needles:
            assert needle in err, (args, needle, err)
        assert untouched(home)


def test_tunefleet_home_must_be_a_folder_we_can_write(tmp_path, monkeypatch, capfd):
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv("TUNEFLEET_HOME", str(afile))
    code, out, err = cli(capfd, "status")
    assert code == 2 and "is a file; point it at a folder" in err and "Traceback" not in err
    monkeypatch.setenv("TUNEFLEET_HOME", str(afile / "below"))
    code, out, err = cli(capfd, "status")
    assert code == 2 and "cannot create it" in err


# ---- arguments -----------------------------------------------------------------------------------
ARG_CASES: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    ("priority huge", ("submit", "{job}", "--priority", "-99999999999999999999"), ("--priority",)),
    ("priority words", ("submit", "{job}", "--priority", "high"), ("--priority",)),
    ("limit zero", ("status", "--limit", "0"), ("--limit",)),
    ("spend by month", ("spend", "--by", "month"), ("--by must be job, sweep, provider or day",)),
    ("max-seconds negative", ("daemon", "--max-seconds", "-1"), ("--max-seconds must be a positive",)),
    ("report into a missing folder", ("report", "--out", "{tmp}/no/such/dir/r.html"), ("does not exist",)),
    ("report onto a folder", ("report", "--out", "{tmp}"), ("is a folder",)),
    ("resume nan", ("resume", "{id}", "--max-usd", "nan"), ("--max-usd must be a finite",)),
    ("resume inf", ("resume", "{id}", "--max-usd", "inf"), ("--max-usd must be a finite",)),
    ("preempt attempt zero", ("preempt", "{id}", "--attempt", "0"), ("--attempt",)),
]


@pytest.mark.parametrize(("case", "args", "needles"), ARG_CASES, ids=[c[0] for c in ARG_CASES])
def test_a_bad_argument_is_one_line_and_changes_nothing(case, args, needles, tmp_path, home, capfd):
    from orchestrator.store import Store

    home.mkdir(parents=True)
    job_id = None
    if any("{id}" in a for a in args):
        with Store(home / "state.db") as store:
            job_id = store.submit(dict(BASE), name="stopped")
    before = _jobs(home)
    args = tuple(a.format(job=EXAMPLES / "qlora-tiny.yaml", tmp=tmp_path, id=job_id or "") for a in args)
    code, out, err = cli(capfd, *args)
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    for needle in needles:
        assert needle in err, (needle, err)
    assert _jobs(home) == before


def _jobs(home: Path) -> list:
    import sqlite3

    db = home / "state.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as c:
        return c.execute("SELECT id, state, spec_json, cost_usd FROM jobs ORDER BY id").fetchall()


# ---- generated inputs never produce a traceback ----------------------------------------------------
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["auto", "qlora", "lora", "s3://b/p", "file:///x", "1e23", "nan"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)
JOB_KEYS = sorted(set(BASE) | {"priority", "num_epochs", "lora_target_modules", "name", "bf16", "val_set_size"})
SECTION_KEYS = {"resources": ["gpus", "cpus", "device", "gpu_vram_gb"],
                "policy": ["max_usd", "max_usd_per_hour", "spot", "data", "providers", "deadline", "prefer_owned"],
                "checkpoint": ["store", "interval", "keep", "resume_from"]}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generated_job_files_give_a_spec_or_job_file_error_never_anything_else(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    (tmp / "data.jsonl").write_text(ALPACA)
    doc = json.loads(json.dumps(BASE))
    for _ in range(data.draw(st.integers(1, 4))):
        section = data.draw(st.sampled_from(["", *SECTION_KEYS]))
        if section:
            doc.setdefault(section, {})
            if isinstance(doc[section], dict):
                doc[section][data.draw(st.sampled_from(SECTION_KEYS[section]))] = data.draw(values)
        else:
            doc[data.draw(st.sampled_from(JOB_KEYS))] = data.draw(values)
    path = tmp / "job.yaml"
    try:
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    except yaml.YAMLError:
        return
    try:
        load_job_file(path, known_providers=("local", "vast"), now=0.0)
    except JobFileError as exc:
        assert exc.problems and all(p.message for p in exc.problems)


SETTING_KEYS = ["poll_interval_s", "stop_grace_s", "usd_per_kwh", "budget_monthly_usd", "default_store",
                "provider_limits", "ray_num_cpus", "max_failures", "time_scale", "owned_tolerance", "ray_address"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(st.sampled_from(SETTING_KEYS), values, max_size=4))
def test_generated_settings_give_a_config_or_config_error_never_anything_else(doc, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    try:
        (home / "config.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True))
    except yaml.YAMLError:
        return
    try:
        config = load_config(home)
    except ConfigError as exc:
        assert str(exc)
        return
    assert config.poll_interval_s > 0 and math.isfinite(config.stop_grace_s) and config.usd_per_kwh >= 0
    assert config.default_store.startswith(("file:///", "s3://"))


def test_no_setting_or_file_case_writes_anywhere_outside_the_home(tmp_path, home, capfd):
    """A bad default_store is refused before anything creates it (the old daemon made ./garbage)."""
    home.mkdir(parents=True)
    (home / "config.yaml").write_text("default_store: garbage\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code, _, err = cli(capfd, "daemon", "--until-idle", "--max-seconds", "5")
    finally:
        os.chdir(cwd)
    assert code == 2 and "default_store" in err
    assert not (tmp_path / "garbage").exists()


# ---- the small things a user met -----------------------------------------------------------------
def test_a_repeated_preempt_never_hits_the_next_attempt(tmp_path):
    from orchestrator.states import AttemptState, JobState
    from orchestrator.store import InvalidTransition, Store

    with Store(tmp_path / "state.db") as store:
        job_id = store.submit(dict(BASE), name="x")
        first = store.create_attempt(job_id, provider="local", offer_id="o", usd_per_hour=0.0, start_step=0)
        assert store.request_preempt(job_id, hard=False, seq=1).id == first.id
        store.transition_attempt(first.id, AttemptState.PREEMPTED, kind="x", message="preempted")
        store.transition_job(job_id, JobState.QUEUED, kind="requeued", message="again")
        store.create_attempt(job_id, provider="local", offer_id="o", usd_per_hour=0.0, start_step=10)
        with pytest.raises(InvalidTransition, match="attempt 1 .* is not running .attempt 2 is."):
            store.request_preempt(job_id, hard=False, seq=1)
        assert store.get_attempt(f"{job_id}.2").preempt_request is None


def test_logs_follow_waits_for_a_queued_job(tmp_path):
    import subprocess
    import time

    from orchestrator.store import Store

    home = tmp_path / "home"
    home.mkdir()
    with Store(home / "state.db") as store:
        job_id = store.submit(dict(BASE), name="queued")
    env = {**os.environ, "TUNEFLEET_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "logs", job_id, "--follow"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    assert proc.poll() is None  # still waiting for the first attempt, not "no attempt yet"
    with Store(home / "state.db") as store:
        store.request_cancel(job_id)
    out, err = proc.communicate(timeout=60)
    assert "waiting for its first attempt" in err and "Traceback" not in err
    assert proc.returncode == 1 and "has no attempt yet" in err  # the job ended before it ever ran


def test_a_sweep_over_its_trial_limit_is_refused_unless_raised(tmp_path, home, capfd):
    (tmp_path / "data.jsonl").write_text(ALPACA)
    (tmp_path / "base.yaml").write_text(job())
    grid = {"learning_rate": {"values": [1e-4 * (i + 1) for i in range(60)]},
            "lora_r": {"values": list(range(1, 61))}}
    sweep = {"name": "big", "base": "base.yaml", "search": grid, "budget_usd": 1.0}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    code, out, err = cli(capfd, "sweep", str(tmp_path / "sweep.yaml"))
    assert code == 2 and "3600 trials (the grid has 3600 combinations) is over max_trials 256" in err
    assert "raise max_trials" in err and untouched(home)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({**sweep, "trials": 5}))
    code, out, err = cli(capfd, "sweep", str(tmp_path / "sweep.yaml"), "--json")
    assert code == 0, err
    assert len(json.loads(_jobs_json(capfd, home))) == 5


def test_a_sampled_sweep_over_a_huge_grid_builds_only_its_trials():
    from orchestrator.sweep import SweepSpec, expand, trial_count

    values = list(range(10_000))  # 10^12 combinations: building the grid first would never finish
    sweep = SweepSpec.model_validate({"name": "huge", "base": "base.yaml", "budget_usd": 1.0, "trials": 4,
                                      "search": {k: {"values": values} for k in ("a", "b", "c")}})
    assert trial_count(sweep) == 4
    assert expand(sweep) == [{"a": 0, "b": 0, "c": c} for c in range(4)]  # itertools.product's order


def _jobs_json(capfd, home: Path) -> str:
    code, out, err = cli(capfd, "status", "--json")
    assert code == 0, err
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generated_job_files_through_the_cli_exit_0_or_2_without_a_traceback(data, tmp_path_factory, capfd):
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "data.jsonl").write_text(ALPACA)
    doc = json.loads(json.dumps(BASE))
    doc[data.draw(st.sampled_from(JOB_KEYS))] = data.draw(values)
    try:
        (tmp / "job.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True))
    except yaml.YAMLError:
        return
    old = os.environ.get("TUNEFLEET_HOME")
    os.environ["TUNEFLEET_HOME"] = str(tmp / "home")
    try:
        code, out, err = cli(capfd, "validate", str(tmp / "job.yaml"))
    finally:
        if old is None:
            os.environ.pop("TUNEFLEET_HOME", None)
        else:
            os.environ["TUNEFLEET_HOME"] = old
    assert code in (0, 2) and "Traceback" not in out + err and "internal error" not in err, err
