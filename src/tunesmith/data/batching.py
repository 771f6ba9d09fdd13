"""From tokenized samples to model inputs: padded micro-batches or padding-free packed ones.

The order of samples is a pure function of (seed, epoch), so a resumed run sees exactly the
batches the uninterrupted run would have seen (no data-loader state to save).

A micro-batch is always the same `batch_size` samples of the shuffled order; packing changes
only how they are laid out, never which samples train together, so a packed run computes the
same loss as a padded one step by step (docs/ARCHITECTURE.md, "Loss"). Three layouts exist:

- padded: one sample per row, right-padded to the longest;
- varlen: every sample of the micro-batch concatenated into one row with no padding at all,
  position_ids restarting per sample and the sample boundaries as `cu_seq_lens` (what varlen
  flash attention and our per-sample sdpa take, so attention never crosses a boundary and
  never spends work on masked blocks);
- masked: samples best-fit into rows of at most `max_len` tokens with a 4D block-diagonal
  causal mask (for attention kernels that take neither, e.g. eager);
- concat (only with `packing_contamination`): the same rows with one plain causal mask and
  position_ids running on across the row, so a sample attends to the samples before it. This
  is not the math of the other three: losses differ.

A varlen micro-batch can also be run in pieces of whole samples (`split_varlen`), which bounds
the activations held at once without changing the result.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tunesmith.data.encode import IGNORE_INDEX

LAYOUTS = ("padded", "varlen", "masked", "concat")


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    index: int  # position in the tokenized training list, for error reports
    weights: list[float] | None = None  # per-token loss weights (messages with loss_weight); None = all 1


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    return epoch_order_array(n, seed, epoch, shuffle).tolist()


def epoch_order_array(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The epoch's sample order as a numpy array (8 bytes a sample, not a Python int each)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).numpy()


class UnpackedPlan(Sequence[list[list[int]]]):
    """The padded/varlen plan of an epoch without a Python list per sample: micro-batch k is
    [[i] for i in order[k*batch_size : (k+1)*batch_size]], made when asked for."""

    def __init__(self, order: np.ndarray, batch_size: int) -> None:
        self.order, self.batch_size = order, batch_size

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def _micro(self, k: int) -> list[list[int]]:
        return [[i] for i in self.order[k * self.batch_size : (k + 1) * self.batch_size].tolist()]

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return [self._micro(j) for j in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        return self._micro(k)


def plan_micro_batches(lengths: Sequence[int], *, batch_size: int, seed: int, epoch: int, shuffle: bool,
                       packing: bool, max_len: int, group_by_length: bool = False) -> Sequence[list[list[int]]]:
    """The micro-batches of one epoch: each a list of rows, each row a list of sample indices.

    Every micro-batch holds `batch_size` consecutive samples of the epoch's order (the last may
    hold fewer). Padded: one sample per row. Packed: those samples best-fit into rows of at most
    `max_len` tokens (no sample dropped, split or repeated). With `group_by_length` the order is
    a shuffled sequence of micro-batches of similar lengths (less padding; changes which samples
    train together).
    """
    if not packing and not group_by_length:
        return UnpackedPlan(epoch_order_array(len(lengths), seed, epoch, shuffle), batch_size)
    if isinstance(lengths, np.ndarray):
        lengths = lengths.tolist()
    order = epoch_order(len(lengths), seed, epoch, shuffle)
    if group_by_length:
        order = _length_grouped(order, lengths, batch_size, seed, epoch, shuffle)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if not packing:
        return [[[i] for i in batch] for batch in batches]
    return [[[batch[k] for k in row] for row in pack_best_fit([lengths[i] for i in batch], max_len)]
            for batch in batches]


def _length_grouped(order: list[int], lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                    shuffle: bool) -> list[int]:
    """Sort by length inside windows of 50 micro-batches, then shuffle the micro-batches: similar
    lengths train together while the epoch still mixes short and long ones."""
    window = 50 * batch_size
    grouped: list[list[int]] = []
    for start in range(0, len(order), window):
        part = sorted(order[start : start + window], key=lambda i: -lengths[i])
        grouped.extend(part[k : k + batch_size] for k in range(0, len(part), batch_size))
    keep_last = grouped.pop() if grouped and len(grouped[-1]) < batch_size else None
    grouped = [grouped[i] for i in epoch_order(len(grouped), seed + 1, epoch, shuffle)]
    if keep_last is not None:  # the one short micro-batch stays last, so every other one is full
        grouped.append(keep_last)
    return [i for batch in grouped for i in batch]


def pack_best_fit(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: every sample in exactly one row, rows <= max_len tokens
    (a sample longer than max_len gets a row of its own)."""
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


def collate(rows: Sequence[Sequence[Sample]], pad_id: int, layout: str) -> dict[str, torch.Tensor]:
    """One planned micro-batch in the given layout."""
    flat = [s for row in rows for s in row]
    if layout == "varlen":
        batch, laid = collate_varlen(flat), [flat]
    elif layout == "masked":
        batch, laid = collate_packed(rows, pad_id), rows
    elif layout == "padded":
        batch, laid = collate_padded(flat, pad_id), [[s] for s in flat]
    elif layout == "concat":
        batch, laid = collate_concat(rows, pad_id), rows
    else:
        raise ValueError(f"unknown batch layout {layout!r}; expected one of {LAYOUTS}")
    if any(s.weights is not None for s in flat):  # only then: the unweighted path stays as it is
        batch["loss_weights"] = loss_weights(laid, batch["labels"].shape)
    return batch


def loss_weights(rows: Sequence[Sequence[Sample]], shape: torch.Size) -> torch.Tensor:
    """Per-token loss weights laid out like the labels (rows of samples end to end; 0 on padding)."""
    weights = torch.zeros(shape, dtype=torch.float32)
    for r, row in enumerate(rows):
        values = [w for s in row for w in (s.weights if s.weights is not None else [1.0] * len(s.input_ids))]
        weights[r, : len(values)] = torch.tensor(values)
    return weights


def _sample_fields(samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    lengths = [len(s.input_ids) for s in samples]
    return {"sample_index": torch.tensor([s.index for s in samples]),
            "num_tokens": torch.tensor(sum(lengths)),
            # sum of squared sample lengths: the attention work of the micro-batch (train/flops.py)
            "attention_pairs": torch.tensor(sum(n * n for n in lengths))}


def collate_padded(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding has label -100 and attention 0."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, **_sample_fields(samples)}


def _concatenated(samples: Sequence[Sample]) -> tuple[list[int], list[int], list[int]]:
    """ids, labels and positions of samples laid end to end. Each sample's first label is
    ignored: in a packed row it would be predicted from the previous sample's last token."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for s in samples:
        ids += s.input_ids
        labels += [IGNORE_INDEX, *s.labels[1:]]
        positions += range(len(s.input_ids))
    return ids, labels, positions


def collate_varlen(samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """All samples in one row without padding; `cu_seq_lens_q/k` mark where each starts and ends
    (the keyword names transformers passes to varlen attention kernels)."""
    ids, labels, positions = _concatenated(samples)
    bounds = [0]
    for s in samples:
        bounds.append(bounds[-1] + len(s.input_ids))
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = torch.tensor(max(len(s.input_ids) for s in samples))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]), "cu_seq_lens_q": cu, "cu_seq_lens_k": cu.clone(),
            "max_length_q": longest, "max_length_k": longest.clone(), **_sample_fields(samples)}


def split_varlen(batch: dict[str, torch.Tensor], max_tokens: int | None) -> list[dict[str, torch.Tensor]]:
    """A padding-free micro-batch as consecutive pieces of whole samples, each at most `max_tokens`
    tokens (a longer sample alone), to run forward and backward one piece at a time.

    The loss is a token-weighted sum and every sample's first label is already ignored, so the
    pieces add up to exactly the micro-batch's loss and gradients while only one piece's
    activations are held at a time (peak memory follows the piece, not the micro-batch).
    """
    if not max_tokens or "cu_seq_lens_q" not in batch or int(batch["num_tokens"]) <= max_tokens:
        return [batch]
    bounds = batch["cu_seq_lens_q"].tolist()
    groups: list[tuple[int, int]] = []  # [first, last) sample of each piece
    first = 0
    for k in range(1, len(bounds)):
        if bounds[k] - bounds[first] > max_tokens and k - 1 > first:
            groups.append((first, k - 1))
            first = k - 1
    groups.append((first, len(bounds) - 1))
    pieces = []
    for i, j in groups:
        a, b = bounds[i], bounds[j]
        cu = torch.tensor([x - a for x in bounds[i : j + 1]], dtype=torch.int32)
        lengths = cu.diff()
        pieces.append({"input_ids": batch["input_ids"][:, a:b], "labels": batch["labels"][:, a:b],
                       "position_ids": batch["position_ids"][:, a:b], "cu_seq_lens_q": cu, "cu_seq_lens_k": cu.clone(),
                       "max_length_q": lengths.max(), "max_length_k": lengths.max(),
                       "sample_index": batch["sample_index"][i:j], "num_tokens": torch.tensor(b - a),
                       "attention_pairs": (lengths.long() ** 2).sum(),
                       **({"loss_weights": batch["loss_weights"][:, a:b]} if "loss_weights" in batch else {})})
    return pieces


def pad_varlen(batch: dict[str, torch.Tensor], multiple: int, pad_id: int) -> dict[str, torch.Tensor]:
    """A padding-free micro-batch (or piece) with one segment of padding appended, so that its
    length is a multiple of `multiple` (for kernels that are fastest on such shapes,
    train/kernels.py). The padding is a sample of its own with no labels: it attends only to
    itself and adds nothing to the loss or to `num_tokens`."""
    length = batch["input_ids"].shape[1]
    extra = -length % multiple
    if not extra or "cu_seq_lens_q" not in batch:
        return batch
    cu = torch.cat([batch["cu_seq_lens_q"], torch.tensor([length + extra], dtype=torch.int32)])
    longest = torch.maximum(batch["max_length_q"], torch.tensor(extra))
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX,
            **({"loss_weights": 0.0} if "loss_weights" in batch else {})}
    padded = {k: torch.cat([batch[k], torch.full((1, extra), v, dtype=batch[k].dtype)], dim=1) for k, v in fill.items()}
    positions = torch.cat([batch["position_ids"], torch.arange(extra, dtype=batch["position_ids"].dtype)[None]], dim=1)
    return {**batch, **padded, "position_ids": positions, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu.clone(),
            "max_length_q": longest, "max_length_k": longest.clone()}


def collate_packed(rows: Sequence[Sequence[Sample]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows: samples concatenated, position_ids restarting per sample, and a 4D boolean
    block-diagonal causal mask (True = may attend) so attention never crosses a sample boundary
    (docs/ARCHITECTURE.md, "Packing isolation"). Kernels that add the mask instead (eager) get it
    converted in train/loss.py."""
    width = max(sum(len(s.input_ids) for s in row) for row in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)  # which sample each token belongs to; -1 = padding
    for r, row in enumerate(rows):
        row_ids, row_labels, row_positions = _concatenated(row)
        m = len(row_ids)
        ids[r, :m] = torch.tensor(row_ids)
        labels[r, :m] = torch.tensor(row_labels)
        positions[r, :m] = torch.tensor(row_positions)
        segment[r, :m] = torch.repeat_interleave(torch.arange(len(row)), torch.tensor([len(s.input_ids) for s in row]))
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    allowed = same & causal
    # Padding attends to itself so softmax never sees an all-masked row.
    allowed |= torch.eye(width, dtype=torch.bool)[None]
    return {"input_ids": ids, "labels": labels, "attention_mask": allowed[:, None, :, :],
            "position_ids": positions, **_sample_fields([s for row in rows for s in row])}


def collate_concat(rows: Sequence[Sequence[Sample]], pad_id: int) -> dict[str, torch.Tensor]:
    """Contaminating packed rows: samples concatenated with their labels exactly as encoded,
    position_ids 0..n-1 over the whole row and a 2D padding mask (1 = token), so the model's
    usual causal mask lets every sample attend to the samples before it in its row."""
    width = max(sum(len(s.input_ids) for s in row) for row in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    row_lengths = []
    for r, row in enumerate(rows):
        row_ids = [t for s in row for t in s.input_ids]
        m = len(row_ids)
        ids[r, :m] = torch.tensor(row_ids)
        labels[r, :m] = torch.tensor([t for s in row for t in s.labels])
        mask[r, :m] = 1
        row_lengths.append(m)
    fields = _sample_fields([s for row in rows for s in row])
    # attention spans the whole row, so its work is that of one sequence of the row's length
    fields["attention_pairs"] = torch.tensor(sum(m * m for m in row_lengths))
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "position_ids": torch.arange(width).expand(n, width).clone(), **fields}
