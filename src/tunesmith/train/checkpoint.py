"""Checkpoints and final outputs that survive a crash (DESIGN §3).

A checkpoint is written into a hidden temporary folder, flushed to disk, marked complete last
(`.complete` holds the name and size of every file) and then renamed into place, so a crash or
`kill -9` at any moment never leaves a folder that looks complete and is not. A file truncated
afterwards (a copy cut short, a full disk) no longer matches the size in the marker, and such a
checkpoint is skipped on resume with a message. Leftover temporary folders of a killed run are
removed when the next run starts.

The final adapter or model goes next to the run files the same way: the run folder's own
`.complete` is removed first and written again, with the final files listed, only once they all
are in place (see `write_final_outputs` and `final_outputs_problem`).

Tests make a save slow with the environment variable TUNESMITH_TEST_SAVE_DELAY (seconds slept
after the files are written into the temporary folder and before it is marked complete), to
stop a run deterministically in the middle of a save. It has no other use.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunesmith.errors import UserError
from tunesmith.files import replace_folder

COMPLETE = ".complete"
STATE = "trainer_state.json"
TEST_SAVE_DELAY_ENV = "TUNESMITH_TEST_SAVE_DELAY"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-"
_OLD = re.compile(r"^\.old-(checkpoint-\d+)-\d+$")

# What marks a folder as holding a run (refused without overwrite_output_dir or resume).
RUN_MARKERS = ("trainer_log.jsonl", "config.yaml", STATE, "train_results.json")


# --------------------------------------------------------------------------- durable writes

def _fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (so a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the data itself was flushed
        pass
    finally:
        os.close(fd)


def _manifest(folder: Path, names: list[str] | None = None) -> dict[str, int]:
    """relative path -> size in bytes, of every file below folder (or of the given names)."""
    if names is not None:
        paths = [folder / n for n in names]
        files = [p for n in paths for p in ([n] if n.is_file() else sorted(n.rglob("*")))]
    else:
        files = sorted(folder.rglob("*"))
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in files
            if p.is_file() and p.name != COMPLETE}


def _write_marker(folder: Path, files: dict[str, int], **extra: Any) -> None:
    """`.complete`, written through a temporary name so it is never seen half-written."""
    tmp = folder / f"{COMPLETE}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"files": files, **extra}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / COMPLETE)
    _fsync_path(folder)


def completeness_problem(folder: Path) -> str | None:
    """None when folder holds its completion marker and every file it lists, at the listed size;
    otherwise what is wrong, in words."""
    marker = folder / COMPLETE
    if not marker.is_file():
        return "it was never finished (no .complete marker)"
    try:
        listed = json.loads(marker.read_text(encoding="utf-8")).get("files")
    except (ValueError, AttributeError):  # the plain "ok" marker of older versions: nothing to compare
        return None
    if not isinstance(listed, dict):
        return None
    for name, size in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{name} is {actual} bytes, {size} were written (the file was truncated or changed)"
    return None


def _save_delay() -> None:
    text = os.environ.get(TEST_SAVE_DELAY_ENV)
    if text:
        time.sleep(float(text))


def atomic_folder(target: Path, write: Callable[[Path], None]) -> Path:
    """Run write(tmp) into a hidden sibling folder, flush, mark complete, rename to target.

    A failure (a full disk, a permission error) removes the temporary folder and raises a
    UserError; whatever was at target before stays as it was.
    """
    target = Path(target)
    tmp = target.with_name(f"{_TMP_PREFIX}{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        _save_delay()
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                _fsync_path(path)
        _write_marker(tmp, _manifest(tmp))
        replace_folder(tmp, target)
        _fsync_path(target.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = storage_error(exc, target.parent)
        if reason is None:
            raise
        raise UserError(f"could not write {target}: {reason}. The partial copy was removed; the earlier "
                        "checkpoints are intact.",
                        hint="free disk space or fix the permissions of output_dir, then resume with "
                             "resume_from_checkpoint: true.") from None
    return target


def storage_error(exc: BaseException, folder: Path | None = None) -> str | None:
    """What went wrong with the disk, when exc is a failed write (torch and safetensors wrap the
    operating system's error in their own exception types); None for anything else."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if not isinstance(exc, Exception):
        return None
    text = str(exc)
    if "No space left" in text or "os error 28" in text:
        return "No space left on device"
    if any(s in text for s in ("file write failed", "unexpected pos", "I/O error", "IoError", "Disk quota",
                               "Read-only file system")):
        with contextlib.suppress(OSError):
            if folder is not None and shutil.disk_usage(folder).free < 1024 * 1024:
                return "No space left on device"
        return text.splitlines()[0]
    return None


def clean_interrupted(output_dir: Path) -> list[str]:
    """Remove the temporary folders of saves a killed run left behind; put back a checkpoint that
    was being replaced at the moment of the kill. Returns what was done, for the log."""
    done: list[str] = []
    if not output_dir.is_dir():
        return done
    for child in sorted(output_dir.iterdir()):
        old = _OLD.match(child.name)
        if old and child.is_dir():
            original = output_dir / old.group(1)
            if not original.exists() and completeness_problem(child) is None:
                child.rename(original)
                done.append(f"restored {original.name}")
            else:
                shutil.rmtree(child, ignore_errors=True)
                done.append(f"removed {child.name}")
        elif child.name.startswith(_TMP_PREFIX):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            done.append(f"removed {child.name}")
    if done:
        print(f"Cleaned up after an interrupted run in {output_dir}: {', '.join(done)}.", file=sys.stderr)
    return done


# --------------------------------------------------------------------------- final outputs

def write_final_outputs(out: Path, write: Callable[[Path], None]) -> None:
    """Write the final weights and tokenizer into a staging folder, then move them next to the
    run files. The run folder's `.complete` is removed before the first file moves and written
    again (listing them) after the last, so a half-written final adapter is detectable."""
    staging = out / f"{_TMP_PREFIX}final"
    shutil.rmtree(staging, ignore_errors=True)
    (out / COMPLETE).unlink(missing_ok=True)
    _fsync_path(out)
    try:
        staging.mkdir()
        write(staging)
        _save_delay()
        names = sorted(p.name for p in staging.iterdir())
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                _fsync_path(path)
        for name in names:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            (staging / name).replace(target)
        staging.rmdir()
        _fsync_path(out)
        _write_marker(out, _manifest(out, names), final=True)
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        reason = storage_error(exc, out)
        if reason is None:
            raise
        raise UserError(f"could not write the final outputs into {out}: {reason}. The checkpoints "
                        "are intact.", hint="free disk space or fix the permissions of output_dir, then resume "
                                            "with resume_from_checkpoint: true.") from None


def final_outputs_problem(out: Path) -> str | None:
    """None when the run folder holds complete final outputs, else why not."""
    problem = completeness_problem(Path(out))
    return None if problem is None else f"{out}: the final outputs are not complete: {problem}"


# --------------------------------------------------------------------------- RNG state

def rng_state() -> dict[str, Any]:
    """The RNG states as tensors and plain numbers, so they load with torch.load(weights_only=True)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- finding checkpoints

def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoints marked complete, oldest first (their files are checked by find_resume_checkpoint)."""
    found = []
    if output_dir.is_dir():
        for child in output_dir.iterdir():
            m = _CKPT.match(child.name)
            if m and child.is_dir() and (child / COMPLETE).exists():
                found.append((int(m.group(1)), child))
    return sorted(found)


def checkpoint_problem(path: Path) -> str | None:
    problem = completeness_problem(path)
    if problem is None and not (path / STATE).is_file():
        problem = f"{STATE} is missing"
    return problem


def find_resume_checkpoint(setting: str | None, output_dir: Path) -> Path | None:
    """`resume_from_checkpoint`: a folder, or true for the newest intact one in output_dir."""
    if setting is None or str(setting).lower() in ("false", "none", ""):
        return None
    if str(setting).lower() == "true":
        found = list_checkpoints(output_dir)
        for _step, path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                print(f"Resuming from the newest complete checkpoint: {path}", file=sys.stderr)
                return path
            print(f"warning: skipping {path}: {problem}.", file=sys.stderr)
        if found:
            raise UserError(f"resume_from_checkpoint: true, but no checkpoint in {output_dir} is intact "
                            "(see the warnings above).", hint="start afresh with overwrite_output_dir: true.")
        raise UserError(f"resume_from_checkpoint: true, but {output_dir} holds no complete checkpoint-N folder.")
    path = Path(setting)
    if not path.is_dir():
        raise UserError(f"resume_from_checkpoint: {path} is not a folder.")
    if not (path / COMPLETE).exists():
        raise UserError(f"resume_from_checkpoint: {path} is not a complete checkpoint (it was never finished, "
                        "e.g. the run stopped while saving).",
                        hint="use resume_from_checkpoint: true to take the newest complete one.")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(f"resume_from_checkpoint: {path} is damaged: {problem}.",
                        hint="use resume_from_checkpoint: true to take the newest intact one.")
    return path


def checkpoint_step(path: Path) -> int:
    return int(json.loads((path / STATE).read_text(encoding="utf-8"))["global_step"])


def rotate(output_dir: Path, keep: int | None) -> None:
    if not keep or keep <= 0:
        return
    found = list_checkpoints(output_dir)
    for _, path in found[: max(0, len(found) - keep)]:
        shutil.rmtree(path, ignore_errors=True)


def trim_log(path: Path, step: int) -> int:
    """Drop trainer_log.jsonl entries after `step` (and a line a kill cut short), so a resumed
    run's log reads like an uninterrupted run's. Returns how many lines were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            keep = isinstance(entry, dict) and int(entry.get("step", 0)) <= step
        except (ValueError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        elif line.strip():
            dropped += 1
    if dropped:
        tmp = path.with_name(f"{_TMP_PREFIX}{path.name}")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


# --------------------------------------------------------------------------- training state

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
    try:  # weights_only: a checkpoint from elsewhere cannot run code when it is loaded
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        set_rng_state(torch.load(folder / "rng_state.pt", weights_only=True))
    except (RuntimeError, KeyError, TypeError, ValueError, EOFError) as exc:
        with contextlib.suppress(Exception):
            exc = str(exc).splitlines()[0]
        raise UserError(f"{folder}: the training state could not be read: {exc}",
                        hint="resume from another checkpoint, or start afresh.") from None
    return json.loads((folder / STATE).read_text())
