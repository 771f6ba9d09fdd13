"""examples/sft_from_scratch.py against the real thing: transformers' logits, the engine's labels
(through `tunesmith data dump`), and the engine's loss and LoRA gradients."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, build_tiny_model

SCRIPT = REPO / "examples" / "sft_from_scratch.py"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# A multi-turn chat with its own system prompt, and one that gets the template's default.
CHATS = [
    {"system": "You answer in one short sentence.",
     "conversations": [{"from": "human", "value": "Who are you?"},
                       {"from": "gpt", "value": "I am Tunesmith, a small assistant."},
                       {"from": "human", "value": "What can you do?"},
                       {"from": "gpt", "value": "I can answer questions.\nAnd I stop when done."},
                       {"from": "human", "value": "Thanks!"},
                       {"from": "gpt", "value": "You are welcome."}]},
    {"conversations": [{"from": "human", "value": "2 + 2?"}, {"from": "gpt", "value": "4"}]},
]


def as_messages(row: dict) -> list[dict]:
    roles = {"human": "user", "gpt": "assistant"}
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return system + [{"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]]


@pytest.fixture(scope="module")
def sfs():
    spec = importlib.util.spec_from_file_location("sft_from_scratch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory, default_model_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-untied"), default_model_dir, tie=False, seed=1)


def hf_logits(folder: Path, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# ---------------------------------------------------------------- forward pass


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_tiny_logits_equal_transformers(sfs, which, tiny_model_dir, untied_model_dir):
    folder = tiny_model_dir if which == "tied" else untied_model_dir
    model = sfs.Llama.from_pretrained(folder)
    assert model.tied == (which == "tied")
    input_ids = torch.randint(0, model.cfg["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model(input_ids)
    expected = hf_logits(folder, input_ids)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_default_model_logits_equal_transformers(sfs, default_model_dir, tokenizer):
    model = sfs.Llama.from_pretrained(default_model_dir)
    assert model.rope_theta == 100000.0  # read from rope_parameters (transformers 5 config)
    text = sfs.render(tokenizer, [{"role": "user", "content": "Who are you?"}], add_generation_prompt=True)
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ours, _ = model(input_ids)
    torch.testing.assert_close(ours, hf_logits(default_model_dir, input_ids), atol=1e-4, rtol=0)


def test_kv_cache_gives_the_full_forward_logits(sfs, tiny_model_dir):
    model = sfs.Llama.from_pretrained(tiny_model_dir)
    input_ids = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(input_ids)
        first, past = model(input_ids[:, :6])
        steps = [first]
        for t in range(6, 9):
            logits, past = model(input_ids[:, t : t + 1], past)
            steps.append(logits)
    assert past[0][0].shape[2] == 9
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- tokenization and label masking


def test_every_assistant_turn_and_its_end_marker_are_trained(sfs, tokenizer):
    messages = as_messages(CHATS[0])
    input_ids, labels = sfs.build_sample(tokenizer, messages)
    assert input_ids == list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    trained, runs, current = [], [], []
    for tok, lab in zip(input_ids, labels, strict=True):
        if lab != -100:
            assert lab == tok
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    trained = [tokenizer.decode(run) for run in runs]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert trained == [f"{a}<|im_end|>\n" for a in answers]


def test_labels_equal_the_engine_dump(sfs, tokenizer, default_model_dir, tmp_path):
    (tmp_path / "chats.json").write_text(json.dumps(CHATS), encoding="utf-8")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"chats": {
        "file_name": "chats.json", "formatting": "sharegpt",
        "columns": {"messages": "conversations", "system": "system"}}}), encoding="utf-8")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model_name_or_path: {default_model_dir}\ndataset: chats\ndataset_dir: {tmp_path}\n"
                   "cutoff_len: 1024\n", encoding="utf-8")
    out = tmp_path / "dump.jsonl"
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "data", "dump", str(cfg), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(CHATS)
    for row, chat in zip(rows, CHATS, strict=True):
        input_ids, labels = sfs.build_sample(tokenizer, as_messages(chat), cutoff_len=1024)
        assert row["input_ids"] == input_ids
        assert row["labels"] == labels


# ---------------------------------------------------------------- loss, backprop, LoRA


def engine_lora_model(folder: Path, rank: int, alpha: int):
    from tunesmith.config import load_config
    from tunesmith.model.finetune import apply_finetuning
    from tunesmith.model.load import load_model

    cfg = load_config(overrides={"model_name_or_path": str(folder), "finetuning_type": "lora", "lora_target": "all",
                                 "lora_rank": rank, "lora_alpha": alpha, "lora_dropout": 0.0})
    return apply_finetuning(load_model(cfg.model), cfg.finetune, verbose=False)


def engine_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    from tunesmith.train import loss

    # (sum of token losses, number of supervised tokens), exactly as the training loop computes it
    return loss.token_loss(model, batch)


def reference_lora_modules(model) -> dict[str, torch.nn.Module]:
    """'layers.<i>.<self_attn|mlp>.<name>' -> the reference LoRALinear."""
    found = {}
    for i, layer in enumerate(model.model.layers):
        for part_name, part in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for name in LORA_TARGETS:
                if hasattr(part, name):
                    found[f"layers.{i}.{part_name}.{name}"] = getattr(part, name)
    return found


def test_loss_and_lora_gradients_equal_the_engine(sfs, tiny_model_dir, tokenizer):
    rank, alpha = 4, 8
    torch.manual_seed(0)
    ours = sfs.Llama.from_pretrained(tiny_model_dir)
    params = sfs.add_lora(ours, rank, alpha)
    lora = reference_lora_modules(ours)
    assert len(params) == 2 * len(lora) == 2 * 7 * ours.cfg["num_hidden_layers"]
    assert all(not p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n)
    with torch.no_grad():  # B starts at zero; make it random so that A receives a gradient too
        for module in lora.values():
            module.lora_B.normal_(0, 0.05)

    engine = engine_lora_model(tiny_model_dir, rank, alpha)
    copied = 0
    for name, module in engine.named_modules():
        if hasattr(module, "lora_A") and ".layers." in name:
            ref = lora[name[name.index("layers."):]]
            assert module.scaling["default"] == ref.scaling
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(ref.lora_A)
                module.lora_B["default"].weight.copy_(ref.lora_B)
            copied += 1
    assert copied == len(lora)

    samples = [sfs.build_sample(tokenizer, as_messages(chat)) for chat in CHATS]
    input_ids, labels = sfs.collate(samples, tokenizer.pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    for row, (ids, _) in enumerate(samples):
        attention_mask[row, : len(ids)] = 1

    loss = sfs.sft_loss(ours(input_ids)[0], labels)
    loss.backward()
    total, count = engine_loss(engine, {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask})
    assert count == int((labels[:, 1:] != -100).sum())
    (total / count).backward()
    torch.testing.assert_close(loss, (total / count).to(loss.dtype), atol=1e-5, rtol=0)

    for name, module in engine.named_modules():
        if hasattr(module, "lora_A") and ".layers." in name:
            ref = lora[name[name.index("layers."):]]
            assert ref.lora_A.grad.abs().sum() > 0
            torch.testing.assert_close(ref.lora_A.grad, module.lora_A["default"].weight.grad, atol=1e-5, rtol=0)
            torch.testing.assert_close(ref.lora_B.grad, module.lora_B["default"].weight.grad, atol=1e-5, rtol=0)


def test_lora_starts_at_the_base_model_and_training_lowers_the_loss(sfs, tiny_model_dir, tokenizer):
    torch.manual_seed(0)
    model = sfs.Llama.from_pretrained(tiny_model_dir)
    input_ids, labels = sfs.collate([sfs.build_sample(tokenizer, as_messages(CHATS[1]))], tokenizer.pad_token_id)
    with torch.no_grad():
        before, _ = model(input_ids)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = sfs.add_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids)[0], before, atol=0, rtol=0)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = [sfs.train_step(model, optimizer, input_ids, labels) for _ in range(5)]
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base[name.replace(".base.", ".")]), name
