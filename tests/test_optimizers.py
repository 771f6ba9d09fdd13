"""`optim`: each choice builds the optimizer it names, a run trains with it, and the resolved
config.yaml records it."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import yaml
from helpers import identity_dataset

from tunesmith.config import TrainArgs, load_config
from tunesmith.train.optimizers import make_optimizer

CPU = torch.device("cpu")


def one_step(name: str, **train: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.optim.Optimizer]:
    """(weight before, its gradient, weight after) of one step of optimizer `name` on a 64x64 weight."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 64, generator=generator))
    bias = torch.nn.Parameter(torch.randn(64, generator=generator))
    before = weight.detach().clone()
    weight.grad = torch.randn(64, 64, generator=generator)
    bias.grad = torch.randn(64, generator=generator)
    optimizer = make_optimizer(name,
                               [{"params": [weight], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0}],
                               TrainArgs(**train), CPU)
    optimizer.step()
    return before, weight.grad.clone(), weight.detach().clone(), optimizer


def test_sgd_step_is_sgd_math_and_not_adamw():
    before, grad, after, optimizer = one_step("sgd", learning_rate=0.01)
    assert type(optimizer) is torch.optim.SGD
    # torch.optim.SGD without momentum: w - lr * (g + weight_decay * w)
    assert torch.allclose(after, before - 0.01 * (grad + 0.1 * before), atol=1e-7)
    _, _, adamw_after, adamw = one_step("adamw_torch", learning_rate=0.01)
    assert type(adamw) is torch.optim.AdamW
    assert (adamw_after - after).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["adamw_torch_fused", "adafactor"]
                         + (["adamw_8bit", "paged_adamw_8bit"] if importlib.util.find_spec("bitsandbytes") else []))
def test_every_choice_steps(name):
    before, _, after, optimizer = one_step(name, learning_rate=0.01)
    expected = {"adamw_torch_fused": "AdamW", "adafactor": "Adafactor", "adamw_8bit": "AdamW8bit",
                "paged_adamw_8bit": "AdamW8bit"}[name]  # paging needs CUDA: the same optimizer unpaged on the CPU
    assert type(optimizer).__name__ == expected
    assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-4
    if name == "adamw_torch_fused":
        assert optimizer.defaults["fused"] is True
        _, _, plain, _ = one_step("adamw_torch", learning_rate=0.01)
        assert torch.allclose(after, plain, atol=1e-6)  # the same math in one kernel


def test_unknown_optim_lists_the_choices():
    from tunesmith.errors import UserError

    with pytest.raises(UserError, match="'optim' is 'lion'; allowed: adamw_torch, adamw_torch_fused, sgd"):
        load_config(None, {"optim": "lion"})


def test_sgd_run_trains_with_sgd_and_config_says_so(tmp_path, tiny_model_dir, repo_data):
    from tunesmith.train import run_training

    data = identity_dataset(tmp_path / "data", repo_data)
    runs = {}
    for optim, lr in (("sgd", 0.5), ("sgd", 1.0), ("adamw_torch", 0.5)):
        out = tmp_path / f"{optim}-{lr}"
        result = run_training(load_config(None, {
            "model_name_or_path": str(tiny_model_dir), "dataset": "ident", "dataset_dir": str(data), "cutoff_len": 96,
            "output_dir": str(out), "per_device_train_batch_size": 2, "learning_rate": lr, "max_steps": 1,
            "max_grad_norm": 0, "lr_scheduler_type": "constant", "preprocessing_num_workers": 1, "seed": 7,
            "report_to": "none", "optim": optim}))
        assert yaml.safe_load((out / "config.yaml").read_text())["optim"] == optim
        assert json.loads((out / "train_results.json").read_text())["global_step"] == 1
        runs[(optim, lr)] = {n: p.detach() for n, p in result.model.named_parameters() if "lora_B" in n}
    # LoRA's B starts at zero, so after one step B = -lr x gradient: linear in lr, and uneven in size,
    # where AdamW's first step moves every weight by about lr.
    for name, b_half in runs[("sgd", 0.5)].items():
        assert torch.allclose(runs[("sgd", 1.0)][name], 2 * b_half, rtol=1e-4, atol=1e-8), name
    sgd_b = torch.cat([b.flatten() for b in runs[("sgd", 0.5)].values()]).abs()
    adamw_b = torch.cat([b.flatten() for b in runs[("adamw_torch", 0.5)].values()]).abs()
    assert adamw_b.median() > 0.49 and sgd_b.std() > 0.1 * sgd_b.mean()
    assert not torch.allclose(sgd_b, adamw_b)


def test_loraplus_and_optim_are_recorded_math_keys():
    from tunesmith.config import MATH_KEYS

    assert {"optim", "loraplus_lr_ratio", "quantization_bit", "use_dora", "pissa_init"} <= set(MATH_KEYS)


def adamw_steps(fused: bool | None, steps: int = 5) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    """A 64x64 weight after `steps` AdamW steps on fixed gradients: `make_optimizer('adamw_torch')`
    (fused=None) or torch's per-tensor loop (fused=False)."""
    generator = torch.Generator().manual_seed(0)

    def draw() -> torch.Tensor:
        return torch.randn(64, 64, generator=generator)

    weight = torch.nn.Parameter(draw())
    groups = [{"params": [weight], "weight_decay": 0.1}]
    args = TrainArgs(learning_rate=0.01)
    optimizer = make_optimizer("adamw_torch", groups, args, CPU) if fused is None else \
        torch.optim.AdamW(groups, lr=0.01, eps=args.adam_epsilon, foreach=False, fused=False)
    for _ in range(steps):
        weight.grad = draw()
        optimizer.step()
    return weight.detach().clone(), optimizer


def test_adamw_torch_is_fused_on_the_cpu_with_the_loop_s_results():
    fused, optimizer = adamw_steps(None)
    assert optimizer.defaults["fused"] is True
    loop, plain = adamw_steps(False)
    assert plain.defaults["fused"] is False
    assert (loop - adamw_steps(False, steps=0)[0]).abs().max() > 1e-2  # the steps moved it
    assert (fused - loop).abs().max() <= 1e-6


def test_fused_applies_only_to_plain_float_tensors_on_one_device():
    from tunesmith.train.optimizers import fused_applies

    float_param = torch.nn.Parameter(torch.zeros(3))
    assert fused_applies([{"params": [float_param]}, {"params": [torch.nn.Parameter(torch.zeros(3).bfloat16())]}])
    assert not fused_applies([{"params": []}])
    assert not fused_applies([{"params": [float_param, torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]}])
    assert not fused_applies([{"params": [torch.nn.Parameter(torch.zeros(3, device="meta"))]}])
