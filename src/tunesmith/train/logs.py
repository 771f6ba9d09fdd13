"""Where a run reports itself: console progress, trainer_log.jsonl, TensorBoard, the loss plot."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


class RunLog:
    """One object that every logging destination hangs off; only the main process creates one."""

    def __init__(self, output_dir: Path, *, total_steps: int, start_step: int, tensorboard: bool) -> None:
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
            self.writer = SummaryWriter(log_dir=str(output_dir / "runs"), purge_step=start_step + 1 if start_step else None)

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
        if "eval_loss" in entry:
            self.bar.write(f"step {entry['step']}: eval loss {entry['eval_loss']:.4f}")

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


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
