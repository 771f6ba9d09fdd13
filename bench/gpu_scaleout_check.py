"""GPU check of scale-out: every setup trains like plain data parallelism, step by step.

    pip install '.[deepspeed]'
    python bench/gpu_scaleout_check.py [--model DIR] [--gpus N] [--workdir DIR] [--only NAME,...]

On the same data (an odd number of samples, a small held-out set), with
gradient_accumulation_steps: 4, eval every 2 steps and a checkpoint every 2 steps, it runs
`tunesmith train` (relaunched under torchrun on N GPUs) as

    plain    DDP, bf16 (the reference)
    zero2    DeepSpeed ZeRO-2            zero3          DeepSpeed ZeRO-3
    zero3off ZeRO-3, parameters and optimizer offloaded to the CPU
    fsdp2    FSDP2                       fp16           DDP with fp16 loss scaling, nan_policy: skip

and compares each with plain: every step's loss and eval loss (bf16 tolerance) and the final
adapter (relative difference). Each run is then resumed from its checkpoint-2 into a fresh folder
and must give the uninterrupted run's later losses and adapter. One table is printed; the exit code
is 1 when any comparison fails or a run fails, 0 when all pass. Without a CUDA GPU nothing can be
checked: it says so and exits 0 (or 2 with --require-gpu).

Two processes on one GPU are not tried: NCCL refuses two ranks on the same device.
Without --model a small random Llama is built (its tokenizer is trained here), so nothing has to
be downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["rivers", "mountains", "the sea", "forests", "deserts", "clouds", "cities", "bridges"]
ROWS = 30  # 27 training samples after val_size 3: an odd count, and a short last step
LOSS_TOLERANCE = 0.02  # relative, per step: bf16 products in another order
ADAPTER_TOLERANCE = 0.05  # ||a - b|| / ||b|| over all adapter tensors
RESUME_TOLERANCE = 1e-3  # a resumed run repeats its own setup's arithmetic
CASES: dict[str, dict[str, Any]] = {
    "plain": {},
    "zero2": {"deepspeed": str(REPO / "examples/deepspeed/ds_z2_config.json")},
    "zero3": {"deepspeed": str(REPO / "examples/deepspeed/ds_z3_config.json")},
    "zero3off": {"deepspeed": str(REPO / "examples/deepspeed/ds_z3_offload_config.json")},
    "fsdp2": {"fsdp_config": str(REPO / "examples/accelerate/fsdp2_config.yaml")},
    "fp16": {"bf16": False, "fp16": True, "nan_policy": "skip"},
}


@dataclass
class Run:
    """What a run left: its per-step losses, eval losses, final adapter, or why it failed."""

    losses: list[float] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    adapter: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass
class Row:
    name: str
    steps: int
    loss_diff: float | None  # the largest relative per-step loss difference from the reference
    eval_diff: float | None
    adapter_diff: float | None
    resume_diff: float | None
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def relative_loss_diff(a: list[float], b: list[float]) -> float:
    """The largest |a - b| / max(1, |b|) over the steps; inf when the lists differ in length or a
    loss is not finite."""
    if len(a) != len(b) or not all(math.isfinite(x) for x in a + b):
        return math.inf
    return max((abs(x - y) / max(1.0, abs(y)) for x, y in zip(a, b, strict=True)), default=0.0)


def adapter_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """||a - b|| / ||b|| over every tensor; inf when the names or shapes differ, or b is empty."""
    import torch

    if not b or a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in b):
        return math.inf
    diff = math.sqrt(sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in b))
    norm = math.sqrt(sum(float(b[k].float().pow(2).sum()) for k in b))
    if not all(bool(torch.isfinite(a[k].float()).all()) for k in a):
        return math.inf
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def compare(name: str, run: Run, reference: Run, resumed: Run | None) -> Row:
    """One row of the table: `run` against plain DDP, and its resumed copy against `run`."""
    if run.error:
        return Row(name, len(run.losses), None, None, None, None, [f"training failed: {run.error}"])
    problems = []
    loss = relative_loss_diff(run.losses, reference.losses)
    if loss > LOSS_TOLERANCE:
        problems.append(f"losses {run.losses} differ from plain's {reference.losses}")
    evals = relative_loss_diff(run.eval_losses, reference.eval_losses)
    if evals > LOSS_TOLERANCE:
        problems.append(f"eval losses {run.eval_losses} differ from plain's {reference.eval_losses}")
    weights = adapter_diff(run.adapter, reference.adapter)
    if weights > ADAPTER_TOLERANCE:
        problems.append(f"the adapter differs from plain's by {weights:.3g} (relative)")
    again = None
    if resumed is not None:
        if resumed.error:
            problems.append(f"resume failed: {resumed.error}")
        else:
            again = max(relative_loss_diff(resumed.losses, run.losses), adapter_diff(resumed.adapter, run.adapter))
            if again > RESUME_TOLERANCE:
                problems.append(f"the resumed run differs: losses {resumed.losses}, uninterrupted {run.losses}")
    return Row(name, len(run.losses), loss, evals, weights, again, problems)


def format_table(rows: list[Row]) -> str:
    def number(x: float | None) -> str:
        return "-" if x is None else "inf" if math.isinf(x) else f"{x:.2e}"

    lines = [f"{'setup':9s} {'steps':>5s} {'loss diff':>10s} {'eval diff':>10s} {'adapter diff':>12s} "
             f"{'resume diff':>11s}  result"]
    for r in rows:
        lines.append(f"{r.name:9s} {r.steps:5d} {number(r.loss_diff):>10s} {number(r.eval_diff):>10s} "
                     f"{number(r.adapter_diff):>12s} {number(r.resume_diff):>11s}  {'ok' if r.ok else 'MISMATCH'}")
    lines += [f"  {r.name}: {p}" for r in rows for p in r.problems]
    return "\n".join(lines)


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
             "output": f"Here is a short note about {t}: they are worth a visit."} for t in TOPICS * 4][:ROWS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.json").write_text(json.dumps(rows))
    (folder / "dataset_info.json").write_text(json.dumps({"notes": {"file_name": "notes.json"}}))
    return folder


def read_run(out: Path, error: str = "") -> Run:
    from safetensors.torch import load_file

    log = out / "trainer_log.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    weights = out / "adapter_model.safetensors"
    return Run([r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r],
               load_file(weights) if weights.exists() and not error else {}, error)


def train(out: Path, model: Path, data: Path, gpus: int, template: str | None, **extra: object) -> Run:
    import yaml

    cfg = {"model_name_or_path": str(model), "dataset": "notes", "dataset_dir": str(data), "cutoff_len": 256,
           "output_dir": str(out), "finetuning_type": "lora", "lora_rank": 8, "per_device_train_batch_size": 1,
           "gradient_accumulation_steps": 4, "learning_rate": 1e-2, "num_train_epochs": 1, "save_steps": 2,
           "val_size": 3, "eval_strategy": "steps", "eval_steps": 2, "logging_steps": 1,
           "lr_scheduler_type": "cosine", "warmup_steps": 1, "bf16": True, "seed": 3,
           "preprocessing_num_workers": 1, "overwrite_output_dir": True, "report_to": "none"}
    if template:
        cfg["template"] = template
    cfg.update(extra)
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, FORCE_TORCHRUN="1", NPROC_PER_NODE=str(gpus))
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(path)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=1800)
    return read_run(out, f"exit code {proc.returncode}: {proc.stderr[-2000:]}" if proc.returncode else "")


def resume(out: Path, copy: Path, model: Path, data: Path, gpus: int, template: str | None,
           **extra: object) -> Run | None:
    """The run again from its checkpoint-2, in a fresh folder (None when it wrote no checkpoint-2)."""
    if not (out / "checkpoint-2").is_dir():
        return None
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir(parents=True)
    for name in ("checkpoint-2", "trainer_log.jsonl", "config.yaml"):
        (shutil.copytree if (out / name).is_dir() else shutil.copy)(out / name, copy / name)
    return train(copy, model, data, gpus, template, overwrite_output_dir=False, resume_from_checkpoint=True, **extra)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a small HF model folder (default: build a random Llama)")
    parser.add_argument("--gpus", type=int, default=None, help="processes (default: every visible GPU)")
    parser.add_argument("--workdir", default=None, help="where runs are written (default: a temporary folder)")
    parser.add_argument("--only", default=None, help="comma-separated setups besides plain (default: all)")
    parser.add_argument("--require-gpu", action="store_true", help="exit 2 instead of 0 without a CUDA GPU")
    args = parser.parse_args()

    import importlib.util

    import torch

    if not torch.cuda.is_available():
        print("gpu_scaleout_check: no CUDA GPU is visible here, so nothing was checked. Run it on a machine "
              "with a GPU after `pip install '.[deepspeed]'`.")
        return 2 if args.require_gpu else 0
    names = ["plain"] + [n for n in (args.only.split(",") if args.only else CASES) if n in CASES and n != "plain"]
    if importlib.util.find_spec("deepspeed") is None and any("deepspeed" in CASES[n] for n in names):
        print("gpu_scaleout_check: DeepSpeed is not installed; run `pip install '.[deepspeed]'` first.")
        return 1
    gpus = args.gpus or torch.cuda.device_count()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tunesmith-scaleout-"))
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else build_model(work / "model")
    template = None if args.model else "chatml"
    data = build_data(work / "data")
    print(f"gpu_scaleout_check: {gpus} GPU process(es), model {model}, runs in {work}", flush=True)

    reference = train(work / "plain", model, data, gpus, template)
    rows = []
    for name in names:
        run = reference if name == "plain" else train(work / name, model, data, gpus, template, **CASES[name])
        again = resume(work / name, work / f"{name}-resumed", model, data, gpus, template, **CASES[name])
        rows.append(compare(name, run, reference, again))
        print(f"  {name}: done ({'ok' if rows[-1].ok else 'mismatch'})", flush=True)
    if reference.error:
        rows[0].problems.insert(0, "the reference run failed, so nothing could be compared")
    print(format_table(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
