"""The shipped tunefleet/tiny-llama: its weights are the released file, it already models text, a
damaged copy is refused with a clear error, and the recipe that made it still trains."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from jobs import tiny
from jobs.tiny import TinyModelError, tiny_model_dir, verify_weights


def test_shipped_weights_verify_against_their_hash():
    assert tiny.WEIGHTS.is_file(), f"{tiny.WEIGHTS} is not shipped"
    assert verify_weights() == tiny.WEIGHTS_SHA256
    assert 300_000 < tiny.WEIGHTS.stat().st_size < 600_000  # fp32, ~0.1 M parameters


def test_the_materialized_folder_is_named_by_the_weights_hash_and_holds_them_exactly(model_cache):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dir()
    assert folder.parent == model_cache and folder.name == f"tiny-llama-{tiny.WEIGHTS_SHA256[:12]}"
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    shipped = load_file(str(tiny.WEIGHTS))
    state = model.state_dict()
    assert set(shipped) == set(state)
    assert all(torch.equal(shipped[k], state[k]) for k in shipped)


def test_an_old_cache_is_never_reused(tmp_path):
    old = tmp_path / "tiny-llama-v1"  # v1's folder: the random init
    old.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (old / name).write_text("{}")
    folder = tiny_model_dir(tmp_path)
    assert folder != old and (folder / "model.safetensors").stat().st_size > 300_000


def test_the_base_models_held_out_text_far_better_than_chance(model_cache):
    import torch
    from transformers import AutoModelForCausalLM

    from jobs.tiny import build_tokenizer
    from jobs.tiny_pretrain import heldout_loss

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()), dtype=torch.float32)
    loss = heldout_loss(model, build_tokenizer(), batches_n=4)
    # a model that knows nothing scores ln 256 = 5.55 nats a byte; the shipped one ~0.65
    assert loss < 1.0 and loss < math.log(256) / 5, loss


def test_the_base_continues_plain_text_sensibly(model_cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_model_dir()
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = tok("<s>The word kettle has", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True) == " 6 letters."


def test_a_corrupted_weights_file_is_a_clear_error(tmp_path):
    copy = tmp_path / "tiny-llama-v2.safetensors"
    shutil.copyfile(tiny.WEIGHTS, copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of a tensor
    copy.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(TinyModelError, match=r"corrupted or not the shipped one.*expected 93a165209321"):
        tiny_model_dir(cache, weights=copy)
    assert not cache.exists()  # nothing was built from it

    copy.unlink()
    with pytest.raises(TinyModelError, match="cannot read its weights"):
        tiny_model_dir(cache, weights=copy)


@pytest.mark.slow
def test_the_pretraining_recipe_still_trains(tmp_path, capsys):
    """The recipe (``python -m jobs.tiny --pretrain``) for a few steps: the loss falls, and what it
    writes loads into the model (not the shipped file: that one took 2000 steps on another CPU)."""
    out = tmp_path / "w.safetensors"
    assert tiny.main(["--pretrain", "--steps", "150", "--out", str(out)]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["first_loss"] > 5.0  # ~ln 260 at the random init
    assert figures["final_loss"] < figures["first_loss"] - 2.0, figures
    assert figures["heldout_loss"] < 3.5, figures
    assert verify_weights(out, figures["sha256"]) == figures["sha256"]
    tiny.load_model(out)  # every tensor present, every shape right
