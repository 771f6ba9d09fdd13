"""Supervised fine-tuning from scratch: the whole mechanism in one file of plain PyTorch.

Everything tunesmith does for one LoRA SFT step is written out here, top to bottom:

  the model        a Llama-style decoder that loads a Hugging Face folder of safetensors
  1. tokenization  the chat template turns messages into text, the tokenizer turns text into ids
  2. label masking only the assistant answers (and their end-of-turn marker) are learned
  3. forward pass  ids -> logits, one score per vocabulary entry at every position
  4. loss          cross-entropy of each answer token given everything before it
  5. backprop and update   gradients reach only the small LoRA matrices; AdamW moves them
  then             greedy generation with a key/value cache shows what was learned

Run:  python examples/sft_from_scratch.py [--model FOLDER] [--data identity.json] [--steps 50]
It needs torch, safetensors and transformers (for the tokenizer and its chat template only).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer

DEFAULT_MODEL = Path("~/.cache/tunesmith/models/smollm2-135m-instruct").expanduser()
DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / "identity.json"
IGNORE = -100  # label of a position that is not learned; F.cross_entropy skips it


# ---------------------------------------------------------------------------------------------
# The model: a Llama-style decoder
# ---------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain (no mean, no bias)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # the mean of squares is taken in fp32 so low-precision inputs do not overflow
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embeddings: channel pair j of a token at position p is rotated by p * theta^(-2j/d).
    A query-key dot product then depends only on the distance between the two positions."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)  # channel j is paired with channel j + d/2
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


KV = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads: several query heads share one key/value head,
    which shrinks the key/value cache without shrinking the number of attention patterns."""

    def __init__(self, cfg: dict):
        super().__init__()
        hidden, bias = cfg["hidden_size"], cfg.get("attention_bias", False)
        self.n_heads, self.n_kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.head_dim = cfg.get("head_dim") or hidden // self.n_heads
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                past: KV | None = None) -> tuple[torch.Tensor, KV]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (b, heads, t, d)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past is not None:  # generation: the keys/values of earlier tokens were kept, not recomputed
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        group = self.n_heads // self.n_kv_heads
        k_all, v_all = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = q @ k_all.transpose(-2, -1) / math.sqrt(self.head_dim)
        s = k_all.shape[2]  # query i (at absolute position s - t + i) may look at keys 0 .. s - t + i
        causal = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(diagonal=s - t)
        scores = scores.masked_fill(~causal, float("-inf"))
        out = (scores.softmax(dim=-1) @ v_all).transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(out), (k, v)


class MLP(nn.Module):
    """SwiGLU: a SiLU-activated gate multiplies a second projection, then projects back down."""

    def __init__(self, cfg: dict):
        super().__init__()
        hidden, inner, bias = cfg["hidden_size"], cfg["intermediate_size"], cfg.get("mlp_bias", False)
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        attended, kv = self.self_attn(self.input_layernorm(x), cos, sin, past)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Decoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


class Llama(nn.Module):
    """Attribute names follow the Hugging Face checkpoint, so its state dict loads as it is."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        # Tied models reuse the input embedding matrix as the output head.
        self.tied = cfg.get("tie_word_embeddings", True)
        self.lm_head = None if self.tied else nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        rope = cfg.get("rope_parameters") or {}  # transformers 5 keeps rope_theta here, older configs at top level
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"only plain rotary embeddings are written here, not {rope['rope_type']!r}")
        self.rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Llama:
        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        weights: dict[str, torch.Tensor] = {}
        for file in sorted(folder.glob("*.safetensors")):
            weights.update(load_file(file))
        if cfg.get("tie_word_embeddings", True):
            weights.pop("lm_head.weight", None)
        with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
            model = cls(cfg)
        model.load_state_dict(weights, strict=True, assign=True)
        return model.float().eval()

    def forward(self, input_ids: torch.Tensor, past: list[KV] | None = None) -> tuple[torch.Tensor, list[KV]]:
        """Logits (batch, time, vocab) and the keys/values of every layer (for generation)."""
        start = past[0][0].shape[2] if past else 0
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta)
        x = self.model.embed_tokens(input_ids)
        new_past = []
        for i, layer in enumerate(self.model.layers):
            x, kv = layer(x, cos, sin, past[i] if past else None)
            new_past.append(kv)
        x = self.model.norm(x)
        head = self.model.embed_tokens.weight if self.tied else self.lm_head.weight
        return x @ head.T, new_past


# ---------------------------------------------------------------------------------------------
# LoRA: what `finetuning_type: lora` with `lora_target: all` adds to the model
# ---------------------------------------------------------------------------------------------
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A x, with W frozen. A (r x in) and B (out x r) hold r * (in + out)
    numbers where W holds in * out (9 thousand against 332 thousand for 576 x 576 at r = 8).
    B starts at zero, so training starts exactly at the base model; A starts random, so B's
    first gradient is not zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # the usual nn.Linear init
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


def add_lora(model: Llama, rank: int = 8, alpha: float = 16.0) -> list[nn.Parameter]:
    """Freeze every weight, wrap q,k,v,o,gate,up,down of every layer; return the trainable parameters."""
    model.requires_grad_(False)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LORA_TARGETS:
                if hasattr(parent, name):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# 1. Tokenization: messages -> chat-template text -> token ids
# Why: the model only ever saw text in its chat format; training must use the very same format
# (system prompt, role markers, end-of-turn token) that chat will use, or the two drift apart.
# ---------------------------------------------------------------------------------------------
def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


# ---------------------------------------------------------------------------------------------
# 2. Label masking: -100 everywhere except the assistant answers
# Why: we want the model to learn to answer, not to predict the user's question. An answer's
# characters run from the end of the conversation rendered up to it with the "assistant is
# speaking" prompt, to the end of the conversation rendered with it. That includes the
# end-of-turn marker, so the model also learns to stop. Every assistant turn is trained.
# ---------------------------------------------------------------------------------------------
def build_sample(tokenizer, messages: list[dict], cutoff_len: int | None = None) -> tuple[list[int], list[int]]:
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
            spans.append((start, len(render(tokenizer, messages[: i + 1]))))
    # The template already wrote every special token, so the tokenizer must not add its own.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [tok if any(s <= begin < e for s, e in spans) else IGNORE
              for tok, (begin, _end) in zip(input_ids, encoded["offset_mapping"], strict=True)]
    if cutoff_len is not None:  # a plain cut; the engine prefers to cut after the last whole answer that fits
        input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
    return input_ids, labels


# ---------------------------------------------------------------------------------------------
# 3. Forward pass: a padded batch of ids -> logits (batch, time, vocabulary), see Llama.forward
# Why one pass is enough: the causal mask keeps every position from seeing its future, so the
# model predicts all answer tokens of all samples at once ("teacher forcing"), each from the
# true tokens before it rather than from its own earlier guesses.
# ---------------------------------------------------------------------------------------------
def collate(samples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sample. No attention mask is needed: with causal attention a real
    token never looks right, so it never sees the padding; padded positions carry label -100."""
    width = max(len(ids) for ids, _ in samples)
    input_ids = torch.full((len(samples), width), pad_id)
    labels = torch.full((len(samples), width), IGNORE)
    for row, (ids, labs) in enumerate(samples):
        input_ids[row, : len(ids)], labels[row, : len(labs)] = torch.tensor(ids), torch.tensor(labs)
    return input_ids, labels


# ---------------------------------------------------------------------------------------------
# 4. Loss: cross-entropy of the true next token, averaged over the supervised tokens
# Why: logits at position t predict token t + 1, hence the shift by one. Averaging over answer
# tokens only (not over all positions) keeps the prompt and the padding out of the objective.
# ---------------------------------------------------------------------------------------------
def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    predictions = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    targets = labels[:, 1:].reshape(-1)
    return F.cross_entropy(predictions, targets, ignore_index=IGNORE)


# ---------------------------------------------------------------------------------------------
# 5. Backprop and update
# Why: backward() fills .grad of every parameter that requires it: only LoRA's A and B, since
# the base weights were frozen (the gradient still flows *through* them). AdamW then moves each
# of A and B by a step scaled per number by its running gradient statistics.
# ---------------------------------------------------------------------------------------------
def train_step(model: Llama, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
               labels: torch.Tensor) -> float:
    logits, _ = model(input_ids)  # 3. forward
    loss = sft_loss(logits, labels)  # 4. loss
    loss.backward()  # 5. backprop
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


# ---------------------------------------------------------------------------------------------
# Generation: greedy decoding with a key/value cache
# Why the cache: each new token attends to all earlier ones; keeping their keys and values means
# each step runs the model on one token instead of the whole sequence again.
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model: Llama, tokenizer, messages: list[dict], max_new_tokens: int = 48) -> str:
    prompt = render(tokenizer, messages, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    logits, past = model(ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:  # <|im_end|> for ChatML: the answer is finished
            break
        out.append(token)
        logits, past = model(torch.tensor([[token]]), past)
    return tokenizer.decode(out)


# ---------------------------------------------------------------------------------------------
# The run: identity data -> LoRA training -> before/after answers
# ---------------------------------------------------------------------------------------------
def identity_conversations(path: Path, name: str, author: str) -> list[list[dict]]:
    """Alpaca rows (instruction, input, output) as user/assistant messages, placeholders filled."""
    conversations = []
    for row in json.loads(path.read_text(encoding="utf-8")):
        prompt = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
        answer = row["output"].replace("{{name}}", name).replace("{{author}}", author)
        conversations.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
    return conversations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="Hugging Face model folder")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="identity.json (alpaca rows)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    started = time.time()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = Llama.from_pretrained(args.model)
    question = [{"role": "user", "content": "Who are you?"}]
    print(f"before: {generate(model, tokenizer, question)!r}", flush=True)

    samples = [build_sample(tokenizer, conv, args.cutoff)
               for conv in identity_conversations(args.data, "Tunesmith", "the tunesmith team")]
    params = add_lora(model, args.rank, args.alpha)
    print(f"{len(samples)} samples; training {sum(p.numel() for p in params):,} LoRA numbers of "
          f"{sum(p.numel() for p in model.parameters()):,}", flush=True)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    model.train()
    order: list[int] = []
    for step in range(1, args.steps + 1):
        if len(order) < args.batch:  # a fresh shuffled pass over the data
            order += rng.sample(range(len(samples)), len(samples))
        batch, order = [samples[i] for i in order[: args.batch]], order[args.batch:]
        input_ids, labels = collate(batch, tokenizer.pad_token_id)
        loss = train_step(model, optimizer, input_ids, labels)
        print(f"step {step:3d}  loss {loss:.4f}  ({time.time() - started:.0f}s)", flush=True)
    model.eval()
    print(f"after:  {generate(model, tokenizer, question)!r}")
    print(f"wall time {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
