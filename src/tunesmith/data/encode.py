"""One conversation -> token ids and labels, with exact masks and a stated truncation policy.

Labels are aligned with input_ids (the one-token shift happens in the loss, as in Hugging Face):
a token is trained (label = its id) iff the character where it starts lies inside a trained
span of the rendered text (see `template.render_with_spans`), else its label is -100.

The whole rendered text is tokenized once, with `add_special_tokens=False`, so the ids equal
`tokenizer.apply_chat_template(messages, tokenize=True)`.

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

from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

from tunesmith.config import DataArgs
from tunesmith.template import Conversation, render_with_spans

IGNORE_INDEX = -100
PROMPT_TOO_LONG = "prompt longer than cutoff_len"
NOTHING_TRAINED = "no assistant answer trained"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # same length as input_ids; -100 = not trained
    source: tuple[str, int]  # (dataset name, row index)
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class Dropped:
    source: tuple[str, int]
    reason: str


def encode(conv: Conversation, tokenizer: Any, data_args: DataArgs) -> Encoded | Dropped:
    """Tokenize one conversation with its label mask, truncated to `data_args.cutoff_len`."""
    # Assistant spans are always computed: they are the cut points even when the prompt is trained too.
    text, answer_spans = render_with_spans(conv, tokenizer, train_on_prompt=False,
                                           mask_history=data_args.mask_history)
    trained_spans = [(0, len(text))] if data_args.train_on_prompt else answer_spans
    if not answer_spans and not data_args.train_on_prompt:
        return Dropped(conv.source, NOTHING_TRAINED)

    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    starts = token_starts(text, ids, enc["offset_mapping"], tokenizer)
    labels = mask_labels(ids, starts, trained_spans, len(text))
    if not any(label != IGNORE_INDEX for label in labels):
        return Dropped(conv.source, NOTHING_TRAINED)

    cutoff = data_args.cutoff_len
    truncated = False
    if len(ids) > cutoff:
        truncated = True
        turn_ends = [bisect_left(starts, end) for _, end in answer_spans]  # tokens up to the turn's end
        keep = cutoff  # hard cut unless a whole trained turn fits
        for end in reversed(turn_ends):
            if end <= cutoff and any(label != IGNORE_INDEX for label in labels[:end]):
                keep = end
                break
        ids, labels = ids[:keep], labels[:keep]
        if not any(label != IGNORE_INDEX for label in labels):
            return Dropped(conv.source, PROMPT_TOO_LONG)
    return Encoded(input_ids=ids, labels=labels, source=conv.source, truncated=truncated)


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
