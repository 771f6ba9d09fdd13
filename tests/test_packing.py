"""Packing: no attention across packed samples (sdpa, eager), packed losses equal padded ones step
by step, and the batch plan never drops or repeats a sample."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tunesmith.data.batching import (
    IGNORE,
    Sample,
    collate,
    collate_packed,
    collate_varlen,
    plan_micro_batches,
    split_varlen,
)
from tunesmith.train.attention import VARLEN_SDPA, attention_implementation, choose_layout, forward_kwargs


def tiny_llama(implementation: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=implementation)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def sample(index: int, start: int, length: int) -> Sample:
    ids = [(start + 7 * k) % 290 + 5 for k in range(length)]
    return Sample(ids, ids, index)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], use_cache=False, **forward_kwargs(model, batch)).logits


@pytest.mark.parametrize("implementation,layout", [("sdpa", "varlen"), ("eager", "masked"), ("sdpa", "masked")])
def test_packed_samples_do_not_see_each_other(implementation, layout):
    model = tiny_llama(implementation)
    if layout == "varlen":  # chosen for sdpa whether or not packing was asked for
        assert choose_layout(model, packing=False) == "varlen"
        assert attention_implementation(model) == VARLEN_SDPA
    elif implementation == "eager":
        assert choose_layout(model, packing=True) == "masked"
        assert choose_layout(model, packing=False) == "padded"
    first, other_first, second = sample(0, 3, 11), sample(0, 100, 11), sample(1, 50, 9)
    alone = logits(model, collate([[second]], 0, "padded"))[0]
    together = logits(model, collate([[first, second]], 0, layout))[0, 11:20]
    changed = logits(model, collate([[other_first, second]], 0, layout))[0, 11:20]
    # The first sample really differs (its own logits move), yet the second one's do not.
    assert (logits(model, collate([[first]], 0, "padded")) - logits(model, collate([[other_first]], 0, "padded"))
            ).abs().max() > 1e-2
    assert torch.allclose(together, changed, atol=1e-5)
    assert torch.allclose(together, alone, atol=1e-5)


def test_eager_needs_the_mask_converted():
    """eager adds the mask to the scores, so a boolean 4D mask passed as is would mask nothing."""
    model = tiny_llama("eager")
    first, other_first, second = sample(0, 3, 11), sample(0, 100, 11), sample(1, 50, 9)
    raw = [collate_packed([[a, second]], 0) for a in (first, other_first)]
    with torch.no_grad():
        leaked = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                        use_cache=False).logits[0, 11:] for b in raw]
    assert (leaked[0] - leaked[1]).abs().max() > 1e-3
    kept = [logits(model, b)[0, 11:] for b in raw]
    assert torch.allclose(kept[0], kept[1], atol=1e-5)


def test_varlen_batch_layout():
    a, b = Sample([5, 6, 7], [IGNORE, 6, 7], 4), Sample([8, 9], [8, 9], 2)
    batch = collate_varlen([a, b])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    # b's first label would be predicted from a's last token: it is ignored.
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert int(batch["max_length_q"]) == 3 and int(batch["num_tokens"]) == 5
    assert int(batch["attention_pairs"]) == 9 + 4 and batch["sample_index"].tolist() == [4, 2]


def test_masked_batch_layout():
    a, b, c = Sample([5, 6], [5, 6], 0), Sample([7], [7], 1), Sample([8, 9], [8, 9], 2)
    batch = collate_packed([[a, b], [c]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, IGNORE], [IGNORE, 9, IGNORE]]
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 1, 0]]
    mask = batch["attention_mask"][:, 0].int().tolist()
    assert mask[0] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert mask[1] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]  # the pad attends only to itself
    assert int(batch["num_tokens"]) == 5


@pytest.mark.parametrize("trial", range(25))
def test_plan_never_drops_or_repeats_a_sample(trial):
    rng = random.Random(trial)
    max_len = rng.choice([8, 16, 64])
    n = rng.randint(1, 60)
    lengths = [rng.choice([1, max_len, rng.randint(1, max_len)]) for _ in range(n)]
    batch_size = rng.randint(1, 6)
    for epoch in range(2):
        common = {"batch_size": batch_size, "seed": trial, "epoch": epoch, "shuffle": True, "max_len": max_len}
        padded = plan_micro_batches(lengths, packing=False, **common)
        packed = plan_micro_batches(lengths, packing=True, **common)
        grouped = plan_micro_batches(lengths, packing=True, group_by_length=True, **common)
        for plan in (padded, packed, grouped):
            seen = [i for micro in plan for row in micro for i in row]
            assert sorted(seen) == list(range(n))
            sizes = [sum(len(row) for row in micro) for micro in plan]
            assert all(size == batch_size for size in sizes[:-1]) and 0 < sizes[-1] <= batch_size
            assert all(sum(lengths[i] for i in row) <= max_len for micro in plan for row in micro)
        # Packing changes the layout of a micro-batch, never which samples it holds.
        assert [sorted(i for row in m for i in row) for m in packed] == \
               [sorted(i for row in m for i in row) for m in padded]
        assert all(len(row) == 1 for micro in padded for row in micro)


def test_length_grouping_reduces_padding():
    rng = random.Random(0)
    lengths = [rng.randint(1, 500) for _ in range(400)]
    common = {"batch_size": 4, "seed": 1, "epoch": 0, "shuffle": True, "packing": False, "max_len": 512}

    def slots(plan):
        return sum(len(micro) * max(lengths[row[0]] for row in micro) for micro in plan)

    assert slots(plan_micro_batches(lengths, group_by_length=True, **common)) < \
        0.8 * slots(plan_micro_batches(lengths, **common))


def test_packed_and_padded_runs_have_equal_losses(tmp_path, tiny_model_dir, shared_data):
    from tunesmith.config import load_config
    from tunesmith.train import run_training

    data = json.loads((shared_data / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:24]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.json").write_text(json.dumps(data))
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.json"}}))

    def run(name: str, **extra: object) -> list[dict]:
        overrides = {"model_name_or_path": str(tiny_model_dir), "dataset": "a", "dataset_dir": str(tmp_path / "data"),
                     "cutoff_len": 96, "output_dir": str(tmp_path / name), "per_device_train_batch_size": 3,
                     "gradient_accumulation_steps": 2, "learning_rate": 5e-3, "max_steps": 4, "logging_steps": 1,
                     "save_steps": 0, "lr_scheduler_type": "constant", "preprocessing_num_workers": 1, "seed": 3,
                     "report_to": "none", "train_on_prompt": True, **extra}
        run_training(load_config(None, overrides))
        return [json.loads(x) for x in (tmp_path / name / "trainer_log.jsonl").read_text().splitlines()]

    padded = run("padded", attn_implementation="eager")  # eager has no varlen kernel: padded batches
    packed = run("packed", packing=True)  # sdpa: padding-free, per-sample attention
    masked = run("masked", neat_packing=True, attn_implementation="eager")  # block-diagonal mask
    assert len(padded) == 4
    for a, b, c in zip(padded, packed, masked, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["loss"] - c["loss"]) < 1e-5, (a, b, c)
    assert max(p["padding_share"] for p in padded) > 0.05, [p["padding_share"] for p in padded]
    assert all(p["padding_share"] == 0 for p in packed)
    assert max(p["padding_share"] for p in masked) > 0  # rows of one micro-batch differ in length
    assert all(p["flops_per_second"] > 0 and p["tokens_per_second"] > 0 for p in packed + padded)


def test_flash_attention_gets_varlen_arguments_and_no_mask():
    """flash-attn is GPU-only and absent here: check what the backbone would be given."""
    model = tiny_llama("sdpa")
    model.config._attn_implementation = "flash_attention_2"
    assert choose_layout(model, packing=False) == "varlen"
    assert attention_implementation(model) == "flash_attention_2"  # left as it is
    batch = collate_varlen([sample(0, 3, 5), sample(1, 9, 4)])
    kwargs = forward_kwargs(model, batch)
    assert "attention_mask" not in kwargs
    assert kwargs["cu_seq_lens_q"].tolist() == kwargs["cu_seq_lens_k"].tolist() == [0, 5, 9]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 5 and isinstance(kwargs["max_length_q"], int)
    assert kwargs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]


def test_split_pieces_add_up_to_the_micro_batch():
    from tunesmith.train.loss import token_loss

    samples = [sample(i, 11 * i, n) for i, n in enumerate((7, 3, 12, 5, 5, 2))]
    whole = collate_varlen(samples)
    pieces = split_varlen(whole, 10)
    assert [p["sample_index"].tolist() for p in pieces] == [[0, 1], [2], [3, 4], [5]]  # 12 > 10 stays whole
    assert all(int(p["num_tokens"]) == p["input_ids"].shape[1] for p in pieces)
    for p in pieces:
        expected = collate_varlen([samples[i] for i in p["sample_index"].tolist()])
        assert all(torch.equal(p[k], expected[k]) for k in expected), p["sample_index"]
    assert split_varlen(whole, None) == [whole] and split_varlen(whole, 34) == [whole]

    model = tiny_llama("sdpa").train()
    choose_layout(model, packing=False)
    loss, count = token_loss(model, whole)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    parts = [token_loss(model, p) for p in pieces]
    for part, _ in parts:
        part.backward()
    assert sum(n for _, n in parts) == count
    assert torch.allclose(sum(part for part, _ in parts), loss, rtol=1e-6)
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(model.parameters(), grads, strict=True))
