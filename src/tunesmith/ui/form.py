"""Form fields derived from the config's key table (config.KEYS).

Each widget is labelled with its config key and takes its default, help and allowed values from
the dataclass field in config.py, so the page never restates a default. What the form holds
goes back to the same YAML `tunesmith train` reads, and through the same validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tunesmith.config import IGNORED_KEYS, KEYS, load_config
from tunesmith.errors import UserError


def field_type(key: str) -> tuple[Any, bool]:
    """(bool, int, float, str or list[str]; whether None is allowed) of a config key."""
    return KEYS[key].base, KEYS[key].optional


def default(key: str) -> Any:
    return KEYS[key].default


def help_text(key: str) -> str:
    return KEYS[key].help


def choices(key: str) -> tuple[Any, ...] | None:
    return KEYS[key].choices


def widget(key: str, prefix: str, *, suggestions: list[str] | None = None, **kwargs: Any) -> Any:
    """The Gradio input for one config key: label, default, help and choices from the schema.
    `suggestions` makes a free-text key a drop-down that still takes any typed value."""
    import gradio as gr

    base, optional = field_type(key)
    options = dict(label=key, info=help_text(key), elem_id=f"{prefix}-{key}")
    options.update(kwargs)
    value = options.pop("value", default(key))
    allowed = choices(key)
    if KEYS[key].is_list and isinstance(value, list) and not allowed:  # shown as YAML's one-line form: a, b
        value = ", ".join(value)
    if suggestions is not None:
        return gr.Dropdown(choices=list(suggestions), value=value, allow_custom_value=True, **options)
    if allowed:
        return gr.Dropdown(choices=list(allowed), value=value, multiselect=KEYS[key].is_list, **options)
    if base is bool:
        return gr.Checkbox(value=value, **options)
    if base in (int, float) and not optional:
        return gr.Number(value=value, precision=0 if base is int else None, **options)
    # Free text, and numbers that may be left empty (a number box cannot be empty; empty = the default).
    options.setdefault("placeholder", "empty = default" if value is None else None)
    return gr.Textbox(value="" if value is None else str(value), **options)


def settings_from_form(keys: list[str], values: list[Any]) -> dict[str, Any]:
    """Form values by key, typed as the YAML would hold them: an emptied field is None."""
    settings: dict[str, Any] = {}
    for key, value in zip(keys, values, strict=True):
        if isinstance(value, list | tuple):  # a multi-select
            value = [str(v) for v in value] or None
        if isinstance(value, str):
            value = value.strip()
        base = field_type(key)[0]
        if value == "" or value is None:
            value = None
        elif base in (int, float) and isinstance(value, str):
            value = _number(value)
        elif base is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if key == "template" and value == "auto":
            value = None
        settings[key] = value
    return settings


def _number(text: str) -> Any:
    """A typed number from a text box, or the text itself for validation to name."""
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number


def extra_settings(text: str) -> dict[str, Any]:
    """The free-form 'more keys' box: YAML `key: value` lines."""
    if not text or not text.strip():
        return {}
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"More keys:{at}: not valid YAML: {getattr(exc, 'problem', exc)}",
                        hint="write one `key: value` per line.") from None
    if not isinstance(loaded, dict):
        raise UserError("More keys: expected `key: value` lines.", hint="for example `weight_decay: 0.01`.")
    return {str(k): v for k, v in loaded.items()}


def config_yaml(settings: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
    """The YAML `tunesmith train` reads. Optional keys left empty are omitted (they mean 'default');
    an emptied required key stays, as null, so validation names it."""
    data = {k: v for k, v in settings.items() if v is not None or not field_type(k)[1]}
    data.update(extra or {})
    header = "# Written by `tunesmith webui`; run it with: tunesmith train <this file>\n"
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def check_yaml(text: str, scratch: Path, label: str) -> None:
    """Validate a YAML text exactly as `tunesmith train` would; messages name `label`, not the scratch file."""
    scratch.write_text(text, encoding="utf-8")
    try:
        load_config(scratch)
    except UserError as exc:
        exc.args = (str(exc.args[0]).replace(str(scratch), label),)
        raise


def form_from_yaml(path: str | Path, keys: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(values for the form's keys, every other key) of a YAML config, after validating it."""
    cfg = load_config(path)
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    flat = cfg.to_flat()
    values = {key: (flat[key] if key in raw else default(key)) for key in keys}
    if values.get("template") is None:
        values["template"] = "auto"
    others = {str(k): v for k, v in raw.items() if k not in keys and k not in IGNORED_KEYS}
    return values, others
