"""Where tunesmith keeps files, and folder writes that never leave a half-written result where a
finished one is expected."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_folder(staging: Path, target: Path) -> None:
    """Move a fully written staging folder to target. An earlier target is set aside as
    `.old-<name>-<pid>` first and removed only after the rename, so a crash in between leaves
    either the old or the new folder (checkpoint recovery puts a set-aside one back)."""
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)


def cache_dir() -> Path:
    """Where provisioned models and tokenized data live: $TUNESMITH_CACHE, else ~/.cache/tunesmith."""
    root = (os.environ.get("TUNESMITH_CACHE")
            or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tunesmith")
    return Path(root)
