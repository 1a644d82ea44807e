"""``tunefleet/tiny-llama``: a tiny Llama and byte-level tokenizer built in code, for demos and tests.

Why: tests and the demo must never download weights, yet they must exercise the real stack
(transformers, peft, bitsandbytes 4-bit, Trainer checkpoints). This model is built from a fixed
seed, so every machine and every attempt of a job materializes the same weights, which is what
makes bitwise resume checks meaningful. Train it like any other base model:
``base_model: tunefleet/tiny-llama``.

Shape: 2 layers, hidden 64, 4 heads (2 KV heads), vocabulary = 256 byte tokens + 4 specials,
about 0.1 M parameters; the linear layers are multiples of 64, as bitsandbytes' 4-bit blocks need.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TINY_MODEL_ID = "tunefleet/tiny-llama"
TINY_VERSION = "v1"
_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The folder holding the materialized tiny model, building it on first use (atomically)."""
    base = Path(cache_dir or os.environ.get("TUNEFLEET_MODEL_CACHE") or _default_cache())
    target = base / f"tiny-llama-{TINY_VERSION}"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=base))
    try:
        build_tokenizer().save_pretrained(tmp)
        build_model().save_pretrained(tmp, safe_serialization=True)
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


def build_model():
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
