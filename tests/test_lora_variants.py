"""LoRA variants from peft (DoRA, rsLoRA, PiSSA, LoRA+, a fresh adapter on merged ones), QLoRA on
bitsandbytes and NEFTune: each trains on a tiny model, saves an adapter plain peft loads on the
original base, and exports to a model plain transformers loads with the same logits."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import identity_dataset

from tunesmith.config import load_config
from tunesmith.errors import UserError

IDS = torch.tensor([[1, 200, 300, 400, 500, 600]])
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


@pytest.fixture()
def data_dir(tmp_path, repo_data) -> Path:
    return identity_dataset(tmp_path / "data", repo_data)


def train(tmp_path: Path, model_dir: Path, data_dir: Path, name: str, **extra: object):
    from tunesmith.train import run_training

    keys = {"model_name_or_path": str(model_dir), "dataset": "ident", "dataset_dir": str(data_dir),
            "cutoff_len": 96, "output_dir": str(tmp_path / name), "per_device_train_batch_size": 2,
            "learning_rate": 5e-3, "max_steps": 4, "logging_steps": 1, "save_steps": 0,
            "lr_scheduler_type": "constant", "preprocessing_num_workers": 1, "seed": 7, "report_to": "none"}
    keys.update(extra)
    return run_training(load_config(None, keys))


def peft_logits(base_dir: Path, adapter_dir: Path) -> torch.Tensor:
    """Logits of plain transformers + plain peft: the adapter folder on the original base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter_dir).eval()(input_ids=IDS).logits


def export_logits(tmp_path: Path, model_dir: Path, run_dir: Path, **extra: object) -> torch.Tensor:
    """Export the run through the CLI; the logits of the written folder in plain transformers."""
    from transformers import AutoModelForCausalLM

    from tunesmith.cli import main

    cfg = tmp_path / f"export-{run_dir.name}.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": str(model_dir), "output_dir": str(run_dir),
                                   "export_dir": str(tmp_path / f"merged-{run_dir.name}"), **extra}))
    assert main(["export", str(cfg)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / f"merged-{run_dir.name}", dtype=torch.float32)
    with torch.no_grad():
        return merged.eval()(input_ids=IDS).logits


def in_memory_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def test_dora_trains_saves_a_peft_adapter_and_exports(tmp_path, tiny_model_dir, data_dir):
    result = train(tmp_path, tiny_model_dir, data_dir, "dora", use_dora=True)
    out = tmp_path / "dora"
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    loaded = peft_logits(tiny_model_dir, out)
    assert torch.allclose(loaded, in_memory_logits(result.model), atol=1e-5)
    assert torch.allclose(export_logits(tmp_path, tiny_model_dir, out), loaded, atol=1e-4)


def test_pissa_adapter_is_saved_for_the_original_base(tmp_path, tiny_model_dir, data_dir):
    from transformers import AutoModelForCausalLM

    result = train(tmp_path, tiny_model_dir, data_dir, "pissa", pissa_init=True, pissa_iter=-1, lora_rank=4,
                   save_steps=2)
    out = tmp_path / "pissa"
    saved = json.loads((out / "adapter_config.json").read_text())
    # Converted to a plain LoRA (twice the rank) that applies to the unchanged base.
    assert saved["init_lora_weights"] is True and saved["r"] == 8
    loaded = peft_logits(tiny_model_dir, out)
    assert torch.allclose(loaded, in_memory_logits(result.model), atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert not torch.allclose(loaded, in_memory_logits(base), atol=1e-3)  # it learned something
    assert torch.allclose(export_logits(tmp_path, tiny_model_dir, out), loaded, atol=1e-4)
    # A checkpoint holds the adapter as it trains, for the PiSSA-changed base: refused as an adapter.
    with pytest.raises(UserError, match="PiSSA adapter as it was during training"):
        from tunesmith.model.load import load_adapters

        load_adapters(base, [str(out / "checkpoint-2")])


@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_on_a_quantized_base_and_exports_into_the_unquantized_one(tmp_path, tiny_model_dir, data_dir,
                                                                              bits):
    import bitsandbytes as bnb

    result = train(tmp_path, tiny_model_dir, data_dir, f"q{bits}", quantization_bit=bits, max_steps=6)
    layer_type = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert any(isinstance(m, layer_type) for m in result.model.modules())
    out = tmp_path / f"q{bits}"
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    seen = [x["loss"] for x in log if "loss" in x]
    assert len(seen) == 6 and seen[-1] < seen[0], seen
    loaded = peft_logits(tiny_model_dir, out)  # the adapter on the full-precision base
    # Quantization error only: the quantized training model and the full-precision base agree closely.
    assert (loaded - in_memory_logits(result.model)).abs().max() < 0.5
    exported = export_logits(tmp_path, tiny_model_dir, out, quantization_bit=bits)
    assert torch.allclose(exported, loaded, atol=1e-4)


def test_rslora_scaling_and_loraplus_learning_rates(tiny_model_dir):
    from peft.tuners.lora import LoraLayer

    from tunesmith.config import FinetuneArgs, ModelArgs, TrainArgs
    from tunesmith.model.finetune import apply_finetuning
    from tunesmith.model.load import load_model
    from tunesmith.train.optimizers import make_optimizer

    model = apply_finetuning(load_model(ModelArgs(model_name_or_path=str(tiny_model_dir))),
                             FinetuneArgs(lora_rank=4, lora_alpha=8, use_rslora=True, loraplus_lr_ratio=16.0),
                             verbose=False)
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    assert layer.scaling["default"] == pytest.approx(8 / 4 ** 0.5)  # alpha / sqrt(r), not alpha / r
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer("adamw_torch", [{"params": params, "weight_decay": 0.0}],
                               TrainArgs(learning_rate=1e-4), torch.device("cpu"))
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert rates[id(param)] == pytest.approx(1.6e-3 if "lora_B" in name else 1e-4), name


def test_create_new_adapter_merges_the_loaded_one_and_trains_a_fresh_one(tmp_path, tiny_model_dir, tiny_lora_run,
                                                                         data_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(tmp_path, tiny_model_dir, data_dir, "fresh", adapter_name_or_path=str(tiny_lora_run),
                   create_new_adapter=True, lora_rank=2, lora_target="q_proj,v_proj")
    out = tmp_path / "fresh"
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 2 and sorted(saved["target_modules"]) == ["q_proj", "v_proj"]  # not the loaded one's
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, tiny_lora_run).merge_and_unload()
    with torch.no_grad():
        stacked = PeftModel.from_pretrained(merged, out).eval()(input_ids=IDS).logits
    assert torch.allclose(stacked, in_memory_logits(result.model), atol=1e-5)


def test_neftune_noise_only_in_training_and_removed_after(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunesmith.train.model_changes import training_changes

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    embed = model.get_input_embeddings()
    clean = embed(IDS).detach()
    with training_changes(model, packing=False, contaminate=False, mixed_precision=False, sharded=False,
                          neftune_alpha=5.0):
        model.train()
        noisy = embed(IDS).detach()
        bound = 5.0 / (IDS.shape[1] * clean.shape[-1]) ** 0.5
        assert 0 < (noisy - clean).abs().max() <= bound + 1e-6
        model.eval()
        assert torch.equal(embed(IDS), clean)
        model.train()
    assert torch.equal(embed(IDS).detach(), clean)  # the hook is gone


def test_neftune_run_trains_and_records_alpha(tmp_path, tiny_model_dir, data_dir):
    clean = train(tmp_path, tiny_model_dir, data_dir, "clean", max_steps=2)
    noisy = train(tmp_path, tiny_model_dir, data_dir, "noisy", max_steps=2, neftune_noise_alpha=5.0)
    assert yaml.safe_load((tmp_path / "noisy" / "config.yaml").read_text())["neftune_noise_alpha"] == 5.0
    assert not torch.allclose(in_memory_logits(clean.model), in_memory_logits(noisy.model))
    assert not any(m._forward_hooks for m in noisy.model.modules())


def test_variant_mistakes_name_the_key():
    with pytest.raises(UserError, match="'use_dora' applies to LoRA training"):
        load_config(None, {"use_dora": True, "finetuning_type": "full"})
    with pytest.raises(UserError, match="'quantization_bit' applies to LoRA training"):
        load_config(None, {"quantization_bit": 4, "finetuning_type": "freeze"})
    with pytest.raises(UserError, match="allowed: 4, 8"):
        load_config(None, {"quantization_bit": 2})
    with pytest.raises(UserError, match="'quantization_method' is 'hqq'; allowed: bnb"):
        load_config(None, {"quantization_bit": 4, "quantization_method": "hqq"})
    with pytest.raises(UserError, match="choose one"):
        load_config(None, {"use_dora": True, "pissa_init": True})
