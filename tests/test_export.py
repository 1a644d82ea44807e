"""``tunefleet export``: a succeeded job's adapter as a PEFT folder, or merged into its base model
as a standard Hugging Face folder whose logits are base+adapter's. The real CLI in a subprocess, the
tiny model built in code, a real LoRA adapter with non-zero weights, a real store."""

from __future__ import annotations

import json

import pytest

from infra.config import load_config
from infra.storage import open_store
from jobs.spec import load_job_file
from orchestrator.queue import submit_spec
from orchestrator.states import JobState
from orchestrator.store import Store
from tests.test_cli import EXAMPLE, tf

pytestmark = pytest.mark.slow  # loads torch, transformers and peft in two processes


@pytest.fixture
def succeeded(tmp_path, model_cache):
    """A succeeded QLoRA job on tunefleet/tiny-llama whose final adapter has non-zero LoRA weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobs.tiny import tiny_model_dir

    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text(f"default_store: {(tmp_path / 'ckpt').as_uri()}\n")
    cfg = load_config(home)
    with Store(cfg.db_path) as store:
        job_id = submit_spec(store, load_job_file(EXAMPLE), cfg)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()), dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
    final = tmp_path / "final"
    peft_model.save_pretrained(str(final))
    AutoTokenizer.from_pretrained(str(tiny_model_dir())).save_pretrained(str(final))
    (final / "tunefleet_training.json").write_text(json.dumps({"step": 40, "loss": 2.5}))
    ref = open_store(cfg.default_store).commit_final(job_id, final, {"step": 40, "loss": 2.5, "eval_loss": 1.0})
    with Store(cfg.db_path) as store:
        store.transition_job(job_id, JobState.RUNNING, kind="running", message="test")
        store.transition_job(job_id, JobState.SUCCEEDED, kind="succeeded", message="test", adapter_uri=ref.uri,
                             step=40)
    env_home = home
    return env_home, job_id, final


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_export_merge_gives_a_plain_model_with_base_plus_adapter_logits(succeeded, tmp_path, monkeypatch):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobs.tiny import tiny_model_dir

    home, job_id, final = succeeded
    out = json.loads(tf(home, "export", job_id, str(tmp_path / "merged"), "--merge", "--dtype", "fp32", "--json",
                        check=True).stdout)
    assert out["kind"] == "merged" and "model.safetensors" in out["files"] and "config.json" in out["files"]
    merged_dir = tmp_path / "merged"
    assert not (merged_dir / "adapter_config.json").exists()  # a plain model, no PEFT needed to load it
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))  # loads as it is (a fresh process wrote it)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()), dtype=torch.float32), str(final))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 42, 100, 7, 3, 250]])
    want, got = _logits(reference, ids), _logits(merged, ids)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert not torch.allclose(_logits(base, ids), want, atol=1e-3)  # the adapter really changes the model
    assert AutoTokenizer.from_pretrained(str(merged_dir)).vocab_size > 0
    # bf16: the same model within bf16's precision
    tf(home, "export", job_id, str(tmp_path / "bf16"), "--merge", check=True)
    half = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"))
    assert half.dtype == torch.bfloat16
    assert (_logits(half, ids) - want).abs().max() < 0.1 * want.abs().max()


def test_export_without_merge_is_a_lora_folder_a_server_loads_and_bad_requests_write_nothing(succeeded, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jobs.tiny import tiny_model_dir

    home, job_id, final = succeeded
    proc = tf(home, "export", job_id, str(tmp_path / "lora"), check=True)
    assert "--enable-lora" in proc.stdout  # how to serve it
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tunefleet/tiny-llama"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()),
                                                                           dtype=torch.float32), str(tmp_path / "lora"))
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()), dtype=torch.float32),
                                    str(final))
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(_logits(model, ids), _logits(ref, ids))
    # a bad dtype, an occupied folder: clear errors, nothing written
    proc = tf(home, "export", job_id, str(tmp_path / "x"), "--merge", "--dtype", "int3")
    assert proc.returncode == 2 and "bf16, fp16, fp32" in proc.stderr and not (tmp_path / "x").exists()
    proc = tf(home, "export", job_id, str(tmp_path / "lora"))
    assert proc.returncode == 2 and "never overwrites" in proc.stderr


def test_eval_prints_perplexity_and_greedy_completions_of_base_plus_adapter(succeeded, tmp_path):
    import math

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobs.data import ALPACA_PROMPT
    from jobs.tiny import tiny_model_dir

    home, job_id, final = succeeded
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('Name a colour.\n{"instruction": "Count to three."}\n')
    out = json.loads(tf(home, "eval", job_id, "--prompts", str(prompts), "--max-new-tokens", "12", "--json",
                        check=True).stdout)
    assert out["eval_loss"] == 1.0 and out["perplexity"] == pytest.approx(math.e)
    # what the adapter itself says, greedily, to each prompt in the job's format (alpaca)
    tok = AutoTokenizer.from_pretrained(str(final))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()),
                                                                           dtype=torch.float32), str(final)).eval()
    want = []
    for text in ("Name a colour.", "Count to three."):
        ids = tok(ALPACA_PROMPT.format(instruction=text, input_block=""), return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=12, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        want.append(tok.decode(gen[0][ids["input_ids"].shape[1]:], skip_special_tokens=True))
    assert [c["prompt"] for c in out["completions"]] == ["Name a colour.", "Count to three."]
    assert [c["completion"] for c in out["completions"]] == want and any(w.strip() for w in want)
    # a prompts file with nothing usable is a clear error before anything is downloaded
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no prompt key"}\n')
    proc = tf(home, "eval", job_id, "--prompts", str(bad))
    assert proc.returncode == 2 and "bad.jsonl:1" in proc.stderr and "'prompt'" in proc.stderr


def test_export_and_eval_through_the_team_server_match_the_server_machine(succeeded, tmp_path):
    """A user with no access to the bucket: the adapter comes through the server's store routes,
    every file checked; the merge and the completions run on the user's machine and come out the
    same, byte for byte, as on the server machine."""
    from tests.test_cli_client import run
    from tests.test_server import Server, make_accounts

    home, job_id, _ = succeeded
    tokens = make_accounts(home)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a colour.\n")
    server = Server(home, "--rate", "0")
    try:
        client = {"TUNEFLEET_HOME": str(tmp_path), "TUNEFLEET_SERVER": server.url, "TUNEFLEET_TOKEN": tokens["ann"]}
        args = ("eval", job_id, "--prompts", str(prompts), "--max-new-tokens", "8", "--json")
        local, remote = run({"TUNEFLEET_HOME": str(home)}, *args), run(client, *args)
        assert remote.returncode == local.returncode == 0, remote.stderr
        assert remote.stdout == local.stdout
        local = run({"TUNEFLEET_HOME": str(home)}, "export", job_id, str(tmp_path / "l"), "--merge", "--dtype", "fp32")
        remote = run(client, "export", job_id, str(tmp_path / "r"), "--merge", "--dtype", "fp32")
        assert remote.returncode == local.returncode == 0, remote.stderr
        tree = {p.relative_to(tmp_path / "l").as_posix(): p.read_bytes() for p in (tmp_path / "l").rglob("*") if p.is_file()}
        assert tree and tree == {p.relative_to(tmp_path / "r").as_posix(): p.read_bytes()
                                 for p in (tmp_path / "r").rglob("*") if p.is_file()}
        denied = run({**client, "TUNEFLEET_TOKEN": tokens["bob"]}, "eval", job_id, "--prompts", str(prompts))
        assert denied.returncode == 1 and "no job id starts with" in denied.stderr
    finally:
        server.stop()
