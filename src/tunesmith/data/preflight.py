"""Checks of the tokenized training data before step 1: a short report on stderr, saved as
`preflight.txt` in the run folder. Fatal findings stop the run (unless `preflight: warn`).

- the end-of-turn token inside the trained span: fatal when no sample trains it (the model
  would never learn to stop); a warning for samples that miss it without having been cut;
- two BOS tokens at the start of a sample (a template writing BOS where the tokenizer's BOS is
  also its first role tag): fatal; a template whose text begins with BOS while the tokenizer
  adds one too (tools that tokenize the rendered prompt get two): a warning;
- pad == eos with eos masked wherever it occurs: fatal; pad == eos with eos trained: noted;
- samples with no trained token: a warning (fatal when none has any);
- the padding share of the configured batch size, and the longest samples.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.config import RunConfig
from tunesmith.data import store
from tunesmith.data.batching import epoch_order_array, plan_micro_batches
from tunesmith.data.encode import Encoded
from tunesmith.errors import UserError
from tunesmith.template import render, stop_strings

REPORT_NAME = "preflight.txt"
SHOWN_EXAMPLES = 3
PADDING_WARN_SHARE = 0.5

FATAL, WARNING, INFO = "FATAL", "WARNING", "note"


@dataclass
class Finding:
    level: str  # FATAL | WARNING | note
    text: str
    fix: str = ""


@dataclass
class PreflightReport:
    figures: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def fatal(self) -> list[Finding]:
        return [f for f in self.findings if f.level == FATAL]

    def add(self, level: str, text: str, fix: str = "") -> None:
        self.findings.append(Finding(level, text, fix))

    def text(self) -> str:
        lines = ["Data preflight:"] + [f"  {line}" for line in self.figures]
        order = {FATAL: 0, WARNING: 1, INFO: 2}
        for f in sorted(self.findings, key=lambda f: order[f.level]):
            lines.append(f"  {f.level}: {f.text}")
            if f.fix:
                lines.append(f"    fix: {f.fix}")
        if not self.findings:
            lines.append("  no problems found")
        return "\n".join(lines)


def _count(n: int, word: str = "sample") -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _where(sources: Any, indices: Sequence[int]) -> str:
    shown = ", ".join(f"{sources[i][0]} row {sources[i][1]}" for i in indices[:SHOWN_EXAMPLES])
    return shown + (", ..." if len(indices) > SHOWN_EXAMPLES else "")


@dataclass
class SampleFacts:
    """What the checks read, one numpy entry per sample: a token store keeps these arrays
    (written as the samples are encoded), so checking a million samples reads no token."""

    lengths: np.ndarray
    trained: np.ndarray
    flags: np.ndarray  # store.TRUNCATED | END_OF_TURN_TRAINED | HAS_EOS | EOS_TRAINED | DOUBLE_BOS
    sources: Any  # (dataset, row) of sample i, on demand


class FlagRules:
    """Computes a sample's preflight flags; built once per tokenizer (and per worker process)."""

    def __init__(self, tokenizer: Any) -> None:
        self.markers = end_of_turn_markers(tokenizer)
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def flags_of(self, laid: store.EndToEnd) -> np.ndarray:
        """The flags of samples laid end to end, one numpy pass over them all rather than several
        small ones per sample."""
        ids, labels, starts, lengths = laid.ids, laid.labels, laid.starts, laid.lengths
        n = len(starts)
        value = np.where(laid.truncated, store.TRUNCATED, 0).astype(np.uint8)
        sample_of = np.repeat(np.arange(n), lengths)  # the sample of every token (no gaps between samples)
        ends = starts + lengths
        for marker in self.markers:
            at = _trained_occurrences(labels, marker)
            at = at[at + len(marker) <= ends[sample_of[at]]]  # wholly inside the sample it starts in
            value[sample_of[at]] |= store.END_OF_TURN_TRAINED
        if self.eos is not None:
            has_eos, eos_trained = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
            has_eos[sample_of[ids == self.eos]] = True
            eos_trained[sample_of[labels == self.eos]] = True
            value[has_eos] |= store.HAS_EOS
            value[has_eos & eos_trained] |= store.EOS_TRAINED
        if self.bos is not None:
            two = np.flatnonzero(lengths >= 2)
            first = starts[two]
            value[two[(ids[first] == self.bos) & (ids[first + 1] == self.bos)]] |= store.DOUBLE_BOS
        return value


def facts_of(samples: Sequence[Encoded], tokenizer: Any) -> SampleFacts:
    """The facts of samples held in memory, or the stored ones of a store's samples."""
    records = getattr(samples, "records", None)
    if records is not None:
        return SampleFacts(records["length"].astype(np.int64), records["trained"].astype(np.int64),
                           records["flags"], samples.sources)  # type: ignore[attr-defined]
    return SampleFacts(np.array([len(s.input_ids) for s in samples], dtype=np.int64),
                       np.array([s.trained_tokens for s in samples], dtype=np.int64),
                       FlagRules(tokenizer).flags_of(store.end_to_end(samples)),
                       [s.source for s in samples])


def end_of_turn_markers(tokenizer: Any) -> list[list[int]]:
    """Token sequences that end an answer: the template's end-of-turn strings, and eos."""
    markers: list[list[int]] = []
    for text in stop_strings(tokenizer, None):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if ids and ids not in markers:
            markers.append(ids)
    if tokenizer.eos_token_id is not None and [tokenizer.eos_token_id] not in markers:
        markers.append([tokenizer.eos_token_id])
    return markers


def _trained_occurrences(labels: np.ndarray, marker: list[int]) -> np.ndarray:
    """Where the marker starts in `labels` with every one of its tokens trained (label == id)."""
    k = len(marker)
    if len(labels) < k:
        return np.zeros(0, dtype=np.int64)
    hit = labels[: len(labels) - k + 1] == marker[0]
    for offset, token in enumerate(marker[1:], start=1):
        hit &= labels[offset : len(labels) - k + 1 + offset] == token
    return np.flatnonzero(hit)


def run_preflight(samples: Sequence[Encoded], tokenizer: Any, cfg: RunConfig) -> PreflightReport:
    report = PreflightReport()
    facts = facts_of(samples, tokenizer)
    n = len(facts.lengths)
    lengths, trained, flags, sources = facts.lengths, facts.trained, facts.flags, facts.sources
    report.figures.append(f"train samples {n}, tokens {int(lengths.sum()):,}, trained tokens {int(trained.sum()):,}")
    if not n:
        return report
    truncated = (flags & store.TRUNCATED) != 0

    # End of turn: the model learns to stop only if the token that ends an answer is trained.
    names = " / ".join(repr(tokenizer.decode(m)) for m in end_of_turn_markers(tokenizer))
    has = (flags & store.END_OF_TURN_TRAINED) != 0
    report.figures.append(f"end of turn {names}: trained in {int(has.sum())} of {n} samples")
    missing = np.flatnonzero(~has & ~truncated & (trained > 0))
    cut = int((~has & truncated).sum())
    if not has.any():
        report.add(FATAL, f"no sample trains the end-of-turn token ({names}): the model would never learn to "
                          "stop and would ramble on after every answer.",
                   "use a chat template whose answers end with an end-of-turn token or eos (e.g. template: "
                   "chatml); `tunesmith data preview` shows the trained tokens.")
    elif len(missing):
        report.add(WARNING, f"the end-of-turn token is not trained in {_count(len(missing))} not cut short "
                            f"({_where(sources, missing)}).",
                   "check how those rows end (`tunesmith data preview`).")
    if cut:
        report.add(INFO, f"{_count(cut)} cut at cutoff_len {cfg.data.cutoff_len} end without the end-of-turn "
                         "token (expected for cut samples).")

    # Double BOS.
    bos = tokenizer.bos_token_id
    if bos is not None:
        doubled = np.flatnonzero(flags & store.DOUBLE_BOS)
        if len(doubled):
            report.add(FATAL, f"two BOS tokens {tokenizer.bos_token!r} open {_count(len(doubled))} "
                              f"({_where(sources, doubled)}): the chat template writes BOS where the text "
                              "already begins with it.",
                       "remove the extra {{ bos_token }} from the chat template, or use a named template.")
        else:
            probe = render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                           tokenizer)
            ids = tokenizer(probe)["input_ids"]  # with the special tokens the tokenizer adds by itself
            if probe.startswith(tokenizer.bos_token or "\0") and ids[:2] == [bos, bos]:
                report.add(WARNING, f"the chat template writes BOS {tokenizer.bos_token!r} and the tokenizer adds "
                                    "one too: training here uses one, but a tool that tokenizes the rendered "
                                    "prompt with special tokens sends two.",
                           "set add_bos_token: false in tokenizer_config.json, or drop {{ bos_token }} from "
                           "the template.")

    # pad == eos: harmless when padding is masked by position, fatal when eos ends up masked.
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is not None and pad == eos:
        occurs = int(((flags & store.HAS_EOS) != 0).sum())
        eos_trained = int(((flags & store.EOS_TRAINED) != 0).sum())
        if occurs and not eos_trained:
            report.add(FATAL, f"pad == eos ({tokenizer.eos_token!r}) and eos is masked in every sample that has "
                              "it: padding was masked by token id, which took eos with it, so the model would "
                              "never stop.",
                       "mask padding by position (tunesmith does so; re-tokenize with it), or give the "
                       "tokenizer its own pad token.")
        elif eos_trained:
            report.add(INFO, f"pad == eos ({tokenizer.eos_token!r}); fine here: padding is masked by position, "
                             f"and eos is trained in {_count(eos_trained)}.")

    # Samples that train nothing.
    empty = np.flatnonzero(trained == 0)
    if len(empty) and len(empty) == n:
        report.add(FATAL, "no sample has a trained token: there is nothing to learn.",
                   "check that the data has assistant answers (`tunesmith data preview`).")
    elif len(empty):
        report.add(WARNING, f"{_count(len(empty))} with no trained token only cost time "
                            f"({_where(sources, empty)}).", "remove them or check their answers.")

    # Padding share at the configured batch size (packing leaves little or none), and the longest samples.
    t, d = cfg.train, cfg.data
    if d.packing or d.neat_packing or d.packing_contamination:
        report.figures.append(f"batches: packing at batch size {t.per_device_train_batch_size} (little or no "
                              "padding)")
    else:
        share = _padding_share(lengths, cfg)
        report.figures.append(f"padding share at batch size {t.per_device_train_batch_size}: {share:.1%}")
        if share > PADDING_WARN_SHARE:
            report.add(WARNING, f"{share:.0%} of every batch is padding at per_device_train_batch_size "
                                f"{t.per_device_train_batch_size}.",
                       "set packing: true, or a smaller per_device_train_batch_size with more "
                       "gradient_accumulation_steps.")
    longest = _longest(lengths, SHOWN_EXAMPLES)
    report.figures.append("longest: " + ", ".join(
        f"{sources[i][0]} row {sources[i][1]} ({lengths[i]} tokens, {trained[i]} trained"
        f"{', cut' if truncated[i] else ''})" for i in longest))
    return report


def _longest(lengths: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k longest samples, longest first, ties in sample order. Sorts only the
    samples at least as long as the k-th longest (a full sort of a million lengths takes 60 ms of
    a run's start)."""
    if len(lengths) > k:
        kth_longest = np.partition(lengths, len(lengths) - k)[len(lengths) - k]
        candidates = np.flatnonzero(lengths >= kth_longest)
    else:
        candidates = np.arange(len(lengths))
    return candidates[np.lexsort((candidates, -lengths[candidates]))][:k]


def _padding_share(lengths: np.ndarray, cfg: RunConfig) -> float:
    """Share of padding in the epoch's padded micro-batches (each padded to its longest sample)."""
    t, d = cfg.train, cfg.data
    if t.per_device_train_batch_size == 1:
        return 0.0  # a micro-batch of one sample has no padding, whatever the order
    if getattr(d, "group_by_length", False):
        plan = plan_micro_batches(lengths.tolist(), batch_size=t.per_device_train_batch_size, seed=t.seed,
                                  epoch=0, shuffle=d.shuffle, packing=False, max_len=d.cutoff_len,
                                  group_by_length=True)
        slots = sum(len(micro) * max(int(lengths[row[0]]) for row in micro) for micro in plan)
    else:
        order = epoch_order_array(len(lengths), t.seed, 0, d.shuffle)
        ordered = lengths[order]
        size = t.per_device_train_batch_size
        starts = np.arange(0, len(ordered), size)
        widths = np.maximum.reduceat(ordered, starts)
        counts = np.diff(np.append(starts, len(ordered)))
        slots = int((widths * counts).sum())
    return 1 - int(lengths.sum()) / max(slots, 1)


def preflight(samples: Sequence[Encoded], tokenizer: Any, cfg: RunConfig, out: Path | None, *,
              show: bool = True) -> PreflightReport:
    """Run the checks; print the report and save it in `out` (the main process passes its run
    folder, the others None); raise UserError on a fatal finding unless `preflight: warn`."""
    report = run_preflight(samples, tokenizer, cfg)
    text = report.text()
    if out is not None:
        (Path(out) / REPORT_NAME).write_text(text + "\n", encoding="utf-8")
    if show and out is not None:
        print(text, file=sys.stderr, flush=True)
    if report.fatal and cfg.data.preflight == "strict":
        saved = f" (report: {Path(out) / REPORT_NAME})" if out is not None else ""
        problems = "\n".join(f"  - {f.text}\n    fix: {f.fix}" for f in report.fatal)
        raise UserError(f"the data preflight found what would spoil this training{saved}:\n{problems}",
                        hint="fix it as said, or set preflight: warn to train anyway.")
    return report
