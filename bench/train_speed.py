"""LoRA SFT speed of the default model on real data: non-padding tokens/s, time to the first step, peak RSS.

Workload: 200 alpaca rows (data/alpaca_demo.json repeated, or `--data FILE`; see workload_data.py), cutoff 512,
batch 4, LoRA rank 8 on all linear layers, fp32 unless told otherwise. Each run is a fresh `tunesmith train`
subprocess, as a user runs it.

    .venv/bin/python bench/train_speed.py                 # fp32, 25 steps
    .venv/bin/python bench/train_speed.py --steps 10 bf16=true packing=true
    .venv/bin/python bench/train_speed.py --data ../shared/data/alpaca_en_demo.json   # RESULTS.md's rows
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workload_data import ALPACA_DEMO, alpaca_rows, write_alpaca_dataset


def workload(out_dir: Path, data_dir: Path, steps: int, source: Path) -> dict:
    write_alpaca_dataset(data_dir, "alpaca200", alpaca_rows(200, source))
    return {
        "model_name_or_path": "smollm2-135m-instruct", "dataset": "alpaca200", "dataset_dir": str(data_dir),
        "cutoff_len": 512, "finetuning_type": "lora", "lora_target": "all", "lora_rank": 8,
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-4,
        "max_steps": steps, "logging_steps": 5, "save_steps": 0, "output_dir": str(out_dir), "report_to": "none",
        "overwrite_output_dir": True, "seed": 42,
    }


def run_once(steps: int, overrides: list[str], source: Path = ALPACA_DEMO) -> dict:
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        cfg = workload(tmp_path / "out", tmp_path / "data", steps, source)
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        started = time.time()
        proc = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(tmp_path / "cfg.yaml"), *overrides],
                              capture_output=True, text=True)
        wall = time.time() - started
        if proc.returncode != 0:
            raise SystemExit(f"training failed:\n{proc.stderr[-3000:]}")
        results = json.loads((tmp_path / "out" / "train_results.json").read_text())
        losses = [json.loads(x).get("loss") for x in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    # ru_maxrss of children is the largest child's peak, in KiB on Linux.
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return {"tokens_per_second": results["train_tokens_per_second"],
            "first_step_seconds": results["first_step_seconds"],
            "peak_rss_gib": round(peak_gib, 2), "wall_seconds": round(wall, 1), "steps": steps,
            "trained_tokens": results["trained_tokens"], "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--data", type=Path, default=ALPACA_DEMO, help="alpaca JSON file the rows come from")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args()
    result = run_once(args.steps, args.overrides, args.data)
    print(json.dumps({"data": str(args.data), "overrides": args.overrides, **result}, indent=2))


if __name__ == "__main__":
    main()
