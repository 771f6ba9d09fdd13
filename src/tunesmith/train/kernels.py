"""Training-time forwards that do the same math as transformers' and peft's with less memory or work.

They replace the `forward` of module instances for the length of a training run
(`set_training_forwards(model, True)`) and are removed again before the model is saved or used
elsewhere. Each one applies only where it reproduces the original (exactly in fp32, to bf16's
rounding for the bf16 norm): a module of another shape keeps its own forward, and the norm and
MLP replacements are checked against the originals on a random input before they are installed.
bench/RESULTS.md measures them.

- LoRA linear: base(x) + scaling * B(A(x)) with the B product, the scaling and the sum in one
  addmm into the base output, where peft forms, scales and adds a (tokens x out) tensor: two
  passes and two activation-sized temporaries fewer per layer. In fp32 on the CPU the whole layer
  is one autograd function (`LoraLinear`) whose products all run through `matmul_nt`.
- Gated MLP (down(silu(gate(x)) * up(x))): keeps gate(x) and up(x) for backward and recomputes
  silu, where autograd keeps silu(gate(x)) as well (1 of the 4 intermediate-sized tensors).
- RMSNorm with a frozen fp32 weight: keeps its output (which the next linear layer keeps anyway)
  instead of its input, and recovers the normalised input as output / weight.
- RMSNorm with a frozen bf16 weight on the CPU (a bf16 LoRA base): one autograd function with the
  library's rounding steps instead of its chain of casts and element-wise nodes.
- Other linear layers in fp32 on the CPU: their products (forward and gradients) go through
  `matmul_nt` as well.

`matmul_nt` runs fp32 products on the CPU through oneDNN, which picks its kernels from the CPU's
features, where torch's fp32 matmul goes to a BLAS that may not use AVX-512 on every vendor's CPU
(2.2x apart on an AVX-512 AMD CPU, bench/RESULTS.md), or through torch's BLAS where that measured
faster (MKL on an Intel Xeon without AMX and on AVX2-only CPUs); the loss's output head uses it
too, with its own choice (`head_on_onednn`: oneDNN for the head's few-row, vocabulary-wide
product on AVX2-only CPUs, whose other products take the BLAS). Where the products take oneDNN,
training pads its pieces to a multiple of ROW_MULTIPLE tokens so that they do. Whether fp32
products take oneDNN, and whether pieces are padded, is the CPU plan's choice (tunesmith/cpu.py,
`plan_in_use`), checked at every call.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import TYPE_CHECKING, Any

from tunesmith.cpu import ROW_MULTIPLE, Choice, plan_in_use

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
    # One autograd function whichever library runs the products (`matmul_nt` picks): on torch's
    # BLAS too it beats autograd's graph of peft's layer (+4-8%, bench/RESULTS.md).
    if type(self.base_layer) is nn.Linear and _fp32_on_cpu(x, self.base_layer.weight) \
            and weight_a.dtype == weight_b.dtype == torch.float32:
        return _functions()["LoraLinear"].apply(x, self.base_layer.weight, self.base_layer.bias, weight_a, weight_b,
                                                self.scaling[name])
    result = self.base_layer(x)  # a fresh tensor nothing keeps for backward: updated in place
    down = torch.nn.functional.linear(x, weight_a)
    result.view(-1, result.shape[-1]).addmm_(down.reshape(-1, down.shape[-1]), weight_b.t().to(result.dtype),
                                             alpha=self.scaling[name])
    return result


@functools.cache
def _onednn_exact() -> bool:
    """oneDNN's fp32 linear product exists in this torch build and gives fp32 results (not a
    reduced-precision mode), for plain and transposed operands. Checked once per process."""
    import torch

    linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if linear is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(37, 67, generator=gen), torch.randn(29, 67, generator=gen)
        return all(torch.allclose(linear(x, w, None, "none", [], ""), x @ w.t(), rtol=1e-5, atol=1e-5)
                   for x, w in ((a, b), (a.t(), a.t()), (a @ b.t(), b.t())))
    except (RuntimeError, TypeError):
        return False


def _fp32_on_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 input and weight on the CPU, outside autocast (which computes in bf16 through torch's
    own products)."""
    import torch

    return x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 \
        and not torch.is_autocast_enabled("cpu")


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a layer's fp32 products take oneDNN (`matmul_nt`): fp32 on the CPU, where the plan
    puts them there."""
    return _fp32_on_cpu(x, weight) and _on_onednn(x.device.type, x.dtype)


def _on_onednn(device_type: str, dtype: torch.dtype, head: bool = False) -> bool:
    """Whether products of `dtype` on the device run on oneDNN: as the CPU plan says, where this
    torch build can. `head`: the output head's forward product (train/loss.py), which has its
    own choice in fp32 and follows the other products in other dtypes."""
    import torch

    if device_type != "cpu":
        return False
    if dtype == torch.float32:
        plan = plan_in_use("fp32")
        return (plan.head_product if head else plan.fp32_products).on and _onednn_exact()
    return dtype in (torch.bfloat16, torch.float16) and plan_in_use("bf16").padding.on \
        and torch.backends.mkldnn.is_available()


def head_on_onednn(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the output head's forward product (train/loss.py) runs on oneDNN."""
    return _on_onednn(device_type, dtype, head=True)


def cpu_kernels(mixed_precision: bool) -> str:
    """One line naming the CPU kernels a run uses: the plan's, less what this torch build cannot run."""
    plan = plan_in_use("bf16" if mixed_precision else "fp32")
    if not _onednn_exact():
        not_exact = "torch matmul (oneDNN not exact in this build)"
        for field in ("fp32_products", "head_product"):
            if getattr(plan, field).on:
                plan = dataclasses.replace(plan, **{field: Choice(False, not_exact, getattr(plan, field).reason)})
    return plan.summary()


def cpu_row_multiple(mixed_precision: bool) -> int | None:
    """The multiple that training pads token counts to on the CPU (None: no padding), where the
    products run on oneDNN."""
    import torch

    return ROW_MULTIPLE if _on_onednn("cpu", torch.bfloat16 if mixed_precision else torch.float32) else None


def pad_rows(x: torch.Tensor, onednn: bool | None = None) -> torch.Tensor:
    """A 2-D `x` with zero rows appended up to a multiple of ROW_MULTIPLE where its products run
    on oneDNN (`onednn`, else as the plan puts `x`'s products); `x` itself otherwise."""
    import torch

    extra = -x.shape[0] % ROW_MULTIPLE
    if not extra or not (_on_onednn(x.device.type, x.dtype) if onednn is None else onednn):
        return x
    return torch.cat([x, x.new_zeros(extra, x.shape[1])])


def matmul_nt(a: torch.Tensor, b: torch.Tensor, onednn: bool | None = None) -> torch.Tensor:
    """a @ b.T for a 2-D or 3-D `a` and 2-D `b` (either may be a transposed view): through oneDNN
    for fp32 on the CPU when every dimension is below or a multiple of ROW_MULTIPLE and `onednn`
    (else the plan) says so, through torch's matmul otherwise. Not differentiable: for use inside
    autograd functions."""
    import torch

    dims = (a.shape[:-1].numel(), a.shape[-1], b.shape[0])
    if a.device.type == "cpu" and a.dtype == b.dtype == torch.float32 \
            and all(d < ROW_MULTIPLE or d % ROW_MULTIPLE == 0 for d in dims) \
            and (_on_onednn("cpu", a.dtype) if onednn is None else onednn):
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return a @ b.t()


_FUNCTIONS: dict[str, type] = {}
# The frozen RMSNorm's training forward for each dtype (by its name: torch is imported lazily).
_NORM_FUNCTIONS = {"torch.float32": "FrozenRMSNorm", "torch.bfloat16": "FrozenRMSNormRounded"}


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

    class FrozenRMSNormRounded(torch.autograd.Function):
        """The same norm for bf16 x and weight, rounded as the library's layer rounds it (normalised
        in fp32, cast to x's dtype, then multiplied by the weight): four passes over x forward and
        seven backward, where the library's layer runs about twenty casts and element-wise ops and
        autograd nodes. Keeps x and 1/rms. Autocast is off inside: it would run the backward's
        fp32 dot product in bf16."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
            with torch.autocast(x.device.type, enabled=False):
                squares = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square_()
                inv_rms = torch.rsqrt(squares.div_(x.shape[-1]).add_(eps))
                ctx.save_for_backward(x, inv_rms, weight)
                return weight * (x * inv_rms).to(x.dtype)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
            x, inv_rms, weight = ctx.saved_tensors
            with torch.autocast(x.device.type, enabled=False):
                scaled = (grad * weight).float()  # the weight's product in x's dtype, as autograd forms it
                normed = x * inv_rms  # fp32
                mean = torch.linalg.vecdot(scaled, normed, dim=-1).unsqueeze(-1).div_(x.shape[-1])
                return scaled.addcmul_(normed, mean, value=-1).mul_(inv_rms).to(x.dtype), None, None

    class Linear(torch.autograd.Function):
        """x @ weight.T + bias with every product through `matmul_nt`; keeps x only for a trained weight."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
            out = matmul_nt(x, weight)
            return out.add_(bias) if bias is not None else out

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
            x, weight = ctx.saved_tensors
            need_x, need_w, need_b = ctx.needs_input_grad
            grad_x = matmul_nt(grad, weight.t()) if need_x else None
            flat = grad.reshape(-1, grad.shape[-1])
            grad_w = matmul_nt(flat.t(), x.reshape(-1, x.shape[-1]).t()) if need_w else None
            return grad_x, grad_w, flat.sum(0) if need_b else None

    class LoraLinear(torch.autograd.Function):
        """x @ weight.T + bias + scaling * (x @ a.T) @ b.T, the products through `matmul_nt`.
        Keeps x and the rank-sized x @ a.T, as autograd does for peft's LoRA layer."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                    b: torch.Tensor, scaling: float) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1])
            down = matmul_nt(flat, a)
            out = matmul_nt(flat, weight)
            if bias is not None:
                out.add_(bias)
            out.addmm_(down, b.t(), alpha=scaling)
            ctx.save_for_backward(x, down, weight, a, b)
            ctx.scaling = scaling
            return out.view(*x.shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
            x, down, weight, a, b = ctx.saved_tensors
            need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
            flat, g = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
            up = matmul_nt(g, b.t()).mul_(ctx.scaling)  # gradient at x @ a.T
            grad_x = None
            if need_x:
                grad_x = matmul_nt(g, weight.t()).addmm_(up, a).view(x.shape)
            grad_w = matmul_nt(g.t(), flat.t()) if need_w else None
            grad_a = matmul_nt(up.t(), flat.t()) if need_a else None
            # (down.T @ g).T reads g along its rows: several times faster than g.T @ down
            grad_b = matmul_nt(down.t(), g.t()).t().mul_(ctx.scaling) if need_b else None
            return grad_x, grad_w, g.sum(0) if need_bias else None, grad_a, grad_b, None

    _FUNCTIONS.update(SiluGate=SiluGate, FrozenRMSNorm=FrozenRMSNorm, FrozenRMSNormRounded=FrozenRMSNormRounded,
                      Linear=Linear, LoraLinear=LoraLinear)
    return _FUNCTIONS


def _gated_mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_functions()["SiluGate"].apply(self.gate_proj(x), self.up_proj(x)))


def _rms_norm_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    function = _NORM_FUNCTIONS.get(str(x.dtype))
    if function is None or self.weight.requires_grad or x.dtype != self.weight.dtype:
        return type(self).forward(self, x)
    return _functions()[function].apply(x, self.weight, self.variance_epsilon)


def _linear_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    if not _onednn_applies(x, self.weight):
        return F.linear(x, self.weight, self.bias)
    return _functions()["Linear"].apply(x, self.weight, self.bias)


def _is_gated_silu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return all(hasattr(module, k) for k in ("gate_proj", "up_proj", "down_proj")) and \
        type(act).__name__ in ("SiLU", "SiLUActivation")


def _is_frozen_rms_norm(module: nn.Module) -> bool:
    """A frozen RMSNorm whose dtype has a training forward; a bf16 one only on the CPU, where it
    was measured (+4-8% a bf16 step, bench/RESULTS.md)."""
    import torch

    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and isinstance(weight, torch.Tensor) and weight.ndim == 1 and not weight.requires_grad
            and str(weight.dtype) in _NORM_FUNCTIONS and (weight.dtype == torch.float32 or weight.device.type == "cpu")
            and bool((weight != 0).all()))


def _same_as_original(module: nn.Module, forward: Any, width: int, dtype: torch.dtype | None = None) -> bool:
    """Whether `forward` gives the module's own output on a random input of `dtype` (fp32 unless
    given), forward and backward. In bf16, where rounding leaves a few values a unit apart, at
    most 1% of the outputs and of the input gradients may differ at all: a norm that rounds in
    another order (the weight's product in fp32) or scales by even 1% more differs in a third."""
    import torch

    dtype = dtype or torch.float32
    # a fixed input: the verdict does not vary from run to run, and the caller's random stream is untouched
    x = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0))
    x = x.to(device=next(module.parameters()).device, dtype=dtype)

    def same(mine: torch.Tensor, theirs: torch.Tensor) -> bool:
        if dtype == torch.float32:
            return torch.allclose(mine, theirs, atol=1e-5, rtol=1e-4)
        return mine.dtype == theirs.dtype and (mine != theirs).float().mean().item() <= 0.01
    was_training = module.training
    module.eval()  # no dropout in the comparison
    try:
        mine_in, theirs_in = x.clone().requires_grad_(), x.clone().requires_grad_()
        mine, theirs = forward(module, mine_in), type(module).forward(module, theirs_in)
        mine.sum().backward()
        theirs.sum().backward()
        return mine.shape == theirs.shape and same(mine, theirs) and same(mine_in.grad, theirs_in.grad)
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
    from torch import nn

    checked: dict[tuple[type, Any], bool] = {}  # one check per module class and dtype: the layers are alike
    ours = (_lora_forward, _gated_mlp_forward, _rms_norm_forward, _linear_forward)
    for module in model.modules():
        if not enabled:
            if getattr(module.__dict__.get("forward"), "__func__", None) in ours:  # leave others' wrappers alone
                del module.__dict__["forward"]
            continue
        if isinstance(module, LoraLinear) and type(module).forward is LoraLinear.forward:
            module.forward = types.MethodType(_lora_forward, module)
            continue
        dtype = None  # checked on fp32 inputs, except a norm: on its own weight's dtype
        if _is_gated_silu_mlp(module):
            forward, width = _gated_mlp_forward, module.gate_proj.in_features
        elif _is_frozen_rms_norm(module):
            forward, width, dtype = _rms_norm_forward, module.weight.shape[0], module.weight.dtype
        elif type(module) is nn.Linear and _on_onednn(module.weight.device.type, torch.float32):
            forward, width = _linear_forward, module.in_features
        else:
            continue
        key = (type(module), dtype)
        if key not in checked:
            with torch.enable_grad():
                checked[key] = _same_as_original(module, forward, width, dtype)
        if checked[key]:
            module.forward = types.MethodType(forward, module)
