"""Fine-tuning setup: which weights train (LoRA through peft, the last N layers, or all) and
in which dtype the frozen base is kept."""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tunesmith.config import FinetuneArgs, ModelArgs
from tunesmith.errors import UserError, did_you_mean
from tunesmith.model.load import bitsandbytes_hidden, quiet_peft, read_config_json
from tunesmith.model.provision import resolve_model_path

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel
# Attributes on a parameter (LoRA+; train/optimizers.py): its peak learning rate is learning_rate
# times LR_FACTOR, or LR_ABSOLUTE itself.
LR_FACTOR = "tunesmith_lr_factor"
LR_ABSOLUTE = "tunesmith_lr"
# Attribute on a PiSSA-initialised PeftModel: its adapter's initial weights, which the saved
# adapter is expressed against so that it applies to the original base (pissa_save_kwargs).
PISSA_INITIAL = "tunesmith_pissa_initial"


def _linear_types() -> tuple[type, ...]:
    from torch import nn
    from transformers.pytorch_utils import Conv1D  # GPT-2 style models keep their linears in this

    return (nn.Linear, Conv1D)


def _output_head_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules(remove_duplicate=False) if module is head}


def _linear_module_names(model: nn.Module) -> dict[str, list[str]]:
    """Short name (last path component) -> full names of the linear layers, output head excluded."""
    heads = _output_head_names(model)
    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, _linear_types()) and name not in heads:
            found.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return found


def _module_matches(model: nn.Module, name: str) -> list[str]:
    """Full module names equal to `name` or ending in `.name` (peft's rule for a list of targets)."""
    return [full for full, _ in model.named_modules() if full and (full == name or full.endswith("." + name))]


def _lora_targets(model: nn.Module, lora_target: list[str]) -> list[str]:
    from torch import nn

    linear = _linear_module_names(model)
    names = list(lora_target)
    if not names:
        raise UserError("lora_target is empty; use 'all' or module names such as q_proj,v_proj.")
    if names == ["all"]:
        return sorted(linear)
    # The output head may be named explicitly; 'all' leaves it out.
    all_linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if isinstance(m, _linear_types())})
    modules = dict(model.named_modules())
    for name in names:
        matches = _module_matches(model, name)
        if not matches:
            raise UserError(f"lora_target: no module named {name!r} in this model{did_you_mean(name, all_linear)}; "
                            f"its linear modules are: {', '.join(all_linear)}.",
                            hint="use 'all' for every linear layer but the output head.")
        if not any(isinstance(modules[m], (*_linear_types(), nn.Embedding)) for m in matches):
            kind = type(modules[matches[0]]).__name__
            raise UserError(f"lora_target: {name!r} is a {kind} block, not a linear layer; its linear modules are: "
                            f"{', '.join(all_linear)}.")
    return names


def _modules_to_save(model: nn.Module, additional_target: list[str] | None) -> list[str] | None:
    """Full names of the extra fully-trained modules. peft matches modules_to_save by plain suffix
    ('norm' would also catch every 'input_layernorm'), so the exact full names are passed."""
    names = list(additional_target or [])
    if not names:
        return None
    full: list[str] = []
    for name in names:
        matches = _module_matches(model, name)
        if not matches:
            top = sorted({n.split(".")[-1] for n, _ in model.named_modules() if n and not n.split(".")[-1].isdigit()})
            raise UserError(f"additional_target: no module named {name!r} in this model"
                            f"{did_you_mean(name, top)}; module names include: {', '.join(top)}.")
        full.extend(m for m in matches if m not in full)
    return full


def _decoder_layers(model: nn.Module) -> tuple[str, int]:
    """(path of the ModuleList of decoder layers, its length)."""
    from torch import nn

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    expected = getattr(config, "num_hidden_layers", None)
    lists = [(name, len(m)) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    exact = [item for item in lists if item[1] == expected]
    candidates = exact or sorted(lists, key=lambda item: -item[1])
    if not candidates:
        raise UserError("freeze tuning: this model has no list of decoder layers to choose from.",
                        hint="use finetuning_type: lora or full.")
    return candidates[0]


def _freeze_layer_indices(count: int, trainable: int) -> list[int]:
    if trainable == 0 or abs(trainable) > count:
        raise UserError(f"freeze_trainable_layers is {trainable}; this model has {count} decoder layers, so use "
                        f"1..{count} (the last N layers) or -1..-{count} (the first N).")
    return list(range(count - trainable, count)) if trainable > 0 else list(range(-trainable))


def base_dtype_for_training(model_args: ModelArgs, finetuning_type: str, precision: str) -> torch.dtype:
    """The dtype to load the base weights in for training.

    Under bf16 mixed precision the frozen weights of a LoRA run are stored in bf16, so autocast
    does not cast them again at every matrix product (bench/RESULTS.md); trainable weights are
    upcast to fp32 by apply_finetuning. Frozen layers of a freeze run are saved with the model,
    so they stay fp32 unless the checkpoint itself is stored in bf16 (nothing to lose then).
    """
    import torch

    if precision != "bf16" or finetuning_type == "full":
        return torch.float32
    if finetuning_type == "lora":
        return torch.bfloat16
    stored = read_config_json(resolve_model_path(model_args.model_name_or_path))
    stored_dtype = stored.get("dtype") or stored.get("torch_dtype")
    return torch.bfloat16 if stored_dtype == "bfloat16" else torch.float32


def set_adapter_input_casting(model: nn.Module, enabled: bool) -> None:
    """peft casts each LoRA input to the adapter's fp32 and autocast casts it straight back to
    bf16: under autocast that round trip is exact and only costs copies, so training turns it
    off and turns it on again before the model is used without autocast."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = enabled


def _upcast_trainable(model: nn.Module) -> None:
    """Trainable weights (and so optimizer state) stay fp32 whatever the compute dtype."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def apply_finetuning(model: PreTrainedModel, finetune: FinetuneArgs, *, gradient_checkpointing: bool = False,
                     verbose: bool = True) -> nn.Module:
    """Mark what trains: LoRA adapters (through peft), the last/first N decoder layers, or everything.

    A model that already carries adapters (from load_adapters) keeps them under 'lora', training
    those loaded trainable; 'freeze' and 'full' first merge them into the base weights.
    """
    with bitsandbytes_hidden():  # the first import of peft in a training run
        from peft import PeftModel, get_peft_model

    kind = finetune.finetuning_type
    if isinstance(model, PeftModel) and (kind != "lora" or finetune.create_new_adapter):
        model = model.merge_and_unload()  # create_new_adapter: the loaded adapters become part of the base
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise UserError(f"gradient_checkpointing: {type(model).__name__} does not support it.",
                            hint="set gradient_checkpointing: false.")
        # transformers 5.x renamed the method; older releases only have the first name.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # a cache is useless in training and conflicts with recomputation

    if kind == "lora":
        if isinstance(model, PeftModel) and not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the adapters on this model were loaded for inference; load them with "
                             "load_adapters(..., is_trainable=True) to continue training the last one.")
        if not isinstance(model, PeftModel):
            config = lora_config(model, finetune)
            try:
                with quiet_peft(), bitsandbytes_hidden():
                    model = get_peft_model(model, config)
            except ValueError as exc:
                raise UserError(f"lora_target {finetune.lora_target!r}: peft cannot put LoRA there: {exc}") from None
            if finetune.pissa_init:
                keep_initial_adapter(model)
        if finetune.loraplus_lr_ratio is not None:
            set_loraplus_rates(model, finetune.loraplus_lr_ratio, finetune.loraplus_lr_embedding)
    elif kind == "freeze":
        prefix, count = _decoder_layers(model)
        chosen = tuple(f"{prefix}.{i}." for i in _freeze_layer_indices(count, finetune.freeze_trainable_layers))
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(chosen))
    elif kind == "full":
        model.requires_grad_(True)
    else:
        raise UserError(f"finetuning_type {kind!r} is unknown; use lora, freeze or full.")

    if gradient_checkpointing and not model.get_input_embeddings().weight.requires_grad:
        # With the embeddings frozen, recomputed blocks would see inputs without grad.
        model.enable_input_require_grads()
    _upcast_trainable(model)
    if verbose:
        print(f"{kind}: {trainable_summary(model)}")
    return model

def lora_config(model: nn.Module, finetune: FinetuneArgs) -> Any:
    """peft's LoraConfig for the run: targets, rank and alpha, and the variants (DoRA, rsLoRA, PiSSA)."""
    from peft import LoraConfig

    init: bool | str = True
    if finetune.pissa_init:
        init = "pissa" if finetune.pissa_iter == -1 else f"pissa_niter_{finetune.pissa_iter}"
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=finetune.lora_rank,
        lora_alpha=finetune.lora_alpha if finetune.lora_alpha is not None else 2 * finetune.lora_rank,
        lora_dropout=finetune.lora_dropout,
        target_modules=_lora_targets(model, finetune.lora_target),
        modules_to_save=_modules_to_save(model, finetune.additional_target),
        use_dora=finetune.use_dora,
        use_rslora=finetune.use_rslora,
        init_lora_weights=init,
    )


def set_loraplus_rates(model: nn.Module, ratio: float, embedding_lr: float) -> None:
    """LoRA+: the B matrices learn `ratio` times faster than the A matrices; LoRA on an embedding
    layer learns at its own rate (loraplus_lr_embedding)."""
    from peft.tuners.lora import Embedding as LoraEmbedding

    embedding_params = {id(p) for m in model.modules() if isinstance(m, LoraEmbedding)
                        for n, p in m.named_parameters() if "lora_embedding" in n}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding_params:
            setattr(param, LR_ABSOLUTE, embedding_lr)
        elif "lora_B" in name:
            setattr(param, LR_FACTOR, ratio)


def keep_initial_adapter(model: nn.Module) -> None:
    """Remember a PiSSA adapter's initial weights (a copy; the adapter is small)."""
    from peft import get_peft_model_state_dict

    state = {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}
    setattr(model, PISSA_INITIAL, state)


@contextlib.contextmanager
def final_save_kwargs(model: nn.Module) -> Iterator[dict[str, Any]]:
    """Keyword arguments for the final `save_pretrained` of a trained model. A PiSSA adapter
    trains against a base whose weights PiSSA changed; peft saves it converted to a plain LoRA
    (of twice the rank) on the original base, given the initial adapter in a folder."""
    initial = getattr(model, PISSA_INITIAL, None)
    if initial is None:
        yield {}
        return
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="pissa-initial-") as folder:
        config = copy.deepcopy(model.peft_config["default"])
        config.save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in initial.items()}, f"{folder}/adapter_model.safetensors")
        yield {"path_initial_model_for_weight_conversion": folder}


def trainable_summary(model: nn.Module) -> str:
    """'trainable params: 1,234 of 5,678 (21.7%)'; shared (tied) weights count once."""
    total = trainable = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    share = 100 * trainable / total if total else 0.0
    shown = f"{share:.1f}" if share >= 1 or share == 0 else f"{share:.2g}"
    return f"trainable params: {trainable:,} of {total:,} ({shown}%)"

