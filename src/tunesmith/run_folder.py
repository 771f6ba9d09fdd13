"""The run folder's life: the occupied check, completion markers, checkpoints and final outputs.

Every folder tunesmith publishes (a checkpoint, the final adapter or model, a tokenized cache, an
export) is written into a hidden temporary sibling, flushed to disk, marked complete last
(`.complete` lists the name, size and SHA-256 of every file) and then renamed into place, so a crash or
`kill -9` at any moment never leaves a folder that looks complete and is not. A file truncated
afterwards (a copy cut short, a full disk, a damaged sector) no longer matches its listed size or
hash, and such a folder is refused or skipped with the reason. Leftover temporary folders of a killed run are
removed when the next run starts (docs/ARCHITECTURE.md, "The run folder").

The final adapter or model goes next to the run files the same way: the run folder's own
`.complete` is removed first and written again, with the final files listed, only once they all
are in place (`write_final_outputs`, `final_outputs_problem`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError
from tunesmith.files import replace_folder

COMPLETE = ".complete"
STATE = "trainer_state.json"
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(folder: Path, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """relative path -> {size, sha256} of every file below folder (or of the given names)."""
    if names is not None:
        paths = [folder / n for n in names]
        files = [p for n in paths for p in ([n] if n.is_file() else sorted(n.rglob("*")))]
    else:
        files = sorted(folder.rglob("*"))
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files
            if p.is_file() and p.name != COMPLETE}


def _write_marker(folder: Path, files: dict[str, dict[str, Any]], **extra: Any) -> None:
    """`.complete`, written through a temporary name so it is never seen half-written."""
    tmp = folder / f"{COMPLETE}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"files": files, **extra}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / COMPLETE)
    _fsync_path(folder)


def completeness_problem(folder: Path, *, check_content: bool = True) -> str | None:
    """None when folder holds its completion marker and every file it lists, with the listed size
    and (with check_content) the listed SHA-256; otherwise what is wrong, in words. A same-size
    file with other bytes (a bad copy, a disk error) is caught by the hash."""
    marker = folder / COMPLETE
    if not marker.is_file():
        return "it was never finished (no .complete marker)"
    try:
        listed = json.loads(marker.read_text(encoding="utf-8")).get("files")
    except (ValueError, AttributeError):  # the plain "ok" marker of older versions: nothing to compare
        return None
    if not isinstance(listed, dict):
        return None
    for name, record in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size, digest = (record.get("size"), record.get("sha256")) if isinstance(record, dict) else (record, None)
        actual = path.stat().st_size
        if actual != size:
            return f"{name} is {actual} bytes, {size} were written (the file was truncated or changed)"
        if check_content and digest and _sha256(path) != digest:
            return f"{name} does not hold the bytes that were written (its SHA-256 differs; the file was damaged)"
    return None


def intact_checkpoints(output_dir: Path) -> list[Path]:
    """The checkpoints that would resume, oldest first."""
    return [path for _, path in list_checkpoints(output_dir) if checkpoint_problem(path) is None]


def what_is_safe(output_dir: Path) -> str:
    """One sentence on what a run can still be resumed from, for messages about failed writes."""
    intact = intact_checkpoints(output_dir)
    if intact:
        return f"the newest complete checkpoint, {intact[-1]}, is intact"
    return "no checkpoint has been written in this run yet (set save_steps to write some)"


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
        raise UserError(f"could not write {target}: {reason}. The partial copy was removed; "
                        f"{what_is_safe(target.parent)}.", hint=_storage_hint(target.parent)) from None
    return target


def _storage_hint(output_dir: Path) -> str:
    if intact_checkpoints(output_dir):
        return "free disk space or fix the permissions of output_dir, then resume with resume_from_checkpoint: true."
    return "free disk space or fix the permissions of output_dir, then run again."


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


# --------------------------------------------------------------------------- taking a folder

def holds_run(out: Path) -> bool:
    return out.is_dir() and (any((out / m).exists() for m in RUN_MARKERS) or bool(list_checkpoints(out)))


def claim_output_dir(out: Path, *, resuming: bool, overwrite: bool) -> Path:
    """Take output_dir for a run: refuse one that holds another run unless resuming or told to
    overwrite; on overwrite remove only what a run writes (never the user's other files), the
    completion marker first, so the old final outputs can never pass for this run's."""
    if holds_run(out) and not resuming:
        if not overwrite:
            raise UserError(f"output_dir {out} already holds a run.",
                            hint="continue it with resume_from_checkpoint: true, start afresh with "
                                 "overwrite_output_dir: true, or choose another output_dir.")
        (out / COMPLETE).unlink(missing_ok=True)
        _fsync_path(out)
        for child in out.iterdir():
            if child.name.startswith(("checkpoint-", ".tmp-checkpoint-")) or child.name == "runs":
                shutil.rmtree(child, ignore_errors=True)
            elif child.name in (*RUN_MARKERS, "training_loss.png", "preflight.txt"):
                child.unlink()
    prove_writable(out)
    return out


def prove_writable(out: Path) -> None:
    """Create output_dir and prove it takes a write, before any work is done (root ignores
    permission bits, so only a real write shows a read-only or impossible place)."""
    fix = "choose an output_dir on a writable disk."
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"output_dir {out} cannot be created: {exc.strerror or exc}.", hint=fix) from None
    probe = out / f".tmp-write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise UserError(f"output_dir {out} is not writable: {exc.strerror or exc}.", hint=fix) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)


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
        raise UserError(f"could not write the final outputs into {out}: {reason}. {what_is_safe(out).capitalize()}.",
                        hint=_storage_hint(out)) from None


def final_outputs_problem(out: Path) -> str | None:
    """None when the run folder holds complete final outputs, else why not."""
    problem = completeness_problem(Path(out))
    return None if problem is None else f"{out}: the final outputs are not complete: {problem}"


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
