"""`phitune auto-opt`: ONNX for onnxruntime-genai, int4 by default, adapters served apart."""

from __future__ import annotations

import click

from phitune.cli.options import force_option, model_option, output_option


@click.command("auto-opt", context_settings={"help_option_names": ["-h", "--help"]})
@model_option("Model: a float or AWQ checkpoint, a .gguf file, an embedded model ('tiny-phi3', "
              "'smollm2-135m-instruct'), or a finetune output (D or D/model).")
@output_option()
@click.option("--adapter_path", "--adapter-path", "adapter_path", metavar="DIR",
              help="PEFT LoRA adapter to convert into model/adapter_weights.onnx_adapter "
                   "(default: the adapter/ beside a finetune output's model/).")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Target device of the ONNX model.")
@click.option("--provider", type=click.Choice(["CPUExecutionProvider", "CUDAExecutionProvider"]),
              help="Execution provider; must agree with --device (default: the device's).")
@click.option("--precision", type=click.Choice(["int4", "fp16", "fp32"]), default="int4",
              show_default=True,
              help="int4: MatMulNBits (an AWQ input keeps its weights; a float input is "
                   "rounded to nearest); fp32/fp16: float weights (an AWQ input dequantized).")
@click.option("--block_size", "--block-size", "block_size", type=int,
              help="int4 block size of the LM head and of a float input's layers (rounded to "
                   "nearest; 128 decodes faster on CPU, 32 stays closer to float). An AWQ "
                   "input's layers keep their group size. Default: an AWQ input's group size; "
                   "for a float input 32, or 16 where 32 does not divide the model's widths.")
@click.option("--accuracy_level", "--accuracy-level", "accuracy_level", type=click.IntRange(0, 4),
              help="MatMulNBits compute: 4 = int8 (CPU default), 3 = bf16, 2 = fp16, 1 = fp32.")
@click.option("--multi_lora/--no-multi_lora", "--multi-lora/--no-multi-lora", "multi_lora",
              default=True, show_default=True,
              help="Give every projection optional LoRA inputs so any adapter loads at run time.")
@click.option("--use_ort_genai", "--use-ort-genai", "use_ort_genai", is_flag=True,
              help="Accepted for the lab's command line: the output is always an "
                   "onnxruntime-genai model dir.")
@force_option()
def auto_opt(use_ort_genai: bool, **kwargs) -> None:
    """Export to an onnxruntime-genai model: fused graph, int4 weights, LoRA inputs.

    \b
      phitune auto-opt -m models/phi/ft/model --adapter_path models/phi/ft/adapter \\
          --device cpu --provider CPUExecutionProvider --use_ort_genai -o models/phi/onnx-ao
    \b
    Writes D/model/ (genai_config.json, model.onnx + .data, tokenizer, chat template and
    adapter_weights.onnx_adapter when an adapter was given). Convert more adapters for the
    same base later with `phitune export-adapter`.
    """
    from phitune import ui
    from phitune.export.step import AutoOptOptions, run

    manifest, up_to_date = run(AutoOptOptions(**kwargs))
    if up_to_date:
        ui.info(f"{kwargs['output']} is up to date (same inputs and options); --force redoes it")
    ui.summary(f"auto-opt → {kwargs['output']}", manifest["metrics"] | {"up_to_date": up_to_date})
