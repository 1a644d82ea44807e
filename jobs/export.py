"""A trained adapter as something a server loads: a PEFT adapter folder, or the merged model.

Why here (``jobs/``): it loads the base model and the adapter the way the payload trained them
(``jobs.train.load_model_and_tokenizer``'s sources), and nothing about providers. The CLI
(``tunefleet export``) downloads the verified final adapter first and hands its folder to
``export``.

- Without ``merge``: the adapter folder as PEFT writes it (``adapter_config.json``,
  ``adapter_model.safetensors``) with the tokenizer, which vLLM serves as a LoRA
  (``--enable-lora --lora-modules name=DIR``) next to the base model.
- With ``merge``: the base model loaded in full precision (a QLoRA adapter trained on a 4-bit base
  is merged into the unquantized weights), the adapter merged into it (``merge_and_unload``), saved
  as a standard Hugging Face folder (safetensors, config, tokenizer) in ``dtype``, which vLLM, TGI
  and transformers load as they are.
- A full fine-tune's final folder is already a model: it is copied (``merge`` changes nothing).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

DTYPES = ("bf16", "fp16", "fp32")
_TRAINING_META = "tunefleet_training.json"


class ExportError(Exception):
    """The adapter cannot be exported as asked (what is wrong and how to fix it)."""


def base_source(base_model: str) -> str:
    """Where the base model's weights are read from: the built-in tiny model, a local folder, or a
    Hugging Face id (from the local cache, or downloaded)."""
    from jobs.tiny import TINY_MODEL_ID, tiny_model_dir

    return str(tiny_model_dir()) if base_model == TINY_MODEL_ID else base_model


def trained_base(spec: dict[str, Any], store) -> str:
    """Where to read the base weights a job (its queued ``spec``) trained on, for a merge or an eval.

    A local model folder was staged to the job's store at submit, content-addressed
    (``jobs.inputs``), and the payload trained on that copy. So: the user's folder when it still
    holds exactly those files (nothing to download), else the verified staged copy from ``store``.
    Reading the folder by its name alone would fail once it is deleted (which submit allows) and,
    worse, would silently merge the adapter into other weights once it is overwritten. A Hub id or
    the tiny model: :func:`base_source`. Raises ExportError when neither copy can be had."""
    from jobs.inputs import InputError, listing, materialize

    base = spec["base_model"]
    staged = (spec.get("inputs") or {}).get(base)
    if not staged:
        return base_source(base)
    try:
        if Path(base).is_dir() and listing(Path(base))[0] == staged["sha256"]:
            return base
    except (OSError, InputError):
        pass  # unreadable here: the staged copy it is
    try:
        return materialize({"base_model": base, "inputs": {base: staged}}, store)["base_model"]
    except InputError as exc:
        raise ExportError(f"the base model the job trained on ({base}, staged at submit) cannot be read: {exc}; "
                          "export without --merge for the adapter alone") from None


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def export(adapter_dir: Path, out_dir: Path, *, base_model: str, merge: bool, dtype: str = "bf16",
           source: str | None = None) -> dict[str, Any]:
    """Write the export of ``adapter_dir`` (a verified final folder) into ``out_dir`` (must not exist).

    ``base_model`` is the base as the job names it (what the adapter's config says it goes on);
    ``source`` where its weights are read for a merge (default :func:`base_source`; the CLI passes
    :func:`trained_base`). Returns what was written: ``kind`` (adapter | merged | model), ``files``,
    ``dtype``."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    is_adapter = (adapter_dir / "adapter_config.json").is_file()
    if not is_adapter:  # a full fine-tune: the final folder is the model
        if not (adapter_dir / "config.json").is_file():
            raise ExportError(f"{adapter_dir} holds neither a PEFT adapter nor a model (no adapter_config.json, "
                              "no config.json)")
        shutil.copytree(adapter_dir, out_dir)
        return {"kind": "model", "files": _files(out_dir), "dtype": None}
    if not merge:
        shutil.copytree(adapter_dir, out_dir)
        cfg_path = out_dir / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_model  # what a server loads it onto, not a cache path
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        return {"kind": "adapter", "files": _files(out_dir), "dtype": None}

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = source or base_source(base_model)
    try:
        base = AutoModelForCausalLM.from_pretrained(source, dtype=_torch_dtype("fp32"))
    except OSError as exc:
        raise ExportError(f"cannot load the base model {base_model!r} to merge into ({exc}); export without "
                          "--merge for the adapter alone, or make the base model readable here") from None
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()  # merged in fp32
    merged = merged.to(_torch_dtype(dtype))
    out_dir.mkdir(parents=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    tok_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else Path(source)
    AutoTokenizer.from_pretrained(str(tok_source)).save_pretrained(str(out_dir))
    if (adapter_dir / _TRAINING_META).is_file():
        shutil.copy2(adapter_dir / _TRAINING_META, out_dir / _TRAINING_META)
    return {"kind": "merged", "files": _files(out_dir), "dtype": dtype}


def load_trained(adapter_dir: Path, base_model: str, source: str | None = None):
    """(model, tokenizer) as training left them: base + adapter (full precision), or the full model.
    ``source``: where the base weights are read (as in :func:`export`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = Path(adapter_dir)
    source = source or base_source(base_model)
    tok_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else Path(source)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_source))
    if (adapter_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        try:
            base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        except OSError as exc:
            raise ExportError(f"cannot load the base model {base_model!r} ({exc}); make it readable here") from None
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(adapter_dir), dtype=torch.float32)
    model.eval()
    return model, tokenizer


def complete(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, kind: str = "completion") -> list[str]:
    """Greedy completions (deterministic: the same model and prompt give the same text), each prompt
    put in the format of the job's dataset type ``kind`` first (alpaca, chat_template, completion)."""
    import torch

    from jobs.data import prompt_text

    out = []
    for prompt in prompts:
        ids = tokenizer(prompt_text(kind, prompt, tokenizer), return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0][ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def read_prompts(path: Path) -> list[str]:
    """Prompts from a file: one per line, or JSON lines with ``prompt``, ``instruction`` or ``text``."""
    try:
        lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"--prompts {path}: cannot read it ({exc})") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ExportError(f"--prompts {path}:{n}: not a JSON object ({exc})") from None
            text = next((row[k] for k in ("prompt", "instruction", "text") if isinstance(row.get(k), str)), None)
            if text is None:
                raise ExportError(f"--prompts {path}:{n}: needs a string 'prompt', 'instruction' or 'text'")
            prompts.append(text)
        else:
            prompts.append(line)
    if not prompts:
        raise ExportError(f"--prompts {path}: no prompts in it (one per line, or JSON lines with 'prompt')")
    return prompts


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
