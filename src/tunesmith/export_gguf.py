"""GGUF export: the merged model as one llama.cpp/Ollama file, tokenizer and chat template inside.

Tensor names come from the `gguf` package's name maps; what llama.cpp expects beyond a rename is
done per family (Llama's rotary layout of the Q/K rows, Gemma's norm weights stored as 1 + w).
The file is written next to the export, loaded back with transformers (`gguf_file=`) and its
logits compared with the merged model's before it counts as exported.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.errors import UserError

GGUF_TYPES = ("f16", "bf16", "q8_0")

# f16: largest logit difference accepted, relative to the largest reference logit, and never below
# F16_MIN_TOLERANCE (0.05 covers logits up to 50; the default model's reach about 40).
F16_RELATIVE_TOLERANCE = 1e-3
F16_MIN_TOLERANCE = 0.05
# bf16 and q8_0 round too coarsely for a logit bound: the next token must stay the same instead.
MIN_TOP1_AGREEMENT = 0.95

# Checked besides the chat prompts: plain prose, digits, punctuation and code, so that every kind of
# token the vocabulary splits text into is at some position.
GGUF_TEST_TEXT = (
    "The river rose three feet overnight, and by morning the old stone bridge was under water. "
    "Farmers moved 240 sheep to the hills; the school closed until Friday, 14 March. "
    "In the library, a clerk wrote: 'Keep the maps dry!' and stacked 17 boxes near the stairs.\n"
    "def area(radius: float) -> float:\n    return 3.14159 * radius ** 2\n"
    "Questions? Ask the harbour office (open 9:00-17:30) or email help@example.org."
)


class GgufExportError(UserError):
    """The GGUF file does not reproduce the merged model, or the model cannot be written as GGUF."""


@dataclass(frozen=True)
class Family:
    """How one transformers model type is written as GGUF."""

    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # llama.cpp's Llama rotary wants each head's Q/K rows as interleaved pairs
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp by the stored weight
    rope_dims_key: bool = False  # transformers reads rope.dimension_count back as head_dim (Llama)
    softcapping: bool = False  # Gemma 2 caps attention and final logits


FAMILIES: dict[str, Family] = {
    "llama": Family("LLAMA", permute_qk=True, rope_dims_key=True),
    # llama.cpp runs Mistral as Llama; transformers reads the file back as Llama, which computes the same.
    "mistral": Family("LLAMA", permute_qk=True, rope_dims_key=True),
    "qwen2": Family("QWEN2"),
    "qwen3": Family("QWEN3"),
    "gemma2": Family("GEMMA2", norm_offset=1.0, softcapping=True),
    "gemma3_text": Family("GEMMA3", norm_offset=1.0),
}

FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def gguf_file_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


def family_of(config: Any) -> Family:
    """The family of a model config; refuses, naming it, an architecture without a GGUF mapping."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(str(model_type))
    if family is None:
        arch = ", ".join(getattr(config, "architectures", None) or []) or "unknown"
        raise GgufExportError(
            f"export_gguf: the architecture '{model_type}' ({arch}) has no GGUF mapping here.",
            hint=f"GGUF export supports model types {', '.join(sorted(FAMILIES))}; remove export_gguf to "
                 "write the safetensors export only.")
    scaling = _rope_scaling(config)
    if scaling not in (None, "default"):
        raise GgufExportError(f"export_gguf: rope scaling '{scaling}' of '{model_type}' is not written to GGUF "
                              "here, and the file would compute different positions.",
                              hint="remove export_gguf to write the safetensors export only.")
    return family


# ---------------------------------------------------------------------------------------------
# Hyper-parameters


def _rope_parameters(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:  # per layer type (Gemma 3): the global layers' values
        params = params["full_attention"]
    return dict(params)


def _rope_scaling(config: Any) -> str | None:
    params = _rope_parameters(config)
    scaling = params.get("rope_type") or (getattr(config, "rope_scaling", None) or {}).get("rope_type")
    return scaling


def _rope_theta(config: Any) -> float:
    theta = _rope_parameters(config).get("rope_theta") or getattr(config, "rope_theta", None)
    return float(theta if theta is not None else 10000.0)


def head_dim_of(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _write_hparams(writer: Any, config: Any, family: Family, name: str, vocab_size: int) -> None:
    head_dim = head_dim_of(config)
    writer.add_name(name)
    writer.add_vocab_size(vocab_size)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(_rope_theta(config))
    if family.rope_dims_key:
        writer.add_rope_dimension_count(head_dim)
    if family.rope_dims_key or head_dim * config.num_attention_heads != config.hidden_size or family.norm_offset:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    window = getattr(config, "sliding_window", None)
    if family.norm_offset and window:
        writer.add_sliding_window(int(window))
    if family.softcapping:
        if getattr(config, "attn_logit_softcapping", None):
            writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


# ---------------------------------------------------------------------------------------------
# Tensors


def _permute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF keeps each head's rotary halves apart ([x0..x63 | x64..x127]); llama.cpp's Llama wants
    them as neighbouring pairs (x0, x64, x1, x65, ...)."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _gguf_tensors(model: Any, family: Family) -> list[tuple[str, np.ndarray]]:
    """(gguf name, fp32 array) for every parameter; refuses a parameter the name map does not know."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.arch], int(config.num_hidden_layers))
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    tensors = []
    for hf_name, param in model.named_parameters():  # tied weights are listed once (as the embedding)
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GgufExportError(f"export_gguf: the parameter '{hf_name}' of '{config.model_type}' has no GGUF "
                                  "tensor name; the file would be incomplete.")
        data = param.detach().float().cpu().numpy()
        if family.permute_qk and ".self_attn.q_proj." in hf_name:
            data = _permute_rotary(data, heads)
        elif family.permute_qk and ".self_attn.k_proj." in hf_name:
            data = _permute_rotary(data, kv_heads)
        if family.norm_offset and "norm" in hf_name and data.ndim == 1:
            data = data + np.float32(family.norm_offset)
        tensors.append((name, data))
    return tensors


def _add_tensor(writer: Any, name: str, data: np.ndarray, gguf_type: str) -> None:
    """1-D tensors (norms, biases) stay fp32, as llama.cpp expects; Q8_0 needs rows of whole blocks
    of 32, other matrices fall back to f16."""
    import gguf

    qtypes = gguf.GGMLQuantizationType
    if data.ndim == 1:
        writer.add_tensor(name, data.astype(np.float32))
    elif gguf_type == "f16" or (gguf_type == "q8_0" and data.shape[-1] % 32):
        writer.add_tensor(name, data.astype(np.float16))
    else:
        qtype = qtypes.BF16 if gguf_type == "bf16" else qtypes.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


# ---------------------------------------------------------------------------------------------
# Tokenizer


@dataclass
class GgufVocab:
    """A tokenizer as llama.cpp stores it."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE)
    pre: str | None  # llama.cpp's name for how text is split before BPE (byte-level only)
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None
    space_prefix: bool = False  # SentencePiece-style: a '▁' is put before the text


# Byte-level pre-tokenizer splits, as tokenizer.json spells them, and llama.cpp's names for them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def _walk(node: Any) -> list[dict[str, Any]]:
    """A tokenizer.json component and, for a Sequence, its members."""
    if not isinstance(node, dict):
        return []
    members = node.get("pretokenizers") or node.get("normalizers") or node.get("decoders") or []
    return [node, *(m for sub in members for m in _walk(sub))]


def _pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the way this tokenizer splits text; 'default' (with a warning) if unknown."""
    parts = _walk(spec.get("pre_tokenizer"))
    kinds = [p.get("type") for p in parts if p.get("type") != "Sequence"]
    splits = [p["pattern"].get("Regex") for p in parts
              if p.get("type") == "Split" and isinstance(p.get("pattern"), dict)]
    if len(splits) == 1 and splits[0] in PRE_TOKENIZER_NAMES:
        return PRE_TOKENIZER_NAMES[splits[0]]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if not splits and byte_level and byte_level[0].get("use_regex", True):
        digits = [p for p in parts if p.get("type") == "Digits"]
        if digits and digits[0].get("individual_digits"):
            return "smollm"  # GPT-2 split, every digit on its own
        if kinds == ["ByteLevel"]:
            return "gpt2"
    print(f"warning: export_gguf: the tokenizer's pre-tokenizer ({', '.join(map(str, kinds))}) has no llama.cpp "
          "name here; the file says 'default', and llama.cpp may split text differently.", file=sys.stderr)
    return "default"


def _merge_strings(merges: list[Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def gguf_vocab(tokenizer: Any, vocab_size: int) -> GgufVocab:
    """The tokenizer's vocabulary padded to the embedding's rows, with llama.cpp's token types."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise GgufExportError(f"export_gguf: the tokenizer is of type '{model.get('type')}'; only BPE tokenizers "
                              "(byte-level or SentencePiece-style) are written to GGUF here.")
    kinds = {p.get("type") for p in _walk(spec.get("pre_tokenizer")) + _walk(spec.get("decoder"))}
    byte_level = "ByteLevel" in kinds
    if not byte_level and not model.get("byte_fallback"):
        raise GgufExportError("export_gguf: the tokenizer is neither byte-level BPE nor SentencePiece-style "
                              "BPE with byte fallback; llama.cpp could not reproduce it.")
    kinds_of = gguf.TokenType
    by_id: dict[int, tuple[str, int]] = {i: (t, int(kinds_of.NORMAL)) for t, i in model["vocab"].items()}
    for added in spec.get("added_tokens") or []:
        kind = kinds_of.CONTROL if added.get("special") else kinds_of.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], int(kind))
    if not byte_level:
        for i, (text, _) in by_id.items():  # byte fallback pieces, whether trained or added
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                by_id[i] = (text, int(kinds_of.BYTE))
        unk = model.get("unk_token")
        for i, (text, _) in by_id.items():
            if text == unk:
                by_id[i] = (text, int(kinds_of.UNKNOWN))
    size = max(vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, (f"[PAD{i}]", int(kinds_of.UNUSED)))[0] for i in range(size)]
    types = [by_id.get(i, ("", int(kinds_of.UNUSED)))[1] for i in range(size)]
    merges = _merge_strings(model.get("merges") or [])
    scores = None
    if not byte_level:
        # SentencePiece merges the pair whose result scores highest: a token made by an earlier
        # merge scores higher, which is what the merge order of tokenizer.json says.
        rank = {m.replace(" ", ""): r for r, m in reversed(list(enumerate(merges)))}
        scores = [-float(rank[t]) - 1.0 if t in rank else 0.0 for t in tokens]
    return GgufVocab("gpt2" if byte_level else "llama", _pre_tokenizer_name(spec) if byte_level else None,
                     tokens, types, merges, scores, not byte_level and _adds_space_prefix(spec))


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer puts '▁' before the text (Metaspace, or a normalizer that prepends it)."""
    for part in _walk(spec.get("pre_tokenizer")):
        if part.get("type") == "Metaspace":
            return part.get("prepend_scheme", "always") != "never" and part.get("add_prefix_space", True)
    return any(part.get("type") == "Prepend" for part in _walk(spec.get("normalizer")))


def _adds_token(tokenizer: Any, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and (ids[0] if first else ids[-1]) == token_id


def _write_tokenizer(writer: Any, tokenizer: Any, vocab: GgufVocab, end_of_turn: list[int]) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(vocab.space_prefix)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(int(tokenizer.bos_token_id))
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(int(tokenizer.eos_token_id))
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(int(tokenizer.pad_token_id))
    if getattr(tokenizer, "unk_token_id", None) is not None:
        writer.add_unk_token_id(int(tokenizer.unk_token_id))
    # The template's end of turn, when it is not eos: llama.cpp stops generating there.
    turn_ends = [i for i in end_of_turn if i != tokenizer.eos_token_id]
    if turn_ends:
        writer.add_eot_token_id(int(turn_ends[0]))
    writer.add_add_bos_token(_adds_token(tokenizer, tokenizer.bos_token_id, first=True))
    writer.add_add_eos_token(_adds_token(tokenizer, tokenizer.eos_token_id, first=False))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


# ---------------------------------------------------------------------------------------------
# Writing and verifying


def write_gguf(model: Any, tokenizer: Any, gguf_type: str, path: Path, *, name: str,
               end_of_turn: list[int] | None = None) -> Path:
    """Write the (merged, fp32) model with its tokenizer and chat template to `path`."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise GgufExportError(f"export_gguf: '{gguf_type}' is not one of {', '.join(GGUF_TYPES)}.")
    family = family_of(model.config)
    vocab_size = int(model.get_input_embeddings().weight.shape[0])
    vocab = gguf_vocab(tokenizer, vocab_size)
    if len(vocab.tokens) != vocab_size:
        raise GgufExportError(f"export_gguf: the tokenizer has {len(vocab.tokens)} tokens but the embedding only "
                              f"{vocab_size} rows.")
    tensors = _gguf_tensors(model, family)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[family.arch]])
    try:
        _write_hparams(writer, model.config, family, name, vocab_size)
        writer.add_file_type(int(gguf.LlamaFileType[FILE_TYPES[gguf_type]]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_tokenizer(writer, tokenizer, vocab, end_of_turn or [])
        for tensor_name, data in tensors:
            _add_tensor(writer, tensor_name, data, gguf_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


@dataclass
class GgufCheck:
    """How closely the GGUF file, read back by transformers, reproduces the merged model."""

    max_diff: float  # largest logit difference over all checked positions
    top1_agreement: float  # share of positions whose most likely next token is the same
    positions: int
    tolerance: float | None  # the f16 bound on max_diff; None where only top-1 agreement counts

    @property
    def passed(self) -> bool:
        if self.tolerance is not None and self.max_diff > self.tolerance:
            return False
        return self.top1_agreement >= MIN_TOP1_AGREEMENT

    def describe(self) -> str:
        bound = f" (limit {self.tolerance:.3g})" if self.tolerance is not None else ""
        return (f"largest logit difference {self.max_diff:.3g}{bound}, same top-1 token on "
                f"{self.top1_agreement:.1%} of {self.positions} positions (at least {MIN_TOP1_AGREEMENT:.0%})")


def check_prompts(tokenizer: Any, chat_prompts: list[Any]) -> list[Any]:
    """The chat prompts plus the test text, as id tensors."""
    text = tokenizer(GGUF_TEST_TEXT, return_tensors="pt")["input_ids"]
    return [*chat_prompts, text]


def prompt_logits(model: Any, prompts: list[Any]) -> list[Any]:
    """The model's fp32 logits on each prompt (a tensor of token ids), on the CPU."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=ids.to(device)).logits.float().cpu() for ids in prompts]


def compare_logits(reference: list[Any], got: list[Any], gguf_type: str) -> GgufCheck:
    diffs = [float((r - g).abs().max()) for r, g in zip(reference, got, strict=True)]
    same = sum(int((r.argmax(-1) == g.argmax(-1)).sum()) for r, g in zip(reference, got, strict=True))
    positions = sum(int(r.shape[0] * r.shape[1]) for r in reference)
    tolerance = None
    if gguf_type == "f16":
        scale = max(float(r.abs().max()) for r in reference)
        tolerance = max(F16_MIN_TOLERANCE, F16_RELATIVE_TOLERANCE * scale)
    return GgufCheck(max(diffs), same / positions, positions, tolerance)


def load_gguf_model(path: Path) -> Any:
    """The GGUF file as transformers reads it (dequantized, fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def verify_gguf(path: Path, prompts: list[Any], reference: list[Any], gguf_type: str) -> GgufCheck:
    """Load the file with transformers and compare its logits with `reference`; raise if they miss."""
    try:
        loaded = load_gguf_model(path)
    except Exception as err:  # transformers raises many kinds; any means the file is not usable
        raise GgufExportError(f"export_gguf: transformers cannot read back {path.name}: {err}") from err
    got = prompt_logits(loaded, prompts)
    del loaded
    check = compare_logits(reference, got, gguf_type)
    if not check.passed:
        raise GgufExportError(f"export_gguf: {path.name} does not reproduce the merged model: {check.describe()}. "
                              "Nothing was written to export_dir.")
    return check


def export_gguf(model: Any, tokenizer: Any, gguf_type: str, folder: Path, chat_prompts: list[Any], *,
                name: str, end_of_turn: list[int]) -> tuple[Path, GgufCheck]:
    """Write `folder/model-<type>.gguf` from the merged fp32 model and verify it against the model's
    own logits on the chat prompts and the test text."""
    family_of(model.config)  # refuse early, before any work
    prompts = check_prompts(tokenizer, chat_prompts)
    reference = prompt_logits(model, prompts)
    path = write_gguf(model, tokenizer, gguf_type, folder / gguf_file_name(gguf_type), name=name,
                      end_of_turn=end_of_turn)
    check = verify_gguf(path, prompts, reference, gguf_type)
    print(f"Verified: transformers reads {path.name} back; {check.describe()}.", file=sys.stderr)
    return path, check


__all__ = ["FAMILIES", "GGUF_TEST_TEXT", "GGUF_TYPES", "GgufCheck", "GgufExportError", "compare_logits",
           "prompt_logits", "export_gguf", "family_of", "gguf_file_name", "gguf_vocab", "load_gguf_model",
           "verify_gguf", "write_gguf"]
