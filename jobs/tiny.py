"""``tunefleet/tiny-llama``: a tiny Llama and byte-level tokenizer, shipped with the code, for demos and tests.

Why: tests and the demo must never download weights, yet they must exercise the real stack
(transformers, peft, bitsandbytes 4-bit, Trainer checkpoints). The architecture and tokenizer are
built in code; the weights are a small pre-trained file shipped in ``jobs/assets`` and checked
against :data:`WEIGHTS_SHA256`, so every machine and every attempt of a job materializes the same
model, which is what makes bitwise resume checks meaningful. Train it like any other base model:
``base_model: tunefleet/tiny-llama``.

Shape: 2 layers, hidden 64, 4 heads (2 KV heads), vocabulary = 256 byte tokens + 4 specials,
about 0.1 M parameters; the linear layers are multiples of 64, as bitsandbytes' 4-bit blocks need.

Weights (v2): the v1 model was this architecture at its random init (seed 1234), which gave LoRA
nothing to adapt. v2 starts from that same init and is pre-trained on plain generated text, so the
base already models bytes, words, casing and a few facts (``jobs.tiny_pretrain``). The shipped
``jobs/assets/tiny-llama-v2.safetensors`` (fp32, 431 KB) was made with the recipe's defaults:

    python -m jobs.tiny --pretrain --out jobs/assets/tiny-llama-v2.safetensors

- full-parameter training from the v1 init, fp32, one torch thread: 2000 steps of 16 x 128 byte
  tokens (4.1 M tokens), AdamW (betas 0.9/0.98, weight decay 0.01), peak lr 3e-3 after 100 warm-up
  steps, cosine down to 3e-4, gradient clipping 1.0, data seed 1;
- corpus: ``jobs.tiny_pretrain.corpus_lines(1)``, an endless stream of generated sentences (prose
  from word lists, "Paris is the capital of France.", words beside their upper-case and backwards
  forms, arithmetic written out, letter counts), each line ``<s>line</s>``, packed; never the
  ``### Instruction:`` format of the demo data;
- loss 5.62 at the first step, 0.636 over the last 100 steps, 0.646 nats per byte on held-out
  corpus lines (seed 10000) against ln 256 = 5.55 for a model that knows nothing; 72 s on one core
  of the machine it was made on; sha256 93a16520...c5463c (``WEIGHTS_SHA256``).

Float results differ across CPUs, so the recipe is not re-run at first use: the shipped file *is*
the model. Re-running it on another machine gives a close but not bit-identical file; ship it with
its new sha256 (and a new cache key follows from it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

TINY_MODEL_ID = "tunefleet/tiny-llama"
TINY_VERSION = "v2"
WEIGHTS = Path(__file__).resolve().parent / "assets" / f"tiny-llama-{TINY_VERSION}.safetensors"
WEIGHTS_SHA256 = "93a165209321c74cdd50025003d3314978b15d27e19e38131ffcf70e60c5463c"
_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class TinyModelError(RuntimeError):
    """The shipped tiny model's weights are missing or not the file this code was released with."""


def verify_weights(path: str | Path = WEIGHTS, sha256: str = WEIGHTS_SHA256) -> str:
    """The sha256 of the weights file at ``path``, once it is checked to be ``sha256``."""
    path = Path(path)
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise TinyModelError(f"{TINY_MODEL_ID}: cannot read its weights {path} ({exc}); reinstall tunefleet") from None
    if digest != sha256:
        raise TinyModelError(
            f"{TINY_MODEL_ID}: the weights file {path} is corrupted or not the shipped one "
            f"(sha256 {digest[:12]}..., expected {sha256[:12]}...); reinstall tunefleet or restore the file"
        )
    return digest


def tiny_model_dir(cache_dir: str | Path | None = None, *, weights: str | Path | None = None) -> Path:
    """The folder holding the materialized tiny model, building it on first use (atomically) from
    the shipped weights (``weights``: another copy of that file), which must match their sha256.
    The folder is named by that hash, so a cache of other weights (v1's random init) is never reused."""
    digest = verify_weights(weights or WEIGHTS)
    base = Path(cache_dir or os.environ.get("TUNEFLEET_MODEL_CACHE") or _default_cache())
    target = base / f"tiny-llama-{digest[:12]}"
    if all((target / name).is_file() for name in ("config.json", "tokenizer.json", "model.safetensors")):
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=base))
    try:
        build_tokenizer().save_pretrained(tmp)
        load_model(weights or WEIGHTS).save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _default_cache() -> Path:
    home = os.environ.get("TUNEFLEET_HOME") or os.path.expanduser("~/.tunefleet")
    return Path(home) / "models"


def build_tokenizer():
    """A byte-level tokenizer: no training, so it is identical everywhere."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_model(weights: str | Path = WEIGHTS):
    """The tiny model with the weights from ``weights`` (all of them, nothing left at init)."""
    from safetensors.torch import load_file

    model = build_model()
    try:
        state = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a bad file
        raise TinyModelError(f"{TINY_MODEL_ID}: cannot load its weights {weights} ({exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise TinyModelError(f"{TINY_MODEL_ID}: the weights {weights} do not fit the model ({exc})") from None
    return model


def build_model():
    """The architecture at its fixed-seed random init (v1's weights; v2's pre-training starts here)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(_SPECIALS) + 256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(1234)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    return model


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    from jobs import tiny_pretrain as tp

    p = argparse.ArgumentParser(prog="python -m jobs.tiny", description="Re-make the tiny model's weights.")
    p.add_argument("--pretrain", action="store_true", help="run the pre-training recipe (jobs.tiny_pretrain)")
    p.add_argument("--out", type=Path, default=Path("tiny-llama-pretrained.safetensors"),
                   help=f"where to write the weights (default: %(default)s; the shipped file is jobs/assets/{WEIGHTS.name})")
    p.add_argument("--steps", type=int, default=tp.DEFAULT_STEPS)
    p.add_argument("--seed", type=int, default=tp.DEFAULT_SEED)
    ns = p.parse_args(argv)
    if not ns.pretrain:
        p.error("nothing to do: pass --pretrain")
    model, figures = tp.pretrain(steps=ns.steps, seed=ns.seed, say=lambda m: print(m, file=sys.stderr, flush=True))
    figures["sha256"] = tp.save_weights(model, ns.out)
    figures["out"] = str(ns.out)
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
