"""`bench.py finetune --trl`: phitune vs TRL's `SFTTrainer` on SmolLM2-135M-Instruct, same data
(travel.jsonl through the bench's TEMPLATE), LoRA r 64 on every projection, alpha 16, dropout
0.05, lr 2e-4, batch 4 × 512 tokens, the same number of steps; each tool at its best: packed
rows and loss on the completion only for both, fp32 (bf16 where the CPU has native bf16 matmul:
TRL's own default), TRL without gradient checkpointing (its default is on: slower here, and the
model fits). phitune runs on the float checkpoint and on its RTN int4 base (`--base_weights`
auto, which dequantizes a base this small once, and int4, kept packed). Every
run is its own subprocess, so peak RSS is its own.

TRL is an optional bench requirement (`pip install --no-deps trl==1.16.0`: its dependencies are
transformers', datasets', accelerate's; `pip install -e '.[bench]'`); without it one line says so.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from benchmarks.harness import BENCH, REPO, phitune_json
from benchmarks.shapes import TEMPLATE

SMOLLM2_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def trl_finetune(args: argparse.Namespace) -> None:
    """TRL's SFTTrainer on prompt/completion records (the TEMPLATE cut before the response):
    bfd packing into max_length rows, completion-only loss. Prints a JSON summary."""
    import time

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from phitune.measure import peak_rss_mb
    from phitune.policy import cpu_has_fast_bf16
    prompt_part, response_part = TEMPLATE.replace("\\n", "\n").split("{response}")
    records = [json.loads(line) for line in open(args.data_files) if line.strip()]
    dataset = Dataset.from_list([{"prompt": prompt_part.format(**r),
                                  "completion": r["response"] + response_part} for r in records])
    bf16 = cpu_has_fast_bf16() or (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    config = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=args.steps,
                       per_device_train_batch_size=args.batch_size, learning_rate=2e-4,
                       max_length=args.max_seq_len, packing=True, completion_only_loss=True,
                       gradient_checkpointing=False, bf16=bf16, save_strategy="no",
                       report_to=[], logging_steps=10**6, seed=0,
                       use_cpu=not torch.cuda.is_available(),
                       model_init_kwargs={"dtype": torch.bfloat16 if bf16 else torch.float32})
    lora = LoraConfig(r=args.lora_r, lora_alpha=16, lora_dropout=0.05,
                      target_modules=args.target_modules.split(","), task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=args.model, args=config, train_dataset=dataset, peft_config=lora)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    # the tokens TRL trained on, as it counts them (packed rows: no padding inside; a collate
    # wrapper would also count the batch accelerate fetches ahead of the last step)
    tokens = max(float(e.get("num_tokens", 0)) for e in trainer.state.log_history)
    print(json.dumps({"tokens_per_s": tokens / seconds, "train_seconds": seconds,
                      "tokens": tokens, "peak_rss_mb": peak_rss_mb(),
                      "dtype": "bfloat16" if bf16 else "float32"}))


def bench_trl(args: argparse.Namespace) -> None:
    from phitune.artifacts import resolve_model
    try:
        import trl  # noqa: F401 - only whether it is there
    except ImportError:
        print("TRL is not installed: pip install --no-deps trl==1.16.0 (or pip install -e "
              "'.[bench]') to compare with its SFTTrainer")
        return
    from benchmarks.finetune_int4 import smollm2_rtn
    from pathlib import Path
    float_dir = str(resolve_model("smollm2-135m-instruct", ("hf-model",), "finetune").path)
    int4_dir = str(smollm2_rtn(Path(args.cache)))
    data = str(REPO / "data" / "travel.jsonl")
    print(f"== finetune vs TRL {trl.__version__} SFTTrainer: smollm2-135m-instruct, LoRA "
          f"r={args.lora_r} on every projection, batch {args.batch_size} x {args.max_seq_len}, "
          f"{args.steps} steps, packing + completion-only loss, travel.jsonl")
    common = ["finetune", "--data_files", data, "--text_template", TEMPLATE,
              "--max_steps", str(args.steps), "--lora_r", str(args.lora_r),
              "--per_device_train_batch_size", str(args.batch_size),
              "--max_seq_len", str(args.max_seq_len), "--force"]
    runs = {"TRL SFTTrainer (float)": _trl_run(args, float_dir, data)}
    for label, model, extra in (("phitune (float)", float_dir, ()),
                                ("phitune (int4 base, auto)", int4_dir, ()),
                                ("phitune (int4 base, packed)", int4_dir,
                                 ("--base_weights", "int4"))):
        runs[label] = phitune_json(*common, *extra, "-m", model, "-o", tempfile.mkdtemp() + "/ft")
    ref = runs["TRL SFTTrainer (float)"]
    for label, run in runs.items():
        print(f"{label:28} {run['tokens_per_s']:8.1f} tok/s  peak RSS {run['peak_rss_mb']:7.0f} MB"
              f"  ({run['dtype']}{', compiled' if run.get('compiled') else ''}, "
              f"{run['train_seconds']:.0f} s training)  → {run['tokens_per_s'] / ref['tokens_per_s']:.2f}"
              f"× tok/s (goal ≥ 2), {run['peak_rss_mb'] / ref['peak_rss_mb']:.2f}× memory "
              f"(goal ≤ 0.5)", flush=True)
    print()


def _trl_run(args: argparse.Namespace, model: str, data: str) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH), "_trl_finetune", "--model", model,
                           "--data_files", data, "--steps", str(args.steps),
                           "--lora_r", str(args.lora_r), "--batch_size", str(args.batch_size),
                           "--max_seq_len", str(args.max_seq_len),
                           "--target_modules", SMOLLM2_TARGETS], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"TRL run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def register(sub, f) -> None:
    f.add_argument("--trl", action="store_true",
                   help="instead: phitune (float and int4 base) vs TRL's SFTTrainer on SmolLM2")
    from benchmarks.finetune import add_child_run
    add_child_run(sub, "_trl_finetune", trl_finetune)
