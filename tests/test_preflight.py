"""The data preflight: each finding on data or templates built to trigger it, the report file,
and a run stopped before step 1 by a fatal finding."""

from __future__ import annotations

import copy
import json

import pytest

from tunesmith.config import load_config
from tunesmith.data import store
from tunesmith.data.encode import IGNORE_INDEX, Encoded, encode
from tunesmith.data.preflight import FATAL, INFO, WARNING, FlagRules, preflight, run_preflight
from tunesmith.errors import UserError
from tunesmith.template import TEMPLATES, Conversation, apply_template

CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Nothing."}, {"role": "assistant", "content": "Alright."}],
]


def config(**extra: object):
    return load_config(None, {"cutoff_len": 256, "per_device_train_batch_size": 2, "shuffle": False, **extra})


def encoded(tokenizer, cfg, chats=CHATS) -> list[Encoded]:
    out = [encode(Conversation(messages, source=("chats", i)), tokenizer, cfg.data) for i, messages in enumerate(chats)]
    assert all(isinstance(e, Encoded) for e in out)
    return out


def levels(report, level: str) -> list[str]:
    return [f.text for f in report.findings if f.level == level]


@pytest.fixture()
def tok(tokenizer):
    return copy.deepcopy(tokenizer)  # the tests change templates and post-processors


def test_clean_chatml_data_has_no_problem(tok):
    cfg = config()
    samples = encoded(tok, cfg)
    report = run_preflight(samples, tok, cfg)
    assert not levels(report, FATAL) and not levels(report, WARNING)
    assert "end of turn '<|im_end|>': trained in 3 of 3 samples" in report.figures
    # SmolLM2's pad is its eos: fine, because padding is masked by position.
    assert levels(report, INFO) == ["pad == eos ('<|im_end|>'); fine here: padding is masked by position, and eos "
                                    "is trained in 3 samples."]


def test_end_of_turn_never_trained_is_fatal(tok, tmp_path):
    apply_template(tok, "empty")  # contents only: no end-of-turn marker, no eos
    cfg = config()
    samples = encoded(tok, cfg)
    report = run_preflight(samples, tok, cfg)
    fatal = levels(report, FATAL)
    assert len(fatal) == 1 and "no sample trains the end-of-turn token ('<|im_end|>')" in fatal[0]
    assert "never learn to stop" in fatal[0]
    with pytest.raises(UserError) as err:
        preflight(samples, tok, cfg, tmp_path)
    text = str(err.value)
    assert f"report: {tmp_path / 'preflight.txt'}" in text and "fix: use a chat template whose answers end" in text
    assert "preflight: warn" in text
    assert "FATAL: no sample trains the end-of-turn token" in (tmp_path / "preflight.txt").read_text()
    assert preflight(samples, tok, config(preflight="warn"), None).fatal  # reported, not raised


def test_a_sample_not_cut_that_misses_the_end_of_turn_warns(tok):
    cfg = config()
    samples = encoded(tok, cfg)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    samples[1].labels = [IGNORE_INDEX if x == eot else x for x in samples[1].labels]
    warnings = levels(run_preflight(samples, tok, cfg), WARNING)
    assert warnings == ["the end-of-turn token is not trained in 1 sample not cut short (chats row 1)."]
    # A sample cut at cutoff_len may lose it: only a note.
    samples[1].truncated = True
    report = run_preflight(samples, tok, cfg)
    assert not levels(report, WARNING)
    assert any("1 sample cut at cutoff_len 256 end without the end-of-turn token" in t for t in levels(report, INFO))


def test_double_bos_from_the_template_is_fatal(tok):
    # SmolLM2's BOS is <|im_start|>: a ChatML template that also writes {{ bos_token }} doubles it.
    tok.chat_template = "{{ bos_token }}" + TEMPLATES["chatml"].jinja
    cfg = config()
    samples = encoded(tok, cfg)
    assert samples[0].input_ids[:2] == [tok.bos_token_id] * 2
    fatal = levels(run_preflight(samples, tok, cfg), FATAL)
    assert fatal == ["two BOS tokens '<|im_start|>' open 3 samples (chats row 0, chats row 1, chats row 2): the chat "
                     "template writes BOS where the text already begins with it."]


def test_template_bos_plus_tokenizer_bos_warns(tok):
    from tokenizers import processors

    # A tokenizer that adds BOS by itself, as Llama's do, under a template whose text begins with it.
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A $B", special_tokens=[("<|im_start|>", tok.bos_token_id)])
    cfg = config()
    samples = encoded(tok, cfg)
    assert samples[0].input_ids[0] == tok.bos_token_id and samples[0].input_ids[1] != tok.bos_token_id
    report = run_preflight(samples, tok, cfg)
    assert not levels(report, FATAL)
    warning = levels(report, WARNING)
    assert len(warning) == 1 and "the tokenizer adds one too" in warning[0]


def test_pad_equal_to_eos_with_eos_masked_is_fatal(tok):
    cfg = config()
    assert tok.pad_token_id == tok.eos_token_id
    samples = encoded(tok, cfg)
    for s in samples:  # what masking padding by token id does when pad == eos
        s.labels = [IGNORE_INDEX if i == tok.pad_token_id else x for i, x in zip(s.input_ids, s.labels, strict=True)]
    fatal = levels(run_preflight(samples, tok, cfg), FATAL)
    assert any(t.startswith("pad == eos ('<|im_end|>') and eos is masked in every sample") for t in fatal)
    assert any(t.startswith("no sample trains the end-of-turn token") for t in fatal)


def test_samples_without_trained_tokens(tok):
    cfg = config()
    samples = encoded(tok, cfg)
    samples[2].labels = [IGNORE_INDEX] * len(samples[2].labels)
    assert levels(run_preflight(samples, tok, cfg), WARNING) == [
        "1 sample with no trained token only cost time (chats row 2)."]
    for s in samples:
        s.labels = [IGNORE_INDEX] * len(s.labels)
    assert ("no sample has a trained token: there is nothing to learn."
            in levels(run_preflight(samples, tok, cfg), FATAL))


def fake(length: int, row: int) -> Encoded:
    ids = [5] * (length - 1) + [2]
    return Encoded(ids, [IGNORE_INDEX] * (length - 2) + [5, 2], ("lens", row), truncated=False)


def test_padding_share_and_longest_samples(tok):
    cfg = config(per_device_train_batch_size=2)
    report = run_preflight([fake(10, 0), fake(30, 1), fake(10, 2), fake(30, 3)], tok, cfg)
    assert "padding share at batch size 2: 33.3%" in report.figures  # 1 - 80 / (2 x 30 + 2 x 30)
    assert "longest: lens row 1 (30 tokens, 2 trained), lens row 3 (30 tokens, 2 trained), " \
           "lens row 0 (10 tokens, 2 trained)" in report.figures
    assert not levels(report, WARNING)
    crowded = run_preflight([fake(3, 0), fake(3, 1), fake(3, 2), fake(97, 3)], tok,
                            config(per_device_train_batch_size=4))
    assert "padding share at batch size 4: 72.7%" in crowded.figures  # 1 - 106 / (4 x 97)
    assert any(t.startswith("73% of every batch is padding") for t in levels(crowded, WARNING))
    packed = run_preflight([fake(3, 0), fake(97, 1)], tok, config(packing=True))
    assert not any("padding share" in f for f in packed.figures)
    # One sample a micro-batch: no padding; five tied for longest: the first three in sample order.
    ties = run_preflight([fake(8, row) for row in range(2)] + [fake(20, row) for row in range(2, 7)], tok,
                         config(per_device_train_batch_size=1))
    assert "padding share at batch size 1: 0.0%" in ties.figures
    assert "longest: lens row 2 (20 tokens, 2 trained), lens row 3 (20 tokens, 2 trained), " \
           "lens row 4 (20 tokens, 2 trained)" in ties.figures


def test_a_fatal_finding_stops_the_run_before_the_model_loads(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("yes", "no", "maybe", "hello")]
    (data / "words.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps({"words": {"file_name": "words.json"}}))
    out = tmp_path / "out"
    from tunesmith.train import run_training

    cfg = load_config(None, {"model_name_or_path": str(tiny_model_dir), "dataset": "words", "dataset_dir": str(data),
                             "template": "empty", "output_dir": str(out), "max_steps": 1,
                             "preprocessing_num_workers": 1})
    with pytest.raises(UserError, match="the data preflight found what would spoil this training"):
        run_training(cfg)
    assert "FATAL: no sample trains the end-of-turn token" in (out / "preflight.txt").read_text()
    assert not (out / "trainer_log.jsonl").exists()


def test_flags_of_a_chunk_equal_each_sample_alone_and_no_marker_spans_two_samples(tok):
    rules = FlagRules(tok)
    rules.markers, rules.bos, rules.eos = [[11, 12]], 1, 2  # a two-token end of turn
    samples = [Encoded([1, 1, 5, 11], [IGNORE_INDEX, IGNORE_INDEX, 5, 11], ("t", 0)),  # ends on the marker's 1st token
               Encoded([12, 7, 2], [12, 7, 2], ("t", 1)),  # starts with its 2nd: no marker across the seam
               Encoded([3, 11, 12, 2], [IGNORE_INDEX, 11, 12, IGNORE_INDEX], ("t", 2), truncated=True),
               Encoded([1], [1], ("t", 3))]
    expected = [store.DOUBLE_BOS, store.HAS_EOS | store.EOS_TRAINED,
                store.TRUNCATED | store.END_OF_TURN_TRAINED | store.HAS_EOS, 0]
    assert [int(rules.flags_of(store.end_to_end([s]))[0]) for s in samples] == expected
    assert rules.flags_of(store.end_to_end(samples)).tolist() == expected
    # A marker on a chunk's last tokens counts; an empty chunk has no flags.
    assert rules.flags_of(store.end_to_end([Encoded([3, 11, 12], [3, 11, 12], ("t", 4))])).tolist() == \
        [store.END_OF_TURN_TRAINED]
    assert rules.flags_of(store.end_to_end([])).tolist() == []
