"""Shared fixtures: the default model's real tokenizer and tiny random models built from a config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import BLAS_CPU, HEAD_ONEDNN_CPU, ONEDNN_CPU

from tunesmith.cpu import assume

REPO = Path(__file__).resolve().parents[1]
REPO_DATA = REPO / "data"  # the datasets the repository carries (data/README.md)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from tunesmith.model.provision import provision_default_model

    return provision_default_model()


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def build_tiny_model(folder: Path, tokenizer_dir: Path, *, layers: int = 2, hidden: int = 64, seed: int = 0,
                     tie: bool = True, max_positions: int = 2048) -> Path:
    """A random Llama with the vocabulary and tokenizer of `tokenizer_dir`, saved as a HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), default_model_dir)


@pytest.fixture()
def cache_home(tmp_path, monkeypatch) -> Path:
    """A private tunesmith cache folder (tokenized data, file hashes) for one test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("TUNESMITH_CACHE", str(folder))
    return folder


@pytest.fixture()
def repo_data() -> Path:
    """The repository's data/ folder; tests read it and never write there."""
    return REPO_DATA


def build_tiny_lora_run(folder: Path, base_dir: Path, *, seed: int = 1) -> Path:
    """A finished LoRA run's output_dir on a tiny base: adapter with random lora_B (so it changes
    the logits), the tokenizer carrying the chat template, and config.yaml naming the base."""
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.run_folder import write_final_outputs

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)  # lora_A's initialisation: the same adapter whatever ran before
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model_name_or_path": str(base_dir),
                                                        "finetuning_type": "lora", "output_dir": str(folder)}))

    def write(staging: Path) -> None:
        peft_model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(staging)

    write_final_outputs(folder, write)  # as a finished run leaves it
    return folder


@pytest.fixture(scope="session")
def tiny_lora_run(tmp_path_factory, tiny_model_dir) -> Path:
    # seed 3: its greedy first reply token has no leading space (test_infer builds a stop marker of it)
    return build_tiny_lora_run(tmp_path_factory.mktemp("tiny-lora-run"), tiny_model_dir, seed=3)


@pytest.fixture(scope="session")
def small_vocab_dir(tmp_path_factory, default_model_dir) -> Path:
    """The default tokenizer's pipeline, special tokens and chat template with its BPE retrained
    on the repository's data to 400 tokens. transformers spends about 10 s parsing a 49k-token
    vocabulary from a GGUF file at every read; where the test is about tensors, not the
    tokenizer, this one keeps each read well under a second."""
    from transformers import AutoTokenizer

    full = AutoTokenizer.from_pretrained(default_model_dir)
    texts = [path.read_text() for path in sorted(REPO_DATA.glob("*.json*"))]
    small = full.train_new_from_iterator(texts, vocab_size=400)
    small.chat_template = full.chat_template
    folder = tmp_path_factory.mktemp("small-vocab")
    small.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def small_tokenizer(small_vocab_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(small_vocab_dir)


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory, small_vocab_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("small-model"), small_vocab_dir)


@pytest.fixture(scope="session")
def small_lora_run(tmp_path_factory, small_model_dir) -> Path:
    return build_tiny_lora_run(tmp_path_factory.mktemp("small-lora-run"), small_model_dir, seed=3)


@pytest.fixture(params=[ONEDNN_CPU, BLAS_CPU, HEAD_ONEDNN_CPU], ids=["onednn", "blas", "blas-head-onednn"])
def products(request):
    """The kernels planned for one of three CPUs while the test runs: fp32 products on oneDNN
    (padded pieces), on torch's BLAS, or on the BLAS with the output head's on oneDNN, so that
    every path runs on every machine."""
    with assume(request.param):
        yield request.param
