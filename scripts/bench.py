#!/usr/bin/env python
"""Benchmarks: figures, not tests. Each step is measured against the plain baseline its issue names.

    python scripts/bench.py quantize                      # embedded model: AWQ vs RTN, time, memory
    python scripts/bench.py quantize --phi3-mini-layers 32  # + a Phi-3-mini-shaped model (random weights)
    python scripts/bench.py finetune                      # phitune vs HF Trainer + PEFT (padding, no packing)
    python scripts/bench.py finetune --int4-base          # LoRA on int4 bases: kept packed vs dequantized at load
    python scripts/bench.py finetune --trl                # SmolLM2: phitune (float, int4 base) vs TRL's SFTTrainer
    python scripts/bench.py chain --layers 32             # quantize → finetune → auto-opt → infer: time, peak memory
    python scripts/bench.py auto-opt --layers 2 4         # int4 export peak memory, Phi-3-mini-shaped
    python scripts/bench.py infer                         # decode tok/s, TTFT: int4 (block 32 / 128) vs PyTorch, vs bandwidth
    python scripts/bench.py chat                          # TTFT per chat turn: kept KV cache vs a fresh prefill per turn
    python scripts/bench.py serve                         # phitune serve: 1-8 clients at once and staggered, two adapters + base; soak
    python scripts/bench.py sequence-start                # a BOS-trained Gemma-shaped model's ppl with / without <bos>
    python scripts/bench.py eval                          # perplexity on a 262k-vocabulary model: chunked NLL vs whole-window logits

Each benchmark is a module of scripts/benchmarks/ (one per step, one shared harness).
Every run is a fresh `phitune --json quantize` subprocess, so peak RSS is that run's own.

`quantize` also runs llm-compressor's counterpart of each algorithm compared (AWQModifier for awq,
GPTQModifier for gptq, both stacked for awq_gptq) on the same model dir, calibration blocks,
held-out ids and group size (scripts/llmcompressor_quantize.py) when its separate environment
exists: $LLMC_VENV, else .venv-llmcompressor in the repo, made by `bash scripts/llmcompressor_env.sh`
(it pins transformers <= 5.17, so it cannot share phitune's venv); otherwise one line says how to
make it. --no-llmcompressor skips them; --algorithms picks which run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: the benchmarks package
import benchmarks  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    for name in benchmarks.STEPS:
        importlib.import_module(f"benchmarks.{name}").register(sub)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
