"""`tunesmith export`: merged, sharded, verified; plain transformers loads it with the training template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tunesmith.config import load_config
from tunesmith.errors import UserError

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet() -> str:
    """The README's "use the exported model with plain transformers" snippet, exactly as written there."""
    blocks = README.read_text(encoding="utf-8").split("```python\n")[1:]
    code = next(b.split("```")[0] for b in blocks if "AutoModelForCausalLM.from_pretrained(path)" in b)
    return code


CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]
SHARD_GB = 0.0002


def write_cfg(folder: Path, **keys) -> Path:
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(keys))
    return path


def base_plus_adapter_logits(base_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir, tiny_lora_run) -> Path:
    """The training YAML of a LoRA run, exported through the CLI with tiny shards."""
    from tunesmith.cli import main

    folder = tmp_path_factory.mktemp("export")
    cfg = write_cfg(folder, model_name_or_path=str(tiny_model_dir), output_dir=str(tiny_lora_run),
                    finetuning_type="lora", export_dir=str(folder / "merged"), export_size=SHARD_GB)
    assert main(["export", str(cfg)]) == 0
    return folder / "merged"


def test_export_is_sharded_within_export_size(exported):
    from safetensors import safe_open

    limit = SHARD_GB * 10**9
    shards = sorted(exported.glob("*.safetensors"))
    assert len(shards) >= 3
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            names = list(f.keys())
            tensor_bytes = [f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in names]
        # A tensor is never split across files: only a shard holding one tensor larger than the limit may exceed it.
        assert shard.stat().st_size <= limit or (len(names) == 1 and tensor_bytes[0] > limit), shard.name
    assert not any("lora" in name for name in index["weight_map"])  # merged, not an adapter
    assert (exported / "config.json").is_file()


def test_plain_transformers_gives_base_plus_adapter_logits(exported, tiny_model_dir, tiny_lora_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported)
    ids = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert model.dtype == torch.float32
    with torch.no_grad():
        got = model(input_ids=ids).logits
    want = base_plus_adapter_logits(tiny_model_dir, tiny_lora_run, ids)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        base_only = base(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4
    assert (base_only - want).abs().max() > 1e-2  # the adapter matters, so the comparison means something


def test_exported_tokenizer_renders_what_training_rendered(exported, tiny_lora_run):
    from transformers import AutoTokenizer

    from tunesmith.model.load import load_tokenizer
    from tunesmith.template import render

    cfg = load_config(None, {"model_name_or_path": str(tiny_lora_run)})
    training_tok = load_tokenizer(cfg.model)
    exported_tok = AutoTokenizer.from_pretrained(exported)
    for messages, gen in ((CONVERSATION, True), ([*CONVERSATION, {"role": "assistant", "content": "Rome."}], False)):
        text = exported_tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
        assert text == render(messages, training_tok, add_generation_prompt=gen)
        assert exported_tok(text, add_special_tokens=False)["input_ids"] == \
            training_tok(text, add_special_tokens=False)["input_ids"]


def test_generation_config_and_modelfile_stop_at_end_of_turn(exported):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported)
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    eos = json.loads((exported / "generation_config.json").read_text())["eos_token_id"]
    assert end_of_turn in (eos if isinstance(eos, list) else [eos])
    modelfile = (exported / "Modelfile").read_text()
    assert modelfile.startswith("FROM .\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile.splitlines()
    assert ('TEMPLATE """{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
            '{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n') in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile


def test_readme_snippet_runs_on_the_export(exported, capsys):
    from transformers import AutoTokenizer

    snippet = readme_snippet()
    assert 'path = "exports/tunesmith-identity"' in snippet
    exec(snippet.replace("exports/tunesmith-identity", str(exported)).replace("max_new_tokens=64", "max_new_tokens=8"),
         {})
    printed = capsys.readouterr().out.strip("\n")
    tok = AutoTokenizer.from_pretrained(exported)
    assert printed and len(tok(printed, add_special_tokens=False)["input_ids"]) <= 9


def test_failed_verification_leaves_no_valid_looking_folder(tmp_path, monkeypatch, tiny_model_dir, tiny_lora_run):
    from safetensors.torch import load_file, save_file

    from tunesmith import export

    original = export._write_weights

    def write_then_corrupt(model, folder, max_shard_bytes, legacy):
        original(model, folder, max_shard_bytes, legacy)
        shard = next(p for p in sorted(folder.glob("*.safetensors")) if "self_attn" in str(load_file(p).keys()))
        tensors = load_file(shard)
        name = next(n for n in tensors if "q_proj" in n)
        tensors[name] = torch.zeros_like(tensors[name])
        save_file(tensors, shard, metadata={"format": "pt"})

    monkeypatch.setattr(export, "_write_weights", write_then_corrupt)
    target = tmp_path / "out" / "merged"
    cfg = load_config(None, {"model_name_or_path": str(tiny_model_dir), "output_dir": str(tiny_lora_run),
                             "export_dir": str(target), "export_size": SHARD_GB})
    with pytest.raises(export.ExportVerificationError, match="verification failed.*Nothing was written"):
        export.run_export(cfg)
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no half-written sibling either


def test_bfloat16_legacy_bin_export(tmp_path, tiny_model_dir, tiny_lora_run):
    from transformers import AutoModelForCausalLM

    from tunesmith.export import run_export

    cfg = load_config(None, {"model_name_or_path": str(tiny_model_dir), "output_dir": str(tiny_lora_run),
                             "export_dir": str(tmp_path / "bin"), "export_dtype": "bfloat16",
                             "export_legacy_format": True})
    out = run_export(cfg)
    assert sorted(p.name for p in out.glob("*.bin")) == ["pytorch_model.bin"]
    assert not list(out.glob("*.safetensors"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    want = base_plus_adapter_logits(tiny_model_dir, tiny_lora_run, ids)
    with torch.no_grad():
        got = model.float()(input_ids=ids).logits
    assert (got - want).abs().max() < 0.05  # bf16 rounding of the weights, no more


def test_full_run_output_is_resharded_and_copied(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunesmith.export import run_export
    from tunesmith.run_folder import write_final_outputs

    run = tmp_path / "full-run"
    run.mkdir()
    write_final_outputs(run, lambda staging: shutil.copytree(tiny_model_dir, staging, dirs_exist_ok=True))
    cfg = load_config(None, {"output_dir": str(run), "finetuning_type": "full",
                             "export_dir": str(tmp_path / "exp"), "export_size": SHARD_GB})
    out = run_export(cfg)
    assert len(list(out.glob("*.safetensors"))) >= 3
    ids = torch.tensor([[1, 5, 9, 200, 3000]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(run)(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
    assert torch.equal(a, b)


def test_export_dir_mistakes_are_user_errors(tmp_path, tiny_model_dir, tiny_lora_run):
    from tunesmith.export import run_export

    base = {"model_name_or_path": str(tiny_model_dir), "output_dir": str(tiny_lora_run)}
    with pytest.raises(UserError, match="'export_dir' is not set"):
        run_export(load_config(None, base))
    with pytest.raises(UserError, match="is the model, adapter or output_dir folder"):
        run_export(load_config(None, {**base, "export_dir": str(tiny_lora_run)}))
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an earlier export"):
        run_export(load_config(None, {**base, "export_dir": str(foreign)}))
    assert (foreign / "todo.txt").read_text() == "keep me"


def test_modelfile_template_without_default_system_and_untranslatable(tokenizer):
    import copy

    from tunesmith.export import _chat_pieces, ollama_modelfile

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{{ '<s>' }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}</turn>\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}")
    pieces = _chat_pieces(tok)
    assert pieces is not None and pieces.head == "<s>" and pieces.default_system is None
    assert (pieces.prefix["user"], pieces.suffix["user"]) == ("[user]", "</turn>\n")
    text = ollama_modelfile(tok, None)
    assert 'TEMPLATE """<s>{{ range' in text and "SYSTEM" not in text
    assert 'PARAMETER stop "</turn>"' in text.splitlines()

    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    assert _chat_pieces(tok) is None
    assert "write TEMPLATE by hand" in ollama_modelfile(tok, None)


def test_comma_separated_adapters_are_all_merged(tmp_path, tiny_model_dir, tiny_lora_run):
    from conftest import build_tiny_lora_run
    from transformers import AutoModelForCausalLM

    from tunesmith.export import run_export
    from tunesmith.infer import ChatEngine

    second = tmp_path / "second"
    second.mkdir()
    build_tiny_lora_run(second, tiny_model_dir, seed=7)
    keys = {"model_name_or_path": str(tiny_model_dir), "adapter_name_or_path": f"{tiny_lora_run},{second}"}
    engine = ChatEngine(load_config(None, keys))
    assert engine.description == f"adapter {tiny_lora_run}, {second} on base model {tiny_model_dir}"
    out = run_export(load_config(None, {**keys, "export_dir": str(tmp_path / "exp")}))
    ids = torch.tensor([engine.prompt_ids(CONVERSATION)])
    with torch.no_grad():
        both = engine.model(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
    assert (got - both).abs().max() < 1e-4
    assert (got - base_plus_adapter_logits(tiny_model_dir, tiny_lora_run, ids)).abs().max() > 1e-2
