"""The web UI's workspace: every path the page reads or writes lies inside one root folder.

Paths are resolved (symlinks followed, relative ones against the root) before the check, so
`../` and a link pointing out are refused alike. The one path allowed outside is the default
model, by its alias or its provisioned folder. Configs read from disk are checked without
quoting them: a file that is not a config yields its location and the kind of fault, never its text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tunesmith.config import DEFAULT_MODEL, IGNORED_KEYS, KEYS, load_config
from tunesmith.data.registry import resolve_datasets
from tunesmith.errors import UserError, did_you_mean
from tunesmith.model.provision import default_model_dir
from tunesmith.ui import form

# Config keys that name files or folders (comma-separated lists for adapters).
PATH_KEYS = ("model_name_or_path", "adapter_name_or_path", "dataset_dir", "tokenized_path", "output_dir",
             "resume_from_checkpoint", "deepspeed", "export_dir")


class Workspace:
    """The root folder the web UI is confined to."""

    def __init__(self, root: str | Path | None = None) -> None:
        folder = Path(root or Path.cwd()).expanduser()
        if not folder.is_dir():
            raise UserError(f"--root {folder}: no such folder.", hint="create it, or choose another --root.")
        self.root = folder.resolve()

    def path(self, value: str | Path, what: str) -> Path:
        """The resolved path, if it lies inside the root; a UserError naming the root otherwise."""
        text = str(value).strip()
        if not text or "\x00" in text:
            raise UserError(f"{what}: give a path inside the workspace root {self.root}.")
        path = Path(text).expanduser()
        resolved = (path if path.is_absolute() else self.root / path).resolve()
        if not resolved.is_relative_to(self.root):
            raise UserError(f"{what} {text} is outside the workspace root {self.root} (symlinks are followed).",
                            hint="the web UI reads and writes only inside its root; start it with "
                                 "`tunesmith webui --root DIR` to work elsewhere.")
        return resolved

    def model(self, value: str | None, what: str = "model_name_or_path") -> None:
        """A model folder inside the root, or the default model (alias or its provisioned folder)."""
        text = (value or "").strip()
        if text in ("", DEFAULT_MODEL):
            return

        if Path(text).expanduser().resolve() == default_model_dir().resolve():
            return
        self.path(text, what)

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Every path-valued key of a config (form values and More keys alike) inside the root."""
        for key in PATH_KEYS:
            value = settings.get(key)
            if value is None or str(value).strip() == "":
                continue
            if key == "model_name_or_path":
                self.model(str(value))
            elif key == "adapter_name_or_path":
                for part in str(value).split(","):
                    if part.strip():
                        self.path(part, key)
            elif key == "resume_from_checkpoint" and str(value).strip().lower() in ("true", "false"):
                continue
            else:
                self.path(str(value), key)

    def check_datasets(self, dataset_dir: str, names: str | list[str] | None) -> None:
        """The chosen datasets exist in dataset_dir and their files lie inside the root."""

        for spec in resolve_datasets(names, self.path(dataset_dir, "dataset_dir")):
            for file in spec.paths:
                self.path(file, f"the file of dataset '{spec.name}'")

    def read_config(self, path: str, keys: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(form values, other keys) of a config file inside the root, checked without quoting it."""

        target = self.path(path, "config file")
        if not target.is_file():
            raise UserError(f"config file not found: {target}")
        try:
            text = target.read_text(encoding="utf-8")
            loaded = yaml.safe_load(text)
        except UnicodeDecodeError:
            raise UserError(f"{target}: not a text file (not UTF-8), so not a config.") from None
        except OSError as exc:
            raise UserError(f"cannot read {target}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise UserError(f"{target}{at}: not valid YAML.") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{target}: not a config: the top level must be a mapping of key: value lines.")
        lines = _key_lines(text)
        for key, value in loaded.items():
            name = str(key)
            where = f"{target}, line {lines.get(name, '?')}"
            if name in IGNORED_KEYS:
                continue
            if name not in KEYS:  # the key itself may be anything the file holds: not repeated
                raise UserError(f"{where}: a key that is not a config key{did_you_mean(name, list(KEYS))}.",
                                hint="`tunesmith train --keys` lists every key.")
            try:
                load_config(None, {name: value})
            except UserError:
                raise UserError(f"{where}: the value of '{name}' is not valid for it ({_expected(name)}).") from None
        try:
            return form.form_from_yaml(target, keys)
        except UserError:
            raise UserError(f"{target}: the settings do not fit together.",
                            hint=f"`tunesmith train {target}` in a terminal says which.") from None


def _key_lines(text: str) -> dict[str, int]:
    """Top-level key -> its line number."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): k.start_mark.line + 1 for k, _ in node.value}


def _expected(key: str) -> str:

    allowed = form.choices(key)
    if allowed:
        return "one of " + ", ".join(str(a) for a in allowed)
    base, optional = form.field_type(key)
    return f"expected {base.__name__}" + (" or empty" if optional else "")
