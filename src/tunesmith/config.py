"""One typed run configuration, read from YAML plus `key=value` overrides.

The dataclasses below are the single schema: validation, `--help`, the web UI's form and
the resolved `config.yaml` of every run are all derived from them. Key names are
LLaMA-Factory's, so an existing YAML keeps its meaning.
"""

from __future__ import annotations

import dataclasses
import math
import sys
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
    enable_thinking: bool = opt(True, "For templates with reasoning (qwen3, or a tokenizer's own that reads "
                                "enable_thinking): false puts an empty think block in every prompt and trains "
                                "answers without reasoning, in training, chat, the API and the saved tokenizer.")
    infer_backend: str = opt("huggingface", "Inference engine.", ("huggingface", "vllm", "sglang"))
    attn_implementation: str = opt("auto", "Attention kernel (LLaMA-Factory's flash_attn: auto, disabled = eager, "
                                   "sdpa, fa2 = flash_attention_2, is read into this key).",
                                   ("auto", "eager", "sdpa", "flash_attention_2"))
    quantization_bit: int | None = opt(None, "QLoRA: train LoRA on a base quantized to 4 or 8 bits by bitsandbytes "
                                       "(finetuning_type: lora only; export merges into the unquantized base).",
                                       (4, 8))
    quantization_method: str = opt("bnb", "Quantization library for quantization_bit.", ("bnb",))
    quantization_type: str = opt("nf4", "4-bit data type.", ("nf4", "fp4"))
    double_quantization: bool = opt(True, "4-bit: quantize the quantization constants too (saves ~0.4 bit/weight).")


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
    do_predict: bool = opt(False, "After training (or instead, with do_train: false): answer every sample of "
                           "eval_dataset and score the answers (BLEU-4, ROUGE); same as `tunesmith eval`.")
    finetuning_type: str = opt("lora", "What is trained.", ("lora", "freeze", "full"))
    lora_target: list[str] = opt(["all"], "'all' = every linear layer but the output head, or module names (a "
                                 "list, or comma separated).")
    lora_rank: int = opt(8, "LoRA rank r.")
    lora_alpha: int | None = opt(None, "LoRA alpha (default 2 x rank).")
    lora_dropout: float = opt(0.0, "Dropout on the LoRA input.")
    additional_target: list[str] | None = opt(None, "Extra modules trained fully beside LoRA (a list, or comma "
                                              "separated).")
    use_dora: bool = opt(False, "DoRA: weight-decomposed LoRA (peft).")
    use_rslora: bool = opt(False, "rsLoRA: scale the adapter by alpha/sqrt(rank) instead of alpha/rank.")
    pissa_init: bool = opt(False, "PiSSA: start the adapter from the principal singular vectors of each weight; the "
                           "saved adapter is converted to a plain LoRA on the original base.")
    pissa_iter: int = opt(16, "PiSSA: iterations of the fast randomized SVD (-1 = exact SVD).")
    loraplus_lr_ratio: float | None = opt(None, "LoRA+: the B matrices learn at learning_rate x this ratio.")
    loraplus_lr_embedding: float = opt(1e-6, "LoRA+: learning rate of LoRA on embedding layers.")
    create_new_adapter: bool = opt(False, "With adapter_name_or_path: merge the loaded adapters into the base and "
                                   "train a fresh adapter (instead of continuing the last one).")
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
    optim: str = opt("adamw_torch", "Optimizer: torch AdamW (fused into one kernel per step where it can "
                     "be), SGD, Adafactor, or bitsandbytes' 8-bit AdamW (paged on GPUs).",
                     ("adamw_torch", "adamw_torch_fused", "sgd", "adafactor", "adamw_8bit", "adamw_bnb_8bit",
                      "paged_adamw_8bit"))
    learning_rate: float = opt(5e-5, "Peak learning rate.")
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
    neftune_noise_alpha: float | None = opt(None, "NEFTune: uniform noise of this scale on the input embeddings while "
                                            "training (never at eval or inference).")
    seed: int = opt(42, "Seed for sampling order, initialisation and dropout.")
    logging_steps: int = opt(10, "Log every N optimizer steps.")
    save_steps: int = opt(500, "Write a checkpoint every N optimizer steps (0 = only at the end).")
    save_total_limit: int | None = opt(None, "Keep at most N checkpoints (oldest removed).")
    save_only_model: bool = opt(False, "Checkpoints hold weights only (no optimizer state: not resumable).")
    eval_strategy: str = opt("no", "When to evaluate during training.", ("no", "steps", "epoch"))
    eval_steps: int | None = opt(None, "Evaluate every N steps (default: logging_steps).")
    report_to: list[str] = opt(["none"], "Loggers: none, tensorboard, mlflow, wandb, all (= tensorboard); a list "
                               "or comma separated. mlflow/wandb need pip install 'tunesmith[trackers]' and follow "
                               "MLFLOW_TRACKING_URI, WANDB_MODE, WANDB_PROJECT.",
                               ("none", "tensorboard", "mlflow", "wandb", "all"))
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
    export_gguf: str | None = opt(None, "Also write DIR/model-<type>.gguf (llama.cpp/Ollama, tokenizer and chat "
                                        "template inside), verified against the merged model.",
                                  ("f16", "bf16", "q8_0"))


@dataclass
class GenerateArgs:
    do_sample: bool = opt(True, "Sample (else greedy decoding).")
    temperature: float = opt(0.95, "Sampling temperature.")
    top_p: float = opt(0.7, "Nucleus sampling share.")
    top_k: int = opt(50, "Sample among the k most likely tokens.")
    max_new_tokens: int = opt(512, "Most tokens generated per reply.")
    repetition_penalty: float = opt(1.0, "Penalty on tokens already generated (1 = none).")
    default_system: str | None = opt(None, "System prompt used when the conversation has none.")
    predict_with_generate: bool = opt(False, "With do_predict: score generated answers (the only way tunesmith "
                                      "predicts; decoding is greedy).")


# Keys whose change alters what a resumed run computes: a resume compares them with the checkpoint's.
MATH_KEYS: tuple[str, ...] = (
    "model_name_or_path", "adapter_name_or_path", "template", "dataset", "eval_dataset", "cutoff_len",
    "max_samples", "val_size", "train_on_prompt", "mask_history", "packing", "neat_packing", "packing_contamination",
    "shuffle", "finetuning_type", "lora_target", "lora_rank", "lora_alpha", "lora_dropout", "additional_target",
    "freeze_trainable_layers", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
    "max_steps", "learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "weight_decay", "adam_beta1",
    "adam_beta2", "adam_epsilon", "max_grad_norm", "bf16", "fp16", "seed", "nan_policy", "optim", "quantization_bit",
    "quantization_method", "quantization_type", "double_quantization", "use_dora", "use_rslora", "pissa_init",
    "pissa_iter", "loraplus_lr_ratio", "loraplus_lr_embedding", "create_new_adapter", "neftune_noise_alpha",
    "enable_thinking", "streaming", "buffer_size",
)

GROUPS: dict[str, type] = {
    "model": ModelArgs,
    "data": DataArgs,
    "finetune": FinetuneArgs,
    "train": TrainArgs,
    "export": ExportArgs,
    "generate": GenerateArgs,
}

# LLaMA-Factory keys that have no effect here: accepted, and each one given is named in one warning
# line when the config is read, with the reason.
IGNORED_KEYS: dict[str, str] = {
    # where files come from: everything is local
    "cache_dir": "models and data are local folders; nothing is downloaded",
    "model_revision": "models are local folders; there is no revision to fetch",
    "hf_hub_token": "nothing is fetched from a hub",
    "ms_hub_token": "nothing is fetched from a hub",
    "om_hub_token": "nothing is fetched from a hub",
    "use_fast_tokenizer": "a fast tokenizer is always used (its offsets give exact label masks)",
    "low_cpu_mem_usage": "transformers always loads weights without a second copy",
    "offload_folder": "weights are never offloaded to disk",
    "quantization_device_map": "quantized weights are used for training only; chat and export load the unquantized "
                               "base",
    # numerics and kernels the engine decides
    "use_reentrant_gc": "gradient checkpointing is always non-reentrant",
    "gradient_checkpointing_kwargs": "gradient checkpointing is always non-reentrant",
    "disable_gradient_checkpointing": "gradient checkpointing is off unless gradient_checkpointing: true",
    "upcast_layernorm": "trainable weights are always kept in fp32 (see bf16)",
    "upcast_lmhead_output": "the loss is always computed from fp32 logits",
    "enable_liger_kernel": "the engine's own training kernels (same math, less memory) are always used",
    "use_v1_kernels": "the engine's own training kernels (same math, less memory) are always used",
    "use_kv_cache": "generation always uses the KV cache and training never does",
    "infer_dtype": "chat and the API run in the model's own dtype",
    "print_param_status": "the trainable parameter count is always printed",
    "include_num_input_tokens_seen": "tokens are always counted",
    "include_effective_tokens_per_second": "tokens/s is always logged",
    "dataloader_pin_memory": "set by the engine",
    "disable_tqdm": "the progress bar shows on terminals only",
    "run_name": "the run is named by output_dir",
    "logging_dir": "TensorBoard logs go to output_dir/runs",
    "save_strategy": "checkpoints follow save_steps",
    "preprocessing_batch_size": "tokenization batches are sized by the engine",
    "data_shared_file_system": "the main process tokenizes first and the others read its cache",
    "eval_on_each_dataset": "eval datasets are evaluated together, as one loss",
    "compute_accuracy": "evaluation reports the loss only",
    # sub-options of features that are refused or not used by supervised fine-tuning
    "interleave_probs": "dataset interleaving (mix_strategy) is not built",
    "init_special_tokens": "adding tokens (add_special_tokens) is not built",
    "export_quantization_dataset": "quantized export (export_quantization_bit) is not built",
    "export_quantization_nsamples": "quantized export (export_quantization_bit) is not built",
    "export_quantization_maxlen": "quantized export (export_quantization_bit) is not built",
    "pissa_convert": "PiSSA adapters are always saved converted to a plain LoRA on the original base",
    "max_length": "replies are bounded by max_new_tokens",
    "length_penalty": "beam search (num_beams) is not built",
    "eval_num_beams": "beam search is not built",
    "skip_special_tokens": "replies are always decoded without special tokens",
    "media_dir": "multimodal data is not supported; text datasets have no media",
    "image_max_pixels": "multimodal data is not supported; text datasets have no images",
    "image_min_pixels": "multimodal data is not supported; text datasets have no images",
    "image_do_pan_and_scan": "multimodal data is not supported; text datasets have no images",
    "crop_to_patches": "multimodal data is not supported; text datasets have no images",
    "video_max_pixels": "multimodal data is not supported; text datasets have no videos",
    "video_min_pixels": "multimodal data is not supported; text datasets have no videos",
    "video_fps": "multimodal data is not supported; text datasets have no videos",
    "video_maxlen": "multimodal data is not supported; text datasets have no videos",
    "use_audio_in_video": "multimodal data is not supported; text datasets have no audio",
    "audio_sampling_rate": "multimodal data is not supported; text datasets have no audio",
    "freeze_vision_tower": "multimodal models are not supported; a text model has no vision tower",
    "freeze_multi_modal_projector": "multimodal models are not supported; a text model has no projector",
    "freeze_language_model": "multimodal models are not supported",
    "vllm_maxlen": "the vllm engine is not built (infer_backend: huggingface)",
    "vllm_gpu_util": "the vllm engine is not built (infer_backend: huggingface)",
    "vllm_enforce_eager": "the vllm engine is not built (infer_backend: huggingface)",
    "vllm_max_lora_rank": "the vllm engine is not built (infer_backend: huggingface)",
    "vllm_config": "the vllm engine is not built (infer_backend: huggingface)",
    "sglang_maxlen": "the sglang engine is not built (infer_backend: huggingface)",
    "sglang_mem_fraction": "the sglang engine is not built (infer_backend: huggingface)",
    "sglang_tp_size": "the sglang engine is not built (infer_backend: huggingface)",
    "sglang_config": "the sglang engine is not built (infer_backend: huggingface)",
    "sglang_lora_backend": "the sglang engine is not built (infer_backend: huggingface)",
    "kt_cpu_activation": "KTransformers (use_kt) is not built",
    "kt_weight_path": "KTransformers (use_kt) is not built",
    "kt_non_expert_weight_path": "KTransformers (use_kt) is not built",
    "kt_expert_checkpoint_path": "KTransformers (use_kt) is not built",
    "kt_use_lora_experts": "KTransformers (use_kt) is not built",
    "kt_lora_expert_num": "KTransformers (use_kt) is not built",
    "kt_lora_expert_intermediate_size": "KTransformers (use_kt) is not built",
    "oft_rank": "OFT (finetuning_type: oft) is not built",
    "oft_block_size": "OFT (finetuning_type: oft) is not built",
    "oft_target": "OFT (finetuning_type: oft) is not built",
    "module_dropout": "OFT (finetuning_type: oft) is not built",
    "asft_alpha": "the ASFT loss (use_asft_loss) is not built",
    "eaft_alpha": "the EAFT loss (use_eaft_loss) is not built",
    "megatron_bridge_args": "Megatron (use_megatron_bridge) is not built",
    "hyper_parallel_args": "hyper-parallel training (use_hyper_parallel) is not built",
    "hyper_parallel_cp_size": "hyper-parallel training (use_hyper_parallel) is not built",
    **{key: "preference and reward training (stage: dpo/kto/rm/ppo) only; supervised fine-tuning does not use it"
       for key in ("pref_beta", "pref_ftx", "pref_bco_weight", "pref_loss", "dpo_label_smoothing", "kto_chosen_weight",
                   "kto_rejected_weight", "simpo_gamma", "ppo_buffer_size", "ppo_epochs", "ppo_score_norm",
                   "ppo_target", "ppo_whiten_rewards", "ref_model", "ref_model_adapters", "ref_model_quantization_bit",
                   "reward_model", "reward_model_adapters", "reward_model_quantization_bit", "reward_model_type",
                   "ld_alpha")},
    **{key: "GaLore (use_galore) is not built" for key in (
        "galore_target", "galore_rank", "galore_update_interval", "galore_scale", "galore_proj_type",
        "galore_layerwise")},
    **{key: "APOLLO (use_apollo) is not built" for key in (
        "apollo_target", "apollo_rank", "apollo_update_interval", "apollo_scale", "apollo_proj", "apollo_proj_type",
        "apollo_scale_type", "apollo_layerwise", "apollo_scale_front")},
    **{key: "BAdam (use_badam) is not built" for key in (
        "badam_mode", "badam_start_block", "badam_switch_mode", "badam_switch_interval", "badam_update_ratio",
        "badam_mask_mode", "badam_verbose")},
    **{key: "SwanLab logging (use_swanlab) is not built" for key in (
        "swanlab_project", "swanlab_workspace", "swanlab_run_name", "swanlab_mode", "swanlab_api_key",
        "swanlab_logdir", "swanlab_lark_webhook_url", "swanlab_lark_secret")},
}

# LLaMA-Factory features not built: refused when set, rather than silently training something else.
# None, false or 0 (or, for a key in OFF_VALUES, one of its values) means the feature is off, which
# is what runs here anyway.
UNSUPPORTED_KEYS: dict[str, str] = {
    "adapter_folder": "loading adapters from a hub folder; give the folders in adapter_name_or_path",
    "resize_vocab": "resizing the vocabulary",
    "split_special_tokens": "tokenizing special tokens as text",
    "add_tokens": "adding tokens to the vocabulary",
    "add_special_tokens": "adding tokens to the vocabulary",
    "new_special_tokens_config": "adding tokens to the vocabulary",
    "rope_scaling": "RoPE scaling",
    "shift_attn": "shift short attention (S^2-Attn)",
    "mixture_of_depths": "mixture of depths",
    "use_unsloth": "unsloth kernels",
    "use_unsloth_gc": "unsloth gradient checkpointing",
    "moe_aux_loss_coef": "a mixture-of-experts router loss",
    "train_from_scratch": "training from random weights",
    "export_quantization_bit": "quantized export",
    "export_hub_model_id": "pushing to a hub",
    "use_kt": "KTransformers",
    "mix_strategy": "dataset interleaving (datasets are concatenated)",
    "tool_format": "tool-call formats other than the template's own",
    "preserve_thinking": "keeping the reasoning of earlier turns",
    "freeze_trainable_modules": "freeze tuning of named modules (freeze_trainable_layers picks whole layers)",
    "freeze_extra_modules": "freeze tuning of extra modules",
    "use_galore": "GaLore",
    "use_badam": "BAdam",
    "use_apollo": "APOLLO",
    "use_swanlab": "SwanLab logging",
    "use_llama_pro": "LLaMA Pro",
    "use_adam_mini": "Adam-mini",
    "use_muon": "the Muon optimizer",
    "use_mca": "Megatron-Core training",
    "use_megatron_bridge": "Megatron training",
    "use_hyper_parallel": "hyper-parallel training",
    "use_dft_loss": "the DFT loss",
    "use_asft_loss": "the ASFT loss",
    "use_eaft_loss": "the EAFT loss",
    "pure_bf16": "bf16 weights and optimizer state without fp32 master weights (use bf16: true)",
    "early_stopping_steps": "early stopping",
    "ignore_pad_token_for_loss": "learning the padding tokens (padding never counts in the loss here)",
    "num_beams": "beam search",
    "fsdp": "Trainer-style FSDP strings (use fsdp_config with an accelerate config file)",
    "fp8": "fp8 training",
    "fp8_backend": "fp8 training",
    "fp8_enable_fsdp_float8_all_gather": "fp8 training",
    "ray_num_workers": "training through Ray",
    "ray_run_name": "training through Ray",
    "ray_storage_path": "training through Ray",
    "ray_init_kwargs": "training through Ray",
    "resources_per_worker": "training through Ray",
    "placement_strategy": "training through Ray",
}
OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "mix_strategy": ("concat",),
    "freeze_trainable_modules": ("all",),
    "num_beams": (1,),
    "ignore_pad_token_for_loss": (True,),
    "ray_num_workers": (1,),
    "placement_strategy": ("PACK",),
    "resources_per_worker": ({"GPU": 1},),
}

# LLaMA-Factory keys read into one of ours: key -> (our key, LLaMA-Factory value -> our value).
ALIASES: dict[str, tuple[str, dict[Any, Any]]] = {
    "flash_attn": ("attn_implementation", {"auto": "auto", "disabled": "eager", "sdpa": "sdpa",
                                           "fa2": "flash_attention_2"}),
    "disable_shuffling": ("shuffle", {True: False, False: True}),
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
_KNOWN_NAMES = [*_SCHEMA, *UNSUPPORTED_KEYS, *IGNORED_KEYS]  # what a misspelt key may have meant


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
            if not math.isfinite(number) or not number.is_integer():
                raise ValueError
            return int(number)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise UserError(f"{where}: '{key}' must be a finite number, got {value!r}.")
            return number
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
            raise UserError(f"config file not found: {p}",
                            hint="pass the path of a YAML file, e.g. examples/demo_identity_lora.yaml")
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
    origins: dict[str, str] = {}
    ignored: dict[str, str] = {}
    for origin, mapping in (("file", raw), ("cli", cli)):
        for key, value in mapping.items():
            key = str(key)
            where = ((f"{source}, line {lines[key]}" if key in lines else str(source)) if origin == "file"
                     else "command line")
            if key in UNSUPPORTED_KEYS:
                if _is_off(key, value):
                    continue
                raise UserError(f"{where}: '{key}' ({UNSUPPORTED_KEYS[key]}) is not supported yet.",
                                hint=f"remove '{key}' to train without it.")
            if key in IGNORED_KEYS:
                ignored[key] = where
                continue
            if key in ALIASES:
                key, value = _read_alias(key, value, where, mapping)
            if key not in _SCHEMA:
                raise UserError(f"{where}: unknown key '{key}'{did_you_mean(key, _KNOWN_NAMES)}.",
                                hint="`tunesmith train --keys` lists every key.")
            group, _ = _SCHEMA[key]
            value = _coerce(key, value, where)
            if key == "stage" and value in ("pt", "rm", "ppo", "dpo", "kto"):
                raise UserError(f"{where}: 'stage: {value}' is not supported yet; only 'sft' is built.")
            _check_choice(key, value, where)
            setattr(getattr(cfg, group), key, value)
            cfg.given = cfg.given | {key}
            origins[key] = where
    _validate(cfg, origins)
    for key, where in ignored.items():
        print(f"warning: {where}: '{key}' has no effect here: {IGNORED_KEYS[key]}.", file=sys.stderr)
    return cfg


def _is_off(key: str, value: Any) -> bool:
    """A refused feature's key set to a value that turns it off (what runs here anyway)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return True
    if key in OFF_VALUES:  # compared with their types: true is not the count 1
        return any(value == off and type(value) is type(off) for off in OFF_VALUES[key])
    return value in (False, 0) or (isinstance(value, str) and value.strip().lower() == "false")


def _read_alias(key: str, value: Any, where: str, mapping: dict[str, Any]) -> tuple[str, Any]:
    """A LLaMA-Factory key that means one of ours, as (our key, our value)."""
    ours, values = ALIASES[key]
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        value = value.strip().lower() == "true"
    if value not in values:
        raise UserError(f"{where}: '{key}' is {value!r}; allowed: {', '.join(map(str, values))}.")
    if ours in mapping and _coerce(ours, mapping[ours], where) != values[value]:
        raise UserError(f"{where}: '{key}: {value}' means '{ours}: {values[value]}', but '{ours}' is set to "
                        f"{mapping[ours]!r} too; keep one of them.")
    return ours, values[value]


# key -> (lowest, highest, whether lowest itself is allowed, whether highest is); None = no bound.
# Optional keys are checked only when set. Every float is also finite (checked when read).
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "cutoff_len": (1, None, True, True), "max_samples": (1, None, True, True), "val_size": (0, None, True, True),
    "preprocessing_num_workers": (1, None, True, True), "dataloader_num_workers": (0, None, True, True),
    "lora_rank": (1, None, True, True), "lora_alpha": (0, None, False, True), "lora_dropout": (0, 1, True, False),
    "per_device_train_batch_size": (1, None, True, True), "per_device_eval_batch_size": (1, None, True, True),
    "gradient_accumulation_steps": (1, None, True, True), "num_train_epochs": (0, None, False, True),
    "max_steps": (-1, None, True, True), "learning_rate": (0, None, False, True), "warmup_ratio": (0, 1, True, False),
    "warmup_steps": (0, None, True, True), "weight_decay": (0, None, True, True), "adam_beta1": (0, 1, True, False),
    "adam_beta2": (0, 1, True, False), "adam_epsilon": (0, None, False, True), "max_grad_norm": (0, None, True, True),
    "seed": (0, 2**32 - 1, True, True), "logging_steps": (1, None, True, True), "save_steps": (0, None, True, True),
    "save_total_limit": (1, None, True, True), "eval_steps": (1, None, True, True),
    "ddp_timeout": (1, None, True, True), "max_skipped_steps": (1, None, True, True),
    "export_size": (0, None, False, True),
    "temperature": (0, None, True, True), "top_p": (0, 1, False, True), "top_k": (0, None, True, True),
    "max_new_tokens": (1, None, True, True), "repetition_penalty": (0, None, False, True),
    "buffer_size": (1, None, True, True),
}


def _range_text(low: float | None, high: float | None, low_in: bool, high_in: bool) -> str:
    if high is None:
        return "positive" if low == 0 and not low_in else f"{'at least' if low_in else 'greater than'} {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def _validate(cfg: RunConfig, origins: dict[str, str] | None = None) -> None:
    """Ranges and cross-field rules, each naming its key and where it was set (file and line)."""
    origins = origins or {}
    where = cfg.source or "config"
    d, t, f = cfg.data, cfg.train, cfg.finetune
    flat = cfg.to_flat()
    for key, (low, high, low_in, high_in) in RANGES.items():
        value = flat[key]
        if value is None or (key == "num_train_epochs" and t.max_steps > 0):  # max_steps decides then
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{origins.get(key, where)}: '{key}' must be a finite number, got {value}.")
        too_low = low is not None and (value < low if low_in else value <= low)
        too_high = high is not None and (value > high if high_in else value >= high)
        if too_low or too_high:
            raise UserError(f"{origins.get(key, where)}: '{key}' must be {_range_text(low, high, low_in, high_in)}, "
                            f"got {value}.")
    if f.freeze_trainable_layers == 0:
        raise UserError(f"{origins.get('freeze_trainable_layers', where)}: 'freeze_trainable_layers' must not be 0 "
                        "(N > 0 trains the last N layers, N < 0 the first N).")
    if d.val_size >= 1 and not float(d.val_size).is_integer():
        raise UserError(f"{origins.get('val_size', where)}: 'val_size' must be a share in [0, 1) or a row count "
                        f">= 1, got {d.val_size}.")
    if d.streaming and t.max_steps <= 0:
        raise UserError(f"{origins.get('streaming', where)}: 'streaming: true' needs 'max_steps' (a stream has no "
                        "known length).")
    if d.streaming and d.val_size > 0:
        raise UserError(f"{origins.get('val_size', where)}: 'val_size' splits stored samples, and 'streaming: true' "
                        "stores none.", hint="give the eval rows as 'eval_dataset', or turn streaming off.")
    if d.packing_contamination and d.neat_packing:
        raise UserError(f"{where}: 'neat_packing: true' keeps packed samples apart and 'packing_contamination: "
                        "true' lets them attend to each other; choose one.")
    if t.bf16 and t.fp16:
        raise UserError(f"{where}: 'bf16' and 'fp16' are both true; choose one.")
    if t.eval_steps is None:
        t.eval_steps = t.logging_steps
    if f.lora_alpha is None:
        f.lora_alpha = 2 * f.lora_rank
    if cfg.model.template in ("", "auto"):
        cfg.model.template = None
    if not f.lora_target:
        raise UserError(f"{where}: 'lora_target' is empty; use 'all' or module names such as [q_proj, v_proj].")
    if f.do_predict and not cfg.generate.predict_with_generate:
        raise UserError(f"{where}: 'do_predict: true' scores generated answers; set 'predict_with_generate: true'.")
    _validate_lora_variants(cfg, where)


def _validate_lora_variants(cfg: RunConfig, where: str) -> None:
    """QLoRA and the LoRA variants apply to LoRA runs only, and some exclude each other."""
    f = cfg.finetune
    variants = {"quantization_bit": cfg.model.quantization_bit, "use_dora": f.use_dora, "use_rslora": f.use_rslora,
                "pissa_init": f.pissa_init, "loraplus_lr_ratio": f.loraplus_lr_ratio,
                "create_new_adapter": f.create_new_adapter}
    given = [key for key, value in variants.items() if value]
    if given and f.finetuning_type != "lora":
        raise UserError(f"{where}: '{given[0]}' applies to LoRA training, but finetuning_type is "
                        f"{f.finetuning_type!r}.", hint=f"set finetuning_type: lora, or remove '{given[0]}'.")
    if f.use_dora and f.pissa_init:
        raise UserError(f"{where}: 'use_dora' and 'pissa_init' are both true; peft initialises DoRA's magnitudes "
                        "from the base weights that PiSSA changes, so choose one.")
    if f.loraplus_lr_ratio is not None and f.loraplus_lr_ratio <= 0:
        raise UserError(f"{where}: 'loraplus_lr_ratio' must be positive, got {f.loraplus_lr_ratio}.")
    if cfg.train.neftune_noise_alpha is not None and cfg.train.neftune_noise_alpha < 0:
        raise UserError(f"{where}: 'neftune_noise_alpha' must be positive, got {cfg.train.neftune_noise_alpha}.")
    if f.pissa_iter == 0 or f.pissa_iter < -1:
        raise UserError(f"{where}: 'pissa_iter' must be -1 (exact SVD) or at least 1, got {f.pissa_iter}.")


def help_table() -> str:
    """Every key, grouped, with default and help: printed by `tunesmith train --keys`."""
    rows = []
    for group in GROUPS:
        rows.append(f"\n{group}:")
        for spec in (k for k in KEYS.values() if k.group == group):
            allowed = f" [{'|'.join(map(str, spec.choices))}]" if spec.choices else ""
            rows.append(f"  {spec.name} (default {spec.default!r}){allowed}\n      {spec.help}")
    return "\n".join(rows)
