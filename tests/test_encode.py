"""Exact label masks and the truncation policy of data.encode, on the default model's real tokenizer.

Expected positions are derived independently of encode(): by tokenizing the rendered prefixes
(the prompt up to each answer, and the conversation up to each answer's end) on their own.
"""

from __future__ import annotations

import pytest

from tunesmith.config import DataArgs
from tunesmith.data.encode import (
    IGNORE_INDEX,
    NOTHING_TRAINED,
    PROMPT_TOO_LONG,
    Dropped,
    Encoded,
    encode,
    mask_labels,
    token_starts,
)
from tunesmith.template import Conversation, normalize_tools, tool_support

END = "<|im_end|>\n"


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def template_input(tokenizer, messages, tools=None):
    """The messages and tools as the renderer hands them to the chat template: tool use the
    template cannot print is first rewritten into text (template.normalize_tools)."""
    if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        messages, tools = normalize_tools(messages, tools, tool_support(tokenizer))
    return messages, ({"tools": tools} if tools else {})


def chat_ids(tokenizer, messages, tools=None) -> list[int]:
    messages, extra = template_input(tokenizer, messages, tools)
    out = tokenizer.apply_chat_template(messages, tokenize=True, **extra)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def answer_token_ranges(tokenizer, messages, tools=None) -> list[tuple[int, int]]:
    """[start, end) token positions of every assistant turn (answer + end-of-turn marker)."""
    messages, extra = template_input(tokenizer, messages, tools)
    ranges = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True, **extra)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False, **extra)
        ranges.append((len(ids_of(tokenizer, prompt)), len(ids_of(tokenizer, upto))))
    return ranges


def labels_for(ids: list[int], ranges: list[tuple[int, int]]) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in ranges:
        labels[a:b] = ids[a:b]
    return labels


def trained_runs(labels: list[int]) -> list[tuple[int, int]]:
    runs, i = [], 0
    while i < len(labels):
        if labels[i] == IGNORE_INDEX:
            i += 1
            continue
        j = i
        while j < len(labels) and labels[j] != IGNORE_INDEX:
            j += 1
        runs.append((i, j))
        i = j
    return runs


MULTI = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one, please?"},
    {"role": "assistant", "content": "Green, then."},
]


def test_single_turn_golden(tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."}]
    out = encode(Conversation(messages, source=("golden", 0)), tokenizer, DataArgs())
    assert isinstance(out, Encoded)
    full = chat_ids(tokenizer, messages)
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(ids_of(tokenizer, prompt))
    answer = ids_of(tokenizer, "Paris." + END)  # the trained tokens, tokenized on their own
    assert out.input_ids == full
    assert full[:n_prompt] == ids_of(tokenizer, prompt) and full[n_prompt:] == answer
    assert out.labels == [IGNORE_INDEX] * n_prompt + answer
    assert tokenizer.decode([t for t in out.labels if t != IGNORE_INDEX]) == "Paris." + END
    assert out.source == ("golden", 0) and not out.truncated


def test_multi_turn_trains_every_answer_only(tokenizer):
    out = encode(Conversation(MULTI), tokenizer, DataArgs())
    ranges = answer_token_ranges(tokenizer, MULTI)
    assert len(ranges) == 2
    assert out.input_ids == chat_ids(tokenizer, MULTI)
    assert out.labels == labels_for(out.input_ids, ranges)
    assert trained_runs(out.labels) == ranges
    texts = [tokenizer.decode(out.input_ids[a:b]) for a, b in ranges]
    assert texts == ["Blue." + END, "Green, then." + END]


def test_mask_history_trains_only_the_last_answer(tokenizer):
    out = encode(Conversation(MULTI), tokenizer, DataArgs(mask_history=True))
    last = answer_token_ranges(tokenizer, MULTI)[-1]
    assert out.labels == labels_for(out.input_ids, [last])


def test_train_on_prompt_trains_everything(tokenizer):
    out = encode(Conversation(MULTI), tokenizer, DataArgs(train_on_prompt=True))
    assert out.labels == out.input_ids == chat_ids(tokenizer, MULTI)


def test_tool_results_are_not_trained(tokenizer):
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "{\"temp\": -3}"},
        {"role": "assistant", "content": "It is -3 degrees."},
    ]
    out = encode(Conversation(messages), tokenizer, DataArgs())
    ranges = answer_token_ranges(tokenizer, messages)
    assert len(ranges) == 2 and out.input_ids == chat_ids(tokenizer, messages)
    assert out.labels == labels_for(out.input_ids, ranges)
    # the tokens between the two answers hold the tool result and are not trained
    between = out.input_ids[ranges[0][1] : ranges[1][0]]
    assert '{"temp": -3}' in tokenizer.decode(between)
    assert out.labels[ranges[0][1] : ranges[1][0]] == [IGNORE_INDEX] * len(between)
    # the tool call is part of the trained answer
    assert "weather" in tokenizer.decode(out.input_ids[ranges[0][0] : ranges[0][1]])


def test_truncation_drops_whole_turns(tokenizer):
    (_, end1), (_, end2) = answer_token_ranges(tokenizer, MULTI)
    full = chat_ids(tokenizer, MULTI)
    assert end2 == len(full)
    out = encode(Conversation(MULTI), tokenizer, DataArgs(cutoff_len=end2 - 1))
    assert isinstance(out, Encoded) and out.truncated
    assert out.input_ids == full[:end1]  # cut right after the first answer's end-of-turn marker
    assert tokenizer.decode(out.input_ids).endswith("Blue." + END)
    assert out.labels == labels_for(full, answer_token_ranges(tokenizer, MULTI)[:1])[:end1]
    # exactly at the limit nothing is cut
    whole = encode(Conversation(MULTI), tokenizer, DataArgs(cutoff_len=end2))
    assert whole.input_ids == full and not whole.truncated


def test_hard_cut_when_first_answer_does_not_fit(tokenizer):
    messages = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": " ".join(["one"] * 50)}]
    (start, end), = answer_token_ranges(tokenizer, messages)
    full = chat_ids(tokenizer, messages)
    out = encode(Conversation(messages), tokenizer, DataArgs(cutoff_len=start + 3))
    assert isinstance(out, Encoded) and out.truncated
    assert out.input_ids == full[: start + 3]
    assert out.labels == [IGNORE_INDEX] * start + full[start : start + 3]


def test_prompt_longer_than_cutoff_is_dropped_with_reason(tokenizer):
    messages = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]
    (start, _), = answer_token_ranges(tokenizer, messages)
    for cutoff in (start - 1, start):  # at `start` the cut leaves the whole prompt but no answer token
        out = encode(Conversation(messages, source=("d", 7)), tokenizer, DataArgs(cutoff_len=cutoff))
        assert out == Dropped(("d", 7), PROMPT_TOO_LONG)
    one = encode(Conversation(messages), tokenizer, DataArgs(cutoff_len=start + 1))
    assert isinstance(one, Encoded) and one.trained_tokens == 1


def test_mask_history_hard_cuts_into_the_last_answer(tokenizer):
    # Only the last answer is trained; cutting after an earlier turn would leave nothing to learn.
    (_, end1), (start2, end2) = answer_token_ranges(tokenizer, MULTI)
    out = encode(Conversation(MULTI), tokenizer, DataArgs(cutoff_len=start2 + 2, mask_history=True))
    assert isinstance(out, Encoded) and out.truncated
    assert len(out.input_ids) == start2 + 2 and out.trained_tokens == 2


def test_conversation_without_answer_is_dropped(tokenizer):
    out = encode(Conversation([{"role": "user", "content": "hello"}], source=("d", 3)), tokenizer, DataArgs())
    assert out == Dropped(("d", 3), NOTHING_TRAINED)


def test_special_tokens_with_empty_offsets_are_placed_by_position(tokenizer):
    """Some fast tokenizers report (0, 0) for special tokens; the mask must not depend on it."""
    text = tokenizer.apply_chat_template(MULTI, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
    special = set(tokenizer.all_special_ids)
    assert any(i in special for i in ids)
    blanked = [(0, 0) if i in special else o for i, o in zip(ids, offsets, strict=True)]
    assert blanked != offsets
    real = token_starts(text, ids, offsets, tokenizer)
    assert real == [s for s, _ in offsets]
    assert token_starts(text, ids, blanked, tokenizer) == real
    spans = [(text.index("Blue."), text.index("Blue.") + len("Blue." + END))]
    assert mask_labels(ids, token_starts(text, ids, blanked, tokenizer), spans, len(text)) == \
        mask_labels(ids, real, spans, len(text))


def test_empty_offset_token_not_found_in_text_follows_previous_token(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = "ab"  # the special token's literal text is absent: it takes the previous token's end
    starts = token_starts(text, [64, eos, 65], [(0, 1), (0, 0), (1, 2)], tokenizer)
    assert starts == [0, 1, 1]
    assert mask_labels([64, eos, 65], starts, [(1, 2)], len(text)) == [IGNORE_INDEX, eos, 65]


@pytest.mark.parametrize("name", ["identity", "alpaca_demo", "chat_sharegpt", "toolcall_sharegpt", "toolcall_openai"])
def test_ids_equal_apply_chat_template_on_repo_data(tokenizer, repo_data, name):
    from tunesmith.data.formats import load_conversations

    convs = load_conversations(name, repo_data, max_samples=25)
    assert len(convs) >= 22
    for conv in convs:
        out = encode(conv, tokenizer, DataArgs(cutoff_len=100_000))
        assert out.input_ids == chat_ids(tokenizer, conv.messages, conv.tools), conv.source
        assert out.labels == labels_for(out.input_ids, answer_token_ranges(tokenizer, conv.messages, conv.tools))
