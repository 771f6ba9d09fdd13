"""Training-time forwards (train/kernels.py): the same outputs and gradients as transformers' and
peft's own forwards, less memory kept for backward, and the library forwards back when switched off."""

from __future__ import annotations

import pytest
import torch

from tunesmith.config import FinetuneArgs, ModelArgs
from tunesmith.model import apply_finetuning, load_model
from tunesmith.train.kernels import set_training_forwards


def lora_model(folder, dtype=torch.float32, dropout: float = 0.0, kind: str = "lora"):
    torch.manual_seed(0)
    model = apply_finetuning(load_model(ModelArgs(model_name_or_path=str(folder)), dtype=dtype),
                             FinetuneArgs(finetuning_type=kind, lora_dropout=dropout), verbose=False)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # B starts at zero; make the adapters matter
    return model.train()


def run(model, fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Logits, trainable gradients and the bytes autograd kept for backward (each storage once)."""
    set_training_forwards(model, fused)
    kept: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=torch.arange(5, 69)[None], use_cache=False).logits
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    set_training_forwards(model, False)
    return out, grads, sum(kept.values())


def test_same_outputs_and_gradients_with_less_memory(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    fused_out, fused_grads, fused_bytes = run(model, True)
    plain_out, plain_grads, plain_bytes = run(model, False)
    assert torch.allclose(fused_out, plain_out, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys() and len(fused_grads) > 0
    for name, grad in fused_grads.items():
        assert torch.allclose(grad, plain_grads[name], atol=1e-6, rtol=1e-4), name
    # Per token the library keeps, beyond what is kept here, silu(gate) in every layer and the input
    # of both norms of every layer but the first one's (the embeddings need no gradient). The final
    # norm keeps its input there and its output here: the same size.
    config = model.get_base_model().config
    layers, tokens = config.num_hidden_layers, 64
    saved = 4 * tokens * ((2 * layers - 1) * config.hidden_size + layers * config.intermediate_size)
    assert plain_bytes - fused_bytes == saved, (plain_bytes, fused_bytes, saved)


def test_every_plain_module_gets_its_training_forward(tiny_model_dir):
    from peft.tuners.lora import Linear

    model = lora_model(tiny_model_dir)
    set_training_forwards(model, True)
    replaced = {type(m).__name__ for m in model.modules() if "forward" in m.__dict__}
    assert replaced == {"Linear", "LlamaMLP", "LlamaRMSNorm"}
    assert all("forward" in m.__dict__ for m in model.modules() if isinstance(m, Linear))
    set_training_forwards(model, False)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_lora_dropout_keeps_peft_forward_with_the_same_results(tiny_model_dir):
    model = lora_model(tiny_model_dir, dropout=0.1)
    fused_out, fused_grads, _ = run(model, True)  # the dropout draws match: same seed, same order
    plain_out, plain_grads, _ = run(model, False)
    assert torch.allclose(fused_out, plain_out, atol=1e-5)
    for name, grad in fused_grads.items():
        assert torch.allclose(grad, plain_grads[name], atol=1e-6, rtol=1e-4), name


def test_trainable_norms_keep_their_own_forward(tiny_model_dir):
    """Full fine-tuning trains the norm weights: the output/weight trick needs a frozen weight."""
    model = lora_model(tiny_model_dir, kind="full")
    set_training_forwards(model, True)
    assert not any("forward" in m.__dict__ for m in model.modules() if type(m).__name__ == "LlamaRMSNorm")
    assert all("forward" in m.__dict__ for m in model.modules() if type(m).__name__ == "LlamaMLP")
    set_training_forwards(model, False)
    fused_out, fused_grads, _ = run(model, True)
    plain_out, plain_grads, _ = run(model, False)
    assert torch.allclose(fused_out, plain_out, atol=1e-5)
    for name, grad in fused_grads.items():
        assert torch.allclose(grad, plain_grads[name], atol=1e-6, rtol=1e-4), name


def test_bf16_base_under_autocast(tiny_model_dir):
    model = lora_model(tiny_model_dir, dtype=torch.bfloat16)
    results = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(run(model, fused))
    (fused_out, fused_grads, _), (plain_out, plain_grads, _) = results
    assert fused_out.dtype == torch.bfloat16
    assert (fused_out.float() - plain_out.float()).abs().max() < 0.02 * plain_out.float().abs().max()
    for name, grad in fused_grads.items():
        assert (grad - plain_grads[name]).abs().max() <= 0.05 * plain_grads[name].abs().max() + 1e-6, name


@pytest.mark.parametrize("zero_weight", [False, True])
def test_a_norm_weight_with_a_zero_keeps_its_own_forward(tiny_model_dir, zero_weight):
    model = lora_model(tiny_model_dir)
    norm = model.get_base_model().model.norm
    if zero_weight:
        with torch.no_grad():
            norm.weight[3] = 0.0  # output / weight would divide by zero
    set_training_forwards(model, True)
    assert ("forward" in norm.__dict__) is not zero_weight
