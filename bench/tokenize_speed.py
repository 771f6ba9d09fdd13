"""Time tokenizing datasets with the default model: cold, then from the cache.

    python bench/tokenize_speed.py [--data DIR] [--dataset NAMES] [--workers N]

By default every set in the repository's data/ (214 rows in all: alpaca, sharegpt and OpenAI tool calls);
--data and --dataset name any other registered data, such as a larger demo set kept beside the repository.

The cache goes to a fresh temporary folder, so "cold" really is cold.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "data"),
                        help="folder holding dataset_info.json and the data files")
    parser.add_argument("--dataset", default="identity,alpaca_demo,chat_sharegpt,toolcall_sharegpt,toolcall_openai",
                        help="comma-separated dataset names")
    parser.add_argument("--workers", type=int, default=None, help="preprocessing_num_workers (default: automatic)")
    args = parser.parse_args()

    from tunesmith.model.provision import provision_default_model

    model_dir = provision_default_model()  # before TUNESMITH_CACHE moves, so the model is found
    os.environ["TUNESMITH_CACHE"] = tempfile.mkdtemp(prefix="tunesmith-bench-")

    from tunesmith.config import load_config
    from tunesmith.data.pipeline import tokenize_datasets
    from tunesmith.model.load import load_tokenizer

    overrides = {"model_name_or_path": str(model_dir), "dataset": args.dataset, "dataset_dir": args.data,
                 "cutoff_len": 2048}
    if args.workers is not None:
        overrides["preprocessing_num_workers"] = args.workers
    cfg = load_config(None, overrides)
    tokenizer = load_tokenizer(cfg.model)

    t0 = time.perf_counter()
    cold = tokenize_datasets(cfg, tokenizer, num_workers=cfg.data.preprocessing_num_workers, quiet=True)
    t1 = time.perf_counter()
    warm = tokenize_datasets(cfg, tokenizer, num_workers=cfg.data.preprocessing_num_workers, quiet=True)
    t2 = time.perf_counter()
    assert warm.from_cache and not cold.from_cache
    again = []
    for _ in range(3):
        start = time.perf_counter()
        tokenize_datasets(cfg, tokenizer, quiet=True)
        again.append(time.perf_counter() - start)
    print(f"{args.dataset}: {len(cold.train)} samples, {cold.report.train.tokens} tokens")
    print(f"cold (load rows + tokenize + save): {t1 - t0:.2f} s")
    print(f"from the cache, first:              {t2 - t1:.2f} s")
    print(f"from the cache, best of 3 more:     {min(again):.2f} s")


if __name__ == "__main__":
    main()
