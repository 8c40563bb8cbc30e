"""`bench.py quantize`: AWQ, GPTQ and AWQ+GPTQ vs RTN quality, time and memory, against one plain forward and
llm-compressor's counterpart of each (scripts/llmcompressor_quantize.py) in its own environment."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import BENCH, CACHE, REPO, phitune_json
from benchmarks.shapes import build_phi3_mini_shaped


def plain_forward(args: argparse.Namespace) -> None:
    """Seconds of one plain fp32 forward (no search, no cache) over the calibration tokens
    `phitune quantize` would use: the unit AWQ's time is judged in. Prints a JSON line."""
    import torch
    from phitune.artifacts import resolve_model
    from phitune.models import load_causal_lm, load_tokenizer
    from phitune.quantize import calib
    from phitune.quantize.step import default_calib_data
    ref = resolve_model(args.model, accept=("hf-model",), step="quantize")
    model = load_causal_lm(ref.path, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(ref.path)
    samples = calib.token_blocks(calib.read_texts(default_calib_data()), tokenizer,
                                 args.calib_samples, args.calib_seq_len)
    with torch.inference_mode():
        model(samples[:1, :8], use_cache=False)  # one-time initialisation, not the forward's cost
        start = time.perf_counter()
        for chunk in samples.split(max(1, 8192 // args.calib_seq_len)):
            model(chunk, use_cache=False)
    seconds = time.perf_counter() - start
    if args.dump:  # the same tokens for a peer quantizer (scripts/llmcompressor_quantize.py)
        from phitune.artifacts import heldout_text
        from phitune.evaluate import token_ids
        from phitune.sequence_start import of_tokenizer
        eval_path = Path(args.eval_data) if args.eval_data else heldout_text()
        Path(args.dump).write_text(json.dumps({
            "model_dir": str(ref.path), "calib": samples.tolist(),
            "eval_ids": token_ids(tokenizer, calib.read_texts(eval_path)),
            "sequence_start": list(of_tokenizer(tokenizer).ids)}))
    print(json.dumps({"seconds": seconds, "tokens": samples.numel()}))


def llmcompressor_python() -> Path:
    """The python of llm-compressor's own environment: $LLMC_VENV, else .venv-llmcompressor in
    the repo (where `bash scripts/llmcompressor_env.sh` creates it; relative paths are the repo's)."""
    venv = Path(os.environ.get("LLMC_VENV") or ".venv-llmcompressor")
    return (venv if venv.is_absolute() else REPO / venv) / "bin" / "python"


# phitune's algorithms that llm-compressor has a counterpart for: its recipe, and what differs
LLMC_PEERS = {
    "awq": ("AWQModifier", "no clip search"),
    "gptq": ("GPTQModifier", "actorder weight = static groups, min/max group ranges"),
    "awq_gptq": ("AWQModifier + GPTQModifier", "no clip search; one calibration pass each"),
}


def compare_llmcompressor(tokens: Path, group_size: int, fwd: float, rtn_gap: float | None,
                          output: Path, algorithm: str = "awq",
                          phitune: dict | None = None) -> dict | None:
    """llm-compressor's counterpart of phitune's `algorithm` (scripts/llmcompressor_quantize.py, in
    its own environment: it pins transformers <= 5.17) on the same model dir, calibration blocks,
    held-out ids and group size as phitune's runs above. Prints its LLMC-<ALGORITHM> lines, and
    with `phitune` ({"seconds", "gap"} of phitune's own run) how the two compare; or one line
    saying why not."""
    label = f"LLMC-{algorithm.upper()}"
    modifiers, differs = LLMC_PEERS[algorithm]
    python = llmcompressor_python()
    if not python.is_file():
        print(f"{label:27} not installed ({python.parent.parent} absent): "
              "create it with `bash scripts/llmcompressor_env.sh` (LLMC_VENV=DIR places it elsewhere)")
        return None
    model_dir = json.loads(tokens.read_text())["model_dir"]
    proc = subprocess.run([str(python), str(REPO / "scripts" / "llmcompressor_quantize.py"),
                           "--algorithm", algorithm, "--model", model_dir, "--tokens", str(tokens),
                           "--group_size", str(group_size), "--output", str(output)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n    ".join(proc.stderr.strip().splitlines()[-15:])
        print(f"{label:27} failed (exit {proc.returncode}):\n    {tail}")
        return None
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    v = r["versions"]
    scored = "ppl_gap" in r
    quality = (f"perplexity {r['ppl_after']:.3f}  gap {r['ppl_gap']:+.4f}  " if scored
               else "no perplexity  ")
    print(f"{label} {quality}time {r['total_s']:.1f} s = {r['total_s'] / fwd:.2f}x forward "
          f"(oneshot {r['seconds']:.1f} s = {r['seconds'] / r['layers']:.1f} s/layer, "
          f"load+save {r['load_s'] + r['save_s']:.1f} s)  "
          f"peak RSS {r['peak_rss_mb']:.0f} MB  size {r['size_mb']:.1f} MB (float tensors fp32)")
    print(f"     = llm-compressor {v['llmcompressor']} {modifiers} in its own env (transformers "
          f"{v['transformers']}{', pin_memory made a no-op' if r['pin_memory_patched'] else ''}; "
          f"{differs}), "
          + (f"its saved checkpoint decompressed and scored by phitune's perplexity; float "
             f"{r['ppl_before']:.3f} there" if scored else "not scored"))
    if scored and rtn_gap:
        print(f"{label} gap / RTN gap".ljust(28) + f"{r['ppl_gap'] / rtn_gap:.3f}")
    if phitune:
        speed = r["total_s"] / phitune["seconds"]
        line = (f"phitune {speed:.2f}x faster" if speed >= 1 else f"phitune {1 / speed:.2f}x slower") \
            + f" ({phitune['seconds']:.1f} s vs {r['total_s']:.1f} s)"
        if scored:
            mine, theirs = phitune["gap"], r["ppl_gap"]
            verdict = "smaller" if mine < theirs else "larger" if mine > theirs else "the same"
            ratios = (f" ({mine / rtn_gap:.3f}x vs {theirs / rtn_gap:.3f}x RTN's)" if rtn_gap else "")
            line += f"; gap {mine:+.4f} vs {theirs:+.4f}{ratios}: {verdict}"
        print(f"{algorithm.upper()} vs {label}".ljust(28) + line)
    return r


def bench_quantize(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="phitune-bench-"))
    calib = ["--calib_samples", str(args.calib_samples), "--calib_seq_len", str(args.calib_seq_len)]
    extra = (["--group_size", str(args.group_size)] if args.group_size else []) + \
        (["--eval_data", args.eval_data] if args.eval_data else [])
    print(f"== quantize: {args.model}, calibration {args.calib_samples}x{args.calib_seq_len} tokens")
    tokens = work / "tokens.json"  # phitune's calibration blocks and held-out ids, for the peer
    proc = subprocess.run([sys.executable, str(BENCH), "_plain_forward", "--model", args.model, *calib,
                           "--dump", str(tokens), *(["--eval_data", args.eval_data] if args.eval_data else [])],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"plain forward failed:\n{proc.stderr[-3000:]}")
    fwd = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
    print(f"plain fp32 forward over the calibration tokens  {fwd:.1f} s (the unit below)")
    runs, algs = {}, args.algorithms
    for alg in algs:
        for evaluated in ((False, True) if args.separate_timing else (True,)):
            runs[alg, evaluated] = phitune_json(
                "quantize", "-m", args.model, "--algorithm", alg, "-o", str(work / alg), "--force",
                *calib, *extra, *([] if evaluated else ["--no-eval"]))
    base = runs[algs[0], True]["ppl_before"]
    print(f"float perplexity            {base:.3f}")
    seconds = {}
    for alg in algs:
        r = runs[alg, True]
        # without a separate --no-eval run: the evaluated run's seconds less its perplexity passes
        plain = runs.get((alg, False))
        seconds[alg] = plain["seconds"] if plain else r["seconds"] - r["eval_seconds"]
        per_16k = r["eval_seconds"] / fwd * 16384 / r["eval_tokens"]
        print(f"{alg.upper():8} perplexity {r['ppl_after']:.3f}  gap {r['ppl_gap']:+.4f}  "
              f"{'--no-eval' if plain else 'less eval'} {seconds[alg]:.1f} s = "
              f"{seconds[alg] / fwd:.2f}x forward  "
              f"eval {r['eval_seconds']:.1f} s over {r['eval_tokens']} tokens "
              f"({per_16k:.2f} forwards per 16k)  peak RSS {(plain or r)['peak_rss_mb']:.0f} MB  "
              f"size {r['size_before_mb']:.1f} → {r['size_mb']:.1f} MB")
    gap = {alg: runs[alg, True]["ppl_gap"] for alg in algs}
    for alg in algs:
        if alg != "rtn" and gap.get("rtn"):
            print(f"{alg.upper()} gap / RTN gap".ljust(28) + f"{gap[alg] / gap['rtn']:.3f}")
    if "awq" in seconds and "awq_gptq" in seconds:
        print(f"AWQ_GPTQ time / AWQ time    {seconds['awq_gptq'] / seconds['awq']:.2f}")
    if args.llmcompressor:
        group_size = runs[algs[0], True]["group_size"]
        for alg in (a for a in algs if a in LLMC_PEERS and a in (args.llmcompressor_algorithms or algs)):
            peer = compare_llmcompressor(tokens, group_size, fwd, gap.get("rtn"), work / f"llmc-{alg}",
                                         alg, {"seconds": seconds[alg], "gap": gap[alg]})
            if peer is None and not llmcompressor_python().is_file():
                break  # one line said how to make its environment

    if args.phi3_mini_layers:
        layers = args.phi3_mini_layers
        model_dir = build_phi3_mini_shaped(Path(args.cache) / f"phi3-mini-shaped-{layers}l", layers)
        print(f"\n== quantize: Phi-3-mini-shaped ({layers} layers, random bf16 weights), "
              f"{args.big_calib_samples}x{args.calib_seq_len} calibration tokens, CPU, all layers in one run")
        for alg in args.big_algorithms:
            r = phitune_json("quantize", "-m", str(model_dir), "-o", str(work / f"big-{alg}"), "--force",
                             "--no-eval", "--algorithm", alg, "--device", args.device, "--dtype", args.big_dtype,
                             "--calib_samples", str(args.big_calib_samples), "--calib_seq_len",
                             str(args.calib_seq_len))
            print(f"{alg.upper():8} time {r['seconds']:.0f} s ({r['seconds'] / 60:.1f} min, "
                  f"{r['seconds'] / layers:.1f} s/layer)  peak RSS {r['peak_rss_mb'] / 1024:.2f} GB  "
                  f"size {r['size_before_mb']:.0f} → {r['size_mb']:.0f} MB  dtype {r['compute_dtype']}")
    print(f"\noutputs under {work}")


def register(sub) -> None:
    q = sub.add_parser("quantize", help="AWQ, GPTQ, AWQ+GPTQ vs RTN quality, time and memory")
    q.add_argument("--model", default="tiny-phi3",
                   help="model to compare AWQ and RTN on (a dir or an embedded name)")
    q.add_argument("--calib_samples", type=int, default=64)
    q.add_argument("--calib_seq_len", type=int, default=256)
    q.add_argument("--group_size", type=int, default=None, help="default: phitune's choice")
    q.add_argument("--eval_data", default=None, help="held-out text (default: phitune's)")
    q.add_argument("--phi3-mini-layers", type=int, default=0,
                   help="also time a Phi-3-mini-shaped model with this many layers (32 = full size)")
    q.add_argument("--algorithms", nargs="+", default=["awq", "rtn", "gptq", "awq_gptq"],
                   help="phitune algorithms compared (rtn gives the gap every ratio divides by)")
    q.add_argument("--separate-timing", action=argparse.BooleanOptionalAction, default=True,
                   help="time each algorithm in its own --no-eval run (else: the evaluated run's "
                        "seconds less its perplexity passes, half the runs)")
    q.add_argument("--big_calib_samples", type=int, default=64)
    q.add_argument("--big_algorithms", nargs="+", default=["awq"],
                   help="algorithms timed on the Phi-3-mini-shaped model, one whole run each")
    q.add_argument("--device", default="auto")
    q.add_argument("--big_dtype", default="auto", help="calibration dtype for the big model")
    q.add_argument("--llmcompressor-algorithms", nargs="+", default=None,
                   help="only these of --algorithms get their llm-compressor counterpart "
                        "(default: every one that has one)")
    q.add_argument("--llmcompressor", action=argparse.BooleanOptionalAction, default=True,
                   help="also llm-compressor's counterpart of each algorithm that has one (awq, "
                        "gptq, awq_gptq) on the same tokens, where its env exists "
                        "(bash scripts/llmcompressor_env.sh)")
    q.add_argument("--cache", default=str(CACHE))
    q.set_defaults(func=bench_quantize)
    p = sub.add_parser("_plain_forward")
    p.add_argument("--model")
    p.add_argument("--calib_samples", type=int)
    p.add_argument("--calib_seq_len", type=int)
    p.add_argument("--dump", default=None, help="write the calibration blocks and held-out ids here")
    p.add_argument("--eval_data", default=None)
    p.set_defaults(func=plain_forward)
