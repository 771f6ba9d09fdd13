"""Rows -> token store, chunk by chunk, in worker processes.

The main process streams the data files and cuts the rows into chunks of `CHUNK_ROWS`; it sends
JSON Lines rows as raw bytes (workers parse them), so its own work per row is small. A worker
parses, converts, encodes and writes its chunk into the store itself: only a short summary comes
back, never the tokens. At most two chunks per worker are in flight, so memory is bounded by a
few chunks whatever the size of the data.

A chunk already in the store is not tokenized again: a tokenization killed or crashed resumes
from the chunks it completed. Several processes (the ranks of a distributed run, on one machine
or several sharing the cache folder) each tokenize chunk numbers `rank, rank + world, ...`; the
chunk files depend only on the chunk's rows, so the result is the store one process writes.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config import DataArgs
from tunesmith.data import store
from tunesmith.data.encode import Dropped, Encoded, encode
from tunesmith.data.formats import dataset_records, record_conversation
from tunesmith.data.preflight import FlagRules
from tunesmith.data.readers import DataProblem, RawLine, file_progress
from tunesmith.data.registry import DatasetSpec
from tunesmith.template import Conversation, with_system

CHUNK_ROWS = 2048
SHOWN_PROBLEMS = 5
# Below this many rows a pool costs more to start than it saves.
MIN_ROWS_FOR_WORKERS = 2000

# (dataset position in the split, file, row in file, line, row index in dataset, row | RawLine | DataProblem)
Record = tuple[int, str, int, int | None, int, Any]


def apply_default_system(conv: Conversation, system: str | None) -> Conversation:
    """The conversation with `default_system` applied by the rule chat and the API follow
    (template.with_system): training sees the system prompt inference will add."""
    if system:
        conv.messages = with_system(conv.messages, system)
    return conv


def encode_conversations(convs: Sequence[Conversation], tokenizer: Any, data_args: DataArgs,
                         default_system: str | None = None) -> list[Encoded | Dropped]:
    """Encode a chunk's conversations in order: the one place the store's workers call the encoder."""
    return [encode(apply_default_system(conv, default_system), tokenizer, data_args) for conv in convs]


class DirectTokenizer:
    """The tokenizer with plain-text calls sent straight to its Rust backend: the transformers
    wrapper's per-call conversion costs about a third of the tokenizer's time per row. Every
    other use goes to the tokenizer itself. Used only where the backend gives exactly the
    wrapper's ids and offsets (checked on probe texts, see `direct_if_same`)."""

    def __init__(self, tokenizer: Any) -> None:
        self.wrapped = tokenizer
        self._backend = tokenizer.backend_tokenizer
        self._special_tokens = tokenizer.special_tokens_map  # fixed once the tokenizer is loaded
        # encode_batch_fast (tokenizers >= 0.21) gives encode_batch's ids without tracking offsets.
        self._encode_batch = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    # Read at every render: a property skips the failed lookup that precedes __getattr__.
    @property
    def chat_template(self) -> Any:
        return self.wrapped.chat_template

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        return self._special_tokens  # the wrapper builds a new dict at every call (twice a render)

    def __call__(self, text: Any, *args: Any, add_special_tokens: bool = True,
                 return_offsets_mapping: bool = False, **kwargs: Any) -> Any:
        if args or kwargs or add_special_tokens:
            return self.wrapped(text, *args, add_special_tokens=add_special_tokens,
                                return_offsets_mapping=return_offsets_mapping, **kwargs)
        if isinstance(text, str):
            enc = self._backend.encode(text, add_special_tokens=False)
            out = {"input_ids": enc.ids, "attention_mask": [1] * len(enc.ids)}
            if return_offsets_mapping:
                out["offset_mapping"] = enc.offsets
            return out
        if isinstance(text, list) and not return_offsets_mapping and all(isinstance(t, str) for t in text):
            # A conversation's pieces (template.encode_segments): one backend call for all of them,
            # without the character offsets nobody reads here (a third of the tokenizer's time).
            return {"input_ids": [enc.ids for enc in self._encode_batch(text, add_special_tokens=False)]}
        return self.wrapped(text, add_special_tokens=False, return_offsets_mapping=return_offsets_mapping)


PROBES = ["Hello, world!  Two  spaces\n\nand lines.", "<|im_start|>user\nDe quoi s'agit-il ? 数字 42<|im_end|>\n",
          " leading space, émoji 🙂 and tabs\t\t."]


def direct_if_same(tokenizer: Any) -> Any:
    """DirectTokenizer when the backend matches the wrapper on the probes, else the tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tokenizer
    direct = DirectTokenizer(tokenizer)
    for text in PROBES:
        want = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        got = direct(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(want["input_ids"]) != list(got["input_ids"]) or \
                [tuple(o) for o in want["offset_mapping"]] != [tuple(o) for o in got["offset_mapping"]]:
            return tokenizer
    want_batch = tokenizer(PROBES, add_special_tokens=False)["input_ids"]
    got_batch = direct(PROBES, add_special_tokens=False)["input_ids"]
    if [list(ids) for ids in want_batch] != [list(ids) for ids in got_batch]:
        return tokenizer
    return direct


@dataclass
class Job:
    split: str
    number: int
    records: list[Record]


@dataclass
class WorkerState:
    tokenizer: Any
    data_args: DataArgs
    specs: dict[str, list[DatasetSpec]]  # split -> its datasets
    folder: Path
    rules: FlagRules  # built before the workers fork, so each inherits it
    default_system: str | None = None


_state: WorkerState | None = None


def _limit_threads() -> None:
    """One thread per worker process: N processes x M threads would oversubscribe the cores."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _set_state(state: WorkerState) -> None:
    global _state
    _state = state


def tokenize_chunk(job: Job) -> dict[str, Any]:
    """Parse, convert, encode and store one chunk; returns its summary (also stored with it)."""
    state = _state
    assert state is not None, "tokenize_chunk runs after _set_state"
    specs = state.specs[job.split]
    convs: list[Conversation] = []
    conv_datasets: list[int] = []
    problems: list[str] = []
    problem_count = 0
    columns: dict[int, set[str]] = {}
    rows_per_dataset: dict[int, int] = {}
    for ds, name, file_row, line, index, row in job.records:
        rows_per_dataset[ds] = rows_per_dataset.get(ds, 0) + 1
        parsed, conv = record_conversation(specs[ds], name, file_row, line, index, row)
        if parsed is not None:
            columns.setdefault(ds, set()).update(parsed)
        if not isinstance(conv, DataProblem):
            convs.append(conv)
            conv_datasets.append(ds)
            continue
        problem_count += 1
        if len(problems) < SHOWN_PROBLEMS:
            problems.append(str(conv))
    kept: list[Encoded] = []
    kept_datasets: list[int] = []
    dropped: list[list[Any]] = []
    for ds, result in zip(conv_datasets, encode_conversations(convs, state.tokenizer, state.data_args,
                                                                      state.default_system), strict=True):
        if isinstance(result, Encoded):
            kept.append(result)
            kept_datasets.append(ds)
        else:
            dropped.append([result.source[0], result.source[1], result.reason])
    summary = {"rows": len(job.records), "rows_per_dataset": {str(k): v for k, v in rows_per_dataset.items()},
               "kept": len(kept), "dropped": dropped, "problem_count": problem_count, "problems": problems,
               "columns": {str(k): sorted(v) for k, v in columns.items()}}
    store.write_chunk(state.folder, job.split, job.number, kept, kept_datasets, state.rules.flags_of, summary)
    return summary


# ------------------------------------------------------------------------------------------ jobs

def _records(specs: Sequence[DatasetSpec], max_samples: int | None, seed: int,
             progress: _Progress) -> Iterator[Record]:
    for ds, spec in enumerate(specs):
        for path, file_row, line, index, row in dataset_records(spec, max_samples=max_samples, seed=seed,
                                                                raw_lines=True):
            if isinstance(row, RawLine):
                progress.at(path, row.byte_offset)
            yield ds, str(path), file_row, line, index, row


def jobs(split: str, specs: Sequence[DatasetSpec], max_samples: int | None, seed: int,
         progress: _Progress, chunk_rows: int) -> Iterator[Job]:
    """The split's rows cut into numbered chunks, in order."""
    number = 0
    batch: list[Record] = []
    for record in _records(specs, max_samples, seed, progress):
        batch.append(record)
        if len(batch) == chunk_rows:
            yield Job(split, number, batch)
            number, batch = number + 1, []
    if batch:
        yield Job(split, number, batch)


@dataclass
class _Progress:
    """Rows done, rows/s and (for files read as lines) an ETA from the share of bytes read."""

    total_bytes: float
    desc: str
    bar: Any = None
    done_bytes: dict[str, float] = field(default_factory=dict)

    def at(self, path: Any, offset: int) -> None:
        self.done_bytes[str(path)] = float(offset)

    def start(self) -> None:
        from tqdm import tqdm

        # The bar appears only for work that lasts (delay) and only on a terminal.
        self.bar = tqdm(desc=self.desc, unit="row", file=sys.stderr, delay=2.0, dynamic_ncols=True,
                        disable=not sys.stderr.isatty())

    def update(self, rows: int) -> None:
        if self.bar is None:
            return
        self.bar.update(rows)
        share = sum(self.done_bytes.values()) / self.total_bytes if self.total_bytes else 0.0
        if share > 0.01:  # the row total, estimated from the bytes read so far
            self.bar.total = max(self.bar.n, int(self.bar.n / min(share, 1.0)))
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------- run

@dataclass
class BuildResult:
    chunks: dict[str, int]  # split -> number of chunks
    tokenized: int  # chunks this process tokenized now (the others were done before or by other ranks)
    rows: int


def build_chunks(folder: Path, splits: dict[str, list[DatasetSpec]], tokenizer: Any, data_args: DataArgs, *,
                 max_samples: int | None, seed: int, num_workers: int, rank: int = 0, world: int = 1,
                 default_system: str | None = None) -> BuildResult:
    """Tokenize every chunk of every split that is this process's share and not yet in `folder`."""
    state = WorkerState(direct_if_same(tokenizer), data_args, splits, folder, FlagRules(tokenizer), default_system)
    paths = [p for specs in splits.values() for spec in specs for p in spec.paths]
    progress = _Progress(sum(file_progress(p) for p in paths), "Tokenizing")
    progress.start()
    counts = {split: 0 for split in splits}
    done, rows = 0, 0
    pool = None
    pending: deque[Any] = deque()
    buffered: list[Job] = []  # jobs read before the pool is started (small data never starts one)

    def finished(job: Job) -> None:
        nonlocal done, rows
        done += 1
        rows += len(job.records)
        progress.update(len(job.records))

    def run_here(job: Job) -> None:
        _set_state(state)
        tokenize_chunk(job)
        finished(job)

    try:
        for split, specs in splits.items():
            for job in jobs(split, specs, max_samples, seed, progress, CHUNK_ROWS):
                counts[split] = job.number + 1
                if job.number % world != rank or store.chunk_done(folder, split, job.number):
                    continue
                if num_workers <= 1:
                    run_here(job)
                    continue
                if pool is None:
                    buffered.append(job)
                    if sum(len(j.records) for j in buffered) < MIN_ROWS_FOR_WORKERS:
                        continue
                    pool = _start_pool(state, num_workers)
                    queued, buffered = buffered, []
                else:
                    queued = [job]
                for item in queued:
                    pending.append((pool.apply_async(tokenize_chunk, (item,)), item))
                    while len(pending) >= 2 * num_workers:
                        _collect(pending.popleft(), finished)
        for job in buffered:
            run_here(job)
        while pending:
            _collect(pending.popleft(), finished)
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return BuildResult(counts, done, rows)


def _collect(item: tuple[Any, Job], finished: Callable[[Job], None]) -> None:
    result, job = item
    result.get()
    finished(job)


def _start_pool(state: WorkerState, workers: int) -> Any:
    import multiprocessing as mp

    # Set before the pool starts so the children inherit it; the Rust tokenizer would otherwise
    # warn about (and guard against) forking after using its thread pool.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # fork: the children inherit the tokenizer instead of importing transformers again (spawn
    # costs seconds per worker); they only run Python and the Rust tokenizer.
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    return ctx.Pool(workers, initializer=_worker_start, initargs=(state,))


def _worker_start(state: WorkerState) -> None:
    import gc
    import signal

    # The objects inherited from the main process (torch, transformers: some 350,000) are never
    # garbage here: frozen, the worker's garbage collections no longer walk them, which was 4-17%
    # of a worker's CPU time (bench/RESULTS.md), nor write to their pages (which fork shares).
    gc.freeze()
    _limit_threads()
    # Ctrl-C goes to the whole process group: the main process stops the pool itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_state(state)
