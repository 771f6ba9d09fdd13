"""Small builders shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tunesmith.cpu import FeatureSet


def make_dataset(folder: Path, entries: dict[str, dict], files: dict[str, str | bytes | list]) -> Path:
    """A dataset_dir with the given dataset_info.json entries and files (lists are written as a JSON list)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_info.json").write_text(json.dumps(entries), encoding="utf-8")
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, list):
            content = json.dumps(content, ensure_ascii=False, indent=2)
        if isinstance(content, str):
            content = content.encode("utf-8")
        path.write_bytes(content)
    return folder


def identity_dataset(folder: Path, repo_data: Path, rows: int = 12) -> Path:
    """The first rows of data/identity.json, placeholders filled, registered as 'ident'."""
    data = json.loads((repo_data / "identity.json").read_text(encoding="utf-8"))[:rows]
    for row in data:
        row["output"] = row["output"].replace("{{name}}", "Tunesmith").replace("{{author}}", "the tunesmith team")
    return make_dataset(folder, {"ident": {"file_name": "ident.json"}}, {"ident.json": data})


def start_api_server(cfg: Path, env: dict[str, str],
                     timeout: float = 240) -> tuple[subprocess.Popen, str, int, list[str]]:
    """`tunesmith api cfg --port 0` as a real subprocess; returns (process, host, port, its stderr lines)."""
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "api", str(cfg), "--port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    log: list[str] = []
    ready = threading.Event()

    def drain() -> None:  # keep reading so the server never blocks on a full pipe
        for line in proc.stderr:
            log.append(line)
            if "Serving an OpenAI-compatible API" in line:
                ready.set()

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("server did not start:\n" + "".join(log))
    host, port = re.search(r"http://([\d.]+):(\d+)/v1", "".join(log)).groups()
    return proc, host, int(port), log


def as_tuples(samples) -> list[tuple]:
    """(input_ids, labels, source, truncated) of each sample, for comparing encodings."""
    return [(s.input_ids, s.labels, s.source, s.truncated) for s in samples]


# Three plans for the fp32 products: on oneDNN (an AMD EPYC's with AVX-512), on torch's BLAS (an
# Intel Xeon without AMX) and on the BLAS but for the output head's (AVX2 only), so that every path
# of the training forwards and the loss runs on every machine.
ONEDNN_CPU = FeatureSet("Test CPU", "AMD", frozenset({"avx2", "avx512f", "avx512_bf16"}))
BLAS_CPU = FeatureSet("Test CPU", "Intel", frozenset({"avx2", "avx512f", "avx512_bf16"}))
HEAD_ONEDNN_CPU = FeatureSet("Test CPU", "AMD", frozenset({"avx2"}))
