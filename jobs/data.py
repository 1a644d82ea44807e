"""Local JSONL datasets turned into token ids, deterministically.

Why pre-tokenize here rather than let the trainer do it: exact resume needs the same examples in
the same order on every attempt, on every machine. Tokenizing once, in a fixed order, with a fixed
split seed, gives that; the trainer then only shuffles with its own (checkpointed) RNG.

Formats (``datasets: [{path, type}]``):
- ``completion``: ``{"text": ...}`` (or ``field``); loss on every token.
- ``alpaca``: ``{"instruction", "input"?, "output"}``; loss on the output only.
- ``chat_template``: ``{"messages": [{"role", "content"}, ...]}`` (or ``field``); loss on the
  assistant turns only, rendered with the tokenizer's chat template.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    completion_mask: list[int]  # 1 where the loss counts

    @property
    def trained_tokens(self) -> int:
        return sum(self.completion_mask)


ALPACA_PROMPT = "### Instruction:\n{instruction}\n{input_block}### Response:\n"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{n}: each line must be a JSON object")
            rows.append(row)
    if not rows:
        raise DatasetError(f"{path}: no examples")
    return rows


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _example(pieces: list[tuple[list[int], int]], bos: int | None, eos: int | None, max_len: int) -> Example:
    ids: list[int] = [bos] if bos is not None else []
    mask: list[int] = [0] if bos is not None else []
    for toks, trained in pieces:
        ids += toks
        mask += [trained] * len(toks)
    if eos is not None:
        ids.append(eos)
        mask.append(1)
    return Example(ids[:max_len], mask[:max_len])


def prompt_text(kind: str, text: str, tokenizer) -> str:
    """A bare prompt in the format the model was trained on (the job's dataset type), ready for the
    model to continue with its answer."""
    if kind == "alpaca":
        return ALPACA_PROMPT.format(instruction=text, input_block="")
    if kind == "chat_template":
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


def tokenize_rows(rows: list[dict[str, Any]], kind: str, tokenizer, max_len: int, field: str | None, where: str) -> list[Example]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = []
    for n, row in enumerate(rows, 1):
        try:
            if kind == "completion":
                text = row[field or "text"]
                out.append(_example([(_encode(tokenizer, str(text)), 1)], bos, eos, max_len))
            elif kind == "alpaca":
                inp = row.get("input") or ""
                prompt = ALPACA_PROMPT.format(
                    instruction=row["instruction"], input_block=f"{inp}\n" if inp else ""
                )
                out.append(
                    _example(
                        [(_encode(tokenizer, prompt), 0), (_encode(tokenizer, str(row["output"])), 1)],
                        bos, eos, max_len,
                    )
                )
            elif kind == "chat_template":
                messages = row[field or "messages"]
                pieces = []
                for m in messages:
                    rendered = tokenizer.apply_chat_template([m], tokenize=False)
                    pieces.append((_encode(tokenizer, rendered), 1 if m["role"] == "assistant" else 0))
                out.append(_example(pieces, bos, None, max_len))
            else:
                raise DatasetError(f"{where}: unknown dataset type {kind!r}")
        except (KeyError, TypeError) as exc:
            raise DatasetError(f"{where} line {n}: missing or malformed field {exc} for type {kind}") from None
    return out


def load_examples(datasets: list[dict[str, Any]], tokenizer, max_len: int) -> tuple[list[Example], int]:
    """All examples with at least one trained token, and how many were dropped for having none
    (their response was cut off by ``sequence_len``)."""
    examples: list[Example] = []
    for ds in datasets:
        path = Path(ds["path"])
        rows = read_jsonl(path)
        examples += tokenize_rows(rows, ds.get("type", "completion"), tokenizer, max_len, ds.get("field"), str(path))
    kept = [e for e in examples if e.trained_tokens > 0]
    if not kept:
        raise DatasetError("no example has any token to train on (is sequence_len too short?)")
    return kept, len(examples) - len(kept)


def split(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A fixed train/eval split: same seed, same split, on every attempt."""
    if val_fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(examples) * val_fraction)))
    val_idx = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    val = [e for i, e in enumerate(examples) if i in val_idx]
    return train, val
