"""Where a run reports itself: console progress, trainer_log.jsonl, TensorBoard, the loss plot."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tunesmith.data.encode import IGNORE_INDEX


class RunLog:
    """One object that every logging destination hangs off; only the main process creates one."""

    def __init__(self, output_dir: Path, *, total_steps: int, start_step: int, tensorboard: bool,
                 trackers: list[Any] | None = None) -> None:
        from tqdm.auto import tqdm

        self.path = output_dir / "trainer_log.jsonl"
        self.total = total_steps
        self.start_time = time.time()
        self.start_step = start_step
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr, mininterval=0.5)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a resumed run is about to write again
            self.writer = SummaryWriter(log_dir=str(output_dir / "runs"),
                                        purge_step=start_step + 1 if start_step else None)
        self.output_dir = output_dir
        self.trackers = trackers or []  # MLflow / W&B runs (train/trackers.py)

    def eta(self, step: int) -> float:
        done = step - self.start_step
        return (time.time() - self.start_time) / done * (self.total - step) if done > 0 else float("nan")

    def step(self, step: int, postfix: dict[str, Any]) -> None:
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(postfix, refresh=False)

    def record(self, entry: dict[str, Any]) -> None:
        entry = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in entry.items()}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
        if self.writer is not None:
            step = entry["step"]
            for key, tag in (("loss", "train/loss"), ("learning_rate", "train/learning_rate"),
                             ("grad_norm", "train/grad_norm"), ("tokens_per_second", "train/tokens_per_second"),
                             ("eval_loss", "eval/loss")):
                if isinstance(entry.get(key), int | float):
                    self.writer.add_scalar(tag, entry[key], step)
            self.writer.flush()
        for tracker in self.trackers:
            tracker.log(entry)
        if "eval_loss" in entry:
            self.bar.write(f"step {entry['step']}: eval loss {entry['eval_loss']:.4f}")

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()

    def finish_trackers(self, results: dict[str, Any] | None, status: str = "FINISHED") -> None:
        """Final results and the run folder's plot go to the trackers, whose runs then end."""
        for tracker in self.trackers:
            tracker.finish(results, self.output_dir, status)
        self.trackers = []


class StepMeter:
    """Running sums for the current logging window and for the whole run.

    Token counts are this rank's non-padding tokens times the world size; a step with weight 0 (a
    rank that only keeps the collectives in step) counts nothing.
    """

    def __init__(self, world: int, flops: Any) -> None:
        self.world, self.flops = world, flops
        self.run_tokens, self.run_supervised, self.run_seconds = 0, 0, 0.0
        self.reset_window()

    def reset_window(self) -> None:
        self.loss, self.steps, self.tokens, self.slots, self.flop = 0.0, 0, 0, 0, 0.0
        self.started = time.time()

    def add(self, batches: list[dict[str, Any]], *, weight: float, loss: float, applied: bool, supervised: int,
            seconds: float) -> None:
        tokens = int(weight) * sum(int(b["num_tokens"]) for b in batches)
        self.tokens += tokens
        self.slots += int(weight) * sum(b["input_ids"].numel() for b in batches)
        self.flop += weight * sum(self.flops.step_flops(int(b["num_tokens"]),
                                                        int((b["labels"][:, 1:] != IGNORE_INDEX).sum()),
                                                        int(b["attention_pairs"])) for b in batches)
        self.loss += loss if applied else 0.0  # a skipped step (nan_policy: skip) has no loss to average
        self.steps += int(applied)
        self.run_tokens += tokens
        self.run_supervised += supervised
        self.run_seconds += seconds

    def tokens_per_second(self) -> float:
        elapsed = time.time() - self.started
        return self.tokens * self.world / elapsed if elapsed > 0 else 0.0

    def window(self) -> dict[str, Any]:
        """The window's figures for trainer_log.jsonl; no loss when every step was skipped."""
        elapsed = time.time() - self.started
        return {
            **({"loss": self.loss / self.steps} if self.steps else {}),
            "tokens": self.tokens * self.world,  # non-padding tokens trained in this window
            "tokens_per_second": self.tokens * self.world / elapsed if elapsed > 0 else None,
            "padding_share": 1 - self.tokens / max(self.slots, 1),
            # useful FLOPs per second (formula in train/flops.py)
            "flops_per_second": self.flop * self.world / elapsed if elapsed > 0 else None,
        }

    def run_totals(self) -> dict[str, Any]:
        return {"trained_tokens": self.run_tokens * self.world, "supervised_tokens": self.run_supervised,
                "step_seconds": round(self.run_seconds, 3),
                "train_tokens_per_second": round(self.run_tokens * self.world / max(self.run_seconds, 1e-9), 2)}


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(output_dir: Path) -> Path | None:
    """training_loss.png: train loss (and its moving average) and eval loss against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = read_log(output_dir / "trainer_log.jsonl")
    train = [(e["step"], e["loss"]) for e in entries if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in entries if "eval_loss" in e]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), color="#8fb3d9", label="train loss")
        window = max(1, len(train) // 10)
        if window > 1:
            ys = [y for _, y in train]
            smooth = [sum(ys[max(0, i - window + 1) : i + 1]) / len(ys[max(0, i - window + 1) : i + 1])
                      for i in range(len(ys))]
            ax.plot([x for x, _ in train], smooth, color="#1f5fa8", label="train loss (smoothed)")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", color="#d9822b", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"training loss: {output_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    out = output_dir / "training_loss.png"
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
