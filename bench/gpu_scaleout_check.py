"""GPU check of DeepSpeed ZeRO-2 and ZeRO-3 training: LoRA steps of a small model in bf16 through
`tunesmith train`, then the saved adapters are read back.

    pip install '.[deepspeed]'
    python bench/gpu_scaleout_check.py [--model DIR] [--gpus N] [--workdir DIR]

For each of: plain data parallel (reference), ZeRO-2, ZeRO-3, and ZeRO-3 resumed from its
checkpoint, it runs `tunesmith train` (relaunched under torchrun on N GPUs) and checks that
- the run exits 0 and logs a finite loss for every step,
- the adapter holds real tensors (every LoRA matrix has rank x width elements, none empty, and
  lora_B is no longer all zeros), with the same names and shapes as the reference run's,
- plain peft loads it onto the base model and it changes the logits,
- the first step's loss agrees with the reference run's (bf16 tolerance),
- the ZeRO-3 checkpoint holds DeepSpeed's sharded state and resuming from it logs the same losses.

Without --model a small random Llama is built (its tokenizer is trained here), so nothing has to
be downloaded. Exit code 0 = all checks passed (or no GPU: nothing to check), 1 = a check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["rivers", "mountains", "the sea", "forests", "deserts", "clouds", "cities", "bridges"]


def build_tokenizer(folder: Path) -> None:
    """A small byte-level BPE tokenizer trained on the synthetic data, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [f"Tell me about {t}. Here is a short note about {t}: they are worth a visit." for t in TOPICS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts * 20, trainers.BpeTrainer(vocab_size=600, special_tokens=special,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.save_pretrained(folder)


def build_model(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    build_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def build_data(folder: Path) -> Path:
    rows = [{"instruction": f"Tell me about {t}.", "input": "",
             "output": f"Here is a short note about {t}: they are worth a visit."} for t in TOPICS * 4]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.json").write_text(json.dumps(rows))
    (folder / "dataset_info.json").write_text(json.dumps({"notes": {"file_name": "notes.json"}}))
    return folder


def train(name: str, work: Path, model: Path, data: Path, gpus: int, template: str | None,
          **extra: object) -> tuple[Path, list[float], str]:
    import yaml

    out = work / name
    cfg = {"model_name_or_path": str(model), "dataset": "notes", "dataset_dir": str(data), "cutoff_len": 256,
           "output_dir": str(out), "finetuning_type": "lora", "lora_rank": 8, "per_device_train_batch_size": 2,
           "gradient_accumulation_steps": 2, "learning_rate": 1e-2, "max_steps": 4, "save_steps": 2,
           "logging_steps": 1, "lr_scheduler_type": "constant", "bf16": True, "seed": 3,
           "preprocessing_num_workers": 1, "overwrite_output_dir": True, "report_to": "none"}
    if template:
        cfg["template"] = template
    cfg.update(extra)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, FORCE_TORCHRUN="1", NPROC_PER_NODE=str(gpus))
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(path)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=900)
    log = out / "trainer_log.jsonl"
    losses = [json.loads(x)["loss"] for x in log.read_text().splitlines() if '"loss"' in x] if log.exists() else []
    if proc.returncode != 0:
        return out, losses, f"exit code {proc.returncode}\n{proc.stderr[-4000:]}"
    return out, losses, ""


def check_adapter(out: Path, model: Path, reference: dict | None) -> tuple[list[str], dict]:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    problems: list[str] = []
    weights = load_file(out / "adapter_model.safetensors")
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    if not weights:
        problems.append("adapter_model.safetensors holds no tensors")
    for key, value in weights.items():
        if value.numel() == 0 or 8 not in value.shape:
            problems.append(f"{key} has shape {tuple(value.shape)} (empty or not rank 8)")
        if not torch.isfinite(value.float()).all():
            problems.append(f"{key} holds non-finite values")
    if weights and all(float(v.float().abs().max()) == 0.0 for k, v in weights.items() if "lora_B" in k):
        problems.append("every lora_B is still zero: nothing was trained or the saved copy is empty")
    if reference is not None and shapes != reference:
        problems.append("the adapter's tensor names/shapes differ from the plain data-parallel run's")
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 33, 60, 90, 120]])
    with torch.no_grad():
        before = base(ids).logits
        loaded = PeftModel.from_pretrained(base, out).eval()
        after = loaded(ids).logits
    if not torch.isfinite(after).all() or torch.allclose(before, after):
        problems.append("the loaded adapter does not change the logits (or gives non-finite ones)")
    return problems, shapes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a small HF model folder (default: build a random Llama)")
    parser.add_argument("--gpus", type=int, default=None, help="processes (default: every visible GPU, at most 2)")
    parser.add_argument("--workdir", default=None, help="where runs are written (default: a temporary folder)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_scaleout_check: no CUDA GPU is visible here, so nothing was checked. Run it on a machine "
              "with a GPU after `pip install '.[deepspeed]'`.")
        return 0
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        print("gpu_scaleout_check: DeepSpeed is not installed; run `pip install '.[deepspeed]'` first.")
        return 1
    gpus = args.gpus or min(torch.cuda.device_count(), 2)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tunesmith-scaleout-"))
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else build_model(work / "model")
    template = None if args.model else "chatml"
    data = build_data(work / "data")
    print(f"gpu_scaleout_check: {gpus} GPU process(es), model {model}, runs in {work}")

    failures: list[str] = []
    results: dict[str, list[float]] = {}
    reference_shapes = None
    runs = [("plain", {}),
            ("zero2", {"deepspeed": str(REPO / "examples/deepspeed/ds_z2_config.json")}),
            ("zero3", {"deepspeed": str(REPO / "examples/deepspeed/ds_z3_config.json")})]
    for name, extra in runs:
        out, losses, error = train(name, work, model, data, gpus, template, **extra)
        results[name] = losses
        if error:
            failures.append(f"{name}: training failed: {error}")
            continue
        if len(losses) != 4 or not all(math.isfinite(x) for x in losses):
            failures.append(f"{name}: expected 4 finite losses, got {losses}")
        problems, shapes = check_adapter(out, model, reference_shapes)
        failures += [f"{name}: {p}" for p in problems]
        if name == "plain":
            reference_shapes = shapes
        elif results["plain"] and losses and abs(losses[0] - results["plain"][0]) > 0.05 * abs(results["plain"][0]):
            failures.append(f"{name}: first-step loss {losses[0]:.4f} differs from plain data parallel's "
                            f"{results['plain'][0]:.4f}")
        print(f"  {name:8s} losses {[round(x, 4) for x in losses]}  adapter tensors {len(shapes)}")

    zero3 = work / "zero3"
    checkpoint = zero3 / "checkpoint-2"
    if (checkpoint / "sharded_state").is_dir():
        log = zero3 / "trainer_log.jsonl"
        full = results.get("zero3", [])
        (work / "zero3_full_log.jsonl").write_text(log.read_text())
        out, losses, error = train("zero3", work, model, data, gpus, template, overwrite_output_dir=False,
                                   resume_from_checkpoint=str(checkpoint),
                                   deepspeed=str(REPO / "examples/deepspeed/ds_z3_config.json"))
        if error:
            failures.append(f"zero3 resume: training failed: {error}")
        elif any(abs(a - b) > 1e-3 * abs(b) for a, b in zip(losses, full, strict=False)) or len(losses) != len(full):
            failures.append(f"zero3 resume: losses {losses} differ from the uninterrupted run's {full}")
        else:
            print(f"  zero3 resumed from checkpoint-2: losses {[round(x, 4) for x in losses]}")
    elif "zero3" in results and results["zero3"]:
        failures.append("zero3: checkpoint-2 holds no sharded_state folder")

    if failures:
        print("gpu_scaleout_check: FAILED")
        for line in failures:
            print("  - " + line)
        return 1
    print("gpu_scaleout_check: all checks passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
