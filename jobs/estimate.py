"""Estimates from a job spec: VRAM per GPU, tokens to process, and hours on each GPU model.

Why here and not in the scheduler: the numbers depend only on the job (model size, method,
sequence length, batch, dataset) and on published or measured throughput, never on who sells
the GPU. The scheduler turns hours into money and risk.

Sources (``../shared/reference/training.md``):
- VRAM: QLoRA ~x/2 GB for an x-billion model in 4-bit plus overhead; 16-bit LoRA ~2 bytes/param;
  full fine-tuning with Adam in mixed precision ~16 bytes/param; plus activations, which grow with
  sequence length x micro batch (Korthikanti et al.: ~34·s·b·h bytes per layer in 16-bit, or
  ~2·s·b·h with gradient checkpointing) and fp32 logits (s·b·vocab·4 bytes).
- Several GPUs (``jobs.gang``): DDP keeps a whole replica on each GPU (per-GPU VRAM as on one, plus
  its gradient buckets); FSDP shards weights, gradients and Adam state over the N GPUs and
  gathers one decoder layer at a time (ZeRO-3: ~16·P/N bytes plus two layers' 16-bit weights).
  Steps come from the global batch (micro batch x accumulation x GPUs), hours from N GPUs at
  ``MULTI_GPU_EFFICIENCY``.
- Throughput: Llama-2-7B 4-bit on an A100, HF + FA2, batch 4x2, len 1024: 2,415 tokens/s
  (LLaMA-Factory). Other sizes scale ~1/params; other GPUs by ``jobs.gpus`` relative speed.
  Measured tokens/s from earlier runs of the same base model and method override the table.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from jobs.gpus import GPUS
from jobs.spec import gang_shape

REF_TOKENS_PER_S = {"qlora": 2400.0, "lora": 3100.0, "full": 2000.0}  # 7B on one A100, per GPU
REF_PARAMS_B = 7.0
MAX_TOKENS_PER_S_A100 = 400_000.0  # tiny models are bound by overheads, not FLOPs
MULTI_GPU_EFFICIENCY = 0.9
DDP_BUCKETS_GB = 0.1  # DDP's gradient buckets (2 x 25 MB by default) and NCCL buffers
# One checkpoint's save + upload before the payload has measured one (progress ``checkpoint_s``):
CHECKPOINT_FIXED_S = 3.0  # write, fsync, commit marker, a few small files
CHECKPOINT_UPLOAD_GBPS = 2.0  # a rented machine's upload to object storage, gigabits/s

# (params_b upper bound, hidden, layers, vocab) when no config.json is at hand
_SHAPES = [(1.5, 2048, 16, 128_000), (4.5, 3072, 28, 128_000), (9.5, 4096, 32, 128_000),
           (16, 5120, 40, 128_000), (40, 6656, 60, 128_000), (1e9, 8192, 80, 128_000)]
_KNOWN_SIZES = {"phi-2": 2.7, "phi-3-mini": 3.8, "gemma-2b": 2.5, "gemma-7b": 8.5, "tinyllama": 1.1}


@dataclass(frozen=True)
class ModelShape:
    params_b: float
    hidden: int
    layers: int
    vocab: int
    source: str  # "config.json", "model name", "built-in", "assumed"


@dataclass(frozen=True)
class Estimate:
    method: str  # qlora | lora | full
    model: ModelShape
    vram_gb: float  # per GPU, everything included
    weights_gb: float
    activations_gb: float
    examples: int
    tokens: int  # processed over the whole run
    steps: int
    tokens_per_step: float
    tokens_per_s_a100: float  # on one A100-80GB
    calibrated: dict[str, float] = field(default_factory=dict)  # gpu -> measured tokens/s
    strategy: str = "single"  # single | ddp | fsdp, for the GPUs the job asks for
    processes: int = 1  # ranks on those GPUs
    global_batch: int = 1  # examples per optimizer step
    vram_one_gpu_gb: float = 0.0  # what a single GPU training it alone would need

    def tokens_per_s(self, gpu: str, count: int = 1) -> float | None:
        if gpu in self.calibrated:
            per_gpu = self.calibrated[gpu]
        else:
            info = GPUS.get(gpu)
            if info is None:
                return None
            per_gpu = self.tokens_per_s_a100 * info.rel_speed
        n = max(1, count)
        return per_gpu * n * (MULTI_GPU_EFFICIENCY if n > 1 else 1.0)

    def hours(self, gpu: str, count: int = 1) -> float | None:
        """Hours of uninterrupted training on ``count`` GPUs of this model (None: unknown GPU)."""
        tps = self.tokens_per_s(gpu, count)
        if not tps:
            return None
        return self.tokens / tps / 3600.0

    @property
    def checkpoint_gb(self) -> float:
        """Size of one checkpoint: the trained weights with their Adam state (fp32 master, m, v:
        ~12 bytes a parameter on top of the 16-bit weights, i.e. ~14 in all). An adapter's is small."""
        if self.method in ("qlora", "lora"):
            return max(0.01, (self.weights_gb - self.model.params_b * (0.55 if self.method == "qlora" else 2) - 0.5)
                       / 16 * 14)
        return self.model.params_b * 14

    def checkpoint_s(self, upload_gbps: float = CHECKPOINT_UPLOAD_GBPS) -> float:
        """Seconds to save and upload one checkpoint, before any was measured: a fixed part (write,
        fsync, commit marker) plus the bytes over ``upload_gbps`` gigabits per second."""
        return CHECKPOINT_FIXED_S + self.checkpoint_gb * 8 / max(upload_gbps, 1e-3)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "params_b": self.model.params_b,
            "params_source": self.model.source,
            "vram_gb": round(self.vram_gb, 2),
            "weights_gb": round(self.weights_gb, 2),
            "activations_gb": round(self.activations_gb, 2),
            "examples": self.examples,
            "tokens": self.tokens,
            "steps": self.steps,
            "tokens_per_s_a100": round(self.tokens_per_s_a100, 1),
            "calibrated": self.calibrated,
            "strategy": self.strategy,
            "processes": self.processes,
            "global_batch": self.global_batch,
            "vram_one_gpu_gb": round(self.vram_one_gpu_gb, 2),
        }


def model_shape(base_model: str, staged_config: dict[str, Any] | None = None) -> ModelShape:
    """Model size and shape from a local config.json (or the copy staged with the job's inputs,
    once the user's folder may be gone), the built-in tiny model, or the name."""
    from jobs.spec import BUILTIN_TINY_MODEL

    if base_model == BUILTIN_TINY_MODEL:
        # 2 layers x (q,o: 64x64; k,v: 64x32; mlp: 3x64x128) + embed + lm_head (260x64 each)
        params = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) + 2 * 260 * 64
        return ModelShape(params / 1e9, 64, 2, 260, "built-in")
    cfg_path = Path(base_model).expanduser() / "config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
            return _shape_from_config(cfg)
        except (ValueError, KeyError, TypeError):
            pass
    if staged_config:
        try:
            return _shape_from_config(staged_config)
        except (ValueError, KeyError, TypeError, ZeroDivisionError):
            pass
    name = base_model.lower().rsplit("/", 1)[-1]
    m = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)\s*b(?![a-z])", name)
    if m:
        return _shape_from_params(float(m.group(1)), "model name")
    for key, size in _KNOWN_SIZES.items():
        if key in name:
            return _shape_from_params(size, "model name")
    return _shape_from_params(REF_PARAMS_B, "assumed (name gives no size)")


def _shape_from_params(params_b: float, source: str) -> ModelShape:
    _, hidden, layers, vocab = next(s for s in _SHAPES if params_b <= s[0])
    return ModelShape(params_b, hidden, layers, vocab, source)


def _shape_from_config(cfg: dict[str, Any]) -> ModelShape:
    h = int(cfg["hidden_size"])
    layers = int(cfg["num_hidden_layers"])
    inter = int(cfg.get("intermediate_size", 4 * h))
    vocab = int(cfg.get("vocab_size", 32000))
    heads = int(cfg.get("num_attention_heads", max(1, h // 128)))
    kv = int(cfg.get("num_key_value_heads", heads))
    head_dim = h // heads
    per_layer = 2 * h * h + 2 * h * kv * head_dim + 3 * h * inter
    embed = vocab * h * (1 if cfg.get("tie_word_embeddings") else 2)
    return ModelShape((layers * per_layer + embed) / 1e9, h, layers, vocab, "config.json")


def dataset_stats(datasets: list[dict[str, Any]], sequence_len: int, sample_packing: bool,
                  staged: dict[str, Any] | None = None) -> tuple[int, float]:
    """(examples, mean tokens per example). Tokens ~ chars / 4, capped at sequence_len. A file no
    longer here is counted from the facts recorded when it was staged (``jobs.inputs``)."""
    examples = 0
    chars = 0
    for ds in datasets:
        path = Path(ds["path"])
        try:
            st = path.stat()
        except OSError:
            facts = (staged or {}).get(ds["path"]) or {}
            examples += int(facts.get("examples") or 0)
            chars += int(facts.get("chars") or 0)
            continue
        n, c = _file_stats(str(path), st.st_mtime_ns, st.st_size, sequence_len)
        examples += n
        chars += c
    if examples == 0:
        return 0, float(sequence_len)
    mean = sequence_len if sample_packing else min(sequence_len, chars / examples / 4)
    return examples, max(1.0, mean)


def dataset_stats_of(path: str, sequence_len: int) -> tuple[int, int]:
    """(examples, chars) of one JSONL file, as ``dataset_stats`` counts them."""
    st = os.stat(path)
    return _file_stats(path, st.st_mtime_ns, st.st_size, sequence_len)


@lru_cache(maxsize=256)
def _file_stats(path: str, mtime_ns: int, size: int, sequence_len: int) -> tuple[int, int]:
    """(examples, chars) of one JSONL file; cached while the file is unchanged (mtime, size)."""
    examples = chars = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                examples += 1
                chars += min(len(line), sequence_len * 4)
    return examples, chars


def estimate(spec: Any, calibration: dict[str, float] | None = None) -> Estimate:
    """Estimate a validated JobSpec (or its payload dict).

    ``calibration`` maps GPU model -> tokens/s measured on earlier runs of the same base model and
    method; those figures replace the published table for that GPU.
    """
    s = spec if isinstance(spec, dict) else spec.to_payload_dict()
    method = s.get("adapter") or "full"
    staged = s.get("inputs") or {}
    shape = model_shape(s["base_model"], (staged.get(s["base_model"]) or {}).get("config"))
    seq, mb, ga = int(s["sequence_len"]), int(s["micro_batch_size"]), int(s["gradient_accumulation_steps"])
    n_examples, mean_tokens = dataset_stats(s["datasets"], seq, bool(s.get("sample_packing")), staged)

    # weights + optimizer state
    p = shape.params_b
    if method == "qlora":
        lora_params_b = _lora_params_b(shape, int(s.get("lora_r", 8)))
        weights = p * 0.55 + lora_params_b * 16 + 0.5
    elif method == "lora":
        lora_params_b = _lora_params_b(shape, int(s.get("lora_r", 8)))
        weights = p * 2 + lora_params_b * 16 + 0.5
    else:
        weights = p * 16 + 0.5
    # activations (16-bit) + fp32 logits
    tokens_in_flight = seq * mb
    per_layer = (2 if s.get("gradient_checkpointing") else 34) * tokens_in_flight * shape.hidden
    activations = (per_layer * shape.layers + tokens_in_flight * shape.vocab * 4) / 1e9
    vram_one = weights + activations

    world, strategy = gang_shape(s.get("strategy") or "auto", int((s.get("resources") or {}).get("gpus", 1)),
                                 s.get("adapter"))
    if strategy == "fsdp":
        layer_gb = p * 2 / max(1, shape.layers)  # one decoder layer's 16-bit weights, gathered
        weights = (weights - 0.5) / world + 2 * layer_gb + 0.5
    elif strategy == "ddp":
        weights += DDP_BUCKETS_GB
    vram = weights + activations

    batch = mb * ga * world  # the global batch
    tokens_per_step = batch * mean_tokens
    if s.get("max_steps"):
        steps = int(s["max_steps"])
        tokens = int(steps * tokens_per_step)
    else:
        n_train = max(1, round(n_examples * (1 - float(s.get("val_set_size") or 0))))
        epochs = max(1, math.ceil(float(s.get("num_epochs", 1))))
        steps = math.ceil(n_train / batch) * epochs
        tokens = int(n_train * epochs * mean_tokens)  # an epoch's last step may be short

    tps = REF_TOKENS_PER_S[method] * REF_PARAMS_B / max(p, 1e-6)
    tps = min(tps, MAX_TOKENS_PER_S_A100)
    return Estimate(
        method=method, model=shape, vram_gb=vram, weights_gb=weights, activations_gb=activations,
        examples=n_examples, tokens=tokens, steps=steps, tokens_per_step=tokens_per_step,
        tokens_per_s_a100=tps, calibrated=dict(calibration or {}),
        strategy=strategy, processes=world, global_batch=batch, vram_one_gpu_gb=vram_one,
    )


def _lora_params_b(shape: ModelShape, r: int) -> float:
    # all-linear LoRA: ~7 matrices per layer, each r x (in + out) ~ r x 2h (MLP ones larger)
    return shape.layers * 7 * r * (shape.hidden * 2.7) / 1e9
