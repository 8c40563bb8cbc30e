"""`bench.py finetune`: phitune vs Hugging Face's Trainer + PEFT, tokens/s and peak memory."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import BENCH, CACHE, REPO, phitune_json
from benchmarks.shapes import TEMPLATE, build_phi3_mini_shaped


def baseline_finetune(args: argparse.Namespace) -> None:
    """The plain way the PEFT docs show it: HF Trainer + get_peft_model, each batch padded to
    its longest record, no packing, loss on the whole text. Prints a JSON summary."""
    import json as _json
    import time as _time

    import torch
    from peft import LoraConfig, get_peft_model
    from phitune.measure import peak_rss_mb
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    records = [_json.loads(line) for line in open(args.data_files) if line.strip()]
    template = TEMPLATE.replace("\\n", "\n")
    texts = [template.format(**r) for r in records]
    dataset = [tokenizer(t, truncation=True, max_length=args.max_seq_len) for t in texts]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=args.target_modules.split(","),
                                             task_type="CAUSAL_LM"))
    batch = args.batch_size
    seen = [len(dataset[i % len(dataset)]["input_ids"]) for i in range(args.steps * batch)]
    trainer = Trainer(model=model, train_dataset=dataset,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      args=TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=args.steps,
                                             per_device_train_batch_size=batch, learning_rate=2e-4,
                                             save_strategy="no", report_to=[], logging_steps=10**6,
                                             use_cpu=not torch.cuda.is_available(), seed=0,
                                             dataloader_drop_last=False))
    start = _time.perf_counter()
    trainer.train()
    seconds = _time.perf_counter() - start
    # Trainer shuffles, so count the mean record length; padding is not a real token.
    tokens = sum(seen) / len(seen) * args.steps * batch
    print(_json.dumps({"tokens_per_s": tokens / seconds, "train_seconds": seconds,
                       "peak_rss_mb": peak_rss_mb()}))


def bench_finetune(args: argparse.Namespace) -> None:
    if args.methods:  # qlora vs lora on int4 vs float lora (finetune_methods.py)
        from benchmarks.finetune_methods import bench_methods
        bench_methods(args)
        if args.methods_only:
            return
    if args.int4_base:
        from benchmarks.finetune_int4 import bench_int4_base
        return bench_int4_base(args)
    if args.trl:  # phitune vs TRL's SFTTrainer on SmolLM2 (finetune_trl.py)
        from benchmarks.finetune_trl import bench_trl
        return bench_trl(args)
    models = {"tiny-phi3": "tiny-phi3"}
    if args.phi3_shaped_layers:
        models[f"phi3-mini-shaped-{args.phi3_shaped_layers}l"] = str(build_phi3_mini_shaped(
            Path(args.cache) / f"phi3-mini-shaped-{args.phi3_shaped_layers}l", args.phi3_shaped_layers))
    data = str(REPO / "data" / "travel.jsonl")
    targets = "qkv_proj,o_proj,gate_up_proj,down_proj"
    for name, model in models.items():
        path = str(REPO / "data" / "tiny-phi3") if model == "tiny-phi3" else model
        print(f"== finetune: {name}, LoRA r={args.lora_r}, batch {args.batch_size}, "
              f"{args.steps} steps, max_seq_len {args.max_seq_len}, travel.jsonl")
        common = ["finetune", "-m", model, "--data_files", data, "--text_template", TEMPLATE,
                  "--max_steps", str(args.steps), "--lora_r", str(args.lora_r),
                  "--per_device_train_batch_size", str(args.batch_size),
                  "--max_seq_len", str(args.max_seq_len), "--force"]
        runs = {"phitune": phitune_json(*common, "-o", tempfile.mkdtemp() + "/ft")}
        if runs["phitune"]["dtype"] != "float32":  # a large model: the other end of the trade-off
            other = not runs["phitune"]["gradient_checkpointing"]
            runs[f"phitune, checkpointing {'on' if other else 'off'}"] = phitune_json(
                *common, "--gradient_checkpointing" if other else "--no-gradient_checkpointing",
                "-o", tempfile.mkdtemp() + "/ft")
        proc = subprocess.run([sys.executable, str(BENCH), "_baseline_finetune", "--model", path,
                               "--data_files", data, "--steps", str(args.steps),
                               "--lora_r", str(args.lora_r), "--batch_size", str(args.batch_size),
                               "--max_seq_len", str(args.max_seq_len), "--target_modules", targets],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"baseline failed:\n{proc.stderr[-3000:]}")
        base = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{'baseline':27} {base['tokens_per_s']:8.0f} tok/s  peak RSS {base['peak_rss_mb']:7.0f} MB  "
              f"(HF Trainer + PEFT, pad to longest, fp32)")
        for label, ours in runs.items():
            print(f"{label:27} {ours['tokens_per_s']:8.0f} tok/s  peak RSS {ours['peak_rss_mb']:7.0f} MB  "
                  f"(packed rows, {ours['data_padding_fraction']:.1%} padding, {ours['dtype']}, "
                  f"checkpointing {'on' if ours['gradient_checkpointing'] else 'off'}"
                  f"{', compiled' if ours.get('compiled') else ''})  → "
                  f"{ours['tokens_per_s'] / base['tokens_per_s']:.2f}× tok/s (goal ≥ 2), "
                  f"{ours['peak_rss_mb'] / base['peak_rss_mb']:.2f}× memory (goal ≤ 0.6)")
        print()


def register(sub) -> None:
    f = sub.add_parser("finetune", help="phitune vs HF Trainer + PEFT: tokens/s and peak memory")
    f.add_argument("--steps", type=int, default=30)
    f.add_argument("--lora_r", type=int, default=64)
    f.add_argument("--batch_size", type=int, default=4)
    f.add_argument("--max_seq_len", type=int, default=512)
    f.add_argument("--phi3-shaped-layers", type=int, default=0,
                   help="also a Phi-3-mini-shaped model with this many layers (random weights)")
    f.add_argument("--cache", default=str(CACHE))
    from benchmarks.finetune_methods import register_options
    register_options(f)
    from benchmarks.finetune_int4 import register_arguments
    register_arguments(f)
    from benchmarks import finetune_trl
    finetune_trl.register(sub, f)
    f.set_defaults(func=bench_finetune)
    add_child_run(sub, "_baseline_finetune", baseline_finetune)


def add_child_run(sub, name: str, func) -> None:
    """The hidden subcommand a yardstick's run is started with, in its own process (its own
    peak RSS): the model, data and settings every finetune comparison passes it."""
    b = sub.add_parser(name)
    for arg in ("--model", "--data_files", "--target_modules"):
        b.add_argument(arg)
    for arg in ("--steps", "--lora_r", "--batch_size", "--max_seq_len"):
        b.add_argument(arg, type=int)
    b.set_defaults(func=func)
