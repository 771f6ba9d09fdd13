"""Named chat templates against hand-written goldens of each family's official format, the
default model's own template, trained spans, stop strings and tool-use normalisation."""

from __future__ import annotations

import copy
import json

import pytest

from tunesmith.errors import UserError
from tunesmith.template import (
    TEMPLATES,
    Conversation,
    apply_template,
    render,
    render_with_spans,
    stop_strings,
    template_names,
    tool_support,
)

SYSTEM = "Be brief."
CHAT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
WITH_SYSTEM = [{"role": "system", "content": SYSTEM}, *CHAT]
SINGLE = CHAT[:2]

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.\n\n")
NO_THOUGHT = "<think>\n\n</think>\n\n"  # Qwen3's empty reasoning block
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions. ")

# Per template: the family's special tokens (added to the test tokenizer), its bos/eos, and the
# official text of: SINGLE, SINGLE[:1] + generation prompt, WITH_SYSTEM, WITH_SYSTEM[:-1] +
# generation prompt; then the trained text of each answer in WITH_SYSTEM, and the stop strings.
GOLDEN: dict[str, dict] = {
    "chatml": dict(
        specials=["<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>",
        single="<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n",
        single_prompt="<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        multi=("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
               "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
               "<|im_start|>assistant\n4<|im_end|>\n"),
        multi_prompt=("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                      "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                      "<|im_start|>assistant\n"),
        answers=["Hello!<|im_end|>\n", "4<|im_end|>\n"], stop=["<|im_end|>"]),
    "qwen": dict(
        specials=["<|im_start|>", "<|im_end|>", "<|endoftext|>"], bos=None, eos="<|im_end|>",
        single=(f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\nHello!<|im_end|>\n"),
        single_prompt=f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        multi=("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
               "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
               "<|im_start|>assistant\n4<|im_end|>\n"),
        multi_prompt=("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                      "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                      "<|im_start|>assistant\n"),
        answers=["Hello!<|im_end|>\n", "4<|im_end|>\n"], stop=["<|im_end|>"]),
    "qwen3": dict(
        specials=["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"], bos=None, eos="<|im_end|>",
        single=f"<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n{NO_THOUGHT}Hello!<|im_end|>\n",
        single_prompt="<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        multi=("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
               f"<|im_start|>assistant\n{NO_THOUGHT}Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
               f"<|im_start|>assistant\n{NO_THOUGHT}4<|im_end|>\n"),
        multi_prompt=("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                      f"<|im_start|>assistant\n{NO_THOUGHT}Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                      "<|im_start|>assistant\n"),
        answers=[f"{NO_THOUGHT}Hello!<|im_end|>\n", f"{NO_THOUGHT}4<|im_end|>\n"], stop=["<|im_end|>"]),
    "qwen3_nothink": dict(
        specials=["<|im_start|>", "<|im_end|>", "<|endoftext|>"], bos=None, eos="<|im_end|>",
        single="<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n",
        single_prompt="<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        multi=("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
               "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
               "<|im_start|>assistant\n4<|im_end|>\n"),
        multi_prompt=("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                      "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                      "<|im_start|>assistant\n"),
        answers=["Hello!<|im_end|>\n", "4<|im_end|>\n"], stop=["<|im_end|>"]),
    "llama3": dict(
        specials=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        bos="<|begin_of_text|>", eos="<|eot_id|>",
        single=("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"),
        single_prompt=("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                       "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        multi=("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"),
        multi_prompt=("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                      "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
                      "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        answers=["Hello!<|eot_id|>", "4<|eot_id|>"], stop=["<|eot_id|>"]),
    "llama2": dict(
        specials=["<s>", "</s>"], bos="<s>", eos="</s>",
        single="<s>[INST] Hi [/INST] Hello! </s>",
        single_prompt="<s>[INST] Hi [/INST]",
        multi="<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] 2+2? [/INST] 4 </s>",
        multi_prompt="<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] 2+2? [/INST]",
        answers=[" Hello! </s>", " 4 </s>"], stop=["</s>"]),
    "mistral": dict(
        specials=["<s>", "</s>"], bos="<s>", eos="</s>",
        single="<s>[INST] Hi [/INST]Hello!</s>",
        single_prompt="<s>[INST] Hi [/INST]",
        multi="<s>[INST] Be brief.\n\nHi [/INST]Hello!</s>[INST] 2+2? [/INST]4</s>",
        multi_prompt="<s>[INST] Be brief.\n\nHi [/INST]Hello!</s>[INST] 2+2? [/INST]",
        answers=["Hello!</s>", "4</s>"], stop=["</s>"]),
    "gemma": dict(
        specials=["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], bos="<bos>", eos="<eos>",
        single="<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n",
        single_prompt="<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
        multi=("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
               "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"),
        multi_prompt=("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
                      "Hello!<end_of_turn>\n<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n"),
        answers=["Hello!<end_of_turn>\n", "4<end_of_turn>\n"], stop=["<end_of_turn>"]),
    "gemma3": dict(
        specials=["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], bos="<bos>", eos="<eos>",
        single="<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n",
        single_prompt="<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
        multi=("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
               "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"),
        multi_prompt=("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
                      "Hello!<end_of_turn>\n<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n"),
        answers=["Hello!<end_of_turn>\n", "4<end_of_turn>\n"], stop=["<end_of_turn>"]),
    "glm4": dict(
        specials=["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<|endoftext|>"],
        bos=None, eos="<|endoftext|>",
        single="[gMASK]<sop><|user|>\nHi<|assistant|>\nHello!",
        single_prompt="[gMASK]<sop><|user|>\nHi<|assistant|>",
        multi="[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\nHello!<|user|>\n2+2?<|assistant|>\n4",
        multi_prompt="[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\nHello!<|user|>\n2+2?<|assistant|>",
        # No end-of-turn marker of its own: the next role tag, or eos after the last answer, closes it.
        answers=["\nHello!<|user|>", "\n4<|endoftext|>"], stop=["<|user|>", "<|observation|>"]),
    "deepseek3": dict(
        specials=["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
        bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>",
        single="<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜>",
        single_prompt="<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>",
        multi=("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜>"
               "<｜User｜>2+2?<｜Assistant｜>4<｜end▁of▁sentence｜>"),
        multi_prompt=("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜>"
                      "<｜User｜>2+2?<｜Assistant｜>"),
        answers=["Hello!<｜end▁of▁sentence｜>", "4<｜end▁of▁sentence｜>"], stop=["<｜end▁of▁sentence｜>"]),
    "phi4": dict(
        specials=["<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|endoftext|>"], bos=None, eos="<|im_end|>",
        single="<|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>Hello!<|im_end|>",
        single_prompt="<|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>",
        multi=("<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>Hi<|im_end|>"
               "<|im_start|>assistant<|im_sep|>Hello!<|im_end|><|im_start|>user<|im_sep|>2+2?<|im_end|>"
               "<|im_start|>assistant<|im_sep|>4<|im_end|>"),
        multi_prompt=("<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>Hi<|im_end|>"
                      "<|im_start|>assistant<|im_sep|>Hello!<|im_end|><|im_start|>user<|im_sep|>2+2?<|im_end|>"
                      "<|im_start|>assistant<|im_sep|>"),
        answers=["Hello!<|im_end|>", "4<|im_end|>"], stop=["<|im_end|>"]),
    "phi3": dict(
        specials=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"], bos=None, eos="<|endoftext|>",
        single="<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n",
        single_prompt="<|user|>\nHi<|end|>\n<|assistant|>\n",
        multi=("<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
               "<|user|>\n2+2?<|end|>\n<|assistant|>\n4<|end|>\n"),
        multi_prompt=("<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
                      "<|user|>\n2+2?<|end|>\n<|assistant|>\n"),
        answers=["Hello!<|end|>\n", "4<|end|>\n"], stop=["<|end|>"]),
    "alpaca": dict(
        specials=["<s>", "</s>"], bos="<s>", eos="</s>",
        single=f"{ALPACA_SYSTEM}### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n",
        single_prompt=f"{ALPACA_SYSTEM}### Instruction:\nHi\n\n### Response:\n",
        multi=("Be brief.### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n"
               "### Instruction:\n2+2?\n\n### Response:\n4</s>\n\n"),
        multi_prompt=("Be brief.### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n"
                      "### Instruction:\n2+2?\n\n### Response:\n"),
        answers=["Hello!</s>\n\n", "4</s>\n\n"], stop=["</s>"]),
    "vicuna": dict(
        specials=["<s>", "</s>"], bos="<s>", eos="</s>",
        single=f"{VICUNA_SYSTEM}USER: Hi ASSISTANT: Hello!</s>",
        single_prompt=f"{VICUNA_SYSTEM}USER: Hi ASSISTANT:",
        multi="Be brief. USER: Hi ASSISTANT: Hello!</s>USER: 2+2? ASSISTANT: 4</s>",
        multi_prompt="Be brief. USER: Hi ASSISTANT: Hello!</s>USER: 2+2? ASSISTANT:",
        answers=[" Hello!</s>", " 4</s>"], stop=["</s>"]),
    "default": dict(
        specials=["<s>", "</s>"], bos="<s>", eos="</s>",
        single="Human: Hi</s>\nAssistant:Hello!</s>\n",
        single_prompt="Human: Hi</s>\nAssistant:",
        multi="System: Be brief.</s>\nHuman: Hi</s>\nAssistant:Hello!</s>\nHuman: 2+2?</s>\nAssistant:4</s>\n",
        multi_prompt="System: Be brief.</s>\nHuman: Hi</s>\nAssistant:Hello!</s>\nHuman: 2+2?</s>\nAssistant:",
        answers=["Hello!</s>\n", "4</s>\n"], stop=["</s>"]),
    "empty": dict(
        specials=["<s>", "</s>"], bos="<s>", eos="</s>",
        single="HiHello!", single_prompt="Hi",
        multi="Be brief.HiHello!2+2?4", multi_prompt="Be brief.HiHello!2+2?",
        answers=["Hello!", "4"], stop=[]),
}


def family_tokenizer(base, name: str):
    """The default model's tokenizer with the family's special tokens, bos/eos and named template."""
    spec = GOLDEN[name]
    tok = copy.deepcopy(base)
    tok.add_tokens(spec["specials"], special_tokens=True)
    if spec["bos"]:
        tok.bos_token = spec["bos"]
    tok.eos_token = spec["eos"]
    assert apply_template(tok, name) == name
    return tok


@pytest.fixture(scope="module")
def family(tokenizer):
    """family(name): a shared family tokenizer (tests that change one take family_tokenizer())."""
    made: dict[str, object] = {}

    def get(name: str):
        if name not in made:
            made[name] = family_tokenizer(tokenizer, name)
        return made[name]

    return get


def template_ids(tok, messages, **kwargs) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_every_named_template_has_a_golden():
    assert set(GOLDEN) == set(TEMPLATES)
    assert {"chatml", "qwen", "qwen3", "qwen3_nothink", "deepseek3", "gemma3", "phi4", "llama3", "llama2", "mistral",
            "gemma", "glm4", "phi3", "alpaca", "vicuna", "default", "empty"} <= set(template_names())


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_named_template_matches_official_format(family, name):
    spec = GOLDEN[name]
    tok = family(name)
    cases = [(SINGLE, False, spec["single"]), (SINGLE[:1], True, spec["single_prompt"]),
             (WITH_SYSTEM, False, spec["multi"]), (WITH_SYSTEM[:-1], True, spec["multi_prompt"])]
    for messages, gen, expected in cases:
        text = render(messages, tok, add_generation_prompt=gen)
        assert text == expected, (name, messages, gen)
        ids = tok(text, add_special_tokens=False).input_ids
        assert ids == template_ids(tok, messages, add_generation_prompt=gen)
    # The family's markers are single tokens in the text that training sees.
    multi_ids = tok(spec["multi"], add_special_tokens=False).input_ids
    for special in spec["specials"]:
        if special in spec["multi"]:
            assert tok.convert_tokens_to_ids(special) in multi_ids, special


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_named_template_spans_are_each_answer_and_its_end_marker(family, name):
    spec = GOLDEN[name]
    tok = family(name)
    conv = Conversation(WITH_SYSTEM)
    text, spans = render_with_spans(conv, tok)
    assert [text[a:b] for a, b in spans] == spec["answers"]
    assert text.startswith(spec["multi"])
    # prefix-stable: every prompt is a prefix of the conversation that answers it
    for i in (2, 4):
        assert render(WITH_SYSTEM[: i + 1], tok).startswith(render(WITH_SYSTEM[:i], tok, add_generation_prompt=True))
    assert spans[0][0] == len(render(WITH_SYSTEM[:2], tok, add_generation_prompt=True))
    _, last_only = render_with_spans(conv, tok, mask_history=True)
    assert last_only == spans[-1:]
    full_text, everything = render_with_spans(conv, tok, train_on_prompt=True)
    assert full_text == text and everything == [(0, len(text))]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_named_template_stop_strings(family, name):
    tok = family(name)
    expected = GOLDEN[name]["stop"]
    assert stop_strings(tok, name) == expected
    assert stop_strings(tok, None) == expected  # the tokenizer carries the named template


@pytest.mark.parametrize("name", ["llama2", "mistral", "gemma"])
def test_templates_that_require_alternating_roles_refuse_others(family, name):
    tok = family(name)
    conv = Conversation([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], source=("demo", 3))
    with pytest.raises(UserError, match=r"demo row 3: .*alternate"):
        render(conv, tok)
    with pytest.raises(UserError, match="alternate"):
        render([{"role": "assistant", "content": "first"}], tok)


def test_named_template_content_is_trimmed_where_the_official_one_trims(family):
    messages = [{"role": "user", "content": "  Hi \n"}, {"role": "assistant", "content": " Hello! "}]
    assert render(messages, family("llama3")) == GOLDEN["llama3"]["single"]
    assert render(messages, family("gemma")) == GOLDEN["gemma"]["single"]
    assert render(messages, family("llama2")) == GOLDEN["llama2"]["single"]


# --- the default model's own template ---------------------------------------------------------

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_default_model_template_unset_renders_like_apply_chat_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    assert apply_template(tok, None) == "auto"
    assert apply_template(tok, "auto") == "auto"
    for messages in (SINGLE, WITH_SYSTEM, CHAT):
        for gen in (False, True):
            text = render(messages, tok, add_generation_prompt=gen)
            assert text == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert tok(text, add_special_tokens=False).input_ids == template_ids(
                tok, messages, add_generation_prompt=gen)
    assert render(SINGLE, tok) == (f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                   "<|im_start|>assistant\nHello!<|im_end|>\n")
    text, spans = render_with_spans(Conversation(CHAT), tok)
    assert [text[a:b] for a, b in spans] == ["Hello!<|im_end|>\n", "4<|im_end|>\n"]
    assert stop_strings(tok, None) == ["<|im_end|>"]
    assert stop_strings(tok, "auto") == ["<|im_end|>"]


def test_tokenizer_without_template_needs_a_named_one(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(UserError, match="no chat template.*chatml"):
        apply_template(tok, None)


def test_unknown_template_name_lists_known_ones_with_did_you_mean(tokenizer):
    tok = copy.deepcopy(tokenizer)
    with pytest.raises(UserError) as err:
        apply_template(tok, "lama3")
    message = str(err.value)
    assert "unknown template 'lama3'" in message
    assert "did you mean 'llama3'?" in message
    for name in TEMPLATES:
        assert name in message
    assert tok.chat_template == tokenizer.chat_template  # left untouched


# --- a template that closes the whole text with eos -------------------------------------------

# Phi-3.5's official shape: an eos after the last turn unless a generation prompt follows.
PHI35_LIKE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def test_template_closing_text_with_eos_still_spans_each_turn_exactly(tokenizer):
    tok = family_tokenizer(tokenizer, "phi3")
    tok.chat_template = PHI35_LIKE
    text, spans = render_with_spans(Conversation(CHAT), tok)
    assert text.endswith("4<|end|>\n<|endoftext|>")
    # The middle turn ends after '<|end|>\n', not inside the next '<|user|>' (which shares '<|').
    assert [text[a:b] for a, b in spans] == ["Hello!<|end|>\n", "4<|end|>\n<|endoftext|>"]
    assert stop_strings(tok, None) == ["<|end|>"]


# --- tool use ---------------------------------------------------------------------------------

RECIPE_TOOLS = [{
    "name": "search_recipes",
    "description": "Search for recipes based on ingredients",
    "parameters": {"type": "object",
                   "properties": {"ingredients": {"type": "array", "items": {"type": "string"},
                                                  "description": "The ingredients to search for"}},
                   "required": ["ingredients"]},
}]
CALL_ARGS = {"ingredients": ["chicken", "bell peppers", "rice"]}
TOOL_RESULT = '{"recipes": [{"name": "Chicken and Bell Pepper Stir Fry"}]}'
TOOL_CHAT = [
    {"role": "user", "content": "I have chicken, bell peppers, and rice."},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "search_recipes", "arguments": json.dumps(CALL_ARGS)}}]},
    {"role": "tool", "content": TOOL_RESULT},
    {"role": "assistant", "content": "Try the stir fry."},
]
CALL_JSON = '{"name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]}}'


def _inside(spans, start, end) -> bool:
    return any(a <= start and end <= b for a, b in spans)


def _overlaps(spans, start, end) -> bool:
    return any(a < end and start < b for a, b in spans)


def test_tool_conversation_with_default_model_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    assert tool_support(tok).tools is False and tool_support(tok).tool_calls is False
    assert tool_support(tok).tool_role is True  # its ChatML prints any role
    text, spans = render_with_spans(Conversation(TOOL_CHAT, RECIPE_TOOLS, ("glaive", 0)), tok)
    # the tools are shown in a new system message, in place of the default one
    assert text.startswith("<|im_start|>system\nYou can call the following tools")
    assert json.dumps(RECIPE_TOOLS[0]) in text.split("<|im_end|>")[0]
    assert SMOL_SYSTEM not in text
    # the call is the answer's text, trained with its end marker
    call_at = text.index(CALL_JSON)
    assert _inside(spans, call_at, call_at + len(CALL_JSON))
    assert [text[a:b] for a, b in spans] == [CALL_JSON + "<|im_end|>\n", "Try the stir fry.<|im_end|>\n"]
    # the result is a tool turn, never trained
    result_at = text.index("<|im_start|>tool\n" + TOOL_RESULT + "<|im_end|>")
    assert not _overlaps(spans, result_at, result_at + len(TOOL_RESULT) + 30)
    # inference sees the same text up to the answer
    prompt = render(Conversation(TOOL_CHAT[:3], RECIPE_TOOLS), tok, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_sharegpt_tool_call_row_renders_with_default_model_template(tokenizer, repo_data):
    row = json.loads((repo_data / "toolcall_sharegpt.json").read_text(encoding="utf-8"))[0]
    roles = {"human": "user", "gpt": "assistant", "observation": "tool"}
    messages = []
    for turn in row["conversations"]:
        if turn["from"] == "function_call":
            call = json.loads(turn["value"])
            messages.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]})
        else:
            messages.append({"role": roles[turn["from"]], "content": turn["value"]})
    text, spans = render_with_spans(Conversation(messages, row["tools"]), tokenizer)  # tools as the JSON string
    trained = [text[a:b] for a, b in spans]
    assert sum(1 for m in messages if m["role"] == "assistant") == len(spans)
    assert any(t.startswith('{"name": "get_weather", "arguments": {"city": "Lisbon"}') for t in trained)
    observation = next(t["value"] for t in row["conversations"] if t["from"] == "observation")
    at = text.index(observation)
    assert not _overlaps(spans, at, at + len(observation))
    assert tokenizer(text, add_special_tokens=False).input_ids  # tokenizes as one text


def test_qwen_renders_tools_natively(family):
    tok = family("qwen")
    support = tool_support(tok)
    assert support.tools and support.tool_calls and support.tool_role
    text, spans = render_with_spans(Conversation(TOOL_CHAT, RECIPE_TOOLS), tok)
    expected = (
        f"<|im_start|>system\n{QWEN_SYSTEM}\n\n# Tools\n\nYou may call one or more functions to assist with the "
        "user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(RECIPE_TOOLS[0]) +
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\nI have chicken, bell peppers, and rice.<|im_end|>\n"
        f"<|im_start|>assistant\n<tool_call>\n{CALL_JSON}\n</tool_call><|im_end|>\n"
        f"<|im_start|>user\n<tool_response>\n{TOOL_RESULT}\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nTry the stir fry.<|im_end|>\n"
    )
    assert text == expected  # arguments given as a JSON string are not quoted twice
    assert [text[a:b] for a, b in spans] == [f"<tool_call>\n{CALL_JSON}\n</tool_call><|im_end|>\n",
                                             "Try the stir fry.<|im_end|>\n"]


@pytest.mark.parametrize("name,thought", [("qwen3_nothink", ""), ("qwen3", NO_THOUGHT)])
def test_qwen3_puts_system_before_tools_and_has_no_default_system(family, name, thought):
    tok = family(name)
    with_system = [{"role": "system", "content": SYSTEM}, *TOOL_CHAT]
    text = render(Conversation(with_system, RECIPE_TOOLS), tok)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\n")
    assert f"<|im_start|>assistant\n{thought}<tool_call>\n{CALL_JSON}\n</tool_call><|im_end|>\n" in text
    assert "Qwen, created by Alibaba" not in text


def test_glm4_tool_calls_and_observations(family):
    tok = family("glm4")
    text, spans = render_with_spans(Conversation(TOOL_CHAT, RECIPE_TOOLS), tok)
    assert text.startswith("[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。")
    assert "\n\n## search_recipes\n\n{\n    \"name\": \"search_recipes\"," in text
    assert text.endswith(
        "<|user|>\nI have chicken, bell peppers, and rice."
        f"<|assistant|>search_recipes\n{json.dumps(CALL_ARGS)}<|observation|>\n{TOOL_RESULT}"
        "<|assistant|>\nTry the stir fry.<|endoftext|>")
    assert [text[a:b] for a, b in spans] == [f"search_recipes\n{json.dumps(CALL_ARGS)}<|observation|>",
                                             "\nTry the stir fry.<|endoftext|>"]


def test_tool_results_become_user_turns_where_the_template_has_no_tool_role(family):
    tok = family("llama2")
    assert tool_support(tok).tool_role is False  # llama2 refuses a 'tool' role
    second = {"type": "function", "function": {"name": "get_time", "arguments": {}}}
    messages = [TOOL_CHAT[0], {**TOOL_CHAT[1], "tool_calls": [*TOOL_CHAT[1]["tool_calls"], second]},
                TOOL_CHAT[2], {"role": "tool", "name": "get_time", "content": "12:00"}, TOOL_CHAT[3]]
    text, spans = render_with_spans(Conversation(messages, RECIPE_TOOLS), tok)
    assert text.endswith(
        f"[/INST] {CALL_JSON}\n{{\"name\": \"get_time\", \"arguments\": {{}}}} </s>"
        f"<s>[INST] Tool result:\n{TOOL_RESULT}\n\nTool result (get_time):\n12:00 [/INST] Try the stir fry. </s>")
    assert text.startswith("<s>[INST] <<SYS>>\nYou can call the following tools")
    assert [text[a:b] for a, b in spans][1] == " Try the stir fry. </s>"


def test_tools_are_appended_to_an_existing_system_prompt(tokenizer):
    messages = [{"role": "system", "content": SYSTEM}, *TOOL_CHAT]
    text = render(Conversation(messages, RECIPE_TOOLS), tokenizer)
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou can call the following tools")
    assert text.count("<|im_start|>system") == 1


def test_assistant_text_and_call_together(tokenizer):
    messages = [TOOL_CHAT[0], {**TOOL_CHAT[1], "content": "Let me look."}]
    text = render(messages, tokenizer)
    assert text.endswith(f"<|im_start|>assistant\nLet me look.\n{CALL_JSON}<|im_end|>\n")


def test_bad_tools_value_is_a_user_error(tokenizer):
    with pytest.raises(UserError, match=r"set row 7: the tools value is not valid JSON"):
        render(Conversation(TOOL_CHAT, "[{not json", ("set", 7)), tokenizer)
    with pytest.raises(UserError, match="list of JSON function schemas"):
        render(Conversation(TOOL_CHAT, [1, 2]), tokenizer)


def test_plain_conversations_are_not_touched_by_tool_handling(tokenizer):
    text = render(Conversation(CHAT, tools=None), tokenizer)
    assert text == tokenizer.apply_chat_template(CHAT, tokenize=False)


@pytest.mark.parametrize("name", ["auto", *sorted(GOLDEN)])
def test_plain_messages_render_directly_and_like_apply_chat_template(family, tokenizer, repo_data, name):
    """Plain role/content messages skip apply_chat_template's per-call conversions (the compiled
    template renders them directly): the text must be the library's, on the repository's chats."""
    from tunesmith.data.formats import load_conversations
    from tunesmith.template import _plain_renderer

    tok = copy.deepcopy(tokenizer) if name == "auto" else family(name)
    convs = load_conversations("chat_sharegpt,identity", repo_data)
    assert _plain_renderer(tok, convs[0].messages) is not None
    for conv in convs[::7]:
        for cut, gen in ((len(conv.messages), False), (len(conv.messages) - 1, True)):
            messages = conv.messages[:cut]
            try:
                want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            except Exception:  # templates that refuse a role order refuse it on both paths
                with pytest.raises(UserError):
                    render(messages, tok, add_generation_prompt=gen)
                continue
            assert render(messages, tok, add_generation_prompt=gen) == want, (name, messages, gen)
    weighted = [{**convs[0].messages[0], "loss_weight": 0.5}]  # another key: the library's own path
    assert _plain_renderer(tok, weighted) is None


def test_direct_render_keeps_the_library_text_for_subclasses_and_refusing_templates(tokenizer):
    """The library turns str and dict subclasses into plain ones before rendering, so they take its
    path; a template that refuses one probe (no system turn) still renders plain chats directly."""
    from collections import OrderedDict

    from tunesmith.template import _plain_renderer

    class Shouting(str):
        def __str__(self) -> str:
            return self.upper()

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}[{{ m }}|{{ m.content }}]{% endfor %}"
    for messages in ([{"role": "user", "content": Shouting("hi")}], [OrderedDict(role="user", content="hi")]):
        assert _plain_renderer(tok, messages) is None
        assert render(messages, tok) == tok.apply_chat_template(messages, tokenize=False)
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}"
                         "{% endif %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert _plain_renderer(tok, plain) is not None
    assert render(plain, tok) == "<user>Hi<assistant>Hello"
    with pytest.raises(UserError, match="no system role"):
        render([{"role": "system", "content": "x"}, *plain], tok)
