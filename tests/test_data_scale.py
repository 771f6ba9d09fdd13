"""Data at scale: the memory-mapped token store (lazy reads, the samples of a direct encode),
chunked tokenization that resumes and splits over processes, streaming readers, file hashes kept
beside the cache, and streaming runs with exact resume on one process and several."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import as_tuples

from tunesmith.config import load_config
from tunesmith.data import chunks, readers, store
from tunesmith.data.encode import Encoded, encode
from tunesmith.data.formats import load_conversations
from tunesmith.data.pipeline import data_fingerprint, open_store, tokenize_datasets
from tunesmith.errors import UserError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def small_chunks(monkeypatch) -> int:
    monkeypatch.setattr(chunks, "CHUNK_ROWS", 16)
    return 16


def cfg_for(repo_data: Path, **overrides):
    values = {"dataset": "identity,alpaca_demo", "dataset_dir": str(repo_data), "cutoff_len": 96,
              "max_samples": 40, "preprocessing_num_workers": 1}
    values.update(overrides)
    return load_config(None, values)


def direct(repo_data: Path, tokenizer, cfg) -> list[Encoded]:
    convs = load_conversations(",".join(cfg.data.dataset), repo_data, max_samples=cfg.data.max_samples)
    return [e for e in (encode(c, tokenizer, cfg.data) for c in convs) if isinstance(e, Encoded)]


def store_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "meta.json"}


def meta_without_time(folder: Path) -> dict:
    meta = json.loads((folder / "meta.json").read_text())
    meta["report"].pop("seconds")
    return meta


def test_store_is_mapped_and_holds_the_samples_of_a_direct_encode(tokenizer, repo_data, cache_home, small_chunks):
    cfg = cfg_for(repo_data)
    data = tokenize_datasets(cfg, tokenizer, quiet=True)
    assert isinstance(data.train, store.SampleView)
    assert len(list((data.path / "chunks").iterdir())) == 5  # 80 rows in chunks of 16
    split = data.train._split
    assert split._ids == [None] * 5  # opening maps no token file
    assert data.train[20].input_ids and [x is not None for x in split._ids] == [False, True, False, False, False]
    assert as_tuples(data.train) == as_tuples(direct(repo_data, tokenizer, cfg))
    assert all(isinstance(ids, np.memmap) for ids in split._ids)  # mapped, not loaded
    # The loop's view: Samples made on demand, the lengths array for the planner.
    samples = data.train.as_samples()
    assert samples.lengths.tolist() == [len(s.input_ids) for s in data.train]
    assert (samples[7].input_ids, samples[7].labels, samples[7].index) == \
        (data.train[7].input_ids, data.train[7].labels, 7)
    again = tokenize_datasets(cfg, tokenizer, quiet=True)
    assert again.from_cache and as_tuples(again.train) == as_tuples(data.train)
    # Opened from the split's merged index as from the chunks' own index files.
    merged = again.train._split
    assert store.merged_index_paths(data.path, "train")[0].exists()
    for path in store.merged_index_paths(data.path, "train"):
        path.unlink()
    by_chunk = store.StoreSplit(data.path, "train", merged.datasets)
    assert merged._dirs == by_chunk._dirs and merged.chunk_starts.tolist() == by_chunk.chunk_starts.tolist()
    assert merged.index.tobytes() == by_chunk.index.tobytes()


def test_a_completion_cut_short_after_the_merged_index_is_done_again(tokenizer, repo_data, cache_home,
                                                                     small_chunks):
    """Killed while completing the store: every chunk written, a merged index file cut short, no
    meta.json. The next run completes the store from the chunks, not from that file."""
    from tunesmith.data.pipeline import partial_folder

    cfg = cfg_for(repo_data)
    data = tokenize_datasets(cfg, tokenizer, quiet=True)
    want = as_tuples(data.train)
    partial = partial_folder(data.path)
    shutil.copytree(data.path, partial)
    shutil.rmtree(data.path)
    (partial / "meta.json").unlink()
    index_path = store.merged_index_paths(partial, "train")[0]
    index_path.write_bytes(index_path.read_bytes()[:200])
    again = tokenize_datasets(cfg, tokenizer, quiet=True)
    assert not again.from_cache and as_tuples(again.train) == want
    # A chunk removed from the completed store: opening it says so, the merged index notwithstanding.
    shutil.rmtree(again.path / "chunks" / store.chunk_name("train", 2))
    with pytest.raises(UserError, match="cannot be read"):
        open_store(again.path)


def test_val_split_and_report_from_the_store(tokenizer, repo_data, cache_home, small_chunks):
    data = tokenize_datasets(cfg_for(repo_data, val_size=0.25), tokenizer, quiet=True)
    whole = direct(repo_data, tokenizer, cfg_for(repo_data))
    held = round(0.25 * len(whole))  # of the rows the encoder keeps (one of the 80 is too long)
    assert len(whole) > 70 and len(data.eval) == held and len(data.train) == len(whole) - held
    assert sorted(s.source for s in list(data.train) + list(data.eval)) == sorted(s.source for s in whole)
    rep = data.report.train
    assert rep.tokens == sum(len(s.input_ids) for s in data.train)
    assert rep.trained_tokens == sum(sum(1 for x in s.labels if x != -100) for s in data.train)


def test_interrupted_tokenization_resumes_from_the_last_complete_chunk(tokenizer, repo_data, cache_home,
                                                                        small_chunks, monkeypatch, tmp_path):
    cfg = cfg_for(repo_data)
    real = chunks.tokenize_chunk
    calls: list[int] = []

    def interrupted_after_three(job):
        if len(calls) == 3:
            raise KeyboardInterrupt  # as Ctrl-C or a crash in the middle of the fourth chunk
        calls.append(job.number)
        return real(job)

    monkeypatch.setattr(chunks, "tokenize_chunk", interrupted_after_three)
    with pytest.raises(KeyboardInterrupt):
        tokenize_datasets(cfg, tokenizer, quiet=True)
    partial = next((cache_home / "tokenized").glob(".*.partial"))
    assert sorted(p.name for p in (partial / "chunks").iterdir() if not p.name.startswith(".")) == \
        [f"train-{n:06d}" for n in range(3)]

    calls.clear()
    monkeypatch.setattr(chunks, "tokenize_chunk", lambda job: (calls.append(job.number), real(job))[1])
    resumed = tokenize_datasets(cfg, tokenizer, quiet=True)
    assert calls == [3, 4]  # only the chunks that were not complete
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "fresh"))
    fresh = tokenize_datasets(cfg, tokenizer, quiet=True)
    assert as_tuples(resumed.train) == as_tuples(fresh.train)
    assert store_files(resumed.path) == store_files(fresh.path)


SHARE_SCRIPT = """
import sys
from tunesmith.config import load_config
from tunesmith.data import chunks
from tunesmith.data.pipeline import tokenize_datasets
from tunesmith.model.load import load_tokenizer
chunks.CHUNK_ROWS = 16
cfg = load_config(None, {"model_name_or_path": sys.argv[1], "dataset": "identity,alpaca_demo",
                         "dataset_dir": sys.argv[2], "cutoff_len": 96, "max_samples": 40, "val_size": 5,
                         "preprocessing_num_workers": 1})
data = tokenize_datasets(cfg, load_tokenizer(cfg.model), quiet=True, rank=int(sys.argv[3]), world=2)
print(len(data.train), len(data.eval))
"""


def test_two_processes_write_the_store_one_process_writes(tokenizer, default_model_dir, repo_data, tmp_path,
                                                          cache_home, small_chunks):
    env = {**os.environ, "TUNESMITH_CACHE": str(tmp_path / "shared-cache"), "PYTHONPATH": str(REPO / "src")}
    procs = [subprocess.Popen([sys.executable, "-c", SHARE_SCRIPT, str(default_model_dir), str(repo_data), str(r)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (1, 0)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    one = tokenize_datasets(cfg_for(repo_data, val_size=5), tokenizer, quiet=True)
    assert len(one.train) > 70
    assert outs[0][0].split() == outs[1][0].split() == [str(len(one.train)), "5"]
    (two_path,) = (tmp_path / "shared-cache" / "tokenized").glob("[!.]*")
    assert store_files(two_path) == store_files(one.path)
    assert meta_without_time(two_path) == meta_without_time(one.path)


def test_pool_workers_write_the_store_one_process_writes(tokenizer, repo_data, cache_home, small_chunks,
                                                         monkeypatch, tmp_path):
    monkeypatch.setattr(chunks, "MIN_ROWS_FOR_WORKERS", 0)
    two = tokenize_datasets(cfg_for(repo_data, preprocessing_num_workers=2), tokenizer, quiet=True)
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "one"))
    one = tokenize_datasets(cfg_for(repo_data), tokenizer, quiet=True)
    assert store_files(two.path) == store_files(one.path)


def test_pool_workers_leave_the_objects_they_inherit_out_of_their_garbage_collections():
    import gc

    pool = chunks._start_pool(SimpleNamespace(), 1)  # the workers' start stores the state as given
    try:
        frozen_in_worker = pool.apply(gc.get_freeze_count)
    finally:
        pool.terminate()
        pool.join()
    assert frozen_in_worker > 10_000  # pytest, numpy, torch, the tokenizer's modules
    assert gc.get_freeze_count() == 0  # the main process goes on: nothing of it is frozen


def test_bad_rows_are_reported_by_file_and_row_from_every_chunk(tokenizer, tmp_path, cache_home, small_chunks):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(60)]
    rows[5] = "{not json"
    rows[50] = json.dumps({"instruction": "q", "output": 3})
    (folder / "d.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.jsonl"}}))
    cfg = load_config(None, {"dataset": "d", "dataset_dir": str(folder), "preprocessing_num_workers": 1})
    with pytest.raises(UserError) as err:
        tokenize_datasets(cfg, tokenizer, quiet=True)
    assert "2 invalid rows of 60" in str(err.value)
    assert "d.jsonl line 6 (row 5): invalid JSON" in str(err.value) and "d.jsonl line 51 (row 50)" in str(err.value)
    cfg = load_config(None, {"dataset": "d", "dataset_dir": str(folder), "preprocessing_num_workers": 1,
                             "skip_invalid": True})
    assert len(tokenize_datasets(cfg, tokenizer, quiet=True).train) == 58


def test_json_list_is_parsed_across_block_boundaries(tmp_path, monkeypatch):
    rows = [{"instruction": f"question {i} " + "é" * (i % 7), "output": "x" * i} for i in range(40)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    monkeypatch.setattr(readers._TextBlocks, "BLOCK", 7)  # every row spans several blocks
    got = list(readers.iter_file_records(path))
    assert [r for _, _, r in got] == rows
    assert [line for _, line, _ in got][:3] == [2, 6, 10]
    path.write_text(json.dumps(rows, indent=2)[:-30] + "}, oops]", encoding="utf-8")
    with pytest.raises(readers.DataFileError) as err:
        list(readers.iter_file_records(path))
    with pytest.raises(json.JSONDecodeError) as whole:  # where a parser of the whole text puts the fault
        json.loads(path.read_text())
    assert f"line {whole.value.lineno}: invalid JSON at column {whole.value.colno}" in str(err.value)


def test_file_hash_is_kept_by_size_and_mtime(tmp_path, cache_home):
    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / "d.json"
    path.write_text('[{"instruction": "a", "output": "b"}]', encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}))
    first = data_fingerprint(["d"], str(folder))
    stat = path.stat()
    path.write_text('[{"instruction": "c", "output": "d"}]', encoding="utf-8")  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data_fingerprint(["d"], str(folder)) == first  # not read again: size and mtime unchanged
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))
    assert data_fingerprint(["d"], str(folder)) != first  # a write (a new mtime) hashes the bytes again


WEIGHTED_ROWS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "loss_weight": 0.0},
                  {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "loss_weight": 2.5}]},
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
]
PLAIN_ROWS = [{"messages": [{"role": "user", "content": f"Count to {n}."},
                            {"role": "assistant", "content": " ".join(map(str, range(1, n + 1)))}]}
              for n in range(1, 9)]
CHAT_INFO = {"formatting": "sharegpt", "columns": {"messages": "messages"},
             "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                      "system_tag": "system"}}


def test_loss_weights_and_default_system_reach_the_store_and_the_stream(tokenizer, tmp_path, cache_home,
                                                                         monkeypatch):
    """Per-token loss weights are stored (weights.npy only in a chunk that has some) and come back as
    the Encoded and training samples' weights; default_system is applied as chat applies it."""
    from helpers import make_dataset

    from tunesmith.data.streaming import SampleStream
    from tunesmith.template import with_system

    folder = make_dataset(tmp_path / "data", {"plain": {"file_name": "plain.json", **CHAT_INFO},
                                              "weighted": {"file_name": "weighted.json", **CHAT_INFO}},
                          {"plain.json": PLAIN_ROWS, "weighted.json": WEIGHTED_ROWS})
    values = {"dataset": "plain,weighted", "dataset_dir": str(folder), "cutoff_len": 96,
              "preprocessing_num_workers": 1, "default_system": "You are a pirate.", "shuffle": False}
    cfg = load_config(None, values)
    convs = load_conversations("plain,weighted", folder)
    for conv in convs:
        conv.messages = with_system(conv.messages, "You are a pirate.")
    want = [encode(c, tokenizer, cfg.data) for c in convs]
    assert want[-2].weights is not None and want[0].weights is None
    monkeypatch.setattr(chunks, "CHUNK_ROWS", 8)  # the plain rows fill chunk 0, the weighted ones chunk 1
    data = tokenize_datasets(cfg, tokenizer, quiet=True)
    got = list(data.train)
    assert as_tuples(got) == as_tuples(want) and [s.weights for s in got] == [s.weights for s in want]
    assert "pirate" in tokenizer.decode(got[0].input_ids)
    folders = sorted((data.path / "chunks").iterdir())
    assert [(f / "weights.npy").exists() for f in folders] == [False, True]
    samples = data.train.as_samples()
    assert samples[len(want) - 2].weights == want[-2].weights and samples[0].weights is None
    stream = list(itertools.islice(SampleStream(load_config(None, {**values, "streaming": True, "max_steps": 1}),
                                                tokenizer).samples(), len(want)))
    assert [(s.input_ids, s.labels, s.weights) for s in stream] == [(e.input_ids, e.labels, e.weights) for e in want]


# -------------------------------------------------------------------------------------- streaming

def test_stream_gives_the_store_samples_and_resumes_at_a_position(tokenizer, repo_data, cache_home):
    from tunesmith.data.streaming import SampleStream

    cfg = cfg_for(repo_data, streaming=True, max_steps=5, shuffle=False)
    stream = list(itertools.islice(iter(SampleStream(cfg, tokenizer)), 80))
    stored = tokenize_datasets(cfg_for(repo_data), tokenizer, quiet=True).train
    assert as_tuples(stream) == as_tuples(stored) + as_tuples(stored[: 80 - len(stored)])  # then a new pass
    shuffled = cfg_for(repo_data, streaming=True, max_steps=5, buffer_size=16)
    whole = [(s.input_ids, s.index) for s in itertools.islice(SampleStream(shuffled, tokenizer).samples(), 100)]
    tail = [(s.input_ids, s.index) for s in itertools.islice(SampleStream(shuffled, tokenizer).samples(37), 63)]
    assert tail == whole[37:]
    assert [s[0] for s in whole[: len(stored)]] != [s.input_ids for s in stored]  # the buffer shuffles


def fake_accelerator(rank: int, world: int) -> SimpleNamespace:
    return SimpleNamespace(num_processes=world, process_index=rank, device=torch.device("cpu"),
                           distributed_type="NO", state=SimpleNamespace(deepspeed_plugin=None))


def stream_batches(cfg, tokenizer, rank: int, world: int, start: int) -> list[tuple[int, list[int]]]:
    from tunesmith.data.streaming import SampleStream
    from tunesmith.train import loop

    plan = loop.make_plan(10_000, cfg, world)
    got = loop.step_batches(SampleStream(cfg, tokenizer), None, plan, cfg, start, fake_accelerator(rank, world),
                            "varlen", 0)
    return [(step, [i for b in batches for i in b["sample_index"].tolist()]) for step, batches, _ in got]


def test_streaming_steps_resume_exactly_on_one_process_and_several(tokenizer, repo_data, cache_home,
                                                                   monkeypatch):
    from tunesmith.train import distributed

    monkeypatch.setattr(distributed, "is_sharded", lambda accelerator: False)
    cfg = cfg_for(repo_data, streaming=True, max_steps=6, buffer_size=8, per_device_train_batch_size=2,
                  gradient_accumulation_steps=2)
    whole = stream_batches(cfg, tokenizer, 0, 1, 0)
    assert [step for step, _ in whole] == list(range(6))
    assert [i for _, ids in whole for i in ids] == list(range(24))  # stream positions, in order
    assert stream_batches(cfg, tokenizer, 0, 1, 4) == whole[4:]
    # Two ranks: each takes its micro-batches of the same stream; together the one-process steps.
    two = [stream_batches(cfg, tokenizer, r, 2, 0) for r in (0, 1)]
    for step in range(6):
        assert sorted(two[0][step][1] + two[1][step][1]) == list(range(8 * step, 8 * step + 8))
    assert stream_batches(cfg, tokenizer, 1, 2, 3) == two[1][3:]


def test_streaming_run_trains_and_needs_max_steps(tmp_path, tiny_model_dir, repo_data, cache_home):
    from tunesmith.train import run_training

    with pytest.raises(UserError, match="'streaming: true' needs 'max_steps'"):
        load_config(None, {"streaming": True})
    cfg = load_config(None, {"model_name_or_path": str(tiny_model_dir), "dataset": "identity",
                             "dataset_dir": str(repo_data), "cutoff_len": 96, "streaming": True, "max_steps": 3,
                             "buffer_size": 32, "per_device_train_batch_size": 2, "output_dir": str(tmp_path / "o"),
                             "save_steps": 0, "report_to": "none", "logging_steps": 1})
    result = run_training(cfg)
    assert result.metrics["global_step"] == 3 and result.metrics["train_samples"] == 6
    assert not (cache_home / "tokenized").exists()  # nothing stored
    shutil.rmtree(tmp_path / "o")


def test_workers_batched_tokenizer_calls_encode_every_repo_dataset_like_the_tokenizer(tokenizer, repo_data):
    """The store's workers send a conversation's pieces to the Rust backend in one call
    (chunks.DirectTokenizer); every sample of every repository dataset (multi-turn, tool calls,
    two languages) must come out as the tokenizer itself encodes it."""
    fast = chunks.direct_if_same(tokenizer)
    assert isinstance(fast, chunks.DirectTokenizer)
    names = json.loads((repo_data / "dataset_info.json").read_text())
    cfg = load_config(None, {"model_name_or_path": "x", "dataset": "identity", "cutoff_len": 64})  # cuts some

    def outcome(result):
        return as_tuples([result]) if isinstance(result, Encoded) else (result.source, result.reason)
    for name in names:
        convs = load_conversations(name, repo_data)
        assert convs, name
        for conv in convs:
            assert outcome(encode(conv, fast, cfg.data)) == outcome(encode(conv, tokenizer, cfg.data)), name
