"""Rows from data files: JSON (a list, or one object per line), JSONL, CSV, Parquet and Arrow.

Each row comes with its index in the file and, for text formats, the line it starts on, so a
problem can be reported as "file.json line 57 (row 12)". Files are only ever read.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


@dataclass
class DataProblem:
    """One thing wrong with the data: where it is, what it is, and how to fix it.

    row counts from 0 within the file; line counts from 1 and is None where the format has none.
    column is the data column or key at fault, if any.
    """

    file: Path | str
    row: int | None
    line: int | None
    column: str | None
    message: str
    fix: str = ""

    def where(self) -> str:
        parts = [str(self.file)]
        if self.line is not None:
            parts.append(f"line {self.line}")
        if self.row is not None:
            parts.append(f"(row {self.row})" if self.line is not None else f"row {self.row}")
        text = " ".join(parts)
        if self.column:
            text += f", column '{self.column}'"
        return text

    def __str__(self) -> str:
        text = f"{self.where()}: {self.message}"
        return f"{text}\n    fix: {self.fix}" if self.fix else text


class DataFileError(UserError):
    """A whole file cannot be read (syntax, encoding, layout); no row of it can be used."""

    def __init__(self, problem: DataProblem) -> None:
        super().__init__(str(problem))
        self.problem = problem


# (row index in file, line number or None, the row or the problem that kept it from being read)
Record = tuple[int, int | None, "dict[str, Any] | DataProblem"]


def iter_file_records(path: Path) -> Iterator[Record]:
    """Every row of one data file in order; rows that cannot be parsed come as a DataProblem.

    A problem that spoils the whole file (bad JSON list, bytes that are not UTF-8 in a JSON list
    or CSV) raises DataFileError instead.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_records(path, path.read_bytes())
    elif suffix == ".json":
        raw = path.read_bytes()
        head = raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
        # A .json file holding one object per line is JSON Lines (as the `datasets` json loader reads it).
        yield from _jsonl_records(path, raw) if head == b"{" else _json_list_records(path, raw)
    elif suffix == ".csv":
        yield from _csv_records(path, path.read_bytes())
    elif suffix in (".parquet", ".arrow"):
        yield from _arrow_records(path)
    else:
        raise DataFileError(DataProblem(path, None, None, None, f"unsupported file type '{suffix}'",
                                        "use .json, .jsonl, .csv, .parquet or .arrow"))


def read_rows(spec_or_path: Any) -> Iterator[tuple[int, int | None, dict[str, Any]]]:
    """(row index, line number if known, row) for a file or every file of a DatasetSpec.

    The index counts from 0 across all files of a dataset. The first problem raises UserError.
    """
    paths = [Path(spec_or_path)] if isinstance(spec_or_path, str | Path) else list(spec_or_path.paths)
    index = 0
    for path in paths:
        for _, line, row in iter_file_records(path):
            if isinstance(row, DataProblem):
                raise UserError(str(row))
            yield index, line, row
            index += 1


def _decode(path: Path, raw: bytes, line_offset: int = 0, byte_offset: int = 0) -> str:
    """The text of raw, or a DataProblem-carrying error that names the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8-sig" if byte_offset == 0 else "utf-8")
    except UnicodeDecodeError as exc:
        raise DataFileError(_not_utf8(path, raw, exc, line_offset, byte_offset)) from None


def _not_utf8(path: Path, raw: bytes, exc: UnicodeDecodeError, line_offset: int, byte_offset: int,
              row: int | None = None) -> DataProblem:
    line = line_offset + raw.count(b"\n", 0, exc.start) + 1
    line_start = raw.rfind(b"\n", 0, exc.start) + 1
    bad = raw[exc.start:exc.end]
    return DataProblem(path, row, line, None,
                       f"bytes that are not UTF-8 at byte offset {byte_offset + exc.start} "
                       f"(byte {exc.start - line_start + 1} of the line): {bad!r}",
                       "save the file as UTF-8 (for example: iconv -f latin1 -t utf-8 in > out)")


def _jsonl_records(path: Path, raw: bytes) -> Iterator[Record]:
    index = 0
    offset = 0
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        start = offset
        offset += len(chunk) + 1
        if number == 1 and chunk.startswith(b"\xef\xbb\xbf"):
            chunk = chunk[3:]
            start += 3
        if not chunk.strip():
            continue
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield index, number, _not_utf8(path, chunk, exc, number - 1, start, row=index)
            index += 1
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            yield index, number, DataProblem(
                path, index, number, None, f"invalid JSON at column {exc.colno}: {exc.msg}",
                "each line must be one complete JSON object; fix the syntax there")
        else:
            yield index, number, row if isinstance(row, dict) else _not_an_object(path, index, number, row)
        index += 1


def _not_an_object(path: Path, index: int, line: int | None, row: Any) -> DataProblem:
    return DataProblem(path, index, line, None, f"a row must be a JSON object, found {type(row).__name__}",
                       'write each row as {"column": value, ...}')


def _json_list_records(path: Path, raw: bytes) -> Iterator[Record]:
    text = _decode(path, raw)

    def fail(pos: int, message: str, fix: str) -> DataFileError:
        line = text.count("\n", 0, pos) + 1
        column = pos - (text.rfind("\n", 0, pos) + 1) + 1
        return DataFileError(DataProblem(path, None, line, None, f"invalid JSON at column {column}: {message}", fix))

    pos = _WHITESPACE.match(text, 1 if text.startswith("\ufeff") else 0).end()
    if pos == len(text):
        raise DataFileError(DataProblem(path, None, None, None, "the file is empty",
                                        "write the rows as a JSON list: [{...}, {...}]"))
    if text[pos] != "[":
        raise fail(pos, "expected a list of rows ('[') or one JSON object per line",
                   "write the rows as a JSON list [{...}, {...}], or as JSON Lines")
    pos = _WHITESPACE.match(text, pos + 1).end()
    line, counted_to = 1, 0
    index = 0
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            try:
                row, end = _DECODER.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise fail(exc.pos, exc.msg, "fix the JSON syntax there (a missing comma, quote or bracket "
                                             "is the usual cause)") from None
            line += text.count("\n", counted_to, pos)
            counted_to = pos
            yield index, line, row if isinstance(row, dict) else _not_an_object(path, index, line, row)
            index += 1
            pos = _WHITESPACE.match(text, end).end()
            if pos < len(text) and text[pos] == ",":
                pos = _WHITESPACE.match(text, pos + 1).end()
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            raise fail(pos, "expected ',' or ']' after a row", "separate rows with commas and end the list with ']'")
    pos = _WHITESPACE.match(text, pos).end()
    if pos != len(text):
        raise fail(pos, "extra data after the end of the list", "remove what follows the closing ']'")


def _csv_records(path: Path, raw: bytes) -> Iterator[Record]:
    text = _decode(path, raw)
    # Answers longer than the csv module's default field limit (128 KiB) are ordinary data here.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        names = [h.strip() for h in header]
        index = 0
        last_line = reader.line_num
        for fields in reader:
            start_line, last_line = last_line + 1, reader.line_num
            if not any(f.strip() for f in fields):
                continue
            if len(fields) != len(names):
                yield index, start_line, DataProblem(
                    path, index, start_line, None,
                    f"the row has {len(fields)} fields but the header has {len(names)} ({', '.join(names)})",
                    "quote fields that contain commas or line breaks, and give every row one field per column")
            else:
                yield index, start_line, dict(zip(names, fields, strict=True))
            index += 1
    except csv.Error as exc:
        raise DataFileError(DataProblem(path, None, reader.line_num, None, f"invalid CSV: {exc}",
                                        "check the quoting on that line")) from None


def _arrow_records(path: Path) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            table = pq.read_table(path)
        else:
            with pa.memory_map(str(path)) as source:
                try:
                    table = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    source.seek(0)
                    table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise DataFileError(DataProblem(path, None, None, None, f"cannot be read: {exc}",
                                        "check that it is a complete, valid file of that type")) from None
    for index, row in enumerate(table.to_pylist()):
        yield index, None, row
