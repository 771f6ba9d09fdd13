"""ChatEngine and `tunesmith chat`: prompts by the training renderer, streaming, stops, history trimming."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunesmith.config import load_config
from tunesmith.errors import UserError

GREEDY = {"do_sample": False, "max_new_tokens": 8}


def write_cfg(folder: Path, **keys) -> Path:
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(keys))
    return path


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory, tiny_model_dir, tiny_lora_run) -> Path:
    """The YAML a LoRA run was trained with: output_dir set, no adapter_name_or_path."""
    return write_cfg(tmp_path_factory.mktemp("chat-cfg"), model_name_or_path=str(tiny_model_dir),
                     output_dir=str(tiny_lora_run), finetuning_type="lora", dataset="identity",
                     cutoff_len=512, **GREEDY)


@pytest.fixture(scope="module")
def engine(run_cfg):
    from tunesmith.infer import ChatEngine

    return ChatEngine(load_config(run_cfg))


def test_training_yaml_chats_with_the_runs_adapter(engine, tiny_model_dir, tiny_lora_run):
    from tunesmith.infer import ChatEngine

    assert engine.source.adapters == (str(tiny_lora_run),)
    assert f"trained adapter in output_dir {tiny_lora_run}" in engine.description
    messages = [{"role": "user", "content": "Hello"}]
    base = ChatEngine(load_config(None, {"model_name_or_path": str(tiny_model_dir), **GREEDY}))
    assert base.source.adapters == () and "base model" in base.description
    assert engine.chat(messages) != base.chat(messages)  # the adapter changes the answer


def test_stream_equals_chat_and_counts_tokens(engine, tiny_lora_run):
    from transformers import AutoTokenizer

    from tunesmith.infer import Usage

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    usage = Usage()
    pieces = list(engine.stream_chat(messages, usage=usage))
    assert len(pieces) >= 2  # streamed piece by piece, not all at once
    assert "".join(pieces) == engine.chat(messages)
    trained_tok = AutoTokenizer.from_pretrained(tiny_lora_run)
    expected_prompt = trained_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"]
    assert engine.prompt_ids(messages) == list(expected_prompt)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.finish_reason) == (len(expected_prompt), 8, "length")
    assert engine.last_usage == usage
    short = Usage()
    engine.chat(messages, max_new_tokens=1, usage=short)
    assert (short.completion_tokens, short.finish_reason) == (1, "length")


def test_extra_stop_string_cuts_the_reply(engine):
    messages = [{"role": "user", "content": "Hello"}]
    full = engine.chat(messages)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip()
    assert engine.chat(messages, stop=[stop]) == full[: full.index(stop)]


def test_generation_stops_at_the_templates_end_of_turn(tmp_path, engine, tiny_model_dir, tiny_lora_run):
    """A template whose assistant turns end with the very token the model is about to produce:
    generation must stop right there, and the end-of-turn text is not shown."""
    import torch
    from transformers import AutoTokenizer

    from tunesmith.infer import ChatEngine

    ids = engine.prompt_ids([{"role": "user", "content": "Hello"}])
    with torch.no_grad():
        first = int(engine.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
    marker = engine.tokenizer.decode([first]).strip()
    assert marker and not set(marker) & set("'\\{}%#")  # it goes into the template as a plain string

    run = shutil.copytree(tiny_lora_run, tmp_path / "run")
    tok = AutoTokenizer.from_pretrained(run)
    tok.chat_template = tok.chat_template.replace(
        "message['content'] + '<|im_end|>'",
        "message['content'] + (('" + marker + "') if message['role'] == 'assistant' else '<|im_end|>')")
    assert marker in tok.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)
    tok.save_pretrained(run)
    stopping = ChatEngine(load_config(None, {"model_name_or_path": str(tiny_model_dir),
                                             "adapter_name_or_path": str(run), **GREEDY}))
    assert stopping.prompt_ids([{"role": "user", "content": "Hello"}]) == ids  # prompts do not change
    reply = stopping.chat([{"role": "user", "content": "Hello"}])
    assert marker not in reply and reply.strip() == ""
    assert (stopping.last_usage.completion_tokens, stopping.last_usage.finish_reason) == (1, "stop")


def test_history_is_trimmed_oldest_first(engine):
    system = {"role": "system", "content": "You are terse."}
    turns = []
    for i in range(30):
        turns += [{"role": "user", "content": f"Question number {i} about the weather today?"},
                  {"role": "assistant", "content": f"Answer number {i}: it is sunny and warm."}]
    last = {"role": "user", "content": "And tomorrow?"}
    kept, dropped = engine.fit([system, *turns, last])
    assert dropped > 0 and dropped % 2 == 0
    assert kept[0] == system and kept[-1] == last
    assert kept[1:-1] == turns[dropped:]  # the newest turns survive, in order
    assert len(engine.prompt_ids(kept)) <= engine.cutoff_len
    assert len(engine.prompt_ids([system, *turns[dropped - 2:], last])) > engine.cutoff_len

    with pytest.raises(UserError, match="cutoff_len"):
        engine.fit([system, {"role": "user", "content": "word " * 2000}])


def test_stop_trimmer_never_shows_part_of_a_stop_string():
    from tunesmith.infer import _StopTrimmer

    trimmer = _StopTrimmer(["<|end|>"])
    shown = [trimmer.feed(p) for p in ["ab", "c<", "|e", "nd|>tail"]]
    assert shown == ["ab", "c", "", ""] and trimmer.flush() == ""
    trimmer = _StopTrimmer(["<|end|>"])
    assert trimmer.feed("x<|") == "x" and trimmer.feed("y") == "<|y" and trimmer.flush() == ""
    trimmer = _StopTrimmer(["STOP"])
    assert trimmer.feed("abcST") == "abc" and trimmer.flush() == "ST"


def test_other_backends_are_a_clear_error(run_cfg, capsys):
    from tunesmith.cli import main

    assert main(["chat", str(run_cfg), "infer_backend=vllm"]) == 1
    err = capsys.readouterr().err
    assert "infer_backend 'vllm' is not available" in err and "huggingface" in err


def test_chat_command_with_piped_stdin(run_cfg, engine, tiny_lora_run):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "chat", str(run_cfg)],
                          input="Hello there\n\nWhat is your name?\nexit\nnever read\n",
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"Loaded the trained adapter in output_dir {tiny_lora_run}" in proc.stderr
    replies = [r[:-1] for r in proc.stdout.split("Assistant: ")[1:]]
    assert proc.stdout.startswith("Assistant: ") and len(replies) == 2
    first = [{"role": "user", "content": "Hello there"}]
    assert replies[0] == engine.chat(first)
    second = [*first, {"role": "assistant", "content": replies[0]}, {"role": "user", "content": "What is your name?"}]
    assert replies[1] == engine.chat(second)  # the second answer saw the first exchange
