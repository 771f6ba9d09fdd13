"""report_to: mlflow / wandb, checked by reading the real stores back after a real (tiny) training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_dataset

from tunesmith.config import load_config
from tunesmith.errors import UserError

pytest.importorskip("mlflow")

ROWS = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]]


@pytest.fixture()
def data_dir(tmp_path) -> Path:
    return make_dataset(tmp_path / "data", {"sums": {"file_name": "sums.json"}}, {"sums.json": ROWS})


def train(tmp_path: Path, model_dir: Path, data_dir: Path, report_to: str) -> Path:
    from tunesmith.train import run_training

    out = tmp_path / "run"
    run_training(load_config(None, {
        "model_name_or_path": str(model_dir), "dataset": "sums", "eval_dataset": "sums", "dataset_dir": str(data_dir),
        "cutoff_len": 64, "output_dir": str(out), "per_device_train_batch_size": 2, "learning_rate": 5e-3,
        "max_steps": 4, "logging_steps": 1, "save_steps": 0, "eval_strategy": "steps", "eval_steps": 2,
        "preprocessing_num_workers": 1, "report_to": report_to, "plot_loss": True, "overwrite_cache": True}))
    return out


def logged(out: Path) -> tuple[list[dict], list[dict]]:
    entries = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [e for e in entries if "loss" in e], [e for e in entries if "eval_loss" in e]


@pytest.mark.slow
@pytest.mark.parametrize("store", ["folder", "sqlite"])
def test_mlflow_run_holds_config_metrics_and_plot(tmp_path, monkeypatch, tiny_model_dir, data_dir, store):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri() if store == "folder" else f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it before using a plain folder
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tiny-sums")
    mlflow.set_tracking_uri(uri)  # the process-wide default may have been fixed by an earlier test
    out = train(tmp_path, tiny_model_dir, data_dir, "mlflow,tensorboard")

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny-sums")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    resolved = load_config(out / "config.yaml").to_flat()
    assert run.data.params["learning_rate"] == str(resolved["learning_rate"])
    assert run.data.params["output_dir"] == str(out)
    assert set(run.data.params) == set(resolved)
    train_entries, eval_entries = logged(out)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [(e["step"], e["loss"]) for e in train_entries]
    for key in ("learning_rate", "grad_norm", "tokens_per_second"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3, 4]
    evals = client.get_metric_history(run.info.run_id, "eval_loss")
    assert [(m.step, round(m.value, 6)) for m in evals] == [(e["step"], e["eval_loss"]) for e in eval_entries]
    assert run.data.metrics["final_global_step"] == 4
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"training_loss.png", "train_results.json"} <= artifacts


def read_wandb_records(run_dir: Path) -> list:
    """Every record of an offline run's .wandb file: wandb's protobuf Records, framed in the
    LevelDB log format (32 KiB blocks; each piece has a 7-byte header: checksum, length, kind)."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or (length == 0 and kind == 0):  # block trailer or zero padding
            pos += left
            continue
        piece = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = piece if kind in (1, 2) else pending + piece  # FULL/FIRST start, MIDDLE/LAST go on
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@pytest.mark.slow
def test_wandb_offline_run_holds_config_metrics_and_plot(tmp_path, monkeypatch, tiny_model_dir, data_dir):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "tiny-sums")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_SERVICE", raising=False)  # a service of this process's own, which teardown waits for
    out = train(tmp_path, tiny_model_dir, data_dir, "wandb")
    # run.finish() returns before W&B's service has written out and closed the run's file; a
    # command's exit waits for it (wandb's atexit teardown), and so does this test.
    import wandb
    wandb.teardown()

    run_dirs = list((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    records = read_wandb_records(run_dirs[0])
    assert records and records[-1].WhichOneof("record_type") == "exit", "the run's file was read before it was complete"
    # The config comes in the run record, later changes in config records.
    config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") in ("run", "config")
              for item in (r.run.config.update if r.HasField("run") else r.config.update)}
    resolved = load_config(out / "config.yaml").to_flat()
    assert config["learning_rate"] == resolved["learning_rate"] and config["output_dir"] == str(out)
    assert set(resolved) <= set(config)
    rows: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            rows.setdefault(int(row["_step"]), {}).update(row)
    train_entries, eval_entries = logged(out)
    assert [(s, round(rows[s]["loss"], 6)) for s in sorted(rows) if "loss" in rows[s]] == \
        [(e["step"], e["loss"]) for e in train_entries]
    assert all({"learning_rate", "grad_norm", "tokens_per_second"} <= set(rows[e["step"]]) for e in train_entries)
    assert [(s, round(rows[s]["eval_loss"], 6)) for s in sorted(rows) if "eval_loss" in rows[s]] == \
        [(e["step"], e["eval_loss"]) for e in eval_entries]
    summary = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for item in r.summary.update}
    assert summary["final_global_step"] == 4
    assert list((run_dirs[0] / "files" / "media" / "images").glob("training_loss_4_*.png"))
    saved = {f.path for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files}
    assert {"training_loss.png", "train_results.json"} <= saved


def test_missing_tracker_library_is_named(monkeypatch):
    import importlib.util

    from tunesmith.train import trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match="names wandb, but the wandb package is not installed") as err:
        trackers.check_installed(["tensorboard", "wandb"])
    assert "tunesmith[trackers]" in err.value.hint


def test_metrics_are_the_finite_numbers_of_an_entry():
    from tunesmith.train.trackers import metrics_of

    entry = {"step": 3, "loss": 1.5, "grad_norm": None, "learning_rate": 1e-3, "eta": 2.0, "flag": True,
             "tokens_per_second": float("nan"), "epoch": 0.5}
    assert metrics_of(entry) == {"loss": 1.5, "learning_rate": 1e-3, "epoch": 0.5}
