"""Data at scale: tunesmith against LLaMA-Factory 0.9.5 from the command to the first optimizer step.

    python bench/data_scale.py                          # 20k, 200k and 1M rows, both sides
    python bench/data_scale.py --rows 20000,200000 --sides tunesmith   # memory flatness only

Data: Alpaca-style JSON Lines of N rows made from the repository's own data (data/alpaca_demo.json
and data/identity.json), every row made different by a numbered variation of its instruction.
Both tools run `train` on the default model, LoRA, cutoff 512, `preprocessing_num_workers`
workers, max_steps 1, activations recomputed in backward (LLaMA-Factory's default; tunesmith's
`gradient_checkpointing: true`), so that peak memory compares the data paths,
each as a subprocess whose peak RSS (getrusage of the child, the largest of it and its workers)
and wall time are recorded. LLaMA-Factory lives in bench/venvs/llamafactory (bench/peers.py
installs it on first use) and is run with a fresh datasets cache, so both tokenize afresh.

Scenarios (tunesmith): first run (empty cache); second run (the cache present); streaming
(`streaming: true`, no cache); a tokenization killed when half its chunks are written, then
restarted. Targets: first run at most 0.67x LLaMA-Factory's time at 200k and 1M rows; peak RSS
at most LLaMA-Factory's and within 200 MiB from 20k to 1M rows; second run's first step within
5 s at 1M rows; streaming's first step within 10 s at 1M rows, RSS within 200 MiB of the 20k
run; the restarted tokenization at most 60% of a full run's time; the tokenizing workers at
least 1.5x LLaMA-Factory's rows per CPU-second (each run's `worker_cpu_seconds`: its two largest
are the tokenizing processes, LLaMA-Factory's `map` workers and tunesmith's pool). Timings need
a quiet machine; peak RSS does not depend on the load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO / "data"
OUT = HERE / "out" / "data_scale"
sys.path.insert(0, str(HERE))


def make_rows(rows: int, folder: Path) -> Path:
    """N distinct Alpaca rows as JSON Lines (made once per size) from the repository's own data: a
    numbered variation of one demo row's instruction, answered by 1 to 8 demo answers joined, so
    lengths spread like real data (about 160 tokens a row with the template, 48 to about 460)."""
    path = folder / f"alpaca_v2_{rows}.jsonl"  # v2: answers of 1 to 8 demo rows (a new recipe, a new name)
    if path.exists():
        return path
    base = json.loads((DATA / "alpaca_demo.json").read_text(encoding="utf-8"))
    base += [{"instruction": r["instruction"], "input": "",
              "output": r["output"].replace("{{name}}", "Tunesmith").replace("{{author}}", "the tunesmith team")}
             for r in json.loads((DATA / "identity.json").read_text(encoding="utf-8"))]
    rng = random.Random(rows)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for i in range(rows):
            row = base[rng.randrange(len(base))]
            answers = [base[rng.randrange(len(base))]["output"] for _ in range(rng.randint(1, 8))]
            fh.write(json.dumps({"instruction": f"{row['instruction']} (variation {i})", "input": row["input"],
                                 "output": "\n\n".join([row["output"], *answers[1:]])}, ensure_ascii=False) + "\n")
    tmp.rename(path)
    return path


def dataset_folder(data_file: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / data_file.name
    if not link.exists():
        link.symlink_to(data_file)
    (folder / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": data_file.name}}))
    return folder


def descendants_cpu_seconds(pid: int) -> dict[int, float]:
    """pid -> CPU seconds so far of every process below pid (psutil, which accelerate brings)."""
    try:
        below = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return {}
    seconds: dict[int, float] = {}
    for process in below:
        try:
            times = process.cpu_times()
        except psutil.Error:  # ended since it was listed
            continue
        seconds[process.pid] = times.user + times.system
    return seconds


def timed(cmd: list[str], env: dict[str, str], log: Path, kill_when: object = None) -> dict:
    """Run cmd; wall seconds, peak RSS (GiB), CPU seconds (the command and its reaped workers; the
    figure a loaded machine changes least), the CPU seconds of each worker process that used at
    least one (polled every 0.1 s, largest first: the tokenizing workers, compared per row with the
    other tool's) and exit status; kill_when() -> True kills it."""
    started = time.time()
    workers: dict[int, float] = {}
    with log.open("w") as handle:
        child = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if kill_when is not None and kill_when():
                child.kill()
                pid, status, usage = os.wait4(child.pid, 0)
                break
            for worker, cpu in descendants_cpu_seconds(child.pid).items():
                workers[worker] = max(workers.get(worker, 0.0), cpu)
            time.sleep(0.1)
    return {"seconds": round(time.time() - started, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1), "exit": os.waitstatus_to_exitcode(status),
            "worker_cpu_seconds": sorted((round(cpu, 2) for cpu in workers.values() if cpu >= 1.0), reverse=True)}


def tunesmith_run(data: Path, out: Path, cache: Path, workers: int, model: str, extra: dict | None = None,
                  kill_when: object = None, name: str = "run") -> dict:
    cfg = {"model_name_or_path": model, "dataset": "bench", "dataset_dir": str(data), "cutoff_len": 512,
           "finetuning_type": "lora", "gradient_checkpointing": True,
           "max_steps": 1, "per_device_train_batch_size": 1, "preprocessing_num_workers": workers,
           "output_dir": str(out / name), "overwrite_output_dir": True, "save_steps": 0, "report_to": "none",
           "plot_loss": False, **(extra or {})}
    cfg_file = out / f"{name}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, TUNESMITH_CACHE=str(cache), PYTHONPATH=str(REPO / "src"))
    result = timed([sys.executable, "-m", "tunesmith", "train", str(cfg_file)], env, out / f"{name}.log", kill_when)
    results = out / name / "train_results.json"
    if results.exists():
        result["first_step_seconds"] = json.loads(results.read_text())["first_step_seconds"]
    return result


def lf_run(data: Path, out: Path, workers: int, model: str) -> dict:
    from peers import ensure_peer

    python, why = ensure_peer("llamafactory")
    if python is None:
        return {"error": why}
    cfg = {"stage": "sft", "do_train": True, "model_name_or_path": model, "dataset": "bench",
           "dataset_dir": str(data), "template": "smollm2", "finetuning_type": "lora", "cutoff_len": 512,
           "max_steps": 1, "per_device_train_batch_size": 1, "preprocessing_num_workers": workers,
           "output_dir": str(out / "lf"), "overwrite_output_dir": True, "save_strategy": "no",
           "report_to": "none", "use_cpu": True, "plot_loss": False}
    cfg_file = out / "lf.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    cache = out / "lf-datasets-cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, HF_DATASETS_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               DISABLE_VERSION_CHECK="1", TOKENIZERS_PARALLELISM="false")
    return timed([str(python.parent / "llamafactory-cli"), "train", str(cfg_file)], env, out / "lf.log")


def half_written(cache: Path, rows: int) -> object:
    """A predicate: half of the store's chunks are written (data/chunks.py CHUNK_ROWS rows each)."""
    from tunesmith.data.chunks import CHUNK_ROWS

    want = max(1, rows // CHUNK_ROWS // 2)

    def check() -> bool:
        return sum(1 for _ in (cache / "tokenized").glob(".*.partial/chunks/train-*")) >= want
    return check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="20000,200000,1000000")
    parser.add_argument("--sides", default="tunesmith,lf")
    parser.add_argument("--scenarios", default="first,second,streaming,restart")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from tunesmith.model.provision import provision_default_model

    model = str(provision_default_model())  # from the usual cache: the runs' own caches hold only data
    sides, scenarios = args.sides.split(","), args.scenarios.split(",")
    report: dict = {}
    for rows in [int(r) for r in args.rows.split(",")]:
        out = OUT / str(rows)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        data = dataset_folder(make_rows(rows, OUT / "files"), out / "data")
        cache = out / "cache"
        got: dict = {}
        if "tunesmith" in sides:
            if "first" in scenarios:
                got["first"] = tunesmith_run(data, out, cache, args.workers, model, name="first")
            if "second" in scenarios:
                got["second"] = tunesmith_run(data, out, cache, args.workers, model, name="second")
            if "streaming" in scenarios:
                got["streaming"] = tunesmith_run(data, out, out / "cache-streaming", args.workers, model,
                                                 {"streaming": True}, name="streaming")
            if "restart" in scenarios:
                fresh = out / "cache-restart"
                got["killed"] = tunesmith_run(data, out, fresh, args.workers, model,
                                              kill_when=half_written(fresh, rows), name="killed")
                got["restarted"] = tunesmith_run(data, out, fresh, args.workers, model, name="restarted")
        if "lf" in sides:
            got["llamafactory"] = lf_run(data, out, args.workers, model)
        report[rows] = got
        print(json.dumps({rows: got}), flush=True)
    (OUT / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
