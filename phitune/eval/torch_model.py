"""`phitune eval` in PyTorch: a float or AWQ base (dequantized: the function the int4 model
computes), with a PEFT adapter when one applies."""

from __future__ import annotations

from pathlib import Path

from phitune import policy, sequence_start, ui
from phitune.artifacts.kinds import check_files_regular, hf_kind
from phitune.errors import InputError, first_line
from phitune.eval import inputs
from phitune.eval.inputs import DECODE_TOKENS, PREFILL_TOKENS
from phitune.eval.options import EvalOptions


class TorchModel:
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
            if path.is_dir():
                check_files_regular(path)
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
        examples = inputs.examples(held, spec, self.tokenizer, opts, self.start)
        rows = data.pack(examples, opts.max_seq_len, data.pad_id_of(self.tokenizer))
        mask_dtype = next(p for p in self.model.parameters()).dtype
        loss = eval_loss(self.model, rows, lambda r: data.collate_packed(r, dtype=mask_dtype),
                         TrainConfig(), self.device)
        return loss, inputs.scored(examples), len(examples)

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
