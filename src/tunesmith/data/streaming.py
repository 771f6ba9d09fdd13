"""Streaming data (`streaming: true`): rows read and tokenized while training, with no token store.

The stream is the datasets' rows in order, shuffled through a buffer of `buffer_size` rows (raw
rows, so filling the buffer reads but does not tokenize), then encoded one at a time exactly as
the store's workers encode them (data/chunks.py `encode_conversations`): the same ids and masks.
When the data runs out the stream starts again with the next pass's shuffle. Its order depends
only on (seed, pass), so a resumed run skips as many samples as were trained and then sees the
same samples in the same order as an uninterrupted run; every process reads the same stream and
takes its own micro-batches of it.

Rows that cannot be read stop the run (naming the file and row) unless `skip_invalid`; rows
dropped by the encoder are reported with their dataset and row, and counted per pass.
"""

from __future__ import annotations

import random
import sys
from collections import Counter, OrderedDict
from collections.abc import Iterator
from typing import Any

from tunesmith.config import RunConfig
from tunesmith.data.batching import Sample
from tunesmith.data.chunks import direct_if_same, encode_conversations
from tunesmith.data.encode import Encoded
from tunesmith.data.formats import dataset_records, record_conversation
from tunesmith.data.readers import DataProblem
from tunesmith.data.registry import DatasetSpec, resolve_datasets
from tunesmith.errors import UserError

SHOWN_DROPS = 5
KEPT_SOURCES = 100_000


class RecentSources:
    """(dataset, row) of the stream's recent samples by stream position, for messages about them."""

    def __init__(self) -> None:
        self._known: OrderedDict[int, tuple[str, int]] = OrderedDict()
        self.count = 0

    def add(self, position: int, source: tuple[str, int]) -> None:
        self._known[position] = source
        self.count = max(self.count, position + 1)
        if len(self._known) > KEPT_SOURCES:
            self._known.popitem(last=False)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, position: int) -> tuple[str, int]:
        return self._known.get(position, ("(stream)", position))


def shuffled(items: Iterator[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """A buffer shuffle: each item out is a random pick of the buffer, refilled from the input."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = rng.randrange(buffer_size)
        buffer[j], item = item, buffer[j]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class SampleStream:
    """The training samples of a streaming run, in stream order, without end."""

    def __init__(self, cfg: RunConfig, tokenizer: Any) -> None:
        self.cfg = cfg
        self.data_args = cfg.data
        self.tokenizer = direct_if_same(tokenizer)
        self.specs: list[DatasetSpec] = resolve_datasets(list(cfg.data.dataset or []), cfg.data.dataset_dir)
        self.sources = RecentSources()
        self.position = 0  # samples taken so far

    def _rows(self, epoch: int) -> Iterator[tuple[DatasetSpec, str, int, int | None, int, Any]]:
        d, seed = self.data_args, self.cfg.train.seed
        records = ((spec, str(path), file_row, line, index, row) for spec in self.specs
                   for path, file_row, line, index, row in dataset_records(spec, max_samples=d.max_samples, seed=seed,
                                                                           raw_lines=True))
        if not d.shuffle:
            return records
        return shuffled(records, d.buffer_size, random.Random(seed * 1_000_003 + epoch))

    def _epoch(self, epoch: int) -> Iterator[Encoded]:
        rows = kept = problems = 0
        dropped: Counter[str] = Counter()
        for spec, path, file_row, line, index, row in self._rows(epoch):
            rows += 1
            _, conv = record_conversation(spec, path, file_row, line, index, row)
            if isinstance(conv, DataProblem):
                problems += 1
                if not self.data_args.skip_invalid:
                    raise UserError(f"{conv}", hint="fix this row, or set skip_invalid: true to leave invalid "
                                                    "rows out (they are reported).")
                if problems <= SHOWN_DROPS:
                    print(f"tunesmith: skipped invalid row: {conv}", file=sys.stderr)
                continue
            (result,) = encode_conversations([conv], self.tokenizer, self.data_args,
                                             self.cfg.generate.default_system)
            if isinstance(result, Encoded):
                kept += 1
                yield result
            else:
                dropped[result.reason] += 1
                if sum(dropped.values()) <= SHOWN_DROPS:
                    print(f"tunesmith: dropped {result.source[0]} row {result.source[1]} ({result.reason})",
                          file=sys.stderr)
        if rows == 0:
            raise UserError(f"the datasets {', '.join(s.name for s in self.specs)} have no rows.")
        if kept == 0:
            raise UserError(f"no sample is left of the {rows} streamed rows: "
                            f"{', '.join(f'{r}: {c}' for r, c in dropped.items()) or 'all invalid'}.",
                            hint="raise cutoff_len, or check that the data has assistant answers.")
        if dropped or problems:
            why = ", ".join(f"{r}: {c}" for r, c in sorted(dropped.items()))
            print(f"tunesmith: stream pass {epoch}: {rows} rows, {kept} samples, {sum(dropped.values())} dropped"
                  f"{f' ({why})' if why else ''}, {problems} invalid rows skipped.", file=sys.stderr)

    def __len__(self) -> int:
        return self.position  # the samples taken so far (a stream has no length)

    def first_pass(self) -> list[Encoded]:
        """Every sample of one pass in dataset order (for eval data, which is small)."""
        return list(self._epoch(0))

    def __iter__(self) -> Iterator[Encoded]:
        epoch = 0
        while True:
            yield from self._epoch(epoch)
            epoch += 1

    def samples(self, start: int = 0) -> Iterator[Sample]:
        """Training samples from stream position `start` on (the ones before are read and skipped)."""
        for position, encoded in enumerate(self):
            if position < start:
                continue
            self.sources.add(position, encoded.source)
            self.position = position + 1
            yield Sample(encoded.input_ids, encoded.labels, position, encoded.weights)
