"""CPU decisions (tunesmith/cpu.py): the CPU read from /proc/cpuinfo, the plan for each measured
feature set, the kernels and attention following the plan, and `tunesmith env` and the training
log naming the CPU and the kernels it runs."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from helpers import identity_dataset

from tunesmith import cpu
from tunesmith.config import FinetuneArgs, ModelArgs, load_config
from tunesmith.model.finetune import apply_finetuning
from tunesmith.model.load import load_model
from tunesmith.train import attention, kernels

XEON_CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_fp16 amx_bf16 amx_tile

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: not the first processor
flags\t\t: fpu sse
"""
ARM_CPUINFO = """\
processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm bf16
CPU implementer\t: 0x41
"""


def features(vendor: str, *flags: str) -> cpu.FeatureSet:
    return cpu.FeatureSet("Test CPU", vendor, frozenset(flags))


AMD_AVX512_BF16 = features("AMD", "avx2", "avx512f", "avx512_bf16")  # the AMD EPYC of bench/RESULTS.md
INTEL_AMX = features("Intel", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
INTEL_AVX512_BF16 = features("Intel", "avx2", "avx512f", "avx512_bf16", "avx512_fp16")  # a Xeon without AMX
AVX2_ONLY = features("AMD", "avx", "avx2", "fma")
NO_AVX = cpu.parse_cpuinfo(ARM_CPUINFO)


def test_cpuinfo_of_the_first_processor_is_read():
    found = cpu.parse_cpuinfo(XEON_CPUINFO, "AVX512")
    assert (found.model, found.vendor, found.torch_capability) == ("Intel(R) Xeon(R) Platinum 8480+", "Intel", "AVX512")
    assert found.names() == ["AVX2", "AVX-512", "AVX512-BF16", "AMX"]
    assert found.describe() == "Intel(R) Xeon(R) Platinum 8480+ (Intel; AVX2 AVX-512 AVX512-BF16 AMX)"
    assert "sse" in found.flags and "not the first processor" not in found.describe()
    arm = cpu.parse_cpuinfo(ARM_CPUINFO)
    assert arm.names() == [] and "asimd" in arm.flags and not arm.native_bf16
    assert arm.describe() == "unknown CPU (unknown vendor; no AVX2, no AVX-512/AMX)"


def test_this_machine_is_detected_from_its_cpuinfo():
    """The flags read agree with the vector width torch itself dispatches to on this CPU."""
    found = cpu.detect()
    if not found.flags:
        pytest.skip("no /proc/cpuinfo flags here")
    assert found.model and found.vendor
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        assert found.has("AVX-512") and found.has("AVX2")
    elif capability.startswith("AVX2"):
        assert found.has("AVX2")  # (torch may be told to stay below the CPU: ATEN_CPU_CAPABILITY)


def plans(found: cpu.FeatureSet) -> tuple[cpu.CpuPlan, cpu.CpuPlan]:
    return cpu.cpu_plan(found, "fp32"), cpu.cpu_plan(found, "bf16")


def test_amd_with_avx512_bf16_keeps_every_measured_path():
    fp32, bf16 = plans(AMD_AVX512_BF16)
    assert fp32.fp32_products.value == "oneDNN" and "2.2x" in fp32.fp32_products.reason
    assert fp32.row_multiple == bf16.row_multiple == cpu.ROW_MULTIPLE
    assert fp32.training_forwards.on and bf16.training_forwards.on
    assert bf16.bf16_attention.value == "matmul" and "587 vs 500" in bf16.bf16_attention.reason
    assert bf16.bf16.on and "992 vs 498" in bf16.bf16.reason
    assert fp32.summary() == "fp32 products oneDNN, training forwards on, padding 32, head product oneDNN"
    assert bf16.summary().endswith("bf16 attention matmul, bf16 advisable")


def test_intel_with_amx_takes_bf16_products_on_the_tiles():
    fp32, bf16 = plans(INTEL_AMX)
    assert fp32.fp32_products.on and "1.13x" in fp32.fp32_products.reason
    assert bf16.bf16_attention.value == "matmul" and "AMX" in bf16.bf16_attention.reason
    assert bf16.bf16.on and "494 vs 296" in bf16.bf16.reason
    assert "494 vs 500" in bf16.training_forwards.reason


def test_intel_without_amx_leaves_fp32_products_to_the_blas_attends_in_fp32_and_advises_against_bf16():
    fp32, bf16 = plans(INTEL_AVX512_BF16)
    assert not fp32.fp32_products.on and "234 vs 214" in fp32.fp32_products.reason
    assert fp32.row_multiple is None  # no oneDNN kernels per shape to bound
    assert bf16.row_multiple == cpu.ROW_MULTIPLE  # torch's bf16 products are on oneDNN with AVX-512
    assert fp32.summary() == "fp32 products torch matmul, training forwards on, padding none, head product torch matmul"
    assert bf16.bf16_attention.value == "fp32"
    assert not bf16.bf16.on and "165 vs 318" in bf16.bf16.reason


def test_avx2_only_leaves_products_to_the_blas_and_pads_nothing():
    fp32, bf16 = plans(AVX2_ONLY)
    assert not fp32.fp32_products.on and "132.8 vs 112.3" in fp32.fp32_products.reason
    assert fp32.row_multiple is None
    assert fp32.head_product.on and "90 vs 49" in fp32.head_product.reason  # the one product MKL splits badly
    assert "head product" not in bf16.choices()  # the head runs in bf16 there
    assert bf16.row_multiple is None  # torch runs bf16 products on oneDNN only with AVX-512
    assert not bf16.bf16.on and bf16.bf16.value == "unsupported"
    no_avx = cpu.cpu_plan(NO_AVX, "fp32")
    assert not no_avx.fp32_products.on and no_avx.row_multiple is None and not no_avx.head_product.on
    with pytest.raises(ValueError, match="'fp16'"):
        cpu.cpu_plan(AVX2_ONLY, "fp16")


def test_an_assumed_plan_applies_to_its_own_dtype_only():
    sdpa = dataclasses.replace(cpu.cpu_plan(INTEL_AMX, "bf16"), bf16_attention=cpu.Choice(True, "sdpa", "A/B"))
    with cpu.assume(sdpa):
        assert cpu.plan_in_use("bf16") is sdpa and cpu.features() == INTEL_AMX
        assert cpu.plan_in_use("fp32") == cpu.cpu_plan(INTEL_AMX, "fp32")
        with cpu.assume(NO_AVX):
            assert cpu.plan_in_use("bf16") == cpu.cpu_plan(NO_AVX, "bf16")
    assert cpu.features() == cpu.detect()


def lora_model(folder):
    torch.manual_seed(0)
    model = apply_finetuning(load_model(ModelArgs(model_name_or_path=str(folder)), dtype=torch.float32),
                             FinetuneArgs(finetuning_type="lora"), verbose=False)
    return model.train()


def products_on_onednn(model, found: cpu.FeatureSet) -> tuple[int, torch.Tensor]:
    """(oneDNN products of one forward with the training forwards, the logits) planned for `found`."""
    from torch.profiler import ProfilerActivity, profile

    with cpu.assume(found):
        kernels.set_training_forwards(model, True)
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                logits = model(input_ids=torch.arange(5, 69)[None], use_cache=False).logits
        finally:
            kernels.set_training_forwards(model, False)
    calls = {e.key: e.count for e in prof.key_averages()}
    return calls.get("mkldnn::_linear_pointwise", 0), logits


def test_fp32_products_follow_the_plan(tiny_model_dir):
    if not kernels._onednn_exact():
        pytest.skip("this torch build has no exact oneDNN fp32 product")
    model = lora_model(tiny_model_dir)
    on, logits_on = products_on_onednn(model, AMD_AVX512_BF16)
    off, logits_off = products_on_onednn(model, NO_AVX)
    assert products_on_onednn(model, INTEL_AVX512_BF16)[0] == 0  # torch's BLAS there
    assert products_on_onednn(model, AVX2_ONLY)[0] == 0
    layers = model.get_base_model().config.num_hidden_layers
    assert on >= 7 * layers * 2  # every LoRA layer: its base and rank-sized products
    assert off == 0
    assert torch.allclose(logits_on, logits_off, atol=1e-5)
    with cpu.assume(NO_AVX):
        assert kernels.cpu_row_multiple(mixed_precision=False) is None
        assert kernels.matmul_nt(torch.ones(32, 64), torch.ones(32, 64)).shape == (32, 32)
    with cpu.assume(AMD_AVX512_BF16):
        assert kernels.cpu_row_multiple(mixed_precision=False) == cpu.ROW_MULTIPLE
    with cpu.assume(AVX2_ONLY):
        assert kernels.cpu_row_multiple(mixed_precision=False) is None
        assert kernels.cpu_row_multiple(mixed_precision=True) is None


def head_inputs():
    """102 tokens: chunks of 64 leave 38 rows, which reach oneDNN only when padded to 64."""
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(102, 64, generator=gen), torch.randn(128, 64, generator=gen) * 0.3
    return hidden, weight, torch.randint(0, 128, (102,), generator=gen)


def test_the_output_heads_product_follows_the_plan():
    """The head's forward product alone takes oneDNN, its rows padded, where only it is planned
    there (AVX2 only); the loss and its gradients are the same on every path."""
    if not kernels._onednn_exact():
        pytest.skip("this torch build has no exact oneDNN fp32 product")
    from torch.profiler import ProfilerActivity, profile

    from tunesmith.train.loss import linear_cross_entropy

    hidden, weight, targets = head_inputs()
    results = {}
    for name, found in (("avx2", AVX2_ONLY), ("blas", INTEL_AVX512_BF16), ("onednn", AMD_AVX512_BF16)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with cpu.assume(found), profile(activities=[ProfilerActivity.CPU]) as prof:
            loss = linear_cross_entropy(h, w, targets, chunk=64)
        loss.backward()
        calls = {e.key: e.count for e in prof.key_averages()}.get("mkldnn::_linear_pointwise", 0)
        results[name] = (calls, loss.detach(), h.grad, w.grad)
    assert results["avx2"][0] == 2  # the forward product of each chunk, the 38-row one padded
    assert results["blas"][0] == 0
    assert results["onednn"][0] == 6  # and both gradient products of each chunk
    for _calls, loss, grad_h, grad_w in results.values():
        assert torch.allclose(loss, results["blas"][1], rtol=1e-6)
        assert torch.allclose(grad_h, results["blas"][2], atol=1e-6)
        assert torch.allclose(grad_w, results["blas"][3], atol=1e-5)


def test_bf16_head_chunks_are_padded_where_bf16_products_take_onednn():
    """Under bf16 autocast the head's chunks follow the bf16 products: padded to ROW_MULTIPLE rows
    where those run on oneDNN (AVX-512), as they are, never padded, with AVX2 only."""
    from torch.profiler import ProfilerActivity, profile

    from tunesmith.train.loss import linear_cross_entropy

    hidden, weight, targets = head_inputs()
    rows = {}
    for name, found in (("avx512", AMD_AVX512_BF16), ("avx2", AVX2_ONLY)):
        with cpu.assume(found), torch.autocast("cpu", dtype=torch.bfloat16), \
                profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            linear_cross_entropy(hidden.clone().requires_grad_(), weight, targets, chunk=64)
        rows[name] = {e.input_shapes[0][0] for e in prof.key_averages(group_by_input_shape=True)
                      if e.key == "aten::mm" and e.input_shapes and e.input_shapes[0]}
    assert rows["avx512"] == {64}
    assert rows["avx2"] == {64, 38}


def bf16_attention_calls(monkeypatch, planned: cpu.FeatureSet | cpu.CpuPlan) -> tuple[int, list[torch.dtype]]:
    """(calls of the matmul kernel, query dtypes of torch's sdpa calls) of one bf16 varlen attention."""
    from transformers.integrations import sdpa_attention

    matmul_calls, sdpa_dtypes = [], []
    real_matmul, real_sdpa = attention.causal_matmul_attention, sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "causal_matmul_attention", lambda *a: matmul_calls.append(1) or real_matmul(*a))
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward",
                        lambda m, q, *a, **k: sdpa_dtypes.append(q.dtype) or real_sdpa(m, q, *a, **k))
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    bounds = torch.tensor([0, 5, 12])
    q, k, v = (torch.randn(1, heads, 12, 16, dtype=torch.bfloat16) for heads in (4, 2, 2))
    with cpu.assume(planned):
        out, _ = attention.varlen_sdpa_attention(module, q, k, v, None, cu_seq_lens_q=bounds, cu_seq_lens_k=bounds)
    assert out.shape == (1, 12, 4, 16) and out.dtype == torch.bfloat16
    return len(matmul_calls), sdpa_dtypes


def test_bf16_attention_follows_the_plan(monkeypatch):
    assert bf16_attention_calls(monkeypatch, AMD_AVX512_BF16) == (2, [])  # one matmul call per sample
    assert bf16_attention_calls(monkeypatch, INTEL_AVX512_BF16) == (0, [torch.float32] * 2)
    sdpa = dataclasses.replace(cpu.cpu_plan(INTEL_AMX, "bf16"), bf16_attention=cpu.Choice(True, "sdpa", "A/B"))
    assert bf16_attention_calls(monkeypatch, sdpa) == (0, [torch.bfloat16] * 2)


def test_env_names_the_cpu_its_features_and_both_plans():
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "env"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    found = cpu.detect()
    assert f"cpu: {found.describe()}" in proc.stdout
    for dtype in ("fp32", "bf16"):
        assert f"cpu kernels in {dtype}: {cpu.cpu_plan(found, dtype).summary()}" in proc.stdout
    assert cpu.cpu_plan(found, "bf16").bf16.reason in proc.stdout


def test_training_log_names_the_cpu_and_its_kernels(tmp_path, tiny_model_dir, repo_data, capsys):
    from tunesmith.train import run_training

    data = identity_dataset(tmp_path / "data", repo_data, rows=4)
    run_training(load_config(None, {
        "model_name_or_path": str(tiny_model_dir), "dataset": "ident", "dataset_dir": str(data), "cutoff_len": 64,
        "output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 2, "max_steps": 1,
        "preprocessing_num_workers": 1, "report_to": "none", "plot_loss": False}))
    lines = capsys.readouterr().err.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("train samples "))
    assert lines[header + 1] == f"cpu: {cpu.detect().describe()}; kernels: {kernels.cpu_kernels(False)}"
    assert "fp32 products" in lines[header + 1] and "bf16 attention" not in lines[header + 1]


def test_bf16_on_a_cpu_with_slow_bf16_products_warns_and_keeps_bf16(capsys):
    from tunesmith.train.loop import _announce_cpu

    with cpu.assume(INTEL_AVX512_BF16):
        _announce_cpu("bf16")
    said = capsys.readouterr().err
    assert "cpu: Test CPU (Intel; AVX2 AVX-512 AVX512-BF16, no AMX); kernels: " in said
    assert "bf16 attention fp32" in said
    assert "warning: bf16: true on this CPU, but AVX512-BF16 without AMX" in said and "Training in bf16" in said
    for quiet in (INTEL_AMX, AMD_AVX512_BF16):
        with cpu.assume(quiet):
            _announce_cpu("bf16")
        assert "warning" not in capsys.readouterr().err
    with cpu.assume(INTEL_AVX512_BF16):
        _announce_cpu("no")  # an fp32 run: nothing to warn about
    assert "warning" not in capsys.readouterr().err


def test_a_sharded_run_names_the_library_forwards(capsys):
    from tunesmith.train.loop import _announce_cpu

    with cpu.assume(AMD_AVX512_BF16):
        _announce_cpu("bf16", sharded=True)
    assert capsys.readouterr().err == ("cpu: Test CPU (AMD; AVX2 AVX-512 AVX512-BF16, no AMX); kernels: the library "
                                       "forwards, unpadded (sharded run), bf16 attention matmul\n")
