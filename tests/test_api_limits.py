"""`tunesmith api` against hostile and impatient clients: a real server subprocess, raw HTTP.

Malformed bodies of every kind get a 400 naming the field (never a 500), limits answer 401/413/429,
max_tokens is capped by the model's context, and a client that hangs up frees the engine at once.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import time

import pytest
import yaml
from conftest import build_tiny_model
from helpers import start_api_server

API_KEY = "limits-key"
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
CONTEXT = 2048  # the tiny model's max_position_embeddings: a reply that fills it takes seconds


class Server:
    def __init__(self, proc, host: str, port: int, log: list[str]) -> None:
        self.proc, self.host, self.port, self.log = proc, host, port, log

    def post(self, body: bytes | dict, headers: dict[str, str] | None = None,
             path: str = "/v1/chat/completions") -> tuple[int, dict[str, str], bytes]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            conn.request("POST", path, body=data, headers={"Authorization": f"Bearer {API_KEY}",
                                                             "Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def open_request(self, body: dict) -> socket.socket:
        """Send a request on a raw socket and leave it unread: the caller hangs up when it likes."""
        data = json.dumps(body).encode()
        sock = socket.create_connection((self.host, self.port), timeout=60)
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                     f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        return sock


def error_of(status: int, data: bytes) -> dict:
    body = json.loads(data)
    assert set(body["error"]) == {"message", "type", "param", "code"}, (status, body)
    return body["error"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_dir):
    folder = tmp_path_factory.mktemp("api-limits")
    model_dir = build_tiny_model(folder / "model", default_model_dir, max_positions=CONTEXT)
    cfg = folder / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": str(model_dir), "do_sample": False,
                                   "max_new_tokens": 8}))
    env = {**os.environ, "API_KEY": API_KEY, "API_MAX_QUEUE": "1", "OMP_NUM_THREADS": "1"}
    for name in ("API_HOST", "API_PORT"):
        env.pop(name, None)
    proc, host, port, log = start_api_server(cfg, env)
    yield Server(proc, host, port, log)
    proc.terminate()
    proc.wait(timeout=30)
    assert not [line for line in log if "Traceback" in line or "internal error" in line], "".join(log)


# -- malformed input ------------------------------------------------------------------------------

BAD_VALUES = [None, True, False, -1, 0, 3, -0.5, 2.5, "", "x", "\ud800", [], {}, [None], {"a": []},
              float("nan"), float("inf"), float("-inf"), 1e-45, 10**400, -(10**400), 1e308, [[[[]]]]]
FIELDS = ["messages", "model", "stream", "stream_options", "stop", "temperature", "top_p", "max_tokens",
          "max_completion_tokens", "n", "tools"]


def fuzzed_body(rng: random.Random) -> bytes:
    """One body from a family of malformed ones: garbage, truncated JSON, wrong types and values,
    broken messages, deep nesting, other top-level values."""
    valid = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randint(1, 300))
    if kind == 1:
        text = json.dumps({**valid, "temperature": 0.5, "stop": ["a", "b"]})
        return text[: rng.randrange(1, len(text))].encode()
    body = json.loads(json.dumps(valid))
    value = rng.choice(BAD_VALUES)
    if kind == 2:
        name = rng.choice(FIELDS)
        if name.startswith("max_") and isinstance(value, int) and value > 8:
            value = -value  # a huge valid max_tokens would only make the test slow
        body[name] = value
    elif kind == 3:
        where = rng.choice(["role", "content", "message", "part"])
        if where == "message":
            body["messages"] = [value]
        elif where == "part":
            body["messages"][0]["content"] = [{"type": rng.choice(["text", "image_url", value]), "text": value}]
        else:
            body["messages"][0][where] = value
    elif kind == 4:
        depth = rng.choice([33, 40, 500, 5000, 100_000])
        nested = "[" * depth + "]" * depth
        return json.dumps(valid).replace('"max_tokens": 2', f'"max_tokens": 2, "{rng.choice(FIELDS)}": {nested}') \
            .encode()
    else:
        body = value
    return json.dumps(body).encode()  # NaN and Infinity go out as JS literals, which Python's json reads


def test_two_hundred_malformed_bodies_never_get_a_500(server):
    rng = random.Random(1234)
    statuses = []
    for _ in range(200):
        body = fuzzed_body(rng)
        status, _, data = server.post(body)
        statuses.append(status)
        assert status in (200, 400), (status, body[:200], data[:300])
        if status == 400:
            assert error_of(status, data)["type"] == "invalid_request_error"
    assert statuses.count(400) >= 150  # the generator really produces bad bodies
    assert server.proc.poll() is None


def test_errors_name_the_field_and_never_echo_it(server):
    cases = [
        ({"messages": MESSAGES, "temperature": 3}, "temperature"),
        ({"messages": MESSAGES, "top_p": 0}, "top_p"),
        ({"messages": MESSAGES, "top_p": 1.5}, "top_p"),
        ({"messages": MESSAGES, "max_tokens": 2.5}, "max_tokens"),
        ({"messages": MESSAGES, "stream": "yes"}, "stream"),
        ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": MESSAGES, "n": 2}, "n"),
        ({"messages": [{"role": "user", "content": "secret-value-1", "x": 1}, {"role": "user"}]},
         "messages[1].content"),
    ]
    for payload, param in cases:
        status, _, data = server.post(payload)
        error = error_of(status, data)
        assert (status, error["param"]) == (400, param), (payload, error)
        assert param in error["message"] and "secret-value" not in error["message"]


def test_nan_and_infinite_temperature_are_400(server):
    for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
        raw = f'{{"messages": {json.dumps(MESSAGES)}, "temperature": {literal}}}'.encode()
        status, _, data = server.post(raw)
        error = error_of(status, data)
        assert (status, error["param"]) == (400, "temperature"), literal
        assert "finite" in error["message"]


def test_tiny_temperature_is_greedy(server):
    greedy = server.post({"messages": MESSAGES, "temperature": 0, "max_tokens": 6})
    tiny = server.post({"messages": MESSAGES, "temperature": 1e-45, "max_tokens": 6})
    assert greedy[0] == tiny[0] == 200, tiny
    text = json.loads(greedy[2])["choices"][0]["message"]["content"]
    assert text and json.loads(tiny[2])["choices"][0]["message"]["content"] == text


def test_deeply_nested_json_is_refused(server):
    deep = b"[" * 100_000 + b"]" * 100_000
    status, _, data = server.post(deep)
    assert status == 400 and "nested deeper than 32" in error_of(status, data)["message"]
    nested: object = "x"
    for _ in range(40):
        nested = {"a": nested}
    status, _, data = server.post({"messages": MESSAGES, "metadata": nested})
    assert status == 400 and "nested deeper" in error_of(status, data)["message"]


def test_lone_surrogate_is_400(server):
    raw = b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'
    status, _, data = server.post(raw)
    assert status == 400 and "surrogate" in error_of(status, data)["message"]


def test_oversize_bodies_get_413(server):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 2_000_000}]}).encode()
    status, _, data = server.post(big)
    assert status == 413 and error_of(status, data)["code"] == "request_too_large"
    # Without Content-Length (chunked upload) the size is counted as the body arrives.
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=iter([b"[" + b" " * 600_000, b" " * 600_000, b"]"]),
                 headers={"Authorization": f"Bearer {API_KEY}"}, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and error_of(413, response.read())["code"] == "request_too_large"
    conn.close()


def test_wrong_or_missing_key_gets_401(server):
    for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": ""}, {"Authorization": "Basic x"}):
        status, response_headers, data = server.post({"messages": MESSAGES}, headers)
        assert status == 401 and error_of(status, data)["code"] == "invalid_api_key"
        assert response_headers["www-authenticate"] == "Bearer"


def test_openapi_schema_is_served(server):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("GET", "/openapi.json")
    schema = json.loads(conn.getresponse().read())
    conn.request("GET", "/docs")
    docs = conn.getresponse()
    assert docs.status == 200 and b"openapi.json" in docs.read()
    conn.close()
    body = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert {"messages", "temperature", "top_p", "max_tokens", "stream"} <= set(body["properties"])
    ref = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert ref == {"$ref": "#/components/schemas/ChatCompletionRequest"}


# -- long generations -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_reply(server):
    """A reply asked for far more tokens than the context holds, and how long it took."""
    started = time.monotonic()
    status, _, data = server.post({"messages": MESSAGES, "max_tokens": 10**9})
    seconds = time.monotonic() - started
    assert status == 200, data
    return json.loads(data), seconds


def test_max_tokens_is_capped_by_the_context(long_reply):
    reply, _ = long_reply
    usage = reply["usage"]
    assert usage["total_tokens"] <= CONTEXT
    if reply["choices"][0]["finish_reason"] == "length":  # not cut short by an end-of-turn token
        assert usage["total_tokens"] == CONTEXT


def time_next_request(server) -> float:
    """Seconds until a short request is answered; a 429 (the hung-up requests still counted) is retried."""
    started = time.monotonic()
    while True:
        status, _, data = server.post({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        if status != 429 or time.monotonic() - started > 10:
            break
        time.sleep(0.05)
    assert status == 200, data
    return time.monotonic() - started


def test_disconnect_frees_the_engine_and_a_full_queue_gets_429(server, long_reply):
    _, full_seconds = long_reply
    # Without cancellation the next request would wait for the queued one's whole generation at least.
    assert full_seconds > 2.0  # twice the bound below: a freed slot is told apart from a finished reply
    running = server.open_request({"messages": MESSAGES, "max_tokens": 10**9})
    time.sleep(0.5)  # it holds the engine now
    waiting = server.open_request({"messages": MESSAGES, "max_tokens": 10**9})
    time.sleep(0.3)  # and this one the single queue place
    status, headers, data = server.post({"messages": MESSAGES})
    assert status == 429 and error_of(status, data)["code"] == "rate_limit_exceeded"
    assert int(headers["retry-after"]) >= 1
    running.close()
    waiting.close()
    assert time_next_request(server) < 1.0


def test_disconnect_of_a_stream_frees_the_engine(server, long_reply):
    sock = server.open_request({"messages": MESSAGES, "max_tokens": 10**9, "stream": True})
    assert b"text/event-stream" in sock.recv(4096)  # headers, then the first events
    time.sleep(0.3)
    sock.close()
    assert time_next_request(server) < 1.0
