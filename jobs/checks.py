"""Checks of what a job file points at, before anything is queued: dataset contents, LoRA target
modules. Stdlib only (the CLI runs them on every ``validate`` and ``submit``).

Why here: without them, an empty dataset, a line that is not JSON, a row without the format's
fields, a chat with an unknown role or a typo in ``lora_target_modules`` is found by the payload,
after a model load or a paid GPU boot. Everything found is reported at once, by file and line.

Lengths: for the built-in tiny model (a byte-level tokenizer) token counts are exact; for other
models they are estimated at 4 characters per token (no tokenizer is downloaded to validate a
file), and the messages say so.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

MAX_PROBLEMS = 10  # per dataset file; the rest are counted
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
DROP_ERROR_FRACTION = 0.5  # more than this share of examples with nothing to train on is an error
ALPACA_PROMPT_TOKENS = 8  # "### Instruction:\n...### Response:\n" markers, roughly, in any tokenizer

# LoRA target module names per architecture (model_type in config.json), as transformers names them.
_MODULES = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3", "gate"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "falcon": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
}
_ALWAYS = ("lm_head", "embed_tokens")


@dataclass
class DatasetReport:
    """What reading one dataset file found."""

    rows: int = 0
    problems: list[str] = field(default_factory=list)  # "line N: ..." (at most MAX_PROBLEMS)
    more_problems: int = 0
    truncated: int = 0  # longer than sequence_len: cut, still trained
    dropped: int = 0  # prompt alone fills sequence_len: nothing left to train on, dropped
    exact: bool = True  # token counts exact (byte-level tokenizer) or estimated

    def problem(self, message: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)
        else:
            self.more_problems += 1


def _tokens(text: str, exact: bool) -> int:
    if exact:
        return len(text.encode("utf-8"))
    return math.ceil(len(text) / 4)


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def check_dataset(path: str, kind: str, text_field: str, sequence_len: int, *, exact_tokens: bool,
                  max_bytes: int = 10 * 2**30) -> DatasetReport:
    """Read every line of a JSONL dataset and check it against its format (see the module doc)."""
    report = DatasetReport(exact=exact_tokens)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        report.problem(f"cannot read it: {exc}")
        return report
    if size > max_bytes:
        report.problem(f"it is {size / 2**30:.1f} GiB; datasets are at most {max_bytes / 2**30:.0f} GiB")
        return report
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                _check_row(report, n, line, kind, text_field, sequence_len)
    except UnicodeDecodeError as exc:
        report.problem(f"is not UTF-8 text ({exc.reason} at byte {exc.start})")
    except OSError as exc:
        report.problem(f"cannot read it: {exc}")
    if report.rows == 0 and not report.problems:
        report.problem("has no examples (every line is empty)")
    return report


def _check_row(report: DatasetReport, n: int, line: str, kind: str, text_field: str, sequence_len: int) -> None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        report.problem(f"line {n}: not valid JSON ({exc.msg})")
        return
    if not isinstance(row, dict):
        report.problem(f"line {n}: each line must be a JSON object, not {type(row).__name__}")
        return
    report.rows += 1
    exact = report.exact
    budget = sequence_len - 2  # bos and eos
    if kind == "completion":
        if not _text(row.get(text_field)):
            report.problem(f"line {n}: needs a non-empty string {text_field!r} for type completion"
                           + (f" (it has {sorted(row)[:5]})" if row else ""))
            return
        if _tokens(row[text_field], exact) > budget:
            report.truncated += 1
    elif kind == "alpaca":
        missing = [k for k in ("instruction", "output") if not _text(row.get(k))]
        if missing or ("input" in row and not isinstance(row["input"], str)):
            what = f"non-empty strings {missing}" if missing else "a string 'input' (or none)"
            report.problem(f"line {n}: needs {what} for type alpaca")
            return
        prompt = _tokens(row["instruction"] + (row.get("input") or ""), exact) + ALPACA_PROMPT_TOKENS
        if prompt >= budget:
            report.dropped += 1
        elif prompt + _tokens(row["output"], exact) > budget:
            report.truncated += 1
    elif kind == "chat_template":
        messages = row.get(text_field)
        why = _chat_problem(messages, text_field)
        if why:
            report.problem(f"line {n}: {why}")
            return
        before = 0
        for m in messages:
            if m["role"] == "assistant":
                break
            before += _tokens(m["content"], exact) + 4  # role markers
        total = sum(_tokens(m["content"], exact) + 4 for m in messages)
        if before >= budget:
            report.dropped += 1
        elif total > budget:
            report.truncated += 1


def _chat_problem(messages: Any, text_field: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"needs a non-empty list {text_field!r} of messages for type chat_template"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"{text_field}[{i}] needs 'role' and 'content'"
        if m["role"] not in CHAT_ROLES:
            return f"{text_field}[{i}].role {m['role']!r} is not one of {', '.join(sorted(CHAT_ROLES))}"
        if not isinstance(m["content"], str):
            return f"{text_field}[{i}].content must be a string"
    if not any(m["role"] == "assistant" for m in messages):
        return "has no assistant turn: nothing to train on"
    return None


def length_verdict(report: DatasetReport, sequence_len: int) -> tuple[str | None, str | None]:
    """(error, warning) about examples too long for ``sequence_len``."""
    how = "" if report.exact else " (estimated at 4 characters per token)"
    error = warning = None
    if report.rows and report.dropped > DROP_ERROR_FRACTION * report.rows:
        error = (f"{report.dropped} of {report.rows} examples would be dropped: their prompt alone fills "
                 f"sequence_len {sequence_len}{how}; raise sequence_len or shorten them")
    elif report.dropped:
        warning = (f"{report.dropped} of {report.rows} examples will be dropped (their prompt alone fills "
                   f"sequence_len {sequence_len}{how})")
    if report.truncated:
        note = (f"{report.truncated} of {report.rows} examples are longer than sequence_len {sequence_len}{how} "
                "and will be cut")
        warning = f"{warning}; {note}" if warning else note
    return error, warning


def known_modules(base_model: str, builtin: str) -> tuple[str, tuple[str, ...]] | None:
    """(architecture, module names LoRA can target) when they can be known without a download:
    the built-in model, or a local folder (or the Hugging Face cache) with a config.json."""
    if base_model == builtin:
        return "llama", _MODULES["llama"]
    candidates = []
    if os.path.isdir(base_model):
        candidates.append(os.path.join(base_model, "config.json"))
    elif "/" in base_model:
        hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub")
        snapshots = os.path.join(hub, "models--" + base_model.replace("/", "--"), "snapshots")
        if os.path.isdir(snapshots):
            candidates += [os.path.join(snapshots, d, "config.json") for d in sorted(os.listdir(snapshots))]
    for path in candidates:
        try:
            with open(path, encoding="utf-8") as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError, AttributeError):
            continue
        if model_type in _MODULES:
            return model_type, _MODULES[model_type]
    return None


def unknown_modules(modules: list[str], known: tuple[str, ...]) -> list[str]:
    return [m for m in modules if m not in known and m not in _ALWAYS]
