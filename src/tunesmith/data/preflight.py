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
from tunesmith.data.batching import plan_micro_batches
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


def _where(samples: Sequence[Encoded], indices: Sequence[int]) -> str:
    shown = ", ".join(f"{samples[i].source[0]} row {samples[i].source[1]}" for i in indices[:SHOWN_EXAMPLES])
    return shown + (", ..." if len(indices) > SHOWN_EXAMPLES else "")


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


def _trains(labels: np.ndarray, marker: list[int]) -> bool:
    """Whether the marker occurs with every one of its tokens trained."""
    first = np.flatnonzero(labels == marker[0])
    if len(marker) == 1:
        return len(first) > 0
    for at in first:
        if at + len(marker) <= len(labels) and labels[at : at + len(marker)].tolist() == marker:
            return True
    return False


def run_preflight(samples: Sequence[Encoded], tokenizer: Any, cfg: RunConfig) -> PreflightReport:
    report = PreflightReport()
    n = len(samples)
    lengths = [len(s.input_ids) for s in samples]
    trained = [s.trained_tokens for s in samples]
    report.figures.append(f"train samples {n}, tokens {sum(lengths):,}, trained tokens {sum(trained):,}")
    if not n:
        return report
    labels = [np.asarray(s.labels, dtype=np.int64) for s in samples]

    # End of turn: the model learns to stop only if the token that ends an answer is trained.
    markers = end_of_turn_markers(tokenizer)
    names = " / ".join(repr(tokenizer.decode(m)) for m in markers)
    with_marker = [i for i in range(n) if any(_trains(labels[i], m) for m in markers)]
    report.figures.append(f"end of turn {names}: trained in {len(with_marker)} of {n} samples")
    has = set(with_marker)
    missing = [i for i in range(n) if i not in has and not samples[i].truncated and trained[i]]
    cut = sum(1 for i in range(n) if i not in has and samples[i].truncated)
    if not with_marker:
        report.add(FATAL, f"no sample trains the end-of-turn token ({names}): the model would never learn to "
                          "stop and would ramble on after every answer.",
                   "use a chat template whose answers end with an end-of-turn token or eos (e.g. template: "
                   "chatml); `tunesmith data preview` shows the trained tokens.")
    elif missing:
        report.add(WARNING, f"the end-of-turn token is not trained in {_count(len(missing))} not cut short "
                            f"({_where(samples, missing)}).",
                   "check how those rows end (`tunesmith data preview`).")
    if cut:
        report.add(INFO, f"{_count(cut)} cut at cutoff_len {cfg.data.cutoff_len} end without the end-of-turn "
                         "token (expected for cut samples).")

    # Double BOS.
    bos = tokenizer.bos_token_id
    if bos is not None:
        doubled = [i for i in range(n) if samples[i].input_ids[:2] == [bos, bos]]
        if doubled:
            report.add(FATAL, f"two BOS tokens {tokenizer.bos_token!r} open {_count(len(doubled))} "
                              f"({_where(samples, doubled)}): the chat template writes BOS where the text "
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
        occurs = [i for i in range(n) if eos in samples[i].input_ids]
        eos_trained = [i for i in occurs if bool(np.any(labels[i] == eos))]
        if occurs and not eos_trained:
            report.add(FATAL, f"pad == eos ({tokenizer.eos_token!r}) and eos is masked in every sample that has "
                              "it: padding was masked by token id, which took eos with it, so the model would "
                              "never stop.",
                       "mask padding by position (tunesmith does so; re-tokenize with it), or give the "
                       "tokenizer its own pad token.")
        elif eos_trained:
            report.add(INFO, f"pad == eos ({tokenizer.eos_token!r}); fine here: padding is masked by position, "
                             f"and eos is trained in {_count(len(eos_trained))}.")

    # Samples that train nothing.
    empty = [i for i in range(n) if trained[i] == 0]
    if empty and len(empty) == n:
        report.add(FATAL, "no sample has a trained token: there is nothing to learn.",
                   "check that the data has assistant answers (`tunesmith data preview`).")
    elif empty:
        report.add(WARNING, f"{_count(len(empty))} with no trained token only cost time "
                            f"({_where(samples, empty)}).", "remove them or check their answers.")

    # Padding share at the configured batch size (packing leaves little or none), and the longest samples.
    t, d = cfg.train, cfg.data
    if d.packing or d.neat_packing or d.packing_contamination:
        report.figures.append(f"batches: packing at batch size {t.per_device_train_batch_size} (little or no "
                              "padding)")
    else:
        grouping = {"group_by_length": True} if getattr(d, "group_by_length", False) else {}
        plan = plan_micro_batches(lengths, batch_size=t.per_device_train_batch_size, seed=t.seed, epoch=0,
                                  shuffle=d.shuffle, packing=False, max_len=d.cutoff_len, **grouping)
        slots = sum(len(micro) * max(lengths[row[0]] for row in micro) for micro in plan)
        share = 1 - sum(lengths) / max(slots, 1)
        report.figures.append(f"padding share at batch size {t.per_device_train_batch_size}: {share:.1%}")
        if share > PADDING_WARN_SHARE:
            report.add(WARNING, f"{share:.0%} of every batch is padding at per_device_train_batch_size "
                                f"{t.per_device_train_batch_size}.",
                       "set packing: true, or a smaller per_device_train_batch_size with more "
                       "gradient_accumulation_steps.")
    longest = sorted(range(n), key=lambda i: (-lengths[i], i))[:SHOWN_EXAMPLES]
    report.figures.append("longest: " + ", ".join(
        f"{samples[i].source[0]} row {samples[i].source[1]} ({lengths[i]} tokens, {trained[i]} trained"
        f"{', cut' if samples[i].truncated else ''})" for i in longest))
    return report


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
