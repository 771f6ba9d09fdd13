"""Chat templates and the one renderer used by training and inference.

Every template is Jinja: the tokenizer's own by default, or a named one from TEMPLATES for
models without one. The trained character spans of a conversation are found by rendering
it turn by turn, so no second hand-written formatter exists to drift from inference.

Tool use goes through the same renderer: a template that knows tools gets OpenAI
`tool_calls`, `tool` messages and `tools` as they are; for one that does not, they are
rewritten into text it can print (see `normalize_tools`), identically in training and in chat.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunesmith.errors import UserError, did_you_mean

if TYPE_CHECKING:
    from tunesmith.template_shapes import ShapeMemo


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
    """A Jinja chat template for models that ship none, with its end-of-turn text.

    closed_by_next_turn: the format writes no end-of-turn marker after an answer (GLM-4); the
    next turn's role tag ends it, and after the last answer the eos token does, as the
    family's own fine-tuning does. Training includes that tag in the answer so the model stops.
    """

    jinja: str
    stop: tuple[str, ...] = ()  # end-of-turn strings generation stops at (besides eos)
    notes: str = ""
    closed_by_next_turn: bool = False


# --- The named templates -------------------------------------------------------------------
# Each renders plain chats exactly as the family's official chat template does, and every
# prefix rendered with a generation prompt is a prefix of the longer conversation.

_CHATML = r"""
{%- for message in messages -%}
  {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""

# Qwen tool prompt pieces, shared by qwen (2.5) and qwen3.
_QWEN_TOOLS_HEAD = (r"# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                    r"You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_QWEN_TOOLS_TAIL = (r"\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                    r"within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                    r"{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n")
_QWEN_TOOL_RESULT = r"""
  {%- elif message.role == 'tool' -%}
    {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
    {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' -}}
    {%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""

_QWEN = r"""
{%- if messages and messages[0].role == 'system' -%}
  {%- set system_text = messages[0].content -%}
{%- else -%}
  {%- set system_text = 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' -%}
{%- endif -%}
{%- if tools -%}
  {{- '<|im_start|>system\n' + system_text + '\n\n""" + _QWEN_TOOLS_HEAD + r"""' -}}
  {%- for tool in tools -%}{{- '\n' + tool | tojson -}}{%- endfor -%}
  {{- '""" + _QWEN_TOOLS_TAIL + r"""' -}}
{%- else -%}
  {{- '<|im_start|>system\n' + system_text + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
  {%- if message.role == 'user' or (message.role == 'system' and not loop.first)
        or (message.role == 'assistant' and not message.tool_calls) -%}
    {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}
  {%- elif message.role == 'assistant' -%}
    {{- '<|im_start|>assistant' -}}
    {%- if message.content -%}{{- '\n' + message.content -}}{%- endif -%}
    {%- for call in message.tool_calls -%}
      {%- set fn = call.function if call.function is defined else call -%}
      {{- '\n<tool_call>\n{"name": "' + fn.name + '", "arguments": ' + fn.arguments | tojson + '}\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\n' -}}
""" + _QWEN_TOOL_RESULT

_QWEN3_NOTHINK = r"""
{%- if tools -%}
  {{- '<|im_start|>system\n' -}}
  {%- if messages and messages[0].role == 'system' -%}{{- messages[0].content + '\n\n' -}}{%- endif -%}
  {{- '""" + _QWEN_TOOLS_HEAD + r"""' -}}
  {%- for tool in tools -%}{{- '\n' + tool | tojson -}}{%- endfor -%}
  {{- '""" + _QWEN_TOOLS_TAIL + r"""' -}}
{%- elif messages and messages[0].role == 'system' -%}
  {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
  {%- if message.role == 'user' or (message.role == 'system' and not loop.first) -%}
    {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}
  {%- elif message.role == 'assistant' -%}
    {{- '<|im_start|>assistant\n' + message.content -}}
    {%- for call in message.tool_calls or [] -%}
      {%- if not loop.first or message.content -%}{{- '\n' -}}{%- endif -%}
      {%- set fn = call.function if call.function is defined else call -%}
      {{- '<tool_call>\n{"name": "' + fn.name + '", "arguments": ' -}}
      {{- fn.arguments if fn.arguments is string else fn.arguments | tojson -}}
      {{- '}\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\n' -}}
""" + _QWEN_TOOL_RESULT

# Qwen3's hybrid thinking format. Every answer carries its <think> block (empty for an answer
# without reasoning), so each prompt is a prefix of the conversation that answers it. (The
# official template drops the blocks of answers before the last user turn, so a prompt would
# not be what training saw.) With enable_thinking false the empty block ends the prompt instead,
# as in the official template, and the answer is trained without reasoning.
_QWEN3_ASSISTANT = r"""
  {%- elif message.role == 'assistant' -%}
    {%- set content = message.content or '' -%}
    {%- set reasoning = '' -%}
    {%- if message.reasoning_content is string -%}
      {%- set reasoning = message.reasoning_content -%}
    {%- elif '</think>' in content -%}
      {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
      {%- set content = content.split('</think>')[-1].lstrip('\n') -%}
    {%- endif -%}
    {%- if enable_thinking is defined and enable_thinking is false -%}{%- set reasoning = '' -%}{%- endif -%}
    {{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') -}}
    {%- for call in message.tool_calls or [] -%}
      {%- if not loop.first or content -%}{{- '\n' -}}{%- endif -%}
      {%- set fn = call.function if call.function is defined else call -%}
      {{- '<tool_call>\n{"name": "' + fn.name + '", "arguments": ' -}}
      {{- fn.arguments if fn.arguments is string else fn.arguments | tojson -}}
      {{- '}\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\n' -}}
"""
_QWEN3 = _QWEN3_NOTHINK.split("  {%- elif message.role == 'assistant' -%}")[0] + _QWEN3_ASSISTANT + \
    _QWEN_TOOL_RESULT.replace(
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
        "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
        "{%- endif -%}{%- endif -%}")

_DEEPSEEK3 = r"""
{%- set ns = namespace(system='') -%}
{%- for message in messages if message['role'] == 'system' -%}
  {%- set ns.system = ns.system + ('\n\n' if not loop.first else '') + message['content'] -%}
{%- endfor -%}
{{- bos_token + ns.system -}}
{%- for message in messages -%}
  {%- if message['role'] == 'user' -%}
    {{- '<｜User｜>' + message['content'] -}}
  {%- elif message['role'] == 'assistant' -%}
    {{- '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<｜Assistant｜>' -}}{%- endif -%}
"""

_PHI4 = r"""
{%- for message in messages -%}
  {%- if message['role'] in ('system', 'user', 'assistant') -%}
    {{- '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant<|im_sep|>' -}}{%- endif -%}
"""

# Llama 3 chats; with tools, Llama 3.1's JSON tool calling: the schemas and their instructions
# open the first user turn, a call is {"name": ..., "parameters": ...} (one per line when there
# are several; Llama 3.1's own template refuses more than one), results come as `ipython` turns.
_LLAMA3 = r"""
{%- set ns = namespace(tools_pending=(tools is defined and tools is not none and tools | length > 0)) -%}
{%- for message in messages -%}
  {%- if loop.first -%}{{- bos_token -}}{%- endif -%}
  {%- if message['role'] == 'user' and ns.tools_pending -%}
    {%- set ns.tools_pending = false -%}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- 'Given the following functions, please respond with a JSON for a function call ' -}}
    {{- 'with its proper arguments that best answers the given prompt.\n\n' -}}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' -}}
    {{- 'Do not use variables.\n\n' -}}
    {%- for tool in tools -%}{{- tool | tojson(indent=4) + '\n\n' -}}{%- endfor -%}
    {{- message['content'] | trim + '<|eot_id|>' -}}
  {%- elif message['role'] == 'assistant' and message.tool_calls -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
    {%- if message['content'] -%}{{- message['content'] | trim + '\n' -}}{%- endif -%}
    {%- for call in message.tool_calls -%}
      {%- set fn = call.function if call.function is defined else call -%}
      {%- if not loop.first -%}{{- '\n' -}}{%- endif -%}
      {{- '{"name": "' + fn.name + '", "parameters": ' + fn.arguments | tojson + '}' -}}
    {%- endfor -%}
    {{- '<|eot_id|>' -}}
  {%- elif message['role'] in ('tool', 'ipython') -%}
    {{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' -}}
  {%- else -%}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}
"""

_LLAMA2 = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system_text = messages[0]['content'] -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set system_text = none -%}
  {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
  {%- endif -%}
  {%- if message['role'] == 'user' -%}
    {%- if loop.first and system_text is not none -%}
      {%- set text = '<<SYS>>\n' + system_text + '\n<</SYS>>\n\n' + message['content'] -%}
    {%- else -%}
      {%- set text = message['content'] -%}
    {%- endif -%}
    {{- bos_token + '[INST] ' + text | trim + ' [/INST]' -}}
  {%- elif message['role'] == 'assistant' -%}
    {{- ' ' + message['content'] | trim + ' ' + eos_token -}}
  {%- endif -%}
{%- endfor -%}
"""

# Mistral Instruct chats; with tools, Mistral v0.3's tool calling: [AVAILABLE_TOOLS] before the
# first instruction (v0.3's own template moves it to the last one, so earlier prompts would not
# be prefixes of later ones), calls as [TOOL_CALLS] [{"name": ..., "arguments": ...}] and
# results as [TOOL_RESULTS] {"content": ...}[/TOOL_RESULTS]. Call ids are optional.
_MISTRAL = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system_text = messages[0]['content'] -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set system_text = none -%}
  {%- set turns = messages -%}
{%- endif -%}
{%- set ns = namespace(index=0) -%}
{%- for message in turns if not (message['role'] == 'tool' or message.tool_calls) -%}
  {%- if (message['role'] == 'user') != (ns.index % 2 == 0) -%}
    {{- raise_exception('After the optional system message, conversation roles must alternate '
                        ~ 'user/assistant/user/assistant/...') -}}
  {%- endif -%}
  {%- set ns.index = ns.index + 1 -%}
{%- endfor -%}
{{- bos_token -}}
{%- if tools is defined and tools -%}
  {{- '[AVAILABLE_TOOLS] ' + tools | tojson + '[/AVAILABLE_TOOLS]' -}}
{%- endif -%}
{%- for message in turns -%}
  {%- if message['role'] == 'user' -%}
    {%- if loop.first and system_text is not none -%}
      {{- '[INST] ' + system_text + '\n\n' + message['content'] + ' [/INST]' -}}
    {%- else -%}
      {{- '[INST] ' + message['content'] + ' [/INST]' -}}
    {%- endif -%}
  {%- elif message['role'] == 'assistant' and message.tool_calls -%}
    {{- message['content'] + '[TOOL_CALLS] [' -}}
    {%- for call in message.tool_calls -%}
      {%- set fn = call.function if call.function is defined else call -%}
      {{- '{"name": "' + fn.name + '", "arguments": ' + fn.arguments | tojson -}}
      {%- if call.id is defined and call.id -%}{{- ', "id": "' + call.id + '"' -}}{%- endif -%}
      {{- '}' + (', ' if not loop.last else ']') -}}
    {%- endfor -%}
    {{- eos_token -}}
  {%- elif message['role'] == 'assistant' -%}
    {{- message['content'] + eos_token -}}
  {%- elif message['role'] == 'tool' -%}
    {{- '[TOOL_RESULTS] {"content": ' + message['content'] -}}
    {%- if message.tool_call_id is defined and message.tool_call_id -%}
      {{- ', "call_id": "' + message.tool_call_id + '"' -}}
    {%- endif -%}
    {{- '}[/TOOL_RESULTS]' -}}
  {%- else -%}
    {{- raise_exception('Only user, assistant and tool roles are supported, '
                        ~ 'with the exception of an initial optional system message!') -}}
  {%- endif -%}
{%- endfor -%}
"""

_GEMMA = r"""
{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set first_user_prefix = '' -%}
  {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
  {%- endif -%}
  {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
  {{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') -}}
  {{- message['content'] | trim + '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}
"""

_GLM4 = r"""
{{- '[gMASK]<sop>' -}}
{%- if tools -%}
  {{- '<|system|>\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，'
      ~ '你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具' -}}
  {%- for tool in tools -%}
    {%- set fn = tool.function if tool.function is defined else tool -%}
    {{- '\n\n## ' + fn.name + '\n\n' + fn | tojson(indent=4)
        + '\n在调用上述函数时，请使用 Json 格式表示调用的参数。' -}}
  {%- endfor -%}
{%- endif -%}
{%- for message in messages -%}
  {%- if message.role == 'system' -%}
    {{- '<|system|>\n' + message.content -}}
  {%- elif message.role == 'user' -%}
    {{- '<|user|>\n' + message.content -}}
  {%- elif message.role == 'assistant' and message.tool_calls -%}
    {%- if message.content -%}{{- '<|assistant|>\n' + message.content -}}{%- endif -%}
    {%- for call in message.tool_calls -%}
      {%- set fn = call.function if call.function is defined else call -%}
      {{- '<|assistant|>' + fn.name + '\n' -}}
      {{- fn.arguments if fn.arguments is string else fn.arguments | tojson -}}
    {%- endfor -%}
  {%- elif message.role == 'assistant' -%}
    {{- '<|assistant|>\n' + message.content -}}
  {%- elif message.role in ('tool', 'observation') -%}
    {{- '<|observation|>\n' + message.content -}}
  {%- else -%}
    {{- raise_exception('GLM-4 has no role ' + message.role + '; use system, user, assistant or tool.') -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}
"""

_PHI3 = r"""
{%- for message in messages -%}
  {%- if message['role'] in ('user', 'assistant') or (message['role'] == 'system' and message['content']) -%}
    {{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}
"""

# LLaMA-Factory's generic formats: the system text, then user and assistant turns; answers end with eos.
_ALPACA = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
  {{- messages[0]['content'] -}}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {{- 'Below is an instruction that describes a task. '
      ~ 'Write a response that appropriately completes the request.\n\n' -}}
  {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
  {%- if message['role'] == 'user' -%}
    {{- '### Instruction:\n' + message['content'] + '\n\n### Response:\n' -}}
  {%- elif message['role'] == 'assistant' -%}
    {{- message['content'] + eos_token + '\n\n' -}}
  {%- endif -%}
{%- endfor -%}
"""

_VICUNA = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
  {{- messages[0]['content'] + ' ' -}}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {{- "A chat between a curious user and an artificial intelligence assistant. "
      ~ "The assistant gives helpful, detailed, and polite answers to the user's questions. " -}}
  {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
  {%- if message['role'] == 'user' -%}
    {{- 'USER: ' + message['content'] + ' ASSISTANT:' -}}
  {%- elif message['role'] == 'assistant' -%}
    {{- ' ' + message['content'] + eos_token -}}
  {%- endif -%}
{%- endfor -%}
"""

_DEFAULT = r"""
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}
    {{- 'System: ' + message['content'] + eos_token + '\n' -}}
  {%- elif message['role'] == 'user' -%}
    {{- 'Human: ' + message['content'] + eos_token + '\nAssistant:' -}}
  {%- elif message['role'] == 'assistant' -%}
    {{- message['content'] + eos_token + '\n' -}}
  {%- endif -%}
{%- endfor -%}
"""

_EMPTY = r"""
{%- for message in messages -%}
  {%- if message['role'] in ('system', 'user', 'assistant') -%}{{- message['content'] -}}{%- endif -%}
{%- endfor -%}
"""

EOS = "{eos_token}"  # in NamedTemplate.stop: the tokenizer's eos token, whatever its text

TEMPLATES: dict[str, NamedTemplate] = {
    "chatml": NamedTemplate(_CHATML, ("<|im_end|>",), "ChatML: <|im_start|>role ... <|im_end|>; no default system."),
    "qwen": NamedTemplate(_QWEN, ("<|im_end|>",),
                          "Qwen2.5: ChatML with the default system 'You are Qwen, created by Alibaba Cloud...'; "
                          "tools in <tools>, calls in <tool_call>."),
    "qwen3": NamedTemplate(_QWEN3, ("<|im_end|>",),
                           "Qwen3 hybrid thinking: ChatML, no default system; each answer opens with "
                           "<think>\\n{reasoning_content}\\n</think>\\n\\n (empty without reasoning); "
                           "enable_thinking: false ends the prompt with the empty block instead; tools as in qwen."),
    "qwen3_nothink": NamedTemplate(_QWEN3_NOTHINK, ("<|im_end|>",),
                                   "Qwen3 Instruct-2507 (non-thinking models): ChatML, no default system, answers "
                                   "without <think> blocks; tools as in qwen. For hybrid Qwen3 models use qwen3."),
    "llama3": NamedTemplate(_LLAMA3, ("<|eot_id|>",),
                            "Llama 3 Instruct: <|begin_of_text|><|start_header_id|>role<|end_header_id|>; "
                            "contents trimmed; tools as Llama 3.1 JSON calls ({\"name\", \"parameters\"}, "
                            "results as ipython)."),
    "llama2": NamedTemplate(_LLAMA2, (EOS,),
                            "Llama 2 chat: <s>[INST] <<SYS>>...<</SYS>> ... [/INST] answer </s>; "
                            "roles must alternate."),
    "mistral": NamedTemplate(_MISTRAL, (EOS,),
                             "Mistral Instruct: <s>[INST] ... [/INST]answer</s>; a system message joins the "
                             "first instruction; roles must alternate; tools as Mistral v0.3 ([AVAILABLE_TOOLS], "
                             "[TOOL_CALLS], [TOOL_RESULTS])."),
    "gemma": NamedTemplate(_GEMMA, ("<end_of_turn>",),
                           "Gemma: <bos><start_of_turn>user/model ... <end_of_turn>; a system message joins the first "
                           "user turn (as Gemma 3 does); roles must alternate."),
    "glm4": NamedTemplate(_GLM4, ("<|user|>", "<|observation|>"),
                          "GLM-4 chat: [gMASK]<sop><|system|>/<|user|>/<|assistant|>/<|observation|>; an answer is "
                          "closed by the next role tag (or eos).", closed_by_next_turn=True),
    "deepseek3": NamedTemplate(_DEEPSEEK3, ("<｜end▁of▁sentence｜>",),
                               "DeepSeek-V3 / R1: bos, the system text, then <｜User｜>... <｜Assistant｜>answer"
                               "<｜end▁of▁sentence｜>; R1 answers train as written (with their <think> text)."),
    "gemma3": NamedTemplate("{#- Gemma 3 -#}" + _GEMMA, ("<end_of_turn>",),
                            "Gemma 3: as gemma (a system message opens the first user turn, contents trimmed)."),
    "phi4": NamedTemplate(_PHI4, ("<|im_end|>",), "Phi-4: <|im_start|>role<|im_sep|> ... <|im_end|>, no newlines."),
    "phi3": NamedTemplate(_PHI3, ("<|end|>",), "Phi-3 / Phi-3.5: <|role|>\\n ... <|end|>\\n."),
    "alpaca": NamedTemplate(_ALPACA, (),
                            "LLaMA-Factory alpaca: ### Instruction: / ### Response:, answers end with eos."),
    "vicuna": NamedTemplate(_VICUNA, (), "Vicuna v1.1: system USER: ... ASSISTANT: answer</s>."),
    "default": NamedTemplate(_DEFAULT, (),
                             "LLaMA-Factory default: System:/Human:/Assistant: with eos after each turn."),
    "empty": NamedTemplate(_EMPTY, (), "The contents alone, concatenated (no markers, no eos)."),
}


def template_names() -> list[str]:
    return sorted(TEMPLATES)


# Put before a template when enable_thinking is false, so that every use of the saved tokenizer
# (training, chat, the API, an exported folder served elsewhere) renders prompts without thinking.
NO_THINKING = "{%- set enable_thinking = false -%}\n"


def apply_template(tokenizer: Any, name: str | None, *, enable_thinking: bool = True) -> str:
    """Set tokenizer.chat_template to the template training will use, and return its name.

    None / 'auto' keeps the tokenizer's own; a tokenizer without one needs a named template.
    The template is stored on the tokenizer so every saved tokenizer carries it, with
    enable_thinking: false fixed in it (templates that know the variable, as Qwen3's, then
    put an empty think block in the prompt and train answers without reasoning).
    """
    if name in (None, "", "auto"):
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            raise UserError("this model's tokenizer has no chat template; set 'template' to one of: "
                            + ", ".join(template_names()))
        if not isinstance(source, str):
            return "auto"
        source = source.removeprefix(NO_THINKING)
        tokenizer.chat_template = source if enable_thinking else NO_THINKING + source
        return "auto"
    if name not in TEMPLATES:
        raise UserError(f"unknown template '{name}'{did_you_mean(name, template_names())}; "
                        f"known templates: {', '.join(template_names())}.")
    tokenizer.chat_template = TEMPLATES[name].jinja if enable_thinking else NO_THINKING + TEMPLATES[name].jinja
    return name


def named_template_of(tokenizer: Any) -> NamedTemplate | None:
    """The named template the tokenizer currently carries, if it is one of TEMPLATES."""
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, str):
        source = source.removeprefix(NO_THINKING)
    return _templates_by_source().get(source) if isinstance(source, str) else None


@functools.cache
def _templates_by_source() -> dict[str, NamedTemplate]:
    return {t.jinja: t for t in TEMPLATES.values()}


# --- Tool use ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolSupport:
    """What a chat template does with tool use, read from its source and one probe render."""

    tools: bool  # renders the `tools` schemas itself
    tool_calls: bool  # renders assistant `tool_calls` itself
    tool_role: bool  # prints the content of `tool` messages (rather than dropping or refusing them)


_PROBE_RESULT = "\x01tool-result\x01"


_support_by_source: dict[str, ToolSupport] = {}


def tool_support(tokenizer: Any) -> ToolSupport:
    source = getattr(tokenizer, "chat_template", None)
    if not isinstance(source, str):
        return ToolSupport(False, False, False)
    if source not in _support_by_source:
        probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                 {"role": "tool", "content": _PROBE_RESULT}]
        try:
            prints_tool_role = _PROBE_RESULT in tokenizer.apply_chat_template(
                probe, tokenize=False, add_generation_prompt=True)
        except Exception:  # the template refuses the role (raise_exception) or cannot render it
            prints_tool_role = False
        _support_by_source[source] = ToolSupport(tools=re.search(r"\btools\b", source) is not None,
                                                 tool_calls=re.search(r"\btool_calls\b", source) is not None,
                                                 tool_role=prints_tool_role)
    return _support_by_source[source]


def _parse_tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):  # datasets often store the schema list as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise UserError(f"the tools value is not valid JSON ({exc.msg} at character {exc.pos}).",
                            hint="give tools as a JSON list of function schemas.") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise UserError("tools must be a list of JSON function schemas (objects).")
    return tools or None


def _call_parts(call: dict[str, Any]) -> tuple[str, Any]:
    """(name, arguments) of an OpenAI tool call, or of a bare {name, arguments} object."""
    fn = call.get("function", call)
    return fn.get("name", ""), fn.get("arguments", {})


def _arguments_object(arguments: Any) -> Any:
    # Templates print arguments with `tojson`; a JSON string would come out quoted twice.
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _with_object_arguments(call: dict[str, Any]) -> dict[str, Any]:
    if isinstance(call.get("function"), dict):
        fn = call["function"]
        return {**call, "function": {**fn, "arguments": _arguments_object(fn.get("arguments", {}))}}
    return {**call, "arguments": _arguments_object(call.get("arguments", {}))}


def tool_call_json(call: dict[str, Any]) -> str:
    """One tool call as the JSON line written into the answer of a template without tool support."""
    name, arguments = _call_parts(call)
    return json.dumps({"name": name, "arguments": _arguments_object(arguments)}, ensure_ascii=False)


def tools_system_text(tools: list[dict[str, Any]]) -> str:
    """The tool definitions as system-prompt text, for templates that cannot show them."""
    schemas = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You can call the following tools, given as JSON schemas:\n" + schemas + "\n\n"
            "To call tools, answer with one JSON object per call, each on its own line: "
            '{"name": <tool name>, "arguments": <arguments object>}')


def _uses_tools(messages: list[dict[str, Any]], tools: Any) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def normalize_tools(messages: list[dict[str, Any]], tools: Any, support: ToolSupport
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Rewrite tool use into what the template can print; returns (messages, tools to pass on).

    - tool calls, when the template cannot print them, become the answer's text: one JSON
      object {"name", "arguments"} per line, after any text the answer already has;
    - tool results, when the template would drop or refuse a `tool` role, become a user
      turn headed "Tool result:" (consecutive results share one turn, so roles still alternate);
    - tool schemas, when the template cannot show them, are appended to the system prompt
      (or open the conversation as a new system message).
    """
    tools = _parse_tools(tools)
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            calls = message["tool_calls"]
            content = message.get("content") or ""
            if support.tool_calls:
                calls = [_with_object_arguments(c) for c in calls]
                out.append({**message, "content": content, "tool_calls": calls})
            else:
                text = "\n".join(tool_call_json(c) for c in calls)
                rest = {k: v for k, v in message.items() if k != "tool_calls"}
                out.append({**rest, "content": f"{content}\n{text}" if content else text})
        elif role == "tool" and not support.tool_role:
            name = message.get("name")
            result = f"Tool result{f' ({name})' if name else ''}:\n{message.get('content') or ''}"
            if out and out[-1].get("role") == "user" and out[-1].get("_tool_result"):
                out[-1]["content"] += "\n\n" + result
            else:
                out.append({"role": "user", "content": result, "_tool_result": True})
        else:
            out.append(message)
    out = [{k: v for k, v in m.items() if k != "_tool_result"} if "_tool_result" in m else m for m in out]
    if tools and not support.tools:
        block = tools_system_text(tools)
        if out and out[0].get("role") == "system":
            system = out[0].get("content") or ""
            out[0] = {**out[0], "content": f"{system}\n\n{block}" if system else block}
        else:
            out.insert(0, {"role": "system", "content": block})
        tools = None
    return out, tools


# --- System prompt -------------------------------------------------------------------------

def with_system(messages: list[dict[str, Any]], default_system: str | None) -> list[dict[str, Any]]:
    """The one system-prompt rule of training, chat, the API and export.

    A conversation's own system message (a system turn, or the dataset's system column) wins;
    else `default_system`, when set, opens the conversation; else the template adds its own
    default, if it has one (qwen's "You are Qwen..."), or none.
    """
    if default_system and not (messages and messages[0].get("role") == "system"):
        return [{"role": "system", "content": default_system}, *messages]
    return list(messages)


# --- Rendering -----------------------------------------------------------------------------

def render(conv: Conversation | list[dict[str, Any]], tokenizer: Any, *, add_generation_prompt: bool = False,
           tools: list[dict[str, Any]] | None = None) -> str:
    """The conversation as text, exactly as the tokenizer's chat template writes it.

    Tool use is first normalised for the template (`normalize_tools`), the same way for
    training and for chat.
    """
    messages = conv.messages if isinstance(conv, Conversation) else conv
    if isinstance(conv, Conversation) and tools is None:
        tools = conv.tools
    if _uses_tools(messages, tools):
        try:
            messages, tools = normalize_tools(messages, tools, tool_support(tokenizer))
        except UserError as exc:
            raise UserError(f"{_row_of(conv)}{exc.args[0]}", hint=exc.hint) from None
    kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
    if tools:
        kwargs["tools"] = tools
    try:
        compiled = None if tools else _plain_renderer(tokenizer, messages)
        if compiled is not None:
            return _render_compiled(compiled, tokenizer, messages, add_generation_prompt)
        return tokenizer.apply_chat_template(messages, **kwargs)
    except Exception as exc:  # jinja raise_exception() and template errors
        raise UserError(f"{_row_of(conv)}the chat template could not render this conversation: {exc}") from None


def _row_of(conv: Conversation | list[dict[str, Any]]) -> str:
    """'dataset row N: ' for a conversation from a dataset, to start an error message with."""
    return f"{conv.source[0]} row {conv.source[1]}: " if isinstance(conv, Conversation) and conv.source[0] else ""


# Conversations of plain {"role", "content"} string messages, as a probe of the plain render path.
_RENDER_PROBES = (
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": " und 3+3 ?\n"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Teal."}],
)
# chat template text -> the template compiled, or None where it must go through apply_chat_template
_plain_templates: dict[str, _Compiled | None] = {}


def _plain_renderer(tokenizer: Any, messages: list[dict[str, Any]]) -> _Compiled | None:
    """The compiled chat template, for rendering plain messages without apply_chat_template's
    per-call conversions (a third of a training row's rendering time); None where those could
    matter: a message with other keys or non-string values, a template dict, or a template whose
    direct render differed from apply_chat_template's on the probes (checked once per template).
    Exact types only: the library turns str and dict subclasses into plain ones before rendering."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not messages or not hasattr(tokenizer, "special_tokens_map") or not all(
            type(m) is dict and m.keys() <= {"role", "content"} and type(m.get("role")) is str
            and type(m.get("content")) is str for m in messages):
        return None
    if template not in _plain_templates:
        _plain_templates[template] = _checked_compile(tokenizer, template)
    return _plain_templates[template]


@dataclass
class _Compiled:
    """A chat template compiled once, with its globals and, where its output provably only pastes
    the contents (template_shapes), its texts per conversation shape."""

    template: Any
    globals: dict[str, Any]  # copied out of the template's ChainMap, slow to copy at each call
    shapes: ShapeMemo | None = None
    # The last special-token map seen (a copy) and its text: the store's tokenizer hands out the
    # same map at every call, and comparing it costs less than writing it out again.
    last_specials: tuple[dict[str, Any], str | None] | None = None

    def variant(self, specials: dict[str, Any]) -> str | None:
        """What else the render reads besides the messages, as a key for its shapes; None when a
        special token is not a plain str (the shape check relies on `+` meeting plain strings)."""
        last = self.last_specials
        if last is not None and last[0] == specials:
            return last[1]
        plain = all(type(v) is str or type(v) is list and all(type(t) is str for t in v) for v in specials.values())
        text = repr(specials) if plain else None
        self.last_specials = (copy.deepcopy(specials), text)
        return text


def _render_compiled(compiled: _Compiled, tokenizer: Any, messages: list[dict[str, Any]], generation: bool) -> str:
    specials = tokenizer.special_tokens_map

    def direct(chat: list[dict[str, Any]], prompt: bool) -> str:
        """What template.render(...) returns, with the template's globals in the one dict the
        context reads (Jinja would otherwise copy them into a new one at every call)."""
        variables = {**compiled.globals, **specials, "messages": chat, "tools": None, "documents": None,
                     "add_generation_prompt": prompt}
        template = compiled.template
        return template.environment.concat(template.root_render_func(template.new_context(variables, shared=True)))

    variant = None if compiled.shapes is None else compiled.variant(specials)
    if variant is None:
        return direct(messages, generation)
    return compiled.shapes.render(messages, generation, variant, direct)


def _checked_compile(tokenizer: Any, template: str) -> _Compiled | None:
    from tunesmith.template_shapes import ShapeMemo, contents_pasted_only

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        template_object = _compile_jinja_template(template)
    except Exception:  # a private helper that moved: the library's path
        return None
    compiled = _Compiled(template_object, dict(template_object.globals))
    if contents_pasted_only(template, template_object.environment):
        compiled.shapes = ShapeMemo()
    compared = 0
    for probe in _RENDER_PROBES:
        for generation in (False, True):
            try:  # a probe the template refuses (a system turn, say) proves nothing either way
                want = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=generation)
            except Exception:
                continue
            try:
                if _render_compiled(compiled, tokenizer, probe, generation) != want:
                    return None
            except Exception:
                return None
            compared += 1
    return compiled if compared else None


def render_with_spans(conv: Conversation, tokenizer: Any, *, train_on_prompt: bool = False,
                      mask_history: bool = False, add_generation_prompt: bool = False
                      ) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and return (text, trained character spans).

    Each assistant turn i is trained from the end of `messages[:i]` rendered with a generation
    prompt to the end of `messages[:i+1]`: its content and its end-of-turn marker, so the model
    learns to stop. Tool results and prompts are not trained. The rendering of every prefix
    must be a prefix of the full text, which is true of ordinary chat templates; one that
    rewrites history (e.g. strips earlier reasoning) is reported rather than mis-masked.

    A named template whose answers have no end marker of their own (`closed_by_next_turn`)
    trains the role tag that follows each answer, and the text gets the eos token after a
    final answer: the one place where it differs from `render`.
    """
    text, spans, _ = answer_spans(conv, tokenizer, add_generation_prompt=add_generation_prompt)
    if train_on_prompt:
        return text, [(0, len(text))]
    return text, spans[-1:] if mask_history else spans


def answer_spans(conv: Conversation | list[dict[str, Any]], tokenizer: Any, *, add_generation_prompt: bool = False
                 ) -> tuple[str, list[tuple[int, int]], list[int]]:
    """(text, the character span of every assistant answer, the index of its message).

    With `add_generation_prompt` the text is an inference prompt, and the spans are those of
    the answers in its history: the same cut points training uses for that prefix.
    """
    if not isinstance(conv, Conversation):
        conv = Conversation(list(conv))
    text = render(conv, tokenizer, add_generation_prompt=add_generation_prompt)
    messages = conv.messages
    named = named_template_of(tokenizer)
    eos = getattr(tokenizer, "eos_token", None)
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    spans: list[tuple[int, int]] = []
    for i in turns:
        start_text = render(messages[:i], tokenizer, add_generation_prompt=True, tools=conv.tools) if i else ""
        last = i + 1 == len(messages) and not add_generation_prompt
        end_text = text if last else render(messages[: i + 1], tokenizer, tools=conv.tools)  # same call as `text`
        if not (text.startswith(end_text) and end_text.startswith(start_text)):
            # Templates that close the whole text after the last turn (an eos) still nest up to it.
            if text.startswith(end_text):
                end = len(end_text)
            else:
                end = _turn_end(text, end_text, len(start_text), stop_strings(tokenizer, None))
            if not text.startswith(start_text) or end <= len(start_text):
                src = f"{conv.source[0]} row {conv.source[1]}: " if conv.source[0] else ""
                raise UserError(f"{src}the chat template renders earlier turns differently once later turns "
                                "are added, so the answer tokens cannot be located exactly.",
                                hint="use a named template (see `tunesmith data templates`), whose every "
                                     "prompt is a prefix of the conversation that answers it.")
        else:
            end = len(end_text)
        spans.append((len(start_text), end))
    if named is not None and named.closed_by_next_turn:
        text, spans = _close_answers(text, spans, named.stop, eos)
    return text, spans, turns


@dataclass
class Segmented:
    """A conversation tokenized piece by piece: each prompt part and each answer apart.

    pieces: (first token, end token, message index of the answer or None for a prompt part,
    first character, end character), in order; ids is their concatenation.
    """

    text: str
    ids: list[int]
    pieces: list[tuple[int, int, int | None, int, int]]

    def answers(self) -> list[tuple[int, int, int]]:
        """(first token, end token, message index) of every answer."""
        return [(a, b, turn) for a, b, turn, _, _ in self.pieces if turn is not None]


def encode_segments(conv: Conversation | list[dict[str, Any]], tokenizer: Any, *,
                    add_generation_prompt: bool = False) -> Segmented:
    """The token ids of a conversation, as training learns it and inference feeds it.

    The rendered text is cut at the start and end of every answer, and each piece is tokenized
    alone. So the ids before an answer are exactly those of its prompt tokenized for
    generation (this function with `add_generation_prompt`), and every character of the answer
    and its end-of-turn marker lies in the answer's own tokens, even where tokenizing the whole
    text at once would merge the prompt's last characters with the answer's first. Training,
    chat, the API and export's checks all encode through here.
    """
    text, spans, turns = answer_spans(conv, tokenizer, add_generation_prompt=add_generation_prompt)
    cuts: list[tuple[int, int, int | None]] = []
    position = 0
    for (start, end), turn in zip(spans, turns, strict=True):
        if start > position:
            cuts.append((position, start, None))
        cuts.append((start, end, turn))
        position = end
    if position < len(text):
        cuts.append((position, len(text), None))
    pieces: list[tuple[int, int, int | None, int, int]] = []
    ids: list[int] = []
    if cuts:
        encoded = tokenizer([text[a:b] for a, b, _ in cuts], add_special_tokens=False)["input_ids"]
        for (a, b, turn), piece_ids in zip(cuts, encoded, strict=True):
            pieces.append((len(ids), len(ids) + len(piece_ids), turn, a, b))
            ids.extend(piece_ids)
    return Segmented(text, ids, pieces)


def _close_answers(text: str, spans: list[tuple[int, int]], closers: tuple[str, ...], eos: str | None
                   ) -> tuple[str, list[tuple[int, int]]]:
    closed = []
    for start, end in spans:
        closer = next((c for c in closers if text.startswith(c, end)), None)
        if closer is not None:
            end += len(closer)
        elif end == len(text) and eos:
            text += eos
            end += len(eos)
        closed.append((start, end))
    return text, closed


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _turn_end(text: str, end_text: str, start: int, stops: list[str]) -> int:
    """Where a turn ends when its standalone rendering adds a closing suffix (e.g. an eos).

    The shared prefix can run into the next turn's opening (`<|end|>\\n<|endoftext|>` against
    `<|end|>\\n<|user|>` share `<|`), so it is cut back after the last end-of-turn string and
    the whitespace that follows it.
    """
    end = _common_prefix(text, end_text)
    best = -1
    for stop in stops:
        at = text.rfind(stop, start, end)
        if at >= 0 and at + len(stop) <= end:
            best = max(best, at + len(stop))
    if best < 0:
        return end
    while best < end and text[best].isspace():
        best += 1
    return best


def _special_tokens(tokenizer: Any) -> list[str]:
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens = {str(getattr(t, "content", t)) for t in decoder.values()}
    tokens.update(getattr(tokenizer, "all_special_tokens", []) or [])
    return [t for t in tokens if t]


def stop_strings(tokenizer: Any, name: str | None) -> list[str]:
    """End-of-turn strings for generation: the named template's, else what ends a rendered answer.

    For a tokenizer's own template the answer's tail is read from a probe conversation: the
    text between an answer and the next user turn, cut after the last special token in it.
    """
    named = TEMPLATES.get(name) if name else named_template_of(tokenizer)
    if named is not None and named.stop:
        eos = getattr(tokenizer, "eos_token", None)
        return [eos if stop == EOS else stop for stop in named.stop if stop != EOS or eos]
    mark = "\x00"
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": mark}]
    try:
        tail = render(probe, tokenizer).split(mark, 1)[1]
    except (UserError, IndexError):
        return []
    try:  # a template that closes the whole text after the last answer: keep only what ends the turn
        longer = render([*probe, {"role": "user", "content": "y"}], tokenizer).split(mark, 1)[1]
        tail = tail[:_common_prefix(tail, longer)]
    except (UserError, IndexError):
        pass
    tail = tail.strip()
    specials = [t for t in _special_tokens(tokenizer) if t in tail]
    if specials:
        tail = tail[: max(tail.rfind(t) + len(t) for t in specials)]
    return [tail] if tail else []


def end_of_turn_ids(tokenizer: Any, template_name: str | None, extra: Any = None) -> tuple[list[int], list[str]]:
    """(token ids generation stops at, stop strings that are not single tokens).

    The ids are the tokenizer's eos, any eos already configured (`extra`), and every stop
    string of the template that is a single token.
    """
    ids: list[int] = []

    def add(value: Any) -> None:
        for i in value if isinstance(value, list | tuple) else [value]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)

    add(extra)
    add(tokenizer.eos_token_id)
    multi: list[str] = []
    for text in stop_strings(tokenizer, template_name):
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            add(encoded[0])
        elif text not in multi:
            multi.append(text)
    return ids, multi
