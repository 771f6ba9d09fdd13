"""What keeps a run safe while it trains: stop signals, non-finite steps, and the disk.

- SIGINT / SIGTERM: the current step finishes, a checkpoint is written, and the run exits
  non-zero with the command that resumes it. A second signal stops at once.
- A non-finite loss or gradient norm never becomes an update. `nan_policy: stop` ends the run
  naming the step, the samples of the batch and the last good checkpoint; `skip` drops the
  step and stops after `max_skipped_steps` of them in a row. All ranks take the same decision.
- The output folder is probed for writing before any work, and the free space is compared
  with the size of a checkpoint before training and before every save.
"""

from __future__ import annotations

import math
import shlex
import shutil
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import RunConfig
from tunesmith.errors import UserError

ADAM_BYTES_PER_PARAM = 8  # exp_avg and exp_avg_sq in fp32
_TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "chat_template")


# --------------------------------------------------------------------------- signals

class StopSignals:
    """While active, the first SIGINT or SIGTERM is recorded (the loop polls `received`); a
    second one raises KeyboardInterrupt at once. Previous handlers are restored on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step and writing a checkpoint "
              "(send it again to stop at once).", file=sys.stderr, flush=True)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """For data-loader workers: Ctrl-C reaches the whole process group, and a worker that quit on
    it would break the step the main process is finishing before it saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def resume_command(cfg: RunConfig) -> str:
    """The command line that continues this run: its YAML and command-line overrides (when it was
    started by `tunesmith train`), with resume_from_checkpoint=true."""
    if not cfg.source:
        config = Path(cfg.train.output_dir) / "config.yaml"  # the resolved config every run saves
        return shlex.join(["tunesmith", "train", str(config), "resume_from_checkpoint=true"])
    argv = sys.argv[1:]
    overrides: list[str] = []
    if "train" in argv and cfg.source in argv[argv.index("train") + 1:]:
        after = argv[argv.index(cfg.source, argv.index("train")) + 1:]
        overrides = [a for a in after if "=" in a and not a.startswith(
            ("resume_from_checkpoint=", "overwrite_output_dir="))]
    return shlex.join(["tunesmith", "train", cfg.source, *overrides, "resume_from_checkpoint=true"])


def interrupted(signum: int, step: int, total: int, checkpoint: Path, cfg: RunConfig) -> UserError:
    name = signal.Signals(signum).name
    return UserError(f"training stopped by {name} after step {step} of {total}; checkpoint written: {checkpoint}.\n"
                     f"Resume with: {resume_command(cfg)}", exit_code=128 + signum)


# --------------------------------------------------------------------------- non-finite steps

class StepGuard:
    """Decides, identically on every rank, whether a step's update is applied, skipped, or ends
    the run; also carries the stop request of a signal to all ranks."""

    def __init__(self, cfg: RunConfig, sources: list[tuple[str, int]], accelerator: Any, *,
                 scaler_handles_overflow: bool, last_checkpoint: Path | None, state: dict[str, Any] | None = None
                 ) -> None:
        self.cfg = cfg
        self.sources = sources
        self.accelerator = accelerator
        # With fp16 loss scaling an overflowing gradient is normal: the scaler skips that step itself.
        self.check_grad = not scaler_handles_overflow
        self.last_checkpoint = last_checkpoint
        self.skipped = int((state or {}).get("skipped_steps", 0))
        self.in_a_row = int((state or {}).get("skipped_in_a_row", 0))
        self.signals = StopSignals()
        self.stop_signal: int | None = None
        self.saved_step: int | None = None
        self.checkpoint_size = 0  # bytes one checkpoint takes (check_disk)

    def steps(self, batches: Iterable[Any]) -> Iterator[Any]:
        """The training steps with the stop signals caught; the previous handlers come back when
        the loop ends, however it ends (the generator is closed)."""
        with self.signals:
            yield from batches

    def state(self) -> dict[str, int]:
        """Saved with each checkpoint so a resumed run counts on from the same numbers."""
        return {"skipped_steps": self.skipped, "skipped_in_a_row": self.in_a_row}

    def saved(self, step: int, path: Path) -> None:
        self.saved_step, self.last_checkpoint = step, path

    def check_disk(self, out: Path, model: torch.nn.Module) -> None:
        """Before step 1: the disk must hold one checkpoint (which is also the final outputs' size)."""
        from tunesmith.model.provision import resolve_model_path

        self.checkpoint_size = checkpoint_bytes(model, self.cfg,
                                                tokenizer_bytes(resolve_model_path(self.cfg.model.model_name_or_path)))
        check_free_space(out, self.checkpoint_size, "one checkpoint")

    def check_step(self, step: int, loss: float, grad_norm: Any, batches: list[dict[str, torch.Tensor]]) -> bool:
        """True when the step's update may be applied. Raises UserError when the run must stop."""
        norm = float(grad_norm) if grad_norm is not None else 0.0
        bad_loss = not math.isfinite(loss)
        bad = bad_loss or (self.check_grad and not math.isfinite(norm))
        received = self.signals.received
        flags = torch.tensor([float(bad), float(received == signal.SIGINT), float(received == signal.SIGTERM)],
                             device=self.accelerator.device)
        if self.accelerator.num_processes > 1:  # one decision for all ranks
            flags = self.accelerator.reduce(flags, reduction="sum")
        bad = bool(flags[0] > 0)
        if flags[1] > 0:
            self.stop_signal = signal.SIGINT
        elif flags[2] > 0:
            self.stop_signal = signal.SIGTERM
        if not bad:
            self.in_a_row = 0
            return True
        what = f"the loss is {loss}" + (f" and the gradient norm is {norm}" if grad_norm is not None else "")
        samples = self._batch_samples(batches)
        policy, limit = self.cfg.train.nan_policy, self.cfg.train.max_skipped_steps
        if policy == "skip" and self.in_a_row + 1 < max(limit, 1):
            self.in_a_row += 1
            self.skipped += 1
            if self.accelerator.is_main_process:
                print(f"warning: step {step}: {what}; the step is skipped ({self.in_a_row} in a row, "
                      f"{self.skipped} in all; samples: {samples}).", file=sys.stderr, flush=True)
            return False
        if policy == "skip":
            head = (f"step {step}: {limit} steps in a row had a non-finite loss or gradient norm "
                    f"(max_skipped_steps: {limit}); this one: {what}.")
        else:
            head = f"step {step}: {what}; the update was not applied."
        if self.last_checkpoint is not None:
            where = f"The last good checkpoint is {self.last_checkpoint} (resume: {resume_command(self.cfg)})."
        else:
            where = "No checkpoint was written yet."
        raise UserError(f"{head} The batch held {samples}. {where}",
                        hint="look at those rows (`tunesmith data preview`), lower learning_rate, use bf16 rather "
                             "than fp16, or set nan_policy: skip to drop such steps.")

    def _batch_samples(self, batches: list[dict[str, torch.Tensor]]) -> str:
        indices = [int(i) for b in batches for i in b["sample_index"].tolist()]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            indices = list(gather_object(indices))
        named = []
        for i in indices:
            name, row = self.sources[i] if 0 <= i < len(self.sources) else ("?", -1)
            named.append(f"{name} row {row} (sample {i})")
        return ", ".join(named) or "no samples"


# --------------------------------------------------------------------------- disk

def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def tokenizer_bytes(model_dir: Path) -> int:
    if not model_dir.is_dir():
        return 0
    return sum(p.stat().st_size for p in model_dir.iterdir()
               if p.is_file() and (p.name.startswith(_TOKENIZER_FILES) or p.suffix in (".model", ".tiktoken")))


def checkpoint_bytes(model: torch.nn.Module, cfg: RunConfig, tokenizer_size: int) -> int:
    """The expected size of one checkpoint: saved weights (the adapter, or the whole model), the
    optimizer's two moments of every trainable parameter, the tokenizer, and a little state."""
    seen: set[int] = set()
    every = trainable = trainable_params = 0
    for p in model.parameters():
        if id(p) in seen:  # tied weights are stored once
            continue
        seen.add(id(p))
        count = getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves an empty tensor on each rank
        size = count * p.element_size()
        every += size
        if p.requires_grad:
            trainable += size
            trainable_params += count
    weights = trainable if cfg.finetune.finetuning_type == "lora" else every
    optimizer = 0 if cfg.train.save_only_model else trainable_params * ADAM_BYTES_PER_PARAM
    return weights + optimizer + tokenizer_size + 64 * 1024


def check_free_space(out: Path, need: int, what: str) -> None:
    """A clear error before writing `what` when the disk cannot hold `need` bytes."""
    try:
        free = shutil.disk_usage(out).free
    except OSError:
        return
    if free < need:
        raise UserError(f"{out} has {human(free)} free, and {what} needs about {human(need)}.",
                        hint="free disk space or choose another output_dir; save_total_limit keeps fewer "
                             "checkpoints, save_only_model: true drops the optimizer state (not resumable).")
