"""Reading and checking /v1/chat/completions bodies: pydantic models and the limits on raw JSON.

Every refusal is an ApiError(400) whose `param` names the field at fault in the OpenAI way
(`messages[0].role`), and whose message never repeats the client's value back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_BODY_BYTES = 1_000_000
MAX_JSON_DEPTH = 32  # objects and lists inside each other; the real schema needs 5
MAX_MESSAGES = 256
MAX_STOP_STRINGS = 4
MAX_TOKENS_CAP = 4096  # the most tokens one reply may take, whatever the context allows
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An error answered to the client as an OpenAI error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- the request schema (also what /docs shows) -------------------------------------------------

FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Annotated[str, Field(strict=True)]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content", mode="wrap")
    @classmethod
    def _one_message(cls, value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:  # the union's two failures say less than this
            raise ValueError('must be a string or a list of parts; only text parts ({"type": "text", "text": ...}) '
                             "are supported") from None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: Annotated[bool, Field(strict=True)] | None = None


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat completion request that this server honours; others are ignored."""

    model_config = ConfigDict(extra="ignore")

    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    model: Annotated[str, Field(strict=True)] | None = None
    stream: Annotated[bool, Field(strict=True)] | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: Annotated[FiniteFloat, Field(ge=0, le=2)] | None = Field(
        None, description="0 (or below 0.01) is greedy decoding")
    top_p: Annotated[FiniteFloat, Field(gt=0, le=1)] | None = None
    max_tokens: Annotated[int, Field(strict=True, ge=1)] | None = Field(
        None, description="capped so that the prompt and the reply fit the model's context")
    max_completion_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    n: Annotated[int, Field(strict=True, ge=1, le=1)] | None = Field(None, description="only 1 is supported")
    tools: Annotated[list[Any], Field(max_length=0)] | None = Field(None, description="not supported")

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop_strings(cls, value: Any, handler: Any) -> Any:
        message = f"must be a string or a list of at most {MAX_STOP_STRINGS} strings"
        try:
            stop = handler(value)
        except ValidationError:
            raise ValueError(message) from None
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(message)
        return stop


@dataclass
class ChatRequest:
    """A validated body, in the terms ChatEngine takes."""

    messages: list[dict[str, str]]
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    gen: dict[str, Any] = field(default_factory=dict)  # ChatEngine generation overrides


# -- raw JSON -----------------------------------------------------------------------------------

def parse_json(raw: bytes) -> Any:
    """The body as JSON, refused if it is not JSON, nested too deeply or holds text that is not Unicode."""
    if not raw.strip():
        raise ApiError(400, "the request has no JSON body.")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels.") from None
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError also covers JSONDecodeError and huge ints
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    check_structure(body)
    return body


def check_structure(body: Any) -> None:
    """Walk the parsed JSON without recursion: depth limit, and strings that encode to UTF-8
    (JSON escapes can spell lone surrogates, which the tokenizer cannot take)."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list) and depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels.")
        if isinstance(item, dict):
            stack.extend((key, depth) for key in item)
            stack.extend((value, depth + 1) for value in item.values())
        elif isinstance(item, list):
            stack.extend((value, depth + 1) for value in item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, "the JSON body holds a string with an unpaired surrogate escape "
                                    "(\\ud800-\\udfff); send valid Unicode.") from None


# -- the body, field by field -------------------------------------------------------------------

def _param(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location as OpenAI's `param`: messages[0].content."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or None


def _validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors(include_url=False, include_input=False)[0]
    param = _param(tuple(first["loc"]))
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden" or param is None:
        return ApiError(400, f"the request body is not a chat completion request: {message}.")
    more = exc.error_count() - 1
    return ApiError(400, f"'{param}': {message}." + (f" ({more} more problem(s) in the body.)" if more else ""),
                    param=param)


def _text(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def parse_chat_request(body: Any) -> ChatRequest:
    """Check a parsed body; raises ApiError(400) naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    messages = [{"role": ROLES[m.role], "content": _text(m.content)} for m in request.messages]
    stops = [] if request.stop is None else [request.stop] if isinstance(request.stop, str) else request.stop
    gen: dict[str, Any] = {}
    if request.temperature is not None:
        from tunesmith.infer import GREEDY_BELOW_TEMPERATURE

        sample = request.temperature >= GREEDY_BELOW_TEMPERATURE  # a tinier one would overflow the logits
        gen["temperature"] = request.temperature if sample else 0.0
        gen["do_sample"] = sample
    if request.top_p is not None:
        gen["top_p"] = request.top_p
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is not None:
        gen["max_new_tokens"] = min(max_tokens, MAX_TOKENS_CAP)  # and to the context's room, once tokenized
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return ChatRequest(messages, bool(request.stream), include_usage, [s for s in stops if s], gen)
