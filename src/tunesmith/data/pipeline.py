"""Datasets -> tokenized train/eval samples: worker processes, a content-keyed cache, a report,
and the `data preview` / `data dump` commands that show exactly what training sees.

The cache key is a hash of everything the result depends on: the data files' bytes and their
dataset_info.json entries, the tokenizer (its full serialized vocabulary/merges and chat
template), the template name, cutoff_len, train_on_prompt, mask_history, max_samples,
val_size, seed, skip_invalid, TOKENIZE_VERSION and the source of the modules that convert, render
and encode. Changing any of them tokenizes afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.config import DataArgs, RunConfig
from tunesmith.data.encode import IGNORE_INDEX, Dropped, Encoded, encode
from tunesmith.errors import UserError
from tunesmith.files import replace_folder
from tunesmith.template import Conversation

# Bump when encode()/the stored format changes, so old caches are not reused.
TOKENIZE_VERSION = "2"
# Encoding costs about 0.5 ms a row in one process; a forked pool costs about 0.3-0.8 s to start and
# to ship results back, so below this many rows one process is faster.
MIN_ROWS_FOR_WORKERS = 2000
CHUNK_ROWS = 64
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
    def build(cls, kept: Sequence[Encoded], dropped: Sequence[Dropped]) -> SplitReport:
        lengths = np.array([len(s.input_ids) for s in kept], dtype=np.int64)
        reasons = Counter(d.reason for d in dropped)
        rep = cls(samples=len(kept), dropped=dict(reasons),
                  dropped_examples=[(d.source[0], d.source[1], d.reason) for d in dropped[:MAX_DROP_EXAMPLES]],
                  truncated=sum(s.truncated for s in kept),
                  trained_tokens=sum(s.trained_tokens for s in kept), tokens=int(lengths.sum()))
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
    train: list[Encoded]
    eval: list[Encoded]
    report: TokenizeReport
    from_cache: bool = False
    path: Path | None = None  # where the tokenized data is stored (cache folder or tokenized_path)
    key: str = ""


# --------------------------------------------------------------------------------- tokenization

_worker_tokenizer: Any = None
_worker_args: DataArgs | None = None


def _limit_threads() -> None:
    """One thread per worker process: N processes x M threads would oversubscribe the cores."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _worker_init(tokenizer: Any, data_args: DataArgs) -> None:
    global _worker_tokenizer, _worker_args
    _limit_threads()
    _worker_tokenizer, _worker_args = tokenizer, data_args


def _worker_encode(chunk: list[Conversation]) -> list[Encoded | Dropped]:
    return [encode(conv, _worker_tokenizer, _worker_args) for conv in chunk]


def default_num_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def encode_all(convs: Sequence[Conversation], tokenizer: Any, data_args: DataArgs, *,
               num_workers: int | None = None, min_rows_for_workers: int = MIN_ROWS_FOR_WORKERS,
               desc: str = "Tokenizing") -> tuple[list[Encoded], list[Dropped]]:
    """Encode every conversation in order; (kept, dropped). Uses worker processes for large inputs."""
    from tqdm import tqdm

    workers = num_workers if num_workers is not None else default_num_workers()
    chunks = [list(convs[i : i + CHUNK_ROWS]) for i in range(0, len(convs), CHUNK_ROWS)]
    results: list[Encoded | Dropped] = []
    # The bar appears only for work that lasts (delay) and only on a terminal.
    bar = tqdm(total=len(convs), desc=desc, unit="sample", file=sys.stderr, delay=2.0,
               disable=not sys.stderr.isatty(), dynamic_ncols=True)
    try:
        if workers <= 1 or len(convs) < min_rows_for_workers:
            for chunk in chunks:
                results.extend(encode(conv, tokenizer, data_args) for conv in chunk)
                bar.update(len(chunk))
        else:
            import multiprocessing as mp

            # Set before the pool starts so the children inherit it; the Rust tokenizer would
            # otherwise warn about (and guard against) forking after using its thread pool.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            # fork: the children inherit the tokenizer instead of importing transformers again
            # (spawn costs seconds per worker); they only run Python and the Rust tokenizer.
            ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
            with ctx.Pool(min(workers, len(chunks)), initializer=_worker_init,
                          initargs=(tokenizer, data_args)) as pool:
                for part in pool.imap(_worker_encode, chunks):
                    results.extend(part)
                    bar.update(len(part))
    finally:
        bar.close()
    kept = [r for r in results if isinstance(r, Encoded)]
    dropped = [r for r in results if isinstance(r, Dropped)]
    return kept, dropped


def split_eval(samples: list[Encoded], val_size: float, seed: int, where: str) -> tuple[list[Encoded], list[Encoded]]:
    """Hold out `val_size` (a share in (0, 1) or a count >= 1) of the samples, chosen with `seed`;
    both parts keep dataset order."""
    n = len(samples)
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
    held = set(random.Random(seed).sample(range(n), n_val))
    train = [s for i, s in enumerate(samples) if i not in held]
    evals = [s for i, s in enumerate(samples) if i in held]
    return train, evals


# ----------------------------------------------------------------------------------- fingerprint

def data_fingerprint(names: list[str], dataset_dir: str) -> str:
    """Hash of the named datasets' resolved registry entries and their files' bytes (not mtimes)."""
    from tunesmith.data.registry import resolve_datasets

    h = hashlib.sha256()
    for spec in resolve_datasets(names, dataset_dir):
        entry = {k: v for k, v in asdict(spec).items() if k != "paths"}
        h.update(json.dumps(entry, sort_keys=True, default=str).encode())
        for path in spec.paths:
            h.update(path.name.encode() + b"\0")
            with open(path, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


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
    """Hash of the modules that turn rows into ids (row conversion, rendering, encoding), so a
    changed rule never reuses results made by the old one."""
    import tunesmith.data.encode
    import tunesmith.data.formats
    import tunesmith.template

    h = hashlib.sha256(TOKENIZE_VERSION.encode())
    for module in (tunesmith.data.formats, tunesmith.template, tunesmith.data.encode):
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

def save_tokenized(folder: Path, data: TokenizedData) -> None:
    """Write train/eval as concatenated numpy arrays + meta.json into a temporary folder next to
    `folder`, then rename it into place, so a reader never sees a half-written result."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        names: list[str] = []
        for split, samples in (("train", data.train), ("eval", data.eval)):
            lengths = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
            offsets = np.zeros(len(samples) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            ids = np.fromiter((t for s in samples for t in s.input_ids), dtype=np.int32, count=int(offsets[-1]))
            trained = np.fromiter((lab != IGNORE_INDEX for s in samples for lab in s.labels), dtype=np.bool_,
                                  count=int(offsets[-1]))
            for s in samples:
                if s.source[0] not in names:
                    names.append(s.source[0])
            src = np.array([(names.index(s.source[0]), s.source[1], int(s.truncated)) for s in samples],
                           dtype=np.int64).reshape(-1, 3)
            arrays = {"ids": ids, "trained": trained, "offsets": offsets, "source": src}
            if any(s.weights is not None for s in samples):  # only runs that set loss_weight store weights
                arrays["weights"] = np.fromiter((w for s in samples for w in (s.weights or [1.0] * len(s.input_ids))),
                                                dtype=np.float32, count=int(offsets[-1]))
                arrays["weighted"] = np.array([s.weights is not None for s in samples], dtype=np.bool_)
            np.savez(tmp / f"{split}.npz", **arrays)
        meta = {"key": data.key, "version": TOKENIZE_VERSION, "datasets": names,
                "report": {"train": asdict(data.report.train), "eval": asdict(data.report.eval),
                           "seconds": data.report.seconds}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_tokenized(folder: Path) -> TokenizedData:
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        splits: dict[str, list[Encoded]] = {}
        for split in ("train", "eval"):
            with np.load(folder / f"{split}.npz") as z:
                ids, trained, offsets, src = z["ids"], z["trained"], z["offsets"], z["source"]
                weights = z["weights"].tolist() if "weights" in z else None
                weighted = z["weighted"].tolist() if "weighted" in z else None
            labels = np.where(trained, ids, IGNORE_INDEX)
            ids_list, labels_list, offs = ids.tolist(), labels.tolist(), offsets.tolist()
            names = meta["datasets"]
            splits[split] = [
                Encoded(input_ids=ids_list[offs[i] : offs[i + 1]], labels=labels_list[offs[i] : offs[i + 1]],
                        source=(names[int(src[i, 0])], int(src[i, 1])), truncated=bool(src[i, 2]),
                        weights=weights[offs[i] : offs[i + 1]] if weighted and weighted[i] else None)
                for i in range(len(offs) - 1)
            ]
    except (OSError, KeyError, ValueError, IndexError) as exc:
        raise UserError(f"tokenized data in {folder} cannot be read ({exc}).",
                        hint="set overwrite_cache: true to tokenize again, or remove that folder.") from None
    rep = meta["report"]
    report = TokenizeReport(SplitReport.from_dict(rep["train"]), SplitReport.from_dict(rep["eval"]),
                            rep.get("seconds", 0.0))
    return TokenizedData(splits["train"], splits["eval"], report, from_cache=True, path=folder,
                         key=meta.get("key", ""))


# ---------------------------------------------------------------------------------------- entry

def _names(value: list[str] | None) -> list[str]:
    return list(value or [])


def _load_conversations(names: list[str], cfg: RunConfig) -> list[Conversation]:
    from tunesmith.data.formats import load_conversations
    from tunesmith.template import with_system

    d = cfg.data
    convs = load_conversations(",".join(names), d.dataset_dir, max_samples=d.max_samples,
                               skip_invalid=d.skip_invalid, seed=cfg.train.seed)
    system = cfg.generate.default_system
    if system:  # the system-prompt rule chat and the API follow (template.with_system)
        for conv in convs:
            conv.messages = with_system(conv.messages, system)
    return convs


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tokenize_datasets(cfg: RunConfig, tokenizer: Any, *, num_workers: int | None = None,
                      quiet: bool = False) -> TokenizedData:
    """The train and eval samples of a run, from the cache when the same inputs were tokenized before.

    Eval comes from `eval_dataset`, else from a `val_size` split of the training samples.
    `tokenized_path`, when set, is loaded if it exists, else written. The report table goes to stderr.
    """
    d = cfg.data
    where = cfg.source or "config"
    train_names, eval_names = _names(d.dataset), _names(d.eval_dataset)
    say = (lambda _m: None) if quiet else _say
    if d.eval_dataset and d.val_size > 0:
        raise UserError(f"{where}: both 'eval_dataset' and 'val_size' are set; use one of them.")

    if d.tokenized_path and Path(d.tokenized_path, "meta.json").exists() and not d.overwrite_cache:
        data = load_tokenized(Path(d.tokenized_path))
        say(f"Loaded tokenized data from tokenized_path {d.tokenized_path} "
            f"({len(data.train)} train, {len(data.eval)} eval samples).")
        try:  # the data files need not be present to train from tokenized_path
            current = cache_key(cfg, tokenizer, data_fingerprint(train_names, d.dataset_dir),
                                data_fingerprint(eval_names, d.dataset_dir) if eval_names else "")
        except UserError:
            current = data.key
        if current != data.key:
            say(f"warning: {d.tokenized_path} was tokenized from other data, tokenizer or data settings than "
                "this config's; it is used as is (set overwrite_cache: true to tokenize again).")
        if not quiet:
            _say(data.report.table())
        return data
    if not train_names:
        raise UserError(f"{where}: 'dataset' is not set; name the training dataset(s) from "
                        f"{Path(d.dataset_dir) / 'dataset_info.json'}.")

    # Resolving the names first also reports an unknown dataset before any tokenizing.
    train_fp = data_fingerprint(train_names, d.dataset_dir)
    eval_fp = data_fingerprint(eval_names, d.dataset_dir) if eval_names else ""
    key = cache_key(cfg, tokenizer, train_fp, eval_fp)

    from tunesmith.files import cache_dir

    target = Path(d.tokenized_path) if d.tokenized_path else cache_dir() / "tokenized" / key
    if d.tokenized_path and target.exists() and not (target / "meta.json").exists() and \
            (target.is_file() or any(target.iterdir())):
        # Never replace a folder we did not write (e.g. a LLaMA-Factory tokenized dataset).
        raise UserError(f"{where}: tokenized_path '{target}' exists but does not hold tokenized data written by "
                        "tunesmith (no meta.json), so it is left untouched.",
                        hint="point tokenized_path at a new folder, or remove that one.")
    if not d.tokenized_path and (target / "meta.json").exists() and not d.overwrite_cache:
        data = load_tokenized(target)
        say(f"Loaded tokenized data from the cache {target} ({len(data.train)} train, {len(data.eval)} eval "
            "samples); set overwrite_cache: true to tokenize again.")
        if not quiet:
            _say(data.report.table())
        return data

    started = time.perf_counter()
    train_convs = _load_conversations(train_names, cfg)
    if num_workers is None:
        num_workers = d.preprocessing_num_workers
    train, train_dropped = encode_all(train_convs, tokenizer, d, num_workers=num_workers,
                                      desc="Tokenizing train")
    evals: list[Encoded] = []
    eval_dropped: list[Dropped] = []
    eval_convs: list[Conversation] = []
    if eval_names:
        eval_convs = _load_conversations(eval_names, cfg)
        evals, eval_dropped = encode_all(eval_convs, tokenizer, d, num_workers=num_workers, desc="Tokenizing eval")
    elif d.val_size > 0:
        train, evals = split_eval(train, d.val_size, cfg.train.seed, where)
    if not train:
        reasons = Counter(x.reason for x in train_dropped)
        raise UserError(f"{where}: no training sample is left after tokenization: all {len(train_dropped)} were "
                        f"dropped ({', '.join(f'{r}: {c}' for r, c in reasons.items())}).",
                        hint="raise cutoff_len, or check that the data has assistant answers.")
    report = TokenizeReport(SplitReport.build(train, train_dropped), SplitReport.build(evals, eval_dropped),
                            seconds=time.perf_counter() - started)
    data = TokenizedData(train, evals, report, from_cache=False, path=target, key=key)
    save_tokenized(target, data)
    say(f"Tokenized {len(train_convs) + len(eval_convs)} conversations in {report.seconds:.1f}s; "
        f"saved to {target}.")
    if not quiet:
        _say(report.table())
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
    convs = _load_conversations(_names(cfg.data.dataset), cfg)
    shown = merged = 0
    for conv in convs:
        if shown >= n:
            break
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
    print(f"({shown} of {len(convs)} rows; {legend}; labels are -100 elsewhere)", file=file)
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

