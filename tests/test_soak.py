"""Load on the API server (`make soak`; excluded from the quick suite): 20 concurrent clients and
then 500 sequential requests against a real `tunesmith api` process on a tiny model, with no
error and the server's resident memory growing by less than a stated bound."""

from __future__ import annotations

import http.client
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from helpers import start_api_server

pytestmark = pytest.mark.soak

CLIENTS = 20
REQUESTS_PER_CLIENT = 10
SEQUENTIAL = 500
# Allowed growth of the server's RSS from after the warm-up to the end. The allocator keeps some
# freed memory and the thread pool's stacks; a leak of even 100 KiB a request would pass it.
MAX_RSS_GROWTH_MIB = 48


def rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


@pytest.fixture()
def server(tmp_path, tiny_model_dir, tiny_lora_run):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": str(tiny_model_dir), "output_dir": str(tiny_lora_run),
                                   "do_sample": False, "max_new_tokens": 6}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("API_KEY", "API_HOST", "API_PORT"):
        env.pop(name, None)
    proc, host, port, log = start_api_server(cfg, env)
    yield proc, host, int(port), log
    proc.terminate()
    proc.wait(timeout=30)


def chat(conn: http.client.HTTPConnection, i: int, stream: bool = False) -> tuple[int, bytes]:
    body = {"messages": [{"role": "user", "content": f"Request number {i}: say something."}], "stream": stream}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


def test_concurrent_and_sequential_load_without_errors_or_memory_growth(server):
    proc, host, port, log = server
    conn = http.client.HTTPConnection(host, port, timeout=120)
    for i in range(20):  # warm-up: first allocations, caches, the thread machinery
        assert chat(conn, i)[0] == 200
    conn.close()
    before = rss_mib(proc.pid)
    started = time.monotonic()

    def client(k: int) -> list[int]:
        c = http.client.HTTPConnection(host, port, timeout=300)
        try:
            statuses = []
            for j in range(REQUESTS_PER_CLIENT):
                status, data = chat(c, k * 100 + j, stream=j % 2 == 1)
                assert data.endswith(b"data: [DONE]\n\n") if j % 2 else json.loads(data)["choices"]
                statuses.append(status)
            return statuses
        finally:
            c.close()

    with ThreadPoolExecutor(CLIENTS) as pool:
        statuses = [s for result in pool.map(client, range(CLIENTS)) for s in result]
    concurrent_seconds = time.monotonic() - started
    assert statuses == [200] * (CLIENTS * REQUESTS_PER_CLIENT)
    after_concurrent = rss_mib(proc.pid)

    started = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=120)
    for i in range(SEQUENTIAL):
        if i % 50 == 0:  # also open and close connections, not only keep one alive
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=120)
        status, data = chat(conn, i)
        assert status == 200, data
    conn.close()
    sequential_seconds = time.monotonic() - started
    after = rss_mib(proc.pid)

    print(f"\nAPI soak: {CLIENTS} clients x {REQUESTS_PER_CLIENT} requests in {concurrent_seconds:.1f} s, "
          f"{SEQUENTIAL} sequential in {sequential_seconds:.1f} s ({sequential_seconds / SEQUENTIAL * 1000:.0f} ms "
          f"each); server RSS {before:.1f} MiB after warm-up, {after_concurrent:.1f} MiB after the concurrent "
          f"phase, {after:.1f} MiB at the end (growth {after - before:+.1f} MiB, bound {MAX_RSS_GROWTH_MIB} MiB)")
    assert proc.poll() is None
    assert after - before < MAX_RSS_GROWTH_MIB
    assert not [line for line in log if "Traceback" in line or "internal error" in line], "".join(log[-20:])
