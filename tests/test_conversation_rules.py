"""One system-prompt rule for training and chat, LLaMA-Factory's newer message format (text parts
with `value`, per-message `loss_weight`), and `data preview` marking merged boundaries."""

from __future__ import annotations

import copy
import io
import json

import pytest
from helpers import make_dataset

from tunesmith.config import DataArgs, load_config
from tunesmith.data.encode import IGNORE_INDEX, encode
from tunesmith.data.formats import load_conversations
from tunesmith.data.pipeline import MERGE_MARK, dump, preview
from tunesmith.errors import UserError
from tunesmith.template import Conversation, apply_template, encode_segments

PIRATE = "You are a pirate."
ROWS = [{"instruction": "Give me a famous quote.", "input": "", "output": '"To be, or not to be."'},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"}]


@pytest.fixture()
def alpaca_dir(tmp_path, cache_home):
    return make_dataset(tmp_path / "data", {"quotes": {"file_name": "quotes.json"}}, {"quotes.json": ROWS})


def test_default_system_shows_in_the_dump_and_the_chat_prompt_alike(alpaca_dir, tiny_model_dir, tmp_path):
    from tunesmith.infer import ChatEngine

    cfg = load_config(None, {"model_name_or_path": str(tiny_model_dir), "dataset": "quotes",
                             "dataset_dir": str(alpaca_dir), "default_system": PIRATE})
    engine = ChatEngine(cfg)
    out = tmp_path / "dump.jsonl"
    dump(cfg, engine.tokenizer, out)
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == len(ROWS)
    for line, row in zip(lines, ROWS, strict=True):
        first_trained = next(i for i, label in enumerate(line["labels"]) if label != IGNORE_INDEX)
        prompt = engine.prompt_ids([{"role": "user", "content": row["instruction"]}])
        assert line["input_ids"][:first_trained] == prompt
        text = engine.tokenizer.decode(line["input_ids"])
        assert PIRATE in text and "SmolLM" not in text  # the template's own default gives way
    # Without default_system both fall back to the template's own default system prompt.
    plain = load_config(None, {"model_name_or_path": str(tiny_model_dir), "dataset": "quotes",
                               "dataset_dir": str(alpaca_dir)})
    dump(plain, engine.tokenizer, out)
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert PIRATE not in engine.tokenizer.decode(first["input_ids"])
    # The dataset's own system prompt wins over default_system.
    convs = load_conversations("quotes", alpaca_dir)
    own = [{"role": "system", "content": "Be brief."}, *convs[0].messages]
    assert engine.prompt_ids(own[:2]) == encode_segments(own[:2], engine.tokenizer, add_generation_prompt=True).ids


def test_preview_marks_a_boundary_the_whole_text_would_merge(alpaca_dir, tokenizer):
    tok = copy.deepcopy(tokenizer)
    apply_template(tok, "default")
    out = io.StringIO()
    preview(load_config(None, {"dataset": "quotes", "dataset_dir": str(alpaca_dir)}), tok, n=2, color=False,
            file=out)
    text = out.getvalue()
    # Row 0: `Assistant:"` is one token of the whole text; the answer's quote is trained on its own.
    assert f'Assistant:{MERGE_MARK}[["To be, or not to be.' in text
    assert "Assistant:[[Hi!" in text  # row 1 has no merged boundary
    assert f"{MERGE_MARK} = a prompt/answer boundary" in text and "(1 of 2 rows)" in text


LF_ROWS = [{"messages": [
    {"role": "system", "content": [{"type": "text", "value": "Be brief."}]},
    {"role": "user", "content": [{"type": "text", "value": "Hi"}]},
    {"role": "assistant", "content": [{"type": "text", "value": "Hello!"}], "loss_weight": 0.0},
    {"role": "user", "content": [{"type": "text", "value": "2+2?"}]},
    {"role": "assistant", "content": [{"type": "text", "value": "4"}], "loss_weight": 2.5},
]}]
LF_INFO = {"lf": {"file_name": "lf.json", "formatting": "sharegpt",
                  "columns": {"messages": "messages"},
                  "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                           "assistant_tag": "assistant", "system_tag": "system"}}}


def test_llamafactory_value_parts_and_loss_weight(tmp_path, tokenizer):
    folder = make_dataset(tmp_path, LF_INFO, {"lf.json": LF_ROWS})
    conv = load_conversations("lf", folder)[0]
    assert [m["content"] for m in conv.messages] == ["Be brief.", "Hi", "Hello!", "2+2?", "4"]
    sample = encode(conv, tokenizer, DataArgs())
    seg = encode_segments(conv, tokenizer)
    (a1, b1, _), (a2, b2, _) = seg.answers()
    assert all(label == IGNORE_INDEX for label in sample.labels[a1:b1])  # weight 0: not trained
    assert sample.labels[a2:b2] == sample.input_ids[a2:b2]
    assert sample.weights[a2:b2] == [2.5] * (b2 - a2) and sample.weights[a1:b1] == [0.0] * (b1 - a1)
    # Without loss_weight, no weights are carried (the plain path).
    plain = Conversation([{k: v for k, v in m.items() if k != "loss_weight"} for m in conv.messages])
    assert encode(plain, tokenizer, DataArgs()).weights is None


@pytest.mark.parametrize("part,fragment", [
    ({"type": "text", "txt": "Hi"}, "text part 0 has no string 'text' or 'value' (its keys: type, txt)"),
    ({"type": "image_url", "image_url": "x"}, "content part 0 is of type 'image_url', which is not supported yet"),
])
def test_bad_content_parts_are_named(tmp_path, part, fragment):
    rows = [{"messages": [{"role": "user", "content": [part]}, {"role": "assistant", "content": "a"}]}]
    folder = make_dataset(tmp_path, LF_INFO, {"lf.json": rows})
    with pytest.raises(UserError) as err:
        load_conversations("lf", folder)
    assert fragment in str(err.value)


def test_bad_loss_weight_is_a_row_error(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss_weight": -1}]}]
    folder = make_dataset(tmp_path, LF_INFO, {"lf.json": rows})
    with pytest.raises(UserError, match=r"loss_weight must be a finite number >= 0, got -1"):
        load_conversations("lf", folder)
