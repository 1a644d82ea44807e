"""Estimates against published figures (shared/reference/training.md)."""

from __future__ import annotations

import json

import pytest

from jobs.estimate import estimate, model_shape
from jobs.gpus import canonical_gpu
from tests.test_scheduler import job


def spec(**kw):
    s = job()
    s.update(kw)
    return s


@pytest.mark.parametrize(
    "base, adapter, lo, hi",
    [
        ("meta-llama/Llama-3.1-8B", "qlora", 5.0, 10.0),  # 5-6 GB minimum; ~9 GB at batch 4 x 1k
        ("Qwen/Qwen2.5-14B", "qlora", 8.5, 14.0),  # 8.5-12 GB
        ("meta-llama/Llama-3.1-70B", "qlora", 38.0, 52.0),  # 41-48 GB
        ("mistralai/Mistral-7B-v0.3", "lora", 16.0, 24.0),  # 16-bit LoRA 19-22 GB
        ("mistralai/Mistral-7B-v0.3", None, 100.0, 200.0),  # full FT: ~16 bytes/param
    ],
)
def test_vram_matches_published_rules_of_thumb(base, adapter, lo, hi):
    s = spec(base_model=base, adapter=adapter, load_in_4bit=adapter == "qlora", micro_batch_size=4,
             sequence_len=1024, gradient_checkpointing=True)
    assert lo <= estimate(s).vram_gb <= hi


def test_activations_grow_with_sequence_and_batch_and_checkpointing_cuts_them():
    small = estimate(spec(sequence_len=512, micro_batch_size=1))
    big = estimate(spec(sequence_len=2048, micro_batch_size=4))
    assert big.activations_gb > 4 * small.activations_gb
    no_gc = estimate(spec(sequence_len=2048, micro_batch_size=4, gradient_checkpointing=False))
    assert no_gc.activations_gb > 3 * big.activations_gb


def test_tokens_and_hours():
    e = estimate(spec(max_steps=1000, micro_batch_size=2, gradient_accumulation_steps=4, sequence_len=1024))
    assert e.steps == 1000 and e.tokens == 1000 * 8 * 1024  # sample packing: full sequences
    assert e.hours("H100") < e.hours("A100-80GB") < e.hours("RTX4090") < e.hours("T4")
    assert e.hours("A100-80GB", 4) < e.hours("A100-80GB", 1) / 3
    assert e.hours("Unobtainium-9000") is None
    # published: 7B QLoRA on an A100 ~2,400 tokens/s; an 8B model a bit slower
    assert 1500 < e.tokens_per_s("A100-80GB") < 2400


def test_epochs_count_the_dataset():
    one = estimate(spec(max_steps=None, num_epochs=1, sample_packing=False))
    three = estimate(spec(max_steps=None, num_epochs=3, sample_packing=False))
    assert one.examples == 200 and three.steps == 3 * one.steps and three.tokens == pytest.approx(3 * one.tokens, rel=0.01)


def test_measured_throughput_overrides_the_table():
    e = estimate(spec(), calibration={"RTX4090": 5000.0})
    assert e.tokens_per_s("RTX4090") == 5000.0
    assert e.hours("RTX4090") == pytest.approx(e.tokens / 5000.0 / 3600)


def test_model_size_sources(tmp_path):
    assert model_shape("tunefleet/tiny-llama").source == "built-in"
    assert model_shape("org/SomeModel-13b-chat").params_b == 13
    assert model_shape("org/mystery").source.startswith("assumed")
    cfg = {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336, "vocab_size": 128256,
           "num_attention_heads": 32, "num_key_value_heads": 8}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = model_shape(str(tmp_path))
    assert shape.source == "config.json" and 7.9 < shape.params_b < 8.1  # Llama-3-8B is 8.03 B


@pytest.mark.parametrize(
    "raw, vram, want",
    [("RTX 4090", None, "RTX4090"), ("RTX_4090", None, "RTX4090"), ("A100 SXM4", 80, "A100-80GB"),
     ("A100-80GB", None, "A100-80GB"), ("A100", 40, "A100"), ("NVIDIA H100 80GB HBM3", None, "H100"),
     ("H100 SXM", None, "H100"), ("L4", None, "L4"), ("Weird GPU", None, "Weird GPU")],
)
def test_gpu_names_are_canonical(raw, vram, want):
    assert canonical_gpu(raw, vram) == want


def test_several_gpus_fsdp_shards_the_memory_and_ddp_replicates_it():
    full = dict(base_model="meta-llama/Llama-3.1-8B", adapter=None, load_in_4bit=False, max_steps=100)
    one = estimate(spec(**full, resources={"gpus": 1}))
    four = estimate(spec(**full, resources={"gpus": 4}))
    eight = estimate(spec(**full, resources={"gpus": 8}))
    assert (one.strategy, four.strategy, four.processes) == ("single", "fsdp", 4)
    assert one.vram_gb > 120  # ~16 bytes a parameter: no single 80 GB GPU holds it
    # ZeRO-3: weights, gradients and Adam state split 4 ways, plus the layers gathered at a time
    assert 30 < four.vram_gb < 45 and eight.vram_gb < four.vram_gb
    assert four.vram_one_gpu_gb == pytest.approx(one.vram_gb)
    qlora = dict(base_model="meta-llama/Llama-3.1-8B", adapter="qlora", load_in_4bit=True, max_steps=100)
    q1, q4 = estimate(spec(**qlora, resources={"gpus": 1})), estimate(spec(**qlora, resources={"gpus": 4}))
    assert q4.strategy == "ddp" and q1.vram_gb < q4.vram_gb < q1.vram_gb + 0.5  # a replica on each GPU


def test_several_gpus_keep_the_global_batch_in_steps_and_hours():
    base = dict(max_steps=None, num_epochs=1, micro_batch_size=2, gradient_accumulation_steps=4)
    one = estimate(spec(**base, resources={"gpus": 1}))
    four = estimate(spec(**base, resources={"gpus": 4}))
    assert (one.global_batch, four.global_batch) == (8, 32)
    assert four.steps == -(-one.steps * 8 // 32)  # a quarter of the steps, each four times the examples
    assert four.tokens == pytest.approx(one.tokens, rel=0.1)
    # four GPUs at 90 % scaling: a bit more than a quarter of the hours
    assert four.hours("A100-80GB", 4) == pytest.approx(four.tokens / one.tokens * one.hours("A100-80GB") / 3.6)
    single = estimate(spec(**base, strategy="single", resources={"gpus": 4}))
    assert (single.processes, single.global_batch) == (1, 8)
