"""LoRA against QLoRA (and DoRA) on the default model, through tunesmith's own loading and
fine-tuning setup: the weights' memory, the process's peak RSS, and seconds per training step
(forward, backward and AdamW on 2 x 128 tokens). One variant per process, so peaks do not mix:

    .venv/bin/python bench/qlora_memory.py lora
    .venv/bin/python bench/qlora_memory.py qlora4      # quantization_bit: 4 (nf4, double quantization)
    .venv/bin/python bench/qlora_memory.py qlora8
    .venv/bin/python bench/qlora_memory.py dora
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch

from tunesmith.config import FinetuneArgs, ModelArgs
from tunesmith.model.finetune import apply_finetuning
from tunesmith.model.load import load_model

VARIANTS = {"lora": (None, False), "qlora4": (4, False), "qlora8": (8, False), "dora": (None, True)}


def main(name: str, steps: int = 4) -> dict[str, object]:
    bits, dora = VARIANTS[name]
    model = apply_finetuning(load_model(ModelArgs(quantization_bit=bits)),
                             FinetuneArgs(lora_rank=8, use_dora=dora), verbose=False)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (2, 128))
    seconds, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(round(time.perf_counter() - start, 2))
        losses.append(round(loss.item(), 4))
    return {"variant": name, "weights_mib": round(model.get_memory_footprint() / 2**20, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "step_s": seconds, "losses": losses}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
