"""Tests for jobs.spec: the job file format and its all-problems-at-once loader."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.spec import (
    SUPPORTED_STORE_SCHEMES,
    Checkpoint,
    DatasetSpec,
    JobFileError,
    JobSpec,
    Policy,
    Problem,
    Resources,
    load_job_file,
    load_job_text,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def problems_of(text: str, base_dir: Path, **kwargs: object) -> list[Problem]:
    with pytest.raises(JobFileError) as info:
        load_job_text(textwrap.dedent(text), base_dir=base_dir, source_name="job.yaml", **kwargs)
    return info.value.problems


def by_loc(problems: list[Problem]) -> dict[str, Problem]:
    return {p.loc: p for p in problems}


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "hello"}\n')
    return tmp_path


MINIMAL = """\
base_model: tunefleet/tiny-llama
datasets:
  - path: data/train.jsonl
"""


# --- examples ------------------------------------------------------------------------------------


def test_qlora_example_loads_with_expected_values() -> None:
    spec = load_job_file(EXAMPLES / "qlora-tiny.yaml")
    assert spec.base_model == "tunefleet/tiny-llama"
    assert spec.adapter == "qlora" and spec.load_in_4bit and not spec.load_in_8bit
    assert (spec.lora_r, spec.lora_alpha, spec.lora_dropout) == (8, 16, 0.05)
    assert spec.lora_target_linear and spec.lora_target_modules is None
    assert spec.max_steps == 400 and spec.learning_rate == pytest.approx(1e-2)
    assert spec.seed == 7 and spec.micro_batch_size == 4 and spec.sequence_len == 128
    assert spec.save_every == 50
    (dataset,) = spec.datasets
    assert dataset.type == "alpaca"
    assert os.path.isabs(dataset.path) and Path(dataset.path).is_file()
    assert Path(dataset.path) == EXAMPLES / "data" / "alpaca-tiny.jsonl"
    assert spec.resources.gpus == 0 and spec.resources.device == "auto"
    assert spec.policy.max_usd == 1.0 and spec.policy.data == "restricted" and spec.policy.spot == "allow"
    assert spec.checkpoint.keep == 3 and spec.checkpoint.store is None
    assert spec.display_name == "tiny-llama-qlora"


def test_lora_chat_example_loads() -> None:
    spec = load_job_file(EXAMPLES / "lora-chat-tiny.yaml")
    assert spec.adapter == "lora" and not spec.load_in_4bit and not spec.load_in_8bit
    assert spec.max_steps == 30 and spec.save_every == 10 and spec.resources.gpus == 0
    (dataset,) = spec.datasets
    assert dataset.type == "chat_template" and dataset.text_field == "messages"
    assert Path(dataset.path).is_file()


@pytest.mark.parametrize(
    ("name", "rows", "keys"),
    [("alpaca-tiny.jsonl", 200, {"instruction", "input", "output"}), ("chat-tiny.jsonl", 100, {"messages"})],
)
def test_example_data_is_small_valid_jsonl(name: str, rows: int, keys: set[str]) -> None:
    lines = (EXAMPLES / "data" / name).read_text().splitlines()
    assert len(lines) == rows
    for line in lines:
        assert len(line) < 200
        record = json.loads(line)
        assert set(record) == keys
    if name.startswith("chat"):
        roles = [[m["role"] for m in json.loads(line)["messages"]] for line in lines]
        assert all(r == ["user", "assistant"] for r in roles)


# --- a good file ---------------------------------------------------------------------------------


def test_defaults_and_absolute_dataset_path(job_dir: Path) -> None:
    spec = load_job_text(MINIMAL, base_dir=job_dir, source_name="job.yaml")
    assert spec.datasets[0].path == str(job_dir / "data" / "train.jsonl")
    assert spec.adapter is None and spec.lr_scheduler == "cosine" and spec.bf16 == "auto"
    assert spec.resources == Resources() and spec.policy == Policy() and spec.checkpoint == Checkpoint()
    assert spec.save_every == 50
    assert spec.datasets[0].text_field == "text"


def test_check_files_false_keeps_relative_path(tmp_path: Path) -> None:
    spec = load_job_text(MINIMAL, base_dir=tmp_path, source_name="job.yaml", check_files=False)
    assert spec.datasets[0].path == "data/train.jsonl"


def test_load_job_file_resolves_relative_to_the_file_not_cwd(job_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = job_dir / "job.yaml"
    job.write_text(MINIMAL)
    monkeypatch.chdir(REPO)
    spec = load_job_file(job)
    assert spec.datasets[0].path == str(job_dir / "data" / "train.jsonl")


def test_deadline_naive_is_utc_and_aware_is_converted(job_dir: Path) -> None:
    naive = load_job_text(MINIMAL + "policy: {deadline: '2026-03-01T12:00:00'}\n", base_dir=job_dir)
    assert naive.policy.deadline == datetime(2026, 3, 1, 12, tzinfo=timezone.utc)
    aware = load_job_text(MINIMAL + "policy: {deadline: '2026-03-01T12:00:00+02:00'}\n", base_dir=job_dir)
    assert aware.policy.deadline == datetime(2026, 3, 1, 10, tzinfo=timezone.utc)
    assert aware.policy.deadline.utcoffset().total_seconds() == 0


@pytest.mark.parametrize(
    ("extra", "expected"),
    [("", 50), ("save_steps: 7\n", 7), ("checkpoint: {interval: 9}\n", 9), ("save_steps: 5\ncheckpoint: {interval: 5}\n", 5)],
)
def test_save_every(job_dir: Path, extra: str, expected: int) -> None:
    assert load_job_text(MINIMAL + extra, base_dir=job_dir).save_every == expected


def test_display_name_prefers_name(job_dir: Path) -> None:
    assert load_job_text(MINIMAL + "name: my-run_1.0\n", base_dir=job_dir).display_name == "my-run_1.0"
    assert load_job_text(MINIMAL, base_dir=job_dir).display_name == "tiny-llama-full"


def test_round_trip_through_payload_dict(job_dir: Path) -> None:
    text = MINIMAL + textwrap.dedent(
        """\
        adapter: lora
        lora_target_modules: [q_proj, v_proj]
        bf16: false
        policy: {deadline: '2026-03-01T12:00:00', providers: [local, vast], max_usd_per_hour: 0.5}
        resources: {gpus: 2, gpu_vram_gb: 24}
        checkpoint: {store: 's3://bucket/prefix', interval: 25}
        """
    )
    spec = load_job_text(text, base_dir=job_dir)
    payload = spec.to_payload_dict()
    assert json.loads(json.dumps(payload)) == payload  # JSON-safe
    assert payload["policy"]["deadline"].startswith("2026-03-01T12:00:00")
    again = JobSpec.from_payload_dict(payload)
    assert again == spec
    assert again.policy.deadline == spec.policy.deadline and again.resources.gpu_vram_gb == 24.0


def test_example_round_trips() -> None:
    spec = load_job_file(EXAMPLES / "qlora-tiny.yaml")
    assert JobSpec.from_payload_dict(json.loads(json.dumps(spec.to_payload_dict()))) == spec


def test_models_enforce_rules_when_built_directly() -> None:
    with pytest.raises(ValueError, match="qlora needs load_in_4bit: true"):
        JobSpec(base_model="x", adapter="qlora", datasets=[DatasetSpec(path="a.jsonl")])
    with pytest.raises(ValueError, match="unknown storage scheme 'gs'"):
        Checkpoint(store="gs://bucket")


def test_import_is_light() -> None:
    code = "import sys, jobs.spec; bad = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- syntax and shape ----------------------------------------------------------------------------


def test_malformed_yaml_is_one_problem_with_its_line(job_dir: Path) -> None:
    text = "base_model: x\ndatasets:\n  - path: a.jsonl\n   type: alpaca\nlora_r: 8\n"
    (problem,) = problems_of(text, job_dir)
    assert problem.line == 4
    assert problem.loc == "" and "invalid YAML" in problem.message


def test_unclosed_bracket_line(job_dir: Path) -> None:
    (problem,) = problems_of("base_model: x\nlora_r: 8\ndatasets: [{path: a.jsonl}\n", job_dir)
    assert problem.line is not None and problem.line >= 3


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n", "just words\n", "42\n", "{}\n"])
def test_not_a_mapping(job_dir: Path, text: str) -> None:
    (problem,) = problems_of(text, job_dir)
    assert "a job file is a YAML mapping" in problem.message


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(JobFileError) as info:
        load_job_file(tmp_path / "nope.yaml")
    assert len(info.value.problems) == 1 and "not found" in info.value.problems[0].message
    with pytest.raises(JobFileError) as info:
        load_job_file(tmp_path)
    assert len(info.value.problems) == 1


def test_not_utf8(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_bytes(b"base_model: x\nname: \xff\xfe\n")
    with pytest.raises(JobFileError) as info:
        load_job_file(job)
    (problem,) = info.value.problems
    assert problem.line == 2 and "UTF-8" in problem.message


@pytest.mark.parametrize("text", ["policy: {deadline: 2026-13-45}\n", "lora_r: !!int abc\n", "x: !!python/object:os.system y\n"])
def test_yaml_values_that_cannot_be_built(job_dir: Path, text: str) -> None:
    (problem,) = problems_of(MINIMAL + text, job_dir)
    assert problem.message.startswith("invalid YAML")


def test_braces_in_values_are_shown_literally(job_dir: Path) -> None:
    (problem,) = problems_of(MINIMAL + "checkpoint: {store: 'ftp://{bucket}'}\n", job_dir)
    assert "'ftp://{bucket}'" in problem.message


def test_duplicate_key_is_reported(job_dir: Path) -> None:
    problems = problems_of(MINIMAL + "lora_r: 4\nlora_r: 16\n", job_dir)
    assert [(p.loc, p.line) for p in problems] == [("lora_r", 5)]
    assert "first on line 4" in problems[0].message


def test_alias_bomb_is_refused_quickly(job_dir: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    (problem,) = problems_of("\n".join(lines) + "\n", job_dir)
    assert "expands to more than" in problem.message


# --- field problems ------------------------------------------------------------------------------


def test_unknown_keys_top_level_and_nested_suggest_and_point_at_line(job_dir: Path) -> None:
    text = MINIMAL + textwrap.dedent(
        """\
        lora_rr: 8
        policy:
          max_usd_perhour: 2
        resources:
          gpuss: 1
        wandb_project: foo
        """
    )
    problems = by_loc(problems_of(text, job_dir))
    assert problems["lora_rr"].message == "unknown key 'lora_rr' (did you mean 'lora_r'?)"
    assert problems["lora_rr"].line == 4
    assert problems["policy.max_usd_perhour"].message == (
        "unknown key 'max_usd_perhour' (did you mean 'max_usd_per_hour'?)"
    )
    assert problems["policy.max_usd_perhour"].line == 6
    assert "did you mean 'gpus'?" in problems["resources.gpuss"].message
    assert problems["resources.gpuss"].line == 8
    assert problems["wandb_project"].message == "unknown key 'wandb_project'"
    assert len(problems) == 4


def test_unknown_key_in_dataset_entry(job_dir: Path) -> None:
    text = "base_model: x\ndatasets:\n  - path: data/train.jsonl\n    feild: body\n"
    (problem,) = problems_of(text, job_dir)
    assert problem.loc == "datasets[0].feild" and problem.line == 4
    assert problem.message == "unknown key 'feild' (did you mean 'field'?)"


def test_wrong_types(job_dir: Path) -> None:
    text = MINIMAL + textwrap.dedent(
        """\
        lora_r: eight
        load_in_4bit: [true]
        policy: cheap
        resources: {gpu_vram_gb: lots, gpus: 1.5}
        bf16: sometimes
        """
    )
    problems = by_loc(problems_of(text, job_dir))
    assert set(problems) == {"lora_r", "load_in_4bit", "policy", "resources.gpu_vram_gb", "resources.gpus", "bf16"}
    assert "valid integer" in problems["lora_r"].message and problems["lora_r"].line == 4
    assert problems["resources.gpu_vram_gb"].line == 7
    assert "'auto'" in problems["bf16"].message


def test_impossible_values(job_dir: Path) -> None:
    text = MINIMAL + "learning_rate: -0.001\nlora_r: 0\nlora_dropout: 1.0\nsequence_len: 4\nresources: {gpus: 65}\n"
    problems = by_loc(problems_of(text, job_dir))
    assert set(problems) == {"learning_rate", "lora_r", "lora_dropout", "sequence_len", "resources.gpus"}
    assert "greater than 0" in problems["learning_rate"].message and problems["learning_rate"].line == 4
    assert problems["lora_r"].line == 5


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_nan_and_inf_are_refused(job_dir: Path, value: str) -> None:
    problems = by_loc(problems_of(MINIMAL + f"learning_rate: {value}\nweight_decay: {value}\n", job_dir))
    assert set(problems) == {"learning_rate", "weight_decay"}


def test_bad_name(job_dir: Path) -> None:
    (problem,) = problems_of(MINIMAL + "name: 'my job!'\n", job_dir)
    assert problem.loc == "name" and "1-64 characters" in problem.message


def test_missing_required_keys(job_dir: Path) -> None:
    problems = by_loc(problems_of("lora_r: 8\ndatasets:\n  - type: alpaca\n", job_dir))
    assert set(problems) == {"base_model", "datasets[0].path"}
    assert problems["base_model"].line is None
    assert problems["datasets[0].path"].line == 3  # the entry that lacks it


# --- cross-field rules ---------------------------------------------------------------------------


def test_qlora_without_4bit(job_dir: Path) -> None:
    (problem,) = problems_of(MINIMAL + "adapter: qlora\n", job_dir)
    assert problem.loc == "adapter" and problem.line == 4
    assert problem.message.startswith("qlora needs load_in_4bit: true")
    assert "adapter: qlora needs load_in_4bit: true" in problem.render("job.yaml")


@pytest.mark.parametrize(
    ("extra", "locs"),
    [
        ("load_in_4bit: true\n", {"load_in_4bit"}),  # quantized full fine-tune
        ("load_in_8bit: true\n", {"load_in_8bit"}),
        ("adapter: lora\nload_in_4bit: true\n", {"adapter"}),  # that is qlora
        ("adapter: qlora\nload_in_4bit: true\nload_in_8bit: true\n", {"load_in_8bit"}),
        ("adapter: lora\nlora_target_modules: [q_proj]\nlora_target_linear: true\n", {"lora_target_linear"}),
        ("max_steps: 10\nwarmup_steps: 11\n", {"warmup_steps"}),
    ],
)
def test_cross_field_rules(job_dir: Path, extra: str, locs: set[str]) -> None:
    assert {p.loc for p in problems_of(MINIMAL + extra, job_dir)} == locs


@pytest.mark.parametrize(
    "extra",
    [
        "adapter: qlora\nload_in_4bit: true\n",
        "adapter: lora\nload_in_8bit: true\n",
        "lora_target_modules: [q_proj]\nlora_target_linear: true\nlora_r: 64\n",  # ignored without adapter
        "max_steps: 10\nwarmup_steps: 10\n",
        "policy: {spot: only, data: restricted}\n",
    ],
)
def test_allowed_combinations(job_dir: Path, extra: str) -> None:
    spec = load_job_text(MINIMAL + extra, base_dir=job_dir)  # raises JobFileError if refused
    assert isinstance(spec, JobSpec) and spec.base_model == "tunefleet/tiny-llama"
    assert Path(spec.datasets[0].path) == job_dir / "data" / "train.jsonl"


def test_save_steps_and_interval_conflict(job_dir: Path) -> None:
    (problem,) = problems_of(MINIMAL + "save_steps: 10\ncheckpoint:\n  interval: 20\n", job_dir)
    assert problem.loc == "save_steps" and problem.line == 4
    assert problem.message == "save_steps and checkpoint.interval disagree (10 vs 20): give one"


def test_eval_datasets_are_checked_like_datasets_and_exclude_val_set_size(job_dir: Path) -> None:
    (job_dir / "data" / "eval.jsonl").write_text('{"text": "held out"}\n')
    spec = load_job_text(MINIMAL + "eval_datasets:\n  - path: data/eval.jsonl\n", base_dir=job_dir)
    assert spec.eval_datasets[0].path == str(job_dir / "data" / "eval.jsonl")  # made absolute, like datasets
    problems = by_loc(problems_of(MINIMAL + "val_set_size: 0.1\neval_datasets:\n  - path: data/missing.jsonl\n"
                                  "  - path: data/eval.jsonl\n    type: alpaca\n", job_dir))
    assert "dataset file not found: data/missing.jsonl" in problems["eval_datasets[0].path"].message
    assert "needs non-empty strings ['instruction', 'output'] for type alpaca" in problems["eval_datasets[1].path"].message
    assert "eval_datasets and val_set_size both choose the eval data: give one" in problems["eval_datasets"].message


def test_cross_field_rule_reported_alongside_field_errors(job_dir: Path) -> None:
    problems = by_loc(problems_of(MINIMAL + "adapter: qlora\nlearning_rate: -1\n", job_dir))
    assert set(problems) == {"adapter", "learning_rate"}


def test_rule_skipped_when_its_input_is_itself_invalid(job_dir: Path) -> None:
    # load_in_4bit is junk: report that, not a guess about qlora.
    problems = problems_of(MINIMAL + "adapter: qlora\nload_in_4bit: perhaps\n", job_dir)
    assert [p.loc for p in problems] == ["load_in_4bit"]


# --- files and stores ----------------------------------------------------------------------------


def test_missing_dataset_file(job_dir: Path) -> None:
    text = "base_model: x\ndatasets:\n  - path: data/train.jsonl\n  - path: data/x.jsonl\n"
    (problem,) = problems_of(text, job_dir)
    assert problem.loc == "datasets[1].path" and problem.line == 4
    expected = f"dataset file not found: data/x.jsonl (looked in {job_dir / 'data' / 'x.jsonl'})"
    assert problem.message == expected
    assert str(JobFileError("job.yaml", [problem])) == f"job.yaml:4: datasets[1].path: {expected}"


@pytest.mark.parametrize(
    "path", ["s3://bucket/train.jsonl", "hf://datasets/x/y", "tatsu-lab/alpaca", "https://x.org/a.jsonl"]
)
def test_remote_datasets_are_not_supported(job_dir: Path, path: str) -> None:
    (problem,) = problems_of(f"base_model: x\ndatasets: [{{path: '{path}'}}]\n", job_dir)
    assert problem.loc == "datasets[0].path"
    assert "only local JSONL datasets are supported for now" in problem.message


def test_dataset_must_be_jsonl_or_json(job_dir: Path) -> None:
    (job_dir / "data" / "train.csv").write_text("a,b\n")
    (problem,) = problems_of("base_model: x\ndatasets: [{path: data/train.csv}]\n", job_dir)
    assert ".jsonl or .json" in problem.message


def test_local_base_model_must_exist(job_dir: Path) -> None:
    (problem,) = problems_of(MINIMAL.replace("tunefleet/tiny-llama", "./models/mine"), job_dir)
    assert problem.loc == "base_model" and "not found" in problem.message and problem.line == 1
    (job_dir / "models" / "mine").mkdir(parents=True)
    spec = load_job_text(MINIMAL.replace("tunefleet/tiny-llama", "./models/mine"), base_dir=job_dir)
    assert spec.base_model == str(job_dir / "models" / "mine")


@pytest.mark.parametrize("store", ["ftp://x", "gs://bucket/p", "bare-words"])
def test_unknown_store_scheme(job_dir: Path, store: str) -> None:
    (problem,) = problems_of(MINIMAL + f"checkpoint:\n  store: '{store}'\n", job_dir)
    assert problem.loc == "checkpoint.store" and problem.line == 5
    assert "file:///path or s3://bucket/prefix" in problem.message


def test_store_scheme_message_names_the_scheme(job_dir: Path) -> None:
    (problem,) = problems_of(MINIMAL + "checkpoint: {store: 'ftp://x'}\n", job_dir)
    assert problem.message == "unknown storage scheme 'ftp' in 'ftp://x' (use file:///path or s3://bucket/prefix)"


def test_stores(job_dir: Path) -> None:
    assert SUPPORTED_STORE_SCHEMES == ("file", "s3")
    (problem,) = problems_of(MINIMAL + "checkpoint: {store: 's3://'}\n", job_dir)
    assert "bucket" in problem.message
    for good in ("s3://bucket", "s3://bucket/some/prefix", "file:///tmp/ckpt"):
        assert load_job_text(MINIMAL + f"checkpoint: {{store: '{good}'}}\n", base_dir=job_dir).checkpoint.store == good


# --- everything at once --------------------------------------------------------------------------


def test_every_problem_reported_at_once(job_dir: Path) -> None:
    text = textwrap.dedent(
        """\
        base_model: tunefleet/tiny-llama
        adapter: qlora
        lora_rr: 8
        learning_rate: -0.1
        datasets:
          - path: data/missing.jsonl
            type: alpacca
        policy:
          spot: sometimes
        checkpoint:
          store: ftp://x
          interval: 20
        save_steps: 10
        """
    )
    problems = problems_of(text, job_dir)
    expected = {
        "adapter": 2,
        "lora_rr": 3,
        "learning_rate": 4,
        "datasets[0].path": 6,
        "datasets[0].type": 7,
        "policy.spot": 9,
        "checkpoint.store": 11,
        "save_steps": 13,
    }
    assert {p.loc: p.line for p in problems} == expected
    assert len(problems) == len(expected)
    assert [p.line for p in problems] == sorted(expected.values())  # in file order
    rendered = str(JobFileError("job.yaml", problems)).splitlines()
    assert len(rendered) == len(expected)
    assert "job.yaml:9: policy.spot: Input should be 'allow', 'never' or 'only'" in rendered[5]


# --- never anything but JobFileError -------------------------------------------------------------

KEYS = sorted(JobSpec.model_fields)
SECTION_KEYS = {
    "resources": sorted(Resources.model_fields),
    "policy": sorted(Policy.model_fields),
    "checkpoint": sorted(Checkpoint.model_fields),
}
DATASET_KEYS = sorted(DatasetSpec.model_fields)

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**20, max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["auto", "qlora", "lora", "s3://b/p", "ftp://x", "data/train.jsonl", "2026-01-01", "~"])
)
junk = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10) | st.integers() | st.none(), children, max_size=4),
    max_leaves=15,
)
section = st.one_of(
    *[st.dictionaries(st.sampled_from(keys), junk, max_size=4) for keys in SECTION_KEYS.values()]
)
dataset_entry = st.dictionaries(st.sampled_from(DATASET_KEYS), junk, max_size=3) | st.just(
    {"path": "data/train.jsonl"}
)
realistic = st.fixed_dictionaries(
    {"base_model": st.just("tunefleet/tiny-llama") | junk, "datasets": st.lists(dataset_entry, max_size=2) | junk},
    optional={
        **{k: junk for k in KEYS if k not in ("base_model", "datasets")},
        **{k: section for k in SECTION_KEYS},
    },
)
plausible = (
    st.booleans()
    | st.integers(min_value=-2, max_value=100)
    | st.floats(min_value=-0.5, max_value=2.0)
    | st.sampled_from(["auto", "qlora", "lora", "cosine", "adamw_torch", "restricted", "only", None])
)
# A valid job with a few keys changed: reaches the success path and the cross-field rules.
VALID = {"base_model": "tunefleet/tiny-llama", "datasets": [{"path": "data/train.jsonl"}]}
near_valid = st.builds(
    lambda top, ckpt: {**VALID, **top, **({"checkpoint": ckpt} if ckpt else {})},
    st.dictionaries(st.sampled_from([k for k in KEYS if k not in VALID and k != "name"]), plausible, max_size=3),
    st.dictionaries(st.sampled_from(["interval", "keep"]), plausible, max_size=2),
)
documents = realistic | junk | near_valid


def assert_only_job_file_errors(text: str, base_dir: Path, check_files: bool) -> None:
    try:
        spec = load_job_text(text, base_dir=base_dir, source_name="fuzz.yaml", check_files=check_files)
    except JobFileError as err:
        assert err.problems
        for problem in err.problems:
            assert isinstance(problem.loc, str)
            assert isinstance(problem.message, str) and problem.message
            assert problem.line is None or (isinstance(problem.line, int) and problem.line >= 1)
            assert not problem.message.startswith("internal error"), problem
        assert str(err)
    else:
        assert isinstance(spec, JobSpec)
        assert JobSpec.from_payload_dict(spec.to_payload_dict()) == spec


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(doc=documents, check_files=st.booleans())
def test_fuzz_documents_only_raise_job_file_error(job_dir: Path, doc: object, check_files: bool) -> None:
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except (yaml.YAMLError, ValueError):  # e.g. keys yaml cannot represent
        return
    assert_only_job_file_errors(text, job_dir, check_files)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200) | st.text(alphabet=":-[]{}&*!|>'\"#%@` \n\tab01.", max_size=200))
def test_fuzz_raw_text_only_raises_job_file_error(job_dir: Path, text: str) -> None:
    assert_only_job_file_errors(text, job_dir, check_files=True)


def test_valid_documents_do_load(job_dir: Path) -> None:
    """Guard for the fuzz test: its happy path is reachable, so it checks more than errors."""
    doc = {"base_model": "tunefleet/tiny-llama", "datasets": [{"path": "data/train.jsonl"}], "bf16": True}
    spec = load_job_text(yaml.safe_dump(doc), base_dir=job_dir)
    assert spec.bf16 is True and not math.isnan(spec.learning_rate)


def test_one_node_is_accepted_and_more_are_refused_with_the_way_out(job_dir: Path) -> None:
    one = load_job_text(MINIMAL + "resources:\n  gpus: 4\n  nodes: 1\n", base_dir=job_dir, source_name="job.yaml")
    assert one.resources.gpus == 4 and "nodes" not in one.to_payload_dict()["resources"]  # not in the payload
    problem = by_loc(problems_of(MINIMAL + "resources:\n  nodes: 2\n", job_dir))["resources.nodes"]
    assert "multi-node training is not supported yet" in problem.message and "resources.gpus" in problem.message
