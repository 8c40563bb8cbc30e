"""`bench.py chain`: the four lab steps on a Phi-3-mini-shaped model in one go — quantize (AWQ
defaults) → finetune (the lab's settings, a fixed number of steps) → auto-opt → infer — and one
table of each step's wall time and peak RSS (each step its own `phitune --json` process; auto-opt's
figure includes its builder child). Goal: every step fits a 16 GB laptop (≤ 12 GB each,
finetune ≤ 5 GB)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import CACHE, REPO, peak_of, phitune_json
from benchmarks.shapes import TEMPLATE, build_phi3_mini_shaped

GOALS_GB = {"quantize": 12, "finetune": 5, "auto-opt": 12, "infer": 12}


def bench_chain(args: argparse.Namespace) -> None:
    model = args.model or build_phi3_mini_shaped(
        Path(args.cache) / f"phi3-mini-shaped-{args.layers}l", args.layers)
    work = Path(args.work or tempfile.mkdtemp(prefix="phitune-chain-"))
    data = str(REPO / "data" / "travel.jsonl")
    steps = {
        "quantize": ["quantize", "-m", str(model), "-o", str(work / "awq"), "--force"],
        "finetune": ["finetune", "--method", "lora", "-m", str(work / "awq"), "--data_files", data,
                     "--text_template", TEMPLATE, "--max_steps", str(args.finetune_steps),
                     "-o", str(work / "ft"), "--force", *args.finetune_args.split()],
        "auto-opt": ["auto-opt", "-m", str(work / "ft" / "model"), "--adapter_path",
                     str(work / "ft" / "adapter"), "--device", "cpu", "--provider",
                     "CPUExecutionProvider", "--use_ort_genai", "-o", str(work / "onnx-ao"),
                     "--force"],
        "infer": ["infer", "-m", str(work / "onnx-ao" / "model"), "--prompt",
                  "what is the best thing to see in chicago", "--max_new_tokens", "32"],
    }
    name = args.model or f"Phi-3-mini-shaped, {args.layers} layers, random weights"
    print(f"== chain: {name}; finetune "
          f"{args.finetune_steps} steps; outputs in {work}")
    print(f"{'step':10} {'wall s':>8} {'peak GB':>8} {'goal GB':>8}")
    for name, command in steps.items():
        if name in args.skip:
            continue
        if name == "infer":  # its --json output is the answer: measure it from outside
            peak_mb, wall = peak_of([sys.executable, "-m", "phitune", *command])
        else:
            run = phitune_json(*command)
            peak_mb, wall = run["peak_rss_mb"], run["wall_s"]
        peak = peak_mb / 1024
        print(f"{name:10} {wall:8.1f} {peak:8.2f} {GOALS_GB[name]:>8}"
              f"{'' if peak <= GOALS_GB[name] else '  over'}", flush=True)


def register(sub) -> None:
    c = sub.add_parser("chain", help="quantize → finetune → auto-opt → infer: time, peak memory")
    c.add_argument("--layers", type=int, default=32)
    c.add_argument("--model", default=None, help="another float model instead (e.g. tiny-phi3, "
                   "for a quick check of the script)")
    c.add_argument("--finetune-steps", type=int, default=2)
    c.add_argument("--finetune-args", default="",
                   help="more finetune options, e.g. '--gradient_checkpointing'")
    c.add_argument("--skip", nargs="*", default=[], choices=list(GOALS_GB))
    c.add_argument("--work", default=None, help="output dir (default: a new temp dir)")
    c.add_argument("--cache", default=str(CACHE))
    c.set_defaults(func=bench_chain)
