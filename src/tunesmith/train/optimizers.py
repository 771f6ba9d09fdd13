"""The optimizer a run asks for with `optim`, built on torch, transformers or bitsandbytes.

Parameter groups arrive with their weight decay; a parameter may carry its own peak learning
rate (`LR_FACTOR` x learning_rate or `LR_ABSOLUTE`, set by model/finetune.py for LoRA+), which
puts it in a group of its own. The schedule scales every group alike, so the ratio
holds at every step.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import torch

from tunesmith.errors import UserError
from tunesmith.model.finetune import LR_ABSOLUTE, LR_FACTOR

BNB_8BIT = ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit")
BNB_HINT = "install it with: pip install 'tunesmith[qlora]'"


def split_by_lr(param_groups: list[dict[str, Any]], learning_rate: float) -> list[dict[str, Any]]:
    """Each group split by its parameters' peak learning rates, with `lr` set (no group is empty)."""
    out: list[dict[str, Any]] = []
    for group in param_groups:
        by_lr: dict[float, list[torch.nn.Parameter]] = {}
        for param in group["params"]:
            lr = getattr(param, LR_ABSOLUTE, None) or learning_rate * getattr(param, LR_FACTOR, 1.0)
            by_lr.setdefault(float(lr), []).append(param)
        for lr, params in by_lr.items():
            out.append({**group, "params": params, "lr": lr})
    return out


FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_applies(groups: list[dict[str, Any]]) -> bool:
    """Whether torch's fused AdamW (one kernel per step for all tensors) can take these parameters:
    plain tensors (not DTensor or other subclasses) of a float type, all on the CPU or all on CUDA.
    The same math as the per-tensor loop torch runs on the CPU otherwise, 3.6x faster there (9 vs 33 ms
    a step for the default model's 2.4M LoRA parameters, 1 thread;
    bench/RESULTS.md, "CPU decisions per feature set")."""
    params = [p for group in groups for p in group["params"]]
    kinds = {p.device.type for p in params}
    return bool(params) and len(kinds) == 1 and kinds <= {"cpu", "cuda"} \
        and all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.dtype in FUSED_DTYPES for p in params)


def make_optimizer(name: str, param_groups: list[dict[str, Any]], train_args: Any,
                   device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `name` (one of config's `optim` choices) over the groups."""
    t = train_args
    groups = split_by_lr(param_groups, t.learning_rate)
    if name in ("adamw_torch", "adamw_torch_fused"):
        return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                                 fused=name == "adamw_torch_fused" or fused_applies(groups) or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=t.learning_rate)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate driven by the schedule, as for the other optimizers (no relative steps).
        return Adafactor(groups, lr=t.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    if name in BNB_8BIT:
        return _bnb_adamw_8bit(name, groups, t, device)
    raise UserError(f"optim: {name!r} is not known; see `tunesmith train --keys`.")


def _bnb_adamw_8bit(name: str, groups: list[dict[str, Any]], t: Any, device: torch.device) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW with 8-bit state; paged state only where CUDA unified memory exists."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"optim: {name} needs the bitsandbytes package, which is not installed.",
                        hint=f"{BNB_HINT}, or use optim: adamw_torch.")
    import bitsandbytes as bnb

    paged = name == "paged_adamw_8bit" and device.type == "cuda"
    if name == "paged_adamw_8bit" and not paged:
        print(f"note: optim: paged_adamw_8bit pages optimizer state through CUDA memory; on '{device}' the same "
              "8-bit AdamW runs unpaged.", file=sys.stderr)
    _probe_bnb_8bit(bnb, device, name)
    cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
    return cls(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)


def _probe_bnb_8bit(bnb: Any, device: torch.device, name: str) -> None:
    """One 8-bit step on a throw-away tensor large enough for quantized state: a backend that
    cannot run it fails here, before training starts, with the device named."""
    probe = torch.nn.Parameter(torch.zeros(4096, device=device))
    probe.grad = torch.ones_like(probe)
    try:
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        raise UserError(f"optim: {name}: bitsandbytes cannot run 8-bit AdamW on '{device}' here: {exc}",
                        hint="use optim: adamw_torch (or adafactor, whose state is also small).") from None
