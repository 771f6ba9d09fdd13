"""The training engine on tiny random models: it learns, accumulation is exact, resume is exact,
outputs load with peft, TensorBoard is written, and a used output_dir is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import identity_dataset

from tunesmith.config import load_config
from tunesmith.errors import UserError


def base_overrides(tmp_path: Path, model_dir: Path, data_dir: Path, **extra: object) -> dict:
    cfg = {
        "model_name_or_path": str(model_dir), "dataset": "ident", "dataset_dir": str(data_dir),
        "cutoff_len": 128, "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 2,
        "learning_rate": 5e-3, "max_steps": 6, "logging_steps": 1, "save_steps": 0, "lr_scheduler_type": "constant",
        "preprocessing_num_workers": 1, "seed": 7, "report_to": "none",
    }
    cfg.update(extra)
    return cfg


def losses(output_dir: Path) -> list[float]:
    lines = (output_dir / "trainer_log.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if "loss" in json.loads(x)]


@pytest.fixture()
def data_dir(tmp_path, repo_data) -> Path:
    return identity_dataset(tmp_path / "data", repo_data)


def train(overrides: dict):
    from tunesmith.train import run_training

    return run_training(load_config(None, overrides))


def test_loss_falls_and_outputs_are_standard(tmp_path, tiny_model_dir, data_dir):
    from peft import PeftModel
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    result = train(base_overrides(tmp_path, tiny_model_dir, data_dir, max_steps=12, report_to="tensorboard",
                                  plot_loss=True))
    seen = losses(out)
    assert len(seen) == 12
    # a random model on 12 identity rows: about 0.4 nats lower after two epochs; noise between steps is ~0.05
    assert sum(seen[-3:]) / 3 < sum(seen[:3]) / 3 - 0.3, seen
    # The adapter folder loads with plain peft and gives the in-process model's logits.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, out).eval()
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    trained = result.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, trained(ids).logits, atol=1e-5)
    # Tokenizer saved with the training chat template; config and results written.
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    assert (out / "config.yaml").exists() and (out / "training_loss.png").stat().st_size > 1000
    assert json.loads((out / "train_results.json").read_text())["global_step"] == 12
    events = list((out / "runs").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert len(acc.Scalars("train/loss")) == 12


def test_accumulation_equals_big_batch(tmp_path, tiny_model_dir, data_dir):
    """4 micro-batches of 1 == 1 batch of 4: same per-step losses over several updates."""
    big = train(base_overrides(tmp_path / "a", tiny_model_dir, data_dir, per_device_train_batch_size=4,
                               gradient_accumulation_steps=1, max_steps=3, output_dir=str(tmp_path / "a")))
    acc = train(base_overrides(tmp_path / "b", tiny_model_dir, data_dir, per_device_train_batch_size=1,
                               gradient_accumulation_steps=4, max_steps=3, output_dir=str(tmp_path / "b")))
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(la) == 3
    assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) < 1e-5
    for (name, p), (_, q) in zip(big.model.named_parameters(), acc.model.named_parameters(), strict=True):
        if p.requires_grad:
            assert torch.allclose(p, q, atol=1e-5), name


def test_accumulated_gradients_equal_big_batch_gradients(tiny_model_dir, default_model_dir):
    from transformers import AutoModelForCausalLM

    from tunesmith.data.batching import Sample, collate_padded
    from tunesmith.train.loop import accumulate

    torch.manual_seed(0)
    samples = []
    for i in range(4):
        n = 10 + 3 * i
        ids = torch.randint(5, 1000, (n,)).tolist()
        labels = [-100] * 4 + ids[4:]
        samples.append(Sample(ids, labels, i))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    from tunesmith.train.loss import SFTModule

    module = SFTModule(model)

    def grads(batches):
        model.zero_grad()
        count = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        loss = accumulate(module, batches, global_count=count, world=1, weight=1.0)
        return loss, [p.grad.clone() for p in model.parameters()]

    big_loss, big = grads([collate_padded(samples, 0)])
    acc_loss, acc = grads([collate_padded([s], 0) for s in samples])
    assert abs(big_loss - acc_loss) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(big, acc, strict=True)) < 1e-5


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_model_dir, data_dir):
    full = tmp_path / "full"
    train(base_overrides(tmp_path, tiny_model_dir, data_dir, output_dir=str(full), max_steps=8,
                         lr_scheduler_type="cosine", warmup_steps=2, lora_dropout=0.1))
    part = tmp_path / "part"
    train(base_overrides(tmp_path, tiny_model_dir, data_dir, output_dir=str(part), max_steps=8,
                         lr_scheduler_type="cosine", warmup_steps=2, lora_dropout=0.1, save_steps=3))
    # Throw away everything after checkpoint-3 and resume from it.
    assert sorted(p.name for p in part.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    log = part / "trainer_log.jsonl"
    log.write_text("\n".join(log.read_text().splitlines()[:3]) + "\n")
    train(base_overrides(tmp_path, tiny_model_dir, data_dir, output_dir=str(part), max_steps=8,
                         lr_scheduler_type="cosine", warmup_steps=2, lora_dropout=0.1, save_steps=3,
                         resume_from_checkpoint=str(part / "checkpoint-3")))
    assert losses(part) == losses(full)


def test_save_total_limit_rotates_checkpoints(tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "out"
    train(base_overrides(tmp_path, tiny_model_dir, data_dir, max_steps=7, save_steps=2, save_total_limit=2))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert all((p / ".complete").exists() and (p / "optimizer.pt").exists() for p in out.glob("checkpoint-*"))


def test_output_dir_holding_a_run_is_refused(tmp_path, tiny_model_dir, data_dir):
    train(base_overrides(tmp_path, tiny_model_dir, data_dir, max_steps=1))
    with pytest.raises(UserError, match="already holds a run"):
        train(base_overrides(tmp_path, tiny_model_dir, data_dir, max_steps=1))
    # overwrite_output_dir starts afresh (and keeps unrelated files)
    (tmp_path / "out" / "notes.txt").write_text("mine")
    train(base_overrides(tmp_path, tiny_model_dir, data_dir, max_steps=2, overwrite_output_dir=True))
    assert len(losses(tmp_path / "out")) == 2
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kind,extra", [("full", {}), ("freeze", {"freeze_trainable_layers": 1})])
def test_full_and_freeze_write_a_model_folder(tmp_path, tiny_model_dir, data_dir, kind, extra):
    from transformers import AutoModelForCausalLM

    result = train(base_overrides(tmp_path, tiny_model_dir, data_dir, finetuning_type=kind, max_steps=2,
                                  learning_rate=1e-3, **extra))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([[1, 200, 300, 400]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, result.model.eval()(ids).logits, atol=1e-5)


def test_same_seed_same_losses(tmp_path, tiny_model_dir, data_dir):
    train(base_overrides(tmp_path, tiny_model_dir, data_dir, output_dir=str(tmp_path / "x"), max_steps=3,
                         lora_dropout=0.2))
    train(base_overrides(tmp_path, tiny_model_dir, data_dir, output_dir=str(tmp_path / "y"), max_steps=3,
                         lora_dropout=0.2))
    assert losses(tmp_path / "x") == losses(tmp_path / "y")


def test_cli_train_prints_progress_and_errors_cleanly(tmp_path, tiny_model_dir, data_dir):
    cfg = tmp_path / "cfg.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(base_overrides(tmp_path, tiny_model_dir, data_dir, max_steps=2)))
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(cfg)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "trainable params" in proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(cfg), "learning_rte=1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "unknown key 'learning_rte'" in proc.stderr and "learning_rate" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the process's start is read from /proc")
def test_cli_run_times_count_from_the_process_start(tmp_path, tiny_model_dir, data_dir):
    import yaml

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base_overrides(tmp_path, tiny_model_dir, data_dir, max_steps=1)))
    # The process waits 3 s before any tunesmith code runs: a clock the command's code started
    # would miss them. Seen from here (unbuffered), the first step is announced a little after it was taken.
    code = "import sys, time; time.sleep(3); from tunesmith.cli import main; sys.exit(main(sys.argv[1:]))"
    begun = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-u", "-c", code, "train", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen, output = None, []
    for line in proc.stdout:
        output.append(line)
        if seen is None and "first step after" in line:
            seen = time.monotonic() - begun
    assert proc.wait(timeout=60) == 0, "".join(output)
    assert seen is not None, "".join(output)
    results = json.loads((tmp_path / "out" / "train_results.json").read_text())
    # A clock started after the 3 s wait would read at least 3 s short; the process's start is
    # known to a 10 ms clock tick.
    assert seen - 2.5 <= results["first_step_seconds"] <= seen + 0.02
    assert 3 <= results["first_step_seconds"] <= results["train_runtime"] <= time.monotonic() - begun


def test_eval_loss_is_token_weighted_over_the_whole_eval_set(tmp_path, tiny_model_dir, data_dir):
    from tunesmith.data.batching import Sample, collate_padded
    from tunesmith.data.pipeline import tokenize_datasets
    from tunesmith.model.load import load_tokenizer
    from tunesmith.train.loss import reference_loss

    overrides = base_overrides(tmp_path, tiny_model_dir, data_dir, max_steps=4, val_size=4, eval_strategy="steps",
                               eval_steps=2, per_device_eval_batch_size=3)
    result = train(overrides)
    lines = [json.loads(x) for x in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    evals = [(e["step"], e["eval_loss"]) for e in lines if "eval_loss" in e]
    assert [s for s, _ in evals] == [2, 4]
    # Recompute the final eval loss by hand: one sample at a time, summed, divided by all tokens.
    cfg = load_config(None, overrides)
    data = tokenize_datasets(cfg, load_tokenizer(cfg.model), quiet=True)
    assert len(data.eval) == 4
    total, count = 0.0, 0
    model = result.model.eval()
    with torch.no_grad():
        for i, e in enumerate(data.eval):
            loss_sum, n = reference_loss(model, collate_padded([Sample(e.input_ids, e.labels, i)], 0))
            total, count = total + float(loss_sum), count + n
    assert abs(evals[-1][1] - total / count) < 1e-5


def test_continue_training_an_adapter(tmp_path, tiny_model_dir, data_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    first = tmp_path / "first"
    train(base_overrides(tmp_path, tiny_model_dir, data_dir, output_dir=str(first), max_steps=2))
    second = tmp_path / "second"
    result = train(base_overrides(tmp_path, tiny_model_dir, data_dir, output_dir=str(second), max_steps=2,
                                  adapter_name_or_path=str(first)))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(base, second).eval()
    once = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), first).eval()
    ids = torch.tensor([[1, 200, 300, 400]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, result.model.eval()(ids).logits, atol=1e-5)
        assert not torch.allclose(reloaded(ids).logits, once(ids).logits, atol=1e-4)
