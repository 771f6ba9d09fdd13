"""The training recipe, readable top to bottom: open the run, prepare, train, finish.

An explicit loop on `accelerate`. The loss of an optimizer step is the sum of token losses over
all its micro-batches (and ranks) divided by their supervised-token count, so accumulation of k
micro-batches equals one batch k times larger (docs/ARCHITECTURE.md, "Loss").
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith import cpu, run_folder
from tunesmith.config import RunConfig
from tunesmith.data.batching import (
    Sample,
    collate,
    collate_padded,
    pack_best_fit,
    pad_varlen,
    plan_micro_batches,
    split_varlen,
)
from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.data.store import sample_lengths
from tunesmith.data.streaming import SampleStream
from tunesmith.errors import UserError
from tunesmith.model.finetune import apply_finetuning, base_dtype_for_training, final_save_kwargs
from tunesmith.model.load import load_adapters, load_model, load_tokenizer
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import distributed, guard
from tunesmith.train.flops import flop_counts
from tunesmith.train.kernels import cpu_kernels, cpu_row_multiple
from tunesmith.train.logs import RunLog, StepMeter, plot_loss
from tunesmith.train.loss import SFTModule
from tunesmith.train.model_changes import training_changes
from tunesmith.train.trackers import open_trackers


@dataclass
class StepPlan:
    """How the sample stream is cut into optimizer steps; a pure function of config and data."""

    micro_per_step: int  # micro-batches per optimizer step across all ranks (k x world)
    steps_per_epoch: int
    total_steps: int


def make_plan(n_micro_per_epoch: int, cfg: RunConfig, world: int) -> StepPlan:
    t = cfg.train
    per_step = t.gradient_accumulation_steps * world
    steps_per_epoch = max(1, math.ceil(n_micro_per_epoch / per_step))
    total = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_train_epochs * steps_per_epoch))
    return StepPlan(per_step, steps_per_epoch, total)


def _precision(cfg: RunConfig, device: torch.device) -> str:
    from tunesmith.env import bf16_supported

    if cfg.train.fp16:
        if device.type != "cuda":
            raise UserError("fp16: true needs a CUDA GPU; this machine trains on the CPU.",
                            hint="use bf16: true (CPUs with AVX512-BF16/AMX) or neither (fp32).")
        return "fp16"
    if cfg.train.bf16:
        if not bf16_supported(device):
            raise UserError(f"bf16: true, but this {device.type.upper()} has no bfloat16 support.",
                            hint="set bf16: false to train in fp32.")
        return "bf16"
    return "no"


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm weights (1-D tensors), as is customary."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # ZeRO-3 partitioned parameters keep their real shape in ds_shape
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _to_samples(encoded: Sequence[Any]) -> Sequence[Sample]:
    """The samples as the loop batches them: read from the token store one micro-batch at a time
    (data held in memory, e.g. by tests, is wrapped as is)."""
    if hasattr(encoded, "as_samples"):
        return encoded.as_samples()
    return [Sample(e.input_ids, e.labels, i, e.weights) for i, e in enumerate(encoded)]


class MicroBatches(torch.utils.data.Dataset):
    """The micro-batches one rank processes in one epoch, collated (in workers if asked)."""

    def __init__(self, samples: Sequence[Sample], plan: list[list[list[int]]], layout: str, pad_id: int) -> None:
        self.samples, self.plan, self.layout, self.pad_id = samples, plan, layout, pad_id

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return collate([[self.samples[j] for j in row] for row in self.plan[i]], self.pad_id, self.layout)


def evaluate(module: torch.nn.Module, samples: Sequence[Sample], cfg: RunConfig, pad_id: int,
             accelerator: Any) -> float:
    """Token-weighted loss over the whole eval set (all ranks)."""
    plan = plan_micro_batches(sample_lengths(samples), batch_size=cfg.train.per_device_eval_batch_size,
                              seed=0, epoch=0, shuffle=False, packing=False, max_len=cfg.data.cutoff_len)
    mine = plan[accelerator.process_index :: accelerator.num_processes]
    # Every rank runs as many forwards as the busiest (the extra ones are not counted): ZeRO-3/FSDP
    # gather weights in each forward, and DDP broadcasts its buffers there, both collectives.
    fillers = max(0, distributed.lockstep_count(accelerator, len(mine), always=True) - len(mine))
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    was_training = module.training
    module.eval()
    with torch.no_grad(), accelerator.autocast():
        for i, rows in enumerate(mine + [plan[0]] * fillers):
            batch = distributed.to_device(collate_padded([samples[j] for row in rows for j in row], pad_id),
                                          accelerator.device)
            loss_sum, count = module(batch)
            if i < len(mine):
                total += torch.tensor([float(loss_sum), count], dtype=torch.float64, device=accelerator.device)
    module.train(was_training)
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def save_weights(model: Any, tokenizer: Any, folder: Path, accelerator: Any,
                 gathered: dict[str, torch.Tensor] | None = None, **save_kwargs: Any) -> None:
    """The trained result in standard form: a peft adapter folder, or a HF model folder. `gathered`:
    the weights collected from ZeRO-3/FSDP shards by every rank (distributed.gather_state_dict);
    otherwise the model's own parameters are whole and are saved as they are. `save_kwargs` go to
    save_pretrained (a PiSSA run's final save converts its adapter: finetune.final_save_kwargs)."""
    distributed.unwrap(accelerator, model).save_pretrained(folder, state_dict=gathered, safe_serialization=True,
                                                    **save_kwargs)
    tokenizer.save_pretrained(folder)


def accumulate(module: torch.nn.Module, batches: list[dict[str, torch.Tensor]], *, global_count: int, world: int,
               weight: float = 1.0, accelerator: Any = None, pad_to: int = 0) -> float:
    """Forward and backward of one optimizer step's micro-batches on this rank; returns the summed
    token loss. Each micro-batch's loss is divided by the step's global supervised-token count, so
    the gradients add up to those of one big batch. Up to `pad_to` micro-batches run
    (the last one repeated with weight 0) where ZeRO-3/FSDP need every rank in step. Nothing here
    updates the weights: the step is taken by optimizer_step once the guard has seen it."""
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    items = [(b, weight) for b in batches] + [(batches[-1], 0.0)] * max(0, pad_to - len(batches))
    total = 0.0
    for i, (batch, w) in enumerate(items):
        batch = distributed.to_device(batch, device)
        last = i == len(items) - 1  # gradients are reduced after the last micro-batch only
        # The backward runs inside the micro-step: DDP and FSDP decide there whether to reduce, and
        # DeepSpeed is told whether this micro-batch ends the accumulation. Autocast covers the forward only.
        with distributed.micro_step(accelerator, module, last) if accelerator is not None else contextlib.nullcontext():
            with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
                loss_sum, _ = module(batch)
            # DDP averages gradients over ranks, hence x world to get the global token mean.
            loss = loss_sum * (w * world / max(global_count, 1))
            if accelerator is not None:
                distributed.backward(accelerator, module, loss, last)
            else:
                loss.backward()
        total += float(loss_sum.detach()) * w
    return total


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    model: Any  # the trained model (peft-wrapped for LoRA), unwrapped from any distributed wrapper


@dataclass
class RunSetup:
    """What a run opens before it trains: processes, folder, data and the model to train."""

    cfg: RunConfig
    started: float  # time.time() at the command's start (run_training)
    accelerator: Any
    mixed: str  # "no", "bf16" or "fp16"
    out: Path
    resume_dir: Path | None
    tokenizer: Any
    train_sources: Sequence[tuple[str, int]]  # (dataset, row) of each training sample, for messages
    train_samples: Sequence[Sample]  # lazy: read from the token store when batched
    eval_samples: Sequence[Sample]
    model: Any

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @property
    def packing(self) -> bool:
        d = self.cfg.data
        return d.packing or d.neat_packing or d.packing_contamination


@dataclass
class Trainer:
    """The prepared run the loop drives: wrapped module, optimizer, schedule, log and guard."""

    setup: RunSetup
    layout: str
    module: Any
    optimizer: Any
    scheduler: Any
    plan: StepPlan
    start_step: int
    step_guard: guard.StepGuard
    log: RunLog | None
    meter: StepMeter
    keep_grads: bool


def run_training(cfg: RunConfig, started: float | None = None) -> TrainResult:
    """Setup, train, finish. Every change made to the model for training is undone on the way
    out, whatever ends the run (train/model_changes.py).

    `started`: the time.time() the run's times count from: the command's start for `tunesmith
    train`, this call by default."""
    setup = open_run(cfg, time.time() if started is None else started)
    sharded = distributed.is_sharded(setup.accelerator)
    with training_changes(setup.model, packing=setup.packing, contaminate=cfg.data.packing_contamination,
                          mixed_precision=setup.mixed != "no", sharded=sharded,
                          neftune_alpha=cfg.train.neftune_noise_alpha) as layout:
        trainer = prepare(setup, layout)
        results = train(trainer)
    return finish(trainer, results)


# ------------------------------------------------------------------------------------------ setup

def open_run(cfg: RunConfig, started: float) -> RunSetup:
    """Processes, the output folder (taken, or resumed), the tokenized data and the model to train."""
    from accelerate.utils import set_seed

    from tunesmith.env import flush_denormals

    flush_denormals()
    if not cfg.data.dataset:
        raise UserError(f"{cfg.source or 'config'}: 'dataset' is not set; name one or more datasets of "
                        f"{cfg.data.dataset_dir}/dataset_info.json.")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mixed = _precision(cfg, device)
    # DDP / DeepSpeed / FSDP, the process-group timeout (ddp_timeout); resets the state of an earlier run
    accelerator = distributed.make_accelerator(cfg, device, mixed)
    out, resume_dir = _take_output_dir(cfg, accelerator)
    set_seed(cfg.train.seed)
    if cfg.data.streaming:
        tokenizer, stream, evals = _open_stream(cfg, accelerator, out)
        model = _load_model(cfg, accelerator, mixed)
        return RunSetup(cfg, started, accelerator, mixed, out, resume_dir, tokenizer, stream.sources, stream,
                        _to_samples(evals), model)
    tokenizer, data = _load_data(cfg, accelerator, out)
    model = _load_model(cfg, accelerator, mixed)
    sources = data.train.sources if hasattr(data.train, "sources") else [e.source for e in data.train]
    return RunSetup(cfg, started, accelerator, mixed, out, resume_dir, tokenizer, sources,
                    _to_samples(data.train), _to_samples(data.eval), model)


PREFLIGHT_STREAM_SAMPLES = 256


def _open_stream(cfg: RunConfig, accelerator: Any, out: Path) -> tuple[Any, SampleStream, list[Any]]:
    """A streaming run's sample stream (read and tokenized while training), its eval samples (read
    whole) and the preflight on the stream's first samples."""
    import itertools

    from tunesmith.data.preflight import preflight

    tokenizer = load_tokenizer(cfg.model)
    stream = SampleStream(cfg, tokenizer)
    evals: list[Any] = []
    if cfg.data.eval_dataset:
        eval_cfg = copy.deepcopy(cfg)
        eval_cfg.data.dataset, eval_cfg.data.shuffle = list(cfg.data.eval_dataset), False
        evals = SampleStream(eval_cfg, tokenizer).first_pass()
    first = list(itertools.islice(iter(stream), PREFLIGHT_STREAM_SAMPLES))  # iterating moves no position
    preflight(first, tokenizer, cfg, out if accelerator.is_main_process else None)
    return tokenizer, stream, evals


def _take_output_dir(cfg: RunConfig, accelerator: Any) -> tuple[Path, Path | None]:
    """Clean up after a killed run, find the checkpoint to resume, claim the folder (main process)."""
    out = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        run_folder.clean_interrupted(out)  # temporary folders of saves a killed run left behind
    accelerator.wait_for_everyone()
    resume_dir = run_folder.find_resume_checkpoint(cfg.train.resume_from_checkpoint, out)
    if accelerator.is_main_process:
        run_folder.claim_output_dir(out, resuming=resume_dir is not None, overwrite=cfg.train.overwrite_output_dir)
    accelerator.wait_for_everyone()
    return out, resume_dir


def _load_data(cfg: RunConfig, accelerator: Any, out: Path) -> tuple[Any, Any]:
    """Tokenized once into the token store, every process tokenizing its share of the chunks and
    polling the store for the rest (no collective waits out the tokenization); then the preflight."""
    from tunesmith.data.pipeline import data_key, discard_store, store_target, tokenize_datasets

    tokenizer = load_tokenizer(cfg.model)
    # The processes of one machine share its cache folder: they split the chunks among them, and
    # each machine's first process completes the store (once, under a lock, where machines share
    # the folder too).
    world = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    rank = accelerator.local_process_index
    view = cfg
    if accelerator.num_processes > 1 and cfg.data.overwrite_cache:
        if accelerator.is_local_main_process:  # before any process could open the old store
            discard_store(store_target(cfg, data_key(cfg, tokenizer)))
        accelerator.wait_for_everyone()
        view = copy.copy(cfg)  # discarded once above: no process may discard what the others write
        view.data = copy.copy(cfg.data)
        view.data.overwrite_cache = False
    data = tokenize_datasets(view, tokenizer, rank=rank, world=world)
    return tokenizer, _checked(data, tokenizer, cfg, out, accelerator)


def _checked(data: Any, tokenizer: Any, cfg: RunConfig, out: Path, accelerator: Any) -> Any:
    from tunesmith.data.preflight import preflight

    if not data.train:
        raise UserError("no training samples are left after tokenization (see the report above).")
    preflight(data.train, tokenizer, cfg, out if accelerator.is_main_process else None)
    return data


def _load_model(cfg: RunConfig, accelerator: Any, mixed: str) -> Any:
    """The base (plus an adapter to continue), with what trains marked. Straight onto a single GPU
    (flash attention needs CUDA at load time); DeepSpeed and FSDP place the weights themselves at
    prepare, so they load on the CPU."""
    sharded = distributed.is_sharded(accelerator)
    load_device = accelerator.device if accelerator.device.type == "cuda" and not sharded else "cpu"
    model = load_model(cfg.model, dtype=base_dtype_for_training(cfg.model, cfg.finetune.finetuning_type, mixed),
                       device=load_device)
    if cfg.model.adapter_name_or_path:  # continue training an adapter (earlier ones merged into the base)
        model = load_adapters(model, cfg.model.adapter_name_or_path, is_trainable=True)
    return apply_finetuning(model, cfg.finetune, gradient_checkpointing=cfg.train.gradient_checkpointing)


def prepare(setup: RunSetup, layout: str) -> Trainer:
    """Optimizer, schedule and the distributed wrappers; the resumed state; the log and guard."""
    from transformers import get_scheduler

    cfg, accelerator, t = setup.cfg, setup.accelerator, setup.cfg.train
    flops = flop_counts(setup.model)
    module = SFTModule(setup.model)
    optimizer = distributed.build_optimizer(accelerator, _param_groups(module, t.weight_decay), cfg)  # AdamW
    if isinstance(setup.train_samples, SampleStream):  # one pass of the plan: the run's max_steps
        n_micro = t.max_steps * t.gradient_accumulation_steps * accelerator.num_processes
    else:
        n_micro = len(plan_micro_batches(sample_lengths(setup.train_samples), batch_size=t.per_device_train_batch_size,
                                         seed=t.seed, epoch=0, shuffle=False, packing=setup.packing,
                                         max_len=cfg.data.cutoff_len))
    plan = make_plan(n_micro, cfg, accelerator.num_processes)
    warmup = t.warmup_steps if t.warmup_steps > 0 else math.ceil(t.warmup_ratio * plan.total_steps)
    module, optimizer = distributed.prepare(accelerator, module, optimizer)
    # On the prepared optimizer, so that under DeepSpeed the schedule drives the engine's optimizer.
    scheduler = get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=plan.total_steps)
    state = _resume(setup, module, optimizer, scheduler, plan) if setup.resume_dir is not None else {}
    start_step = state.get("global_step", 0)
    step_guard = guard.StepGuard(cfg, setup.train_sources, accelerator, scaler_handles_overflow=setup.mixed == "fp16",
                                 last_checkpoint=setup.resume_dir, state=state)
    log = None
    if setup.main:
        step_guard.check_disk(setup.out, distributed.unwrap(accelerator, module).model)
        cfg.dump_yaml(setup.out / "config.yaml")
        _announce(setup, plan, layout)
        log = RunLog(setup.out, total_steps=plan.total_steps, start_step=start_step,
                     tensorboard=bool(set(t.report_to) & {"tensorboard", "all"}),
                     trackers=open_trackers(t.report_to, cfg.to_flat(), setup.out))
    keep_grads = _allocate_grads(module, accelerator)
    return Trainer(setup, layout, module, optimizer, scheduler, plan, start_step, step_guard, log,
                   StepMeter(accelerator.num_processes, flops), keep_grads)


def _resume(setup: RunSetup, module: Any, optimizer: Any, scheduler: Any, plan: StepPlan) -> dict[str, Any]:
    """Weights, optimizer, schedule and RNG from the checkpoint; the log cut back to its step."""
    accelerator, resume_dir = setup.accelerator, setup.resume_dir
    assert resume_dir is not None
    if distributed.is_sharded(accelerator):  # every rank reads its own ZeRO/FSDP shards
        state = distributed.load_sharded_state(accelerator, resume_dir, scheduler)
    else:
        distributed.check_checkpoint_kind(accelerator, resume_dir)
        _load_weights(distributed.unwrap(accelerator, module).model, resume_dir)
        state = ckpt.load_training_state(resume_dir, optimizer, scheduler)
        distributed.restore_rank_rng(accelerator, resume_dir)
    _check_resumed_settings(setup, state, scheduler, optimizer)
    if setup.main:  # the log reads as if the run had never stopped
        run_folder.trim_log(setup.out / "trainer_log.jsonl", state["global_step"])
    if state.get("plan") != [plan.micro_per_step, plan.steps_per_epoch, plan.total_steps]:
        raise UserError(f"{resume_dir} was written by a run with another batch plan "
                        f"(micro-batches per step, steps per epoch, total steps = {state.get('plan')}, now "
                        f"{[plan.micro_per_step, plan.steps_per_epoch, plan.total_steps]}).",
                        hint="resume with the same data, batch sizes, accumulation, epochs and processes.")
    return state


def _rescale_learning_rate(scheduler: Any, optimizer: Any, old: float, new: float) -> None:
    """The checkpoint's schedule carries its peak rates (base_lrs, per parameter group, LoRA+ factors
    included); a changed learning_rate scales them, and the current rates, by new / old."""
    factor = new / old
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor


def _check_resumed_settings(setup: RunSetup, state: dict[str, Any], scheduler: Any, optimizer: Any) -> None:
    """A resume continues the checkpoint's run: keys that change the math must be the same, unless
    resume_allow_changes says otherwise (then the differences are said and logged)."""
    saved = state.get("config")
    if not isinstance(saved, dict):  # a checkpoint from before settings were recorded
        return
    now = setup.cfg.math_settings()
    changed = {key: (saved[key], now[key]) for key in now if key in saved and saved[key] != now[key]}
    if not changed:
        return
    listing = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, (old, new) in changed.items())
    if not setup.cfg.train.resume_allow_changes:
        raise UserError(f"resume_from_checkpoint: {setup.resume_dir} was trained with other settings: {listing}.",
                        hint="resume with the checkpoint's settings, start afresh with overwrite_output_dir: true, "
                             "or set resume_allow_changes: true to continue with the new values.")
    if "learning_rate" in changed:
        _rescale_learning_rate(scheduler, optimizer, *changed["learning_rate"])
    if setup.main:
        print(f"warning: resuming {setup.resume_dir} with changed settings (resume_allow_changes): {listing}.",
              file=sys.stderr)
        with open(setup.out / "trainer_log.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps({"step": state["global_step"], "resumed_with_changes":
                                  {key: {"checkpoint": old, "now": new} for key, (old, new) in changed.items()}})
                      + "\n")


def _announce(setup: RunSetup, plan: StepPlan, layout: str) -> None:
    t = setup.cfg.train
    print(f"train samples {len(setup.train_samples)}, eval samples {len(setup.eval_samples)}, "
          f"{plan.total_steps} optimizer steps ({plan.steps_per_epoch} per epoch), "
          f"{t.per_device_train_batch_size} x {t.gradient_accumulation_steps} x {setup.accelerator.num_processes} "
          f"samples per step ({layout} batches), precision {setup.mixed}", file=sys.stderr)
    if setup.accelerator.device.type == "cpu":
        _announce_cpu(setup.mixed, sharded=distributed.is_sharded(setup.accelerator))
    if layout == "concat":
        print("warning: packing_contamination is on: packed samples attend to the samples before them in their "
              "row, so losses differ from an unpacked run (set packing_contamination: false to keep them apart).",
              file=sys.stderr)


def _announce_cpu(mixed: str, *, sharded: bool = False) -> None:
    """The CPU and the kernels this run uses on it (tunesmith/cpu.py); a warning where the user
    asked for bf16 on a CPU whose bf16 products are slower than fp32 (their choice stands)."""
    # ZeRO-3/FSDP keep the library forwards and unpadded pieces (model_changes, step_batches)
    kernels = "the library forwards, unpadded (sharded run)" if sharded else cpu_kernels(mixed != "no")
    plan = cpu.plan_in_use("bf16")
    if sharded and mixed == "bf16":
        kernels += f", bf16 attention {plan.bf16_attention.value}"
    print(f"cpu: {cpu.features().describe()}; kernels: {kernels}", file=sys.stderr)
    advice = plan.bf16
    if mixed == "bf16" and not advice.on:
        print(f"warning: bf16: true on this CPU, but {advice.reason}; bf16: false (fp32) is likely faster here. "
              "Training in bf16 as asked.", file=sys.stderr)


def _allocate_grads(module: Any, accelerator: Any) -> bool:
    """Gradients are allocated once, before the first forward, and zeroed rather than freed after
    each step: allocated mid-backward every step instead, they split the heap space that
    activations reuse and raise peak memory (bench/RESULTS.md). ZeRO and FSDP keep gradients
    themselves. Returns whether gradients are kept."""
    if distributed.is_sharded(accelerator):
        return False
    for param in module.parameters():
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)
    return True


# ------------------------------------------------------------------------------------------ train

def train(trainer: Trainer) -> dict[str, Any]:
    """The optimizer steps from start_step to the end, with logging, eval and checkpoints; then the
    final eval. Returns the run's figures."""
    setup, plan = trainer.setup, trainer.plan
    cfg, accelerator = setup.cfg, setup.accelerator
    trainer.module.train()
    lengths = None if isinstance(setup.train_samples, SampleStream) else sample_lengths(setup.train_samples)
    first_step_seconds = None
    eval_loss = None
    step_started = time.time()
    batches_by_step = step_batches(setup.train_samples, lengths, plan, cfg, trainer.start_step, accelerator,
                                   trainer.layout, setup.pad_id)
    for step, batches, weight in trainer.step_guard.steps(batches_by_step):
        loss, grad_norm, applied, supervised = optimizer_step(trainer, step, batches, weight)
        if first_step_seconds is None:
            first_step_seconds = time.time() - setup.started
            if setup.main:
                trainer.log.bar.write(f"first step after {first_step_seconds:.1f} s from the command")
        trainer.meter.add(batches, weight=weight, loss=loss, applied=applied, supervised=supervised,
                          seconds=time.time() - step_started)
        done = step + 1
        _log_step(trainer, done, loss, grad_norm)
        eval_loss = _after_step(trainer, done, eval_loss)
        step_started = time.time()
    if setup.eval_samples:
        eval_loss = evaluate(trainer.module, setup.eval_samples, cfg, setup.pad_id, accelerator)
        if setup.main:
            trainer.log.record({"step": plan.total_steps, "eval_loss": eval_loss})
    return {"global_step": plan.total_steps, "train_runtime": round(time.time() - setup.started, 2),
            "first_step_seconds": round(first_step_seconds or 0.0, 2), "eval_loss": eval_loss,
            "train_samples": len(setup.train_samples), "steps_run": plan.total_steps - trainer.start_step,
            **trainer.meter.run_totals(), "skipped_steps": trainer.step_guard.skipped}


def optimizer_step(trainer: Trainer, step: int, batches: list[dict[str, torch.Tensor]],
                   weight: float) -> tuple[float, Any, bool, int]:
    """Forward and backward of this step's micro-batches on every rank, then the update unless the
    loss or gradient is not finite. Returns (token-mean loss, grad norm, applied, supervised tokens)."""
    setup, t = trainer.setup, trainer.setup.cfg.train
    accelerator, module = setup.accelerator, trainer.module
    local_count = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches) if weight else 0
    global_count = int(accelerator.reduce(torch.tensor([local_count], device=accelerator.device),
                                          reduction="sum").item())
    world = accelerator.num_processes
    step_loss = accumulate(module, batches, global_count=global_count, world=world, weight=weight,
                           accelerator=accelerator, pad_to=distributed.lockstep_count(accelerator, len(batches)))
    total_loss = float(accelerator.reduce(torch.tensor(step_loss, dtype=torch.float64, device=accelerator.device),
                                          reduction="sum")) / max(global_count, 1)
    if distributed.is_deepspeed(accelerator):
        # The engine clips and updates in one call, so its gradient norm is known only after the
        # update; the (all-ranks) loss is checked before it, and the engine skips non-finite gradients.
        applied = trainer.step_guard.check_step(step + 1, total_loss, None, batches)
        grad_norm = distributed.deepspeed_step(module)
    else:
        grad_norm = accelerator.clip_grad_norm_(module.parameters(), t.max_grad_norm) if t.max_grad_norm > 0 \
            else None
        applied = trainer.step_guard.check_step(step + 1, total_loss, grad_norm, batches)  # never update on nan/inf
        if applied:
            trainer.optimizer.step()
        else:
            distributed.skip_scaled_step(accelerator.scaler, trainer.optimizer)
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=not trainer.keep_grads)
    return total_loss, grad_norm, applied, global_count


def _log_step(trainer: Trainer, done: int, loss: float, grad_norm: Any) -> None:
    setup, plan, meter = trainer.setup, trainer.plan, trainer.meter
    lr = trainer.scheduler.get_last_lr()[0]
    if setup.main:
        trainer.log.step(done, {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{meter.tokens_per_second():.0f}"})
    if done % setup.cfg.train.logging_steps and done != plan.total_steps:
        return
    if setup.main:
        skipped = trainer.step_guard.skipped
        trainer.log.record({
            "step": done, "epoch": round(done / plan.steps_per_epoch, 4), **meter.window(),
            **({"skipped_steps": skipped} if skipped else {}), "learning_rate": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "elapsed": round(time.time() - setup.started, 2), "eta": round(trainer.log.eta(done), 1),
            "total_steps": plan.total_steps,
        })
    meter.reset_window()


def _after_step(trainer: Trainer, done: int, eval_loss: float | None) -> float | None:
    """Eval and checkpoint when they are due; a stop signal saves and ends the run."""
    setup, t, last = trainer.setup, trainer.setup.cfg.train, trainer.plan.total_steps
    if setup.eval_samples and t.eval_strategy == "steps" and done % (t.eval_steps or t.logging_steps) == 0 \
            and done != last:
        eval_loss = evaluate(trainer.module, setup.eval_samples, setup.cfg, setup.pad_id, setup.accelerator)
        if setup.main:
            trainer.log.record({"step": done, "eval_loss": eval_loss})
    if t.save_steps > 0 and done % t.save_steps == 0 and done != last:
        _save_checkpoint(trainer, done)
    stop = trainer.step_guard.stop_signal
    if stop is not None and done != last:  # SIGINT/SIGTERM: save, then stop
        if trainer.step_guard.saved_step != done:
            _save_checkpoint(trainer, done)
        if setup.main:
            trainer.log.close()
            trainer.log.finish_trackers(None, status="KILLED")
        raise guard.interrupted(stop, done, last, setup.out / f"checkpoint-{done}", setup.cfg)
    return eval_loss


# ------------------------------------------------------------------------------------------ finish

def finish(trainer: Trainer, results: dict[str, Any]) -> TrainResult:
    """The final outputs, written atomically next to the run files, and the run's figures."""
    setup, accelerator = trainer.setup, trainer.setup.accelerator
    accelerator.wait_for_everyone()
    # every rank joins under ZeRO-3/FSDP
    gathered = distributed.gather_state_dict(accelerator, trainer.module,
                                             trainable_only=setup.cfg.finetune.finetuning_type == "lora")
    model = distributed.unwrap(accelerator, trainer.module).model
    if setup.main:
        trainer.log.close()
        with final_save_kwargs(model) as extra:  # a PiSSA adapter is saved for the original base
            run_folder.write_final_outputs(
                setup.out,
                lambda staging: save_weights(model, setup.tokenizer, staging, accelerator, gathered, **extra))
        (setup.out / "train_results.json").write_text(json.dumps(results, indent=2))
        if setup.cfg.train.plot_loss:
            plot_loss(setup.out)
        trainer.log.finish_trackers(results)
        kind = "adapter" if setup.cfg.finetune.finetuning_type == "lora" else "model"
        print(f"Saved the trained {kind} to {setup.out}", file=sys.stderr)
    accelerator.wait_for_everyone()
    return TrainResult(results, model)


def step_batches(samples: Sequence[Sample] | SampleStream, lengths: Sequence[int] | None, plan: StepPlan,
                 cfg: RunConfig, start_step: int, accelerator: Any, layout: str, pad_id: int
                 ) -> Iterator[tuple[int, list[dict[str, torch.Tensor]], float]]:
    """(step, this rank's collated micro-batches, their weight) from start_step on; a resumed run gets the same
    batches as an uninterrupted one because the order depends only on (seed, epoch)."""
    t, world, rank = cfg.train, accelerator.num_processes, accelerator.process_index
    on_cpu = accelerator.device.type == "cpu"
    # On the CPU a forward/backward pass takes whole samples up to cutoff_len tokens (twice that
    # in bf16, whose activations are half the size): peak memory stays that of one long sample
    # whatever the batch size (bench/RESULTS.md).
    budget = cfg.data.cutoff_len * (2 if t.bf16 else 1) if on_cpu else None
    # Where the CPU plan puts the products on oneDNN, which builds a kernel per shape, pieces padded
    # to a multiple of this many tokens bound the kernels (and put fp32 on oneDNN, train/kernels.py);
    # None where they stay on torch's BLAS. Sharded runs keep the library forwards, whose fp32
    # products don't take oneDNN.
    row_multiple = cpu_row_multiple(t.bf16) if on_cpu and not distributed.is_sharded(accelerator) else None

    def pieces_of(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        pieces = split_varlen(batch, budget)
        return [pad_varlen(p, row_multiple, pad_id) for p in pieces] if row_multiple else pieces

    if isinstance(samples, SampleStream):
        yield from _stream_step_batches(samples, plan, cfg, start_step, accelerator, layout, pad_id, pieces_of)
        return
    assert lengths is not None
    step = start_step
    while step < plan.total_steps:
        epoch, within = divmod(step, plan.steps_per_epoch)
        micro = plan_micro_batches(lengths, batch_size=t.per_device_train_batch_size, seed=t.seed, epoch=epoch,
                                   shuffle=cfg.data.shuffle, packing=layout in ("masked", "concat"),
                                   max_len=cfg.data.cutoff_len)
        steps = range(within, min(plan.steps_per_epoch, within + plan.total_steps - step))
        # A rank with no micro-batch in a step (a short last step) still joins its collectives: it
        # runs the step's first micro-batch with weight 0.
        chosen: list[tuple[list[list[list[int]]], float]] = []
        for s in steps:
            everyone = micro[s * plan.micro_per_step : (s + 1) * plan.micro_per_step]
            mine = everyone[rank::world]
            chosen.append((mine, 1.0) if mine else (everyone[:1], 0.0))
        dataset = MicroBatches(samples, [mb for mine, _ in chosen for mb in mine], layout, pad_id)
        workers = cfg.data.dataloader_num_workers
        # Its own generator: the workers' seed must not come from (and shift) the RNG that dropout
        # uses, or a run with workers, and a resumed one, would train differently.
        items = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                                 worker_init_fn=guard.ignore_stop_signals,
                                                 generator=torch.Generator().manual_seed(t.seed))) if workers \
            else (dataset[i] for i in range(len(dataset)))
        for mine, weight in chosen:
            yield step, [piece for _ in mine for piece in pieces_of(next(items))], weight
            step += 1


def _stream_step_batches(stream: SampleStream, plan: StepPlan, cfg: RunConfig, start_step: int, accelerator: Any,
                         layout: str, pad_id: int, pieces_of: Any
                         ) -> Iterator[tuple[int, list[dict[str, torch.Tensor]], float]]:
    """A streaming run's steps: each takes the next micro_per_step x batch_size samples of the
    stream (every rank reads the same stream and collates its own micro-batches of them). A resumed
    run starts at the stream position the interrupted one had reached."""
    t, world, rank = cfg.train, accelerator.num_processes, accelerator.process_index
    size = t.per_device_train_batch_size
    per_step = plan.micro_per_step * size
    samples = stream.samples(start=start_step * per_step)
    packed = layout in ("masked", "concat")
    for step in range(start_step, plan.total_steps):
        taken = [next(samples) for _ in range(per_step)]
        micro = []
        for k in range(plan.micro_per_step):
            local = list(range(k * size, (k + 1) * size))
            rows = [[local[i] for i in row] for row in pack_best_fit([len(taken[j].input_ids) for j in local],
                                                                     cfg.data.cutoff_len)] if packed \
                else [[j] for j in local]
            micro.append(rows)
        # A rank with no micro-batch in this step still joins its collectives: it runs the step's
        # first micro-batch with weight 0 (as step_batches does).
        mine = micro[rank::world]
        weight = 1.0 if mine else 0.0
        dataset = MicroBatches(taken, mine or micro[:1], layout, pad_id)
        yield step, [piece for i in range(len(dataset)) for piece in pieces_of(dataset[i])], weight


def _save_checkpoint(trainer: Trainer, step: int) -> None:
    setup, plan, cfg = trainer.setup, trainer.plan, trainer.setup.cfg
    accelerator, out, step_guard = setup.accelerator, setup.out, trainer.step_guard
    accelerator.wait_for_everyone()
    # Collectives first (every rank): gathered weights, each rank's RNG, ZeRO/FSDP optimizer shards.
    gathered = distributed.gather_state_dict(accelerator, trainer.module,
                                             trainable_only=setup.cfg.finetune.finetuning_type == "lora")
    rank_rngs = distributed.gather_rng_states(accelerator)
    sharded = None if cfg.train.save_only_model else \
        distributed.save_sharded_state(accelerator, out, step, trainer.scheduler)
    if setup.main:
        model = distributed.unwrap(accelerator, trainer.module).model
        guard.check_free_space(out, step_guard.checkpoint_size, f"checkpoint-{step}")
        optimizer = None if cfg.train.save_only_model or sharded else trainer.optimizer
        state = {"global_step": step, "plan": [plan.micro_per_step, plan.steps_per_epoch, plan.total_steps],
                 "epoch": step / plan.steps_per_epoch, "config": cfg.math_settings(), **step_guard.state()}

        def write(folder: Path) -> None:
            save_weights(model, setup.tokenizer, folder, accelerator, gathered)
            distributed.write_rank_rng(folder, rank_rngs)
            if sharded is not None:  # optimizer, scheduler and RNG live in accelerate's sharded state
                sharded.rename(folder / distributed.SHARDED_STATE)
            ckpt.save_training_state(folder, optimizer=optimizer, scheduler=trainer.scheduler, state=state)

        run_folder.atomic_folder(out / f"checkpoint-{step}", write)
        run_folder.rotate(out, cfg.train.save_total_limit)
    accelerator.wait_for_everyone()
    step_guard.saved(step, out / f"checkpoint-{step}")


def _load_weights(model: Any, folder: Path) -> None:
    """Put a checkpoint's trained weights back into the model (adapter or full weights)."""
    from safetensors.torch import load_file

    if (folder / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    shards = sorted(folder.glob("model*.safetensors"))
    if not shards:
        raise UserError(f"{folder} holds no weights (adapter_model.safetensors or model*.safetensors).")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if "lm_head" not in k]  # tied heads are not stored
    if real_missing or unexpected:
        raise UserError(f"{folder} does not match the model: missing {real_missing[:5]}, unexpected {unexpected[:5]}.")
