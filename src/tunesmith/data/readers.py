"""Rows from data files: JSON (a list, or one object per line), JSONL, CSV, Parquet and Arrow.

Each row comes with its index in the file and, for text formats, the line it starts on, so a
problem can be reported as "file.json line 57 (row 12)". Files are only ever read.
"""

from __future__ import annotations

import csv
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


def iter_file_records(path: Path, *, raw_lines: bool = False) -> Iterator[Record]:
    """Every row of one data file in order, read in a stream (memory bounded by one block of
    rows, not the file); rows that cannot be parsed come as a DataProblem.

    With raw_lines, JSON Lines rows come as RawLine (the line's bytes) for `parse_raw_line` to
    parse elsewhere (in a tokenizer worker). A problem that spoils the whole file (bad JSON list,
    bytes that are not UTF-8 in a JSON list or CSV) raises DataFileError instead.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_records(path, raw_lines)
    elif suffix == ".json":
        with open(path, "rb") as fh:
            head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
        # A .json file holding one object per line is JSON Lines (as the `datasets` json loader reads it).
        yield from _jsonl_records(path, raw_lines) if head == b"{" else _json_list_records(path)
    elif suffix == ".csv":
        yield from _csv_records(path)
    elif suffix in (".parquet", ".arrow"):
        yield from _arrow_records(path)
    else:
        raise DataFileError(DataProblem(path, None, None, None, f"unsupported file type '{suffix}'",
                                        "use .json, .jsonl, .csv, .parquet or .arrow"))


@dataclass
class RawLine:
    """One JSON Lines row not parsed yet: its bytes and where they start in the file."""

    data: bytes
    byte_offset: int


def file_progress(path: Path) -> float:
    """Size of a data file in bytes (for progress estimates)."""
    try:
        return float(Path(path).stat().st_size)
    except OSError:
        return 0.0


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


def _not_utf8(path: Path | str, raw: bytes, exc: UnicodeDecodeError, line_offset: int, byte_offset: int,
              row: int | None = None) -> DataProblem:
    line = line_offset + raw.count(b"\n", 0, exc.start) + 1
    line_start = raw.rfind(b"\n", 0, exc.start) + 1
    bad = raw[exc.start:exc.end]
    return DataProblem(path, row, line, None,
                       f"bytes that are not UTF-8 at byte offset {byte_offset + exc.start} "
                       f"(byte {exc.start - line_start + 1} of the line): {bad!r}",
                       "save the file as UTF-8 (for example: iconv -f latin1 -t utf-8 in > out)")


def _jsonl_records(path: Path, raw_lines: bool = False) -> Iterator[Record]:
    index = 0
    offset = 0
    with open(path, "rb") as fh:
        for number, chunk in enumerate(fh, start=1):
            start = offset
            offset += len(chunk)
            if number == 1 and chunk.startswith(b"\xef\xbb\xbf"):
                chunk = chunk[3:]
                start += 3
            if not chunk.strip():
                continue
            if raw_lines:
                yield index, number, RawLine(chunk, start)  # type: ignore[misc]
            else:
                yield index, number, parse_raw_line(path, index, number, RawLine(chunk, start))
            index += 1


def parse_raw_line(path: Path | str, index: int, number: int, raw: RawLine) -> dict[str, Any] | DataProblem:
    """One JSON Lines row, or the DataProblem that names its line and column."""
    chunk = raw.data.rstrip(b"\r\n")
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _not_utf8(path, chunk, exc, number - 1, raw.byte_offset, row=index)
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return DataProblem(path, index, number, None, f"invalid JSON at column {exc.colno}: {exc.msg}",
                           "each line must be one complete JSON object; fix the syntax there")
    return row if isinstance(row, dict) else _not_an_object(path, index, number, row)


def _not_an_object(path: Path | str, index: int, line: int | None, row: Any) -> DataProblem:
    return DataProblem(path, index, line, None, f"a row must be a JSON object, found {type(row).__name__}",
                       'write each row as {"column": value, ...}')


class _TextBlocks:
    """A file's text read block by block, kept from the first unconsumed character on: a JSON
    list is parsed one row at a time without the whole file in memory."""

    BLOCK = 1 << 20

    def __init__(self, path: Path) -> None:
        import codecs

        self.path, self.fh = path, open(path, "rb")  # noqa: SIM115 (closed in close())
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text = ""
        self.base_line = 1  # line number of text[0]
        self.base_column = 0  # characters of that line before text[0]
        self.bytes_read = 0
        self.lines_read = 0  # newlines in the bytes read so far
        self.eof = False
        self.first = True

    def more(self, want: int = BLOCK) -> bool:
        """Append at least one more block; False at the end of the file."""
        if self.eof:
            return False
        raw = self.fh.read(max(want, self.BLOCK))
        start = self.bytes_read
        self.bytes_read += len(raw)
        try:
            piece = self.decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as exc:
            line_offset = self.lines_read
            raise DataFileError(_not_utf8(self.path, raw, exc, line_offset, start)) from None
        self.lines_read += raw.count(b"\n")
        if self.first:
            piece = piece.removeprefix("\ufeff")
            self.first = False
        self.text += piece
        if not raw:
            self.eof = True
        return True

    def drop(self, pos: int) -> int:
        """Forget the text before pos; returns the new position of what was at pos."""
        newlines = self.text.count("\n", 0, pos)
        if newlines:
            self.base_line += newlines
            self.base_column = pos - (self.text.rfind("\n", 0, pos) + 1)
        else:
            self.base_column += pos
        self.text = self.text[pos:]
        return 0

    def skip_space(self, pos: int) -> int:
        while True:
            pos = _WHITESPACE.match(self.text, pos).end()
            if pos < len(self.text) or not self.more():
                return pos

    def close(self) -> None:
        self.fh.close()


def _json_list_records(path: Path) -> Iterator[Record]:
    blocks = _TextBlocks(path)
    try:
        yield from _json_list_rows(path, blocks)
    finally:
        blocks.close()


def _json_list_rows(path: Path, blocks: _TextBlocks) -> Iterator[Record]:
    def fail(pos: int, message: str, fix: str) -> DataFileError:
        text = blocks.text
        line = blocks.base_line + text.count("\n", 0, pos)
        line_start = text.rfind("\n", 0, pos) + 1
        column = pos - line_start + 1 + (blocks.base_column if line_start == 0 else 0)
        return DataFileError(DataProblem(path, None, line, None, f"invalid JSON at column {column}: {message}", fix))

    pos = blocks.skip_space(0)
    if pos == len(blocks.text):
        raise DataFileError(DataProblem(path, None, None, None, "the file is empty",
                                        "write the rows as a JSON list: [{...}, {...}]"))
    if blocks.text[pos] != "[":
        raise fail(pos, "expected a list of rows ('[') or one JSON object per line",
                   "write the rows as a JSON list [{...}, {...}], or as JSON Lines")
    pos = blocks.skip_space(pos + 1)
    index = 0
    if pos < len(blocks.text) and blocks.text[pos] == "]":
        pos += 1
    else:
        while True:
            row, end = _decode_one(blocks, pos, fail)  # the text before the row is dropped
            line = blocks.base_line
            yield index, line, row if isinstance(row, dict) else _not_an_object(path, index, line, row)
            index += 1
            pos = blocks.skip_space(end)
            if pos < len(blocks.text) and blocks.text[pos] == ",":
                pos = blocks.skip_space(pos + 1)
                continue
            if pos < len(blocks.text) and blocks.text[pos] == "]":
                pos += 1
                break
            raise fail(pos, "expected ',' or ']' after a row", "separate rows with commas and end the list with ']'")
    pos = blocks.skip_space(pos)
    if pos != len(blocks.text):
        raise fail(pos, "extra data after the end of the list", "remove what follows the closing ']'")


def _decode_one(blocks: _TextBlocks, pos: int, fail: Any) -> tuple[Any, int]:
    """The JSON value at pos (reading more of the file while it is cut off by the block's end);
    returns (value, end) with end relative to the text after `blocks.drop(pos)`."""
    pos = blocks.drop(pos)
    while True:
        try:
            row, end = _DECODER.raw_decode(blocks.text, pos)
        except json.JSONDecodeError as exc:
            if blocks.more(len(blocks.text)):  # cut off at the block's end: read on and retry
                continue
            raise fail(exc.pos, exc.msg, "fix the JSON syntax there (a missing comma, quote or bracket "
                                         "is the usual cause)") from None
        if end == len(blocks.text) and blocks.more():
            continue  # a number or literal may go on in the next block
        return row, end


def _decoded_lines(path: Path) -> Iterator[str]:
    """The file's lines as text, one at a time; bytes that are not UTF-8 raise DataFileError with
    the line and byte offset."""
    offset = 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataFileError(_not_utf8(path, raw, exc, number - 1, offset)) from None
            offset += len(raw)


def _csv_records(path: Path) -> Iterator[Record]:
    # Answers longer than the csv module's default field limit (128 KiB) are ordinary data here.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.reader(_decoded_lines(path))
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


ARROW_BATCH_ROWS = 4096


def _arrow_records(path: Path) -> Iterator[Record]:
    """Rows of a Parquet or Arrow file, one record batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def batches() -> Iterator[Any]:
        if path.suffix.lower() == ".parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size=ARROW_BATCH_ROWS)
            return
        with pa.memory_map(str(path)) as source:
            try:
                yield from pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)

    index = 0
    try:
        for batch in batches():
            for row in batch.to_pylist():
                yield index, None, row
                index += 1
    except (pa.ArrowException, OSError) as exc:
        raise DataFileError(DataProblem(path, None, None, None, f"cannot be read: {exc}",
                                        "check that it is a complete, valid file of that type")) from None
