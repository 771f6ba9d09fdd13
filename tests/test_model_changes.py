"""Training changes the model only while it trains: after a run ends, however it ends, every
module runs the library's own forward again, LoRA inputs are cast again and sdpa is plain sdpa."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from helpers import make_dataset

from tunesmith.config import load_config
from tunesmith.errors import UserError
from tunesmith.train import loop
from tunesmith.train.attention import VARLEN_SDPA, attention_implementation

ROWS = [{"instruction": f"Question {i}: what is {i} plus {i}?", "output": f"It is {2 * i}."} for i in range(8)]


def changed_parts(model) -> list[str]:
    """What of the model is not as the library built it (empty: nothing)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = [f"{name or 'model'}.forward" for name, m in model.named_modules() if "forward" in m.__dict__]
    found += [f"{name}.cast_input_dtype_enabled" for name, m in model.named_modules()
              if isinstance(m, BaseTunerLayer) and not m.cast_input_dtype_enabled]
    if attention_implementation(model) == VARLEN_SDPA:
        found.append("attention")
    return found


@pytest.fixture()
def run_settings(tmp_path, tiny_model_dir) -> dict:
    data = make_dataset(tmp_path / "data", {"sums": {"file_name": "sums.json"}}, {"sums.json": ROWS})
    return {"model_name_or_path": str(tiny_model_dir), "dataset": "sums", "dataset_dir": str(data),
            "cutoff_len": 64, "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 2,
            "max_steps": 3, "logging_steps": 1, "save_steps": 0, "preprocessing_num_workers": 1,
            "attn_implementation": "sdpa"}


@pytest.fixture()
def trained_model(monkeypatch) -> list:
    """The model each run trains, as open_run built it (the real function, only watched)."""
    seen: list = []
    real = loop._load_model

    def watched(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(loop, "_load_model", watched)
    return seen


def fail_at_step(monkeypatch, n: int, make_error) -> None:
    """Let the real optimizer step run, then end the run at step n the way make_error() does."""
    real = loop.optimizer_step

    def step(trainer, step, batches, weight):
        result = real(trainer, step, batches, weight)
        if step + 1 == n:
            make_error(trainer)
        return result

    monkeypatch.setattr(loop, "optimizer_step", step)


def test_changes_are_in_place_while_training_and_gone_after_success(run_settings, trained_model, monkeypatch):
    during: list[list[str]] = []
    real = loop.optimizer_step
    monkeypatch.setattr(loop, "optimizer_step",
                        lambda trainer, *a: (during.append(changed_parts(trainer.setup.model)), real(trainer, *a))[1])
    result = loop.run_training(load_config(None, run_settings))
    assert any(part.endswith(".forward") for part in during[0]) and "attention" in during[0]
    assert changed_parts(result.model) == [] and changed_parts(trained_model[0]) == []


def test_a_nan_stop_restores_the_model(run_settings, trained_model):
    settings = {**run_settings, "learning_rate": 1e30, "max_grad_norm": 0.0, "lr_scheduler_type": "constant"}
    with pytest.raises(UserError, match="the update was not applied"):
        loop.run_training(load_config(None, settings))
    assert changed_parts(trained_model[0]) == []


def test_a_stop_signal_restores_the_model(run_settings, trained_model, monkeypatch):
    real = loop.optimizer_step

    def ctrl_c_during_step_1(trainer, step, batches, weight):
        if step == 0:  # a real SIGINT to this process, caught by the run's own handler
            os.kill(os.getpid(), signal.SIGINT)
        return real(trainer, step, batches, weight)

    monkeypatch.setattr(loop, "optimizer_step", ctrl_c_during_step_1)
    with pytest.raises(UserError, match="training stopped by SIGINT after step 1 of 3"):
        loop.run_training(load_config(None, run_settings))
    assert changed_parts(trained_model[0]) == []
    assert (Path(run_settings["output_dir"]) / "checkpoint-1").is_dir()


def test_an_exception_restores_the_model(run_settings, trained_model, monkeypatch):
    def crash(trainer):
        raise RuntimeError("out of memory (simulated by the test)")

    fail_at_step(monkeypatch, 2, crash)
    with pytest.raises(RuntimeError, match="simulated"):
        loop.run_training(load_config(None, run_settings))
    assert changed_parts(trained_model[0]) == []
