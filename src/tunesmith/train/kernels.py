"""Training-time forwards that do the same math as transformers' and peft's with less memory or work.

They replace the `forward` of module instances for the length of a training run
(`set_training_forwards(model, True)`) and are removed again before the model is saved or used
elsewhere. Each one applies only where it reproduces the original exactly: a module of another
shape keeps its own forward, and the norm and MLP replacements are checked against the originals
on a random input before they are installed. bench/RESULTS.md measures them.

- LoRA linear: base(x) + scaling * B(A(x)) with the B product, the scaling and the sum in one
  addmm into the base output, where peft forms, scales and adds a (tokens x out) tensor: two
  passes and two activation-sized temporaries fewer per layer.
- Gated MLP (down(silu(gate(x)) * up(x))): keeps gate(x) and up(x) for backward and recomputes
  silu, where autograd keeps silu(gate(x)) as well (1 of the 4 intermediate-sized tensors).
- RMSNorm with a frozen fp32 weight: keeps its output (which the next linear layer keeps anyway)
  instead of its input, and recovers the normalised input as output / weight.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


def _lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft LoRA Linear: one plain adapter in one addmm; anything else (dropout, DoRA and other
    variants, a B bias, merged or disabled adapters, mixed dtypes outside autocast) is peft's own."""
    import torch
    from torch import nn

    name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    plain = (name in self.lora_A and not args and not kwargs and not self.disable_adapters and not self.merged
             and name not in self.lora_variant and isinstance(self.lora_dropout[name], nn.Identity)
             and self.lora_B[name].bias is None)
    if plain:
        weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
        plain = torch.is_autocast_enabled(x.device.type) or x.dtype == weight_a.dtype == weight_b.dtype
    if not plain:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)  # a fresh tensor nothing keeps for backward: updated in place
    down = torch.nn.functional.linear(x, weight_a)
    result.view(-1, result.shape[-1]).addmm_(down.reshape(-1, down.shape[-1]), weight_b.t().to(result.dtype),
                                             alpha=self.scaling[name])
    return result


_FUNCTIONS: dict[str, type] = {}


def _functions() -> dict[str, type]:
    if _FUNCTIONS:
        return _FUNCTIONS
    import torch
    import torch.nn.functional as F

    class SiluGate(torch.autograd.Function):
        """silu(gate) * up, keeping only gate and up for backward."""

        @staticmethod
        def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(gate, up)
            return F.silu(gate).mul_(up)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            gate, up = ctx.saved_tensors
            return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)

    class FrozenRMSNorm(torch.autograd.Function):
        """weight * x / rms(x) for a frozen, nowhere-zero weight, keeping the output and 1/rms."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
            inv_rms = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_() / x.shape[-1] + eps)
            out = (x * inv_rms).mul_(weight)
            ctx.save_for_backward(out, inv_rms, weight)
            return out

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
            out, inv_rms, weight = ctx.saved_tensors
            normed = out / weight
            scaled = grad * weight
            return inv_rms * (scaled - normed * (scaled * normed).mean(-1, keepdim=True)), None, None

    _FUNCTIONS.update(SiluGate=SiluGate, FrozenRMSNorm=FrozenRMSNorm)
    return _FUNCTIONS


def _gated_mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_functions()["SiluGate"].apply(self.gate_proj(x), self.up_proj(x)))


def _rms_norm_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    import torch

    if x.dtype != torch.float32 or self.weight.requires_grad or self.weight.dtype != torch.float32:
        return type(self).forward(self, x)
    return _functions()["FrozenRMSNorm"].apply(x, self.weight, self.variance_epsilon)


def _is_gated_silu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return all(hasattr(module, k) for k in ("gate_proj", "up_proj", "down_proj")) and \
        type(act).__name__ in ("SiLU", "SiLUActivation")


def _is_frozen_rms_norm(module: nn.Module) -> bool:
    import torch

    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and isinstance(weight, torch.Tensor) and weight.ndim == 1 and not weight.requires_grad
            and weight.dtype == torch.float32 and bool((weight != 0).all()))


def _same_as_original(module: nn.Module, forward: Any, width: int) -> bool:
    """Whether `forward` gives the module's own output on a random input (forward and backward)."""
    import torch

    x = torch.randn(2, 3, width, device=next(module.parameters()).device)
    was_training = module.training
    module.eval()  # no dropout in the comparison
    try:
        mine_in, theirs_in = x.clone().requires_grad_(), x.clone().requires_grad_()
        mine, theirs = forward(module, mine_in), type(module).forward(module, theirs_in)
        mine.sum().backward()
        theirs.sum().backward()
        return mine.shape == theirs.shape and torch.allclose(mine, theirs, atol=1e-5, rtol=1e-4) and \
            torch.allclose(mine_in.grad, theirs_in.grad, atol=1e-5, rtol=1e-4)
    except Exception:  # any other signature or shape: keep the module's own forward
        return False
    finally:
        module.train(was_training)
        for param in module.parameters():
            param.grad = None


def set_training_forwards(model: nn.Module, enabled: bool) -> None:
    """Install (or remove) the training forwards on every module they apply to."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear

    checked: dict[type, bool] = {}  # one check per module class: the layers of a model are alike
    ours = (_lora_forward, _gated_mlp_forward, _rms_norm_forward)
    for module in model.modules():
        if not enabled:
            if getattr(module.__dict__.get("forward"), "__func__", None) in ours:  # leave others' wrappers alone
                del module.__dict__["forward"]
            continue
        if isinstance(module, LoraLinear) and type(module).forward is LoraLinear.forward:
            module.forward = types.MethodType(_lora_forward, module)
            continue
        if _is_gated_silu_mlp(module):
            forward, width = _gated_mlp_forward, module.gate_proj.in_features
        elif _is_frozen_rms_norm(module):
            forward, width = _rms_norm_forward, module.weight.shape[0]
        else:
            continue
        if type(module) not in checked:
            with torch.enable_grad():
                checked[type(module)] = _same_as_original(module, forward, width)
        if checked[type(module)]:
            module.forward = types.MethodType(forward, module)
