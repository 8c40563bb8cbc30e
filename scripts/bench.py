#!/usr/bin/env python
"""Benchmarks: figures, not tests. Each step is measured against the plain baseline its issue names.

    python scripts/bench.py quantize                      # embedded model: AWQ vs RTN, time, memory
    python scripts/bench.py quantize --phi3-mini-layers 32  # + a Phi-3-mini-shaped model (random weights)

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
                         "--no-eval", "--device", args.device, "--calib_samples",
                         str(args.big_calib_samples), "--calib_seq_len", str(args.calib_seq_len))
        per_layer = r["seconds"] / layers
        print(f"time {r['seconds']:.0f} s ({per_layer:.1f} s/layer → {per_layer * 32 / 60:.1f} min "
              f"for 32 layers)  peak RSS {r['peak_rss_mb'] / 1024:.2f} GB  "
              f"size {r['size_before_mb']:.0f} → {r['size_mb']:.0f} MB  dtype {r['compute_dtype']}")
    print(f"\noutputs under {work}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    q = sub.add_parser("quantize", help="AWQ vs RTN quality, time and memory")
    q.add_argument("--calib_samples", type=int, default=64)
    q.add_argument("--calib_seq_len", type=int, default=512)
    q.add_argument("--phi3-mini-layers", type=int, default=0,
                   help="also time a Phi-3-mini-shaped model with this many layers (32 = full size)")
    q.add_argument("--big_calib_samples", type=int, default=16)
    q.add_argument("--device", default="auto")
    q.add_argument("--cache", default=str(REPO / "models" / "bench"))
    args = parser.parse_args()
    {"quantize": bench_quantize}[args.step](args)


if __name__ == "__main__":
    main()
