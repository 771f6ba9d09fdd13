"""dataset_info.json: named datasets, their files and how their columns map to a conversation.

The schema and its defaults are LLaMA-Factory's, so an existing `data/` folder works unchanged.
Only local files are read: entries that point at a hub are reported, nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError, did_you_mean

REGISTRY_FILE = "dataset_info.json"
FORMATTINGS = ("alpaca", "sharegpt", "openai")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow")

# Used when an entry has no "columns"; an entry's "columns" replace these as a whole (as in LLaMA-Factory).
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
    "sharegpt": {"messages": "conversations"},
    "openai": {"messages": "messages"},
}
COLUMN_KEYS: dict[str, tuple[str, ...]] = {
    "alpaca": ("prompt", "query", "response", "history", "system", "tools"),
    "sharegpt": ("messages", "system", "tools"),
    "openai": ("messages", "system", "tools"),
}
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "alpaca": ("prompt", "response"),
    "sharegpt": ("messages",),
    "openai": ("messages",),
}
# Tags an entry leaves out keep these values, so a role the data uses is never silently unknown.
DEFAULT_TAGS: dict[str, dict[str, str]] = {
    "sharegpt": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"},
    "openai": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system"},
}
TAG_KEYS = tuple(DEFAULT_TAGS["sharegpt"])

HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
UNSUPPORTED_COLUMNS = {
    "images": "multimodal (image) datasets are not supported yet",
    "videos": "multimodal (video) datasets are not supported yet",
    "audios": "multimodal (audio) datasets are not supported yet",
    "chosen": "preference (ranking) datasets are not supported yet",
    "rejected": "preference (ranking) datasets are not supported yet",
    "kto_tag": "KTO datasets are not supported yet",
}
ENTRY_KEYS = ("file_name", "formatting", "columns", "tags", "num_samples", "split", "ranking", "subset",
              "folder", "load_from", "file_sha1", *HUB_KEYS)


@dataclass
class DatasetSpec:
    """One resolved dataset_info.json entry; columns and tags have their defaults filled in."""

    name: str
    paths: list[Path]
    formatting: str = "alpaca"
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    num_samples: int | None = None
    split: str = "train"
    explicit_columns: tuple[str, ...] = ()  # column keys the entry names itself (checked against the data)


def load_registry(dataset_dir: str | Path) -> dict[str, dict]:
    """The entries of dataset_dir/dataset_info.json, by name."""
    path = Path(dataset_dir) / REGISTRY_FILE
    if not Path(dataset_dir).is_dir():
        raise UserError(f"dataset_dir '{dataset_dir}' is not a folder.",
                        hint=f"set dataset_dir to the folder that holds {REGISTRY_FILE} and the data files.")
    if not path.is_file():
        raise UserError(f"{path} not found.",
                        hint=f"create {REGISTRY_FILE} in that folder (LLaMA-Factory's format), "
                             "or set dataset_dir to the folder that holds it.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{path} line {line}: bytes that are not UTF-8 at byte offset {exc.start}.",
                        hint="save the file as UTF-8.") from None
    try:
        registry = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}.",
                        hint="fix the JSON syntax there (a missing comma or quote is the usual cause).") from None
    if not isinstance(registry, dict):
        raise UserError(f"{path}: expected a JSON object of dataset entries, found {type(registry).__name__}.",
                        hint='write it as {"my_data": {"file_name": "my_data.json"}, ...}.')
    return registry


def _split_names(names: str | list[str] | tuple[str, ...] | None) -> list[str]:
    if names is None:
        return []
    parts = names.split(",") if isinstance(names, str) else [str(n) for n in names]
    return [p.strip() for p in parts if p.strip()]


def resolve_datasets(names: str | list[str] | None, dataset_dir: str | Path) -> list[DatasetSpec]:
    """The DatasetSpec of each comma-separated name, in order; [] when names is None or empty."""
    wanted = _split_names(names)
    if not wanted:
        return []
    dataset_dir = Path(dataset_dir)
    registry = load_registry(dataset_dir)
    specs = []
    for name in wanted:
        if name not in registry:
            raise UserError(_unknown_name_message(name, registry, dataset_dir),
                            hint=f"add an entry for it to {dataset_dir / REGISTRY_FILE}, or fix the name.")
        specs.append(_resolve_entry(name, registry[name], dataset_dir))
    return specs


def _unknown_name_message(name: str, registry: dict[str, Any], dataset_dir: Path) -> str:
    local = [n for n, e in registry.items()
             if isinstance(e, dict) and isinstance(e.get("file_name"), str) and (dataset_dir / e["file_name"]).exists()]
    others = len(registry) - len(local)
    known = ", ".join(local) if local else "(none with a file present)"
    tail = f" ({others} more entries name hub datasets or files not present)" if others else ""
    return (f"unknown dataset '{name}'{did_you_mean(name, list(registry))}: it is not in "
            f"{dataset_dir / REGISTRY_FILE}. Known datasets with their files here: {known}{tail}.")


def _resolve_entry(name: str, entry: Any, dataset_dir: Path) -> DatasetSpec:
    where = f"dataset '{name}' in {dataset_dir / REGISTRY_FILE}"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: the entry must be a JSON object, found {type(entry).__name__}.",
                        hint=f'write it as "{name}": {{"file_name": "..."}}.')
    for key in entry:
        if key not in ENTRY_KEYS:
            raise UserError(f"{where}: unknown key '{key}'{did_you_mean(key, ENTRY_KEYS)}.",
                            hint="known keys: " + ", ".join(ENTRY_KEYS) + ".")

    if entry.get("ranking"):
        raise UserError(f"{where}: preference (ranking) datasets are not supported yet; tunesmith trains SFT only.",
                        hint="use an SFT dataset (alpaca, sharegpt or openai messages).")
    columns_given = entry.get("columns")
    if columns_given is not None and not isinstance(columns_given, dict):
        raise UserError(f"{where}: 'columns' must be an object mapping column keys to names in the data.")
    for key in columns_given or {}:
        if key in UNSUPPORTED_COLUMNS:
            raise UserError(f"{where}: {UNSUPPORTED_COLUMNS[key]} (column '{key}').",
                            hint="use a text-only SFT dataset.")

    if "file_name" not in entry:
        hub = next((k for k in HUB_KEYS if k in entry), None)
        if hub:
            raise UserError(f"{where} points at a remote source ({hub}: {entry[hub]}); tunesmith reads local "
                            "files only and downloads nothing.",
                            hint=f"fetch the data yourself, save it under {dataset_dir} and give the entry a "
                                 "'file_name'.")
        raise UserError(f"{where} has no 'file_name'.", hint="set file_name to a data file or folder in dataset_dir.")

    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise UserError(f"{where}: unknown formatting '{formatting}'{did_you_mean(str(formatting), FORMATTINGS)}.",
                        hint="formatting is one of: " + ", ".join(FORMATTINGS) + ".")

    columns = _resolve_columns(where, formatting, columns_given)
    tags = _resolve_tags(where, formatting, entry.get("tags"))
    num_samples = entry.get("num_samples")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise UserError(f"{where}: num_samples must be a positive whole number, found {num_samples!r}.")
    paths = _data_paths(where, dataset_dir, entry["file_name"])
    return DatasetSpec(name=name, paths=paths, formatting=formatting, columns=columns, tags=tags,
                       num_samples=num_samples, split=str(entry.get("split", "train")),
                       explicit_columns=tuple(columns_given or ()))


def _resolve_columns(where: str, formatting: str, given: dict[str, Any] | None) -> dict[str, str]:
    if given is None:
        return dict(DEFAULT_COLUMNS[formatting])
    allowed = COLUMN_KEYS[formatting]
    columns: dict[str, str] = {}
    for key, value in given.items():
        if key not in allowed:
            other = next((f for f in FORMATTINGS if key in COLUMN_KEYS[f]), None)
            why = f" (it belongs to {other} formatting)" if other else did_you_mean(key, allowed)
            raise UserError(f"{where}: column key '{key}' is not used by {formatting} formatting{why}.",
                            hint=f"{formatting} column keys: " + ", ".join(allowed) + ".")
        if not isinstance(value, str) or not value:
            raise UserError(f"{where}: columns.{key} must be the name of a column in the data, found {value!r}.")
        columns[key] = value
    missing = [k for k in REQUIRED_COLUMNS[formatting] if k not in columns]
    if missing:
        pretraining = " (a prompt-only entry is pre-training text, which is not supported)" if (
            formatting == "alpaca" and set(columns) == {"prompt"}) else ""
        raise UserError(f"{where}: 'columns' lacks {', '.join(missing)}; an entry's columns replace the defaults "
                        f"as a whole{pretraining}.",
                        hint="add " + ", ".join(f'"{k}": "<column name>"' for k in missing) + " to its columns.")
    return columns


def _resolve_tags(where: str, formatting: str, given: Any) -> dict[str, str]:
    if formatting == "alpaca":
        if given:
            raise UserError(f"{where}: 'tags' apply to sharegpt and openai formatting only.",
                            hint='remove "tags", or set "formatting": "sharegpt".')
        return {}
    if given is not None and not isinstance(given, dict):
        raise UserError(f"{where}: 'tags' must be an object such as {{\"role_tag\": \"role\"}}.")
    tags = dict(DEFAULT_TAGS[formatting])
    for key, value in (given or {}).items():
        if key not in TAG_KEYS:
            raise UserError(f"{where}: unknown tag '{key}'{did_you_mean(key, TAG_KEYS)}.",
                            hint="tags: " + ", ".join(TAG_KEYS) + ".")
        if not isinstance(value, str) or not value:
            raise UserError(f"{where}: tags.{key} must be a non-empty string, found {value!r}.")
        tags[key] = value
    return tags


def _data_paths(where: str, dataset_dir: Path, file_name: Any) -> list[Path]:
    if not isinstance(file_name, str) or not file_name:
        raise UserError(f"{where}: file_name must be a file or folder name, found {file_name!r}.")
    path = dataset_dir / file_name
    if not path.exists():
        raise UserError(f"{where}: file_name '{file_name}' not found: {path} does not exist.",
                        hint=f"put the data there, or correct file_name (it is relative to {dataset_dir}).")
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise UserError(f"{where}: folder {path} holds no data files.",
                            hint="data files end in " + ", ".join(DATA_SUFFIXES) + ".")
        return files
    if path.suffix.lower() not in DATA_SUFFIXES:
        kind = " (plain text is for pre-training, which is not supported)" if path.suffix.lower() == ".txt" else ""
        raise UserError(f"{where}: {path} has an unsupported file type '{path.suffix}'{kind}.",
                        hint="use " + ", ".join(DATA_SUFFIXES) + ".")
    return [path]
