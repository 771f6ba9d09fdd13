"""OpenAI-compatible HTTP API over one ChatEngine.

Standard library only: a threading HTTP server whose requests queue on the engine's lock, so
concurrent clients are served one generation at a time by a single model instance. Bound to
127.0.0.1 unless told otherwise; with API_KEY set every request needs that Bearer token.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tunesmith.config import RunConfig
from tunesmith.errors import UserError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_BODY_BYTES = 1_000_000
DRAIN_LIMIT_BYTES = 32_000_000  # larger bodies are refused without reading them (connection closed)
MAX_MESSAGES = 256
MAX_TOKENS_CAP = 4096
MAX_STOP_STRINGS = 4
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An error answered to the client as an OpenAI error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A validated /v1/chat/completions body."""

    messages: list[dict[str, str]]
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    gen: dict[str, Any] = field(default_factory=dict)  # ChatEngine generation overrides


def _number(body: dict[str, Any], key: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(400, f"'{key}' must be a number, got {json.dumps(value)}.", param=key)
    if value > high or value < low or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise ApiError(400, f"'{key}' must be in {bounds}, got {value}.", param=key)
    return float(value)


def _content(value: Any, where: str) -> str:
    """Message content: a string, or a list of text parts (other part kinds are refused)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                    "supported.", param=where)
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(400, f"{where} must be a string or a list of text parts.", param=where)


def parse_chat_request(body: Any) -> ChatRequest:
    """Check a request body field by field; raises ApiError(400) naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects.", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"'messages' holds {len(messages)} messages; at most {MAX_MESSAGES} are accepted.",
                       param="messages")
    parsed = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content'.", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role is {json.dumps(role)}; supported roles: system, user, assistant.",
                           param=f"{where}.role")
        parsed.append({"role": ROLES[role], "content": _content(message.get("content"), f"{where}.content")})
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise ApiError(400, "'model' must be a string.", param="model")
    n = body.get("n")
    if n is not None and n != 1:
        raise ApiError(400, "only n = 1 is supported.", param="n")
    if body.get("tools"):
        raise ApiError(400, "tool calling is not supported by this server.", param="tools")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false.", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object.", param="stream_options")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings.",
                       param="stop")
    gen: dict[str, Any] = {}
    temperature = _number(body, "temperature", 0.0, 2.0)
    if temperature is not None:
        gen["temperature"] = temperature
        gen["do_sample"] = temperature > 0
    top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
    if top_p is not None:
        gen["top_p"] = top_p
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ApiError(400, f"'{key}' must be a positive integer, got {json.dumps(max_tokens)}.", param=key)
        gen["max_new_tokens"] = min(max_tokens, MAX_TOKENS_CAP)
    return ChatRequest(parsed, stream, bool(options.get("include_usage")), [s for s in stops if s], gen)


class ApiServer(ThreadingHTTPServer):
    """The HTTP server holding the engine; each request runs in its own thread."""

    daemon_threads = True
    request_queue_size = 128  # listen backlog; socketserver's default of 5 resets a burst of new connections

    def __init__(self, address: tuple[str, int], engine: Any, *, api_key: str | None, model_id: str) -> None:
        super().__init__(address, _Handler)
        self.engine = engine
        self.api_key = api_key
        self.model_id = model_id
        self.created = int(time.time())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streamed replies use chunked transfer encoding
    server: ApiServer
    timeout = 120  # seconds a client may stall while sending or reading

    # -- plumbing ---------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: ApiError) -> None:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        self._send_json(error.status, error.body(), headers)

    def _authorized(self) -> bool:
        key = self.server.api_key
        if not key:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode("utf-8"), f"Bearer {key}".encode())

    def _handle(self, method: str) -> None:
        self._body_read = False
        try:
            if not self._authorized():
                raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <API_KEY>'.",
                               code="invalid_api_key")
            path = self.path.split("?", 1)[0].rstrip("/")
            if method == "GET" and path == "/v1/models":
                self._send_json(200, {"object": "list", "data": [self._model_card()]})
            elif method == "GET" and path == f"/v1/models/{self.server.model_id}":
                self._send_json(200, self._model_card())
            elif method == "POST" and path == "/v1/chat/completions":
                self._chat_completions()
            elif path in ("/v1/models", "/v1/chat/completions"):
                raise ApiError(405, f"{method} is not allowed on {path}.", code="method_not_allowed")
            else:
                raise ApiError(404, f"no such endpoint: {method} {path}; served: GET /v1/models, "
                                    "POST /v1/chat/completions.", code="not_found")
        except ApiError as exc:
            if not self._body_read and self.headers.get("Content-Length", "0").strip() not in ("", "0"):
                self.close_connection = True  # the unread body would be taken for the next request
            self._send_error(exc)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug must not take the server down; the client gets a 500
            self.log_error("internal error: %r", exc)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._send_error(ApiError(500, f"internal error: {exc}", type="server_error"))

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.server.model_id, "object": "model", "created": self.server.created,
                "owned_by": "tunesmith"}

    def _read_json(self) -> Any:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise ApiError(411, "send the body with a Content-Length header (chunked bodies are not accepted).")
        length_text = self.headers.get("Content-Length")
        try:
            length = int(length_text) if length_text is not None else 0
        except ValueError:
            self.close_connection = True
            raise ApiError(400, "the Content-Length header is not a number.") from None
        if length > MAX_BODY_BYTES:
            if length <= DRAIN_LIMIT_BYTES:  # read and drop it, so the client can read the answer
                left = length
                while left > 0:
                    data = self.rfile.read(min(left, 65536))
                    if not data:
                        break
                    left -= len(data)
                self._body_read = True
            raise ApiError(413, f"the request body is {length} bytes; at most {MAX_BODY_BYTES} are accepted.",
                           code="request_too_large")
        if length <= 0:
            raise ApiError(400, "the request has no JSON body.")
        raw = self.rfile.read(length)
        self._body_read = True
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None

    # -- chat completions ---------------------------------------------------------------------

    def _chat_completions(self) -> None:
        request = parse_chat_request(self._read_json())
        engine = self.server.engine
        try:
            engine.fit(request.messages)
        except UserError as exc:
            raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        from tunesmith.infer import Usage

        usage = Usage()
        if not request.stream:
            text = engine.chat(request.messages, stop=request.stop, usage=usage, **request.gen)
            self._send_json(200, {
                "id": completion_id, "object": "chat.completion", "created": created,
                "model": self.server.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": usage.finish_reason}],
                "usage": _usage_json(usage),
            })
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": self.server.model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        self._event(chunk({"role": "assistant", "content": ""}))
        stream = engine.stream_chat(request.messages, stop=request.stop, usage=usage, **request.gen)
        try:
            for piece in stream:
                self._event(chunk({"content": piece}))
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as exc:  # headers are sent: report in the stream, then end it
            self.log_error("generation failed: %r", exc)
            self._event(ApiError(500, f"generation failed: {exc}", type="server_error").body())
        else:
            self._event(chunk({}, usage.finish_reason))
            if request.include_usage:
                self._event({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                             "model": self.server.model_id, "choices": [], "usage": _usage_json(usage)})
        finally:
            stream.close()  # a client that went away stops the generation
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

    def _event(self, payload: dict[str, Any]) -> None:
        self._write_chunk(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _usage_json(usage: Any) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def make_server(engine: Any, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                api_key: str | None = None) -> ApiServer:
    try:
        return ApiServer((host, port), engine, api_key=api_key or None, model_id=engine.source.name)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                        hint="choose another --port (or API_PORT), or stop the program using it.") from None


def _env_port() -> int:
    text = os.environ.get("API_PORT")
    if not text:
        return DEFAULT_PORT
    try:
        port = int(text)
    except ValueError:
        raise UserError(f"environment variable API_PORT={text!r} is not a port number.") from None
    if not 0 <= port <= 65535:
        raise UserError(f"environment variable API_PORT={port} is outside 0-65535.")
    return port


def serve(cfg: RunConfig, host: str | None = None, port: int | None = None) -> None:
    """Load the model and answer requests until interrupted. Port 0 picks a free port."""
    from transformers.utils import logging as hf_logging

    from tunesmith.infer import ChatEngine

    host = host or os.environ.get("API_HOST") or DEFAULT_HOST
    port = _env_port() if port is None else port
    api_key = os.environ.get("API_KEY") or None
    hf_logging.disable_progress_bar()
    engine = ChatEngine(cfg)
    server = make_server(engine, host, port, api_key=api_key)
    bound_host, bound_port = server.server_address[:2]
    print(f"Loaded {engine.description}.", file=sys.stderr)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: listening on {host} without API_KEY: anyone who can reach this machine can use it.",
              file=sys.stderr)
    print(f"Serving an OpenAI-compatible API at http://{bound_host}:{bound_port}/v1 (model '{server.model_id}'"
          f"{', API key required' if api_key else ''}). Ctrl-C stops.", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
