"""`tunesmith api`: a real server subprocess driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from helpers import start_api_server

openai = pytest.importorskip("openai")

API_KEY = "test-key-123"
MESSAGES = [{"role": "user", "content": "Hello, who are you?"}]


class Server:
    def __init__(self, proc: subprocess.Popen, host: str, port: int, log: list[str]) -> None:
        self.proc, self.host, self.port, self.log = proc, host, port, log
        self.base_url = f"http://{host}:{port}/v1"

    def client(self, key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=120)

    def raw(self, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers={"Authorization": f"Bearer {API_KEY}", **(headers or {})})
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            conn.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, tiny_lora_run):
    folder = tmp_path_factory.mktemp("api")
    cfg = folder / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": str(tiny_model_dir), "output_dir": str(tiny_lora_run),
                                   "do_sample": False, "max_new_tokens": 8}))
    env = {**os.environ, "API_KEY": API_KEY, "OMP_NUM_THREADS": "1"}
    env.pop("API_HOST", None)
    proc, host, port, log = start_api_server(cfg, env)
    assert host == "127.0.0.1"  # the safe default bind address
    yield Server(proc, host, port, log)
    proc.terminate()
    proc.wait(timeout=30)
    assert not [line for line in log if "Traceback" in line or "internal error" in line], "".join(log)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_lora_run):
    from tunesmith.config import load_config
    from tunesmith.infer import ChatEngine

    return ChatEngine(load_config(None, {"model_name_or_path": str(tiny_model_dir),
                                         "output_dir": str(tiny_lora_run), "do_sample": False,
                                         "max_new_tokens": 8}))


def test_models_list(server, tiny_lora_run):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [tiny_lora_run.name]


def test_plain_and_streamed_reply(server, engine):
    client = server.client()
    reply = client.chat.completions.create(model="any", messages=MESSAGES, max_tokens=8, temperature=0)
    text = reply.choices[0].message.content
    assert text == engine.chat(MESSAGES)  # the run's adapter answers, through the same engine
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(engine.prompt_ids(MESSAGES))
    assert reply.usage.completion_tokens == 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8

    chunks = list(client.chat.completions.create(model="any", messages=MESSAGES, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for d in deltas if d) >= 2  # streamed in pieces
    assert "".join(deltas) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8


def test_sse_wire_format_ends_with_done(server):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    body = json.dumps({"messages": MESSAGES, "stream": True, "max_tokens": 2}).encode()
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    events = [e for e in response.read().decode().split("\n\n") if e]
    conn.close()
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][len("data: "):])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_stop_and_max_tokens(server, engine):
    client = server.client()
    full = engine.chat(MESSAGES)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = client.chat.completions.create(model="m", messages=MESSAGES, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    one = client.chat.completions.create(model="m", messages=MESSAGES, temperature=0, max_tokens=1)
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"


def test_wrong_or_missing_key_gets_401(server):
    with pytest.raises(openai.AuthenticationError) as info:
        server.client(key="wrong").chat.completions.create(model="m", messages=MESSAGES)
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key"
    status, body = server.raw("GET", "/v1/models", headers={"Authorization": ""})
    assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}


def test_concurrent_requests_all_complete(server, engine):
    client = server.client()
    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(8)]

    def ask(messages):
        return client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0)

    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(ask, prompts))
    assert [r.choices[0].message.content for r in replies] == [engine.chat(p) for p in prompts]
    assert server.proc.poll() is None
    assert server.client().models.list().data  # still serving


def test_malformed_bodies_get_openai_style_400(server):
    headers = {"Content-Type": "application/json"}
    status, body = server.raw("POST", "/v1/chat/completions", b"{not json", headers)
    assert status == 400
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and "not valid JSON" in body["error"]["message"]

    cases = [
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": MESSAGES, "temperature": "hot"}, "temperature"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
         "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x"}] * 300}, "messages"),
    ]
    for payload, param in cases:
        status, body = server.raw("POST", "/v1/chat/completions", json.dumps(payload).encode(), headers)
        assert (status, body["error"]["param"]) == (400, param), payload

    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="m", messages=[{"role": "wizard", "content": "hi"}])


def test_limits_and_unknown_paths(server):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 1_100_000}]}).encode()
    status, body = server.raw("POST", "/v1/chat/completions", big, {"Content-Type": "application/json"})
    assert status == 413 and body["error"]["code"] == "request_too_large"
    long = json.dumps({"messages": [{"role": "user", "content": "word " * 3000}]}).encode()
    status, body = server.raw("POST", "/v1/chat/completions", long, {"Content-Type": "application/json"})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, body = server.raw("GET", "/v1/files/../../etc/passwd")
    assert status == 404 and "no such endpoint" in body["error"]["message"]


def test_port_from_environment(monkeypatch):
    from tunesmith.api import _env_port
    from tunesmith.errors import UserError

    monkeypatch.setenv("API_PORT", "8123")
    assert _env_port() == 8123
    monkeypatch.setenv("API_PORT", "eighty")
    with pytest.raises(UserError, match="API_PORT"):
        _env_port()


def test_port_in_use_is_a_user_error(server, engine):
    from tunesmith.api import make_server
    from tunesmith.errors import UserError

    with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        make_server(engine, "127.0.0.1", server.port)

