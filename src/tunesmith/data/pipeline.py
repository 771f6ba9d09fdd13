"""Datasets -> tokenized train/eval samples: a memory-mapped token store (data/store.py) written
chunk by chunk by worker processes (data/chunks.py), a content-keyed cache, a report, and the
`data preview` / `data dump` commands that show exactly what training sees.

The cache key is a hash of everything the result depends on: the data files' bytes and their
dataset_info.json entries, the tokenizer (its full serialized vocabulary/merges and chat
template), the template name, cutoff_len, train_on_prompt, mask_history, max_samples,
val_size, seed, skip_invalid, default_system, TOKENIZE_VERSION and the source of the modules that convert, render
and encode. Changing any of them tokenizes afresh. A data file's content hash is kept beside the
cache with the file's size and modification time, and reused while both are unchanged, so a
start from the cache does not read the data again.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.config import RunConfig
from tunesmith.data import store
from tunesmith.data.encode import IGNORE_INDEX, Dropped, Encoded, encode
from tunesmith.errors import UserError
from tunesmith.files import replace_folder
from tunesmith.template import Conversation

# Bump when encode()/the stored format changes, so old caches are not reused.
TOKENIZE_VERSION = "3"
MAX_DROP_EXAMPLES = 5


# ----------------------------------------------------------------------------------------- report

@dataclass
class SplitReport:
    samples: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    dropped_examples: list[tuple[str, int, str]] = field(default_factory=list)  # (dataset, row, reason)
    truncated: int = 0
    length_min: int = 0
    length_mean: float = 0.0
    length_p50: int = 0
    length_p90: int = 0
    length_max: int = 0
    trained_tokens: int = 0  # supervised tokens (labels != -100)
    tokens: int = 0  # all tokens: what a padding-free (packed) epoch processes

    @classmethod
    def from_records(cls, records: np.ndarray, dropped: Sequence[Sequence[Any]]) -> SplitReport:
        """From a store's index records and the (dataset, row, reason) of every dropped row."""
        lengths = records["length"].astype(np.int64)
        rep = cls(samples=len(records), dropped=dict(Counter(str(d[2]) for d in dropped)),
                  dropped_examples=[(str(d[0]), int(d[1]), str(d[2])) for d in dropped[:MAX_DROP_EXAMPLES]],
                  truncated=int(((records["flags"] & store.TRUNCATED) != 0).sum()),
                  trained_tokens=int(records["trained"].astype(np.int64).sum()), tokens=int(lengths.sum()))
        if len(lengths):
            rep.length_min, rep.length_max = int(lengths.min()), int(lengths.max())
            rep.length_mean = float(lengths.mean())
            rep.length_p50 = int(np.percentile(lengths, 50, method="lower"))
            rep.length_p90 = int(np.percentile(lengths, 90, method="lower"))
        return rep

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitReport:
        d = dict(d)
        d["dropped_examples"] = [tuple(x) for x in d.get("dropped_examples", [])]
        return cls(**d)


@dataclass
class TokenizeReport:
    train: SplitReport
    eval: SplitReport
    seconds: float = 0.0

    def table(self) -> str:
        """A short table for stderr: counts, drops with their reasons, lengths, token totals."""
        head = f"{'':6} {'samples':>8} {'dropped':>8} {'truncated':>9} {'tokens':>10} {'trained':>10}   " \
               "length min / mean / p50 / p90 / max"
        lines = [head]
        splits = [("train", self.train)] + ([("eval", self.eval)] if self.eval.samples or self.eval.dropped else [])
        for name, r in splits:
            lines.append(f"{name:6} {r.samples:>8} {sum(r.dropped.values()):>8} {r.truncated:>9} {r.tokens:>10} "
                         f"{r.trained_tokens:>10}   {r.length_min} / {r.length_mean:.0f} / {r.length_p50} / "
                         f"{r.length_p90} / {r.length_max}")
        for name, r in splits:
            if r.dropped:
                why = ", ".join(f"{reason}: {count}" for reason, count in sorted(r.dropped.items()))
                first = ", ".join(f"{ds} row {row}" for ds, row, _ in r.dropped_examples)
                lines.append(f"{name} dropped ({why}); first: {first}")
        return "\n".join(lines)


@dataclass
class TokenizedData:
    train: Sequence[Encoded]  # a lazy store.SampleView (a list for data held in memory)
    eval: Sequence[Encoded]
    report: TokenizeReport
    from_cache: bool = False
    path: Path | None = None  # where the tokenized data is stored (cache folder or tokenized_path)
    key: str = ""


# --------------------------------------------------------------------------------- tokenization

def default_num_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def held_out(n: int, val_size: float, seed: int, where: str) -> np.ndarray:
    """A boolean mask of the `val_size` samples (a share in (0, 1) or a count >= 1) held out for eval,
    chosen with `seed`."""
    if val_size < 1:
        n_val = max(1, round(val_size * n))
    else:
        if not float(val_size).is_integer():
            raise UserError(f"{where}: 'val_size' {val_size} is above 1 but not a whole number of rows; "
                            "give a share in (0, 1) or a row count.")
        n_val = int(val_size)
    if n_val >= n:
        raise UserError(f"{where}: 'val_size' {val_size} would hold out {n_val} of the {n} training samples, "
                        "leaving none to train on.", hint="use a smaller val_size.")
    mask = np.zeros(n, dtype=np.bool_)
    mask[random.Random(seed).sample(range(n), n_val)] = True
    return mask


# ----------------------------------------------------------------------------------- fingerprint

def data_fingerprint(names: list[str], dataset_dir: str) -> str:
    """Hash of the named datasets' resolved registry entries, their files' bytes (not mtimes) and
    their full paths: the stored report names bad rows by file, so a copy elsewhere is its own store."""
    from tunesmith.data.registry import resolve_datasets

    h = hashlib.sha256()
    for spec in resolve_datasets(names, dataset_dir):
        entry = {k: v for k, v in asdict(spec).items() if k != "paths"}
        h.update(json.dumps(entry, sort_keys=True, default=str).encode())
        for path in spec.paths:
            h.update(str(Path(path).resolve()).encode() + b"\0")
            h.update(file_hash(path).encode())
    return h.hexdigest()


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes. Kept in the cache folder with the file's size and modification
    time (nanoseconds) and reused while both are unchanged: an unchanged multi-GB file is not read
    again at every start. Any write changes the modification time, so edited data is hashed again."""
    from tunesmith.files import cache_dir

    path = Path(path).resolve()
    stat = path.stat()
    stamp = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo = cache_dir() / "file-hashes" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    try:
        known = json.loads(memo.read_text(encoding="utf-8"))
        if {k: known.get(k) for k in stamp} == stamp and isinstance(known.get("sha256"), str):
            return known["sha256"]
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(json.dumps({**stamp, "sha256": digest}), encoding="utf-8")
        tmp.replace(memo)
    except OSError:
        pass  # a read-only cache only costs the hash next time
    return digest


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Vocabulary, merges, normalizer and special tokens (the serialized fast tokenizer) and the
    chat template text."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    h.update(str(getattr(tokenizer, "chat_template", "") or "").encode())
    h.update(repr([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token]).encode())
    return h.hexdigest()


def code_fingerprint() -> str:
    """Hash of the modules that turn rows into stored samples (row conversion, rendering, encoding,
    the store's writer), so a changed rule never reuses results made by the old one."""
    import tunesmith.data.chunks
    import tunesmith.data.encode
    import tunesmith.data.formats
    import tunesmith.data.preflight
    import tunesmith.template
    import tunesmith.template_shapes

    h = hashlib.sha256(TOKENIZE_VERSION.encode())
    # chunks and store write the samples; preflight computes the per-sample facts stored with them.
    for module in (tunesmith.data.formats, tunesmith.template, tunesmith.template_shapes, tunesmith.data.encode,
                   tunesmith.data.chunks, store, tunesmith.data.preflight):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def cache_key(cfg: RunConfig, tokenizer: Any, train_data: str, eval_data: str) -> str:
    d = cfg.data
    parts = {
        "version": TOKENIZE_VERSION, "code": code_fingerprint(), "train_data": train_data, "eval_data": eval_data,
        "dataset": d.dataset, "eval_dataset": d.eval_dataset,
        "tokenizer": tokenizer_fingerprint(tokenizer), "template": cfg.model.template,
        "cutoff_len": d.cutoff_len, "train_on_prompt": d.train_on_prompt, "mask_history": d.mask_history,
        "max_samples": d.max_samples, "val_size": d.val_size, "seed": cfg.train.seed,
        "skip_invalid": d.skip_invalid, "default_system": cfg.generate.default_system,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------------- storage

POLL_SECONDS = 0.5
# A store that gains no chunk for this long while other processes should be writing it is stuck.
STALL_SECONDS = 30 * 60


def open_store(folder: Path) -> TokenizedData:
    """The tokenized data of a complete store, mapped, not loaded."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != store.STORE_FORMAT:
            raise ValueError(f"store format {meta.get('format')!r}, expected {store.STORE_FORMAT!r}")
        train_split = store.StoreSplit(folder, "train", meta["datasets"]["train"])
        if (folder / "eval_positions.npy").exists():
            train = store.SampleView(train_split, np.load(folder / "train_positions.npy"))
            evals = store.SampleView(train_split, np.load(folder / "eval_positions.npy"))
        else:
            train = store.SampleView(train_split)
            evals = store.SampleView(store.StoreSplit(folder, "eval", meta["datasets"]["eval"]))
        if len(train) != meta["samples"]["train"] or len(evals) != meta["samples"]["eval"]:
            raise ValueError("the chunks do not add up to the samples meta.json counts")
    except (OSError, KeyError, ValueError, IndexError, TypeError) as exc:
        raise UserError(f"tokenized data in {folder} cannot be read ({exc}).",
                        hint="set overwrite_cache: true to tokenize again, or remove that folder.") from None
    rep = meta["report"]
    report = TokenizeReport(SplitReport.from_dict(rep["train"]), SplitReport.from_dict(rep["eval"]),
                            rep.get("seconds", 0.0))
    return TokenizedData(train, evals, report, from_cache=True, path=folder, key=meta.get("key", ""))


def partial_folder(target: Path) -> Path:
    """Where a store is built before it is complete (a restart resumes from its chunks)."""
    return target.parent / f".{target.name}.partial"


def discard_store(target: Path) -> None:
    """Remove a store and its partial build (overwrite_cache)."""
    for folder in (target, partial_folder(target)):
        if folder.is_dir() and ((folder / "meta.json").exists() or (folder / "chunks").exists()
                                or folder.name.endswith(".partial")):
            shutil.rmtree(folder, ignore_errors=True)


def _finalize(partial: Path, target: Path, cfg: RunConfig, specs: dict[str, list[Any]], key: str,
              seconds: float) -> None:
    """Check the rows every chunk read, split eval off, write meta.json and publish the store."""
    from tunesmith.data.formats import check_named_columns, problems_report

    d = cfg.data
    where = cfg.source or "config"
    summaries = {split: store.chunk_summaries(partial, split) for split in specs}
    problem_count = sum(x["problem_count"] for part in summaries.values() for x in part)
    total_rows = sum(x["rows"] for part in summaries.values() for x in part)
    kept_rows = sum(x["kept"] + len(x["dropped"]) for part in summaries.values() for x in part)
    for split, split_specs in specs.items():
        for ds, spec in enumerate(split_specs):
            rows = sum(x["rows_per_dataset"].get(str(ds), 0) for x in summaries[split])
            if rows == 0:
                raise UserError(f"dataset '{spec.name}' has no rows ({', '.join(map(str, spec.paths))}).",
                                hint="add rows to the file, or remove the dataset from the list.")
            check_named_columns(spec, {c for x in summaries[split] for c in x["columns"].get(str(ds), [])})
    if problem_count:
        first = [p for part in summaries.values() for x in part for p in x["problems"]]
        report = problems_report(problem_count, first, total_rows)
        if not d.skip_invalid:
            raise UserError(report, hint="fix these rows, or set skip_invalid: true to leave invalid rows out "
                                         "(they are reported).")
        print(f"tunesmith: skipped {problem_count} invalid rows, kept {kept_rows} of {total_rows}.\n{report}",
              file=sys.stderr)
    dropped = {split: [row for x in summaries.get(split, []) for row in x["dropped"]] for split in ("train", "eval")}
    names = {split: [spec.name for spec in specs.get(split, [])] for split in ("train", "eval")}
    for split in ("train", "eval"):  # from the chunks, whatever an interrupted completion left
        store.write_merged_index(partial, split)
    train_split = store.StoreSplit(partial, "train", names["train"])
    if not len(train_split):
        reasons = Counter(str(x[2]) for x in dropped["train"])
        raise UserError(f"{where}: no training sample is left after tokenization: all {len(dropped['train'])} were "
                        f"dropped ({', '.join(f'{r}: {c}' for r, c in reasons.items())}).",
                        hint="raise cutoff_len, or check that the data has assistant answers.")
    train_records, eval_records = train_split.index, store.StoreSplit(partial, "eval", names["eval"]).index
    if not specs.get("eval") and d.val_size > 0:
        held = held_out(len(train_split), d.val_size, cfg.train.seed, where)
        np.save(partial / "train_positions.npy", np.flatnonzero(~held))
        np.save(partial / "eval_positions.npy", np.flatnonzero(held))
        train_records, eval_records = train_split.index[~held], train_split.index[held]
    report = TokenizeReport(SplitReport.from_records(train_records, dropped["train"]),
                            SplitReport.from_records(eval_records, dropped["eval"]), seconds=seconds)
    meta = {"key": key, "version": TOKENIZE_VERSION, "format": store.STORE_FORMAT, "datasets": names,
            "samples": {"train": len(train_records), "eval": len(eval_records)},
            "report": {"train": asdict(report.train), "eval": asdict(report.eval), "seconds": report.seconds}}
    (partial / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    replace_folder(partial, target)


def _fail_marker(partial: Path) -> Path:
    return partial / "failed.json"


def _wait_for_chunks(partial: Path, target: Path, counts: dict[str, int], started: float) -> None:
    """Poll until every chunk of every split is in the store (other processes write their share),
    or another machine sharing the cache folder has completed the store."""
    last_change, last_seen = time.time(), -1
    while not (target / "meta.json").exists():
        _raise_if_failed(partial, started)
        missing = [(split, n) for split, count in counts.items() for n in range(count)
                   if not store.chunk_done(partial, split, n)]
        if not missing:
            return
        if len(missing) != last_seen:
            last_change, last_seen = time.time(), len(missing)
        elif time.time() - last_change > STALL_SECONDS:
            raise UserError(f"tokenization in {partial} made no progress for {STALL_SECONDS // 60} minutes "
                            f"({len(missing)} chunks missing, first: {missing[0][0]} chunk {missing[0][1]}).",
                            hint="check that every process of the run is alive and sees the same cache folder.")
        time.sleep(POLL_SECONDS)


def _wait_for_store(target: Path, partial: Path, started: float) -> None:
    """Poll until the main process has published the store (or reported why it cannot)."""
    last_change, last_count = time.time(), -1
    while not (target / "meta.json").exists():
        _raise_if_failed(partial, started)
        count = len(list((partial / "chunks").glob("*-*"))) if (partial / "chunks").is_dir() else 0
        if count != last_count:
            last_change, last_count = time.time(), count
        elif time.time() - last_change > STALL_SECONDS:
            raise UserError(f"the tokenized data {target} was not completed by the main process within "
                            f"{STALL_SECONDS // 60} minutes of its last progress.",
                            hint="check the main process's output for the reason.")
        time.sleep(POLL_SECONDS)


def _raise_if_failed(partial: Path, started: float) -> None:
    marker = _fail_marker(partial)
    try:
        if marker.stat().st_mtime >= started - 1:
            raise UserError(json.loads(marker.read_text(encoding="utf-8"))["error"])
    except (OSError, ValueError, KeyError):
        pass


def _record_failure(partial: Path, error: BaseException) -> None:
    try:
        partial.mkdir(parents=True, exist_ok=True)
        _fail_marker(partial).write_text(json.dumps({"error": str(error)}), encoding="utf-8")
    except OSError:
        pass


# ---------------------------------------------------------------------------------------- entry

def _names(value: list[str] | None) -> list[str]:
    return list(value or [])


def _first_conversations(names: list[str], cfg: RunConfig, n: int) -> list[Conversation]:
    """The first n conversations of the datasets, read in a stream (a row that cannot be read
    is reported as such, whatever its position)."""
    from tunesmith.data.chunks import apply_default_system
    from tunesmith.data.formats import dataset_records, record_conversation
    from tunesmith.data.readers import DataProblem
    from tunesmith.data.registry import resolve_datasets

    d = cfg.data
    out: list[Conversation] = []
    if n <= 0:
        return out
    for spec in resolve_datasets(names, d.dataset_dir):
        for record in dataset_records(spec, max_samples=d.max_samples, seed=cfg.train.seed):
            _, conv = record_conversation(spec, *record)
            if isinstance(conv, DataProblem):
                if d.skip_invalid:
                    continue
                raise UserError(str(conv))
            # the system-prompt rule chat, the API and the store's workers follow (template.with_system)
            out.append(apply_default_system(conv, cfg.generate.default_system))
            if len(out) == n:  # no row is read past the last one shown
                return out
    return out


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def data_key(cfg: RunConfig, tokenizer: Any) -> str:
    """The cache key of the config's data; resolving the dataset names (to hash their files)
    reports an unknown dataset before any tokenizing."""
    d = cfg.data
    eval_names = _names(d.eval_dataset)
    return cache_key(cfg, tokenizer, data_fingerprint(_names(d.dataset), d.dataset_dir),
                     data_fingerprint(eval_names, d.dataset_dir) if eval_names else "")


def store_target(cfg: RunConfig, key: str) -> Path:
    from tunesmith.files import cache_dir

    d = cfg.data
    return Path(d.tokenized_path) if d.tokenized_path else cache_dir() / "tokenized" / key


def tokenize_datasets(cfg: RunConfig, tokenizer: Any, *, num_workers: int | None = None, quiet: bool = False,
                      rank: int = 0, world: int = 1) -> TokenizedData:
    """The train and eval samples of a run, from the token store when the same inputs were
    tokenized before (opened, not loaded), else tokenized into it chunk by chunk.

    Eval comes from `eval_dataset`, else from a `val_size` split of the training samples.
    `tokenized_path`, when set, is opened if it exists, else written. With several processes
    (`rank` of `world`), each tokenizes its share of the chunks; rank 0 publishes the store and
    the others poll for it. The report table goes to stderr.
    """
    d = cfg.data
    where = cfg.source or "config"
    train_names = _names(d.dataset)
    say = (lambda _m: None) if quiet or rank else _say
    if d.eval_dataset and d.val_size > 0:
        raise UserError(f"{where}: both 'eval_dataset' and 'val_size' are set; use one of them.")

    if d.tokenized_path and Path(d.tokenized_path, "meta.json").exists() and not d.overwrite_cache:
        data = open_store(Path(d.tokenized_path))
        say(f"Opened tokenized data from tokenized_path {d.tokenized_path} "
            f"({len(data.train)} train, {len(data.eval)} eval samples).")
        try:  # the data files need not be present to train from tokenized_path
            current = data_key(cfg, tokenizer)
        except UserError:
            current = data.key
        if current != data.key:
            say(f"warning: {d.tokenized_path} was tokenized from other data, tokenizer or data settings than "
                "this config's; it is used as is (set overwrite_cache: true to tokenize again).")
        if not quiet and not rank:
            _say(data.report.table())
        return data
    if not train_names:
        raise UserError(f"{where}: 'dataset' is not set; name the training dataset(s) from "
                        f"{Path(d.dataset_dir) / 'dataset_info.json'}.")

    key = data_key(cfg, tokenizer)
    target = store_target(cfg, key)
    if d.tokenized_path and target.exists() and not (target / "meta.json").exists() and \
            (target.is_file() or any(target.iterdir())):
        # Never replace a folder we did not write (e.g. a LLaMA-Factory tokenized dataset).
        raise UserError(f"{where}: tokenized_path '{target}' exists but does not hold tokenized data written by "
                        "tunesmith (no meta.json), so it is left untouched.",
                        hint="point tokenized_path at a new folder, or remove that one.")
    if d.overwrite_cache and world == 1:
        discard_store(target)
    if (target / "meta.json").exists():
        data = open_store(target)
        say(f"Opened tokenized data from the cache {target} ({len(data.train)} train, {len(data.eval)} eval "
            "samples); set overwrite_cache: true to tokenize again.")
        if not quiet and not rank:
            _say(data.report.table())
        return data
    return _build(cfg, tokenizer, key, target, num_workers, rank, world, quiet, say)


def _build(cfg: RunConfig, tokenizer: Any, key: str, target: Path, num_workers: int | None, rank: int,
           world: int, quiet: bool, say: Any) -> TokenizedData:
    from tunesmith.data.chunks import build_chunks
    from tunesmith.data.registry import resolve_datasets

    d = cfg.data
    started_at = time.time()
    specs = {"train": resolve_datasets(_names(d.dataset), d.dataset_dir)}
    if _names(d.eval_dataset):
        specs["eval"] = resolve_datasets(_names(d.eval_dataset), d.dataset_dir)
    partial = partial_folder(target)
    partial.mkdir(parents=True, exist_ok=True)
    if num_workers is None:
        num_workers = d.preprocessing_num_workers if d.preprocessing_num_workers is not None else default_num_workers()
    try:
        built = build_chunks(partial, specs, tokenizer, d, max_samples=d.max_samples, seed=cfg.train.seed,
                             num_workers=num_workers, rank=rank, world=world,
                             default_system=cfg.generate.default_system)
        if rank == 0:
            _wait_for_chunks(partial, target, built.chunks, started_at)
            from filelock import FileLock

            # Machines that share the cache folder each have a first process: one completes the store.
            with FileLock(str(target.parent / f".{target.name}.lock")):
                if not (target / "meta.json").exists():
                    _finalize(partial, target, cfg, specs, key, time.time() - started_at)
        else:
            _wait_for_store(target, partial, started_at)
    except (UserError, OSError) as exc:
        if world > 1:
            _record_failure(partial, exc)
        raise
    data = open_store(target)
    data.from_cache = False
    seconds = time.time() - started_at
    total = sum(built.chunks.values())
    resumed = f" ({total - built.tokenized} of {total} chunks were done before)" \
        if world == 1 and built.tokenized < total else ""
    say(f"Tokenized {built.rows} rows in {seconds:.1f}s ({built.rows / max(seconds, 1e-9):.0f} rows/s){resumed}; "
        f"saved to {target}.")
    if not quiet and not rank:
        _say(data.report.table())
    return data


# ------------------------------------------------------------------------------ preview and dump

GREEN, DIM, RESET = "\033[32m", "\033[2m", "\033[0m"


MERGE_MARK = "\u2016"  # ‖


def merged_boundaries(conv: Conversation, tokenizer: Any) -> set[int]:
    """Token positions of the piece boundaries (prompt | answer) that tokenizing the whole text at
    once would not cut: there one token would span the end of the prompt and the start of the answer."""
    from tunesmith.data.encode import token_starts
    from tunesmith.template import encode_segments

    seg = encode_segments(conv, tokenizer)
    whole = tokenizer(seg.text, add_special_tokens=False, return_offsets_mapping=True)
    starts = set(token_starts(seg.text, list(whole["input_ids"]), whole["offset_mapping"], tokenizer))
    return {first for first, _, _, char, _ in seg.pieces[1:] if char not in starts}


def format_sample(sample: Encoded, tokenizer: Any, *, color: bool, marks: set[int] | None = None) -> str:
    """The sample's text with its trained runs marked: green on a terminal, else [[...]]; a merged
    boundary (see `merged_boundaries`) shows as MERGE_MARK."""
    out: list[str] = []
    marks = marks or set()
    i, n = 0, len(sample.input_ids)
    while i < n:
        if i in marks:
            out.append(MERGE_MARK)
        trained = sample.labels[i] != IGNORE_INDEX
        j = i
        while j < n and (sample.labels[j] != IGNORE_INDEX) == trained and (j == i or j not in marks):
            j += 1
        piece = tokenizer.decode(sample.input_ids[i:j], skip_special_tokens=False,
                                 clean_up_tokenization_spaces=False)
        if trained:
            out.append(f"{GREEN}{piece}{RESET}" if color else f"[[{piece}]]")
        else:
            out.append(f"{DIM}{piece}{RESET}" if color else piece)
        i = j
    return "".join(out)


def preview(cfg: RunConfig, tokenizer: Any, n: int = 3, color: bool | None = None, *, file: Any = None) -> None:
    """Print the first `n` training rows as training sees them, trained tokens marked."""
    file = file or sys.stdout
    if color is None:
        color = file.isatty() and not os.environ.get("NO_COLOR")
    if not _names(cfg.data.dataset):
        raise UserError(f"{cfg.source or 'config'}: 'dataset' is not set; nothing to preview.")
    convs = _first_conversations(_names(cfg.data.dataset), cfg, n)
    shown = merged = 0
    for conv in convs:
        result = encode(conv, tokenizer, cfg.data)
        name, row = result.source
        if isinstance(result, Dropped):
            print(f"=== {name} row {row}: dropped ({result.reason}) ===\n", file=file)
        else:
            cut = ", truncated to cutoff_len" if result.truncated else ""
            print(f"=== {name} row {row}: {len(result.input_ids)} tokens, {result.trained_tokens} trained{cut} ===",
                  file=file)
            marks = merged_boundaries(conv, tokenizer)
            merged += bool(marks)
            print(format_sample(result, tokenizer, color=color, marks=marks), file=file)
        shown += 1
    legend = "green = trained" if color else "[[...]] = trained"
    print(f"(the first {shown} rows; {legend}; labels are -100 elsewhere)", file=file)
    if merged:
        print(f"{MERGE_MARK} = a prompt/answer boundary where tokenizing the whole text at once would merge the "
              f"two sides into one token; each side is tokenized alone, as inference feeds the prompt "
              f"({merged} of {shown} rows).", file=file)


def dump(cfg: RunConfig, tokenizer: Any, out_path: str | Path) -> int:
    """Write every training sample as one JSON line {source, input_ids, labels}, in dataset order.
    Returns the number of lines."""
    data = tokenize_datasets(cfg, tokenizer)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        for s in data.train:
            fh.write(json.dumps({"source": {"dataset": s.source[0], "index": s.source[1]},
                                 "input_ids": s.input_ids, "labels": s.labels}) + "\n")
    tmp.replace(out)
    _say(f"Wrote {len(data.train)} training samples to {out}.")
    return len(data.train)

