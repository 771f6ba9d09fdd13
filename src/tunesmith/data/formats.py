"""Rows in alpaca, sharegpt or OpenAI-messages form → Conversation (OpenAI message form).

Every row is checked; a bad one is reported with its file, line, row, column and the fix.
By default the first problems stop the run; with skip_invalid the bad rows are left out and
the same report goes to stderr. Nothing is dropped without being reported.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from tunesmith.data.readers import DataProblem, RawLine, iter_file_records, parse_raw_line
from tunesmith.data.registry import REQUIRED_COLUMNS, DatasetSpec, resolve_datasets
from tunesmith.errors import UserError, did_you_mean
from tunesmith.template import Conversation

__all__ = ["DataProblem", "RowError", "load_conversations", "record_conversation", "to_conversation"]

SHOWN_PROBLEMS = 5


class RowError(UserError):
    """One row cannot become a conversation; column is the data column at fault."""

    def __init__(self, detail: str, *, column: str | None = None, fix: str = "", where: str = "") -> None:
        self.detail, self.column, self.fix = detail, column, fix
        at = f", column '{column}'" if column else ""
        super().__init__(f"{where}{at}: {detail}" if where else detail, hint=fix or None)


def to_conversation(row: dict[str, Any], spec: DatasetSpec, index: int) -> Conversation:
    """The row as a Conversation with source (dataset name, index); RowError if the row is invalid."""
    try:
        if not isinstance(row, dict):
            raise RowError(f"a row must be an object, found {type(row).__name__}")
        if spec.formatting == "alpaca":
            messages, tools = _from_alpaca(row, spec)
        else:
            messages, tools = _from_messages(row, spec)
    except RowError as exc:
        raise RowError(exc.detail, column=exc.column, fix=exc.fix, where=f"dataset '{spec.name}' row {index}") from None
    return Conversation(messages=messages, tools=tools, source=(spec.name, index))


# ---------------------------------------------------------------- alpaca


def _from_alpaca(row: dict[str, Any], spec: DatasetSpec) -> tuple[list[dict[str, Any]], list | None]:
    columns = spec.columns
    prompt = _text(row, columns["prompt"], required=True)
    response = _text(row, columns["response"], required=True)
    query = _text(row, columns["query"]) if "query" in columns else ""
    system = _text(row, columns["system"]) if "system" in columns else ""

    messages: list[dict[str, Any]] = []
    if system.strip():
        messages.append({"role": "system", "content": system})
    if "history" in columns:
        messages.extend(_history(row, columns["history"]))
    messages.append({"role": "user", "content": f"{prompt}\n{query}" if query else prompt})
    if not response.strip():
        raise RowError("the answer is empty", column=columns["response"],
                       fix="write the answer, or remove the row")
    messages.append({"role": "assistant", "content": response})
    tools = _tools(row.get(columns["tools"]), columns["tools"]) if "tools" in columns else None
    return messages, tools


def _history(row: dict[str, Any], column: str) -> list[dict[str, Any]]:
    value = _maybe_json(row.get(column), column)
    if value in (None, ""):
        return []
    pair_fix = 'write history as a list of [question, answer] pairs: [["q1", "a1"], ["q2", "a2"]]'
    if not isinstance(value, list):
        raise RowError(f"history must be a list of [question, answer] pairs, found {type(value).__name__}",
                       column=column, fix=pair_fix)
    turns: list[dict[str, Any]] = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise RowError(f"history item {i} is not a [question, answer] pair of strings: {_short(pair)}",
                           column=column, fix=pair_fix)
        if not pair[1].strip():
            raise RowError(f"history item {i} has an empty answer", column=column,
                           fix="write the answer, or remove the pair")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return turns


# ---------------------------------------------------------------- sharegpt / openai messages


def _from_messages(row: dict[str, Any], spec: DatasetSpec) -> tuple[list[dict[str, Any]], list | None]:
    column = spec.columns["messages"]
    _require(row, column)
    turns = _maybe_json(row[column], column)
    if not isinstance(turns, list) or not turns:
        found = "an empty list" if isinstance(turns, list) else type(turns).__name__
        raise RowError(f"expected a list of turns, found {found}", column=column,
                       fix="write the conversation as a list of turns")
    tags = spec.tags
    kinds = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system",
             tags["observation_tag"]: "tool", tags["function_tag"]: "call"}
    openai = spec.formatting == "openai"

    messages: list[dict[str, Any]] = []
    roles: list[str] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"turn {i} must be an object, found {type(turn).__name__}: {_short(turn)}", column=column)
        role = turn.get(tags["role_tag"])
        if role is None:
            raise RowError(f"turn {i} has no '{tags['role_tag']}' key (its keys: {', '.join(map(str, turn))})",
                           column=column, fix=f"give every turn a '{tags['role_tag']}', or set tags.role_tag "
                                              "in dataset_info.json to the key the data uses")
        roles.append(str(role))
        if role not in kinds:
            known = ", ".join(f"'{t}'" for t in kinds)
            raise RowError(f"turn {i} has role '{role}'{did_you_mean(str(role), list(kinds))}, which is none of "
                           f"{known}", column=column,
                           fix="set the matching tags (user_tag, assistant_tag, observation_tag, function_tag, "
                               "system_tag) in dataset_info.json, or fix the role")
        messages.append(_message(turn, kinds[role], i, column, tags, openai))

    _check_order(messages, roles, column)
    # An empty system turn means "no system prompt", as an empty system column does.
    if messages[0]["role"] == "system" and not messages[0]["content"].strip():
        messages.pop(0)
    if messages[0]["role"] != "system" and "system" in spec.columns:
        system = _text(row, spec.columns["system"])
        if system.strip():
            messages.insert(0, {"role": "system", "content": system})
    tools = _tools(row.get(spec.columns["tools"]), spec.columns["tools"]) if "tools" in spec.columns else None
    return messages, tools


def _message(turn: dict[str, Any], kind: str, i: int, column: str, tags: dict[str, str],
             openai: bool) -> dict[str, Any]:
    content_key = tags["content_tag"]
    content = turn.get(content_key)
    if isinstance(content, list):
        content = _join_text_parts(content, i, column)
    if kind == "call":
        if content is None:
            raise RowError(f"turn {i} (a function call) has no '{content_key}'", column=column)
        call: dict[str, Any] = {"role": "assistant", "content": "", "tool_calls": _tool_calls(content, i, column)}
        if "loss_weight" in turn:
            call["loss_weight"] = _loss_weight(turn["loss_weight"], i, column)
        return call
    calls = turn.get("tool_calls") if openai and kind == "assistant" else None
    if content is None and calls:
        content = ""
    if content_key not in turn and content is None:
        raise RowError(f"turn {i} has no '{content_key}' key (its keys: {', '.join(map(str, turn))})",
                       column=column, fix=f"give every turn a '{content_key}', or set tags.content_tag "
                                          "in dataset_info.json to the key the data uses")
    if not isinstance(content, str):
        raise RowError(f"turn {i}: content must be a string, found {type(content).__name__}: {_short(content)}",
                       column=column, fix="write the turn's content as text")
    message: dict[str, Any] = {"role": kind, "content": content}
    if openai:  # OpenAI messages keep their other keys (tool_call_id, name, ...) as they are
        message.update((k, v) for k, v in turn.items() if k not in (tags["role_tag"], content_key, "tool_calls"))
    if "loss_weight" in turn:
        message["loss_weight"] = _loss_weight(turn["loss_weight"], i, column)
    if calls:
        message["tool_calls"] = _tool_calls(calls, i, column)
    return message


def _loss_weight(value: Any, i: int, column: str) -> float:
    from tunesmith.data.encode import loss_weight

    try:
        return loss_weight({"loss_weight": value})
    except ValueError as exc:
        raise RowError(f"turn {i}: {exc}", column=column,
                       fix="give loss_weight as a number: 0 leaves the turn untrained, 1 is the usual weight") from None


def _join_text_parts(parts: list[Any], i: int, column: str) -> str:
    """Text parts joined: OpenAI's {"type": "text", "text": ...} or LLaMA-Factory's {"type": "text", "value": ...}."""
    texts = []
    for k, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text":
            raise RowError(f"turn {i}: content part {k} is of type '{kind}', which is not supported yet (text only)",
                           column=column, fix="use text content")
        text = part.get("text", part.get("value"))
        if not isinstance(text, str):
            keys = ", ".join(map(str, part))
            raise RowError(f"turn {i}: text part {k} has no string 'text' or 'value' (its keys: {keys})",
                           column=column, fix='write each text part as {"type": "text", "text": "..."}')
        texts.append(text)
    return "".join(texts)


# What may follow each kind of turn; "tool" after "tool" only while calls are left to answer.
_NEXT = {"start": ("user",), "user": ("assistant", "call"), "assistant": ("user",), "call": ("tool",),
         "tool": ("assistant", "call", "tool")}


def _check_order(messages: list[dict[str, Any]], roles: list[str], column: str) -> None:
    def found() -> str:
        return "roles found: " + ", ".join(f"[{n}] {r}" for n, r in enumerate(roles))

    order_fix = ("after an optional system turn, a user turn comes first; then user and answer turns alternate, "
                 "a function call is followed by its observation, and the last turn is an answer")
    previous, calls_open = "start", 0
    for i, message in enumerate(messages):
        kind = "call" if message.get("tool_calls") else message["role"]
        if kind == "system":
            if i == 0:
                continue
            raise RowError(f"turn {i} is a system turn ('{roles[i]}'), which may only come first; {found()}",
                           column=column, fix=order_fix)
        allowed = _NEXT[previous]
        if kind == "tool" and previous == "tool" and calls_open <= 0:
            allowed = ("assistant", "call")
        if kind not in allowed:
            after = f"after '{roles[i - 1]}'" if previous != "start" else "at the start"
            raise RowError(f"turn {i} is '{roles[i]}' {after}, out of order; {found()}", column=column, fix=order_fix)
        if kind == "call":
            calls_open = len(message["tool_calls"])
        calls_open -= kind == "tool"
        if kind == "assistant" and not message["content"].strip():
            raise RowError(f"turn {i} ('{roles[i]}'): the answer is empty", column=column,
                           fix="write the answer, or remove the row")
        previous = kind
    if previous not in ("assistant", "call"):
        last = f"'{roles[-1]}'" if previous != "start" else "no user turn"
        raise RowError(f"the conversation ends with {last}, not with an answer to learn; {found()}",
                       column=column, fix=order_fix)


def _tool_calls(value: Any, i: int, column: str) -> list[dict[str, Any]]:
    """A function call (JSON text, an object, or a list of them) as OpenAI tool_calls with dict arguments."""
    fix = 'write the call as JSON: {"name": "tool_name", "arguments": {"key": "value"}}'
    calls = value
    if isinstance(calls, str):
        try:
            calls = json.loads(calls)
        except json.JSONDecodeError as exc:
            raise RowError(f"turn {i}: the function call is not valid JSON ({exc.msg} at char {exc.pos}): "
                           f"{_short(value)}", column=column, fix=fix) from None
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise RowError(f"turn {i}: expected a function call object or a list of them, found {_short(value)}",
                       column=column, fix=fix)
    result = []
    for call in calls:
        body = call.get("function") if isinstance(call, dict) and isinstance(call.get("function"), dict) else call
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"]:
            raise RowError(f"turn {i}: a function call needs a 'name': {_short(call)}", column=column, fix=fix)
        arguments = body.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise RowError(f"turn {i}: the arguments of '{body['name']}' are not valid JSON: {_short(arguments)}",
                               column=column, fix=fix) from None
        if not isinstance(arguments, dict):
            raise RowError(f"turn {i}: the arguments of '{body['name']}' must be an object, found "
                           f"{_short(arguments)}", column=column, fix=fix)
        entry: dict[str, Any] = {"type": "function", "function": {"name": body["name"], "arguments": arguments}}
        if isinstance(call, dict) and "id" in call:
            entry["id"] = call["id"]
        result.append(entry)
    return result


def _tools(value: Any, column: str) -> list[dict[str, Any]] | None:
    """The tools column as OpenAI tool definitions ({"type": "function", "function": schema}); None if empty."""
    fix = 'write tools as a JSON list of function schemas: [{"name": ..., "description": ..., "parameters": {...}}]'
    tools = value
    if isinstance(tools, str):
        if not tools.strip():
            return None
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise RowError(f"tools is not valid JSON ({exc.msg} at char {exc.pos})", column=column, fix=fix) from None
    if tools is None:
        return None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise RowError(f"tools must be a list of function schemas, found {type(tools).__name__}", column=column,
                       fix=fix)
    result = []
    for tool in tools:
        schema = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else tool
        if not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
            raise RowError(f"a tool needs a 'name': {_short(tool)}", column=column, fix=fix)
        result.append({"type": "function", "function": schema})
    return result or None


# ---------------------------------------------------------------- cell helpers


def _require(row: dict[str, Any], column: str) -> None:
    if column not in row:
        have = ", ".join(map(str, row)) or "none"
        raise RowError(f"the row has no '{column}' column{did_you_mean(column, [str(k) for k in row])}; "
                       f"its columns: {have}", column=column,
                       fix="add the column to the row, or map the right column in dataset_info.json's "
                           '"columns"')


def _text(row: dict[str, Any], column: str, *, required: bool = False) -> str:
    if required:
        _require(row, column)
    value = row.get(column)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"expected text, found {type(value).__name__}: {_short(value)}", column=column,
                       fix="write this cell as a string")
    return value


def _maybe_json(value: Any, column: str) -> Any:
    """List-valued cells arrive as JSON text from CSV files."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowError(f"the cell looks like JSON but is not valid JSON ({exc.msg} at char {exc.pos})",
                           column=column, fix="fix the JSON in this cell") from None
    return value


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- loading whole datasets

def record_conversation(spec: DatasetSpec, path: Path | str, file_row: int, line: int | None, index: int,
                        row: Any) -> tuple[dict[str, Any] | None, Conversation | DataProblem]:
    """One record of `dataset_records` (a JSON Lines row may still be raw bytes) as (the parsed
    row, None where it could not be read; its conversation, or what is wrong with it by file, row,
    line and column). The one step from a record to a conversation for every reader of data."""
    # `path` is kept as given (a string from the workers): a Path per row was 5% of a profiled
    # worker's time, and only a problem report reads it.
    if isinstance(row, RawLine):
        row = parse_raw_line(path, file_row, line or 0, row)
    if isinstance(row, DataProblem):
        return None, row
    try:
        return row, to_conversation(row, spec, index)
    except RowError as exc:
        return row, DataProblem(path, file_row, line, exc.column, exc.detail, exc.fix)



def _dataset_records(spec: DatasetSpec, raw_lines: bool = False) -> Iterator[tuple[Path, int, int | None, int, Any]]:
    """(file, row in file, line, row index in dataset, row or DataProblem) over the dataset's files."""
    index = 0
    for path in spec.paths:
        for file_row, line, row in iter_file_records(path, raw_lines=raw_lines):
            yield path, file_row, line, index, row
            index += 1


def dataset_records(spec: DatasetSpec, *, max_samples: int | None, seed: int,
                    raw_lines: bool = False) -> Iterator[tuple[Path, int, int | None, int, Any]]:
    """The records a run uses from one dataset, in order: num_samples sampling (which needs the
    rows in memory), then the first max_samples; a stream otherwise."""
    records: Any = _dataset_records(spec, raw_lines)
    if spec.num_samples is not None:
        records = list(_dataset_records(spec))
        records = _sampled(records, spec.num_samples, seed) if records else records
    if max_samples is not None:
        records = islice(records, max_samples)
    return iter(records)


def _sampled(records: list[Any], count: int, seed: int) -> list[Any]:
    """num_samples rows: a random subset without repeats, then repeats once every row is used."""
    rng = random.Random(seed)
    picked = rng.sample(range(len(records)), min(count, len(records)))
    picked += [rng.randrange(len(records)) for _ in range(count - len(picked))]
    return [records[i] for i in picked]


def load_conversations(names: str | None, dataset_dir: str | Path, *, max_samples: int | None = None,
                       skip_invalid: bool = False, seed: int = 42) -> list[Conversation]:
    """Every conversation of the comma-separated datasets, in order; [] when names is None.

    max_samples keeps the first N rows of each dataset (after num_samples sampling, which uses seed).
    Invalid rows stop the run with a report of the first few and the total; with skip_invalid
    they are left out and the report goes to stderr.
    """
    conversations: list[Conversation] = []
    problems: list[DataProblem] = []
    total = 0
    for spec in resolve_datasets(names, dataset_dir):
        records = dataset_records(spec, max_samples=max_samples, seed=seed)
        rows_seen, columns_seen = 0, set()
        for record in records:
            rows_seen += 1
            parsed, conv = record_conversation(spec, *record)
            if parsed is not None:
                columns_seen.update(parsed)
            if isinstance(conv, DataProblem):
                problems.append(conv)
            else:
                conversations.append(conv)
        if rows_seen == 0:
            raise UserError(f"dataset '{spec.name}' has no rows ({', '.join(map(str, spec.paths))}).",
                            hint="add rows to the file, or remove the dataset from the list.")
        check_named_columns(spec, columns_seen)
        total += rows_seen

    if problems:
        report = _report(problems, total)
        if not skip_invalid:
            raise UserError(report, hint="fix these rows, or set skip_invalid: true to leave invalid rows out "
                                         "(they are reported).")
        print(f"tunesmith: skipped {len(problems)} invalid rows, kept {len(conversations)} of {total}.\n{report}",
              file=sys.stderr)
        if not conversations:
            raise UserError("every row was invalid, so no data is left to train on.", hint="fix the data.")
    return conversations


def check_named_columns(spec: DatasetSpec, columns_seen: set[str]) -> None:
    """A column the entry names but no row has is a mapping mistake, not an empty cell."""
    if not columns_seen:
        return
    for key in spec.explicit_columns:
        column = spec.columns[key]
        if key not in REQUIRED_COLUMNS[spec.formatting] and column not in columns_seen:
            raise UserError(f"dataset '{spec.name}': columns.{key} is '{column}'"
                            f"{did_you_mean(column, sorted(columns_seen))}, but no row has that column; the rows "
                            f"have: {', '.join(sorted(columns_seen))}.",
                            hint=f"correct columns.{key} in dataset_info.json, or remove it.")


def _report(problems: list[DataProblem], total: int) -> str:
    return problems_report(len(problems), problems[:SHOWN_PROBLEMS], total)


def problems_report(count: int, first: Sequence[Any], total: int) -> str:
    """'N invalid rows of T' and the first few problems (the count may exceed those shown)."""
    head = f"{count} invalid row{'s' if count != 1 else ''} of {total}"
    lines = [f"{head}; the first {SHOWN_PROBLEMS}:" if count > SHOWN_PROBLEMS else f"{head}:"]
    lines += [f"  - {p}" for p in first[:SHOWN_PROBLEMS]]
    if count > SHOWN_PROBLEMS:
        lines.append(f"  ... and {count - SHOWN_PROBLEMS} more.")
    return "\n".join(lines)
