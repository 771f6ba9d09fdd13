"""The training recipe, readable top to bottom: setup, loop, step, log, evaluate, checkpoint, save.

An explicit loop on `accelerate` (DESIGN §2.2). The loss of an optimizer step is the sum of
token losses over all its micro-batches (and ranks) divided by their supervised-token count
(DESIGN §2.3), so accumulation of k micro-batches equals one batch k times larger.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import RunConfig
from tunesmith.data.batching import (
    Sample,
    collate,
    collate_padded,
    pad_varlen,
    plan_micro_batches,
    split_varlen,
)
from tunesmith.errors import UserError
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import distributed, guard
from tunesmith.train.attention import choose_layout, restore_attention
from tunesmith.train.flops import flop_counts
from tunesmith.train.kernels import cpu_row_multiple, set_training_forwards
from tunesmith.train.logs import RunLog, StepMeter, plot_loss
from tunesmith.train.loss import SFTModule
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


def check_output_dir(cfg: RunConfig, resuming: bool) -> Path:
    out = Path(cfg.train.output_dir)
    held = out.is_dir() and (any((out / m).exists() for m in ckpt.RUN_MARKERS) or ckpt.list_checkpoints(out))
    if held and not resuming:
        if not cfg.train.overwrite_output_dir:
            raise UserError(f"output_dir {out} already holds a run.",
                            hint="continue it with resume_from_checkpoint: true, start afresh with "
                                 "overwrite_output_dir: true, or choose another output_dir.")
        for child in out.iterdir():  # remove only what a run writes, never the user's other files
            if child.name.startswith(("checkpoint-", ".tmp-checkpoint-")) or child.name == "runs":
                shutil.rmtree(child, ignore_errors=True)
            elif child.name in (*ckpt.RUN_MARKERS, "training_loss.png", "preflight.txt", ckpt.COMPLETE):
                child.unlink()
    guard.prepare_output_dir(out)  # created and proven writable before any work
    return out


def _precision(cfg: RunConfig, device: torch.device) -> str:
    from tunesmith.model import bf16_supported

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


def _to_samples(encoded: list[Any]) -> list[Sample]:
    return [Sample(e.input_ids, e.labels, i) for i, e in enumerate(encoded)]


class MicroBatches(torch.utils.data.Dataset):
    """The micro-batches one rank processes in one epoch, collated (in workers if asked)."""

    def __init__(self, samples: list[Sample], plan: list[list[list[int]]], layout: str, pad_id: int) -> None:
        self.samples, self.plan, self.layout, self.pad_id = samples, plan, layout, pad_id

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return collate([[self.samples[j] for j in row] for row in self.plan[i]], self.pad_id, self.layout)


def evaluate(module: torch.nn.Module, samples: list[Sample], cfg: RunConfig, pad_id: int, accelerator: Any) -> float:
    """Token-weighted loss over the whole eval set (all ranks)."""
    plan = plan_micro_batches([len(s.input_ids) for s in samples], batch_size=cfg.train.per_device_eval_batch_size,
                              seed=0, epoch=0, shuffle=False, packing=False, max_len=cfg.data.cutoff_len)
    mine = plan[accelerator.process_index :: accelerator.num_processes]
    # ZeRO-3/FSDP: every rank runs as many forwards as the busiest; the extra ones are not counted.
    fillers = max(0, distributed.lockstep_count(accelerator, len(mine)) - len(mine))
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    was_training = module.training
    module.eval()
    with torch.no_grad(), accelerator.autocast():
        for i, rows in enumerate(mine + [plan[0]] * fillers):
            batch = collate_padded([samples[j] for row in rows for j in row], pad_id)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            loss_sum, count = module(batch)
            if i < len(mine):
                total += torch.tensor([float(loss_sum), count], dtype=torch.float64, device=accelerator.device)
    module.train(was_training)
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def save_weights(model: Any, tokenizer: Any, folder: Path, accelerator: Any,
                 gathered: dict[str, torch.Tensor] | None = None) -> None:
    """The trained result in standard form: a peft adapter folder, or a HF model folder. `gathered`:
    the full weights collected from ZeRO-3/FSDP shards by every rank (distributed.gather_state_dict)."""
    unwrapped = accelerator.unwrap_model(model)
    state = gathered if gathered is not None else \
        accelerator.get_state_dict(model) if accelerator.num_processes > 1 else None
    unwrapped.save_pretrained(folder, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def accumulate(module: torch.nn.Module, batches: list[dict[str, torch.Tensor]], *, global_count: int, world: int,
               weight: float = 1.0, accelerator: Any = None, pad_to: int = 0) -> float:
    """Forward and backward of one optimizer step's micro-batches on this rank; returns the summed
    token loss. Each micro-batch's loss is divided by the step's global supervised-token count, so
    the gradients add up to those of one big batch (DESIGN §2.3). Up to `pad_to` micro-batches run
    (the last one repeated with weight 0) where ZeRO-3/FSDP need every rank in step."""
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    # DeepSpeed divides by its accumulation steps; multiplied back here (train/distributed.py).
    scale = distributed.loss_scale(accelerator)
    items = [(b, weight) for b in batches] + [(batches[-1], 0.0)] * max(0, pad_to - len(batches))
    total = 0.0
    for i, (batch, w) in enumerate(items):
        batch = {k: v.to(device) for k, v in batch.items()}
        last = i == len(items) - 1  # gradients are reduced (and DeepSpeed steps) after the last only
        with distributed.micro_step(accelerator, module, last) if accelerator is not None else contextlib.nullcontext(), \
                accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            loss_sum, _ = module(batch)
            # DDP averages gradients over ranks, hence x world to get the global token mean.
            loss = loss_sum * (w * world * scale / max(global_count, 1))
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        total += float(loss_sum.detach()) * w
    return total


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    model: Any  # the trained model (peft-wrapped for LoRA), unwrapped from any distributed wrapper


def run_training(cfg: RunConfig) -> TrainResult:
    t_start = time.time()
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from tunesmith.data.pipeline import tokenize_datasets
    from tunesmith.model import (
        apply_finetuning,
        base_dtype_for_training,
        flush_denormals,
        load_adapters,
        load_model,
        load_tokenizer,
        set_adapter_input_casting,
    )

    flush_denormals()
    t = cfg.train
    if not cfg.data.dataset:
        raise UserError(f"{cfg.source or 'config'}: 'dataset' is not set; name one or more datasets of "
                        f"{cfg.data.dataset_dir}/dataset_info.json.")
    resume_setting = t.resume_from_checkpoint
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mixed = _precision(cfg, device)
    # DDP / DeepSpeed / FSDP, the process-group timeout (ddp_timeout); resets the state of an earlier run
    accelerator = distributed.make_accelerator(cfg, device, mixed)
    out = Path(t.output_dir)
    if accelerator.is_main_process:
        ckpt.clean_interrupted(out)  # temporary folders of saves a killed run left behind
    accelerator.wait_for_everyone()
    resume_dir = ckpt.find_resume_checkpoint(resume_setting, out)
    if accelerator.is_main_process:
        check_output_dir(cfg, resuming=resume_dir is not None)
    accelerator.wait_for_everyone()
    set_seed(t.seed)

    # --- data: tokenized once (main process first; the others read its cache) ---
    tokenizer = load_tokenizer(cfg.model)
    with accelerator.main_process_first():
        data = tokenize_datasets(distributed.cache_reader_view(cfg, accelerator), tokenizer)
    train_samples, eval_samples = _to_samples(data.train), _to_samples(data.eval)
    if not train_samples:
        raise UserError("no training samples are left after tokenization (see the report above).")
    from tunesmith.data.preflight import preflight

    preflight(data.train, tokenizer, cfg, out if accelerator.is_main_process else None)
    lengths = [len(s.input_ids) for s in train_samples]
    packing = cfg.data.packing or cfg.data.neat_packing or cfg.data.packing_contamination
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # --- model ---
    # Straight onto a single GPU (flash attention needs CUDA at load time); DeepSpeed and FSDP place the
    # weights themselves at prepare, so they load on the CPU.
    sharded = distributed.is_sharded(accelerator)
    load_device = accelerator.device if accelerator.device.type == "cuda" and not sharded else "cpu"
    model = load_model(cfg.model, dtype=base_dtype_for_training(cfg.model, cfg.finetune.finetuning_type, mixed),
                       device=load_device)
    if cfg.model.adapter_name_or_path:  # continue training an adapter (earlier ones merged into the base)
        model = load_adapters(model, cfg.model.adapter_name_or_path, is_trainable=True)
    model = apply_finetuning(model, cfg.finetune, gradient_checkpointing=t.gradient_checkpointing)
    # padding-free varlen attention where the kernel allows it
    layout = choose_layout(model, packing, contaminate=cfg.data.packing_contamination)
    set_adapter_input_casting(model, enabled=mixed == "no")  # autocast casts LoRA inputs itself
    # Same math with less memory and work (train/kernels.py); ZeRO-3 gathers weights per module call,
    # which the fused LoRA forward bypasses, so sharded runs keep the library forwards.
    set_training_forwards(model, enabled=not sharded)
    flops = flop_counts(model)
    module = SFTModule(model)
    optimizer = distributed.build_optimizer(accelerator, _param_groups(module, t.weight_decay), cfg)  # AdamW
    world = accelerator.num_processes
    n_micro = len(plan_micro_batches(lengths, batch_size=t.per_device_train_batch_size, seed=t.seed, epoch=0,
                                     shuffle=False, packing=packing, max_len=cfg.data.cutoff_len))
    plan = make_plan(n_micro, cfg, world)
    warmup = t.warmup_steps if t.warmup_steps > 0 else math.ceil(t.warmup_ratio * plan.total_steps)
    module, optimizer = distributed.prepare(accelerator, module, optimizer)
    # On the prepared optimizer, so that under DeepSpeed the schedule drives the engine's optimizer.
    scheduler = get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=plan.total_steps)

    start_step = 0
    state: dict[str, Any] = {}
    if resume_dir is not None:
        if distributed.is_sharded(accelerator):  # every rank reads its own ZeRO/FSDP shards
            state = distributed.load_sharded_state(accelerator, resume_dir, scheduler)
        else:
            distributed.check_checkpoint_kind(accelerator, resume_dir)
            _load_weights(accelerator.unwrap_model(module).model, resume_dir)
            state = ckpt.load_training_state(resume_dir, optimizer, scheduler)
            distributed.restore_rank_rng(accelerator, resume_dir)
        start_step = state["global_step"]
        if accelerator.is_main_process:  # the log reads as if the run had never stopped
            ckpt.trim_log(out / "trainer_log.jsonl", start_step)
        if state.get("plan") != [plan.micro_per_step, plan.steps_per_epoch, plan.total_steps]:
            raise UserError(f"{resume_dir} was written by a run with another batch plan "
                            f"(micro-batches per step, steps per epoch, total steps = {state.get('plan')}, now "
                            f"{[plan.micro_per_step, plan.steps_per_epoch, plan.total_steps]}).",
                            hint="resume with the same data, batch sizes, accumulation, epochs and processes.")
    main = accelerator.is_main_process
    step_guard = guard.StepGuard(cfg, [e.source for e in data.train], accelerator,
                                 scaler_handles_overflow=mixed == "fp16", last_checkpoint=resume_dir, state=state)
    if main:
        step_guard.check_disk(out, accelerator.unwrap_model(module).model)
        cfg.dump_yaml(out / "config.yaml")
        print(f"train samples {len(train_samples)}, eval samples {len(eval_samples)}, "
              f"{plan.total_steps} optimizer steps ({plan.steps_per_epoch} per epoch), "
              f"{t.per_device_train_batch_size} x {t.gradient_accumulation_steps} x {world} "
              f"samples per step ({layout} batches), precision {mixed}", file=sys.stderr)
        if layout == "concat":
            print("warning: packing_contamination is on: packed samples attend to the samples before them in their "
                  "row, so losses differ from an unpacked run (set packing_contamination: false to keep them apart).",
                  file=sys.stderr)
    reports = {r.strip() for r in t.report_to.split(",")}
    log = RunLog(out, total_steps=plan.total_steps, start_step=start_step,
                 tensorboard=bool(reports & {"tensorboard", "all"}),
                 trackers=open_trackers(t.report_to, cfg.to_flat(), out)) if main else None

    # --- loop ---
    module.train()
    # Gradients are allocated once, before the first forward, and zeroed rather than freed after each
    # step: allocated mid-backward every step instead, they split the heap space that activations
    # reuse and raise peak memory (bench/RESULTS.md). ZeRO and FSDP keep gradients themselves.
    keep_grads = not distributed.is_sharded(accelerator)
    if keep_grads:
        for param in module.parameters():
            if param.requires_grad and param.grad is None:
                param.grad = torch.zeros_like(param)
    meter = StepMeter(world, flops)
    first_step_seconds = None
    eval_loss = None
    last_batch = None
    step_started = time.time()
    for step, batches in step_guard.steps(step_batches(train_samples, lengths, plan, cfg, start_step, accelerator,
                                                       layout, pad_id)):
        local_count = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        global_count = int(accelerator.reduce(torch.tensor([local_count], device=accelerator.device),
                                              reduction="sum").item())
        weight = 1.0
        if not batches:  # a rank with no micro-batch in a short last step still joins the collectives
            batches, weight = [last_batch], 0.0
        step_loss = accumulate(module, batches, global_count=global_count, world=world, weight=weight,
                               accelerator=accelerator, pad_to=distributed.lockstep_count(accelerator, len(batches)))
        last_batch = batches[-1]
        grad_norm = accelerator.clip_grad_norm_(module.parameters(), t.max_grad_norm) if t.max_grad_norm > 0 else None
        total_loss = float(accelerator.reduce(torch.tensor(step_loss, dtype=torch.float64, device=accelerator.device),
                                              reduction="sum")) / max(global_count, 1)
        applied = step_guard.check_step(step + 1, total_loss, grad_norm, batches)  # never update on nan/inf
        if applied:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=not keep_grads)
        if first_step_seconds is None:
            first_step_seconds = time.time() - t_start
            if main:
                log.bar.write(f"first step after {first_step_seconds:.1f} s from the command")
        meter.add(batches, weight=weight, loss=total_loss, applied=applied, supervised=global_count,
                  seconds=time.time() - step_started)
        done = step + 1
        if main:
            log.step(done, {"loss": f"{total_loss:.4f}", "lr": f"{scheduler.get_last_lr()[0]:.2e}",
                            "tok/s": f"{meter.tokens_per_second():.0f}"})
        if done % t.logging_steps == 0 or done == plan.total_steps:
            if main:
                log.record({
                    "step": done, "epoch": round(done / plan.steps_per_epoch, 4), **meter.window(),
                    **({"skipped_steps": step_guard.skipped} if step_guard.skipped else {}),
                    "learning_rate": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "elapsed": round(time.time() - t_start, 2), "eta": round(log.eta(done), 1),
                    "total_steps": plan.total_steps,
                })
            meter.reset_window()
        if eval_samples and t.eval_strategy == "steps" and done % (t.eval_steps or t.logging_steps) == 0 \
                and done != plan.total_steps:
            eval_loss = evaluate(module, eval_samples, cfg, pad_id, accelerator)
            if main:
                log.record({"step": done, "eval_loss": eval_loss})
        if t.save_steps > 0 and done % t.save_steps == 0 and done != plan.total_steps:
            _save_checkpoint(module, optimizer, scheduler, tokenizer, out, done, plan, cfg, accelerator, step_guard)
        if step_guard.stop_signal is not None and done != plan.total_steps:  # SIGINT/SIGTERM: save, then stop
            if step_guard.saved_step != done:
                _save_checkpoint(module, optimizer, scheduler, tokenizer, out, done, plan, cfg, accelerator, step_guard)
            if main:
                log.close()
                log.finish_trackers(None, status="KILLED")
            raise guard.interrupted(step_guard.stop_signal, done, plan.total_steps, out / f"checkpoint-{done}", cfg)
        step_started = time.time()

    # --- the end: final eval, outputs written atomically ---
    if eval_samples:
        eval_loss = evaluate(module, eval_samples, cfg, pad_id, accelerator)
        if main:
            log.record({"step": plan.total_steps, "eval_loss": eval_loss})
    results = {"global_step": plan.total_steps, "train_runtime": round(time.time() - t_start, 2),
               "first_step_seconds": round(first_step_seconds or 0.0, 2), "eval_loss": eval_loss,
               "train_samples": len(train_samples), "steps_run": plan.total_steps - start_step,
               **meter.run_totals(), "skipped_steps": step_guard.skipped}
    accelerator.wait_for_everyone()
    gathered = distributed.gather_state_dict(accelerator, module)  # every rank joins under ZeRO-3/FSDP
    if main:
        log.close()
        model_to_save = accelerator.unwrap_model(module).model
        restore_attention(model_to_save)
        set_adapter_input_casting(model_to_save, enabled=True)
        set_training_forwards(model_to_save, enabled=False)
        _write_final(model_to_save, tokenizer, out, accelerator, gathered)
        (out / "train_results.json").write_text(json.dumps(results, indent=2))
        if t.plot_loss:
            plot_loss(out)
        log.finish_trackers(results)
        print(f"Saved the trained {'adapter' if cfg.finetune.finetuning_type == 'lora' else 'model'} to {out}",
              file=sys.stderr)
    accelerator.wait_for_everyone()
    return TrainResult(results, accelerator.unwrap_model(module).model)


def step_batches(samples: list[Sample], lengths: list[int], plan: StepPlan, cfg: RunConfig, start_step: int,
                 accelerator: Any, layout: str, pad_id: int) -> Iterator[tuple[int, list[dict[str, torch.Tensor]]]]:
    """(step, this rank's collated micro-batches) from start_step on; a resumed run gets the same
    batches as an uninterrupted one because the order depends only on (seed, epoch)."""
    t, world, rank = cfg.train, accelerator.num_processes, accelerator.process_index
    on_cpu = accelerator.device.type == "cpu"
    # On the CPU a forward/backward pass takes whole samples up to cutoff_len tokens (twice that
    # in bf16, whose activations are half the size): peak memory stays that of one long sample
    # whatever the batch size (bench/RESULTS.md).
    budget = cfg.data.cutoff_len * (2 if t.bf16 else 1) if on_cpu else None
    # CPU products run on oneDNN, which builds a kernel per shape: pieces padded to a multiple of
    # this many tokens bound the kernels (and put fp32 on oneDNN, train/kernels.py). Sharded runs
    # keep the library forwards, whose fp32 products don't take oneDNN.
    row_multiple = cpu_row_multiple(t.bf16) if on_cpu and not distributed.is_sharded(accelerator) else None
    step = start_step
    while step < plan.total_steps:
        epoch, within = divmod(step, plan.steps_per_epoch)
        micro = plan_micro_batches(lengths, batch_size=t.per_device_train_batch_size, seed=t.seed, epoch=epoch,
                                   shuffle=cfg.data.shuffle, packing=layout in ("masked", "concat"),
                                   max_len=cfg.data.cutoff_len)
        steps = range(within, min(plan.steps_per_epoch, within + plan.total_steps - step))
        per_step = [micro[s * plan.micro_per_step : (s + 1) * plan.micro_per_step][rank::world] for s in steps]
        dataset = MicroBatches(samples, [mb for mine in per_step for mb in mine], layout, pad_id)
        workers = cfg.data.dataloader_num_workers
        # Its own generator: the workers' seed must not come from (and shift) the RNG that dropout
        # uses, or a run with workers, and a resumed one, would train differently.
        items = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                                 worker_init_fn=guard.ignore_stop_signals,
                                                 generator=torch.Generator().manual_seed(t.seed))) if workers \
            else (dataset[i] for i in range(len(dataset)))
        for mine in per_step:
            pieces = [piece for _ in mine for piece in split_varlen(next(items), budget)]
            yield step, [pad_varlen(p, row_multiple, pad_id) for p in pieces] if row_multiple else pieces
            step += 1


def _write_final(model: Any, tokenizer: Any, out: Path, accelerator: Any,
                 gathered: dict[str, torch.Tensor] | None = None) -> None:
    """Weights and tokenizer go to a temp folder first, then move next to the run files; the run
    folder's `.complete` marker is written last (see checkpoint.write_final_outputs)."""
    ckpt.write_final_outputs(out, lambda staging: save_weights(model, tokenizer, staging, accelerator, gathered))


def _save_checkpoint(module: Any, optimizer: Any, scheduler: Any, tokenizer: Any, out: Path, step: int,
                     plan: StepPlan, cfg: RunConfig, accelerator: Any, step_guard: guard.StepGuard) -> None:
    accelerator.wait_for_everyone()
    # Collectives first (every rank): gathered weights, each rank's RNG, ZeRO/FSDP optimizer shards.
    gathered = distributed.gather_state_dict(accelerator, module)
    rank_rngs = distributed.gather_rng_states(accelerator)
    sharded = None if cfg.train.save_only_model else distributed.save_sharded_state(accelerator, out, step, scheduler)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(module).model
        guard.check_free_space(out, step_guard.checkpoint_size, f"checkpoint-{step}")

        def write(folder: Path) -> None:
            save_weights(model, tokenizer, folder, accelerator, gathered)
            distributed.write_rank_rng(folder, rank_rngs)
            if sharded is not None:  # optimizer, scheduler and RNG live in accelerate's sharded state
                sharded.rename(folder / distributed.SHARDED_STATE)
            ckpt.save_training_state(folder, optimizer=None if cfg.train.save_only_model or sharded else optimizer,
                                     scheduler=scheduler, state={
                                         "global_step": step,
                                         "plan": [plan.micro_per_step, plan.steps_per_epoch, plan.total_steps],
                                         "epoch": step / plan.steps_per_epoch, **step_guard.state()})

        ckpt.atomic_folder(out / f"checkpoint-{step}", write)
        ckpt.rotate(out, cfg.train.save_total_limit)
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
