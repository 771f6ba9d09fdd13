"""Packing: no attention across packed samples (sdpa, eager), packed losses equal padded ones step
by step, and the batch plan never drops or repeats a sample."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random

import pytest
import torch

from tunesmith.data.batching import (
    LAYOUTS,
    Sample,
    collate,
    collate_packed,
    collate_varlen,
    pad_varlen,
    plan_micro_batches,
    split_varlen,
)
from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.train.attention import QUERY_BLOCK, VARLEN_SDPA, attention_implementation, choose_layout, forward_kwargs
from tunesmith.train.kernels import cpu_row_multiple


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
    a, b = Sample([5, 6, 7], [IGNORE_INDEX, 6, 7], 4), Sample([8, 9], [8, 9], 2)
    batch = collate_varlen([a, b])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    # b's first label would be predicted from a's last token: it is ignored.
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert int(batch["max_length_q"]) == 3 and int(batch["num_tokens"]) == 5
    assert int(batch["attention_pairs"]) == 9 + 4 and batch["sample_index"].tolist() == [4, 2]


def test_masked_batch_layout():
    a, b, c = Sample([5, 6], [5, 6], 0), Sample([7], [7], 1), Sample([8, 9], [8, 9], 2)
    batch = collate_packed([[a, b], [c]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, IGNORE_INDEX], [IGNORE_INDEX, 9, IGNORE_INDEX]]
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


def tiny_runner(tmp_path, tiny_model_dir, rows: list[dict], **common: object):
    """A function that trains the tiny model on `rows` (3 samples x 2 micro-batches a step) and
    returns the run's log entries."""
    from tunesmith.config import load_config
    from tunesmith.train import run_training

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.json").write_text(json.dumps(rows))
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.json"}}))

    def run(name: str, **extra: object) -> list[dict]:
        overrides = {"model_name_or_path": str(tiny_model_dir), "dataset": "a", "dataset_dir": str(tmp_path / "data"),
                     "output_dir": str(tmp_path / name), "per_device_train_batch_size": 3,
                     "gradient_accumulation_steps": 2, "learning_rate": 5e-3, "logging_steps": 1,
                     "save_steps": 0, "lr_scheduler_type": "constant", "preprocessing_num_workers": 1, "seed": 3,
                     "report_to": "none", **common, **extra}
        run_training(load_config(None, overrides))
        return [json.loads(x) for x in (tmp_path / name / "trainer_log.jsonl").read_text().splitlines()]

    return run


@pytest.mark.usefixtures("products")
def test_packed_and_padded_runs_have_equal_losses(tmp_path, tiny_model_dir, repo_data):
    data = json.loads((repo_data / "alpaca_demo.json").read_text(encoding="utf-8"))[:24]
    run = tiny_runner(tmp_path, tiny_model_dir, data, cutoff_len=96, max_steps=4, train_on_prompt=True)

    padded = run("padded", attn_implementation="eager")  # eager has no varlen kernel: padded batches
    packed = run("packed", packing=True)  # sdpa: padding-free, per-sample attention
    masked = run("masked", neat_packing=True, attn_implementation="eager")  # block-diagonal mask
    assert len(padded) == 4
    for a, b, c in zip(padded, packed, masked, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["loss"] - c["loss"]) < 1e-5, (a, b, c)
    assert max(p["padding_share"] for p in padded) > 0.05, [p["padding_share"] for p in padded]
    # padding-free but for each piece's rounding up to the row multiple of the CPU's fp32 products
    # (6 samples per step: at most 6 pieces)
    multiple = cpu_row_multiple(mixed_precision=False) or 1
    paddings = [p["tokens"] / (1 - p["padding_share"]) - p["tokens"] for p in packed]
    assert all(pad <= 6 * (multiple - 1) + 1e-6 for pad in paddings), paddings
    assert (max(paddings) > 0.5) == (multiple > 1), paddings  # padded exactly when oneDNN is used
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


def test_padded_pieces_keep_the_loss_and_count_only_real_tokens():
    from tunesmith.train.loss import token_loss

    samples = [sample(i, 11 * i, n) for i, n in enumerate((7, 3, 12))]
    whole = collate_varlen(samples)
    padded = pad_varlen(whole, 8, pad_id=0)
    assert padded["input_ids"].shape == (1, 24) and padded["input_ids"][0, 22:].tolist() == [0, 0]
    assert padded["labels"][0, 22:].tolist() == [IGNORE_INDEX] * 2 and padded["position_ids"][0, 22:].tolist() == [0, 1]
    assert padded["cu_seq_lens_q"].tolist() == [0, 7, 10, 22, 24] == padded["cu_seq_lens_k"].tolist()
    assert int(padded["num_tokens"]) == 22 and padded["sample_index"].tolist() == [0, 1, 2]
    assert int(padded["max_length_q"]) == 12
    assert pad_varlen(whole, 11, pad_id=0) is whole and pad_varlen(whole, 1, pad_id=0) is whole  # 22 tokens

    model = tiny_llama("sdpa").train()
    choose_layout(model, packing=False)
    results = []
    for batch in (whole, padded):
        loss, count = token_loss(model, batch)
        loss.backward()
        results.append((loss.detach(), count, [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    (loss, count, grads), (padded_loss, padded_count, padded_grads) = results
    assert padded_count == count and torch.allclose(padded_loss, loss, rtol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(padded_grads, grads, strict=True))


def _attention_inputs(length: int, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    # (1, heads, L, d) views of (1, L, heads, d) tensors, as attention layers hand them over;
    # 3 query heads per key/value head
    q, k, v = (torch.randn(1, length, heads, 16).transpose(1, 2) for heads in (6, 2, 2))
    grad = torch.randn(1, length, 6, 16)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], grad.to(dtype)


# padded inside to a multiple of 32, or not; the last: three query blocks, the third one short
@pytest.mark.parametrize("length", [37, 64, 2 * QUERY_BLOCK + 44])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_matmul_attention_matches_sdpa(dtype, tolerance, length):
    """The bf16 CPU kernel: causal, grouped-query heads mapped like repeat_kv, same gradients."""
    from tunesmith.train.attention import causal_matmul_attention

    (q, k, v), grad = _attention_inputs(length, dtype)
    out = causal_matmul_attention(q, k, v, 0.25)
    out.backward(grad)
    ref_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    qr, kr, vr = ref_inputs
    ref = torch.nn.functional.scaled_dot_product_attention(
        qr, kr.repeat_interleave(3, dim=1), vr.repeat_interleave(3, dim=1), is_causal=True, scale=0.25).transpose(1, 2)
    ref.backward(grad.float())
    assert out.shape == ref.shape == (1, length, 6, 16) and out.dtype == dtype
    scale = ref.abs().max()
    assert (out.float() - ref).abs().max() < tolerance * scale
    for mine, theirs in zip((q, k, v), ref_inputs, strict=True):
        assert (mine.grad.float() - theirs.grad).abs().max() < tolerance * theirs.grad.abs().max()
    # causal: the first position attends to itself only
    assert torch.allclose(out[0, 0].float(), vr[0].repeat_interleave(3, dim=0)[:, 0].float(), atol=tolerance)


def test_bf16_varlen_uses_the_matmul_kernel_and_keeps_samples_apart(monkeypatch):
    from tunesmith import cpu
    from tunesmith.train import attention

    model = tiny_llama("sdpa").to(torch.bfloat16)
    assert choose_layout(model, packing=False) == "varlen"
    calls = []
    real = attention.causal_matmul_attention
    monkeypatch.setattr(attention, "causal_matmul_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    first, other_first, second = sample(0, 3, 11), sample(0, 100, 11), sample(1, 50, 9)
    amx = cpu.FeatureSet("Xeon", "Intel", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
    with cpu.assume(amx):  # a CPU whose plan takes the matmul kernel
        together = logits(model, collate([[first, second]], 0, "varlen"))[0, 11:20].float()
        changed = logits(model, collate([[other_first, second]], 0, "varlen"))[0, 11:20].float()
    assert calls and {shape[2] for shape in calls} == {11, 9}  # one call per sample and layer
    assert torch.equal(together, changed)
    fp32_kernel = dataclasses.replace(cpu.cpu_plan(amx, "bf16"), bf16_attention=cpu.Choice(True, "fp32", "reference"))
    with cpu.assume(fp32_kernel):  # torch's kernel in fp32: the same within bf16
        reference = logits(model, collate([[first, second]], 0, "varlen"))[0, 11:20].float()
    assert (together - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_concat_layout_lets_packed_samples_see_each_other(implementation):
    """packing_contamination: the opposite of test_packed_samples_do_not_see_each_other."""
    model = tiny_llama(implementation)
    assert choose_layout(model, packing=False, contaminate=True) == "concat"
    assert attention_implementation(model) == implementation  # no per-sample kernel
    first, other_first, second, third = sample(0, 3, 11), sample(0, 100, 11), sample(1, 50, 9), sample(2, 20, 6)
    together = logits(model, collate([[first, second], [third]], 0, "concat"))
    changed = logits(model, collate([[other_first, second], [third]], 0, "concat"))
    assert (together[0, 11:20] - changed[0, 11:20]).abs().max() > 1e-3  # the second sample sees the first
    # One causal sequence over the row with positions running on: the two samples as one long sample.
    joined = Sample(first.input_ids + second.input_ids, first.labels + second.labels, 0)
    assert torch.allclose(together[0], logits(model, collate([[joined]], 0, "padded"))[0], atol=1e-5)
    # The padding of the shorter row is masked: its sample computes what it computes alone.
    assert torch.allclose(together[1, :6], logits(model, collate([[third]], 0, "padded"))[0], atol=1e-5)
    assert torch.allclose(together[1, :6], changed[1, :6], atol=1e-5)


def test_concat_batch_layout():
    assert "concat" in LAYOUTS
    a, b, c = (Sample([5, 6, 7], [IGNORE_INDEX, 6, 7], 4), Sample([8, 9], [8, 9], 2),
               Sample([3, 4], [IGNORE_INDEX, 4], 0))
    batch = collate([[a, b], [c]], 1, "concat")
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [3, 4, 1, 1, 1]]
    # labels exactly as encoded: b's first label stays trained (predicted from a's last token)
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, 8, 9],
                                        [IGNORE_INDEX, 4, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4] and batch["position_ids"][1, :2].tolist() == [0, 1]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert int(batch["num_tokens"]) == 7 and batch["sample_index"].tolist() == [4, 2, 0]
    assert int(batch["attention_pairs"]) == 5 * 5 + 2 * 2  # attention spans each whole row
    assert "cu_seq_lens_q" not in batch and split_varlen(batch, 3) == [batch]  # never cut into pieces


@pytest.mark.parametrize("trial", range(10))
def test_concat_rows_fit_and_hold_every_sample_once(trial):
    rng = random.Random(100 + trial)
    max_len = rng.choice([8, 16, 64])
    n = rng.randint(1, 60)
    lengths = [rng.choice([1, max_len, max_len + 3, rng.randint(1, max_len)]) for _ in range(n)]
    samples = [Sample([i + 5] * length, [i + 5] * length, i) for i, length in enumerate(lengths)]
    plan = plan_micro_batches(lengths, batch_size=rng.randint(1, 6), seed=trial, epoch=0, shuffle=True, packing=True,
                              max_len=max_len)
    seen: list[int] = []
    counts: dict[int, int] = {}
    for micro in plan:
        batch = collate([[samples[i] for i in row] for row in micro], 0, "concat")
        for r, row in enumerate(micro):
            used = int(batch["attention_mask"][r].sum())
            assert used == sum(lengths[i] for i in row)
            assert used <= max_len or len(row) == 1  # only a sample longer than max_len exceeds it, alone
            assert batch["input_ids"][r, :used].tolist() == [t for i in row for t in samples[i].input_ids]
            for token in batch["input_ids"][r, :used].tolist():
                counts[token] = counts.get(token, 0) + 1
        seen += batch["sample_index"].tolist()
    assert sorted(seen) == list(range(n))
    assert counts == {i + 5: lengths[i] for i in range(n)}  # every token of every sample, once


def test_contaminating_run_warns_and_trains_differently(tmp_path, tiny_model_dir, repo_data, capsys):
    data = json.loads((repo_data / "alpaca_demo.json").read_text(encoding="utf-8"))[:12]
    run = tiny_runner(tmp_path, tiny_model_dir, data, cutoff_len=192, max_steps=2, shuffle=False)

    clean = run("clean", packing=True)
    assert "packing_contamination" not in capsys.readouterr().err
    mixed = run("mixed", packing_contamination=True)
    err = capsys.readouterr().err
    assert "(concat batches)" in err
    assert err.count("warning: packing_contamination is on") == 1 and "packing_contamination: false" in err
    assert len(clean) == len(mixed) == 2
    # Same samples, same weights at step 1: only the attention across samples differs.
    assert all(abs(a["loss"] - b["loss"]) > 1e-4 for a, b in zip(clean, mixed, strict=True)), (clean, mixed)
    assert [m["tokens"] for m in mixed] == [c["tokens"] for c in clean]  # the same samples, each once


def test_packing_contamination_config():
    from tunesmith.config import load_config
    from tunesmith.errors import UserError

    assert load_config(None, {}).data.packing_contamination is False
    assert load_config(None, ["packing_contamination=true"]).data.packing_contamination is True
    with pytest.raises(UserError, match="'packing_contamination' must be a bool, got 'sometimes'"):
        load_config(None, {"packing_contamination": "sometimes"})
    with pytest.raises(UserError, match="'neat_packing: true'.*'packing_contamination: true'.*choose one"):
        load_config(None, {"packing_contamination": True, "neat_packing": True})


def test_sample_slots_place_each_sample_at_the_start_of_its_own_row():
    from tunesmith.train.attention import sample_slots

    slots = sample_slots(torch.tensor([0, 3, 3, 8, 10]))  # lengths 3, 0, 5, 2: longest 5
    assert slots.tolist() == [0, 1, 2, 10, 11, 12, 13, 14, 15, 16]


def test_accelerator_batches_get_one_call_slots_and_host_bounds():
    """Off the CPU the varlen kernel must not read bounds from the device nor loop over samples:
    to_device builds both once per batch ("meta" stands in for an accelerator)."""
    from tunesmith.train.attention import HOST_BOUNDS, SAMPLE_SLOTS
    from tunesmith.train.distributed import to_device

    batch = collate([[sample(0, 3, 11), sample(1, 50, 9)]], 0, "varlen")
    on_cpu = to_device(batch, torch.device("cpu"))
    assert SAMPLE_SLOTS not in on_cpu and on_cpu[HOST_BOUNDS].device.type == "cpu"
    moved = to_device(batch, torch.device("meta"))
    assert moved[HOST_BOUNDS].device.type == "cpu" and moved["input_ids"].device.type == "meta"
    assert moved[SAMPLE_SLOTS].device.type == "meta" and moved[SAMPLE_SLOTS].shape == (20,)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_one_call_varlen_equals_the_per_sample_path(dtype, tolerance):
    """The accelerator path (all samples in one padded causal call), run here on the CPU: same logits
    and same gradients as one sdpa call per sample, and samples still do not see each other."""
    from tunesmith.train.attention import SAMPLE_SLOTS, one_call_pays, sample_slots

    model = tiny_llama("sdpa").to(dtype)
    assert choose_layout(model, packing=False) == "varlen"
    samples = [sample(0, 3, 11), sample(1, 50, 9), sample(2, 80, 4)]
    batch = collate([samples], 0, "varlen")
    assert one_call_pays(batch["cu_seq_lens_q"])  # so the second pass really takes the one-call path
    results = []
    for one_call in (False, True):
        if one_call:
            batch[SAMPLE_SLOTS] = sample_slots(batch["cu_seq_lens_q"])
        model.zero_grad()
        out = model(input_ids=batch["input_ids"], use_cache=False, **forward_kwargs(model, batch)).logits
        out.float().square().mean().backward()
        results.append((out.detach().float(), [p.grad.float().clone() for p in model.parameters()]))
    (loop_out, loop_grads), (one_out, one_grads) = results
    scale = loop_out.abs().max()
    assert (one_out - loop_out).abs().max() < tolerance * scale
    grad_scale = max(g.abs().max() for g in loop_grads)
    for mine, theirs in zip(one_grads, loop_grads, strict=True):
        assert (mine - theirs).abs().max() < tolerance * grad_scale
    alone = model(input_ids=collate([[samples[1]]], 0, "padded")["input_ids"], use_cache=False).logits
    assert (one_out[0, 11:20] - alone[0].detach().float()).abs().max() < tolerance * scale


def test_one_call_is_taken_only_where_its_padding_stays_small():
    """One long sample among many short ones would pad the batch far beyond the row: the accelerator
    path then keeps one call per sample (with the bounds from the host)."""
    from tunesmith.train.attention import one_call_pays

    assert one_call_pays(torch.tensor([0, 11, 20, 24]))  # 3 x 11 = 33 slots for 24 tokens
    lengths = [2000] + [50] * 40  # 41 x 2000 slots for 4,000 tokens
    assert not one_call_pays(torch.tensor([0, *itertools.accumulate(lengths)]))
    assert not one_call_pays(torch.tensor([0]))
    from tunesmith.train.attention import SAMPLE_SLOTS
    from tunesmith.train.distributed import to_device

    skewed = collate([[sample(0, 3, 200), *(sample(k, 9 * k, 5) for k in range(1, 40))]], 0, "varlen")
    assert SAMPLE_SLOTS not in to_device(skewed, torch.device("meta"))  # so every layer loops per sample
