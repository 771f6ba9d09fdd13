"""The token store: tokenized samples on disk as numpy files, read lazily through memory maps.

A store folder holds one sub-folder per chunk of input rows (`chunks/<split>-<number>`), each
written whole into a temporary sibling and renamed into place, so a chunk that exists is
complete; `meta.json` is written last and marks the whole store complete. A chunk holds:

- `ids.npy` (int32) and `trained.npy` (bool): the tokens of its samples laid end to end, and
  whether each token is trained (its label is its id, else -100);
- `weights.npy` (float32), only in a chunk where some sample sets per-token loss weights
  (messages with `loss_weight`): every token's weight, 1 for samples without weights;
- `index.npy`: one record per sample: length, start in ids.npy, dataset, row, trained-token
  count and flags (truncated, and the facts the preflight checks read);
- `summary.json`: the rows the chunk read, the rows it dropped (with reasons) and the rows it
  could not read (with file, row, line and column), and the columns it saw.

A completed store whose chunks are numbered 0..n-1 (every store tunesmith completes) also holds
each split's index records in one file (`<split>_index.npy`, with `<split>_chunk_starts.npy`),
so that opening it reads two small files instead of one per chunk.

Opening a store maps the token files and reads the small index arrays: memory does not grow with
the number of tokens, and per-sample Python objects exist only for the samples asked for.
"""

from __future__ import annotations

import json
import os
import shutil
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from tunesmith.data.batching import Sample
from tunesmith.data.encode import IGNORE_INDEX, Encoded

STORE_FORMAT = "3"
INDEX_DTYPE = np.dtype([("length", np.int32), ("start", np.int64), ("dataset", np.int32), ("row", np.int64),
                        ("trained", np.int32), ("flags", np.uint8)])

# Per-sample flags (the preflight reads them instead of every token).
TRUNCATED = 1
END_OF_TURN_TRAINED = 2
HAS_EOS = 4
EOS_TRAINED = 8
DOUBLE_BOS = 16
WEIGHTED = 32  # the sample has per-token loss weights (in the chunk's weights.npy)


def chunk_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}"


def chunk_done(folder: Path, split: str, number: int) -> bool:
    return (folder / "chunks" / chunk_name(split, number) / "summary.json").exists()


@dataclass
class EndToEnd:
    """Samples laid end to end: sample i is ids[starts[i] : starts[i] + lengths[i]] (int64 arrays)."""

    ids: np.ndarray
    labels: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray  # bool, one per sample


def end_to_end(samples: Sequence[Encoded]) -> EndToEnd:
    # array.extend copies a list of ints at C speed (numpy.fromiter over a generator is ~50x slower).
    ids_buf, labels_buf = array("q"), array("q")
    for s in samples:
        ids_buf.extend(s.input_ids)
        labels_buf.extend(s.labels)
    lengths = np.fromiter((len(s.input_ids) for s in samples), dtype=np.int64, count=len(samples))
    starts = np.zeros(len(samples), dtype=np.int64)
    starts[1:] = np.cumsum(lengths)[:-1]
    return EndToEnd(_int64s(ids_buf), _int64s(labels_buf), starts, lengths,
                    np.fromiter((s.truncated for s in samples), dtype=bool, count=len(samples)))


def _int64s(buf: array) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.int64) if len(buf) else np.zeros(0, dtype=np.int64)


def write_chunk(folder: Path, split: str, number: int, samples: Sequence[Encoded], dataset_ids: Sequence[int],
                flags_of: Callable[[EndToEnd], np.ndarray], summary: dict[str, Any]) -> None:
    """One chunk's files, written into a temporary folder and renamed into place (atomic).
    flags_of gives the samples' flags (data/preflight.py FlagRules)."""
    chunks = folder / "chunks"
    chunks.mkdir(parents=True, exist_ok=True)
    final = chunks / chunk_name(split, number)
    tmp = chunks / f".tmp-{chunk_name(split, number)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    laid = end_to_end(samples)
    ids = laid.ids.astype(np.int32)
    trained = laid.labels != IGNORE_INDEX
    index = np.zeros(len(samples), dtype=INDEX_DTYPE)
    index["length"] = laid.lengths
    if len(samples) and len(ids):
        index["trained"] = np.add.reduceat(trained.astype(np.int32), laid.starts)
    index["start"] = laid.starts
    index["dataset"] = np.asarray(dataset_ids, dtype=np.int32)
    index["row"] = np.fromiter((s.source[1] for s in samples), dtype=np.int64, count=len(samples))
    weighted = np.fromiter((s.weights is not None for s in samples), dtype=bool, count=len(samples))
    index["flags"] = flags_of(laid) | np.where(weighted, WEIGHTED, 0)
    np.save(tmp / "ids.npy", ids)
    np.save(tmp / "trained.npy", trained)
    if weighted.any():  # only data that sets loss_weight stores weights
        weights_buf = array("f")
        for s in samples:
            weights_buf.extend(s.weights if s.weights is not None else [1.0] * len(s.input_ids))
        np.save(tmp / "weights.npy", np.frombuffer(weights_buf, dtype=np.float32))
    np.save(tmp / "index.npy", index)
    (tmp / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    if final.exists():  # written by another process meanwhile: same inputs, same content
        shutil.rmtree(tmp, ignore_errors=True)
        return
    try:
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():
            raise


def chunk_summaries(folder: Path, split: str) -> list[dict[str, Any]]:
    return [json.loads((d / "summary.json").read_text(encoding="utf-8")) for d in _chunk_dirs(folder, split)]


def _chunk_dirs(folder: Path, split: str) -> list[Path]:
    chunks = folder / "chunks"
    if not chunks.is_dir():
        return []
    return sorted(d for d in chunks.iterdir() if d.name.startswith(f"{split}-") and (d / "summary.json").exists())


def merged_index_paths(folder: Path, split: str) -> tuple[Path, Path]:
    """The split's index records and chunk starts in one file each, written when the store is
    completed: opening a large store then reads two files, not one per chunk."""
    return folder / f"{split}_index.npy", folder / f"{split}_chunk_starts.npy"


def _index_of_chunks(dirs: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(index records, chunk starts) of the given chunk folders, read from each one's index.npy."""
    indexes = [np.load(d / "index.npy") for d in dirs]
    starts = np.concatenate([[0], np.cumsum([len(x) for x in indexes])]).astype(np.int64)
    return (np.concatenate(indexes) if indexes else np.zeros(0, dtype=INDEX_DTYPE)), starts


def _merged_index(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[Path]] | None:
    """(index records, chunk starts, chunk folders) from the merged files; None where they are
    absent or a chunk folder they count is gone (then the chunks are read, and the counts tell)."""
    index_path, starts_path = merged_index_paths(folder, split)
    if not (index_path.exists() and starts_path.exists()):
        return None
    starts = np.load(starts_path)
    dirs = [folder / "chunks" / chunk_name(split, k) for k in range(len(starts) - 1)]
    return (np.load(index_path), starts, dirs) if all(d.is_dir() for d in dirs) else None


def write_merged_index(folder: Path, split: str) -> None:
    """The merged files of a split, from its chunks, each written whole and renamed into place
    (replacing any a crash left before the store was completed)."""
    dirs = _chunk_dirs(folder, split)
    paths = merged_index_paths(folder, split)
    if [d.name for d in dirs] != [chunk_name(split, k) for k in range(len(dirs))]:
        for path in paths:  # chunks not numbered 0..n-1: the split is read chunk by chunk
            path.unlink(missing_ok=True)
        return
    for path, array_ in zip(paths, _index_of_chunks(dirs), strict=True):
        tmp = path.with_name(f".{path.stem}-{os.getpid()}.npy")
        np.save(tmp, array_)
        os.replace(tmp, path)


class StoreSplit:
    """Every sample of one split (train or eval data) of a store, in dataset order."""

    def __init__(self, folder: Path, split: str, datasets: list[str]) -> None:
        self.datasets = datasets
        folder = Path(folder)
        merged = _merged_index(folder, split)
        if merged is not None:
            self.index, self.chunk_starts, self._dirs = merged
        else:
            self._dirs = _chunk_dirs(folder, split)
            self.index, self.chunk_starts = _index_of_chunks(self._dirs)
        # Token files are mapped when a chunk is first read (opening a store maps none of them).
        self._ids: list[np.ndarray | None] = [None] * len(self._dirs)
        self._trained: list[np.ndarray | None] = [None] * len(self._dirs)
        self._weights: list[np.ndarray | None] = [None] * len(self._dirs)

    def __len__(self) -> int:
        return len(self.index)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray, list[float] | None]:
        """(ids, trained) of sample i as views of the mapped files, and its per-token loss weights
        (None when it has none: all 1)."""
        chunk = int(np.searchsorted(self.chunk_starts, i, side="right")) - 1
        rec = self.index[i]
        span = slice(int(rec["start"]), int(rec["start"]) + int(rec["length"]))
        ids, trained = self._ids[chunk], self._trained[chunk]
        if ids is None or trained is None:
            ids = self._ids[chunk] = np.load(self._dirs[chunk] / "ids.npy", mmap_mode="r")
            trained = self._trained[chunk] = np.load(self._dirs[chunk] / "trained.npy", mmap_mode="r")
        if not rec["flags"] & WEIGHTED:
            return ids[span], trained[span], None
        weights = self._weights[chunk]
        if weights is None:
            weights = self._weights[chunk] = np.load(self._dirs[chunk] / "weights.npy", mmap_mode="r")
        return ids[span], trained[span], weights[span].tolist()


class SampleView(Sequence[Encoded]):
    """A lazy sequence of Encoded samples over a store split, optionally through an index array
    (the train or eval part of a val_size split). Only the samples asked for become Python lists."""

    def __init__(self, split: StoreSplit, positions: np.ndarray | None = None) -> None:
        self._split = split
        self._positions = positions

    def _pos(self, i: int) -> int:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return int(self._positions[i]) if self._positions is not None else i

    def __len__(self) -> int:
        return len(self._positions) if self._positions is not None else len(self._split)

    @overload
    def __getitem__(self, i: int) -> Encoded: ...

    @overload
    def __getitem__(self, i: slice) -> list[Encoded]: ...

    def __getitem__(self, i: int | slice) -> Encoded | list[Encoded]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        p = self._pos(i)
        id_list, labels, weights = self._read(p)
        rec = self._split.index[p]
        return Encoded(input_ids=id_list, labels=labels,
                       source=(self._split.datasets[int(rec["dataset"])], int(rec["row"])),
                       truncated=bool(rec["flags"] & TRUNCATED), weights=weights)

    def __iter__(self) -> Iterator[Encoded]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    @property
    def records(self) -> np.ndarray:
        """The index records (length, dataset, row, trained, flags) of these samples, in order."""
        return self._split.index if self._positions is None else self._split.index[self._positions]

    @property
    def lengths(self) -> np.ndarray:
        return self.records["length"].astype(np.int64)

    @property
    def sources(self) -> LazyList:
        return LazyList(len(self), self.source)

    def source(self, i: int) -> tuple[str, int]:
        rec = self._split.index[self._pos(i)]
        return self._split.datasets[int(rec["dataset"])], int(rec["row"])

    def training_sample(self, i: int) -> Sample:
        ids, labels, weights = self._read(self._pos(i))
        return Sample(ids, labels, i, weights)

    def _read(self, p: int) -> tuple[list[int], list[int], list[float] | None]:
        """ids, labels and weights of store sample p, as the Python lists a sample holds."""
        ids, trained, weights = self._split.sample(p)
        return ids.tolist(), np.where(trained, ids, IGNORE_INDEX).tolist(), weights

    def as_samples(self) -> LazyList:
        """The samples the training loop batches, read from the store when a micro-batch is built."""
        return LazyList(len(self), self.training_sample, self.lengths)


class LazyList(Sequence[Any]):
    """Items of a view made on demand by `get(i)` (sources for messages, or the training loop's
    samples); `lengths` (numpy), when given, is all the batch planner needs."""

    def __init__(self, length: int, get: Callable[[int], Any], lengths: np.ndarray | None = None) -> None:
        self._length, self._get = length, get
        self.lengths = lengths

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._get(k) for k in range(*i.indices(self._length))]
        return self._get(i)


def sample_lengths(samples: Sequence[Any]) -> np.ndarray:
    """Token counts of a sequence of samples: the stored array when the samples come from a store."""
    lengths = getattr(samples, "lengths", None)
    if lengths is not None:
        return np.asarray(lengths, dtype=np.int64)
    return np.fromiter((len(s.input_ids) for s in samples), dtype=np.int64, count=len(samples))
