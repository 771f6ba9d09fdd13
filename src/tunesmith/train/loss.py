"""The SFT loss: token-weighted cross-entropy over supervised positions only (DESIGN §2.3, §2.5).

Only positions whose next token is trained reach the output head, and the head's logits are
computed chunk by chunk inside one autograd function that also forms their gradient, so the
full (tokens x vocabulary) logits and their gradient never exist at once and nothing is
recomputed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100
CHUNK_TOKENS = 1024


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), with the gradient formed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            y = targets[start : start + chunk]
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                # d(sum CE)/d logits = softmax - onehot
                probs = torch.exp(logits - lse[:, None])
                probs[torch.arange(len(y), device=y.device), y] -= 1.0
                g = probs.to(h.dtype)
                if need_h:
                    grad_h[start : start + chunk] = g @ weight.to(g.dtype)
                if need_w:
                    grad_w += (g.t() @ h.to(g.dtype)).float()
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
        return grad_h, grad_w, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)


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


def token_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int = CHUNK_TOKENS) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over supervised tokens, their count) for one micro-batch.

    Labels are aligned with input_ids; position t predicts labels[t + 1] (the HF shift).
    """
    backbone, head = _split(model)
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    hidden = backbone(input_ids=batch["input_ids"], use_cache=False, **kwargs).last_hidden_state
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    count = int(keep.sum())
    if count == 0:
        return hidden.sum() * 0.0, 0
    h = hidden[:, :-1][keep]
    y = targets[keep]
    if _plain_head(model, head):
        return linear_cross_entropy(h, head.weight, y, chunk), count
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        total = total + torch.utils.checkpoint.checkpoint(
            lambda hh, yy: F.cross_entropy(head(hh).float(), yy, reduction="sum"),
            h[start : start + chunk], y[start : start + chunk], use_reentrant=False)
    return total, count


class SFTModule(nn.Module):
    """Wraps the model so that the loss is computed inside forward (what DDP/DeepSpeed wrap)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return token_loss(self.model, batch)


def reference_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The plain way (full logits + cross-entropy), kept as the oracle for tests."""
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    logits = model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits.float()
    targets = batch["labels"][:, 1:]
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE, reduction="sum")
    return total, int((targets != IGNORE).sum())
