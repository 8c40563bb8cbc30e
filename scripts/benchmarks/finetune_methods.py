"""`bench.py finetune --methods`: the three bases LoRA can train on, side by side in one run —
QLoRA (the float checkpoint quantized to bitsandbytes nf4 as it loads), LoRA on an int4 base
(phitune's AWQ-layout checkpoint, dequantized to float for training) and LoRA on the float
checkpoint: tokens/s, peak memory and the held-out eval loss after the same steps, same data,
same held-out records, same seed."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.harness import REPO, phitune_json
from benchmarks.shapes import TEMPLATE


def bench_methods(args: argparse.Namespace) -> None:
    model = args.methods_model
    work = Path(tempfile.mkdtemp(prefix="bench-methods-"))
    int4 = str(work / "int4")
    group = ["--group_size", str(args.methods_group_size)] if args.methods_group_size else []
    quantized = phitune_json("quantize", "-m", model, "--algorithm", args.methods_algorithm,
                             *group, "--no-eval", "-o", int4)
    data = str(REPO / "data" / "travel.jsonl")
    common = ["--data_files", data, "--text_template", TEMPLATE, "--max_steps", str(args.steps),
              "--lora_r", str(args.lora_r), "--per_device_train_batch_size", str(args.batch_size),
              "--max_seq_len", str(args.max_seq_len), "--eval_dataset_size",
              str(args.methods_eval_records), "--force"]
    runs = {
        "qlora (nf4, float ckpt)": ["--method", "qlora", "-m", model],
        f"lora on int4 ({args.methods_algorithm})": ["--method", "lora", "-m", int4],
        "lora on float": ["--method", "lora", "-m", model],
    }
    print(f"== finetune methods: {model}, LoRA r={args.lora_r}, batch {args.batch_size}, "
          f"{args.steps} steps, max_seq_len {args.max_seq_len}, travel.jsonl, "
          f"{args.methods_eval_records} held-out records (int4 base: {args.methods_algorithm}, "
          f"{quantized.get('seconds', 0):.0f} s to quantize)")
    print(f"{'':27} {'tok/s':>8} {'peak RSS':>10} {'eval before':>12} {'eval after':>11}  dtype")
    for label, how in runs.items():
        ours = phitune_json("finetune", *how, *common, "-o", str(work / label.split()[0]) + "-ft")
        print(f"{label:27} {ours['tokens_per_s']:8.0f} {ours['peak_rss_mb']:7.0f} MB "
              f"{ours['eval_loss_before']:12.4f} {ours['eval_loss_after']:11.4f}  {ours['dtype']}"
              f"{', checkpointing' if ours['gradient_checkpointing'] else ''}"
              f"{', compiled' if ours.get('compiled') else ''}")
    print()


def register_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", action="store_true",
                        help="also qlora vs lora on int4 vs float lora (tok/s, memory, eval loss)")
    parser.add_argument("--methods-model", default="tiny-phi3",
                        help="the float model for --methods (e.g. smollm2-135m-instruct)")
    parser.add_argument("--methods-algorithm", default="awq", choices=("awq", "rtn"),
                        help="how --methods makes its int4 base")
    parser.add_argument("--methods-group-size", type=int, default=0,
                        help="int4 group size for --methods (0: quantize's default)")
    parser.add_argument("--methods-eval-records", type=int, default=24)
    parser.add_argument("--methods-only", action="store_true",
                        help="only the --methods table (not phitune vs HF Trainer)")
