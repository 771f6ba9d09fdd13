"""Loading a tokenizer and a base model from a local folder, and LoRA adapters onto it.

Weights are read from safetensors; pickles only on explicit opt-in and then tensors only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import pickle
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.config import ModelArgs
from tunesmith.errors import UserError
from tunesmith.model.provision import resolve_model_path
from tunesmith.template import apply_template

if TYPE_CHECKING:  # torch and transformers load lazily: `tunesmith --help` stays fast
    import torch
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


SAFE_WEIGHTS = ("*.safetensors", "*.safetensors.index.json")
PICKLE_WEIGHTS = ("*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt")


def read_config_json(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json; this is not a Hugging Face model folder.",
                        hint="give the folder that holds config.json, the weights and the tokenizer files.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: must hold a JSON object.")
    return data


def _check_remote_code(folder: Path, config: dict[str, Any], trust_remote_code: bool) -> None:
    """A model type transformers does not know runs only with the code shipped in its folder."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    auto_map = config.get("auto_map") or {}
    if model_type in CONFIG_MAPPING or trust_remote_code or (model_type is None and not auto_map):
        return
    if auto_map:
        files = sorted({f"{str(ref).split('--')[-1].rsplit('.', 1)[0]}.py" for ref in auto_map.values()})
        raise UserError(f"{folder}: this model's code ships inside the folder ({', '.join(files)}) and runs only "
                        "with trust_remote_code: true.",
                        hint="read that code first (it runs with your permissions), then set trust_remote_code: true.")
    import transformers

    raise UserError(f"{folder}: model_type {model_type!r} in config.json is not known to transformers "
                    f"{transformers.__version__}.",
                    hint="upgrade transformers, or check that config.json belongs to this model.")


def _remote_code_error(exc: Exception, folder: Path) -> UserError | None:
    """transformers' refusal to run shipped code, as a user error; None for any other failure."""
    if "trust_remote_code" in str(exc):
        return UserError(f"{folder}: loading needs the code shipped inside the model folder, which runs only with "
                         "trust_remote_code: true.",
                         hint="read that code first (it runs with your permissions), then set trust_remote_code: true.")
    return None


def load_tokenizer(model_args: ModelArgs) -> PreTrainedTokenizerBase:
    """The model's fast tokenizer with the training template set, a pad token, and right padding."""
    from transformers import AutoTokenizer

    folder = resolve_model_path(model_args.model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=True,
                                                  trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise _remote_code_error(exc, folder) or UserError(
            f"{folder}: the tokenizer could not be loaded: {exc}",
            hint="the folder needs tokenizer.json (or files transformers converts to it) and tokenizer_config.json.",
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{folder}: only a slow (Python) tokenizer is available; tunesmith needs a fast tokenizer "
                        "(tokenizer.json), whose character offsets give exact label masks.",
                        hint="install the `tokenizers` and `sentencepiece` packages so it can be converted, or "
                             "add a tokenizer.json to the folder.")
    apply_template(tokenizer, model_args.template, enable_thinking=model_args.enable_thinking)
    if tokenizer.pad_token is None:
        # Padded positions are masked out of attention and loss, so any existing token serves.
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise UserError(f"{folder}: the tokenizer has no pad, eos or unk token to pad batches with.",
                            hint="set pad_token in the folder's tokenizer_config.json.")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    return tokenizer


def _check_weight_files(folder: Path, allow_pickle: bool = False) -> bool:
    """Weights are read from safetensors: a pickle file can run arbitrary code when loaded. Pickled
    weights only with the explicit opt-in, and then through torch.load(weights_only=True), which
    refuses anything but tensors and plain containers. Returns True when the pickles are to be read."""
    if any(next(folder.glob(pattern), None) for pattern in SAFE_WEIGHTS):
        return False
    pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
    if pickled and allow_pickle:
        return True
    if pickled:
        raise UserError(
            f"{folder}: the weights are only in pickle files ({', '.join(pickled[:3])}"
            f"{', ...' if len(pickled) > 3 else ''}). Unpickling can run arbitrary code hidden in the file, so "
            "tunesmith reads safetensors only.",
            hint="if you trust the files, set allow_pickle_weights: true (read with "
                 "torch.load(weights_only=True)), or convert them once: python -c \"from transformers import "
                 "AutoModelForCausalLM as M; M.from_pretrained('IN', use_safetensors=False)"
                 ".save_pretrained('OUT')\", then use OUT.")
    present = sorted(p.name for p in folder.iterdir())[:8]
    raise UserError(f"{folder}: no model weights (*.safetensors) found; the folder holds: {', '.join(present)}.")


def _attention_choice(requested: str, device: torch.device) -> str | None:
    """'auto' leaves the choice to transformers (sdpa, eager where a model lacks it)."""
    import torch

    if requested == "auto":
        return None
    if requested == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise UserError("attn_implementation: flash_attention_2 needs the flash-attn package, which is not "
                            "installed.", hint="`pip install flash-attn --no-build-isolation` on a CUDA machine, "
                                               "or use attn_implementation: sdpa.")
        # DeepSpeed and FSDP runs load on the CPU and train on the GPU: what counts is that there is one.
        if device.type != "cuda" and not torch.cuda.is_available():
            raise UserError(f"attn_implementation: flash_attention_2 runs on CUDA GPUs only, not on '{device}'.",
                            hint="use attn_implementation: sdpa.")
    return requested


def quantization_config(model_args: ModelArgs, compute_dtype: torch.dtype, device: torch.device) -> Any:
    """bitsandbytes settings for `quantization_bit` (None when unset): the linear layers' weights
    stored in 4 or 8 bits, computed in `compute_dtype`."""
    if not model_args.quantization_bit:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"quantization_bit: {model_args.quantization_bit}-bit (QLoRA) training needs the "
                        "bitsandbytes package, which is not installed.",
                        hint="install it with: pip install 'tunesmith[qlora]', or remove quantization_bit.")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"quantization_bit: bitsandbytes quantizes on CUDA GPUs and the CPU, not on '{device}'.",
                        hint="remove quantization_bit to train LoRA on the unquantized base.")
    from transformers import BitsAndBytesConfig

    four = model_args.quantization_bit == 4
    return BitsAndBytesConfig(load_in_4bit=four, load_in_8bit=not four, bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_quant_type=model_args.quantization_type,
                              bnb_4bit_use_double_quant=model_args.double_quantization)


def load_model(model_args: ModelArgs, *, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> PreTrainedModel:
    """The base causal LM from its local folder, in `dtype` (float32 by default) on `device`;
    its linear layers quantized by bitsandbytes when `quantization_bit` is set."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = resolve_model_path(model_args.model_name_or_path)
    config = read_config_json(folder)
    _check_remote_code(folder, config, model_args.trust_remote_code)
    pickled = _check_weight_files(folder, model_args.allow_pickle_weights)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{device}' was asked for, but torch sees no CUDA GPU here.")
    attn = _attention_choice(model_args.attn_implementation, device)
    quantization = quantization_config(model_args, dtype or torch.float32, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype or torch.float32, use_safetensors=not pickled, weights_only=True,
            trust_remote_code=model_args.trust_remote_code, attn_implementation=attn,
            device_map={"": device} if device.type != "cpu" or quantization else None,
            quantization_config=quantization,
        )
    except pickle.UnpicklingError as exc:
        found = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), "")
        raise UserError(f"{folder}: the pickled weights hold more than tensors, so they were not loaded (they "
                        f"could run code){': ' + found if found else '.'}",
                        hint="use weights from a source you trust, preferably as safetensors.") from None
    except (ValueError, ImportError, OSError) as exc:
        remote = _remote_code_error(exc, folder)
        if remote:
            raise remote from None
        if attn and attn in str(exc):
            raise UserError(f"{folder}: attn_implementation {attn!r} cannot be used with this model here: {exc}",
                            hint="use attn_implementation: auto.") from None
        raise UserError(f"{folder}: the model could not be loaded: {exc}") from None
    return model


def _refuse_unconverted_pissa(folder: Path) -> None:
    """A PiSSA adapter as it trains (a checkpoint's) applies to a base whose weights PiSSA changed,
    not to the model folder: on the original base it would give wrong outputs without an error."""
    try:
        init = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("init_lora_weights")
    except (OSError, ValueError, AttributeError):
        return  # peft reports an unreadable config itself
    if isinstance(init, str) and init.startswith("pissa"):
        raise UserError(f"adapter_name_or_path: '{folder}' is a PiSSA adapter as it was during training (a "
                        "checkpoint's); it applies to the PiSSA-modified base, not to the model folder.",
                        hint="use the run's final output_dir, whose adapter is converted for the original base, "
                             "or resume the run with resume_from_checkpoint.")


@contextlib.contextmanager
def bitsandbytes_hidden() -> Iterator[None]:
    """Import peft and put LoRA layers on a model without importing bitsandbytes, while nothing
    has imported it.

    peft imports bitsandbytes when it is imported (peft/helpers.py) and whenever it builds LoRA
    layers (to ask whether each target is a bitsandbytes layer), and that import costs about a
    second of every start (bitsandbytes loads torch's compiler). While bitsandbytes is not
    imported no model holds its layers (transformers imports it to build a quantized base), so
    the answer is known: hidden, it makes peft build its plain layers. QLoRA and the 8-bit
    optimizers import it before or after, never inside. A quantized load in another thread during
    this would fail; the one command that loads models in threads (the web UI) never quantizes.
    What stays after: peft's helpers module keeps no bitsandbytes handle (its dequantizing helpers
    for bitsandbytes layers, which tunesmith does not call); the cached availability checks are
    cleared, so a later QLoRA in the process gets peft's bitsandbytes layers (tested).
    """
    if "bitsandbytes" in sys.modules:
        yield
        return
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # now `import bitsandbytes` raises ImportError
    try:
        yield
    finally:
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]
        _forget_cached_availability()


# Checks that cache whether bitsandbytes is installed. Answered while it was hidden, they would
# hold "no" for the rest of the process: a later QLoRA would get peft's plain LoRA layers on its
# quantized ones (peft asks them for every layer it wraps).
_AVAILABILITY_CHECKS = {"peft.import_utils": ("is_bnb_available", "is_bnb_4bit_available"),
                        "transformers.utils.import_utils": ("is_bitsandbytes_available",)}


def _forget_cached_availability() -> None:
    for module_name, names in _AVAILABILITY_CHECKS.items():
        module = sys.modules.get(module_name)
        for name in names:
            check = getattr(module, name, None)
            if hasattr(check, "cache_clear"):
                check.cache_clear()


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft reads the `is_gradient_checkpointing` property that transformers 5.x deprecates."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def load_adapters(model: PreTrainedModel, adapter_folders: list[str] | None, *,
                  is_trainable: bool = False) -> nn.Module:
    """Put the LoRA adapters of a list of folders on the base model, all active at once
    (the same as merging them one after another).

    With is_trainable the earlier adapters are merged into the base and the last one is loaded
    to continue training it.
    """
    folders = list(adapter_folders or [])
    if not folders:
        return model
    with bitsandbytes_hidden():
        from peft import PeftModel

    for folder in folders:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise UserError(f"adapter_name_or_path: '{folder}' is not a folder.",
                            hint="give the output_dir of a LoRA run (it holds adapter_config.json).")
        if not (path / "adapter_config.json").is_file():
            raise UserError(f"adapter_name_or_path: '{folder}' has no adapter_config.json, so it is not a "
                            "LoRA adapter folder.",
                            hint="a full or freeze run saves a whole model: use it as model_name_or_path.")
        _refuse_unconverted_pissa(path)

    def load(base: nn.Module, folder: str, name: str, trainable: bool) -> nn.Module:
        try:
            with bitsandbytes_hidden():
                if isinstance(base, PeftModel):
                    base.load_adapter(folder, adapter_name=name, is_trainable=trainable)
                    return base
                with quiet_peft():
                    return PeftModel.from_pretrained(base, folder, adapter_name=name, is_trainable=trainable)
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            raise UserError(f"adapter_name_or_path: '{folder}' does not fit this base model: {exc}",
                            hint="load it on the model it was trained from.") from None

    if is_trainable:
        for folder in folders[:-1]:
            model = load(model, folder, "default", False).merge_and_unload()
        return load(model, folders[-1], "default", True)
    names = ["default"] + [f"adapter_{i}" for i in range(1, len(folders))]
    for folder, name in zip(folders, names, strict=True):
        model = load(model, folder, name, False)
    if len(names) > 1:
        model.base_model.set_adapter(names, inference_mode=True)
    model.eval()
    return model

