"""Time (and optionally profile) training steps of the engine's building blocks, variant by variant.

    python bench/profile_step.py [--variants padded,varlen,...] [--steps 4] [--rows 40] [--profile VARIANT]

The workload of bench/peers.py (default model, LoRA rank 8 on every linear layer, alpaca rows from
data/alpaca_demo.json or `--data FILE`, cutoff 512, 4 samples per step), run in one process so that variants
alternate step by step and share the machine's conditions. A variant is `layout[+precision][+option]`:

    layout     padded | grouped (padded, micro-batches of similar lengths) | varlen | masked
    precision  fp32 (default) | autocast (fp32 weights, bf16 autocast) | bf16base (frozen base
               stored in bf16, adapters fp32, bf16 autocast)
    option     attn=matmul|fp32|sdpa (bf16 attention on the CPU: bf16 matrix products; torch's
               flash kernel in fp32; or that kernel in bf16; without it, the CPU plan's choice);
               cast (peft casts LoRA inputs to the adapters' fp32 under autocast, which training
               turns off); plain (transformers' and peft's own forwards instead of train/kernels.py's, so
               the linear layers' fp32 products go to torch's matmul rather than oneDNN); blas (the
               engine's forwards with every fp32 product, the output head's too, on torch's BLAS,
               unpadded); headblas (only the output head's fp32 product on the BLAS, the rest as planned)

It prints, per variant, the median step time and the non-padding tokens per second. By default
time is this process's CPU time, which a busy machine disturbs far less than wall time; use
--threads 1 with it (or --clock wall on a quiet machine).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from workload_data import ALPACA_DEMO, alpaca_rows, write_alpaca_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="padded,grouped,varlen,masked,varlen+autocast,varlen+bf16base")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--cutoff", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="cpu",
                        help="cpu: this process's CPU time, steadier than wall time on a busy machine "
                             "(meaningful with --threads 1)")
    parser.add_argument("--keep-denormals", action="store_true",
                        help="compute subnormal floats (training flushes them)")
    parser.add_argument("--shapes", action="store_true", help="--profile: one row per op and input shape")
    parser.add_argument("--rows-shown", type=int, default=30, help="--profile: rows of the table")
    parser.add_argument("--profile", default=None, help="one variant to profile with torch.profiler")
    parser.add_argument("--data", type=Path, default=ALPACA_DEMO, help="alpaca JSON file the rows come from")
    args = parser.parse_args()

    import torch

    from tunesmith.config import load_config
    from tunesmith.data.batching import Sample, collate, pad_varlen, plan_micro_batches
    from tunesmith.data.pipeline import tokenize_datasets
    from tunesmith.env import flush_denormals
    from tunesmith.model.finetune import apply_finetuning, set_adapter_input_casting
    from tunesmith.model.load import load_model, load_tokenizer
    from tunesmith.train.attention import choose_layout
    from tunesmith.train.kernels import cpu_row_multiple, set_training_forwards
    from tunesmith.train.loss import token_loss

    if not args.keep_denormals:
        flush_denormals()  # as training does
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = write_alpaca_dataset(Path(tempfile.mkdtemp(prefix="tunesmith-profile-data-")), "alpaca_bench",
                                    alpaca_rows(args.rows, args.data))
    cfg = load_config(None, {"dataset": "alpaca_bench", "dataset_dir": str(data_dir),
                             "cutoff_len": args.cutoff, "output_dir": "/tmp/tunesmith-profile",
                             "preprocessing_num_workers": 1, "lora_target": "all", "lora_rank": 8})
    tokenizer = load_tokenizer(cfg.model)
    encoded = tokenize_datasets(cfg, tokenizer).train
    samples = [Sample(e.input_ids, e.labels, i) for i, e in enumerate(encoded)]
    lengths = [len(s.input_ids) for s in samples]

    def build(variant: str):
        layout, *options = variant.split("+")
        bf16_base = "bf16base" in options
        model = load_model(cfg.model, dtype=torch.bfloat16 if bf16_base else torch.float32)
        model = apply_finetuning(model, cfg.finetune, verbose=False)
        packing = layout in ("varlen", "masked")
        if packing:
            chosen = choose_layout(model, True)
            if layout == "masked":  # force the mask path on sdpa
                from tunesmith.train.attention import restore_attention

                restore_attention(model)
            elif chosen != layout:
                raise SystemExit(f"{variant}: the model gives layout {chosen}")
        plan = plan_micro_batches(lengths, batch_size=args.batch, seed=0, epoch=0, shuffle=True,
                                  packing=layout == "masked", max_len=args.cutoff,
                                  group_by_length=layout == "grouped")
        batches = [collate([[samples[j] for j in row] for row in micro], tokenizer.pad_token_id,
                           "padded" if layout == "grouped" else layout) for micro in plan]
        mixed = "autocast" in options or bf16_base
        multiple = cpu_row_multiple(mixed)
        if layout == "varlen" and multiple and not {"plain", "blas"} & set(options):  # as training pads them
            batches = [pad_varlen(b, multiple, tokenizer.pad_token_id) for b in batches]
        set_adapter_input_casting(model, enabled=not mixed or "cast" in options)  # as training does
        set_training_forwards(model, enabled="plain" not in options)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        return model, batches, optimizer, mixed

    def step(model, batch, optimizer, mixed, variant: str) -> float:
        from tunesmith import cpu

        options = variant.split("+")
        kernel = next((o[len("attn="):] for o in options if o.startswith("attn=")), None)
        on_blas = {"blas", "headblas"} & set(options)
        if kernel and on_blas:
            raise SystemExit(f"{variant}: attn= sets the bf16 plan, blas the fp32 one; use one per variant")
        chosen = nullcontext()  # assumed for the whole step: forward, backward and optimizer
        if kernel:
            chosen = cpu.assume(replace(cpu.plan_in_use("bf16"), bf16_attention=cpu.Choice(True, kernel, "A/B")))
        elif on_blas:
            blas = cpu.Choice(False, "torch matmul", "A/B")
            plan = replace(cpu.plan_in_use("fp32"), head_product=blas)
            if "blas" in options:
                plan = replace(plan, fp32_products=blas, padding=cpu.Choice(False, "none", "A/B"))
            chosen = cpu.assume(plan)
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        started = clock()
        with chosen:
            with torch.autocast("cpu", dtype=torch.bfloat16) if mixed else nullcontext():
                loss, count = token_loss(model, batch)
            (loss / max(count, 1)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return clock() - started

    variants = args.variants.split(",") if not args.profile else [args.profile]
    built = {v: build(v) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    tokens: dict[str, list[int]] = {v: [] for v in variants}
    for v in variants:  # warm-up
        model, batches, optimizer, mixed = built[v]
        step(model, batches[0], optimizer, mixed, v)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        model, batches, optimizer, mixed = built[args.profile]
        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
            for i in range(1, 1 + args.steps):
                step(model, batches[i], optimizer, mixed, args.profile)
        print(prof.key_averages(group_by_input_shape=args.shapes).table(sort_by="self_cpu_time_total",
                                                                        row_limit=args.rows_shown))
        return
    for i in range(args.steps):  # variants alternate, step by step
        for v in variants:
            model, batches, optimizer, mixed = built[v]
            # steps spread evenly over the epoch, so that layouts that order samples differently
            # (grouped) are timed on a like mix of lengths
            batch = batches[1 + i * (len(batches) - 1) // args.steps]
            times[v].append(step(model, batch, optimizer, mixed, v))
            tokens[v].append(int(batch["num_tokens"]))
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS of this process (all variants' models together): {peak:.2f} GiB")
    print(f"{'variant':<22} {'median step s':>13} {'tokens/s':>9}")
    for v in variants:
        rate = sum(tokens[v]) / sum(times[v])
        print(f"{v:<22} {statistics.median(times[v]):>13.3f} {rate:>9.1f}")


if __name__ == "__main__":
    main()
