"""`bench.py eval`: perplexity on a large-vocabulary model — peak memory and time of phitune's
chunked NLL (phitune/nll.py) against the whole-window logits it replaced and against a plain
forward over the same tokens (the floor: logits computed, nothing scored).

The model is random (Llama-shaped, hidden 256, 2 layers, 262,144-token vocabulary with tied
embeddings: 67M parameters, Gemma 3's vocabulary); the text is the shipped held-out text
through the embedded tokenizer (its ids are a subset of the vocabulary). Each variant runs in
its own fresh process, so its peak RSS is its own; the model loads before the baseline RSS is
read, so "over load" is what scoring added.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.harness import BENCH, CACHE, peak_of, phitune_json
from benchmarks.shapes import EMBEDDED

VARIANTS = ("forward", "whole", "chunked")


def build_big_vocab(path: Path, vocab: int, hidden: int, layers: int) -> Path:
    """The random model, cached on disk; the embedded tokenizer beside it."""
    if (path / "config.json").is_file():
        return path
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    embedded = json.loads((EMBEDDED / "config.json").read_text())
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         **{k: embedded[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    LlamaForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (EMBEDDED / name).is_file():
            shutil.copy(EMBEDDED / name, path / name)
    return path


def _rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_variant(args: argparse.Namespace) -> None:
    """One variant in this process; prints a JSON line (seconds, peak RSS, over load, ppl)."""
    import math
    import time

    import torch

    from phitune.artifacts import heldout_text
    from phitune.evaluate import context_only, perplexity, token_ids, windows
    from phitune.models import load_causal_lm, load_tokenizer
    from phitune.quantize.calib import read_texts
    from phitune.sequence_start import of_tokenizer
    model = load_causal_lm(Path(args.model), dtype=torch.float32).eval()
    tokenizer = load_tokenizer(Path(args.model))
    start = of_tokenizer(tokenizer)
    ids = token_ids(tokenizer, read_texts(heldout_text()), args.max_tokens)
    rows_all, skip = windows(ids, args.seq_len, start), context_only(start)
    per_batch = max(1, 2048 // args.seq_len)  # perplexity()'s batching
    with torch.inference_mode():
        model(torch.tensor([rows_all[0][:8]]), use_cache=False)  # one-time initialisation
    loaded = _rss_mb()
    began = time.perf_counter()
    ppl = None
    if args.variant == "chunked":
        ppl = perplexity(model, tokenizer, [], args.seq_len, ids=ids, start=start)
    else:
        total, count = 0.0, 0
        with torch.inference_mode():
            for first in range(0, len(rows_all), per_batch):
                batch = rows_all[first:first + per_batch]
                for length in sorted({len(w) for w in batch}):
                    rows = torch.tensor([w for w in batch if len(w) == length])
                    logits = model(rows[:, :-1], use_cache=False).logits[:, skip - 1:]
                    if args.variant == "whole":  # the code perplexity() ran before phitune/nll.py
                        targets = rows[:, skip:]
                        total += torch.nn.functional.cross_entropy(
                            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                            reduction="sum").item()
                        count += targets.numel()
        ppl = math.exp(total / count) if count else None
    seconds = time.perf_counter() - began
    print(json.dumps({"seconds": seconds, "peak_mb": _rss_mb(), "over_load_mb": _rss_mb() - loaded,
                      "ppl": ppl, "tokens": sum(len(w) - skip for w in rows_all)}))


def bench_eval(args: argparse.Namespace) -> None:
    model = build_big_vocab(Path(args.cache) / f"vocab{args.vocab}-h{args.hidden}-l{args.layers}",
                            args.vocab, args.hidden, args.layers)
    print(f"== eval: random Llama-shaped model, vocabulary {args.vocab}, hidden {args.hidden}, "
          f"{args.layers} layers, tied embeddings; held-out text, {args.seq_len}-token windows")
    rounds: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):  # interleaved, so the machine's drift hits every variant alike
        for variant in VARIANTS:
            proc = subprocess.run([sys.executable, str(BENCH), "_eval_variant", "--variant", variant,
                                   "--model", str(model), "--seq_len", str(args.seq_len),
                                   "--max_tokens", str(args.max_tokens)], capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            rounds[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    # per variant the round with the median time (its peak memory is the same every round)
    results = {v: sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2] for v, rs in rounds.items()}
    print(f"median of {args.rounds} interleaved rounds; every round's seconds: "
          + ", ".join(f"{v} {[round(r['seconds'], 1) for r in rs]}" for v, rs in rounds.items()))
    fwd = results["forward"]
    labels = {"forward": "plain forward (logits, no loss)",
              "whole": "whole-window log-softmax (before)",
              "chunked": "chunked (phitune.nll, now)"}
    for variant, r in results.items():
        ppl = f"ppl {r['ppl']:.4f}  " if r["ppl"] else ""
        print(f"{labels[variant]:36} {r['seconds']:6.2f} s = {r['seconds'] / fwd['seconds']:.2f}x "
              f"forward  peak RSS {r['peak_mb']:6.0f} MB  (+{r['over_load_mb']:.0f} MB over the "
              f"loaded model)  {ppl}over {r['tokens']} tokens")
    rel = abs(results["chunked"]["ppl"] - results["whole"]["ppl"]) / results["whole"]["ppl"]
    print(f"chunked vs whole perplexity: relative difference {rel:.2e}")
    if args.cli:
        cmd = ["eval", "-m", str(model), "--no-latency", "--seq_len", str(args.seq_len),
               "--max_tokens", str(args.max_tokens)]
        r = phitune_json(*cmd)
        peak, wall = peak_of([sys.executable, "-m", "phitune", *cmd])
        print(f"phitune eval (whole command)         {wall:6.1f} s wall  peak RSS {peak:6.0f} MB  "
              f"ppl {r['ppl']} ({r['seconds']:.1f} s in its own timing)")


def register(sub) -> None:
    e = sub.add_parser("eval", help="perplexity memory/time on a 262k-vocabulary model")
    e.add_argument("--vocab", type=int, default=262144)
    e.add_argument("--hidden", type=int, default=256)
    e.add_argument("--layers", type=int, default=2)
    e.add_argument("--seq_len", type=int, default=256)
    e.add_argument("--max_tokens", type=int, default=8192)
    e.add_argument("--rounds", type=int, default=3)
    e.add_argument("--cli", action=argparse.BooleanOptionalAction, default=True,
                   help="also the whole `phitune eval` command's figures")
    e.add_argument("--cache", default=str(CACHE))
    e.set_defaults(func=bench_eval)
    v = sub.add_parser("_eval_variant")
    v.add_argument("--variant", choices=VARIANTS)
    v.add_argument("--model")
    v.add_argument("--seq_len", type=int)
    v.add_argument("--max_tokens", type=int)
    v.set_defaults(func=one_variant)
