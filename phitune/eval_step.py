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
base + PEFT adapter) run in PyTorch; onnx-genai dirs through onnxruntime on their graph (loss)
and onnxruntime-genai's generator (latency). Nothing is written. `run` returns the figures and
raises `ConstraintError` (exit 3), carrying them, when `max_ppl` / `max_latency_ms` is missed.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from phitune import genai_config, ui
from phitune import options as O
from phitune import policy, sequence_start
from phitune.artifacts import hf_kind, heldout_text, resolve_model
from phitune.data.records import split_files
from phitune.errors import ConstraintError, DataError, InputError, OptionError, first_line
from phitune.eval_options import EvalOptions

KINDS = ("hf-model", "awq-model", "finetuned", "onnx-genai")
PREFILL_TOKENS = 128
DECODE_TOKENS = 16
_RECORD_OPTIONS = ("text_template", "text_cols", "use_chat_template", "train_on_prompt",
                   "eval_split", "eval_dataset_size")


def run(opts: EvalOptions) -> dict:
    """Measure; returns the figures. Raises ConstraintError (its `.metrics` holds the same
    figures) when a `max_ppl` / `max_latency_ms` bound is missed."""
    files = _files(opts.data_files)
    records_mode = _check(opts, files)
    O.validate(opts)  # declared ranges and choices, before any model loads
    watch = time.perf_counter()
    if records_mode:
        source, held, spec, split = _records(opts, files)
    else:
        source, texts = _texts(opts)
    model_ref = resolve_model(opts.model, accept=KINDS, step="eval")
    metrics: dict = {"model": opts.model, "kind": model_ref.kind}
    if model_ref.kind == "onnx-genai":
        measure = _OnnxModel(model_ref, opts)
    else:
        measure = _TorchModel(model_ref, opts)
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
        ui.info(f"timing a {PREFILL_TOKENS}-token prefill and {DECODE_TOKENS} decode steps")
        metrics.update(measure.latency())
    metrics.update(measure.describe())
    metrics["seconds"] = round(time.perf_counter() - watch, 2)
    check_constraints(opts, metrics)
    return metrics


# ---------------------------------------------------------------- options and data

_files = split_files


def _check(opts: EvalOptions, files: tuple[str, ...]) -> bool:
    """Options alone and together, before any file or model is read; True for records."""
    records_mode = bool(files or opts.data_name)
    if records_mode and opts.text_file:
        raise OptionError("--text_file and --data_files/--data_name are both given",
                          "phitune eval", "pass one: plain text for perplexity, or records "
                          "for the response loss finetune reports")
    if not records_mode:
        given = [name for name in _RECORD_OPTIONS if getattr(opts, name) not in (None, False)]
        if given:
            raise OptionError(f"--{given[0]} applies to records, and no --data_files or "
                              "--data_name is given", f"--{given[0]}",
                              "pass the records with --data_files FILE --data_name json, or drop "
                              f"--{given[0]}")
    if opts.adapter and opts.no_adapter:
        raise OptionError("--adapter and --no-adapter contradict each other", "phitune eval",
                          "pass one of them")
    if opts.seq_len < 2 or opts.max_tokens < 2:
        raise OptionError("--seq_len and --max_tokens must be at least 2", "phitune eval",
                          "e.g. --seq_len 256 (what quantize measures with)")
    for name in ("max_ppl", "max_latency_ms"):
        value = getattr(opts, name)
        if value is not None and not value > 0:
            raise OptionError(f"--{name} must be positive (got {value})", f"--{name}",
                              "pass the largest acceptable figure")
    if opts.max_latency_ms is not None and not opts.latency:
        raise OptionError("--max_latency_ms needs the latency measurement that --no-latency skips",
                          "--max_latency_ms / --no-latency", "drop one of them")
    if opts.dtype not in O.DTYPES:
        raise OptionError(f"unknown --dtype {opts.dtype}", "--dtype",
                          "use auto, float32, bfloat16 or float16")
    return records_mode


def _records(opts: EvalOptions, files: tuple[str, ...]):
    """The records to score: all of them, or the ones finetune holds out for the same split
    options and seed (`data.split_records`)."""
    from phitune import data
    spec = data.make_spec(opts.text_template, opts.text_cols, opts.use_chat_template)
    data.validate_options(opts.max_seq_len, opts.overflow, opts.eval_split, opts.eval_dataset_size)
    records = data.load_and_validate(list(files), opts.data_name, spec,
                                     train_on_prompt=opts.train_on_prompt)
    source = ", ".join(files) if files else str(opts.data_name)
    if opts.eval_split is None and opts.eval_dataset_size is None:
        return source, records, spec, f"all {len(records)}"
    _, held = data.split_records(records, opts.eval_split, opts.eval_dataset_size, opts.seed)
    how = (f"--eval_split {opts.eval_split:g}" if opts.eval_split is not None
           else f"--eval_dataset_size {opts.eval_dataset_size}")
    return source, held, spec, f"{len(held)} of {len(records)} held out ({how}, --seed {opts.seed})"


def _texts(opts: EvalOptions) -> tuple[str, list[str]]:
    from phitune.quantize.calib import read_texts
    path = Path(opts.text_file).expanduser() if opts.text_file else heldout_text()
    if not path.is_file():
        raise DataError(f"text file not found: {path}", "--text_file",
                        "pass an existing .txt file (one document) or .jsonl with a 'text' field")
    try:
        return str(path), read_texts(path)
    except DataError as exc:
        raise DataError(exc.what.replace("calibration file", "text file"),
                        exc.where if ":" in (exc.where or "") else "--text_file", exc.fix) from None


def _examples(held, spec, tokenizer, opts: EvalOptions, start) -> list[dict]:
    from phitune import data
    try:
        examples, _ = data.tokenize_examples(held, tokenizer, spec, opts.max_seq_len,
                                             opts.overflow, opts.train_on_prompt, start=start)
    except DataError as exc:
        raise DataError(f"no record has a response token to score ({exc.what.split('(', 1)[-1]}",
                        "--max_seq_len", "raise --max_seq_len, pass --overflow truncate, or check "
                        "that the response column is not empty") from None
    return examples


def _scored(examples: list[dict]) -> int:
    from phitune.data import IGNORE_INDEX
    return sum(sum(1 for x in e["labels"][1:] if x != IGNORE_INDEX) for e in examples)


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


# ---------------------------------------------------------------- the two runtimes

class _TorchModel:
    """A float or AWQ (dequantized) base, with a PEFT adapter when one applies."""

    def __init__(self, model_ref, opts: EvalOptions):
        from phitune.models import load_causal_lm, load_tokenizer, resolve_device
        self.adapter = self._adapter_dir(model_ref, opts)
        self.device = resolve_device(opts.device)
        self.dtype = policy.eval_dtype(opts.dtype, model_ref.path, self.device,
                                       model_ref.manifest)
        self.base_kind = hf_kind(model_ref.config)
        ui.info(f"loading {opts.model} ({model_ref.kind}"
                + (f", {self.base_kind} base" if model_ref.kind == "finetuned" else "")
                + (f", adapter {self.adapter}" if self.adapter else "") + ")")
        self.tokenizer = load_tokenizer(model_ref.path)
        self.start = sequence_start.of_tokenizer(self.tokenizer)
        if self.base_kind == "awq-model":
            from phitune.formats.awq_gemm import load_awq_dequantized
            model = load_awq_dequantized(model_ref.path, self.dtype).to(self.device).eval()
        else:
            model = load_causal_lm(model_ref.path, dtype=self.dtype, device=self.device)
        if self.adapter:
            model = self._with_adapter(model, self.adapter)
        self.model = model
        self.vocab_size = int(model_ref.config.get("vocab_size") or len(self.tokenizer))

    @staticmethod
    def _adapter_dir(model_ref, opts: EvalOptions) -> Path | None:
        if opts.no_adapter:
            return None
        if opts.adapter:
            path = Path(opts.adapter).expanduser()
            if path.is_file():
                raise InputError(f"{opts.adapter} is a file; a {model_ref.kind} takes a PEFT "
                                 "adapter directory", "--adapter",
                                 "pass the adapter/ dir of a finetune output (.onnx_adapter "
                                 "files are for onnx-genai models)")
            if not (path / "adapter_config.json").is_file():
                raise InputError(f"no PEFT adapter in {opts.adapter} (no adapter_config.json)",
                                 "--adapter", "pass the adapter/ dir written by phitune finetune")
            return path
        if model_ref.adapter is not None:
            path = model_ref.adapter
            if not (path / "adapter_config.json").is_file():
                raise InputError(f"the finetune output has no adapter ({path})", "-m",
                                 "re-run phitune finetune, or pass --no-adapter for the base")
            return path
        return None

    @staticmethod
    def _with_adapter(model, adapter: Path):
        from peft import PeftModel

        from phitune.models import check_weight_files, quiet_gptqmodel
        check_weight_files(adapter)  # a truncated adapter file: one line, not safetensors' error
        quiet_gptqmodel()  # peft imports it when installed: no banner, no environment edits
        try:
            return PeftModel.from_pretrained(model, str(adapter)).eval()
        except (RuntimeError, ValueError, KeyError) as exc:
            reason = first_line(exc)
            raise InputError(f"the adapter does not fit this model ({reason})", str(adapter),
                             "pass an adapter trained on this base") from None

    def records_loss(self, held, spec, opts: EvalOptions) -> tuple[float, int, int]:
        """finetune's own eval loss: the examples packed into rows of max_seq_len with a
        block-causal mask, token-weighted mean of the model's loss over batches of 8."""
        from phitune import data
        from phitune.finetune.loop import TrainConfig, eval_loss
        examples = _examples(held, spec, self.tokenizer, opts, self.start)
        rows = data.pack(examples, opts.max_seq_len, data.pad_id_of(self.tokenizer))
        mask_dtype = next(p for p in self.model.parameters()).dtype
        loss = eval_loss(self.model, rows, lambda r: data.collate_packed(r, dtype=mask_dtype),
                         TrainConfig(), self.device)
        return loss, _scored(examples), len(examples)

    def text_ppl(self, texts: list[str], opts: EvalOptions) -> tuple[float, int]:
        from phitune.evaluate import perplexity, scored_tokens, token_ids
        ppl = perplexity(self.model, self.tokenizer, texts, opts.seq_len, opts.max_tokens,
                         self.device, start=self.start)
        n = scored_tokens(token_ids(self.tokenizer, texts, opts.max_tokens), opts.seq_len,
                          self.start)
        return ppl, n

    def latency(self) -> dict:
        from phitune.evaluate import torch_latency
        return torch_latency(self.model, self.vocab_size, PREFILL_TOKENS, DECODE_TOKENS,
                             device=self.device, start=self.start)

    def describe(self) -> dict:
        return {"runtime": "torch", "device": self.device,
                "dtype": str(self.dtype).replace("torch.", ""),
                "sequence_start": self.start.describe()}


class _OnnxModel:
    """An onnxruntime-genai dir, with its own adapter_weights.onnx_adapter or another one."""

    def __init__(self, model_ref, opts: EvalOptions):
        from phitune.infer.adapters import check_fits
        from phitune.models import load_tokenizer
        self.dir = Path(model_ref.path)
        self.context = genai_config.context_length(self.dir)
        self.adapter = self._adapter_file(opts)
        if self.adapter is not None:
            check_fits(self.dir, self.adapter)
        ui.info(f"loading {opts.model} (onnx-genai"
                + (f", adapter {self.adapter}" if self.adapter else "") + ")")
        self.tokenizer = load_tokenizer(self.dir)
        self.start = sequence_start.of_model_dir(self.dir, self.tokenizer)

    def _adapter_file(self, opts: EvalOptions) -> Path | None:
        if opts.no_adapter:
            return None
        if opts.adapter:
            path = Path(opts.adapter).expanduser()
            if path.is_dir():
                raise InputError(f"{opts.adapter} is a directory; an onnx-genai model takes an "
                                 ".onnx_adapter file", "--adapter",
                                 "convert a PEFT adapter with phitune export-adapter, or pass "
                                 f"D/model/{genai_config.ADAPTER_FILE}")
            if not path.is_file():
                raise InputError(f"no such adapter file: {opts.adapter}", "--adapter",
                                 "pass an .onnx_adapter file")
            return path
        own = self.dir / genai_config.ADAPTER_FILE
        return own if own.is_file() else None

    def _fits(self, tokens: int, option: str) -> None:
        if tokens > self.context:
            raise OptionError(f"{option} {tokens} is longer than the model's context "
                              f"({self.context} tokens)", option,
                              f"pass {option} {self.context} or less")

    def records_loss(self, held, spec, opts: EvalOptions) -> tuple[float, int, int]:
        """The same loss, one example per pass through onnxruntime (no packing: the graph's
        attention takes a 2D mask). Equal to finetune's packed figure up to float rounding:
        the block-causal mask and restarting positions make each packed example see exactly
        itself."""
        from phitune.evaluate import OnnxScorer, onnx_labels_nll
        self._fits(opts.max_seq_len, "--max_seq_len")
        examples = _examples(held, spec, self.tokenizer, opts, self.start)
        loss, n = onnx_labels_nll(OnnxScorer(self.dir, self.adapter), examples)
        return loss, n, len(examples)

    def text_ppl(self, texts: list[str], opts: EvalOptions) -> tuple[float, int]:
        from phitune.evaluate import onnx_perplexity, scored_tokens, token_ids
        self._fits(opts.seq_len, "--seq_len")
        ppl = onnx_perplexity(self.dir, self.tokenizer, texts, opts.seq_len, opts.max_tokens,
                              self.adapter, start=self.start)
        n = scored_tokens(token_ids(self.tokenizer, texts, opts.max_tokens), opts.seq_len,
                          self.start)
        return ppl, n

    def latency(self) -> dict:
        from phitune.evaluate import onnx_latency
        prefill = min(PREFILL_TOKENS, self.context - DECODE_TOKENS - 2)
        return onnx_latency(self.dir, self.adapter, prefill, DECODE_TOKENS, start=self.start)

    def describe(self) -> dict:
        return {"runtime": "onnxruntime-genai", "device": "cpu",
                "sequence_start": self.start.describe()}
