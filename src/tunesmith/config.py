"""One typed run configuration, read from YAML plus `key=value` overrides.

The dataclasses below are the single schema: validation, `--help`, the web UI's form and
the resolved `config.yaml` of every run are all derived from them. Key names are
LLaMA-Factory's, so an existing YAML keeps its meaning.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from tunesmith.errors import UserError, did_you_mean

DEFAULT_MODEL = "smollm2-135m-instruct"


def opt(default: Any, help: str, choices: tuple[Any, ...] | None = None) -> Any:
    """A config field: its default, one line of help, and the allowed values if closed (for a
    list-valued key: the values each item may take)."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def default_of(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh copy for list-valued keys)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


@dataclass
class ModelArgs:
    model_name_or_path: str = opt(DEFAULT_MODEL, "Base model: a local Hugging Face folder, or the alias "
                                  f"'{DEFAULT_MODEL}' (the embedded default model).")
    adapter_name_or_path: list[str] | None = opt(None, "LoRA adapter folder(s) to load on the base: a list, or "
                                                 "comma separated.")
    trust_remote_code: bool = opt(False, "Allow model code shipped inside the model folder to run.")
    allow_pickle_weights: bool = opt(False, "Read weights from pickle files (*.bin) when a folder has no "
                                     "safetensors (loaded with torch.load(weights_only=True)).")
    template: str | None = opt(None, "Chat template: unset/'auto' uses the tokenizer's own; or a named one "
                               "(see `tunesmith data templates`).")
    infer_backend: str = opt("huggingface", "Inference engine.", ("huggingface", "vllm", "sglang"))
    attn_implementation: str = opt("auto", "Attention kernel.", ("auto", "eager", "sdpa", "flash_attention_2"))


@dataclass
class DataArgs:
    dataset: list[str] | None = opt(None, "Training dataset name(s) from dataset_info.json: a list, or comma "
                                    "separated.")
    eval_dataset: list[str] | None = opt(None, "Evaluation dataset name(s): a list, or comma separated.")
    dataset_dir: str = opt("data", "Folder holding dataset_info.json and the data files.")
    cutoff_len: int = opt(2048, "Maximum tokens per sample after the chat template.")
    max_samples: int | None = opt(None, "Use at most this many rows of each dataset.")
    val_size: float = opt(0.0, "Held-out share (0-1) or row count (>=1) of the training data for eval.")
    train_on_prompt: bool = opt(False, "Also learn the prompt tokens (not only the assistant answers).")
    mask_history: bool = opt(False, "Learn only the last assistant turn of each conversation.")
    preprocessing_num_workers: int | None = opt(None, "Processes for tokenization (default: CPU cores).")
    dataloader_num_workers: int = opt(0, "Worker processes feeding batches to the training loop.")
    packing: bool = opt(False, "Training is padding-free on sdpa/flash attention whatever this says; with other "
                        "kernels, pack each micro-batch into rows with a block-diagonal mask.")
    neat_packing: bool = opt(False, "Same as packing: packed samples never attend to each other.")
    packing_contamination: bool = opt(False, "Contaminating packing (implies packing): each micro-batch's samples "
                                      "are laid end to end in rows of at most cutoff_len tokens (best-fit), with "
                                      "position_ids running on across the row and a plain causal mask, so a sample "
                                      "attends to the samples before it in its row. What some other tools do for "
                                      "`packing: true`; faster on kernels without varlen support, but not the same "
                                      "math as training the samples apart (losses differ).")
    tokenized_path: str | None = opt(None, "Save the tokenized data here, or load it from here if present.")
    overwrite_cache: bool = opt(False, "Re-tokenize even when a cached result exists.")
    skip_invalid: bool = opt(False, "Skip invalid rows (reported) instead of stopping.")
    shuffle: bool = opt(True, "Shuffle the training samples each epoch (with `seed`).")
    streaming: bool = opt(False, "Read and tokenize the data while training, with no token store (needs "
                          "max_steps); the order is shuffled through a buffer of buffer_size rows.")
    buffer_size: int = opt(16384, "Rows in the shuffle buffer of a streaming run.")
    preflight: str = opt("strict", "Data checks before step 1 (saved as preflight.txt): strict stops on a fatal "
                         "finding, warn only reports it.", ("strict", "warn"))


@dataclass
class FinetuneArgs:
    stage: str = opt("sft", "Training stage. Only supervised fine-tuning is built.", ("sft",))
    do_train: bool = opt(True, "Run training.")
    finetuning_type: str = opt("lora", "What is trained.", ("lora", "freeze", "full"))
    lora_target: list[str] = opt(["all"], "'all' = every linear layer but the output head, or module names (a "
                                 "list, or comma separated).")
    lora_rank: int = opt(8, "LoRA rank r.")
    lora_alpha: int | None = opt(None, "LoRA alpha (default 2 x rank).")
    lora_dropout: float = opt(0.0, "Dropout on the LoRA input.")
    additional_target: list[str] | None = opt(None, "Extra modules trained fully beside LoRA (a list, or comma "
                                              "separated).")
    freeze_trainable_layers: int = opt(2, "Freeze tuning: train the last N layers (first N when negative).")


@dataclass
class TrainArgs:
    output_dir: str = opt("saves/run", "Run folder: checkpoints, logs, the trained adapter or model.")
    overwrite_output_dir: bool = opt(False, "Start afresh in an output_dir that already holds a run.")
    resume_from_checkpoint: str | None = opt(None, "A checkpoint folder, or 'true' for the newest in output_dir.")
    resume_allow_changes: bool = opt(False, "Resume even though keys that change the math (learning rate, "
                                     "schedule, seed, batches, data, LoRA settings, ...) differ from the "
                                     "checkpoint's; the differences are logged.")
    per_device_train_batch_size: int = opt(1, "Samples per micro-batch on each device.")
    per_device_eval_batch_size: int = opt(1, "Samples per eval batch on each device.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.")
    num_train_epochs: float = opt(3.0, "Passes over the training data (fractions allowed).")
    max_steps: int = opt(-1, "Optimizer steps to run; overrides num_train_epochs when > 0.")
    learning_rate: float = opt(5e-5, "Peak learning rate of AdamW.")
    lr_scheduler_type: str = opt("cosine", "Learning-rate schedule.",
                                 ("linear", "cosine", "constant", "constant_with_warmup"))
    warmup_ratio: float = opt(0.0, "Share of the steps spent warming up.")
    warmup_steps: int = opt(0, "Warm-up steps (overrides warmup_ratio when > 0).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.")
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this (0 = no clipping).")
    bf16: bool = opt(False, "Compute in bfloat16 (trainable weights and optimizer state stay fp32).")
    fp16: bool = opt(False, "Compute in float16 with loss scaling (GPU only).")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    seed: int = opt(42, "Seed for sampling order, initialisation and dropout.")
    logging_steps: int = opt(10, "Log every N optimizer steps.")
    save_steps: int = opt(500, "Write a checkpoint every N optimizer steps (0 = only at the end).")
    save_total_limit: int | None = opt(None, "Keep at most N checkpoints (oldest removed).")
    save_only_model: bool = opt(False, "Checkpoints hold weights only (no optimizer state: not resumable).")
    eval_strategy: str = opt("no", "When to evaluate during training.", ("no", "steps", "epoch"))
    eval_steps: int | None = opt(None, "Evaluate every N steps (default: logging_steps).")
    report_to: list[str] = opt(["none"], "Loggers: none, tensorboard, all (a list, or comma separated).",
                               ("none", "tensorboard", "all"))
    plot_loss: bool = opt(False, "Write training_loss.png with the train and eval curves.")
    ddp_timeout: int = opt(1800, "Seconds before a distributed collective times out.")
    deepspeed: str | None = opt(None, "DeepSpeed ZeRO config JSON, e.g. examples/deepspeed/ds_z3_config.json "
                                "(\"auto\" values follow this config; needs pip install 'tunesmith[deepspeed]').")
    fsdp_config: str | None = opt(None, "FSDP settings: an accelerate config YAML with an fsdp_config section, "
                                  "e.g. examples/accelerate/fsdp2_config.yaml (multi-GPU).")
    nan_policy: str = opt("stop", "On a non-finite loss or gradient: stop, or skip the step.", ("stop", "skip"))
    max_skipped_steps: int = opt(10, "With nan_policy skip: stop after this many skipped steps in a row.")


@dataclass
class ExportArgs:
    export_dir: str | None = opt(None, "Folder for the merged stand-alone model.")
    export_size: float = opt(5.0, "Largest shard size in GB (fractions allowed).")
    export_device: str = opt("cpu", "Device used to merge.", ("cpu", "auto"))
    export_legacy_format: bool = opt(False, "Write .bin shards instead of safetensors.")
    export_dtype: str = opt("auto", "Dtype of the exported weights.", ("auto", "float32", "bfloat16", "float16"))


@dataclass
class GenerateArgs:
    do_sample: bool = opt(True, "Sample (else greedy decoding).")
    temperature: float = opt(0.95, "Sampling temperature.")
    top_p: float = opt(0.7, "Nucleus sampling share.")
    top_k: int = opt(50, "Sample among the k most likely tokens.")
    max_new_tokens: int = opt(512, "Most tokens generated per reply.")
    repetition_penalty: float = opt(1.0, "Penalty on tokens already generated (1 = none).")
    default_system: str | None = opt(None, "System prompt used when the conversation has none.")


# Keys whose change alters what a resumed run computes: a resume compares them with the checkpoint's.
MATH_KEYS: tuple[str, ...] = (
    "model_name_or_path", "adapter_name_or_path", "template", "dataset", "eval_dataset", "cutoff_len",
    "max_samples", "val_size", "train_on_prompt", "mask_history", "packing", "neat_packing", "packing_contamination",
    "shuffle", "finetuning_type", "lora_target", "lora_rank", "lora_alpha", "lora_dropout", "additional_target",
    "freeze_trainable_layers", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
    "max_steps", "learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "weight_decay", "adam_beta1",
    "adam_beta2", "adam_epsilon", "max_grad_norm", "bf16", "fp16", "seed", "nan_policy", "streaming", "buffer_size",
)

GROUPS: dict[str, type] = {
    "model": ModelArgs,
    "data": DataArgs,
    "finetune": FinetuneArgs,
    "train": TrainArgs,
    "export": ExportArgs,
    "generate": GenerateArgs,
}

# LLaMA-Factory keys with no effect here (logging/placement tweaks): accepted and ignored, said once.
IGNORED_KEYS: dict[str, str] = {
    "flash_attn": "use attn_implementation",
    "include_num_input_tokens_seen": "tokens are always counted",
    "optim": "AdamW is always used",
    "dataloader_pin_memory": "set by the engine",
    "disable_tqdm": "the progress bar shows on terminals only",
    "run_name": "the run is named by output_dir",
    "logging_dir": "TensorBoard logs go to output_dir/runs",
    "save_strategy": "checkpoints follow save_steps",
    "use_fast_tokenizer": "fast tokenizers are required",
    "enable_thinking": "the template decides",
}

# LLaMA-Factory features not built: refuse rather than silently train something else.
UNSUPPORTED_KEYS: dict[str, str] = {
    "quantization_bit": "quantized (QLoRA) training",
    "quantization_method": "quantized (QLoRA) training",
    "use_unsloth": "unsloth kernels",
    "use_dora": "DoRA",
    "pissa_init": "PiSSA initialisation",
    "use_galore": "GaLore",
    "use_badam": "BAdam",
    "use_apollo": "APOLLO",
    "rope_scaling": "RoPE scaling",
    "booster": "booster kernels",
    "image_max_pixels": "multimodal data",
    "video_max_pixels": "multimodal data",
    "freeze_vision_tower": "multimodal models",
    "pref_beta": "preference training (DPO/KTO)",
    "pref_loss": "preference training (DPO/KTO)",
    "reward_model": "PPO",
    "use_llama_pro": "LLaMA Pro",
    "mix_strategy": "dataset interleaving",
    "export_quantization_bit": "quantized export",
    "export_hub_model_id": "pushing to a hub",
    "use_swanlab": "SwanLab logging",
}


@dataclass
class RunConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    finetune: FinetuneArgs = field(default_factory=FinetuneArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    export: ExportArgs = field(default_factory=ExportArgs)
    generate: GenerateArgs = field(default_factory=GenerateArgs)
    source: str | None = None  # the YAML file it came from, for messages
    given: frozenset[str] = frozenset()  # the keys the file or command line set (the rest are defaults)

    def to_flat(self) -> dict[str, Any]:
        """Every key with its value, in schema order: what `config.yaml` of a run holds."""
        flat: dict[str, Any] = {}
        for group in GROUPS:
            flat.update(dataclasses.asdict(getattr(self, group)))
        return flat

    def math_settings(self) -> dict[str, Any]:
        """The values of MATH_KEYS: what a checkpoint records and a resume compares."""
        flat = self.to_flat()
        return {key: flat[key] for key in MATH_KEYS}

    def dump_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_flat(), sort_keys=False, allow_unicode=True), encoding="utf-8")


def schema() -> dict[str, tuple[str, dataclasses.Field]]:
    """key -> (group name, field): the flat view users write."""
    out: dict[str, tuple[str, dataclasses.Field]] = {}
    for group, cls in GROUPS.items():
        for f in fields(cls):
            out[f.name] = (group, f)
    return out


_SCHEMA = schema()


@dataclass(frozen=True)
class KeySpec:
    """One config key as `--keys`, the web form and validation see it."""

    name: str
    group: str
    base: Any  # bool, int, float, str or list[str]
    optional: bool  # None (empty) is allowed
    default: Any
    help: str
    choices: tuple[Any, ...] | None

    @property
    def is_list(self) -> bool:
        return typing.get_origin(self.base) is list


def _key_spec(name: str, group: str, f: dataclasses.Field, annotation: Any) -> KeySpec:
    base, optional = annotation, False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        base, optional = args[0], len(args) < len(typing.get_args(annotation))
    return KeySpec(name, group, base, optional, default_of(f), f.metadata["help"], f.metadata.get("choices"))


# The one key table (annotations resolved: the module uses `from __future__ import annotations`).
KEYS: dict[str, KeySpec] = {
    name: _key_spec(name, group, f, typing.get_type_hints(GROUPS[group])[name])
    for name, (group, f) in _SCHEMA.items()
}


def _coerce(key: str, value: Any, where: str) -> Any:
    """Turn a YAML or command-line value into the field's type, or say what is wrong."""
    spec = KEYS[key]
    base, optional = spec.base, spec.optional
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("null", "none", "")):
        if optional:
            return None
        raise UserError(f"{where}: '{key}' cannot be empty; expected {base.__name__}.")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "yes", "1", "on"):
                return True
            if text in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not number.is_integer():
                raise ValueError
            return int(number)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if isinstance(value, list | tuple | dict):
                raise ValueError
            return str(value)
        if typing.get_origin(base) is list:
            return _as_list(value)
    except (TypeError, ValueError):
        pass
    raise UserError(f"{where}: '{key}' must be {_type_name(base)}, got {value!r}.")


def _type_name(base: Any) -> str:
    if base is int:
        return "an integer"
    if typing.get_origin(base) is list:
        return "a list of names (or one comma-separated string)"
    return "a " + base.__name__


def _as_list(value: Any) -> list[str]:
    """`[a, b]` from YAML, or `a,b` from YAML or the command line: a list of non-empty names."""
    if isinstance(value, dict):
        raise ValueError
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    if any(isinstance(item, list | tuple | dict) for item in items):
        raise ValueError
    return [str(item).strip() for item in items if str(item).strip()]


def _check_choice(key: str, value: Any, where: str) -> None:
    choices = KEYS[key].choices
    for item in value if isinstance(value, list) else [value]:
        if choices and item is not None and item not in choices:
            raise UserError(f"{where}: '{key}' is {item!r}; allowed: {', '.join(map(str, choices))}"
                            f"{did_you_mean(str(item), [str(c) for c in choices])}.")


def _line_numbers(text: str) -> dict[str, int]:
    """Top-level key -> line number in the YAML text, so errors can point at the line."""
    lines: dict[str, int] = {}
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            lines[str(key_node.value)] = key_node.start_mark.line + 1
    return lines


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings from the command line; values are read as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise UserError(f"command line: '{item}' is not key=value (example: learning_rate=1e-5).")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key] = raw
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML file (optional) and apply overrides; validate everything before any work."""
    raw: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = None
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise UserError(f"config file not found: {p}", hint="pass the path of a YAML file, e.g. examples/demo_identity_lora.yaml")
        text = p.read_text(encoding="utf-8")
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise UserError(f"{p}:{at}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{p}: the top level must be a mapping of key: value lines.")
        raw.update(loaded)
        lines = _line_numbers(text)
    cli = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})

    cfg = RunConfig(source=source)
    for origin, mapping in (("file", raw), ("cli", cli)):
        for key, value in mapping.items():
            key = str(key)
            where = (f"{source}, line {lines[key]}" if key in lines else str(source)) if origin == "file" else "command line"
            if key in UNSUPPORTED_KEYS:
                if value in (None, False, 0, "none", "None"):
                    continue
                raise UserError(f"{where}: '{key}' ({UNSUPPORTED_KEYS[key]}) is not supported yet.",
                                hint=f"remove '{key}' to train without it.")
            if key in IGNORED_KEYS:
                continue
            if key not in _SCHEMA:
                raise UserError(f"{where}: unknown key '{key}'{did_you_mean(key, list(_SCHEMA))}.",
                                hint="`tunesmith train --help` lists every key.")
            group, _ = _SCHEMA[key]
            value = _coerce(key, value, where)
            if key == "stage" and value in ("pt", "rm", "ppo", "dpo", "kto"):
                raise UserError(f"{where}: 'stage: {value}' is not supported yet; only 'sft' is built.")
            _check_choice(key, value, where)
            setattr(getattr(cfg, group), key, value)
            cfg.given = cfg.given | {key}
    _validate(cfg)
    return cfg


def _validate(cfg: RunConfig) -> None:
    """Cross-field rules and ranges, each naming its key."""
    where = cfg.source or "config"
    d, t, f = cfg.data, cfg.train, cfg.finetune
    positive = {
        "cutoff_len": d.cutoff_len,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "per_device_eval_batch_size": t.per_device_eval_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "lora_rank": f.lora_rank,
        "logging_steps": t.logging_steps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"{where}: '{key}' must be at least 1, got {value}.")
    if d.val_size < 0:
        raise UserError(f"{where}: 'val_size' must be a share in [0, 1) or a row count >= 1, got {d.val_size}.")
    if t.learning_rate <= 0:
        raise UserError(f"{where}: 'learning_rate' must be positive, got {t.learning_rate}.")
    if not 0 <= t.warmup_ratio < 1:
        raise UserError(f"{where}: 'warmup_ratio' must be in [0, 1), got {t.warmup_ratio}.")
    if not 0 <= f.lora_dropout < 1:
        raise UserError(f"{where}: 'lora_dropout' must be in [0, 1), got {f.lora_dropout}.")
    if d.streaming and t.max_steps <= 0:
        raise UserError(f"{where}: 'streaming: true' needs 'max_steps' (a stream has no known length).")
    if d.streaming and d.val_size > 0:
        raise UserError(f"{where}: 'val_size' splits stored samples, and 'streaming: true' stores none.",
                        hint="give the eval rows as 'eval_dataset', or turn streaming off.")
    if d.buffer_size <= 0:
        raise UserError(f"{where}: 'buffer_size' must be at least 1, got {d.buffer_size}.")
    if d.packing_contamination and d.neat_packing:
        raise UserError(f"{where}: 'neat_packing: true' keeps packed samples apart and 'packing_contamination: "
                        "true' lets them attend to each other; choose one.")
    if t.bf16 and t.fp16:
        raise UserError(f"{where}: 'bf16' and 'fp16' are both true; choose one.")
    if cfg.export.export_size <= 0:
        raise UserError(f"{where}: 'export_size' must be positive (GB), got {cfg.export.export_size}.")
    if t.eval_steps is None:
        t.eval_steps = t.logging_steps
    if f.lora_alpha is None:
        f.lora_alpha = 2 * f.lora_rank
    if cfg.model.template in ("", "auto"):
        cfg.model.template = None
    if not f.lora_target:
        raise UserError(f"{where}: 'lora_target' is empty; use 'all' or module names such as [q_proj, v_proj].")


def help_table() -> str:
    """Every key, grouped, with default and help: printed by `tunesmith train --keys`."""
    rows = []
    for group in GROUPS:
        rows.append(f"\n{group}:")
        for spec in (k for k in KEYS.values() if k.group == group):
            allowed = f" [{'|'.join(map(str, spec.choices))}]" if spec.choices else ""
            rows.append(f"  {spec.name} (default {spec.default!r}){allowed}\n      {spec.help}")
    return "\n".join(rows)
