"""Attention over packed samples without cross-contamination and without wasted work
(docs/ARCHITECTURE.md, "Batch layout").

A padding-free micro-batch (data/batching.py, layout "varlen") is one row of samples laid end to
end plus their boundaries `cu_seq_lens_q/k`. Flash attention 2 takes those boundaries natively
(transformers passes them to `flash_attn_varlen_func`). For sdpa we register one more attention
implementation with transformers' AttentionInterface: on the CPU it runs sdpa causally on each
sample's slice, so no work goes to the masked blocks between samples and no (T x T) mask is built.
On an accelerator, where a Python loop of small kernel launches per layer costs more than some
padding, the samples are scattered into one (samples x longest) batch and attended in one causal
sdpa call (sample_slots), unless that padding would more than double the row (one_call_pays).
Any batch without boundaries (padded batches, eval, generation) goes to transformers' own sdpa.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tunesmith.cpu import ROW_MULTIPLE, plan_in_use

if TYPE_CHECKING:
    import torch
    from torch import nn

VARLEN_SDPA = "tunesmith_varlen_sdpa"
# bf16 attention on the CPU is the CPU plan's choice (tunesmith/cpu.py, `bf16_attention`): "matmul"
# (CausalMatmulAttention, bf16 products), "fp32" (torch's flash kernel on q, k, v cast up) or "sdpa"
# (torch's flash kernel in bf16); bench/profile_step.py A/Bs them.
# A host copy of cu_seq_lens_q that the training step adds to a batch on the GPU (distributed.to_device).
HOST_BOUNDS = "cu_seq_lens_host"
# Where each token of a varlen row goes in a (samples x longest sample) batch, built once per batch on
# the device (sample_slots); its presence selects the one-call path in varlen_sdpa_attention.
SAMPLE_SLOTS = "varlen_sample_slots"
# Query rows per block of CausalMatmulAttention: a block's bf16 scores are 9 heads x 128 rows x the
# keys up to the block's end for the default model (1.2 MB at 512 tokens, where a whole sample's are
# 4.7 MB). Chosen when the scores were cast to fp32: 64 and 256 were slower at 1024 tokens and no
# better at 400-512 (bench/RESULTS.md).
QUERY_BLOCK = 4 * ROW_MULTIPLE
_VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _causal_attention_function() -> type:
    import torch

    class CausalMatmulAttention(torch.autograd.Function):
        """Causal attention of one sample as plain batched matrix products, for bf16 on the CPU.

        torch's CPU flash kernel computes bf16 attention no faster than fp32 (bench/RESULTS.md);
        here the four products per pass run in bf16 (on the AMX units where there are some),
        grouped by key/value head (grouped-query attention without repeating k and v). The
        softmax and its gradient take the bf16 scores as they are: torch's CPU kernels compute
        them in fp32 and round once, so no fp32 copy of the scores is made and cast back.
        Queries go QUERY_BLOCK at a time against the keys up to the block's end: the mask and
        softmax pass over a block's smaller scores instead of the whole sample's (3-6x faster at
        400-1024 tokens, bench/RESULTS.md), the keys past the block, all masked, are never
        multiplied, and only the block's own keys (its diagonal square) need masking. Each query
        row still sees all of its keys at once, so the softmax is exact. Kept for backward: the
        scaled q, k, v and each block's probabilities (53-68% of a whole sample's at 320-2048 tokens).
        """

        @staticmethod
        def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    scaling: float) -> torch.Tensor:
            _, heads, length, dim = query.shape
            groups = key.shape[1]
            per_group = heads // groups
            q = (query[0] * scaling).view(groups, per_group, length, dim)
            out = torch.empty_like(q)
            probs = []
            for start, end in _query_blocks(length):
                scores = _block_rows(q, start, end) @ key[0, :, :end].transpose(-1, -2)
                own_keys = scores.view(groups, per_group, end - start, end)[..., start:]
                own_keys.masked_fill_(_future_mask(end - start, query.device), float("-inf"))
                probs.append(torch.softmax(scores, dim=-1))
                out[:, :, start:end] = (probs[-1] @ value[0, :, :end]).view(groups, per_group, end - start, dim)
            ctx.save_for_backward(q, key, value, *probs)
            ctx.scaling = scaling
            return out.view(1, heads, length, dim)

        @staticmethod
        def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
            q, key, value, *probs = ctx.saved_tensors
            groups, per_group, length, dim = q.shape
            g = grad_out[0].reshape(groups, per_group, length, dim)
            grad_query = torch.empty_like(q)
            # key and value gradients: each block's bf16 product summed in fp32, cast back at the end
            grad_key = torch.zeros(groups, length, dim, dtype=torch.float32, device=q.device)
            grad_value = torch.zeros_like(grad_key)
            for (start, end), block_probs in zip(_query_blocks(length), probs, strict=True):
                rows, block_grad = _block_rows(q, start, end), _block_rows(g, start, end)
                grad_value[:, :end] += block_probs.transpose(-1, -2) @ block_grad
                grad_probs = block_grad @ value[0, :, :end].transpose(-1, -2)
                grad_scores = torch._softmax_backward_data(grad_probs, block_probs, -1, block_probs.dtype)
                grad_query[:, :, start:end] = ((grad_scores @ key[0, :, :end]) * ctx.scaling).view(
                    groups, per_group, end - start, dim)
                grad_key[:, :end] += grad_scores.transpose(-1, -2) @ rows  # rows carry the scaling already
            return (grad_query.view(1, -1, length, dim), grad_key.to(q.dtype)[None], grad_value.to(q.dtype)[None],
                    None)

    return CausalMatmulAttention


_CAUSAL_MATMUL: type | None = None


def _future_mask(size: int, device: torch.device) -> torch.Tensor:
    """True where a key lies after its query, within a block's own (size x size) keys. Built at each
    call (a few microseconds): a cached tensor would outlive a tracing mode's fake tensors."""
    import torch

    return torch.ones(size, size, dtype=torch.bool, device=device).triu_(1)


def _query_blocks(length: int) -> list[tuple[int, int]]:
    """(start, end) of the query blocks of CausalMatmulAttention."""
    return [(start, min(start + QUERY_BLOCK, length)) for start in range(0, length, QUERY_BLOCK)]


def _block_rows(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """A block's positions of a (groups, heads per group, L, d) tensor as one (groups, rows, d)
    operand, its rows ordered by head, then position."""
    return t[:, :, start:end].reshape(t.shape[0], -1, t.shape[-1])


def causal_matmul_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            scaling: float) -> torch.Tensor:
    """(1, heads, L, d) query against (1, kv_heads, L, d) key/value; returns (1, L, heads, d) like sdpa's wrapper."""
    import torch.nn.functional as F


    global _CAUSAL_MATMUL
    if _CAUSAL_MATMUL is None:
        _CAUSAL_MATMUL = _causal_attention_function()
    # Lengths padded to a multiple of ROW_MULTIPLE bound the product shapes oneDNN builds kernels
    # for (train/kernels.py). The padding keys lie in the future of every real query, so the
    # causal mask hides them; the padding queries' outputs are dropped.
    length = query.shape[2]
    extra = -length % ROW_MULTIPLE
    if extra:
        query, key, value = (F.pad(t, (0, 0, 0, extra)) for t in (query, key, value))
    return _CAUSAL_MATMUL.apply(query, key, value, scaling)[:, :, :length].transpose(1, 2)


def sample_slots(bounds: torch.Tensor) -> torch.Tensor:
    """For boundaries [0, b1, ..., T] on the host: token t of sample i goes to slot i * longest + (t - b_i)."""
    import torch

    lengths = bounds[1:] - bounds[:-1]
    longest = int(lengths.max()) if len(lengths) else 0
    starts = torch.repeat_interleave(torch.arange(len(lengths)) * longest - bounds[:-1], lengths)
    return starts + torch.arange(int(bounds[-1]))


# The one-call path pads every sample to the longest: past this many padded tokens per real one
# (one long sample among many short ones) its extra memory and work cost more than the launches it saves.
MAX_ONE_CALL_PADDING = 2.0


def one_call_pays(bounds: torch.Tensor) -> bool:
    """Whether (samples x longest) stays within MAX_ONE_CALL_PADDING x the row's real tokens."""
    lengths = bounds[1:] - bounds[:-1]
    total = int(bounds[-1])
    return total > 0 and len(lengths) * int(lengths.max()) <= MAX_ONE_CALL_PADDING * total


def _one_call_varlen(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     bounds: torch.Tensor, slots: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """All samples of a row in one causal sdpa call: each sample starts its own row of the batch, the
    padding after it lies in the future of all its queries (hidden by the causal mask), and the
    padding queries' outputs are never gathered back. Returns (1, T, heads, d) like the per-sample path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    samples = len(bounds) - 1
    longest = int((bounds[1:] - bounds[:-1]).max())

    def scatter(t: torch.Tensor) -> torch.Tensor:
        heads, dim = t.shape[1], t.shape[3]
        batch = t.new_zeros(heads, samples * longest, dim)
        batch[:, slots] = t[0]
        return batch.view(heads, samples, longest, dim).transpose(0, 1)

    out = sdpa_attention_forward(module, scatter(query), scatter(key), scatter(value), None,
                                 is_causal=True, **kwargs)[0]  # (samples, longest, heads, d)
    return out.reshape(samples * longest, *out.shape[2:])[slots][None]


def varlen_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                          cu_seq_lens_k: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """sdpa per sample when the batch carries sample boundaries; plain sdpa otherwise."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("max_length_q", None)
    kwargs.pop("max_length_k", None)
    slots = kwargs.pop("sample_slots", None)
    whole_rows = query.shape[0] == 1 and query.shape[2] == key.shape[2] and attention_mask is None
    if cu_seq_lens_q is None or not whole_rows:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if slots is not None:  # present only where the one call pays (distributed.to_device)
        return _one_call_varlen(module, query, key, value, cu_seq_lens_q, slots, dropout=dropout,
                                scaling=scaling, **kwargs), None
    dtype = query.dtype
    bounds = cu_seq_lens_q.tolist()
    cpu_bf16 = query.device.type == "cpu" and dtype == torch.bfloat16
    kernel = plan_in_use("bf16").bf16_attention.value if cpu_bf16 else "sdpa"
    if kernel == "matmul" and dropout == 0.0 and not kwargs.get("s_aux") and not kwargs.get("softcap"):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return torch.cat([causal_matmul_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], scale)
                          for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a], dim=1), None
    if kernel == "fp32":
        query, key, value = query.float(), key.float(), value.float()
    outputs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                      dropout=dropout, scaling=scaling, is_causal=True, **kwargs)[0]
               for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    return torch.cat(outputs, dim=1).to(dtype), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)  # padded batches get sdpa's usual masks


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attention_implementation(model: nn.Module) -> str:
    return str(getattr(_base(model).config, "_attn_implementation", None) or "eager")


def _sliding_window(model: nn.Module) -> bool:
    config = _base(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True) is not False


def choose_layout(model: nn.Module, packing: bool, *, contaminate: bool = False) -> str:
    """The batch layout for training; switches sdpa models to the per-sample sdpa.

    varlen whenever the kernel allows it (flash attention, or sdpa on a model without
    sliding-window layers, which would need the mask): it computes exactly what the padded layout
    does, with no padding and no attention between samples, and measured fastest of all layouts
    (bench/RESULTS.md), so it is used whether or not packing was asked for. Otherwise masked
    (packing asked for) or padded. `contaminate` (config `packing_contamination`) gives concat,
    where packed samples attend to each other, on the model's own attention kernel.
    """
    if contaminate:
        restore_attention(model)  # a plain causal mask over the row: no per-sample kernel
        return "concat"
    implementation = attention_implementation(model)
    if implementation.startswith("flash_attention") or implementation == VARLEN_SDPA:
        return "varlen"
    if implementation == "sdpa" and not _sliding_window(model):
        _register()
        _base(model).set_attn_implementation(VARLEN_SDPA)
        return "varlen"
    return "masked" if packing else "padded"


def restore_attention(model: nn.Module) -> None:
    """Put a model switched by choose_layout back on plain sdpa (before it leaves the trainer)."""
    if attention_implementation(model) == VARLEN_SDPA:
        _base(model).set_attn_implementation("sdpa")


def forward_kwargs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The backbone's keyword arguments for a collated batch, in the form its attention kernel needs."""
    import torch

    kwargs: dict[str, Any] = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    if "cu_seq_lens_q" in batch:
        implementation = attention_implementation(model)
        if not (implementation.startswith("flash_attention") or implementation == VARLEN_SDPA):
            raise ValueError(f"a padding-free batch needs varlen attention; this model uses {implementation!r} "
                             "(collate it with layout 'masked' instead)")
        kwargs.update({k: batch[k] for k in _VARLEN_KEYS[:2]})
        kwargs.update({k: int(batch[k]) for k in _VARLEN_KEYS[2:]})  # flash-attn wants plain ints
        if implementation == VARLEN_SDPA:
            # The per-sample kernel slices by the boundaries in every layer: from the host, no device sync.
            kwargs["cu_seq_lens_q"] = batch.get(HOST_BOUNDS, batch["cu_seq_lens_q"])
            if SAMPLE_SLOTS in batch:
                kwargs["sample_slots"] = batch[SAMPLE_SLOTS]
            # An all-ones padding mask makes transformers skip building a (T x T) packed mask that
            # the per-sample kernel would ignore anyway.
            kwargs["attention_mask"] = torch.ones_like(batch["input_ids"])
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.ndim == 4 and mask.dtype == torch.bool and attention_implementation(model) == "eager":
        # eager adds the mask to the scores: a boolean one would mask nothing.
        additive = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        kwargs["attention_mask"] = additive.masked_fill_(~mask, torch.finfo(torch.float32).min)
    return kwargs
