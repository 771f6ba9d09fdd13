"""Scale-out: one GPU, several GPUs, several machines (DDP, DeepSpeed ZeRO, FSDP) through accelerate.

The training loop stays one code path; this module supplies what differs between setups:

- `relaunch_command` / `maybe_relaunch`: plain `tunesmith train` restarts itself under torchrun when
  more than one GPU is visible (or FORCE_TORCHRUN=1), with the LLaMA-Factory environment variables
  NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT.
- `deepspeed_config` / `deepspeed_plugin_kwargs`: a DeepSpeed JSON with "auto" values filled from the
  run's config; `fsdp_plugin_kwargs`: an accelerate FSDP config turned into plugin arguments. Both are
  plain dicts, so they are testable without DeepSpeed or GPUs.
- `make_accelerator`, `prepare`, `micro_step`, `backward`, `deepspeed_step`, `lockstep_count`: what the loop calls so
  that the same code runs under DDP, ZeRO and FSDP.
- Saving: `gather_state_dict` (a collective under ZeRO-3 and FSDP, so every rank calls it), per-rank
  RNG states, and the sharded optimizer state of ZeRO/FSDP checkpoints through `accelerator.save_state`.

Gradient accumulation under DeepSpeed: the loop accumulates k micro-batches itself and drives the
engine directly (`backward`, `deepspeed_step`): each micro-batch's backward is told whether it ends
the accumulation, the loss is not divided by k again (it is already the step's token mean,
docs/ARCHITECTURE.md, "Loss"), and the engine's `step()` (clipping, update, zero grad) runs once per
optimizer step, after the guard has checked the all-ranks loss. The learning-rate schedule stays
tunesmith's (created on the prepared optimizer), so a DeepSpeed "scheduler" block is refused.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import UserError
from tunesmith.run_folder import STATE
from tunesmith.train.attention import HOST_BOUNDS, SAMPLE_SLOTS, one_call_pays, sample_slots
from tunesmith.train.checkpoint import rng_state, set_rng_state

INSTALL_HINT = "install it with: pip install 'tunesmith[deepspeed]' (on a machine with CUDA)"
# Environment variables every launcher (torchrun, accelerate launch, deepspeed) sets in its workers.
LAUNCHER_MARKERS = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")
SHARDED_STATE = "sharded_state"
RANK_RNG = "rng_state_per_rank.pt"
# DeepSpeed keys that accelerate sizes from the model's hidden size.
HIDDEN_SIZE_KEYS = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


# ---------------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------------


def under_launcher(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return any(env.get(k) for k in LAUNCHER_MARKERS)


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer.") from None
    if value < 0:
        raise UserError(f"environment variable {name}={raw!r} must not be negative.")
    return value


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def relaunch_command(args: list[str], env: Mapping[str, str], gpu_count: int,
                     needs_launcher: bool = False) -> list[str] | None:
    """The torchrun command that reruns `tunesmith <args>` on every local GPU, or None when this
    process should train itself (already a launcher's worker, or one device and no FORCE_TORCHRUN).
    needs_launcher: DeepSpeed/FSDP want a process group even on one GPU."""
    if under_launcher(env):
        return None
    if not (_flag(env.get("FORCE_TORCHRUN")) or needs_launcher) and gpu_count <= 1:
        return None
    nnodes = _env_int(env, "NNODES", 1)
    node_rank = _env_int(env, "NODE_RANK", 0)
    nproc = _env_int(env, "NPROC_PER_NODE", max(gpu_count, 1))
    if nnodes < 1 or nproc < 1:
        raise UserError(f"NNODES={nnodes} and NPROC_PER_NODE={nproc} must be at least 1.")
    if node_rank >= nnodes:
        raise UserError(f"NODE_RANK={node_rank} must be below NNODES={nnodes} (node ranks count from 0).")
    master_addr = env.get("MASTER_ADDR", "").strip()
    if nnodes > 1 and not master_addr:
        raise UserError(f"NNODES={nnodes}: set MASTER_ADDR to the address of the node with NODE_RANK=0 "
                        "(the same value on every node).",
                        hint="e.g. NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 "
                             "tunesmith train cfg.yaml")
    # Several nodes must agree on the port, so they get torchrun's fixed default; one node takes a free one.
    default_port = 29500 if nnodes > 1 else free_port()
    master_port = _env_int(env, "MASTER_PORT", default_port)
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank", str(node_rank),
            "--nproc_per_node", str(nproc), "--master_addr", master_addr or "127.0.0.1",
            "--master_port", str(master_port), "-m", "tunesmith", *args]


def shutdown_option(seconds: int) -> list[str]:
    """torchrun's wait between passing a stop signal to the workers and killing them (30 s by
    default): a worker that received Ctrl-C finishes its step and writes a checkpoint first, which
    for a large model takes minutes. Empty where this torch's torchrun has no such option."""
    from torch.distributed.run import get_args_parser

    known = {a.dest for a in get_args_parser()._actions}
    return ["--shutdown-timeout", str(seconds)] if "shutdown_timeout" in known else []


def maybe_relaunch(args: list[str], cfg: Any = None) -> int | None:
    """Become torchrun running `tunesmith <args>` when that is wanted (this process is replaced and
    never returns); None to go on here.

    The process is replaced rather than waited for: a parent that waits on torchrun loses it on
    Ctrl-C (Python's subprocess kills its child 0.25 s after an interrupt), while the workers, in a
    session of their own, would go on without anyone to stop them. As torchrun itself, this process
    gets the signal and passes it to the workers, which checkpoint before they exit."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    sharded = cfg is not None and bool(cfg.train.deepspeed or cfg.train.fsdp_config)
    command = relaunch_command(args, os.environ, gpus, needs_launcher=sharded and gpus >= 1)
    if command is None:
        return None
    timeout = int(cfg.train.ddp_timeout) if cfg is not None else 1800  # a save is bounded by it anyway
    at = command.index("-m", 3)  # torchrun's options end where the module to run begins
    command = command[:at] + shutdown_option(timeout) + command[at:]
    print("Launching distributed training: " + " ".join(command[1:]), file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execvpe(command[0], command, dict(os.environ))
    return None  # not reached: execvpe replaces this process


# ---------------------------------------------------------------------------------------------
# DeepSpeed: the JSON with "auto" filled from the run's config
# ---------------------------------------------------------------------------------------------


def require_deepspeed(where: str) -> None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"{where} names a DeepSpeed config, but DeepSpeed is not installed.", hint=INSTALL_HINT)


def load_deepspeed_json(path: str | Path, where: str = "deepspeed") -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{where}: DeepSpeed config {p} not found.",
                        hint="give the path of a JSON file, e.g. examples/deepspeed/ds_z2_config.json")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{p}, line {exc.lineno}, column {exc.colno}: not valid JSON: {exc.msg}.") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: a DeepSpeed config must be a JSON object.")
    return data


def _fill(node: dict[str, Any], key: str, value: Any, source: str, path: str, ours: str) -> None:
    """Set node[key] to value when it is "auto" or missing; refuse a different explicit value."""
    current = node.get(key, "auto")
    if current == "auto":
        node[key] = value
    elif current != value:
        raise UserError(f"{source}: '{path}' is {current!r}, but the run's config gives {value!r} ({ours}).",
                        hint=f"set '{path}' to \"auto\" so that it follows the run's config.")


def _stage(ds: dict[str, Any], source: str) -> int:
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict) or "stage" not in zero:
        raise UserError(f"{source}: the DeepSpeed config has no 'zero_optimization.stage'.",
                        hint="add \"zero_optimization\": {\"stage\": 2} (0, 1, 2 or 3).")
    if zero["stage"] not in (0, 1, 2, 3):
        raise UserError(f"{source}: 'zero_optimization.stage' is {zero['stage']!r}; use 0, 1, 2 or 3.")
    return int(zero["stage"])


def deepspeed_config(raw: dict[str, Any], cfg: Any, world: int, *, hidden_size: int | None = None,
                     source: str = "deepspeed config") -> dict[str, Any]:
    """A copy of the DeepSpeed config with every "auto" the run decides filled in.

    Batch sizes, accumulation and clipping must agree with what the loop does, so a differing
    explicit value is an error rather than a silent second truth.
    """
    t = cfg.train
    ds = copy.deepcopy(raw)
    stage = _stage(ds, source)
    k = t.gradient_accumulation_steps
    _fill(ds, "train_micro_batch_size_per_gpu", t.per_device_train_batch_size, source,
          "train_micro_batch_size_per_gpu", "per_device_train_batch_size")
    _fill(ds, "gradient_accumulation_steps", k, source, "gradient_accumulation_steps",
          "gradient_accumulation_steps")
    _fill(ds, "train_batch_size", t.per_device_train_batch_size * k * world, source, "train_batch_size",
          f"per_device_train_batch_size x gradient_accumulation_steps x {world} processes")
    _fill(ds, "gradient_clipping", float(t.max_grad_norm), source, "gradient_clipping", "max_grad_norm")
    for dtype, enabled in (("bf16", bool(t.bf16)), ("fp16", bool(t.fp16))):
        section = ds.setdefault(dtype, {})
        if not isinstance(section, dict):
            raise UserError(f"{source}: '{dtype}' must be an object like {{\"enabled\": \"auto\"}}.")
        current = section.get("enabled", "auto")
        if current == "auto":
            section["enabled"] = enabled
        elif bool(current) != enabled:
            raise UserError(f"{source}: '{dtype}.enabled' is {current!r}, but the run's config has "
                            f"{dtype}: {str(enabled).lower()}.",
                            hint=f"set '{dtype}.enabled' to \"auto\" and choose the precision with bf16/fp16.")
    zero = ds["zero_optimization"]
    if stage == 3:
        # Saving gathers the 16-bit weights on rank 0; without this the saved files would be empty.
        if zero.get("stage3_gather_16bit_weights_on_model_save", "auto") is False:
            raise UserError(f"{source}: 'zero_optimization.stage3_gather_16bit_weights_on_model_save' is false; "
                            "tunesmith saves the gathered weights under ZeRO-3 and needs it.",
                            hint="set it to true (or \"auto\").")
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if hidden_size:
        for key, size in HIDDEN_SIZE_KEYS.items():
            if zero.get(key) == "auto":
                zero[key] = size(hidden_size)
    optimizer = ds.get("optimizer")
    if optimizer is not None:
        params = optimizer.setdefault("params", {})
        for key, value in (("lr", t.learning_rate), ("betas", [t.adam_beta1, t.adam_beta2]),
                           ("eps", t.adam_epsilon), ("weight_decay", t.weight_decay)):
            if params.get(key) == "auto":
                params[key] = value
    if "scheduler" in ds:
        raise UserError(f"{source}: the 'scheduler' block is not used: the learning rate follows "
                        "lr_scheduler_type, warmup_ratio/warmup_steps and learning_rate of the run's config.",
                        hint="remove the 'scheduler' block from the DeepSpeed config.")
    return ds


def deepspeed_plugin_kwargs(cfg: Any, world: int, *, hidden_size: int | None = None) -> dict[str, Any]:
    """Arguments of accelerate's DeepSpeedPlugin for the run's `deepspeed:` file."""
    path = cfg.train.deepspeed
    ds = deepspeed_config(load_deepspeed_json(path), cfg, world, hidden_size=hidden_size, source=str(path))
    return {
        "hf_ds_config": ds,
        "gradient_accumulation_steps": ds["gradient_accumulation_steps"],
        "gradient_clipping": ds["gradient_clipping"],
        "zero_stage": ds["zero_optimization"]["stage"],
        "offload_optimizer_device": ds["zero_optimization"].get("offload_optimizer", {}).get("device", "none"),
        "offload_param_device": ds["zero_optimization"].get("offload_param", {}).get("device", "none"),
        "zero3_save_16bit_model": ds["zero_optimization"]["stage"] == 3,
    }


# ---------------------------------------------------------------------------------------------
# FSDP: an accelerate config (or its fsdp_config part) turned into plugin arguments
# ---------------------------------------------------------------------------------------------

_FSDP_KEYS = {  # accelerate config key (without the fsdp_ prefix) -> FullyShardedDataParallelPlugin field
    "version": "fsdp_version",
    "reshard_after_forward": "reshard_after_forward",
    "sharding_strategy": "sharding_strategy",
    "auto_wrap_policy": "auto_wrap_policy",
    "transformer_layer_cls_to_wrap": "transformer_cls_names_to_wrap",
    "min_num_params": "min_num_params",
    "state_dict_type": "state_dict_type",
    "offload_params": "cpu_offload",
    "cpu_ram_efficient_loading": "cpu_ram_efficient_loading",
    "activation_checkpointing": "activation_checkpointing",
    "backward_prefetch": "backward_prefetch",
    "forward_prefetch": "forward_prefetch",
    "use_orig_params": "use_orig_params",
    "sync_module_states": "sync_module_states",
}


def fsdp_plugin_kwargs(path: str | Path) -> dict[str, Any]:
    """FullyShardedDataParallelPlugin arguments from an `accelerate config` YAML (its fsdp_config part)
    or a file holding only that mapping; keys may carry the `fsdp_` prefix or not."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"fsdp_config: {p} not found.", hint="e.g. examples/accelerate/fsdp2_config.yaml")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{p}: not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping.")
    if "distributed_type" in data and str(data["distributed_type"]).upper() != "FSDP":
        raise UserError(f"{p}: distributed_type is {data['distributed_type']!r}, not FSDP.")
    section = data.get("fsdp_config", data)
    kwargs: dict[str, Any] = {}
    for key, value in section.items():
        short = key.removeprefix("fsdp_")
        if short not in _FSDP_KEYS:
            raise UserError(f"{p}: unknown FSDP setting '{key}'.",
                            hint="known: " + ", ".join(f"fsdp_{k}" for k in _FSDP_KEYS))
        kwargs[_FSDP_KEYS[short]] = value
    kwargs.setdefault("fsdp_version", 2)
    kwargs.setdefault("state_dict_type", "FULL_STATE_DICT")
    if str(kwargs["state_dict_type"]).upper() != "FULL_STATE_DICT":
        raise UserError(f"{p}: fsdp_state_dict_type is {kwargs['state_dict_type']!r}; tunesmith writes "
                        "standard model folders and needs FULL_STATE_DICT.",
                        hint="set fsdp_state_dict_type: FULL_STATE_DICT")
    if isinstance(kwargs.get("auto_wrap_policy"), str):
        kwargs["auto_wrap_policy"] = kwargs["auto_wrap_policy"].lower()
    if isinstance(kwargs.get("transformer_cls_names_to_wrap"), str):
        kwargs["transformer_cls_names_to_wrap"] = [
            s.strip() for s in kwargs["transformer_cls_names_to_wrap"].split(",") if s.strip()]
    return kwargs


def fsdp_precision_policy(version: int, mixed: str) -> dict[str, torch.dtype] | None:
    """FSDP's mixed precision: parameters gathered in the 16-bit type for the products, but
    gradients reduced and the output (the summed token loss) returned in fp32. accelerate's
    default casts all three to the 16-bit type, which rounds the loss and sums every rank's
    gradients in bf16. None for fp32 runs."""
    if mixed == "no":
        return None
    half = torch.float16 if mixed == "fp16" else torch.bfloat16
    last = {"buffer_dtype": torch.float32} if int(version) == 1 else {"output_dtype": torch.float32}
    return {"param_dtype": half, "reduce_dtype": torch.float32, **last}


# ---------------------------------------------------------------------------------------------
# The accelerator
# ---------------------------------------------------------------------------------------------


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def accelerator_kwargs(cfg: Any, device: torch.device, mixed: str) -> dict[str, Any]:
    """Everything the run's Accelerator is built with: precision, the process-group timeout, and the
    DeepSpeed or FSDP plugin named in the config."""
    from accelerate.utils import InitProcessGroupKwargs

    t = cfg.train
    where = cfg.source or "config"
    kwargs: dict[str, Any] = {
        "cpu": device.type == "cpu", "mixed_precision": mixed,
        # Rank 0 may tokenize for a long time while the others wait at a barrier.
        "kwargs_handlers": [InitProcessGroupKwargs(timeout=timedelta(seconds=t.ddp_timeout))],
    }
    fsdp_path = getattr(t, "fsdp_config", None)
    if t.deepspeed and fsdp_path:
        raise UserError(f"{where}: 'deepspeed' and 'fsdp_config' are both set; choose one.")
    if t.deepspeed:
        require_deepspeed(f"{where}: 'deepspeed'")
        # DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu, gloo) runs the same engine: the tests use it.
        if device.type != "cuda" and os.environ.get("DS_ACCELERATOR") != "cpu":
            raise UserError(f"{where}: 'deepspeed' needs CUDA GPUs; this machine trains on the CPU.",
                            hint="remove 'deepspeed' to train with plain data parallelism.")
        from accelerate.utils import DeepSpeedPlugin

        plugin_kwargs = deepspeed_plugin_kwargs(cfg, launched_world_size())
        # Weights load on each rank and are partitioned when the engine starts (see README).
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(**plugin_kwargs, zero3_init_flag=False)
        if device.type == "cpu":  # accelerate drops DeepSpeed when told cpu=True, and has no CPU backend for it
            kwargs["cpu"] = False
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo",
                                                                timeout=timedelta(seconds=t.ddp_timeout))]
        kwargs["gradient_accumulation_steps"] = plugin_kwargs["gradient_accumulation_steps"]
    elif fsdp_path:
        if device.type != "cuda":
            raise UserError(f"{where}: 'fsdp_config' needs CUDA GPUs; this machine trains on the CPU.",
                            hint="remove 'fsdp_config' to train with plain data parallelism.")
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin_kwargs = fsdp_plugin_kwargs(fsdp_path)
        if int(plugin_kwargs["fsdp_version"]) == 2:
            # Checkpoints keep each rank's shard of the weights and optimizer state (accelerate's
            # save_state); the final weights are still gathered whole (get_state_dict, FSDP2 full).
            plugin_kwargs["state_dict_type"] = "SHARDED_STATE_DICT"
        plugin_kwargs.setdefault("mixed_precision_policy", fsdp_precision_policy(plugin_kwargs["fsdp_version"], mixed))
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(**plugin_kwargs)
    return kwargs


def make_accelerator(cfg: Any, device: torch.device, mixed: str) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # a second run in one process may use another precision or plugin
    accelerator = Accelerator(**accelerator_kwargs(cfg, device, mixed))
    if is_deepspeed(accelerator) and not cfg.train.deepspeed:
        # Started by `accelerate launch --config_file` with a DeepSpeed section: fill its "auto" values too.
        plugin = accelerator.state.deepspeed_plugin
        filled = deepspeed_config(plugin.deepspeed_config, cfg, accelerator.num_processes,
                                  source="the accelerate DeepSpeed config")
        plugin.deepspeed_config.clear()
        plugin.deepspeed_config.update(filled)
        accelerator.gradient_accumulation_steps = filled["gradient_accumulation_steps"]
    elif not is_deepspeed(accelerator):
        # The loop accumulates itself; a launcher's accumulation setting must not rescale the loss.
        accelerator.gradient_accumulation_steps = 1
    return accelerator


def is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def unwrap(accelerator: Any, module: Any) -> Any:
    """The module without its DDP/FSDP/DeepSpeed wrapper. A single plain process has none, and
    asking accelerate would import DeepSpeed (2-3 s of start-up) only to find that out."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.NO:
        return module
    return accelerator.unwrap_model(module)


def is_fsdp(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def is_sharded(accelerator: Any) -> bool:
    """Parameters or optimizer state split across ranks: saving and resuming need every rank."""
    return is_deepspeed(accelerator) or is_fsdp(accelerator)


def zero_stage(accelerator: Any) -> int | None:
    return accelerator.state.deepspeed_plugin.zero_stage if is_deepspeed(accelerator) else None


def build_optimizer(accelerator: Any, param_groups: list[dict[str, Any]], cfg: Any) -> Any:
    """The optimizer `optim` names (train/optimizers.py); under a DeepSpeed config with an
    'optimizer' block, the engine builds that one instead, so `optim` must not ask for another."""
    from tunesmith.train.optimizers import make_optimizer

    t = cfg.train
    if is_deepspeed(accelerator) and "optimizer" in accelerator.state.deepspeed_plugin.deepspeed_config:
        from accelerate.utils import DummyOptim

        if "optim" in cfg.given and t.optim != "adamw_torch":
            raise UserError(f"{cfg.source or 'config'}: 'optim: {t.optim}' and the DeepSpeed config's 'optimizer' "
                            "block both choose the optimizer.",
                            hint="remove one of them (the DeepSpeed block runs DeepSpeed's own optimizer).")
        return DummyOptim(param_groups, lr=t.learning_rate, weight_decay=t.weight_decay)
    return make_optimizer(t.optim, param_groups, t, accelerator.device)


def _inner_model(module: torch.nn.Module) -> Any:
    model = getattr(module, "model", module)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def prepare(accelerator: Any, module: torch.nn.Module, optimizer: Any) -> tuple[Any, Any]:
    """accelerator.prepare with what DeepSpeed and FSDP need to know about the model first."""
    base = _inner_model(module)
    if is_deepspeed(accelerator):
        hidden = getattr(base.config, "hidden_size", None)
        conf = accelerator.state.deepspeed_plugin.deepspeed_config
        if hidden:
            for key, size in HIDDEN_SIZE_KEYS.items():
                if conf["zero_optimization"].get(key) == "auto":
                    conf["zero_optimization"][key] = size(hidden)
        if zero_stage(accelerator) == 3:
            # The loss reads the output head's weight directly (fused chunked head), outside the
            # head's own forward: ZeRO-3 must gather it for the whole forward of the wrapper.
            import deepspeed

            head = base.get_output_embeddings()
            if head is not None and getattr(head, "weight", None) is not None:
                deepspeed.zero.register_external_parameter(module, head.weight)
    if is_fsdp(accelerator):
        plugin = accelerator.state.fsdp_plugin
        if plugin.transformer_cls_names_to_wrap is None and getattr(base, "_no_split_modules", None):
            # Wrap each decoder layer on its own; the wrapper module has no _no_split_modules itself.
            plugin.transformer_cls_names_to_wrap = list(base._no_split_modules)
    return accelerator.prepare(module, optimizer)


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on the training device, plus what the varlen sdpa kernel reads in every layer, built
    once here: a host copy of the sample boundaries (reading them from the GPU would sync each time)
    and, off the CPU, the token slots of its one-call path (attention.sample_slots) where that path
    pays for this batch (attention.one_call_pays)."""
    moved = {k: v.to(device) for k, v in batch.items()}
    if "cu_seq_lens_q" in batch:
        moved[HOST_BOUNDS] = batch["cu_seq_lens_q"].cpu()  # already on the host: no copy, no sync
        if torch.device(device).type != "cpu" and one_call_pays(moved[HOST_BOUNDS]):
            moved[SAMPLE_SLOTS] = sample_slots(moved[HOST_BOUNDS]).to(device)
    return moved


@contextlib.contextmanager
def micro_step(accelerator: Any, module: Any, last: bool) -> Iterator[None]:
    """The forward and backward of one micro-batch. Gradients are reduced across ranks only at the
    last one: DDP decides at the forward, FSDP at the backward, so both run in here."""
    if accelerator.num_processes > 1 and not last and not is_deepspeed(accelerator):
        with accelerator.no_sync(module):
            yield
        return
    yield


def backward(accelerator: Any, module: Any, loss: torch.Tensor, last: bool) -> None:
    """Backward of one micro-batch's loss. Under DeepSpeed the engine is called directly: told
    whether this micro-batch ends the accumulation (it then reduces the gradients), never asked to
    divide by its accumulation steps (the loss is already the step's token mean), and not stepped
    here: the update waits for the guard (deepspeed_step). accelerate's own DeepSpeed backward
    would step the engine on every micro-batch outside its accumulate() context."""
    if is_deepspeed(accelerator):
        module.set_gradient_accumulation_boundary(last)
        module.backward(loss, scale_wrt_gas=False)
        return
    accelerator.backward(loss)


def deepspeed_step(engine: Any) -> float | None:
    """Clip and update through the engine once per optimizer step; returns its gradient norm. When
    the guard skips a step (a non-finite loss on some rank), the gradients are non-finite as well and
    the engine's own overflow check (fp16, fp32, and bf16 with its default check_grad_overflow) drops
    the update."""
    engine.set_gradient_accumulation_boundary(True)
    engine.step()
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else None


def skip_scaled_step(scaler: Any, optimizer: Any) -> None:
    """A skipped step under fp16 loss scaling still ends the scaler's step: unscale_ (if clipping did
    not already) and update(), which lowers the scale after an overflow. Without it the scaler stays
    in the unscaled state, and the next step's unscale_ raises. `scaler`: accelerator.scaler."""
    if scaler is None or not scaler.is_enabled():
        return
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    if not scaler_unscaled(scaler, inner):
        scaler.unscale_(inner)
    scaler.update()


def scaler_unscaled(scaler: Any, optimizer: Any) -> bool:
    """Whether unscale_ already ran on this optimizer since the scaler's last update()."""
    from torch.amp.grad_scaler import OptState

    return scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.UNSCALED


def lockstep_count(accelerator: Any, count: int, *, always: bool = False) -> int:
    """Under ZeRO-3/FSDP every forward is a collective, so every rank must run as many micro-batches
    as the busiest one (the extra ones count with weight 0); `always`: in every multi-process run
    (eval forwards of DDP broadcast buffers). 0 = no padding needed."""
    if accelerator.num_processes == 1 or not (always or is_sharded(accelerator)):
        return 0
    most = accelerator.reduce(torch.tensor([count], device=accelerator.device), reduction="max")
    return int(most.item())


# ---------------------------------------------------------------------------------------------
# Saving and resuming
# ---------------------------------------------------------------------------------------------


def gather_state_dict(accelerator: Any, module: Any, *, trainable_only: bool = False
                      ) -> dict[str, torch.Tensor] | None:
    """The weights to save (keys as the unwrapped model names them), gathered from the shards of
    ZeRO-3/FSDP; every rank must call it, and the main process gets them. `trainable_only` (LoRA):
    only the trained parameters are gathered, not the frozen base at every checkpoint. None when
    plain save_pretrained already sees the real weights (one process, DDP, ZeRO-0/1/2, where every
    rank holds whole parameters): nothing is copied then."""
    if not is_sharded(accelerator) or (is_deepspeed(accelerator) and zero_stage(accelerator) < 3):
        return None
    prefix = "model."  # the loss wrapper holds the model as .model
    if trainable_only and not (is_fsdp(accelerator) and accelerator.state.fsdp_plugin.fsdp_version == 1):
        state = _gather_trainable(accelerator, module)
    else:
        state = accelerator.get_state_dict(module)
    return {k.removeprefix(prefix): v for k, v in (state or {}).items()}


def _gather_trainable(accelerator: Any, module: Any) -> dict[str, torch.Tensor]:
    """The trainable parameters, whole, on the main process (empty elsewhere): ZeRO-3 gathers them
    as a group; FSDP2 assembles each sharded tensor (a collective per parameter, on every rank)."""
    named = [(n, p) for n, p in unwrap(accelerator, module).named_parameters() if p.requires_grad]
    main = accelerator.is_main_process
    if is_deepspeed(accelerator):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in named} if main else {}
    state = {}
    for name, param in named:
        whole = param.full_tensor() if hasattr(param, "full_tensor") else param
        if main:
            state[name] = whole.detach().cpu().clone()
    return state


def gather_rng_states(accelerator: Any) -> list[Any] | None:
    """Every rank's RNG state, on the main process, so a resumed run continues each rank's stream."""
    if accelerator.num_processes == 1:
        return None
    gathered: list[Any] = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, rng_state())
    return gathered


def write_rank_rng(folder: Path, states: list[Any] | None) -> None:
    if states is not None:
        torch.save(states, folder / RANK_RNG)


def restore_rank_rng(accelerator: Any, folder: Path) -> None:
    """Each rank takes back its own RNG state (the shared rng_state.pt holds rank 0's)."""
    path = folder / RANK_RNG
    if accelerator.num_processes == 1 or not path.exists():
        return
    states = torch.load(path, weights_only=True)  # tensors and numbers only (checkpoint.rng_state)
    if len(states) == accelerator.num_processes:
        set_rng_state(states[accelerator.process_index])


def sharded_staging(out: Path, step: int) -> Path:
    return out / f".tmp-sharded-{step}"


def save_sharded_state(accelerator: Any, out: Path, step: int, scheduler: Any) -> Path | None:
    """Every rank writes its optimizer/parameter shards (and RNG) with accelerate's save_state into a
    staging folder the main process then moves into the checkpoint. None when not sharded."""
    if not is_sharded(accelerator):
        return None
    staging = sharded_staging(out, step)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    if scheduler not in accelerator._custom_objects:
        accelerator.register_for_checkpointing(scheduler)
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    return staging


def check_checkpoint_kind(accelerator: Any, folder: Path) -> None:
    has_sharded = (folder / SHARDED_STATE).is_dir()
    if is_sharded(accelerator) and not has_sharded:
        raise UserError(f"{folder} was written without DeepSpeed/FSDP and holds no sharded optimizer state.",
                        hint="resume it with the setup it was trained with, or start a new run from its weights.")
    if not is_sharded(accelerator) and has_sharded:
        raise UserError(f"{folder} was written under DeepSpeed/FSDP; resume it with the same 'deepspeed' or "
                        "'fsdp_config' setting.")


def load_sharded_state(accelerator: Any, folder: Path, scheduler: Any) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG shards on every rank; returns trainer_state.json."""
    check_checkpoint_kind(accelerator, folder)
    if scheduler not in accelerator._custom_objects:
        accelerator.register_for_checkpointing(scheduler)
    accelerator.load_state(str(folder / SHARDED_STATE))
    return json.loads((folder / STATE).read_text())
