"""Bad input: every mistake is a UserError naming the file, line/row, column and the fix; files stay untouched."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import make_dataset

from tunesmith.data.formats import load_conversations, to_conversation
from tunesmith.data.readers import read_rows
from tunesmith.data.registry import resolve_datasets
from tunesmith.errors import UserError

ALPACA = {"d": {"file_name": "d.json"}}
SHAREGPT = {"d": {"file_name": "d.json", "formatting": "sharegpt"}}


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def load_error(folder: Path, names: str = "d", **kwargs) -> str:
    """The message of the UserError that loading raises; the folder's files must be unchanged after it."""
    before = digests(folder)
    with pytest.raises(UserError) as caught:
        load_conversations(names, folder, **kwargs)
    assert digests(folder) == before
    return str(caught.value)


def test_malformed_json_names_line_and_column(tmp_path):
    text = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n'
    folder = make_dataset(tmp_path, ALPACA, {"d.json": text})
    message = load_error(folder)
    assert f"{folder / 'd.json'} line 3: invalid JSON at column 23: Expecting ',' delimiter" in message
    assert "fix:" in message
    # a whole-file fault cannot be skipped row by row
    assert "line 3" in load_error(folder, skip_invalid=True)


def test_json_list_layout_errors(tmp_path):
    folder = make_dataset(tmp_path, ALPACA, {"d.json": '{"instruction": "a",\n "output": "b"}\n'})
    assert "line 1" in load_error(folder) and "invalid JSON" in load_error(folder)
    (folder / "d.json").write_text('[{"instruction": "a", "output": "b"}] x', encoding="utf-8")
    assert "line 1: invalid JSON at column 39: extra data after the end of the list" in load_error(folder)
    (folder / "d.json").write_text('"rows"', encoding="utf-8")
    assert "expected a list of rows" in load_error(folder)
    (folder / "d.json").write_text("[]", encoding="utf-8")
    assert "dataset 'd' has no rows" in load_error(folder)


def test_malformed_jsonl_line_is_a_row_problem(tmp_path, capsys):
    lines = ['{"instruction": "a", "output": "b"}', '{"instruction": "c", output: "d"}',
             '{"instruction": "e", "output": "f"}']
    folder = make_dataset(tmp_path, {"d": {"file_name": "d.jsonl"}}, {"d.jsonl": "\n".join(lines) + "\n"})
    message = load_error(folder)
    assert message.startswith("1 invalid row of 3:")
    assert f"{folder / 'd.jsonl'} line 2 (row 1): invalid JSON at column 22: Expecting property name" in message
    assert "skip_invalid: true" in message
    convs = load_conversations("d", folder, skip_invalid=True)
    assert [c.source for c in convs] == [("d", 0), ("d", 2)]
    assert "skipped 1 invalid rows, kept 2 of 3" in capsys.readouterr().err


def test_row_missing_column_lists_the_columns_it_has(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "outptu": "d", "input": ""}]
    folder = make_dataset(tmp_path, ALPACA, {"d.json": rows})
    message = load_error(folder)
    assert (f"{folder / 'd.json'} line 6 (row 1), column 'output': the row has no 'output' column "
            "(did you mean 'outptu'?); its columns: instruction, outptu, input") in message
    assert "map the right column" in message


def test_sharegpt_roles_out_of_order(tmp_path):
    turns = [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "observation", "value": "c"},
             {"from": "gpt", "value": "d"}]
    folder = make_dataset(tmp_path, SHAREGPT, {"d.json": [{"conversations": turns}]})
    message = load_error(folder)
    assert ("line 2 (row 0), column 'conversations': turn 2 is 'observation' after 'gpt', out of order; "
            "roles found: [0] human, [1] gpt, [2] observation, [3] gpt") in message
    assert "a function call is followed by its observation" in message


@pytest.mark.parametrize(("roles", "expected"), [
    (["gpt", "human", "gpt"], "turn 0 is 'gpt' at the start"),
    (["human", "gpt", "human"], "the conversation ends with 'human', not with an answer"),
    (["human", "function_call", "gpt"], "turn 2 is 'gpt' after 'function_call'"),
    (["human", "gpt", "system", "human", "gpt"], "turn 2 is a system turn ('system'), which may only come first"),
    (["human", "bot"], "turn 1 has role 'bot', which is none of"),
])
def test_sharegpt_order_rules(tmp_path, roles, expected):
    value = {"function_call": '{"name": "f", "arguments": {}}'}
    turns = [{"from": r, "value": value.get(r, "text")} for r in roles]
    folder = make_dataset(tmp_path, SHAREGPT, {"d.json": [{"conversations": turns}]})
    assert expected in load_error(folder)


def test_empty_assistant_answer(tmp_path):
    folder = make_dataset(tmp_path, {"a": {"file_name": "a.json"}, "s": SHAREGPT["d"]}, {
        "a.json": [{"instruction": "q", "input": "", "output": "  "}],
        "d.json": [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}],
    })
    assert "a.json line 2 (row 0), column 'output': the answer is empty" in load_error(folder, "a")
    assert ("d.json line 2 (row 0), column 'conversations': turn 1 ('gpt'): the answer is empty"
            in load_error(folder, "s"))


# Entries a LLaMA-Factory registry may hold that tunesmith refuses (their files need not exist).
REFUSED_ENTRIES = {
    "toolcall_zh": {"file_name": "toolcall_zh.json", "formatting": "sharegpt"},
    "web_text": {"hf_hub_url": "example-org/web-text", "ms_hub_url": "example-org/web-text"},
    "ms_only": {"ms_hub_url": "example-org/ms-only"},
    "prefs": {"file_name": "prefs.json", "ranking": True, "formatting": "sharegpt",
              "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
    "pictures": {"file_name": "pictures.json", "formatting": "sharegpt",
                 "columns": {"messages": "messages", "images": "images"}},
    "voices": {"file_name": "voices.json", "formatting": "sharegpt",
               "columns": {"messages": "messages", "audios": "audios"}},
    "kto": {"file_name": "kto.json", "formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"}},
    "corpus": {"file_name": "corpus.jsonl", "columns": {"prompt": "text"}},
}


@pytest.fixture()
def mixed_registry(tmp_path, repo_data) -> Path:
    """A copy of data/ whose registry also holds entries tunesmith refuses."""
    folder = tmp_path / "data"
    shutil.copytree(repo_data, folder)
    registry = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8"))
    (folder / "dataset_info.json").write_text(json.dumps({**registry, **REFUSED_ENTRIES}), encoding="utf-8")
    return folder


def test_unknown_dataset_name_suggests_and_lists(mixed_registry):
    message = load_error(mixed_registry, "alpaca_dmeo")
    assert "unknown dataset 'alpaca_dmeo' (did you mean 'alpaca_demo'?)" in message
    assert ("identity, alpaca_demo, alpaca_demo_jsonl, alpaca_demo_csv, alpaca_demo_parquet, chat_sharegpt, "
            "toolcall_sharegpt, toolcall_openai (8 more entries") in message


def test_missing_file_and_unsupported_entries(mixed_registry):
    missing = load_error(mixed_registry, "toolcall_zh")
    assert "dataset 'toolcall_zh'" in missing
    assert f"{mixed_registry / 'toolcall_zh.json'} does not exist" in missing
    hub = load_error(mixed_registry, "identity,web_text")
    assert "'web_text'" in hub and "hf_hub_url: example-org/web-text" in hub
    assert "downloads nothing" in hub
    assert "ms_hub_url" in load_error(mixed_registry, "ms_only")
    assert "preference (ranking) datasets are not supported yet" in load_error(mixed_registry, "prefs")
    assert "multimodal (image) datasets are not supported yet" in load_error(mixed_registry, "pictures")
    assert "multimodal (audio)" in load_error(mixed_registry, "voices")
    assert "KTO datasets are not supported yet" in load_error(mixed_registry, "kto")
    assert "pre-training" in load_error(mixed_registry, "corpus")


def test_registry_mistakes(tmp_path):
    (tmp_path / "empty").mkdir()
    assert f"{tmp_path / 'empty' / 'dataset_info.json'} not found" in load_error(tmp_path / "empty")
    assert "is not a folder" in load_error(tmp_path / "nowhere")
    folder = make_dataset(tmp_path / "b", {"d": {"file_name": "d.json", "formating": "sharegpt"}}, {"d.json": []})
    assert "unknown key 'formating' (did you mean 'formatting'?)" in load_error(folder)
    folder = make_dataset(tmp_path / "c", {"d": {"file_name": "d.json", "formatting": "sharegtp"}}, {"d.json": []})
    assert "unknown formatting 'sharegtp' (did you mean 'sharegpt'?)" in load_error(folder)
    folder = make_dataset(tmp_path / "e", {"d": {"file_name": "d.json", "columns": {"messages": "m"}}}, {"d.json": []})
    assert "column key 'messages' is not used by alpaca formatting (it belongs to sharegpt formatting)" in \
        load_error(folder)
    (folder / "dataset_info.json").write_text('{"d": {"file_name": "d.json",}}', encoding="utf-8")
    assert "dataset_info.json line 1 column 30: invalid JSON" in load_error(folder)


def test_named_column_that_no_row_has(tmp_path):
    folder = make_dataset(tmp_path, {"d": {"file_name": "d.json", "columns": {
        "prompt": "instruction", "response": "output", "system": "sytem"}}},
        {"d.json": [{"instruction": "a", "output": "b", "system": "s"}]})
    message = load_error(folder)
    assert "columns.system is 'sytem' (did you mean 'system'?), but no row has that column" in message
    assert "the rows have: instruction, output, system" in message


def test_bytes_that_are_not_utf8(tmp_path):
    latin1 = '[\n  {"instruction": "caf\xe9", "output": "b"}\n]\n'.encode("latin-1")
    folder = make_dataset(tmp_path, {"d": {"file_name": "d.json"}, "l": {"file_name": "l.jsonl"},
                                     "c": {"file_name": "c.csv"}}, {
        "d.json": latin1,
        "l.jsonl": b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n',
        "c.csv": b"instruction,output\ncaf\xe9,b\n",
    })
    assert ("d.json line 2: bytes that are not UTF-8 at byte offset 24 (byte 23 of the line): b'\\xe9'"
            in load_error(folder, "d"))
    message = load_error(folder, "l")
    assert "l.jsonl line 2 (row 1): bytes that are not UTF-8 at byte offset 56 (byte 21 of the line)" in message
    assert "save the file as UTF-8" in message
    assert "c.csv line 2: bytes that are not UTF-8 at byte offset 22 (byte 4 of the line)" in load_error(folder, "c")
    assert len(load_conversations("l", folder, skip_invalid=True)) == 1


def test_stop_shows_first_five_and_the_total(tmp_path):
    rows = [{"instruction": f"q{i}", "output": "" if i % 2 else f"a{i}"} for i in range(14)]
    folder = make_dataset(tmp_path, ALPACA, {"d.json": rows})
    message = load_error(folder)
    assert message.startswith("7 invalid rows of 14; the first 5:")
    assert [line.split(",")[0].split(" line ")[1] for line in message.splitlines() if line.startswith("  - ")] == [
        "6 (row 1)", "14 (row 3)", "22 (row 5)", "30 (row 7)", "38 (row 9)"]
    assert "... and 2 more." in message


def test_skip_invalid_keeps_the_rest_and_reports_to_stderr(tmp_path, capsys):
    rows = [{"instruction": f"q{i}", "output": "" if i % 2 else f"a{i}"} for i in range(14)]
    rows.append({"conversations": []})
    folder = make_dataset(tmp_path, ALPACA, {"d.json": rows})
    before = digests(folder)
    convs = load_conversations("d", folder, skip_invalid=True)
    assert digests(folder) == before
    assert [c.source[1] for c in convs] == [0, 2, 4, 6, 8, 10, 12]
    err = capsys.readouterr().err
    assert "skipped 8 invalid rows, kept 7 of 15." in err
    assert "8 invalid rows of 15; the first 5:" in err and "... and 3 more." in err
    all_bad = make_dataset(tmp_path / "bad", ALPACA, {"d.json": [{"instruction": "q", "output": ""}]})
    assert "every row was invalid" in load_error(all_bad, skip_invalid=True)


def test_function_call_and_tools_must_be_json(tmp_path):
    turns = [{"from": "human", "value": "a"}, {"from": "function_call", "value": "{name: f}"},
             {"from": "observation", "value": "1"}, {"from": "gpt", "value": "b"}]
    entry = {"d": {"file_name": "d.json", "formatting": "sharegpt",
                   "columns": {"messages": "conversations", "tools": "tools"}}}
    folder = make_dataset(tmp_path, entry, {"d.json": [{"conversations": turns, "tools": "[]"}]})
    assert "turn 1: the function call is not valid JSON" in load_error(folder)
    turns[1]["value"] = '{"name": "f", "arguments": "[1]"}'
    (folder / "d.json").write_text(json.dumps([{"conversations": turns, "tools": "[]"}]), encoding="utf-8")
    assert "the arguments of 'f' must be an object" in load_error(folder)
    turns[1]["value"] = '{"name": "f", "arguments": {}}'
    (folder / "d.json").write_text(json.dumps([{"conversations": turns, "tools": "[{oops"}]), encoding="utf-8")
    assert "column 'tools': tools is not valid JSON" in load_error(folder)


def test_openai_messages_are_validated(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "1"},
                          {"role": "assistant", "content": "b"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None,
                                                             "tool_calls": [{"function": {"arguments": {}}}]}]}]
    folder = make_dataset(tmp_path, {"d": {"file_name": "d.json", "formatting": "openai"}}, {"d.json": rows})
    message = load_error(folder)
    assert message.startswith("3 invalid rows of 3:")
    assert "(row 0), column 'messages': turn 1: content must be a string, found int: 5" in message
    assert "(row 1), column 'messages': turn 1 is 'tool' after 'user', out of order" in message
    assert "(row 2), column 'messages': turn 1: a function call needs a 'name'" in message


def test_csv_row_with_wrong_field_count(tmp_path):
    folder = make_dataset(tmp_path, {"d": {"file_name": "d.csv"}}, {"d.csv": "instruction,output\na,b\nc,d,e\n"})
    assert "d.csv line 3 (row 1): the row has 3 fields but the header has 2 (instruction, output)" in load_error(folder)


def test_to_conversation_and_read_rows_raise_user_errors(repo_data, tmp_path):
    (spec,) = resolve_datasets("identity", repo_data)
    with pytest.raises(UserError, match=r"dataset 'identity' row 4, column 'output': the row has no 'output'"):
        to_conversation({"instruction": "a"}, spec, 4)
    (tmp_path / "x.jsonl").write_text('{"a": 1}\n[1]\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"x.jsonl line 2 \(row 1\): a row must be a JSON object, found list"):
        list(read_rows(tmp_path / "x.jsonl"))


def test_repo_files_unchanged_by_loading(repo_data):
    before = digests(repo_data)
    load_conversations("identity,toolcall_sharegpt,toolcall_openai,alpaca_demo_csv,alpaca_demo_parquet", repo_data)
    assert digests(repo_data) == before
