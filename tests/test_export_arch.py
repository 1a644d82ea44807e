"""Real architectures through the whole path: a tiny random Llama and a tiny random Qwen2 (q/k/v
biases), each with a byte-level BPE tokenizer trained in code, saved to a local folder, submitted
with ``base_model: <that folder>``, trained by the real daemon and payload (QLoRA and LoRA on each),
then ``tunefleet export``ed. The merged folder must load in a fresh process with nothing but
``AutoModelForCausalLM`` / ``AutoTokenizer``, keep its ``model_type``, and give base+adapter's
logits; the adapter folder must name the job's base. Nothing is downloaded.

Tolerance of merged vs base+adapter logits (both fp32): ``1e-5 * max(1, max |logit|)``. The two
compute the same function in a different order, ``(W + s·B·A)x`` against ``Wx + s·B(Ax)``: float32
rounding (eps 1.2e-7) over 64-wide dot products and two layers, measured at 1.8e-7 to 2.4e-7 here
on logits of size ~1. 1e-5 leaves ~40x margin for other CPUs' kernels, and is still ~10^4 times
smaller than what the adapter changes (asserted > 1e-1; measured 0.86 to 1.27): a merge that
dropped the adapter, a bias, or the LoRA scaling could not pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_cli import tf

pytestmark = pytest.mark.slow  # builds models, runs the daemon and the payload, loads torch in subprocesses

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"
ARCHS = {  # architecture -> (its dataset, the type of that dataset)
    "llama": ("alpaca-tiny.jsonl", "alpaca"),
    "qwen2": ("chat-tiny.jsonl", "chat_template"),
}
# QLoRA (merged into the unquantized base) on one architecture, LoRA on the other: both merge
# paths and both architectures, in half the training time of all four pairs
CASES = [("llama", "qlora"), ("qwen2", "lora")]
MAX_STEPS, SAVE_STEPS = 12, 6
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = "Reverse the letters of the word. tunnel"  # the fixed input whose logits are compared


# ---- the base models, built in code ------------------------------------------------------------


def build_tokenizer(arch: str):
    """A byte-level BPE trained on the example data (no download): Llama's specials, or Qwen2's
    with a ChatML chat template (the Qwen2 job trains on chat data)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"] if arch == "llama" else ["<|endoftext|>", "<|im_start|>",
                                                                            "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>" if arch == "llama" else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [line for name in ("alpaca-tiny.jsonl", "chat-tiny.jsonl") for line in
              (DATA / name).read_text(encoding="utf-8").splitlines()]
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=448, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if arch == "llama":
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                       pad_token="<pad>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def build_model(arch: str, vocab_size: int, seed: int = 0):
    """Hidden 64, 2 layers, 4 heads and 4 KV heads of 16: every linear layer's sides are multiples
    of 64, as bitsandbytes' 4-bit blocks need. Qwen2's q/k/v biases are drawn non-zero so that a
    merge which lost them would show in the logits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                 tie_word_embeddings=False)
    torch.manual_seed(seed)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=3))
    model = Qwen2ForCausalLM(Qwen2Config(**shape, eos_token_id=2, pad_token_id=0, use_sliding_window=False))
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.1)
    return model


def save_base(arch: str, folder: Path, seed: int = 0) -> Path:
    tok = build_tokenizer(arch)
    model = build_model(arch, vocab_size=-(-len(tok) // 64) * 64, seed=seed)
    tok.save_pretrained(str(folder))
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def job_file(tmp: Path, arch: str, method: str, base: Path) -> Path:
    name, kind = ARCHS[arch]
    doc = {
        "name": f"{arch}-{method}", "base_model": str(base), "adapter": method, "load_in_4bit": method == "qlora",
        "lora_r": 8, "lora_alpha": 16, "lora_target_linear": True, "sequence_len": 128, "micro_batch_size": 4,
        "max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "learning_rate": 5e-3, "seed": 7, "val_set_size": 0.1,
        "datasets": [{"path": str(DATA / name), "type": kind}],
        "resources": {"gpus": 0, "device": "auto"}, "policy": {"spot": "allow", "data": "open"},
    }
    path = tmp / f"{arch}-{method}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ---- submit, train (the real daemon), export -------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both bases saved, the jobs (one per case) submitted and run to success by ``tunefleet daemon``."""
    tmp = tmp_path_factory.mktemp("arch")
    home = tmp / "home"
    home.mkdir()
    (home / "config.yaml").write_text("poll_interval_s: 0.5\nray_num_cpus: 2\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEFLEET_INPUT_CACHE", str(tmp / "input-cache"))  # the payload's and the CLI's, not ~/.cache
        bases = {arch: save_base(arch, tmp / f"base-{arch}") for arch in ARCHS}
        jobs = {}
        for arch, method in CASES:
            out = tf(home, "submit", str(job_file(tmp, arch, method, bases[arch])), "--json", check=True)
            jobs[arch, method] = json.loads(out.stdout)["id"]
        t0 = time.monotonic()
        daemon = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "daemon", "--until-idle", "--max-seconds", "500"],
            env={**os.environ, "TUNEFLEET_HOME": str(home)}, capture_output=True, text=True, timeout=560)
        print(f"daemon ran {len(jobs)} jobs in {time.monotonic() - t0:.1f} s")
        assert daemon.returncode == 0, daemon.stdout[-3000:] + daemon.stderr[-3000:]
        status = {key: json.loads(tf(home, "status", job, "--json", check=True).stdout) for key, job in jobs.items()}
        for key, s in status.items():
            assert s["state"] == "succeeded" and s["step"] == MAX_STEPS, (
                key, s, tf(home, "logs", s["id"]).stdout[-3000:])
        yield {"home": home, "tmp": tmp, "bases": bases, "jobs": jobs, "status": status}


@pytest.fixture(scope="module")
def exported(trained):
    """job -> (merged folder, adapter folder), each exported once by ``tunefleet export``."""
    done: dict[str, tuple[Path, Path]] = {}

    def get(job: str) -> tuple[Path, Path]:
        if job not in done:
            merged, lora = trained["tmp"] / f"{job}-merged", trained["tmp"] / f"{job}-lora"
            out = json.loads(tf(trained["home"], "export", job, str(merged), "--merge", "--dtype", "fp32", "--json",
                                check=True).stdout)
            assert out["kind"] == "merged" and "model.safetensors" in out["files"], out
            tf(trained["home"], "export", job, str(lora), check=True)
            done[job] = merged, lora
        return done[job]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEFLEET_INPUT_CACHE", str(trained["tmp"] / "input-cache"))
        yield get


CHECK = r"""
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

merged_dir, lora_dir, base_dir, text = sys.argv[1:5]
tok = AutoTokenizer.from_pretrained(merged_dir)  # as a server would: no PEFT, no tunefleet
merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
base_tok = AutoTokenizer.from_pretrained(base_dir)
ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), lora_dir).eval()
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
if tok.chat_template:
    text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
ids = tok(text, return_tensors="pt")["input_ids"]
with torch.no_grad():
    got, want, plain = (m(input_ids=ids).logits.float() for m in (merged, ref, base))
biases = [k for k in base.state_dict() if k.endswith("_proj.bias")]
print(json.dumps({
    "model_type": merged.config.model_type, "architectures": merged.config.architectures,
    "dtype": str(merged.dtype), "tokens": ids.shape[1],
    "same_ids": ids.tolist() == base_tok(text, return_tensors="pt")["input_ids"].tolist(),
    "same_chat_template": tok.chat_template == base_tok.chat_template,
    "max_diff": (got - want).abs().max().item(), "adapter_effect": (plain - want).abs().max().item(),
    "scale": want.abs().max().item(), "biases": len(biases),
    "biases_kept": all(torch.equal(merged.state_dict()[k], base.state_dict()[k]) for k in biases),
}))
"""


def _check(merged: Path, lora: Path, base: Path) -> dict:
    """Load the exports in a fresh process (nothing of this one's imports or caches) and compare."""
    proc = subprocess.run([sys.executable, "-c", CHECK, str(merged), str(lora), str(base), TEXT],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch, method", CASES, ids=[f"{a}-{m}" for a, m in CASES])
def test_merged_export_is_a_plain_model_of_its_architecture_with_base_plus_adapter_logits(
        trained, exported, arch, method):
    job, base = trained["jobs"][arch, method], trained["bases"][arch]
    merged, lora = exported(job)
    got = _check(merged, lora, base)
    print(f"{arch}-{method}: max |merged - (base+adapter)| = {got['max_diff']:.3g}, adapter effect "
          f"{got['adapter_effect']:.3g}, max |logit| {got['scale']:.3g}")
    want_type = {"llama": "llama", "qwen2": "qwen2"}[arch]
    assert got["model_type"] == want_type
    assert json.loads((merged / "config.json").read_text())["model_type"] == want_type
    assert got["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]]
    assert not (merged / "adapter_config.json").exists() and got["dtype"] == "torch.float32"
    assert got["same_ids"] and got["tokens"] > 5 and got["same_chat_template"]  # the tokenizer travelled
    assert (merged / "chat_template.jinja").is_file() == (arch == "qwen2")
    assert got["max_diff"] <= 1e-5 * max(1.0, got["scale"]), got
    assert got["adapter_effect"] > 0.1, got  # training moved the model: the comparison means something
    assert got["biases"] == (6 if arch == "qwen2" else 0) and got["biases_kept"]  # q/k/v biases of 2 layers


@pytest.mark.parametrize("arch, method", CASES, ids=[f"{a}-{m}" for a, m in CASES])
def test_adapter_export_names_the_jobs_base_model(trained, exported, arch, method):
    job, base = trained["jobs"][arch, method], trained["bases"][arch]
    _, lora = exported(job)
    cfg = json.loads((lora / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base)  # the job's base as submitted, not the staged copy
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    assert (lora / "adapter_model.safetensors").is_file() and (lora / "tokenizer.json").is_file()
    meta = json.loads((lora / "tunefleet_training.json").read_text())
    assert meta["base_model"] == str(base) and meta["adapter"] == method and meta["step"] == MAX_STEPS


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_merge_uses_the_base_the_job_trained_on_when_the_folder_is_gone_or_overwritten(trained, exported):
    """Submit staged the folder (content-addressed) to the store; the job trained on that copy. So
    the merge reads it too: with the user's folder deleted, or replaced by other weights, the
    merged model is the same, byte for byte. ``eval`` loads the same base."""
    home, tmp = trained["home"], trained["tmp"]
    job, base = trained["jobs"]["qwen2", "lora"], trained["bases"]["qwen2"]
    merged, _ = exported(job)
    away = tmp / "base-qwen2.away"
    os.rename(base, away)
    try:
        tf(home, "export", job, str(tmp / "gone"), "--merge", "--dtype", "fp32", check=True)
        assert _sha(tmp / "gone" / "model.safetensors") == _sha(merged / "model.safetensors")
        prompts = tmp / "prompts.txt"
        prompts.write_text("Reverse the letters of the word. tunnel\n")
        out = json.loads(tf(home, "eval", job, "--prompts", str(prompts), "--max-new-tokens", "4", "--json",
                            check=True).stdout)
        assert len(out["completions"]) == 1 and out["eval_loss"] == trained["status"]["qwen2", "lora"]["eval_loss"]
        save_base("qwen2", base, seed=1)  # other weights under the same name
        tf(home, "export", job, str(tmp / "changed"), "--merge", "--dtype", "fp32", check=True)
        assert _sha(tmp / "changed" / "model.safetensors") == _sha(merged / "model.safetensors")
    finally:
        shutil.rmtree(base, ignore_errors=True)
        os.rename(away, base)


def test_report_and_status_show_each_jobs_eval_loss_and_perplexity(trained):
    home, tmp = trained["home"], trained["tmp"]
    tf(home, "report", "--out", str(tmp / "report.html"), check=True)
    page = (tmp / "report.html").read_text()
    for (arch, method), s in trained["status"].items():
        assert s["eval_loss"] is not None and s["perplexity"] is not None  # val_set_size: 0.1
        row = next(r for r in page.split("<tr>") if f">{s['id']}<" in r)
        assert f"<td>{s['eval_loss']:.4f}</td><td>{s['perplexity']:.2f}</td>" in row, (arch, method, row)
        assert f"{s['id']} {arch}-{method} eval" in page  # its eval-loss points on the loss chart
