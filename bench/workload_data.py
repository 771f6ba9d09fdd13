"""The alpaca rows the benchmarks train on: the repository's data/alpaca_demo.json unless told otherwise.

That set has 40 rows; a workload that asks for more repeats them in order, so step counts and batch
shapes stay those of the workload. `--data FILE` (any alpaca-style JSON list, such as a larger demo set
kept beside the repository) replaces it; the figures in RESULTS.md were measured on LLaMA-Factory's
alpaca_en_demo.json (999 distinct rows), so pass that file to compare with them.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALPACA_DEMO = REPO / "data" / "alpaca_demo.json"


def alpaca_rows(count: int, source: str | Path = ALPACA_DEMO) -> list[dict]:
    """The first `count` rows of the alpaca JSON file `source`, cycling when it holds fewer."""
    rows = json.loads(Path(source).read_text(encoding="utf-8"))
    if not isinstance(rows, list) or not rows:
        raise SystemExit(f"{source}: expected a non-empty JSON list of alpaca rows")
    return [rows[i % len(rows)] for i in range(count)]


def write_alpaca_dataset(folder: Path, name: str, rows: list[dict]) -> Path:
    """rows as `name`.json in folder, registered under `name` in its dataset_info.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(rows), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({name: {"file_name": f"{name}.json"}}), encoding="utf-8")
    return folder
