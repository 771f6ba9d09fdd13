"""Scale-out: 2 processes on the CPU (gloo) give the losses of 1 process with the same global batch,
write one checkpoint, and resume exactly; the relaunch reads LLaMA-Factory's environment; the shipped
DeepSpeed and FSDP configs become the right accelerate plugin settings; DeepSpeed is optional."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from helpers import identity_dataset

from tunesmith.config import load_config
from tunesmith.errors import UserError
from tunesmith.train import distributed

REPO = Path(__file__).resolve().parents[1]
DS_DIR = REPO / "examples" / "deepspeed"
FSDP_YAML = REPO / "examples" / "accelerate" / "fsdp2_config.yaml"


def run_config(tmp: Path, model_dir: Path, data_dir: Path, out: Path, **extra: object) -> dict:
    cfg = {"model_name_or_path": str(model_dir), "dataset": "ident", "dataset_dir": str(data_dir),
           "cutoff_len": 128, "output_dir": str(out), "per_device_train_batch_size": 1,
           "gradient_accumulation_steps": 2, "learning_rate": 5e-3, "max_steps": 4, "logging_steps": 1,
           "save_steps": 0, "lr_scheduler_type": "cosine", "warmup_steps": 1, "preprocessing_num_workers": 1,
           "seed": 7, "report_to": "none"}
    cfg.update(extra)
    return cfg


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "WORLD_SIZE",
                                                              "RANK", "FORCE_TORCHRUN", "NPROC_PER_NODE")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


def test_two_processes_equal_one_and_resume_identically(tmp_path, tiny_model_dir, repo_data):
    data_dir = identity_dataset(tmp_path / "data", repo_data)
    torch.set_num_threads(1)

    # 1 process, batch 1 x accumulation 4 (in-process)
    from tunesmith.train import run_training

    single = tmp_path / "single"
    run_training(load_config(None, run_config(tmp_path, tiny_model_dir, data_dir, single,
                                              gradient_accumulation_steps=4)))

    # 2 processes (torchrun, gloo), batch 1 x accumulation 2 each: the same 4 samples per step
    pair = tmp_path / "pair"
    cfg = write_yaml(tmp_path / "pair.yaml", run_config(tmp_path, tiny_model_dir, data_dir, pair, save_steps=2))
    run_cli([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
             str(distributed.free_port()), "-m", "tunesmith", "train", str(cfg)], child_env())
    # (with one process, accumulation 2 would give other losses: equality shows both ranks trained)
    one, two = losses(single), losses(pair)
    assert len(one) == len(two) == 4  # only rank 0 writes the log
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-5, (one, two)
    for name, value in adapter(single).items():
        assert torch.allclose(value, adapter(pair)[name], atol=1e-5), name
    # one checkpoint, written once; no temporary folders left behind
    assert sorted(p.name for p in pair.iterdir() if p.name.startswith((".tmp", "checkpoint-"))) == ["checkpoint-2"]

    # With dropout each rank has its own RNG stream: a resumed 2-process run must continue every one.
    full = tmp_path / "full"
    cfg = write_yaml(tmp_path / "full.yaml", run_config(tmp_path, tiny_model_dir, data_dir, full, save_steps=2,
                                                        lora_dropout=0.1))
    run_cli([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
             str(distributed.free_port()), "-m", "tunesmith", "train", str(cfg)], child_env())
    assert (full / "checkpoint-2" / distributed.RANK_RNG).exists()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("checkpoint-2", "trainer_log.jsonl", "config.yaml"):
        src = full / name
        subprocess.run(["cp", "-r", str(src), str(resumed / name)], check=True)
    cfg = write_yaml(tmp_path / "resume.yaml", run_config(tmp_path, tiny_model_dir, data_dir, resumed, save_steps=2,
                                                          lora_dropout=0.1, resume_from_checkpoint=True))
    # plain `tunesmith train` relaunching itself under torchrun, as on a machine with 2 GPUs
    proc = run_cli([sys.executable, "-m", "tunesmith", "train", str(cfg)],
                   child_env(FORCE_TORCHRUN="1", NPROC_PER_NODE="2"))
    assert "torch.distributed.run" in proc.stderr and "--nproc_per_node 2" in proc.stderr
    assert losses(resumed) == losses(full)
    for name, value in adapter(full).items():
        assert torch.equal(value, adapter(resumed)[name]), name


def test_relaunch_command_follows_llamafactory_environment():
    assert distributed.relaunch_command(["train", "c.yaml"], {}, gpu_count=1) is None
    assert distributed.relaunch_command(["train", "c.yaml"], {"FORCE_TORCHRUN": "1", "LOCAL_RANK": "0"}, 4) is None

    cmd = distributed.relaunch_command(["train", "c.yaml", "lr=1"], {}, gpu_count=4)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    opts = dict(zip(cmd[3:13:2], cmd[4:13:2], strict=True))
    assert opts["--nproc_per_node"] == "4" and opts["--nnodes"] == "1" and opts["--node_rank"] == "0"
    assert opts["--master_addr"] == "127.0.0.1" and int(opts["--master_port"]) > 0
    assert cmd[13:] == ["-m", "tunesmith", "train", "c.yaml", "lr=1"]

    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29501", "NPROC_PER_NODE": "8"}
    cmd = distributed.relaunch_command(["train", "c.yaml"], env, gpu_count=8)
    assert cmd[3:13] == ["--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "8", "--master_addr", "10.0.0.1",
                         "--master_port", "29501"]
    # several nodes agree on a port: torchrun's fixed default, not a random free one
    cmd = distributed.relaunch_command(["train", "c.yaml"], {"NNODES": "2", "MASTER_ADDR": "10.0.0.1"}, 8)
    assert cmd[cmd.index("--master_port") + 1] == "29500"

    forced = distributed.relaunch_command(["train", "c.yaml"], {"FORCE_TORCHRUN": "true"}, gpu_count=0)
    assert forced[forced.index("--nproc_per_node") + 1] == "1"
    assert distributed.relaunch_command(["train", "c.yaml"], {}, gpu_count=1, needs_launcher=True) is not None

    with pytest.raises(UserError, match="MASTER_ADDR"):
        distributed.relaunch_command(["train", "c.yaml"], {"NNODES": "2"}, gpu_count=8)
    with pytest.raises(UserError, match="NPROC_PER_NODE='two'"):
        distributed.relaunch_command(["train", "c.yaml"], {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "two"}, 2)
    with pytest.raises(UserError, match="NODE_RANK=2 must be below NNODES=2"):
        distributed.relaunch_command(["train", "c.yaml"], {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, 8)


def ds_cfg(path: Path | str, **extra: object):
    base = {"deepspeed": str(path), "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4,
            "max_grad_norm": 0.5, "bf16": True, "learning_rate": 2e-4, "weight_decay": 0.01}
    base.update(extra)
    return load_config(None, base)


def autos_left(node: object) -> list[str]:
    if isinstance(node, dict):
        return [k for k, v in node.items() if v == "auto"] + [x for v in node.values() for x in autos_left(v)]
    return []


@pytest.mark.parametrize("name,stage,opt_device,param_device", [
    ("ds_z0_config.json", 0, "none", "none"),
    ("ds_z2_config.json", 2, "none", "none"),
    ("ds_z2_offload_config.json", 2, "cpu", "none"),
    ("ds_z3_config.json", 3, "none", "none"),
    ("ds_z3_offload_config.json", 3, "cpu", "cpu"),
])
def test_shipped_deepspeed_configs_become_plugin_settings(name, stage, opt_device, param_device):
    from accelerate.utils import DeepSpeedPlugin

    raw = json.loads((DS_DIR / name).read_text())
    assert raw["train_micro_batch_size_per_gpu"] == "auto" and raw["gradient_accumulation_steps"] == "auto"
    kwargs = distributed.deepspeed_plugin_kwargs(ds_cfg(DS_DIR / name), world=8, hidden_size=64)
    ds = kwargs["hf_ds_config"]
    assert autos_left(ds) == []
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 2 * 4 * 8
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == stage
    if stage == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        assert ds["zero_optimization"]["reduce_bucket_size"] == 64 * 64
        assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 640

    plugin = DeepSpeedPlugin(**kwargs, zero3_init_flag=False)  # accelerate's own object, no DeepSpeed needed
    assert plugin.zero_stage == stage
    assert plugin.offload_optimizer_device == opt_device and plugin.offload_param_device == param_device
    assert plugin.gradient_accumulation_steps == 4 and plugin.gradient_clipping == 0.5
    assert plugin.deepspeed_config["bf16"]["enabled"] is True
    assert plugin.zero3_save_16bit_model is (stage == 3)
    assert raw == json.loads((DS_DIR / name).read_text())  # the user's file is not changed


def test_deepspeed_precision_optimizer_and_conflicts(tmp_path):
    ds = distributed.deepspeed_config(json.loads((DS_DIR / "ds_z2_config.json").read_text()),
                                      ds_cfg("x", bf16=False, fp16=True), world=2)
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False and ds["fp16"]["loss_scale"] == 0
    with_opt = {"zero_optimization": {"stage": 2},
                "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                          "weight_decay": "auto"}}}
    ds = distributed.deepspeed_config(with_opt, ds_cfg("x"), world=2)
    assert ds["optimizer"]["params"] == {"lr": 2e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}

    def refused(raw: dict, match: str, **extra: object) -> None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(raw))
        with pytest.raises(UserError, match=match) as info:
            distributed.deepspeed_plugin_kwargs(ds_cfg(path, **extra), world=2)
        assert str(path) in str(info.value)

    refused({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}},
            r"'train_micro_batch_size_per_gpu' is 4, but the run's config gives 2 \(per_device_train_batch_size\)")
    refused({"train_batch_size": 32, "zero_optimization": {"stage": 2}}, "'train_batch_size' is 32")
    refused({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}, "'bf16.enabled' is True", bf16=False)
    refused({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}, "'scheduler' block")
    refused({"train_batch_size": "auto"}, "no 'zero_optimization.stage'")
    refused({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}},
            "stage3_gather_16bit_weights_on_model_save")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 2},\n  "bf16": {enabled: true}\n}')
    with pytest.raises(UserError, match=r"bad.json, line 3, column \d+: not valid JSON"):
        distributed.deepspeed_plugin_kwargs(ds_cfg(bad), world=2)


def test_accelerator_settings_timeout_and_missing_deepspeed():
    from accelerate.utils import InitProcessGroupKwargs

    cfg = load_config(None, {"ddp_timeout": 7200})
    kwargs = distributed.accelerator_kwargs(cfg, torch.device("cpu"), "no")
    handler = kwargs["kwargs_handlers"][0]
    assert isinstance(handler, InitProcessGroupKwargs) and handler.timeout == timedelta(seconds=7200)
    assert "deepspeed_plugin" not in kwargs and "fsdp_plugin" not in kwargs

    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("DeepSpeed is installed here")
    with pytest.raises(UserError, match=r"(?s)DeepSpeed is not installed.*pip install 'tunesmith\[deepspeed\]'"):
        distributed.accelerator_kwargs(ds_cfg(DS_DIR / "ds_z3_config.json"), torch.device("cpu"), "no")
    with pytest.raises(UserError, match="'fsdp_config' needs CUDA GPUs"):
        distributed.accelerator_kwargs(load_config(None, {"fsdp_config": str(FSDP_YAML)}), torch.device("cpu"), "no")
    with pytest.raises(UserError, match="choose one"):
        distributed.accelerator_kwargs(load_config(None, {"fsdp_config": str(FSDP_YAML),
                                                          "deepspeed": str(DS_DIR / "ds_z2_config.json")}),
                                       torch.device("cpu"), "no")


def test_cli_names_the_deepspeed_install_command(tmp_path, tiny_model_dir, repo_data):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("DeepSpeed is installed here")
    data_dir = identity_dataset(tmp_path / "data", repo_data)
    cfg = write_yaml(tmp_path / "cfg.yaml", run_config(tmp_path, tiny_model_dir, data_dir, tmp_path / "out",
                                                       deepspeed=str(DS_DIR / "ds_z2_config.json")))
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(cfg)], capture_output=True, text=True,
                          env=child_env(), timeout=120)
    assert proc.returncode != 0
    assert "DeepSpeed is not installed" in proc.stderr and "pip install 'tunesmith[deepspeed]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_shipped_fsdp_config_becomes_plugin_settings(tmp_path, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType

    kwargs = distributed.fsdp_plugin_kwargs(FSDP_YAML)
    assert kwargs == {"fsdp_version": 2, "auto_wrap_policy": "transformer_based_wrap", "reshard_after_forward": True,
                      "state_dict_type": "FULL_STATE_DICT", "cpu_offload": False,
                      "cpu_ram_efficient_loading": False, "activation_checkpointing": False}
    # the plugin writes this variable for transformers; keep the test process clean
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "False")
    plugin = FullyShardedDataParallelPlugin(**kwargs)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert plugin.state_dict_config.rank0_only and plugin.state_dict_config.offload_to_cpu
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert not plugin.activation_checkpointing

    # a file holding only the fsdp_config mapping (HF style), layer classes as a comma list
    only = tmp_path / "fsdp.json"
    only.write_text(json.dumps({"fsdp_version": 2, "fsdp_offload_params": True,
                                "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer, Qwen2DecoderLayer"}))
    kwargs = distributed.fsdp_plugin_kwargs(only)
    assert kwargs["cpu_offload"] is True and kwargs["state_dict_type"] == "FULL_STATE_DICT"
    assert kwargs["transformer_cls_names_to_wrap"] == ["LlamaDecoderLayer", "Qwen2DecoderLayer"]

    sharded = tmp_path / "sharded.yaml"
    sharded.write_text("fsdp_config:\n  fsdp_state_dict_type: SHARDED_STATE_DICT\n")
    with pytest.raises(UserError, match="FULL_STATE_DICT"):
        distributed.fsdp_plugin_kwargs(sharded)
    typo = tmp_path / "typo.yaml"
    typo.write_text("fsdp_config:\n  fsdp_offload_param: true\n")
    with pytest.raises(UserError, match="unknown FSDP setting 'fsdp_offload_param'"):
        distributed.fsdp_plugin_kwargs(typo)


def test_gpu_check_script_compiles_and_explains_without_gpu():
    script = REPO / "bench" / "gpu_scaleout_check.py"
    subprocess.run([sys.executable, "-m", "py_compile", str(script)], check=True)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run the script itself")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=child_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stdout
