"""Every change training makes to a model, applied on entry and undone on exit, however the
run ends (success, a NaN stop, a signal, an exception) and on every process.

While training:
- sdpa models attend per sample with no padding (train/attention.py, `choose_layout`);
- peft's LoRA layers do not cast their inputs to fp32 under mixed precision (autocast casts them
  back at once, so the round trip only costs copies);
- LoRA, gated-MLP, frozen-RMSNorm and CPU fp32 linear layers run the training forwards of
  train/kernels.py (same math, less memory), except under ZeRO-3/FSDP, which gather weights per
  module call;
- NEFTune (`neftune_noise_alpha`) adds noise to the input embeddings through a forward hook.

Afterwards the model is the library's own again: what a caller gets back chats, exports and
saves exactly like a model that was never trained here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from tunesmith.model.finetune import set_adapter_input_casting
from tunesmith.train.attention import choose_layout, restore_attention
from tunesmith.train.kernels import set_training_forwards

if TYPE_CHECKING:
    import torch
    from torch import nn


@contextlib.contextmanager
def training_changes(model: nn.Module, *, packing: bool, contaminate: bool, mixed_precision: bool,
                     sharded: bool, neftune_alpha: float | None = None) -> Iterator[str]:
    """Apply the training-time changes; yields the batch layout the attention now takes."""
    noise = None
    try:
        layout = choose_layout(model, packing, contaminate=contaminate)
        set_adapter_input_casting(model, enabled=not mixed_precision)
        set_training_forwards(model, enabled=not sharded)
        if neftune_alpha:
            noise = model.get_input_embeddings().register_forward_hook(neftune_hook(neftune_alpha))
        yield layout
    finally:
        if noise is not None:
            noise.remove()
        set_training_forwards(model, enabled=False)
        set_adapter_input_casting(model, enabled=True)
        restore_attention(model)


def neftune_hook(alpha: float) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]:
    """NEFTune: uniform noise in [-s, s] added to the input embeddings, s = alpha / sqrt(L x d) with
    L the row's length and d the embedding width (transformers' rule), in training mode only: the
    eval loss during a run sees clean embeddings."""
    import torch

    def add_noise(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-scale, scale)

    return add_noise
