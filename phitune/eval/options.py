"""`phitune eval`'s options, declared once (see phitune/options.py).

Apart from the step so that `phitune eval --help` reads them without importing what the step
needs to run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from phitune import options as O
from phitune.data.records import RECORD_FIELDS, RecordOptions


@dataclass(kw_only=True)
class EvalOptions(RecordOptions):      # records, read as `phitune finetune` reads them
    ORDER: ClassVar[tuple] = ("model", "adapter", "no_adapter", *RECORD_FIELDS)
    HELP: ClassVar[dict] = {
        "data_files": "Records (json, jsonl, csv, parquet) scored as finetune scores them: loss "
                      "on the response tokens. Repeat or comma-separate for several.",
        "train_on_prompt": "Score the prompt part too (as finetune trained).",
        "max_seq_len": "Tokens per record (pass finetune's value to reproduce its eval loss).",
        "eval_split": "Score only the fraction finetune held out with the same --eval_split and "
                      "--seed.",
        "eval_dataset_size": "Score only the records finetune held out with the same "
                             "--eval_dataset_size and --seed.",
        "seed": "The split's seed."}

    model: str = O.model("Model: a float or AWQ checkpoint, a finetune output (D or D/model), an "
                         "onnx-genai dir (D or D/model), a .gguf file, a hub id, or 'tiny-phi3' "
                         "/ 'smollm2-135m-instruct'.")
    adapter: str | None = O.option(
        None, "Torch model: a PEFT adapter dir; onnx-genai: an .onnx_adapter file. Default: a "
        "finetune output's adapter/, an onnx dir's adapter_weights.onnx_adapter.",
        metavar="PATH", type=str)
    no_adapter: bool = O.option(False, "Measure the base alone.", flag=True,
                                spellings=("--no-adapter", "--no_adapter"))
    # plain text, windowed as `phitune.evaluate.perplexity`
    text_file: str | None = O.option(
        None, "Plain text (.txt, or .jsonl with 'text') for perplexity; the default without "
        "records is the shipped held-out text quantize reports ppl on.", metavar="FILE", type=str)
    seq_len: int = O.option(256, "Perplexity window (tokens).", min=2)
    max_tokens: int = O.option(65536, "Text tokens scored at most.", min=2)
    # latency and constraints
    latency: bool = O.option(True, "Time a 128-token prefill and 1-token decode steps with a KV "
                             "cache.", negatable=True)
    max_ppl: float | None = O.option(None, "Fail (exit 3) when the perplexity is above X.",
                                     metavar="X", type=float, above=0)
    max_latency_ms: float | None = O.option(
        None, "Fail (exit 3) when the decode latency per token is above MS.", metavar="MS",
        type=float, above=0)
    device: str = O.device()
    dtype: str = O.dtype("Torch compute dtype; auto: the dtype finetune trained in when the "
                         "model is a finetune output, else fp32 for small models, bf16 for large.")
