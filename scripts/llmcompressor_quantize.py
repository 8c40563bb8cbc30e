"""llm-compressor's AWQ, GPTQ or AWQ then GPTQ on phitune's own calibration tokens: the peers
`scripts/bench.py quantize` compares phitune's algorithms against. Runs in llm-compressor's
separate environment, never phitune's:

    bash scripts/llmcompressor_env.sh            # once: .venv-llmcompressor (or $LLMC_VENV)
    .venv-llmcompressor/bin/python scripts/llmcompressor_quantize.py --algorithm gptq \\
        --model DIR --tokens TOKENS.json --group_size 64 --output OUT_DIR

TOKENS.json is what `scripts/bench.py _plain_forward --dump` writes from phitune's own code:
{"calib": [[ids of block 1], ...], "eval_ids": [...] | null} — the calibration blocks
`phitune quantize` feeds its algorithms (phitune.quantize.calib.token_blocks) and the held-out
ids its --eval scores. The blocks go to llm-compressor's `oneshot` as they are (a DataLoader: no
re-tokenization, no shuffle, no truncation). Every recipe quantizes the same way: int4 weights,
asymmetric (a zero point, as phitune's default), groups of --group_size input channels, targets
Linear, lm_head left in float. The recipes are the ones llm-compressor documents:

- awq: AWQModifier (its defaults: duo scaling, a 20-point scale grid, no clip search) then
  QuantizationModifier (min/max group ranges).
- gptq: GPTQModifier with dampening_frac 0.01 and 128-column blocks (phitune's DAMP and BLOCK)
  and actorder "weight" (alias "static"): columns rounded in decreasing H_ii while every group's
  scale and zero are fixed beforehand from the whole weight, which is phitune's GPTQ (act-order,
  static groups). The other ordering, "group" (alias "dynamic"), forms groups in activation order
  and needs a g_idx at inference; 0.14 rejects it for GPTQ. Its group ranges are min/max
  (llm-compressor's default observer), where phitune's GPTQ searches each group's range.
- awq_gptq: AWQModifier then GPTQModifier as above, one recipe (llm-compressor's stacked
  pattern: AWQ is a smoothing transform that needs a quantizing modifier after it). `oneshot`
  gives each modifier of such a recipe its own calibration pass over the whole model (its
  IndependentPipeline): AWQ smooths every layer first, then GPTQ's Hessians come from the
  smoothed model (phitune's awq_gptq does both a layer at a time, in one pass).

On a CPU-only machine llm-compressor 0.14 crashes in `IntermediatesCache.pin_memory`
("Cannot access accelerator device when none is available"): pinning only speeds host-to-GPU
copies, so this runner makes that method a no-op at run time when no accelerator is present
(site-packages stay untouched).

Quality: the saved compressed-tensors checkpoint is loaded back through transformers'
compressed-tensors loader, decompressed to float (dequantize=True), and scored with
phitune.evaluate.perplexity itself (imported from this repository; it needs only torch) on the
held-out ids, called as `phitune quantize --eval` calls it: the same windows and loss. The float
model is scored the same way in this environment, so the gap is within one transformers version.

Prints one JSON line: algorithm, seconds (oneshot alone), load_s, save_s, total_s, peak_rss_mb
(the process's peak through load, quantization and save; the scoring comes after), ppl_before,
ppl_after, ppl_gap, eval_tokens, eval_protocol, calib_tokens, size_mb, layers, versions.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # phitune's own measures (standard library and torch only)

from phitune.measure import peak_rss_mb  # noqa: E402


def patch_pin_memory() -> bool:
    """No accelerator: make IntermediatesCache.pin_memory a no-op (it raises on CPU-only)."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache
    if torch.accelerator.is_available():
        return False
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    return True


def load(model_dir: str, layers: int | None, **kwargs):
    import torch
    from transformers import AutoModelForCausalLM
    extra = {"num_hidden_layers": layers} if layers else {}
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **extra,
                                                **kwargs).eval()


ALGORITHMS = ("awq", "gptq", "awq_gptq")
DAMPENING = 0.01  # phitune's GPTQ: DAMP, × mean(diag H)
BLOCK = 128       # phitune's GPTQ: columns per lazy update


def recipe(algorithm: str, group_size: int, symmetric: bool) -> list:
    """llm-compressor's documented recipe for `algorithm` (see the module's docstring)."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group",
               "group_size": group_size}
    groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
    if algorithm == "awq":
        return [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    gptq = GPTQModifier(config_groups=groups, ignore=["lm_head"], actorder="weight",
                        dampening_frac=DAMPENING, block_size=BLOCK)
    return [AWQModifier(), gptq] if algorithm == "awq_gptq" else [gptq]


def perplexity(model, ids: list[int], start: list[int]) -> float:
    """phitune's held-out perplexity, called as phitune's quantize step calls it (its windows
    started by the model's own start tokens, from bench.py's dump)."""
    from phitune.evaluate import perplexity as phitune_perplexity
    from phitune.sequence_start import SequenceStart
    return phitune_perplexity(model, None, [], device="cpu", ids=ids,
                              start=SequenceStart(tuple(start)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="awq")
    parser.add_argument("--model", required=True, help="a Hugging Face float checkpoint dir")
    parser.add_argument("--tokens", required=True, help="JSON: calib blocks and eval_ids")
    parser.add_argument("--group_size", type=int, required=True)
    parser.add_argument("--output", required=True, help="where the compressed model is saved")
    parser.add_argument("--symmetric", action="store_true", help="no zero point (default: asymmetric)")
    parser.add_argument("--batch_size", type=int, default=0,
                        help="calibration blocks per forward (default: 8192 tokens' worth, as "
                             "bench.py's plain forward)")
    parser.add_argument("--layers", type=int, default=None,
                        help="keep only the first N decoder layers (to estimate s/layer cheaply; "
                             "no perplexity then)")
    parser.add_argument("--no-eval", dest="eval", action="store_false")
    args = parser.parse_args()

    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import AutoTokenizer

    from llmcompressor import oneshot

    patched = patch_pin_memory()
    tokens = json.loads(Path(args.tokens).read_text())
    calib = torch.tensor(tokens["calib"], dtype=torch.long)
    batch = args.batch_size or max(1, 8192 // calib.shape[1])
    loader = DataLoader(TensorDataset(calib), batch_size=batch, shuffle=False,
                        collate_fn=lambda rows: {"input_ids": torch.stack([r[0] for r in rows]),
                                                 "attention_mask": torch.ones(len(rows), calib.shape[1],
                                                                              dtype=torch.long)})
    out = Path(args.output)

    start = time.perf_counter()
    model = load(args.model, args.layers)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    loaded = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=loader,
            recipe=recipe(args.algorithm, args.group_size, args.symmetric),
            num_calibration_samples=len(calib), max_seq_length=calib.shape[1])
    quantized = time.perf_counter()
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    saved = time.perf_counter()
    result = {"algorithm": args.algorithm, "seconds": round(quantized - loaded, 2),
              "load_s": round(loaded - start, 2), "save_s": round(saved - quantized, 2),
              "total_s": round(saved - start, 2),
              "peak_rss_mb": round(peak_rss_mb(), 1), "calib_tokens": calib.numel(),
              "calib_batch": batch, "group_size": args.group_size, "symmetric": args.symmetric,
              "layers": model.config.num_hidden_layers, "pin_memory_patched": patched,
              "size_mb": round(sum(p.stat().st_size for p in out.glob("*.safetensors")) / 2**20, 1),
              "versions": {name: md.version(name) for name in
                           ("llmcompressor", "compressed-tensors", "transformers", "torch")}}
    del model

    ids = tokens.get("eval_ids")
    if args.eval and ids and not args.layers:
        from transformers import CompressedTensorsConfig
        eval_start = time.perf_counter()
        from phitune.evaluate import scored_tokens
        from phitune.sequence_start import SequenceStart
        start = tokens.get("sequence_start", [])
        before = perplexity(load(args.model, None), ids, start)
        after = perplexity(load(str(out), None, quantization_config=CompressedTensorsConfig(
            dequantize=True)), ids, start)
        result.update(ppl_before=round(before, 4), ppl_after=round(after, 4),
                      ppl_gap=round(after - before, 4),
                      eval_tokens=scored_tokens(ids, 256, SequenceStart(tuple(start))),
                      eval_seconds=round(time.perf_counter() - eval_start, 1),
                      eval_protocol="llm-compressor's saved compressed-tensors checkpoint, "
                                    "decompressed to float by transformers, scored by "
                                    "phitune.evaluate.perplexity on phitune's held-out ids; "
                                    "float model scored the same way in this environment")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
