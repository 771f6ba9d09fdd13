"""OpenAI-compatible HTTP API over one ChatEngine: FastAPI served by uvicorn.

One model instance answers one generation at a time; other requests wait in a bounded queue
(beyond it: 429 with Retry-After). Generation runs in a worker thread while the event loop
watches the client: one that goes away cancels its generation, streamed or not, so the slot frees
at the next token. Bound to 127.0.0.1 unless told otherwise; with API_KEY set every /v1 request
needs that Bearer token. Request bodies are checked in api_request.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse

from tunesmith.api_request import (
    MAX_BODY_BYTES,
    MAX_MESSAGES,  # noqa: F401 (callers read the limits here)
    MAX_TOKENS_CAP,
    ApiError,
    ChatCompletionRequest,
    ChatRequest,
    parse_chat_request,
    parse_json,
)
from tunesmith.config import RunConfig
from tunesmith.errors import UserError
from tunesmith.infer import ChatEngine, Usage

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUE = 64  # requests waiting behind the one generating
DISCONNECT_POLL_SECONDS = 0.1
log = logging.getLogger("tunesmith.api")

_END = object()  # end of a generation's pieces


class _Ticket:
    """One admitted request's place: waiting for the engine, holding it, or done. All methods run
    on the event loop, so the counts need no lock; the worker thread reaches them via the loop."""

    def __init__(self, server: ApiServer) -> None:
        self.server = server
        self.cancel = threading.Event()
        self.state = "waiting"
        self.started = False  # a worker thread runs (or ran) the generation and will call finish()
        self.usage: Any = None  # the engine's Usage, filled in when the reply is finished

    async def acquire(self) -> None:
        await self.server.gate.acquire()
        self.state = "holding"

    def finish(self, seconds: float | None = None) -> None:
        if self.state == "holding":
            self.server.gate.release()
        if self.state != "done":
            self.server.pending -= 1
            self.state = "done"
        if seconds is not None:  # a running mean, for Retry-After
            self.server.mean_seconds = 0.8 * self.server.mean_seconds + 0.2 * seconds

    def abandon(self) -> None:
        """The client went away (or the reply ended): stop the generation; free the place now
        unless a worker still runs, which frees it when it stops."""
        self.cancel.set()
        if not self.started:
            self.finish()


class ApiServer:
    """The engine, the listening socket and the FastAPI app."""

    def __init__(self, sock: socket.socket, engine: Any, *, api_key: str | None, model_id: str,
                 max_queue: int = DEFAULT_MAX_QUEUE) -> None:
        self.socket = sock
        self.server_address = sock.getsockname()[:2]
        self.engine = engine
        self.api_key = api_key
        self.model_id = model_id
        self.max_queue = max_queue
        self.created = int(time.time())
        self.pending = 0  # admitted requests: the one generating and those waiting
        self.mean_seconds = 1.0
        self._gate: asyncio.Lock | None = None
        self.app = build_app(self)
        self._uvicorn: Any = None
        self._stopped = threading.Event()

    # -- running ------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Answer requests on the socket until shutdown() (or SIGINT/SIGTERM in the main thread)."""
        import uvicorn

        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5, timeout_keep_alive=30)
        self._uvicorn = uvicorn.Server(config)
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self, timeout: float = 10) -> None:
        """Stop serve_forever running in another thread, and wait for it."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            self._stopped.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()

    @property
    def gate(self) -> asyncio.Lock:
        if self._gate is None:  # made on the server's own event loop
            self._gate = asyncio.Lock()
        return self._gate

    # -- admission ----------------------------------------------------------------------------

    def admit(self) -> _Ticket:
        if self.pending >= 1 + self.max_queue:
            wait = max(1, math.ceil(self.mean_seconds * self.pending))
            raise ApiError(429, f"the server is busy: {self.pending} requests are queued or running (at most "
                                f"{1 + self.max_queue}); retry after {wait} s.", code="rate_limit_exceeded",
                           type="rate_limit_error", headers={"Retry-After": str(wait)})
        self.pending += 1
        return _Ticket(self)

    def preflight(self, request: ChatRequest) -> None:
        """Refuse prompts that do not fit, and cap max_new_tokens to the room the context leaves."""
        engine = self.engine
        try:
            kept, _ = engine.fit(request.messages)
        except UserError as exc:
            raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
        prompt_tokens = len(engine.prompt_ids(kept))
        context = context_length(engine)
        wanted = int(request.gen.get("max_new_tokens") or engine.cfg.generate.max_new_tokens)
        room = MAX_TOKENS_CAP if context is None else context - prompt_tokens
        if room < 1:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens long; the model's context holds {context}.",
                           param="messages", code="context_length_exceeded")
        request.gen["max_new_tokens"] = min(wanted, room, MAX_TOKENS_CAP)

    # -- generation ---------------------------------------------------------------------------

    def start(self, ticket: _Ticket, request: ChatRequest) -> asyncio.Queue:
        """Run the generation in a thread; its pieces, then _END or the exception, arrive on the queue."""

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        ticket.usage = Usage()

        def to_loop(callback: Callable[..., Any], *args: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is stopping
                loop.call_soon_threadsafe(callback, *args)

        def work() -> None:
            started = time.monotonic()
            last: Any = _END
            try:
                for piece in self.engine.stream_chat(request.messages, stop=request.stop, usage=ticket.usage,
                                                     cancel=ticket.cancel, **request.gen):
                    to_loop(queue.put_nowait, piece)
            except BaseException as exc:  # handed to the request, which answers it
                last = exc
            to_loop(queue.put_nowait, last)
            to_loop(ticket.finish, time.monotonic() - started)

        ticket.started = True
        threading.Thread(target=work, name="tunesmith-api-generate", daemon=True).start()
        return queue

    async def complete(self, http: Request, request: ChatRequest, ticket: _Ticket) -> dict[str, Any] | None:
        """The whole reply, or None if the client went away first (its generation is cancelled)."""
        watcher = asyncio.ensure_future(_disconnected(http))
        try:
            acquire = asyncio.ensure_future(ticket.acquire())
            await asyncio.wait({acquire, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not acquire.done():
                acquire.cancel()
                ticket.abandon()
                return None
            queue = self.start(ticket, request)
            pieces: list[str] = []
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    ticket.abandon()
                    return None
                item = getter.result()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise _generation_error(item)
                pieces.append(item)
        finally:
            watcher.cancel()
        return {"content": "".join(pieces), "usage": ticket.usage}

    async def events(self, request: ChatRequest, ticket: _Ticket) -> AsyncIterator[bytes]:
        """Server-sent events of a streamed reply. Starlette cancels this when the client goes away."""
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return _event({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                           "model": self.model_id, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        try:
            await ticket.acquire()
            queue = self.start(ticket, request)
            yield chunk({"role": "assistant", "content": ""})
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):  # headers are sent: report in the stream, then end it
                    yield _event(_generation_error(item).body())
                    break
                yield chunk({"content": item})
            else:
                usage = ticket.usage
                yield chunk({}, usage.finish_reason)
                if request.include_usage:
                    yield _event({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                  "model": self.model_id, "choices": [], "usage": _usage_json(usage)})
            yield b"data: [DONE]\n\n"
        finally:
            ticket.abandon()


def _generation_error(exc: BaseException) -> ApiError:
    if isinstance(exc, UserError):
        return ApiError(400, str(exc))
    log.error("generation failed", exc_info=exc)
    return ApiError(500, "generation failed; the server's log has the details.", type="server_error")


async def _disconnected(http: Request) -> None:
    """Return once the client has closed its connection."""
    while not await http.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)


def _event(payload: dict[str, Any]) -> bytes:
    import json

    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


def _usage_json(usage: Any) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def context_length(engine: Any) -> int | None:
    """Tokens the model can attend to: its position embeddings, or the tokenizer's stated limit."""
    limits = [getattr(engine.model.config, "max_position_embeddings", None),
              getattr(engine.tokenizer, "model_max_length", None)]
    known = [int(n) for n in limits if isinstance(n, int) and 0 < n < 10**8]  # tokenizers say 1e30 for "unknown"
    return min(known) if known else None


async def read_body(http: Request) -> bytes:
    """The body, refused with 413 past MAX_BODY_BYTES (announced or counted while it arrives)."""
    length = http.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise ApiError(400, "the Content-Length header is not a number.")
        if int(length) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is {int(length)} bytes; at most {MAX_BODY_BYTES} are accepted.",
                           code="request_too_large")
    chunks, size = [], 0
    async for data in http.stream():
        size += len(data)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes, the most accepted.",
                           code="request_too_large")
        chunks.append(data)
    return b"".join(chunks)


def build_app(server: ApiServer) -> Any:
    """The FastAPI app: routes, the key check, and errors as OpenAI error objects."""
    class Stream(StreamingResponse):
        """Server-sent events whose `on_close` runs however the response ends, even unstarted."""

        def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
            # Content-Type given as a header, so Starlette does not add "; charset=utf-8".
            super().__init__(content, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            self.on_close = on_close

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.on_close()

    def authorize(request: Request) -> None:
        if not server.api_key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {server.api_key}".encode()):
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <API_KEY>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="tunesmith", summary="OpenAI-compatible chat completions over one fine-tuned model",
                  docs_url="/docs", redoc_url=None)
    keyed = [Depends(authorize)]

    def card() -> dict[str, Any]:
        return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "tunesmith"}

    @app.get("/v1/models", dependencies=keyed)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id}", dependencies=keyed)
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != server.model_id:
            raise ApiError(404, f"no such model; this server serves '{server.model_id}'.", param="model",
                           code="model_not_found")
        return card()

    body_ref = {"$ref": "#/components/schemas/ChatCompletionRequest"}

    @app.post("/v1/chat/completions", dependencies=keyed, response_model=None, openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": body_ref}}}})
    async def chat_completions(http: Request) -> Any:
        request = parse_chat_request(parse_json(await read_body(http)))
        ticket = server.admit()  # before the tokenizing, so a flood is refused cheaply
        try:
            await asyncio.to_thread(server.preflight, request)
        except BaseException:
            ticket.abandon()
            raise
        if request.stream:
            return Stream(server.events(request, ticket), on_close=ticket.abandon)
        reply = await server.complete(http, request, ticket)
        if reply is None:  # nobody is listening any more
            return Response(status_code=499)
        usage = reply["usage"]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": server.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply["content"]},
                             "finish_reason": usage.finish_reason}],
                "usage": _usage_json(usage)}

    def answer(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return answer(exc)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        path = request.url.path
        if exc.status_code == 404:
            return answer(ApiError(404, f"no such endpoint: {request.method} {path}; served: GET /v1/models, "
                                        "POST /v1/chat/completions, GET /docs.", code="not_found"))
        if exc.status_code == 405:
            return answer(ApiError(405, f"{request.method} is not allowed on {path}.", code="method_not_allowed"))
        return answer(ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return answer(ApiError(400, f"invalid request: {exc.errors()[0].get('msg', 'malformed')}."))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:  # a server bug, never client input
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return answer(ApiError(500, "internal server error; the server's log has the details.",
                               type="server_error"))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version="1", summary=app.summary, routes=app.routes)
            body = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(body.pop("$defs", {}))
            schemas["ChatCompletionRequest"] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, opened before the server starts so a busy port is a plain error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise UserError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}",
                        hint="give --host an address of this machine (or API_HOST).") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)  # a burst of new connections waits instead of being reset
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                        hint="choose another --port (or API_PORT), or stop the program using it.") from None
    sock.set_inheritable(True)
    return sock


def make_server(engine: Any, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE) -> ApiServer:
    return ApiServer(_listen(host, port), engine, api_key=api_key or None, model_id=engine.source.name,
                     max_queue=max_queue)


def _env_int(name: str, default: int, low: int, high: int) -> int:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"environment variable {name}={text!r} is not a whole number.") from None
    if not low <= value <= high:
        raise UserError(f"environment variable {name}={value} is outside {low}-{high}.")
    return value


def _env_port() -> int:
    return _env_int("API_PORT", DEFAULT_PORT, 0, 65535)


def serve(cfg: RunConfig, host: str | None = None, port: int | None = None) -> None:
    """Load the model and answer requests until interrupted. Port 0 picks a free port."""
    from transformers.utils import logging as hf_logging


    host = host or os.environ.get("API_HOST") or DEFAULT_HOST
    port = _env_port() if port is None else port
    max_queue = _env_int("API_MAX_QUEUE", DEFAULT_MAX_QUEUE, 0, 100_000)
    api_key = os.environ.get("API_KEY") or None
    hf_logging.disable_progress_bar()
    engine = ChatEngine(cfg)
    server = make_server(engine, host, port, api_key=api_key, max_queue=max_queue)
    bound_host, bound_port = server.server_address
    print(f"Loaded {engine.description}.", file=sys.stderr)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: listening on {host} without API_KEY: anyone who can reach this machine can use it.",
              file=sys.stderr)
    print(f"Serving an OpenAI-compatible API at http://{bound_host}:{bound_port}/v1 (model '{server.model_id}'"
          f"{', API key required' if api_key else ''}; schema at /docs). Ctrl-C stops.", file=sys.stderr, flush=True)
    run_uvicorn(server)


def run_uvicorn(server: ApiServer) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
