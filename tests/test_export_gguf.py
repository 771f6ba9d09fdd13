"""`export_gguf`: one GGUF file that transformers reads back with the merged model's logits, the
tokenizer and chat template inside, named by the Modelfile; unmapped architectures refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunesmith.config import load_config
from tunesmith.errors import UserError

# Qwen2's split, as its tokenizer.json spells it.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048)
# Per family: what a real checkpoint of it looks like where that changes the file (biases, head sizes, ties).
FAMILY_CONFIG = {
    "llama": dict(tie_word_embeddings=True),
    "qwen2": dict(tie_word_embeddings=False),  # q/k/v biases, separate output matrix
    "qwen3": dict(head_dim=128),  # q/k norms; transformers reads Qwen3 files back with head_dim 128
    "mistral": dict(tie_word_embeddings=False, sliding_window=None),
    "gemma2": dict(head_dim=16),  # norms stored as 1 + w, post-norms, soft-capping
    "gemma3_text": dict(head_dim=16),
}


def tiny_model(model_type: str, tokenizer, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  **TINY, **FAMILY_CONFIG[model_type])
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def logits_on(model, prompts):
    from tunesmith.export_gguf import prompt_logits

    return prompt_logits(model, prompts)


def check_inputs(tokenizer):
    from tunesmith.export_gguf import check_prompts

    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]
    return check_prompts(tokenizer, [chat])


def assert_top1_where_clear(reference, got, max_diff: float) -> None:
    """Wherever the reference's best token leads the runner-up by more than twice the largest
    difference, the file must pick the same token (a near-tie may go either way)."""
    for ref, out in zip(reference, got, strict=True):
        top2 = ref.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 2 * max_diff
        assert clear.float().mean() > 0.2  # enough decisive positions that this checks something
        assert torch.equal(ref.argmax(-1)[clear], out.argmax(-1)[clear])


def gguf_tensor_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


@pytest.mark.parametrize(("model_type", "gguf_type"), [
    ("llama", "f16"), ("llama", "q8_0"), ("qwen2", "f16"), ("qwen2", "q8_0"),
    ("qwen3", "f16"), ("mistral", "f16"), ("gemma2", "f16"), ("gemma2", "q8_0"), ("gemma3_text", "f16"),
])
def test_transformers_reads_the_file_back_with_the_same_logits(tmp_path, small_tokenizer, model_type, gguf_type):
    from tunesmith.export_gguf import compare_logits, load_gguf_model, write_gguf

    tokenizer = small_tokenizer
    model = tiny_model(model_type, tokenizer)
    prompts = check_inputs(tokenizer)
    reference = logits_on(model, prompts)
    path = write_gguf(model, tokenizer, gguf_type, tmp_path / "model.gguf", name="tiny")
    got = logits_on(load_gguf_model(path), prompts)
    check = compare_logits(reference, got, gguf_type)
    types = gguf_tensor_types(path)
    assert types["blk.0.attn_norm.weight"] == "F32"
    matrix_type = {"f16": "F16", "q8_0": "Q8_0"}[gguf_type]
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == matrix_type
    assert ("output.weight" in types) == (not model.config.tie_word_embeddings)
    if gguf_type == "f16":
        assert check.max_diff < 0.05 and check.passed
    else:  # Q8_0 keeps each value within half a step of 1/127 of its block's largest
        assert check.max_diff < 0.05 * max(float(r.abs().max()) for r in reference)
    assert_top1_where_clear(reference, got, check.max_diff)


def test_embedded_tokenizer_and_chat_template(tmp_path, tokenizer):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from tunesmith.export_gguf import GGUF_TEST_TEXT, write_gguf

    path = write_gguf(tiny_model("llama", tokenizer), tokenizer, "f16", tmp_path / "model.gguf", name="tiny",
                      end_of_turn=[tokenizer.convert_tokens_to_ids("<|im_end|>")])
    fields = GGUFReader(path).fields

    def value(key):
        return fields[key].contents()

    assert value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.pre") == "gpt2"  # this tokenizer.json splits text with GPT-2's rule alone
    vocab = tokenizer.get_vocab()
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == len(vocab) and all(tokens[i] == t for t, i in vocab.items())
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert value("tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    types = value("tokenizer.ggml.token_type")
    assert types[tokenizer.convert_tokens_to_ids("<|im_start|>")] == 3  # control
    assert types[vocab["the"]] == 1  # normal
    assert value("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert value("tokenizer.chat_template") == tokenizer.chat_template
    from_file = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)  # from the file alone
    assert from_file(GGUF_TEST_TEXT)["input_ids"] == tokenizer(GGUF_TEST_TEXT)["input_ids"]
    chat = [{"role": "user", "content": "Hello!"}]
    assert from_file.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(chat, tokenize=False)


@pytest.mark.parametrize(("pre_tokenizer", "name"), [
    ({"type": "ByteLevel", "use_regex": True}, "gpt2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "use_regex": True}]}, "smollm"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}},
                                            {"type": "ByteLevel", "use_regex": False}]}, "qwen2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": QWEN2_SPLIT + "|x"}},
                                            {"type": "ByteLevel", "use_regex": False}]}, "default"),
])
def test_pre_tokenizer_is_named_as_llama_cpp_names_it(pre_tokenizer, name):
    from tunesmith.export_gguf import _pre_tokenizer_name

    assert _pre_tokenizer_name({"pre_tokenizer": pre_tokenizer}) == name


@pytest.fixture(scope="module")
def exported_with_gguf(tmp_path_factory, small_model_dir, small_lora_run) -> Path:
    """A LoRA run's YAML exported through the CLI with export_gguf=f16."""
    import yaml

    from tunesmith.cli import main

    folder = tmp_path_factory.mktemp("export-gguf")
    cfg = folder / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": str(small_model_dir), "output_dir": str(small_lora_run),
                                   "finetuning_type": "lora", "export_dir": str(folder / "merged"),
                                   "export_gguf": "f16"}))
    assert main(["export", str(cfg)]) == 0
    return folder / "merged"


def test_cli_export_writes_verified_gguf_named_by_the_modelfile(exported_with_gguf, small_model_dir, small_lora_run,
                                                               small_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.export_gguf import load_gguf_model

    path = exported_with_gguf / "model-f16.gguf"
    assert path.is_file() and (exported_with_gguf / "model.safetensors").is_file()
    assert (exported_with_gguf / "Modelfile").read_text().startswith("FROM ./model-f16.gguf\n")
    assert not [p for p in exported_with_gguf.parent.iterdir() if p.name.startswith(".")]  # no leftovers
    base = AutoModelForCausalLM.from_pretrained(small_model_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, small_lora_run).eval()
    prompts = check_inputs(small_tokenizer)
    reference = logits_on(adapted, prompts)
    got = logits_on(load_gguf_model(path), prompts)
    assert max(float((r - g).abs().max()) for r, g in zip(reference, got, strict=True)) < 0.05


def test_a_file_that_misses_is_refused_and_nothing_is_published(tmp_path, monkeypatch, small_model_dir,
                                                                small_lora_run):
    from tunesmith import export_gguf
    from tunesmith.export import run_export

    original = export_gguf._gguf_tensors

    def zero_one_query(model, family):  # a converter bug: one attention matrix lost
        tensors = original(model, family)
        return [(n, d * 0 if n == "blk.1.attn_q.weight" else d) for n, d in tensors]

    monkeypatch.setattr(export_gguf, "_gguf_tensors", zero_one_query)
    target = tmp_path / "out" / "merged"
    cfg = load_config(None, {"model_name_or_path": str(small_model_dir), "output_dir": str(small_lora_run),
                             "export_dir": str(target), "export_gguf": "f16"})
    with pytest.raises(export_gguf.GgufExportError,
                       match=r"does not reproduce.*largest logit difference [\d.e-]+ \(limit 0.05\), same top-1"):
        run_export(cfg)
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_unmapped_architecture_is_refused_by_name(tmp_path, tokenizer, default_model_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tunesmith.export import run_export

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    target = tmp_path / "out"
    cfg = load_config(None, {"model_name_or_path": str(folder), "export_dir": str(target), "export_gguf": "q8_0"})
    with pytest.raises(UserError, match=r"architecture 'gpt2' \(GPT2LMHeadModel\) has no GGUF mapping"):
        run_export(cfg)
    assert not target.exists()


def test_export_gguf_key_names_its_choices():
    with pytest.raises(UserError, match="'export_gguf' is 'q4'; allowed: f16, bf16, q8_0"):
        load_config(None, {"export_gguf": "q4"})


def test_sentencepiece_style_tokenizer_is_embedded(tmp_path):
    """A Llama-2-style tokenizer (BPE over '▁'-joined words, unknown bytes as <0xNN> pieces) is
    written as llama.cpp's 'llama' vocabulary and reads back as the same tokenizer."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast

    from tunesmith.export_gguf import GGUF_TEST_TEXT, write_gguf

    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=pieces,
                                  initial_alphabet=list("▁abcdefghijklmnopqrstuvwxyz"))
    backend.train_from_iterator([GGUF_TEST_TEXT * 3, "the quick brown fox jumps over the lazy dog " * 20], trainer)
    tokenizer = LlamaTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    path = write_gguf(model, tokenizer, "f16", tmp_path / "model.gguf", name="spm")
    fields = GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True  # Metaspace prepends '▁' to the text
    types = fields["tokenizer.ggml.token_type"].contents()
    vocab = tokenizer.get_vocab()
    assert (types[vocab["<unk>"]], types[vocab["<s>"]], types[vocab["<0x41>"]]) == (2, 3, 6)  # unknown, control, byte
    scores = fields["tokenizer.ggml.scores"].contents()
    merged_early, merged_late = (m.replace(" ", "") for m in fields["tokenizer.ggml.merges"].contents()[:2])
    assert scores[vocab[merged_early]] > scores[vocab[merged_late]]  # earlier merges score higher
    from_file = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in [GGUF_TEST_TEXT, "Hello wörld, ünïcode 😀", " leading space"]:
        assert from_file(text)["input_ids"] == tokenizer(text)["input_ids"]
