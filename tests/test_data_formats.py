"""Registry, readers and converters: the datasets in data/, goldens, every file type, folders and sampling."""

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


# ---------------------------------------------------------------- the repository's datasets and the registry

REPO_SETS = [("identity", "identity.json", 100), ("alpaca_demo", "alpaca_demo.json", 40),
             ("chat_sharegpt", "chat_sharegpt.json", 30), ("toolcall_sharegpt", "toolcall_sharegpt.json", 22),
             ("toolcall_openai", "toolcall_openai.jsonl", 22)]


def raw_rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()] if path.suffix == ".jsonl" else json.loads(text)


@pytest.mark.parametrize(("name", "file_name", "rows"), REPO_SETS)
def test_repo_dataset_loads_completely(repo_data, name, file_name, rows):
    convs = load_conversations(name, repo_data)
    assert len(convs) == rows
    assert [c.source for c in convs] == [(name, i) for i in range(rows)]
    for conv in convs:
        assert conv.messages[-1]["role"] == "assistant"
        assert all(isinstance(m["content"], str) for m in conv.messages)
    raw = raw_rows(repo_data / file_name)
    if name == "toolcall_sharegpt":
        # each turn becomes one message; "[]" tools mean no tools
        assert [len(c.messages) for c in convs] == [len(r["conversations"]) for r in raw]
        assert sum(c.tools is None for c in convs) == sum(r["tools"] == "[]" for r in raw) == 2
        calls = sum(turn["from"] == "function_call" for r in raw for turn in r["conversations"])
        assert sum(bool(m.get("tool_calls")) for c in convs for m in c.messages) == calls == 21
    elif name in ("chat_sharegpt", "toolcall_openai"):
        turns = "conversations" if name == "chat_sharegpt" else "messages"
        assert [len(c.messages) for c in convs] == [len(r[turns]) for r in raw]
        systems = 7 if name == "chat_sharegpt" else 11
        assert sum(c.messages[0]["role"] == "system" for c in convs) == systems
    else:
        assert [c.messages[-1]["content"] for c in convs] == [r["output"] for r in raw]


def test_registry_lists_every_file_in_data(repo_data):
    registered = {entry["file_name"] for entry in load_registry(repo_data).values()}
    data_files = {p.name for p in repo_data.iterdir() if p.suffix in (".json", ".jsonl", ".csv", ".parquet")}
    assert registered == data_files - {"dataset_info.json"}


def test_alpaca_demo_is_the_same_in_every_file_type(repo_data):
    names = ["alpaca_demo", "alpaca_demo_jsonl", "alpaca_demo_csv", "alpaca_demo_parquet"]
    by_type = [load_conversations(name, repo_data) for name in names]
    assert len(by_type[0]) == 40 and sum("\n" in c.messages[-1]["content"] for c in by_type[0]) >= 3
    for convs in by_type[1:]:
        assert [c.messages for c in convs] == [c.messages for c in by_type[0]]


def test_toolcall_sets_hold_the_same_dialogues_in_both_forms(repo_data):
    """The OpenAI rows add ids, tool_call_id and some system messages; one sharegpt observation answers a
    parallel call where the OpenAI row has one tool message per call."""
    sharegpt = load_conversations("toolcall_sharegpt", repo_data)
    openai = load_conversations("toolcall_openai", repo_data)

    def bare(messages: list[dict]) -> list[dict]:
        out = []
        for m in messages:
            if m["role"] == "system":
                continue
            m = {k: v for k, v in m.items() if k != "tool_call_id"}
            if "tool_calls" in m:
                m["tool_calls"] = [{k: v for k, v in call.items() if k != "id"} for call in m["tool_calls"]]
            out.append(m)
        return out

    differ = [i for i, (s, o) in enumerate(zip(sharegpt, openai, strict=True)) if bare(s.messages) != bare(o.messages)]
    assert differ == [12]
    assert [len(m["tool_calls"]) for m in sharegpt[12].messages if "tool_calls" in m] == [2]
    assert [m["role"] for m in openai[12].messages].count("tool") == 2
    assert [s.tools for s in sharegpt] == [o.tools for o in openai]


def test_registry_defaults_follow_llama_factory(repo_data):
    alpaca, tools = resolve_datasets("alpaca_demo, toolcall_sharegpt", repo_data)
    assert alpaca.formatting == "alpaca"
    assert alpaca.columns == {"prompt": "instruction", "query": "input", "response": "output"}
    assert alpaca.paths == [repo_data / "alpaca_demo.json"] and alpaca.split == "train"
    assert tools.formatting == "sharegpt"
    assert tools.columns == {"messages": "conversations", "tools": "tools"}
    # the entry leaves system_tag out: it keeps its default
    assert tools.tags == {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                          "observation_tag": "observation", "function_tag": "function_call",
                          "system_tag": "system"}
    (chat,) = resolve_datasets("chat_sharegpt", repo_data)
    assert chat.tags == tools.tags
    assert len(load_registry(repo_data)) == 8
    assert resolve_datasets(None, repo_data) == [] and resolve_datasets(" ", repo_data) == []


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


def test_golden_alpaca_with_input(repo_data):
    convs = load_conversations("alpaca_demo", repo_data, max_samples=3)
    assert as_json(convs[2]) == golden("alpaca_with_input.json")


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


def test_golden_sharegpt_tool_calls_over_two_exchanges(repo_data):
    conv = load_conversations("toolcall_sharegpt", repo_data, max_samples=2)[1]
    assert as_json(conv) == golden("sharegpt_toolcall_row1.json")


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
        {"conversations": [{"from": "human", "value": "3 and 12?"},
                           {"from": "function_call", "value": json.dumps(calls)},
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


def test_to_conversation_on_a_single_row(repo_data):
    (spec,) = resolve_datasets("identity", repo_data)
    conv = to_conversation({"instruction": "hi", "input": "", "output": "Hello!"}, spec, 7)
    assert conv == Conversation(messages=[{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "Hello!"}], source=("identity", 7))


# ---------------------------------------------------------------- readers


def test_json_list_rows_keep_their_starting_lines(repo_data, tmp_path):
    text = (repo_data / "alpaca_demo.json").read_text(encoding="utf-8").splitlines()
    starts = [n for n, line in enumerate(text, start=1) if line == "  {"]
    got = [(index, line) for index, line, _ in read_rows(repo_data / "alpaca_demo.json")]
    assert got == list(enumerate(starts)) and len(got) == 40
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


def test_comma_joined_datasets_and_max_samples(repo_data):
    convs = load_conversations("identity, chat_sharegpt", repo_data)
    assert len(convs) == 100 + 30
    assert convs[99].source == ("identity", 99) and convs[100].source == ("chat_sharegpt", 0)
    few = load_conversations("identity,toolcall_sharegpt", repo_data, max_samples=3)
    assert [c.source for c in few] == [("identity", 0), ("identity", 1), ("identity", 2),
                                       ("toolcall_sharegpt", 0), ("toolcall_sharegpt", 1),
                                       ("toolcall_sharegpt", 2)]
    assert few[:3] == convs[:3]
    assert len(load_conversations("identity", repo_data, max_samples=5000)) == 100


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
