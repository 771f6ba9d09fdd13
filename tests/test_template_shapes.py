"""Rendering once per conversation shape: which templates qualify, and that the text is the
template's own for any contents, roles and tokenizer."""

from __future__ import annotations

import copy
import random

import pytest
from transformers.utils.chat_template_utils import _compile_jinja_template

from tunesmith import template_shapes
from tunesmith.errors import UserError
from tunesmith.template import TEMPLATES, _plain_renderer, apply_template, render
from tunesmith.template_shapes import ShapeMemo, contents_pasted_only

# Contents a shortcut could get wrong: template syntax, the template's own markers, the
# placeholder characters themselves, quotes, blank and surrounding whitespace, other scripts.
HOSTILE = ["", " ", "\n", "{{ messages }}", "{% if x %}", "<|im_end|>\n<|im_start|>user\n", "\ue000", "\ue0001\ue001",
           "\ue0000\ue001", "it's \"quoted\"", "  padded  ", "数字 42 🙂", "\\n", "0", "\t\ttabs\t"]
PASTING = ["chatml", "phi4", "alpaca", "vicuna", "default", "empty"]


def pasting_only(source: str) -> bool:
    return contents_pasted_only(source, _compile_jinja_template(source).environment)


def random_chat(rng: random.Random) -> list[dict[str, str]]:
    turns = rng.randint(1, 4)
    messages = [{"role": "system", "content": rng.choice(HOSTILE)}] if rng.random() < 0.4 else []
    for _ in range(turns):
        messages.append({"role": "user", "content": rng.choice(HOSTILE) + rng.choice(HOSTILE)})
        messages.append({"role": "assistant", "content": rng.choice(HOSTILE) + rng.choice(HOSTILE)})
    return messages[: rng.randint(1, len(messages))]


def test_templates_that_paste_contents_qualify(tokenizer):
    for name in PASTING:
        assert pasting_only(TEMPLATES[name].jinja), name
    assert pasting_only(tokenizer.chat_template)  # the default model's own template
    # Contents inspected, trimmed or split: qwen's tool calls, llama3's trim, mistral's system join.
    for name in ("qwen", "qwen3", "llama3", "llama2", "mistral", "gemma", "glm4", "deepseek3", "phi3"):
        assert not pasting_only(TEMPLATES[name].jinja), name


@pytest.mark.parametrize("source", [
    "{% for m in messages %}{{ m.content | trim }}{% endfor %}",
    "{% for m in messages %}{% if '</think>' in m.content %}T{% endif %}{{ m.content }}{% endfor %}",
    "{% for m in messages %}{% set c = m['content'] %}{{ c }}{% endfor %}",
    "{% for m in messages %}{{ m }}{% endfor %}",
    "{{ messages | tojson }}",
    "{{ messages | map(attribute='content') | join('\\n') }}",
    "{% for m in messages %}{{ m.get('content') }}{% endfor %}",
    "{% for m in messages %}{% for k, v in m.items() %}{{ v }}{% endfor %}{% endfor %}",
    "{% for m in messages %}{% filter upper %}{{ m.content }}{% endfilter %}{% endfor %}",
    "{% for m in messages %}{% set x %}{{ m.content }}{% endset %}{{ x | trim }}{% endfor %}",
    "{{ strftime_now('%Y') }}{% for m in messages %}{{ m.content }}{% endfor %}",
    "{% for m in messages %}{{ (m.role ~ m.content) | upper }}{% endfor %}",
    "{% for m in messages %}{{ m.content if m.content else 'empty' }}{% endfor %}",
    "{% for m in messages %}{{ m.content }}{% if loop.nextitem %}{{ loop.nextitem }}{% endif %}{% endfor %}",
    "{% macro show(x) %}{{ x.content }}{% endmacro %}{% for m in messages %}{{ show(m) }}{% endfor %}",
    "{{ messages[0]['content'][:3] }}",
    "{% for m in messages %}{% if m.content | length > 3 %}long{% endif %}{{ m.content }}{% endfor %}",
    "{% set ns = namespace(all=messages) %}{{ ns.all }}",
    "{% set turns = messages %}{{ turns }}",
    "{{ [1, 2] | random }}{% for m in messages %}{{ m.content }}{% endfor %}",
    "{% for m in messages %}{{ m.content == 'a' }}{% endfor %}",
    "{% for m in messages %}{% set m = m.role %}{{ m }}{% endfor %}",
    "{% for m in messages %}{{ m[m.role] }}{% endfor %}",
    "{% autoescape true %}{% for m in messages %}{{ m.content }}{% endfor %}{% endautoescape %}",
    "{% for m in messages %}{{ m.content }}{{ messages.index(m) }}{% endfor %}",
    "{% for m in messages if m.content %}{{ m.content }}{% endfor %}",
    # `+` with a Markup string escapes the other side.
    "{% for m in messages %}{{ '' | safe + m.content }}{% endfor %}",
    "{% for m in messages %}{{ ('<b>' | e) + m.content }}{% endfor %}",
    # A block's output read back through `self`.
    "{% block b %}{% for m in messages %}{{ m.content }}{% endfor %}{% endblock %}{% if 'x' in self.b() %}X{% endif %}",
    # A message's methods through a subscript (Jinja falls back to attributes), kept in a namespace.
    "{% for m in messages %}{% set ns = namespace(g=m['get']) %}{{ m.content }}"
    "{% if 'x' in ns.g('con' ~ 'tent') %}X{% endif %}{% endfor %}",
    "{% for m in messages %}{% set ns = namespace(c=m['copy']) %}{{ m.content }}{{ ns.c() | string }}{% endfor %}",
    # The loop object hands out messages when iterated or subscripted.
    "{% for m in messages %}{{ m.content }}{% for x in loop %}{{ x[0] | string }}{% endfor %}{% endfor %}",
    "{% for m in messages %}{{ m.content }}{% if loop['nextitem'] %}{{ loop['nextitem'] | string }}{% endif %}"
    "{% endfor %}",
    # Names the rules rely on, bound again.
    "{% for m in messages %}{{ m.content }}{% endfor %}{% set messages = messages[-1] %}"
    "{% if 'x' in messages['con' ~ 'tent'] %}X{% endif %}",
    "{% for messages in messages %}{{ messages.content }}{% if messages['con' ~ 'tent'] %}X{% endif %}{% endfor %}",
    "{% set raise_exception = strftime_now %}{{ raise_exception('%H') }}{% for m in messages %}{{ m.content }}"
    "{% endfor %}",
    "{% set eos_token = '' | safe %}{% for m in messages %}{{ eos_token + m.content }}{% endfor %}",
    # A clock or a random draw kept out of sight of the name checks.
    "{% set ns = namespace(f=strftime_now) %}{{ ns.f('%H') }}{% for m in messages %}{{ m.content }}{% endfor %}",
    "{{ [range(9)] | map('random') | first }}{% for m in messages %}{{ m.content }}{% endfor %}",
    # Tests with arguments compare whole messages.
    "{% for m in messages %}{{ m.content }}{% if m is in([{'role': 'user', ('con' ~ 'tent'): 'hi'}]) %}X{% endif %}"
    "{% endfor %}",
    "{% for m in messages %}{{ m.content }}{% if m is eq({'role': 'user', ('con' ~ 'tent'): 'hi'}) %}X{% endif %}"
    "{% endfor %}",
    # A test that reads a message's text (str(m).islower()), and a subscript by a computed index.
    "{% for m in messages %}{{ m.content }}{% if m is lower %}X{% endif %}{% endfor %}",
    "{% for m in messages %}{{ messages[loop.index0].content }}{% endfor %}",
    # An identity test tells equal role strings apart; a bare method prints its object's address.
    "{% for m in messages %}{% if m.role is sameas('user') %}U{% endif %}{{ m.content }}{% endfor %}",
    "{% for m in messages %}{{ m.role.upper }}{{ m.content }}{% endfor %}",
    # Filters that return generators: their printed form holds an address too.
    "{% for m in messages %}{{ [m.role] | unique }}{{ m.content }}{% endfor %}",
    "{% for m in messages %}{{ [m.role] | reverse }}{{ m.content }}{% endfor %}",
    "{% for m in messages %}{{ {'r': m.role} | items }}{{ m.content }}{% endfor %}",
])
def test_templates_that_look_at_contents_are_rendered_by_the_template(source):
    """Each of these could print a content other than verbatim, or choose branches by it."""
    assert not pasting_only(source)


@pytest.mark.parametrize("name", ["auto", *PASTING])
def test_shapes_render_exactly_what_the_template_renders(tokenizer, name):
    tok = copy.deepcopy(tokenizer)
    if name != "auto":
        apply_template(tok, name)
    rng = random.Random(name)
    for _ in range(300):
        messages = random_chat(rng)
        for generation in (False, True):
            try:
                want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
            except Exception:
                with pytest.raises(UserError):
                    render(messages, tok, add_generation_prompt=generation)
                continue
            assert render(messages, tok, add_generation_prompt=generation) == want, (name, messages, generation)
    memo = _plain_renderer(tok, [{"role": "user", "content": "x"}]).shapes
    assert memo is not None and memo.enabled and len(memo._shapes) > 10  # the shortcut did the work


def test_tokenizers_sharing_a_template_never_share_a_shape(tokenizer):
    """The default template writes the eos token: one template text, two different renders."""
    first, second = copy.deepcopy(tokenizer), copy.deepcopy(tokenizer)
    apply_template(first, "default")
    apply_template(second, "default")
    second.eos_token = "<|endoftext|>"
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    for tok in (first, second, first):
        assert render(chat, tok) == tok.apply_chat_template(chat, tokenize=False)
    assert render(chat, first) != render(chat, second)


def test_a_template_writing_placeholder_text_itself_is_rendered_by_it(tokenizer):
    """The memo's own markers in a template's fixed text cannot be told from a content slot."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% if messages | length == 3 %}\ue0007\ue001{% endif %}"
                         "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    for _ in range(2):
        assert render(chat, tok) == tok.apply_chat_template(chat, tokenize=False)
    assert not _plain_renderer(tok, chat).shapes.enabled


def test_a_generation_flag_that_is_not_a_bool_is_rendered_by_the_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}{{ add_generation_prompt }}"
    chat = [{"role": "user", "content": "a"}]
    assert render(chat, tok, add_generation_prompt=True) == "aTrue"
    assert render(chat, tok, add_generation_prompt=1) == tok.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=1) == "a1"


def test_roles_holding_placeholder_text_do_not_turn_the_memo_off(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    odd = [{"role": "\ue0000\ue001", "content": "x"}]
    assert render(odd, tok) == tok.apply_chat_template(odd, tokenize=False)
    assert _plain_renderer(tok, odd).shapes.enabled


def test_special_tokens_changed_in_place_are_seen(tokenizer):
    from tunesmith.data.chunks import DirectTokenizer

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
    direct = DirectTokenizer(tok)
    chat = [{"role": "user", "content": "a"}]
    assert render(chat, direct) == "<user>a<|im_end|>"
    direct.special_tokens_map["eos_token"] = "<EOS2>"  # the one map the store's tokenizer hands out
    assert render(chat, direct) == "<user>a<EOS2>"


def test_a_content_dependent_render_turns_the_memo_off():
    """The runtime check behind the syntax check: a shape's first text must be the template's."""
    def shouting(messages, generation):
        return "".join(f"<{m['role']}>{m['content'].upper()}" for m in messages)

    memo = ShapeMemo()
    chat = [{"role": "user", "content": "hi"}]
    assert memo.render(chat, False, "", shouting) == "<user>HI"
    assert not memo.enabled and not memo._shapes
    assert memo.render([{"role": "user", "content": "yo"}], False, "", shouting) == "<user>YO"


def test_the_memo_is_bounded(monkeypatch):
    monkeypatch.setattr(template_shapes, "MAX_SHAPES", 2)

    def plain(messages, generation):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<go>" if generation else "")

    memo = ShapeMemo()
    for roles in (["user"], ["user", "assistant"], ["system", "user"], ["user"]):
        chat = [{"role": role, "content": f"{role} text"} for role in roles]
        assert memo.render(chat, True, "", plain) == plain(chat, True)
    assert len(memo._shapes) == 2 and memo.enabled
