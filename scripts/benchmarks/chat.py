"""`bench.py chat`: TTFT per chat turn, the kept KV cache vs a fresh prefill of the history."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.harness import CACHE, REPO, as_phitune_infer, in_child, phitune_json
from benchmarks.shapes import build_phi3_mini_shaped


@as_phitune_infer
def chat_turns(model_dir: str, questions: list[str], new_tokens: int, keep: bool
               ) -> tuple[list[dict], float]:
    """One chat through phitune's Session: every turn's TTFT and decode speed, and the
    seconds spent allocating the kept cache before the first turn."""
    from phitune.infer.session import Sampling, Session
    session = Session(Path(model_dir))
    messages, turns = [], []
    start = time.perf_counter()
    if keep:  # as the REPL does before its first prompt
        session.prepare_chat(Sampling(max_new_tokens=new_tokens))
    prepare_s = time.perf_counter() - start
    for question in questions:
        messages.append({"role": "user", "content": question})
        ids = session.prompt_ids(session.chat_prompt(messages))
        answer = session.generate(ids, Sampling(max_new_tokens=new_tokens), keep=keep)
        messages.append({"role": "assistant", "content": answer.text})
        turns.append({"prompt": len(ids), "cached": answer.cached_tokens, "ttft_s": answer.ttft_s,
                      "tok_per_s": answer.tok_per_s})
    return turns, prepare_s


def bench_chat(args: argparse.Namespace) -> None:
    """Baseline: a fresh generator per turn, prefilling the whole history (phitune infer's chat
    before the kept cache, and what a stateless caller of onnxruntime-genai does)."""
    cache = Path(args.cache)
    float_dir = build_phi3_mini_shaped(cache / f"phi3-mini-shaped-{args.phi3_mini_layers}l",
                                       args.phi3_mini_layers)
    onnx_dir = cache / f"infer-phi3-mini-shaped-{args.phi3_mini_layers}l-int4-b128"
    phitune_json("auto-opt", "-m", str(float_dir), "--block_size", "128", "-o", str(onnx_dir))
    records = [json.loads(line) for line in open(REPO / "data" / "travel.jsonl") if line.strip()]
    questions = [r["prompt"] for r in records[:args.turns]]
    print(f"== chat: {args.turns} turns of travel.jsonl questions, {args.new_tokens} new tokens each, "
          f"greedy; Phi-3-mini-shaped {args.phi3_mini_layers} layers, int4 block 128")
    model_dir = str(onnx_dir / "model")
    fresh, _ = in_child(chat_turns, model_dir, questions, args.new_tokens, False)
    kept, prepare_s = in_child(chat_turns, model_dir, questions, args.new_tokens, True)
    print(f"{'turn':>4} {'prompt':>7} | {'fresh TTFT ms':>13} | {'kept TTFT ms':>12} {'cached':>7} "
          f"| {'fresh tok/s':>11} {'kept tok/s':>10}")
    for i, (f, k) in enumerate(zip(fresh, kept), 1):
        print(f"{i:4} {k['prompt']:7} | {f['ttft_s'] * 1e3:13.0f} | {k['ttft_s'] * 1e3:12.0f} "
              f"{k['cached']:7} | {f['tok_per_s'] or 0:11.1f} {k['tok_per_s'] or 0:10.1f}")
    fresh_s, kept_s = (sum(t["ttft_s"] for t in turns) for turns in (fresh, kept))
    print(f"total time to first token: fresh prefill per turn {fresh_s:.2f} s, kept KV cache "
          f"{kept_s:.2f} s ({fresh_s / kept_s:.1f}×); last turn "
          f"{fresh[-1]['ttft_s'] / kept[-1]['ttft_s']:.1f}×; the kept cache was allocated before "
          f"the first prompt in {prepare_s:.2f} s (not in any TTFT)")


def register(sub) -> None:
    c = sub.add_parser("chat", help="TTFT per chat turn: the kept KV cache vs a fresh prefill "
                                    "of the whole history each turn")
    c.add_argument("--phi3-mini-layers", type=int, default=4,
                   help="layers of the Phi-3-mini-shaped model (32 = full size)")
    c.add_argument("--turns", type=int, default=8)
    c.add_argument("--new_tokens", type=int, default=64)
    c.add_argument("--cache", default=str(CACHE))
    c.set_defaults(func=bench_chat)
