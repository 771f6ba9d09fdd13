"""tunesmith against LLaMA-Factory and TRL on one SFT workload: throughput, memory, the same math.

    python bench/peers.py            # 200 rows, 3 repeats of every run, alternating
    python bench/peers.py --quick    # 40 rows, 6 steps, 1 repeat: checks that everything runs
    python bench/peers.py --gpu      # a random ~0.5B Llama in bf16 on the GPU (tunesmith only)

Workload: the default model (SmolLM2-135M-Instruct), LoRA rank 8 on every linear layer, alpaca
rows (data/alpaca_demo.json repeated, or `--data FILE`; see workload_data.py), cutoff 512, 4 samples per
optimizer step, learning rate 1e-4.

Runs: tunesmith fp32 default, fp32 packing, bf16 (all padding-free on sdpa) and a padded fp32
reference (eager attention, run once); LLaMA-Factory 0.9.5
default, neat_packing, bf16; TRL 1.16 SFTTrainer default and packing. Each peer lives in its own
virtualenv under bench/venvs/ (created here on first use, with the machine's torch wheel installed
first so that pip pulls no CUDA build); none of them is a dependency of tunesmith. A peer that
cannot be installed is reported in the table and skipped.

Every run is a subprocess; runs alternate (a, b, c, a, b, c, ...) so that a change in the machine's
load spreads over all of them. Reported per run (median over repeats):
- tokens/s: non-padding tokens trained per second from the end of step 1 to the end of the last
  step (the first step, with its one-off warm-up, is left out);
- peak RSS of the process (getrusage of the child);
- achieved FLOP/s = tokens/s x the workload's useful FLOPs per token (train/flops.py, the same
  for every framework), as a share of the measured fp32 or bf16 matmul peak of this machine;
- ratios against the LLaMA-Factory default and the best peer.
"The same math": each tunesmith run's per-step losses must match the padded fp32 run's within
1e-4 (bf16 within 2% of the loss).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workload_data import ALPACA_DEMO, alpaca_rows, write_alpaca_dataset

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENVS = HERE / "venvs"
OUT = HERE / "out"
H200_BF16_PEAK = 989e12

PEERS = {
    "llamafactory": {"packages": ["llamafactory==0.9.5"], "module": "llamafactory.train.tuner"},
    "trl": {"packages": ["trl==1.16.*", "peft"], "module": "trl, peft"},
}

# name -> (framework, options)
RUNS = {
    "tunesmith fp32 padded reference": ("tunesmith", {"attn_implementation": "eager"}),
    "tunesmith fp32": ("tunesmith", {}),
    "tunesmith fp32 packing": ("tunesmith", {"packing": True}),
    "tunesmith bf16": ("tunesmith", {"bf16": True}),
    "LLaMA-Factory default": ("llamafactory", {}),
    "LLaMA-Factory neat_packing": ("llamafactory", {"neat_packing": True}),
    "LLaMA-Factory bf16": ("llamafactory", {"bf16": True}),
    "TRL default": ("trl", {}),
    "TRL packing": ("trl", {"packing": True}),
}
# eager attention has no varlen kernel, so this run keeps plain padded batches; it runs once, as
# the oracle of "the same math" (with sdpa, tunesmith is padding-free whatever `packing` says)
REFERENCE = "tunesmith fp32 padded reference"
LF_DEFAULT = "LLaMA-Factory default"


# ------------------------------------------------------------------------------------------------
# Peer virtualenvs
# ------------------------------------------------------------------------------------------------


def _torch_requirement() -> tuple[str, str]:
    """(what to pip install, version): the machine's torch wheel (pip's find-links folders) of the
    version tunesmith runs on, else that version from the index."""
    import torch

    version = torch.__version__.split("+")[0]
    for folder in os.environ.get("PIP_FIND_LINKS", "/opt/wheels").split():
        for wheel in sorted(Path(folder.removeprefix("file://")).glob(f"torch-{version}*.whl")):
            return str(wheel), version
    return f"torch=={version}", version


def _pip(python: Path, *args: str, log: Path) -> bool:
    with log.open("a") as handle:
        handle.write(f"$ pip {' '.join(args)}\n")
        handle.flush()
        return subprocess.run([str(python), "-m", "pip", "install", "--quiet", *args], stdout=handle,
                              stderr=subprocess.STDOUT).returncode == 0


def ensure_peer(name: str) -> tuple[Path | None, str]:
    """(the peer venv's python, '') or (None, why it is unavailable)."""
    spec = PEERS[name]
    venv = VENVS / name
    python = venv / "bin" / "python"
    log = VENVS / f"{name}-install.log"
    check = [str(python), "-c", f"import {spec['module']}"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python, ""
    VENVS.mkdir(parents=True, exist_ok=True)
    print(f"installing {' '.join(spec['packages'])} into {venv} (log: {log}) ...", file=sys.stderr)
    if not python.exists():
        base_python = getattr(sys, "_base_executable", sys.executable)  # not this venv's own python
        subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    torch_req, torch_version = _torch_requirement()
    pin = Path(tempfile.mkdtemp()) / "torch-pin.txt"
    pin.write_text(f"torch=={torch_version}\n")  # keeps pip from replacing it with another build
    if not _pip(python, torch_req, log=log) or not _pip(python, "-c", str(pin), *spec["packages"], log=log):
        return None, f"pip install {' '.join(spec['packages'])} failed (see {log.relative_to(REPO)})"
    if name == "llamafactory":
        _torchaudio_stand_in(python, log)
    if subprocess.run(check, capture_output=True).returncode != 0:
        error = subprocess.run(check, capture_output=True, text=True).stderr.strip().splitlines()[-1:]
        return None, f"installed but `import {spec['module']}` fails: {' '.join(error)}"
    return python, ""


def _torchaudio_stand_in(python: Path, log: Path) -> None:
    """LLaMA-Factory 0.9.5 imports torchaudio at module level (for audio inputs, unused in text
    SFT). The package index has no torchaudio/torchvision build for this torch, and the ones pip
    picks fail to load against it; so they are removed and an empty torchaudio module stands in."""
    probe = subprocess.run([str(python), "-c", "import torchaudio"], capture_output=True)
    if probe.returncode == 0:
        return
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchaudio", "torchvision"],
                   stdout=log.open("a"), stderr=subprocess.STDOUT)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stand_in = Path(site) / "torchaudio"
    stand_in.mkdir(exist_ok=True)
    (stand_in / "__init__.py").write_text('"""Empty stand-in (bench/peers.py): text SFT never uses audio."""\n'
                                          '__version__ = "0.0"\n')


# ------------------------------------------------------------------------------------------------
# Workload
# ------------------------------------------------------------------------------------------------


def prepare_data(rows: int, folder: Path, source: Path = ALPACA_DEMO) -> None:
    """alpaca rows for tunesmith and LLaMA-Factory (dataset_info.json) and as prompt/completion
    conversations for TRL (the same rendered prompt, loss on the answer only)."""
    data = alpaca_rows(rows, source)
    write_alpaca_dataset(folder, "alpaca_bench", data)
    with (folder / "trl.jsonl").open("w") as handle:
        for row in data:
            prompt = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
            handle.write(json.dumps({"prompt": [{"role": "user", "content": prompt}],
                                     "completion": [{"role": "assistant", "content": row["output"]}]}) + "\n")


def workload_flops_per_token(model_dir: str, data_dir: Path, rows: int, cutoff: int, lora: bool = True) -> float:
    """Average useful FLOPs per trained token of the workload (train/flops.py), from tunesmith's
    own tokenization of the same rows."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunesmith.config import load_config
    from tunesmith.data.pipeline import tokenize_datasets
    from tunesmith.model.finetune import apply_finetuning
    from tunesmith.model.load import load_tokenizer
    from tunesmith.train.flops import flop_counts

    cfg = load_config(None, {"model_name_or_path": model_dir, "dataset": "alpaca_bench", "dataset_dir": str(data_dir),
                             "cutoff_len": cutoff, "max_samples": rows, "preprocessing_num_workers": 1,
                             "finetuning_type": "lora" if lora else "full", "output_dir": str(OUT / "flops")})
    encoded = tokenize_datasets(cfg, load_tokenizer(cfg.model)).train
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    counts = flop_counts(apply_finetuning(model, cfg.finetune, verbose=False))
    tokens = sum(len(e.input_ids) for e in encoded)
    supervised = sum(sum(1 for y in e.labels[1:] if y != -100) for e in encoded)
    pairs = sum(len(e.input_ids) ** 2 for e in encoded)
    return counts.step_flops(tokens, supervised, pairs) / tokens


MATMUL_PROBE = """
import sys, time, torch
threads, native_bf16 = int(sys.argv[1]), sys.argv[2] == "1"
if threads: torch.set_num_threads(threads)
onednn = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
best = {}
shapes = ((1024, 576, 1536), (1024, 1536, 576), (2048, 2048, 2048))
for dtype in (torch.float32, torch.bfloat16):
    # Emulated bf16 (no AVX512-BF16/AMX) ran 80x slower than fp32 (2 vs 165 GFLOP/s): one shape bounds it.
    for m, k, n in shapes if dtype == torch.float32 or native_bf16 else shapes[:1]:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        bt = b.t().contiguous()
        products = [lambda: a @ b]  # torch's matmul (a BLAS in fp32)
        if onednn is not None:  # and oneDNN's, which tunesmith uses for fp32 on some CPUs
            products.append(lambda: onednn(a, bt, None, "none", [], ""))
        for product in products:
            try:
                for _ in range(3): product()
            except RuntimeError:  # oneDNN has no bf16 product on a CPU without bf16 instructions
                continue
            t = min((lambda s: (product(), time.perf_counter() - s)[1])(time.perf_counter()) for _ in range(15))
            best[str(dtype)] = max(best.get(str(dtype), 0), 2 * m * k * n / t)
print(best["torch.float32"], best["torch.bfloat16"])
"""


def matmul_peaks(threads: int) -> tuple[float, float]:
    from tunesmith import cpu

    native_bf16 = "1" if cpu.features().native_bf16 else "0"
    out = subprocess.run([sys.executable, "-c", MATMUL_PROBE, str(threads), native_bf16],
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


# ------------------------------------------------------------------------------------------------
# One run, inside its own process (and venv)
# ------------------------------------------------------------------------------------------------


def _token_counter(model):  # noqa: ANN001, ANN202 (runs in the peers' venvs too)
    """A forward pre-hook counting non-padding tokens: 2D attention masks count their nonzero
    entries (LLaMA-Factory's neat_packing marks samples 1, 2, ...), 4D masks the positions that
    attend to themselves (boolean True or additive 0); padding-free batches (no mask) count every
    token."""
    import torch

    counted = {"tokens": 0}

    def hook(_module, args, kwargs):  # noqa: ANN001, ANN202
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            counted["tokens"] += int((mask != 0).sum())
        elif mask is not None and mask.dim() == 4:  # a token is real when it may attend to itself
            diagonal = mask[:, 0].diagonal(dim1=-2, dim2=-1)
            counted["tokens"] += int((diagonal if mask.dtype == torch.bool else diagonal == 0).sum())
        elif ids is not None:
            counted["tokens"] += int(ids.numel())

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return counted


def _hf_callback(record: dict):  # noqa: ANN202
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        counted = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
            self.counted = _token_counter(model)

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            record["step_end"].append(time.perf_counter())
            record["tokens"].append(self.counted["tokens"])
            self.counted["tokens"] = 0

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
            if logs and "loss" in logs:
                record["losses"].append(float(logs["loss"]))

    return Timing()


def run_one(spec: dict) -> dict:
    """Train once as `spec` says; returns per-step tokens, step end times and losses."""
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    record: dict = {"tokens": [], "step_end": [], "losses": []}
    common = {"steps": spec["steps"], "lr": 1e-4, "batch": 4, "cutoff": spec["cutoff"], "out": spec["out"]}
    options = spec["options"]
    if spec["framework"] == "tunesmith":
        from tunesmith.config import load_config
        from tunesmith.train import run_training

        overrides = {"model_name_or_path": spec["model"], "dataset": "alpaca_bench", "dataset_dir": spec["data"],
                     "cutoff_len": common["cutoff"], "max_samples": spec["rows"], "finetuning_type": "lora",
                     "lora_rank": 8, "lora_target": "all", "per_device_train_batch_size": common["batch"],
                     "max_steps": common["steps"], "learning_rate": common["lr"], "lr_scheduler_type": "constant",
                     "logging_steps": 1, "save_steps": 0, "report_to": "none", "preprocessing_num_workers": 1,
                     "output_dir": common["out"], "overwrite_output_dir": True, **options}
        run_training(load_config(None, overrides))
        for line in (Path(common["out"]) / "trainer_log.jsonl").read_text().splitlines():
            entry = json.loads(line)
            if "loss" in entry:
                record["losses"].append(entry["loss"])
                record["tokens"].append(entry["tokens"])
                record["step_end"].append(entry["elapsed"])
    elif spec["framework"] == "llamafactory":
        from llamafactory.train.tuner import run_exp

        args = {"stage": "sft", "do_train": True, "model_name_or_path": spec["model"], "dataset": "alpaca_bench",
                "dataset_dir": spec["data"], "template": "smollm2", "finetuning_type": "lora", "lora_rank": 8,
                "lora_target": "all", "cutoff_len": common["cutoff"], "max_samples": spec["rows"],
                "per_device_train_batch_size": common["batch"], "gradient_accumulation_steps": 1,
                "max_steps": common["steps"], "learning_rate": common["lr"], "lr_scheduler_type": "constant",
                "logging_steps": 1, "save_strategy": "no", "report_to": "none", "output_dir": common["out"],
                "overwrite_output_dir": True, "preprocessing_num_workers": 1, "dataloader_num_workers": 0,
                "plot_loss": False, "seed": 42, "use_cpu": True, **options}
        if options.get("neat_packing"):
            args["packing"] = True
        run_exp(args, callbacks=[_hf_callback(record)])
    elif spec["framework"] == "trl":
        from datasets import load_dataset
        from peft import LoraConfig
        from trl import SFTConfig, SFTTrainer

        data = load_dataset("json", data_files=str(Path(spec["data"]) / "trl.jsonl"), split="train")
        config = SFTConfig(output_dir=common["out"], max_length=common["cutoff"],
                           per_device_train_batch_size=common["batch"], max_steps=common["steps"],
                           learning_rate=common["lr"], lr_scheduler_type="constant", logging_steps=1,
                           save_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0, seed=42,
                           **options)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=spec["model"], args=config, train_dataset=data, peft_config=lora,
                             callbacks=[_hf_callback(record)])
        trainer.train()
    else:
        raise SystemExit(f"unknown framework {spec['framework']}")
    return record


# ------------------------------------------------------------------------------------------------
# Orchestration
# ------------------------------------------------------------------------------------------------


def launch(python: Path, spec: dict, timeout: int) -> dict:
    """Run one spec in a child process; adds seconds, peak RSS and the error if it failed."""
    result_file = Path(spec["out"]) / "bench-result.json"
    shutil.rmtree(spec["out"], ignore_errors=True)
    Path(spec["out"]).mkdir(parents=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               DISABLE_VERSION_CHECK="1", PYTHONPATH=str(HERE))
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    log = Path(spec["out"]) / "run.log"
    code = ("import json, sys, peers; spec = json.load(open(sys.argv[1])); "
            "json.dump(peers.run_one(spec), open(sys.argv[2], 'w'))")
    spec_file = Path(spec["out"]) / "spec.json"
    spec_file.write_text(json.dumps(spec))
    started = time.time()
    with log.open("w") as handle:
        child = subprocess.Popen([str(python), "-c", code, str(spec_file), str(result_file)], stdout=handle,
                                 stderr=subprocess.STDOUT, env=env, cwd=spec["out"])
        try:
            deadline = started + timeout
            while True:
                pid, status, usage = os.wait4(child.pid, os.WNOHANG)
                if pid:
                    break
                if time.time() > deadline:
                    child.kill()
                    pid, status, usage = os.wait4(child.pid, 0)
                    break
                time.sleep(0.2)
        finally:
            child.returncode = os.waitstatus_to_exitcode(status) if pid else -9
    outcome: dict = {"seconds": round(time.time() - started, 1), "peak_rss_gib": usage.ru_maxrss / 2**20}
    if child.returncode != 0 or not result_file.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        outcome["error"] = f"exit {child.returncode}: {' | '.join(tail)[-300:]}"
        return outcome
    record = json.loads(result_file.read_text())
    if len(record["step_end"]) < 2:
        outcome["error"] = "fewer than 2 steps recorded"
        return outcome
    span = record["step_end"][-1] - record["step_end"][0]
    outcome.update(tokens_per_second=sum(record["tokens"][1:]) / span if span > 0 else None,
                   losses=record["losses"], steps=len(record["step_end"]))
    return outcome


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def same_math(results: dict[str, list[dict]]) -> dict[str, str]:
    """Per-step losses of each tunesmith run against the padded fp32 run (first repeat of each)."""
    verdicts = {}
    reference = next((r["losses"] for r in results.get(REFERENCE, []) if "losses" in r), None)
    for name, runs in results.items():
        if not name.startswith("tunesmith") or name == REFERENCE or reference is None:
            continue
        losses = next((r["losses"] for r in runs if "losses" in r), None)
        if losses is None or len(losses) != len(reference):
            verdicts[name] = "no losses to compare"
            continue
        worst = max(abs(a - b) for a, b in zip(losses, reference, strict=True))
        bound = 0.02 * max(reference) if "bf16" in name else 1e-4
        verdicts[name] = f"{'ok' if worst <= bound else 'DIFFERS'} (max |diff| {worst:.2e}, bound {bound:.0e})"
    return verdicts


def table(results: dict[str, list[dict]], unavailable: dict[str, str], flops_per_token: float,
          peaks: tuple[float, float], peak_label: str = "cpu") -> str:
    rows = []
    med = {name: median([r.get("tokens_per_second") for r in runs]) for name, runs in results.items()}
    rss = {name: median([r["peak_rss_gib"] for r in runs if "error" not in r]) for name, runs in results.items()}
    lf = med.get(LF_DEFAULT)
    peers = [v for k, v in med.items() if not k.startswith("tunesmith") and v]
    best_peer = max(peers) if peers else None
    lf_rss = rss.get(LF_DEFAULT)
    header = ("| run | tokens/s | peak RSS GiB | vs LF default | vs best peer | RSS vs LF | achieved GFLOP/s "
              "| share of matmul peak | note |")
    rows.append(header)
    rows.append("|" + "---|" * 9)
    for name in results:
        speed = med[name]
        errors = [r["error"] for r in results[name] if "error" in r]
        note = errors[0] if errors and speed is None else (f"{len(errors)} failed" if errors else "")
        peak = peaks[1] if "bf16" in name else peaks[0]
        achieved = speed * flops_per_token if speed else None
        cells = [name, f"{speed:.1f}" if speed else "-", f"{rss[name]:.2f}" if rss[name] else "-",
                 f"{speed / lf:.2f}x" if speed and lf else "-",
                 f"{speed / best_peer:.2f}x" if speed and best_peer else "-",
                 f"{rss[name] / lf_rss:.2f}x" if rss[name] and lf_rss else "-",
                 f"{achieved / 1e9:.1f}" if achieved else "-",
                 f"{achieved / peak:.1%} of {'bf16' if 'bf16' in name else 'fp32'}" if achieved else "-", note]
        rows.append("| " + " | ".join(cells) + " |")
    for name, why in unavailable.items():
        rows.append(f"| {name} | - | - | - | - | - | - | - | not run: {why} |")
    rows.append("")
    rows.append(f"matmul peak ({peak_label}): fp32 {peaks[0] / 1e9:.0f} GFLOP/s, bf16 {peaks[1] / 1e9:.0f} GFLOP/s; "
                f"useful FLOPs per trained token {flops_per_token / 1e6:.0f} M")
    return "\n".join(rows)


def machine_note() -> str:
    load = os.getloadavg()
    return (f"{time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({os.cpu_count()} cpus, {cpu_label()}), "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def cpu_label() -> str:
    """The CPU model and the features its kernel plan reads, e.g. 'Intel(R) Xeon(R) ... (Intel; AVX2 AVX-512 ...)'."""
    from tunesmith.cpu import detect

    return detect().describe()


def cpu_record() -> dict:
    """The CPU, its features and the kernels tunesmith plans for it, for the JSON output."""
    from tunesmith.cpu import cpu_plan, detect

    found = detect()
    return {"model": found.model, "vendor": found.vendor, "features": found.names(),
            "torch_capability": found.torch_capability,
            "kernels": {dtype: cpu_plan(found, dtype).summary() for dtype in ("fp32", "bf16")}}


def cpu_main(args: argparse.Namespace) -> None:
    from tunesmith.model.provision import provision_default_model

    model_dir = str(provision_default_model())
    data_dir = OUT / "data"
    prepare_data(args.rows, data_dir, args.data)
    names = [n for n in RUNS if not args.only or any(part in n for part in args.only.split(","))]
    pythons: dict[str, Path] = {"tunesmith": Path(sys.executable)}
    unavailable: dict[str, str] = {}
    for framework in sorted({RUNS[n][0] for n in names} - {"tunesmith"}):
        python, why = ensure_peer(framework)
        if python is None:
            unavailable.update({n: why for n in names if RUNS[n][0] == framework})
        else:
            pythons[framework] = python
    runnable = [n for n in names if n not in unavailable]
    print(f"start: {machine_note()}", file=sys.stderr)
    label = cpu_label()
    peaks = matmul_peaks(args.threads)
    flops_per_token = workload_flops_per_token(model_dir, data_dir, args.rows, args.cutoff)
    results: dict[str, list[dict]] = {n: [] for n in runnable}
    for repeat in range(args.repeats):
        for name in runnable:
            if name == REFERENCE and repeat > 0:
                continue
            framework, options = RUNS[name]
            spec = {"framework": framework, "options": options, "model": model_dir, "data": str(data_dir),
                    "rows": args.rows, "steps": args.steps, "cutoff": args.cutoff, "threads": args.threads,
                    "out": str(OUT / "runs" / name.replace(" ", "_"))}
            outcome = launch(pythons[framework], spec, args.timeout)
            results[name].append(outcome)
            shown = (f"{outcome['tokens_per_second']:.1f} tok/s" if outcome.get("tokens_per_second")
                     else outcome.get("error"))
            print(f"[{repeat + 1}/{args.repeats}] {name}: {shown}, peak RSS {outcome['peak_rss_gib']:.2f} GiB, "
                  f"{outcome['seconds']} s on {label}", file=sys.stderr)
    report = [f"end: {machine_note()}",
              f"workload: {args.rows} rows of {args.data}, {args.steps} steps x 4 samples, cutoff {args.cutoff}, "
              f"{args.repeats} repeat(s), threads {args.threads or 'default'}",
              "tunesmith's cpu kernels: " + "; ".join(f"{d}: {k}" for d, k in cpu_record()["kernels"].items()), "",
              table(results, unavailable, flops_per_token, peaks, f"cpu: {label}"), "",
              "same math (per-step losses vs padded fp32):"]
    report += [f"- {name}: {verdict}" for name, verdict in same_math(results).items()]
    text = "\n".join(report)
    print(text)
    OUT.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (OUT / f"peers-{stamp}.md").write_text(text + "\n")
    (OUT / f"peers-{stamp}.json").write_text(json.dumps({"results": results, "unavailable": unavailable,
                                                         "peaks": peaks, "flops_per_token": flops_per_token,
                                                         "cpu": cpu_record(), "args": vars(args)},
                                                        indent=1, default=str))


def gpu_main(args: argparse.Namespace) -> None:
    """tunesmith alone on a random-initialised ~0.5B Llama in bf16 (the peers' venvs are CPU-only)."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunesmith.model.provision import provision_default_model

    if not torch.cuda.is_available():
        raise SystemExit("--gpu: torch sees no CUDA device here")
    tokenizer_dir = provision_default_model()
    model_dir = OUT / "llama-0.5b-random"
    if not (model_dir / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=1280, intermediate_size=3456,
                             num_hidden_layers=24, num_attention_heads=20, num_key_value_heads=4,
                             max_position_embeddings=4096, tie_word_embeddings=True,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    data_dir = OUT / "data"
    prepare_data(args.rows, data_dir, args.data)
    kernels = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
    runs = {f"tunesmith gpu {kind} bf16 ({kernel})": {"finetuning_type": kind, "attn_implementation": kernel}
            for kernel in kernels for kind in ("lora", "full")}
    lines = [f"start: {machine_note()}; {torch.cuda.get_device_name(0)}",
             "| run | tokens/s | achieved TFLOP/s | share of 989 TFLOP/s bf16 |", "|---|---|---|---|"]
    for name, extra in runs.items():
        flops_per_token = workload_flops_per_token(str(model_dir), data_dir, args.rows, args.cutoff,
                                                   lora=extra["finetuning_type"] == "lora")
        spec = {"framework": "tunesmith", "model": str(model_dir), "data": str(data_dir), "rows": args.rows,
                "steps": args.steps, "cutoff": args.cutoff, "threads": 0, "out": str(OUT / "runs" / "gpu"),
                "options": {"bf16": True, "per_device_train_batch_size": args.gpu_batch, **extra}}
        outcome = launch(Path(sys.executable), spec, args.timeout)
        speed = outcome.get("tokens_per_second")
        achieved = speed * flops_per_token if speed else None
        lines.append(f"| {name} | {speed:.0f} | {achieved / 1e12:.1f} | {achieved / H200_BF16_PEAK:.1%} |" if speed
                     else f"| {name} | - | - | {outcome.get('error')} |")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40 rows, 6 steps, 1 repeat")
    parser.add_argument("--gpu", action="store_true", help="tunesmith on a random ~0.5B Llama in bf16 on the GPU")
    parser.add_argument("--rows", type=int, default=None, help="alpaca rows (default 200; quick 40)")
    parser.add_argument("--data", type=Path, default=ALPACA_DEMO, help="alpaca JSON file the rows come from")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 25; quick 6)")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each config (default 3; quick 1)")
    parser.add_argument("--cutoff", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in every run (0: torch's default)")
    parser.add_argument("--only", default="", help="comma list of substrings of run names, e.g. 'tunesmith,TRL'")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds one run may take")
    parser.add_argument("--gpu-batch", type=int, default=16, help="--gpu: samples per micro-batch")
    args = parser.parse_args()
    quick = args.quick
    args.rows = args.rows or (40 if quick else 1000 if args.gpu else 200)
    args.steps = args.steps or (6 if quick else 30 if args.gpu else 25)
    args.repeats = args.repeats or (1 if quick else 3)
    if args.gpu:
        gpu_main(args)
    else:
        cpu_main(args)


if __name__ == "__main__":
    main()
