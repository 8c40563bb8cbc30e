"""`phitune eval` as a library call: held-out loss / perplexity and latency of any artifact.

Every step's output can be measured on the same data, so steps compare:

- plain text (`text_file`, default the shipped `data/heldout.txt`): perplexity over the same
  non-overlapping windows as `phitune.evaluate.perplexity` — the figure `quantize` reports as
  ppl_before / ppl_after;
- records (`data_files` / `data_name` with a text template, text columns or the chat template,
  exactly as `phitune finetune` reads them): the loss over response tokens, on the records
  finetune's `eval_split` / `eval_dataset_size` + `seed` hold out (or on all records) —
  the figure `finetune` reports as eval_loss_after;
- latency: mean ms of a 1-token decode step with a KV cache and of a 128-token prefill.

Torch artifacts (float, AWQ dequantized — the function the int4 model computes —, finetuned
base + PEFT adapter) run in PyTorch (`torch_model.py`); onnx-genai dirs through onnxruntime on
their graph (loss) and onnxruntime-genai's generator (latency) (`onnx_model.py`); what both
score comes from `inputs.py`. Nothing is written. `run` returns the figures and
raises `ConstraintError` (exit 3), carrying them, when `max_ppl` / `max_latency_ms` is missed.
"""

from __future__ import annotations

import math
import time

from phitune import options as O
from phitune import ui
from phitune.artifacts.resolve import resolve_model
from phitune.data.records import split_files
from phitune.errors import ConstraintError
from phitune.eval import inputs
from phitune.eval.onnx_model import OnnxModel
from phitune.eval.options import EvalOptions
from phitune.eval.torch_model import TorchModel

KINDS = ("hf-model", "awq-model", "finetuned", "onnx-genai")


def run(opts: EvalOptions) -> dict:
    """Measure; returns the figures. Raises ConstraintError (its `.metrics` holds the same
    figures) when a `max_ppl` / `max_latency_ms` bound is missed."""
    files = split_files(opts.data_files)
    O.validate(opts)  # declared ranges and choices (for callers in code; the CLI did it)
    records_mode = inputs.check_options(opts, files)
    watch = time.perf_counter()
    if records_mode:
        source, held, spec, split = inputs.records(opts, files)
    else:
        source, texts = inputs.texts(opts)
    model_ref = resolve_model(opts.model, accept=KINDS, step="eval")
    metrics: dict = {"model": opts.model, "kind": model_ref.kind}
    if model_ref.kind == "onnx-genai":
        measure = OnnxModel(model_ref, opts)
    else:
        measure = TorchModel(model_ref, opts)
    metrics["adapter"] = str(measure.adapter) if measure.adapter else None
    metrics["data"] = source
    if records_mode:
        metrics["records"] = split
        loss, n_tokens, n_examples = measure.records_loss(held, spec, opts)
        metrics.update(n_records=len(held), n_examples=n_examples, n_tokens=n_tokens,
                       eval_loss=round(loss, 6), ppl=round(math.exp(loss), 4))
    else:
        ppl, n_tokens = measure.text_ppl(texts, opts)
        metrics.update(n_tokens=n_tokens, eval_loss=round(math.log(ppl), 6), ppl=round(ppl, 4))
    if opts.latency:
        ui.info(f"timing a {inputs.PREFILL_TOKENS}-token prefill and {inputs.DECODE_TOKENS} decode "
                "steps")
        metrics.update(measure.latency())
    metrics.update(measure.describe())
    metrics["seconds"] = round(time.perf_counter() - watch, 2)
    check_constraints(opts, metrics)
    return metrics


def check_constraints(opts: EvalOptions, metrics: dict) -> None:
    bounds = [("ppl", "max_ppl", opts.max_ppl), ("latency_ms", "max_latency_ms",
                                                 opts.max_latency_ms)]
    bounds = [b for b in bounds if b[2] is not None]
    if not bounds:
        return
    missed = [f"{figure} {metrics[figure]:g} is above --{name} {bound:g}"
              for figure, name, bound in bounds if metrics[figure] > bound]
    metrics["constraints_met"] = not missed
    if missed:
        raise ConstraintError("constraint missed: " + "; ".join(missed),
                              f"phitune eval -m {opts.model}",
                              "improve the model (or relax the bound) and run again",
                              metrics=metrics)
