"""Training tokens equal inference tokens, for every named template.

For every assistant turn of Alpaca-style, multi-turn and tool-call conversations:
- the ids before the answer are exactly the ids of its prompt encoded for generation (what chat
  and the API feed the model), and for the first answer that is the prompt text tokenized alone;
- every character of the answer and its end-of-turn marker lies in trained tokens.
Run with a tokenizer carrying the family's special tokens and with one lacking them (where
tokenizing the whole text at once merges characters across the prompt/answer boundary). For
ChatML-style templates the ids also equal `apply_chat_template` on the whole conversation.
"""

from __future__ import annotations

import copy
import json

import pytest
from test_templates import GOLDEN, family_tokenizer

from tunesmith.config import DataArgs
from tunesmith.data.encode import IGNORE_INDEX, Encoded, encode
from tunesmith.template import (
    TEMPLATES,
    Conversation,
    answer_spans,
    apply_template,
    encode_segments,
    normalize_tools,
    render,
    tool_support,
)

ARGS = {"ingredients": ["chicken", "rice"]}
TOOLS = [{"name": "search_recipes", "description": "Search recipes by ingredient",
          "parameters": {"type": "object",
                         "properties": {"ingredients": {"type": "array", "items": {"type": "string"}}},
                         "required": ["ingredients"]}}]
CONVERSATIONS: dict[str, tuple[list[dict], list | None]] = {
    # Answers whose first character merges with the end of many prompts ("Assistant:" + '"').
    "alpaca_quote": ([{"role": "user", "content": "Give me a famous quote."},
                      {"role": "assistant", "content": '"To be, or not to be."'}], None),
    "alpaca_brace": ([{"role": "system", "content": "Answer in JSON."},
                      {"role": "user", "content": "Name and age of Ada?"},
                      {"role": "assistant", "content": '{"name": "Ada", "age": 36}'}], None),
    "alpaca_symbols": ([{"role": "user", "content": "Write a list:"},
                        {"role": "assistant", "content": "- café\n- naïve <b>bold</b>"}], None),
    "multi_turn": ([{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "(hello) there!"},
                    {"role": "user", "content": "What is 2+2?"},
                    {"role": "assistant", "content": "'4'"},
                    {"role": "user", "content": "And 3+3?"},
                    {"role": "assistant", "content": ">6<"}], None),
    "tool_call": ([{"role": "user", "content": "I have chicken and rice."},
                   {"role": "assistant", "content": "",
                    "tool_calls": [{"type": "function",
                                    "function": {"name": "search_recipes", "arguments": json.dumps(ARGS)}}]},
                   {"role": "tool", "content": '{"recipes": ["Fried rice"]}'},
                   {"role": "assistant", "content": "Try fried rice."}], TOOLS),
}
# Templates whose every prompt/answer boundary is a special token: the pieces tokenize as the whole does.
CHATML_STYLE = {"chatml", "qwen", "qwen3", "qwen3_nothink", "phi4"}
EVERY_TURN = DataArgs(cutoff_len=100_000)


def bare_tokenizer(base, name: str):
    """The default tokenizer with the named template but none of the family's markers as tokens."""
    tok = copy.deepcopy(base)
    assert apply_template(tok, name) == name
    return tok


@pytest.fixture(scope="module")
def tokenizers(tokenizer):
    made: dict[tuple[str, str], object] = {}

    def get(name: str, kind: str):
        if (name, kind) not in made:
            maker = family_tokenizer if kind == "family" else bare_tokenizer
            made[(name, kind)] = maker(tokenizer, name)
        return made[(name, kind)]

    return get


def test_every_named_template_is_checked():
    assert set(GOLDEN) == set(TEMPLATES)


@pytest.mark.parametrize("conv_name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("kind", ["family", "bare"])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_training_tokens_equal_inference_tokens(tokenizers, name, kind, conv_name):
    tok = tokenizers(name, kind)
    messages, tools = CONVERSATIONS[conv_name]
    conv = Conversation(messages, tools, ("demo", 0))
    seg = encode_segments(conv, tok)
    sample = encode(conv, tok, EVERY_TURN)
    assert isinstance(sample, Encoded) and sample.input_ids == seg.ids
    text, spans, turns = answer_spans(conv, tok)
    assert seg.text == text and [t for _, _, t in seg.answers()] == turns
    for (first, end, turn), (start_char, end_char) in zip(seg.answers(), spans, strict=True):
        # 1. what precedes the answer is exactly what inference feeds for that prompt
        prompt = encode_segments(Conversation(messages[:turn], tools), tok, add_generation_prompt=True)
        assert seg.ids[:first] == prompt.ids, (turn, tok.decode(seg.ids[:first])[-30:], tok.decode(prompt.ids)[-30:])
        prompt_text = render(Conversation(messages[:turn], tools), tok, add_generation_prompt=True)
        assert text[:start_char] == prompt_text
        if turn == turns[0]:
            assert prompt.ids == tok(prompt_text, add_special_tokens=False).input_ids
        # 2. every character of the answer and its end-of-turn marker lies in trained tokens, and only those
        assert all(label != IGNORE_INDEX for label in sample.labels[first:end])
        trained_text = tok.decode(seg.ids[first:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert trained_text == text[start_char:end_char]
        answer = messages[turn]
        rendered = text[start_char:end_char]
        for call in answer.get("tool_calls") or []:
            assert call["function"]["name"] in rendered and '{"ingredients"' in rendered.replace("'", '"')
        if answer["content"]:
            assert answer["content"].strip() in rendered
    untrained = set(range(len(seg.ids))) - {i for a, b, _ in seg.answers() for i in range(a, b)}
    assert all(sample.labels[i] == IGNORE_INDEX for i in untrained)
    if kind == "family" and name in CHATML_STYLE:
        template_messages, template_tools = normalize_tools(messages, tools, tool_support(tok))
        extra = {"tools": template_tools} if template_tools else {}
        whole = tok.apply_chat_template(template_messages, tokenize=True, **extra)
        assert seg.ids == list(whole["input_ids"] if hasattr(whole, "keys") else whole)


@pytest.mark.parametrize("name", ["default", "empty", "mistral"])
def test_answers_no_longer_lose_their_first_character(tokenizers, name):
    """Where the whole text tokenizes a prompt's last characters together with the answer's first
    (`Assistant:"`), the answer's first character is still trained."""
    from tunesmith.data.pipeline import merged_boundaries

    tok = tokenizers(name, "family")
    messages, _ = CONVERSATIONS["alpaca_quote"]
    assert merged_boundaries(Conversation(messages), tok)  # the whole text does merge here
    sample = encode(Conversation(messages), tok, EVERY_TURN)
    trained = [t for t, label in zip(sample.input_ids, sample.labels, strict=True) if label != IGNORE_INDEX]
    assert tok.decode(trained).lstrip().startswith('"To be')
