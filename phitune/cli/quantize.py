"""`phitune quantize`: 4-bit AWQ (or RTN) into a Hugging Face AWQ checkpoint."""

from __future__ import annotations

import click

from phitune.cli.options import device_option, force_option, model_option, output_option


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_option()
@output_option()
@click.option("--algorithm", type=click.Choice(["awq", "rtn"]), default="awq", show_default=True,
              help="awq: activation-aware scale + clip search; rtn: plain round-to-nearest baseline.")
@click.option("--bits", type=int, default=4, show_default=True, help="Weight bits (4).")
@click.option("--group_size", "--group-size", "group_size", type=int,
              help="Input channels per quantization group: 32, 64 or 128 (default: 128 if it "
                   "divides every quantized width of the model, else 64, else 32).")
@click.option("--zero_point/--no-zero_point", "--zero-point/--no-zero-point", "zero_point",
              default=True, show_default=True, help="Asymmetric groups with a zero point.")
@click.option("--calib_data", "--calib-data", "calib_data", metavar="FILE",
              help="Calibration text (.txt or .jsonl with 'text'); default: the shipped text.")
@click.option("--calib_samples", "--calib-samples", "calib_samples", type=int, default=64,
              show_default=True, help="Calibration blocks.")
@click.option("--calib_seq_len", "--calib-seq-len", "calib_seq_len", type=int, default=256,
              show_default=True,
              help="Tokens per calibration block (keep within the context the model was trained on).")
@device_option()
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              default="auto", show_default=True,
              help="Calibration compute dtype; auto: fp32 below 1B parameters, else bf16 on CPU.")
@click.option("--eval/--no-eval", "eval_", default=None,
              help="Measure held-out perplexity before/after (default: on below 1B parameters).")
@click.option("--eval_data", "--eval-data", "eval_data", metavar="FILE",
              help="Held-out text for --eval; default: the shipped held-out text.")
@force_option()
def quantize(eval_: bool | None, **kwargs) -> None:
    """Quantize a model's linear weights to 4 bits (AutoAWQ GEMM layout).

    \b
    The output is a Hugging Face AWQ checkpoint that transformers and
    onnxruntime-genai's model builder read directly:
      phitune quantize -m microsoft/Phi-3.5-mini-instruct --algorithm awq -o models/phi/awq
      phitune quantize -m tiny-phi3 -o models/tiny/awq
    """
    from phitune import ui
    from phitune.quantize.step import QuantizeOptions, run

    manifest, up_to_date = run(QuantizeOptions(eval=eval_, **kwargs))
    if up_to_date:
        ui.info(f"{kwargs['output']} is up to date (same inputs and options); --force redoes it")
    ui.summary(f"quantize → {kwargs['output']}", manifest["metrics"] | {"up_to_date": up_to_date})
