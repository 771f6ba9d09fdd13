"""Registry, readers and converters: the shared datasets, goldens, every file type, folders and sampling."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
from helpers import make_dataset

from tunesmith.data.formats import load_conversations, to_conversation
from tunesmith.data.readers import read_rows
from tunesmith.data.registry import load_registry, resolve_datasets
from tunesmith.errors import UserError
from tunesmith.template import Conversation

GOLDENS = Path(__file__).parent / "goldens"




def as_json(conv: Conversation) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(conv)))


def golden(name: str) -> dict:
    return json.loads((GOLDENS / name).read_text(encoding="utf-8"))


# ---------------------------------------------------------------- shared datasets and the registry


@pytest.mark.parametrize(("name", "rows"), [("identity", 91), ("alpaca_en_demo", 999), ("alpaca_zh_demo", 1000),
                                            ("glaive_toolcall_en_demo", 300)])
def test_shared_dataset_loads_completely(shared_data, name, rows):
    convs = load_conversations(name, shared_data)
    assert len(convs) == rows
    assert [c.source for c in convs] == [(name, i) for i in range(rows)]
    for conv in convs:
        assert conv.messages[-1]["role"] == "assistant"
        assert all(isinstance(m["content"], str) for m in conv.messages)
    raw = json.loads((shared_data / f"{name}.json").read_text(encoding="utf-8"))
    if name == "glaive_toolcall_en_demo":
        # each turn becomes one message; "[]" tools mean no tools
        assert [len(c.messages) for c in convs] == [len(r["conversations"]) for r in raw]
        assert sum(c.tools is None for c in convs) == sum(r["tools"] == "[]" for r in raw) == 109
    else:
        assert [c.messages[-1]["content"] for c in convs] == [r["output"] for r in raw]


def test_registry_defaults_follow_llama_factory(shared_data):
    alpaca, glaive = resolve_datasets("alpaca_en_demo, glaive_toolcall_en_demo", shared_data)
    assert alpaca.formatting == "alpaca"
    assert alpaca.columns == {"prompt": "instruction", "query": "input", "response": "output"}
    assert alpaca.paths == [shared_data / "alpaca_en_demo.json"] and alpaca.split == "train"
    assert glaive.formatting == "sharegpt"
    assert glaive.columns == {"messages": "conversations", "tools": "tools"}
    assert glaive.tags == {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                           "observation_tag": "observation", "function_tag": "function_call",
                           "system_tag": "system"}
    assert len(load_registry(shared_data)) == 104
    assert resolve_datasets(None, shared_data) == [] and resolve_datasets(" ", shared_data) == []


def test_entry_columns_replace_defaults_and_tags_fill_in(tmp_path):
    rows = [{"q": "What is 2+2?", "input": "ignored: not a mapped column", "a": "4"}]
    turns = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello"}]}]
    folder = make_dataset(tmp_path, {
        "qa": {"file_name": "qa.json", "columns": {"prompt": "q", "response": "a"}},
        "chat": {"file_name": "chat.json", "formatting": "sharegpt", "columns": {"messages": "messages"},
                 "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                          "assistant_tag": "assistant"}},
    }, {"qa.json": rows, "chat.json": turns})
    qa, chat = load_conversations("qa,chat", folder)
    assert qa.messages == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    # system_tag was not given: it keeps its default "system", so the system turn is recognised
    assert chat.messages == turns[0]["messages"]


# ---------------------------------------------------------------- goldens


def test_golden_alpaca_with_input(shared_data):
    convs = load_conversations("alpaca_en_demo", shared_data, max_samples=6)
    assert as_json(convs[5]) == golden("alpaca_with_input.json")


def test_golden_alpaca_with_history_and_system(tmp_path):
    row = {"instruction": "And in Celsius?", "input": "Round to one decimal.",
           "output": "212 °F is 100.0 °C.", "system": "You are a careful physics tutor.",
           "history": [["At what temperature does water boil at sea level?", "212 °F."],
                       ["Is that true on a mountain?", "No, it boils at a lower temperature."]]}
    folder = make_dataset(tmp_path, {"tutor": {"file_name": "tutor.json", "columns": {
        "prompt": "instruction", "query": "input", "response": "output", "history": "history",
        "system": "system"}}}, {"tutor.json": [row]})
    (conv,) = load_conversations("tutor", folder)
    assert as_json(conv) == golden("alpaca_history_system.json")


def test_golden_sharegpt_glaive_first_row(shared_data):
    (conv,) = load_conversations("glaive_toolcall_en_demo", shared_data, max_samples=1)
    assert as_json(conv) == golden("sharegpt_glaive_row0.json")


OPENAI_ROW = {"messages": [
    {"role": "system", "content": "You can look up the weather."},
    {"role": "user", "content": "Is it raining in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"rain\": true, \"celsius\": 7}"},
    {"role": "assistant", "content": [{"type": "text", "text": "Yes, it is raining in Oslo "},
                                      {"type": "text", "text": "(7 °C)."}]},
], "tools": [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]}


def test_golden_openai_messages(tmp_path):
    folder = make_dataset(tmp_path, {"weather": {"file_name": "weather.jsonl", "formatting": "openai",
                                                 "columns": {"messages": "messages", "tools": "tools"}}},
                          {"weather.jsonl": json.dumps(OPENAI_ROW) + "\n"})
    (conv,) = load_conversations("weather", folder)
    assert as_json(conv) == golden("openai_messages.json")


# ---------------------------------------------------------------- converters, case by case


def test_alpaca_user_turn_joins_instruction_and_input(tmp_path):
    folder = make_dataset(tmp_path, {"d": {"file_name": "d.json", "columns": {
        "prompt": "instruction", "query": "input", "response": "output", "system": "system"}}}, {"d.json": [
            {"instruction": "Translate.", "input": "Bonjour", "output": "Hello", "system": ""},
            {"instruction": "Say hi.", "input": "", "output": "Hi"},
            {"instruction": "Say hi.", "input": None, "output": "Hi", "system": "Be kind."},
        ]})
    a, b, c = load_conversations("d", folder)
    assert a.messages[0] == {"role": "user", "content": "Translate.\nBonjour"}
    assert b.messages == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi"}]
    assert c.messages[0] == {"role": "system", "content": "Be kind."}


def test_sharegpt_system_turn_column_and_parallel_calls(tmp_path):
    calls = [{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "mul", "arguments": "{\"a\": 3, \"b\": 4}"}]
    rows = [
        {"conversations": [{"from": "system", "value": "Turn system."}, {"from": "human", "value": "hi"},
                           {"from": "gpt", "value": "hello"}], "sys": "Column system."},
        {"conversations": [{"from": "human", "value": "3 and 12?"}, {"from": "function_call", "value": json.dumps(calls)},
                           {"from": "observation", "value": "[3, 12]"}, {"from": "gpt", "value": "3 and 12."}],
         "sys": "Column system."},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": json.dumps(calls[0])}],
         "tools": [{"name": "add", "parameters": {}}]},
    ]
    folder = make_dataset(tmp_path, {"d": {"file_name": "d.json", "formatting": "sharegpt", "columns": {
        "messages": "conversations", "system": "sys", "tools": "tools"}}}, {"d.json": rows})
    first, second, third = load_conversations("d", folder)
    assert first.messages[0] == {"role": "system", "content": "Turn system."}  # the turn wins over the column
    assert second.messages[0] == {"role": "system", "content": "Column system."}
    assert second.messages[2] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}},
        {"type": "function", "function": {"name": "mul", "arguments": {"a": 3, "b": 4}}}]}
    assert second.messages[3] == {"role": "tool", "content": "[3, 12]"}
    assert third.messages[-1]["tool_calls"][0]["function"]["name"] == "add"  # may end with a call
    assert third.tools == [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    assert first.tools is None


def test_to_conversation_on_a_single_row(shared_data):
    (spec,) = resolve_datasets("identity", shared_data)
    conv = to_conversation({"instruction": "hi", "input": "", "output": "Hello!"}, spec, 7)
    assert conv == Conversation(messages=[{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "Hello!"}], source=("identity", 7))


# ---------------------------------------------------------------- readers


def test_json_list_rows_keep_their_starting_lines(shared_data, tmp_path):
    text = (shared_data / "alpaca_en_demo.json").read_text(encoding="utf-8").splitlines()
    starts = [n for n, line in enumerate(text, start=1) if line == "  {"]
    got = [(index, line) for index, line, _ in read_rows(shared_data / "alpaca_en_demo.json")]
    assert got == list(enumerate(starts)) and len(got) == 999
    assert got[5] == (5, 27)
    # irregular layout: several rows on a line, strings holding brackets and newlines
    odd = tmp_path / "odd.json"
    odd.write_text('\n\n[{"a": "x\\n]"},{"a": "y"},\n\n   {"a":\n "[z,"}\n]\n', encoding="utf-8")
    assert list(read_rows(odd)) == [(0, 3, {"a": "x\n]"}), (1, 3, {"a": "y"}), (2, 5, {"a": "[z,"})]


def test_jsonl_and_json_lines_in_a_json_file(tmp_path):
    body = '{"a": 1}\n\n{"a": 2}\r\n{"a": 3}\n'
    (tmp_path / "x.jsonl").write_text(body, encoding="utf-8")
    (tmp_path / "y.json").write_bytes(b"\xef\xbb\xbf" + body.encode())  # with a byte-order mark
    expected = [(0, 1, {"a": 1}), (1, 3, {"a": 2}), (2, 4, {"a": 3})]
    assert list(read_rows(tmp_path / "x.jsonl")) == expected
    assert list(read_rows(tmp_path / "y.json")) == expected


def test_csv_reader_and_alpaca_from_csv(tmp_path):
    path = tmp_path / "qa.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "input", "output", "history"])
        writer.writerow(["Write two lines.", "", "line one\nline two", ""])
        writer.writerow(["Why, then?", "Keep it short", "Because.", json.dumps([["First?", "Yes."]])])
        writer.writerow(["Long", "", "x" * 200_000, ""])  # beyond the csv module's default field limit
    rows = list(read_rows(path))
    assert [(i, line) for i, line, _ in rows] == [(0, 2), (1, 4), (2, 5)]
    assert rows[0][2] == {"instruction": "Write two lines.", "input": "", "output": "line one\nline two", "history": ""}
    folder = make_dataset(tmp_path / "d", {"qa": {"file_name": str(path), "columns": {
        "prompt": "instruction", "query": "input", "response": "output", "history": "history"}}}, {})
    a, b, c = load_conversations("qa", folder)
    assert a.messages[-1] == {"role": "assistant", "content": "line one\nline two"}
    assert b.messages == [{"role": "user", "content": "First?"}, {"role": "assistant", "content": "Yes."},
                          {"role": "user", "content": "Why, then?\nKeep it short"},
                          {"role": "assistant", "content": "Because."}]
    assert len(c.messages[-1]["content"]) == 200_000


def test_parquet_and_arrow_readers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], "tools": ""},
        {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}], "tools": "[]"},
    ])
    pq.write_table(table, tmp_path / "chat.parquet")
    with pa.OSFile(str(tmp_path / "chat.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    assert list(read_rows(tmp_path / "chat.parquet")) == [(0, None, table.to_pylist()[0]),
                                                          (1, None, table.to_pylist()[1])]
    entry = {"formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}}
    folder = make_dataset(tmp_path / "d", {"pq": {"file_name": str(tmp_path / "chat.parquet"), **entry},
                                           "arrow": {"file_name": str(tmp_path / "chat.arrow"), **entry}}, {})
    from_parquet = load_conversations("pq", folder)
    from_arrow = load_conversations("arrow", folder)
    assert [c.messages for c in from_parquet] == [c.messages for c in from_arrow] == [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]]


def test_folder_file_name_reads_every_data_file_sorted(tmp_path):
    folder = make_dataset(tmp_path, {"parts": {"file_name": "parts"}}, {
        "parts/b.jsonl": json.dumps({"instruction": "b", "output": "B"}) + "\n",
        "parts/a.json": [{"instruction": "a0", "output": "A0"}, {"instruction": "a1", "output": "A1"}],
        "parts/notes.md": "not data", "parts/.hidden.json": "[]",
    })
    (spec,) = resolve_datasets("parts", folder)
    assert [p.name for p in spec.paths] == ["a.json", "b.jsonl"]
    convs = load_conversations("parts", folder)
    assert [(c.messages[0]["content"], c.source) for c in convs] == [
        ("a0", ("parts", 0)), ("a1", ("parts", 1)), ("b", ("parts", 2))]
    assert [i for i, _, _ in read_rows(spec)] == [0, 1, 2]


# ---------------------------------------------------------------- several datasets, max_samples, num_samples


def test_comma_joined_datasets_and_max_samples(shared_data):
    convs = load_conversations("identity, alpaca_zh_demo", shared_data)
    assert len(convs) == 91 + 1000
    assert convs[90].source == ("identity", 90) and convs[91].source == ("alpaca_zh_demo", 0)
    few = load_conversations("identity,glaive_toolcall_en_demo", shared_data, max_samples=3)
    assert [c.source for c in few] == [("identity", 0), ("identity", 1), ("identity", 2),
                                       ("glaive_toolcall_en_demo", 0), ("glaive_toolcall_en_demo", 1),
                                       ("glaive_toolcall_en_demo", 2)]
    assert few[:3] == convs[:3]
    assert len(load_conversations("identity", shared_data, max_samples=5000)) == 91


def test_num_samples_subsamples_and_repeats(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    folder = make_dataset(tmp_path, {"small": {"file_name": "d.json", "num_samples": 4},
                                     "big": {"file_name": "d.json", "num_samples": 25}}, {"d.json": rows})
    small = [c.source[1] for c in load_conversations("small", folder)]
    assert len(small) == 4 == len(set(small))
    assert small == [c.source[1] for c in load_conversations("small", folder)]  # same seed, same rows
    big = [c.source[1] for c in load_conversations("big", folder, seed=1)]
    assert len(big) == 25 and set(big) == set(range(10))  # every row once, then repeats
    assert len(load_conversations("big", folder, max_samples=7)) == 7


def test_openai_parallel_calls_take_one_tool_message_each(tmp_path):
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
        {"type": "function", "function": {"name": "g", "arguments": {}}}]}
    tool = {"role": "tool", "content": "done"}
    ok = [{"role": "user", "content": "go"}, call, tool, tool, {"role": "assistant", "content": "both done"}]
    folder = make_dataset(tmp_path, {"d": {"file_name": "d.json", "formatting": "openai"}},
                          {"d.json": [{"messages": ok}]})
    (conv,) = load_conversations("d", folder)
    assert conv.messages == ok
    (folder / "d.json").write_text(json.dumps([{"messages": ok[:3] + [tool, tool] + ok[4:]}]), encoding="utf-8")
    with pytest.raises(UserError, match=r"turn 4 is 'tool' after 'tool', out of order"):
        load_conversations("d", folder)
