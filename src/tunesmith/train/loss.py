"""The SFT loss: token-weighted cross-entropy over supervised positions only
(docs/ARCHITECTURE.md, "Loss").

Only positions whose next token is trained reach the output head, and the head's logits are
computed chunk by chunk inside one autograd function that also forms their gradient, so the
full (tokens x vocabulary) logits and their gradient never exist at once and nothing is
recomputed: the backward pass only scales the gradients formed in forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.train.attention import forward_kwargs
from tunesmith.train.kernels import ROW_MULTIPLE, head_on_onednn, matmul_nt, pad_rows

CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MiB in fp32): 160 tokens of a 49k vocabulary (bench/RESULTS.md)


def chunk_tokens(vocab: int) -> int:
    """Tokens per chunk: a multiple of kernels.ROW_MULTIPLE, so that full chunks need no padding."""
    return max(ROW_MULTIPLE, CHUNK_ELEMENTS // max(vocab, 1) // ROW_MULTIPLE * ROW_MULTIPLE)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), with the gradient formed chunk by chunk in forward.

    The matrix products run in `dtype` (the autocast dtype under mixed precision); the weight is
    cast once per call rather than once per chunk, and softmax, log-sum-exp and the gradient of
    the logits are formed in float32.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                dtype: torch.dtype) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        head_onednn = head_on_onednn(hidden.device.type, dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start : start + chunk].to(dtype)
                y = targets[start : start + chunk]
                padded_h = pad_rows(h, head_onednn)  # row count rounded up for oneDNN (kernels.ROW_MULTIPLE)
                padded = matmul_nt(padded_h, w, head_onednn).float()
                logits = padded[: len(y)]
                # log-sum-exp in place, so that the logits buffer is the chunk's only large one
                target_logit = logits.gather(1, y[:, None]).squeeze(1)
                peak = logits.amax(dim=-1, keepdim=True)
                exps = logits.sub_(peak).exp_()
                sums = exps.sum(dim=-1, keepdim=True)
                total += (peak.squeeze(1) + sums.log().squeeze(1) - target_logit).sum()
                if need_h or need_w:
                    # d(sum CE)/d logits = softmax - onehot, formed in the same buffer
                    grad = exps.div_(sums)
                    grad[torch.arange(len(y), device=y.device), y] -= 1.0
                    if padded_h is not h:  # the padding rows' gradient: zero, in the same buffer
                        padded[len(y) :] = 0.0
                        grad = padded
                    g = grad.to(dtype)
                    if need_h:
                        grad_h[start : start + chunk] = matmul_nt(g, w.t())[: len(y)]
                    if need_w:
                        grad_w += matmul_nt(g.t(), padded_h.t()).float()
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.has = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.has
        grad_h = grad_w = None
        if need_h:
            stored = saved.pop(0)
            grad_h = stored * grad_out.to(stored.dtype)
        if need_w:
            grad_w = (saved.pop(0) * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `targets` (no ignored entries), chunked."""
    chunk = chunk or chunk_tokens(weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, _compute_dtype(hidden, weight))


def _split(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder backbone, output head) of a causal LM, through a peft wrapper if present."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, "model", None) or base.get_decoder()
    return backbone, base.get_output_embeddings()


def _plain_head(model: nn.Module, head: nn.Module) -> bool:
    """The fused path needs a bias-free Linear head and no logit post-processing."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    post = any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return type(head) is nn.Linear and head.bias is None and not post


def token_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int | None = None) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over supervised tokens, their count) for one micro-batch.

    Labels are aligned with input_ids; position t predicts labels[t + 1] (the HF shift). A batch
    with `loss_weights` (messages that set loss_weight) sums each token's loss times its weight,
    still divided by the token count; one without takes the fused path unchanged.
    """
    backbone, head = _split(model)
    hidden = backbone(input_ids=batch["input_ids"], use_cache=False, **forward_kwargs(model, batch)).last_hidden_state
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0:
        return hidden.sum() * 0.0, 0
    h = hidden[:, :-1][keep]
    y = targets[keep]
    if "loss_weights" in batch:
        return _weighted_loss(head, h, y, batch["loss_weights"][:, 1:][keep], chunk), count
    if _plain_head(model, head):
        return linear_cross_entropy(h, head.weight, y, chunk), count
    chunk = chunk or chunk_tokens(head.weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        total = total + torch.utils.checkpoint.checkpoint(
            lambda hh, yy: F.cross_entropy(head(hh).float(), yy, reduction="sum"),
            h[start : start + chunk], y[start : start + chunk], use_reentrant=False)
    return total, count


def _weighted_loss(head: nn.Module, h: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
                   chunk: int | None) -> torch.Tensor:
    """sum_i weight_i * CE_i, chunked through the head with recomputation in backward."""
    chunk = chunk or chunk_tokens(head.weight.shape[0])
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        total = total + torch.utils.checkpoint.checkpoint(
            lambda hh, yy, ww: (F.cross_entropy(head(hh).float(), yy, reduction="none") * ww).sum(),
            h[start : start + chunk], y[start : start + chunk], weights[start : start + chunk].float(),
            use_reentrant=False)
    return total


class SFTModule(nn.Module):
    """Wraps the model so that the loss is computed inside forward (what DDP/DeepSpeed wrap)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return token_loss(self.model, batch)


def reference_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The plain way (full logits + cross-entropy), kept as the oracle for tests."""
    logits = model(input_ids=batch["input_ids"], use_cache=False, **forward_kwargs(model, batch)).logits.float()
    targets = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none")
    if "loss_weights" in batch:
        losses = losses * batch["loss_weights"][:, 1:].reshape(-1)
    return losses.sum(), int((targets != IGNORE_INDEX).sum())
