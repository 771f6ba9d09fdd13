"""Chat templates and the one renderer used by training and inference (DESIGN §2.1).

Every template is Jinja: the tokenizer's own by default, or a named one from TEMPLATES for
models without one. The trained character spans of a conversation are found by rendering
it turn by turn, so no second hand-written formatter exists to drift from inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunesmith.errors import UserError, did_you_mean


@dataclass
class Conversation:
    """One training sample in OpenAI message form.

    messages: dicts with role system | user | assistant | tool, string content, and for
    assistant tool calls an OpenAI `tool_calls` list. source: (dataset name, row index).
    """

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    source: tuple[str, int] = ("", -1)


@dataclass(frozen=True)
class NamedTemplate:
    """A Jinja chat template for models that ship none, with its end-of-turn text."""

    jinja: str
    stop: tuple[str, ...] = ()  # end-of-turn strings generation stops at (besides eos)
    notes: str = ""


# Filled in by the template table below (one entry a family); see `tunesmith data templates`.
TEMPLATES: dict[str, NamedTemplate] = {}


def template_names() -> list[str]:
    return sorted(TEMPLATES)


def apply_template(tokenizer: Any, name: str | None) -> str:
    """Set tokenizer.chat_template to the template training will use, and return its name.

    None / 'auto' keeps the tokenizer's own; a tokenizer without one needs a named template.
    The template is stored on the tokenizer so every saved tokenizer carries it.
    """
    if name in (None, "", "auto"):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("this model's tokenizer has no chat template; set 'template' to one of: "
                            + ", ".join(template_names()))
        return "auto"
    if name not in TEMPLATES:
        raise UserError(f"unknown template '{name}'{did_you_mean(name, template_names())}; "
                        f"known templates: {', '.join(template_names())}.")
    tokenizer.chat_template = TEMPLATES[name].jinja
    return name


def render(conv: Conversation | list[dict[str, Any]], tokenizer: Any, *, add_generation_prompt: bool = False,
           tools: list[dict[str, Any]] | None = None) -> str:
    """The conversation as text, exactly as the tokenizer's chat template writes it."""
    messages = conv.messages if isinstance(conv, Conversation) else conv
    if isinstance(conv, Conversation) and tools is None:
        tools = conv.tools
    kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
    if tools:
        kwargs["tools"] = tools
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except Exception as exc:  # jinja raise_exception() and template errors
        where = f"{conv.source[0]} row {conv.source[1]}: " if isinstance(conv, Conversation) and conv.source[0] else ""
        raise UserError(f"{where}the chat template could not render this conversation: {exc}") from None


def render_with_spans(conv: Conversation, tokenizer: Any, *, train_on_prompt: bool = False,
                      mask_history: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and return (text, trained character spans).

    Each assistant turn i is trained from the end of `messages[:i]` rendered with a generation
    prompt to the end of `messages[:i+1]`: its content and its end-of-turn marker, so the model
    learns to stop. Tool results and prompts are not trained. The rendering of every prefix
    must be a prefix of the full text, which is true of ordinary chat templates; one that
    rewrites history (e.g. strips earlier reasoning) is reported rather than mis-masked.
    """
    text = render(conv, tokenizer)
    if train_on_prompt:
        return text, [(0, len(text))]
    messages = conv.messages
    assistant_turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if mask_history:
        assistant_turns = assistant_turns[-1:]
    spans: list[tuple[int, int]] = []
    for i in assistant_turns:
        start_text = render(messages[:i], tokenizer, add_generation_prompt=True, tools=conv.tools) if i else ""
        end_text = render(messages[: i + 1], tokenizer, tools=conv.tools)
        if not (text.startswith(end_text) and end_text.startswith(start_text)):
            # Templates that end the last turn differently (no trailing newline) still nest.
            end = len(end_text) if text.startswith(end_text) else _common_prefix(text, end_text)
            if not text.startswith(start_text) or end <= len(start_text):
                src = f"{conv.source[0]} row {conv.source[1]}: " if conv.source[0] else ""
                raise UserError(f"{src}the chat template renders earlier turns differently once later turns "
                                "are added, so the answer tokens cannot be located exactly.",
                                hint="use mask_history: true, or a named template (see `tunesmith data templates`).")
        else:
            end = len(end_text)
        spans.append((len(start_text), end))
    return text, spans


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def stop_strings(tokenizer: Any, name: str | None) -> list[str]:
    """End-of-turn strings for generation: the named template's, else the end of a rendered answer."""
    if name and name in TEMPLATES and TEMPLATES[name].stop:
        return list(TEMPLATES[name].stop)
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\x00"}]
    try:
        tail = render(probe, tokenizer).split("\x00", 1)[1]
    except (UserError, IndexError):
        return []
    tail = tail.strip()
    return [tail] if tail else []
