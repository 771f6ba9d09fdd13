"""Training stage: the loop (loop.py), the loss (loss.py), checkpoints and logs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunesmith.config import RunConfig


def run_training(cfg: RunConfig, started: float | None = None) -> dict[str, Any]:
    from tunesmith.train.loop import run_training as run

    return run(cfg, started)
