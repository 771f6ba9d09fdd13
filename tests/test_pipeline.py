"""Tokenization pipeline: cache keyed by content, tokenized_path, eval split, worker processes,
drop reporting, and the `data preview` / `data dump` commands (in-process and through the CLI)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import as_tuples

from tunesmith.config import DataArgs, load_config
from tunesmith.data.encode import IGNORE_INDEX, PROMPT_TOO_LONG, encode
from tunesmith.data.pipeline import dump, preview, tokenize_datasets
from tunesmith.errors import UserError


@pytest.fixture()
def data_dir(tmp_path, repo_data) -> Path:
    """A private copy of `identity` (100 rows) plus a small dataset with one over-long prompt."""
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(repo_data / "identity.json", folder / "identity.json")
    rows = [{"instruction": "Say hi.", "input": "", "output": "Hi!"},
            {"instruction": "Repeat: " + "blah " * 300, "input": "", "output": "No."},
            {"instruction": "Say bye.", "input": "", "output": "Bye!"}]
    (folder / "small.json").write_text(json.dumps(rows), encoding="utf-8")
    info = {"identity": {"file_name": "identity.json"}, "small": {"file_name": "small.json"}}
    (folder / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return folder


def cfg_for(data_dir: Path, **overrides):
    values = {"dataset": "identity", "dataset_dir": str(data_dir), "cutoff_len": 256}
    values.update(overrides)
    return load_config(None, values)


def test_second_call_loads_from_cache(tokenizer, data_dir, cache_home, capsys):
    first = tokenize_datasets(cfg_for(data_dir), tokenizer)
    assert not first.from_cache and len(first.train) == 100 and first.eval == []
    assert first.path == cache_home / "tokenized" / first.key and (first.path / "meta.json").exists()
    capsys.readouterr()
    second = tokenize_datasets(cfg_for(data_dir), tokenizer)
    assert second.from_cache and second.key == first.key
    assert as_tuples(second.train) == as_tuples(first.train)
    assert second.report == first.report
    assert "Opened tokenized data from the cache" in capsys.readouterr().err
    # the stored samples are what encode() gives
    direct = encode(_first_identity_conv(data_dir), tokenizer, DataArgs(cutoff_len=256))
    assert as_tuples(second.train[:1]) == as_tuples([direct])


def _first_identity_conv(data_dir):
    from tunesmith.data.formats import load_conversations

    return load_conversations("identity", data_dir, max_samples=1)[0]


def test_cache_key_follows_settings_and_file_contents(tokenizer, data_dir, cache_home):
    base = tokenize_datasets(cfg_for(data_dir), tokenizer, quiet=True)
    shorter = tokenize_datasets(cfg_for(data_dir, cutoff_len=128), tokenizer, quiet=True)
    assert shorter.key != base.key and not shorter.from_cache
    for changed in ({"train_on_prompt": True}, {"mask_history": True}, {"max_samples": 50},
                    {"val_size": 0.1}, {"val_size": 0.1, "seed": 7}):
        other = tokenize_datasets(cfg_for(data_dir, **changed), tokenizer, quiet=True)
        assert other.key != base.key and not other.from_cache, changed
    # a new modification time alone keeps the key (contents are hashed, not mtimes)
    path = data_dir / "identity.json"
    os.utime(path, (1, 1))
    assert tokenize_datasets(cfg_for(data_dir), tokenizer, quiet=True).from_cache
    # different contents change it
    rows = json.loads(path.read_text(encoding="utf-8"))
    rows[0]["output"] = "Hello, changed."
    path.write_text(json.dumps(rows), encoding="utf-8")
    edited = tokenize_datasets(cfg_for(data_dir), tokenizer, quiet=True)
    assert edited.key != base.key and not edited.from_cache
    assert "Hello, changed." in tokenizer.decode(edited.train[0].input_ids)


def test_overwrite_cache_tokenizes_again(tokenizer, data_dir, cache_home):
    first = tokenize_datasets(cfg_for(data_dir), tokenizer, quiet=True)
    again = tokenize_datasets(cfg_for(data_dir, overwrite_cache=True), tokenizer, quiet=True)
    assert not again.from_cache and again.key == first.key
    assert as_tuples(again.train) == as_tuples(first.train)


def test_tokenized_path_round_trip(tokenizer, data_dir, cache_home, tmp_path, capsys):
    target = tmp_path / "tok"
    cfg = cfg_for(data_dir, tokenized_path=str(target), val_size=5)
    made = tokenize_datasets(cfg, tokenizer)
    assert not made.from_cache and made.path == target and (target / "meta.json").exists()
    assert not (cache_home / "tokenized").exists()
    capsys.readouterr()
    loaded = tokenize_datasets(cfg, tokenizer)
    assert loaded.from_cache and "from tokenized_path" in capsys.readouterr().err
    assert as_tuples(loaded.train) == as_tuples(made.train) and as_tuples(loaded.eval) == as_tuples(made.eval)
    assert len(loaded.eval) == 5
    # loaded with other settings: used as is, with a warning
    tokenize_datasets(cfg_for(data_dir, tokenized_path=str(target), val_size=5, cutoff_len=64), tokenizer)
    assert "tokenized from other data" in capsys.readouterr().err


def test_tokenized_path_never_replaces_a_foreign_folder(tokenizer, data_dir, cache_home, tmp_path):
    foreign = tmp_path / "lf_tokenized"
    foreign.mkdir()
    (foreign / "dataset_dict.json").write_text("{}")
    with pytest.raises(UserError, match="no meta.json"):
        tokenize_datasets(cfg_for(data_dir, tokenized_path=str(foreign)), tokenizer, quiet=True)
    assert (foreign / "dataset_dict.json").read_text() == "{}"


def test_val_size_split_is_deterministic_and_partitions(tokenizer, data_dir, cache_home):
    whole = tokenize_datasets(cfg_for(data_dir), tokenizer, quiet=True).train
    split = tokenize_datasets(cfg_for(data_dir, val_size=0.1), tokenizer, quiet=True)
    assert len(split.eval) == 10 and len(split.train) == 90
    rows = lambda samples: [s.source[1] for s in samples]  # noqa: E731
    assert sorted(rows(split.train) + rows(split.eval)) == rows(whole)
    assert rows(split.train) == sorted(rows(split.train)) and rows(split.eval) == sorted(rows(split.eval))
    cfg = cfg_for(data_dir, val_size=0.1, overwrite_cache=True)
    assert rows(tokenize_datasets(cfg, tokenizer, quiet=True).eval) == rows(split.eval)
    reseeded = tokenize_datasets(cfg_for(data_dir, val_size=0.1, seed=1), tokenizer, quiet=True)
    assert rows(reseeded.eval) != rows(split.eval)
    assert len(tokenize_datasets(cfg_for(data_dir, val_size=10), tokenizer, quiet=True).eval) == 10
    with pytest.raises(UserError, match="val_size"):
        tokenize_datasets(cfg_for(data_dir, val_size=100), tokenizer, quiet=True)


def test_eval_dataset_and_val_size_together_is_an_error(tokenizer, data_dir, cache_home):
    with pytest.raises(UserError, match="eval_dataset.*val_size"):
        tokenize_datasets(cfg_for(data_dir, eval_dataset="small", val_size=0.1), tokenizer, quiet=True)
    data = tokenize_datasets(cfg_for(data_dir, eval_dataset="small", cutoff_len=64), tokenizer, quiet=True)
    assert [s.source for s in data.eval] == [("small", 0), ("small", 2)]


def test_dropped_samples_are_counted_and_reported(tokenizer, data_dir, cache_home, capsys):
    data = tokenize_datasets(cfg_for(data_dir, dataset="small,identity", cutoff_len=80), tokenizer)
    report = data.report.train
    assert report.dropped == {PROMPT_TOO_LONG: 1}
    assert report.dropped_examples == [("small", 1, PROMPT_TOO_LONG)]
    assert report.samples == len(data.train) == 2 + 100  # small keeps 2 of its 3 rows
    assert report.tokens == sum(len(s.input_ids) for s in data.train)
    assert report.trained_tokens == sum(1 for s in data.train for t in s.labels if t != IGNORE_INDEX)
    lengths = sorted(len(s.input_ids) for s in data.train)
    assert (report.length_min, report.length_max) == (lengths[0], lengths[-1])
    assert report.truncated == sum(s.truncated for s in data.train) and report.length_max <= 80
    err = capsys.readouterr().err
    assert "prompt longer than cutoff_len: 1" in err and "small row 1" in err
    # the report survives the cache
    assert tokenize_datasets(cfg_for(data_dir, dataset="small,identity", cutoff_len=80), tokenizer,
                             quiet=True).report == data.report


def test_all_samples_dropped_is_an_error(tokenizer, data_dir, cache_home):
    with pytest.raises(UserError, match="no training sample is left"):
        tokenize_datasets(cfg_for(data_dir, cutoff_len=8), tokenizer, quiet=True)


def test_preview_marks_trained_tokens(tokenizer, data_dir):
    out = io.StringIO()
    preview(cfg_for(data_dir, dataset="small", cutoff_len=64), tokenizer, n=2, color=False, file=out)
    text = out.getvalue()
    first = encode(_small_conv(data_dir, 0), tokenizer, DataArgs(cutoff_len=64))
    assert f"=== small row 0: {len(first.input_ids)} tokens, {first.trained_tokens} trained ===" in text
    assert "[[Hi!<|im_end|>\n]]" in text
    assert "=== small row 1: dropped (prompt longer than cutoff_len) ===" in text
    assert "\033[" not in text
    colored = io.StringIO()
    preview(cfg_for(data_dir, dataset="small"), tokenizer, n=1, color=True, file=colored)
    assert "\033[32mHi!<|im_end|>\n\033[0m" in colored.getvalue() and "[[" not in colored.getvalue()


def _small_conv(data_dir, row):
    from tunesmith.data.formats import load_conversations

    return load_conversations("small", data_dir)[row]


def test_dump_writes_what_training_sees(tokenizer, data_dir, cache_home, tmp_path):
    cfg = cfg_for(data_dir, dataset="small,identity", cutoff_len=80, val_size=3)
    out = tmp_path / "dump.jsonl"
    count = dump(cfg, tokenizer, out)
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    train = tokenize_datasets(cfg, tokenizer, quiet=True).train
    assert count == len(lines) == len(train) == 2 + 100 - 3
    assert [(x["source"]["dataset"], x["source"]["index"]) for x in lines] == [s.source for s in train]
    assert [(x["input_ids"], x["labels"]) for x in lines] == [(s.input_ids, s.labels) for s in train]
    assert set(lines[0]) == {"source", "input_ids", "labels"}


def run_cli(*args, env):
    return subprocess.run([sys.executable, "-m", "tunesmith", *args], capture_output=True, text=True, env=env,
                          timeout=300)


DUMPED = ("identity", "alpaca_demo_parquet", "chat_sharegpt", "toolcall_sharegpt", "toolcall_openai")


def test_cli_preview_and_dump_on_repo_data(default_model_dir, repo_data, tmp_path, tokenizer):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "model_name_or_path": str(default_model_dir), "dataset_dir": str(repo_data),
        "dataset": ",".join(DUMPED), "max_samples": 3, "cutoff_len": 1024,
    }))
    env = {**os.environ, "TUNESMITH_CACHE": str(tmp_path / "cache")}
    shown = run_cli("data", "preview", str(cfg_path), "dataset=toolcall_sharegpt,alpaca_demo",
                    "max_samples=1", "-n", "2", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "=== toolcall_sharegpt row 0:" in shown.stdout and "=== alpaca_demo row 0:" in shown.stdout
    assert "[[" in shown.stdout and "\033[" not in shown.stdout  # piped: brackets, no colour

    out = tmp_path / "x.jsonl"
    dumped = run_cli("data", "dump", str(cfg_path), "--out", str(out), env=env)
    assert dumped.returncode == 0, dumped.stderr
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(x["source"]["dataset"], x["source"]["index"]) for x in lines] == \
        [(name, i) for name in DUMPED for i in range(3)]
    from tunesmith.data.formats import load_conversations

    convs = load_conversations(",".join(DUMPED), repo_data, max_samples=3)
    for line, conv in zip(lines, convs, strict=True):
        expected = encode(conv, tokenizer, DataArgs(cutoff_len=1024))
        assert (line["input_ids"], line["labels"]) == (expected.input_ids, expected.labels)
    assert "Wrote 15 training samples" in dumped.stderr
