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
- A job on several GPUs (``resources.gpus > 1``; ``jobs.gang``) runs as one process per GPU,
  started by this same command: DDP for adapters, FSDP for a full fine-tune, the spec's global
  batch kept whatever the process count. Rank 0 alone talks to the store; every rank stops and
  saves at the same step.
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
from jobs.gang import PlanError, Rank, enable_cpu_fsdp
from jobs.gang import plan as plan_gang
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


class _Silent:
    """What a rank other than 0 has instead of a :class:`Beacon`: rank 0 alone talks to the store,
    and the gang learns of a stop through :meth:`jobs.gang.Rank.agree`."""

    fenced = None

    def start(self):
        return self

    def update(self, force: bool = False, **fields: Any) -> None:
        pass

    def should_stop(self) -> None:
        return None

    def fence(self, why: str) -> None:
        pass

    def close(self) -> None:
        pass


def _arg(parser_value: str | None, env: str) -> str | None:
    return parser_value if parser_value is not None else os.environ.get(env)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n")[0])
    p.add_argument("--spec", help="job spec JSON file (env TUNEFLEET_SPEC; or TUNEFLEET_SPEC_JSON inline)")
    p.add_argument("--store", help="checkpoint store URI (env TUNEFLEET_STORE)")
    p.add_argument("--job-id", help="env TUNEFLEET_JOB_ID")
    p.add_argument("--attempt-id", help="env TUNEFLEET_ATTEMPT_ID")
    p.add_argument("--work-dir", help="local scratch folder (default: a temp folder)")
    p.add_argument("--processes", type=int,
                   help="train in this many processes (default: one per GPU the job asks for and this machine "
                        "shows; env TUNEFLEET_PROCESSES)")
    ns = p.parse_args(argv)
    ns.spec = _arg(ns.spec, "TUNEFLEET_SPEC")
    ns.store = _arg(ns.store, "TUNEFLEET_STORE")
    ns.job_id = _arg(ns.job_id, "TUNEFLEET_JOB_ID")
    ns.attempt_id = _arg(ns.attempt_id, "TUNEFLEET_ATTEMPT_ID") or "manual"
    ns.work_dir = _arg(ns.work_dir, "TUNEFLEET_WORK_DIR")
    if ns.processes is None and os.environ.get("TUNEFLEET_PROCESSES"):
        ns.processes = int(os.environ["TUNEFLEET_PROCESSES"])
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


def _materialize(raw: dict, store, quiet: bool = False):
    """The spec with its staged inputs downloaded and verified here (``jobs.inputs``). A store that
    does not answer is waited out like any store fault; a missing or corrupted input is bad input."""
    from jobs.inputs import InputError, materialize
    from jobs.spec import JobSpec

    def fetch():
        try:
            return materialize(raw, store, say=None if quiet else lambda m: print(f"[tunefleet] {m}", file=sys.stderr,
                                                                                   flush=True))
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


def load_model_and_tokenizer(spec, device: str, device_index: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed

    from jobs.tiny import TINY_MODEL_ID, TinyModelError, tiny_model_dir

    try:
        source = str(tiny_model_dir()) if spec.base_model == TINY_MODEL_ID else spec.base_model
    except TinyModelError as exc:  # this machine's installation is damaged: another can run the job
        raise SetupError(str(exc)) from exc
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
        kwargs["device_map"] = {"": device_index}
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if device == "cpu" and spec.load_in_4bit:
        _keep_4bit_layout(model)
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


def _keep_4bit_layout(model) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit layer's weights on its first
    forward pass in eval mode and unpacks them when saving, and the round trip is not exact (logits
    then differ by up to 0.17): a QLoRA job with an eval split would train on other weights after
    each eval and resume inexactly. Keep the layout training uses."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


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


def _make_callback(uploader: TimedUploader | None, attempt_id: str, progress: Beacon, tokens_per_step: float,
                   interval_s: float | None = None, clock=time.monotonic, rank: Rank | None = None):
    from transformers import TrainerCallback

    gang = rank or Rank()

    class StoreCallback(TrainerCallback):
        """Commits each checkpoint the Trainer writes, reports progress, obeys SIGTERM and the
        daemon's control object (both: save at this step, then leave), and asks for a save once
        ``interval_s`` seconds of training passed since the last one (``clock``: monotonic).

        In a gang every rank runs it: the stop and save decisions are agreed (``Rank.agree``) at
        each step end, so all ranks leave the loop, and save, at the same step; rank 0 alone
        reports and uploads (``uploader`` is None elsewhere), after every rank wrote its share."""

        def __init__(self) -> None:
            self.t0 = time.time()
            self.start_step: int | None = None
            self.loss: float | None = None
            self.eval_loss: float | None = None
            self.last_save = clock()  # when the last save ended, or training began in this attempt
            self.busy_until = clock()  # when the Trainer's last work before a save (step, log, eval) ended
            self.preempted = False  # the gang agreed to stop because a rank got SIGTERM
            self.stopped = False  # ... because the store said stop (rank 0 read it)
            self.fenced = False  # ... because another attempt holds the job

        def _decide(self, save_by_time: bool) -> tuple[bool, bool]:
            """(stop, save) for this step end, the same on every rank."""
            preempt, stop, fenced, save = gang.agree(PREEMPTION.requested, progress.should_stop() is not None,
                                                     progress.fenced is not None, save_by_time)
            self.preempted, self.stopped, self.fenced = preempt, stop and not preempt, fenced
            if preempt or stop:
                return True, not fenced  # a fenced attempt saves nothing
            return False, save and not fenced

        def on_train_begin(self, args, state, control, **kw):
            self.start_step = state.global_step
            self.t0 = time.time()
            self.last_save = clock()
            PREEMPTION.training = True
            progress.update(force=True, state="running", step=state.global_step, total_steps=state.max_steps,
                            checkpoint_s=None)
            if self._decide(False)[0]:
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
            # time-based (rank 0's clock); the step interval (set by the Trainer) still holds
            by_time = gang.main and interval_s is not None and clock() - self.last_save >= interval_s
            stop, save = self._decide(by_time)
            if save:
                control.should_save = True
            if stop:
                control.should_save = save
                control.should_training_stop = True
            self.busy_until = clock()

        def on_save(self, args, state, control, **kw):
            # the Trainer saved between the end of its last step/log/eval and now
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            gang.barrier()  # every rank's share (RNG state, shards) is in the folder
            if uploader is None:
                return
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
    rank = Rank()
    progress = Beacon(store, job_id, ns.attempt_id).start() if rank.main else _Silent()
    progress.update(force=True, state="starting")
    try:
        from jobs.spec import JobSpec

        rank.init(resolve_device(JobSpec.from_payload_dict(raw)))
        if not rank.main:
            rank.barrier()  # rank 0 fetches the inputs into the cache first; the others then verify them there
        spec = _materialize(raw, store, quiet=not rank.main)
        if rank.main:
            rank.barrier()
        return _train(ns, spec, store, job_id, progress, base_model=raw["base_model"], rank=rank)
    finally:
        progress.close()
        rank.close()


def _train(ns: argparse.Namespace, spec, store, job_id: str, progress: Beacon, base_model: str,
           rank: Rank | None = None) -> int:
    from jobs import data as data_mod

    rank = rank or Rank()

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
    try:
        gang = plan_gang(spec, device, torch.cuda.device_count() if device == "cuda" else 0, ns.processes)
    except PlanError as exc:
        raise SetupError(str(exc)) from exc
    if gang.processes != rank.world:
        raise SetupError(f"planned {gang.processes} processes but this gang has {rank.world}")
    if device == "cpu":
        # the job's CPUs, shared by its ranks
        torch.set_num_threads(max(1, spec.resources.cpus // rank.world))
    if gang.strategy == "fsdp" and device == "cpu":
        enable_cpu_fsdp()
    model, tokenizer, use_bf16 = load_model_and_tokenizer(spec, device, rank.local_rank)
    examples, dropped = data_mod.load_examples([d.model_dump() for d in spec.datasets], tokenizer, spec.sequence_len)
    if dropped:
        print(f"[tunefleet] warning: dropped {dropped} examples whose response does not fit in "
              f"sequence_len {spec.sequence_len}", file=sys.stderr, flush=True)
    if spec.eval_datasets:  # measured on files of their own; everything in datasets is trained on
        train_ex = examples
        val_ex, _ = data_mod.load_examples([d.model_dump() for d in spec.eval_datasets], tokenizer,
                                           spec.sequence_len)
    else:
        train_ex, val_ex = data_mod.split(examples, spec.val_set_size, spec.seed)

    def to_ds(exs):
        return Dataset.from_dict(
            {"input_ids": [e.input_ids for e in exs], "completion_mask": [e.completion_mask for e in exs]}
        )

    resume_dir, resume_step = None, 0
    if rank.main:  # rank 0 downloads into the shared work folder; the others read it there
        resume_dir, resume_step = find_resume_point(store, job_id, work_dir)
        if resume_dir is None and spec.checkpoint.resume_from:
            # continue another job's training (a sweep's next rung) from its newest checkpoint
            resume_dir, resume_step = find_resume_point(store, spec.checkpoint.resume_from, work_dir)
            print(f"[tunefleet] seeded from job {spec.checkpoint.resume_from} at step {resume_step}",
                  file=sys.stderr, flush=True)
    resume_dir, resume_step = rank.broadcast((resume_dir, resume_step))
    if resume_dir is not None and gang.strategy != "fsdp" and any(Path(resume_dir).glob("pytorch_model_fsdp*")):
        raise SetupError(f"checkpoint {resume_step} was written by FSDP ranks and resumes only under FSDP "
                         f"(this attempt: {gang.describe()}); a machine with 2 or more GPUs can resume it")
    progress.update(force=True, resumed_from_step=resume_step)
    if rank.main:
        print(f"[tunefleet] job {job_id} attempt {ns.attempt_id}: device={device} "
              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}), {gang.describe()}, "
              f"{len(train_ex)} train / {len(val_ex)} eval examples, resume from step {resume_step}",
              file=sys.stderr, flush=True)

    batch = gang.global_batch
    mean_len = sum(len(e.input_ids) for e in train_ex) / len(train_ex)
    config = SFTConfig(
        output_dir=str(work_dir),
        max_steps=spec.max_steps or -1,
        num_train_epochs=spec.num_epochs,
        per_device_train_batch_size=gang.micro_batch,
        per_device_eval_batch_size=gang.micro_batch,
        gradient_accumulation_steps=gang.accumulation,
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
        **_distributed_args(gang.strategy),
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
    uploader = TimedUploader(store, job_id, spec.checkpoint.keep, progress, work_dir / "staging") if rank.main else None
    callback = _make_callback(uploader, ns.attempt_id, progress, batch * mean_len,
                              interval_s=spec.checkpoint.interval_s, rank=rank)
    trainer.add_callback(callback)

    try:
        result = trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    finally:
        # whatever happened, what was saved gets committed (SIGTERM: within the grace period)
        if uploader is not None:
            uploader.drain(timeout_s=UPLOAD_DRAIN_S)
    step = trainer.state.global_step
    if not rank.main:
        if callback.preempted or callback.stopped or callback.fenced:
            return EXIT_PREEMPTED if callback.preempted else EXIT_STOPPED
        _finish(trainer, val_ex, work_dir, gang.strategy, device, rank)
        return EXIT_OK
    print(f"[tunefleet] checkpoint uploads took {uploader.upload_s:.2f} s in the background",
          file=sys.stderr, flush=True)
    if progress.fenced is not None:
        print(f"[tunefleet] {progress.fenced}; exiting {EXIT_FENCED} at step {step} without writing",
              file=sys.stderr, flush=True)
        return EXIT_FENCED
    if PREEMPTION.requested or callback.preempted:
        progress.update(force=True, state="preempted", step=step)
        print(f"[tunefleet] preempted at step {step}; checkpoint committed, exiting {EXIT_PREEMPTED}",
              file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    if (progress.should_stop() or callback.stopped) and step < trainer.state.max_steps:
        progress.update(force=True, state="stopped", step=step)
        print(f"[tunefleet] stopped at step {step} ({progress.should_stop()}); checkpoint committed, "
              f"exiting {EXIT_STOPPED}", file=sys.stderr, flush=True)
        return EXIT_STOPPED

    if card is not None:
        model.create_or_update_model_card = card
    eval_loss, final_dir = _finish(trainer, val_ex, work_dir, gang.strategy, device, rank)
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


def _finish(trainer, val_ex, work_dir: Path, strategy: str, device: str, rank: Rank) -> tuple[float | None, Path]:
    """The final eval loss (None without eval data) and the final model written to
    ``work_dir/final`` (by rank 0). Every rank of a gang calls it: both are collectives."""
    eval_loss = float(trainer.evaluate()["eval_loss"]) if val_ex else None
    final_dir = work_dir / "final"
    if strategy != "fsdp":
        trainer.save_model(str(final_dir))
        return eval_loss, final_dir
    # FSDP checkpoints are sharded (any process count >= 2 resumes them); the final model is whole
    from jobs.gang import full_state_dict

    weights = full_state_dict(trainer.model_wrapped, device)
    if rank.main:
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(str(final_dir), state_dict=weights)
    rank.barrier()
    return eval_loss, final_dir


def _distributed_args(strategy: str) -> dict[str, Any]:
    """Trainer arguments for the gang's strategy. DDP: every LoRA parameter takes part in every
    step (no unused-parameter search). FSDP: torch's FSDP2, one unit per decoder layer, sharded
    checkpoints (torch.distributed.checkpoint, which reshards: another FSDP process count resumes
    them) and a whole model at the end (``_finish``)."""
    if strategy == "ddp":
        return {"ddp_find_unused_parameters": False}
    if strategy == "fsdp":
        return {"fsdp": "full_shard auto_wrap",
                "fsdp_config": {"fsdp_version": 2, "state_dict_type": "SHARDED_STATE_DICT",
                                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True}}
    return {}


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


def _gang_size(ns: argparse.Namespace) -> int:
    """How many ranks this attempt trains in (``jobs.gang.plan``); 1 means in this process."""
    import torch

    from jobs.spec import JobSpec

    spec = JobSpec.from_payload_dict(_load_spec(ns))
    device = resolve_device(spec)
    try:
        return plan_gang(spec, device, torch.cuda.device_count() if device == "cuda" else 0, ns.processes).processes
    except PlanError as exc:
        raise SetupError(str(exc)) from exc


def _launch(ns: argparse.Namespace, processes: int) -> tuple[int, str | None]:
    """Train as a gang of ``processes`` ranks (``jobs.gang.launch``) sharing one work folder."""
    from jobs import gang

    argv = []
    for flag, value in (("--spec", ns.spec), ("--store", ns.store), ("--job-id", ns.job_id),
                        ("--attempt-id", ns.attempt_id)):
        if value is not None:
            argv += [flag, value]
    own_work = ns.work_dir is None
    work_dir = Path(ns.work_dir or tempfile.mkdtemp(prefix=f"tunefleet-{ns.job_id}-"))
    try:
        return gang.launch(argv, processes, work_dir)
    finally:
        if own_work:
            shutil.rmtree(work_dir, ignore_errors=True)


def _run(ns: argparse.Namespace, lead: bool) -> tuple[int, str | None]:
    """Train (as the whole attempt when ``lead``, else as one rank of a gang); (exit code, error)."""
    error = None
    try:
        if not ns.store:
            raise ValueError("no checkpoint store: pass --store URI or set TUNEFLEET_STORE")
        if lead and (n := _gang_size(ns)) > 1:
            return _launch(ns, n)
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
    return code, error


def main(argv: list[str] | None = None) -> int:
    PREEMPTION.install()
    ns = parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.environ.get("TUNEFLEET_GANG_DIR"):  # one rank of a gang: its launcher reports for all
        from jobs.gang import write_report

        code, error = _run(ns, lead=False)
        write_report(code, error)
        return code
    code, error = _run(ns, lead=True)
    _report_exit(ns, code, error)
    return code


if __name__ == "__main__":
    sys.exit(main())
