"""One conversation -> token ids and labels, with exact masks and a stated truncation policy.

Labels are aligned with input_ids (the one-token shift happens in the loss, as in Hugging Face).
The conversation is encoded piece by piece (`template.encode_segments`): each prompt part and
each answer is tokenized alone, so the ids before every answer are exactly the ids inference
feeds for that prompt, and every character of an answer and its end-of-turn marker lies in its
trained tokens. An answer's tokens are trained (label = id), the rest are -100. Where prompt and
answer would merge into one token if the whole text were tokenized at once (`Assistant:"`),
this differs from that tokenization; `data preview` marks such boundaries.

A message's `loss_weight` scales its tokens' loss (0 leaves the turn untrained); samples
without one carry no weights and take the plain path.

Truncation to `cutoff_len` tokens keeps whole turns while they fit:

1. a sample of at most `cutoff_len` tokens is kept whole;
2. otherwise it is cut right after the last trained assistant turn (its end-of-turn marker
   included) that ends within `cutoff_len` tokens; later turns are dropped;
3. if not even the first trained answer ends within `cutoff_len`, the sample is hard-cut at
   `cutoff_len` tokens, as long as at least one trained token remains;
4. a sample with no trained token left is dropped with the reason
   "prompt longer than cutoff_len" (the answers begin after the cut) or
   "no assistant answer trained" (it has no answer to learn at all).

Dropped samples are returned as `Dropped`, counted and reported by the pipeline, never lost
silently. `truncated` is True whenever tokens were cut off (rule 2 or 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tunesmith.config import DataArgs
from tunesmith.template import Conversation, Segmented, encode_segments

IGNORE_INDEX = -100
PROMPT_TOO_LONG = "prompt longer than cutoff_len"
NOTHING_TRAINED = "no assistant answer trained"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # same length as input_ids; -100 = not trained
    source: tuple[str, int]  # (dataset name, row index)
    truncated: bool = False
    weights: list[float] | None = None  # per-token loss weight, only when a message sets loss_weight

    @property
    def trained_tokens(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


@dataclass
class Dropped:
    source: tuple[str, int]
    reason: str


def loss_weight(message: dict[str, Any]) -> float:
    """A message's loss weight: 1 unless it sets `loss_weight` (a finite number >= 0)."""
    weight = message.get("loss_weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"loss_weight must be a finite number >= 0, got {weight!r}")
    return float(weight)


def label_pieces(seg: Segmented, messages: list[dict[str, Any]], data_args: DataArgs
                 ) -> tuple[list[int], list[float] | None, list[int]]:
    """(labels, per-token weights or None, token end of every answer) of a segmented conversation."""
    ids = seg.ids
    answers = seg.answers()
    trained = answers[-1:] if data_args.mask_history else answers
    weighted = any("loss_weight" in messages[turn] for _, _, turn in answers)
    labels = list(ids) if data_args.train_on_prompt else [IGNORE_INDEX] * len(ids)
    weights = [1.0] * len(ids) if weighted else None
    for a, b, turn in answers:
        weight = loss_weight(messages[turn]) if weighted else 1.0
        if (a, b, turn) in trained and weight > 0:
            labels[a:b] = ids[a:b]
        elif not data_args.train_on_prompt or weight == 0:
            labels[a:b] = [IGNORE_INDEX] * (b - a)
        if weights is not None:
            weights[a:b] = [weight] * (b - a)
    return labels, weights, [b for _, b, _ in answers]


def _any_trained(labels: list[int]) -> bool:
    return labels.count(IGNORE_INDEX) != len(labels)  # counted in C: a generator costs ~10 us a row


def encode(conv: Conversation, tokenizer: Any, data_args: DataArgs) -> Encoded | Dropped:
    """Tokenize one conversation with its label mask, truncated to `data_args.cutoff_len`."""
    if not data_args.train_on_prompt and not any(m.get("role") == "assistant" for m in conv.messages):
        return Dropped(conv.source, NOTHING_TRAINED)
    seg = encode_segments(conv, tokenizer)
    labels, weights, turn_ends = label_pieces(seg, conv.messages, data_args)
    ids = seg.ids
    if not _any_trained(labels):
        return Dropped(conv.source, NOTHING_TRAINED)

    cutoff = data_args.cutoff_len
    truncated = False
    if len(ids) > cutoff:
        truncated = True
        keep = cutoff  # hard cut unless a whole trained turn fits
        for end in reversed(turn_ends):
            if end <= cutoff and _any_trained(labels[:end]):
                keep = end
                break
        ids, labels = ids[:keep], labels[:keep]
        weights = weights[:keep] if weights is not None else None
        if not _any_trained(labels):
            return Dropped(conv.source, PROMPT_TOO_LONG)
    return Encoded(input_ids=ids, labels=labels, source=conv.source, truncated=truncated, weights=weights)


def token_starts(text: str, ids: list[int], offsets: Any, tokenizer: Any) -> list[int]:
    """The character position where each token starts, non-decreasing.

    Fast tokenizers give (0, 0) or another empty range for some special tokens; such a token
    is placed where its literal text next occurs between the previous and the next token,
    else right after the previous token, so that it is masked like its neighbourhood.
    """
    n = len(ids)
    # Start of the next token with a real (non-empty) offset, for bounding the search.
    next_real = [len(text)] * (n + 1)
    for i in range(n - 1, -1, -1):
        s, e = offsets[i]
        next_real[i] = s if e > s else next_real[i + 1]
    starts: list[int] = []
    cursor = 0
    for i in range(n):
        s, e = offsets[i]
        if e > s:
            starts.append(s)
            cursor = max(cursor, e)
            continue
        piece = tokenizer.convert_ids_to_tokens(ids[i])
        found = text.find(piece, cursor, next_real[i + 1]) if piece else -1
        if found >= 0:
            starts.append(found)
            cursor = found + len(piece)
        else:
            starts.append(cursor)
    return starts


def mask_labels(ids: list[int], starts: list[int], spans: list[tuple[int, int]], text_len: int) -> list[int]:
    """label = id where the token starts inside a span, else -100."""
    inside = bytearray(text_len + 1)
    for a, b in spans:
        inside[a:b] = b"\x01" * (b - a)
    return [tid if inside[min(s, text_len)] else IGNORE_INDEX for tid, s in zip(ids, starts, strict=True)]
