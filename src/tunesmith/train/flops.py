"""How many floating-point operations a training step does: the useful ones, for achieved FLOP/s.

A matrix product with a weight of P parameters costs 2P FLOPs per token forward, 2P more for the
gradient of its input and 2P more for the gradient of its weight (only when the weight trains).
So per trained token:

    decoder linears     2*Nb (forward) + 2*Nb (input grads) + 2*Nt (weight grads)
                        where Nb = all linear weights in the decoder (LoRA A/B included), Nt = the
                        trainable ones: 6*Nb for full fine-tuning, ~4*Nb for LoRA or frozen layers;
    output head         2*Nh + 2*Nh (+ 2*Nh if the head trains), only on supervised positions,
                        since the loss never forms logits elsewhere (train/loss.py);
    attention           causal scores and weighted sum for a sample of l tokens: 2 * l^2 * width
                        per layer forward (the masked half not counted), twice that backward, so
                        6 * layers * width * l^2 per sample (width = heads x head_dim).

Embedding lookups, norms, activations and the optimizer are left out (a few percent).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class FlopCounts:
    decoder: int  # Nb
    decoder_trainable: int  # Nt
    head: int  # Nh
    head_trains: bool
    layers: int
    width: int

    def step_flops(self, tokens: int, supervised: int, attention_pairs: int) -> float:
        """FLOPs of forward + backward over `tokens` tokens, of which `supervised` reach the head,
        in samples whose squared lengths add up to `attention_pairs`."""
        body = (4 * self.decoder + 2 * self.decoder_trainable) * tokens
        head = (6 if self.head_trains else 4) * self.head * supervised
        attention = 6 * self.layers * self.width * attention_pairs
        return float(body + head + attention)


def flop_counts(model: nn.Module) -> FlopCounts:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head_module = base.get_output_embeddings()
    head_weight = getattr(head_module, "weight", None)
    decoder = trainable = 0
    for module in base.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and module is not head_module and weight is not None:
            decoder += weight.numel()
            trainable += weight.numel() if weight.requires_grad else 0
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    heads = getattr(config, "num_attention_heads", 0) or 0
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)
    return FlopCounts(decoder=decoder, decoder_trainable=trainable,
                      head=head_weight.numel() if head_weight is not None else 0,
                      head_trains=bool(head_weight is not None and head_weight.requires_grad),
                      layers=getattr(config, "num_hidden_layers", 0) or 0, width=heads * head_dim)
