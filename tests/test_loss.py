"""The fused chunked loss equals plain cross-entropy in value and gradients (fp32 exactly, bf16
within its precision), the model-level loss equals the full-logits oracle, and the FLOP count
follows its formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunesmith.data.batching import Sample, collate
from tunesmith.train.loss import linear_cross_entropy, reference_loss, token_loss


def plain(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")


def inputs(seed: int = 0, tokens: int = 70, width: int = 16, vocab: int = 97):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, width, generator=gen)
    weight = torch.randn(vocab, width, generator=gen) * 0.3
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    return hidden, weight, targets


@pytest.mark.parametrize("chunk", [1, 5, 8, 23, 32, 1000])
@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.usefixtures("products")
def test_chunked_loss_and_gradients_equal_plain_cross_entropy(chunk, train_head):
    hidden, weight, targets = inputs()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_(train_head)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_(train_head)
    fused = linear_cross_entropy(h1, w1, targets, chunk)
    expected = plain(h2, w2, targets)
    (fused * 0.37).backward()  # a non-unit upstream gradient must scale the stored gradients
    (expected * 0.37).backward()
    assert torch.allclose(fused, expected, rtol=1e-6)
    assert torch.allclose(h1.grad, h2.grad, atol=1e-6)
    if train_head:
        assert torch.allclose(w1.grad, w2.grad, atol=1e-6)
    else:
        assert w1.grad is None


def test_chunked_loss_under_bf16_autocast():
    hidden, weight, targets = inputs(seed=1, tokens=40, width=32, vocab=211)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(h1, w1, targets, 7)
    fused.backward()
    expected = plain(h2, w2, targets)
    expected.backward()
    fused, expected = fused.detach(), expected.detach()
    assert fused.dtype == torch.float32 and h1.grad.dtype == torch.float32 and w1.grad.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: relative error ~ 2^-8 on each product
    assert abs(fused.item() - expected.item()) < 0.01 * expected.item()
    assert (h1.grad - h2.grad).abs().max() < 0.02 * h2.grad.abs().max()
    assert (w1.grad - w2.grad).abs().max() < 0.02 * w2.grad.abs().max()


def tiny_model(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def samples():
    gen = torch.Generator().manual_seed(3)
    out = []
    for i, n in enumerate((9, 14, 5)):
        ids = torch.randint(1, 211, (n,), generator=gen).tolist()
        labels = [-100] * (n // 2) + ids[n // 2 :]
        out.append(Sample(ids, labels, i))
    return out


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("layout", ["padded", "varlen", "masked"])
def test_model_loss_equals_full_logits_oracle(tie, layout):
    from tunesmith.train.attention import choose_layout

    fused_model, plain_model = tiny_model(tie), tiny_model(tie)
    if layout == "varlen":
        assert choose_layout(fused_model, packing=False) == "varlen"
    rows = [[s] for s in samples()] if layout != "masked" else [samples()[:2], samples()[2:]]
    batch = collate(rows, 0, layout)
    oracle_batch = collate([[s] for s in samples()], 0, "padded")
    loss, count = token_loss(fused_model, batch, chunk=4)
    expected, expected_count = reference_loss(plain_model, oracle_batch)
    loss.backward()
    expected.backward()
    assert count == expected_count == sum(len(s.input_ids) - len(s.input_ids) // 2 for s in samples())
    assert torch.allclose(loss, expected, rtol=1e-5)
    grads = dict(plain_model.named_parameters())
    for name, param in fused_model.named_parameters():
        assert torch.allclose(param.grad, grads[name].grad, atol=2e-5), name


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_flop_count_follows_the_formula():
    from peft import LoraConfig, get_peft_model

    from tunesmith.train.flops import flop_counts

    model = tiny_model(tie=True)
    per_layer = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64  # q,o 32x32; k,v 32x16 (2 kv heads of 8); mlp 3 x 32x64
    full = flop_counts(model)
    assert full.decoder == full.decoder_trainable == 2 * per_layer
    assert full.head == 211 * 32 and full.head_trains and full.layers == 2 and full.width == 32
    assert full.step_flops(10, 4, 50) == 6 * 2 * per_layer * 10 + 6 * 211 * 32 * 4 + 6 * 2 * 32 * 50
    lora = flop_counts(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])))
    adapters = 2 * (32 * 2 + 2 * 32)
    assert lora.decoder == 2 * per_layer + adapters and lora.decoder_trainable == adapters
    assert not lora.head_trains
    assert lora.step_flops(10, 4, 0) == (4 * (2 * per_layer + adapters) + 2 * adapters) * 10 + 4 * 211 * 32 * 4


def test_bf16_run_matches_fp32_within_bf16_precision(tmp_path, tiny_model_dir, repo_data):
    """bf16 LoRA: frozen base stored in bf16, adapters and their optimizer state in fp32, losses
    close to the fp32 run's."""
    import json

    from safetensors.torch import load_file

    from tunesmith.config import load_config
    from tunesmith.env import bf16_supported
    from tunesmith.train import run_training

    if not bf16_supported("cpu"):
        pytest.skip("this CPU has no native bf16")
    data = json.loads((repo_data / "alpaca_demo.json").read_text(encoding="utf-8"))[:12]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.json").write_text(json.dumps(data))
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.json"}}))

    def run(name: str, **extra: object):
        overrides = {"model_name_or_path": str(tiny_model_dir), "dataset": "a", "dataset_dir": str(tmp_path / "data"),
                     "cutoff_len": 96, "output_dir": str(tmp_path / name), "per_device_train_batch_size": 4,
                     "learning_rate": 5e-3, "max_steps": 3, "logging_steps": 1, "save_steps": 0, "packing": True,
                     "lr_scheduler_type": "constant", "preprocessing_num_workers": 1, "report_to": "none", **extra}
        result = run_training(load_config(None, overrides))
        lines = (tmp_path / name / "trainer_log.jsonl").read_text().splitlines()
        return result.model, [json.loads(x)["loss"] for x in lines]

    model, bf16_losses = run("bf16", bf16=True)
    _, fp32_losses = run("fp32")
    for a, b in zip(bf16_losses, fp32_losses, strict=True):
        assert abs(a - b) < 0.02 * b, (bf16_losses, fp32_losses)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if n.endswith("q_proj.base_layer.weight"))
    saved = load_file(tmp_path / "bf16" / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    # After training the adapters cast their inputs again, so the model runs without autocast.
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("layout", ["padded", "varlen", "masked"])
def test_loss_weight_scales_a_samples_tokens_and_keeps_the_token_count(layout):
    """A sample of weight 2 adds exactly what two copies of it add; the count stays one copy's."""
    a, b, _ = samples()
    weighted = Sample(a.input_ids, a.labels, 0, [2.0] * len(a.input_ids))
    plain_b = Sample(b.input_ids, b.labels, 1)
    from tunesmith.train.attention import choose_layout

    model = tiny_model(True)
    if layout == "varlen":
        assert choose_layout(model, packing=False) == "varlen"
    rows = [[weighted], [plain_b]] if layout != "masked" else [[weighted, plain_b]]
    batch = collate(rows, 0, layout)
    assert "loss_weights" in batch
    loss, count = token_loss(model, batch, chunk=4)
    twice, twice_count = token_loss(model, collate([[a], [a], [b]], 0, "padded"), chunk=4)
    assert "loss_weights" not in collate([[a], [b]], 0, layout)  # the unweighted path stays as it was
    assert torch.allclose(loss, twice, rtol=1e-5)
    assert count == twice_count - (len(a.input_ids) - len(a.input_ids) // 2)
    oracle, oracle_count = reference_loss(model, collate([[weighted], [plain_b]], 0, "padded"))
    assert torch.allclose(loss, oracle, rtol=1e-5) and oracle_count == count
