"""`phitune eval`: held-out loss / perplexity and latency of any artifact, on the same data."""

from __future__ import annotations

import click

from phitune.cli.options import dual_option as _opt
from phitune.cli.options import device_option, model_option, record_options, split_options


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
@model_option("Model: a float or AWQ checkpoint, a finetune output (D or D/model), an "
              "onnx-genai dir (D or D/model), a .gguf file, a hub id, or 'tiny-phi3' / "
              "'smollm2-135m-instruct'.")
@click.option("--adapter", metavar="PATH",
              help="Torch model: a PEFT adapter dir; onnx-genai: an .onnx_adapter file. Default: "
                   "a finetune output's adapter/, an onnx dir's adapter_weights.onnx_adapter.")
@click.option("--no-adapter", "--no_adapter", "no_adapter", is_flag=True,
              help="Measure the base alone.")
@record_options("Records (json, jsonl, csv, parquet) scored as finetune scores them: loss on the "
                "response tokens. Repeat or comma-separate for several.",
                "Score the prompt part too (as finetune trained).",
                "Tokens per record (pass finetune's value to reproduce its eval loss).")
@split_options("Score only the fraction finetune held out with the same --eval_split and --seed.",
               "Score only the records finetune held out with the same --eval_dataset_size and --seed.",
               "The split's seed.")
@_opt("text_file", metavar="FILE",
      help="Plain text (.txt, or .jsonl with 'text') for perplexity; the default without records "
           "is the shipped held-out text quantize reports ppl on.")
@_opt("seq_len", type=int, default=256, show_default=True, help="Perplexity window (tokens).")
@_opt("max_tokens", type=int, default=65536, show_default=True, help="Text tokens scored at most.")
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="Time a 128-token prefill and 1-token decode steps with a KV cache.")
@_opt("max_ppl", type=float, metavar="X",
      help="Fail (exit 3) when the perplexity is above X.")
@_opt("max_latency_ms", type=float, metavar="MS",
      help="Fail (exit 3) when the decode latency per token is above MS.")
@device_option()
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              default="auto", show_default=True,
              help="Torch compute dtype; auto: fp32 for small models (as finetune), else bf16.")
def eval_(**kwargs) -> None:
    """Measure a model: eval loss / perplexity on held-out data, and latency. Writes nothing.

    \b
      phitune eval -m models/tiny/awq                     # ppl on the shipped held-out text
      phitune eval -m models/phi/ft --data_files data/travel.jsonl --data_name json \\
        --text_template "<|user|>\\n{prompt}<|end|>\\n<|assistant|>\\n{response}<|end|>" \\
        --eval_split 0.1 --max_seq_len 256               # finetune's eval loss, same records
      phitune --json eval -m models/phi/onnx --max_ppl 20 --max_latency_ms 50
    """
    from phitune import ui
    from phitune.errors import ConstraintError
    from phitune.eval_step import EvalOptions, run

    title = f"eval {kwargs['model']}"
    try:
        metrics = run(EvalOptions(**kwargs))
    except ConstraintError as exc:
        ui.summary(title, exc.metrics)
        raise
    ui.summary(title, metrics)
