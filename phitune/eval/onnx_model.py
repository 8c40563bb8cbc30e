"""`phitune eval` on an onnxruntime-genai dir: the loss through onnxruntime on its graph, the
latency through onnxruntime-genai's generator; its own adapter_weights.onnx_adapter or another."""

from __future__ import annotations

from pathlib import Path

from phitune import genai_config, sequence_start, ui
from phitune.errors import InputError, OptionError
from phitune.eval import inputs
from phitune.eval.inputs import DECODE_TOKENS, PREFILL_TOKENS
from phitune.eval.options import EvalOptions


class OnnxModel:
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
        examples = inputs.examples(held, spec, self.tokenizer, opts, self.start)
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
