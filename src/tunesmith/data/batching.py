"""From tokenized samples to model inputs: padded micro-batches or padding-free packed rows.

The order of samples is a pure function of (seed, epoch), so a resumed run sees exactly the
batches the uninterrupted run would have seen (no data-loader state to save).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    index: int  # position in the tokenized training list, for error reports


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(n))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def plan_micro_batches(lengths: Sequence[int], *, batch_size: int, seed: int, epoch: int, shuffle: bool,
                       packing: bool, max_len: int) -> list[list[list[int]]]:
    """The micro-batches of one epoch: each a list of rows, each row a list of sample indices.

    Padded: one sample per row, `batch_size` consecutive samples of the shuffled order.
    Packed: best-fit-decreasing over the whole dataset into rows of at most `max_len` tokens
    (so no sample is dropped or split), rows shuffled, `batch_size` rows per micro-batch.
    """
    if packing:
        rows = pack_best_fit(lengths, max_len)
        rows = [rows[i] for i in epoch_order(len(rows), seed, epoch, shuffle)]
    else:
        rows = [[i] for i in epoch_order(len(lengths), seed, epoch, shuffle)]
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def pack_best_fit(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: every sample in exactly one row, rows <= max_len tokens."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row id), kept sorted
    for i in order:
        need = lengths[i]
        pos = bisect.bisect_left(free, (need, -1))
        if pos < len(free):
            space, row = free.pop(pos)
            rows[row].append(i)
            bisect.insort(free, (space - need, row))
        else:
            rows.append([i])
            bisect.insort(free, (max_len - need, len(rows) - 1))
    return rows


def collate_padded(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding has label -100 and attention 0."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "sample_index": torch.tensor([s.index for s in samples]),
            "num_tokens": torch.tensor(sum(len(s.input_ids) for s in samples))}


def collate_packed(rows: Sequence[Sequence[Sample]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows: samples concatenated, position_ids restarting per sample, and a 4D
    block-diagonal causal mask so attention never crosses a sample boundary (DESIGN §2.4)."""
    width = max(sum(len(s.input_ids) for s in row) for row in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)  # which sample each token belongs to; -1 = padding
    indices = []
    for r, row in enumerate(rows):
        at = 0
        for k, s in enumerate(row):
            m = len(s.input_ids)
            ids[r, at : at + m] = torch.tensor(s.input_ids)
            labels[r, at : at + m] = torch.tensor(s.labels)
            positions[r, at : at + m] = torch.arange(m)
            segment[r, at : at + m] = k
            at += m
            indices.append(s.index)
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    allowed = same & causal
    # Padding rows attend to themselves so softmax never sees an all-masked row.
    allowed |= torch.eye(width, dtype=torch.bool)[None]
    return {"input_ids": ids, "labels": labels, "attention_mask": allowed[:, None, :, :],
            "position_ids": positions, "sample_index": torch.tensor(indices),
            "num_tokens": torch.tensor(int((segment >= 0).sum()))}
