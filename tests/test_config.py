"""The config schema: LLaMA-Factory YAMLs parse, overrides apply, every mistake names its key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tunesmith.config import DEFAULT_MODEL, RunConfig, help_table, load_config, schema
from tunesmith.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["lora_sft", "full_sft", "merge_lora", "inference"])
def test_llamafactory_examples_parse_with_only_model_and_template_changed(tmp_path, name):
    text = (FIXTURES / f"{name}.yaml").read_text()
    text = text.replace("MODEL_PATH", "models/my-model").replace("TEMPLATE", "llama3")
    cfg = load_config(write(tmp_path, text))
    original = yaml.safe_load(text)
    flat = cfg.to_flat()
    for key, value in original.items():
        if key in flat and value is not None:
            if isinstance(flat[key], list):  # list-valued keys: `a,b` in the YAML is the list [a, b]
                value = [part.strip() for part in str(value).split(",")]
            assert flat[key] == value or str(flat[key]) == str(value), key
    if name == "lora_sft":
        assert cfg.finetune.finetuning_type == "lora" and cfg.finetune.lora_alpha == 16
        assert cfg.train.learning_rate == 1e-4 and cfg.train.num_train_epochs == 3.0
        assert cfg.data.dataset == ["identity", "alpaca_en_demo"]
        assert cfg.train.resume_from_checkpoint is None


def test_overrides_win_and_are_typed(tmp_path):
    path = write(tmp_path, "learning_rate: 1.0e-4\ndataset: a\nbf16: false\n")
    cfg = load_config(path, ["learning_rate=1e-5", "bf16=true", "max_steps=20", "lora_target=q_proj,v_proj",
                             "dataset=a,b"])
    assert cfg.train.learning_rate == 1e-5 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.bf16 is True and cfg.train.max_steps == 20
    assert cfg.finetune.lora_target == ["q_proj", "v_proj"] and cfg.data.dataset == ["a", "b"]


def test_list_keys_take_yaml_lists_and_comma_strings_alike(tmp_path):
    listed = load_config(write(tmp_path, "dataset: [a, b]\nlora_target:\n  - q_proj\n  - v_proj\n"))
    joined = load_config(None, {"dataset": "a, b", "lora_target": "q_proj,v_proj"})
    assert listed.data.dataset == joined.data.dataset == ["a", "b"]
    assert listed.finetune.lora_target == joined.finetune.lora_target == ["q_proj", "v_proj"]
    assert load_config(None, {}).train.report_to == ["none"]
    with pytest.raises(UserError, match="'dataset' must be a list of names"):
        load_config(None, {"dataset": {"a": 1}})
    with pytest.raises(UserError, match="'report_to' is 'wandbb'; allowed: none, tensorboard, mlflow, wandb, all"):
        load_config(None, {"report_to": "tensorboard,wandbb"})


def test_strings_like_1e_minus_5_are_floats(tmp_path):
    # PyYAML reads 1e-5 (no dot) as a string; users write it anyway.
    cfg = load_config(write(tmp_path, "learning_rate: 1e-5\n"))
    assert cfg.train.learning_rate == 1e-5


def test_defaults():
    cfg = load_config(None, {})
    assert cfg.model.model_name_or_path == DEFAULT_MODEL
    assert cfg.model.trust_remote_code is False
    assert cfg.finetune.lora_alpha == 2 * cfg.finetune.lora_rank
    assert cfg.train.eval_steps == cfg.train.logging_steps
    assert cfg.train.gradient_checkpointing is False


def test_unknown_key_names_line_and_suggests(tmp_path):
    path = write(tmp_path, "dataset: a\nlearning_rat: 1.0e-4\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    text = str(err.value)
    assert str(path) in text and "line 2" in text and "learning_rat" in text and "learning_rate" in text


def test_wrong_type_names_key_and_expected_type(tmp_path):
    with pytest.raises(UserError, match=r"line 1: 'cutoff_len' must be an integer, got 'long'"):
        load_config(write(tmp_path, "cutoff_len: long\n"))
    with pytest.raises(UserError, match="'bf16' must be a bool"):
        load_config(None, ["bf16=maybe"])
    with pytest.raises(UserError, match="'per_device_train_batch_size' must be an integer, got 1.5"):
        load_config(None, {"per_device_train_batch_size": 1.5})


def test_bad_choice_lists_allowed_values():
    with pytest.raises(UserError) as err:
        load_config(None, ["finetuning_type=lroa"])
    assert "lora, freeze, full" in str(err.value) and "did you mean 'lora'" in str(err.value)
    with pytest.raises(UserError, match="lr_scheduler_type"):
        load_config(None, ["lr_scheduler_type=cosine_restarts"])


@pytest.mark.parametrize("line,fragment", [
    ("use_galore: true", "'use_galore' (GaLore) is not supported yet"),
    ("stage: dpo", "'stage: dpo' is not supported yet"),
    ("report_to: swanlab", "'report_to' is 'swanlab'; allowed: none, tensorboard, mlflow, wandb, all"),
    ("mix_strategy: interleave_under", "dataset interleaving"),
])
def test_unsupported_llamafactory_features_are_refused(tmp_path, line, fragment):
    with pytest.raises(UserError, match=None) as err:
        load_config(write(tmp_path, line + "\n"))
    assert fragment in str(err.value)


def test_unsupported_key_set_to_its_off_value_is_fine(tmp_path):
    load_config(write(tmp_path, "use_galore: null\nuse_badam: false\nmix_strategy: concat\n"))


@pytest.mark.parametrize("override,fragment", [
    ("cutoff_len=0", "'cutoff_len' must be at least 1"),
    ("warmup_ratio=1.5", "'warmup_ratio' must be in [0, 1)"),
    ("learning_rate=-1", "'learning_rate' must be positive"),
    ("export_size=0", "'export_size' must be positive"),
])
def test_ranges(override, fragment):
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_bf16_and_fp16_together():
    with pytest.raises(UserError, match="choose one"):
        load_config(None, ["bf16=true", "fp16=true"])


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"line 2, column \d+: not valid YAML"):
        load_config(write(tmp_path, "a: 1\nb: c: d\n"))
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_override_syntax():
    with pytest.raises(UserError, match="not key=value"):
        load_config(None, ["learning_rate"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["learning_rate=3e-4", "dataset=x", "template=qwen"])
    cfg.dump_yaml(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.to_flat() == cfg.to_flat()


def test_schema_is_the_single_source_of_help():
    keys = schema()
    text = help_table()
    for key, (_, field) in keys.items():
        assert key in text and field.metadata["help"]
    required = """model_name_or_path adapter_name_or_path trust_remote_code template infer_backend dataset
    eval_dataset dataset_dir cutoff_len max_samples val_size train_on_prompt mask_history preprocessing_num_workers
    dataloader_num_workers packing neat_packing tokenized_path overwrite_cache stage do_train finetuning_type
    lora_target lora_rank lora_alpha lora_dropout additional_target freeze_trainable_layers
    per_device_train_batch_size per_device_eval_batch_size gradient_accumulation_steps num_train_epochs max_steps
    learning_rate lr_scheduler_type warmup_ratio warmup_steps weight_decay max_grad_norm bf16 fp16
    gradient_checkpointing logging_steps save_steps save_total_limit save_only_model eval_strategy eval_steps
    output_dir overwrite_output_dir resume_from_checkpoint report_to plot_loss seed ddp_timeout deepspeed export_dir
    export_size export_device export_legacy_format temperature top_p top_k max_new_tokens repetition_penalty
    skip_invalid""".split()
    assert not [k for k in required if k not in keys]
    assert isinstance(RunConfig().to_flat(), dict)


@pytest.mark.parametrize("line,fragment", [
    ("num_train_epochs: nan", "line 2: 'num_train_epochs' must be a finite number, got 'nan'."),
    ("num_train_epochs: .inf", "line 2: 'num_train_epochs' must be a finite number, got inf."),
    ("learning_rate: .nan", "line 2: 'learning_rate' must be a finite number, got nan."),
    ("num_train_epochs: 0", "line 2: 'num_train_epochs' must be positive, got 0.0."),
    ("lora_alpha: -16", "line 2: 'lora_alpha' must be positive, got -16."),
    ("save_steps: -1", "line 2: 'save_steps' must be at least 0, got -1."),
    ("max_grad_norm: -0.5", "line 2: 'max_grad_norm' must be at least 0, got -0.5."),
    ("top_p: 1.5", "line 2: 'top_p' must be in (0, 1], got 1.5."),
    ("seed: -3", "line 2: 'seed' must be in [0, 4294967295], got -3."),
    ("freeze_trainable_layers: 0", "line 2: 'freeze_trainable_layers' must not be 0"),
])
def test_numeric_keys_are_finite_and_in_range_with_file_and_line(tmp_path, line, fragment):
    path = write(tmp_path, "dataset: demo\n" + line + "\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}, line 2: ") and fragment in message and "\n" not in message.strip()


def test_num_train_epochs_zero_is_fine_when_max_steps_decides():
    assert load_config(None, ["num_train_epochs=0", "max_steps=5"]).train.max_steps == 5


def test_hints_name_the_right_thing(tmp_path):
    with pytest.raises(UserError) as err:
        load_config(None, ["learnin_rate=1"])
    assert "--keys" in err.value.hint and "did you mean 'learning_rate'" in str(err.value)
    with pytest.raises(UserError) as err:
        load_config(None, ["ray_num_workers=4"])
    assert "'ray_num_workers' (training through Ray) is not supported yet" in str(err.value)
    with pytest.raises(UserError) as err:
        load_config(None, ["ray_num_worker=4"])
    assert "did you mean 'ray_num_workers'" in str(err.value)
    load_config(None, ["ray_num_workers=1"])  # LLaMA-Factory's default asks for nothing more
    with pytest.raises(UserError, match=r"unknown template 'qwen3_nothnk' \(did you mean 'qwen3_nothink'\?\)"):
        from tunesmith.template import apply_template

        apply_template(object(), "qwen3_nothnk")


def test_enable_thinking_is_a_key():
    assert load_config(None, ["enable_thinking=false"]).model.enable_thinking is False
    assert load_config(None).model.enable_thinking is True
