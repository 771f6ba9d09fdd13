"""Scale-out that equals one process: uneven steps and eval sets smaller than the world (gloo, 3
processes), DeepSpeed ZeRO on its CPU accelerator, fp16 skips, Ctrl-C on a relaunched run, FSDP's
precision policy, and the GPU check script's comparison logic."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import identity_dataset
from test_distributed import adapter, child_env, losses, run_cli, run_config, write_yaml

from tunesmith.config import load_config
from tunesmith.train import distributed

REPO = Path(__file__).resolve().parents[1]
DS_DIR = REPO / "examples" / "deepspeed"


def eval_losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in rows if "eval_loss" in r]


def torchrun(nproc: int, cfg: Path, env: dict[str, str] | None = None, timeout: int = 300) -> None:
    run_cli([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
             str(distributed.free_port()), "-m", "tunesmith", "train", str(cfg)], env or child_env(), timeout)


def single_run(tmp_path: Path, model: Path, data: Path, out: Path, **extra: object) -> None:
    from tunesmith.train import run_training

    torch.set_num_threads(1)
    run_training(load_config(None, run_config(tmp_path, model, data, out, **extra)))


def assert_same_run(one: Path, other: Path, atol: float = 1e-5) -> None:
    a, b = losses(one), losses(other)
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b, strict=True)) < atol, (a, b)
    for name, value in adapter(one).items():
        assert torch.allclose(value, adapter(other)[name], atol=atol), name


def test_three_processes_short_last_step_small_eval_and_resume_into_it(tmp_path, tiny_model_dir, repo_data):
    """16 rows, 2 held out: 14 samples in steps of 6 micro-batches (3 ranks x 2): the last step has 2,
    so the third rank has none; the 2 eval samples leave one rank without an eval batch."""
    data = identity_dataset(tmp_path / "data", repo_data, rows=16)
    common = {"max_steps": -1, "num_train_epochs": 1, "val_size": 2, "eval_strategy": "steps", "eval_steps": 1,
              "ddp_timeout": 120}
    single = tmp_path / "single"
    single_run(tmp_path, tiny_model_dir, data, single, gradient_accumulation_steps=6, **common)
    assert len(losses(single)) == 3 and len(eval_losses(single)) == 3

    three = tmp_path / "three"
    torchrun(3, write_yaml(tmp_path / "three.yaml", run_config(tmp_path, tiny_model_dir, data, three,
                                                               save_steps=2, **common)))
    assert_same_run(single, three)
    assert max(abs(a - b) for a, b in zip(eval_losses(single), eval_losses(three), strict=True)) < 1e-5

    # resume at step 2: the first step this run takes is the short one
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("checkpoint-2", "trainer_log.jsonl", "config.yaml"):
        subprocess.run(["cp", "-r", str(three / name), str(resumed / name)], check=True)
    torchrun(3, write_yaml(tmp_path / "resume.yaml", run_config(tmp_path, tiny_model_dir, data, resumed, save_steps=2,
                                                                resume_from_checkpoint=True, **common)))
    assert losses(resumed) == losses(three)
    for name, value in adapter(three).items():
        assert torch.equal(value, adapter(resumed)[name]), name


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed not installed")


@needs_deepspeed
@pytest.mark.parametrize("config", ["ds_z2_config.json", "ds_z3_config.json"])
def test_deepspeed_on_its_cpu_accelerator_equals_one_process(tmp_path, tiny_model_dir, repo_data, config):
    """The engine steps once per optimizer step (not per micro-batch), after the loss check: 2 ranks
    x accumulation 2 train exactly like 1 process x accumulation 4, on an odd sample count whose
    last step leaves the second rank without a micro-batch; ZeRO-3 resumes from its sharded state."""
    data = identity_dataset(tmp_path / "data", repo_data, rows=13)
    common = {"max_steps": -1, "num_train_epochs": 1}
    single = tmp_path / "single"
    single_run(tmp_path, tiny_model_dir, data, single, gradient_accumulation_steps=4, **common)
    zero = tmp_path / "zero"
    ds = {"deepspeed": str(DS_DIR / config), "save_steps": 2, **common}
    env = child_env(DS_ACCELERATOR="cpu")
    torchrun(2, write_yaml(tmp_path / "zero.yaml", run_config(tmp_path, tiny_model_dir, data, zero, **ds)), env, 600)
    assert len(losses(single)) == 4  # 13 samples, 4 per step: the last step holds one
    assert_same_run(single, zero, atol=1e-4)  # ZeRO reduces gradients in another order
    if config != "ds_z3_config.json":
        return
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("checkpoint-2", "trainer_log.jsonl", "config.yaml"):
        subprocess.run(["cp", "-r", str(zero / name), str(resumed / name)], check=True)
    assert (resumed / "checkpoint-2" / distributed.SHARDED_STATE).is_dir()
    torchrun(2, write_yaml(tmp_path / "resume.yaml", run_config(tmp_path, tiny_model_dir, data, resumed,
                                                                resume_from_checkpoint=True, **ds)), env, 600)
    assert_same_run(zero, resumed, atol=1e-5)


def test_skipped_fp16_step_leaves_the_scaler_ready_for_the_next():
    """nan_policy: skip under fp16: the skipped step's clipping unscaled the gradients; the scaler
    must be updated (scale lowered) or the next step's unscale_ raises."""
    from torch.amp import GradScaler

    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = GradScaler("cpu", init_scale=2.0**8)

    def backward(value: float) -> None:
        optimizer.zero_grad()
        scaler.scale((model(torch.ones(1, 4)) * value).sum()).backward()
        scaler.unscale_(optimizer)  # what clip_grad_norm_ does first

    before = [p.detach().clone() for p in model.parameters()]
    backward(float("inf"))  # an overflowing step the guard skips
    distributed.skip_scaled_step(scaler, optimizer)
    assert scaler.get_scale() == 2.0**7  # the overflow lowered the scale
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    backward(1.0)  # the next step runs as usual
    scaler.step(optimizer)
    scaler.update()
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

    # without clipping nothing was unscaled: the skip unscales itself, then updates
    optimizer.zero_grad()
    scaler.scale(model(torch.ones(1, 4)).sum() * float("nan")).backward()
    distributed.skip_scaled_step(scaler, optimizer)
    backward(1.0)

    # what the skip prevents: a second unscale_ in the same scaler step
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.unscale_(optimizer)
    distributed.skip_scaled_step(None, optimizer)  # no scaler (bf16/fp32): nothing to do


def _workers_of(config: Path) -> list[int]:
    """Processes whose command line names this run's config (the torchrun workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(config).encode() in cmdline:
                found.append(int(entry.name))
    return found


def test_ctrl_c_on_a_relaunched_run_checkpoints_and_says_how_to_resume(tmp_path, tiny_model_dir, repo_data):
    """`tunesmith train` relaunched under torchrun; Ctrl-C reaches the terminal's process group:
    the workers finish their step, write a checkpoint and end; the resume command is printed."""
    data = identity_dataset(tmp_path / "data", repo_data, rows=16)
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "cfg.yaml", run_config(tmp_path, tiny_model_dir, data, out, max_steps=400,
                                                        gradient_accumulation_steps=1))
    stderr = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "train", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=stderr, text=True, start_new_session=True, cwd=REPO,
                            env=child_env(FORCE_TORCHRUN="1", NPROC_PER_NODE="2"))
    log = out / "trainer_log.jsonl"
    deadline = time.monotonic() + 240
    while not (log.exists() and log.read_text().count('"loss"') >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or did not start"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    try:
        proc.wait(timeout=120)
    finally:
        left = _workers_of(cfg)  # the command has returned: nothing of the run may be left behind
        proc.kill()
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    err = (tmp_path / "stderr.txt").read_text()
    assert left == [], "workers were left running after the command returned"
    assert proc.returncode != 0
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / ".complete").exists(), err[-3000:]
    assert "Resume with: tunesmith train" in err and "resume_from_checkpoint=true" in err, err[-3000:]
    steps = int(checkpoints[0].name.split("-")[1])
    assert 2 <= steps < 400


def test_fsdp_keeps_the_loss_and_gradient_reduction_in_fp32(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "False")
    assert distributed.fsdp_precision_policy(2, "no") is None
    for mixed, half in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        kwargs = distributed.fsdp_plugin_kwargs(REPO / "examples" / "accelerate" / "fsdp2_config.yaml")
        plugin = FullyShardedDataParallelPlugin(**kwargs, mixed_precision_policy=distributed.fsdp_precision_policy(
            kwargs["fsdp_version"], mixed))
        plugin.set_mixed_precision(mixed)  # what accelerate's state does next: the policy must survive it
        policy = plugin.mixed_precision_policy
        assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (half, torch.float32, torch.float32)


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_scaleout_check", REPO / "bench" / "gpu_scaleout_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_gpu_check_compares_every_step_the_adapter_and_the_resume():
    check = _gpu_check_module()
    torch.manual_seed(0)
    weights = {"a.lora_A.weight": torch.randn(8, 16), "a.lora_B.weight": torch.randn(16, 8)}
    reference = check.Run([2.0, 1.5, 1.2, 1.1], [1.9, 1.3], weights)
    close = check.Run([2.01, 1.505, 1.2, 1.1], [1.9, 1.31], {k: v * 1.01 for k, v in weights.items()})
    good = check.compare("zero2", close, reference, close)
    assert good.ok and 0 < good.loss_diff < check.LOSS_TOLERANCE and 0 < good.adapter_diff < check.ADAPTER_TOLERANCE

    # a later step drifting (what stepping on every micro-batch gives) fails, though step 1 agrees
    drifted = check.Run([2.0, 1.4, 1.0, 0.9], [1.9, 1.3], weights)
    row = check.compare("zero3", drifted, reference, drifted)
    assert not row.ok and "losses" in row.problems[0]
    # a missing step, a renamed tensor, a failed resume and a failed run are each mismatches
    assert math.isinf(check.relative_loss_diff([2.0, 1.5, 1.2], reference.losses))
    assert math.isinf(check.adapter_diff({"b": weights["a.lora_A.weight"]}, weights))
    assert not check.compare("fsdp2", close, reference, check.Run(error="exit code 1")).ok
    assert not check.compare("fsdp2", close, reference, drifted).ok
    failed = check.compare("fp16", check.Run(error="exit code 1: boom"), reference, None)
    table = check.format_table([check.compare("plain", reference, reference, reference), good, row, failed])
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["setup", "steps"]
    assert lines[1].split()[0] == "plain" and lines[1].endswith("ok")
    assert lines[3].startswith("zero3") and lines[3].endswith("MISMATCH")
    assert "fp16: training failed: exit code 1: boom" in table


def test_disk_estimate_counts_zero3_partitioned_parameters():
    """ZeRO-3 leaves each rank an empty tensor per parameter and the real size in ds_numel."""
    from tunesmith.train.guard import ADAM_BYTES_PER_PARAM, checkpoint_bytes

    cfg = load_config(None, {"finetuning_type": "full"})
    whole = torch.nn.Linear(32, 16, bias=False)
    partitioned = torch.nn.Linear(32, 16, bias=False)
    partitioned.weight = torch.nn.Parameter(torch.empty(0))
    partitioned.weight.ds_numel = 32 * 16
    expected = 32 * 16 * (4 + ADAM_BYTES_PER_PARAM)
    assert checkpoint_bytes(whole, cfg, 0) - 64 * 1024 == expected
    assert checkpoint_bytes(partitioned, cfg, 0) - 64 * 1024 == expected


def test_flash_attention_is_accepted_where_cuda_exists_though_the_load_is_on_the_cpu(monkeypatch):
    """DeepSpeed and FSDP runs load the weights on the CPU; flash attention must not be refused
    for that when the run trains on GPUs. (flash-attn and CUDA are absent here, so both are faked.)"""
    from tunesmith.errors import UserError
    from tunesmith.model import load

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(load.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load._attention_choice("flash_attention_2", torch.device("cpu")) == "flash_attention_2"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="runs on CUDA GPUs only"):
        load._attention_choice("flash_attention_2", torch.device("cpu"))
