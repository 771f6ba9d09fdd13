"""Named templates rendered side by side with the families' official chat templates (the Jinja
text their tokenizers ship, kept in tests/fixtures/chat_templates), on the conversations where
the official template keeps every prompt a prefix of the conversation that answers it; and the
tool-call formats of llama3 (Llama 3.1 JSON calls) and mistral (v0.3 calls) written out."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from test_templates import CALL_ARGS, RECIPE_TOOLS, TOOL_CHAT, TOOL_RESULT, family_tokenizer

from tunesmith.template import Conversation, apply_template, render, render_with_spans

OFFICIAL = Path(__file__).parent / "fixtures" / "chat_templates"
HI = [{"role": "user", "content": "Hi"}]
SINGLE = [*HI, {"role": "assistant", "content": "Hello!"}]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}, *SINGLE]
MULTI = [*WITH_SYSTEM, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
REASONED = [*HI, {"role": "assistant", "content": "Hello!", "reasoning_content": "A greeting; answer in kind."}]
THOUGHT_IN_CONTENT = [*HI, {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello!"}]


def official_tokenizer(named_tok, name: str):
    tok = copy.deepcopy(named_tok)
    tok.chat_template = (OFFICIAL / f"{name}.jinja").read_text(encoding="utf-8")
    return tok


def both(tokenizer, name: str):
    ours = family_tokenizer(tokenizer, name)
    return ours, official_tokenizer(ours, name)


def same(ours, official, messages, **kwargs) -> str:
    text = render(messages, ours, **kwargs)
    assert text == official.apply_chat_template(messages, tokenize=False, **kwargs), messages
    return text


@pytest.mark.parametrize("name", ["phi4", "gemma3"])
def test_renders_like_the_official_template(tokenizer, name):
    ours, official = both(tokenizer, name)
    for messages in (SINGLE, WITH_SYSTEM, MULTI):
        same(ours, official, messages)
        same(ours, official, messages[:-1], add_generation_prompt=True)


def test_qwen3_renders_like_the_official_template_where_it_nests(tokenizer):
    ours, official = both(tokenizer, "qwen3")
    for messages in (SINGLE, WITH_SYSTEM, REASONED, THOUGHT_IN_CONTENT):
        same(ours, official, messages)
        same(ours, official, messages[:-1], add_generation_prompt=True)
    assert "<think>\nA greeting; answer in kind.\n</think>\n\nHello!<|im_end|>" in render(REASONED, ours)
    # Tools and a call: the prompt and the call as the last answer. (After a tool result the
    # official template drops the call's empty think block from history, as it does for answers.)
    tool_chat = [{**m, "tool_calls": [{"type": "function", "function": {"name": "search_recipes",
                                                                      "arguments": CALL_ARGS}}]}
                 if m.get("tool_calls") else m for m in TOOL_CHAT]
    same(ours, official, tool_chat[:1], tools=RECIPE_TOOLS, add_generation_prompt=True)
    call = same(ours, official, tool_chat[:2], tools=RECIPE_TOOLS)
    assert call.endswith(f"<think>\n\n</think>\n\n<tool_call>\n{{\"name\": \"search_recipes\", "
                         f"\"arguments\": {json.dumps(CALL_ARGS)}}}\n</tool_call><|im_end|>\n")


def test_qwen3_earlier_answers_keep_their_think_block_so_prompts_nest(tokenizer):
    """The official template drops earlier answers' blocks; ours keeps them, so the prompt of the
    second answer is exactly the text that trained the first."""
    ours, official = both(tokenizer, "qwen3")
    text, spans = render_with_spans(Conversation(MULTI), ours)
    assert [text[a:b] for a, b in spans] == ["<think>\n\n</think>\n\nHello!<|im_end|>\n",
                                             "<think>\n\n</think>\n\n4<|im_end|>\n"]
    assert render(MULTI, official) != text  # the official one rewrites history


def test_qwen3_enable_thinking_false(tokenizer):
    ours = family_tokenizer(tokenizer, "qwen3")
    official = official_tokenizer(ours, "qwen3")
    assert apply_template(ours, "qwen3", enable_thinking=False) == "qwen3"
    prompt = render(HI, ours, add_generation_prompt=True)
    assert prompt == official.apply_chat_template(HI, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    text, spans = render_with_spans(Conversation(REASONED), ours)
    assert text.startswith(prompt) and [text[a:b] for a, b in spans] == ["Hello!<|im_end|>\n"]  # no reasoning
    # A tokenizer's own template gets the same switch.
    own = copy.deepcopy(official)
    apply_template(own, None, enable_thinking=False)
    assert render(HI, own, add_generation_prompt=True) == prompt


def test_llama3_tool_calls_are_llama31_json(tokenizer):
    tok = family_tokenizer(tokenizer, "llama3")
    text, spans = render_with_spans(Conversation(TOOL_CHAT, RECIPE_TOOLS), tok)
    schema = json.dumps(RECIPE_TOOLS[0], indent=4, ensure_ascii=False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        "Given the following functions, please respond with a JSON for a function call with its proper arguments "
        "that best answers the given prompt.\n\nRespond in the format {\"name\": function name, \"parameters\": "
        f"dictionary of argument name and its value}}.Do not use variables.\n\n{schema}\n\n"
        "I have chicken, bell peppers, and rice.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        f'{{"name": "search_recipes", "parameters": {json.dumps(CALL_ARGS)}}}<|eot_id|>'
        f"<|start_header_id|>ipython<|end_header_id|>\n\n{TOOL_RESULT}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nTry the stir fry.<|eot_id|>")
    assert [text[a:b] for a, b in spans] == [
        f'{{"name": "search_recipes", "parameters": {json.dumps(CALL_ARGS)}}}<|eot_id|>', "Try the stir fry.<|eot_id|>"]


def test_mistral_tool_calls_are_v03_calls(tokenizer):
    tok = family_tokenizer(tokenizer, "mistral")
    text, spans = render_with_spans(Conversation(TOOL_CHAT, RECIPE_TOOLS), tok)
    assert text == (
        f"<s>[AVAILABLE_TOOLS] {json.dumps(RECIPE_TOOLS)}[/AVAILABLE_TOOLS]"
        "[INST] I have chicken, bell peppers, and rice. [/INST]"
        f'[TOOL_CALLS] [{{"name": "search_recipes", "arguments": {json.dumps(CALL_ARGS)}}}]</s>'
        f'[TOOL_RESULTS] {{"content": {TOOL_RESULT}}}[/TOOL_RESULTS]Try the stir fry.</s>')
    assert [text[a:b] for a, b in spans] == [
        f'[TOOL_CALLS] [{{"name": "search_recipes", "arguments": {json.dumps(CALL_ARGS)}}}]</s>',
        "Try the stir fry.</s>"]
