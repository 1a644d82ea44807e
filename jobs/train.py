"""The training payload: runs wherever an attempt landed, and talks back only through the store.

    python -m jobs.train --spec SPEC.json --store URI --job-id J --attempt-id A [--work-dir DIR]

(each flag also reads ``TUNEFLEET_SPEC``/``TUNEFLEET_STORE``/... so a cloud launcher can pass envs).

Contract with the orchestrator:
- On start it resumes from the newest *committed* checkpoint in the store whose files verify;
  a corrupt or half-written one is skipped.
- Every ``save_every`` steps the Trainer writes a checkpoint; a callback uploads it and commits it
  (manifest last), then applies retention. With ``checkpoint.interval_s`` it also saves at the first
  step end at least that many seconds after the last save (or the start of training here).
- SIGTERM means "you are being preempted": finish the current step, save, commit, exit 75.
- ``control.json`` saying stop (a budget cap), or its budget lease running out, means the same,
  with exit 76.
- It writes ``progress.json`` (step, loss, tokens/s, checkpoint, a heartbeat) to the store as it
  goes; store outages are ridden out off the training thread (``jobs.channel``). ``checkpoint_s``
  there is the median seconds one checkpoint of this attempt took to save and commit (``None``
  before the first): the cost the orchestrator weighs against the interruption hazard.
- Exit codes (``jobs.exits``): 0 done (final adapter committed), 75 preempted, 76 stopped as told
  (both resumable), 2 bad input, 3 this machine cannot run it, 69 the store stayed unreachable,
  1 failure.

Imports only ``jobs`` and ``infra``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from infra.storage import StorageError
from jobs.channel import (
    STORE_WAIT_S,
    Beacon,
    Fenced,
    StoreUnavailable,
    Uploader,
    check_lease,
    find_resume_point,
    retry_store,
)
from jobs.exits import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_FENCED,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_SETUP_FAILED,
    EXIT_STOPPED,
    EXIT_STORE_UNAVAILABLE,
)

UPLOAD_DRAIN_S = float(os.environ.get("TUNEFLEET_UPLOAD_DRAIN_S", "600"))


class SetupError(Exception):
    """This machine cannot run the payload (a package missing, no GPU where one is required)."""


class _Preemption:
    """SIGTERM handling. Before training starts there is nothing to save: exit at once."""

    def __init__(self) -> None:
        self.requested = False
        self.training = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True
        print(f"[tunefleet] SIGTERM received (training={self.training})", file=sys.stderr, flush=True)
        if not self.training:
            raise SystemExit(EXIT_PREEMPTED)


PREEMPTION = _Preemption()


def _arg(parser_value: str | None, env: str) -> str | None:
    return parser_value if parser_value is not None else os.environ.get(env)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n")[0])
    p.add_argument("--spec", help="job spec JSON file (env TUNEFLEET_SPEC; or TUNEFLEET_SPEC_JSON inline)")
    p.add_argument("--store", help="checkpoint store URI (env TUNEFLEET_STORE)")
    p.add_argument("--job-id", help="env TUNEFLEET_JOB_ID")
    p.add_argument("--attempt-id", help="env TUNEFLEET_ATTEMPT_ID")
    p.add_argument("--work-dir", help="local scratch folder (default: a temp folder)")
    ns = p.parse_args(argv)
    ns.spec = _arg(ns.spec, "TUNEFLEET_SPEC")
    ns.store = _arg(ns.store, "TUNEFLEET_STORE")
    ns.job_id = _arg(ns.job_id, "TUNEFLEET_JOB_ID")
    ns.attempt_id = _arg(ns.attempt_id, "TUNEFLEET_ATTEMPT_ID") or "manual"
    ns.work_dir = _arg(ns.work_dir, "TUNEFLEET_WORK_DIR")
    return ns


def _load_spec(ns: argparse.Namespace):
    from jobs.spec import JobSpec

    if ns.spec:
        raw = json.loads(Path(ns.spec).read_text())
    elif os.environ.get("TUNEFLEET_SPEC_JSON"):
        raw = json.loads(os.environ["TUNEFLEET_SPEC_JSON"])
    else:
        raise ValueError("no job spec: pass --spec FILE or set TUNEFLEET_SPEC_JSON")
    JobSpec.from_payload_dict(raw)  # a bad spec fails here, before anything is downloaded
    return raw


def _materialize(raw: dict, store):
    """The spec with its staged inputs downloaded and verified here (``jobs.inputs``). A store that
    does not answer is waited out like any store fault; a missing or corrupted input is bad input."""
    from jobs.inputs import InputError, materialize
    from jobs.spec import JobSpec

    def fetch():
        try:
            return materialize(raw, store, say=lambda m: print(f"[tunefleet] {m}", file=sys.stderr, flush=True))
        except InputError as exc:
            return exc

    got = retry_store("fetching the job's inputs", fetch, deadline_s=STORE_WAIT_S)
    if isinstance(got, InputError):
        raise got
    return JobSpec.from_payload_dict(got)


def resolve_device(spec) -> str:
    import torch

    wants_gpu = spec.resources.gpus > 0 and spec.resources.device != "cpu"
    if wants_gpu and torch.cuda.is_available():
        return "cuda"
    if wants_gpu and spec.resources.device == "cuda":
        raise SetupError("the job asks for device: cuda, but no CUDA GPU is visible here")
    return "cpu"


def load_model_and_tokenizer(spec, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed

    from jobs.tiny import TINY_MODEL_ID, tiny_model_dir

    source = str(tiny_model_dir()) if spec.base_model == TINY_MODEL_ID else spec.base_model
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    use_bf16 = device == "cuda" and torch.cuda.is_bf16_supported() and spec.bf16 in ("auto", True)
    compute_dtype = torch.bfloat16 if use_bf16 else torch.float32
    kwargs: dict[str, Any] = {"dtype": compute_dtype}
    if spec.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    elif spec.load_in_8bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if device == "cuda" and "quantization_config" in kwargs:
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    # LoRA's A matrices are drawn from the global RNG: seed it, or every attempt starts elsewhere.
    set_seed(spec.seed)
    if spec.adapter:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if spec.load_in_4bit or spec.load_in_8bit:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=spec.gradient_checkpointing
            )
        targets: Any = list(spec.lora_target_modules) if spec.lora_target_modules else "all-linear"
        model = get_peft_model(
            model,
            LoraConfig(
                r=spec.lora_r,
                lora_alpha=spec.lora_alpha,
                lora_dropout=spec.lora_dropout,
                target_modules=targets,
                task_type="CAUSAL_LM",
            ),
        )
    return model, tokenizer, use_bf16


class TimedUploader(Uploader):
    """An :class:`Uploader` that also measures what each checkpoint costs: the seconds the Trainer
    spent writing it (measured by the callback, passed to ``submit``), plus staging it, plus the
    seconds its commit took on the upload thread (not the time it waited in the queue; store
    outages ridden out are in it, which the median damps). ``progress.json`` gets the median over
    this attempt's committed checkpoints as ``checkpoint_s``."""

    def __init__(self, *args: Any, clock=time.monotonic, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock = clock
        self.checkpoint_s: list[float] = []  # save + commit seconds of each committed checkpoint
        self._save_s: dict[int, float] = {}  # step -> seconds spent on the training thread
        self._cost_lock = threading.Lock()

    def submit(self, step: int, folder: Path, meta: dict[str, Any], save_s: float = 0.0) -> None:
        t0 = self.clock()
        with self._cost_lock:
            self._save_s[step] = save_s
        super().submit(step, folder, meta)
        with self._cost_lock:
            if step in self._save_s:  # its commit has not finished already (it practically never has)
                self._save_s[step] += self.clock() - t0

    def _commit(self, step: int, snap: Path, meta: dict[str, Any]) -> None:
        t0 = self.clock()
        committed = len(self.committed)
        super()._commit(step, snap, meta)
        with self._cost_lock:
            save_s = self._save_s.pop(step, 0.0)
        if len(self.committed) == committed:
            return  # fenced, or superseded by a newer checkpoint: nothing committed, nothing to say
        self.checkpoint_s.append(save_s + self.clock() - t0)
        self.progress.update(force=True, checkpoint_s=round(statistics.median(self.checkpoint_s), 4))


def _make_callback(uploader: TimedUploader, attempt_id: str, progress: Beacon, tokens_per_step: float,
                   interval_s: float | None = None, clock=time.monotonic):
    from transformers import TrainerCallback

    class StoreCallback(TrainerCallback):
        """Commits each checkpoint the Trainer writes, reports progress, obeys SIGTERM and the
        daemon's control object (both: save at this step, then leave), and asks for a save once
        ``interval_s`` seconds of training passed since the last one (``clock``: monotonic)."""

        def __init__(self) -> None:
            self.t0 = time.time()
            self.start_step: int | None = None
            self.loss: float | None = None
            self.eval_loss: float | None = None
            self.last_save = clock()  # when the last save ended, or training began in this attempt
            self.busy_until = clock()  # when the Trainer's last work before a save (step, log, eval) ended

        def on_train_begin(self, args, state, control, **kw):
            self.start_step = state.global_step
            self.t0 = time.time()
            self.last_save = clock()
            PREEMPTION.training = True
            progress.update(force=True, state="running", step=state.global_step, total_steps=state.max_steps,
                            checkpoint_s=None)
            if PREEMPTION.requested or progress.should_stop():
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])
            if logs and "eval_loss" in logs:
                self.eval_loss = float(logs["eval_loss"])
                progress.update(force=True, eval_loss=self.eval_loss)
            self.busy_until = clock()

        def on_evaluate(self, args, state, control, **kw):
            self.busy_until = clock()

        def on_step_end(self, args, state, control, **kw):
            done = state.global_step - (self.start_step or 0)
            elapsed = max(time.time() - self.t0, 1e-6)
            progress.update(
                step=state.global_step,
                total_steps=state.max_steps,
                loss=self.loss,
                epoch=state.epoch,
                tokens_per_s=round(done * tokens_per_step / elapsed, 1),
            )
            if interval_s is not None and progress.fenced is None and clock() - self.last_save >= interval_s:
                control.should_save = True  # time-based; the step interval (set by the Trainer) still holds
            if PREEMPTION.requested or progress.should_stop():
                control.should_save = progress.fenced is None  # a fenced attempt saves nothing
                control.should_training_stop = True
            self.busy_until = clock()

        def on_save(self, args, state, control, **kw):
            # the Trainer saved between the end of its last step/log/eval and now
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            uploader.submit(state.global_step, folder,
                            {"attempt_id": attempt_id, "loss": self.loss, "eval_loss": self.eval_loss},
                            save_s=clock() - self.busy_until)
            self.last_save = clock()

    return StoreCallback()


def train(ns: argparse.Namespace) -> int:
    from infra.storage import open_store

    raw = _load_spec(ns)
    job_id = ns.job_id
    if not job_id:
        raise ValueError("no job id: pass --job-id or set TUNEFLEET_JOB_ID")
    session = None
    if ns.store.startswith("s3://"):  # expiring attempt credentials renew themselves from the store
        from infra.credentials import refreshable_session

        session = refreshable_session(ns.store, job_id, ns.attempt_id)
    store = open_store(ns.store, session=session)
    progress = Beacon(store, job_id, ns.attempt_id).start()
    progress.update(force=True, state="starting")
    try:
        spec = _materialize(raw, store)
        return _train(ns, spec, store, job_id, progress, base_model=raw["base_model"])
    finally:
        progress.close()


def _train(ns: argparse.Namespace, spec, store, job_id: str, progress: Beacon, base_model: str) -> int:
    from jobs import data as data_mod

    # bitsandbytes' CPU 4-bit kernels use OpenMP threads of their own, beyond torch.set_num_threads,
    # and their results depend on the thread count: pin it (before torch loads) to the CPUs the job
    # reserved, or two runs of the same QLoRA job on CPU are not bitwise equal.
    os.environ["OMP_NUM_THREADS"] = str(max(1, spec.resources.cpus))

    own_work = ns.work_dir is None
    work_dir = Path(ns.work_dir or tempfile.mkdtemp(prefix=f"tunefleet-{job_id}-"))
    work_dir.mkdir(parents=True, exist_ok=True)

    try:
        import torch
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer
    except ImportError as exc:
        raise SetupError(f"the training packages are not installed here: {exc}") from exc

    device = resolve_device(spec)
    if device == "cpu":
        torch.set_num_threads(max(1, spec.resources.cpus))
    model, tokenizer, use_bf16 = load_model_and_tokenizer(spec, device)
    examples, dropped = data_mod.load_examples([d.model_dump() for d in spec.datasets], tokenizer, spec.sequence_len)
    if dropped:
        print(f"[tunefleet] warning: dropped {dropped} examples whose response does not fit in "
              f"sequence_len {spec.sequence_len}", file=sys.stderr, flush=True)
    train_ex, val_ex = data_mod.split(examples, spec.val_set_size, spec.seed)

    def to_ds(exs):
        return Dataset.from_dict(
            {"input_ids": [e.input_ids for e in exs], "completion_mask": [e.completion_mask for e in exs]}
        )

    resume_dir, resume_step = find_resume_point(store, job_id, work_dir)
    if resume_dir is None and spec.checkpoint.resume_from:
        # continue another job's training (a sweep's next rung) from its newest checkpoint
        resume_dir, resume_step = find_resume_point(store, spec.checkpoint.resume_from, work_dir)
        print(f"[tunefleet] seeded from job {spec.checkpoint.resume_from} at step {resume_step}",
              file=sys.stderr, flush=True)
    progress.update(force=True, resumed_from_step=resume_step)
    print(f"[tunefleet] job {job_id} attempt {ns.attempt_id}: device={device} "
          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}), "
          f"{len(train_ex)} train / {len(val_ex)} eval examples, resume from step {resume_step}",
          file=sys.stderr, flush=True)

    batch = spec.micro_batch_size * spec.gradient_accumulation_steps
    mean_len = sum(len(e.input_ids) for e in train_ex) / len(train_ex)
    config = SFTConfig(
        output_dir=str(work_dir),
        max_steps=spec.max_steps or -1,
        num_train_epochs=spec.num_epochs,
        per_device_train_batch_size=spec.micro_batch_size,
        per_device_eval_batch_size=spec.micro_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        learning_rate=spec.learning_rate,
        lr_scheduler_type=spec.lr_scheduler,
        warmup_steps=spec.warmup_steps,
        optim=_optimizer(spec.optimizer, device),
        weight_decay=spec.weight_decay,
        max_grad_norm=spec.max_grad_norm,
        seed=spec.seed,
        data_seed=spec.seed,
        save_strategy="steps",
        save_steps=spec.save_every,
        save_total_limit=2,
        logging_steps=spec.logging_steps,
        eval_strategy="steps" if val_ex else "no",
        eval_steps=spec.save_every if val_ex else None,
        report_to=[],
        use_cpu=device == "cpu",
        bf16=use_bf16,
        gradient_checkpointing=spec.gradient_checkpointing,
        dataloader_num_workers=0,
        max_length=spec.sequence_len,
        packing=spec.sample_packing,
        completion_only_loss=True,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=to_ds(train_ex),
        eval_dataset=to_ds(val_ex) if val_ex else None,
        processing_class=tokenizer,
    )
    # TRL casts QLoRA adapter weights to bf16, but resuming loads them through peft's
    # load_adapter, which upcasts them to fp32: a resumed attempt would train in another
    # precision than an uninterrupted one. Keep them fp32 from the start so both match exactly.
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
    card = getattr(model, "create_or_update_model_card", None)
    if card is not None:
        # peft renders a README model card (a Jinja template compiled anew) into every checkpoint:
        # ~40 % of a tiny model's save time, for a file nobody reads. Only the final adapter gets one.
        model.create_or_update_model_card = lambda *a, **k: None
    uploader = TimedUploader(store, job_id, spec.checkpoint.keep, progress, work_dir / "staging")
    callback = _make_callback(uploader, ns.attempt_id, progress, batch * mean_len,
                              interval_s=spec.checkpoint.interval_s)
    trainer.add_callback(callback)

    try:
        result = trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    finally:
        # whatever happened, what was saved gets committed (SIGTERM: within the grace period)
        uploader.drain(timeout_s=UPLOAD_DRAIN_S)
    step = trainer.state.global_step
    print(f"[tunefleet] checkpoint uploads took {uploader.upload_s:.2f} s in the background",
          file=sys.stderr, flush=True)
    if progress.fenced is not None:
        print(f"[tunefleet] {progress.fenced}; exiting {EXIT_FENCED} at step {step} without writing",
              file=sys.stderr, flush=True)
        return EXIT_FENCED
    if PREEMPTION.requested:
        progress.update(force=True, state="preempted", step=step)
        print(f"[tunefleet] preempted at step {step}; checkpoint committed, exiting {EXIT_PREEMPTED}",
              file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    if progress.should_stop() and step < trainer.state.max_steps:
        progress.update(force=True, state="stopped", step=step)
        print(f"[tunefleet] stopped at step {step} ({progress.should_stop()}); checkpoint committed, "
              f"exiting {EXIT_STOPPED}", file=sys.stderr, flush=True)
        return EXIT_STOPPED

    eval_loss = None
    if val_ex:
        eval_loss = float(trainer.evaluate()["eval_loss"])
    final_dir = work_dir / "final"
    if card is not None:
        model.create_or_update_model_card = card
    trainer.save_model(str(final_dir))
    tokenizer.save_pretrained(str(final_dir))
    meta = {
        "step": step,
        "train_loss": float(result.training_loss) if result.training_loss is not None else None,
        "train_runtime_s": float(result.metrics.get("train_runtime", 0.0)),
        "checkpoint_upload_s": round(uploader.upload_s, 3),
        "checkpoints_committed": uploader.committed,
        # loss curves for reports: [step, value] pairs from the Trainer's own log
        "history": _thin([[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h]),
        "eval_history": _thin([[h["step"], h["eval_loss"]] for h in trainer.state.log_history if "eval_loss" in h]),
        "final_loss": callback.loss,
        "eval_loss": eval_loss,
        "attempt_id": ns.attempt_id,
        "base_model": base_model,  # as the user named it, not where this attempt's copy lies
        "adapter": spec.adapter,
        "seed": spec.seed,
        "resumed_from_step": resume_step,
    }
    (final_dir / "tunefleet_training.json").write_text(json.dumps(meta, indent=1))

    def commit_final():
        check_lease(store, job_id, ns.attempt_id)
        return store.commit_final(job_id, final_dir, meta=meta)

    try:
        ref = retry_store("committing the final adapter", commit_final, deadline_s=UPLOAD_DRAIN_S)
    except Fenced as exc:
        progress.fence(str(exc))
        return EXIT_FENCED
    progress.update(
        force=True, state="succeeded", step=step, loss=callback.loss, eval_loss=eval_loss,
        adapter_uri=ref.uri, final_loss=callback.loss,
    )
    if own_work:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(f"[tunefleet] done at step {step}; final adapter -> {ref.uri}", file=sys.stderr, flush=True)
    return EXIT_OK


def _thin(points: list, limit: int = 500) -> list:
    """At most ``limit`` evenly spaced points, always keeping the last one."""
    if len(points) <= limit:
        return points
    stride = len(points) / limit
    return [points[int(i * stride)] for i in range(limit - 1)] + [points[-1]]


def _optimizer(name: str, device: str) -> str:
    """Paged optimizers need CUDA; on CPU fall back to their non-paged twin (same maths)."""
    if device == "cpu" and name.startswith("paged_"):
        return {"paged_adamw_32bit": "adamw_torch", "paged_adamw_8bit": "adamw_bnb_8bit"}.get(name, "adamw_torch")
    if name == "adamw_8bit":
        return "adamw_bnb_8bit"
    return name


_EXIT_STATES = {EXIT_OK: "succeeded", EXIT_PREEMPTED: "preempted", EXIT_STOPPED: "stopped"}


def _report_exit(ns: argparse.Namespace, code: int, error: str | None) -> None:
    """Last word in progress.json: the exit code. For a remote attempt this is how the daemon
    learns how the payload ended, since it cannot see the process (the design's only channel)."""
    if not (ns.store and ns.job_id):
        return
    try:
        from infra.storage import open_store

        store = open_store(ns.store)
        if code == EXIT_FENCED:
            return  # progress.json is the current attempt's
        check_lease(store, ns.job_id, ns.attempt_id)
        doc = store.read_json(ns.job_id, "progress.json") or {}
        if doc.get("attempt_id") != ns.attempt_id:
            doc = {"attempt_id": ns.attempt_id, "step": 0}
        doc.update(state=_EXIT_STATES.get(code, "failed"), exit_code=code, updated_at=time.time())
        if error:
            doc["error"] = error[-2000:]
        store.write_json(ns.job_id, "progress.json", doc)
    except Fenced as exc:
        print(f"[tunefleet] not reporting exit {code}: {exc}", file=sys.stderr, flush=True)
    except Exception as exc:  # reporting must never change the exit code
        print(f"[tunefleet] could not report exit {code}: {exc}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    PREEMPTION.install()
    ns = parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    error = None
    try:
        if not ns.store:
            raise ValueError("no checkpoint store: pass --store URI or set TUNEFLEET_STORE")
        code = train(ns)
    except SystemExit as exc:
        code = int(exc.code or 0)
    except (StoreUnavailable, StorageError) as exc:  # never the job's own failure: the daemon decides
        print(f"[tunefleet] store unavailable: {exc}", file=sys.stderr, flush=True)
        code, error = EXIT_STORE_UNAVAILABLE, f"store unavailable: {exc}"
    except SetupError as exc:
        print(f"[tunefleet] cannot run here: {exc}", file=sys.stderr, flush=True)
        code, error = EXIT_SETUP_FAILED, f"setup failed: {exc}"
    except (ValueError, FileNotFoundError) as exc:
        print(f"[tunefleet] bad input: {exc}", file=sys.stderr, flush=True)
        traceback.print_exc()
        code, error = EXIT_BAD_INPUT, f"bad input: {exc}"
    except Exception as exc:
        traceback.print_exc()
        code, error = EXIT_FAILED, f"{type(exc).__name__}: {exc}"
    _report_exit(ns, code, error)
    return code


if __name__ == "__main__":
    sys.exit(main())
