#!/usr/bin/env python
"""Benchmarks: figures, not tests. Each step is measured against the plain baseline its issue names.

    python scripts/bench.py quantize                      # embedded model: AWQ vs RTN, time, memory
    python scripts/bench.py quantize --phi3-mini-layers 32  # + a Phi-3-mini-shaped model (random weights)
    python scripts/bench.py finetune                      # phitune vs HF Trainer + PEFT (padding, no packing)
    python scripts/bench.py auto-opt --layers 2 4         # int4 export peak memory, Phi-3-mini-shaped
    python scripts/bench.py infer                         # decode tok/s, TTFT: int4 (block 32 / 128) vs PyTorch, vs bandwidth
    python scripts/bench.py chat                          # TTFT per chat turn: kept KV cache vs a fresh prefill per turn
    python scripts/bench.py serve                         # phitune serve: 1-8 clients, two adapters + base; soak

Every run is a fresh `phitune --json quantize` subprocess, so peak RSS is that run's own.

`quantize` also runs llm-compressor's AWQ on the same model dir, calibration blocks, held-out ids
and group size (scripts/llmcompressor_awq.py) when its separate environment exists: $LLMC_VENV,
else .venv-llmcompressor in the repo, made by `bash scripts/llmcompressor_env.sh` (it pins
transformers <= 5.17, so it cannot share phitune's venv); otherwise one line says how to make it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
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
    if args.dump:  # the same tokens for a peer quantizer (scripts/llmcompressor_awq.py)
        from phitune.artifacts import heldout_text
        from phitune.evaluate import token_ids
        eval_path = Path(args.eval_data) if args.eval_data else heldout_text()
        Path(args.dump).write_text(json.dumps({
            "model_dir": str(ref.path), "calib": samples.tolist(),
            "eval_ids": token_ids(tokenizer, calib.read_texts(eval_path))}))
    print(json.dumps({"seconds": seconds, "tokens": samples.numel()}))


def llmcompressor_python() -> Path:
    """The python of llm-compressor's own environment: $LLMC_VENV, else .venv-llmcompressor in
    the repo (where `bash scripts/llmcompressor_env.sh` creates it; relative paths are the repo's)."""
    venv = Path(os.environ.get("LLMC_VENV") or ".venv-llmcompressor")
    return (venv if venv.is_absolute() else REPO / venv) / "bin" / "python"


def compare_llmcompressor(tokens: Path, group_size: int, fwd: float, rtn_gap: float | None,
                          output: Path) -> dict | None:
    """llm-compressor's AWQ (scripts/llmcompressor_awq.py, in its own environment: it pins
    transformers <= 5.17) on the same model dir, calibration blocks, held-out ids and group size
    as phitune's runs above; one line of figures, or one line saying why not."""
    python = llmcompressor_python()
    if not python.is_file():
        print(f"llm-compressor AWQ          not installed ({python.parent.parent} absent): "
              "create it with `bash scripts/llmcompressor_env.sh` (LLMC_VENV=DIR places it elsewhere)")
        return None
    model_dir = json.loads(tokens.read_text())["model_dir"]
    proc = subprocess.run([str(python), str(REPO / "scripts" / "llmcompressor_awq.py"), "--model", model_dir,
                           "--tokens", str(tokens), "--group_size", str(group_size), "--output", str(output)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n    ".join(proc.stderr.strip().splitlines()[-15:])
        print(f"llm-compressor AWQ          failed (exit {proc.returncode}):\n    {tail}")
        return None
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    v = r["versions"]
    quality = (f"perplexity {r['ppl_after']:.3f}  gap {r['ppl_gap']:+.4f}  " if "ppl_gap" in r
               else "no perplexity  ")
    print(f"LLMC {quality}time {r['total_s']:.1f} s = {r['total_s'] / fwd:.2f}x forward "
          f"(oneshot {r['seconds']:.1f} s = {r['seconds'] / r['layers']:.1f} s/layer, "
          f"load+save {r['load_s'] + r['save_s']:.1f} s)  "
          f"peak RSS {r['peak_rss_mb']:.0f} MB  size {r['size_mb']:.1f} MB (float tensors fp32)")
    print(f"     = llm-compressor {v['llmcompressor']} AWQ in its own env (transformers {v['transformers']}"
          f"{', pin_memory made a no-op' if r['pin_memory_patched'] else ''}; no clip search), "
          + (f"its saved checkpoint decompressed and scored by phitune's perplexity; float "
             f"{r['ppl_before']:.3f} there" if "ppl_gap" in r else "not scored"))
    if "ppl_gap" in r and rtn_gap:
        print(f"LLMC gap / RTN gap          {r['ppl_gap'] / rtn_gap:.3f}")
    return r


def bench_quantize(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="phitune-bench-"))
    calib = ["--calib_samples", str(args.calib_samples), "--calib_seq_len", str(args.calib_seq_len)]
    extra = (["--group_size", str(args.group_size)] if args.group_size else []) + \
        (["--eval_data", args.eval_data] if args.eval_data else [])
    print(f"== quantize: {args.model}, calibration {args.calib_samples}x{args.calib_seq_len} tokens")
    tokens = work / "tokens.json"  # phitune's calibration blocks and held-out ids, for the peer
    proc = subprocess.run([sys.executable, __file__, "_plain_forward", "--model", args.model, *calib,
                           "--dump", str(tokens), *(["--eval_data", args.eval_data] if args.eval_data else [])],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"plain forward failed:\n{proc.stderr[-3000:]}")
    fwd = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
    print(f"plain fp32 forward over the calibration tokens  {fwd:.1f} s (the unit below)")
    runs = {}
    for alg in ("awq", "rtn"):
        for evaluated in (False, True):
            runs[alg, evaluated] = phitune_json(
                "quantize", "-m", args.model, "--algorithm", alg, "-o", str(work / alg), "--force",
                *calib, *extra, *([] if evaluated else ["--no-eval"]))
    base = runs["awq", True]["ppl_before"]
    print(f"float perplexity            {base:.3f}")
    for alg in ("awq", "rtn"):
        r, plain = runs[alg, True], runs[alg, False]
        per_16k = r["eval_seconds"] / fwd * 16384 / r["eval_tokens"]
        print(f"{alg.upper():4} perplexity {r['ppl_after']:.3f}  gap {r['ppl_gap']:+.4f}  "
              f"--no-eval {plain['seconds']:.1f} s = {plain['seconds'] / fwd:.2f}x forward  "
              f"eval {r['eval_seconds']:.1f} s over {r['eval_tokens']} tokens "
              f"({per_16k:.2f} forwards per 16k)  peak RSS {plain['peak_rss_mb']:.0f} MB  "
              f"size {r['size_before_mb']:.1f} → {r['size_mb']:.1f} MB")
    gap = {alg: runs[alg, True]["ppl_gap"] for alg in ("awq", "rtn")}
    ratio = gap["awq"] / gap["rtn"] if gap["rtn"] else float("nan")
    print(f"AWQ gap / RTN gap           {ratio:.3f}")
    if args.llmcompressor:
        compare_llmcompressor(tokens, runs["awq", True]["group_size"], fwd, gap["rtn"], work / "llmc")

    if args.phi3_mini_layers:
        layers = args.phi3_mini_layers
        model_dir = build_phi3_mini_shaped(Path(args.cache) / f"phi3-mini-shaped-{layers}l", layers)
        print(f"\n== quantize: Phi-3-mini-shaped ({layers} layers, random bf16 weights), "
              f"{args.big_calib_samples}x{args.calib_seq_len} calibration tokens, CPU, all layers in one run")
        r = phitune_json("quantize", "-m", str(model_dir), "-o", str(work / "big"), "--force",
                         "--no-eval", "--device", args.device, "--dtype", args.big_dtype, "--calib_samples",
                         str(args.big_calib_samples), "--calib_seq_len", str(args.calib_seq_len))
        print(f"time {r['seconds']:.0f} s ({r['seconds'] / 60:.1f} min, {r['seconds'] / layers:.1f} s/layer)  "
              f"peak RSS {r['peak_rss_mb'] / 1024:.2f} GB  "
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
        proc = subprocess.run([sys.executable, __file__, "_baseline_finetune", "--model", path,
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
        line = (f"{layers:2d} layers  phitune {ours['peak_rss_mb'] / 1024:5.2f} GB {ours['seconds']:6.1f} s"
                f"  (builder child {ours['builder_peak_rss_mb'] / 1024:.2f} GB)")
        if layers > 12:  # the builder's own int4 needs ~0.75 GB per layer: it would not fit in 24 GB
            print(line + "   builder int4 on float: skipped (would exceed this machine's memory)")
            continue
        base_peak, base_s = peak_of([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i",
                                     str(model_dir), "-o", str(work / f"builder-{layers}"), "-p", "int4",
                                     "-e", "cpu", "-c", str(work / "cache")])
        rows.append((layers, ours["peak_rss_mb"], ours["seconds"], base_peak, base_s))
        print(line + f"   builder int4 on float {base_peak / 1024:5.2f} GB {base_s:6.1f} s")
    if len(rows) >= 2:
        (l0, o0, _, b0, _), (l1, o1, _, b1, _) = rows[0], rows[-1]
        def at32(y0, y1):
            return (y0 + (y1 - y0) / (l1 - l0) * (32 - l0)) / 1024
        print(f"extrapolated to 32 layers: phitune {at32(o0, o1):.1f} GB (goal ≤ 12)   "
              f"builder int4 {at32(b0, b1):.1f} GB")
    print(f"outputs under {work}")


# ---------------------------------------------------------------- infer

# The default decode model: Phi-3-shaped, random weights, ~170M params: its int4 weights (~100 MiB,
# 3× this CPU's L3) come from memory every token, unlike tiny-phi3's. Builder traps avoided: vocab
# != 2 × intermediate (it picks the LM head by output size), max == original max positions (LongRoPE).
INFER_SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                   num_key_value_heads=16, vocab_size=8192, max_position_embeddings=4096,
                   original_max_position_embeddings=4096, tie_word_embeddings=False,
                   bos_token_id=8187, eos_token_id=8187, pad_token_id=8187)
LORA_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def build_phi3_shaped(path: Path, layers: int, shape: dict) -> Path:
    """A Phi-3-shaped model of `shape`, random bf16 weights, the embedded tokenizer (cached)."""
    if (path / "config.json").is_file():
        return path
    import shutil

    import torch
    from transformers import Phi3Config, Phi3ForCausalLM
    assert shape["vocab_size"] != 2 * shape["intermediate_size"], "the builder would pick a wrong LM head"
    assert shape["max_position_embeddings"] == shape["original_max_position_embeddings"], "LongRoPE path"
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(num_hidden_layers=layers, **shape)).to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    embedded = REPO / "data" / "tiny-phi3"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (embedded / name).is_file():
            shutil.copy(embedded / name, tmp / name)
    tmp.rename(path)
    return path


def random_lora(model_dir: Path, path: Path, rank: int) -> Path:
    """A PEFT LoRA adapter with random A and B (init_lora_weights=False) on every projection."""
    if (path / "adapter_config.json").is_file():
        return path
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                                             target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tmp.rename(path)
    return path


def as_phitune_infer(fn):
    """Mark `fn` to run, in its spawned child, in the environment `phitune infer` decodes in:
    the CLI re-executes itself with glibc's huge-page tunable (phitune/hugepages.py)."""
    fn.child_environ = True
    return fn


@contextmanager
def child_environ(fn):
    """os.environ as `fn`'s spawned child should inherit it, for the duration of the spawn."""
    from phitune import hugepages
    env = hugepages.system_environ() if getattr(fn, "child_environ", False) else None
    if env is None:
        yield
        return
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def in_child(fn, *args):
    """fn(*args) in a fresh spawned process: no thread pool of one runtime spins beside another's."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        with child_environ(fn):
            future = pool.submit(fn, *args)  # the child starts here, with this environment
        return future.result()


def prompt_ids(tokenizer_file: Path, n: int) -> list[int]:
    """The first `n` tokens of travel.jsonl's text, no special tokens."""
    from tokenizers import Tokenizer
    records = [json.loads(line) for line in open(REPO / "data" / "travel.jsonl") if line.strip()]
    text = "\n".join(f"{r['prompt']} {r['response']}" for r in records)
    ids = Tokenizer.from_file(str(tokenizer_file)).encode(text, add_special_tokens=False).ids
    if len(ids) < n:
        sys.exit(f"travel.jsonl has only {len(ids)} tokens; --prompt_tokens {n} is too many")
    return ids[:n]


def _median(values: list[float]) -> float:
    import statistics
    return statistics.median(values)


def read_bandwidth(gib: float, repeats: int, threads: int) -> dict:
    """Best-of-`repeats` GB/s of reading a `gib` GiB float32 array with numpy reductions,
    on 1 thread and split over `threads` threads (numpy releases the GIL in reductions)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    a = np.ones(int(gib * 2**30) // 4, dtype=np.float32)  # written once: every page is real
    parts = np.array_split(a, threads)

    def best(fn) -> float:
        fn()
        return _best_gbps(fn, a.nbytes, repeats)

    out = {}
    with ThreadPoolExecutor(threads) as pool:
        for kernel in ("sum", "max"):
            f = getattr(np, kernel)
            out[f"{kernel} 1 thread"] = best(lambda: f(a))
            out[f"{kernel} {threads} threads"] = best(lambda: list(pool.map(f, parts)))
    return out


def _best_gbps(read, nbytes: int, repeats: int) -> float:
    """GB/s of the fastest of `repeats` calls of `read`, which reads `nbytes`."""
    return nbytes / min(_timed(read) for _ in range(repeats)) / 1e9


def bandwidth_probe(gib: float, threads: int):
    """A Runner factory: each run reads a `gib` GiB float32 array split over `threads` threads
    (best of 3) → (0, GB/s). measure() runs it once a round beside the models, so every
    model's limit comes from the bandwidth of the same minutes (this host's drifts 30–38 GB/s)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    a = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    parts, pool = np.array_split(a, threads), ThreadPoolExecutor(threads)

    def once() -> tuple[float, float]:
        return 0.0, _best_gbps(lambda: list(pool.map(np.sum, parts)), a.nbytes, 3)
    return {"": once}, {}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def int4_bytes_per_token(model_dir: Path) -> dict:
    """Bytes of initializers one decoded token reads from model.onnx's external data: everything
    except the tables only indexed by position or token id (embedding, rotary cos/sin caches),
    of which one row each is read."""
    import onnx
    from onnx import TensorProto, numpy_helper
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    graph = model.graph
    sizes, rows = {}, {}
    for init in graph.initializer:
        ext = {e.key: e.value for e in init.external_data}
        if init.data_location == TensorProto.EXTERNAL:
            sizes[init.name] = int(ext["length"])
        else:
            sizes[init.name] = numpy_helper.to_array(init).nbytes
        rows[init.name] = init.dims[0] if init.dims else 1
    indexed = {n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in sizes}
    indexed |= {i for n in graph.node if n.op_type == "GroupQueryAttention"
                for i in n.input[7:9] if i in sizes}  # cos_cache, sin_cache
    weights = sum(s for name, s in sizes.items() if name not in indexed)
    one_rows = sum(sizes[name] // rows[name] for name in indexed)
    head_size = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    kv_per_position = 0
    for i in graph.input:  # past_key_values.N.key/value: [batch, kv heads, past length, head size]
        if i.name.startswith("past_key_values."):
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).itemsize
            kv_per_position += i.type.tensor_type.shape.dim[1].dim_value * head_size * itemsize
    data = model_dir / "model.onnx.data"
    return {"weights": weights + one_rows, "indexed_tables": sum(sizes[n] for n in indexed),
            "indexed_names": sorted(indexed), "data_file": data.stat().st_size if data.is_file() else 0,
            "kv_per_position": kv_per_position}


def cpu_jiffies() -> tuple[list[int], float, float]:
    """/proc/stat's cpu line, this process tree's CPU seconds, and the wall clock, now."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    t = os.times()
    return ticks, t.user + t.system + t.children_user + t.children_system, time.perf_counter()


def other_cpu(since: tuple[list[int], float, float]) -> dict:
    """Cores kept busy by processes other than this bench (and its children) since `since`."""
    (t0, own0, w0), (t1, own1, w1) = since, cpu_jiffies()
    hz, d = os.sysconf("SC_CLK_TCK"), [b - a for a, b in zip(t0, t1)]
    busy = (sum(d[:8]) - d[3] - d[4]) / hz  # all but idle and iowait (guest time is inside user)
    steal = d[7] / hz if len(d) > 7 else 0.0
    return {"other": max(busy - steal - (own1 - own0), 0.0) / (w1 - w0), "steal": steal / (w1 - w0)}


def adapter_bytes(path: Path) -> int:
    import onnxruntime as ort
    params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    return sum(v.numpy().nbytes for v in params.values())


@as_phitune_infer
def og_generator(model_dir: str, ids: list[int], new_tokens: int, adapter: str | None):
    """Generations with phitune infer's own Session.generate (every core of the affinity),
    greedy, forced to `new_tokens` (min_length keeps an early end-of-sequence token out).
    Variants of one loaded model: "" (no adapter) and, with `adapter`, " + adapter active",
    so the adapter's overhead is measured in one process → {variant: once → (TTFT s, tok/s)}."""
    from phitune.infer.adapters import Adapter
    from phitune.infer.session import Sampling, Session

    class Fixed(Sampling):
        def search_options(self) -> dict:
            return super().search_options() | {"min_length": len(ids) + new_tokens}

    session = Session(Path(model_dir), [Adapter(Path(adapter), "bench")] if adapter else [], None)

    def run(active: str | None):
        def once() -> tuple[float, float]:
            session.activate(active)
            answer = session.generate(ids, Fixed(max_new_tokens=new_tokens))
            if len(answer.ids) != new_tokens:
                raise RuntimeError(f"generated {len(answer.ids)} tokens, not {new_tokens}")
            return answer.ttft_s, answer.tok_per_s
        return once
    variants = {"": run(None)}
    if adapter:
        variants[" + adapter active"] = run("bench")
    return variants, {}


def torch_generator(model_dir: str, ids: list[int], new_tokens: int, threads: int):
    """One PyTorch fp32 `generate` on the same weights: greedy, exactly `new_tokens`, KV cache on.
    A streamer stamps each token, so TTFT and decode tok/s come from the same run and mean what
    phitune's do (first token: prefill included; decode: tokens after the first / time after it)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):  # first call: the prompt; then one call per new token
            self.times.append(time.perf_counter())

        def end(self):
            pass

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    embed = model.get_input_embeddings().weight
    size = embed.element_size()
    info = {"params": sum(p.numel() for p in model.parameters()),
            "bytes_per_token": sum(p.numel() * p.element_size() for p in model.parameters())
            - embed.numel() * size + embed.shape[1] * size}  # one embedding row
    prompt = torch.tensor([ids])

    def once() -> tuple[float, float]:
        clock = Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 use_cache=True, streamer=clock,
                                 pad_token_id=model.config.eos_token_id)
        n = out.shape[1] - len(ids)
        if n != new_tokens or len(clock.times) != n + 1:
            raise RuntimeError(f"generated {n} tokens, not {new_tokens}")
        first, last = clock.times[1], clock.times[-1]
        return first - start, (n - 1) / (last - first)
    return {"": once}, info


_RUNNER: dict = {}


def _runner_load(factory, args) -> None:
    _RUNNER["variants"], _RUNNER["info"] = factory(*args)


def _runner_info() -> tuple[list[str], dict]:
    return list(_RUNNER["variants"]), _RUNNER["info"]


def _runner_once(variant: str) -> tuple[float, float, float, float]:
    """(TTFT s, decode tok/s, CPU seconds, wall seconds) of one generation."""
    cpu, wall = time.process_time(), time.perf_counter()
    ttft, rate = _RUNNER["variants"][variant]()
    return ttft, rate, time.process_time() - cpu, time.perf_counter() - wall


class Runner:
    """A model loaded once in its own spawned process (no runtime's thread pool beside
    another's), generating on demand, in each of its variants."""

    def __init__(self, factory, *args):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_runner_load, initargs=(factory, args))
        with child_environ(factory):
            started = self.pool.submit(_runner_info)  # the child starts here
        self.variants, self.info = started.result()

    def once(self, variant: str) -> tuple[float, float, float, float]:
        return self.pool.submit(_runner_once, variant).result()

    def close(self) -> None:
        self.pool.shutdown()


def measure(configs: dict, runs: int, together: bool, probe: tuple | None = None) -> dict:
    """label + variant → {ttft_s, tok_per_s (medians over `runs` after a warm-up), cores, info,
    and with `probe` (a Runner config) bandwidth_GBps: the median probe reading of its rounds}.

    `together`: every model loaded at once and the runs interleaved round by round (order
    rotated), so a machine whose speed drifts — shared cores, a busy host — biases no config;
    otherwise one model at a time (less memory). The variants of one model (adapter on/off)
    always share its process, so their ratio is free of process-to-process spread."""
    samples: dict = {}
    infos = {}
    groups = [list(configs)] if together else [[label] for label in configs]
    probe_label = "\0probe"  # joins every group's rounds; not a row of the result
    for group in groups:
        runners = {label: Runner(*configs[label]) for label in group}
        if probe:
            runners[probe_label] = Runner(*probe)
        jobs = [(label, v) for label, r in runners.items() for v in r.variants]
        for label, v in jobs:
            samples[label + v], infos[label + v] = [], runners[label].info
        for round_ in range(runs + 1):
            shift = round_ % len(jobs)
            for label, variant in jobs[shift:] + jobs[:shift]:
                time.sleep(0.5)  # the last run's spinning OpenMP / onnxruntime threads go idle
                sample = runners[label].once(variant)
                if round_:  # round 0 warms up
                    samples[label + variant].append(sample)
        for r in runners.values():
            r.close()
        if probe:
            bandwidth = _median([got[1] for got in samples.pop(probe_label)])
            for label, v in jobs:
                if label != probe_label:
                    infos[label + v] = {**infos[label + v], "bandwidth_GBps": bandwidth}
    return {label: {"ttft_s": _median([s[0] for s in got]), "tok_per_s": _median([s[1] for s in got]),
                    "cores": sum(s[2] for s in got) / sum(s[3] for s in got), **infos[label]}
            for label, got in samples.items()}


def bench_infer(args: argparse.Namespace) -> None:
    threads = os.cpu_count() or 1
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    h, layers = INFER_SHAPE["hidden_size"], args.layers
    models = [("tiny-phi3", REPO / "data" / "tiny-phi3"),
              (f"phi3-shaped-{h}h-{layers}l", build_phi3_shaped(cache / f"infer-phi3-{h}h-{layers}l",
                                                                 layers, INFER_SHAPE))]
    if args.phi3_mini_layers:
        n = args.phi3_mini_layers
        models.append((f"phi3-mini-shaped-{n}l",
                       build_phi3_mini_shaped(cache / f"phi3-mini-shaped-{n}l", n)))

    bw = in_child(read_bandwidth, args.bandwidth_gib, 5, threads)
    print(f"== infer: decode on {threads} CPU threads; prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new, greedy, median of {args.runs} after 1 warm-up")
    print("read bandwidth (numpy, best of 5 over a {:g} GiB float32 array): {}; the limits use "
          "the {}-thread sum read again in every round of runs (median)".format(
              args.bandwidth_gib, ", ".join(f"{k} {v:.1f}" for k, v in bw.items()), threads))
    from phitune import hugepages
    env = hugepages.system_environ()
    print("phitune int4 runs as `phitune infer` does: " + (
        f"GLIBC_TUNABLES={env['GLIBC_TUNABLES']} (huge pages, like numpy's array above); "
        if env else f"no re-exec (THP mode {hugepages.thp_mode()}, tunable already set or none); ")
        + "PyTorch runs as plain Python does")

    for name, float_dir in models:
        ids = prompt_ids(float_dir / "tokenizer.json", args.prompt_tokens)
        lora = random_lora(float_dir, cache / f"infer-{name}-lora-r{args.lora_r}", args.lora_r)
        spec = "tiny-phi3" if name == "tiny-phi3" else str(float_dir)
        n = args.new_tokens
        configs = {"PyTorch fp32 generate": (torch_generator, str(float_dir), ids, n, threads)}
        exports = {}
        for block in (32, 128):  # 32: auto-opt's default for a float input; 128: AWQ's layout
            suffix = "" if block == 32 else f"-b{block}"
            onnx_dir = cache / f"infer-{name}-int4{suffix}"
            built = phitune_json("auto-opt", "-m", spec, "--block_size", str(block), "-o", str(onnx_dir))
            model_dir = onnx_dir / "model"
            adapter = model_dir / "bench.onnx_adapter"
            phitune_json("export-adapter", "-a", str(lora), "--base", str(onnx_dir), "-o", str(adapter),
                         "--force")
            exports[block] = (model_dir, adapter, built)
            m, a = str(model_dir), str(adapter)
            configs[f"phitune int4 b{block}"] = (og_generator, m, ids, n, a)
        model_dir, adapter, built = exports[32]
        float_bytes = sum(f.stat().st_size for f in float_dir.glob("*.safetensors"))
        dtype = json.loads((float_dir / "config.json").read_text()).get("dtype", "float32")
        needed = float_bytes * (2 if "16" in str(dtype) else 1) \
            + (len(configs) - 1) * 1.5 * (model_dir / "model.onnx.data").stat().st_size
        from phitune.measure import available_memory_mb
        together = needed < 0.6 * available_memory_mb() * 2**20
        machine = cpu_jiffies()
        rows = measure(configs, args.runs, together, (bandwidth_probe, args.bandwidth_gib, threads))
        others = other_cpu(machine)
        pt = rows["PyTorch fp32 generate"]
        export = "" if built.get("up_to_date") else f" (int4 export {built['wall_s']:.0f} s)"
        order = "interleaved round by round" if together else "one model at a time (memory)"
        print(f"\n-- {name}: {pt['params'] / 1e6:.1f}M params, random weights{export}; runs {order}")
        read = {"PyTorch fp32 generate": pt["bytes_per_token"]}  # bytes per token of each row
        for block, (model_dir, adapter, _) in exports.items():
            per_token = int4_bytes_per_token(model_dir)
            weights, extra = per_token["weights"], adapter_bytes(adapter)
            kv = per_token["kv_per_position"] * (args.prompt_tokens + args.new_tokens / 2)
            read[f"phitune int4 b{block}"] = weights
            read[f"phitune int4 b{block} + adapter active"] = weights + extra
            print(f"bytes read per token, block {block}: int4 graph {weights / 2**20:.1f} MiB = "
                  f"model.onnx.data {per_token['data_file'] / 2**20:.1f} MiB minus "
                  f"{per_token['indexed_tables'] / 2**20:.1f} MiB of tables read one row each "
                  f"({', '.join(per_token['indexed_names'])}); adapter r={args.lora_r} "
                  f"+{extra / 2**20:.1f} MiB; not counted: KV cache ~{kv / 2**20:.1f} MiB at the mean context")
        print(f"PyTorch fp32 reads {pt['bytes_per_token'] / 2**20:.1f} MiB per token")
        limits = {label: r["bandwidth_GBps"] * 1e9 / read[label] for label, r in rows.items()}
        print(f"{'':46} {'TTFT ms':>8} {'decode tok/s':>13} {'× PyTorch':>10} {'read GB/s':>10} "
              f"{'limit tok/s':>12} {'% of limit':>11} {'cores busy':>11}")
        for label, r in rows.items():
            lim = limits[label]
            print(f"{label:46} {r['ttft_s'] * 1e3:8.1f} {r['tok_per_s']:13.1f} "
                  f"{r['tok_per_s'] / pt['tok_per_s']:9.2f}× {r['bandwidth_GBps']:10.1f} {lim:12.0f} "
                  f"{r['tok_per_s'] / lim:10.0%} {r['cores']:11.2f}")
        for block in exports:
            label = f"phitune int4 b{block}"
            base, with_adapter = rows[label], rows[f"{label} + adapter active"]
            print(f"{'goals, block ' + str(block) + ':':46} {base['tok_per_s'] / pt['tok_per_s']:.1f}× "
                  f"PyTorch (≥ 8)   {base['tok_per_s'] / limits[label]:.0%} of the bandwidth limit "
                  f"(≥ 80%)   adapter overhead {base['tok_per_s'] / with_adapter['tok_per_s'] - 1:+.1%} "
                  f"decode time per token, {with_adapter['ttft_s'] / base['ttft_s'] - 1:+.1%} TTFT (≤ 10%)")
        warn = " — FIGURES DISTORTED, rerun on a quiet machine" if others["other"] > 0.1 else ""
        print(f"noise: other processes kept {others['other']:.2f} of {threads} cores busy during these "
              f"measurements (VM steal {others['steal']:.2f}){warn}; cores busy = CPU time / wall "
              "time of the timed runs")
        if name == "tiny-phi3":
            print("note: tiny-phi3's int4 weights fit in the CPU caches: "
                  "it is bound by per-op overhead, not memory bandwidth, so its % of limit says little")
    print(f"\nmodels under {cache}")


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
        ids = session.encode(session.chat_prompt(messages))
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


SERVE_QUESTIONS = ["Plan a day in Lisbon.", "What should I pack for Iceland in March?",
                   "Where can I eat well in Chicago?", "How do I get from Rome to Florence?"]


def _serve_rss_mb(pid: int) -> float:
    from phitune.measure import _proc_kib
    return (_proc_kib(f"/proc/{pid}/status", "VmRSS") or 0) / 1024


def serve_request(port: int, body: dict | bytes, disconnect_after: int = 0,
                  timeout: float = 300) -> dict:
    """One request over a raw loopback connection: status, TTFT, latency, completion tokens.
    Streams are read event by event; with `disconnect_after` the socket is closed after that
    many events (a client that goes away mid-answer)."""
    import http.client
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    start = time.perf_counter()
    try:
        path = "/v1/chat/completions" if isinstance(body, bytes) or "messages" in body \
            else "/v1/completions"
        conn.request("POST", path, data, {"Content-Type": "application/json"})
        response = conn.getresponse()
        out = {"status": response.status, "ttft_s": None, "tokens": 0, "events": 0}
        if response.status != 200 or "text/event-stream" not in response.getheader("content-type", ""):
            payload = json.loads(response.read() or b"{}")
            out["tokens"] = payload.get("usage", {}).get("completion_tokens", 0)
            out["ttft_s"] = time.perf_counter() - start if response.status == 200 else None
        else:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("choices") and event["choices"][0].get("delta", {}).get("content"):
                    out["ttft_s"] = out["ttft_s"] or time.perf_counter() - start
                if event.get("usage"):
                    out["tokens"] = event["usage"]["completion_tokens"]
                out["events"] += 1
                if disconnect_after and out["events"] >= disconnect_after:
                    break
        out["latency_s"] = time.perf_counter() - start
        return out
    except OSError as exc:
        return {"status": None, "error": str(exc), "latency_s": time.perf_counter() - start}
    finally:
        conn.close()


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def serve_load(port: int, models: list[str], clients: int, requests: int, new_tokens: int,
               deadline: float) -> dict:
    """`requests` streamed chat requests from `clients` threads, rotating over `models`."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> dict:
        if time.monotonic() > deadline:
            return {"status": "skipped"}
        return serve_request(port, {
            "model": models[i % len(models)], "temperature": 0, "max_tokens": new_tokens,
            "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": SERVE_QUESTIONS[i % len(SERVE_QUESTIONS)]}]})
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    done = [r for r in results if r["status"] == 200]
    tokens = sum(r["tokens"] for r in done)
    return {"clients": clients, "requests": len(done), "failed": len(results) - len(done),
            "wall_s": wall, "tok_per_s": tokens / wall, "req_per_s": len(done) / wall,
            "ttft_p50": _pct([r["ttft_s"] for r in done if r["ttft_s"]], 0.5),
            "ttft_p95": _pct([r["ttft_s"] for r in done if r["ttft_s"]], 0.95),
            "lat_p50": _pct([r["latency_s"] for r in done], 0.5),
            "lat_p95": _pct([r["latency_s"] for r in done], 0.95),
            "tokens_per_request": tokens / max(1, len(done))}


SERVE_BAD = [b"{not json", {"messages": []}, {"model": "base", "messages": "hi"},
             {"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
             {"model": "base", "messages": [{"role": "user", "content": "x"}], "frobnicate": 1},
             {"model": "no-such-adapter", "messages": [{"role": "user", "content": "x"}]},
             {"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}]


def serve_soak(port: int, models: list[str], total: int, clients: int, new_tokens: int,
               deadline: float) -> dict:
    """`total` requests: 10% bad payloads (must be 4xx), 10% streams dropped after the first
    event, the rest ordinary (half streamed); counts every status."""
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> str:
        if time.monotonic() > deadline:
            return "skipped"
        message = [{"role": "user", "content": SERVE_QUESTIONS[i % len(SERVE_QUESTIONS)]}]
        good = {"model": models[i % len(models)], "messages": message, "max_tokens": new_tokens,
                "temperature": 0}
        if i % 10 == 3:
            r = serve_request(port, SERVE_BAD[i // 10 % len(SERVE_BAD)])
            return "bad→4xx" if r["status"] and 400 <= r["status"] < 500 else f"bad→{r['status']}"
        if i % 10 == 7:
            r = serve_request(port, {**good, "max_tokens": 10 * new_tokens, "stream": True},
                              disconnect_after=1)
            return "disconnected" if r["status"] == 200 else f"disconnect→{r['status']}"
        r = serve_request(port, {**good, "stream": i % 2 == 0})
        return "ok" if r["status"] == 200 else f"ok→{r['status']}"
    with ThreadPoolExecutor(clients) as pool:
        return dict(Counter(pool.map(one, range(total))))


def bench_serve(args: argparse.Namespace) -> None:
    """phitune serve on loopback: throughput and latency at 1, 2, 4, 8 concurrent clients over
    a mix of the base and two adapters, og's own batching (og.Engine, base only) for
    reference, and a soak with disconnects and bad payloads."""
    import signal
    import socket
    cache = Path(args.cache)
    n = args.phi3_mini_layers
    float_dir = build_phi3_mini_shaped(cache / f"phi3-mini-shaped-{n}l", n)
    onnx_dir = cache / f"infer-phi3-mini-shaped-{n}l-int4-b128"
    phitune_json("auto-opt", "-m", str(float_dir), "--block_size", "128", "-o", str(onnx_dir))
    adapters = []
    for name, rank in (("alpha", 16), ("beta", 8)):  # different ranks: different random weights
        lora = random_lora(float_dir, cache / f"serve-phi3-mini-shaped-{n}l-lora-r{rank}", rank)
        file = onnx_dir / "model" / f"serve-{name}.onnx_adapter"
        if not file.is_file():
            phitune_json("export-adapter", "-a", str(lora), "--base", str(onnx_dir), "-o", str(file))
        adapters += ["--adapter", f"{file}={name}"]
    models = ["base", "alpha", "beta"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = cache / "serve-bench.log"
    proc = subprocess.Popen([sys.executable, "-m", "phitune", "serve", "-m", str(onnx_dir),
                             "--model_name", "base", *adapters, "--port", str(port),
                             "--parallel", "8", "--max_queue", "64"],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    deadline = time.monotonic() + args.max_minutes * 60
    try:
        while serve_request(port, {"model": "base", "prompt": "hi", "max_tokens": 1}).get("status") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"phitune serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        serve_load(port, models, 3, 3, 8, deadline)  # warm-up: every adapter once
        rss_start = _serve_rss_mb(proc.pid)
        print(f"== serve: Phi-3-mini-shaped {n} layers, int4 block 128, random weights; adapters "
              f"r16 + r8 on every projection; requests rotate base/alpha/beta; greedy, "
              f"{args.new_tokens} new tokens, streamed; server RSS {rss_start:.0f} MB after warm-up")
        print(f"{'clients':>7} {'requests':>8} {'tok/s':>7} {'× 1 client':>10} {'req/s':>6} "
              f"{'TTFT p50':>9} {'p95':>6} {'latency p50':>12} {'p95':>6}")
        rows = []
        for clients in args.clients:
            row = serve_load(port, models, clients, args.requests_per_client * clients,
                             args.new_tokens, deadline)
            rows.append(row)
            print(f"{clients:7} {row['requests']:8} {row['tok_per_s']:7.1f} "
                  f"{row['tok_per_s'] / rows[0]['tok_per_s']:9.2f}× {row['req_per_s']:6.2f} "
                  f"{row['ttft_p50']:8.2f}s {row['ttft_p95']:5.2f}s {row['lat_p50']:11.2f}s "
                  f"{row['lat_p95']:5.2f}s" + (f"  ({row['failed']} failed)" if row["failed"] else ""))
        rss_load = _serve_rss_mb(proc.pid)
        print(f"server RSS {rss_start:.0f} → {rss_load:.0f} MB over the load runs")
        four = next((r for r in rows if r["clients"] == 4), None)
        if four:
            print(f"goal: 4 clients ≥ 1.5× one client's tok/s → {four['tok_per_s'] / rows[0]['tok_per_s']:.2f}×")

        if args.soak:
            rss_soak = _serve_rss_mb(proc.pid)
            start = time.perf_counter()
            counts = serve_soak(port, models, args.soak, 4, args.soak_tokens, deadline)
            rss_end = _serve_rss_mb(proc.pid)
            errors = sum(v for k, v in counts.items() if k not in ("ok", "bad→4xx", "disconnected"))
            alive = proc.poll() is None
            print(f"soak: {args.soak} requests, 4 clients, {args.soak_tokens} new tokens, "
                  f"{time.perf_counter() - start:.0f} s: {counts}; server errors/other {errors}; "
                  f"alive {alive}; RSS at the soak's start {rss_soak:.0f} → {rss_end:.0f} MB "
                  f"({rss_end / rss_soak - 1:+.1%}, goal within ±10%; after warm-up "
                  f"{rss_start:.0f} MB)")
            tracebacks = log.read_text().count("Traceback")
            print(f"server log: {tracebacks} tracebacks; lines: "
                  f"{sum(1 for _ in open(log))} ({log})")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "killed"
        print(f"SIGTERM → server exit code {code}")
    if args.engine:
        ref = in_child(engine_batching, str(onnx_dir / "model"), args.new_tokens, [1, 2, 4])
        print("og.Engine (onnxruntime-genai's batching: base model only, no per-request adapter "
              "in its 0.18 API):")
        for batch, tok_s in ref.items():
            print(f"  batch {batch}: {tok_s:.1f} tok/s ({tok_s / ref[1]:.2f}× batch 1)")


@as_phitune_infer
def engine_batching(model_dir: str, new_tokens: int, batches: list[int]) -> dict:
    """Decode tok/s of og.Engine serving `batch` greedy requests at once (base model), the same
    questions and chat template as the serve runs."""
    import numpy as np
    import onnxruntime_genai as og
    from phitune.infer.session import _config
    model = og.Model(_config(og, Path(model_dir)))
    tokenizer = og.Tokenizer(model)
    out = {}
    for batch in batches:
        engine = og.Engine(model)
        buffer = engine.create_event_buffer(64)
        requests = []
        start = time.perf_counter()
        for i in range(batch):
            messages = [{"role": "user", "content": SERVE_QUESTIONS[i % len(SERVE_QUESTIONS)]}]
            ids = tokenizer.encode(tokenizer.apply_chat_template(json.dumps(messages),
                                                                 add_generation_prompt=True))
            request = engine.create_request()
            turn = og.TurnOptions(request)
            turn.set_max_generated_tokens(new_tokens)
            turn.set_min_generated_tokens(new_tokens)
            turn.set_do_sample(False)
            request.begin_turn(np.asarray(ids, dtype=np.int32), turn)
            requests.append(request)
        tokens = 0
        while engine.has_pending_requests():
            tokens += sum(1 for _ in engine.run(buffer))
        out[batch] = tokens / (time.perf_counter() - start)
        for request in requests:
            request.close()
        del engine
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    q = sub.add_parser("quantize", help="AWQ vs RTN quality, time and memory")
    q.add_argument("--model", default="tiny-phi3",
                   help="model to compare AWQ and RTN on (a dir or an embedded name)")
    q.add_argument("--calib_samples", type=int, default=64)
    q.add_argument("--calib_seq_len", type=int, default=256)
    q.add_argument("--group_size", type=int, default=None, help="default: phitune's choice")
    q.add_argument("--eval_data", default=None, help="held-out text (default: phitune's)")
    q.add_argument("--phi3-mini-layers", type=int, default=0,
                   help="also time a Phi-3-mini-shaped model with this many layers (32 = full size)")
    q.add_argument("--big_calib_samples", type=int, default=64)
    q.add_argument("--device", default="auto")
    q.add_argument("--big_dtype", default="auto", help="calibration dtype for the big model")
    q.add_argument("--llmcompressor", action=argparse.BooleanOptionalAction, default=True,
                   help="also llm-compressor's AWQ on the same tokens, where its env exists "
                        "(bash scripts/llmcompressor_env.sh)")
    p = sub.add_parser("_plain_forward")
    p.add_argument("--model")
    p.add_argument("--calib_samples", type=int)
    p.add_argument("--calib_seq_len", type=int)
    p.add_argument("--dump", default=None, help="write the calibration blocks and held-out ids here")
    p.add_argument("--eval_data", default=None)
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
    i = sub.add_parser("infer", help="decode tok/s and TTFT: int4 vs PyTorch fp32 generate and vs "
                                     "the memory-bandwidth limit, with and without an adapter")
    i.add_argument("--layers", type=int, default=12,
                   help="layers of the Phi-3-shaped bench model (hidden 1024, random weights)")
    i.add_argument("--phi3-mini-layers", type=int, default=4,
                   help="also a Phi-3-mini-shaped model with this many layers (real matrix sizes, "
                        "the representative case; 32 = full size, 0 = skip)")
    i.add_argument("--prompt_tokens", type=int, default=128)
    i.add_argument("--new_tokens", type=int, default=128)
    i.add_argument("--runs", type=int, default=3, help="timed runs (median) after one warm-up")
    i.add_argument("--lora_r", type=int, default=16)
    i.add_argument("--bandwidth_gib", type=float, default=1.0)
    i.add_argument("--cache", default=str(REPO / "models" / "bench"))
    c = sub.add_parser("chat", help="TTFT per chat turn: the kept KV cache vs a fresh prefill "
                                    "of the whole history each turn")
    c.add_argument("--phi3-mini-layers", type=int, default=4,
                   help="layers of the Phi-3-mini-shaped model (32 = full size)")
    c.add_argument("--turns", type=int, default=8)
    c.add_argument("--new_tokens", type=int, default=64)
    c.add_argument("--cache", default=str(REPO / "models" / "bench"))
    s = sub.add_parser("serve", help="phitune serve on loopback: tok/s, req/s, TTFT and latency at "
                                     "1-8 clients mixing two adapters and the base; a soak")
    s.add_argument("--phi3-mini-layers", type=int, default=4,
                   help="layers of the Phi-3-mini-shaped model (32 = full size)")
    s.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    s.add_argument("--requests_per_client", type=int, default=3)
    s.add_argument("--new_tokens", type=int, default=64)
    s.add_argument("--soak", type=int, default=1000, help="soak requests (0 = skip)")
    s.add_argument("--soak_tokens", type=int, default=4)
    s.add_argument("--engine", action=argparse.BooleanOptionalAction, default=True,
                   help="also og.Engine's batching of base-model requests, for reference")
    s.add_argument("--max_minutes", type=float, default=30, help="stop sending requests after this")
    s.add_argument("--cache", default=str(REPO / "models" / "bench"))
    b = sub.add_parser("_baseline_finetune")
    for name in ("--model", "--data_files", "--target_modules"):
        b.add_argument(name)
    for name in ("--steps", "--lora_r", "--batch_size", "--max_seq_len"):
        b.add_argument(name, type=int)
    args = parser.parse_args()
    {"quantize": bench_quantize, "_plain_forward": plain_forward, "finetune": bench_finetune, "auto-opt": bench_auto_opt,
     "infer": bench_infer, "chat": bench_chat, "serve": bench_serve,
     "_baseline_finetune": baseline_finetune}[args.step](args)


if __name__ == "__main__":
    main()
