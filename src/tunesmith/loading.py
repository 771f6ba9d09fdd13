"""What a command runs, as an explicit value, and loading it.

`train` (to continue an adapter), `chat`, `export`, `api`, `eval` and the web UI all ask this
module which weights a config means and load them the same way, so one YAML means one model
everywhere. A source is one of:

- the base model alone (`base_model`);
- LoRA adapter folders on the base (`adapters_on_base`, from `adapter_name_or_path`);
- a run folder's final outputs (`run_outputs`), only when the run finished: an interrupted or
  overwritten run is refused with its state and the newest complete checkpoint to use instead.

A config that sets `output_dir` means that run's outputs; one that sets neither `output_dir` nor
`adapter_name_or_path` (LLaMA-Factory's inference YAMLs) means the base model.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.config import ModelArgs, RunConfig
from tunesmith.errors import UserError
from tunesmith.model.load import load_adapters, load_model, load_tokenizer
from tunesmith.model.provision import resolve_model_path
from tunesmith.run_folder import (
    COMPLETE,
    checkpoint_problem,
    final_outputs_problem,
    holds_run,
    list_checkpoints,
)


@dataclass(frozen=True)
class ModelSource:
    """What to load: the model folder, adapter folders on it, and the tokenizer carrying the template."""

    model_args: ModelArgs  # model_name_or_path points at the weights to load first
    adapters: tuple[str, ...]  # adapter folders put on those weights, in order
    tokenizer_dir: str | None  # folder whose tokenizer holds the training chat template
    description: str  # one line for people: what was loaded

    @property
    def name(self) -> str:
        """A short name for clients: the last adapter's or the model folder's name, or the alias."""
        name = self.adapters[-1] if self.adapters else self.model_args.model_name_or_path
        return Path(name.rstrip("/")).name or name


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()


def has_model_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(
        folder.glob(pattern) for pattern in ("*.safetensors", "*.bin", "*.safetensors.index.json"))


def is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def base_model(model_args: ModelArgs) -> ModelSource:
    return ModelSource(model_args, (), None, f"the base model {model_args.model_name_or_path}")


def adapters_on_base(model_args: ModelArgs, folders: list[str]) -> ModelSource:
    paths = [Path(p).expanduser() for p in folders]
    for folder in paths:
        if not is_adapter(folder):
            raise UserError(f"adapter_name_or_path: '{folder}' is not an adapter folder (no adapter_config.json).",
                            hint="give the output_dir of a LoRA run, or remove adapter_name_or_path.")
    names = ", ".join(str(f) for f in paths)
    return ModelSource(model_args, tuple(str(f) for f in paths), str(paths[0]) if has_tokenizer(paths[0]) else None,
                       f"adapter {names} on base model {model_args.model_name_or_path}")


def run_outputs(model_args: ModelArgs, run_dir: str | Path) -> ModelSource:
    """The final adapter or model of a finished run; anything else is refused with what to use instead."""
    out = Path(run_dir).expanduser()
    if not out.is_dir():
        raise UserError(f"output_dir {out} does not exist, so there is no trained adapter or model to load.",
                        hint="train first, or remove output_dir from the config to use the base model alone.")
    trained = is_adapter(out) or has_model_weights(out)
    problem = final_outputs_problem(out)
    if problem is not None and (trained or list_checkpoints(out)):
        raise UserError(f"{problem}: the run in {out} did not finish (it was stopped, is still running, or was "
                        "restarted with overwrite_output_dir), so its final outputs are not this run's result.",
                        hint=_newest_checkpoint_hint(out))
    if not trained:
        raise UserError(f"output_dir {out} holds no trained adapter or model.",
                        hint="train first, give adapter_name_or_path, or remove output_dir from the config to use "
                             "the base model alone.")
    _warn_if_other_base(out, model_args.model_name_or_path)
    tokenizer_dir = str(out) if has_tokenizer(out) else None
    if is_adapter(out):
        return ModelSource(model_args, (str(out),), tokenizer_dir,
                           f"the trained adapter in output_dir {out} on base model {model_args.model_name_or_path}")
    return ModelSource(dataclasses.replace(model_args, model_name_or_path=str(out)), (), tokenizer_dir,
                       f"the trained model in output_dir {out}")


def _newest_checkpoint_hint(out: Path) -> str:
    for _step, path in reversed(list_checkpoints(out)):
        if checkpoint_problem(path) is None:
            key = "adapter_name_or_path" if is_adapter(path) else "model_name_or_path"
            return (f"the newest complete checkpoint is {path}: use it with {key}={path}, or finish the run "
                    "with resume_from_checkpoint: true.")
    return "the run has no complete checkpoint either; train it again."


def source_from_folder(model_args: ModelArgs, folder: str | None) -> ModelSource:
    """What a folder a person picked means (the web UI's "run or adapter" box): nothing = the base
    model; a run folder = its final outputs; a bare adapter folder = that adapter on the base."""
    if not folder:
        return base_model(model_args)
    path = Path(folder).expanduser()
    if is_adapter(path) and not holds_run(path) and not (path / COMPLETE).exists():
        return adapters_on_base(model_args, [str(path)])
    return run_outputs(model_args, path)


def settings_for(source: ModelSource) -> dict[str, Any]:
    """The config keys that name a source, for a YAML handed to another tunesmith command."""
    settings: dict[str, Any] = {"model_name_or_path": source.model_args.model_name_or_path}
    if source.adapters:
        settings["adapter_name_or_path"] = list(source.adapters)
    return settings


def source_for(cfg: RunConfig) -> ModelSource:
    """The weights a config names: its adapters, else the run in an output_dir it sets, else the base."""
    if cfg.model.adapter_name_or_path:
        return adapters_on_base(cfg.model, cfg.model.adapter_name_or_path)
    if "output_dir" in cfg.given:
        return run_outputs(cfg.model, cfg.train.output_dir)
    return base_model(cfg.model)


def _warn_if_other_base(run_dir: Path, base: str) -> None:
    """A run's config.yaml names the base it was trained on; loading its adapter on another base
    gives nonsense or a shape error, so say so early."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    import yaml

    try:
        trained_on = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("model_name_or_path")
    except yaml.YAMLError:
        return
    if trained_on and not _same_model(str(trained_on), base):
        print(f"warning: {run_dir} was trained on '{trained_on}', but model_name_or_path is '{base}'.",
              file=sys.stderr)


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return resolve_model_path(a).resolve() == resolve_model_path(b).resolve()
    except UserError:
        return False


def load(source: ModelSource, *, dtype: Any, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) for a source: base weights, adapters on top (not merged), eval mode."""
    tok_args = source.model_args
    if source.tokenizer_dir:
        tok_args = dataclasses.replace(tok_args, model_name_or_path=source.tokenizer_dir)
    tokenizer = load_tokenizer(tok_args)
    model = load_model(source.model_args, dtype=dtype, device=device)
    if source.adapters:
        model = load_adapters(model, list(source.adapters))
    model.eval()
    return model, tokenizer
