"""Every key of LLaMA-Factory's SFT arguments (tests/fixtures/llamafactory_keys.txt) is accounted
for: a tunesmith key, a LLaMA-Factory spelling read into one, refused with the reason, or named in
one warning line with the reason it has no effect. A key that is none of these fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.config import ALIASES, IGNORED_KEYS, KEYS, OFF_VALUES, UNSUPPORTED_KEYS, load_config
from tunesmith.errors import UserError

FIXTURE = Path(__file__).parent / "fixtures" / "llamafactory_keys.txt"
README = Path(__file__).resolve().parents[1] / "README.md"
# A value that turns the feature on, for keys where `true` means "off" (or is 1, num_beams' off value).
ON_VALUES = {"num_beams": 4, "ignore_pad_token_for_loss": "false", "mix_strategy": "interleave_under",
             "freeze_trainable_modules": "q_proj"}


def llamafactory_keys() -> list[str]:
    lines = FIXTURE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith(("#", "["))]


def test_the_key_list_covers_every_argument_class():
    sections = [line for line in FIXTURE.read_text(encoding="utf-8").splitlines() if line.startswith("[")]
    assert sections == ["[ModelArguments]", "[DataArguments]", "[FinetuningArguments]", "[GeneratingArguments]",
                        "[Seq2SeqTrainingArguments]"]
    assert len(set(llamafactory_keys())) > 250


@pytest.mark.parametrize("key", sorted(set(llamafactory_keys())))
def test_every_llamafactory_key_is_accounted_for(key):
    kinds = [name for name, table in (("implemented", KEYS), ("alias", ALIASES), ("refused", UNSUPPORTED_KEYS),
                                      ("warned", IGNORED_KEYS)) if key in table]
    assert len(kinds) == 1, f"{key}: {kinds or 'neither implemented, refused nor warned'}"


@pytest.mark.parametrize("key", sorted(UNSUPPORTED_KEYS))
def test_refused_keys_name_the_key_and_the_feature(tmp_path, key):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"learning_rate: 1.0e-4\n{key}: {ON_VALUES.get(key, 'true')}\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_config(path)
    assert f"line 2: '{key}' ({UNSUPPORTED_KEYS[key]}) is not supported yet" in str(err.value)
    load_config(None, {key: None})  # unset is fine
    for value in OFF_VALUES.get(key, ()):
        load_config(None, {key: value})  # what runs here anyway


@pytest.mark.parametrize("key", sorted(IGNORED_KEYS))
def test_warned_keys_print_one_line_with_the_reason(tmp_path, capsys, key):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"{key}: something\n", encoding="utf-8")
    load_config(path, [f"{key}=other"])  # given twice, said once
    lines = [line for line in capsys.readouterr().err.splitlines() if key in line]
    assert lines == [f"warning: command line: '{key}' has no effect here: {IGNORED_KEYS[key]}."]


def test_no_warning_when_no_ignored_key(capsys):
    load_config(None, {"learning_rate": 1e-4, "optim": "sgd"})
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("value,kernel", [("auto", "auto"), ("disabled", "eager"), ("sdpa", "sdpa"),
                                          ("fa2", "flash_attention_2")])
def test_flash_attn_is_read_into_attn_implementation(value, kernel):
    cfg = load_config(None, {"flash_attn": value})
    assert cfg.model.attn_implementation == kernel and "flash_attn" not in cfg.to_flat()


def test_alias_mistakes():
    with pytest.raises(UserError, match="'flash_attn' is 'fa3'; allowed: auto, disabled, sdpa, fa2"):
        load_config(None, {"flash_attn": "fa3"})
    with pytest.raises(UserError, match="'flash_attn: fa2' means 'attn_implementation: flash_attention_2'"):
        load_config(None, {"flash_attn": "fa2", "attn_implementation": "eager"})
    assert load_config(None, {"disable_shuffling": True}).data.shuffle is False
    assert load_config(None, {"disable_shuffling": "false"}).data.shuffle is True


def test_enable_thinking_is_a_key():
    assert KEYS["enable_thinking"].default is True and "qwen3" in KEYS["enable_thinking"].help
    assert load_config(None, ["enable_thinking=false"]).model.enable_thinking is False


def test_readme_lists_every_refused_key():
    text = README.read_text(encoding="utf-8")
    missing = [key for key in UNSUPPORTED_KEYS if f"`{key}`" not in text]
    assert not missing, missing
