"""Training-time forwards (train/kernels.py): the same outputs and gradients as transformers' and
peft's own forwards, less memory kept for backward, and the library forwards back when switched off."""

from __future__ import annotations

import pytest
import torch
from helpers import ONEDNN_CPU

from tunesmith import cpu
from tunesmith.config import FinetuneArgs, ModelArgs
from tunesmith.model.finetune import apply_finetuning
from tunesmith.model.load import load_model
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


@pytest.mark.usefixtures("products")
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


@pytest.mark.usefixtures("products")
def test_an_fp32_lora_layer_is_one_autograd_function_whichever_library_runs_its_products(tiny_model_dir):
    from peft.tuners.lora import Linear

    model = lora_model(tiny_model_dir)
    layer = next(m for m in model.modules() if isinstance(m, Linear))
    set_training_forwards(model, True)
    try:
        out = layer(torch.randn(1, 5, layer.in_features, requires_grad=True))
    finally:
        set_training_forwards(model, False)
    assert type(out.grad_fn).__name__ == "LoraLinearBackward"


@pytest.mark.usefixtures("products")
def test_lora_dropout_keeps_peft_forward_with_the_same_results(tiny_model_dir):
    model = lora_model(tiny_model_dir, dropout=0.1)
    fused_out, fused_grads, _ = run(model, True)  # the dropout draws match: same seed, same order
    plain_out, plain_grads, _ = run(model, False)
    assert torch.allclose(fused_out, plain_out, atol=1e-5)
    for name, grad in fused_grads.items():
        assert torch.allclose(grad, plain_grads[name], atol=1e-6, rtol=1e-4), name


@pytest.mark.usefixtures("products")
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


def test_fp32_products_run_through_onednn(tiny_model_dir):
    """On a CPU whose plan puts them there, the linear layers' and the output head's fp32
    products go through oneDNN."""
    from torch.profiler import ProfilerActivity, profile

    from tunesmith.train.kernels import _onednn_exact

    assert _onednn_exact() is torch.backends.mkldnn.is_available()
    model = lora_model(tiny_model_dir)
    assert cpu.cpu_plan(ONEDNN_CPU, "fp32").fp32_products.on
    with cpu.assume(ONEDNN_CPU):
        set_training_forwards(model, True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(input_ids=torch.arange(5, 69)[None], use_cache=False).logits.sum().backward()
        set_training_forwards(model, False)
    calls = {e.key: e.count for e in prof.key_averages()}
    linears = 7 * model.get_base_model().config.num_hidden_layers  # q, k, v, o, gate, up, down
    # forward: base and A products of every LoRA layer, and the output head; backward: the B, A and
    # base input-gradient products of every LoRA layer (but no input gradient for the first
    # layer's q, k and v: the embeddings are frozen), and the output head's input gradient
    expected = (2 * linears + 1) + (3 * linears + linears - 3 + 1) if _onednn_exact() else 0
    assert calls.get("mkldnn::_linear_pointwise", 0) == expected, calls.get("mkldnn::_linear_pointwise")
    if _onednn_exact():
        assert "aten::mm" not in calls, calls["aten::mm"]


@pytest.mark.parametrize("train_base", [False, True])
def test_lora_product_with_bias_matches_autograd(train_base):
    from tunesmith.train.kernels import _functions

    torch.manual_seed(0)
    x = torch.randn(2, 7, 24, requires_grad=True)
    weight = torch.randn(40, 24, requires_grad=train_base)
    bias = torch.randn(40, requires_grad=True)
    a, b = torch.randn(4, 24, requires_grad=True), torch.randn(40, 4, requires_grad=True)
    inputs = [t for t in (x, weight, bias, a, b) if t.requires_grad]
    ours = _functions()["LoraLinear"].apply(x, weight, bias, a, b, 0.5)
    theirs = torch.nn.functional.linear(x, weight, bias) + 0.5 * (x @ a.t()) @ b.t()
    assert ours.shape == theirs.shape == (2, 7, 40)
    assert torch.allclose(ours, theirs, atol=1e-5)
    grad = torch.randn_like(theirs)
    for mine, ref in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(theirs, inputs, grad),
                         strict=True):
        assert torch.allclose(mine, ref, atol=1e-4, rtol=1e-5)


def test_linear_product_with_bias_matches_autograd():
    from tunesmith.train.kernels import _functions

    torch.manual_seed(0)
    x, weight, bias = (torch.randn(*s, requires_grad=True) for s in ((3, 5, 24), (40, 24), (40,)))
    ours = _functions()["Linear"].apply(x, weight, bias)
    theirs = torch.nn.functional.linear(x, weight, bias)
    assert torch.allclose(ours, theirs, atol=1e-5)
    grad = torch.randn_like(theirs)
    for mine, ref in zip(torch.autograd.grad(ours, (x, weight, bias), grad),
                         torch.autograd.grad(theirs, (x, weight, bias), grad), strict=True):
        assert torch.allclose(mine, ref, atol=1e-4, rtol=1e-5)


def _bf16_norm(width: int = 96):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(width, eps=1e-6).to(torch.bfloat16)
    norm.weight.requires_grad_(False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm


def test_a_frozen_bf16_norm_rounds_as_the_library_does_in_one_autograd_node():
    from tunesmith.train.kernels import _rms_norm_forward

    norm = _bf16_norm()
    x0, grad = (torch.randn(4, 37, 96) * 3).to(torch.bfloat16), torch.randn(4, 37, 96).to(torch.bfloat16)

    def output_and_grad(forward):
        x = x0.clone().requires_grad_()
        out = forward(x)
        out.backward(grad)
        return out, x.grad

    (mine, mine_grad), (lib, lib_grad) = output_and_grad(lambda x: _rms_norm_forward(norm, x)), output_and_grad(norm)
    assert type(mine.grad_fn).__name__ == "FrozenRMSNormRoundedBackward" and mine.dtype == torch.bfloat16
    # Same rounding steps as the library: nearly every value bitwise equal, none further from fp64.
    x = x0.double().requires_grad_()
    ref = norm.weight.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    ref.backward(grad.double())
    for ours, theirs, exact in ((mine, lib, ref), (mine_grad, lib_grad, x.grad)):
        assert (ours == theirs).float().mean() > 0.999
        assert (ours.double() - exact).abs().max() <= (theirs.double() - exact).abs().max() * 1.01


def test_bf16_norms_of_a_bf16_base_get_their_training_forward(tiny_model_dir):
    model = lora_model(tiny_model_dir, dtype=torch.bfloat16)
    set_training_forwards(model, True)
    try:
        norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
        assert norms and all("forward" in m.__dict__ for m in norms)
        out = norms[0](torch.randn(1, 5, norms[0].weight.shape[0], dtype=torch.bfloat16, requires_grad=True))
        assert type(out.grad_fn).__name__ == "FrozenRMSNormRoundedBackward"
    finally:
        set_training_forwards(model, False)


def _offset_weight(self, hidden_states):  # Gemma: (1 + weight)
    normed = hidden_states.float() * torch.rsqrt(hidden_states.float().pow(2).mean(-1, keepdim=True)
                                                 + self.variance_epsilon)
    return (normed * (1.0 + self.weight.float())).to(hidden_states.dtype)


def _weight_in_fp32(self, hidden_states):  # Olmo2 and others: the weight's product before the cast
    normed = hidden_states.float() * torch.rsqrt(hidden_states.float().pow(2).mean(-1, keepdim=True)
                                                 + self.variance_epsilon)
    return (self.weight.float() * normed).to(hidden_states.dtype)


def _one_percent_more(self, hidden_states):
    return type(self).__mro__[1].forward(self, hidden_states) * 1.01


@pytest.mark.parametrize("formula", [_offset_weight, _weight_in_fp32, _one_percent_more])
def test_a_bf16_norm_of_another_formula_keeps_its_own_forward(formula):
    """A norm named like the library's whose bf16 output differs, by its formula or only by the
    order it rounds in, fails the check and keeps its own forward."""
    from torch import nn

    norm = _bf16_norm(576)
    other = type("OtherRMSNorm", (type(norm),), {"forward": formula})(576, eps=1e-6).to(torch.bfloat16)
    other.load_state_dict(norm.state_dict())
    other.weight.requires_grad_(False)
    model = nn.Sequential(norm, other)
    set_training_forwards(model, True)
    assert "forward" in norm.__dict__ and "forward" not in other.__dict__
    set_training_forwards(model, False)


def test_a_frozen_bf16_norm_backward_keeps_fp32_under_autocast():
    """A backward run inside autocast (a caller's own loop) gets the same gradient as outside it."""
    from tunesmith.train.kernels import _functions

    norm = _bf16_norm(576)
    x0 = torch.randn(3, 40, 576).to(torch.bfloat16)
    grad = (x0.float() * 0.5 + 0.1 * torch.randn(3, 40, 576)).to(torch.bfloat16)  # aligned with x
    grads = []
    for autocast in (False, True):
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _functions()["FrozenRMSNormRounded"].apply(x, norm.weight, norm.variance_epsilon).backward(grad)
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])
