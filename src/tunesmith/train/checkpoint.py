"""Checkpoints: written to a temporary folder, marked complete last, then renamed into place,
so a crash never leaves a folder that looks complete and is not (DESIGN §3)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunesmith.errors import UserError

COMPLETE = ".complete"
STATE = "trainer_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")

# What marks a folder as holding a run (refused without overwrite_output_dir or resume).
RUN_MARKERS = ("trainer_log.jsonl", "config.yaml", STATE, "train_results.json")


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def atomic_folder(target: Path, write: Callable[[Path], None]) -> Path:
    """Run write(tmp) into a sibling temp folder, flush, mark complete, rename to target."""
    target = Path(target)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        _fsync_tree(tmp)
        (tmp / COMPLETE).write_text("ok\n")
        if target.exists():
            old = target.with_name(f".old-{target.name}-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    found = []
    if output_dir.is_dir():
        for child in output_dir.iterdir():
            m = _CKPT.match(child.name)
            if m and child.is_dir() and (child / COMPLETE).exists():
                found.append((int(m.group(1)), child))
    return sorted(found)


def find_resume_checkpoint(setting: str | None, output_dir: Path) -> Path | None:
    """`resume_from_checkpoint`: a folder, or true for the newest complete one in output_dir."""
    if setting is None or str(setting).lower() in ("false", "none", ""):
        return None
    if str(setting).lower() == "true":
        found = list_checkpoints(output_dir)
        if not found:
            raise UserError(f"resume_from_checkpoint: true, but {output_dir} holds no complete checkpoint-N folder.")
        step, path = found[-1]
        print(f"Resuming from the newest complete checkpoint: {path}", file=sys.stderr)
        return path
    path = Path(setting)
    if not path.is_dir():
        raise UserError(f"resume_from_checkpoint: {path} is not a folder.")
    if not (path / COMPLETE).exists() or not (path / STATE).exists():
        raise UserError(f"resume_from_checkpoint: {path} is not a complete checkpoint (it was never finished, "
                        "e.g. the run stopped while saving).", hint="use resume_from_checkpoint: true to take the newest complete one.")
    return path


def rotate(output_dir: Path, keep: int | None) -> None:
    if not keep or keep <= 0:
        return
    found = list_checkpoints(output_dir)
    for _, path in found[: max(0, len(found) - keep)]:
        shutil.rmtree(path, ignore_errors=True)


def save_training_state(folder: Path, *, optimizer: torch.optim.Optimizer | None,
                        scheduler: Any, state: dict[str, Any]) -> None:
    if optimizer is not None:
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")
        torch.save(rng_state(), folder / "rng_state.pt")
    (folder / STATE).write_text(json.dumps(state, indent=2))


def load_training_state(folder: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    if not (folder / "optimizer.pt").exists():
        raise UserError(f"{folder} was saved with save_only_model: true and holds no optimizer state; "
                        "it cannot be resumed exactly.", hint="load its weights as a new run instead.")
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    # RNG states hold numpy/python tuples: trusted, written by this program into this folder.
    set_rng_state(torch.load(folder / "rng_state.pt", weights_only=False))
    return json.loads((folder / STATE).read_text())
