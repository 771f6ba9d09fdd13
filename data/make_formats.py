"""Writes alpaca_demo.json's rows again as JSON Lines, CSV and Parquet, so one dataset exists in every file type.

Run it after editing alpaca_demo.json (`python data/make_formats.py`); the outputs are committed, so a
clone needs no step. All four files hold the same rows in the same order, which the tests check.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "alpaca_demo.json"
COLUMNS = ("instruction", "input", "output")


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_csv(rows: list[dict[str, str]], path: Path) -> None:
    # Quote every cell: answers hold commas, quotes and newlines.
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=COLUMNS, quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def write_parquet(rows: list[dict[str, str]], path: Path) -> None:
    schema = pa.schema([(name, pa.string()) for name in COLUMNS])
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path, compression="zstd")


def main() -> None:
    rows = json.loads(SOURCE.read_text(encoding="utf-8"))
    for index, row in enumerate(rows):
        if tuple(row) != COLUMNS or not all(isinstance(row[c], str) for c in COLUMNS):
            raise SystemExit(f"{SOURCE} row {index}: expected the string columns {', '.join(COLUMNS)} in that order")
    write_jsonl(rows, HERE / "alpaca_demo.jsonl")
    write_csv(rows, HERE / "alpaca_demo.csv")
    write_parquet(rows, HERE / "alpaca_demo.parquet")
    print(f"wrote {len(rows)} rows as alpaca_demo.jsonl, alpaca_demo.csv and alpaca_demo.parquet in {HERE}")


if __name__ == "__main__":
    main()
