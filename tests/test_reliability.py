"""Reliability and safety of training runs: crash-safe checkpoints (kill -9 of real `tunesmith
train` processes, also in the middle of a save), exact resume, stop signals, the NaN policy, an
unwritable or full output_dir, and the safe defaults of model loading and the API."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import identity_dataset

from tunesmith import run_folder as ckpt
from tunesmith.config import load_config
from tunesmith.errors import UserError

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


# ------------------------------------------------------------------------------------- helpers

def settings(model_dir: Path, data_dir: Path, out: Path, **extra: object) -> dict:
    cfg = {"model_name_or_path": str(model_dir), "dataset": "ident", "dataset_dir": str(data_dir),
           "cutoff_len": 96, "output_dir": str(out), "per_device_train_batch_size": 2, "learning_rate": 5e-3,
           "max_steps": 6, "logging_steps": 1, "save_steps": 0, "lr_scheduler_type": "constant",
           "preprocessing_num_workers": 1, "seed": 11, "report_to": "none"}
    cfg.update(extra)
    return cfg


def train(overrides: dict):
    from tunesmith.train import run_training

    return run_training(load_config(None, overrides))


def log_entries(out: Path) -> list[dict]:
    path = out / "trainer_log.jsonl"
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return entries


def step_losses(out: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in log_entries(out) if "loss" in e]


def last_step(out: Path) -> int:
    steps = [e["step"] for e in log_entries(out) if "loss" in e]
    return steps[-1] if steps else 0


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def slow_saves(seconds: float) -> dict[str, str]:
    """Environment for a run whose saves wait `seconds` before marking a folder complete."""
    hooks = str(Path(__file__).parent / "slow_saves")
    return {"TUNESMITH_SLOW_SAVE": str(seconds),
            "PYTHONPATH": os.pathsep.join(filter(None, [hooks, os.environ.get("PYTHONPATH")]))}


class Run:
    """One `python -m tunesmith train cfg.yaml ...` subprocess, its output kept in a file."""

    def __init__(self, cfg: Path, log: Path, *overrides: str, env: dict | None = None) -> None:
        self.log = log
        self.handle = open(log, "w")  # noqa: SIM115 (closed in wait)
        # A session of its own, so that a signal can go to its whole process group, as Ctrl-C does.
        self.proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "train", str(cfg), *overrides],
                                     stdout=self.handle, stderr=subprocess.STDOUT, env={**ENV, **(env or {})},
                                     start_new_session=True)

    def wait_for(self, condition, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended (rc {self.proc.returncode}) before the condition:\n{self.text()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"timed out waiting:\n{self.text()}")
            time.sleep(0.01)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.wait()

    def wait(self, timeout: float = 300) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            self.handle.close()
        return rc

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory, tiny_model_dir):
    """The data, the config file and the uninterrupted reference run of the fault-injection tests."""
    from conftest import REPO_DATA

    root = tmp_path_factory.mktemp("kill")
    data = identity_dataset(root / "data", REPO_DATA, rows=24)
    # Gradient accumulation, dropout (the RNG state must come back) and 6 steps per epoch, so
    # the kills land mid-epoch and resumes cross epochs.
    base = settings(tiny_model_dir, data, root / "ref", max_steps=36, save_steps=4, gradient_accumulation_steps=2,
                    lora_dropout=0.1, lr_scheduler_type="cosine", warmup_steps=3)
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base))
    reference = Run(cfg, root / "ref.log")
    assert reference.wait() == 0, reference.text()
    return root, cfg, base


# ------------------------------------------------------------------------------------- kill -9

def test_kill9_anywhere_and_during_a_save_then_resume_is_exact(kill_setup):
    root, cfg, base = kill_setup
    ref = root / "ref"
    out = root / "killed"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    note = f"(random seed {seed})"
    resume = [f"output_dir={out}", "resume_from_checkpoint=true"]

    # Three kills at random steps, each run resumed from the newest complete checkpoint.
    start = 0
    for i in range(3):
        target = start + (rng.randint(2, 9) if i else rng.randint(9, 12))  # the first leaves checkpoint-8
        run = Run(cfg, root / f"kill{i}.log", *(resume if i else [f"output_dir={out}"]))
        run.wait_for(lambda run=run: "first step after" in run.text())  # the log was cut back on resume
        run.wait_for(lambda target=target: last_step(out) >= target)
        run.kill9()
        newest = ckpt.list_checkpoints(out)[-1][0]
        assert newest >= start, note
        if i:
            assert f"Resuming from the newest complete checkpoint: {out / f'checkpoint-{start}'}" in run.text(), note
        start = newest
        assert not (out / ckpt.COMPLETE).exists(), note  # no final outputs claimed

    # A kill in the middle of a save (the save sleeps inside its temporary folder).
    run = Run(cfg, root / "kill-save.log", *resume, env=slow_saves(60))
    run.wait_for(lambda: any(p.name.startswith(".tmp-checkpoint-") and any(p.iterdir()) for p in out.iterdir()))
    run.kill9()
    leftover = [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert leftover, note
    assert ckpt.list_checkpoints(out)[-1][0] == start, "a half-written checkpoint looks complete " + note

    # The newest checkpoint then loses the end of a file: it must be skipped with a message.
    newest_path = out / f"checkpoint-{start}"
    weights = newest_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    previous = ckpt.list_checkpoints(out)[-2][1]

    # Then Ctrl-C (to the process group, data-loader workers included): the step finishes, a
    # checkpoint is written, the run says how to resume.
    run = Run(cfg, root / "sigint.log", *resume, "dataloader_num_workers=1")
    resumed_from = int(previous.name.split("-")[1])
    run.wait_for(lambda: "first step after" in run.text())
    run.wait_for(lambda: last_step(out) >= resumed_from + 3)
    os.killpg(run.proc.pid, signal.SIGINT)
    rc = run.wait()
    text = run.text()
    assert f"warning: skipping {newest_path}: adapter_model.safetensors is 100 bytes" in text, note
    assert f"Resuming from the newest complete checkpoint: {previous}" in text, note
    assert "Cleaned up after an interrupted run" in text and leftover[0] in text, note
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")], note
    assert rc == 128 + signal.SIGINT, text
    stopped = last_step(out)
    assert f"training stopped by SIGINT after step {stopped} of 36; checkpoint written: {out}/checkpoint-{stopped}" \
        in text, note
    assert f"Resume with: tunesmith train {cfg} output_dir={out} dataloader_num_workers=1 " \
           "resume_from_checkpoint=true" in text, note
    assert ckpt.checkpoint_problem(out / f"checkpoint-{stopped}") is None

    # The printed command finishes the run.
    run = Run(cfg, root / "final.log", *resume)
    assert run.wait() == 0, run.text()
    assert f"Resuming from the newest complete checkpoint: {out / f'checkpoint-{stopped}'}" in run.text()

    assert step_losses(out) == step_losses(ref), note
    assert [s for s, _ in step_losses(out)] == list(range(1, 37))
    assert_same_tensors(adapter(out), adapter(ref))
    assert ckpt.final_outputs_problem(out) is None
    assert ckpt.final_outputs_problem(ref) is None


def test_second_signal_stops_at_once(kill_setup):
    root, cfg, _ = kill_setup
    out = root / "double"
    run = Run(cfg, root / "double.log", f"output_dir={out}", "save_steps=2", env=slow_saves(120))
    run.wait_for(lambda: (out / f".tmp-checkpoint-2-{run.proc.pid}").is_dir())
    run.proc.send_signal(signal.SIGTERM)  # first: finish the step, then save and stop...
    run.wait_for(lambda: "SIGTERM received" in run.text())
    sent = time.monotonic()
    run.proc.send_signal(signal.SIGINT)  # ...second: stop now, not after the 120 s save
    rc = run.wait(timeout=60)
    assert time.monotonic() - sent < 30
    assert rc == 130, run.text()
    assert "interrupted" in run.text()
    assert ckpt.list_checkpoints(out) == []  # the save that was cut short is not taken as complete
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-checkpoint")]


# ------------------------------------------------------------------------------------- exact resume

@pytest.fixture()
def data_dir(tmp_path, repo_data) -> Path:
    return identity_dataset(tmp_path / "data", repo_data, rows=24)


def test_resume_is_exact_with_packing_and_accumulation_mid_epoch(tmp_path, tiny_model_dir, data_dir):
    # 24 samples, 2 per micro-batch, 2 micro-batches per step: 6 steps per epoch; checkpoint-4 is mid-epoch.
    common = {"packing": True, "gradient_accumulation_steps": 2, "max_steps": 10, "lora_dropout": 0.1,
              "lr_scheduler_type": "cosine", "warmup_steps": 2}
    full = tmp_path / "full"
    train(settings(tiny_model_dir, data_dir, full, **common))
    part = tmp_path / "part"
    train(settings(tiny_model_dir, data_dir, part, save_steps=4, **common))
    assert [p for _, p in ckpt.list_checkpoints(part)] == [part / "checkpoint-4", part / "checkpoint-8"]
    train(settings(tiny_model_dir, data_dir, part, save_steps=4, resume_from_checkpoint=str(part / "checkpoint-4"),
                   **common))

    def figures(out: Path) -> list[tuple]:
        return [(e["step"], e["loss"], e["learning_rate"], e["grad_norm"]) for e in log_entries(out)]

    assert figures(part) == figures(full)  # the log was cut back to step 4, then continued
    assert len(figures(full)) == 10
    assert_same_tensors(adapter(part), adapter(full))


def test_truncated_checkpoint_is_skipped_with_a_message(tmp_path, capsys):
    out = tmp_path / "run"
    for step in (2, 4):
        ckpt.atomic_folder(out / f"checkpoint-{step}", lambda f, step=step: (
            (f / ckpt.STATE).write_text(json.dumps({"global_step": step})),
            (f / "optimizer.pt").write_bytes(b"x" * 1000)))
    assert ckpt.find_resume_checkpoint("true", out) == out / "checkpoint-4"
    (out / "checkpoint-4" / "optimizer.pt").write_bytes(b"x" * 10)
    assert ckpt.find_resume_checkpoint("true", out) == out / "checkpoint-2"
    err = capsys.readouterr().err
    assert f"skipping {out / 'checkpoint-4'}: optimizer.pt is 10 bytes, 1000 were written" in err
    assert f"Resuming from the newest complete checkpoint: {out / 'checkpoint-2'}" in err
    with pytest.raises(UserError, match="is damaged: optimizer.pt is 10 bytes"):
        ckpt.find_resume_checkpoint(str(out / "checkpoint-4"), out)
    (out / "checkpoint-2" / "optimizer.pt").unlink()
    with pytest.raises(UserError, match="no checkpoint in .* is intact"):
        ckpt.find_resume_checkpoint("true", out)


def test_same_size_damage_is_found_by_the_hash_and_the_previous_checkpoint_is_used(tmp_path, capsys):
    out = tmp_path / "run"
    for step in (2, 4):
        ckpt.atomic_folder(out / f"checkpoint-{step}", lambda f, step=step: (
            (f / ckpt.STATE).write_text(json.dumps({"global_step": step})),
            (f / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4)))
    damaged = out / "checkpoint-4" / "adapter_model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[500] ^= 0xFF  # one flipped byte: the size is unchanged
    damaged.write_bytes(bytes(data))
    assert ckpt.find_resume_checkpoint("true", out) == out / "checkpoint-2"
    assert f"skipping {out / 'checkpoint-4'}: adapter_model.safetensors does not hold the bytes that were written" \
        in capsys.readouterr().err
    with pytest.raises(UserError, match="is damaged: adapter_model.safetensors does not hold the bytes"):
        ckpt.find_resume_checkpoint(str(out / "checkpoint-4"), out)


def test_a_failed_save_leaves_nothing_and_the_final_marker_comes_last(tmp_path):
    out = tmp_path / "run"
    out.mkdir()

    def broken(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(b"1" * 100)
        raise RuntimeError("crash in the middle of writing")

    with pytest.raises(RuntimeError):
        ckpt.atomic_folder(out / "checkpoint-1", broken)
    assert list(out.iterdir()) == []
    # Final outputs: a crash while they are staged leaves the run folder without its marker.
    ckpt.write_final_outputs(out, lambda f: (f / "adapter_model.safetensors").write_bytes(b"w" * 50))
    assert ckpt.final_outputs_problem(out) is None
    with pytest.raises(RuntimeError):
        ckpt.write_final_outputs(out, broken)
    assert "no .complete marker" in ckpt.final_outputs_problem(out)
    ckpt.write_final_outputs(out, lambda f: (f / "adapter_model.safetensors").write_bytes(b"w" * 50))
    (out / "adapter_model.safetensors").write_bytes(b"w" * 7)
    assert "adapter_model.safetensors is 7 bytes, 50 were written" in ckpt.final_outputs_problem(out)
    # Leftovers of a killed save are removed; a checkpoint caught mid-replacement is put back.
    (out / ".tmp-checkpoint-9-123").mkdir()
    ckpt.atomic_folder(out / "checkpoint-5", lambda f: (f / ckpt.STATE).write_text("{}"))
    (out / "checkpoint-5").rename(out / ".old-checkpoint-5-77")
    assert ckpt.clean_interrupted(out) == ["restored checkpoint-5", "removed .tmp-checkpoint-9-123"]
    assert ckpt.checkpoint_problem(out / "checkpoint-5") is None


def test_resume_refuses_changed_math_unless_allowed(tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "run"
    first = settings(tiny_model_dir, data_dir, out, save_steps=2, max_steps=4)
    train(first)
    changed = {**first, "resume_from_checkpoint": str(out / "checkpoint-2"), "learning_rate": 0.5, "seed": 3}
    with pytest.raises(UserError, match=r"was trained with other settings: learning_rate: 0\.005 in the checkpoint, "
                                        r"0\.5 now; seed: 11 in the checkpoint, 3 now\.") as err:
        train(changed)
    assert "resume_allow_changes: true" in str(err.value)
    train({**changed, "resume_allow_changes": True})
    noted = [e for e in log_entries(out) if "resumed_with_changes" in e]
    assert noted == [{"step": 2, "resumed_with_changes": {"learning_rate": {"checkpoint": 0.005, "now": 0.5},
                                                           "seed": {"checkpoint": 11, "now": 3}}}]
    rates = [e["learning_rate"] for e in log_entries(out) if "loss" in e]
    assert rates == [0.005, 0.005, 0.5, 0.5]  # the new rate is the one used after the resume


def test_trim_log_drops_later_steps_and_a_cut_line(tmp_path):
    path = tmp_path / "trainer_log.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)] + [json.dumps({"step": 3, "eval_loss": 2})]
    path.write_text("\n".join(lines) + "\n" + '{"step": 6, "lo')
    assert ckpt.trim_log(path, 3) == 3
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 3]


# ------------------------------------------------------------------------------------- NaN policy

@pytest.fixture(scope="module")
def poisoned_model(tmp_path_factory, default_model_dir):
    """A tiny untied model whose input embedding of one token is inf: any batch holding that
    token has a non-finite loss, the others train normally (the token never occurs elsewhere)."""
    from conftest import build_tiny_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    folder = build_tiny_model(tmp_path_factory.mktemp("poisoned"), default_model_dir, tie=False)
    token = AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids("<|endoftext|>")
    weights = load_file(folder / "model.safetensors")
    weights["model.embed_tokens.weight"][token] = float("inf")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture()
def poison_data(tmp_path) -> Path:
    rows = [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(str(k) for k in range(i + 1))}
            for i in range(8)]
    for i in (2, 3):  # a stray special token in the prompt
        rows[i]["instruction"] = f"Count to {i}. <|endoftext|>"
    folder = tmp_path / "pdata"
    folder.mkdir()
    (folder / "poison.json").write_text(json.dumps(rows))
    (folder / "dataset_info.json").write_text(json.dumps({"poison": {"file_name": "poison.json"}}))
    return folder


def nan_settings(model: Path, data: Path, out: Path, **extra: object) -> dict:
    return settings(model, data, out, dataset="poison", per_device_train_batch_size=1, shuffle=False,
                    max_steps=8, save_steps=2, **extra)


def test_nan_stop_names_the_step_the_rows_and_the_last_checkpoint(tmp_path, poisoned_model, poison_data):
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        train(nan_settings(poisoned_model, poison_data, out))
    text = str(err.value)
    assert re.search(r"step 3: the loss is (nan|inf)", text) and "the update was not applied" in text
    assert "poison row 2 (sample 2)" in text
    assert f"The last good checkpoint is {out / 'checkpoint-2'}" in text
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]
    assert all(torch.isfinite(t).all() for t in adapter(out / "checkpoint-2").values())


def test_nan_skip_drops_the_steps_and_stops_after_too_many_in_a_row(tmp_path, poisoned_model, poison_data):
    out = tmp_path / "skip"
    result = train(nan_settings(poisoned_model, poison_data, out, nan_policy="skip", max_skipped_steps=3))
    assert result.metrics["skipped_steps"] == 2
    losses = dict(step_losses(out))
    assert sorted(losses) == [1, 2, 5, 6, 7, 8]  # skipped steps log no loss...
    assert all(loss == loss for loss in losses.values())  # ...and no nan reaches the log
    assert [e.get("skipped_steps") for e in log_entries(out)] == [None, None, 1, 2, 2, 2, 2, 2]
    assert all(torch.isfinite(t).all() for t in adapter(out).values())
    with pytest.raises(UserError, match=r"step 4: 2 steps in a row had a non-finite loss .*max_skipped_steps: 2"):
        train(nan_settings(poisoned_model, poison_data, tmp_path / "skip2", nan_policy="skip", max_skipped_steps=2))


# ------------------------------------------------------------------------------------- disk

@contextlib.contextmanager
def tmpfs(path: Path, size: str, *options: str):
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_unwritable_output_dir_is_refused_before_any_work(tmp_path, tiny_model_dir, data_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=f"output_dir {blocker}/out cannot be created: Not a directory"):
        train(settings(tiny_model_dir, data_dir, blocker / "out"))
    with pytest.raises(UserError, match="output_dir /proc/tunesmith-run cannot be created"):
        train(settings(tiny_model_dir, data_dir, Path("/proc/tunesmith-run")))
    # Root ignores permission bits, but not a read-only mount.
    with tmpfs(tmp_path / "ro", "1M", "ro") as readonly, \
            pytest.raises(UserError, match=f"output_dir {readonly} is not writable: Read-only file system"):
        train(settings(tiny_model_dir, data_dir, readonly))


def test_full_disk_is_found_before_step_1_and_at_a_save(tmp_path, tiny_model_dir, data_dir):
    with tmpfs(tmp_path / "tiny", "1M") as small:
        with pytest.raises(UserError, match=r"has [\d.]+ [KM]iB free, and one checkpoint needs about 3\.\d MiB"):
            train(settings(tiny_model_dir, data_dir, small / "out"))
        assert not (small / "out" / "trainer_log.jsonl").exists()  # refused before step 1
    # Room for one checkpoint (3.5 MiB of it is the tokenizer) but not for two.
    with tmpfs(tmp_path / "six", "6M") as disk:
        out = disk / "out"
        with pytest.raises(UserError, match=r"has [\d.]+ MiB free, and checkpoint-4 needs about"):
            train(settings(tiny_model_dir, data_dir, out, save_steps=2))
        assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]
        assert ckpt.checkpoint_problem(out / "checkpoint-2") is None
        # A write that fills the disk anyway: a clear error, no partial folder, the old checkpoint intact.
        from safetensors.torch import save_file

        with pytest.raises(UserError, match="could not write .*checkpoint-9: No space left on device"):
            ckpt.atomic_folder(out / "checkpoint-9",
                               lambda f: save_file({"w": torch.zeros(2_000_000)}, f / "w.safetensors"))
        assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
        assert ckpt.checkpoint_problem(out / "checkpoint-2") is None
        # The message says what is actually there: the intact checkpoint, or that there is none.
        with pytest.raises(UserError, match=f"the newest complete checkpoint, {out / 'checkpoint-2'}, is intact"):
            ckpt.atomic_folder(out / "checkpoint-9",
                               lambda f: save_file({"w": torch.zeros(2_000_000)}, f / "w.safetensors"))
        empty = disk / "no-checkpoints"
        empty.mkdir()
        with pytest.raises(UserError, match="No space left on device. No checkpoint has been written in this run yet") \
                as err:
            ckpt.write_final_outputs(empty, lambda f: save_file({"w": torch.zeros(2_000_000)}, f / "w.safetensors"))
        assert "resume_from_checkpoint" not in str(err.value)


# ------------------------------------------------------------------------------------- safe defaults

def test_pickled_weights_need_the_opt_in_and_never_run_code(tmp_path, tiny_model_dir):
    from tunesmith.config import ModelArgs
    from tunesmith.model.load import load_model

    base = load_model(ModelArgs(model_name_or_path=str(tiny_model_dir)))
    good, bad = tmp_path / "good", tmp_path / "bad"
    for folder in (good, bad):
        shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(base.state_dict(), good / "pytorch_model.bin")
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({**base.state_dict(), "payload": Payload()}, bad / "pytorch_model.bin")
    with pytest.raises(UserError, match="allow_pickle_weights: true"):
        load_model(ModelArgs(model_name_or_path=str(good)))
    loaded = load_model(ModelArgs(model_name_or_path=str(good), allow_pickle_weights=True))
    ids = torch.tensor([[1, 20, 300, 4000]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, base(ids).logits)
    with pytest.raises(UserError, match="hold more than tensors, so they were not loaded"):
        load_model(ModelArgs(model_name_or_path=str(bad), allow_pickle_weights=True))
    assert not marker.exists()


def test_servers_bind_localhost_by_default():
    from tunesmith.api import DEFAULT_HOST
    from tunesmith.cli import build_parser

    assert DEFAULT_HOST == "127.0.0.1"
    assert build_parser().parse_args(["webui"]).host == "127.0.0.1"
    assert build_parser().parse_args(["api", "cfg.yaml"]).host is None  # then API_HOST, else DEFAULT_HOST


def test_api_limits_and_paths_in_requests_are_never_opened(tmp_path, tiny_model_dir, tiny_lora_run):
    """A FIFO given as a 'path' in a request would block any reader forever: the request is
    answered at once, so the server never opened it."""
    import http.client

    from tunesmith.api import MAX_MESSAGES, MAX_TOKENS_CAP, make_server, parse_chat_request
    from tunesmith.infer import ChatEngine

    assert parse_chat_request({"messages": [{"role": "user", "content": "x"}],
                               "max_tokens": 10**9}).gen["max_new_tokens"] == MAX_TOKENS_CAP
    engine = ChatEngine(load_config(None, {"model_name_or_path": str(tiny_model_dir), "output_dir": str(tiny_lora_run),
                                           "do_sample": False, "max_new_tokens": 4}))
    server = make_server(engine, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def post(body: dict) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
        try:
            conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    try:
        status, body = post({"model": str(fifo), "messages": [{"role": "user", "content": str(fifo)}],
                             "adapter_name_or_path": str(fifo), "max_tokens": 2})
        assert status == 200 and body["model"] == tiny_lora_run.name
        status, body = post({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"file://{fifo}"}}]}]})
        assert status == 400 and "only text parts" in body["error"]["message"]
        status, body = post({"messages": [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)})
        assert status == 400 and body["error"]["param"] == "messages" and str(MAX_MESSAGES) in body["error"]["message"]
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------- honest run folders

def test_an_overwritten_run_that_was_killed_is_not_loaded(tmp_path, tiny_model_dir, tiny_lora_run):
    from tunesmith.loading import source_for

    out = shutil.copytree(tiny_lora_run, tmp_path / "run")
    keys = {"model_name_or_path": str(tiny_model_dir), "output_dir": str(out)}
    assert source_for(load_config(None, keys)).adapters == (str(out),)  # the finished run loads
    # A new run takes the folder (overwrite_output_dir) and is killed before its final outputs.
    ckpt.claim_output_dir(out, resuming=False, overwrite=True)
    ckpt.atomic_folder(out / "checkpoint-3", lambda f: (
        shutil.copy(tiny_lora_run / "adapter_config.json", f),
        shutil.copy(tiny_lora_run / "adapter_model.safetensors", f),
        (f / ckpt.STATE).write_text(json.dumps({"global_step": 3}))))
    assert (out / "adapter_model.safetensors").exists()  # the old run's adapter is still there...
    with pytest.raises(UserError, match="the final outputs are not complete.*did not finish") as err:
        source_for(load_config(None, keys))  # ...but is never taken for this run's result
    assert f"adapter_name_or_path={out / 'checkpoint-3'}" in str(err.value)
    # The command says the same, without a traceback.
    cfg = tmp_path / "chat.yaml"
    cfg.write_text(yaml.safe_dump(keys))
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "chat", str(cfg)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=ENV, timeout=300)
    assert proc.returncode == 2 and "did not finish" in proc.stderr and "Traceback" not in proc.stderr


def test_chat_on_a_folder_with_nothing_trained_is_an_error_and_the_base_is_asked_for_explicitly(
        tmp_path, tiny_model_dir):
    from tunesmith.loading import source_for

    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no trained adapter or model"):
        source_for(load_config(None, {"model_name_or_path": str(tiny_model_dir), "output_dir": str(empty)}))
    with pytest.raises(UserError, match="does not exist"):
        source_for(load_config(None, {"model_name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path / "x")}))
    base = source_for(load_config(None, {"model_name_or_path": str(tiny_model_dir)}))  # no output_dir: the base
    assert base.adapters == () and base.description == f"the base model {tiny_model_dir}"
