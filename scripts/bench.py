#!/usr/bin/env python
"""Benchmarks: figures, not tests. Each step is measured against the plain baseline its issue names.

    python scripts/bench.py quantize                      # embedded model: AWQ vs RTN, time, memory
    python scripts/bench.py quantize --phi3-mini-layers 32  # + a Phi-3-mini-shaped model (random weights)
    python scripts/bench.py finetune                      # phitune vs HF Trainer + PEFT (padding, no packing)
    python scripts/bench.py auto-opt --layers 2 4         # int4 export peak memory, Phi-3-mini-shaped

Every run is a fresh `phitune --json quantize` subprocess, so peak RSS is that run's own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHI3_MINI = dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                 original_max_position_embeddings=4096, tie_word_embeddings=False)


def phitune_json(*args: str) -> dict:
    """Run one phitune step in its own process; its --json summary."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "phitune", "--json", *args], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"phitune {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout)
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    return summary


def build_phi3_mini_shaped(path: Path, layers: int) -> Path:
    """Phi-3-mini dimensions, random bf16 weights, `layers` decoder layers (cached on disk)."""
    if (path / "config.json").is_file():
        return path
    import shutil

    import torch
    from transformers import Phi3Config, Phi3ForCausalLM
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # 3.8B params: never materialise an fp32 copy
    model = Phi3ForCausalLM(Phi3Config(num_hidden_layers=layers, **PHI3_MINI))
    torch.set_default_dtype(torch.float32)
    model.config.dtype = "bfloat16"
    model.save_pretrained(path)
    embedded = REPO / "data" / "tiny-phi3"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (embedded / name).is_file():
            shutil.copy(embedded / name, path / name)
    return path


def bench_quantize(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="phitune-bench-"))
    calib = ["--calib_samples", str(args.calib_samples), "--calib_seq_len", str(args.calib_seq_len)]
    print(f"== quantize: embedded tiny-phi3, calibration {args.calib_samples}x{args.calib_seq_len} tokens")
    runs = {alg: phitune_json("quantize", "-m", "tiny-phi3", "--algorithm", alg, "-o",
                              str(work / alg), "--force", *calib) for alg in ("awq", "rtn")}
    base = runs["awq"]["ppl_before"]
    print(f"float perplexity            {base:.3f}")
    for alg, r in runs.items():
        print(f"{alg.upper():4} perplexity {r['ppl_after']:.3f}  gap {r['ppl_gap']:+.4f}  "
              f"time {r['seconds']:.1f} s  peak RSS {r['peak_rss_mb']:.0f} MB  "
              f"size {r['size_before_mb']:.1f} → {r['size_mb']:.1f} MB")
    ratio = runs["awq"]["ppl_gap"] / runs["rtn"]["ppl_gap"] if runs["rtn"]["ppl_gap"] else float("nan")
    print(f"AWQ gap / RTN gap           {ratio:.3f}   (goal ≤ 0.5)")

    if args.phi3_mini_layers:
        layers = args.phi3_mini_layers
        model_dir = build_phi3_mini_shaped(Path(args.cache) / f"phi3-mini-shaped-{layers}l", layers)
        print(f"\n== quantize: Phi-3-mini-shaped ({layers} layers, random bf16 weights), "
              f"{args.big_calib_samples}x{args.calib_seq_len} calibration tokens, CPU")
        r = phitune_json("quantize", "-m", str(model_dir), "-o", str(work / "big"), "--force",
                         "--no-eval", "--device", args.device, "--dtype", args.big_dtype, "--calib_samples",
                         str(args.big_calib_samples), "--calib_seq_len", str(args.calib_seq_len))
        per_layer = r["seconds"] / layers
        print(f"time {r['seconds']:.0f} s ({per_layer:.1f} s/layer → {per_layer * 32 / 60:.1f} min "
              f"for 32 layers)  peak RSS {r['peak_rss_mb'] / 1024:.2f} GB  "
              f"size {r['size_before_mb']:.0f} → {r['size_mb']:.0f} MB  dtype {r['compute_dtype']}")
    print(f"\noutputs under {work}")


TEMPLATE = r"<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"


def baseline_finetune(args: argparse.Namespace) -> None:
    """The plain way the PEFT docs show it: HF Trainer + get_peft_model, each batch padded to
    its longest record, no packing, loss on the whole text. Prints a JSON summary."""
    import json as _json
    import time as _time

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling,
                              Trainer, TrainingArguments)

    from phitune.measure import peak_rss_mb
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
        ours = phitune_json("finetune", "-m", model, "--data_files", data, "--text_template",
                            TEMPLATE, "--max_steps", str(args.steps), "--lora_r", str(args.lora_r),
                            "--per_device_train_batch_size", str(args.batch_size),
                            "--max_seq_len", str(args.max_seq_len), "--force",
                            "-o", tempfile.mkdtemp() + "/ft")
        proc = subprocess.run([sys.executable, __file__, "_baseline_finetune", "--model", path,
                               "--data_files", data, "--steps", str(args.steps),
                               "--lora_r", str(args.lora_r), "--batch_size", str(args.batch_size),
                               "--max_seq_len", str(args.max_seq_len), "--target_modules", targets],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"baseline failed:\n{proc.stderr[-3000:]}")
        base = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"phitune   {ours['tokens_per_s']:8.0f} tok/s  peak RSS {ours['peak_rss_mb']:7.0f} MB  "
              f"(packed rows, {ours['data_padding_fraction']:.1%} padding)")
        print(f"baseline  {base['tokens_per_s']:8.0f} tok/s  peak RSS {base['peak_rss_mb']:7.0f} MB  "
              f"(HF Trainer + PEFT, pad to longest)")
        print(f"ratio     {ours['tokens_per_s'] / base['tokens_per_s']:8.2f}× tok/s (goal ≥ 2)   "
              f"{ours['peak_rss_mb'] / base['peak_rss_mb']:.2f}× memory (goal ≤ 0.6)\n")


def peak_of(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MB of `cmd` and its children, seconds), measured from a wrapper process."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)"
               ".returncode; print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
               "time.perf_counter() - t, rc)")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True).stdout
    peak, seconds, rc = out.split()
    if rc != "0":
        sys.exit(f"failed: {' '.join(cmd)}")
    return float(peak), float(seconds)


def bench_auto_opt(args: argparse.Namespace) -> None:
    """Peak memory of an int4 export: phitune (RTN streamed into the AWQ layout, which the builder
    reads directly) vs the builder's own int4 path on the float checkpoint; fitted per layer and
    extrapolated to Phi-3-mini's 32 layers."""
    work = Path(tempfile.mkdtemp(prefix="phitune-bench-"))
    rows = []
    for layers in args.layers:
        model_dir = build_phi3_mini_shaped(Path(args.cache) / f"phi3-mini-shaped-{layers}l", layers)
        ours = phitune_json("auto-opt", "-m", str(model_dir), "-o", str(work / f"ours-{layers}"), "--force")
        base_peak, base_s = peak_of([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i",
                                     str(model_dir), "-o", str(work / f"builder-{layers}"), "-p", "int4",
                                     "-e", "cpu", "-c", str(work / "cache")])
        rows.append((layers, ours["peak_rss_mb"], ours["seconds"], base_peak, base_s))
        print(f"{layers:2d} layers  phitune {ours['peak_rss_mb'] / 1024:5.2f} GB {ours['seconds']:6.1f} s"
              f"  (builder child {ours['builder_peak_rss_mb'] / 1024:.2f} GB)   "
              f"builder int4 on float {base_peak / 1024:5.2f} GB {base_s:6.1f} s")
    if len(rows) >= 2:
        (l0, o0, _, b0, _), (l1, o1, _, b1, _) = rows[0], rows[-1]
        def at32(y0, y1):
            return (y0 + (y1 - y0) / (l1 - l0) * (32 - l0)) / 1024
        print(f"extrapolated to 32 layers: phitune {at32(o0, o1):.1f} GB (goal ≤ 12)   "
              f"builder int4 {at32(b0, b1):.1f} GB")
    print(f"outputs under {work}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    q = sub.add_parser("quantize", help="AWQ vs RTN quality, time and memory")
    q.add_argument("--calib_samples", type=int, default=64)
    q.add_argument("--calib_seq_len", type=int, default=256)
    q.add_argument("--phi3-mini-layers", type=int, default=0,
                   help="also time a Phi-3-mini-shaped model with this many layers (32 = full size)")
    q.add_argument("--big_calib_samples", type=int, default=16)
    q.add_argument("--device", default="auto")
    q.add_argument("--big_dtype", default="bfloat16", help="calibration dtype for the big model")
    q.add_argument("--cache", default=str(REPO / "models" / "bench"))
    f = sub.add_parser("finetune", help="phitune vs HF Trainer + PEFT: tokens/s and peak memory")
    f.add_argument("--steps", type=int, default=30)
    f.add_argument("--lora_r", type=int, default=64)
    f.add_argument("--batch_size", type=int, default=4)
    f.add_argument("--max_seq_len", type=int, default=512)
    f.add_argument("--phi3-shaped-layers", type=int, default=0,
                   help="also a Phi-3-mini-shaped model with this many layers (random weights)")
    f.add_argument("--cache", default=str(REPO / "models" / "bench"))
    a = sub.add_parser("auto-opt", help="int4 export peak memory: phitune vs the builder's own int4")
    a.add_argument("--layers", type=int, nargs="+", default=[2, 4],
                   help="Phi-3-mini-shaped layer counts to measure (two or more: extrapolated to 32)")
    a.add_argument("--cache", default=str(REPO / "models" / "bench"))
    b = sub.add_parser("_baseline_finetune")
    for name in ("--model", "--data_files", "--target_modules"):
        b.add_argument(name)
    for name in ("--steps", "--lora_r", "--batch_size", "--max_seq_len"):
        b.add_argument(name, type=int)
    args = parser.parse_args()
    {"quantize": bench_quantize, "finetune": bench_finetune, "auto-opt": bench_auto_opt,
     "_baseline_finetune": baseline_finetune}[args.step](args)


if __name__ == "__main__":
    main()
